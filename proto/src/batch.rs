//! Atomic batch publish (NATS ADR-50, nats-server 2.12+): up to
//! [`MAX_MESSAGES`] messages to one stream, stored all together or not at
//! all, for one round trip instead of one per message. The stream must
//! allow it (`allow_atomic`).
//!
//! async-nats has the header names but no helper; the protocol is small:
//! every message carries `Nats-Batch-Id` and its `Nats-Batch-Sequence` from
//! 1, the first is sent with a reply subject (the server answers it at once,
//! with an error if the batch cannot start; we do not wait for that: a batch
//! that did not start fails at its commit too), the middle ones are plain
//! publishes, and the last, marked `Nats-Batch-Commit: 1`, is a request
//! answered with the whole batch's acknowledgement. A compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence`) is allowed on the first message:
//! the batch is then stored only after that exact entry.

use std::time::Duration;

use async_nats::header::{NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

/// The server's limit on one batch.
pub const MAX_MESSAGES: usize = 1000;
/// How long the server may take to answer the first or the last message.
const TIMEOUT: Duration = Duration::from_secs(10);
/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

#[derive(Debug, thiserror::Error)]
pub enum PublishAtomicError {
    #[error("cannot reach the stream: {0}")]
    Transport(String),
    #[error("the stream did not answer within {0:?}")]
    Timeout(Duration),
    /// The compare-and-set failed: another writer appended first.
    #[error("the subject's last entry is no longer the one expected")]
    WrongLastSequence,
    #[error("the stream refused the batch: {err_code} {description}")]
    Refused { err_code: u64, description: String },
    #[error("the stream's acknowledgement does not match the batch: {0}")]
    InvalidAck(String),
    #[error("a batch holds 1 to {MAX_MESSAGES} messages, not {0}")]
    Size(usize),
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    batch: String,
    #[serde(default)]
    count: u64,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Publishes `messages` (payload and headers) to `subject` as one atomic
/// batch, stored only if the subject's last entry is at stream sequence
/// `expected` (0: the subject is empty); returns the last one's sequence.
pub async fn publish_atomic(
    client: &async_nats::Client,
    subject: &str,
    expected: u64,
    messages: Vec<(Bytes, HeaderMap)>,
) -> Result<u64, PublishAtomicError> {
    let messages = messages.into_iter().map(|(payload, headers)| (subject.to_owned(), payload, headers)).collect();
    publish_batch(client, Some(expected), messages).await
}

/// Publishes `messages` (subject, payload and headers; every subject in one
/// stream) as one atomic batch, with a compare-and-set on the first one's
/// subject when `expected` is given; returns the last one's sequence.
pub async fn publish_batch(
    client: &async_nats::Client,
    expected: Option<u64>,
    messages: Vec<(String, Bytes, HeaderMap)>,
) -> Result<u64, PublishAtomicError> {
    let n = messages.len();
    if n == 0 || n > MAX_MESSAGES {
        return Err(PublishAtomicError::Size(n));
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    for (i, (subject, payload, mut headers)) in messages.into_iter().enumerate() {
        let seq = i + 1;
        headers.insert(NATS_BATCH_ID, id.as_str());
        headers.insert(NATS_BATCH_SEQUENCE, seq.to_string().as_str());
        if let Some(expected) = expected.filter(|_| seq == 1) {
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        }
        if seq == n {
            headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
        }
        if seq == n {
            let reply = request(client, &subject, headers, payload).await?;
            if reply.batch != id || reply.count != n as u64 {
                return Err(PublishAtomicError::InvalidAck(format!(
                    "batch {:?} of {} for {id:?} of {n}",
                    reply.batch, reply.count
                )));
            }
            return Ok(reply.seq);
        } else if seq == 1 {
            // The batch starts with a request, but its answer is not
            // awaited: the server checks everything at the commit, and a
            // batch that did not start makes the commit fail too. One round
            // trip per batch, not two.
            client
                .publish_with_reply_and_headers(subject, client.new_inbox(), headers, payload)
                .await
                .map_err(|e| PublishAtomicError::Transport(e.to_string()))?;
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| PublishAtomicError::Transport(e.to_string()))?;
        }
    }
    Err(PublishAtomicError::Size(n))
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<Reply, PublishAtomicError> {
    let answer = tokio::time::timeout(TIMEOUT, client.request_with_headers(subject.to_owned(), headers, payload))
        .await
        .map_err(|_| PublishAtomicError::Timeout(TIMEOUT))?
        .map_err(|e| PublishAtomicError::Transport(e.to_string()))?;
    if answer.payload.is_empty() {
        // The first message of a batch that can go on.
        return Ok(Reply { error: None, seq: 0, batch: String::new(), count: 0 });
    }
    let reply: Reply = serde_json::from_slice(&answer.payload)
        .map_err(|e| PublishAtomicError::InvalidAck(format!("undecodable answer: {e}")))?;
    match reply.error {
        Some(e) if e.err_code == WRONG_LAST_SEQUENCE => Err(PublishAtomicError::WrongLastSequence),
        Some(e) => Err(PublishAtomicError::Refused { err_code: e.err_code, description: e.description }),
        None => Ok(reply),
    }
}
