//! `mlsfed admin peers ...`: what the bridge records about each configured
//! peer in NATS, and the operator's control of its outbox.
//!
//! Read from NATS: the outbox consumer on `MLSFED_FED_OUT` (depth: pending
//! plus unacknowledged, the oldest queued record's age), our inbound stream
//! from the peer, its high-water mark, and the control record with the
//! revision the bridge applied. The negotiated federation version (or
//! incompatibility) and the bridge's latched `needs_resync` live only in
//! the bridge's memory (its metrics); `needs_resync` here is derived from
//! the oldest record's age by the bridge's own rule.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::kv;
use clap::Subcommand;
use federation_bridge::PeerControl;
use proto::names;
use serde_json::json;

use super::out::Fields;
use super::{federation_bucket, Ctx};

#[derive(Subcommand)]
pub enum PeersCmd {
    /// Each configured peer: state, outbox depth and lag, inbox depth, mark.
    List,
    /// Everything recorded about one peer.
    Show { domain: String },
    /// Stop sending to the peer; what is queued stays in MLSFED_FED_OUT
    /// (within federation.outbox_max_age_secs) until `resume`.
    Pause {
        domain: String,
        /// How long to wait for the bridge to apply it (0: do not wait).
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
    /// Send to the peer again, starting with what was held.
    Resume {
        domain: String,
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
    /// Make a backed-off outbox retry the peer now (after fixing its link).
    ResetBackoff {
        domain: String,
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
    /// Each configured peer's inbound high-water mark (= `mlsfed peer marks`).
    Marks,
    /// = `mlsfed peer reset-mark`.
    ResetMark { domain: String },
}

const NOTES: &[&str] = &[
    "the negotiated federation version (or incompatibility) is kept in the bridge's memory only: \
     see mlsfed_federation_peer_compatible and mlsfed_federation_peer_version on its /metrics",
    "needs_resync is derived from the oldest queued record's age (at 90% of \
     federation.outbox_max_age_secs, as the bridge decides); the bridge's own mark \
     (mlsfed_federation_needs_resync) stays set until it restarts",
];

pub(super) async fn run(ctx: &Ctx<'_>, cmd: PeersCmd) -> anyhow::Result<()> {
    match cmd {
        PeersCmd::List => {
            let mut rows = Vec::new();
            for p in &ctx.cfg.peers {
                rows.push(mlsfed::inspect::peer(&ctx.js, ctx.cfg, &p.domain).await?.to_value());
            }
            ctx.out.table(
                &rows,
                &[
                    ("peer", "PEER"),
                    ("state", "STATE"),
                    ("outbox_depth", "OUTBOX"),
                    ("outbox_oldest_age_secs", "LAG(S)"),
                    ("inbox_depth", "INBOX"),
                    ("mark_seq", "MARK"),
                ],
            );
            Ok(())
        }
        PeersCmd::Show { domain } => {
            configured(ctx, &domain)?;
            ctx.out.record(&Fields(mlsfed::inspect::peer(&ctx.js, ctx.cfg, &domain).await?.0), NOTES);
            Ok(())
        }
        PeersCmd::Pause { domain, wait_secs } => control(ctx, &domain, wait_secs, "paused", |c| c.paused = true).await,
        PeersCmd::Resume { domain, wait_secs } => {
            control(ctx, &domain, wait_secs, "resumed", |c| c.paused = false).await
        }
        PeersCmd::ResetBackoff { domain, wait_secs } => {
            control(ctx, &domain, wait_secs, "backoff reset", |c| c.backoff_resets += 1).await
        }
        PeersCmd::Marks => super::marks(ctx).await,
        PeersCmd::ResetMark { domain } => super::reset_mark(ctx, &domain).await,
    }
}

fn configured(ctx: &Ctx<'_>, domain: &str) -> anyhow::Result<()> {
    anyhow::ensure!(ctx.cfg.peer(domain).is_some(), "{domain} is not a configured peer");
    Ok(())
}

/// Changes the peer's control record by compare-and-set, then waits
/// (bounded) until the bridge says it applied it.
async fn control(
    ctx: &Ctx<'_>,
    domain: &str,
    wait_secs: u64,
    what: &str,
    change: impl Fn(&mut PeerControl),
) -> anyhow::Result<()> {
    configured(ctx, domain)?;
    let kv = federation_bucket(ctx).await?;
    let key = names::peer_control_key(domain);
    let mut written = None;
    for _ in 0..20 {
        let (mut c, revision) = mlsfed::inspect::read_control(&kv, domain).await?;
        change(&mut c);
        c.v = PeerControl::VERSION;
        let stored = if revision == 0 {
            kv.create(&key, c.encode().into()).await.map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
        } else {
            kv.update(&key, c.encode().into(), revision)
                .await
                .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
        };
        match stored {
            Ok(rev) => {
                written = Some((c, rev));
                break;
            }
            // Someone else changed it meanwhile: read it again.
            Err(true) => continue,
            Err(false) => anyhow::bail!("cannot store the control record of {domain}"),
        }
    }
    let (c, revision) = written.context("the control record kept changing")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    let applied = loop {
        if mlsfed::inspect::read_applied(&kv, domain).await?.is_some_and(|a| a.revision >= revision) {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let row = json!({
        "peer": domain,
        "paused": c.paused,
        "backoff_resets": c.backoff_resets,
        "revision": revision,
        "applied": applied,
    });
    let human = if applied {
        format!("{domain}: {what} (applied by the bridge)")
    } else {
        format!("{domain}: {what} (stored; no bridge applied it within {wait_secs} s: it applies it when it runs)")
    };
    ctx.out.done(&row, &human);
    Ok(())
}
