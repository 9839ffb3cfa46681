//! Getting back into a group (RFC 9420 §12.4.3.2). A member that cannot
//! follow its group any more (its history expired, its operator was cut
//! off from the hub past the outbox retention, or it could not process a
//! Commit the hub accepted) reads the group's current GroupInfo here and
//! rejoins by external commit, replacing its own stale leaf. It may report
//! the Commit it could not process: the hub counts such reports.
//!
//! The hub keeps the GroupInfo its committer uploaded with the Commit that
//! started the current epoch, in the group's checkpoint. A follower asks
//! the hub for it through the federation bridge.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proto::checkpoint::PublishedGroupInfo;
use proto::federation::{Request, Response as FedResponse};
use proto::{ApiError, DeviceId, ErrorCode, GroupId};
use serde::{Deserialize, Serialize};

use crate::groups::{access, parse_group};
use crate::keys::ask_peer;
use crate::{json, read_body, AuthDevice, Reject, Shared};

#[derive(Debug, Serialize)]
struct GroupInfoJson {
    group: String,
    epoch: u64,
    /// The hub position of the Commit that started `epoch`.
    position: u64,
    /// The MLSMessage(GroupInfo), base64, with the ratchet_tree and
    /// external_pub extensions.
    group_info: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportJson {
    /// The hub position of the Commit the device could not process.
    position: u64,
}

/// `GET /v1/groups/{group}/group_info`: the group's current GroupInfo, for
/// a member device.
pub async fn group_info(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(group): Path<String>,
) -> Result<Response, Reject> {
    let group = parse_group(&group)?;
    member(&api, &device, &group).await?;
    let published = if group.hub() == api.cfg.domain {
        published(&api, &group).await?
    } else {
        let hub = hub_peer(&api, &group)?;
        match ask_peer(&api, &hub, Request::GroupInfo { requester: device, group: group.clone() }).await? {
            FedResponse::GroupInfo(p) => p,
            FedResponse::Error(e) => return Err(Reject(e)),
            _ => return Err(Reject::new(ErrorCode::Internal, "unexpected answer from the hub")),
        }
    };
    Ok(json(GroupInfoJson {
        group: group.to_string(),
        epoch: published.epoch,
        position: published.position,
        group_info: B64.encode(&published.message),
    })
    .into_response())
}

/// `POST /v1/groups/{group}/reports`: the device could not process the
/// Commit at `position`. Counted at the hub; the answer says it was.
pub async fn report(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    Path(group): Path<String>,
    body: axum::body::Body,
) -> Result<Response, Reject> {
    let group = parse_group(&group)?;
    let body = read_body(&api, body).await?;
    let report: ReportJson = serde_json::from_slice(&body)
        .map_err(|e| Reject::new(ErrorCode::InvalidRequest, format!("expected {{\"position\": <u64>}}: {e}")))?;
    if report.position == 0 {
        return Err(Reject::new(ErrorCode::InvalidRequest, "position 0 is no Commit"));
    }
    member(&api, &device, &group).await?;
    if group.hub() == api.cfg.domain {
        count_report(&api, &device, &group, report.position, "local");
    } else {
        let hub = hub_peer(&api, &group)?;
        let req = Request::CommitReport { requester: device, group: group.clone(), position: report.position };
        match ask_peer(&api, &hub, req).await? {
            FedResponse::Reported => {}
            FedResponse::Error(e) => return Err(Reject(e)),
            _ => return Err(Reject::new(ErrorCode::Internal, "unexpected answer from the hub")),
        }
    }
    Ok((axum::http::StatusCode::ACCEPTED, json(serde_json::json!({ "reported": true }))).into_response())
}

/// A peer's request for the GroupInfo of a group we host.
pub(crate) async fn answer_group_info(api: &Shared, requester: &DeviceId, group: &GroupId) -> FedResponse {
    let answer = async {
        hosted(api, group)?;
        member(api, requester, group).await?;
        published(api, group).await
    };
    match answer.await {
        Ok(p) => FedResponse::GroupInfo(p),
        Err(e) => FedResponse::Error(e.0),
    }
}

/// A peer's report of a Commit one of its devices could not process.
pub(crate) async fn answer_report(
    api: &Shared,
    requester: &DeviceId,
    group: &GroupId,
    position: u64,
    via: &str,
) -> FedResponse {
    let checked = async {
        hosted(api, group)?;
        member(api, requester, group).await
    };
    match checked.await {
        Ok(()) => {
            count_report(api, requester, group, position, via);
            FedResponse::Reported
        }
        Err(e) => FedResponse::Error(e.0),
    }
}

fn count_report(api: &Shared, device: &DeviceId, group: &GroupId, position: u64, via: &str) {
    api.metrics.commit_reports.with_label_values(&[via]).inc();
    // Identifiers only at debug (ARCHITECTURE.md, invariants).
    tracing::warn!(position, via, "a member could not process an accepted Commit");
    tracing::debug!(%group, position, reporter = %device, "commit report");
}

fn hosted(api: &Shared, group: &GroupId) -> Result<(), Reject> {
    if group.hub() != api.cfg.domain {
        return Err(Reject::new(ErrorCode::NotHub, "this operator does not host the group"));
    }
    Ok(())
}

fn hub_peer(api: &Shared, group: &GroupId) -> Result<String, Reject> {
    if api.cfg.peer(group.hub()).is_none() {
        return Err(Reject::new(ErrorCode::NotHub, "the group's hub is not a peer of this operator"));
    }
    Ok(group.hub().to_owned())
}

/// Only a current member (in the roster of the operator asked, and not
/// removed) may read the GroupInfo or report on the group.
async fn member(api: &Shared, device: &DeviceId, group: &GroupId) -> Result<(), Reject> {
    let access = access(api, device, group).await?;
    if access.pending {
        return Err(Reject::new(ErrorCode::Unavailable, "the group's roster is not written yet; retry"));
    }
    if access.span.until.is_some() {
        return Err(Reject::new(ErrorCode::NotAMember, "this device was removed from the group"));
    }
    Ok(())
}

async fn published(api: &Shared, group: &GroupId) -> Result<PublishedGroupInfo, Reject> {
    let snapshot = api
        .checkpoints
        .snapshot(group)
        .await
        .map_err(|e| Reject::new(ErrorCode::Unavailable, format!("the group's state is unavailable: {e}")))?;
    snapshot.and_then(|s| s.group_info).ok_or_else(|| {
        Reject(ApiError::new(
            ErrorCode::GroupInfoUnavailable,
            "the Commit that started the group's epoch carried no GroupInfo; any member's next Commit will",
        ))
    })
}
