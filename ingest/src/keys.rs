//! Key directory and identity endpoints (docs/client-api.md, "Key packages"
//! and "Identity").

use async_nats::jetstream::message::PublishMessage;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use keydir::{ClaimRequest, LowStock};
use proto::federation::{Request, Response as FedResponse};
use proto::identity::SignedBinding;
use proto::wire::{EntryKind, MailboxItem, Notice};
use proto::{names, ApiError, DeviceId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};

use crate::{json, now_unix, read_body, AuthDevice, Reject, Shared};

fn parse_device(path: &str) -> Result<DeviceId, Reject> {
    DeviceId::parse(path).map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))
}

pub async fn upload_key_packages(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    body: Body,
) -> Result<Response, Reject> {
    let body = read_body(&api, body).await?;
    let report = api.keydir.upload(&device, &body, now_unix()).await.map_err(|e| Reject(e.to_api()))?;
    Ok(json(report).into_response())
}

pub async fn stock(State(api): State<Shared>, AuthDevice(device): AuthDevice) -> Result<Response, Reject> {
    let stock = api.keydir.stock(&device).await.map_err(|e| Reject(e.to_api()))?;
    Ok(json(serde_json::json!({ "stock": stock })).into_response())
}

#[derive(Deserialize)]
struct ClaimJson {
    user: String,
    #[serde(flatten)]
    request: ClaimRequest,
}

#[derive(Serialize)]
struct ClaimedJson {
    device: String,
    cipher_suite: u16,
    last_resort: bool,
    key_package: String,
}

pub async fn claim(State(api): State<Shared>, AuthDevice(device): AuthDevice, body: Body) -> Result<Response, Reject> {
    let body = read_body(&api, body).await?;
    let req: ClaimJson = serde_json::from_slice(&body)
        .map_err(|e| Reject::new(ErrorCode::InvalidRequest, format!("bad claim request: {e}")))?;
    let user = UserId::parse(&req.user).map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))?;
    if user.domain() != api.cfg.domain {
        return claim_remote(&api, device, user, req.request.cipher_suites).await;
    }
    let outcome = api.keydir.claim(&device, &user, &req.request, now_unix()).await.map_err(|e| Reject(e.to_api()))?;
    for low in &outcome.low_stock {
        notify_low_stock(&api, low).await;
    }
    let out: Vec<ClaimedJson> = outcome
        .claimed
        .into_iter()
        .map(|c| ClaimedJson {
            device: c.device.to_string(),
            cipher_suite: c.cipher_suite,
            last_resort: c.last_resort,
            key_package: B64.encode(c.key_package),
        })
        .collect();
    Ok(json(serde_json::json!({ "key_packages": out })).into_response())
}

/// Puts a replenish notice in the device's mailbox. Best effort: a lost
/// notice is repeated by the next claim below the mark.
async fn notify_low_stock(api: &Shared, low: &LowStock) {
    let notice = Notice::KeyPackagesLow { cipher_suite: low.cipher_suite, remaining: low.remaining };
    let item = MailboxItem {
        group: None,
        position: 0,
        epoch: 0,
        kind: EntryKind::Notice,
        own: false,
        message: serde_json::to_vec(&notice).unwrap_or_default(),
        log_seq: 0,
    };
    let publish = PublishMessage::build()
        .payload(Bytes::from(proto::wire::encode(&item)))
        .message_id(names::notice_msg_id(&low.device, low.cipher_suite, low.remaining));
    match api.topo.js.send_publish(names::mailbox_subject(&low.device), publish).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "replenish notice not stored");
            }
        }
        Err(e) => tracing::warn!(error = %e, "replenish notice not sent"),
    }
}

/// `GET /v1/operator`: who we are and the key that signs our bindings.
pub async fn operator(State(api): State<Shared>) -> Response {
    json(serde_json::json!({
        "domain": api.cfg.domain,
        "binding_key": api.keydir.operator_key(),
        "cipher_suites": api.cfg.keydir.cipher_suites,
        "api_version": 1,
    }))
    .into_response()
}

