//! Group creation and message submission.

use async_nats::jetstream::message::PublishMessage;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use proto::wire::{Submission, SubmissionKind, Verdict};
use proto::{names, ApiError, ErrorCode, GroupId};
use serde::Serialize;

use crate::{json, read_body, AuthDevice, Reject, Shared};

#[derive(Serialize)]
pub(crate) struct AcceptedJson {
    pub group: String,
    pub position: u64,
    pub epoch: u64,
}

pub async fn create_group(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    body: Body,
) -> Result<Response, Reject> {
    let body = read_body(&api, body).await?;
    proto::mls::precheck(&body, &[proto::mls::wire_format::GROUP_INFO])?;
    let group = group_of_group_info(&body)?;
    if group.hub() != api.cfg.domain {
        return Err(Reject::new(ErrorCode::NotHub, "a group is created at the operator named in its id"));
    }
    let id = proto::wire::submission_id(&device, &[b"create", &body]);
    let sub = Submission {
        id,
        device,
        group: group.clone(),
        kind: SubmissionKind::Create { group_info: body.to_vec() },
        origin: None,
    };
    let (position, epoch) = await_verdict(&api, sub).await?;
    Ok((StatusCode::CREATED, json(AcceptedJson { group: group.to_string(), position, epoch })).into_response())
}

fn group_of_group_info(bytes: &[u8]) -> Result<GroupId, Reject> {
    use openmls::prelude::tls_codec::Deserialize as _;
    use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn};
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| Reject::new(ErrorCode::MalformedMessage, format!("cannot decode GroupInfo: {e}")))?;
    match msg.extract() {
        MlsMessageBodyIn::GroupInfo(gi) => GroupId::from_mls(gi.group_id().as_slice())
            .map_err(|e| Reject::new(ErrorCode::InvalidIdentifier, format!("group_id is not a mimi room id: {e}"))),
        _ => Err(Reject::new(ErrorCode::WrongWireFormat, "expected a GroupInfo")),
    }
}

pub async fn submit_message(
    State(api): State<Shared>,
    AuthDevice(device): AuthDevice,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Reject> {
    let body = read_body(&api, body).await?;
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 128 => Some(k),
        Some(_) => return Err(Reject::new(ErrorCode::InvalidRequest, "Idempotency-Key must be 1..=128 bytes")),
    };
    Ok(json(submit(&api, device, &body, key).await?).into_response())
}

/// Submits one message bundle (`POST /v1/messages`, or a binary frame on
/// the device's WebSocket) and waits for its verdict.
pub(crate) async fn submit(
    api: &Shared,
    device: proto::DeviceId,
    body: &[u8],
    key: Option<&str>,
) -> Result<AcceptedJson, Reject> {
    let bundle = proto::mls::parse_bundle(body)?;
    let group = bundle.header.group.clone();
    // A group hosted elsewhere: the submission goes to its hub through our
    // outbox (only the bridge talks to other operators).
    if group.hub() != api.cfg.domain && api.cfg.peer(group.hub()).is_none() {
        return Err(Reject::new(ErrorCode::NotHub, "the group's hub is not a peer of this operator"));
    }
    // A client idempotency key makes a retry of a re-encrypted message (new
    // bytes, same intent) dedupe too; by default the bytes are the key.
    let id = match key {
        Some(k) => proto::wire::submission_id(&device, &[b"key", k.as_bytes()]),
        None => proto::wire::submission_id(&device, &[b"msg", body]),
    };
    let welcome_refs = match &bundle.welcome {
        Some(w) => proto::mls::welcome_recipients(w)?,
        None => Vec::new(),
    };
    let sub = Submission {
        id,
        device,
        group: group.clone(),
        kind: SubmissionKind::Message {
            message: bundle.message,
            welcome: bundle.welcome,
            group_info: bundle.group_info,
        },
        origin: None,
    };
    let (position, epoch) = await_verdict(api, sub).await?;
    // The accepted Welcome used these KeyPackages: settle their reservations
    // (best effort; an unsettled one would only return to its pool later).
    if let Err(e) = api.keydir.consumed(&welcome_refs).await {
        tracing::warn!(error = %e, "cannot settle KeyPackage reservations");
    }
    Ok(AcceptedJson { group: group.to_string(), position, epoch })
}

