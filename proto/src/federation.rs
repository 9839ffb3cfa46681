//! What crosses between operators. Every envelope names its origin and its
//! destination, carries the origin's outbox sequence (for the receiver's
//! per-peer high-water mark), and is signed with the origin operator's
//! Ed25519 key (design decision 5).

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::{DeviceId, GroupId, UserId};
use crate::wire::{LogEntry, Submission, Verdict};

/// The federation protocol versions this build speaks, newest last.
pub const VERSIONS: &[u16] = &[1];

/// Records in our outbox (FED_OUT), before the bridge signs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A follower forwards its device's submission to the group's hub.
    Submit(Submission),
    /// The hub answers a forwarded submission.
    Verdict { submission_id: String, verdict: Verdict },
    /// The hub hands an accepted entry to an operator with members in the
    /// group; `recipients` and `welcome_recipients` are that operator's
    /// devices only, and `prev_position` the previous entry it was sent.
    Deliver(LogEntry),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub origin: String,
    pub destination: String,
    /// Which incarnation of the origin's outbox stream `seq` counts in (its
    /// creation time, unix nanoseconds). A recreated outbox starts its
    /// sequence again from 1 under a larger `outbox`.
    pub outbox: u64,
    /// Strictly increasing per (origin, destination, outbox): the origin's
    /// outbox sequence of the last record carried. Receivers drop anything
    /// at or below their high-water mark.
    pub seq: u64,
    /// A bounded batch of outbox records, in outbox order.
    pub payloads: Vec<Payload>,
}

/// A peer's high-water mark as the receiver stores it (KV
/// `mlsfed_federation`, JSON so an operator can read it). It moves only when
/// an envelope's records were applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Format version of this record.
    pub v: u8,
    /// The `Envelope::outbox` incarnation `seq` counts in.
    pub outbox: u64,
    pub seq: u64,
    /// Set by an operator (`mlsfed peer reset-mark`): the next envelope
    /// from the peer is taken whatever its sequence.
    #[serde(default)]
    pub reset: bool,
}

/// What the receiver does with an envelope, given the peer's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkCheck {
    /// Newer than the mark: apply it.
    Apply,
    /// The first envelope of a newer incarnation of the peer's outbox.
    ApplyRestarted,
    /// The first envelope after an operator's reset.
    ApplyAfterReset,
    /// At or below the mark, or from an older outbox: already applied.
    Replay,
    /// Further ahead of the mark than `max_jump`.
    TooFarAhead,
}

impl Mark {
    pub const VERSION: u8 = 1;

