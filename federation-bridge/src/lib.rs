//! The federation bridge: the only part of mlsfed that talks to other
//! operators.
//!
//! - **Outbox**: one durable consumer per peer on FED_OUT, one envelope in
//!   flight, sealed with our Ed25519 key and published into the peer's
//!   FED_IN over the peer's NATS; our copy is acked only after the peer's
//!   JetStream acked it (design decision 5). Failures back off exponentially
//!   with jitter, reset by any inbound contact from that peer. An operator
//!   can pause a peer's outbox, resume it and reset its backoff
//!   (`PeerControl`, written by `mlsfed admin peers`).
//! - **Inbox**: FED_IN envelopes are opened (configured origin, signature,
//!   destination, version), checked against the per-peer high-water mark, and
//!   applied: a forwarded submission goes into SUBMIT, a verdict to the
//!   waiting ingest, a delivery into our LOG for local fan-out.
//! - **Requests**: key claims and identity lookups go to the peer by NATS
//!   request/reply, signed both ways, with a timeout and replay protection
//!   (a nonce within a window that tolerates clock skew).
//!
//! One file per job: `outbox.rs`, `inbox.rs`, `requests.rs`, `takeover.rs`
//! (a pinned consumer taken over from a dead bridge); this one holds
//! the shared state and the peer connections.
#![forbid(unsafe_code)]

mod inbox;
mod metrics;
mod outbox;
mod requests;
mod takeover;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use proto::federation::{self as fed, OpenEnvelopeError, Response};
use proto::streams::Topology;
use proto::{names, ApiError, ErrorCode};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use outbox::{ControlApplied, PeerControl};

/// Most outbox records carried by one envelope: a peer catching up after
/// an outage gets up to a thousand per round trip (and its inbox appends
/// each group's share of them as one atomic batch, at most 1000).
const BATCH: usize = 1000;
/// An envelope stops growing past this many bytes of records, well under
/// NATS' 1 MiB payload limit (one record alone may still be larger: it
/// goes alone).
const BATCH_BYTES: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RunBridgeError {
    #[error("cannot set up the bridge: {0}")]
    Setup(String),
}

struct Peer {
    cfg: config::Peer,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Woken by inbound contact from this peer, to retry at once.
    contact: Notify,
    /// The operator's control record for this peer's outbox (pause,
    /// backoff reset), as last read from KV.
    control: tokio::sync::watch::Sender<outbox::ControlState>,
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
    keys: HashMap<String, VerifyingKey>,
    /// The incarnation of our FED_OUT stream (its creation time), which our
    /// envelopes carry so a peer can tell a recreated outbox from a replay.
    outbox_id: u64,
    /// Permits for requests in progress (`federation.max_concurrent_requests`).
    requests: Arc<tokio::sync::Semaphore>,
    /// Partitions (LOG subjects name the group's) and the inbox consumers'
    /// delivery bounds.
    streams: config::Streams,
    peers: HashMap<String, Arc<Peer>>,
    metrics: Metrics,
}

use proto::unix_now;

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
    /// A verdict on a submission we never forwarded to that peer.
    UnsolicitedVerdict,
    /// A second, different verdict on a submission already answered.
    VerdictConflict,
    /// Further ahead of the peer's high-water mark than allowed.
    SeqJump,
    /// A forwarded submission whose id is not one our software makes.
    BadSubmissionId,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Open(e) => e.label(),
            Refusal::SubjectMismatch => "subject_mismatch",
            Refusal::SenderNotOrigin => "sender_not_origin",
            Refusal::NotHub => "not_hub",
            Refusal::NotOurDevices => "not_our_devices",
            Refusal::UnsolicitedVerdict => "unsolicited_verdict",
            Refusal::VerdictConflict => "verdict_conflict",
            Refusal::SeqJump => "seq_jump",
            Refusal::BadSubmissionId => "bad_submission_id",
        }
    }
}

impl Bridge {
    /// How long a peer's outbox or inbox stays pinned to a bridge that
    /// stopped pulling before a standby bridge takes it.
    pub(crate) fn failover(&self) -> Duration {
        Duration::from_secs(self.streams.partition_failover_secs.max(3))
    }

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
            // One URL, or the peer cluster's nodes, comma-separated.
            let (urls, creds) = config::split_cluster_url(&p.nats_url);
            let addrs = urls
                .iter()
                .map(|u| u.parse::<async_nats::ServerAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RunBridgeError::Setup(format!("peer {}: nats_url: {e}", p.domain)))?;
            if !p.nats_user.is_empty() {
                opts = opts.user_and_password(p.nats_user.clone(), p.nats_password.expose().to_owned());
            } else if let Some((user, pass)) = creds {
                opts = opts.user_and_password(user, pass);
            }
            // The peer's server certificate is verified against the system
            // roots or the CA configured for it.
            if !p.nats_ca_file.is_empty() {
                opts = opts.add_root_certificates(p.nats_ca_file.clone().into()).require_tls(true);
            }
            let client =
                opts.connect(addrs).await.map_err(|e| RunBridgeError::Setup(format!("peer {}: {e}", p.domain)))?;
            let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(client.clone());
            let control = tokio::sync::watch::Sender::new(outbox::ControlState::default());
            peers.insert(
                p.domain.clone(),
                Arc::new(Peer { cfg: p.clone(), client, js, contact: Notify::new(), control }),
            );
        }
        // Every per-peer series exists from the start, at 0: a dashboard or
        // alert tells "nothing happened" from "not reported".
        for p in &cfg.peers {
            let l = [p.domain.as_str()];
            for c in [
                &metrics.sent,
                &metrics.send_failures,
                &metrics.received,
                &metrics.replays,
                &metrics.request_failures,
                &metrics.remote_rejections,
                &metrics.mark_resets,
                &metrics.outbox_restarts,
                &metrics.dead_letters,
            ] {
                c.with_label_values(&l);
            }
            for g in [&metrics.outbox_pending, &metrics.needs_resync] {
                g.with_label_values(&l);
            }
            metrics.outbox_age.with_label_values(&l);
        }
        let created = topo.fed_out.cached_info().created;
        let outbox_id = u64::try_from(created.unix_timestamp_nanos()).unwrap_or_default();
        let ours = fed::Capabilities {
            versions: cfg.federation.versions.clone(),
            mls_versions: vec![1],
            cipher_suites: cfg.keydir.cipher_suites.clone(),
            // What our ingest takes, which is also what we can store and
            // forward: the configured limit within our NATS' max_payload.
            max_message_bytes: proto::limits::body_limit(
                cfg.limits.max_body_bytes,
                topo.js.client().server_info().max_payload,
            ) as u64,
        };
        Ok(Self {
            ours,
            states: std::sync::Mutex::new(HashMap::new()),
            topo,
            us: cfg.domain.clone(),
            fed: cfg.federation.clone(),
            signer,
            keys,
            outbox_id,
            requests: Arc::new(tokio::sync::Semaphore::new(cfg.federation.max_concurrent_requests.max(1))),
            streams: cfg.streams.clone(),
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
            tasks.spawn(me.clone().control(peer.clone(), shutdown.clone()));
        }
        for domain in me.peers.keys() {
            tasks.spawn(me.clone().inbox(domain.clone(), shutdown.clone()));
        }
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
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
