//! Where a message's time across a federation link goes: the JetStream
//! timestamps of each entry at every hop (the hub's LOG, its outbox, the
//! peer's inbox, the peer's LOG), beside when it was submitted and read.
//! All on one machine, so one clock.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::OrderedConfig;
use futures::StreamExt;
use proto::federation::{Envelope, Payload, Signed};
use proto::wire::LogEntry;

/// Unix nanoseconds of an `Instant` taken in this process.
pub struct Clock {
    at: Instant,
    unix_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        Self { at: Instant::now(), unix_ns }
    }

    pub fn unix_ns(&self, i: Instant) -> i128 {
        if i >= self.at {
            self.unix_ns + i.duration_since(self.at).as_nanos() as i128
        } else {
            self.unix_ns - self.at.duration_since(i).as_nanos() as i128
        }
    }
}

/// When each position of a stream's subject was stored (unix ns), the
/// positions found by `positions` in each message.
pub(super) async fn stored(
    cfg: &config::Config,
    stream: &str,
    subject: String,
    positions: impl Fn(&[u8]) -> Vec<u64>,
) -> anyhow::Result<HashMap<u64, i128>> {
    let js = mlsfed::jetstream(mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?);
    let stream = js.get_stream(stream).await?;
    let consumer = stream.create_consumer(OrderedConfig { filter_subject: subject, ..Default::default() }).await?;
    let mut messages = consumer.messages().await?;
    let mut at = HashMap::new();
    // Bounded: the subject holds what the bench put there, and each read
    // waits at most a few seconds.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
        let m = m?;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = info.published.unix_timestamp_nanos();
        for p in positions(&m.payload) {
            at.entry(p).or_insert(t);
        }
        if info.pending == 0 {
            break;
        }
    }
    Ok(at)
}

pub(super) fn log_position(bytes: &[u8]) -> Vec<u64> {
    proto::wire::decode::<LogEntry>(bytes).map(|e| vec![e.position]).unwrap_or_default()
}

fn deliver_positions(payloads: &[Payload]) -> Vec<u64> {
    payloads
        .iter()
        .filter_map(|p| match p {
            Payload::Deliver(e) => Some(e.position),
            _ => None,
        })
        .collect()
}

/// The p50 and p99 of each hop for the messages submitted at `starts`
/// (hub position, submit time) and read at `reads`: printed, and returned
/// as (hop, p50 ms, p99 ms).
pub async fn link(
    hub: &config::Config,
    peer: &config::Config,
    group: &str,
    clock: &Clock,
    starts: &[(u64, Instant)],
    reads: &[(u64, Instant)],
) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let g = proto::GroupId::parse(group)?;
    let hub_log =
        stored(hub, proto::names::LOG_STREAM, proto::names::log_subject(&g, hub.streams.partitions), log_position)
            .await?;
    let outbox = stored(hub, proto::names::FED_OUT_STREAM, proto::names::fed_out_subject(&peer.domain), |b| {
        proto::wire::decode::<Payload>(b).map(|p| deliver_positions(&[p])).unwrap_or_default()
    })
    .await?;
    // The peer's inbox is a work queue: what it applied is gone, and when
    // nothing is left the hop is shown with the next one.
    let inbox =
        stored(peer, &proto::names::fed_in_stream(&hub.domain), proto::names::fed_in_subject(&hub.domain), |b| {
            proto::wire::decode::<Signed>(b)
                .ok()
                .and_then(|s| proto::wire::decode::<Envelope>(&s.body).ok())
                .map(|e| deliver_positions(&e.payloads))
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
    let peer_log =
        stored(peer, proto::names::LOG_STREAM, proto::names::log_subject(&g, peer.streams.partitions), log_position)
            .await?;
    let submitted: HashMap<u64, i128> = starts.iter().map(|(p, i)| (*p, clock.unix_ns(*i))).collect();
    let read: HashMap<u64, i128> = reads.iter().map(|(p, i)| (*p, clock.unix_ns(*i))).collect();
    let points: Vec<(&'static str, &HashMap<u64, i128>)> = [
        ("submitted", &submitted),
        ("hub LOG", &hub_log),
        ("hub outbox", &outbox),
        ("peer inbox", &inbox),
        ("peer LOG", &peer_log),
        ("read", &read),
    ]
    .into_iter()
    .filter(|(_, at)| !at.is_empty())
    .collect();
    let mut out = Vec::new();
    for pair in points.windows(2) {
        let ((from_name, from), (to_name, to)) = (pair[0], pair[1]);
        let mut ms: Vec<f64> =
            submitted.keys().filter_map(|p| Some((to.get(p)? - from.get(p)?) as f64 / 1e6)).collect();
        ms.sort_by(f64::total_cmp);
        let q = |q: f64| ms.get(((ms.len() as f64 - 1.0) * q).round().max(0.0) as usize).copied().unwrap_or(f64::NAN);
        let name = format!("{from_name} -> {to_name}");
        println!("  {name:<26} p50 {:>6.1} ms  p99 {:>6.1} ms  ({} entries)", q(0.5), q(0.99), ms.len());
        out.push((name, q(0.5), q(0.99)));
    }
    Ok(out)
}
