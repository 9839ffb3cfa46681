//! The outbox: one durable consumer per peer on FED_OUT, one bounded batch
//! in flight, sealed and published into the peer's FED_IN over the peer's
//! NATS; our copy is acked only after the peer's JetStream acked it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use proto::federation::{self as fed, Envelope, Payload};
use proto::names;
use tokio_util::sync::CancellationToken;

use crate::{time_now, Bridge, Peer, PeerVersion, RunBridgeError, BATCH};

impl Bridge {
    /// Sends our outbox for `peer`, in order, one envelope at a time.
    pub(crate) async fn outbox(
        self: Arc<Self>,
        peer: Arc<Peer>,
        shutdown: CancellationToken,
    ) -> Result<(), RunBridgeError> {
        let domain = peer.cfg.domain.clone();
        let name = names::bridge_out_consumer(&domain);
        // One batch in flight keeps envelopes in order for the peer's
        // high-water mark.
        let filter = names::fed_out_subject(&domain);
        let mut messages = proto::streams::durable_messages(
            &self.topo.fed_out,
            &name,
            &filter,
            BATCH as i64,
            Duration::from_secs(30),
            0,
        )
        .await
        .map_err(RunBridgeError::Setup)?;
        loop {
            let Some(first) = proto::streams::next_message(&mut messages, &shutdown, "bridge outbox")
                .await
                .map_err(|e| RunBridgeError::Setup(e.to_string()))?
            else {
                return Ok(());
            };
            // A bounded batch: whatever else is ready now, in stream order.
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match tokio::time::timeout(Duration::from_millis(2), messages.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            let mut payloads = Vec::with_capacity(batch.len());
            let mut held = Vec::with_capacity(batch.len());
            for m in batch {
                match proto::wire::decode::<Payload>(&m.payload) {
                    Ok(p) => {
                        payloads.push(p);
                        held.push(m);
                    }
                    Err(e) => {
                        tracing::error!(peer = %domain, error = %e, "undecodable outbox record; terminating it");
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                }
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
            // Hold the batch until the peer has it: nothing later is sent
            // before it, so the peer's high-water mark never skips anything.
            let mut attempt = 0u32;
            loop {
                let sent = if matches!(self.state(&domain), PeerVersion::Agreed(_)) {
                    // The id names the outbox incarnation too: a recreated
                    // outbox reuses sequences that the peer's duplicate
                    // window still remembers.
                    let id = names::envelope_msg_id(&self.us, self.outbox_id, seq);
                    let publish = PublishMessage::build().payload(sealed.clone()).message_id(id);
                    match peer.js.send_publish(names::fed_in_subject(&self.us), publish).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                } else {
                    // Not yet agreed, or incompatible: keep it queued.
                    Err("no agreed federation version".to_owned())
                };
                match sent {
                    Ok(()) => {
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
                    Err(e) => {
                        self.metrics.send_failures.with_label_values(&[&domain]).inc();
                        self.check_retention(&domain, &held[0]);
                        let wait = self.backoff(attempt);
                        attempt = attempt.saturating_add(1);
                        tracing::debug!(peer = %domain, error = %e, ?wait, "peer unreachable; backing off");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                            _ = peer.contact.notified() => { attempt = 0; }
                        }
                        // Keep the held messages ours while we retry.
                        for m in &held {
                            let _ = m.ack_with(AckKind::Progress).await;
                        }
                    }
                }
            }
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
