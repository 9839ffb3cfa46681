//! Identity bindings: the operator, acting as the authentication service
//! (RFC 9750 §5.3), vouches that a signature public key belongs to one of its
//! devices, until an expiry, by signing the binding with its Ed25519 key.
//! Clients check every member's credential against its binding before they
//! accept a Welcome or add a member.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, UserId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub device: DeviceId,
    pub user: UserId,
    /// The device's MLS signature public key (base64).
    pub signature_key: String,
    pub issued_at: u64,
    pub not_after: u64,
    /// A removed device's binding stays, revoked, so lookups can say so.
    pub revoked: bool,
}

/// What the API returns: the exact signed bytes, so any client can verify
/// them without a canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBinding {
    /// base64 of the JSON of a [`Binding`].
    pub binding: String,
    /// base64 Ed25519 signature over the decoded `binding` bytes.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyBindingError {
    #[error("binding is malformed")]
    Malformed,
    #[error("binding signature does not verify")]
    BadSignature,
    #[error("binding is for another device")]
    WrongDevice,
    #[error("binding has expired")]
    Expired,
    #[error("device has been revoked")]
    Revoked,
    #[error("member key does not match the operator's binding")]
    KeyMismatch,
}

pub fn operator_key(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(seed)
}

pub fn public_key_b64(key: &SigningKey) -> String {
    B64.encode(key.verifying_key().to_bytes())
}

pub fn sign(key: &SigningKey, b: &Binding) -> SignedBinding {
    let bytes = serde_json::to_vec(b).unwrap_or_default();
    let sig = key.sign(&bytes);
    SignedBinding { binding: B64.encode(&bytes), signature: B64.encode(sig.to_bytes()) }
}

impl SignedBinding {
    /// Verifies the signature with the operator's public key (base64) and
    /// returns the binding, whatever its state.
    pub fn open(&self, operator_key_b64: &str) -> Result<Binding, VerifyBindingError> {
        let key: [u8; 32] =
            B64.decode(operator_key_b64).ok().and_then(|k| k.try_into().ok()).ok_or(VerifyBindingError::Malformed)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| VerifyBindingError::Malformed)?;
        let bytes = B64.decode(&self.binding).map_err(|_| VerifyBindingError::Malformed)?;
        let sig: [u8; 64] =
            B64.decode(&self.signature).ok().and_then(|s| s.try_into().ok()).ok_or(VerifyBindingError::Malformed)?;
        key.verify(&bytes, &Signature::from_bytes(&sig)).map_err(|_| VerifyBindingError::BadSignature)?;
        serde_json::from_slice(&bytes).map_err(|_| VerifyBindingError::Malformed)
    }

    /// Checks that `device` holds `signature_key` now.
    pub fn check(
        &self,
        operator_key_b64: &str,
        device: &DeviceId,
        signature_key: &[u8],
        now: u64,
    ) -> Result<Binding, VerifyBindingError> {
        let b = self.open(operator_key_b64)?;
        if &b.device != device {
            return Err(VerifyBindingError::WrongDevice);
        }
        if b.revoked {
            return Err(VerifyBindingError::Revoked);
        }
        if b.not_after <= now {
            return Err(VerifyBindingError::Expired);
        }
        if B64.decode(&b.signature_key).map_err(|_| VerifyBindingError::Malformed)? != signature_key {
            return Err(VerifyBindingError::KeyMismatch);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_check() {
        let k = operator_key(&[7; 32]);
        let pk = public_key_b64(&k);
        let d = DeviceId::parse("mimi://a.example/d/alice/one").unwrap();
        let b = Binding {
            device: d.clone(),
            user: d.user(),
            signature_key: B64.encode([1, 2, 3]),
            issued_at: 1,
            not_after: 100,
            revoked: false,
        };
        let s = sign(&k, &b);
        assert!(s.check(&pk, &d, &[1, 2, 3], 50).is_ok());
        assert_eq!(s.check(&pk, &d, &[1, 2, 4], 50), Err(VerifyBindingError::KeyMismatch));
        assert_eq!(s.check(&pk, &d, &[1, 2, 3], 100), Err(VerifyBindingError::Expired));
        let other = public_key_b64(&operator_key(&[8; 32]));
        assert_eq!(s.check(&other, &d, &[1, 2, 3], 50), Err(VerifyBindingError::BadSignature));
        let revoked = sign(&k, &Binding { revoked: true, ..b });
        assert_eq!(revoked.check(&pk, &d, &[1, 2, 3], 50), Err(VerifyBindingError::Revoked));
    }
}
