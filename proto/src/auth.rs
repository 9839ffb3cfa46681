//! Bearer tokens that bind a request to one device.
//!
//! An operator issues tokens with `mlsfed token --device <id>` (or its own
//! account system calling [`issue`]) from the secret in its config. A token is
//! `mft1.<b64url(device)>.<expiry unix seconds>.<b64url(HMAC-SHA256)>`; the
//! MAC covers everything before the last dot. Tokens are stateless, so every
//! ingest process verifies them without a shared session store.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::DeviceId;

const VERSION: &str = "mft1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyTokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is wrong")]
    BadMac,
    #[error("token has expired")]
    Expired,
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; the error case cannot happen.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

pub fn issue(secret: &[u8], device: &DeviceId, expires_unix: u64) -> String {
    let body = format!("{VERSION}.{}.{expires_unix}", B64.encode(device.as_bytes()));
    let mut m = mac(secret);
    m.update(body.as_bytes());
    format!("{body}.{}", B64.encode(m.finalize().into_bytes()))
}

pub fn verify(secret: &[u8], token: &str, now_unix: u64) -> Result<DeviceId, VerifyTokenError> {
    verify_until(secret, token, now_unix).map(|(device, _)| device)
}

/// As [`verify`], with the token's expiry (unix seconds).
pub fn verify_until(secret: &[u8], token: &str, now_unix: u64) -> Result<(DeviceId, u64), VerifyTokenError> {
    let (body, tag) = token.rsplit_once('.').ok_or(VerifyTokenError::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| VerifyTokenError::Malformed)?;
    let mut m = mac(secret);
    m.update(body.as_bytes());
    m.verify_slice(&tag).map_err(|_| VerifyTokenError::BadMac)?;
    let mut parts = body.split('.');
    if parts.next() != Some(VERSION) {
        return Err(VerifyTokenError::Malformed);
    }
    let device = parts.next().ok_or(VerifyTokenError::Malformed)?;
    let exp: u64 = parts.next().and_then(|e| e.parse().ok()).ok_or(VerifyTokenError::Malformed)?;
    if exp <= now_unix {
        return Err(VerifyTokenError::Expired);
    }
    let device = B64.decode(device).map_err(|_| VerifyTokenError::Malformed)?;
    let device = DeviceId::from_credential_identity(&device).map_err(|_| VerifyTokenError::Malformed)?;
    Ok((device, exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify() {
        let d = DeviceId::parse("mimi://a.example/d/alice/one").unwrap();
        let t = issue(b"k", &d, 100);
        assert_eq!(verify(b"k", &t, 99), Ok(d));
        assert_eq!(verify(b"k", &t, 100), Err(VerifyTokenError::Expired));
        assert_eq!(verify(b"other", &t, 1), Err(VerifyTokenError::BadMac));
        assert_eq!(verify(b"k", "garbage", 1), Err(VerifyTokenError::Malformed));
        let forged = t.replacen("mft1.", "mft1.x", 1);
        assert_eq!(verify(b"k", &forged, 1), Err(VerifyTokenError::BadMac));
    }
}
