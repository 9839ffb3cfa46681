//! Fanout: reads the LOG and delivers each accepted entry to the mailbox of
//! every local recipient device, in hub order, exactly once.
//!
//! Many fanout processes share one durable consumer. Per-group order across
//! them comes from a cursor per group in KV (`mlsfed_fanout`): an entry is
//! delivered only when the cursor says its predecessor was fully delivered,
//! and the cursor moves by compare-and-set. Redelivered entries are dropped by
//! the cursor (already delivered) or by the mailbox's `Nats-Msg-Id` (delivered
//! in part before a crash).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use proto::streams::Topology;
use proto::wire::{EntryKind, LogEntry, MailboxItem};
use proto::{names, DeviceId, GroupId};
use tokio_util::sync::CancellationToken;

/// How long an entry waits before it is retried when its predecessor is
/// still being delivered by another worker.
const GAP_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum RunFanoutError {
    #[error("cannot read the log: {0}")]
    Consume(String),
}

#[derive(Clone)]
pub struct Metrics {
    pub delivered: IntCounterVec,
    pub entries: IntCounter,
    pub out_of_order_waits: IntCounter,
    pub lag_seconds: Histogram,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            delivered: IntCounterVec::new(
                Opts::new(
                    "mlsfed_fanout_delivered_total",
                    "Mailbox items written, by kind.",
                ),
                &["kind"],
            )?,
            entries: IntCounter::new(
                "mlsfed_fanout_entries_total",
                "LOG entries fully fanned out.",
            )?,
            out_of_order_waits: IntCounter::new(
                "mlsfed_fanout_order_waits_total",
                "Entries held back because their predecessor was not yet delivered.",
            )?,
            lag_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "mlsfed_fanout_lag_seconds",
                    "Time from LOG append to mailbox delivery.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 18)?),
            )?,
        };
        registry.register(Box::new(m.delivered.clone()))?;
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.out_of_order_waits.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        Ok(m)
    }
}

pub struct Fanout {
    topo: Topology,
    domain: String,
    metrics: Metrics,
    /// This worker's last known cursor per group (position, KV revision):
    /// saves the KV read while one worker streams a group. A stale entry
    /// only costs a failed compare-and-set or a wait, never a wrong delivery.
    cursors: HashMap<GroupId, (u64, u64)>,
}

/// Cursors kept before the cache is cleared.
const MAX_CURSORS: usize = 100_000;

enum Step {
    Done,
    NotYet,
}

impl Fanout {
    pub fn new(topo: Topology, domain: String, metrics: Metrics) -> Self {
        Self {
            topo,
            domain,
            metrics,
            cursors: HashMap::new(),
        }
    }

    pub async fn run(
        mut self,
        consumer: jetstream::consumer::PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<(), RunFanoutError> {
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| RunFanoutError::Consume(e.to_string()))?;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = messages.next() => m,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "log stream error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                None => return Err(RunFanoutError::Consume("consumer closed".into())),
            };
            let entry: LogEntry = match proto::wire::decode(&msg.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "undecodable LOG entry; terminating it");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            match self.deliver(&entry.group, &entry).await {
                Ok(Step::Done) => {
                    if let Ok(info) = msg.info() {
                        let age = time::OffsetDateTime::now_utc() - info.published;
                        self.metrics
                            .lag_seconds
                            .observe(age.as_seconds_f64().max(0.0));
                    }
                    if let Err(e) = msg.double_ack().await {
                        tracing::warn!(error = %e, "ack failed; entry will be redelivered and deduplicated");
                    }
                }
                Ok(Step::NotYet) => {
                    self.metrics.out_of_order_waits.inc();
                    let _ = msg.ack_with(AckKind::Nak(Some(GAP_RETRY))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fanout failed; retrying later");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
            }
        }
    }

    async fn deliver(&mut self, group: &GroupId, entry: &LogEntry) -> Result<Step, String> {
        let key = names::group_key(group);
        let (done, revision) = match self.cursors.get(group) {
            Some(c) if c.0 + 1 == entry.position => *c,
            _ => {
                let cursor = self
                    .topo
                    .fanout
                    .entry(key.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                match &cursor {
                    Some(e) => (parse_u64(&e.value), e.revision),
                    None => (0, 0),
                }
            }
        };
        if entry.position <= done {
            tracing::debug!(position = entry.position, done, "already delivered");
            return Ok(Step::Done);
        }
        if entry.position != done + 1 {
            self.cursors.remove(group);
            return Ok(Step::NotYet);
        }
        let local = |d: &DeviceId| d.domain() == self.domain;
        let mut items: Vec<(&DeviceId, MailboxItem)> = entry
            .recipients
            .iter()
            .filter(|d| local(d))
            .map(|d| {
                let item = MailboxItem {
                    group: Some(group.clone()),
                    position: entry.position,
                    epoch: entry.epoch,
                    kind: entry.kind,
                    own: *d == entry.sender,
                    message: entry.message.clone(),
                };
                (d, item)
            })
            .collect();
        if let Some(w) = &entry.welcome {
            for d in entry.welcome_recipients.iter().filter(|d| local(d)) {
                let item = MailboxItem {
                    group: Some(group.clone()),
                    position: entry.position,
                    epoch: entry.epoch + 1,
                    kind: EntryKind::Welcome,
                    own: false,
                    message: w.clone(),
                };
                items.push((d, item));
            }
        }
        self.put_all(group, entry.position, &items).await?;
        let value = Bytes::from(entry.position.to_string());
        let moved = if revision == 0 {
            self.topo
                .fanout
                .create(key.as_str(), value)
                .await
                .map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
        } else {
            self.topo
                .fanout
                .update(key.as_str(), value, revision)
                .await
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                })
        };
        match moved {
            Ok(rev) => {
                if self.cursors.len() > MAX_CURSORS {
                    self.cursors.clear();
                }
                self.cursors.insert(group.clone(), (entry.position, rev));
            }
            // Another worker delivered the same entry concurrently (a
            // redelivery race); the mailbox dedup made that harmless.
            Err((true, _)) => {
                self.cursors.remove(group);
            }
            Err((false, e)) => return Err(e),
        }
        self.metrics.entries.inc();
        tracing::debug!(position = entry.position, "delivered");
        Ok(Step::Done)
    }

    /// Publishes every item, then waits for all the acks: one round trip
    /// per entry rather than one per recipient.
    async fn put_all(
        &self,
        group: &GroupId,
        position: u64,
        items: &[(&DeviceId, MailboxItem)],
    ) -> Result<(), String> {
        let mut acks = Vec::with_capacity(items.len());
        for (d, item) in items {
            let publish = PublishMessage::build()
                .payload(Bytes::from(proto::wire::encode(item)))
                .message_id(names::mailbox_msg_id(group, position, d));
            let ack = self
                .topo
                .js
                .send_publish(names::mailbox_subject(d), publish)
                .await
                .map_err(|e| e.to_string())?;
            acks.push((item.kind, ack));
        }
        for (kind, ack) in acks {
            let ack = ack.await.map_err(|e| e.to_string())?;
            if !ack.duplicate {
                self.metrics
                    .delivered
                    .with_label_values(&[kind.as_str()])
                    .inc();
            }
        }
        Ok(())
    }
}

fn parse_u64(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
