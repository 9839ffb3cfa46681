//! Operator tools, run against a live operator's NATS (never its HTTP API):
//! `mlsfed admin peers|groups|streams|dead ...` (docs/operations.md, "Admin
//! CLI"), and the older `mlsfed peer marks|reset-mark` (docs/federation.md,
//! "High-water marks"), also under `mlsfed admin peers`.
//!
//! Each command prints a readable table, or with `--json` one JSON object
//! per line. Nothing here prints message contents or a group's member list.

mod dead;
mod groups;
mod out;
mod peers;
mod streams;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, Subcommand};
use proto::federation::Mark;
use proto::names;

use out::Out;

#[derive(Subcommand)]
pub enum PeerCmd {
    /// Print each configured peer's high-water mark as JSON lines.
    Marks,
    /// Make the bridge take the next envelope from `domain` whatever its
    /// sequence, and follow the peer's sequence from there. For a peer
    /// whose envelopes are refused as too far ahead (`seq_jump`) or whose
    /// outbox was restored from a backup; counted in
    /// `mlsfed_federation_mark_resets_total{peer}` when it takes effect.
    ResetMark { domain: String },
}

/// `mlsfed admin ...`.
#[derive(Args)]
pub struct AdminArgs {
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Federation peers: outbox state and lag, marks; pause, resume, reset backoff.
    Peers {
        #[command(subcommand)]
        cmd: peers::PeersCmd,
    },
    /// One group's place here: hub, epoch, position, partition, member counts.
    Groups {
        #[command(subcommand)]
        cmd: groups::GroupsCmd,
    },
    /// Every mlsfed stream and KV bucket: contents, limits and usage.
    Streams,
    /// Dead letters (MLSFED_DEAD): list, requeue, purge.
    Dead {
        #[command(subcommand)]
        cmd: dead::DeadCmd,
    },
}

/// What every admin command works with.
struct Ctx<'a> {
    cfg: &'a config::Config,
    js: jetstream::Context,
    out: Out,
}

/// The operator's JetStream, as its config names it.
async fn connect(cfg: &config::Config) -> anyhow::Result<jetstream::Context> {
    anyhow::ensure!(!cfg.nats_url.is_empty(), "set nats_url (MLSFED_NATS_URL) to the running operator's NATS");
    let client = tokio::time::timeout(Duration::from_secs(10), mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file))
        .await
        .context("NATS did not answer within 10 s")??;
    Ok(mlsfed::jetstream(client))
}

pub async fn admin(cfg: &config::Config, args: AdminArgs) -> anyhow::Result<()> {
    let ctx = Ctx { cfg, js: connect(cfg).await?, out: Out { json: args.json } };
    match args.cmd {
        AdminCmd::Peers { cmd } => peers::run(&ctx, cmd).await,
        AdminCmd::Groups { cmd } => groups::run(&ctx, cmd).await,
        AdminCmd::Streams => streams::run(&ctx).await,
        AdminCmd::Dead { cmd } => dead::run(&ctx, cmd).await,
    }
}

/// `mlsfed peer ...`: JSON lines, as before `mlsfed admin` existed.
pub async fn peer(cfg: &config::Config, cmd: PeerCmd) -> anyhow::Result<()> {
    let ctx = Ctx { cfg, js: connect(cfg).await?, out: Out { json: true } };
    match cmd {
        PeerCmd::Marks => marks(&ctx).await,
        PeerCmd::ResetMark { domain } => reset_mark(&ctx, &domain).await,
    }
}

async fn federation_bucket(ctx: &Ctx<'_>) -> anyhow::Result<jetstream::kv::Store> {
    ctx.js.get_key_value(names::FEDERATION_BUCKET).await.context("the federation bucket is missing")
}

/// Each configured peer's inbound high-water mark.
async fn marks(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let kv = federation_bucket(ctx).await?;
    let mut rows = Vec::new();
    for p in &ctx.cfg.peers {
        let mark = kv.get(names::hwm_key(&p.domain)).await?.and_then(|b| Mark::decode(&b));
        rows.push(match mark {
            Some(m) => serde_json::json!({ "peer": p.domain, "outbox": m.outbox, "seq": m.seq, "reset": m.reset }),
            None => serde_json::json!({ "peer": p.domain, "mark": null }),
        });
    }
    ctx.out.table(&rows, &[("peer", "PEER"), ("outbox", "OUTBOX"), ("seq", "SEQ"), ("reset", "RESET")]);
    Ok(())
}

async fn reset_mark(ctx: &Ctx<'_>, domain: &str) -> anyhow::Result<()> {
    anyhow::ensure!(ctx.cfg.peer(domain).is_some(), "{domain} is not a configured peer");
    let kv = federation_bucket(ctx).await?;
    let reset = Mark { v: Mark::VERSION, outbox: 0, seq: 0, reset: true };
    kv.put(names::hwm_key(domain), reset.encode().into()).await?;
    ctx.out.done(
        &serde_json::json!({ "peer": domain, "reset": true }),
        &format!("{domain}: the bridge takes its next envelope whatever its sequence"),
    );
    Ok(())
}

use mlsfed::inspect::age_secs;
