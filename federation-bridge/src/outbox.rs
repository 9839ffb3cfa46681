//! The outbox: one durable consumer per peer on FED_OUT, one bounded batch
//! in flight, sealed and published into the peer's FED_IN over the peer's
//! NATS; our copy is acked only after the peer's JetStream acked it.
//!
//! An operator controls each peer's outbox through a record in KV
//! (`names::peer_control_key`, written by `mlsfed admin peers`): paused,
//! the outbox sends nothing and holds what is queued (it stays in FED_OUT,
//! within its retention); a backoff reset makes a backed-off outbox retry
//! at once. The bridge notes each revision it applied
//! (`names::peer_control_applied_key`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use proto::federation::{self as fed, Envelope, Payload};
use proto::{names, trace};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::takeover::{self, stream_seq, Takeover};
use crate::{time_now, unix_now, Bridge, Peer, PeerVersion, RunBridgeError, BATCH, BATCH_BYTES};

/// An operator's instructions to our outbox for one peer (JSON, in KV
/// `mlsfed_federation` under `names::peer_control_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerControl {
    /// Format version of this record.
    pub v: u8,
    /// Send nothing to the peer; what is queued stays queued.
    #[serde(default)]
    pub paused: bool,
    /// Counts the operator's backoff resets: when it changes, a backed-off
    /// outbox retries at once.
    #[serde(default)]
    pub backoff_resets: u64,
}

impl PeerControl {
    pub const VERSION: u8 = 1;

    /// Reads a stored record; refuses one of a newer format by name.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let c: Self = serde_json::from_slice(bytes).map_err(|e| format!("malformed control record: {e}"))?;
        if c.v > Self::VERSION {
            return Err(format!("control record format {} is newer than this build reads ({})", c.v, Self::VERSION));
        }
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What the bridge applied of a peer's control record (JSON, in KV
/// `mlsfed_federation` under `names::peer_control_applied_key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlApplied {
    /// Format version of this record.
    pub v: u8,
    /// The KV revision of the control record applied: from then on the
    /// outbox starts no send that the record forbids.
    pub revision: u64,
    pub paused: bool,
    /// When (unix seconds).
    pub at: u64,
}

impl ControlApplied {
    pub const VERSION: u8 = 1;

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A peer's control record as the bridge holds it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ControlState {
    /// Read from KV at least once: nothing is sent before, so a peer
    /// paused before a restart stays paused.
    loaded: bool,
    /// The KV revision it came from (0: no record).
    revision: u64,
    ctl: PeerControl,
}

/// How long the first record of an envelope may wait for others to join it.
/// Short: under load envelopes fill by themselves with what arrives while
/// the previous one is on its way, and the peer's inbox applies whatever
/// envelopes it finds waiting in one round.
const GATHER: Duration = Duration::from_millis(4);
/// An envelope is sent once no record joined it for this long.
const GATHER_GAP: Duration = Duration::from_millis(1);
/// How often a paused outbox tells JetStream it still holds its batch
/// (well within the outbox consumer's 30 s ack wait).
const HOLD_PROGRESS: Duration = Duration::from_secs(2);

