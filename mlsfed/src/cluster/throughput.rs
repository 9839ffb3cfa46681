//! `mlsfed cluster --throughput N`: msgs/s on the cluster topology (3 NATS
//! nodes, R3 streams), and on the same processes over one nats-server (R1),
//! in the same run. The load is the bench's (docs/benchmarks.md): groups of
//! 10 at a.example, spread over its two ingest processes, every delivery
//! counted at the member device it reached over its WebSocket, client
//! crypto done before the timed part.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::Topology;
use crate::bench::fleet::{Fleet, Run, Tens};

const DEVICES: usize = 500;
const GROUPS: usize = 500;
const IN_FLIGHT: usize = 256;
const SIZE: usize = 100;

pub(super) async fn run(base: &config::Config, dir: Option<PathBuf>, messages: usize) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for nodes in [3, 1] {
        let sub = dir.as_ref().map(|d| d.join(format!("nodes-{nodes}")));
        let mut topo = Topology::start(base, sub, nodes).await?;
        let measured = measure(&topo, messages).await;
        topo.stop();
        let r = measured?;
        println!(
            "{nodes} NATS node(s), R{nodes}: {} msgs, accepted {:.0} msgs/s, delivered to every member {:.0} msgs/s \
             ({}/{} deliveries, {} duplicates), p50 {:.1} ms, p99 {:.1} ms",
            r.messages,
            r.accepted_per_s(),
            r.delivered_per_s(),
            r.deliveries,
            r.deliveries_expected,
            r.duplicates,
            r.pct_ms(0.5),
            r.pct_ms(0.99)
        );
        rows.push(json!({
            "nats_nodes": nodes,
            "replicas": nodes,
            "messages": r.messages,
            "accepted_msgs_per_s": r.accepted_per_s(),
            "delivered_msgs_per_s": r.delivered_per_s(),
            "deliveries": r.deliveries,
            "deliveries_expected": r.deliveries_expected,
            "duplicates": r.duplicates,
            "p50_ms": r.pct_ms(0.5),
            "p99_ms": r.pct_ms(0.99),
        }));
    }
    let ratio = match (rows[0]["delivered_msgs_per_s"].as_f64(), rows[1]["delivered_msgs_per_s"].as_f64()) {
        (Some(c), Some(s)) if s > 0.0 => c / s,
        _ => 0.0,
    };
    println!("cluster / one server: {:.0}% of the delivered msgs/s", ratio * 100.0);
    let out = json!({ "machine": crate::bench::machine(), "runs": rows, "cluster_vs_single": ratio });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// 500 groups of 10 at the first operator, through both of its ingests.
async fn measure(topo: &Topology, messages: usize) -> anyhow::Result<Run> {
    let op = &topo.ops[0];
    let secret = op.cfg.token_secret.expose().as_bytes().to_vec();
    let mut fleet = Fleet::new(&op.cfg.domain, &secret, &op.ingest_urls[0], DEVICES, "dev")?;
    fleet.reconnect(&op.ingest_urls);
    let Tens { sizes, senders, .. } = fleet.groups_of_ten(GROUPS).await?;
    // Warm-up, untimed: every partition owned, every group's state loaded.
    let warm = fleet.messages(&senders, senders.len(), SIZE)?;
    fleet.run(warm, &sizes, IN_FLIGHT, None, Duration::from_secs(120)).await?;
    let bodies = fleet.messages(&senders, messages, SIZE)?;
    let r = fleet.run(bodies, &sizes, IN_FLIGHT, None, Duration::from_secs(180)).await?;
    fleet.close();
    Ok(r)
}