/// `GET /v1/identity/{device}`: the operator's signed binding of a device.
pub async fn identity(
    State(api): State<Shared>,
    AuthDevice(_): AuthDevice,
    Path(path): Path<String>,
) -> Result<Response, Reject> {
    let device = parse_device(&path)?;
    let (signed, key) = if device.domain() == api.cfg.domain {
        let signed = api.keydir.binding(&device).await.map_err(|e| Reject(e.to_api()))?;
        (signed, api.keydir.operator_key())
    } else {
        // Another operator's device: its operator vouches for it; we fetch
        // the binding through our bridge and name the key it is signed with.
        let peer = api
            .cfg
            .peer(device.domain())
            .ok_or_else(|| Reject::new(ErrorCode::NotHub, "that device's operator is not a peer"))?;
        let key = peer.public_key.clone();
        match ask_peer(&api, device.domain(), Request::Identity { device: device.clone() }).await? {
            FedResponse::Binding(bytes) => {
                let signed: SignedBinding = serde_json::from_slice(&bytes)
                    .map_err(|_| Reject::new(ErrorCode::ForgedEnvelope, "the peer sent a malformed binding"))?;
                (signed, key)
            }
            FedResponse::Error(e) => return Err(Reject(e)),
            _ => return Err(Reject::new(ErrorCode::Internal, "unexpected answer")),
        }
    };
    let status = match signed.open(&key) {
        Ok(b) if b.revoked => StatusCode::GONE,
        _ => StatusCode::OK,
    };
    let body = serde_json::json!({
        "binding": signed.binding,
        "signature": signed.signature,
        "operator_key": key,
    });
    Ok((status, json(body)).into_response())
}

