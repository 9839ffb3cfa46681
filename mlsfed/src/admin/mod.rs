//! `mlsfed peer ...`: operator tools for federation state, run against a
//! live operator's NATS (docs/federation.md, "High-water marks").

use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use proto::federation::Mark;
use proto::names;

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

pub async fn peer(cfg: &config::Config, cmd: PeerCmd) -> anyhow::Result<()> {
    anyhow::ensure!(!cfg.nats_url.is_empty(), "set nats_url (MLSFED_NATS_URL) to the running operator's NATS");
    let client = tokio::time::timeout(Duration::from_secs(10), mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file))
        .await
        .context("NATS did not answer within 10 s")??;
    let js = mlsfed::jetstream(client);
    let marks = js.get_key_value(names::FEDERATION_BUCKET).await.context("the federation bucket is missing")?;
    match cmd {
        PeerCmd::Marks => {
            for p in &cfg.peers {
                let mark = marks.get(names::hwm_key(&p.domain)).await?.and_then(|b| Mark::decode(&b));
                let line = match mark {
                    Some(m) => {
                        serde_json::json!({ "peer": p.domain, "outbox": m.outbox, "seq": m.seq, "reset": m.reset })
                    }
                    None => serde_json::json!({ "peer": p.domain, "mark": null }),
                };
                println!("{line}");
            }
        }
        PeerCmd::ResetMark { domain } => {
            anyhow::ensure!(cfg.peer(&domain).is_some(), "{domain} is not a configured peer");
            let reset = Mark { v: Mark::VERSION, outbox: 0, seq: 0, reset: true };
            marks.put(names::hwm_key(&domain), reset.encode().into()).await?;
            println!("{}", serde_json::json!({ "peer": domain, "reset": true }));
        }
    }
    Ok(())
}
