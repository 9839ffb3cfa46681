//! Durable checkpoints of groups' public state.
//!
//! LOG entries expire (`streams.log_max_age_secs`), so a group's public
//! state must never depend on them: it is checkpointed after every change.
//! A checkpoint is an object in the `mlsfed_state` object store (chunked,
//! so a 1000-member group's state is not bound by NATS' max payload), named
//! by group and position, plus a small pointer in the `mlsfed_groups` KV
//! bucket that names the latest one. The pointer moves by compare-and-set
//! and only forward, so two sequencer processes that briefly share a
//! partition can never put an older state back; the object it no longer
//! names is deleted afterwards.

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use proto::checkpoint::{version, Pointer, Reader, POINTER_VERSION};
use proto::{names, GroupId};

use crate::state::GroupState;

/// Chunks of a checkpoint object: a quarter of NATS' default max payload,
/// so a 1 MiB state is four publishes.
const CHUNK_BYTES: usize = 256 * 1024;
/// Rounds of reading and moving the pointer before a save gives up (each
/// lost round means another process moved it meanwhile).
const POINTER_ROUNDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckpointError {
    #[error("cannot store the checkpoint object: {0}")]
    Object(String),
    #[error("cannot move the checkpoint pointer: {0}")]
    Pointer(String),
    #[error(transparent)]
    Read(#[from] proto::checkpoint::ReadCheckpointError),
    /// Written by a newer version: refused by name, never overwritten by a
    /// replay of ours.
    #[error("the checkpoint pointer has format {0}, newer than this sequencer's")]
    Newer(u32),
}

/// What a load found.
pub(crate) enum Found {
    /// No checkpoint: a group that does not exist (or was never
    /// checkpointed), whose LOG is all there is.
    Absent,
    /// The state as of its checkpoint.
    State(GroupState),
    /// A whole snapshot in the KV value itself, as written before
    /// checkpoints were objects: usable, but due to be checkpointed anew.
    Legacy(GroupState),
    /// A checkpoint exists but cannot be used (the reason): the caller
    /// replays the LOG from its start, which works only while retention has
    /// deleted none of the group's entries.
    Unusable(String),
}

pub(crate) struct Checkpoints {
    reader: Reader,
    pointers: kv::Store,
    objects: object_store::ObjectStore,
    objects_stream: jetstream::stream::Stream,
    cleanup_failures: prometheus::IntCounter,
}

impl Checkpoints {
    pub(crate) fn new(topo: &proto::streams::Topology, cleanup_failures: prometheus::IntCounter) -> Self {
        Self {
            reader: Reader::new(topo),
            pointers: topo.groups.clone(),
            objects: topo.state.clone(),
            objects_stream: topo.state_stream.clone(),
            cleanup_failures,
        }
    }

    /// Stores `bytes`, the state of `group` at `position`, and moves the
    /// group's pointer to it unless it already names a checkpoint at least
    /// as recent.
    pub(crate) async fn save(&self, group: &GroupId, position: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let object = names::state_object(group, position);
        // async-nats reads the object through a buffer of the chunk size:
        // a small state gets a chunk of its own size, not 256 KiB allocated
        // (and paged in) for every checkpoint.
        let chunk_size = bytes.len().clamp(1, CHUNK_BYTES);
        let meta =
            object_store::ObjectMetadata { name: object.clone(), chunk_size: Some(chunk_size), ..Default::default() };
        let mut reader = bytes;
        self.objects.put(meta, &mut reader).await.map_err(|e| CheckpointError::Object(e.to_string()))?;
        let pointer = Pointer { v: POINTER_VERSION, position, object: object.clone() };
        let value = Bytes::from(serde_json::to_vec(&pointer).map_err(|e| CheckpointError::Pointer(e.to_string()))?);
        let key = names::group_key(group);
        for _ in 0..POINTER_ROUNDS {
            let current =
                self.pointers.entry(key.as_str()).await.map_err(|e| CheckpointError::Pointer(e.to_string()))?;
            let live = current.as_ref().filter(|e| e.operation == kv::Operation::Put);
            if let Some(v) = live.and_then(|e| version(&e.value)).filter(|v| *v > POINTER_VERSION) {
                return Err(CheckpointError::Newer(v));
            }
            let previous = live.and_then(|e| serde_json::from_slice::<Pointer>(&e.value).ok());
            if let Some(p) = previous.as_ref().filter(|p| p.position >= position) {
                // A checkpoint at least as recent is in place: another
                // process got further, or this is a retry of one that
                // moved the pointer already.
                if p.object != object {
                    self.discard(&object).await;
                }
                return Ok(());
            }
            let moved = match &current {
                // Also over a deleted key's tombstone, or a value this
                // version cannot read (a snapshot of the older format).
                Some(e) => self
                    .pointers
                    .update(key.as_str(), value.clone(), e.revision)
                    .await
                    .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
                None => self
                    .pointers
                    .create(key.as_str(), value.clone())
                    .await
                    .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
            };
            match moved {
                Ok(_) => {
                    if let Some(p) = previous.filter(|p| p.object != object) {
                        self.discard(&p.object).await;
                    }
                    return Ok(());
                }
                // Another process moved the pointer between our read and
                // our write: read it again.
                Err((true, _)) => continue,
                Err((false, e)) => return Err(CheckpointError::Pointer(e)),
            }
        }
        Err(CheckpointError::Pointer("the pointer kept moving under this process".into()))
    }

    /// The latest checkpoint of `group`. `Err`: NATS did not answer, or
    /// the pointer is of a newer format; the caller tries again later
    /// rather than replay a LOG that may be gone.
    pub(crate) async fn load(&self, group: &GroupId) -> Result<Found, CheckpointError> {
        Ok(match self.reader.load(group).await? {
            proto::checkpoint::Found::Absent => Found::Absent,
            proto::checkpoint::Found::Legacy(bytes) => match GroupState::restore(group, &bytes) {
                Some(s) => Found::Legacy(s),
                None => Found::Unusable("the pointer is unreadable".into()),
            },
            proto::checkpoint::Found::Object { position, bytes } => match GroupState::restore(group, &bytes) {
                Some(s) if s.position == position => Found::State(s),
                Some(s) => {
                    Found::Unusable(format!("the object holds position {}, its pointer says {position}", s.position))
                }
                None => Found::Unusable("the object is not a readable state".into()),
            },
            proto::checkpoint::Found::Unusable(reason) => Found::Unusable(reason),
        })
    }

    /// Deletes an object no pointer names any more, and the tombstone that
    /// deleting leaves. A failure only leaves an orphan behind (counted).
    async fn discard(&self, object: &str) {
        let deleted = match self.objects.delete(object).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        let purged = match deleted {
            Ok(()) => self
                .objects_stream
                .purge()
                .filter(names::state_object_meta_subject(object))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = purged {
            self.cleanup_failures.inc();
            tracing::warn!(error = %e, "cannot delete a superseded checkpoint; it stays as an orphan");
        }
    }
}
