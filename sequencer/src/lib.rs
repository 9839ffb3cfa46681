//! The sequencer: takes submissions from SUBMIT, validates them against the
//! hub's public group state, and appends the accepted ones to the group's LOG.
//!
//! Ordering is enforced by the server that stores it: every append carries
//! `Nats-Expected-Last-Subject-Sequence`, so two sequencer processes can never
//! both append to the same position; the loser reloads and re-validates
//! (design decision 2). The in-memory group state is only a cache of LOG.
#![forbid(unsafe_code)]

mod metrics;
mod state;
mod validate;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, AckKind};
use bytes::Bytes;
use openmls_rust_crypto::RustCrypto;
use proto::federation::Payload;
use proto::streams::Topology;
use proto::wire::{EntryKind, LogEntry, Submission, SubmissionKind, Verdict};
use proto::{names, ApiError, ErrorCode, GroupId};
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
use state::GroupState;

/// How many times one submission is retried after losing a CAS race before
/// it is handed back to JetStream for redelivery.
const CAS_RETRIES: usize = 8;
/// Accepted entries between two snapshots of a group's state.
const SNAPSHOT_EVERY: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum RunSequencerError {
    #[error("cannot read submissions: {0}")]
    Consume(String),
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Infrastructure trouble (NATS unavailable, ...): leave the submission
    /// unacked so it is redelivered.
    #[error("transient: {0}")]
    Transient(String),
}

pub struct Sequencer {
    topo: Topology,
    domain: String,
    crypto: RustCrypto,
    cache: HashMap<GroupId, GroupState>,
    metrics: Metrics,
}

impl Sequencer {
    pub fn new(topo: Topology, domain: String, metrics: Metrics) -> Self {
        Self { topo, domain, crypto: RustCrypto::default(), cache: HashMap::new(), metrics }
    }

    /// Consumes SUBMIT until `shutdown` fires.
    pub async fn run(
        mut self,
        consumer: jetstream::consumer::PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<(), RunSequencerError> {
        let mut messages = consumer.messages().await.map_err(|e| RunSequencerError::Consume(e.to_string()))?;
        loop {
            let Some(msg) = proto::streams::next_message(&mut messages, &shutdown, "sequencer")
                .await
                .map_err(|e| RunSequencerError::Consume(e.to_string()))?
            else {
                return Ok(());
            };
            let sub: Submission = match proto::wire::decode(&msg.payload) {
                Ok(s) => s,
                Err(e) => {
                    // Only our ingest writes SUBMIT; an undecodable record is a
                    // bug or version skew and must not block the queue.
                    tracing::error!(error = %e, "undecodable submission; terminating it");
                    self.metrics.dead_letters.inc();
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            match self.handle(&sub).await {
                Ok(verdict) => {
                    self.publish_verdict(&sub, &verdict).await;
                    // A lost ack only means a redelivery, which `recent`
                    // answers with the same verdict.
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "ack of submission failed; it will be redelivered");
                    }
                }
                Err(StepError::Transient(e)) => {
                    tracing::warn!(error = %e, "submission deferred");
                    self.cache.remove(&sub.group);
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
                }
            }
        }
    }

    /// Records the verdict (for clients that retry) and announces it (for
    /// the waiting ingest), concurrently.
    async fn publish_verdict(&self, sub: &Submission, verdict: &Verdict) {
        let id = sub.id.as_str();
        let bytes = Bytes::from(verdict.to_bytes());
        let client = self.topo.js.client();
        let (recorded, announced) =
            tokio::join!(self.topo.verdicts.put(id, bytes.clone()), client.publish(names::verdict_subject(id), bytes),);
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "cannot record verdict");
        }
        if let Err(e) = announced {
            tracing::warn!(error = %e, "cannot announce verdict");
        }
        if let Some(peer) = &sub.origin {
            // A forwarded submission: the verdict goes back through our
            // outbox to the peer whose device sent it.
            let payload = Payload::Verdict { submission_id: sub.id.clone(), verdict: verdict.clone() };
            let publish = PublishMessage::build()
                .payload(Bytes::from(proto::wire::encode(&payload)))
                .message_id(names::fed_msg_id("verdict", &[sub.id.as_bytes()]));
            match self.topo.js.send_publish(names::fed_out_subject(peer), publish).await {
                Ok(ack) => {
                    if let Err(e) = ack.await {
                        tracing::warn!(error = %e, "verdict for a peer not queued");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "verdict for a peer not queued"),
            }
        }
    }

    async fn handle(&mut self, sub: &Submission) -> Result<Verdict, StepError> {
        let timer = self.metrics.step_seconds.start_timer();
        let verdict = self.decide(sub).await;
        timer.observe_duration();
        if let Ok(v) = &verdict {
            match v {
                Verdict::Accepted { .. } => self.metrics.accepted.inc(),
                Verdict::Rejected(e) => self.metrics.rejected.with_label_values(&[e.code.as_str()]).inc(),
            }
        }
        verdict
    }

