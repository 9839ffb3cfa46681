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
use proto::wire::{EntryKind, MailboxItem, Notice};
use proto::{names, DeviceId, ErrorCode, UserId};
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
    let report = api
        .keydir
        .upload(&device, &body, now_unix())
        .await
        .map_err(|e| Reject(e.to_api()))?;
    Ok(json(report).into_response())
}

pub async fn stock(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
) -> Result<Response, Reject> {
    let stock = api
        .keydir
        .stock(&device)
        .await
        .map_err(|e| Reject(e.to_api()))?;
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

pub async fn claim(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    body: Body,
) -> Result<Response, Reject> {
    let body = read_body(&api, body).await?;
    let req: ClaimJson = serde_json::from_slice(&body)
        .map_err(|e| Reject::new(ErrorCode::InvalidRequest, format!("bad claim request: {e}")))?;
    let user = UserId::parse(&req.user)
        .map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))?;
    let outcome = api
        .keydir
        .claim(&device, &user, &req.request, now_unix())
        .await
        .map_err(|e| Reject(e.to_api()))?;
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
    let notice = Notice::KeyPackagesLow {
        cipher_suite: low.cipher_suite,
        remaining: low.remaining,
    };
    let item = MailboxItem {
        group: None,
        position: 0,
        epoch: 0,
        kind: EntryKind::Notice,
        own: false,
        message: serde_json::to_vec(&notice).unwrap_or_default(),
    };
    let publish = PublishMessage::build()
        .payload(Bytes::from(proto::wire::encode(&item)))
        .message_id(names::notice_msg_id(
            &low.device,
            low.cipher_suite,
            low.remaining,
        ));
    match api
        .topo
        .js
        .send_publish(names::mailbox_subject(&low.device), publish)
        .await
    {
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
    if device.domain() != api.cfg.domain {
        return Err(Reject::new(
            ErrorCode::NotHub,
            "bindings of other operators' devices need federation",
        ));
    }
    let signed = api
        .keydir
        .binding(&device)
        .await
        .map_err(|e| Reject(e.to_api()))?;
    let status = match signed.open(&api.keydir.operator_key()) {
        Ok(b) if b.revoked => StatusCode::GONE,
        _ => StatusCode::OK,
    };
    Ok((status, json(signed)).into_response())
}

/// `DELETE /v1/devices/{device}`: a device removes itself.
pub async fn remove_device(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
) -> Result<Response, Reject> {
    if parse_device(&path)? != device {
        return Err(Reject::new(
            ErrorCode::ForbiddenDevice,
            "a device may remove only itself",
        ));
    }
    api.keydir
        .remove_device(&device, now_unix())
        .await
        .map_err(|e| Reject(e.to_api()))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
