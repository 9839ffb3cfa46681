//! What an operator's NATS says about its state: peers' outboxes and
//! inboxes, streams against their limits, dead letters. Read by the admin
//! CLI and by the status page, the same way.

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use federation_bridge::{ControlApplied, PeerControl};
use futures::TryStreamExt as _;
use proto::federation::Mark;
use proto::names;
use serde_json::{json, Value};

/// One record's fields, in display order.
pub struct Row(pub Vec<(&'static str, Value)>);

impl Row {
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// A configured peer: its state, outbox depth and lag, inbox depth, mark.
pub async fn peer(js: &jetstream::Context, cfg: &config::Config, domain: &str) -> anyhow::Result<Row> {
    let kv = js.get_key_value(names::FEDERATION_BUCKET).await.context("the federation bucket is missing")?;
    let fed_out = js.get_stream(names::FED_OUT_STREAM).await.context("MLSFED_FED_OUT is missing")?;
    let subject = names::fed_out_subject(domain);
    let consumer = match fed_out.consumer_info(names::bridge_out_consumer(domain)).await {
        Ok(info) => Some(info),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => None,
        Err(e) => return Err(e).context("cannot read the outbox consumer"),
    };
    // Queued: not yet delivered plus delivered and held (unacknowledged).
    // Without a consumer the bridge never ran: everything is queued.
    let (depth, acked_seq) = match &consumer {
        Some(c) => (c.num_pending + c.num_ack_pending as u64, c.ack_floor.stream_sequence),
        None => (subject_count(&fed_out, &subject).await?, 0),
    };
    let oldest_age = if depth > 0 {
        match fed_out.raw_message_builder().sequence(acked_seq + 1).next_by_subject(subject.clone()).send().await {
            Ok(m) => Some(age_secs(m.time.unix_timestamp_nanos())),
            Err(_) => None,
        }
    } else {
        None
    };
    let max_age = cfg.federation.outbox_max_age_secs as f64;
    let needs_resync = oldest_age.is_some_and(|a| a >= max_age * 0.9);
    let inbox_depth = match js.get_stream(names::fed_in_stream(domain)).await {
        Ok(mut s) => Some(s.info().await?.state.messages),
        Err(_) => None,
    };
    let mark = kv.get(names::hwm_key(domain)).await?.and_then(|b| Mark::decode(&b));
    let (c, revision) = read_control(&kv, domain).await?;
    let applied = read_applied(&kv, domain).await?;
    let control_applied = revision == 0 || applied.as_ref().is_some_and(|a| a.revision >= revision);
    let bridge_paused = applied.as_ref().is_some_and(|a| a.paused);
    let state = match (c.paused, control_applied) {
        (true, true) => "paused",
        (true, false) => "pause_requested",
        (false, false) if bridge_paused => "resume_requested",
        _ if consumer.is_none() => "no_outbox_consumer",
        _ if needs_resync => "needs_resync",
        _ if depth > 0 => "queued",
        _ => "idle",
    };
    Ok(Row(vec![
        ("peer", json!(domain)),
        ("state", json!(state)),
        ("paused", json!(c.paused)),
        ("control_applied", json!(control_applied)),
        ("backoff_resets", json!(c.backoff_resets)),
        ("outbox_depth", json!(depth)),
        ("outbox_unacked", json!(consumer.as_ref().map(|c| c.num_ack_pending))),
        ("outbox_redelivered", json!(consumer.as_ref().map(|c| c.num_redelivered))),
        ("outbox_acked_seq", json!(acked_seq)),
        ("outbox_oldest_age_secs", json!(oldest_age)),
        ("needs_resync", json!(needs_resync)),
        ("inbox_depth", json!(inbox_depth)),
        ("mark_outbox", json!(mark.as_ref().map(|m| m.outbox))),
        ("mark_seq", json!(mark.as_ref().map(|m| m.seq))),
        ("mark_reset", json!(mark.as_ref().map(|m| m.reset))),
    ]))
}

/// Messages stored under exactly `subject`.
async fn subject_count(stream: &jetstream::stream::Stream, subject: &str) -> anyhow::Result<u64> {
    use futures::TryStreamExt as _;
    let mut subjects = stream.info_with_subjects(subject).await?;
    let mut n = 0;
    while let Some((s, count)) = subjects.try_next().await? {
        if s == subject {
            n += count as u64;
        }
    }
    Ok(n)
}

/// The control record and its KV revision (0: none).
pub async fn read_control(kv: &kv::Store, domain: &str) -> anyhow::Result<(PeerControl, u64)> {
    match kv.entry(names::peer_control_key(domain)).await? {
        Some(e) if e.operation == kv::Operation::Put => {
            let c = PeerControl::decode(&e.value).map_err(|e| anyhow::anyhow!("{domain}: {e}"))?;
            Ok((c, e.revision))
        }
        Some(e) => Ok((PeerControl::default(), e.revision)),
        None => Ok((PeerControl::default(), 0)),
    }
}

pub async fn read_applied(kv: &kv::Store, domain: &str) -> anyhow::Result<Option<ControlApplied>> {
    Ok(kv.get(names::peer_control_applied_key(domain)).await?.and_then(|b| ControlApplied::decode(&b)))
}

/// Every mlsfed stream, KV bucket and object store, with what it holds,
/// its limits and its usage, streams first.
pub async fn streams(js: &jetstream::Context) -> anyhow::Result<Vec<Value>> {
    let mut rows: Vec<(u8, Value)> = Vec::new();
    let mut streams = js.streams();
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
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// Letters in `MLSFED_DEAD`.
pub async fn dead_letters(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut dead = js.get_stream(names::DEAD_STREAM).await.context("MLSFED_DEAD is missing")?;
    Ok(dead.info().await?.state.messages)
}

/// Unix time in seconds, fractional.
fn unix_now_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since a JetStream timestamp given in unix nanoseconds (a
/// tenth of a second precision, never negative).
pub fn age_secs(unix_nanos: i128) -> f64 {
    let at = unix_nanos as f64 / 1e9;
    ((unix_now_f64() - at).max(0.0) * 10.0).round() / 10.0
}
