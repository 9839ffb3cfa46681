//! The durable checkpoint of a group's public state: its format and how it
//! is read. The sequencer writes checkpoints (`sequencer::checkpoint`);
//! ingest reads them too, to serve a group's current GroupInfo to members
//! that rejoin (RFC 9420 §12.4.3.2).
//!
//! A checkpoint is an object in the `mlsfed_state` object store (chunked,
//! so a 1000-member group's state is not bound by NATS' max payload), named
//! by group and position, plus a small pointer in the `mlsfed_groups` KV
//! bucket that names the latest one.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, object_store};
use serde::{Deserialize, Serialize};

use crate::{names, GroupId};

/// The pointer format this version writes and reads.
pub const POINTER_VERSION: u32 = 1;
/// Checkpoint objects one process reads at once.
const MAX_CONCURRENT_READS: usize = 16;
/// Reads of pointer then object before a load gives up: the object named by
/// a pointer just read may be deleted because the pointer moved on.
const READ_ROUNDS: usize = 3;
/// Longest one object read may take: a read whose chunks are purged under
/// it (the object was replaced) would otherwise wait for them forever.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The KV value naming a group's latest checkpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pointer {
    pub v: u32,
    pub position: u64,
    pub object: String,
}

/// The format version of a pointer, if the value is one of any version.
pub fn version(value: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    serde_json::from_slice::<Versioned>(value).ok().map(|x| x.v)
}

/// The GroupInfo a committer uploaded with the Commit that started the
/// group's current epoch (RFC 9420 §12.4.3), kept so that a member who
/// cannot follow the group any more can rejoin by external commit
/// (§12.4.3.2). Signed by the committer; the hub checked that its
/// GroupContext is the one the Commit produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedGroupInfo {
    pub epoch: u64,
    /// The hub position of the Commit that started `epoch`.
    pub position: u64,
    /// The MLSMessage(GroupInfo), with the ratchet_tree and external_pub
    /// extensions.
    pub message: Vec<u8>,
}

/// One checkpoint: the `PublicGroup`'s storage and the group's place in
/// its LOG.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub storage: Vec<(Vec<u8>, Vec<u8>)>,
    pub last_subject_seq: u64,
    pub position: u64,
    pub recent: Vec<(String, u64, u64)>,
    pub commits: Vec<(u64, u64)>,
    pub group_info: Option<PublishedGroupInfo>,
}

