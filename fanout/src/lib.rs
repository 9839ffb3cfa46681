//! Fanout: follows the LOG, in hub order per group, and does what each
//! entry asks of this operator besides being read. Devices read their
//! groups' entries from LOG itself, so an application message costs no
//! write per member here. Fanout keeps the group's roster and each device's
//! group list (at Created and Commit entries), writes what is addressed to
//! one device (Welcomes, removal notices) into its mailbox, settles the
//! KeyPackages a Welcome used, and at the hub hands every entry to each peer
//! operator with members, once per peer.
//!
//! LOG is split into the same partitions as SUBMIT; fanout processes share
//! them out (`proto::partitions`) and work each group of an owned partition
//! in its own task, in order, so a dead or slow worker delays only the
//! groups of its partitions, and only until they fail over. Per-group order
//! across processes (during a handover) still comes from a cursor per group
//! in KV (`mlsfed_fanout`): an entry is handled only when the cursor says
//! its predecessor was, and the cursor moves by compare-and-set. Every write
//! is idempotent (roster by position, mailbox and outbox by `Nats-Msg-Id`),
//! so a redelivered entry changes nothing.
#![forbid(unsafe_code)]

use std::sync::Arc;

use async_nats::jetstream::{self, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use proto::federation::Payload;
use proto::partitions::{GroupHandler, Role};
use proto::roster::{Change, DeviceGroups, Roster};
use proto::streams::Topology;
use proto::wire::{EntryKind, LogEntry, MailboxItem, Notice};
use proto::{names, DeviceId, GroupId};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunFanoutError {
    #[error("cannot read the log: {0}")]
    Consume(String),
    #[error(transparent)]
    Membership(#[from] proto::partitions::MembershipError),
}

#[derive(Clone)]
pub struct Metrics {
    pub delivered: IntCounterVec,
    pub entries: IntCounter,
    pub out_of_order_waits: IntCounter,
    pub forwarded: IntCounter,
    pub lag_seconds: Histogram,
    pub partitions_owned: IntGauge,
    pub partition_owned: IntGaugeVec,
    pub dead_letters: IntCounterVec,
    /// Entries a follower delivered past a hole that can never fill.
    pub lost_predecessors: IntCounter,
    /// Joins not listed in a device's group list, which was full.
    pub device_groups_full: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            delivered: IntCounterVec::new(
                Opts::new("mlsfed_fanout_delivered_total", "Mailbox items written, by kind."),
                &["kind"],
            )?,
            entries: IntCounter::new("mlsfed_fanout_entries_total", "LOG entries fully fanned out.")?,
            out_of_order_waits: IntCounter::new(
                "mlsfed_fanout_order_waits_total",
                "Entries held back because their predecessor was not yet delivered.",
            )?,
            forwarded: IntCounter::new(
                "mlsfed_fanout_forwarded_total",
                "Entries handed to a peer operator's outbox (one per peer with members).",
            )?,
            lag_seconds: Histogram::with_opts(
                HistogramOpts::new("mlsfed_fanout_lag_seconds", "Time from LOG append to mailbox delivery.")
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 18)?),
            )?,
            partitions_owned: IntGauge::new(
                "mlsfed_fanout_partitions_owned",
                "LOG partitions this fanout process delivers now.",
            )?,
            partition_owned: IntGaugeVec::new(
                Opts::new(
                    "mlsfed_fanout_partition_owned",
                    "1 for each LOG partition this process delivers now (a closed set: 0..streams.partitions).",
                ),
                &["partition"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "mlsfed_fanout_dead_letters_total",
                    "LOG entries moved to MLSFED_DEAD after bounded deliveries, by reason.",
                ),
                &["reason"],
            )?,
            lost_predecessors: IntCounter::new(
                "mlsfed_fanout_lost_predecessors_total",
                "Entries a follower delivered past predecessors that never reached it (the hub's outbox \
                 retention dropped them while this operator was away): their members must rejoin.",
            )?,
            device_groups_full: IntCounter::new(
                "mlsfed_fanout_device_groups_full_total",
                "Joins not listed in a device's group list because it is at proto::roster::MAX_LIST_BYTES \
                 already (the device gets its Welcome, but its sync does not report that group).",
            )?,
        };
        registry.register(Box::new(m.device_groups_full.clone()))?;
        registry.register(Box::new(m.lost_predecessors.clone()))?;
        for reason in ["predecessor_missing", "transient", "unsupported_version", "malformed"] {
            m.dead_letters.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.partitions_owned.clone()))?;
        registry.register(Box::new(m.partition_owned.clone()))?;
        registry.register(Box::new(m.delivered.clone()))?;
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.out_of_order_waits.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.forwarded.clone()))?;
        Ok(m)
    }
}

