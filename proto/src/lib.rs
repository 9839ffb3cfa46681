//! Types shared by every mlsfed crate: identifiers, the wire error codes, the
//! records that travel through JetStream, the names of every subject, stream and
//! bucket, and the key-less inspection of MLS messages that servers are allowed
//! to do (RFC 9420 §6: group_id, epoch and content_type are in the clear).
#![forbid(unsafe_code)]

pub mod auth;
pub mod batch;
pub mod checkpoint;
pub mod direct;
pub mod error;
pub mod federation;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod mls;
pub mod names;
pub mod partitions;
pub mod roster;
pub mod streams;
pub mod trace;
pub mod wire;

pub use error::{ApiError, ErrorCode};

/// Wall-clock now in unix seconds (0 before 1970): token expiry, record
/// times. Waits and timers go through tokio instead.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
pub use ids::{DeviceId, GroupId, UserId};