    async fn decide(&mut self, sub: &Submission) -> Result<Verdict, StepError> {
        if sub.group.hub() != self.domain {
            return Ok(Verdict::Rejected(ApiError::new(
                ErrorCode::NotHub,
                format!("this operator is not the hub of groups on {}", sub.group.hub()),
            )));
        }
        let mut refresh = false;
        for _ in 0..CAS_RETRIES {
            match self.try_once(sub, refresh).await? {
                // A refusal may come from a cached state that another
                // sequencer process has moved past: decide again on a fresh
                // state before refusing. Acceptances need no such check,
                // since the append's compare-and-set proves freshness.
                Some(Verdict::Rejected(_)) if !refresh => refresh = true,
                Some(v) => return Ok(v),
                None => {
                    // Lost a CAS race: our cache is behind LOG.
                    self.metrics.cas_conflicts.inc();
                    refresh = true;
                }
            }
        }
        Err(StepError::Transient("too many CAS conflicts".into()))
    }

    /// One attempt; `Ok(None)` means the append lost a CAS race.
    async fn try_once(&mut self, sub: &Submission, refresh: bool) -> Result<Option<Verdict>, StepError> {
        match &sub.kind {
            SubmissionKind::Create { group_info } => {
                if self.load(&sub.group, refresh).await?.is_some() {
                    return Ok(Some(self.already(sub).unwrap_or_else(|| {
                        Verdict::Rejected(ApiError::new(ErrorCode::GroupExists, "the group already exists"))
                    })));
                }
                let mut state = match validate::bootstrap(&self.crypto, &sub.group, &sub.device, group_info) {
                    Ok(s) => s,
                    Err(e) => return Ok(Some(Verdict::Rejected(e))),
                };
                let entry = LogEntry {
                    group: sub.group.clone(),
                    position: 1,
                    prev_position: 0,
                    epoch: 0,
                    kind: EntryKind::Created,
                    sender: sub.device.clone(),
                    submission_id: sub.id.clone(),
                    message: group_info.clone(),
                    recipients: vec![],
                    welcome: None,
                    welcome_recipients: vec![],
                };
                let Some(seq) = self.append(&sub.group, 0, &entry).await? else {
                    return Ok(None);
                };
                state.record(&sub.id, 1, 0, seq, false);
                self.save(&state).await;
                self.cache.insert(sub.group.clone(), state);
                Ok(Some(Verdict::Accepted { position: 1, epoch: 0 }))
            }
            SubmissionKind::Message { message, welcome, group_info } => {
                let mut raw = message.clone();
                raw.extend_from_slice(welcome.as_deref().unwrap_or_default());
                raw.extend_from_slice(group_info.as_deref().unwrap_or_default());
                let bundle = match proto::mls::parse_bundle(&raw) {
                    Ok(b) => b,
                    Err(e) => return Ok(Some(Verdict::Rejected(e))),
                };
                if self.load(&sub.group, refresh).await?.is_none() {
                    return Ok(Some(Verdict::Rejected(ApiError::new(ErrorCode::UnknownGroup, "no such group"))));
                }
                if let Some(v) = self.already(sub) {
                    return Ok(Some(v));
                }
                let state = self.cache.get(&sub.group).ok_or_else(|| StepError::Transient("cache".into()))?;
                let plan = match validate::plan(state, &self.crypto, &sub.device, &bundle) {
                    Ok(p) => p,
                    Err(e) => return Ok(Some(Verdict::Rejected(e))),
                };
                let position = state.position + 1;
                let expected = state.last_subject_seq;
                let entry = LogEntry {
                    group: sub.group.clone(),
                    position,
                    prev_position: position - 1,
                    epoch: plan.epoch,
                    kind: plan.kind,
                    sender: sub.device.clone(),
                    submission_id: sub.id.clone(),
                    message: message.clone(),
                    recipients: plan.recipients,
                    welcome: plan.welcome,
                    welcome_recipients: plan.welcome_recipients,
                };
                let Some(seq) = self.append(&sub.group, expected, &entry).await? else {
                    return Ok(None);
                };
                let state = self.cache.get_mut(&sub.group).ok_or_else(|| StepError::Transient("cache".into()))?;
                let is_commit = entry.kind == EntryKind::Commit;
                if let Err(e) = validate::apply(state, plan.effect) {
                    // The entry is in LOG; a replay will rebuild the state.
                    tracing::error!(error = %e, "cannot apply accepted entry to cached state");
                    self.cache.remove(&sub.group);
                    return Ok(Some(Verdict::Accepted { position, epoch: entry.epoch }));
                }
                state.record(&sub.id, position, entry.epoch, seq, is_commit);
                tracing::debug!(position, seq, kind = entry.kind.as_str(), "appended");
                let snapshot = is_commit || position % SNAPSHOT_EVERY == 0;
                if snapshot {
                    let bytes = state.snapshot();
                    self.save_bytes(&sub.group, bytes).await;
                }
                Ok(Some(Verdict::Accepted { position, epoch: entry.epoch }))
            }
        }
    }

