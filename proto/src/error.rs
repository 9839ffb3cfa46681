//! The wire error model. Every refusal a client or a peer can see is one
//! `ErrorCode`: a stable snake_case string, an HTTP status, and a metric label
//! (the code itself, a small closed set, never an identifier).

use serde::{Deserialize, Serialize};

macro_rules! codes {
    ($($variant:ident => ($code:literal, $status:literal, $retry:literal)),* $(,)?) => {
        /// Stable error codes. Never renumber or rename: clients match on
        /// them. The string literal is the wire form (JSON and metrics).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($variant),* }

        impl Serialize for ErrorCode {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for ErrorCode {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                ErrorCode::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s}")))
            }
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),* }
            }
            pub fn http_status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status),* }
            }
            /// Whether the same request may succeed if sent again unchanged.
            pub fn retryable(self) -> bool {
                match self { $(ErrorCode::$variant => $retry),* }
            }
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

codes! {
    // Authentication and authorization.
    Unauthenticated => ("unauthenticated", 401, false),
    ForbiddenDevice => ("forbidden_device", 403, false),
    // Malformed input.
    MalformedMessage => ("malformed_message", 400, false),
    UnsupportedVersion => ("unsupported_version", 400, false),
    WrongWireFormat => ("wrong_wire_format", 400, false),
    EncryptedHandshake => ("encrypted_handshake", 400, false),
    BodyTooLarge => ("body_too_large", 413, false),
    InvalidIdentifier => ("invalid_identifier", 400, false),
    InvalidRequest => ("invalid_request", 400, false),
    InvalidCursor => ("invalid_cursor", 400, false),
    MethodNotAllowed => ("method_not_allowed", 405, false),
    RequestTimeout => ("request_timeout", 408, true),
    UriTooLong => ("uri_too_long", 414, false),
    HeadersTooLarge => ("headers_too_large", 431, false),
    // Group state.
    UnknownGroup => ("unknown_group", 404, false),
    HistoryExpired => ("history_expired", 410, false),
    GroupExists => ("group_exists", 409, false),
    NotHub => ("not_hub", 421, false),
    WrongEpoch => ("wrong_epoch", 409, true),
    NotAMember => ("not_a_member", 403, false),
    SenderMismatch => ("sender_mismatch", 403, false),
    InvalidCommit => ("invalid_commit", 422, false),
    InvalidProposal => ("invalid_proposal", 422, false),
    InvalidGroupInfo => ("invalid_group_info", 422, false),
    WelcomeMismatch => ("welcome_mismatch", 422, false),
    GroupInfoUnavailable => ("group_info_unavailable", 404, false),
    MissingGroupInfo => ("missing_group_info", 422, false),
    // Key directory.
    InvalidKeyPackage => ("invalid_key_package", 422, false),
    InvalidSignature => ("invalid_signature", 422, false),
    UnsupportedCipherSuite => ("unsupported_cipher_suite", 422, false),
    UnsupportedCredential => ("unsupported_credential", 422, false),
    KeyPackageExpired => ("key_package_expired", 422, false),
    LifetimeTooLong => ("lifetime_too_long", 422, false),
    IdentityMismatch => ("identity_mismatch", 403, false),
    LastResortNotInCapabilities => ("last_resort_not_in_capabilities", 422, false),
    InitKeyReused => ("init_key_equals_encryption_key", 422, false),
    TooManyKeyPackages => ("too_many_key_packages", 422, false),
    KeyMaterialExhausted => ("key_material_exhausted", 404, false),
    NoCompatibleMaterial => ("no_compatible_material", 404, false),
    UnknownUser => ("unknown_user", 404, false),
    UnknownDevice => ("unknown_device", 404, false),
    DeviceRevoked => ("device_revoked", 410, false),
    RateLimited => ("rate_limited", 429, true),
    // Server side.
    PeerUnreachable => ("peer_unreachable", 503, true),
    IncompatiblePeer => ("incompatible_peer", 502, false),
    ForgedEnvelope => ("forged_envelope", 403, false),
    Timeout => ("timeout", 504, true),
    Unavailable => ("unavailable", 503, true),
    Internal => ("internal", 503, true),
}

/// Binary encodings (postcard) need every field present, so the optional
/// fields are always serialized; HTTP rendering drops the empty ones.
/// The JSON body of every error response: `{"code": "...", "message": "...", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// For `wrong_epoch`: the group's current epoch.
    #[serde(default)]
    pub current_epoch: Option<u64>,
    /// For `wrong_epoch`: the hub position of the Commit that won the epoch.
    #[serde(default)]
    pub winning_commit_position: Option<u64>,
    #[serde(default)]
    pub retryable: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            current_epoch: None,
            winning_commit_position: None,
            retryable: code.retryable(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {}", c.as_str());
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_ne!(c.http_status(), 500);
        }
    }
}