/// Queues a submission and waits for the sequencer's verdict: the first
/// span of the message's trace, whose context travels with it.
async fn await_verdict(api: &Shared, sub: Submission) -> Result<(u64, u64), Reject> {
    use proto::trace;
    let mut span = trace::Span::root("ingest.submit");
    trace::set(&mut span, "mlsfed.group", &sub.group);
    let decided = queue_and_wait(api, sub, trace::context(&span)).await;
    match &decided {
        Ok((position, _)) => trace::set(&mut span, "mlsfed.position", position),
        Err(e) => trace::set(&mut span, "mlsfed.refused", e.0.code.as_str()),
    }
    trace::end(span);
    decided
}

async fn queue_and_wait(
    api: &Shared,
    sub: Submission,
    trace: Option<proto::trace::Context>,
) -> Result<(u64, u64), Reject> {
    let client = api.topo.js.client();
    let unavailable = |e: String| Reject::new(ErrorCode::Unavailable, format!("queue unavailable: {e}"));
    // Wait before publishing so the verdict cannot be missed.
    let mut verdict = api.verdicts.wait(&client, &sub.id).await.map_err(|e| unavailable(e.to_string()))?;
    let (subject, payload, msg_id) = if sub.group.hub() == api.cfg.domain {
        (names::submit_subject(&sub.group), proto::wire::encode(&sub), sub.id.clone())
    } else {
        // Recorded before the submission can reach the hub, so its verdict
        // always finds the record: only that hub may answer it.
        let hub = Bytes::from(sub.group.hub().to_owned());
        if let Err(e) = api.topo.forwarded.put(&sub.id, hub).await {
            return Err(unavailable(e.to_string()));
        }
        let id = names::fed_msg_id("submit", &[sub.id.as_bytes()]);
        let record = proto::federation::Payload::Submit(sub.clone());
        (names::fed_out_subject(sub.group.hub()), proto::wire::encode(&record), id)
    };
    let mut publish = PublishMessage::build().payload(Bytes::from(payload)).message_id(msg_id);
    if let Some(t) = trace {
        publish = publish.header(proto::trace::HEADER, t.to_header().as_str());
    }
    let ack = api
        .topo
        .js
        .send_publish(subject, publish)
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let timeout = api.cfg.limits.submit_timeout();
    let got = tokio::time::timeout(timeout, async {
        if !ack.duplicate {
            return verdict.recv().await.map(|payload| Verdict::from_bytes(&payload));
        }
        // A resend. The sequencer records a verdict and announces it at
        // the same time, so the first send's verdict may have been
        // announced before we listened and recorded just after a look:
        // look again now and then while listening.
        let mut look = tokio::time::interval(RESEND_LOOK);
        loop {
            tokio::select! {
                v = verdict.recv() => return v.map(|payload| Verdict::from_bytes(&payload)),
                _ = look.tick() => if let Some(v) = recorded(api, &sub.id).await {
                    return Some(Ok(v));
                },
            }
        }
    })
    .await;
    drop(verdict);
    match got {
        Ok(Some(Ok(v))) => settle(v),
        Ok(Some(Err(_))) => Err(Reject::new(ErrorCode::Internal, "undecodable verdict")),
        _ => match recorded(api, &sub.id).await {
            Some(v) => settle(v),
            None => Err(Reject(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "submission is queued but no verdict arrived within {:?}; resend the same request to learn it",
                    timeout
                ),
            ))),
        },
    }
}

/// How often a resend looks for the recorded verdict while it listens.
const RESEND_LOOK: std::time::Duration = std::time::Duration::from_millis(100);

async fn recorded(api: &Shared, id: &str) -> Option<Verdict> {
    let bytes = api.topo.verdicts.get(id).await.ok()??;
    Verdict::from_bytes(&bytes).ok()
}

fn settle(v: Verdict) -> Result<(u64, u64), Reject> {
    match v {
        Verdict::Accepted { position, epoch } => Ok((position, epoch)),
        Verdict::Rejected(e) => Err(Reject(e)),
    }
}
