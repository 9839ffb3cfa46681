//! What crosses between operators. Every envelope names its origin and its
//! destination, carries the origin's outbox sequence (for the receiver's
//! per-peer high-water mark), and is signed with the origin operator's
//! Ed25519 key (design decision 5).

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::{DeviceId, UserId};
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
    /// Strictly increasing per (origin, destination): the origin's outbox
    /// sequence of the last record carried. Receivers drop anything at or
    /// below their high-water mark.
    pub seq: u64,
    /// A bounded batch of outbox records, in outbox order.
    pub payloads: Vec<Payload>,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcEnvelope<T> {
    pub version: u16,
    pub origin: String,
    pub destination: String,
    /// Unix seconds; receivers refuse requests older than a minute.
    pub sent_at: u64,
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