pub struct Fanout {
    ctx: Arc<Ctx>,
}

struct Ctx {
    topo: Topology,
    domain: String,
    metrics: Metrics,
    /// Partitions and delivery bounds.
    streams: config::Streams,
    /// Mailbox puts whose acks are outstanding, over every group task
    /// (`put_all`).
    puts: tokio::sync::Semaphore,
}

/// One group's fan-out, worked by one task at a time.
struct GroupFanout {
    ctx: Arc<Ctx>,
    /// The group's last known cursor (and its KV revision): saves the KV
    /// read while this task streams the group. A stale one only costs a
    /// failed compare-and-set or a wait, never a wrong delivery.
    cursor: Option<(Cursor, u64)>,
    /// The group's roster, cached the same way.
    roster: Option<CachedRoster>,
    /// The trace of the entry being delivered, continued by what it hands
    /// to peers' outboxes.
    trace: Option<proto::trace::Context>,
    /// What a run hands to peers' outboxes, put there at once (one atomic
    /// batch) before its cursor moves: a peer's steady stream of one group
    /// is not one awaited publish per entry.
    forwards: Vec<Forward>,
}

/// One Deliver record for a peer's outbox: subject, payload, headers.
type Forward = (String, Bytes, async_nats::HeaderMap);

/// A group's roster as this task last read or wrote it, shared rather than
/// copied: an application message must not cost a walk over, or a copy of,
/// a 1000-member roster.
#[derive(Clone)]
struct CachedRoster {
    roster: Arc<Roster>,
    /// Its KV revision (0: none stored yet).
    revision: u64,
    /// The peer operators with members in it, worked out once per version.
    peers: Arc<Vec<String>>,
}

impl CachedRoster {
    fn new(roster: Roster, revision: u64, us: &str) -> Self {
        let peers = Arc::new(roster.peers(us));
        Self { roster: Arc::new(roster), revision, peers }
    }
}

/// A group's fan-out progress (KV `mlsfed_fanout`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Cursor {
    /// The last position delivered to every local mailbox.
    done: u64,
    /// At the hub: per peer domain, the last position handed to it.
    #[serde(default)]
    peers: std::collections::BTreeMap<String, u64>,
}

enum Step {
    Done,
    NotYet,
}

/// Mailbox items one group task puts with their acks outstanding at once
/// (`put_all`).
const PUT_CHUNK: usize = 256;
/// ...and all group tasks together: half the JetStream context's
/// `max_ack_inflight` (4096). A chunk takes its share before its first
/// publish, so tasks that each hold part of the context's permits can
/// never all wait for more.
const PUTS_IN_FLIGHT: usize = 2048;

impl Fanout {
    pub fn new(topo: Topology, domain: String, cfg: config::Streams, metrics: Metrics) -> Self {
        let puts = tokio::sync::Semaphore::new(PUTS_IN_FLIGHT);
        Self { ctx: Arc::new(Ctx { topo, domain, metrics, streams: cfg, puts }) }
    }

    /// Joins the fanout processes of this operator and delivers the LOG
    /// partitions it is given until `shutdown` fires; then hands them over.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunFanoutError> {
        let role = Role {
            name: "fanout",
            stream: self.ctx.topo.log.clone(),
            consumer: names::fanout_consumer,
            filter: names::log_partition_filter,
            priority_group: names::FANOUT_PRIORITY_GROUP,
        };
        let metrics = &self.ctx.metrics;
        let on_owned =
            proto::partitions::ownership_gauges(metrics.partitions_owned.clone(), metrics.partition_owned.clone());
        let ctx = self.ctx.clone();
        let new_group =
            move || GroupFanout { ctx: ctx.clone(), cursor: None, roster: None, trace: None, forwards: Vec::new() };
        let members = self.ctx.topo.members.clone();
        proto::partitions::serve(role, members, self.ctx.streams.clone(), new_group, on_owned, shutdown).await?;
        Ok(())
    }
}