/// The layout written before GroupInfos were kept. postcard is not
/// self-describing: the newer layout cannot read it, so it is read as
/// itself.
#[derive(Deserialize)]
struct SnapshotV1 {
    storage: Vec<(Vec<u8>, Vec<u8>)>,
    last_subject_seq: u64,
    position: u64,
    recent: Vec<(String, u64, u64)>,
    commits: Vec<(u64, u64)>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode(self)
    }

    /// Either layout; `None` when the bytes are neither.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(s) = crate::wire::decode::<Snapshot>(bytes) {
            return Some(s);
        }
        let v1: SnapshotV1 = crate::wire::decode(bytes).ok()?;
        Some(Snapshot {
            storage: v1.storage,
            last_subject_seq: v1.last_subject_seq,
            position: v1.position,
            recent: v1.recent,
            commits: v1.commits,
            group_info: None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadCheckpointError {
    #[error("cannot read the checkpoint: {0}")]
    Read(String),
    /// Written by a newer version: refused by name, never overwritten by a
    /// replay of ours.
    #[error("the checkpoint pointer has format {0}, newer than this version's")]
    Newer(u32),
}

/// What a load found.
pub enum Found {
    /// No checkpoint: a group that does not exist (or was never
    /// checkpointed), whose LOG is all there is.
    Absent,
    /// The object the pointer names, and the position the pointer gives.
    Object { position: u64, bytes: Vec<u8> },
    /// A whole snapshot in the KV value itself, as written before
    /// checkpoints were objects.
    Legacy(Vec<u8>),
    /// A checkpoint exists but cannot be used (the reason).
    Unusable(String),
}

/// Why one read of an object failed.
enum ObjectRead {
    /// Not there (deleted because the pointer moved on, or lost).
    Missing,
    /// There, but not a valid object (wrong digest or size).
    Corrupt(String),
    /// NATS did not answer in time: try again later.
    Unavailable(String),
}

/// Reads checkpoints, a bounded number at once.
#[derive(Clone)]
pub struct Reader {
    /// Object reads in flight in this process. Each read is a consumer on
    /// the object store's stream, and a sequencer that takes over many
    /// groups at once (a start, a failover) would otherwise open one per
    /// group and run into the server's consumer limit.
    reads: Arc<tokio::sync::Semaphore>,
    pointers: kv::Store,
    objects: object_store::ObjectStore,
    client: async_nats::Client,
}

impl Reader {
    pub fn new(topo: &crate::streams::Topology) -> Self {
        Self {
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS)),
            pointers: topo.groups.clone(),
            objects: topo.state.clone(),
            client: topo.js.client(),
        }
    }

    /// The latest checkpoint of `group`. `Err`: NATS did not answer, or
    /// the pointer is of a newer format.
    pub async fn load(&self, group: &GroupId) -> Result<Found, ReadCheckpointError> {
        let key = names::group_key(group);
        let mut unavailable = None;
        for _ in 0..READ_ROUNDS {
            let entry =
                self.pointers.entry(key.as_str()).await.map_err(|e| ReadCheckpointError::Read(e.to_string()))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                return Ok(Found::Absent);
            };
            if let Some(v) = version(&entry.value).filter(|v| *v > POINTER_VERSION) {
                return Err(ReadCheckpointError::Newer(v));
            }
            let Ok(pointer) = serde_json::from_slice::<Pointer>(&entry.value) else {
                return Ok(Found::Legacy(entry.value.to_vec()));
            };
            match self.read(&pointer.object).await {
                Ok(bytes) => return Ok(Found::Object { position: pointer.position, bytes }),
                // The pointer may have moved on and its old object been
                // deleted while we read: read the pointer again.
                Err(ObjectRead::Missing) => unavailable = None,
                Err(ObjectRead::Unavailable(e)) => unavailable = Some(e),
                Err(ObjectRead::Corrupt(e)) => return Ok(Found::Unusable(e)),
            }
        }
        match unavailable {
            Some(e) => Err(ReadCheckpointError::Read(e)),
            None => Ok(Found::Unusable("the object the pointer names is missing".into())),
        }
    }

    /// The snapshot the latest checkpoint holds, `None` when there is none
    /// or it is unusable.
    pub async fn snapshot(&self, group: &GroupId) -> Result<Option<Snapshot>, ReadCheckpointError> {
        Ok(match self.load(group).await? {
            Found::Object { bytes, .. } | Found::Legacy(bytes) => Snapshot::decode(&bytes),
            Found::Absent | Found::Unusable(_) => None,
        })
    }

    /// Reads an object with direct gets: its metadata, then its chunks in
    /// batches. The object store's own reader opens a consumer per read,
    /// and a sequencer that takes over a thousand groups (a start, a
    /// failover) ran into the server's consumer limit that way.
    async fn read(&self, object: &str) -> Result<Vec<u8>, ObjectRead> {
        let _permit =
            self.reads.acquire().await.map_err(|_| ObjectRead::Unavailable("checkpoint reads are closed".into()))?;
        let info = match self.objects.info(object).await {
            Ok(i) if i.deleted => return Err(ObjectRead::Missing),
            Ok(i) => i,
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Err(ObjectRead::Missing),
            Err(e) => return Err(ObjectRead::Unavailable(e.to_string())),
        };
        let subject = names::state_object_chunks_subject(&info.nuid);
        // Bounded, whatever the metadata says.
        let mut bytes = Vec::with_capacity(info.size.min(64 << 20));
        let (mut chunks, mut from) = (0usize, 1u64);
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while chunks < info.chunks {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ObjectRead::Unavailable("the object's chunks did not arrive in time".into()));
            }
            let want = (info.chunks - chunks).min(crate::direct::MAX_BATCH);
            let page = crate::direct::batch(&self.client, names::STATE_STREAM, &subject, from, want, None, left)
                .await
                .map_err(|e| ObjectRead::Unavailable(e.to_string()))?;
            let Some(last) = page.last().map(|m| m.seq) else {
                // Purged under the read: the object was replaced.
                return Err(ObjectRead::Missing);
            };
            for m in page {
                bytes.extend_from_slice(&m.payload);
                chunks += 1;
            }
            from = last + 1;
        }
        if bytes.len() != info.size {
            return Err(ObjectRead::Corrupt(format!(
                "the object has {} bytes, its metadata says {}",
                bytes.len(),
                info.size
            )));
        }
        if let Some(want) = &info.digest {
            use base64::Engine as _;
            use sha2::Digest as _;
            let got =
                format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha2::Sha256::digest(&bytes)));
            if &got != want {
                return Err(ObjectRead::Corrupt("the object's digest does not match its metadata".into()));
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pointer is read by every sequencer version that shares the
    /// bucket, and by operators looking at it: its layout is fixed.
    #[test]
    fn pointer_layout() {
        let p = Pointer { v: POINTER_VERSION, position: 7, object: "ab.7".into() };
        assert_eq!(serde_json::to_string(&p).ok().as_deref(), Some(r#"{"v":1,"position":7,"object":"ab.7"}"#));
        assert_eq!(version(br#"{"v":2,"position":7,"object":"ab.7","more":1}"#), Some(2));
        // An older snapshot stored in the KV value is not mistaken for one.
        let legacy = crate::wire::encode(&(1u8, 2u64));
        assert!(serde_json::from_slice::<Pointer>(&legacy).is_err());
        assert_eq!(version(&legacy), None);
    }

    /// Checkpoints written before GroupInfos were kept still restore.
    #[test]
    fn snapshots_of_either_layout_decode() {
        #[derive(Serialize)]
        struct V1 {
            storage: Vec<(Vec<u8>, Vec<u8>)>,
            last_subject_seq: u64,
            position: u64,
            recent: Vec<(String, u64, u64)>,
            commits: Vec<(u64, u64)>,
        }
        let old = crate::wire::encode(&V1 {
            storage: vec![(b"k".to_vec(), b"v".to_vec())],
            last_subject_seq: 9,
            position: 4,
            recent: vec![("s".into(), 4, 1)],
            commits: vec![(0, 3)],
        });
        let s = Snapshot::decode(&old).expect("v1 decodes");
        assert_eq!((s.position, s.last_subject_seq, s.group_info), (4, 9, None));
        let gi = PublishedGroupInfo { epoch: 2, position: 5, message: vec![0, 1, 0, 4] };
        let new = Snapshot { position: 5, group_info: Some(gi.clone()), ..Default::default() }.encode();
        assert_eq!(Snapshot::decode(&new).and_then(|s| s.group_info), Some(gi));
        assert!(Snapshot::decode(b"junk").is_none());
    }
}
