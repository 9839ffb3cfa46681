//! Mailbox reads: cursor-based fetch, ack (which purges), and WebSocket push.
//! A device may read only its own mailbox. Items are read with direct gets
//! (no consumer per device: JetStream holds thousands of consumers, not
//! millions).

use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use proto::wire::MailboxItem;
use proto::{names, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::{json, read_body, AuthDevice, Reject, Shared};

#[derive(Serialize)]
pub struct ItemJson {
    /// Mailbox cursor of this item: fetch with `after=<seq>` to continue.
    pub seq: u64,
    /// Absent for operator notices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub position: u64,
    pub epoch: u64,
    pub kind: &'static str,
    pub own: bool,
    /// The MLSMessage bytes, base64 (empty for notices).
    pub message: String,
    /// For `kind: "notice"`: what the operator says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub struct FetchQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

fn own_mailbox(auth: &DeviceId, path: &str) -> Result<(), Reject> {
    let asked = DeviceId::parse(path).map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))?;
    if &asked != auth {
        return Err(Reject::new(ErrorCode::ForbiddenDevice, "a device may read only its own mailbox"));
    }
    Ok(())
}

/// The sequence after cursor `after`. JetStream sequences are far below
/// 2^63; a larger cursor is a client bug (or a probe), refused rather than
/// wrapped around to the start of the mailbox.
fn next_seq(after: u64) -> Result<u64, Reject> {
    if after >= 1 << 63 {
        return Err(Reject::new(ErrorCode::InvalidCursor, format!("cursor {after} is out of range")));
    }
    Ok(after + 1)
}

/// Reads up to `limit` items after cursor `after`.
async fn read(api: &Shared, device: &DeviceId, after: u64, limit: usize) -> Result<Vec<ItemJson>, Reject> {
    let subject = names::mailbox_subject(device);
    let mut out = Vec::new();
    let mut next = next_seq(after)?;
    while out.len() < limit {
        let msg = match api.topo.mailbox.direct_get_next_for_subject(subject.as_str(), Some(next)).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(Reject::new(ErrorCode::Unavailable, format!("mailbox unavailable: {e}"))),
        };
        next = msg.sequence + 1;
        let Ok(item) = proto::wire::decode::<MailboxItem>(&msg.payload) else {
            tracing::error!(seq = msg.sequence, "undecodable mailbox item skipped");
            continue;
        };
        let notice = item.kind == proto::wire::EntryKind::Notice;
        out.push(ItemJson {
            seq: msg.sequence,
            group: item.group.map(|g| g.to_string()),
            position: item.position,
            epoch: item.epoch,
            kind: item.kind.as_str(),
            own: item.own,
            message: if notice { String::new() } else { B64.encode(&item.message) },
            notice: if notice { serde_json::from_slice(&item.message).ok() } else { None },
        });
    }
    Ok(out)
}

pub async fn fetch(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
    Query(q): Query<FetchQuery>,
) -> Result<Response, Reject> {
    own_mailbox(&device, &path)?;
    let limit = q.limit.unwrap_or(api.cfg.limits.max_fetch).clamp(1, api.cfg.limits.max_fetch);
    let items = read(&api, &device, q.after, limit).await?;
    let next = items.last().map(|i| i.seq).unwrap_or(q.after);
    Ok(json(serde_json::json!({ "items": items, "next": next })).into_response())
}

#[derive(Deserialize)]
pub struct AckRequest {
    up_to: u64,
}

async fn purge(api: &Shared, device: &DeviceId, up_to: u64) -> Result<(), Reject> {
    api.topo
        .mailbox
        .purge()
        .filter(names::mailbox_subject(device))
        .sequence(up_to.saturating_add(1))
        .await
        .map(|_| ())
        .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("cannot ack: {e}")))
}

pub async fn ack(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
    body: Body,
) -> Result<Response, Reject> {
    own_mailbox(&device, &path)?;
    let body = read_body(&api, body).await?;
    let req: AckRequest =
        serde_json::from_slice(&body).map_err(|e| Reject::new(ErrorCode::InvalidRequest, format!("bad ack: {e}")))?;
    purge(&api, &device, req.up_to).await?;
    Ok(json(serde_json::json!({ "acked": req.up_to })).into_response())
}

pub async fn websocket(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
    Query(q): Query<FetchQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, Reject> {
    own_mailbox(&device, &path)?;
    next_seq(q.after)?;
    // Bounded: each socket holds a subscription and a task.
    let permit = api
        .websockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| Reject::new(ErrorCode::Unavailable, "too many push connections; retry later or fetch"))?;
    Ok(ws.on_upgrade(move |socket| async move {
        push(api, device, q.after, socket).await;
        drop(permit);
    }))
}

#[derive(Deserialize)]
struct ClientFrame {
    ack: u64,
}

/// Pushes every item after `cursor`, then each new one as it arrives. A
/// publish on the mailbox subject is only a wake-up: items are always read
/// from the stream, so nothing is skipped or sent twice on one socket.
async fn push(api: Shared, device: DeviceId, mut cursor: u64, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let wake = api.topo.js.client().subscribe(names::mailbox_subject(&device)).await;
    let Ok(mut wake) = wake else { return };
    let limit = api.cfg.limits.max_fetch;
    let mut checked = tokio::time::Instant::now();
    loop {
        // A device removed while connected loses its socket within seconds:
        // revocation outlives every credential, an open socket included.
        if checked.elapsed() >= Duration::from_secs(5) {
            checked = tokio::time::Instant::now();
            if api.keydir.is_revoked(&device).await.unwrap_or(false) {
                let _ = tx.send(Message::Close(None)).await;
                return;
            }
        }
        match read(&api, &device, cursor, limit).await {
            Ok(items) => {
                let full = items.len() == limit;
                for item in items {
                    cursor = item.seq;
                    let Ok(text) = serde_json::to_string(&item) else {
                        continue;
                    };
                    if tx.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
        tokio::select! {
            _ = api.shutdown.cancelled() => { let _ = tx.send(Message::Close(None)).await; return; }
            _ = wake.next() => {}
            // A periodic re-read covers a wake-up lost while reconnecting to NATS.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(f) = serde_json::from_str::<ClientFrame>(&t) {
                        let _ = purge(&api, &device, f.ack).await;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_))) => {}
                _ => return,
            },
        }
    }
}