/// `DELETE /v1/devices/{device}`: a device removes itself.
pub async fn remove_device(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
) -> Result<Response, Reject> {
    if parse_device(&path)? != device {
        return Err(Reject::new(ErrorCode::ForbiddenDevice, "a device may remove only itself"));
    }
    api.keydir.remove_device(&device, now_unix()).await.map_err(|e| Reject(e.to_api()))?;
    // Every ingest process closes the device's sockets at once; one that
    // misses this still finds the removal at its sockets' periodic check.
    let client = api.topo.js.client();
    if let Err(e) = client.publish(names::REVOKED_SUBJECT, Bytes::from(device.as_str().to_owned())).await {
        tracing::warn!(error = %e, "cannot announce a device removal; its sockets close at their next check");
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Hands the device removals every ingest process announces to this
/// process's sockets. A removal missed (this process was disconnected) is
/// found by the sockets' periodic check.
pub(crate) async fn hear_revocations(api: Shared) {
    let client = api.topo.js.client();
    loop {
        let mut sub = match client.subscribe(names::REVOKED_SUBJECT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to device removals; retrying");
                tokio::select! {
                    _ = api.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let m = tokio::select! {
                _ = api.shutdown.cancelled() => return,
                m = futures::StreamExt::next(&mut sub) => match m { Some(m) => m, None => break },
            };
            // Only our own processes publish here (peers live in other NATS
            // accounts); still, a malformed id is ignored.
            let Some(device) = std::str::from_utf8(&m.payload).ok().and_then(|d| DeviceId::parse(d).ok()) else {
                continue;
            };
            api.removals.removed(&device);
        }
    }
}

/// Asks a peer operator through our bridge (request/reply).
pub(crate) async fn ask_peer(api: &Shared, peer: &str, req: Request) -> Result<FedResponse, Reject> {
    let client = api.topo.js.client();
    // The bridge answers within the federation timeout; wait a little longer.
    let timeout = std::time::Duration::from_millis(api.cfg.federation.request_timeout_ms + 1000);
    let bytes = Bytes::from(proto::wire::encode(&req));
    match tokio::time::timeout(timeout, client.request(names::bridge_rpc_subject(peer), bytes)).await {
        Ok(Ok(m)) => {
            proto::wire::decode(&m.payload).map_err(|_| Reject::new(ErrorCode::Internal, "bad answer from the bridge"))
        }
        _ => Err(Reject::new(
            ErrorCode::PeerUnreachable,
            format!("{peer} cannot be reached now; nothing was done there"),
        )),
    }
}

async fn claim_remote(
    api: &Shared,
    device: DeviceId,
    user: UserId,
    cipher_suites: Vec<u16>,
) -> Result<Response, Reject> {
    if api.cfg.peer(user.domain()).is_none() {
        return Err(Reject::new(ErrorCode::NotHub, "that user's operator is not a peer"));
    }
    let domain = user.domain().to_owned();
    match ask_peer(api, &domain, Request::Claim { requester: device, user, cipher_suites }).await? {
        FedResponse::Claimed(kps) => {
            let out: Vec<ClaimedJson> = kps
                .into_iter()
                .filter(|(d, ..)| d.domain() == domain)
                .map(|(d, suite, last_resort, bytes)| ClaimedJson {
                    device: d.to_string(),
                    cipher_suite: suite,
                    last_resort,
                    key_package: B64.encode(bytes),
                })
                .collect();
            Ok(json(serde_json::json!({ "key_packages": out })).into_response())
        }
        FedResponse::Error(e) => Err(Reject(e)),
        _ => Err(Reject::new(ErrorCode::Internal, "unexpected answer")),
    }
}

/// Serves our bridge's requests on behalf of peers (queue group: any
/// ingest process may answer).
pub async fn serve_keydir_requests(api: Shared) {
    let client = api.topo.js.client();
    let Ok(mut sub) = client.queue_subscribe(names::KEYDIR_RPC_SUBJECT, names::KEYDIR_RPC_QUEUE.into()).await else {
        tracing::error!("cannot serve key directory requests");
        return;
    };
    loop {
        let msg = tokio::select! {
            _ = api.shutdown.cancelled() => return,
            m = futures::StreamExt::next(&mut sub) => match m { Some(m) => m, None => return },
        };
        let Some(reply) = msg.reply.clone() else { continue };
        let answer = match proto::wire::decode::<Request>(&msg.payload) {
            Ok(req) => answer(&api, req).await,
            Err(_) => FedResponse::Error(ApiError::new(ErrorCode::InvalidRequest, "bad request")),
        };
        let _ = client.publish(reply, Bytes::from(proto::wire::encode(&answer))).await;
    }
}

async fn answer(api: &Shared, req: Request) -> FedResponse {
    match req {
        Request::Claim { requester, user, cipher_suites } => {
            let r = ClaimRequest { cipher_suites, ..Default::default() };
            match api.keydir.claim(&requester, &user, &r, now_unix()).await {
                Ok(outcome) => {
                    for low in &outcome.low_stock {
                        notify_low_stock(api, low).await;
                    }
                    FedResponse::Claimed(
                        outcome
                            .claimed
                            .into_iter()
                            .map(|c| (c.device, c.cipher_suite, c.last_resort, c.key_package))
                            .collect(),
                    )
                }
                Err(e) => FedResponse::Error(e.to_api()),
            }
        }
        // The bridge answers capabilities itself.
        Request::Capabilities(_) => {
            FedResponse::Error(ApiError::new(ErrorCode::InvalidRequest, "not for the key directory"))
        }
        Request::GroupInfo { requester, group } => crate::rejoin::answer_group_info(api, &requester, &group).await,
        Request::CommitReport { requester, group, position } => {
            crate::rejoin::answer_report(api, &requester, &group, position, "peer").await
        }
        Request::Identity { device } => match api.keydir.binding(&device).await {
            Ok(signed) => FedResponse::Binding(serde_json::to_vec(&signed).unwrap_or_default()),
            Err(e) => FedResponse::Error(e.to_api()),
        },
    }
}

/// Settles the reservations of KeyPackages that a delivered Welcome used
/// (fanout announces them on a core subject).
/// Settles the reservations of KeyPackages that delivered Welcomes used,
/// from the durable `MLSFED_KP_USED` queue shared by every ingest process:
/// a notice waits while no ingest runs, and one that fails is retried with
/// backoff and, in the end, dead-lettered, never dropped. Restarted (with a
/// pause) if its consumer fails, instead of ending silently.
pub async fn settle_consumed(api: Shared) {
    loop {
        match settle_loop(&api).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "KeyPackage settlement stopped; restarting it");
                tokio::select! {
                    _ = api.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn settle_loop(api: &Shared) -> Result<(), String> {
    let cfg = &api.cfg.streams;
    let mut messages = proto::streams::durable_messages(
        &api.topo.kp_used,
        names::KP_SETTLE_CONSUMER,
        "",
        64,
        cfg.ack_wait(),
        cfg.max_deliver.saturating_add(2),
    )
    .await?;
    loop {
        let Some(msg) = proto::streams::next_message(&mut messages, &api.shutdown, "keydir settle")
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let refs = match proto::wire::decode::<Vec<Vec<u8>>>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                proto::streams::dead_letter(&api.topo, "keydir", e.label(), &e.to_string(), &msg).await;
                continue;
            }
        };
        match api.keydir.consumed(&refs).await {
            Ok(()) => {
                let _ = msg.ack().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot settle KeyPackage reservations; retrying");
                let detail = e.to_string();
                proto::streams::retry_or_dead_letter(&api.topo, cfg, "keydir", "transient", &detail, &msg).await;
            }
        }
    }
}
