//! The mlsfed client SDK: an RFC 9420 device on openmls that talks to its own
//! operator through the documented HTTP API (docs/client-api.md), with its
//! whole openmls state persisted in sled so a restarted process resumes.
//!
//! Handshakes are sent as PublicMessage (the hub validates them) and the
//! device merges its own Commit only when the hub's echo arrives in its
//! mailbox, so every device applies the group's messages in the hub's order.
#![forbid(unsafe_code)]

pub mod http;
pub mod lite;
mod store;

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use proto::{ApiError, DeviceId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};

pub use http::{Accepted, Http, Item};

pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// How often an operation retries after `wrong_epoch` (it syncs in between).
const EPOCH_RETRIES: usize = 5;
/// How often a submission's bytes are sent while the answer is retryable.
const RESENDS: u32 = 3;

/// An answer that leaves a submission's fate open: retryable refusals
/// (`timeout`, `unavailable`, ...) and transport failures. `wrong_epoch`,
/// though retryable, is a decision.
fn undecided(e: &ClientError) -> bool {
    match e.code() {
        Some(ErrorCode::WrongEpoch) => false,
        Some(c) => c.retryable(),
        None => matches!(e, ClientError::Http(_)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server refused: {0}")]
    Api(ApiError),
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("MLS: {0}")]
    Mls(String),
    #[error("local store: {0}")]
    Store(#[from] sled::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("unknown group {0}")]
    UnknownGroup(String),
    /// A member's credential does not match its operator's binding.
    #[error("identity check failed: {0}")]
    Identity(String),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

use proto::unix_now;

fn mls<E: std::fmt::Display>(e: E) -> ClientError {
    ClientError::Mls(e.to_string())
}

/// What a device observed while syncing its mailbox, in hub order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Joined {
        group: String,
        position: u64,
        epoch: u64,
    },
    Message {
        group: String,
        position: u64,
        sender: String,
        text: String,
        own: bool,
    },
    Commit {
        group: String,
        position: u64,
        epoch: u64,
        own: bool,
    },
    Proposal {
        group: String,
        position: u64,
    },
    Removed {
        group: String,
        position: u64,
    },
    /// The operator asks for more KeyPackages of `cipher_suite`.
    KeyPackagesLow {
        cipher_suite: u16,
        remaining: usize,
    },
    /// The device was back in the group by external commit (RFC 9420
    /// §12.4.3.2) after it could not follow it: entries between the one it
    /// could not process and `position` are not readable to it.
    Rejoined {
        group: String,
        position: u64,
        epoch: u64,
    },
    /// An item this device could not process (kept so tests and users see it).
    Failed {
        group: String,
        position: u64,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    device: String,
    signature_public_key: Vec<u8>,
    cursor: u64,
    /// Group id → last hub position applied.
    groups: BTreeMap<String, u64>,
    /// Group id → this operator's cursor in the group (the `seq` of the
    /// last entry read).
    #[serde(default)]
    group_seqs: BTreeMap<String, u64>,
    /// Plaintexts of own messages by a digest of the bytes sent, for the
    /// echo.
    sent: BTreeMap<String, String>,
    /// Group id → the bytes of a Commit submitted without a verdict yet
    /// (a `timeout`): resent as they are to learn it, never rebuilt.
    #[serde(default)]
    pending_commits: BTreeMap<String, Vec<u8>>,
    /// Group id → why the device must rejoin it: the position of the
    /// accepted Commit it could not process (reported to the hub once),
    /// or 0 (its history expired).
    #[serde(default)]
    rejoin: BTreeMap<String, u64>,
}

/// One device with persistent state.
pub struct Device {
    id: DeviceId,
    http: Http,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    store: store::Store,
    meta: Meta,
    groups: BTreeMap<String, MlsGroup>,
    /// Events applied but not yet returned by [`Device::sync`].
    backlog: Vec<Event>,
    /// The operator's binding key, fetched once from our own server.
    operator_key: Option<String>,
    /// Member keys already checked against their bindings: device → key.
    verified: BTreeMap<String, Vec<u8>>,
}

/// A new group `room` hosted by `id`'s operator, with the epoch-0
/// GroupInfo (carrying the ratchet tree) that registers it there.
fn new_group(
    provider: &OpenMlsRustCrypto,
    signer: &SignatureKeyPair,
    credential: CredentialWithKey,
    id: &DeviceId,
    room: &str,
) -> Result<(proto::GroupId, MlsGroup, Vec<u8>), ClientError> {
    let gid = proto::GroupId::new(id.domain(), room).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let group = MlsGroup::new_with_group_id(
        provider,
        signer,
        &create_config(),
        GroupId::from_slice(gid.as_bytes()),
        credential,
    )
    .map_err(mls)?;
    let gi = group.export_group_info(provider.crypto(), signer, true).map_err(mls)?;
    let bytes = gi.tls_serialize_detached().map_err(mls)?;
    Ok((gid, group, bytes))
}

/// Own messages whose echo has not come yet, kept at most: beyond, some
/// lose their text (only an answer lost to an outage, for a message that
/// was never accepted, leaves one unechoed for long).
const MAX_UNECHOED: usize = 1024;

/// The key of an own message's plaintext: a digest of the bytes sent,
/// which its echo carries back.
fn sent_key(message: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(message);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A Commit as submitted: the Commit, its Welcome if it adds members, and
/// the GroupInfo of the epoch it starts (with the ratchet tree and the
/// external public key), which the hub keeps for members that must rejoin.
fn commit_body(
    commit: &MlsMessageOut,
    welcome: Option<&MlsMessageOut>,
    group_info: Option<openmls::messages::group_info::GroupInfo>,
) -> Result<Vec<u8>, ClientError> {
    let mut body = commit.tls_serialize_detached().map_err(mls)?;
    if let Some(w) = welcome {
        body.extend(w.tls_serialize_detached().map_err(mls)?);
    }
    if let Some(gi) = group_info {
        body.extend(MlsMessageOut::from(gi).tls_serialize_detached().map_err(mls)?);
    }
    Ok(body)
}

fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        // Handshakes out as PublicMessage and refuse encrypted ones, so the
        // hub can validate every Commit (design decision 3).
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .sender_ratchet_configuration(sender_ratchet())
        .build()
}

/// The hub's order can differ from a sender's encryption order: a message
/// whose submit was cut off (a crash, a timeout) stays queued and is accepted
/// later, after newer ones. Receivers keep enough old generations to decrypt
/// it (RFC 9420 §9.2 leaves the window to the application).
fn sender_ratchet() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(256, 10_000)
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .sender_ratchet_configuration(sender_ratchet())
        .build()
}

impl Device {
    /// Opens the device stored under `home`, creating it as `id` if new.
    pub fn open(home: &Path, server: &str, token: &str, id: Option<&DeviceId>) -> Result<Self, ClientError> {
        let store = store::Store::open(home)?;
        let provider = OpenMlsRustCrypto::default();
        store.load_into(provider.storage())?;
        let meta: Option<Meta> = store.meta()?;
        let (meta, signer) = match meta {
            Some(m) => {
                if let Some(want) = id {
                    if want.as_str() != m.device {
                        return Err(ClientError::Protocol(format!("{} holds device {}", home.display(), m.device)));
                    }
                }
                let signer = SignatureKeyPair::read(
                    provider.storage(),
                    &m.signature_public_key,
                    CIPHERSUITE.signature_algorithm(),
                )
                .ok_or_else(|| ClientError::Protocol("signature key missing from store".into()))?;
                (m, signer)
            }
            None => {
                let id = id.ok_or_else(|| ClientError::Protocol("new device needs an id".into()))?;
                let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
                signer.store(provider.storage()).map_err(mls)?;
                let m = Meta {
                    device: id.to_string(),
                    signature_public_key: signer.public().to_vec(),
                    ..Default::default()
                };
                (m, signer)
            }
        };
        let id = DeviceId::parse(&meta.device).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut groups = BTreeMap::new();
        for g in meta.groups.keys() {
            if let Some(group) = MlsGroup::load(provider.storage(), &GroupId::from_slice(g.as_bytes())).map_err(mls)? {
                groups.insert(g.clone(), group);
            }
        }
        let http = Http::new(server, token, id.clone());
        let mut d = Self {
            id,
            http,
            provider,
            signer,
            store,
            meta,
            groups,
            backlog: Vec::new(),
            operator_key: None,
            verified: BTreeMap::new(),
        };
        d.persist()?;
        Ok(d)
    }

    /// Trusts the PEM certificates in `pem` as roots for the operator's
    /// `https://` and `wss://` endpoints (a private CA); the bundled web
    /// PKI roots stay trusted.
    pub fn trust_roots_pem(&mut self, pem: &[u8]) -> Result<(), ClientError> {
        self.http.trust_roots_pem(pem)
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    pub fn cursor(&self) -> u64 {
        self.meta.cursor
    }

    fn persist(&mut self) -> Result<(), ClientError> {
        self.store.save(self.provider.storage(), &self.meta)
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.id.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// Builds and uploads `count` one-time KeyPackages, plus a last-resort one.
    pub async fn publish_key_packages(&mut self, count: usize, last_resort: bool) -> Result<(), ClientError> {
        let mut body = Vec::new();
        for i in 0..count + usize::from(last_resort) {
            let mut b = KeyPackage::builder();
            if i == count {
                // A last-resort extension must also be declared in the leaf
                // capabilities, or receivers reject the KeyPackage.
                b = b.mark_as_last_resort().leaf_node_capabilities(Capabilities::new(
                    None,
                    None,
                    Some(&[ExtensionType::LastResort]),
                    None,
                    None,
                ));
            }
            let kpb = b.build(CIPHERSUITE, &self.provider, &self.signer, self.credential()).map_err(mls)?;
            let out: MlsMessageOut = kpb.key_package().clone().into();
            body.extend(out.tls_serialize_detached().map_err(mls)?);
        }
        self.persist()?;
        self.http.upload_key_packages(body).await?;
        Ok(())
    }

    /// Creates a group hosted by this device's operator.
    pub async fn create_group(&mut self, room: &str) -> Result<String, ClientError> {
        let (gid, group, bytes) = new_group(&self.provider, &self.signer, self.credential(), &self.id, room)?;
        let accepted = self.http.create_group(bytes).await?;
        self.meta.groups.insert(gid.to_string(), accepted.position);
        self.meta.group_seqs.insert(gid.to_string(), 0);
        self.groups.insert(gid.to_string(), group);
        self.persist()?;
        Ok(gid.to_string())
    }

    /// Drops a Commit the hub refused, so the group can build another.
    pub fn discard_pending(&mut self, g: &str) -> Result<(), ClientError> {
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        group.clear_pending_commit(self.provider.storage()).map_err(mls)?;
        self.meta.pending_commits.remove(g);
        self.persist()
    }

    /// Whether a Commit of ours waits for its verdict in `g`.
    pub fn has_pending_commit(&self, g: &str) -> bool {
        self.groups.get(g).is_some_and(|x| x.pending_commit().is_some())
    }

    pub fn epoch(&self, g: &str) -> Option<u64> {
        self.groups.get(g).map(|x| x.epoch().as_u64())
    }

    pub fn epoch_authenticator(&self, g: &str) -> Option<Vec<u8>> {
        self.groups.get(g).map(|x| x.epoch_authenticator().as_slice().to_vec())
    }

    pub fn members(&self, g: &str) -> Vec<String> {
        self.groups
            .get(g)
            .map(|x| {
                x.members().map(|m| String::from_utf8_lossy(m.credential.serialized_content()).into_owned()).collect()
            })
            .unwrap_or_default()
    }

    /// The last hub position this device applied in `g`.
    pub fn applied(&self, g: &str) -> u64 {
        self.meta.groups.get(g).copied().unwrap_or(0)
    }

    pub fn groups(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Claims KeyPackages of every device of `users` (validating each).
    pub async fn claim(&mut self, users: &[UserId]) -> Result<Vec<KeyPackage>, ClientError> {
        let mut out = Vec::new();
        for u in users {
            for c in self.http.claim(u).await? {
                let bytes = B64.decode(&c.key_package).map_err(|e| ClientError::Protocol(e.to_string()))?;
                let kp = match MlsMessageIn::tls_deserialize_exact(&bytes).map_err(mls)?.extract() {
                    MlsMessageBodyIn::KeyPackage(k) => {
                        k.validate(self.provider.crypto(), ProtocolVersion::Mls10).map_err(mls)?
                    }
                    _ => return Err(ClientError::Protocol("claim returned a non-KeyPackage".into())),
                };
                if kp.leaf_node().credential().serialized_content() != c.device.as_bytes() {
                    return Err(ClientError::Protocol("claimed KeyPackage is not for the device named".into()));
                }
                let leaf = kp.leaf_node();
                self.verify_member(leaf.credential().serialized_content(), leaf.signature_key().as_slice()).await?;
                out.push(kp);
            }
        }
        Ok(out)
    }

    /// Adds every device of `users` in one Commit (with its Welcome).
    pub async fn add(&mut self, g: &str, users: &[UserId]) -> Result<(), ClientError> {
        let kps = self.claim(users).await?;
        self.commit_with_retry(g, |d, g| d.prepare_add(g, &kps)).await
    }

    /// Rotates this device's leaf (RFC 9420 §12.4, a Commit with an UpdatePath).
    pub async fn update(&mut self, g: &str) -> Result<(), ClientError> {
        self.commit_with_retry(g, |d, g| d.prepare_update(g)).await
    }

    /// Removes a member device.
    pub async fn remove(&mut self, g: &str, device: &DeviceId) -> Result<(), ClientError> {
        self.commit_with_retry(g, |d, g| {
            let (provider, signer) = (&d.provider, &d.signer);
            let group = d.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
            let idx = group
                .members()
                .find(|m| m.credential.serialized_content() == device.as_bytes())
                .map(|m| m.index)
                .ok_or_else(|| ClientError::Protocol(format!("{device} is not a member")))?;
            let (commit, _, group_info) = group.remove_members(provider, signer, &[idx]).map_err(mls)?;
            commit_body(&commit, None, group_info)
        })
        .await
    }

    /// Builds a Commit with `build` and submits it. The pending Commit is
    /// merged when the hub's echo arrives; on `wrong_epoch` it is discarded,
    /// the device syncs, and the Commit is rebuilt on the new epoch. On a
    /// retryable answer (`timeout`: the hub may still apply it) the pending
    /// Commit is kept and its bytes are resent to learn the verdict, as the
    /// API says: discarding it would strand this device if the hub applied
    /// it after all.
    async fn commit_with_retry(
        &mut self,
        g: &str,
        build: impl Fn(&mut Self, &str) -> Result<Vec<u8>, ClientError>,
    ) -> Result<(), ClientError> {
        self.resolve_pending(g).await?;
        for _ in 0..EPOCH_RETRIES {
            let body = build(self, g)?;
            self.meta.pending_commits.insert(g.to_owned(), body.clone());
            self.persist()?;
            match self.submit_resending(body).await {
                Ok(a) => {
                    self.sync_until(g, a.position).await?;
                    self.meta.pending_commits.remove(g);
                    return self.persist();
                }
                Err(e) if e.code() == Some(ErrorCode::WrongEpoch) => {
                    self.discard_pending(g)?;
                    self.catch_up_to_epoch(g, &e).await?;
                }
                // Still undecided: keep it, and resend it next time.
                Err(e) if undecided(&e) => return Err(e),
                Err(e) => {
                    self.discard_pending(g)?;
                    return Err(e);
                }
            }
        }
        Err(ClientError::Protocol("gave up after repeated wrong_epoch".into()))
    }

    /// Settles a Commit of ours whose verdict never came: its echo may be
    /// in the mailbox already; otherwise the same bytes are resent.
    async fn resolve_pending(&mut self, g: &str) -> Result<(), ClientError> {
        if !self.has_pending_commit(g) {
            self.meta.pending_commits.remove(g);
            return Ok(());
        }
        self.catch_up().await?;
        if !self.has_pending_commit(g) {
            self.meta.pending_commits.remove(g);
            return self.persist();
        }
        let Some(body) = self.meta.pending_commits.get(g).cloned() else {
            // Nothing to resend (state from an older SDK): start afresh.
            return self.discard_pending(g);
        };
        match self.submit_resending(body).await {
            Ok(a) => {
                self.sync_until(g, a.position).await?;
                self.meta.pending_commits.remove(g);
                self.persist()
            }
            Err(e) if undecided(&e) => Err(e),
            // Refused, or another Commit won its epoch.
            Err(_) => self.discard_pending(g),
        }
    }

    /// Submits a Commit or a message, resending the same bytes (so the same
    /// submission, which the operator decides once) with backoff while the
    /// answer is retryable. Encrypting again instead would make a second
    /// message if the first was accepted after all.
    async fn submit_resending(&mut self, body: Vec<u8>) -> Result<Accepted, ClientError> {
        let mut wait = std::time::Duration::from_millis(200);
        for attempt in 1..=RESENDS {
            match self.http.submit(body.clone(), None).await {
                Err(e) if undecided(&e) && attempt < RESENDS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                other => return other,
            }
        }
        Err(ClientError::Protocol("no verdict".into()))
    }

    /// Submits a Commit built elsewhere (tests use this to race two Commits)
    /// without syncing afterwards. On refusal the pending Commit is cleared.
    pub async fn submit_pending(&mut self, g: &str, body: Vec<u8>) -> Result<Accepted, ClientError> {
        match self.http.submit(body, None).await {
            Ok(a) => Ok(a),
            Err(e) => {
                self.discard_pending(g)?;
                Err(e)
            }
        }
    }

    /// Prepares a self-update Commit without sending it (for races in tests).
    pub fn prepare_update(&mut self, g: &str) -> Result<Vec<u8>, ClientError> {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let bundle = group.self_update(provider, signer, LeafNodeParameters::default()).map_err(mls)?;
        let body = commit_body(bundle.commit(), None, bundle.group_info().cloned())?;
        self.persist()?;
        Ok(body)
    }

    /// Encrypts and sends an application message; returns its hub position.
    pub async fn send(&mut self, g: &str, text: &str) -> Result<u64, ClientError> {
        // A Commit of ours still undecided decides the epoch to send in.
        self.resolve_pending(g).await?;
        for _ in 0..EPOCH_RETRIES {
            let (provider, signer) = (&self.provider, &self.signer);
            let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
            let out = group.create_message(provider, signer, text.as_bytes()).map_err(mls)?;
            let body = out.tls_serialize_detached().map_err(mls)?;
            // Its echo is matched by these bytes, not by the position in the
            // answer: an answer lost to an outage may still be an acceptance.
            let key = sent_key(&body);
            self.remember_sent(key.clone(), text);
            self.persist()?;
            match self.submit_resending(body).await {
                Ok(a) => return Ok(a.position),
                Err(e) if e.code() == Some(ErrorCode::WrongEpoch) => {
                    self.meta.sent.remove(&key);
                    self.catch_up_to_epoch(g, &e).await?;
                }
                Err(e) if undecided(&e) => return Err(e),
                Err(e) => {
                    self.meta.sent.remove(&key);
                    self.persist()?;
                    return Err(e);
                }
            }
        }
        Err(ClientError::Protocol("gave up after repeated wrong_epoch".into()))
    }

    fn remember_sent(&mut self, key: String, text: &str) {
        while self.meta.sent.len() >= MAX_UNECHOED {
            let Some(oldest) = self.meta.sent.keys().next().cloned() else { break };
            self.meta.sent.remove(&oldest);
        }
        self.meta.sent.insert(key, text.to_owned());
    }

    /// After `wrong_epoch`: catches up until this device reached the epoch
    /// the hub named (the winning Commit may take a while to arrive here,
    /// from another operator or across a NATS failover), so that the retry
    /// is built on it rather than on the same stale epoch again. Bounded:
    /// the caller's retry finds out if the epoch never came.
    async fn catch_up_to_epoch(&mut self, g: &str, refusal: &ClientError) -> Result<(), ClientError> {
        let target = match refusal {
            ClientError::Api(e) => e.current_epoch,
            _ => None,
        };
        let mut wait = std::time::Duration::from_millis(20);
        for _ in 0..40 {
            self.catch_up().await?;
            let reached = match (target, self.epoch(g)) {
                (Some(t), Some(now)) => now >= t,
                // Gone (removed, or rejoining failed): nothing to wait for.
                (_, None) => true,
                (None, Some(_)) => true,
            };
            if reached || self.meta.rejoin.contains_key(g) {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_millis(1000));
        }
        Ok(())
    }

    /// Syncs until the group has applied `position` (bounded).
    /// An accepted entry reaches this device's operator within seconds
    /// normally; across a NATS failover at the hub or on the way to a
    /// follower it can take tens of seconds, hence the long bound.
    async fn sync_until(&mut self, g: &str, position: u64) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        for i in 0u32.. {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            self.catch_up_mailbox().await?;
            if self.groups.contains_key(g) {
                self.catch_up_group(g).await?;
            }
            if self.meta.groups.get(g).copied().unwrap_or(0) >= position || !self.groups.contains_key(g) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10 + 5 * u64::from(i.min(20)))).await;
        }
        Err(ClientError::Protocol(format!("position {position} of {g} did not arrive")))
    }

    /// Fetches and applies the mailbox and every group that advanced.
    /// Returns every event applied since the last call, including those
    /// applied while another call (a send, a commit) waited for the hub.
    pub async fn sync(&mut self) -> Result<Vec<Event>, ClientError> {
        self.catch_up().await?;
        Ok(std::mem::take(&mut self.backlog))
    }

    /// Applies the mailbox (new groups first), then reads each group whose
    /// last entry is past our cursor: one request tells which advanced.
    async fn catch_up(&mut self) -> Result<(), ClientError> {
        self.catch_up_mailbox().await?;
        for head in self.http.groups().await? {
            if !self.groups.contains_key(&head.group) {
                continue;
            }
            if head.seq > self.group_cursor(&head.group) {
                self.catch_up_group(&head.group).await?;
            }
        }
        let stuck: Vec<String> = self.meta.rejoin.keys().cloned().collect();
        for g in stuck {
            match self.rejoin(&g).await {
                Ok(event) => self.backlog.push(event),
                // Not now (the hub is away, or no GroupInfo yet): the next
                // sync tries again.
                Err(e) if e.code().is_some_and(|c| c.retryable() || c == ErrorCode::GroupInfoUnavailable) => {
                    tracing::debug!(group = g, error = %e, "cannot rejoin yet");
                }
                Err(e) if matches!(e.code(), Some(ErrorCode::NotAMember | ErrorCode::UnknownGroup)) => {
                    self.forget_group(&g)?;
                    self.backlog.push(Event::Failed { group: g, position: 0, reason: e.to_string() });
                }
                Err(e) => {
                    self.backlog.push(Event::Failed { group: g, position: 0, reason: format!("cannot rejoin: {e}") })
                }
            }
        }
        Ok(())
    }

    /// Deletes this device's MLS state of group `g` (memory and storage).
    fn drop_group_state(&mut self, g: &str) -> Result<(), ClientError> {
        if let Some(mut group) = self.groups.remove(g) {
            group.delete(self.provider.storage()).map_err(mls)?;
        }
        Ok(())
    }

    /// Drops every trace of group `g` from this device.
    fn forget_group(&mut self, g: &str) -> Result<(), ClientError> {
        self.drop_group_state(g)?;
        self.meta.groups.remove(g);
        self.meta.group_seqs.remove(g);
        self.meta.rejoin.remove(g);
        self.meta.pending_commits.remove(g);
        self.persist()
    }

    /// Gets back into group `g`, which this device can no longer follow, by
    /// an external commit (RFC 9420 §12.4.3.2) from the group's current
    /// GroupInfo that replaces the device's own stale leaf. The Commit it
    /// could not process, if that is why, is reported to the hub first.
    /// The device's old state of the group is useless by now and dropped;
    /// on `wrong_epoch` (another Commit came first) it starts again from
    /// the newer GroupInfo.
    pub async fn rejoin(&mut self, g: &str) -> Result<Event, ClientError> {
        let failed_at = self.meta.rejoin.get(g).copied().unwrap_or(0);
        if failed_at > 0 {
            // Best effort: the report is for the hub's operators, and a
            // failure to send it must not keep the device out.
            if let Err(e) = self.http.report(g, failed_at).await {
                tracing::debug!(group = g, error = %e, "cannot report the Commit");
            }
            self.meta.rejoin.insert(g.to_owned(), 0);
            self.persist()?;
        }
        for _ in 0..EPOCH_RETRIES {
            let info = self.http.group_info(g).await?;
            let bytes = B64.decode(&info.group_info).map_err(|e| ClientError::Protocol(format!("bad base64: {e}")))?;
            let vgi = match MlsMessageIn::tls_deserialize_exact(&bytes).map_err(mls)?.extract() {
                MlsMessageBodyIn::GroupInfo(vgi) => vgi,
                _ => return Err(ClientError::Protocol("the operator's GroupInfo is not a GroupInfo".into())),
            };
            self.drop_group_state(g)?;
            // openmls removes our old leaf itself: it finds our signature
            // key in the tree (a Remove proposal in the same Commit).
            let (group, bundle) = MlsGroup::external_commit_builder()
                .with_config(join_config())
                .build_group(&self.provider, vgi, self.credential())
                .map_err(mls)?
                .load_psks(self.provider.storage())
                .map_err(mls)?
                .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
                .map_err(mls)?
                .finalize(&self.provider)
                .map_err(mls)?;
            let (commit, _, group_info) = bundle.into_contents();
            let members: Vec<Member> = group.members().collect();
            self.groups.insert(g.to_owned(), group);
            if let Err(e) = self.verify_members(members).await {
                self.forget_group(g)?;
                return Err(ClientError::Identity(format!("refused to rejoin: {e}")));
            }
            let body = commit_body(&commit, None, group_info)?;
            self.persist()?;
            match self.submit_resending(body).await {
                Ok(a) => {
                    // Accepted is final: merge now, and read on after it.
                    // What came between the Commit we could not process
                    // and this one is not for us.
                    let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
                    group.merge_pending_commit(&self.provider).map_err(mls)?;
                    let epoch = group.epoch().as_u64();
                    self.meta.groups.insert(g.to_owned(), a.position);
                    self.meta.group_seqs.entry(g.to_owned()).or_insert(0);
                    self.meta.rejoin.remove(g);
                    self.persist()?;
                    return Ok(Event::Rejoined { group: g.to_owned(), position: a.position, epoch });
                }
                Err(e) => {
                    self.drop_group_state(g)?;
                    self.persist()?;
                    if e.code() != Some(ErrorCode::WrongEpoch) {
                        return Err(e);
                    }
                }
            }
        }
        Err(ClientError::Protocol("gave up rejoining after repeated wrong_epoch".into()))
    }

    /// Applies the mailbox (Welcomes, notices), then acks it.
    async fn catch_up_mailbox(&mut self) -> Result<(), ClientError> {
        loop {
            let items = self.http.fetch(self.meta.cursor, 256).await?;
            if items.is_empty() {
                return Ok(());
            }
            for item in &items {
                if let Some(e) = self.apply(item).await? {
                    self.backlog.push(e);
                }
            }
            let last = items.last().map(|i| i.seq).unwrap_or(self.meta.cursor);
            // Persist before acking: a crash in between replays the items,
            // and the per-group position check drops what was applied.
            self.persist()?;
            self.http.ack(last).await?;
        }
    }

    /// Reads and applies one group's entries after our cursor.
    async fn catch_up_group(&mut self, g: &str) -> Result<(), ClientError> {
        for _ in 0..10_000 {
            let after = self.group_cursor(g);
            let position = self.meta.groups.get(g).copied();
            let page = match self.http.entries(g, after, position, 256).await {
                Ok(p) => p,
                // One group the operator cannot serve right now (a record
                // it cannot read yet, an overloaded stream) must not keep
                // the device from its other groups: read it next time.
                Err(e) if e.code().is_some_and(|c| c.retryable() && c != ErrorCode::WrongEpoch) => {
                    tracing::debug!(group = g, error = %e, "group unavailable; read again later");
                    return Ok(());
                }
                Err(e) if e.code() == Some(ErrorCode::HistoryExpired) => {
                    // MLS cannot skip a Commit: the way back is a rejoin.
                    self.meta.rejoin.entry(g.to_owned()).or_insert(0);
                    self.persist()?;
                    let reason = e.to_string();
                    self.backlog.push(Event::Failed { group: g.to_owned(), position: position.unwrap_or(0), reason });
                    return Ok(());
                }
                Err(e) if e.code() == Some(ErrorCode::NotAMember) => {
                    let reason = e.to_string();
                    self.backlog.push(Event::Failed { group: g.to_owned(), position: position.unwrap_or(0), reason });
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            for item in &page.entries {
                if let Some(e) = self.apply_entry(item).await? {
                    self.backlog.push(e);
                }
            }
            if !self.groups.contains_key(g) {
                return self.persist();
            }
            // Past what the page skipped, unless an entry was refused as a
            // hole: then the cursor stays before it.
            let whole = page.entries.last().is_none_or(|e| self.group_cursor(g) >= e.seq);
            if whole {
                let cursor = self.meta.group_seqs.entry(g.to_owned()).or_insert(0);
                *cursor = (*cursor).max(page.next);
            }
            self.persist()?;
            if page.entries.is_empty() || !whole {
                return Ok(());
            }
        }
        Ok(())
    }

    /// This operator's cursor in group `g` (0: from its start).
    pub fn group_cursor(&self, g: &str) -> u64 {
        self.meta.group_seqs.get(g).copied().unwrap_or(0)
    }

    /// The WebSocket frame that follows every group of this device from
    /// where it is: `{"follow": {"<group>": {"after": seq, "position": p}}}`.
    pub fn follow_frame(&self) -> String {
        let follow: serde_json::Map<String, serde_json::Value> = self
            .groups
            .keys()
            .map(|g| {
                let from = serde_json::json!({
                    "after": self.group_cursor(g),
                    "position": self.meta.groups.get(g).copied().unwrap_or(0),
                });
                (g.clone(), from)
            })
            .collect();
        serde_json::json!({ "follow": follow }).to_string()
    }

    /// Before this device trusts a group (joined from a Welcome or
    /// rejoined): every other member must hold the key its operator vouches
    /// for (RFC 9750 §5.3).
    async fn verify_members(&mut self, members: Vec<Member>) -> Result<(), ClientError> {
        let own = self.id.as_bytes().to_vec();
        for m in members.into_iter().filter(|m| m.credential.serialized_content() != own.as_slice()) {
            self.verify_member(m.credential.serialized_content(), &m.signature_key).await?;
        }
        Ok(())
    }

    /// Checks a member's credential and signature key against the binding
    /// its operator signed, fetched through our own server.
    pub async fn verify_member(&mut self, identity: &[u8], key: &[u8]) -> Result<(), ClientError> {
        let device = DeviceId::from_credential_identity(identity)
            .map_err(|e| ClientError::Identity(format!("member identity is not a device id: {e}")))?;
        if self.verified.get(device.as_str()).is_some_and(|k| k == key) {
            return Ok(());
        }
        let our_key = match &self.operator_key {
            Some(k) => k.clone(),
            None => {
                let op = self.http.operator().await?;
                let k = op
                    .get("binding_key")
                    .and_then(|k| k.as_str())
                    .ok_or_else(|| ClientError::Protocol("operator has no binding key".into()))?
                    .to_owned();
                self.operator_key = Some(k.clone());
                k
            }
        };
        let (signed, named_key) = match self.http.binding(&device).await {
            Ok(s) => s,
            Err(ClientError::Api(e)) if e.code == ErrorCode::UnknownDevice => {
                return Err(ClientError::Identity(format!("{device}: no binding")))
            }
            Err(e) => return Err(e),
        };
        // Our own devices are vouched for by our operator's key; another
        // operator's by the key our server holds for that peer.
        let operator_key = if device.domain() == self.id.domain() { our_key } else { named_key };
        signed
            .check(&operator_key, &device, key, unix_now())
            .map_err(|e| ClientError::Identity(format!("{device}: {e}")))?;
        self.verified.insert(device.to_string(), key.to_vec());
        Ok(())
    }

    /// Applies one mailbox item (a Welcome or a notice), fetched or pushed.
    pub async fn apply(&mut self, item: &Item) -> Result<Option<Event>, ClientError> {
        if item.seq <= self.meta.cursor {
            return Ok(None);
        }
        if item.kind == "welcome" && item.message.is_empty() {
            // A server fault (an operator mid-upgrade hands out a stored
            // Welcome empty): not applied, and not passed either, so it is
            // read again.
            return Err(ClientError::Protocol(format!("mailbox item {} is a Welcome without its bytes", item.seq)));
        }
        self.meta.cursor = item.seq;
        if item.kind == "notice" {
            let n: Option<proto::wire::Notice> = item.notice.clone().and_then(|v| serde_json::from_value(v).ok());
            return Ok(n.and_then(|n| match n {
                proto::wire::Notice::KeyPackagesLow { cipher_suite, remaining } => {
                    Some(Event::KeyPackagesLow { cipher_suite, remaining })
                }
                // The removing Commit, read from the group, says it too.
                proto::wire::Notice::Removed { .. } => None,
            }));
        }
        let Some(g) = item.group.clone() else {
            return Ok(None);
        };
        let bytes = item.bytes()?;
        let fail = |reason: String| Ok(Some(Event::Failed { group: g.clone(), position: item.position, reason }));
        if item.kind == "welcome" {
            if self.groups.contains_key(&g) {
                return Ok(None);
            }
            let welcome = match MlsMessageIn::tls_deserialize_exact(&bytes).map_err(mls)?.extract() {
                MlsMessageBodyIn::Welcome(w) => w,
                _ => return fail("welcome item is not a Welcome".into()),
            };
            let staged = match StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, None) {
                Ok(s) => s,
                Err(e) => return fail(format!("cannot process Welcome: {e}")),
            };
            if let Err(e) = self.verify_members(staged.members().collect()).await {
                return fail(format!("refused Welcome: {e}"));
            }
            let group = staged.into_group(&self.provider).map_err(mls)?;
            let epoch = group.epoch().as_u64();
            self.groups.insert(g.clone(), group);
            self.meta.groups.insert(g.clone(), item.position);
            self.meta.group_seqs.insert(g.clone(), item.group_seq.unwrap_or(0));
            return Ok(Some(Event::Joined { group: g, position: item.position, epoch }));
        }
        Ok(None)
    }

    /// Applies one entry of a group, read or pushed, in position order:
    /// one already applied is skipped, so a replay changes nothing.
    pub async fn apply_entry(&mut self, item: &Item) -> Result<Option<Event>, ClientError> {
        let Some(g) = item.group.clone() else {
            return Ok(None);
        };
        let bytes = item.bytes()?;
        let fail = |reason: String| Ok(Some(Event::Failed { group: g.clone(), position: item.position, reason }));
        let applied = self.meta.groups.get(&g).copied();
        match applied {
            None => return Ok(None),
            // The entry names its predecessor: never apply past a hole (nor
            // move the cursor over it).
            Some(p) if item.position > p && item.prev_position > p => {
                return fail(format!("entries {p}..{} are missing; read the group again", item.prev_position))
            }
            Some(_) => {
                if let Some(cursor) = self.meta.group_seqs.get_mut(&g) {
                    *cursor = (*cursor).max(item.seq);
                }
            }
        }
        if applied.is_some_and(|p| item.position <= p) {
            return Ok(None);
        }
        self.meta.groups.insert(g.clone(), item.position);
        if self.meta.rejoin.contains_key(&g) {
            // Nothing after a Commit we could not process is readable to
            // us until we rejoin.
            return Ok(None);
        }
        if item.kind == "application" && item.own {
            let text = self.meta.sent.remove(&sent_key(&bytes)).unwrap_or_default();
            let sender = self.id.to_string();
            return Ok(Some(Event::Message { group: g, position: item.position, sender, text, own: true }));
        }
        let Some(group) = self.groups.get_mut(&g) else {
            return Ok(None);
        };
        let pm = match MlsMessageIn::tls_deserialize_exact(&bytes).map_err(mls)?.try_into_protocol_message() {
            Ok(pm) => pm,
            Err(e) => return fail(format!("not a protocol message: {e}")),
        };
        let epoch = group.epoch().as_u64();
        let processed = match group.process_message(&self.provider, pm) {
            Ok(p) => p,
            Err(e) => {
                // A Commit the hub accepted but we cannot process (the hub
                // cannot check its confirmation or membership tag), or an
                // entry of an epoch we never reached: we cannot follow the
                // group any more, and MLS cannot skip a Commit.
                if item.kind == "commit" || item.epoch != epoch {
                    let report = if item.kind == "commit" { item.position } else { 0 };
                    self.meta.rejoin.entry(g.clone()).or_insert(report);
                }
                return fail(format!("cannot process: {e}"));
            }
        };
        let sender = String::from_utf8_lossy(processed.credential().serialized_content()).into_owned();
        let position = item.position;
        let event = match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(a) => Event::Message {
                group: g,
                position,
                sender,
                text: String::from_utf8_lossy(&a.into_bytes()).into_owned(),
                own: false,
            },
            ProcessedMessageContent::OwnPendingCommit => {
                group.merge_pending_commit(&self.provider).map_err(mls)?;
                Event::Commit { group: g, position, epoch: group.epoch().as_u64(), own: true }
            }
            ProcessedMessageContent::StagedCommitMessage(sc) => {
                let removed = sc.self_removed();
                group.merge_staged_commit(&self.provider, *sc).map_err(mls)?;
                if removed {
                    self.groups.remove(&g);
                    self.meta.groups.remove(&g);
                    self.meta.group_seqs.remove(&g);
                    Event::Removed { group: g, position }
                } else {
                    Event::Commit { group: g, position, epoch: group.epoch().as_u64(), own: false }
                }
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                group.store_pending_proposal(self.provider.storage(), *p).map_err(mls)?;
                Event::Proposal { group: g, position }
            }
            other => return fail(format!("unexpected content {other:?}")),
        };
        Ok(Some(event))
    }
}

impl Device {
    /// Encrypts an application message without sending it (benchmarks
    /// pre-encrypt so that they measure the server).
    pub fn encrypt_for_bench(&mut self, g: &str, text: &[u8]) -> Result<Vec<u8>, ClientError> {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let out = group.create_message(provider, signer, text).map_err(mls)?;
        let bytes = out.tls_serialize_detached().map_err(mls)?;
        // The ratchet advanced: persist it, or a reopened device would reuse
        // a generation (RFC 9420 §9.2 forbids reusing a key and nonce).
        self.persist()?;
        Ok(bytes)
    }
}

impl Device {
    /// Prepares a Commit adding `kps` without sending it (for races in tests).
    pub fn prepare_add(&mut self, g: &str, kps: &[KeyPackage]) -> Result<Vec<u8>, ClientError> {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.groups.get_mut(g).ok_or_else(|| ClientError::UnknownGroup(g.into()))?;
        let (commit, welcome, group_info) = group.add_members(provider, signer, kps).map_err(mls)?;
        let body = commit_body(&commit, Some(&welcome), group_info)?;
        self.persist()?;
        Ok(body)
    }
}
