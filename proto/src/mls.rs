//! Key-less inspection of client MLS bytes. Servers see only what RFC 9420 §6
//! leaves in the clear: version, wire format, group_id, epoch, content_type,
//! and for PublicMessage the sender (§6.2). Nothing here holds group secrets.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage};

use crate::error::{ApiError, ErrorCode};
use crate::ids::GroupId;

/// RFC 9420 §6 WireFormat values.
pub mod wire_format {
    pub const PUBLIC_MESSAGE: u16 = 1;
    pub const PRIVATE_MESSAGE: u16 = 2;
    pub const WELCOME: u16 = 3;
    pub const GROUP_INFO: u16 = 4;
    pub const KEY_PACKAGE: u16 = 5;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Application,
    Proposal,
    Commit,
}

/// The clear header of a submitted protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub group: GroupId,
    pub epoch: u64,
    pub content: Content,
    pub public: bool,
}

/// A submission body: one protocol message, then for a Commit optionally its
/// Welcome and its GroupInfo, each a complete MLSMessage (RFC 9420 §6),
/// concatenated. MLSMessage is self-delimiting, so no extra framing is needed.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub message: Vec<u8>,
    pub header: Header,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Option<Vec<u8>>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// Checks the two leading u16 fields (RFC 9420 §6: `version`, `wire_format`)
/// so that a wrong version or wire format gets its own error code rather than
/// a generic decode failure.
pub fn precheck(bytes: &[u8], allowed: &[u16]) -> Result<u16, ApiError> {
    if bytes.len() < 4 {
        return Err(err(ErrorCode::MalformedMessage, "MLSMessage is truncated"));
    }
    let version = u16::from_be_bytes([bytes[0], bytes[1]]);
    if version != 1 {
        return Err(err(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {version} is not supported; only mls10 (1)"),
        ));
    }
    let wf = u16::from_be_bytes([bytes[2], bytes[3]]);
    if !allowed.contains(&wf) {
        return Err(err(
            ErrorCode::WrongWireFormat,
            format!("wire format {wf} is not accepted here (expected one of {allowed:?})"),
        ));
    }
    Ok(wf)
}

/// Decodes one MLSMessage from the front of `input`, advancing it.
fn take_one(input: &mut &[u8]) -> Result<(Vec<u8>, MlsMessageIn), ApiError> {
    let start = *input;
    let msg = MlsMessageIn::tls_deserialize(input)
        .map_err(|e| err(ErrorCode::MalformedMessage, format!("cannot decode MLSMessage: {e}")))?;
    let used = start.len() - input.len();
    Ok((start[..used].to_vec(), msg))
}

/// Parses a submission body (see [`Bundle`]).
pub fn parse_bundle(bytes: &[u8]) -> Result<Bundle, ApiError> {
    precheck(bytes, &[wire_format::PUBLIC_MESSAGE, wire_format::PRIVATE_MESSAGE])?;
    let mut input = bytes;
    let (message, msg) = take_one(&mut input)?;
    let pm: ProtocolMessage = msg
        .try_into_protocol_message()
        .map_err(|_| err(ErrorCode::WrongWireFormat, "expected a PublicMessage or PrivateMessage"))?;
    let header = header_of(&pm)?;
    let mut welcome = None;
    let mut group_info = None;
    while !input.is_empty() {
        if header.content != Content::Commit {
            return Err(err(ErrorCode::InvalidRequest, "only a Commit may carry a Welcome or GroupInfo"));
        }
        let wf = precheck(input, &[wire_format::WELCOME, wire_format::GROUP_INFO])?;
        let (raw, _) = take_one(&mut input)?;
        let slot = if wf == wire_format::WELCOME { &mut welcome } else { &mut group_info };
        if slot.replace(raw).is_some() {
            return Err(err(ErrorCode::InvalidRequest, "a bundle carries at most one Welcome and one GroupInfo"));
        }
    }
    Ok(Bundle { message, header, welcome, group_info })
}

fn header_of(pm: &ProtocolMessage) -> Result<Header, ApiError> {
    let group = GroupId::from_mls(pm.group_id().as_slice())
        .map_err(|e| err(ErrorCode::InvalidIdentifier, format!("group_id is not a mimi room id: {e}")))?;
    let public = matches!(pm, ProtocolMessage::PublicMessage(_));
    let content = match pm.content_type() {
        ContentType::Application => Content::Application,
        ContentType::Proposal => Content::Proposal,
        ContentType::Commit => Content::Commit,
    };
    // The hub must be able to validate every handshake, so handshakes travel
    // as PublicMessage; an encrypted one would be opaque to it (RFC 9420 §6.3,
    // design decision 3). Application data is always PrivateMessage (§6.2).
    match (public, content) {
        (false, Content::Proposal | Content::Commit) => {
            return Err(err(ErrorCode::EncryptedHandshake, "handshake messages must be sent as PublicMessage"))
        }
        (true, Content::Application) => {
            return Err(err(ErrorCode::WrongWireFormat, "application messages must be PrivateMessage (RFC 9420 §6.2)"))
        }
        _ => {}
    }
    Ok(Header { group, epoch: pm.epoch().as_u64(), content, public })
}

/// Extracts the Welcome's recipients (KeyPackageRefs, RFC 9420 §12.4.3.1).
pub fn welcome_recipients(bytes: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    precheck(bytes, &[wire_format::WELCOME])?;
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| err(ErrorCode::MalformedMessage, format!("cannot decode Welcome: {e}")))?;
    match msg.extract() {
        MlsMessageBodyIn::Welcome(w) => Ok(w.secrets().iter().map(|s| s.new_member().as_slice().to_vec()).collect()),
        _ => Err(err(ErrorCode::WrongWireFormat, "expected a Welcome")),
    }
}
