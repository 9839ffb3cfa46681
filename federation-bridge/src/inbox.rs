//! The inbox: envelopes that peers put into our FED_IN are opened (origin,
//! signature, destination, version), checked against the peer's high-water
//! mark, and applied: a forwarded submission goes into SUBMIT, a verdict to
//! the waiting ingest, a delivery into our LOG for local fan-out.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use proto::federation::{self as fed, Envelope, Mark, MarkCheck, Payload};
use proto::names;
use proto::trace;
use proto::wire::Verdict;
use tokio_util::sync::CancellationToken;

use crate::{Bridge, Refusal, RunBridgeError};

/// Groups of one envelope appended at once.
const CONCURRENT_APPENDS: usize = 16;

impl Bridge {
    /// Applies envelopes that peers put into our FED_IN.
    /// Applies the envelopes `peer` puts into our FED_IN: one consumer per
    /// peer, one envelope at a time (its high-water mark moves in order), so
    /// one peer's poison delays only that peer, and only until its bounded
    /// deliveries run out.
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
        // One envelope in flight, on one bridge at a time: a standby takes
        // the inbox over when the owner dies, and the envelope it held comes
        // back first (nothing else is handed out while it is unacked).
        let failover = self.failover();
        let (_, mut messages) = proto::streams::pinned_messages(
            stream,
            &names::bridge_in_consumer(&peer),
            &names::fed_in_subject(&peer),
            names::BRIDGE_PRIORITY_GROUP,
            1,
            (failover * 2).max(Duration::from_secs(6)),
            self.streams.max_deliver.saturating_add(2),
            failover,
        )
        .await
        .map_err(RunBridgeError::Setup)?;
        loop {
            let Some(msg) = proto::streams::next_message(&mut messages, &shutdown, "bridge inbox")
                .await
                .map_err(|e| RunBridgeError::Setup(e.to_string()))?
            else {
                return Ok(());
            };
            match self.receive(&msg.subject, &msg.payload, msg.headers.as_ref()).await {
                Ok(()) => {
                    let _ = msg.double_ack().await;
                }
                Err(Ok(Refusal::SeqJump)) => {
                    // Signed by the peer, but too far ahead: kept in the dead
                    // letters (not dropped) for an operator who resets the
                    // mark and requeues it.
                    self.metrics.refused.with_label_values(&[Refusal::SeqJump.label()]).inc();
                    let detail = "envelope too far ahead of the peer's high-water mark";
                    if !proto::streams::dead_letter(&self.topo, "bridge", "seq_jump", detail, &msg).await {
                        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                    }
                }
                Err(Ok(refusal)) => {
                    // Forged, misaddressed or misattributed: never applied,
                    // never retried.
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound envelope refused");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
                Err(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "inbound envelope deferred");
                    let outcome = proto::streams::retry_or_dead_letter(
                        &self.topo,
                        &self.streams,
                        "bridge",
                        "transient",
                        &e,
                        &msg,
                    )
                    .await;
                    if outcome == proto::streams::Retry::DeadLettered {
                        self.metrics.dead_letters.with_label_values(&[&peer]).inc();
                    }
                }
            }
        }
    }

    /// `Err(Ok(_))`: refused; `Err(Err(_))`: transient, retry.
    async fn receive(
        &self,
        subject: &str,
        bytes: &[u8],
        headers: Option<&async_nats::HeaderMap>,
    ) -> Result<(), Result<Refusal, String>> {
        let env: Envelope = fed::open(bytes, &self.keys, &self.us).map_err(|e| Ok(Refusal::Open(e)))?;
        // The traces of the records, continued here (ids only, outside the
        // signed payload: a bad list is ignored, never trusted).
        let traces = trace::parse_records_header(headers, env.payloads.len());
        if names::origin_of_fed_in(subject).as_deref() != Some(env.origin.as_str()) {
            return Err(Ok(Refusal::SubjectMismatch));
        }
        let origin = env.origin.clone();
        if let Some(p) = self.peers.get(&origin) {
            p.contact.notify_waiters();
        }
        // The per-peer high-water mark makes a replay harmless even after
        // JetStream's duplicate window has passed. It moves only when records
        // were applied, by a bounded step, so a signed envelope whose records
        // are all refused, or one far ahead, cannot silence the peer.
        let key = names::hwm_key(&origin);
        let entry = self.topo.federation.entry(key.as_str()).await.map_err(|e| Err(e.to_string()))?;
        let (mark, rev) = match &entry {
            // A deleted or purged key reads as no mark.
            Some(e) if e.operation == kv::Operation::Put => (Mark::decode(&e.value), e.revision),
            Some(e) => (None, e.revision),
            None => (None, 0),
        };
        let check = Mark::check(mark.as_ref(), env.outbox, env.seq, self.fed.max_seq_jump);
        match check {
            MarkCheck::Replay => {
                self.metrics.replays.with_label_values(&[&origin]).inc();
                return Ok(());
            }
            MarkCheck::TooFarAhead => {
                tracing::error!(
                    peer = %origin,
                    seq = env.seq,
                    mark = mark.map(|m| m.seq).unwrap_or_default(),
                    "envelope is too far ahead of the peer's high-water mark; refused (see `mlsfed peer reset-mark`)"
                );
                return Err(Ok(Refusal::SeqJump));
            }
            MarkCheck::Apply | MarkCheck::ApplyRestarted | MarkCheck::ApplyAfterReset => {}
        }
        let mut applied = 0usize;
        // A hub's entries are appended per group, each group's in order,
        // many at once in one atomic batch, and the groups concurrently:
        // catching up after an outage is not one round trip per entry.
        let mut runs: Vec<(proto::GroupId, Vec<Traced>)> = Vec::new();
        for (payload, parent) in env.payloads.into_iter().zip(traces) {
            let mut span = trace::Span::child("bridge.receive", parent);
            trace::set(&mut span, "mlsfed.peer", &origin);
            let outcome = match payload {
                Payload::Deliver(entry) => match self.check_delivered(&origin, &entry) {
                    Ok(()) => {
                        trace::set(&mut span, "mlsfed.group", &entry.group);
                        trace::set(&mut span, "mlsfed.position", entry.position);
                        let traced = Traced { entry, span };
                        match runs.iter_mut().find(|(g, _)| *g == traced.entry.group) {
                            Some((_, run)) => run.push(traced),
                            None => runs.push((traced.entry.group.clone(), vec![traced])),
                        }
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
                Err(Err(e)) => return Err(Err(e)),
            }
        }
        // Bounded: the server keeps at most 50 atomic batches in flight
        // per stream.
        while !runs.is_empty() {
            let chunk: Vec<(proto::GroupId, Vec<Traced>)> = runs.drain(..runs.len().min(CONCURRENT_APPENDS)).collect();
            let appended = futures::future::join_all(chunk.iter().map(|(_, run)| self.append_delivered(run))).await;
            for (result, (_, run)) in appended.into_iter().zip(chunk) {
                result.map_err(Err)?;
                applied += run.len();
                for t in run {
                    trace::end(t.span);
                }
            }
        }
        if applied == 0 {
            // Nothing of it was used: the mark stays where it was.
            return Ok(());
        }
        match check {
            MarkCheck::ApplyRestarted => {
                self.metrics.outbox_restarts.with_label_values(&[&origin]).inc();
                tracing::warn!(peer = %origin, seq = env.seq, "peer's outbox began anew; following its new sequence");
            }
            MarkCheck::ApplyAfterReset => {
                self.metrics.mark_resets.with_label_values(&[&origin]).inc();
                tracing::warn!(peer = %origin, seq = env.seq, "peer's high-water mark was reset by an operator");
            }
            _ => {}
        }
        let value = Mark { v: Mark::VERSION, outbox: env.outbox, seq: env.seq, reset: false }.encode();
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
        self.metrics.mark.with_label_values(&[&origin]).set(i64::try_from(env.seq).unwrap_or(i64::MAX));
        self.metrics.received.with_label_values(&[&origin]).inc();
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
