//! Requests between operators: peers' signed requests answered from our key
//! directory, and our ingest's requests carried to peers, signed both ways.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use proto::federation::{self as fed, Request, Response, RpcEnvelope};
use proto::{names, ApiError, ErrorCode};
use tokio_util::sync::CancellationToken;

use crate::{reply_error, unix_now, Bridge, Peer, PeerVersion, RunBridgeError};

impl Bridge {
    /// Answers requests on `subject` (on our NATS) with `handle`, each in
    /// its own task.
    pub(crate) async fn serve_requests<F, Fut>(
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
        // A queue group: with several bridges each request is answered
        // once (a second answer would find the nonce used and refuse).
        let mut sub = client
            .queue_subscribe(subject, names::BRIDGE_QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| RunBridgeError::Setup(e.to_string()))?;
        let handle = Arc::new(handle);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            };
            let Some(reply) = msg.reply.clone() else { continue };
            // Bounded: beyond `max_concurrent_requests` a request is
            // answered at once instead of queueing a task.
            let Ok(permit) = self.requests.clone().try_acquire_owned() else {
                let busy = reply_error(ErrorCode::Unavailable, "the bridge is busy; retry later");
                let _ = self.topo.js.client().publish(reply, busy).await;
                continue;
            };
            let (me, handle) = (self.clone(), handle.clone());
            tokio::spawn(async move {
                let answer = handle(me.clone(), msg.subject.to_string(), msg.payload).await;
                let _ = me.topo.js.client().publish(reply, answer).await;
                drop(permit);
            });
        }
    }

    pub(crate) async fn answer_peer(&self, subject: &str, bytes: &[u8]) -> Bytes {
        let env: RpcEnvelope<Request> = match fed::open(bytes, &self.keys, &self.us) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.refused.with_label_values(&[e.label()]).inc();
                return reply_error(ErrorCode::ForgedEnvelope, e.to_string());
            }
        };
        let origin = env.origin.clone();
        if names::peer_rpc_subject(&origin) != subject {
            self.metrics.refused.with_label_values(&["subject_mismatch"]).inc();
            return reply_error(ErrorCode::ForgedEnvelope, "request subject is not the origin's");
        }
        // Replay protection that tolerates clock skew: a window of minutes
        // either side of our clock, and each nonce answered once within it
        // (the nonce bucket keeps them longer than the window). The sender
        // never queues a request while disconnected, so a request does not
        // sit in a reconnect buffer; a claim answered after its requester
        // gave up is released with the reservation.
        let window = self.fed.request_window_secs;
        if env.sent_at.abs_diff(unix_now()) > window {
            self.metrics.refused.with_label_values(&["stale_request"]).inc();
            return reply_error(
                ErrorCode::ForgedEnvelope,
                format!("request time is more than {window} s away from ours; check the clocks"),
            );
        }
        let key = names::nonce_key(&origin, &env.nonce);
        match self.topo.nonces.create(key.as_str(), Bytes::new()).await {
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                self.metrics.refused.with_label_values(&["replayed_request"]).inc();
                return reply_error(ErrorCode::ForgedEnvelope, "request was already answered");
            }
            Err(e) => return reply_error(ErrorCode::Unavailable, format!("cannot check the request's nonce: {e}")),
        }
        if let Some(p) = self.peers.get(&origin) {
            p.contact.notify_waiters();
        }
        if let Request::Capabilities(theirs) = &env.body {
            self.agree(&origin, theirs);
            return self.answer(origin, env.nonce, Response::Capabilities(self.ours.clone()));
        }
        if let Request::Claim { requester, .. }
        | Request::GroupInfo { requester, .. }
        | Request::CommitReport { requester, .. } = &env.body
        {
            if requester.domain() != origin {
                self.metrics.refused.with_label_values(&["sender_not_origin"]).inc();
                return reply_error(ErrorCode::ForgedEnvelope, "a peer asks only for its own devices");
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
        self.answer(origin, env.nonce, response)
    }

    /// Our signed answer to `origin`'s request `nonce`.
    fn answer(&self, origin: String, nonce: [u8; 16], body: Response) -> Bytes {
        let out =
            RpcEnvelope { version: 1, origin: self.us.clone(), destination: origin, sent_at: unix_now(), nonce, body };
        Bytes::from(fed::seal(&self.signer, &out))
    }

    pub(crate) async fn ask_peer(&self, subject: &str, bytes: &[u8]) -> Bytes {
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
        let nonce: [u8; 16] = rand::random();
        let env = RpcEnvelope {
            version: 1,
            origin: self.us.clone(),
            destination: domain.clone(),
            sent_at: unix_now(),
            nonce,
            body,
        };
        let sealed = Bytes::from(fed::seal(&self.signer, &env));
        let timeout = Duration::from_millis(self.fed.request_timeout_ms);
        let m =
            match tokio::time::timeout(timeout, peer.client.request(names::peer_rpc_subject(&self.us), sealed)).await {
                Ok(Ok(m)) => m,
                _ => return Err(unreachable("did not answer")),
            };
        match fed::open::<RpcEnvelope<Response>, _>(&m.payload, &self.keys, &self.us) {
            // The answer names our request's nonce: it is this request's.
            Ok(env) if env.origin == domain && env.nonce == nonce => Ok(env.body),
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

    /// Exchanges capabilities with `peer` at start and periodically.
    pub(crate) async fn negotiate(
        self: Arc<Self>,
        peer: Arc<Peer>,
        shutdown: CancellationToken,
    ) -> Result<(), RunBridgeError> {
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
