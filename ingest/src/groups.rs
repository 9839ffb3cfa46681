//! Reading groups: a device reads each of its groups' entries straight from
//! the group's LOG subject by cursor (batched direct gets), so a message is
//! stored once however many members read it. The group's roster (kept by
//! fanout) says which entries a device may read: those after it joined, up
//! to the Commit that removed it.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proto::roster::{DeviceGroups, Roster, Span};
use proto::wire::LogEntry;
use proto::{names, DeviceId, ErrorCode, GroupId};
use serde::{Deserialize, Serialize};

use crate::{json, AuthDevice, Reject, Shared};

/// How long one batched read of LOG may take before the request fails with
/// a retryable `unavailable`.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One group entry as a device sees it.
#[derive(Debug, Clone, Serialize)]
pub struct EntryJson {
    /// Always "entry" (WebSocket frames carry mailbox items too).
    #[serde(rename = "type")]
    pub frame: &'static str,
    pub group: String,
    /// This operator's cursor for the group: read on with `after=<seq>`.
    pub seq: u64,
    /// The hub's position: gapless per group, the order every member applies.
    pub position: u64,
    /// The position of the entry before it that this operator holds.
    pub prev_position: u64,
    pub epoch: u64,
    pub kind: &'static str,
    /// True when the reading device submitted it.
    pub own: bool,
    /// The MLSMessage, base64 (for `created`: the group's first GroupInfo).
    pub message: String,
}

/// What one read found.
pub struct Page {
    pub entries: Vec<EntryJson>,
    /// The cursor to read on from: the last entry examined, returned or not.
    pub next: u64,
    /// Stopped at a membership change the roster has not applied yet (or at
    /// the device's removal): read again once it has.
    pub held: bool,
}

/// Who may read what of one group, as of one roster read.
#[derive(Debug, Clone)]
pub struct Access {
    pub group: GroupId,
    pub subject: String,
    pub span: Span,
    /// The epoch after the roster's last applied Commit: a later epoch's
    /// entries wait until the roster has applied the Commit before them.
    pub roster_epoch: u64,
    /// The group has entries but no roster yet (fanout has not applied its
    /// creation): nothing is readable yet, and nothing is refused.
    pub pending: bool,
}

pub fn parse_group(s: &str) -> Result<GroupId, Reject> {
    GroupId::parse(s).map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, e.to_string()))
}

/// Reads the group's roster and the device's place in it.
pub async fn access(api: &Shared, device: &DeviceId, group: &GroupId) -> Result<Access, Reject> {
    let subject = names::log_subject(group, api.cfg.streams.partitions);
    let stored = api
        .topo
        .rosters
        .get(names::group_key(group))
        .await
        .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("roster unavailable: {e}")))?;
    let Some(stored) = stored else {
        if last_position(api, &subject).await?.is_none() {
            return Err(Reject::new(ErrorCode::UnknownGroup, "no such group at this operator"));
        }
        let span = Span { after: u64::MAX, until: None };
        return Ok(Access { group: group.clone(), subject, span, roster_epoch: 0, pending: true });
    };
    let roster: Roster = serde_json::from_slice(&stored)
        .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("roster unreadable: {e}")))?;
    let span = roster
        .span(device)
        .ok_or_else(|| Reject::new(ErrorCode::NotAMember, "this device is not a member of the group"))?;
    Ok(Access { group: group.clone(), subject, span, roster_epoch: roster.epoch, pending: false })
}

fn unavailable(e: proto::direct::DirectGetError) -> Reject {
    Reject::new(ErrorCode::Unavailable, format!("group log unavailable: {e}"))
}

/// What a device may do with one entry of its group: the one rule for reads
/// and pushes, checked in this order.
pub enum Admit {
    /// Before the device joined: not for it, read past it.
    Before,
    /// After the Commit that removed it: nothing more for it.
    Removed,
    /// Its predecessor here is past what the device applied (`applied`):
    /// the entries in between are gone.
    Hole,
    /// Sent in an epoch whose Commit the roster has not applied yet: who
    /// may read it is not known yet (a device that Commit removed must not
    /// read the next epoch).
    Unapplied,
    Take,
}

pub fn admit(access: &Access, entry: &LogEntry, applied: Option<u64>) -> Admit {
    let span = access.span;
    if !span.admits(entry.position) {
        return if span.until.is_some_and(|u| entry.position > u) { Admit::Removed } else { Admit::Before };
    }
    if applied.is_some_and(|p| entry.prev_position > p.max(span.after)) {
        return Admit::Hole;
    }
    if entry.epoch > access.roster_epoch {
        return Admit::Unapplied;
    }
    Admit::Take
}