    fn already(&self, sub: &Submission) -> Option<Verdict> {
        let state = self.cache.get(&sub.group)?;
        let (position, epoch) = state.recent_verdict(&sub.id)?;
        Some(Verdict::Accepted { position, epoch })
    }

    /// Appends `entry` to the group's LOG if its last entry is still at
    /// `expected`. `Ok(None)`: someone else appended first.
    async fn append(&self, group: &GroupId, expected: u64, entry: &LogEntry) -> Result<Option<u64>, StepError> {
        let publish = PublishMessage::build()
            .payload(Bytes::from(proto::wire::encode(entry)))
            .message_id(names::log_msg_id(&entry.submission_id))
            .expected_last_subject_sequence(expected)
            .header(names::headers::POSITION, entry.position.to_string().as_str())
            .header(names::headers::EPOCH, entry.epoch.to_string().as_str())
            .header(names::headers::KIND, entry.kind.as_str());
        let ack = match self.topo.js.send_publish(names::log_subject(group), publish).await {
            Ok(f) => f.await,
            Err(e) => return Err(StepError::Transient(e.to_string())),
        };
        match ack {
            Ok(ack) if ack.duplicate => {
                // An earlier attempt appended it and then crashed or timed
                // out; the replay will find it in `recent`.
                Ok(None)
            }
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(StepError::Transient(e.to_string())),
        }
    }

    async fn save(&self, state: &GroupState) {
        self.save_bytes(&state.group, state.snapshot()).await;
    }

    async fn save_bytes(&self, group: &GroupId, bytes: Vec<u8>) {
        if let Err(e) = self.topo.groups.put(names::group_key(group), bytes.into()).await {
            // Only a cache: the next load replays LOG further back.
            tracing::warn!(error = %e, "cannot save group snapshot");
        }
    }

    /// Loads a group into the cache: the cached state (caught up with the
    /// LOG tail when `refresh`), else the snapshot and the LOG after it.
    /// `Ok(None)`: the group does not exist.
    async fn load(&mut self, group: &GroupId, refresh: bool) -> Result<Option<()>, StepError> {
        let mut state = match self.cache.remove(group) {
            Some(s) if !refresh => {
                self.cache.insert(group.clone(), s);
                return Ok(Some(()));
            }
            Some(s) => Some(s),
            None => {
                let snap = self
                    .topo
                    .groups
                    .get(names::group_key(group))
                    .await
                    .map_err(|e| StepError::Transient(e.to_string()))?;
                snap.and_then(|b| GroupState::restore(group, &b))
            }
        };
        let subject = names::log_subject(group);
        let mut next = state.as_ref().map(|s| s.last_subject_seq + 1).unwrap_or(1);
        loop {
            let msg = match self.topo.log.direct_get_next_for_subject(subject.as_str(), Some(next)).await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(StepError::Transient(e.to_string())),
            };
            next = msg.sequence + 1;
            let entry: LogEntry = match proto::wire::decode(&msg.payload) {
                Ok(e) => e,
                Err(e) => return Err(StepError::Transient(format!("undecodable LOG entry: {e}"))),
            };
            self.metrics.replayed.inc();
            state = Some(self.replay(state, &entry, msg.sequence)?);
        }
        Ok(state.map(|s| {
            self.cache.insert(group.clone(), s);
        }))
    }

    fn replay(&self, state: Option<GroupState>, entry: &LogEntry, seq: u64) -> Result<GroupState, StepError> {
        let bad =
            |e: ApiError| StepError::Transient(format!("LOG entry {} does not replay: {}", entry.position, e.message));
        let mut state = match (state, entry.kind) {
            (None, EntryKind::Created) => {
                validate::bootstrap(&self.crypto, &entry.group, &entry.sender, &entry.message).map_err(bad)?
            }
            (Some(mut s), EntryKind::Commit | EntryKind::Proposal) => {
                let mut raw = entry.message.clone();
                raw.extend_from_slice(entry.welcome.as_deref().unwrap_or_default());
                let bundle = proto::mls::parse_bundle(&raw).map_err(bad)?;
                let plan = validate::plan(&s, &self.crypto, &entry.sender, &bundle).map_err(bad)?;
                validate::apply(&mut s, plan.effect).map_err(StepError::Transient)?;
                s
            }
            (Some(s), _) => s,
            (None, _) => return Err(StepError::Transient("LOG does not start with a creation".into())),
        };
        state.record(&entry.submission_id, entry.position, entry.epoch, seq, entry.kind == EntryKind::Commit);
        Ok(state)
    }
}
