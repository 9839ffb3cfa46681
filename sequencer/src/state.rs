//! The hub's public view of one group: an openmls `PublicGroup` (no secrets)
//! plus its place in the LOG. This is a cache: LOG is the source of truth and
//! the state is rebuilt by replaying it (from a KV snapshot when there is one).

use std::collections::VecDeque;

use openmls::prelude::{GroupId as MlsGroupId, ProposalStore, PublicGroup};
use openmls_memory_storage::MemoryStorage;
use proto::{DeviceId, GroupId};
use serde::{Deserialize, Serialize};

/// Accepted submissions remembered per group, so that a redelivered
/// submission gets its original verdict instead of a spurious `wrong_epoch`.
const RECENT: usize = 512;
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
    member_set: std::sync::OnceLock<std::collections::HashSet<Vec<u8>>>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    storage: Vec<(Vec<u8>, Vec<u8>)>,
    last_subject_seq: u64,
    position: u64,
    recent: Vec<(String, u64, u64)>,
    commits: Vec<(u64, u64)>,
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

    pub fn snapshot(&self) -> Vec<u8> {
        let storage = self
            .storage
            .values
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        proto::wire::encode(&Snapshot {
            storage,
            last_subject_seq: self.last_subject_seq,
            position: self.position,
            recent: self.recent.iter().cloned().collect(),
            commits: self.commits.iter().cloned().collect(),
        })
    }

    /// Restores a snapshot; `None` when it is unreadable (then the caller
    /// replays the LOG from the start, which is always correct).
    pub fn restore(group: &GroupId, bytes: &[u8]) -> Option<Self> {
        let snap: Snapshot = proto::wire::decode(bytes).ok()?;
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
            member_set: std::sync::OnceLock::new(),
        })
    }
}

/// An empty proposal store for bootstrapping (kept here so callers need not
/// import openmls for it).
pub fn proposal_store() -> ProposalStore {
    ProposalStore::new()
}