/// Reads up to `limit` entries after cursor `after` that the device may read.
/// With `position` (the last position the device applied), a gap before the
/// first entry means retention deleted what it still needed: `history_expired`.
pub async fn read(
    api: &Shared,
    device: &DeviceId,
    access: &Access,
    after: u64,
    position: Option<u64>,
    limit: usize,
) -> Result<Page, Reject> {
    let mut page = Page { entries: Vec::new(), next: after, held: access.pending };
    let mut checked_gap = position.is_none();
    let max_bytes = api.cfg.limits.max_body_bytes.max(1 << 20);
    while page.entries.len() < limit && !page.held {
        let want = (limit - page.entries.len()).min(proto::direct::MAX_BATCH);
        let from = crate::mailbox::next_seq(page.next)?;
        let client = api.topo.js.client();
        let stored = proto::direct::batch(
            &client,
            names::LOG_STREAM,
            &access.subject,
            from,
            want,
            Some(max_bytes),
            READ_TIMEOUT,
        )
        .await
        .map_err(unavailable)?;
        let last = proto::direct::is_last_page(&stored, want, max_bytes);
        for m in stored {
            let Ok(entry) = proto::wire::decode::<LogEntry>(&m.payload) else {
                // Never skipped: the next entry would look like a hole and
                // the device would be told its history expired. A record
                // this build cannot read (a newer format mid-upgrade) holds
                // the group here until a process that can read it serves.
                tracing::error!(seq = m.seq, "undecodable LOG entry; the group's readers wait");
                if page.entries.is_empty() {
                    return Err(Reject::new(
                        ErrorCode::Unavailable,
                        "this operator cannot read the group's next entry yet",
                    ));
                }
                page.held = true;
                break;
            };
            let verdict = admit(access, &entry, position.filter(|_| !checked_gap));
            if !matches!(verdict, Admit::Before | Admit::Removed) {
                checked_gap = true;
            }
            match verdict {
                Admit::Before => {
                    page.next = m.seq;
                    continue;
                }
                Admit::Removed | Admit::Unapplied => {
                    page.held = true;
                    break;
                }
                Admit::Hole => return Err(expired(position.unwrap_or_default(), entry.position)),
                Admit::Take => {}
            }
            page.next = m.seq;
            page.entries.push(entry_json(device, &entry, m.seq));
        }
        if last {
            break;
        }
    }
    if let (Some(p), false, false) = (position, checked_gap, access.pending) {
        // Nothing after the cursor, yet the group holds later entries the
        // device may read: either retention deleted what it still needed
        // (the first entry kept names a predecessor past `p`), or its cursor
        // ran ahead of what it applied.
        // Only an entry at or before the cursor counts: one appended since
        // the batch read is simply new.
        if let Some((seq, last)) = last_entry(api, &access.subject).await? {
            if seq <= page.next && access.span.admits(last) && last > p.max(access.span.after) {
                let first = first_admitted(api, access).await?;
                if first.is_none_or(|prev| prev > p.max(access.span.after)) {
                    return Err(expired(p, last));
                }
                return Err(Reject::new(
                    ErrorCode::InvalidCursor,
                    format!("the cursor is past entries after position {p}; read again from after=0"),
                ));
            }
        }
    }
    Ok(page)
}

fn expired(have: u64, next: u64) -> Reject {
    Reject::new(
        ErrorCode::HistoryExpired,
        format!(
            "entries after position {have} are no longer kept (the next one held is {next}); \
             rejoin the group by external commit"
        ),
    )
}

/// The `prev_position` of the first entry kept that the device may read.
async fn first_admitted(api: &Shared, access: &Access) -> Result<Option<u64>, Reject> {
    let client = api.topo.js.client();
    let mut from = 1;
    for _ in 0..64 {
        let batch = proto::direct::batch(&client, names::LOG_STREAM, &access.subject, from, 64, None, READ_TIMEOUT)
            .await
            .map_err(unavailable)?;
        let Some(last) = batch.last().map(|m| m.seq) else { return Ok(None) };
        for m in &batch {
            if let Ok(e) = proto::wire::decode::<LogEntry>(&m.payload) {
                if access.span.admits(e.position) {
                    return Ok(Some(e.prev_position));
                }
            }
        }
        from = last + 1;
    }
    Ok(None)
}

async fn last_position(api: &Shared, subject: &str) -> Result<Option<u64>, Reject> {
    Ok(last_entry(api, subject).await?.map(|(_, p)| p))
}

