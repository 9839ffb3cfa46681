//! The hub's public view of one group: an openmls `PublicGroup` (no secrets)
//! plus its place in the LOG. LOG entries expire, so the state is
//! checkpointed durably (`checkpoint.rs`) after every change to the
//! `PublicGroup`, and rebuilt from the latest checkpoint plus the LOG
//! entries after it.

use std::collections::VecDeque;

use openmls::prelude::{GroupId as MlsGroupId, ProposalStore, PublicGroup};
use openmls_memory_storage::MemoryStorage;
use proto::checkpoint::{PublishedGroupInfo, Snapshot};
use proto::{DeviceId, GroupId};

/// Accepted submissions remembered per group, so that a redelivered
/// submission gets its original verdict instead of a spurious `wrong_epoch`.
const RECENT: usize = 512;
/// Stored checkpoint bytes per position of application messages between
/// two checkpoints, past the first `CHECKPOINT_EVERY` (see `checkpoint_due`).
const CHECKPOINT_BYTES_PER_POSITION: usize = 2048;
/// Commit positions remembered per group, to name the winner in `wrong_epoch`.
const RECENT_COMMITS: usize = 64;

pub struct GroupState {
    pub group: GroupId,
    pub storage: MemoryStorage,
    pub public: PublicGroup,
    /// Stream sequence of this group's last LOG entry: the CAS precondition
    /// (`Nats-Expected-Last-Subject-Sequence`) of the next append.
    pub last_subject_seq: u64,
    /// Hub position of the last entry.
    pub position: u64,
    pub recent: VecDeque<(String, u64, u64)>,
    /// (epoch the commit was sent in, its position).
    pub commits: VecDeque<(u64, u64)>,
    /// Position of the last durable checkpoint of this state (0: none).
    pub checkpointed: u64,
    /// Size of that checkpoint (0: none stored by this process yet).
    pub checkpoint_bytes: usize,
    /// The `PublicGroup` changed since that checkpoint (a creation, Commit
    /// or Proposal): the next checkpoint is due now, not in a while, since
    /// the LOG entry that made the change may expire.
    pub changed: bool,
    /// The GroupInfo of the current epoch, when its Commit carried one:
    /// what members that cannot follow the group any more rejoin from.
    pub group_info: Option<PublishedGroupInfo>,
    /// The Commit that started the current epoch, as (position, sender,
    /// its bytes), while this process holds it (not checkpointed): a resend
    /// of exactly that Commit may bring back a GroupInfo lost to a crash.
    pub current_commit: Option<(u64, DeviceId, Vec<u8>)>,
    member_set: std::sync::OnceLock<std::collections::HashSet<Vec<u8>>>,
}

impl GroupState {
    pub fn new(group: GroupId, storage: MemoryStorage, public: PublicGroup) -> Self {
        Self {
            group,
            storage,
            public,
            last_subject_seq: 0,
            position: 0,
            recent: VecDeque::new(),
            commits: VecDeque::new(),
            checkpointed: 0,
            checkpoint_bytes: 0,
            changed: false,
            group_info: None,
            current_commit: None,
            member_set: std::sync::OnceLock::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.public.group_context().epoch().as_u64()
    }

    /// Checked for every submission: a set built once per epoch, not a walk
    /// over a 1000-leaf tree per message.
    pub fn is_member(&self, d: &DeviceId) -> bool {
        self.member_set
            .get_or_init(|| self.public.members().map(|m| m.credential.serialized_content().to_vec()).collect())
            .contains(d.as_bytes())
    }

    /// Forgets the member set after the tree changed (a merged Commit).
    pub fn members_changed(&mut self) {
        self.member_set = std::sync::OnceLock::new();
    }

    pub fn recent_verdict(&self, submission_id: &str) -> Option<(u64, u64)> {
        self.recent.iter().find(|(id, _, _)| id == submission_id).map(|(_, p, e)| (*p, *e))
    }

    pub fn winning_commit(&self, epoch: u64) -> Option<u64> {
        self.commits.iter().find(|(e, _)| *e == epoch).map(|(_, p)| *p)
    }

    pub fn record(&mut self, submission_id: &str, position: u64, epoch: u64, subject_seq: u64, commit: bool) {
        self.position = position;
        self.last_subject_seq = subject_seq;
        self.recent.push_back((submission_id.to_owned(), position, epoch));
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        if commit {
            self.commits.push_back((epoch, position));
            if self.commits.len() > RECENT_COMMITS {
                self.commits.pop_front();
            }
        }
    }

    /// Whether a checkpoint is due: after every change to the public group,
    /// and after `every` positions of application messages (those change
    /// only the place in the LOG, which the entries after a checkpoint
    /// restore, and keep the replay after a checkpoint short). A large
    /// state waits longer between those, one position per
    /// [`CHECKPOINT_BYTES_PER_POSITION`] of its size: a 1000-member group's
    /// few hundred KiB rewritten every 32 messages cost more than the
    /// messages themselves, while replaying an application entry only
    /// notes its position.
    pub fn checkpoint_due(&self, every: u64) -> bool {
        let every = every.max((self.checkpoint_bytes / CHECKPOINT_BYTES_PER_POSITION) as u64);
        self.changed || self.position >= self.checkpointed.saturating_add(every)
    }

    /// Whether the state has moved since its checkpoint at all: checked
    /// when the group goes idle, so an idle group's checkpoint holds its
    /// last position (and any change) without waiting for `every` more.
    pub fn behind_checkpoint(&self) -> bool {
        self.changed || self.position > self.checkpointed
    }

    /// Notes that a checkpoint of this state, as it is now, is stored
    /// (`bytes` long).
    pub fn checkpoint_stored(&mut self, bytes: usize) {
        self.checkpointed = self.position;
        self.checkpoint_bytes = bytes;
        self.changed = false;
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let storage = self
            .storage
            .values
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Snapshot {
            storage,
            last_subject_seq: self.last_subject_seq,
            position: self.position,
            recent: self.recent.iter().cloned().collect(),
            commits: self.commits.iter().cloned().collect(),
            group_info: self.group_info.clone(),
        }
        .encode()
    }

    /// Restores a snapshot; `None` when it is unreadable (then the caller
    /// replays the LOG from the start, the best it can do). The restored
    /// state counts as checkpointed at its own position.
    pub fn restore(group: &GroupId, bytes: &[u8]) -> Option<Self> {
        let snap = Snapshot::decode(bytes)?;
        let storage = MemoryStorage::default();
        storage.values.write().ok()?.extend(snap.storage);
        let public = PublicGroup::load(&storage, &MlsGroupId::from_slice(group.as_bytes())).ok()??;
        Some(Self {
            group: group.clone(),
            storage,
            public,
            last_subject_seq: snap.last_subject_seq,
            position: snap.position,
            recent: snap.recent.into(),
            commits: snap.commits.into(),
            checkpointed: snap.position,
            checkpoint_bytes: bytes.len(),
            changed: false,
            group_info: snap.group_info,
            current_commit: None,
            member_set: std::sync::OnceLock::new(),
        })
    }
}

/// An empty proposal store for bootstrapping (kept here so callers need not
/// import openmls for it).
pub fn proposal_store() -> ProposalStore {
    ProposalStore::new()
}
