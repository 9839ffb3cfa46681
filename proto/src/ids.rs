//! MIMI-style identifiers. The domain names the operator, so any server can
//! route by reading an identifier:
//! user `mimi://<domain>/u/<user>`, device `mimi://<domain>/d/<user>/<device>`
//! (the MLS BasicCredential identity), group `mimi://<hub-domain>/r/<room>`
//! (the MLS group_id).

use std::fmt;

use serde::{Deserialize, Serialize};

const SCHEME: &str = "mimi://";
/// Identifiers end up in NATS subjects (hex encoded) and in headers; a bound
/// keeps one hostile identifier from inflating every record that carries it.
pub const MAX_ID_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    #[error("identifier is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("identifier does not start with mimi://")]
    Scheme,
    #[error("identifier has the wrong shape; expected {0}")]
    Shape(&'static str),
    #[error("identifier has an invalid domain")]
    Domain,
    #[error("identifier has an invalid name segment")]
    Segment,
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 100
        && d.split('.').all(|label| {
            !label.is_empty() && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

/// Splits `mimi://domain/kind/...` into the domain and the path segments.
fn split<'a>(s: &'a str, kind: &str, n: usize, shape: &'static str) -> Result<(&'a str, Vec<&'a str>), ParseIdError> {
    if s.len() > MAX_ID_LEN {
        return Err(ParseIdError::TooLong);
    }
    let rest = s.strip_prefix(SCHEME).ok_or(ParseIdError::Scheme)?;
    let mut parts = rest.split('/');
    let domain = parts.next().ok_or(ParseIdError::Shape(shape))?;
    if !valid_domain(domain) {
        return Err(ParseIdError::Domain);
    }
    if parts.next() != Some(kind) {
        return Err(ParseIdError::Shape(shape));
    }
    let segs: Vec<&str> = parts.collect();
    if segs.len() != n {
        return Err(ParseIdError::Shape(shape));
    }
    if !segs.iter().all(|s| valid_segment(s)) {
        return Err(ParseIdError::Segment);
    }
    Ok((domain, segs))
}

macro_rules! string_id {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn as_bytes(&self) -> &[u8] {
                self.0.as_bytes()
            }
            /// The operator that owns this identifier.
            pub fn domain(&self) -> &str {
                let rest = &self.0[SCHEME.len()..];
                rest.split('/').next().unwrap_or_default()
            }
            /// Hex of the identifier: a legal, case-stable NATS subject token and KV key.
            pub fn token(&self) -> String {
                hex::encode(self.0.as_bytes())
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl TryFrom<String> for $name {
            type Error = ParseIdError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GroupId(String);

string_id!(UserId);
string_id!(DeviceId);
string_id!(GroupId);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, ParseIdError> {
        split(s, "u", 1, "mimi://<domain>/u/<user>")?;
        Ok(Self(s.to_owned()))
    }
    pub fn new(domain: &str, user: &str) -> Result<Self, ParseIdError> {
        Self::parse(&format!("{SCHEME}{domain}/u/{user}"))
    }
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, ParseIdError> {
        split(s, "d", 2, "mimi://<domain>/d/<user>/<device>")?;
        Ok(Self(s.to_owned()))
    }
    pub fn new(domain: &str, user: &str, device: &str) -> Result<Self, ParseIdError> {
        Self::parse(&format!("{SCHEME}{domain}/d/{user}/{device}"))
    }
    /// Parses an MLS BasicCredential identity.
    pub fn from_credential_identity(bytes: &[u8]) -> Result<Self, ParseIdError> {
        let s = std::str::from_utf8(bytes).map_err(|_| ParseIdError::Scheme)?;
        Self::parse(s)
    }
    pub fn user(&self) -> UserId {
        let rest = &self.0[SCHEME.len()..];
        let mut p = rest.split('/');
        let domain = p.next().unwrap_or_default();
        let _d = p.next();
        let user = p.next().unwrap_or_default();
        UserId(format!("{SCHEME}{domain}/u/{user}"))
    }
}

impl GroupId {
    pub fn parse(s: &str) -> Result<Self, ParseIdError> {
        split(s, "r", 1, "mimi://<hub-domain>/r/<room>")?;
        Ok(Self(s.to_owned()))
    }
    pub fn new(domain: &str, room: &str) -> Result<Self, ParseIdError> {
        Self::parse(&format!("{SCHEME}{domain}/r/{room}"))
    }
    /// Parses an MLS group_id (the UTF-8 bytes of the MIMI room URI).
    pub fn from_mls(bytes: &[u8]) -> Result<Self, ParseIdError> {
        let s = std::str::from_utf8(bytes).map_err(|_| ParseIdError::Scheme)?;
        Self::parse(s)
    }
    /// The hub of a group is the domain in its id.
    pub fn hub(&self) -> &str {
        self.domain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = DeviceId::parse("mimi://a.example/d/alice/phone").unwrap();
        assert_eq!(d.domain(), "a.example");
        assert_eq!(d.user().as_str(), "mimi://a.example/u/alice");
        assert!(DeviceId::parse("mimi://a.example/u/alice").is_err());
        assert!(DeviceId::parse("mimi://a.example/d/alice/Phone").is_err());
        assert!(DeviceId::parse("mimi://a.example/d/alice/phone/x").is_err());
        assert!(GroupId::parse("mimi://a.example/r/").is_err());
        assert!(GroupId::parse("https://a.example/r/x").is_err());
        let g = GroupId::parse("mimi://a.example/r/abc").unwrap();
        assert_eq!(g.hub(), "a.example");
        assert_eq!(hex::decode(g.token()).unwrap(), g.as_bytes());
        let long = format!("mimi://a.example/r/{}", "x".repeat(300));
        assert_eq!(GroupId::parse(&long), Err(ParseIdError::TooLong));
    }
}
