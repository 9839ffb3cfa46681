//! Deciding one group's submissions: validation against the group's public
//! state, the compare-and-set append to its LOG subject, the state cache
//! that makes both cheap, and the checkpoints that keep that state when
//! the LOG entries behind it expire. One `GroupDecider` per group, driven
//! by one task at a time, so a group's submissions are decided strictly in
//! turn.

use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use proto::wire::{EntryKind, LogEntry, Submission, SubmissionKind, Verdict};
use proto::{names, ApiError, ErrorCode, GroupId};

use crate::checkpoint::Found;
use crate::state::GroupState;
use crate::{validate, Ctx, StepError, CAS_RETRIES, CHECKPOINT_EVERY};

/// Entries read per page when a group's LOG is replayed or re-read.
const REPLAY_PAGE: usize = 256;
/// A page also stops at about this many bytes (at least one entry).
const REPLAY_BYTES: usize = 4 << 20;
/// How long one page may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Tries of a checkpoint after a change to the public group, at once.
const CHECKPOINT_TRIES: u32 = 3;
/// The wait after a failed try, times the try's number.
const CHECKPOINT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a batch append was not stored.
enum BatchFailed {
    /// Another entry took the position first.
    Lost,
    /// The server refused it whole: nothing of it is stored.
    Refused,
    /// Not sent: this process has as many batches in flight as it may.
    Busy,
    /// No answer, or not one we understand: it may have been stored.
    Unknown,
}

/// What an append did.
enum Appended {
    /// Stored at this stream sequence.
    At(u64),
    /// Another entry took the position first (a lost race).
    Lost,
    /// This submission was already in LOG: its verdict.
    Already(Verdict),
}

pub(crate) struct GroupDecider {
    pub(crate) ctx: Arc<Ctx>,
    /// The group's public state, when loaded: a cache of its LOG.
    pub(crate) state: Option<GroupState>,
    /// The trace of the submission being decided, continued by the LOG
    /// entry it becomes.
    pub(crate) trace: Option<proto::trace::Context>,
}

impl GroupDecider {
    pub(crate) async fn decide_one(&mut self, sub: &Submission) -> Result<Verdict, StepError> {
        let timer = self.ctx.metrics.step_seconds.start_timer();
        let verdict = self.decide(sub).await;
        if verdict.is_ok() {
            // Before the verdict is announced: an accepted change to the
            // group is durable in a checkpoint, not only in a LOG entry
            // that retention will delete. A checkpoint that failed before
            // is retried here, on the group's next submission.
            self.checkpoint_if_due().await;
        }
        timer.observe_duration();
        if let Ok(v) = &verdict {
            self.ctx.metrics.count(v);
        }
        verdict
    }

