//! Storage behind the key directory: a small trait with two
//! implementations, sled (embedded, one process) and JetStream (many keydir
//! processes). One conformance suite (tests/tests/keydir.rs) runs against
//! both.

use std::future::Future;

use proto::{DeviceId, UserId};
use serde::{Deserialize, Serialize};

/// What a leaf node says it supports (RFC 9420 §7.2), kept so claims can be
/// filtered without parsing every KeyPackage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Caps {
    pub extensions: Vec<u16>,
    pub proposals: Vec<u16>,
    pub credentials: Vec<u16>,
}

impl Caps {
    pub fn covers(&self, required: &Caps) -> bool {
        required.extensions.iter().all(|e| self.extensions.contains(e))
            && required.proposals.iter().all(|p| self.proposals.contains(p))
            && required.credentials.iter().all(|c| self.credentials.contains(c))
    }
}

/// A stored KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub kp_ref: Vec<u8>,
    pub suite: u16,
    pub not_after: u64,
    pub caps: Caps,
    /// The MLSMessage(KeyPackage) bytes as uploaded.
    pub bytes: Vec<u8>,
}

/// A one-time KeyPackage handed to a claimer and not yet seen in a Welcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub device: DeviceId,
    pub claimer: DeviceId,
    /// Unix seconds of the claim.
    pub at: u64,
    pub stored: Stored,
}

/// The outcome of trying to take one one-time KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    Taken(Stored),
    /// The pool holds KeyPackages, but none the claimer accepts.
    NoneCompatible,
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("jetstream: {0}")]
    JetStream(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Every operation is atomic on its own; `take_one_time` and
/// `take_reservation` hand a record to at most one caller, however many
/// keydir processes share the store.
pub trait KeyStore: Send + Sync {
    fn put_one_time(&self, d: &DeviceId, s: &Stored) -> impl Future<Output = Result<()>> + Send;
    /// Replaces the device's last-resort KeyPackage for `s.suite`.
    fn put_last_resort(&self, d: &DeviceId, s: &Stored) -> impl Future<Output = Result<()>> + Send;
    fn last_resort(&self, d: &DeviceId, suite: u16) -> impl Future<Output = Result<Option<Stored>>> + Send;
    /// Takes one non-expired one-time KeyPackage that `accept` allows and
    /// records it as reserved for `claimer`, so that a crash in between can
    /// neither lose it nor leave it claimable twice; expired ones met on the
    /// way are deleted.
    fn take_one_time(
        &self,
        d: &DeviceId,
        suite: u16,
        now: u64,
        accept: &(dyn Fn(&Stored) -> bool + Sync),
        claimer: &DeviceId,
    ) -> impl Future<Output = Result<Take>> + Send;
    /// Returns a released KeyPackage to its pool. `return_id` names this
    /// return (the KeyPackage and the reservation it ends), so processes
    /// that release the same reservation at once return it once; it differs
    /// from the upload's id, whose dedup must not swallow the return.
    fn put_back(&self, d: &DeviceId, s: &Stored, return_id: &str) -> impl Future<Output = Result<()>> + Send {
        let _ = return_id;
        self.put_one_time(d, s)
    }
    /// Whether this one-time KeyPackage is in its pool.
    fn has_one_time(&self, d: &DeviceId, s: &Stored) -> impl Future<Output = Result<bool>> + Send;
    fn count_one_time(&self, d: &DeviceId, suite: u16) -> impl Future<Output = Result<usize>> + Send;
    /// Like `count_one_time`, but may stop counting at `limit` (the claim
    /// path only needs to know whether the stock is below the low-water
    /// mark, and a full count can be costly).
    fn count_up_to(&self, d: &DeviceId, suite: u16, limit: usize) -> impl Future<Output = Result<usize>> + Send {
        async move { Ok(self.count_one_time(d, suite).await?.min(limit)) }
    }
    /// Deletes expired one-time KeyPackages of `d`; returns how many.
    fn sweep(&self, d: &DeviceId, suite: u16, now: u64) -> impl Future<Output = Result<usize>> + Send;

    fn add_device(&self, u: &UserId, d: &DeviceId) -> impl Future<Output = Result<()>> + Send;
    fn devices(&self, u: &UserId) -> impl Future<Output = Result<Vec<DeviceId>>> + Send;
    /// Forgets the device and deletes all its KeyPackages.
    fn remove_device(&self, d: &DeviceId, suites: &[u16]) -> impl Future<Output = Result<()>> + Send;

    fn put_reservation(&self, r: &Reservation) -> impl Future<Output = Result<()>> + Send;
    fn take_reservation(&self, kp_ref: &[u8]) -> impl Future<Output = Result<Option<Reservation>>> + Send;
    /// Reservations claimed at or before `before` (unix seconds).
    fn reservations_before(&self, before: u64) -> impl Future<Output = Result<Vec<Reservation>>> + Send;

    fn put_binding(&self, d: &DeviceId, signed: &[u8]) -> impl Future<Output = Result<()>> + Send;
    /// Marks `d` removed, for good: a record of its own that nothing
    /// overwrites, so a binding written concurrently cannot undo it.
    fn put_revoked(&self, d: &DeviceId) -> impl Future<Output = Result<()>> + Send;
    fn is_revoked(&self, d: &DeviceId) -> impl Future<Output = Result<bool>> + Send;
    fn binding(&self, d: &DeviceId) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    proto::wire::encode(v)
}

pub(crate) fn dec<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    proto::wire::decode(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}
