//! The inbox: envelopes that peers put into our FED_IN are opened (origin,
//! signature, destination, version), checked against the peer's high-water
//! mark, and applied: a forwarded submission goes into SUBMIT, a verdict to
//! the waiting ingest, a delivery into our LOG for local fan-out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use proto::federation::{self as fed, Envelope, Mark, MarkCheck, Payload};
use proto::names;
use proto::trace;
use proto::wire::Verdict;
use tokio_util::sync::CancellationToken;

use crate::takeover::{self, stream_seq, Takeover};
use crate::{Bridge, Refusal, RunBridgeError};

/// Groups appended at once (each group's run in one atomic batch).
const CONCURRENT_APPENDS: usize = 16;
/// Most envelopes one inbox round applies: those already waiting when it
/// starts, in outbox order, with one read and one write of the peer's
/// high-water mark, and each group's entries from all of them appended
/// together. A peer's steady trickle costs a round trip per envelope no
/// longer, and its outbox need not hold records back to fill envelopes.
const ROUND: usize = 64;
/// A round also stops growing past this many bytes of envelopes.
const ROUND_BYTES: usize = 8 << 20;

/// A hub's entries per group, each group's in its order.
#[derive(Default)]
struct Runs {
    runs: Vec<(proto::GroupId, Vec<Traced>)>,
    /// Where each group's run is in `runs`: a round holds up to 64
    /// envelopes of up to 1000 records each, and a search per record would
    /// make a catch-up over many groups quadratic.
    index: HashMap<proto::GroupId, usize>,
}

