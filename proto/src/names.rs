//! Every NATS subject, stream, consumer and KV bucket name, built here and
//! nowhere else, so that a rename or a new partition scheme is one change.
//! Identifier tokens are hex (see `ids::*::token`), which keeps subjects legal
//! whatever bytes a hostile client puts in an identifier.

use crate::ids::{DeviceId, GroupId};

pub const PREFIX: &str = "mlsfed";

/// Submissions waiting for the sequencer: `mlsfed.submit.<group>` (WorkQueue).
pub const SUBMIT_STREAM: &str = "MLSFED_SUBMIT";
pub const SUBMIT_WILDCARD: &str = "mlsfed.submit.*";
/// The per-group total order: `mlsfed.log.<group>` (Limits, direct get).
pub const LOG_STREAM: &str = "MLSFED_LOG";
pub const LOG_WILDCARD: &str = "mlsfed.log.*";
/// Per-device mailboxes: `mlsfed.mbox.<device>` (Limits, direct get).
pub const MAILBOX_STREAM: &str = "MLSFED_MAILBOX";
pub const MAILBOX_WILDCARD: &str = "mlsfed.mbox.*";

/// Group public-state snapshots (a cache; LOG is the truth).
pub const GROUPS_BUCKET: &str = "mlsfed_groups";
/// Per-group fan-out cursor: the last hub position delivered to every mailbox.
pub const FANOUT_BUCKET: &str = "mlsfed_fanout";
/// Verdicts of recent submissions, for clients that retry after a timeout.
pub const VERDICTS_BUCKET: &str = "mlsfed_verdicts";

pub const SEQUENCER_CONSUMER: &str = "sequencer";
pub const FANOUT_CONSUMER: &str = "fanout";

pub fn submit_subject(g: &GroupId) -> String {
    format!("{PREFIX}.submit.{}", g.token())
}

pub fn log_subject(g: &GroupId) -> String {
    format!("{PREFIX}.log.{}", g.token())
}

pub fn mailbox_subject(d: &DeviceId) -> String {
    format!("{PREFIX}.mbox.{}", d.token())
}

/// Core-NATS subject on which the sequencer announces a submission's verdict.
pub fn verdict_subject(submission_id: &str) -> String {
    format!("{PREFIX}.verdict.{submission_id}")
}

/// KV key of a group (groups and fanout buckets).
pub fn group_key(g: &GroupId) -> String {
    g.token()
}

/// `Nats-Msg-Id` of a group's log entry: the submission it came from, so a
/// sequencer that crashed between append and ack cannot append it twice.
pub fn log_msg_id(submission_id: &str) -> String {
    format!("log-{submission_id}")
}

/// `Nats-Msg-Id` of one mailbox delivery: redelivered fan-out is dropped by the
/// stream's duplicate window.
pub fn mailbox_msg_id(g: &GroupId, position: u64, d: &DeviceId) -> String {
    // The ids can be long; a digest keeps the header short and fixed-size.
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(g.as_bytes());
    h.update(position.to_be_bytes());
    h.update(d.as_bytes());
    format!("mb-{}", hex::encode(&h.finalize()[..16]))
}

/// `Nats-Msg-Id` of a low-stock notice: one per stock level, so concurrent
/// claims that see the same level notify once.
pub fn notice_msg_id(d: &DeviceId, suite: u16, remaining: usize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(d.as_bytes());
    format!(
        "nt-{}-{suite}-{remaining}",
        hex::encode(&h.finalize()[..12])
    )
}

/// Header names carried on JetStream messages.
pub mod headers {
    pub const POSITION: &str = "Mlsfed-Position";
    pub const EPOCH: &str = "Mlsfed-Epoch";
    pub const KIND: &str = "Mlsfed-Kind";
}

/// KeyPackages of the JetStream key directory backend:
/// `mlsfed.kp.ot.<device>.<suite>.<ref>` (one message per one-time KeyPackage;
/// deleting its message is the atomic claim) and `mlsfed.kp.res.<ref>`
/// (reservations of claimed KeyPackages).
pub const KEYPACKAGES_STREAM: &str = "MLSFED_KEYPACKAGES";
pub const KEYPACKAGES_WILDCARD: &str = "mlsfed.kp.>";
pub const RESERVATIONS_WILDCARD: &str = "mlsfed.kp.res.*";
/// Small keydir records: last-resort KeyPackages, device lists, bindings.
pub const KEYDIR_BUCKET: &str = "mlsfed_keydir";

pub fn key_package_subject(d: &DeviceId, suite: u16, kp_ref: &[u8]) -> String {
    format!(
        "{PREFIX}.kp.ot.{}.{suite}.{}",
        d.token(),
        hex::encode(kp_ref)
    )
}

pub fn key_packages_of(d: &DeviceId, suite: u16) -> String {
    format!("{PREFIX}.kp.ot.{}.{suite}.*", d.token())
}

pub fn reservation_subject(kp_ref: &[u8]) -> String {
    format!("{PREFIX}.kp.res.{}", hex::encode(kp_ref))
}

pub fn key_package_msg_id(kp_ref: &[u8]) -> String {
    format!("kp-{}", hex::encode(kp_ref))
}

pub fn last_resort_key(d: &DeviceId, suite: u16) -> String {
    format!("lr.{}.{suite}", d.token())
}

pub fn user_devices_key(u: &crate::ids::UserId) -> String {
    format!("user.{}", u.token())
}

pub fn binding_key(d: &DeviceId) -> String {
    format!("bind.{}", d.token())
}
