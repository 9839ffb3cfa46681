//! An in-memory member for load generation (`mlsfed bench`): the same group
//! configuration as [`crate::Device`], without persistence, without HTTP and
//! without checking members' bindings. It builds the bytes a device would
//! send; the caller submits them. Never use it for a real user: it trusts
//! every KeyPackage it is given and forgets everything when dropped.

use std::collections::HashMap;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use proto::DeviceId;

use crate::{commit_body, mls, new_group, ClientError, CIPHERSUITE};

pub struct Lite {
    pub id: DeviceId,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    groups: HashMap<String, MlsGroup>,
}

impl Lite {
    pub fn new(id: DeviceId) -> Result<Self, ClientError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
        Ok(Self { id, provider: OpenMlsRustCrypto::default(), signer, groups: HashMap::new() })
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.id.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// A one-time KeyPackage of this member.
    pub fn key_package(&self) -> Result<KeyPackage, ClientError> {
        let kpb =
            KeyPackage::builder().build(CIPHERSUITE, &self.provider, &self.signer, self.credential()).map_err(mls)?;
        Ok(kpb.key_package().clone())
    }

    /// Creates group `room` at this member's operator; returns the group id
    /// and the epoch-0 GroupInfo to register it with.
    pub fn create_group(&mut self, room: &str) -> Result<(String, Vec<u8>), ClientError> {
        let (gid, group, bytes) = new_group(&self.provider, &self.signer, self.credential(), &self.id, room)?;
        self.groups.insert(gid.to_string(), group);
        Ok((gid.to_string(), bytes))
    }

    /// A Commit adding `kps`, followed by its Welcome and the new epoch's
    /// GroupInfo (one submission body).
    pub fn add(&mut self, g: &str, kps: &[KeyPackage]) -> Result<Vec<u8>, ClientError> {
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let (commit, welcome, group_info) = group.add_members(&self.provider, &self.signer, kps).map_err(mls)?;
        commit_body(&commit, Some(&welcome), group_info)
    }

    /// A self-update Commit, with the new epoch's GroupInfo.
    pub fn update(&mut self, g: &str) -> Result<Vec<u8>, ClientError> {
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let bundle = group.self_update(&self.provider, &self.signer, LeafNodeParameters::default()).map_err(mls)?;
        commit_body(bundle.commit(), None, bundle.group_info().cloned())
    }

    /// Merges our Commit once the hub accepted it.
    pub fn merge(&mut self, g: &str) -> Result<(), ClientError> {
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        group.merge_pending_commit(&self.provider).map_err(mls)
    }

    /// An application message, encrypted now.
    pub fn encrypt(&mut self, g: &str, text: &[u8]) -> Result<Vec<u8>, ClientError> {
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let out = group.create_message(&self.provider, &self.signer, text).map_err(mls)?;
        out.tls_serialize_detached().map_err(mls)
    }

    /// Whether this member holds group `g`.
    pub fn has(&self, g: &str) -> bool {
        self.groups.contains_key(g)
    }
}