/// The sequence and position of the group's last entry here.
async fn last_entry(api: &Shared, subject: &str) -> Result<Option<(u64, u64)>, Reject> {
    match api.topo.log.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(proto::wire::decode::<LogEntry>(&m.payload).ok().map(|e| (m.sequence, e.position))),
        Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(Reject::new(ErrorCode::Unavailable, format!("group log unavailable: {e}"))),
    }
}

/// The entry as `device` sees it.
pub fn entry_json(device: &DeviceId, entry: &LogEntry, seq: u64) -> EntryJson {
    entry_json_as(entry, seq, entry.sender == *device, B64.encode(&entry.message))
}

/// The entry as its sender (`own`) or any other member sees it, with its
/// message already in base64.
pub fn entry_json_as(entry: &LogEntry, seq: u64, own: bool, message: String) -> EntryJson {
    EntryJson {
        frame: "entry",
        group: entry.group.to_string(),
        seq,
        position: entry.position,
        prev_position: entry.prev_position,
        epoch: entry.epoch,
        kind: entry.kind.as_str(),
        own,
        message,
    }
}

#[derive(Deserialize)]
pub struct EntriesQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    position: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/groups/{group}/entries?after=<seq>&position=<applied>&limit=<n>`
pub async fn entries(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(group): Path<String>,
    Query(q): Query<EntriesQuery>,
) -> Result<Response, Reject> {
    let group = parse_group(&group)?;
    crate::mailbox::next_seq(q.after)?;
    let access = access(&api, &device, &group).await?;
    let limit = q.limit.unwrap_or(api.cfg.limits.max_fetch).clamp(1, api.cfg.limits.max_fetch);
    let page = read(&api, &device, &access, q.after, q.position, limit).await?;
    api.metrics.entries_served.with_label_values(&["fetch"]).inc_by(page.entries.len() as u64);
    Ok(json(serde_json::json!({ "entries": page.entries, "next": page.next })).into_response())
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupHead {
    pub group: String,
    /// The cursor of the group's last entry here (0: none kept).
    pub seq: u64,
    /// That entry's position.
    pub position: u64,
    /// Set when the device was removed: the Commit that removed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<u64>,
}

/// The device's groups at this operator.
pub async fn device_groups(api: &Shared, device: &DeviceId) -> Result<DeviceGroups, Reject> {
    let stored = api
        .topo
        .device_groups
        .get(names::device_key(device))
        .await
        .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("group list unavailable: {e}")))?;
    match stored {
        Some(b) => serde_json::from_slice(&b)
            .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("group list unreadable: {e}"))),
        None => Ok(DeviceGroups::default()),
    }
}

/// The last entry of each of the device's groups, in one `multi_last`
/// request per 1024 groups: a returning device learns which advanced.
pub async fn heads(api: &Shared, device: &DeviceId) -> Result<Vec<GroupHead>, Reject> {
    let list = device_groups(api, device).await?;
    let parts = api.cfg.streams.partitions;
    let mut out = Vec::new();
    // Current groups first, then those the device was removed from: a
    // long list of old removals never pushes a live group past the cap.
    let (current, removed): (Vec<_>, Vec<_>) = list.groups.iter().partition(|(_, r)| r.is_none());
    let groups: Vec<(GroupId, Option<u64>)> = current
        .into_iter()
        .chain(removed)
        .filter_map(|(g, r)| GroupId::parse(g).ok().map(|g| (g, *r)))
        .take(api.cfg.limits.max_followed_groups)
        .collect();
    let client = api.topo.js.client();
    for chunk in groups.chunks(proto::direct::MAX_SUBJECTS) {
        let subjects: Vec<String> = chunk.iter().map(|(g, _)| names::log_subject(g, parts)).collect();
        let lasts = proto::direct::multi_last(&client, names::LOG_STREAM, &subjects, None, READ_TIMEOUT)
            .await
            .map_err(unavailable)?;
        let by_subject: std::collections::HashMap<&str, &proto::direct::Stored> =
            lasts.iter().map(|m| (m.subject.as_str(), m)).collect();
        for ((g, removed_at), subject) in chunk.iter().zip(&subjects) {
            let (seq, position) = match by_subject.get(subject.as_str()) {
                Some(m) => (m.seq, proto::wire::decode::<LogEntry>(&m.payload).map(|e| e.position).unwrap_or(0)),
                None => (0, 0),
            };
            out.push(GroupHead { group: g.to_string(), seq, position, removed_at: *removed_at });
        }
    }
    Ok(out)
}

/// `GET /v1/devices/{device}/groups`
pub async fn sync(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(path): Path<String>,
) -> Result<Response, Reject> {
    crate::mailbox::own_mailbox(&device, &path)?;
    let heads = heads(&api, &device).await?;
    Ok(json(serde_json::json!({ "groups": heads })).into_response())
}