impl GroupHandler for GroupFanout {
    /// A run of the group's entries that were waiting together: each is
    /// handled as `handle` would, and the cursor moves once, past the last,
    /// before any of them is acked. A crash before that redelivers them
    /// all, which changes nothing (every write is idempotent, and no
    /// membership change is among them: see below). The first entry that
    /// is not done (undecodable, waiting for its predecessor, a failure),
    /// the first Created or Commit entry, and everything after it go
    /// through `handle`, one at a time: a Commit's roster is stored at
    /// once, so the entries before it must be recorded as done first, or
    /// a redo would hand them to peers by the roster after it.
    async fn handle_batch(&mut self, msgs: Vec<jetstream::Message>) {
        use proto::trace;
        let mut run = Run::default();
        let mut rest = Vec::new();
        for msg in msgs {
            if !rest.is_empty() {
                rest.push(msg);
                continue;
            }
            let entry = match proto::wire::decode::<LogEntry>(&msg.payload) {
                Ok(e) if !matches!(e.kind, EntryKind::Created | EntryKind::Commit) => e,
                _ => {
                    rest.push(msg);
                    continue;
                }
            };
            let (step, span) = self.deliver_traced(&msg, &entry, false).await;
            match (step, &self.cursor) {
                (Ok(Step::Done), Some((cursor, revision))) if cursor.done == entry.position => {
                    trace::end(span);
                    if run.moved.as_ref().is_none_or(|(_, m, _)| m.done < cursor.done) {
                        run.moved = Some((entry.group.clone(), cursor.clone(), *revision));
                    }
                    run.fanned += 1;
                    run.handled.push((msg, entry.position));
                }
                (Ok(Step::Done), _) => {
                    // Delivered before (by us, or by another worker whose
                    // cursor is past it): nothing to move.
                    trace::end(span);
                    run.handled.push((msg, entry.position));
                }
                _ => rest.push(msg),
            }
        }
        match self.finish_run(run).await {
            Ok(redo) => {
                for msg in redo.into_iter().chain(rest) {
                    self.handle(msg).await;
                }
            }
            Err((e, handled)) => {
                // Nothing acked: all of them come back, and are redone.
                tracing::warn!(error = %e, "fanout failed; retrying later");
                self.roster = None;
                for msg in handled.into_iter().chain(rest) {
                    self.retry(&msg, "transient", &e).await;
                }
            }
        }
    }

    async fn handle(&mut self, msg: jetstream::Message) {
        let entry: LogEntry = match proto::wire::decode(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                // A bug or a newer format: set aside with its reason, never
                // silently, so the group's later entries are not blocked.
                let ctx = &self.ctx;
                if proto::streams::dead_letter(&ctx.topo, "fanout", e.label(), &e.to_string(), &msg).await {
                    ctx.metrics.dead_letters.with_label_values(&[e.label()]).inc();
                } else {
                    let _ = msg.ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(5)))).await;
                }
                return;
            }
        };
        let (step, span) = self.deliver_traced(&msg, &entry, true).await;
        match step {
            Ok(Step::Done) => {
                proto::trace::end(span);
                self.done(&msg).await;
            }
            Ok(Step::NotYet) => {
                // Its predecessor is not delivered yet (being retried, or at
                // a follower not received yet): wait with backoff, and give
                // up after bounded deliveries rather than loop forever.
                self.ctx.metrics.out_of_order_waits.inc();
                let detail = format!("position {} waits for position {}", entry.position, entry.prev_position);
                self.retry(&msg, "predecessor_missing", &detail).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "fanout failed; retrying later");
                self.cursor = None;
                self.roster = None;
                self.retry(&msg, "transient", &e).await;
            }
        }
    }
}

/// Entries of one group handled in a batch, not acked yet.
#[derive(Default)]
struct Run {
    /// Each with its position.
    handled: Vec<(jetstream::Message, u64)>,
    /// The cursor past the last of them, and the revision it was read at.
    moved: Option<(GroupId, Cursor, u64)>,
    /// How many of them this run fanned out (not found done already).
    fanned: u64,
}

