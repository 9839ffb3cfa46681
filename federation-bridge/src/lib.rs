//! The federation bridge: the only part of mlsfed that talks to other
//! operators.
//!
//! - **Outbox**: one durable consumer per peer on FED_OUT, one envelope in
//!   flight, sealed with our Ed25519 key and published into the peer's
//!   FED_IN over the peer's NATS; our copy is acked only after the peer's
//!   JetStream acked it (design decision 5). Failures back off exponentially
//!   with jitter, reset by any inbound contact from that peer.
//! - **Inbox**: FED_IN envelopes are opened (configured origin, signature,
//!   destination, version), checked against the per-peer high-water mark, and
//!   applied: a forwarded submission goes into SUBMIT, a verdict to the
//!   waiting ingest, a delivery into our LOG for local fan-out.
//! - **Requests**: key claims and identity lookups go to the peer by NATS
//!   request/reply, signed both ways, with a timeout.
#![forbid(unsafe_code)]

mod metrics;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use futures::StreamExt;
use proto::federation::{self as fed, Envelope, OpenEnvelopeError, Payload, Request, Response, RpcEnvelope};
use proto::streams::Topology;
use proto::wire::Verdict;
use proto::{names, ApiError, ErrorCode};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;

/// Most outbox records carried by one envelope.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RunBridgeError {
    #[error("cannot set up the bridge: {0}")]
    Setup(String),
}

struct PeerKeys(HashMap<String, VerifyingKey>);

impl fed::PeerKeys for PeerKeys {
    fn key_of(&self, domain: &str) -> Option<VerifyingKey> {
        self.0.get(domain).copied()
    }
}

struct Peer {
    cfg: config::Peer,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Woken by inbound contact from this peer, to retry at once.
    contact: Notify,
}

/// What a capabilities exchange with a peer concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerVersion {
    Unknown,
    Agreed(u16),
    Incompatible,
}

pub struct Bridge {
    /// What we offer in capabilities exchanges.
    ours: fed::Capabilities,
    states: std::sync::Mutex<HashMap<String, PeerVersion>>,
    topo: Topology,
    us: String,
    fed: config::Federation,
    signer: SigningKey,
    keys: PeerKeys,
    peers: HashMap<String, Arc<Peer>>,
    metrics: Metrics,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn reply_error(code: ErrorCode, msg: impl Into<String>) -> Bytes {
    Bytes::from(proto::wire::encode(&Response::Error(ApiError::new(code, msg))))
}

/// Why an inbound envelope is refused (metric label).
enum Refusal {
    Open(OpenEnvelopeError),
    SubjectMismatch,
    SenderNotOrigin,
    NotHub,
    NotOurDevices,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Open(e) => e.label(),
            Refusal::SubjectMismatch => "subject_mismatch",
            Refusal::SenderNotOrigin => "sender_not_origin",
            Refusal::NotHub => "not_hub",
            Refusal::NotOurDevices => "not_our_devices",
        }
    }
}