    async fn decide(&mut self, sub: &Submission) -> Result<Verdict, StepError> {
        if sub.group.hub() != self.ctx.domain {
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
                    self.ctx.metrics.cas_conflicts.inc();
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
                let mut state = match validate::bootstrap(&self.ctx.crypto, &sub.group, &sub.device, group_info) {
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
                    removed: vec![],
                    welcome: None,
                    welcome_recipients: vec![],
                };
                let seq = match self.append(&sub.group, 0, &entry).await? {
                    Appended::At(seq) => seq,
                    Appended::Lost => return Ok(None),
                    Appended::Already(v) => return Ok(Some(v)),
                };
                state.record(&sub.id, 1, 0, seq, false);
                state.changed = true;
                self.state = Some(state);
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
                    self.readopt_group_info(sub, &bundle, &v);
                    return Ok(Some(v));
                }
                let state = self.state.as_ref().ok_or_else(|| StepError::Transient("cache".into()))?;
                let mut plan = match validate::plan(state, &self.ctx.crypto, &sub.device, &bundle, validate::Mode::Live)
                {
                    Ok(p) => p,
                    Err(e) => return Ok(Some(Verdict::Rejected(e))),
                };
                let position = state.position + 1;
                let expected = state.last_subject_seq;
                let entry = entry_of(sub, position, message, &mut plan);
                let seq = match self.append(&sub.group, expected, &entry).await? {
                    Appended::At(seq) => seq,
                    Appended::Lost => return Ok(None),
                    Appended::Already(v) => {
                        // Our cached state may or may not include that
                        // entry: the next submission reloads it.
                        self.state = None;
                        return Ok(Some(v));
                    }
                };
                let state = self.state.as_mut().ok_or_else(|| StepError::Transient("cache".into()))?;
                let is_commit = entry.kind == EntryKind::Commit;
                let changes_group = matches!(entry.kind, EntryKind::Commit | EntryKind::Proposal);
                if is_commit {
                    state.current_commit = Some((position, sub.device.clone(), message.clone()));
                    // The previous epoch's GroupInfo is of no use to anyone
                    // now; a Commit without one leaves none.
                    state.group_info = plan.group_info.map(|message| proto::checkpoint::PublishedGroupInfo {
                        epoch: entry.epoch + 1,
                        position,
                        message,
                    });
                }
                if let Err(e) = validate::apply(state, plan.effect) {
                    // The entry is in LOG; a replay will rebuild the state.
                    tracing::error!(error = %e, "cannot apply accepted entry to cached state");
                    self.state = None;
                    return Ok(Some(Verdict::Accepted { position, epoch: entry.epoch }));
                }
                state.record(&sub.id, position, entry.epoch, seq, is_commit);
                state.changed |= changes_group;
                tracing::debug!(position, seq, kind = entry.kind.as_str(), "appended");
                Ok(Some(Verdict::Accepted { position, epoch: entry.epoch }))
            }
        }
    }

    /// Decides a run of the group's submissions that were waiting together.
    /// The application messages at its head are checked against the cached
    /// state and appended with one atomic batch (ADR-50) behind one
    /// compare-and-set on the group's last entry, so a busy group pays one
    /// round trip for many messages. An application message changes no
    /// public state, so each is checked exactly as `decide_one` would.
    ///
    /// Returns the verdicts of the first submissions, in order; the caller
    /// decides the rest one at a time. It stops before the first Commit or
    /// Proposal (which change the state), before a refusal (decided again on
    /// a fresh state by `decide_one`), and returns nothing when the batch
    /// was not stored. Then the state is kept if the server refused the
    /// batch whole, and dropped otherwise (a lost race, or no answer), so
    /// `decide_one` reloads it from the LOG and finds an append that was
    /// stored after all.
    pub(crate) async fn decide_run(&mut self, subs: &[(&Submission, Option<proto::trace::Context>)]) -> Vec<Verdict> {
        let Some((first, _)) = subs.first() else {
            return Vec::new();
        };
        let group = &first.group;
        if group.hub() != self.ctx.domain || subs.iter().any(|(s, _)| s.group != *group) {
            return Vec::new();
        }
        if !matches!(self.load(group, false).await, Ok(Some(()))) {
            return Vec::new();
        }
        let timer = std::time::Instant::now();
        let Some(state) = self.state.as_ref() else {
            return Vec::new();
        };
        let mut verdicts = Vec::new();
        let mut entries: Vec<(LogEntry, Option<proto::trace::Context>)> = Vec::new();
        for (sub, trace) in subs {
            let SubmissionKind::Message { message, welcome: None, group_info: None } = &sub.kind else {
                break;
            };
            let bundle = match proto::mls::parse_bundle(message) {
                Ok(b) => b,
                Err(e) => {
                    verdicts.push(Verdict::Rejected(e));
                    continue;
                }
            };
            if bundle.header.content != proto::mls::Content::Application {
                break;
            }
            let earlier = entries.iter().find(|(e, _)| e.submission_id == sub.id).map(|(e, _)| (e.position, e.epoch));
            if let Some((position, epoch)) = state.recent_verdict(&sub.id).or(earlier) {
                verdicts.push(Verdict::Accepted { position, epoch });
                continue;
            }
            let mut plan = match validate::plan(state, &self.ctx.crypto, &sub.device, &bundle, validate::Mode::Live) {
                Ok(p) if p.kind == EntryKind::Application => p,
                _ => break,
            };
            let position = state.position + 1 + entries.len() as u64;
            verdicts.push(Verdict::Accepted { position, epoch: plan.epoch });
            entries.push((entry_of(sub, position, message, &mut plan), *trace));
        }
        let n = entries.len();
        if n >= 2 {
            let expected = state.last_subject_seq;
            match self.append_batch(group, expected, &entries).await {
                Ok(last) => {
                    let Some(state) = self.state.as_mut() else {
                        return Vec::new();
                    };
                    for (k, (e, _)) in entries.iter().enumerate() {
                        // Stored together: the batch's sequences are consecutive.
                        let seq = last - (n - 1 - k) as u64;
                        state.record(&e.submission_id, e.position, e.epoch, seq, false);
                    }
                }
                Err(failed) => {
                    match failed {
                        BatchFailed::Lost => self.ctx.metrics.cas_conflicts.inc(),
                        // Nothing was stored, and nothing moved: the cached
                        // state is still the group's.
                        BatchFailed::Refused | BatchFailed::Busy => return Vec::new(),
                        BatchFailed::Unknown => {}
                    }
                    // Behind the LOG, or unsure whether the batch was
                    // stored: `decide_one` reloads.
                    self.state = None;
                    return Vec::new();
                }
            }
        } else if n == 1 {
            // One message: the plain append, with its duplicate detection.
            let expected = state.last_subject_seq;
            self.trace = entries[0].1;
            let appended = self.append(group, expected, &entries[0].0).await;
            self.trace = None;
            let entry = &entries[0].0;
            match appended {
                Ok(Appended::At(seq)) => {
                    if let Some(state) = self.state.as_mut() {
                        state.record(&entry.submission_id, entry.position, entry.epoch, seq, false);
                    }
                }
                Ok(Appended::Lost) => {
                    self.ctx.metrics.cas_conflicts.inc();
                    self.state = None;
                    return Vec::new();
                }
                Ok(Appended::Already(_)) | Err(_) => {
                    self.state = None;
                    return Vec::new();
                }
            }
        }
        self.checkpoint_if_due().await;
        let metrics = &self.ctx.metrics;
        let each = timer.elapsed().as_secs_f64() / verdicts.len().max(1) as f64;
        for v in &verdicts {
            metrics.step_seconds.observe(each);
            metrics.count(v);
        }
        verdicts
    }

    /// Appends `entries` (a run of application messages) as one atomic
    /// batch if the group's last entry is still at `expected`; returns the
    /// last one's stream sequence.
    async fn append_batch(
        &self,
        group: &GroupId,
        expected: u64,
        entries: &[(LogEntry, Option<proto::trace::Context>)],
    ) -> Result<u64, BatchFailed> {
        // The server takes few batches in flight per stream (50), so each
        // process sends only a few at once. A run that finds none free is
        // appended one entry at a time instead (`decide_one`, which the
        // caller falls back to): waiting for a turn would make every busy
        // group queue behind a handful of others (with 4 submissions in
        // flight per group, 1000 groups delivered a third of what they did
        // with 1).
        let Ok(_permit) = self.ctx.batches.try_acquire() else {
            self.ctx.metrics.batches_busy.inc();
            return Err(BatchFailed::Busy);
        };
        let messages =
            entries.iter().map(|(e, trace)| (Bytes::from(proto::wire::encode(e)), log_headers(e, *trace))).collect();
        let subject = names::log_subject(group, self.ctx.streams.partitions);
        match proto::batch::publish_atomic(&self.ctx.topo.js.client(), &subject, expected, messages).await {
            Ok(last) => {
                self.ctx.metrics.append_entries.observe(entries.len() as f64);
                Ok(last)
            }
            Err(proto::batch::PublishAtomicError::WrongLastSequence) => Err(BatchFailed::Lost),
            Err(e @ (proto::batch::PublishAtomicError::Refused { .. } | proto::batch::PublishAtomicError::Size(_))) => {
                // A duplicate among them (a redelivery) or the server's
                // batch limits: `decide_one` takes them one by one.
                tracing::debug!(error = %e, entries = entries.len(), "batch append refused");
                Err(BatchFailed::Refused)
            }
            Err(e) => {
                tracing::debug!(error = %e, entries = entries.len(), "batch append not confirmed");
                Err(BatchFailed::Unknown)
            }
        }
    }

    /// A resent Commit that started the current epoch brings back its
    /// GroupInfo when the state lost it (see
    /// [`validate::group_info_of_current_epoch`]); it is checkpointed with
    /// the verdict.
    fn readopt_group_info(&mut self, sub: &Submission, bundle: &proto::mls::Bundle, verdict: &Verdict) {
        let Some(state) = self.state.as_mut() else { return };
        let Verdict::Accepted { position, epoch } = *verdict else { return };
        if state.group_info.is_some() || bundle.header.content != proto::mls::Content::Commit {
            return;
        }
        // Exactly the Commit in the LOG, from its sender: a submission id
        // alone (a reused Idempotency-Key, a peer's id) proves nothing.
        let same = state
            .current_commit
            .as_ref()
            .is_some_and(|(p, sender, message)| *p == position && *sender == sub.device && *message == bundle.message);
        if !same {
            return;
        }
        if epoch + 1 != state.epoch() || state.winning_commit(epoch) != Some(position) {
            return;
        }
        if let Some(message) = validate::group_info_of_current_epoch(state, bundle) {
            state.group_info = Some(proto::checkpoint::PublishedGroupInfo { epoch: epoch + 1, position, message });
            state.changed = true;
        }
    }

    fn already(&self, sub: &Submission) -> Option<Verdict> {
        let state = self.state.as_ref()?;
        let (position, epoch) = state.recent_verdict(&sub.id)?;
        Some(Verdict::Accepted { position, epoch })
    }

    /// Appends `entry` to the group's LOG if its last entry is still at
    /// `expected`.
    async fn append(&self, group: &GroupId, expected: u64, entry: &LogEntry) -> Result<Appended, StepError> {
        let publish = PublishMessage::build()
            .payload(Bytes::from(proto::wire::encode(entry)))
            .headers(log_headers(entry, self.trace))
            .expected_last_subject_sequence(expected);
        let ack = match self
            .ctx
            .topo
            .js
            .send_publish(names::log_subject(group, self.ctx.streams.partitions), publish)
            .await
        {
            Ok(f) => f.await,
            Err(e) => return Err(StepError::Transient(e.to_string())),
        };
        match ack {
            Ok(ack) if ack.duplicate => {
                // An earlier attempt appended this submission (then crashed
                // or timed out before its ack). The PubAck names the stored
                // entry: its position and epoch are the verdict, however
                // long ago it was appended.
                let stored = self
                    .ctx
                    .topo
                    .log
                    .direct_get(ack.sequence)
                    .await
                    .map_err(|e| StepError::Transient(format!("cannot read the duplicate's entry: {e}")))?;
                let first: LogEntry = proto::wire::decode(&stored.payload)
                    .map_err(|e| StepError::Transient(format!("undecodable LOG entry: {e}")))?;
                if first.submission_id != entry.submission_id {
                    return Err(StepError::Transient("a duplicate ack named another submission's entry".into()));
                }
                self.ctx.metrics.duplicates.inc();
                Ok(Appended::Already(Verdict::Accepted { position: first.position, epoch: first.epoch }))
            }
            Ok(ack) => {
                self.ctx.metrics.append_entries.observe(1.0);
                Ok(Appended::At(ack.sequence))
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Appended::Lost),
            Err(e) => Err(StepError::Transient(e.to_string())),
        }
    }

    /// Checkpoints the cached state if it is due. A failure leaves it due,
    /// so the group's next submission (or its going idle) tries again;
    /// until then the state depends on LOG entries that retention may
    /// delete, hence the error.
    async fn checkpoint_if_due(&mut self) {
        self.checkpoint_when(|s| s.checkpoint_due(CHECKPOINT_EVERY)).await;
    }

    /// Checkpoints the cached state if `due` says so. A change to the public
    /// group (a Commit, whose verdict is announced next) is tried again a
    /// couple of times at once: a NATS hiccup must not leave it resting on
    /// the LOG entry alone, and the GroupInfo uploaded with a Commit exists
    /// only in memory and in a checkpoint.
    async fn checkpoint_when(&mut self, due: impl Fn(&GroupState) -> bool) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if !due(state) {
            return;
        }
        let metrics = &self.ctx.metrics;
        let bytes = state.snapshot();
        let tries = if state.changed { CHECKPOINT_TRIES } else { 1 };
        for attempt in 1..=tries {
            let timer = metrics.checkpoint_seconds.start_timer();
            match self.ctx.checkpoints.save(&state.group, state.position, &bytes).await {
                Ok(()) => {
                    timer.observe_duration();
                    metrics.checkpoint_bytes.observe(bytes.len() as f64);
                    state.checkpoint_stored(bytes.len());
                    return;
                }
                Err(e) => {
                    timer.stop_and_discard();
                    metrics.checkpoint_failures.inc();
                    tracing::error!(
                        error = %e,
                        position = state.position,
                        bytes = bytes.len(),
                        attempt,
                        "cannot checkpoint a group's state"
                    );
                    if attempt < tries {
                        tokio::time::sleep(CHECKPOINT_RETRY * attempt).await;
                    }
                }
            }
        }
    }

    /// The group's task is ending: its state, if it moved at all since its
    /// checkpoint, is checkpointed now. An idle group's checkpoint then
    /// holds its last position, so its state never rests on LOG entries
    /// that retention may delete while nobody writes to it.
    pub(crate) async fn checkpoint_idle(&mut self) {
        self.checkpoint_when(GroupState::behind_checkpoint).await;
    }

    /// The group's latest checkpoint, if it has a usable one.
    async fn restore(&self, group: &GroupId) -> Result<Option<GroupState>, StepError> {
        let metrics = &self.ctx.metrics;
        match self.ctx.checkpoints.load(group).await {
            Ok(Found::Absent) => Ok(None),
            Ok(Found::State(s)) => {
                metrics.checkpoint_restores.inc();
                Ok(Some(s))
            }
            Ok(Found::Legacy(mut s)) => {
                metrics.checkpoint_restores.inc();
                // Stored in the older format: checkpoint it anew.
                s.changed = true;
                Ok(Some(s))
            }
            Ok(Found::Unusable(reason)) => {
                metrics.checkpoint_fallbacks.inc();
                tracing::error!(reason, "a group's checkpoint is unusable; replaying its LOG from the start");
                Ok(None)
            }
            Err(e) => Err(StepError::Transient(e.to_string())),
        }
    }

    /// Loads the group: the cached state (caught up with the LOG tail when
    /// `refresh`), else its latest checkpoint and the LOG after it.
    /// `Ok(None)`: the group does not exist.
    async fn load(&mut self, group: &GroupId, refresh: bool) -> Result<Option<()>, StepError> {
        let mut state = match self.state.take() {
            Some(s) if !refresh => {
                self.state = Some(s);
                return Ok(Some(()));
            }
            Some(s) => Some(s),
            None => self.restore(group).await?,
        };
        let subject = names::log_subject(group, self.ctx.streams.partitions);
        let mut next = state.as_ref().map(|s| s.last_subject_seq + 1).unwrap_or(1);
        let mut replayed = false;
        // Pages of batched direct gets: a takeover replays up to a
        // checkpoint's worth of entries, and a re-read after a lost
        // compare-and-set finds one or a few, in one round trip either way
        // (not one per entry and one more to find the end).
        let client = self.ctx.topo.js.client();
        loop {
            let page = proto::direct::batch(
                &client,
                names::LOG_STREAM,
                &subject,
                next,
                REPLAY_PAGE,
                Some(REPLAY_BYTES),
                READ_TIMEOUT,
            )
            .await
            .map_err(|e| StepError::Transient(e.to_string()))?;
            for msg in &page {
                next = msg.seq + 1;
                let entry: LogEntry = match proto::wire::decode(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => return Err(StepError::Transient(format!("undecodable LOG entry: {e}"))),
                };
                self.ctx.metrics.replayed.inc();
                state = Some(self.replay(state, &entry, msg.seq)?);
                replayed = true;
            }
            if proto::direct::is_last_page(&page, REPLAY_PAGE, REPLAY_BYTES) {
                break;
            }
        }
        if let Some(s) = state.as_mut().filter(|_| !replayed) {
            self.settle_tail(s, &subject).await?;
        }
        let exists = state.is_some();
        self.state = state;
        Ok(exists.then_some(()))
    }

    fn replay(&self, state: Option<GroupState>, entry: &LogEntry, seq: u64) -> Result<GroupState, StepError> {
        let bad =
            |e: ApiError| StepError::Transient(format!("LOG entry {} does not replay: {}", entry.position, e.message));
        let mut state = match (state, entry.kind) {
            (None, EntryKind::Created) => {
                validate::bootstrap(&self.ctx.crypto, &entry.group, &entry.sender, &entry.message).map_err(bad)?
            }
            (Some(mut s), EntryKind::Commit | EntryKind::Proposal) => {
                let mut raw = entry.message.clone();
                raw.extend_from_slice(entry.welcome.as_deref().unwrap_or_default());
                let bundle = proto::mls::parse_bundle(&raw).map_err(bad)?;
                let plan = validate::plan(&s, &self.ctx.crypto, &entry.sender, &bundle, validate::Mode::Replay)
                    .map_err(bad)?;
                validate::apply(&mut s, plan.effect).map_err(StepError::Transient)?;
                if entry.kind == EntryKind::Commit {
                    // The LOG keeps no GroupInfo: the one uploaded with this
                    // Commit is lost unless a checkpoint holds it.
                    s.group_info = None;
                    s.current_commit = Some((entry.position, entry.sender.clone(), entry.message.clone()));
                }
                s
            }
            (Some(s), _) => s,
            (None, _) => return Err(StepError::Transient("LOG does not start with a creation".into())),
        };
        state.record(&entry.submission_id, entry.position, entry.epoch, seq, entry.kind == EntryKind::Commit);
        state.changed |= matches!(entry.kind, EntryKind::Created | EntryKind::Commit | EntryKind::Proposal);
        Ok(state)
    }

    /// For a state that no LOG entry after it changed: whether its own last
    /// entry is still in the LOG. If retention deleted every entry of the
    /// group, the next append must expect an empty subject (a stale
    /// expected sequence would lose every compare-and-set forever), and it
    /// must follow the last position that existed: application messages
    /// after the checkpoint left no trace in it, but the hub's fanout
    /// delivered them, and its cursor says how far (`prev_position` of the
    /// next entry must be exactly that, or fanout waits for it forever).
    async fn settle_tail(&self, state: &mut GroupState, subject: &str) -> Result<(), StepError> {
        if state.last_subject_seq == 0 {
            return Ok(());
        }
        match self.ctx.topo.log.direct_get_last_for_subject(subject).await {
            // Still there (or a newer entry appended meanwhile, which the
            // compare-and-set of our next append reveals).
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(StepError::Transient(e.to_string())),
        }
        state.last_subject_seq = 0;
        let delivered = self.delivered(&state.group).await?;
        if delivered > state.position {
            tracing::debug!(checkpoint = state.position, delivered, "positions after the checkpoint expired");
            state.position = delivered;
        }
        Ok(())
    }

    /// The last position the hub's fanout delivered (its cursor in
    /// `mlsfed_fanout`; only `done` is read, other fields are fanout's).
    async fn delivered(&self, group: &GroupId) -> Result<u64, StepError> {
        #[derive(serde::Deserialize)]
        struct FanoutCursor {
            #[serde(default)]
            done: u64,
        }
        let stored = self
            .ctx
            .topo
            .fanout
            .get(names::group_key(group))
            .await
            .map_err(|e| StepError::Transient(format!("cannot read the group's fanout cursor: {e}")))?;
        Ok(stored.and_then(|b| serde_json::from_slice::<FanoutCursor>(&b).ok()).map(|c| c.done).unwrap_or(0))
    }
}

