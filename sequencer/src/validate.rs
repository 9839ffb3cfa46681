//! Validation of one submission against the hub's public group state.
//! Pure with respect to the state: it returns a [`Plan`] whose effect is applied
//! only after the LOG append succeeded, so a lost CAS race needs no rollback.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _, Size as _};
use openmls::prelude::{
    CredentialType, GroupContext, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, ProtocolMessage,
    PublicGroup, PublicProcessMessageError, QueuedProposal, Sender, StagedCommit, ValidationError,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use proto::mls::{Bundle, Content};
use proto::wire::EntryKind;
use proto::{ApiError, DeviceId, ErrorCode, GroupId};

use crate::state::{proposal_store, GroupState};

pub enum Effect {
    None,
    Merge(Box<StagedCommit>),
    Queue(Box<QueuedProposal>),
}

pub struct Plan {
    pub kind: EntryKind,
    pub epoch: u64,
    /// Devices a Commit removes.
    pub removed: Vec<DeviceId>,
    pub welcome: Option<Vec<u8>>,
    pub welcome_recipients: Vec<DeviceId>,
    /// For a Commit: the GroupInfo of the epoch it starts, checked against
    /// the GroupContext the Commit produces.
    pub group_info: Option<Vec<u8>>,
    pub effect: Effect,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

pub fn wrong_epoch(state: &GroupState, sent_in: u64) -> ApiError {
    let mut e =
        err(ErrorCode::WrongEpoch, format!("message is for epoch {sent_in}, the group is at epoch {}", state.epoch()));
    e.current_epoch = Some(state.epoch());
    e.winning_commit_position = state.winning_commit(sent_in);
    e
}

/// Bootstraps a group from its creator's epoch-0 GroupInfo (RFC 9420 §12.4.3),
/// which must carry the ratchet_tree extension (§12.4.3.3).
pub fn bootstrap(
    crypto: &RustCrypto,
    group: &GroupId,
    creator: &DeviceId,
    group_info: &[u8],
) -> Result<GroupState, ApiError> {
    proto::mls::precheck(group_info, &[proto::mls::wire_format::GROUP_INFO])?;
    let vgi = match MlsMessageIn::tls_deserialize_exact(group_info)
        .map_err(|e| err(ErrorCode::MalformedMessage, format!("cannot decode GroupInfo: {e}")))?
        .extract()
    {
        MlsMessageBodyIn::GroupInfo(vgi) => vgi,
        _ => return Err(err(ErrorCode::WrongWireFormat, "expected a GroupInfo")),
    };
    if vgi.group_id().as_slice() != group.as_bytes() {
        return Err(err(ErrorCode::InvalidGroupInfo, "GroupInfo is for another group"));
    }
    if vgi.epoch().as_u64() != 0 {
        return Err(err(ErrorCode::InvalidGroupInfo, "a new group starts at epoch 0"));
    }
    let tree = vgi
        .extensions()
        .ratchet_tree()
        .map(|t| t.ratchet_tree().clone())
        .ok_or_else(|| err(ErrorCode::InvalidGroupInfo, "GroupInfo lacks the ratchet_tree extension"))?;
    let storage = MemoryStorage::default();
    // from_external verifies the GroupInfo signature against the signer's leaf
    // and the tree's parent hashes (RFC 9420 §12.4.3, §7.9.2).
    let (public, _) = PublicGroup::from_external(crypto, &storage, tree, vgi, proposal_store())
        .map_err(|e| err(ErrorCode::InvalidGroupInfo, format!("GroupInfo does not verify: {e}")))?;
    let members: Vec<_> = public.members().collect();
    if members.iter().any(|m| m.credential.credential_type() != CredentialType::Basic) {
        return Err(err(ErrorCode::UnsupportedCredential, "only basic credentials are supported"));
    }
    let only_creator = members.len() == 1 && members[0].credential.serialized_content() == creator.as_bytes();
    if !only_creator {
        return Err(err(ErrorCode::InvalidGroupInfo, "a new group must have exactly one member: the creating device"));
    }
    Ok(GroupState::new(group.clone(), storage, public))
}

fn map_process_error(e: PublicProcessMessageError, state: &GroupState, sent_in: u64) -> ApiError {
    match e {
        PublicProcessMessageError::ValidationError(ValidationError::WrongEpoch) => wrong_epoch(state, sent_in),
        PublicProcessMessageError::ValidationError(ValidationError::UnknownMember) => {
            err(ErrorCode::NotAMember, "the sender is not a member of the group")
        }
        PublicProcessMessageError::ValidationError(ValidationError::InvalidSignature) => {
            err(ErrorCode::InvalidSignature, "the message signature does not verify")
        }
        PublicProcessMessageError::ValidationError(v) => {
            err(ErrorCode::InvalidCommit, format!("message fails validation: {v}"))
        }
        PublicProcessMessageError::InvalidCommit(c) => err(ErrorCode::InvalidCommit, format!("commit is invalid: {c}")),
        other => err(ErrorCode::InvalidCommit, format!("message refused: {other}")),
    }
}

/// How a message is being validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A submission: every rule applies.
    Live,
    /// An accepted LOG entry rebuilt into the state: the LOG keeps no
    /// GroupInfo, and the entry was checked when it was accepted.
    Replay,
}

/// Validates a protocol message from `device` against `state`.
pub fn plan(
    state: &GroupState,
    crypto: &RustCrypto,
    device: &DeviceId,
    bundle: &Bundle,
    mode: Mode,
) -> Result<Plan, ApiError> {
    let h = &bundle.header;
    if !state.is_member(device) {
        return Err(err(ErrorCode::NotAMember, "the submitting device is not a member of the group"));
    }
    if h.epoch != state.epoch() {
        return Err(wrong_epoch(state, h.epoch));
    }
    if h.content == Content::Application {
        // The sender of a PrivateMessage is encrypted (RFC 9420 §6.3.2); the
        // transport-authenticated device and the epoch are what the hub checks.
        return Ok(Plan {
            kind: EntryKind::Application,
            epoch: h.epoch,
            removed: vec![],
            welcome: None,
            welcome_recipients: vec![],
            group_info: None,
            effect: Effect::None,
        });
    }
    let pm: ProtocolMessage = MlsMessageIn::tls_deserialize_exact(&bundle.message)
        .map_err(|e| err(ErrorCode::MalformedMessage, format!("{e}")))?
        .try_into_protocol_message()
        .map_err(|_| err(ErrorCode::WrongWireFormat, "expected a protocol message"))?;
    // The claimed sender leaf must be the authenticated device (RFC 9420 §6.2:
    // the hub can read the sender of a PublicMessage). Checked before any
    // cryptography so a member cannot speak for another one. An external
    // commit (§12.4.3.2) names no leaf: its new leaf is checked below.
    let mut external = false;
    let mut confirmation_tag = None;
    if let ProtocolMessage::PublicMessage(p) = &pm {
        confirmation_tag = p.confirmation_tag().and_then(|t| t.tls_serialize_detached().ok());
        match p.sender() {
            Sender::Member(idx) => {
                let leaf = state.public.leaf(*idx).ok_or_else(|| err(ErrorCode::NotAMember, "sender leaf is empty"))?;
                if leaf.credential().serialized_content() != device.as_bytes() {
                    return Err(err(ErrorCode::SenderMismatch, "the sender leaf is not the authenticated device"));
                }
            }
            Sender::NewMemberCommit => external = true,
            _ => {
                return Err(err(ErrorCode::InvalidRequest, "external senders and external proposals are not supported"))
            }
        }
    }
    let processed = state.public.process_message(crypto, pm).map_err(|e| map_process_error(e, state, h.epoch))?;
    match processed.into_content() {
        ProcessedMessageContent::ProposalMessage(qp) => {
            if bundle.welcome.is_some() {
                return Err(err(ErrorCode::WelcomeMismatch, "a proposal carries no Welcome"));
            }
            Ok(Plan {
                kind: EntryKind::Proposal,
                epoch: h.epoch,
                removed: vec![],
                welcome: None,
                welcome_recipients: vec![],
                group_info: None,
                effect: Effect::Queue(qp),
            })
        }
        ProcessedMessageContent::StagedCommitMessage(sc) if external => {
            let group_info = check_group_info(sc.group_context(), bundle, confirmation_tag.as_deref(), mode)?;
            check_rejoin(state, device, &sc, bundle)?;
            Ok(Plan {
                kind: EntryKind::Commit,
                epoch: h.epoch,
                // The device stays a member: only its stale leaf goes.
                removed: vec![],
                welcome: None,
                welcome_recipients: vec![],
                group_info,
                effect: Effect::Merge(sc),
            })
        }
        ProcessedMessageContent::StagedCommitMessage(sc) => {
            let mut added = Vec::new();
            let mut kp_refs = Vec::new();
            for add in sc.add_proposals() {
                let kp = add.add_proposal().key_package();
                if kp.leaf_node().credential().credential_type() != CredentialType::Basic {
                    return Err(err(ErrorCode::UnsupportedCredential, "only basic credentials are supported"));
                }
                let d = DeviceId::from_credential_identity(kp.leaf_node().credential().serialized_content())
                    .map_err(|e| err(ErrorCode::InvalidCommit, format!("added member has an invalid identity: {e}")))?;
                let r =
                    kp.hash_ref(crypto).map_err(|_| err(ErrorCode::InvalidCommit, "cannot hash added KeyPackage"))?;
                kp_refs.push(r.as_slice().to_vec());
                added.push(d);
            }
            // The Welcome must be addressed to exactly the added KeyPackages
            // (RFC 9420 §12.4.3.1: new_member is the KeyPackageRef).
            match &bundle.welcome {
                None if !added.is_empty() => {
                    return Err(err(ErrorCode::WelcomeMismatch, "a Commit that adds members needs its Welcome"))
                }
                Some(_) if added.is_empty() => {
                    return Err(err(ErrorCode::WelcomeMismatch, "a Welcome with a Commit that adds nobody"))
                }
                Some(w) => {
                    let mut got = proto::mls::welcome_recipients(w)?;
                    got.sort();
                    let mut want = kp_refs.clone();
                    want.sort();
                    if got != want {
                        return Err(err(
                            ErrorCode::WelcomeMismatch,
                            "the Welcome is not addressed to the KeyPackages the Commit adds",
                        ));
                    }
                }
                None => {}
            }
            let group_info = check_group_info(sc.group_context(), bundle, confirmation_tag.as_deref(), mode)?;
            // Who the Commit removes (RFC 9420 §12.1.3), named while their
            // leaves are still in the tree: they may read up to this entry.
            let mut removed = Vec::new();
            for r in sc.remove_proposals() {
                let idx = r.remove_proposal().removed();
                if let Some(leaf) = state.public.leaf(idx) {
                    if let Ok(d) = DeviceId::from_credential_identity(leaf.credential().serialized_content()) {
                        removed.push(d);
                    }
                }
            }
            Ok(Plan {
                kind: EntryKind::Commit,
                epoch: h.epoch,
                removed,
                welcome: bundle.welcome.clone(),
                welcome_recipients: added,
                group_info,
                effect: Effect::Merge(sc),
            })
        }
        _ => Err(err(ErrorCode::InvalidRequest, "unsupported message content")),
    }
}

/// An external commit is accepted only as a rejoin (RFC 9420 §12.4.3.2):
/// a device that is a member already replaces its own leaf, which it can
/// no longer use (its history expired, or it could not process a Commit).
/// Its new leaf names the submitting device, it removes its old leaf and no
/// one else's, and it adds no one. Joining a group one was never invited
/// to is not possible this way. The new leaf keeps the old leaf's
/// signature key: the key the device's operator vouches for (RFC 9750
/// §5.3), which members checked when it joined. A bearer token alone must
/// not let someone else swap in a key of their own.
fn check_rejoin(state: &GroupState, device: &DeviceId, sc: &StagedCommit, bundle: &Bundle) -> Result<(), ApiError> {
    let leaf = sc
        .update_path_leaf_node()
        .ok_or_else(|| err(ErrorCode::InvalidCommit, "an external commit must carry an UpdatePath"))?;
    if leaf.credential().serialized_content() != device.as_bytes() {
        return Err(err(ErrorCode::SenderMismatch, "the external commit's new leaf is not the authenticated device"));
    }
    if bundle.welcome.is_some() || sc.add_proposals().next().is_some() {
        return Err(err(ErrorCode::InvalidCommit, "an external commit here adds no one"));
    }
    let mut same_key = false;
    let mut removes_own = false;
    for r in sc.remove_proposals() {
        let old = state.public.leaf(r.remove_proposal().removed());
        let own = old.is_some_and(|l| l.credential().serialized_content() == device.as_bytes());
        if !own {
            return Err(err(ErrorCode::InvalidCommit, "an external commit may remove only the device's own old leaf"));
        }
        same_key |= old.is_some_and(|l| l.signature_key().as_slice() == leaf.signature_key().as_slice());
        removes_own = true;
    }
    if !removes_own {
        return Err(err(ErrorCode::InvalidCommit, "a rejoin must remove the device's old leaf"));
    }
    if !same_key {
        return Err(err(ErrorCode::InvalidCommit, "a rejoin keeps the device's signature key"));
    }
    Ok(())
}

/// Every Commit carries the GroupInfo of the epoch it starts (RFC 9420
/// §12.4.3), so that a member who cannot follow the group can always rejoin
/// from the current one. It must carry the same GroupContext the hub
/// computed (group, epoch, tree hash, transcript hash, extensions), the
/// ratchet tree (§12.4.3.3) and the external public key (§12.4.3.2), and
/// the Commit's own confirmation tag (§12.4.3: "the confirmation tag from
/// the Commit message that created the current epoch"). The hub holds no
/// epoch secrets, so it cannot verify that tag (§6.1); comparing the two
/// copies catches a Commit whose tag was damaged, which no member could
/// process. The GroupInfo's signature is checked by the rejoining client
/// (openmls verifies it against the signer's leaf).
fn check_group_info(
    context: &GroupContext,
    bundle: &Bundle,
    commit_tag: Option<&[u8]>,
    mode: Mode,
) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(bytes) = &bundle.group_info else {
        return match mode {
            Mode::Live => {
                Err(err(ErrorCode::MissingGroupInfo, "a Commit must carry the GroupInfo of the epoch it starts"))
            }
            Mode::Replay => Ok(None),
        };
    };
    let vgi = match MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| err(ErrorCode::InvalidGroupInfo, format!("cannot decode GroupInfo: {e}")))?
        .extract()
    {
        MlsMessageBodyIn::GroupInfo(vgi) => vgi,
        _ => return Err(err(ErrorCode::InvalidGroupInfo, "expected a GroupInfo")),
    };
    if vgi.group_context() != context {
        return Err(err(ErrorCode::InvalidGroupInfo, "the GroupInfo is not of the epoch this Commit starts"));
    }
    if vgi.extensions().ratchet_tree().is_none() || vgi.extensions().external_pub().is_none() {
        return Err(err(ErrorCode::InvalidGroupInfo, "the GroupInfo lacks the ratchet_tree or external_pub extension"));
    }
    // GroupInfo (RFC 9420 §12.4.3) after the MLSMessage's version and wire
    // format: group_context, extensions, then confirmation_tag.
    let at = 4 + vgi.group_context().tls_serialized_len() + vgi.extensions().tls_serialized_len();
    let commit_tag = commit_tag.ok_or_else(|| err(ErrorCode::InvalidCommit, "the Commit has no confirmation tag"))?;
    if bytes.get(at..at + commit_tag.len()) != Some(commit_tag) {
        return Err(err(
            ErrorCode::InvalidCommit,
            "the Commit's confirmation tag is not the one in its GroupInfo: no member could process it",
        ));
    }
    Ok(Some(bytes.clone()))
}