impl Bridge {
    /// Connects to every configured peer (reconnecting forever in the
    /// background: an unreachable peer is an outbox that waits).
    pub async fn new(topo: Topology, cfg: &config::Config, metrics: Metrics) -> Result<Self, RunBridgeError> {
        let signer =
            proto::identity::operator_key(&cfg.operator_seed().map_err(|e| RunBridgeError::Setup(e.to_string()))?);
        let mut keys = HashMap::new();
        let mut peers = HashMap::new();
        for p in &cfg.peers {
            let key = fed::verifying_key(&p.public_key).ok_or_else(|| {
                RunBridgeError::Setup(format!("peer {}: public_key is not a base64 Ed25519 key", p.domain))
            })?;
            keys.insert(p.domain.clone(), key);
            let mut opts = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .max_reconnects(None)
                .name(format!("mlsfed-bridge {}", cfg.domain));
            let (url, creds) = config::split_credentials(&p.nats_url);
            if !p.nats_user.is_empty() {
                opts = opts.user_and_password(p.nats_user.clone(), p.nats_password.clone());
            } else if let Some((user, pass)) = creds {
                opts = opts.user_and_password(user, pass);
            }
            let client = opts
                .connect(url.as_str())
                .await
                .map_err(|e| RunBridgeError::Setup(format!("peer {}: {e}", p.domain)))?;
            let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client.clone());
            peers.insert(p.domain.clone(), Arc::new(Peer { cfg: p.clone(), client, js, contact: Notify::new() }));
        }
        let ours = fed::Capabilities {
            versions: cfg.federation.versions.clone(),
            mls_versions: vec![1],
            cipher_suites: cfg.keydir.cipher_suites.clone(),
            max_message_bytes: cfg.limits.max_body_bytes as u64,
        };
        Ok(Self {
            ours,
            states: std::sync::Mutex::new(HashMap::new()),
            topo,
            us: cfg.domain.clone(),
            fed: cfg.federation.clone(),
            signer,
            keys: PeerKeys(keys),
            peers,
            metrics,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunBridgeError> {
        let me = Arc::new(self);
        let mut tasks = tokio::task::JoinSet::new();
        for peer in me.peers.values() {
            tasks.spawn(me.clone().negotiate(peer.clone(), shutdown.clone()));
            tasks.spawn(me.clone().outbox(peer.clone(), shutdown.clone()));
        }
        tasks.spawn(me.clone().inbox(shutdown.clone()));
        // Peers' signed requests, answered from our key directory.
        tasks.spawn(me.clone().serve_requests(
            names::PEER_RPC_WILDCARD,
            shutdown.clone(),
            |me, subject, payload| async move { me.answer_peer(&subject, &payload).await },
        ));
        // Our ingest's requests, carried to peers.
        tasks.spawn(me.clone().serve_requests(
            names::BRIDGE_RPC_WILDCARD,
            shutdown.clone(),
            |me, subject, payload| async move { me.ask_peer(&subject, &payload).await },
        ));
        let first = tasks.join_next().await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        match first {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(RunBridgeError::Setup(format!("bridge task failed: {e}"))),
            None => Ok(()),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.fed.backoff_initial_ms.saturating_mul(1u64 << attempt.min(20)).min(self.fed.backoff_max_ms);
        // ±20% jitter so peers coming back are not hit in lock step.
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        Duration::from_millis((base as f64 * jitter) as u64)
    }

    /// Sends our outbox for `peer`, in order, one envelope at a time.
    async fn outbox(self: Arc<Self>, peer: Arc<Peer>, shutdown: CancellationToken) -> Result<(), RunBridgeError> {
        let domain = peer.cfg.domain.clone();
        let name = names::bridge_out_consumer(&domain);
        // One batch in flight keeps envelopes in order for the peer's
        // high-water mark.
        let filter = names::fed_out_subject(&domain);
        let mut messages =
            proto::streams::durable_messages(&self.topo.fed_out, &name, &filter, BATCH as i64, Duration::from_secs(30))
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
            let env = Envelope { version: 1, origin: self.us.clone(), destination: domain.clone(), seq, payloads };
            let sealed = Bytes::from(fed::seal(&self.signer, &env));
            // Hold the batch until the peer has it: nothing later is sent
            // before it, so the peer's high-water mark never skips anything.
            let mut attempt = 0u32;
            loop {
                let sent = if matches!(self.state(&domain), PeerVersion::Agreed(_)) {
                    let publish =
                        PublishMessage::build().payload(sealed.clone()).message_id(format!("{}-{seq}", self.us));
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

    /// Applies envelopes that peers put into our FED_IN.
    async fn inbox(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RunBridgeError> {
        // One envelope at a time: the high-water mark moves in order.
        let mut messages = proto::streams::durable_messages(
            &self.topo.fed_in,
            names::BRIDGE_IN_CONSUMER,
            "",
            1,
            Duration::from_secs(30),
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
            match self.receive(&msg.subject, &msg.payload).await {
                Ok(()) => {
                    let _ = msg.double_ack().await;
                }
                Err(Ok(refusal)) => {
                    // Forged, misaddressed or misattributed: never applied,
                    // never retried.
                    self.metrics.refused.with_label_values(&[refusal.label()]).inc();
                    tracing::warn!(reason = refusal.label(), "inbound envelope refused");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
                Err(Err(e)) => {
                    tracing::warn!(error = %e, "inbound envelope deferred");
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
                }
            }
        }
    }

    /// `Err(Ok(_))`: refused; `Err(Err(_))`: transient, retry.
    async fn receive(&self, subject: &str, bytes: &[u8]) -> Result<(), Result<Refusal, String>> {
        let env: Envelope = fed::open(bytes, &self.keys, &self.us).map_err(|e| Ok(Refusal::Open(e)))?;
        if names::origin_of_fed_in(subject).as_deref() != Some(env.origin.as_str()) {
            return Err(Ok(Refusal::SubjectMismatch));
        }
        let origin = env.origin.clone();
        if let Some(p) = self.peers.get(&origin) {
            p.contact.notify_waiters();
        }
        // The per-peer high-water mark makes a replay harmless even after
        // JetStream's duplicate window has passed.
        let key = names::hwm_key(&origin);
        let entry = self.topo.federation.entry(key.as_str()).await.map_err(|e| Err(e.to_string()))?;
        let (hwm, rev) = match &entry {
            Some(e) => (std::str::from_utf8(&e.value).ok().and_then(|s| s.parse().ok()).unwrap_or(0u64), e.revision),
            None => (0, 0),
        };
        if env.seq <= hwm {
            self.metrics.replays.with_label_values(&[&origin]).inc();
            return Ok(());
        }
        for payload in env.payloads {
            match self.apply(&origin, payload).await {
                Ok(()) => {}
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
        let value = Bytes::from(env.seq.to_string());
        let stored = if rev == 0 {
            self.topo.federation.create(key.as_str(), value).await.map(|_| ()).map_err(|e| e.to_string())
        } else {
            self.topo.federation.update(key.as_str(), value, rev).await.map(|_| ()).map_err(|e| {
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
        self.metrics.received.with_label_values(&[&origin]).inc();
        Ok(())
    }

    async fn publish_local(
        &self,
        subject: String,
        payload: Vec<u8>,
        id: String,
    ) -> Result<(), Result<Refusal, String>> {
        let publish = PublishMessage::build().payload(Bytes::from(payload)).message_id(id);
        self.topo
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| Err(e.to_string()))?
            .await
            .map_err(|e| Err(e.to_string()))?;
        Ok(())
    }

    async fn apply(&self, origin: &str, payload: Payload) -> Result<(), Result<Refusal, String>> {
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
                self.publish_local(names::submit_subject(&sub.group), proto::wire::encode(&sub), id).await
            }
            Payload::Verdict { submission_id, verdict } => {
                let bytes = Bytes::from(verdict.to_bytes());
                self.topo.verdicts.put(&submission_id, bytes.clone()).await.map_err(|e| Err(e.to_string()))?;
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
                if entry.group.hub() != origin {
                    return Err(Ok(Refusal::NotHub));
                }
                let ours = |ds: &[proto::DeviceId]| ds.iter().all(|d| d.domain() == self.us);
                if !ours(&entry.recipients) || !ours(&entry.welcome_recipients) {
                    return Err(Ok(Refusal::NotOurDevices));
                }
                let id = names::fed_msg_id("rlog", &[entry.group.as_bytes(), &entry.position.to_be_bytes()]);
                self.publish_local(names::log_subject(&entry.group), proto::wire::encode(&entry), id).await
            }
        }
    }

    /// Answers requests on `subject` (on our NATS) with `handle`, each in
    /// its own task.
    async fn serve_requests<F, Fut>(
        self: Arc<Self>,
        subject: &'static str,
        shutdown: CancellationToken,
        handle: F,
    ) -> Result<(), RunBridgeError>
    where
        F: Fn(Arc<Self>, String, Bytes) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Bytes> + Send + 'static,
    {
        let client = self.topo.js.client();
        let mut sub = client.subscribe(subject).await.map_err(|e| RunBridgeError::Setup(e.to_string()))?;
        let handle = Arc::new(handle);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            };
            let (me, handle) = (self.clone(), handle.clone());
            tokio::spawn(async move {
                let Some(reply) = msg.reply.clone() else { return };
                let answer = handle(me.clone(), msg.subject.to_string(), msg.payload).await;
                let _ = me.topo.js.client().publish(reply, answer).await;
            });
        }
    }

    async fn answer_peer(&self, subject: &str, bytes: &[u8]) -> Bytes {
        let env: RpcEnvelope<Request> = match fed::open(bytes, &self.keys, &self.us) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.refused.with_label_values(&[e.label()]).inc();
                return reply_error(ErrorCode::ForgedEnvelope, e.to_string());
            }
        };
        let origin = env.origin.clone();
        // A request older than the requester's timeout was given up on (it
        // may have sat in a reconnect buffer): answering it could consume a
        // KeyPackage nobody receives.
        let max_age = self.fed.request_timeout_ms.div_ceil(1000) + 1;
        if names::peer_rpc_subject(&origin) != subject || env.sent_at + max_age < unix_now() {
            self.metrics.refused.with_label_values(&["subject_mismatch"]).inc();
            return reply_error(ErrorCode::ForgedEnvelope, "request subject or age is wrong");
        }
        if let Some(p) = self.peers.get(&origin) {
            p.contact.notify_waiters();
        }
        if let Request::Capabilities(theirs) = &env.body {
            self.agree(&origin, theirs);
            let out = RpcEnvelope {
                version: 1,
                origin: self.us.clone(),
                destination: origin,
                sent_at: unix_now(),
                body: Response::Capabilities(self.ours.clone()),
            };
            return Bytes::from(fed::seal(&self.signer, &out));
        }
        if let Request::Claim { requester, .. } = &env.body {
            if requester.domain() != origin {
                self.metrics.refused.with_label_values(&["sender_not_origin"]).inc();
                return reply_error(ErrorCode::ForgedEnvelope, "a peer claims only for its own devices");
            }
        }
        let timeout = Duration::from_millis(self.fed.request_timeout_ms);
        let req = Bytes::from(proto::wire::encode(&env.body));
        let response =
            match tokio::time::timeout(timeout, self.topo.js.client().request(names::KEYDIR_RPC_SUBJECT, req)).await {
                Ok(Ok(m)) => proto::wire::decode::<Response>(&m.payload).unwrap_or_else(|_| {
                    Response::Error(ApiError::new(ErrorCode::Internal, "bad key directory answer"))
                }),
                _ => Response::Error(ApiError::new(ErrorCode::Unavailable, "key directory unavailable")),
            };
        let out = RpcEnvelope {
            version: 1,
            origin: self.us.clone(),
            destination: origin,
            sent_at: unix_now(),
            body: response,
        };
        Bytes::from(fed::seal(&self.signer, &out))
    }

    async fn ask_peer(&self, subject: &str, bytes: &[u8]) -> Bytes {
        let peer = self.peers.values().find(|p| names::bridge_rpc_subject(&p.cfg.domain) == subject).cloned();
        let Some(peer) = peer else {
            return reply_error(ErrorCode::NotHub, "not a configured peer");
        };
        let Ok(body) = proto::wire::decode::<Request>(bytes) else {
            return reply_error(ErrorCode::InvalidRequest, "bad request");
        };
        if self.state(&peer.cfg.domain) == PeerVersion::Incompatible {
            return reply_error(
                ErrorCode::IncompatiblePeer,
                format!("{} shares no federation version, MLS version or cipher suite with us", peer.cfg.domain),
            );
        }
        let response = match self.request(&peer, body).await {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        };
        Bytes::from(proto::wire::encode(&response))
    }

    /// One signed request to a peer and its verified answer.
    async fn request(&self, peer: &Peer, body: Request) -> Result<Response, ApiError> {
        let domain = peer.cfg.domain.clone();
        let unreachable = |why: &str| {
            self.metrics.request_failures.with_label_values(&[&domain]).inc();
            ApiError::new(ErrorCode::PeerUnreachable, format!("{domain} {why}"))
        };
        // Never queue a request while the peer is disconnected: the client
        // would buffer it and deliver it after we gave up.
        if peer.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unreachable("is not connected"));
        }
        let env =
            RpcEnvelope { version: 1, origin: self.us.clone(), destination: domain.clone(), sent_at: unix_now(), body };
        let sealed = Bytes::from(fed::seal(&self.signer, &env));
        let timeout = Duration::from_millis(self.fed.request_timeout_ms);
        let m =
            match tokio::time::timeout(timeout, peer.client.request(names::peer_rpc_subject(&self.us), sealed)).await {
                Ok(Ok(m)) => m,
                _ => return Err(unreachable("did not answer")),
            };
        match fed::open::<RpcEnvelope<Response>, _>(&m.payload, &self.keys, &self.us) {
            Ok(env) if env.origin == domain => Ok(env.body),
            Ok(_) | Err(_) => {
                // A peer's error replies to a request it could not verify are
                // unsigned; either way, nothing usable came back.
                if let Ok(Response::Error(e)) = proto::wire::decode::<Response>(&m.payload) {
                    return Err(e);
                }
                self.metrics.refused.with_label_values(&["bad_signature"]).inc();
                Err(ApiError::new(ErrorCode::ForgedEnvelope, "the peer's answer does not verify"))
            }
        }
    }

    fn state(&self, peer: &str) -> PeerVersion {
        self.states.lock().map(|m| m.get(peer).copied().unwrap_or(PeerVersion::Unknown)).unwrap_or(PeerVersion::Unknown)
    }

    /// Records the outcome of a capabilities exchange with `peer`.
    fn agree(&self, peer: &str, theirs: &fed::Capabilities) -> PeerVersion {
        let state = match fed::negotiate(&self.ours, theirs) {
            Some(v) => PeerVersion::Agreed(v),
            None => PeerVersion::Incompatible,
        };
        let before = self.state(peer);
        if let Ok(mut m) = self.states.lock() {
            m.insert(peer.to_owned(), state);
        }
        match state {
            PeerVersion::Agreed(v) => {
                self.metrics.peer_version.with_label_values(&[peer]).set(i64::from(v));
                self.metrics.peer_compatible.with_label_values(&[peer]).set(1);
            }
            _ => {
                self.metrics.peer_version.with_label_values(&[peer]).set(0);
                self.metrics.peer_compatible.with_label_values(&[peer]).set(0);
                if before != state {
                    tracing::error!(peer, "peer is incompatible: no common federation version, MLS version or cipher suite; its outbox is held");
                }
            }
        }
        state
    }

    /// Exchanges capabilities with `peer` at start and periodically.
    async fn negotiate(self: Arc<Self>, peer: Arc<Peer>, shutdown: CancellationToken) -> Result<(), RunBridgeError> {
        let mut attempt = 0u32;
        loop {
            let wait = match self.request(&peer, Request::Capabilities(self.ours.clone())).await {
                Ok(Response::Capabilities(theirs)) => {
                    attempt = 0;
                    self.agree(&peer.cfg.domain, &theirs);
                    Duration::from_secs(60)
                }
                _ => {
                    attempt = attempt.saturating_add(1);
                    self.backoff(attempt.min(4))
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