/// The LOG entry an accepted submission becomes at `position`; takes what
/// the plan says the entry names (removed devices, the Welcome).
fn entry_of(sub: &Submission, position: u64, message: &[u8], plan: &mut validate::Plan) -> LogEntry {
    LogEntry {
        group: sub.group.clone(),
        position,
        prev_position: position - 1,
        epoch: plan.epoch,
        kind: plan.kind,
        sender: sub.device.clone(),
        submission_id: sub.id.clone(),
        message: message.to_vec(),
        removed: std::mem::take(&mut plan.removed),
        welcome: plan.welcome.take(),
        welcome_recipients: std::mem::take(&mut plan.welcome_recipients),
    }
}

/// The headers every LOG entry is stored with, alone or in a batch: its
/// dedup id (from its submission), what readers route on without decoding
/// it, and its trace.
fn log_headers(entry: &LogEntry, trace: Option<proto::trace::Context>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, names::log_msg_id(&entry.submission_id).as_str());
    headers.insert(names::headers::POSITION, entry.position.to_string().as_str());
    headers.insert(names::headers::EPOCH, entry.epoch.to_string().as_str());
    headers.insert(names::headers::KIND, entry.kind.as_str());
    if let Some(t) = trace {
        headers.insert(proto::trace::HEADER, t.to_header().as_str());
    }
    headers
}