/// The GroupInfo of a resent Commit that started the group's current
/// epoch, checked as when it was accepted. A sequencer that crashed after
/// appending the Commit and before checkpointing lost it (the LOG keeps no
/// GroupInfo); the committer's resend of the same bytes brings it back.
pub fn group_info_of_current_epoch(state: &GroupState, bundle: &Bundle) -> Option<Vec<u8>> {
    let pm = MlsMessageIn::tls_deserialize_exact(&bundle.message).ok()?.try_into_protocol_message().ok()?;
    let ProtocolMessage::PublicMessage(p) = &pm else {
        return None;
    };
    let tag = p.confirmation_tag().and_then(|t| t.tls_serialize_detached().ok())?;
    check_group_info(state.public.group_context(), bundle, Some(&tag), Mode::Live).ok().flatten()
}

/// Applies a plan's effect after its LOG append succeeded.
pub fn apply(state: &mut GroupState, effect: Effect) -> Result<(), String> {
    match effect {
        Effect::None => Ok(()),
        Effect::Merge(sc) => {
            state.members_changed();
            state.public.merge_commit(&state.storage, *sc).map_err(|e| e.to_string())
        }
        Effect::Queue(qp) => state.public.add_proposal(&state.storage, *qp).map_err(|e| e.to_string()),
    }
}