impl GroupFanout {
    /// Saves a run's cursor, then acks what it covers. Returns the entries
    /// to hand to `handle` again: after a lost compare-and-set, another
    /// worker moved the cursor, perhaps not as far as ours, so only the
    /// entries at or below its position are done; the others are redone one
    /// at a time. On a failure, nothing is acked, and every entry comes
    /// back with the error.
    async fn finish_run(&mut self, run: Run) -> Result<Vec<jetstream::Message>, (String, Vec<jetstream::Message>)> {
        let Run { handled, moved, fanned } = run;
        if let Err(e) = self.flush_forwards().await {
            // The cursor stays behind them: the run is redone.
            self.cursor = None;
            return Err((e, handled.into_iter().map(|(m, _)| m).collect()));
        }
        let covered = match moved {
            None => u64::MAX,
            Some((group, cursor, revision)) => {
                let key = names::group_key(&group);
                match self.save_cursor(&key, cursor, revision).await {
                    Ok(true) => {
                        self.ctx.metrics.entries.inc_by(fanned);
                        u64::MAX
                    }
                    Ok(false) => match self.ctx.topo.fanout.entry(key.as_str()).await {
                        Ok(Some(e)) => serde_json::from_slice::<Cursor>(&e.value).map(|c| c.done).unwrap_or(0),
                        _ => 0,
                    },
                    Err(e) => return Err((e, handled.into_iter().map(|(m, _)| m).collect())),
                }
            }
        };
        let mut redo = Vec::new();
        for (msg, position) in handled {
            if position > covered {
                redo.push(msg);
                continue;
            }
            self.done(&msg).await;
        }
        Ok(redo)
    }

    /// Acks an entry the cursor has passed, and notes how long it took.
    /// Not waited for: a lost ack only brings the entry back, and the
    /// cursor says it is done.
    async fn done(&self, msg: &jetstream::Message) {
        if let Ok(info) = msg.info() {
            let age = time::OffsetDateTime::now_utc() - info.published;
            self.ctx.metrics.lag_seconds.observe(age.as_seconds_f64().max(0.0));
        }
        if let Err(e) = msg.ack().await {
            tracing::warn!(error = %e, "ack failed; entry will be redelivered and deduplicated");
        }
    }

    /// `deliver`, in a span of the entry's trace, which continues into what
    /// it hands to peers' outboxes.
    async fn deliver_traced(
        &mut self,
        msg: &jetstream::Message,
        entry: &LogEntry,
        persist: bool,
    ) -> (Result<Step, String>, Option<proto::trace::Span>) {
        use proto::trace;
        let log_seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut span = trace::Span::child("fanout.deliver", trace::Context::from_headers(msg.headers.as_ref()));
        trace::set(&mut span, "mlsfed.group", &entry.group);
        trace::set(&mut span, "mlsfed.position", entry.position);
        self.trace = trace::context(&span);
        let step = self.deliver(&entry.group, entry, log_seq, persist).await;
        self.trace = None;
        (step, span)
    }

    async fn retry(&self, msg: &jetstream::Message, reason: &'static str, detail: &str) {
        let ctx = &self.ctx;
        let outcome =
            proto::streams::retry_or_dead_letter(&ctx.topo, &ctx.streams, "fanout", reason, detail, msg).await;
        if outcome == proto::streams::Retry::DeadLettered {
            ctx.metrics.dead_letters.with_label_values(&[reason]).inc();
        }
    }
}

