//! Records that travel through JetStream between the workers of one operator.
//! They are postcard-encoded: compact, and a decode failure of a record we
//! wrote ourselves is a bug worth a dead letter, not a client error.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::ApiError;
use crate::ids::{DeviceId, GroupId};

/// A client submission, as the ingest worker stores it in SUBMIT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// Also the `Nats-Msg-Id`: equal submissions are stored once.
    pub id: String,
    /// The authenticated device that submitted it.
    pub device: DeviceId,
    pub group: GroupId,
    pub kind: SubmissionKind,
    /// The peer operator that forwarded it (None: one of our devices). The
    /// hub sends the verdict back there.
    pub origin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmissionKind {
    /// Register a new group at this hub from the creator's epoch-0 GroupInfo
    /// (which must carry the ratchet_tree extension, RFC 9420 §12.4.3.3).
    Create { group_info: Vec<u8> },
    /// An MLSMessage (PrivateMessage application message, or PublicMessage
    /// Proposal/Commit), with the Commit's Welcome and GroupInfo if any.
    Message { message: Vec<u8>, welcome: Option<Vec<u8>>, group_info: Option<Vec<u8>> },
}

/// The sequencer's decision on one submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accepted { position: u64, epoch: u64 },
    Rejected(ApiError),
}

/// What an accepted log entry is. Mirrors RFC 9420 ContentType plus the
/// creation record that starts every group log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Created,
    Application,
    Proposal,
    Commit,
    Welcome,
    /// A message from the operator to the device (e.g. replenish KeyPackages).
    Notice,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Created => "created",
            EntryKind::Application => "application",
            EntryKind::Proposal => "proposal",
            EntryKind::Commit => "commit",
            EntryKind::Welcome => "welcome",
            EntryKind::Notice => "notice",
        }
    }
}

/// One entry of a group's LOG: the hub's total order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub group: GroupId,
    /// 1-based, gapless hub position in the group.
    pub position: u64,
    /// The position of the previous entry this operator receives for the
    /// group: `position - 1` at the hub; at a follower, the previous entry
    /// the hub sent it (followers get only entries with local recipients).
    pub prev_position: u64,
    /// The epoch the message was sent in (for Created: 0).
    pub epoch: u64,
    pub kind: EntryKind,
    pub sender: DeviceId,
    pub submission_id: String,
    /// The MLSMessage bytes (for Created: the GroupInfo).
    pub message: Vec<u8>,
    /// For a Commit: the devices it removes (they read up to and including
    /// it). Empty otherwise: who reads an entry is the group's roster
    /// (`roster::Roster`), never a list copied into every entry.
    pub removed: Vec<DeviceId>,
    /// For a Commit that adds members: the Welcome, released only because the
    /// Commit was accepted, for the devices it adds.
    pub welcome: Option<Vec<u8>>,
    pub welcome_recipients: Vec<DeviceId>,
}

/// One item in a device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxItem {
    /// None for operator notices.
    pub group: Option<GroupId>,
    pub position: u64,
    pub epoch: u64,
    pub kind: EntryKind,
    /// True when the recipient device is the one that submitted it: its client
    /// merges its pending Commit (or skips its own application message) here.
    pub own: bool,
    /// Empty in a device's Welcome item: the Welcome is stored once for
    /// all the devices it adds, as a whole item at
    /// [`crate::names::welcome_subject`] of `group` and `position` in the
    /// same stream. (An item with the bytes here is read as it is.)
    pub message: Vec<u8>,
    /// For a Welcome: the sequence of its Commit in this operator's LOG, so
    /// the new member reads the group's entries after it.
    pub log_seq: u64,
}

impl Verdict {
    /// Verdicts carry an [`ApiError`], whose optional fields are skipped in
    /// JSON; postcard is not self-describing, so verdicts travel as JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(b)
    }
}

/// Every record we store or send (JetStream, KV, federation) starts with
/// this marker and a format version, so a process can tell an older record
/// (convert it) or a newer one (refuse it, explicitly) from a broken one.
/// The marker cannot begin a record of format 0 (before versions): no
/// record of ours starts with a postcard length of that size.
pub const RECORD_MARKER: [u8; 2] = [0xF5, 0x4D];
/// The format version this build writes.
pub const RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record format version {0} is newer than this build reads ({RECORD_VERSION})")]
    Version(u8),
    #[error("record is malformed: {0}")]
    Malformed(#[from] postcard::Error),
}

impl DecodeError {
    /// A closed set for metric labels and dead-letter reasons.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::Version(_) => "unsupported_version",
            DecodeError::Malformed(_) => "malformed",
        }
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&RECORD_MARKER);
    out.push(RECORD_VERSION);
    // postcard only fails on types it cannot represent; ours are all plain.
    postcard::to_extend(v, out).unwrap_or_default()
}

