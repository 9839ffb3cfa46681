//! Batched direct gets (NATS ADR-31, nats-server 2.11+): many stored
//! messages of one stream in one request, answered by any replica without a
//! consumer. Devices read their groups' LOG entries this way, and learn which
//! of their groups advanced with one `multi_last` request.
//!
//! The requests follow the `jetstream-extra` crate (synadia-io/orbit.rs),
//! whose extension traits target an older async-nats than ours: a JSON body
//! on `$JS.API.DIRECT.GET.<stream>`, answered by one message per stored
//! message on the reply inbox and an empty end-of-batch message.

use std::time::Duration;

use async_nats::header::{NATS_SEQUENCE, NATS_SUBJECT};
use async_nats::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

/// The server's own limits on one request.
pub const MAX_BATCH: usize = 1000;
pub const MAX_SUBJECTS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DirectGetError {
    #[error("cannot reach the stream: {0}")]
    Transport(String),
    #[error("the stream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the stream refused the request: status {status} {description}")]
    Refused { status: u16, description: String },
    #[error("a stored message came without its {0} header")]
    MissingHeader(&'static str),
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub seq: u64,
    pub payload: Bytes,
}

#[derive(Serialize)]
struct BatchRequest<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bytes: Option<usize>,
}

#[derive(Serialize)]
struct MultiLastRequest<'a> {
    multi_last: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    up_to_seq: Option<u64>,
}

/// Up to `batch` (at most [`MAX_BATCH`]) messages on `subject` with sequence
/// `>= from`, in stream order, and at most about `max_bytes` of payload.
pub async fn batch(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
    batch: usize,
    max_bytes: Option<usize>,
    timeout: Duration,
) -> Result<Vec<Stored>, DirectGetError> {
    let body = BatchRequest { seq: from.max(1), next_by_subj: subject, batch: batch.clamp(1, MAX_BATCH), max_bytes };
    request(client, stream, serde_json::to_vec(&body).unwrap_or_default(), timeout).await
}

/// Whether `page`, read with [`batch`] for up to `batch` messages and
/// `max_bytes`, is the last of its subject: short, and not cut by the byte
/// cap (nats-server ends a page once the bytes it sent reach the cap, so a
/// cut page holds at least half of it).
pub fn is_last_page(page: &[Stored], batch: usize, max_bytes: usize) -> bool {
    let bytes: usize = page.iter().map(|m| m.payload.len()).sum();
    page.len() < batch && bytes < max_bytes / 2
}

/// The last message of each subject that has one (at most [`MAX_SUBJECTS`]
/// subjects), as of stream sequence `up_to` when given: a consistent view of
/// many subjects in one request.
pub async fn multi_last(
    client: &async_nats::Client,
    stream: &str,
    subjects: &[String],
    up_to: Option<u64>,
    timeout: Duration,
) -> Result<Vec<Stored>, DirectGetError> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let body = MultiLastRequest { multi_last: &subjects[..subjects.len().min(MAX_SUBJECTS)], up_to_seq: up_to };
    request(client, stream, serde_json::to_vec(&body).unwrap_or_default(), timeout).await
}

/// How long one attempt waits before it is sent again: nats-server drops a
/// direct get it has no room to queue, silently, so a lost request must
/// cost a retry, not the caller's whole timeout.
const ATTEMPT: Duration = Duration::from_millis(750);

async fn request(
    client: &async_nats::Client,
    stream: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<Stored>, DirectGetError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let body = bytes::Bytes::from(body);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(DirectGetError::Timeout(timeout));
        }
        match attempt(client, stream, body.clone(), left.min(ATTEMPT)).await {
            Err(DirectGetError::Timeout(_)) => continue,
            other => return other,
        }
    }
}

async fn attempt(
    client: &async_nats::Client,
    stream: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Vec<Stored>, DirectGetError> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| DirectGetError::Transport(e.to_string()))?;
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body)
        .await
        .map_err(|e| DirectGetError::Transport(e.to_string()))?;
    let collect = async {
        let mut out = Vec::new();
        while let Some(msg) = replies.next().await {
            match msg.status {
                // Nothing matched: an empty answer, not an error.
                Some(StatusCode::NOT_FOUND) => return Ok(out),
                Some(s) if s != StatusCode::OK && s.as_u16() != 204 => {
                    return Err(DirectGetError::Refused {
                        status: s.as_u16(),
                        description: msg.description.unwrap_or_default(),
                    })
                }
                _ => {}
            }
            let Some(headers) = msg.headers.as_ref() else {
                return Ok(out);
            };
            // The end of the batch: status 204 "EOB", or (older servers)
            // an empty message without a stored message's headers.
            let seq = headers.get(NATS_SEQUENCE).and_then(|v| v.as_str().parse::<u64>().ok());
            let subject = headers.get(NATS_SUBJECT).map(|v| v.as_str().to_owned());
            match (seq, subject) {
                (Some(seq), Some(subject)) => out.push(Stored { subject, seq, payload: msg.payload }),
                (None, _) if msg.payload.is_empty() => return Ok(out),
                (None, _) => return Err(DirectGetError::MissingHeader("Nats-Sequence")),
                (Some(_), None) => return Err(DirectGetError::MissingHeader("Nats-Subject")),
            }
        }
        Err(DirectGetError::Transport("reply subscription closed".into()))
    };
    tokio::time::timeout(timeout, collect).await.map_err(|_| DirectGetError::Timeout(timeout))?
}