impl Runs {
    /// Adds a hub's entry to its group's run.
    fn add(&mut self, traced: Traced) {
        match self.index.get(&traced.entry.group) {
            Some(&i) => self.runs[i].1.push(traced),
            None => {
                self.index.insert(traced.entry.group.clone(), self.runs.len());
                self.runs.push((traced.entry.group.clone(), vec![traced]));
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// What one round did with the envelopes it was given.
struct Round {
    /// Per envelope: acked, terminated or dead-lettered; nothing is left to
    /// do with it.
    settled: Vec<bool>,
    /// The first envelope not settled (its stream sequence), and why it
    /// could not be applied now.
    stalled: Option<(u64, String)>,
}

/// What became of one envelope in a round.
enum Received {
    /// Records were applied (or are appended with the round): the mark
    /// moves to this envelope once they are.
    /// `refused`: the records in it refused one by one, counted when the
    /// envelope is settled (not each time it is judged).
    Applied { mark: Mark, check: MarkCheck, groups: Vec<proto::GroupId>, refused: Vec<Refusal> },
    /// Opened and current, but every record in it was refused: acked, and
    /// the mark stays where it was.
    Unused { refused: Vec<Refusal> },
    /// At or below the mark: applied before.
    Replay,
    /// Never applied, never retried.
    Refused(Refusal),
    /// Signed by the peer, but too far ahead of its mark.
    TooFarAhead,
    /// A record could not be applied now; retried with what follows it.
    Failed(String),
}

impl Bridge {
    /// Applies the envelopes `peer` puts into our FED_IN: one consumer per
    /// peer, its envelopes in outbox order (its high-water mark moves in
    /// order), so one peer's poison delays only that peer, and only until
    /// its bounded deliveries run out.
    pub(crate) async fn inbox(
        self: Arc<Self>,
        peer: String,
        shutdown: CancellationToken,
    ) -> Result<(), RunBridgeError> {
        let stream = self
            .topo
            .fed_in
            .get(&peer)
            .ok_or_else(|| RunBridgeError::Setup(format!("no inbound stream for {peer}")))?;
        // Up to a round of envelopes in flight, on one bridge at a time: a
        // standby takes the inbox over when the owner dies, and applies
        // nothing before what its predecessor held has come back to it.
        let failover = self.failover();
        let ack_wait = (failover * 2).max(Duration::from_secs(6));
        let (mut consumer, mut messages) = proto::streams::pinned_messages(
            stream,
            &names::bridge_in_consumer(&peer),
            &names::fed_in_subject(&peer),
            names::BRIDGE_PRIORITY_GROUP,
            ROUND as i64,
            ack_wait,
            self.streams.max_deliver.saturating_add(2),
            failover,
        )
        .await
        .map_err(RunBridgeError::Setup)?;
        // Envelopes in hand, in stream order: none is settled before every
        // one before it was applied or refused for good, and a failure is
        // retried here, in place, so nothing after it can pass it.
        let mut held: Vec<jetstream::Message> = Vec::new();
        // The envelope that failed last (its stream sequence), and how many
        // rounds in a row it failed.
        let mut stalled_at: Option<u64> = None;
        let mut failures = 0u64;
        // The stream sequence of the last envelope settled here: FED_IN holds
        // one subject, so its sequences are consecutive, and a hole before
        // or among what we hold is an envelope out with another bridge.
        let mut last_settled: Option<u64> = None;
        loop {
            if held.is_empty() {
                let Some(m) = proto::streams::next_message(&mut messages, &shutdown, "bridge inbox")
                    .await
                    .map_err(|e| RunBridgeError::Setup(e.to_string()))?
                else {
                    return Ok(());
                };
                held.push(m);
            }
            let mut bytes: usize = held.iter().map(|m| m.payload.len()).sum();
            while held.len() < ROUND && bytes < ROUND_BYTES {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        bytes += m.payload.len();
                        held.push(m);
                    }
                    _ => break,
                }
            }
            held.sort_by_key(stream_seq);
            held.dedup_by_key(|m| stream_seq(m));
            if has_hole(&held, last_settled) {
                // Perhaps a bridge that had the inbox before (dead, or
                // alive and pinned until just now) holds older envelopes:
                // applying a newer one first would move the mark past them,
                // and they would be dropped as replays.
                let none = VecDeque::new();
                match takeover::await_predecessor(
                    "inbox",
                    &peer,
                    &mut consumer,
                    &mut messages,
                    &mut held,
                    &none,
                    ack_wait * 2 + failover,
                    &shutdown,
                )
                .await
                {
                    Takeover::Shutdown => return Ok(()),
                    Takeover::Closed => return Err(RunBridgeError::Setup("bridge inbox consumer closed".into())),
                    Takeover::Released => {
                        // Handed back for the bridge the inbox is pinned to.
                        held.clear();
                        last_settled = None;
                        continue;
                    }
                    Takeover::Waited(waited) => tracing::info!(peer = %peer, ?waited, "took the inbox over"),
                    Takeover::Nothing => {}
                }
                held.sort_by_key(stream_seq);
                held.dedup_by_key(|m| stream_seq(m));
            }
            // Pull on while the round runs (a pinned client that stops
            // pulling loses the inbox to a standby), and tell JetStream the
            // envelopes are still in hand (a long round must not see them
            // come back).
            let mut arrived = Vec::new();
            let round = {
                let round = self.receive_round(&peer, &held);
                tokio::pin!(round);
                let mut open = true;
                let mut progress = tokio::time::interval(ack_wait / 3);
                progress.reset();
                loop {
                    tokio::select! {
                        r = &mut round => break r,
                        m = messages.next(), if open => match m {
                            Some(Ok(m)) => arrived.push(m),
                            Some(Err(_)) => {}
                            None => open = false,
                        },
                        _ = progress.tick() => still_working(&held).await,
                    }
                }
            };
            // What was settled is a prefix of `held`.
            if let Some(last) = held.iter().zip(&round.settled).filter(|(_, s)| **s).map(|(m, _)| stream_seq(m)).last()
            {
                last_settled = Some(last);
            }
            let mut settled = round.settled.into_iter();
            held.retain(|_| !settled.next().unwrap_or(false));
            held.extend(arrived);
            let Some((seq, e)) = round.stalled else {
                stalled_at = None;
                failures = 0;
                continue;
            };
            failures = if stalled_at == Some(seq) { failures + 1 } else { 1 };
            stalled_at = Some(seq);
            tracing::warn!(peer = %peer, error = %e, failures, "inbound envelope deferred");
            if failures >= self.streams.max_deliver.max(1) as u64 {
                if let Some(i) = held.iter().position(|m| stream_seq(m) == seq) {
                    if proto::streams::dead_letter(&self.topo, "bridge", "transient", &e, &held[i]).await {
                        self.metrics.dead_letters.with_label_values(&[&peer]).inc();
                        held.remove(i);
                        last_settled = Some(seq);
                        stalled_at = None;
                        failures = 0;
                        continue;
                    }
                }
            }
            let wait = proto::streams::retry_wait(&self.streams, failures);
            if !hold(&mut held, &mut messages, wait, ack_wait, &shutdown).await {
                return Ok(());
            }
        }
    }

    /// Applies `held` (in stream order) as far as it can: the peer's mark is
    /// read once, each envelope is judged against it as the round moves it,
    /// every group's entries are appended, and then, up to the first
    /// envelope that could not be applied, everything is settled in order
    /// and the mark is written once. Nothing after that envelope is settled:
    /// it is judged again with it, against the mark as it then stands.
    async fn receive_round(&self, peer: &str, held: &[jetstream::Message]) -> Round {
        let n = held.len();
        let mut settled = vec![false; n];
        let stalled = |i: usize, e: String| Some((stream_seq(&held[i]), e));
        // The per-peer high-water mark makes a replay harmless even after
        // JetStream's duplicate window has passed. It moves only when records
        // were applied, by a bounded step, so a signed envelope whose records
        // are all refused, or one far ahead, cannot silence the peer.
        let key = names::hwm_key(peer);
        let (mut mark, rev) = match self.topo.federation.entry(key.as_str()).await {
            // A deleted or purged key reads as no mark.
            Ok(Some(e)) if e.operation == kv::Operation::Put => (Mark::decode(&e.value), e.revision),
            Ok(Some(e)) => (None, e.revision),
            Ok(None) => (None, 0),
            Err(e) => return Round { settled, stalled: stalled(0, e.to_string()) },
        };
        let mut runs = Runs::default();
        // The first envelope that gave entries to each group.
        let mut feeders: HashMap<proto::GroupId, usize> = HashMap::new();
        let mut outcomes = Vec::with_capacity(n);
        // Envelopes from `stop` on are left for the next round.
        let (mut stop, mut why) = (n, String::new());
        for (i, msg) in held.iter().enumerate() {
            let outcome = self.receive(peer, msg, mark.as_ref(), &mut runs).await;
            match &outcome {
                Received::Applied { mark: m, groups, .. } => {
                    for g in groups {
                        feeders.entry(g.clone()).or_insert(i);
                    }
                    mark = Some(*m);
                }
                Received::Failed(e) => {
                    (stop, why) = (i, e.clone());
                    break;
                }
                _ => {}
            }
            outcomes.push(outcome);
        }
        // Every group is tried; a group that cannot be appended now holds
        // back only the envelopes from the first one with entries for it.
        // Appending entries of later envelopes to other groups meanwhile
        // is harmless: they are idempotent, and their envelopes come again.
        if let Err((failed, e)) = self.append_runs(runs).await {
            if let Some(first) = failed.iter().filter_map(|g| feeders.get(g)).min().copied().filter(|f| *f < stop) {
                (stop, why) = (first, e);
            }
        }
        let mut committed: Option<Mark> = None;
        let mut applied = Vec::new();
        for (i, outcome) in outcomes.into_iter().enumerate().take(stop) {
            let msg = &held[i];
            if let Received::Applied { refused, .. } | Received::Unused { refused } = &outcome {
                for refusal in refused {
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound record refused");
                }
            }
            match outcome {
                Received::Applied { mark, check, .. } => {
                    match check {
                        MarkCheck::ApplyRestarted => {
                            self.metrics.outbox_restarts.with_label_values(&[peer]).inc();
                            tracing::warn!(
                                peer,
                                seq = mark.seq,
                                "peer's outbox began anew; following its new sequence"
                            );
                        }
                        MarkCheck::ApplyAfterReset => {
                            self.metrics.mark_resets.with_label_values(&[peer]).inc();
                            tracing::warn!(peer, seq = mark.seq, "peer's high-water mark was reset by an operator");
                        }
                        _ => {}
                    }
                    committed = Some(mark);
                    applied.push(i);
                }
                Received::Unused { .. } => {
                    let _ = msg.ack().await;
                    settled[i] = true;
                }
                Received::Replay => {
                    self.metrics.replays.with_label_values(&[peer]).inc();
                    let _ = msg.ack().await;
                    settled[i] = true;
                }
                Received::Refused(refusal) => {
                    // Forged, misaddressed or misattributed: never applied,
                    // never retried.
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound envelope refused");
                    let _ = msg.ack_with(AckKind::Term).await;
                    settled[i] = true;
                }
                Received::TooFarAhead => {
                    // Signed by the peer, but too far ahead: kept in the dead
                    // letters (not dropped) for an operator who resets the
                    // mark and requeues it.
                    let detail = "envelope too far ahead of the peer's high-water mark";
                    if !proto::streams::dead_letter(&self.topo, "bridge", "seq_jump", detail, msg).await {
                        (stop, why) = (i, "cannot dead-letter an envelope too far ahead".to_owned());
                        break;
                    }
                    self.metrics.refused.with_label_values(&[Refusal::SeqJump.label()]).inc();
                    settled[i] = true;
                }
                Received::Failed(_) => {}
            }
        }
        let stalled = if stop < n { stalled(stop, why) } else { None };
        let Some(mark) = committed else {
            return Round { settled, stalled };
        };
        let seq = mark.seq;
        let value = mark.encode();
        let stored = if rev == 0 {
            self.topo.federation.create(key.as_str(), value.into()).await.map(|_| ()).map_err(|e| e.to_string())
        } else {
            self.topo.federation.update(key.as_str(), value.into(), rev).await.map(|_| ()).map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    String::new()
                } else {
                    e.to_string()
                }
            })
        };
        if let Err(e) = stored {
            if !e.is_empty() {
                tracing::warn!(error = %e, "cannot store high-water mark");
            }
        }
        for &i in &applied {
            let _ = held[i].ack().await;
            settled[i] = true;
        }
        self.metrics.mark.with_label_values(&[peer]).set(i64::try_from(seq).unwrap_or(i64::MAX));
        self.metrics.received.with_label_values(&[peer]).inc_by(applied.len() as u64);
        Round { settled, stalled }
    }

    /// Opens one envelope and applies its records against `mark` (the
    /// peer's, as the round has moved it so far): deliveries join `runs`,
    /// appended with the round; everything else is applied now.
    async fn receive(&self, peer: &str, msg: &jetstream::Message, mark: Option<&Mark>, runs: &mut Runs) -> Received {
        let env: Envelope = match fed::open(&msg.payload, &self.keys, &self.us) {
            Ok(env) => env,
            Err(e) => return Received::Refused(Refusal::Open(e)),
        };
        // The traces of the records, continued here (ids only, outside the
        // signed payload: a bad list is ignored, never trusted).
        let traces = trace::parse_records_header(msg.headers.as_ref(), env.payloads.len());
        if names::origin_of_fed_in(&msg.subject).as_deref() != Some(env.origin.as_str()) || env.origin != peer {
            return Received::Refused(Refusal::SubjectMismatch);
        }
        let origin = env.origin.clone();
        if let Some(p) = self.peers.get(&origin) {
            p.contact.notify_waiters();
        }
        let check = Mark::check(mark, env.outbox, env.seq, self.fed.max_seq_jump);
        match check {
            MarkCheck::Replay => return Received::Replay,
            MarkCheck::TooFarAhead => {
                tracing::error!(
                    peer = %origin,
                    seq = env.seq,
                    mark = mark.map(|m| m.seq).unwrap_or_default(),
                    "envelope is too far ahead of the peer's high-water mark; refused (see `mlsfed peer reset-mark`)"
                );
                return Received::TooFarAhead;
            }
            MarkCheck::Apply | MarkCheck::ApplyRestarted | MarkCheck::ApplyAfterReset => {}
        }
        let mut applied = 0usize;
        let mut refused = Vec::new();
        // A hub's entries are appended per group, each group's in order,
        // many at once in one atomic batch, and the groups concurrently:
        // catching up after an outage is not one round trip per entry.
        let mut mine = Runs::default();
        for (payload, parent) in env.payloads.into_iter().zip(traces) {
            let mut span = trace::Span::child("bridge.receive", parent);
            trace::set(&mut span, "mlsfed.peer", &origin);
            let outcome = match payload {
                Payload::Deliver(entry) => match self.check_delivered(&origin, &entry) {
                    Ok(()) => {
                        trace::set(&mut span, "mlsfed.group", &entry.group);
                        trace::set(&mut span, "mlsfed.position", entry.position);
                        mine.add(Traced { entry, span });
                        continue;
                    }
                    Err(refusal) => Err(Ok(refusal)),
                },
                Payload::Submit(sub) => {
                    let applied = self.apply_submit(&origin, sub, trace::context(&span)).await;
                    trace::end(span);
                    applied
                }
                Payload::Verdict { submission_id, verdict } => {
                    let applied = self.apply_verdict(&origin, &submission_id, verdict).await;
                    trace::end(span);
                    applied
                }
            };
            match outcome {
                Ok(()) => applied += 1,
                // One bad record does not spoil the others in the envelope.
                Err(Ok(refusal)) => refused.push(refusal),
                // Re-applying the records before it is harmless (they are
                // idempotent), so the whole envelope is retried.
                Err(Err(e)) => return Received::Failed(e),
            }
        }
        if applied == 0 && mine.is_empty() {
            // Nothing of it was used: the mark stays where it was.
            return Received::Unused { refused };
        }
        let groups = mine.runs.iter().map(|(g, _)| g.clone()).collect();
        for (_, run) in mine.runs {
            for t in run {
                runs.add(t);
            }
        }
        Received::Applied {
            mark: Mark { v: Mark::VERSION, outbox: env.outbox, seq: env.seq, reset: false },
            check,
            groups,
            refused,
        }
    }

    /// Appends every group's run, some groups at once (bounded: the server
    /// keeps at most 50 atomic batches in flight per stream). Every group is
    /// tried; those that could not be appended are returned with the first
    /// error.
    async fn append_runs(&self, runs: Runs) -> Result<(), (Vec<proto::GroupId>, String)> {
        let mut runs = runs.runs;
        let mut failed = Vec::new();
        let mut first = None;
        while !runs.is_empty() {
            let chunk: Vec<_> = runs.drain(..runs.len().min(CONCURRENT_APPENDS)).collect();
            let appended = futures::future::join_all(chunk.iter().map(|(_, run)| self.append_delivered(run))).await;
            for (result, (group, run)) in appended.into_iter().zip(chunk) {
                match result {
                    Ok(()) => run.into_iter().for_each(|t| trace::end(t.span)),
                    Err(e) => {
                        first.get_or_insert(e);
                        failed.push(group);
                    }
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err((failed, e)),
        }
    }

    async fn publish_local(
        &self,
        subject: String,
        payload: Vec<u8>,
        id: String,
        trace: Option<trace::Context>,
    ) -> Result<(), Result<Refusal, String>> {
        let mut publish = PublishMessage::build().payload(Bytes::from(payload)).message_id(id);
        if let Some(t) = trace {
            publish = publish.header(trace::HEADER, t.to_header().as_str());
        }
        self.topo
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| Err(e.to_string()))?
            .await
            .map_err(|e| Err(e.to_string()))?;
        Ok(())
    }

    /// A peer's device submits to a group we host: into our SUBMIT, where
    /// our sequencer decides it like a local one.
    async fn apply_submit(
        &self,
        origin: &str,
        mut sub: proto::wire::Submission,
        trace: Option<trace::Context>,
    ) -> Result<(), Result<Refusal, String>> {
        // A peer speaks only for its own devices, to groups we host.
        if sub.device.domain() != origin {
            return Err(Ok(Refusal::SenderNotOrigin));
        }
        if sub.group.hub() != self.us {
            return Err(Ok(Refusal::NotHub));
        }
        // The id becomes a header, a subject and a key here.
        if !proto::wire::is_submission_id(&sub.id) {
            return Err(Ok(Refusal::BadSubmissionId));
        }
        sub.origin = Some(origin.to_owned());
        let id = sub.id.clone();
        self.publish_local(names::submit_subject(&sub.group), proto::wire::encode(&sub), id, trace).await
    }

    /// A hub answers a submission we forwarded to it.
    async fn apply_verdict(
        &self,
        origin: &str,
        submission_id: &str,
        verdict: Verdict,
    ) -> Result<(), Result<Refusal, String>> {
        // Only the hub we forwarded this submission to may answer it, and
        // only once: a peer cannot decide our devices' local submissions,
        // nor rewrite an answer already given. We forward no id of another
        // shape (and it could not be a key).
        if !proto::wire::is_submission_id(submission_id) {
            return Err(Ok(Refusal::UnsolicitedVerdict));
        }
        let hub = self.topo.forwarded.get(submission_id).await.map_err(|e| Err(e.to_string()))?;
        match hub {
            None => return Err(Ok(Refusal::UnsolicitedVerdict)),
            Some(hub) if hub.as_ref() != origin.as_bytes() => return Err(Ok(Refusal::NotHub)),
            Some(_) => {}
        }
        let bytes = Bytes::from(verdict.to_bytes());
        match self.topo.verdicts.create(submission_id, bytes.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let known = self.topo.verdicts.get(submission_id).await.map_err(|e| Err(e.to_string()))?;
                if known.as_deref() != Some(bytes.as_ref()) {
                    return Err(Ok(Refusal::VerdictConflict));
                }
                // The same answer again (a resend): harmless.
            }
            Err(e) => return Err(Err(e.to_string())),
        }
        self.topo
            .js
            .client()
            .publish(names::verdict_subject(submission_id), bytes)
            .await
            .map_err(|e| Err(e.to_string()))?;
        if let Verdict::Rejected(_) = verdict {
            self.metrics.remote_rejections.with_label_values(&[origin]).inc();
        }
        Ok(())
    }

    /// A peer delivers only entries of groups it hosts, naming only our
    /// devices as removed or welcomed.
    fn check_delivered(&self, origin: &str, entry: &proto::wire::LogEntry) -> Result<(), Refusal> {
        if entry.group.hub() != origin {
            return Err(Refusal::NotHub);
        }
        let ours = |ds: &[proto::DeviceId]| ds.iter().all(|d| d.domain() == self.us);
        if !ours(&entry.removed) || !ours(&entry.welcome_recipients) {
            return Err(Refusal::NotOurDevices);
        }
        Ok(())
    }

    /// Appends a hub's entries of one group (in its order) to our LOG,
    /// where our devices read them: once per position by construction,
    /// whatever a dedup window remembers. The append is a compare-and-set on
    /// the group's last entry here, and entries at or below that entry's
    /// position are resends, dropped. Several go in one atomic batch whose
    /// first message carries the compare-and-set, so they are stored all
    /// together after that entry or not at all.
    async fn append_delivered(&self, entries: &[Traced]) -> Result<(), String> {
        let Some(first) = entries.first().map(|t| &t.entry) else {
            return Ok(());
        };
        let subject = names::log_subject(&first.group, self.streams.partitions);
        let last = match self.topo.log.direct_get_last_for_subject(subject.as_str()).await {
            Ok(m) => Some(m),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => None,
            Err(e) => return Err(e.to_string()),
        };
        let (mut expected, known) = match &last {
            Some(m) => {
                let known: proto::wire::LogEntry =
                    proto::wire::decode(&m.payload).map_err(|e| format!("our LOG entry is unreadable: {e}"))?;
                (m.sequence, known.position)
            }
            None => (0, 0),
        };
        // Strictly after what is stored, and strictly increasing: a resend
        // inside the run (after the dedup window) is dropped too.
        let mut highest = known;
        let fresh: Vec<&Traced> = entries
            .iter()
            .filter(|t| {
                let newer = t.entry.position > highest;
                highest = highest.max(t.entry.position);
                newer
            })
            .collect();
        for chunk in fresh.chunks(proto::batch::MAX_MESSAGES) {
            expected = if chunk.len() == 1 {
                self.append_one(&subject, expected, chunk[0]).await?
            } else {
                let messages =
                    chunk.iter().map(|t| (Bytes::from(proto::wire::encode(&t.entry)), entry_headers(t))).collect();
                // A lost compare-and-set means another inbox appended first:
                // the retry reads the new last entry and drops these.
                proto::batch::publish_atomic(&self.topo.js.client(), &subject, expected, messages)
                    .await
                    .map_err(|e| e.to_string())?
            };
        }
        Ok(())
    }

    /// Appends one entry after stream sequence `expected`; returns its own.
    async fn append_one(&self, subject: &str, expected: u64, traced: &Traced) -> Result<u64, String> {
        let entry = &traced.entry;
        let id = names::fed_msg_id("rlog", &[entry.group.as_bytes(), &entry.position.to_be_bytes()]);
        let mut publish = PublishMessage::build()
            .payload(Bytes::from(proto::wire::encode(entry)))
            .message_id(id)
            .expected_last_subject_sequence(expected);
        for (name, value) in entry_headers(traced).iter() {
            for v in value {
                publish = publish.header(name.clone(), v.clone());
            }
        }
        let ack = self
            .topo
            .js
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(ack.sequence)
    }
}