impl GroupFanout {
    /// Handles one entry in its group's order. With `persist`, the cursor
    /// is moved past it before this returns; without, only the cached
    /// cursor is, and the caller saves it (once for a run of entries).
    async fn deliver(
        &mut self,
        group: &GroupId,
        entry: &LogEntry,
        log_seq: u64,
        persist: bool,
    ) -> Result<Step, String> {
        let key = names::group_key(group);
        if self.cursor.as_ref().is_some_and(|(c, _)| entry.position <= c.done) {
            // Done by this task already (a copy redelivered while the first
            // waited in our queue): the stored cursor may not show it yet,
            // inside a batch, and must not be taken for the truth.
            return Ok(Step::Done);
        }
        let (mut cursor, revision) = match &self.cursor {
            Some((c, rev)) if c.done == entry.prev_position => (c.clone(), *rev),
            _ => {
                // Another worker may have moved the group on: the roster
                // cached with the old cursor may be stale too.
                self.roster = None;
                let stored = self.ctx.topo.fanout.entry(key.as_str()).await.map_err(|e| e.to_string())?;
                match &stored {
                    Some(e) => (serde_json::from_slice(&e.value).unwrap_or_default(), e.revision),
                    None => (Cursor::default(), 0),
                }
            }
        };
        if entry.position <= cursor.done {
            tracing::debug!(position = entry.position, done = cursor.done, "already delivered");
            return Ok(Step::Done);
        }
        let hub = group.hub() == self.ctx.domain;
        let mut lost = false;
        if entry.prev_position != cursor.done {
            lost = !hub
                && entry.prev_position > cursor.done
                && log_seq > 0
                && self.predecessor_lost(group, entry, log_seq, cursor.done).await?;
            if !lost {
                self.cursor = None;
                self.roster = None;
                return Ok(Step::NotYet);
            }
            self.ctx.metrics.lost_predecessors.inc();
            tracing::warn!(
                position = entry.position,
                delivered = cursor.done,
                "entries before this one never reached this operator; its members of the group must rejoin"
            );
            tracing::debug!(%group, position = entry.position, "lost predecessors");
        }
        let mut cached = self.load_roster(&key).await?;
        if lost && cached.roster.epoch < entry.epoch {
            // Commits were among what was lost: the group is at this
            // entry's epoch at least, or its entries would wait forever for
            // a roster that applied Commits it will never see. Who those
            // Commits added or removed is unknown here; the members that
            // rejoin are in the roster already.
            let mut next = (*cached.roster).clone();
            next.epoch = entry.epoch;
            cached = self.save_roster(&key, next, cached.revision).await?;
        }
        let mut peers = if hub { cached.peers.to_vec() } else { Vec::new() };
        if matches!(entry.kind, EntryKind::Created | EntryKind::Commit) {
            // The roster first, so a Welcome never names a group its device
            // cannot read yet; then what is addressed to single devices. A
            // crash in between repeats those idempotent writes (the cursor
            // has not moved), whether or not the roster already has them.
            let mut next = (*cached.roster).clone();
            if next.apply(entry).is_some() {
                cached = self.save_roster(&key, next, cached.revision).await?;
            }
            self.addressed(group, entry, log_seq, &Change::of(entry)).await?;
            if hub {
                // A Commit goes to every peer it adds or removes devices of,
                // whether or not the roster already shows it applied (a
                // retry after a failure finds it applied, and the peers of
                // removed devices gone from it).
                peers.extend(cached.peers.iter().cloned());
                let named = entry.removed.iter().chain(&entry.welcome_recipients).map(|d| d.domain());
                peers.extend(named.filter(|d| *d != self.ctx.domain).map(str::to_owned));
                peers.sort_unstable();
                peers.dedup();
            }
        }
        // At the hub: hand the entry to each peer operator with members in
        // it, once per peer however many of its devices are members.
        if hub && !peers.is_empty() {
            self.forward(entry, &peers, &mut cursor, !persist).await?;
        }
        cursor.done = entry.position;
        if !persist {
            // The caller moves the cursor once for the whole run.
            self.cursor = Some((cursor, revision));
            return Ok(Step::Done);
        }
        self.save_cursor(&key, cursor, revision).await?;
        self.ctx.metrics.entries.inc();
        tracing::debug!(position = entry.position, "fanned out");
        Ok(Step::Done)
    }

