//! The inbox: envelopes that peers put into our FED_IN are opened (origin,
//! signature, destination, version), checked against the peer's high-water
//! mark, and applied: a forwarded submission goes into SUBMIT, a verdict to
//! the waiting ingest, a delivery into our LOG for local fan-out.

use std::collections::VecDeque;
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

/// A hub's entries per group, each group's in its order.
type Runs = Vec<(proto::GroupId, Vec<Traced>)>;

/// What one round did with the envelopes it was given.
struct Round {
    /// Per envelope: acked, terminated or dead-lettered; nothing is left to
    /// do with it.
    settled: Vec<bool>,
    /// Why the first envelope not settled could not be applied now.
    stalled: Option<String>,
}

/// What became of one envelope in a round.
enum Received {
    /// Records were applied (or are appended with the round): the mark
    /// moves to this envelope once they are.
    Applied { mark: Mark, check: MarkCheck },
    /// Opened and current, but every record in it was refused: acked, and
    /// the mark stays where it was.
    Unused,
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
        // Envelopes in hand, in stream order: none is acked before every
        // one before it was applied or refused for good, and a failure is
        // retried here, in place, so nothing after it can pass it.
        let mut held: Vec<jetstream::Message> = Vec::new();
        // Failed rounds in a row with the same first envelope.
        let mut failures = 0u64;
        let mut last_round: Option<tokio::time::Instant> = None;
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
            while held.len() < ROUND {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => held.push(m),
                    _ => break,
                }
            }
            if last_round.is_none_or(|t| t.elapsed() > failover) {
                // Perhaps the bridge that had the inbox before died holding
                // older envelopes: applying a newer one first would move
                // the mark past them, and they would be dropped as replays.
                let none = VecDeque::new();
                match takeover::await_predecessor(
                    "inbox",
                    &peer,
                    &mut consumer,
                    &mut messages,
                    &mut held,
                    &none,
                    &shutdown,
                )
                .await
                {
                    Takeover::Shutdown => return Ok(()),
                    Takeover::Waited(waited) => tracing::info!(peer = %peer, ?waited, "took the inbox over"),
                    Takeover::Nothing => {}
                }
            }
            held.sort_by_key(stream_seq);
            held.dedup_by_key(|m| stream_seq(m));
            let first = stream_seq(&held[0]);
            // Pull on while the round runs: a pinned client that stops
            // pulling loses the inbox to a standby.
            let mut arrived = Vec::new();
            let round = {
                let round = self.receive_round(&peer, &held);
                tokio::pin!(round);
                let mut open = true;
                loop {
                    tokio::select! {
                        r = &mut round => break r,
                        m = messages.next(), if open => match m {
                            Some(Ok(m)) => arrived.push(m),
                            Some(Err(_)) => {}
                            None => open = false,
                        },
                    }
                }
            };
            last_round = Some(tokio::time::Instant::now());
            let mut settled = round.settled.into_iter();
            held.retain(|_| !settled.next().unwrap_or(false));
            held.extend(arrived);
            let Some(e) = round.stalled else {
                failures = 0;
                continue;
            };
            // `held` still starts with the envelope that failed (or one
            // before it whose records were not appended yet).
            held.sort_by_key(stream_seq);
            failures = if held.first().map(stream_seq) == Some(first) { failures + 1 } else { 1 };
            tracing::warn!(peer = %peer, error = %e, failures, "inbound envelope deferred");
            if failures >= self.streams.max_deliver.max(1) as u64
                && proto::streams::dead_letter(&self.topo, "bridge", "transient", &e, &held[0]).await
            {
                self.metrics.dead_letters.with_label_values(&[&peer]).inc();
                held.remove(0);
                failures = 0;
                continue;
            }
            let wait = proto::streams::retry_wait(&self.streams, failures);
            if !hold(&mut held, &mut messages, wait, ack_wait, &shutdown).await {
                return Ok(());
            }
        }
    }

    /// Applies `held` (in stream order) as far as it can: the peer's mark is
    /// read once, each envelope is checked against it as it moves, and the
    /// mark is written once, after every record of the round was applied.
    async fn receive_round(&self, peer: &str, held: &[jetstream::Message]) -> Round {
        let mut settled = vec![false; held.len()];
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
            Err(e) => return Round { settled, stalled: Some(e.to_string()) },
        };
        let mut runs: Runs = Vec::new();
        let mut applied: Vec<(usize, MarkCheck, u64)> = Vec::new();
        let mut stalled = None;
        for (i, msg) in held.iter().enumerate() {
            match self.receive(peer, msg, mark.as_ref(), &mut runs).await {
                Received::Applied { mark: m, check } => {
                    applied.push((i, check, m.seq));
                    mark = Some(m);
                }
                Received::Unused | Received::Replay => {
                    let _ = msg.ack().await;
                    settled[i] = true;
                }
                Received::Refused(refusal) => {
                    // Forged, misaddressed or misattributed.
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound envelope refused");
                    let _ = msg.ack_with(AckKind::Term).await;
                    settled[i] = true;
                }
                Received::TooFarAhead => {
                    // Kept in the dead letters (not dropped) for an operator
                    // who resets the mark and requeues it.
                    self.metrics.refused.with_label_values(&[Refusal::SeqJump.label()]).inc();
                    let detail = "envelope too far ahead of the peer's high-water mark";
                    if !proto::streams::dead_letter(&self.topo, "bridge", "seq_jump", detail, msg).await {
                        stalled = Some("cannot dead-letter an envelope too far ahead".to_owned());
                        break;
                    }
                    settled[i] = true;
                }
                Received::Failed(e) => {
                    stalled = Some(e);
                    break;
                }
            }
        }
        // Re-applying records is harmless (they are idempotent), so if an
        // append fails, every envelope with records in the round is retried.
        if let Err(e) = self.append_runs(runs).await {
            return Round { settled, stalled: Some(e) };
        }
        let Some(&(_, _, seq)) = applied.last() else {
            return Round { settled, stalled };
        };
        for &(_, check, seq) in &applied {
            match check {
                MarkCheck::ApplyRestarted => {
                    self.metrics.outbox_restarts.with_label_values(&[peer]).inc();
                    tracing::warn!(peer, seq, "peer's outbox began anew; following its new sequence");
                }
                MarkCheck::ApplyAfterReset => {
                    self.metrics.mark_resets.with_label_values(&[peer]).inc();
                    tracing::warn!(peer, seq, "peer's high-water mark was reset by an operator");
                }
                _ => {}
            }
        }
        let value = mark.map(|m| m.encode()).unwrap_or_default();
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
        for &(i, _, _) in &applied {
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
            MarkCheck::Replay => {
                self.metrics.replays.with_label_values(&[&origin]).inc();
                return Received::Replay;
            }
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
        // A hub's entries are appended per group, each group's in order,
        // many at once in one atomic batch, and the groups concurrently:
        // catching up after an outage is not one round trip per entry.
        let mut mine: Runs = Vec::new();
        for (payload, parent) in env.payloads.into_iter().zip(traces) {
            let mut span = trace::Span::child("bridge.receive", parent);
            trace::set(&mut span, "mlsfed.peer", &origin);
            let outcome = match payload {
                Payload::Deliver(entry) => match self.check_delivered(&origin, &entry) {
                    Ok(()) => {
                        trace::set(&mut span, "mlsfed.group", &entry.group);
                        trace::set(&mut span, "mlsfed.position", entry.position);
                        add_to_runs(&mut mine, Traced { entry, span });
                        continue;
                    }
                    Err(refusal) => Err(Ok(refusal)),
                },
                other => {
                    let applied = self.apply(&origin, other, trace::context(&span)).await;
                    trace::end(span);
                    applied
                }
            };
            match outcome {
                Ok(()) => applied += 1,
                // One bad record does not spoil the others in the envelope.
                Err(Ok(refusal)) => {
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound record refused");
                }
                // Re-applying the records before it is harmless (they are
                // idempotent), so the whole envelope is retried.
                Err(Err(e)) => return Received::Failed(e),
            }
        }
        if applied == 0 && mine.is_empty() {
            // Nothing of it was used: the mark stays where it was.
            return Received::Unused;
        }
        for (_, run) in mine {
            for t in run {
                add_to_runs(runs, t);
            }
        }
        Received::Applied { mark: Mark { v: Mark::VERSION, outbox: env.outbox, seq: env.seq, reset: false }, check }
    }

    /// Appends every group's run, some groups at once. Bounded: the server
    /// keeps at most 50 atomic batches in flight per stream.
    async fn append_runs(&self, mut runs: Runs) -> Result<(), String> {
        while !runs.is_empty() {
            let chunk: Runs = runs.drain(..runs.len().min(CONCURRENT_APPENDS)).collect();
            let appended = futures::future::join_all(chunk.iter().map(|(_, run)| self.append_delivered(run))).await;
            for (result, (_, run)) in appended.into_iter().zip(chunk) {
                result?;
                for t in run {
                    trace::end(t.span);
                }
            }
        }
        Ok(())
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

    async fn apply(
        &self,
        origin: &str,
        payload: Payload,
        trace: Option<trace::Context>,
    ) -> Result<(), Result<Refusal, String>> {
        match payload {
            Payload::Submit(mut sub) => {
                // A peer speaks only for its own devices, to groups we host.
                if sub.device.domain() != origin {
                    return Err(Ok(Refusal::SenderNotOrigin));
                }
                if sub.group.hub() != self.us {
                    return Err(Ok(Refusal::NotHub));
                }
                sub.origin = Some(origin.to_owned());
                let id = sub.id.clone();
                self.publish_local(names::submit_subject(&sub.group), proto::wire::encode(&sub), id, trace).await
            }
            Payload::Verdict { submission_id, verdict } => {
                // Only the hub we forwarded this submission to may answer
                // it, and only once: a peer cannot decide our devices'
                // local submissions, nor rewrite an answer already given.
                let hub = self.topo.forwarded.get(&submission_id).await.map_err(|e| Err(e.to_string()))?;
                match hub {
                    None => return Err(Ok(Refusal::UnsolicitedVerdict)),
                    Some(hub) if hub.as_ref() != origin.as_bytes() => return Err(Ok(Refusal::NotHub)),
                    Some(_) => {}
                }
                let bytes = Bytes::from(verdict.to_bytes());
                match self.topo.verdicts.create(&submission_id, bytes.clone()).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let known = self.topo.verdicts.get(&submission_id).await.map_err(|e| Err(e.to_string()))?;
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
                    .publish(names::verdict_subject(&submission_id), bytes)
                    .await
                    .map_err(|e| Err(e.to_string()))?;
                if let Verdict::Rejected(_) = verdict {
                    self.metrics.remote_rejections.with_label_values(&[origin]).inc();
                }
                Ok(())
            }
            Payload::Deliver(entry) => {
                self.check_delivered(origin, &entry).map_err(Ok)?;
                // `receive` batches deliveries itself, with their spans.
                let traced = Traced { entry, span: None };
                self.append_delivered(std::slice::from_ref(&traced)).await.map_err(Err)
            }
        }
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

/// Adds a hub's entry to its group's run.
fn add_to_runs(runs: &mut Runs, traced: Traced) {
    match runs.iter_mut().find(|(g, _)| *g == traced.entry.group) {
        Some((_, run)) => run.push(traced),
        None => runs.push((traced.entry.group.clone(), vec![traced])),
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
            for m in held.iter() {
                let _ = m.ack_with(AckKind::Progress).await;
            }
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