/// A hub's entry on its way into our LOG, with the span of its receipt.
struct Traced {
    entry: proto::wire::LogEntry,
    span: Option<trace::Span>,
}

/// The headers every LOG entry carries, and the trace it continues.
fn entry_headers(traced: &Traced) -> async_nats::HeaderMap {
    let entry = &traced.entry;
    let mut h = async_nats::HeaderMap::new();
    h.insert(names::headers::POSITION, entry.position.to_string().as_str());
    h.insert(names::headers::EPOCH, entry.epoch.to_string().as_str());
    h.insert(names::headers::KIND, entry.kind.as_str());
    if let Some(s) = &traced.span {
        h.insert(trace::HEADER, s.context().to_header().as_str());
    }
    h
}

/// Tells JetStream this bridge still holds `held` (an envelope waiting in a
/// round, or behind a failed one), so none is redelivered to another bridge
/// while its turn has not come. A lost Progress ack only risks that
/// redelivery, which the mark makes harmless.
async fn still_working(held: &[jetstream::Message]) {
    for m in held {
        let _ = m.ack_with(AckKind::Progress).await;
    }
}

/// Holds the envelopes of a failed round for `wait` before they are tried
/// again: JetStream is told they are still in hand (so none comes back to
/// another bridge meanwhile), and pulling goes on (so this bridge keeps the
/// inbox); what arrives joins them, at most the consumer's
/// `max_ack_pending`. `false` on shutdown.
async fn hold(
    held: &mut Vec<jetstream::Message>,
    messages: &mut jetstream::consumer::pull::Stream,
    wait: Duration,
    ack_wait: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let until = tokio::time::Instant::now() + wait;
    let mut progress_at = tokio::time::Instant::now();
    let mut open = true;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        if now >= progress_at {
            progress_at = now + ack_wait / 3;
            still_working(held).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(until.min(progress_at)) => {}
            m = messages.next(), if open => match m {
                Some(Ok(m)) => held.push(m),
                Some(Err(_)) => {}
                None => open = false,
            },
        }
    }
}

/// Whether an envelope between the last one settled here and the last one
/// held is missing from `held` (sorted): out with another bridge, or not
/// handed to us yet. Before the first round, anything may be.
fn has_hole(held: &[jetstream::Message], last_settled: Option<u64>) -> bool {
    let Some(settled) = last_settled else {
        return true;
    };
    // Copies of envelopes settled before (an ack that was lost) are no hole.
    (settled + 1..).zip(held.iter().map(stream_seq).filter(|s| *s > settled)).any(|(expect, seq)| seq != expect)
}
