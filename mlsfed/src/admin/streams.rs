//! `mlsfed admin streams`: every mlsfed stream, KV bucket and object store
//! on the operator's NATS, with what it holds, its limits and its usage.

use futures::TryStreamExt as _;
use proto::names;
use serde_json::{json, Value};

use super::Ctx;

pub(super) async fn run(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let mut rows: Vec<(u8, Value)> = Vec::new();
    let mut streams = ctx.js.streams();
    while let Some(info) = streams.try_next().await? {
        let Some((kind, name)) = names::classify_stream(&info.config.name) else { continue };
        let c = &info.config;
        let s = &info.state;
        // JetStream's "no limit" is -1 (sizes, counts) or 0 (age).
        let limit = |v: i64| (v > 0).then_some(v);
        let usage = (c.max_bytes > 0).then(|| ((s.bytes as f64 / c.max_bytes as f64) * 10_000.0).round() / 10_000.0);
        let row = json!({
            "name": name,
            "kind": kind,
            "stream": c.name,
            "messages": s.messages,
            "bytes": s.bytes,
            "consumers": s.consumer_count,
            "max_age_secs": (!c.max_age.is_zero()).then_some(c.max_age.as_secs()),
            "max_bytes": limit(c.max_bytes),
            "max_msgs": limit(c.max_messages),
            "max_msgs_per_subject": limit(c.max_messages_per_subject),
            "replicas": c.num_replicas,
            "usage": usage,
        });
        let order = match kind {
            "stream" => 0,
            "kv" => 1,
            _ => 2,
        };
        rows.push((order, row));
    }
    rows.sort_by(|a, b| (a.0, a.1["name"].as_str()).cmp(&(b.0, b.1["name"].as_str())));
    let rows: Vec<Value> = rows.into_iter().map(|(_, r)| r).collect();
    ctx.out.table(
        &rows,
        &[
            ("name", "NAME"),
            ("kind", "KIND"),
            ("messages", "MSGS"),
            ("bytes", "BYTES"),
            ("max_age_secs", "MAX_AGE(S)"),
            ("max_bytes", "MAX_BYTES"),
            ("max_msgs", "MAX_MSGS"),
            ("replicas", "R"),
            ("usage", "USAGE"),
        ],
    );
    Ok(())
}