    /// Reads a stored mark; the bare decimal sequence of earlier versions
    /// counts as the first incarnation.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(m) = serde_json::from_slice::<Mark>(bytes) {
            return Some(m);
        }
        let seq = std::str::from_utf8(bytes).ok()?.trim().parse().ok()?;
        Some(Mark { v: Self::VERSION, outbox: 0, seq, reset: false })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None`: no mark yet (the first envelope from this peer).
    pub fn check(mark: Option<&Mark>, outbox: u64, seq: u64, max_jump: u64) -> MarkCheck {
        let Some(m) = mark else { return MarkCheck::Apply };
        if m.reset {
            return MarkCheck::ApplyAfterReset;
        }
        if m.outbox != 0 && outbox != m.outbox {
            // Only a newer outbox may start over; an older one is a replay.
            return if outbox > m.outbox { MarkCheck::ApplyRestarted } else { MarkCheck::Replay };
        }
        if seq <= m.seq {
            MarkCheck::Replay
        } else if seq - m.seq > max_jump {
            MarkCheck::TooFarAhead
        } else {
            MarkCheck::Apply
        }
    }
}

/// Requests a peer answers directly (request/reply): key claims and identity
/// lookups for its users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Claim {
        requester: DeviceId,
        user: UserId,
        cipher_suites: Vec<u16>,
    },
    Identity {
        device: DeviceId,
    },
    /// Our capabilities; the answer carries the peer's.
    Capabilities(Capabilities),
    /// The current GroupInfo of a group the peer hosts, for a member device
    /// of ours that rejoins it (RFC 9420 §12.4.3.2).
    GroupInfo {
        requester: DeviceId,
        group: GroupId,
    },
    /// A member device of ours could not process the Commit at `position`
    /// of a group the peer hosts; the hub counts it.
    CommitReport {
        requester: DeviceId,
        group: GroupId,
        position: u64,
    },
}

/// What an operator speaks (design decision 7), exchanged signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Federation protocol versions.
    pub versions: Vec<u16>,
    /// MLS protocol versions (RFC 9420 §6: mls10 = 1).
    pub mls_versions: Vec<u16>,
    pub cipher_suites: Vec<u16>,
    pub max_message_bytes: u64,
}

/// The highest federation version both sides speak, provided they also
/// share an MLS version and a cipher suite.
pub fn negotiate(ours: &Capabilities, theirs: &Capabilities) -> Option<u16> {
    let common = |a: &[u16], b: &[u16]| a.iter().any(|x| b.contains(x));
    if !common(&ours.mls_versions, &theirs.mls_versions) || !common(&ours.cipher_suites, &theirs.cipher_suites) {
        return None;
    }
    ours.versions.iter().copied().filter(|v| theirs.versions.contains(v)).max()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Claimed KeyPackages: (device, suite, last_resort, MLSMessage bytes).
    Claimed(Vec<(DeviceId, u16, bool, Vec<u8>)>),
    /// A signed binding (JSON of `identity::SignedBinding`).
    Binding(Vec<u8>),
    Capabilities(Capabilities),
    Error(ApiError),
    GroupInfo(crate::checkpoint::PublishedGroupInfo),
    Reported,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcEnvelope<T> {
    pub version: u16,
    pub origin: String,
    pub destination: String,
    /// Unix seconds on the sender's clock. Receivers answer only requests
    /// within `federation.request_window_secs` of their own clock, either
    /// way, so realistic skew between operators is harmless.
    pub sent_at: u64,
    /// Random per request: a receiver answers each nonce once within the
    /// window, which is what makes a replayed request useless.
    pub nonce: [u8; 16],
    pub body: T,
}

/// Signed bytes: `body` is the postcard encoding of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenEnvelopeError {
    #[error("envelope is malformed")]
    Malformed,
    #[error("origin {0} is not a configured peer")]
    UnknownPeer(String),
    #[error("envelope signature does not verify")]
    BadSignature,
    #[error("envelope is addressed to {0}")]
    WrongDestination(String),
    #[error("federation version {0} is not supported")]
    Version(u16),
}

impl OpenEnvelopeError {
    /// A closed set for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            OpenEnvelopeError::Malformed => "malformed",
            OpenEnvelopeError::UnknownPeer(_) => "unknown_peer",
            OpenEnvelopeError::BadSignature => "bad_signature",
            OpenEnvelopeError::WrongDestination(_) => "wrong_destination",
            OpenEnvelopeError::Version(_) => "version",
        }
    }
}

pub fn seal<T: Serialize>(key: &SigningKey, envelope: &T) -> Vec<u8> {
    let body = crate::wire::encode(envelope);
    let signature = key.sign(&body).to_bytes().to_vec();
    crate::wire::encode(&Signed { body, signature })
}

/// Which peer an envelope claims to come from, and its public key.
pub trait PeerKeys {
    fn key_of(&self, domain: &str) -> Option<VerifyingKey>;
}

impl PeerKeys for std::collections::HashMap<String, VerifyingKey> {
    fn key_of(&self, domain: &str) -> Option<VerifyingKey> {
        self.get(domain).copied()
    }
}

/// Verifies a sealed envelope: a configured origin, its signature, our
/// domain as the destination, a version we speak.
pub fn open<T, K>(bytes: &[u8], keys: &K, us: &str) -> Result<T, OpenEnvelopeError>
where
    T: for<'a> Deserialize<'a> + Addressed,
    K: PeerKeys + ?Sized,
{
    let signed: Signed = crate::wire::decode(bytes).map_err(|_| OpenEnvelopeError::Malformed)?;
    let env: T = crate::wire::decode(&signed.body).map_err(|_| OpenEnvelopeError::Malformed)?;
    let key = keys.key_of(env.origin()).ok_or_else(|| OpenEnvelopeError::UnknownPeer(env.origin().to_owned()))?;
    let sig: [u8; 64] = signed.signature.as_slice().try_into().map_err(|_| OpenEnvelopeError::BadSignature)?;
    key.verify(&signed.body, &Signature::from_bytes(&sig)).map_err(|_| OpenEnvelopeError::BadSignature)?;
    if env.destination() != us {
        return Err(OpenEnvelopeError::WrongDestination(env.destination().to_owned()));
    }
    if !VERSIONS.contains(&env.version()) {
        return Err(OpenEnvelopeError::Version(env.version()));
    }
    Ok(env)
}

pub trait Addressed {
    fn origin(&self) -> &str;
    fn destination(&self) -> &str;
    fn version(&self) -> u16;
}

impl Addressed for Envelope {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn destination(&self) -> &str {
        &self.destination
    }
    fn version(&self) -> u16 {
        self.version
    }
}

impl<T> Addressed for RpcEnvelope<T> {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn destination(&self) -> &str {
        &self.destination
    }
    fn version(&self) -> u16 {
        self.version
    }
}

/// Parses a base64 Ed25519 public key.
pub fn verifying_key(b64: &str) -> Option<VerifyingKey> {
    use base64::Engine as _;
    let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD.decode(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn marks() {
        let m = Mark { v: 1, outbox: 10, seq: 100, reset: false };
        assert_eq!(Mark::check(None, 10, 5, 1000), MarkCheck::Apply);
        assert_eq!(Mark::check(Some(&m), 10, 100, 1000), MarkCheck::Replay);
        assert_eq!(Mark::check(Some(&m), 10, 101, 1000), MarkCheck::Apply);
        assert_eq!(Mark::check(Some(&m), 10, 1101, 1000), MarkCheck::TooFarAhead);
        assert_eq!(Mark::check(Some(&m), 11, 1, 1000), MarkCheck::ApplyRestarted);
        assert_eq!(Mark::check(Some(&m), 9, 5000, 1000), MarkCheck::Replay);
        let reset = Mark { reset: true, ..m };
        assert_eq!(Mark::check(Some(&reset), 10, 1 << 40, 1000), MarkCheck::ApplyAfterReset);
        assert_eq!(Mark::decode(b"42"), Some(Mark { v: 1, outbox: 0, seq: 42, reset: false }));
        assert_eq!(Mark::decode(&m.encode()), Some(m));
        // A mark from before incarnations existed takes the first one it sees.
        let legacy = Mark::decode(b"42").unwrap();
        assert_eq!(Mark::check(Some(&legacy), 77, 43, 1000), MarkCheck::Apply);
    }

    struct Keys(HashMap<String, VerifyingKey>);
    impl PeerKeys for Keys {
        fn key_of(&self, d: &str) -> Option<VerifyingKey> {
            self.0.get(d).copied()
        }
    }

    #[test]
    fn seal_open() {
        let a = crate::identity::operator_key(&[1; 32]);
        let keys = Keys(HashMap::from([("a.example".to_string(), a.verifying_key())]));
        let env = Envelope {
            version: 1,
            origin: "a.example".into(),
            destination: "b.example".into(),
            outbox: 1,
            seq: 7,
            payloads: vec![Payload::Verdict {
                submission_id: "x".into(),
                verdict: Verdict::Accepted { position: 1, epoch: 0 },
            }],
        };
        let sealed = seal(&a, &env);
        assert_eq!(open::<Envelope, _>(&sealed, &keys, "b.example"), Ok(env.clone()));
        assert!(matches!(
            open::<Envelope, _>(&sealed, &keys, "c.example"),
            Err(OpenEnvelopeError::WrongDestination(_))
        ));
        let mut forged: Signed = crate::wire::decode(&sealed).unwrap();
        forged.body[10] ^= 1;
        assert!(open::<Envelope, _>(&crate::wire::encode(&forged), &keys, "b.example").is_err());
        let other = crate::identity::operator_key(&[2; 32]);
        let impostor = seal(&other, &env);
        assert_eq!(open::<Envelope, _>(&impostor, &keys, "b.example"), Err(OpenEnvelopeError::BadSignature));
        let unknown = Envelope { origin: "z.example".into(), ..env };
        assert!(matches!(
            open::<Envelope, _>(&seal(&a, &unknown), &keys, "b.example"),
            Err(OpenEnvelopeError::UnknownPeer(_))
        ));
    }
}