impl Bridge {
    /// Sends our outbox for `peer`, in order, one envelope at a time.
    pub(crate) async fn outbox(
        self: Arc<Self>,
        peer: Arc<Peer>,
        shutdown: CancellationToken,
    ) -> Result<(), RunBridgeError> {
        let domain = peer.cfg.domain.clone();
        let name = names::bridge_out_consumer(&domain);
        // One envelope in flight keeps envelopes in order for the peer's
        // high-water mark; the records of the next one are handed to us
        // meanwhile (two envelopes' worth unacked), so a catch-up does not
        // wait a round trip for them. One bridge at a time (pinned) sends
        // them, the others stand by. No bound on deliveries: the outbox
        // holds messages on purpose while the peer is away.
        let filter = names::fed_out_subject(&domain);
        let failover = self.failover();
        let ack_wait = outbox_ack_wait(failover);
        let (mut consumer, mut messages) = proto::streams::pinned_messages(
            &self.topo.fed_out,
            &name,
            &filter,
            names::BRIDGE_PRIORITY_GROUP,
            2 * BATCH as i64,
            ack_wait,
            0,
            failover,
        )
        .await
        .map_err(RunBridgeError::Setup)?;
        let mut control = peer.control.subscribe();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            // The sender lives as long as `peer`.
            _ = control.wait_for(|c| c.loaded) => {}
        }
        let mut resets = control.borrow().ctl.backoff_resets;
        // The highest outbox sequence the peer has from us in this run.
        let mut last_sent = 0u64;
        // Records that did not fit the previous envelope open the next.
        let mut carried: VecDeque<jetstream::Message> = VecDeque::new();
        // When this bridge last had a batch: after a longer gap it may have
        // just become the owner.
        let mut last_batch: Option<tokio::time::Instant> = None;
        // The next envelope carries one record: the last one, with several,
        // was larger than the peer's server takes.
        let mut alone = false;
        loop {
            let first = match carried.pop_front() {
                Some(m) => m,
                None => match proto::streams::next_message(&mut messages, &shutdown, "bridge outbox")
                    .await
                    .map_err(|e| RunBridgeError::Setup(e.to_string()))?
                {
                    Some(m) => m,
                    None => return Ok(()),
                },
            };
            // A bounded batch: whatever else is ready now, in stream order,
            // within both bounds. Records that keep coming join it (the
            // peer pays per envelope: a mark, a signature, an append), but
            // for no longer than GATHER in all: at a steady trickle the
            // first record must not wait for the envelope to fill.
            let mut bytes = first.payload.len();
            let mut batch = vec![first];
            let gather_until = tokio::time::Instant::now() + GATHER;
            let most_bytes = envelope_bytes(peer.js.client().server_info().max_payload);
            let most = if std::mem::take(&mut alone) { 1 } else { BATCH };
            while batch.len() < most {
                let wait = (tokio::time::Instant::now() + GATHER_GAP).min(gather_until);
                let next = match carried.pop_front() {
                    Some(m) => m,
                    None => match tokio::time::timeout_at(wait, messages.next()).await {
                        Ok(Some(Ok(m))) => m,
                        _ => break,
                    },
                };
                if bytes + next.payload.len() > most_bytes {
                    carried.push_front(next);
                    break;
                }
                bytes += next.payload.len();
                batch.push(next);
            }
            if last_batch.is_none_or(|t| t.elapsed() > failover) {
                // Perhaps the bridge that sent before us died holding
                // records older than ours: nothing newer may reach the peer
                // before them, or its high-water mark would pass them.
                match takeover::await_predecessor(
                    "outbox",
                    &domain,
                    &mut consumer,
                    &mut messages,
                    &mut batch,
                    &carried,
                    ack_wait * 2 + failover,
                    &shutdown,
                )
                .await
                {
                    Takeover::Shutdown => return Ok(()),
                    Takeover::Closed => return Err(RunBridgeError::Setup("bridge outbox consumer closed".into())),
                    Takeover::Released => {
                        // Handed back for the bridge the outbox is pinned to.
                        carried.clear();
                        last_batch = None;
                        continue;
                    }
                    Takeover::Waited(waited) => {
                        self.metrics.takeovers.with_label_values(&[&domain]).inc();
                        self.metrics.takeover_seconds.observe(waited.as_secs_f64());
                    }
                    Takeover::Nothing => {}
                }
                // Everything held goes back in outbox order, and the
                // envelopes are cut from it with the usual bounds.
                carried.extend(batch);
                carried.make_contiguous().sort_by_key(stream_seq);
                last_batch = Some(tokio::time::Instant::now());
                continue;
            }
            // While a batch is held (a peer outage), the messages buffered
            // behind it can outlast the ack wait and come again. A copy of
            // a record already sent is acked and dropped; the rest go in
            // stream order, and the envelope is numbered by the highest
            // sequence it carries, so a late copy can never give an
            // envelope a number the peer takes for a replay.
            let mut keyed = Vec::with_capacity(batch.len());
            for m in batch {
                let Ok(info) = m.info() else { continue };
                let seq = info.stream_sequence;
                if seq <= last_sent || keyed.iter().any(|(s, _, _)| *s == seq) {
                    let _ = m.ack().await;
                    continue;
                }
                match proto::wire::decode::<Payload>(&m.payload) {
                    Ok(p) => keyed.push((seq, p, m)),
                    Err(e) => {
                        // A bug or a newer format (a rolling upgrade): set
                        // aside with its reason, never dropped silently, so
                        // an operator sees what the peer did not get.
                        if proto::streams::dead_letter(&self.topo, "bridge", e.label(), &e.to_string(), &m).await {
                            self.metrics.dead_letters.with_label_values(&[&domain]).inc();
                        } else {
                            tracing::error!(peer = %domain, error = %e, "undecodable outbox record not dead-lettered; it comes back later");
                            let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
                        }
                    }
                }
            }
            keyed.sort_by_key(|(seq, _, _)| *seq);
            let mut payloads = Vec::with_capacity(keyed.len());
            let mut held: Vec<jetstream::Message> = Vec::with_capacity(keyed.len());
            for (_, p, m) in keyed {
                payloads.push(p);
                held.push(m);
            }
            let Some(last) = held.last() else { continue };
            let Ok(info) = last.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            if let Ok(first_info) = held[0].info() {
                let age = (time_now() - first_info.published).as_seconds_f64().max(0.0);
                self.metrics.outbox_age.with_label_values(&[&domain]).set(age);
            }
            self.metrics.outbox_pending.with_label_values(&[&domain]).set((pending as usize + held.len()) as i64);
            let env = Envelope {
                version: 1,
                origin: self.us.clone(),
                destination: domain.clone(),
                outbox: self.outbox_id,
                seq,
                payloads,
            };
            let sealed = Bytes::from(fed::seal(&self.signer, &env));
            // Each record's trace goes on: one span per record here, and
            // its context in the envelope's headers for the peer.
            let spans: Vec<Option<trace::Span>> = held
                .iter()
                .map(|m| {
                    let mut s = trace::Span::child("bridge.send", trace::Context::from_headers(m.headers.as_ref()));
                    trace::set(&mut s, "mlsfed.peer", &domain);
                    s
                })
                .collect();
            let traces = spans.iter().any(Option::is_some).then(|| {
                trace::records_header(&spans.iter().map(|s| s.as_ref().map(|s| s.context())).collect::<Vec<_>>())
            });
            // Hold the batch until the peer has it: nothing later is sent
            // before it, so the peer's high-water mark never skips anything.
            let mut attempt = 0u32;
            loop {
                if control.borrow_and_update().ctl.paused {
                    if !self.hold_paused(&domain, &mut control, &held, &mut messages, &mut carried, &shutdown).await {
                        return Ok(());
                    }
                    attempt = 0;
                    continue;
                }
                let sent = if matches!(self.state(&domain), PeerVersion::Agreed(_)) {
                    // The id names the outbox incarnation too: a recreated
                    // outbox reuses sequences that the peer's duplicate
                    // window still remembers.
                    let id = names::envelope_msg_id(&self.us, self.outbox_id, seq);
                    let mut publish = PublishMessage::build().payload(sealed.clone()).message_id(id);
                    if let Some(t) = &traces {
                        publish = publish.header(trace::RECORDS_HEADER, t.as_str());
                    }
                    match peer.js.send_publish(names::fed_in_subject(&self.us), publish).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| (false, e.to_string())),
                        Err(e) => Err((e.kind() == PublishErrorKind::MaxPayloadExceeded, e.to_string())),
                    }
                } else {
                    // Not yet agreed, or incompatible: keep it queued.
                    Err((false, "no agreed federation version".to_owned()))
                };
                match sent {
                    Ok(()) => {
                        spans.into_iter().for_each(trace::end);
                        last_sent = seq;
                        last_batch = Some(tokio::time::Instant::now());
                        self.metrics.sent.with_label_values(&[&domain]).inc_by(held.len() as u64);
                        self.metrics.outbox_pending.with_label_values(&[&domain]).set(pending as i64);
                        if pending == 0 {
                            self.metrics.outbox_age.with_label_values(&[&domain]).set(0.0);
                        }
                        for m in &held {
                            if let Err(e) = m.ack().await {
                                tracing::warn!(peer = %domain, error = %e, "outbox ack failed; the peer drops the resend");
                            }
                        }
                        break;
                    }
                    Err((too_large, e)) => {
                        self.metrics.send_failures.with_label_values(&[&domain]).inc();
                        // Larger than the peer's server takes (its
                        // max_payload): no resend can succeed, and holding it
                        // would hold everything after it for this peer for
                        // good. Several records go again one per envelope;
                        // one alone is set aside like an expired record (the
                        // peer's members of its group rejoin past the hole).
                        if too_large && held.len() > 1 {
                            for m in std::mem::take(&mut held).into_iter().rev() {
                                carried.push_front(m);
                            }
                            alone = true;
                            break;
                        }
                        if too_large
                            && proto::streams::dead_letter(&self.topo, "bridge", "too_large_for_peer", &e, &held[0])
                                .await
                        {
                            self.metrics.dead_letters.with_label_values(&[&domain]).inc();
                            break;
                        }
                        self.check_retention(&domain, &held[0]);
                        let wait = self.backoff(attempt);
                        attempt = attempt.saturating_add(1);
                        tracing::debug!(peer = %domain, error = %e, ?wait, "peer unreachable; backing off");
                        // The wait goes in steps shorter than the ack wait,
                        // each telling JetStream we still hold the batch.
                        let until = tokio::time::Instant::now() + wait;
                        let mut progress_at = tokio::time::Instant::now() + ack_wait / 3;
                        loop {
                            let now = tokio::time::Instant::now();
                            if now >= until {
                                break;
                            }
                            let woken = tokio::select! {
                                _ = shutdown.cancelled() => return Ok(()),
                                _ = tokio::time::sleep_until(until.min(progress_at)) => false,
                                // Pulling on keeps this bridge's pin while it
                                // holds the batch (a pinned client that stops
                                // pulling loses the outbox to a standby).
                                // What arrives waits its turn, at most
                                // max_ack_pending of it; its ack wait has
                                // only just begun.
                                m = messages.next() => {
                                    if let Some(Ok(m)) = m {
                                        carried.push_back(m);
                                    }
                                    continue;
                                }
                                _ = peer.contact.notified() => { attempt = 0; true }
                                // An operator paused the outbox or reset its
                                // backoff: act on it now.
                                _ = control.changed() => {
                                    let now = control.borrow().ctl.backoff_resets;
                                    if now != resets {
                                        resets = now;
                                        attempt = 0;
                                    }
                                    true
                                }
                            };
                            if woken || tokio::time::Instant::now() >= progress_at {
                                progress_at = tokio::time::Instant::now() + ack_wait / 3;
                                for m in held.iter().chain(carried.iter()) {
                                    let _ = m.ack_with(AckKind::Progress).await;
                                }
                            }
                            if woken {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Holds `held` while an operator keeps the peer paused, telling
    /// JetStream we still have it; `false` on shutdown.
    async fn hold_paused(
        &self,
        domain: &str,
        control: &mut watch::Receiver<ControlState>,
        held: &[jetstream::Message],
        messages: &mut jetstream::consumer::pull::Stream,
        carried: &mut VecDeque<jetstream::Message>,
        shutdown: &CancellationToken,
    ) -> bool {
        tracing::info!(peer = %domain, "outbox paused by an operator; holding what is queued");
        let mut progress = tokio::time::interval(HOLD_PROGRESS);
        loop {
            if !control.borrow_and_update().ctl.paused {
                tracing::info!(peer = %domain, "outbox resumed by an operator");
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = control.changed() => {}
                // Pulling on keeps the pin (see the send loop); what
                // arrives waits its turn.
                m = messages.next() => {
                    if let Some(Ok(m)) = m {
                        carried.push_back(m);
                    }
                }
                _ = progress.tick() => {
                    // A long pause can outlast the retention like an outage.
                    if let Some(oldest) = held.first() {
                        self.check_retention(domain, oldest);
                    }
                    for m in held.iter().chain(carried.iter()) {
                        let _ = m.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    /// Follows the operator's control record for `peer`'s outbox (KV watch,
    /// re-established after NATS comes back) until shutdown.
    pub(crate) async fn control(
        self: Arc<Self>,
        peer: Arc<Peer>,
        shutdown: CancellationToken,
    ) -> Result<(), RunBridgeError> {
        let key = names::peer_control_key(&peer.cfg.domain);
        loop {
            match self.follow_control(&peer, &key, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(peer = %peer.cfg.domain, error = %e, "cannot follow the peer's control record; retrying")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn follow_control(&self, peer: &Peer, key: &str, shutdown: &CancellationToken) -> Result<(), String> {
        let kv = &self.topo.federation;
        // Watch first, then read: an update between the two is in the
        // watch, and a key that does not exist yet is still read (as none).
        let mut watch = kv.watch_with_history(key).await.map_err(|e| e.to_string())?;
        let current = kv.entry(key).await.map_err(|e| e.to_string())?;
        self.apply_control(peer, current.as_ref()).await;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = watch.next() => n,
            };
            match next {
                Some(Ok(entry)) => self.apply_control(peer, Some(&entry)).await,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the watch ended".into()),
            }
        }
    }

    /// Takes a control record (`None`: there is none) unless a later one
    /// was taken already, and notes its revision as applied.
    async fn apply_control(&self, peer: &Peer, entry: Option<&kv::Entry>) {
        let domain = &peer.cfg.domain;
        let (revision, ctl) = match entry {
            None => (0, PeerControl::default()),
            Some(e) if e.operation != kv::Operation::Put => (e.revision, PeerControl::default()),
            Some(e) => match PeerControl::decode(&e.value) {
                Ok(c) => (e.revision, c),
                Err(err) => {
                    tracing::error!(peer = %domain, error = %err, "peer control record refused; keeping the one in force");
                    return;
                }
            },
        };
        let mut before = None;
        peer.control.send_if_modified(|s| {
            if s.loaded && revision <= s.revision {
                return false;
            }
            before = Some(s.ctl.clone());
            *s = ControlState { loaded: true, revision, ctl: ctl.clone() };
            true
        });
        let Some(before) = before else { return };
        if before.paused != ctl.paused {
            tracing::info!(peer = %domain, paused = ctl.paused, "peer outbox control changed");
        }
        if before.backoff_resets != ctl.backoff_resets && revision > 0 {
            tracing::info!(peer = %domain, "peer outbox backoff reset by an operator");
        }
        if revision == 0 {
            return;
        }
        let applied = ControlApplied { v: ControlApplied::VERSION, revision, paused: ctl.paused, at: unix_now() };
        let body = serde_json::to_vec(&applied).unwrap_or_default();
        if let Err(e) = self.topo.federation.put(names::peer_control_applied_key(domain), body.into()).await {
            tracing::warn!(peer = %domain, error = %e, "cannot note the applied control record");
        }
    }

    /// Marks `peer` for resync when the oldest record we still hold for it
    /// is about to leave the outbox's retention: what follows it may expire
    /// unsent, and MLS has no way to skip a missed Commit (the peer's
    /// members must rejoin). The mark stays until the bridge restarts.
    fn check_retention(&self, peer: &str, oldest: &jetstream::Message) {
        let Ok(info) = oldest.info() else { return };
        let age = (time_now() - info.published).as_seconds_f64();
        let limit = self.fed.outbox_max_age_secs as f64 * 0.9;
        let gauge = self.metrics.needs_resync.with_label_values(&[peer]);
        if age >= limit && gauge.get() == 0 {
            gauge.set(1);
            tracing::error!(peer, age_secs = age as u64, "peer is beyond the outbox retention; marked for resync");
        }
    }
}

/// The most bytes of records one envelope gathers for a peer whose server
/// takes `max_payload` (0: not known yet): `BATCH_BYTES`, or less where the
/// peer's server would refuse that with the envelope's signature, framing
/// and trace headers around it. Otherwise every envelope gathered to
/// `BATCH_BYTES` would be refused, and its records sent one at a time.
fn envelope_bytes(max_payload: usize) -> usize {
    if max_payload == 0 {
        return BATCH_BYTES;
    }
    BATCH_BYTES.min(max_payload.saturating_sub(proto::limits::NATS_HEADROOM)).max(1)
}

/// How long a record sent to an outbox owner may go unacknowledged before
/// it is offered again: the owner tells JetStream it still holds records
/// well within it, and a new owner waits at most this long for a dead
/// one's.
fn outbox_ack_wait(failover: Duration) -> Duration {
    (failover * 2).max(Duration::from_secs(6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_fit_the_peers_server() {
        assert_eq!(envelope_bytes(0), BATCH_BYTES);
        assert_eq!(envelope_bytes(1 << 20), BATCH_BYTES);
        assert_eq!(envelope_bytes(300 << 10), (300 << 10) - proto::limits::NATS_HEADROOM);
        assert_eq!(envelope_bytes(1000), 1);
    }

    #[test]
    fn control_records_round_trip_and_newer_ones_are_refused() {
        let c = PeerControl { v: PeerControl::VERSION, paused: true, backoff_resets: 3 };
        assert_eq!(PeerControl::decode(&c.encode()), Ok(c));
        // Fields missing from an older writer read as their defaults.
        assert_eq!(PeerControl::decode(br#"{"v":1}"#), Ok(PeerControl { v: 1, ..Default::default() }));
        assert!(PeerControl::decode(br#"{"v":2,"paused":false}"#).unwrap_err().contains("newer"));
        assert!(PeerControl::decode(b"paused").is_err());
    }
}
