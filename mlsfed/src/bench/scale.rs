//! Scale-out: the same load through separate OS processes ([`INGESTS`] ingest, k
//! sequencer, k fanout) against the bench's nats-server, so the figure shows
//! what adding processes buys, not what threads in one process do.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::fleet::{Fleet, Run};

/// Ingest processes in every scale-out run, whatever k: enough that the
/// API is not what limits k sequencers and fanouts (with 2, 1, 2 and 4
/// workers all gave the same figure on 16 cores).
pub const INGESTS: usize = 4;
use crate::procs::{spawn, spawn_listening, Procs};

/// Waits until exactly `k` sequencers and `k` fanouts are members, then two
/// heartbeats more, so that every process has computed the same owners.
async fn settle_members(js: &async_nats::jetstream::Context, k: usize) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let kv = js.get_key_value(proto::names::MEMBERS_BUCKET).await?;
    let t0 = Instant::now();
    loop {
        let mut keys = kv.keys().await?;
        let (mut seq, mut fan) = (0, 0);
        while let Some(key) = keys.next().await {
            let key = key?;
            seq += usize::from(key.starts_with(&proto::names::member_prefix("sequencer")));
            fan += usize::from(key.starts_with(&proto::names::member_prefix("fanout")));
        }
        if seq == k && fan == k {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "{seq} sequencers and {fan} fanouts, not {k} each");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(proto::partitions::HEARTBEAT * 2).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    js: &async_nats::jetstream::Context,
    cfg: &config::Config,
    tmp: &Path,
    fleet: &mut Fleet,
    per_device: &[Vec<String>],
    senders: &[(String, usize)],
    sizes: &HashMap<String, usize>,
    k: usize,
    messages: usize,
    size: usize,
    in_flight: usize,
    nats_pid: Option<u32>,
) -> anyhow::Result<(Run, Vec<(String, f64)>)> {
    let dir = tmp.join(format!("scale-{k}"));
    std::fs::create_dir_all(&dir)?;
    let mut base = cfg.clone();
    base.metrics_listen = "127.0.0.1:0".into();
    let mut procs = Procs(Vec::new());
    let mut urls = Vec::new();
    let mut pids: [Vec<u32>; 3] = Default::default();
    for i in 0..INGESTS {
        let (child, url) = spawn_listening(&base, &dir, &format!("ingest{i}"), "ingest")?;
        pids[0].push(child.id());
        procs.0.push(child);
        urls.push(url);
    }
    for i in 0..k {
        for (role, ids) in [("sequencer", 1), ("fanout", 2)] {
            let child = spawn(&base, &dir, &format!("{role}{i}"), role)?;
            pids[ids].push(child.id());
            procs.0.push(child);
        }
    }
    let http = reqwest::Client::new();
    for u in &urls {
        let t0 = Instant::now();
        loop {
            if http.get(format!("{u}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "ingest at {u} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fleet.reconnect(&urls);
    fleet.follow(per_device).await.context("followers")?;
    // Every worker has joined, and what left from the previous run is gone,
    // before the warm-up: a partition that moves during the timed run
    // would measure the handover, not the processes.
    settle_members(js, k).await?;
    // Warm-up, untimed: every partition owned, every group's state loaded.
    let warm = fleet.messages(senders, senders.len(), size)?;
    fleet.run(warm, sizes, in_flight, None, Duration::from_secs(90)).await?;
    let bodies = fleet.messages(senders, messages, size)?;
    let [ingests, sequencers, fanouts] = pids;
    let clock = super::cpu::Clock::start(vec![
        super::cpu::Group::new("devices (bench process)", [std::process::id()]),
        super::cpu::Group::new("nats-server", nats_pid),
        super::cpu::Group::new("ingest", ingests),
        super::cpu::Group::new("sequencer", sequencers),
        super::cpu::Group::new("fanout", fanouts),
    ]);
    let r = fleet.run(bodies, sizes, in_flight, None, Duration::from_secs(90)).await?;
    let used = clock.stop();
    fleet.close();
    procs.stop();
    report_worker_logs(&dir);
    Ok((r, used))
}

/// Prints how many warnings and errors each worker logged, with the first
/// few: a run that went wrong says where.
fn report_worker_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut logs: Vec<_> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect();
    logs.sort();
    for log in logs {
        let Ok(text) = std::fs::read_to_string(&log) else { continue };
        let bad: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        if bad.is_empty() {
            continue;
        }
        let name = log.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "  {name}: {} warnings or errors, first: {}",
            bad.len(),
            bad.iter().take(3).copied().collect::<Vec<_>>().join(" | ")
        );
    }
}
