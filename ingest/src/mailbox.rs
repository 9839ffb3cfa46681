//! Mailbox reads: cursor-based fetch and ack (which purges). The mailbox
//! holds only what is addressed to one device (Welcomes, notices); group
//! traffic is read from the groups themselves (`groups`). A device may read
//! only its own mailbox. Items are read with direct gets (no consumer per
//! device: JetStream holds thousands of consumers, not millions).

use async_nats::jetstream::stream::DirectGetErrorKind;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proto::wire::MailboxItem;
use proto::{names, DeviceId, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::{json, read_body, AuthDevice, Reject, Shared};

#[derive(Serialize)]
pub struct ItemJson {
    /// Always "mailbox" (WebSocket frames carry group entries too).
    #[serde(rename = "type")]
    pub frame: &'static str,
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
    /// For `kind: "welcome"`: the group cursor of the Commit that added the
    /// device; read the group's entries after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_seq: Option<u64>,
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

pub(crate) fn own_mailbox(auth: &DeviceId, path: &str) -> Result<(), Reject> {
    let asked = DeviceId::parse(path).map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))?;
    if &asked != auth {
        return Err(Reject::new(ErrorCode::ForbiddenDevice, "a device may read only its own mailbox"));
    }
    Ok(())
}

/// The sequence after cursor `after`. JetStream sequences are far below
/// 2^63; a larger cursor is a client bug (or a probe), refused rather than
/// wrapped around to the start of the mailbox.
pub(crate) fn next_seq(after: u64) -> Result<u64, Reject> {
    if after >= 1 << 63 {
        return Err(Reject::new(ErrorCode::InvalidCursor, format!("cursor {after} is out of range")));
    }
    Ok(after + 1)
}

/// Reads up to `limit` items after cursor `after`; with `true` when the
/// page ended early, before a Welcome that is not readable yet (to be read
/// again soon, not at the next wake-up).
pub(crate) async fn read(
    api: &Shared,
    device: &DeviceId,
    after: u64,
    limit: usize,
) -> Result<(Vec<ItemJson>, bool), Reject> {
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
        let mut item = match proto::wire::decode::<MailboxItem>(&msg.payload) {
            Ok(item) => item,
            // Written by a newer build (a rolling upgrade): this one cannot
            // serve it, and must not let an ack pass it; an ingest of the
            // newer build can. The page ends before it, like before a
            // Welcome not readable yet.
            Err(e @ proto::wire::DecodeError::Version(_)) => {
                tracing::warn!(seq = msg.sequence, error = %e, "mailbox item of a newer format; the page ends before it");
                return ended_before(
                    out,
                    "a mailbox item is of a newer format than this operator process reads; retry later",
                );
            }
            // Never readable by any build: skipped, loudly.
            Err(e) => {
                tracing::error!(seq = msg.sequence, error = %e, "undecodable mailbox item skipped");
                continue;
            }
        };
        if item.kind == proto::wire::EntryKind::Welcome && item.message.is_empty() {
            match welcome(api, &item).await? {
                Some(message) => item.message = message,
                None => {
                    // Gone at the end of its life (it is stored before its
                    // items, so it can expire first, by the duplicate
                    // window at most): skipped, loudly. Any sooner it is
                    // not readable yet (a replica behind the one that
                    // answered for the item), and this page ends before it,
                    // so no ack can pass it.
                    let age = crate::now_unix().saturating_sub(msg.time.unix_timestamp().max(0) as u64);
                    let streams = &api.cfg.streams;
                    if age >= streams.mailbox_max_age_secs.saturating_sub(streams.duplicate_window_secs) {
                        tracing::error!(seq = msg.sequence, "mailbox item names a Welcome that expired; skipped");
                        continue;
                    }
                    return ended_before(out, "a Welcome in the mailbox is not readable yet");
                }
            }
        }
        let notice = item.kind == proto::wire::EntryKind::Notice;
        out.push(ItemJson {
            frame: "mailbox",
            seq: msg.sequence,
            group: item.group.map(|g| g.to_string()),
            position: item.position,
            epoch: item.epoch,
            kind: item.kind.as_str(),
            own: item.own,
            message: if notice { String::new() } else { B64.encode(&item.message) },
            group_seq: (item.kind == proto::wire::EntryKind::Welcome).then_some(item.log_seq),
            notice: if notice { serde_json::from_slice(&item.message).ok() } else { None },
        });
    }
    Ok((out, false))
}

/// The page `out` ends before an item this process cannot hand out now, so
/// no ack can pass it: `unavailable` (`why`) when it would be empty.
fn ended_before(out: Vec<ItemJson>, why: &str) -> Result<(Vec<ItemJson>, bool), Reject> {
    if out.is_empty() {
        return Err(Reject::new(ErrorCode::Unavailable, why));
    }
    Ok((out, true))
}

/// The Welcome a device's item points to, stored once for every device
/// its Commit adds; `None` if it is not there (or not readable by this
/// build). Both expire after the mailbox's max age; the Welcome is stored
/// first, and a redelivered fan-out stores it again unless its first copy
/// is within the duplicate window, so it can expire before its items by
/// that window at most.
async fn welcome(api: &Shared, item: &MailboxItem) -> Result<Option<Vec<u8>>, Reject> {
    let Some(group) = &item.group else { return Ok(None) };
    let subject = names::welcome_subject(group, item.position);
    let stored = match api.topo.mailbox.direct_get_last_for_subject(subject.as_str()).await {
        Ok(m) => m,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Reject::new(ErrorCode::Unavailable, format!("mailbox unavailable: {e}"))),
    };
    Ok(proto::wire::decode::<MailboxItem>(&stored.payload).ok().map(|w| w.message).filter(|m| !m.is_empty()))
}

pub async fn fetch(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
    Query(q): Query<FetchQuery>,
) -> Result<Response, Reject> {
    own_mailbox(&device, &path)?;
    let limit = q.limit.unwrap_or(api.cfg.limits.max_fetch).clamp(1, api.cfg.limits.max_fetch);
    let (items, _) = read(&api, &device, q.after, limit).await?;
    let next = items.last().map(|i| i.seq).unwrap_or(q.after);
    Ok(json(serde_json::json!({ "items": items, "next": next })).into_response())
}

#[derive(Deserialize)]
pub struct AckRequest {
    up_to: u64,
}

pub(crate) async fn purge(api: &Shared, device: &DeviceId, up_to: u64) -> Result<(), Reject> {
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