/// Reads a record of this version, or of format 0 (written before records
/// carried versions, with the same layout); refuses a newer one.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, DecodeError> {
    match b {
        [m0, m1, version, rest @ ..] if [*m0, *m1] == RECORD_MARKER => match *version {
            RECORD_VERSION => Ok(postcard::from_bytes(rest)?),
            v => Err(DecodeError::Version(v)),
        },
        legacy => Ok(postcard::from_bytes(legacy)?),
    }
}

/// An operator notice to one device (JSON in a mailbox item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// The device's one-time KeyPackages for `cipher_suite` fell below the
    /// operator's low-water mark: upload more.
    KeyPackagesLow { cipher_suite: u16, remaining: usize },
    /// The device was removed from `group` by the Commit at `position`.
    Removed { group: String, position: u64 },
}

/// A content-derived submission id: the same device submitting the same bytes
/// is the same submission, so a client's blind retry is harmless.
pub fn submission_id(device: &DeviceId, parts: &[&[u8]]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(device.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

/// Whether `s` is an id `submission_id` makes (32 lowercase hex digits).
/// A peer chooses the ids of the submissions it forwards, and they become
/// `Nats-Msg-Id` headers, subjects and KV keys here: anything else is
/// refused before it goes near one (a line break in a header value is a
/// panic in the NATS client).
pub fn is_submission_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn records_carry_their_version() {
        let v = Verdict::Accepted { position: 3, epoch: 1 };
        let bytes = encode(&v);
        assert_eq!(&bytes[..3], &[0xF5, 0x4D, RECORD_VERSION]);
        assert_eq!(decode::<Verdict>(&bytes).unwrap(), v);
        // Format 0: the bare postcard of the same layout is converted.
        let legacy = postcard::to_allocvec(&v).unwrap();
        assert_eq!(decode::<Verdict>(&legacy).unwrap(), v);
        // A newer format is refused by name, never mistaken for garbage.
        let mut newer = bytes.clone();
        newer[2] = RECORD_VERSION + 1;
        assert!(matches!(decode::<Verdict>(&newer), Err(DecodeError::Version(_))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_ids() {
        let d = DeviceId::parse("mimi://a.example/d/alice/one").unwrap();
        let e = LogEntry {
            group: GroupId::parse("mimi://a.example/r/x").unwrap(),
            position: 3,
            prev_position: 2,
            epoch: 1,
            kind: EntryKind::Commit,
            sender: d.clone(),
            submission_id: "x".into(),
            message: vec![1, 2, 3],
            removed: vec![d.clone()],
            welcome: None,
            welcome_recipients: vec![],
        };
        assert_eq!(decode::<LogEntry>(&encode(&e)).unwrap(), e);
        assert!(decode::<LogEntry>(&[0xff, 0xff]).is_err());
        let mut err = ApiError::new(crate::ErrorCode::WrongEpoch, "x");
        err.current_epoch = Some(3);
        for v in [
            Verdict::Accepted { position: 1, epoch: 2 },
            Verdict::Rejected(err),
            Verdict::Rejected(ApiError::new(crate::ErrorCode::NotAMember, "y")),
        ] {
            assert_eq!(Verdict::from_bytes(&v.to_bytes()).unwrap(), v);
        }
        assert_eq!(submission_id(&d, &[b"ab", b"c"]), submission_id(&d, &[b"ab", b"c"]));
        assert_ne!(submission_id(&d, &[b"ab", b"c"]), submission_id(&d, &[b"a", b"bc"]));
        assert!(is_submission_id(&submission_id(&d, &[b"x"])));
        for bad in ["", "runaway", "0123456789abcdef0123456789ABCDEF", "0123456789abcdef0123456789abcde\n"] {
            assert!(!is_submission_id(bad), "{bad:?}");
        }
    }
}

/// A message a worker gave up on (`MLSFED_DEAD`), JSON so an operator can
/// read it; `payload` is the original record, base64, unless that would not
/// fit in one NATS message (`payload_omitted`): the record then stays only
/// where it was, for as long as that stream keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Format version of this record.
    pub v: u8,
    pub role: String,
    /// Why (a closed set per role, e.g. `predecessor_missing`).
    pub reason: String,
    /// What the last attempt said.
    pub detail: String,
    pub stream: String,
    pub stream_seq: u64,
    pub subject: String,
    pub delivered: u64,
    pub payload: String,
    /// The record was too large to copy here (base64 in JSON is a third
    /// larger than the record): `payload` is empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_omitted: bool,
}