    /// Moves the group's cursor from `revision` (0: none stored yet);
    /// `Ok(false)` when the compare-and-set was lost: another worker moved
    /// it meanwhile (a redelivery race). For one entry that means it was
    /// handled, and every write before is idempotent, so that is success
    /// too; a run must check how far the other worker got (`finish_run`).
    async fn save_cursor(&mut self, key: &str, cursor: Cursor, revision: u64) -> Result<bool, String> {
        let value = Bytes::from(serde_json::to_vec(&cursor).map_err(|e| e.to_string())?);
        let moved = if revision == 0 {
            self.ctx
                .topo
                .fanout
                .create(key, value)
                .await
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string()))
        } else {
            self.ctx
                .topo
                .fanout
                .update(key, value, revision)
                .await
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string()))
        };
        match moved {
            Ok(rev) => {
                self.cursor = Some((cursor, rev));
                Ok(true)
            }
            Err((true, _)) => {
                self.cursor = None;
                self.roster = None;
                Ok(false)
            }
            Err((false, e)) => {
                self.cursor = None;
                Err(e)
            }
        }
    }

    /// At a follower, whether the entry's predecessor will never arrive:
    /// the bridge appends a hub's entries to our LOG in the hub's order, so
    /// if the group's last entry before this one in our LOG is already
    /// delivered (`done`) and is not the predecessor, the predecessor was
    /// lost on the way (it expired in the hub's outbox while we were
    /// unreachable), not merely late. An earlier entry still undelivered
    /// (redelivered after this one) means: wait for it.
    async fn predecessor_lost(
        &self,
        group: &GroupId,
        entry: &LogEntry,
        log_seq: u64,
        done: u64,
    ) -> Result<bool, String> {
        if log_seq <= 1 {
            return Ok(true);
        }
        let subject = names::log_subject(group, self.ctx.streams.partitions);
        let before = proto::direct::multi_last(
            &self.ctx.topo.js.client(),
            names::LOG_STREAM,
            &[subject],
            Some(log_seq - 1),
            std::time::Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let previous = match before.first() {
            Some(stored) => proto::wire::decode::<LogEntry>(&stored.payload).map_err(|e| e.to_string())?.position,
            None => 0,
        };
        Ok(previous <= done && previous < entry.prev_position)
    }

    async fn load_roster(&mut self, key: &str) -> Result<CachedRoster, String> {
        if let Some(cached) = &self.roster {
            return Ok(cached.clone());
        }
        let stored = self.ctx.topo.rosters.entry(key).await.map_err(|e| e.to_string())?;
        let (roster, revision) = match stored {
            Some(e) if e.operation == kv::Operation::Put => {
                (serde_json::from_slice(&e.value).map_err(|e| format!("roster unreadable: {e}"))?, e.revision)
            }
            Some(e) => (Roster::default(), e.revision),
            None => (Roster::default(), 0),
        };
        let loaded = CachedRoster::new(roster, revision, &self.ctx.domain);
        self.roster = Some(loaded.clone());
        Ok(loaded)
    }

    /// Stores `roster` over `revision` (0: none yet) and caches it.
    async fn save_roster(&mut self, key: &str, roster: Roster, revision: u64) -> Result<CachedRoster, String> {
        let value = Bytes::from(serde_json::to_vec(&roster).map_err(|e| e.to_string())?);
        let saved = if revision == 0 {
            self.ctx.topo.rosters.create(key, value).await.map_err(|e| e.to_string())
        } else {
            self.ctx.topo.rosters.update(key, value, revision).await.map_err(|e| e.to_string())
        };
        match saved {
            Ok(revision) => {
                let cached = CachedRoster::new(roster, revision, &self.ctx.domain);
                self.roster = Some(cached.clone());
                Ok(cached)
            }
            Err(e) => {
                self.roster = None;
                Err(e)
            }
        }
    }

    /// What a membership entry addresses to single local devices: each
    /// added device's group list and Welcome, each removed device's group
    /// list and notice, and the settling of the KeyPackages a Welcome used.
    async fn addressed(&self, group: &GroupId, entry: &LogEntry, log_seq: u64, change: &Change) -> Result<(), String> {
        let local = |d: &&DeviceId| d.domain() == self.ctx.domain;
        for d in change.added.iter().filter(local) {
            self.set_device_group(d, group, None, entry.position).await?;
        }
        for d in change.removed.iter().filter(local) {
            self.set_device_group(d, group, Some(entry.position), entry.position).await?;
        }
        let mut items: Vec<(&DeviceId, MailboxItem)> = Vec::new();
        let recipients: Vec<&DeviceId> = entry.welcome_recipients.iter().filter(local).collect();
        if let Some(w) = entry.welcome.as_ref().filter(|_| !recipients.is_empty()) {
            let welcome = MailboxItem {
                group: Some(group.clone()),
                position: entry.position,
                epoch: entry.epoch + 1,
                kind: EntryKind::Welcome,
                own: false,
                message: w.clone(),
                log_seq,
            };
            if recipients.len() > 1 && self.ctx.streams.shared_welcomes {
                // Stored once, before the items that point to it: a Welcome
                // carries the whole ratchet tree, so a copy per added device
                // made adding k devices to a group of n cost k copies of n
                // leaves. A single recipient keeps its copy in its own item,
                // which its ack purges (a shared one stays until the
                // mailbox's max age).
                self.put_welcome(group, entry.position, welcome.clone()).await?;
                let pointer = MailboxItem { message: Vec::new(), ..welcome };
                items.extend(recipients.into_iter().map(|d| (d, pointer.clone())));
            } else {
                items.extend(recipients.into_iter().map(|d| (d, welcome.clone())));
            }
        }
        for d in change.removed.iter().filter(local) {
            let notice = Notice::Removed { group: group.to_string(), position: entry.position };
            let item = MailboxItem {
                group: Some(group.clone()),
                position: entry.position,
                epoch: entry.epoch,
                kind: EntryKind::Notice,
                own: false,
                message: serde_json::to_vec(&notice).map_err(|e| e.to_string())?,
                log_seq,
            };
            items.push((d, item));
        }
        self.put_all(group, entry.position, &items).await?;
        if let Some(w) = &entry.welcome {
            if entry.welcome_recipients.iter().any(|d| d.domain() == self.ctx.domain) {
                // The key directory settles the reservations of the
                // KeyPackages this Welcome used.
                if let Ok(refs) = proto::mls::welcome_recipients(w) {
                    // Durable: an unsettled reservation would return a used
                    // KeyPackage to its pool when it expires.
                    let id = names::fed_msg_id("kpused", &[group.as_bytes(), &entry.position.to_be_bytes()]);
                    let publish =
                        PublishMessage::build().payload(Bytes::from(proto::wire::encode(&refs))).message_id(id);
                    let ack = self
                        .ctx
                        .topo
                        .js
                        .send_publish(names::KP_USED_SUBJECT, publish)
                        .await
                        .map_err(|e| e.to_string())?;
                    ack.await.map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Records in a device's group list that it joined `group` (`removed_at`
    /// None) or was removed at a position, by compare-and-set, and only
    /// forward: a stale worker finishing an older Commit (`position`) never
    /// overwrites what a newer one recorded.
    async fn set_device_group(
        &self,
        d: &DeviceId,
        group: &GroupId,
        removed_at: Option<u64>,
        position: u64,
    ) -> Result<(), String> {
        let kv = &self.ctx.topo.device_groups;
        let key = names::device_key(d);
        for _ in 0..16 {
            let stored = kv.entry(key.as_str()).await.map_err(|e| e.to_string())?;
            let (mut list, revision) = match stored {
                Some(e) if e.operation == kv::Operation::Put => {
                    (serde_json::from_slice::<DeviceGroups>(&e.value).unwrap_or_default(), e.revision)
                }
                Some(e) => (DeviceGroups::default(), e.revision),
                None => (DeviceGroups::default(), 0),
            };
            match list.record(group.as_str(), removed_at, position, proto::unix_now()) {
                proto::roster::Recorded::Changed => {}
                proto::roster::Recorded::Unchanged => return Ok(()),
                proto::roster::Recorded::Full => {
                    // The device still gets its Welcome and reads the group;
                    // only its sync will not report it.
                    self.ctx.metrics.device_groups_full.inc();
                    tracing::warn!(position, "a device is in too many groups to list one more; not listed");
                    return Ok(());
                }
            }
            let value = Bytes::from(serde_json::to_vec(&list).map_err(|e| e.to_string())?);
            let saved = if revision == 0 {
                kv.create(key.as_str(), value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists)
            } else {
                kv.update(key.as_str(), value, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision)
            };
            match saved {
                Ok(()) => return Ok(()),
                // Another group of the same device moved it: read again.
                Err(true) => continue,
                Err(false) => return Err("cannot update the device's group list".into()),
            }
        }
        Err("device group list kept changing".into())
    }

    /// Puts one Deliver record per peer domain with recipients into our
    /// outbox; the bridge signs and sends it. With `defer`, the records wait
    /// in `forwards` for the end of the run (`flush_forwards`).
    async fn forward(
        &mut self,
        entry: &LogEntry,
        peers: &[String],
        cursor: &mut Cursor,
        defer: bool,
    ) -> Result<(), String> {
        for peer in peers.iter().map(String::as_str) {
            let mine = |ds: &[DeviceId]| ds.iter().filter(|d| d.domain() == peer).cloned().collect::<Vec<_>>();
            let welcome_recipients = mine(&entry.welcome_recipients);
            let part = LogEntry {
                prev_position: cursor.peers.get(peer).copied().unwrap_or(0),
                removed: mine(&entry.removed),
                welcome: if welcome_recipients.is_empty() { None } else { entry.welcome.clone() },
                welcome_recipients,
                ..entry.clone()
            };
            let id =
                names::fed_msg_id("deliver", &[entry.group.as_bytes(), &entry.position.to_be_bytes(), peer.as_bytes()]);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            if let Some(t) = self.trace {
                headers.insert(proto::trace::HEADER, t.to_header().as_str());
            }
            let payload = Bytes::from(proto::wire::encode(&Payload::Deliver(part)));
            self.forwards.push((names::fed_out_subject(peer), payload, headers));
            cursor.peers.insert(peer.to_owned(), entry.position);
        }
        if defer {
            return Ok(());
        }
        self.flush_forwards().await
    }

    /// Puts the records waiting in `forwards` into our outbox, in order, as
    /// atomic batches: all of a batch is stored or none of it, so a peer can
    /// never get an entry whose predecessor is missing from the outbox. A
    /// batch the stream refuses (one holding a record stored before, when a
    /// run is redone after a crash) goes one awaited record at a time,
    /// which JetStream deduplicates one by one.
    async fn flush_forwards(&mut self) -> Result<(), String> {
        let mut records = std::mem::take(&mut self.forwards);
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(proto::batch::MAX_MESSAGES));
            let n = records.len() as u64;
            let client = self.ctx.topo.js.client();
            let batched = if n == 1 {
                Err(String::new())
            } else {
                proto::batch::publish_batch(&client, None, records.clone()).await.map_err(|e| e.to_string())
            };
            if let Err(e) = batched {
                if !e.is_empty() {
                    tracing::debug!(error = %e, "outbox batch refused; putting its records one at a time");
                }
                for (subject, payload, headers) in records {
                    let publish = PublishMessage::build().payload(payload).headers(headers);
                    self.ctx
                        .topo
                        .js
                        .send_publish(subject, publish)
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            self.ctx.metrics.forwarded.inc_by(n);
            records = rest;
        }
        Ok(())
    }

    /// Stores a Commit's Welcome once (`names::welcome_subject`), as the
    /// whole mailbox item its recipients' items point to.
    async fn put_welcome(&self, group: &GroupId, position: u64, item: MailboxItem) -> Result<(), String> {
        let publish = PublishMessage::build()
            .payload(Bytes::from(proto::wire::encode(&item)))
            .message_id(names::welcome_msg_id(group, position));
        let ack = self
            .ctx
            .topo
            .js
            .send_publish(names::welcome_subject(group, position), publish)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Publishes the items a chunk at a time, then waits for the chunk's
    /// acks: one round trip per chunk rather than one per recipient. Never
    /// more than a chunk, within the process-wide share (`PUTS_IN_FLIGHT`):
    /// every ack not yet awaited holds one of the context's
    /// `max_ack_inflight` permits until it is awaited, so a Commit naming
    /// more recipients than there are permits, or several large ones at
    /// once, would otherwise wait for their own acks for good.
    async fn put_all(&self, group: &GroupId, position: u64, items: &[(&DeviceId, MailboxItem)]) -> Result<(), String> {
        for chunk in items.chunks(PUT_CHUNK) {
            // Never closed: the semaphore lives as long as the context.
            let _share = self.ctx.puts.acquire_many(chunk.len() as u32).await.map_err(|e| e.to_string())?;
            let mut acks = Vec::with_capacity(chunk.len());
            for (d, item) in chunk {
                let publish = PublishMessage::build()
                    .payload(Bytes::from(proto::wire::encode(item)))
                    .message_id(names::mailbox_msg_id(group, position, d));
                let ack = self
                    .ctx
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
                    self.ctx.metrics.delivered.with_label_values(&[kind.as_str()]).inc();
                }
            }
        }
        Ok(())
    }
}
