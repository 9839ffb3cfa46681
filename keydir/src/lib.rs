//! The key directory and authentication service of an operator.
//!
//! Devices publish KeyPackages (RFC 9420 §10) here and anyone adding a device
//! to a group claims one. A one-time KeyPackage is handed out at most once,
//! even across keydir processes; a device's last-resort KeyPackage is served
//! when its pool is empty and kept (RFC 9420 §10.1, RFC 9750 §5.2). The
//! operator also signs identity bindings (device ↔ signature key, RFC 9750
//! §5.3) that clients check before trusting a member.
//!
//! This crate validates and stores; it speaks no HTTP. Storage is behind
//! [`store::KeyStore`] with a sled and a JetStream implementation.
#![forbid(unsafe_code)]

mod js_store;
mod limits;
mod sled_store;
pub mod store;

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    CredentialType, KeyPackage, KeyPackageVerifyError, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion,
};
use openmls::treesync::errors::LifetimeError;
use openmls_rust_crypto::RustCrypto;
use prometheus::{IntCounterVec, Opts, Registry};
use proto::identity::{Binding, SignedBinding};
use proto::mls::wire_format;
use proto::{names, ApiError, DeviceId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};

pub use js_store::JsStore;
pub use sled_store::SledStore;
use store::{Caps, KeyStore, Reservation, StoreError, Stored, Take};

/// Most KeyPackages accepted in one upload request.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum KeydirError {
    #[error("KeyPackage {index}: {source}")]
    Invalid { index: usize, source: ApiError },
    #[error("{0}")]
    Refused(ApiError),
    #[error("key store failure: {0}")]
    Store(#[from] StoreError),
}

impl KeydirError {
    pub fn to_api(&self) -> ApiError {
        match self {
            KeydirError::Invalid { index, source } => {
                ApiError::new(source.code, format!("KeyPackage {index}: {}", source.message))
            }
            KeydirError::Refused(e) => e.clone(),
            KeydirError::Store(e) => {
                tracing::warn!(error = %e, "key store failure");
                ApiError::new(ErrorCode::Unavailable, "key store unavailable")
            }
        }
    }
}

/// The MLSMessage header, then `KeyPackage.version`, which follows it
/// (RFC 9420 §10): a KeyPackage for another MLS version is unsupported,
/// not malformed.
fn precheck_key_package(bytes: &[u8]) -> Result<(), ApiError> {
    proto::mls::precheck(bytes, &[wire_format::KEY_PACKAGE])?;
    if let Some(v) = bytes.get(4..6).map(|v| u16::from_be_bytes([v[0], v[1]])) {
        if v != 1 {
            return Err(api(
                ErrorCode::UnsupportedVersion,
                format!("KeyPackage version {v} is not supported; only mls10 (1)"),
            ));
        }
    }
    Ok(())
}

fn refused(code: ErrorCode, msg: impl Into<String>) -> KeydirError {
    KeydirError::Refused(ApiError::new(code, msg))
}

fn api(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

/// One claimed KeyPackage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claimed {
    pub device: DeviceId,
    pub cipher_suite: u16,
    pub last_resort: bool,
    /// The MLSMessage(KeyPackage) bytes.
    pub key_package: Vec<u8>,
}

/// A device whose one-time stock fell below the low-water mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowStock {
    pub device: DeviceId,
    pub cipher_suite: u16,
    pub remaining: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimOutcome {
    pub claimed: Vec<Claimed>,
    pub low_stock: Vec<LowStock>,
}

/// What a claimer asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// Acceptable cipher suites, most preferred first (empty: the operator's).
    #[serde(default)]
    pub cipher_suites: Vec<u16>,
    /// Capabilities every returned KeyPackage's leaf must declare.
    #[serde(default)]
    pub required_capabilities: Caps,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadReport {
    pub accepted: usize,
    pub last_resort: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stock {
    pub cipher_suite: u16,
    pub one_time: usize,
    pub last_resort: bool,
}

#[derive(Clone)]
pub struct Metrics {
    pub uploads: IntCounterVec,
    pub claims: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            uploads: IntCounterVec::new(
                Opts::new("mlsfed_keydir_uploads_total", "KeyPackages uploaded, by result code."),
                &["result"],
            )?,
            claims: IntCounterVec::new(
                Opts::new("mlsfed_keydir_claims_total", "KeyPackages claimed or refused, by result."),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.uploads.clone()))?;
        registry.register(Box::new(m.claims.clone()))?;
        Ok(m)
    }
}

/// The storage backends, chosen by config.
pub enum Backend {
    Sled(SledStore),
    JetStream(Box<JsStore>),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Backend::Sled($s) => $e,
            Backend::JetStream($s) => $e,
        }
    };
}

impl KeyStore for Backend {
    async fn put_one_time(&self, d: &DeviceId, s: &Stored) -> store::Result<()> {
        dispatch!(self, b => b.put_one_time(d, s).await)
    }
    async fn put_last_resort(&self, d: &DeviceId, s: &Stored) -> store::Result<()> {
        dispatch!(self, b => b.put_last_resort(d, s).await)
    }
    async fn last_resort(&self, d: &DeviceId, suite: u16) -> store::Result<Option<Stored>> {
        dispatch!(self, b => b.last_resort(d, suite).await)
    }
    async fn take_one_time(
        &self,
        d: &DeviceId,
        suite: u16,
        now: u64,
        accept: &(dyn Fn(&Stored) -> bool + Sync),
        claimer: &DeviceId,
    ) -> store::Result<Take> {
        dispatch!(self, b => b.take_one_time(d, suite, now, accept, claimer).await)
    }
    async fn put_back(&self, d: &DeviceId, s: &Stored, return_id: &str) -> store::Result<()> {
        dispatch!(self, b => b.put_back(d, s, return_id).await)
    }
    async fn has_one_time(&self, d: &DeviceId, s: &Stored) -> store::Result<bool> {
        dispatch!(self, b => b.has_one_time(d, s).await)
    }
    async fn count_one_time(&self, d: &DeviceId, suite: u16) -> store::Result<usize> {
        dispatch!(self, b => b.count_one_time(d, suite).await)
    }
    async fn count_up_to(&self, d: &DeviceId, suite: u16, limit: usize) -> store::Result<usize> {
        dispatch!(self, b => b.count_up_to(d, suite, limit).await)
    }
    async fn sweep(&self, d: &DeviceId, suite: u16, now: u64) -> store::Result<usize> {
        dispatch!(self, b => b.sweep(d, suite, now).await)
    }
    async fn add_device(&self, u: &UserId, d: &DeviceId) -> store::Result<()> {
        dispatch!(self, b => b.add_device(u, d).await)
    }
    async fn devices(&self, u: &UserId) -> store::Result<Vec<DeviceId>> {
        dispatch!(self, b => b.devices(u).await)
    }
    async fn remove_device(&self, d: &DeviceId, suites: &[u16]) -> store::Result<()> {
        dispatch!(self, b => b.remove_device(d, suites).await)
    }
    async fn put_reservation(&self, r: &Reservation) -> store::Result<()> {
        dispatch!(self, b => b.put_reservation(r).await)
    }
    async fn take_reservation(&self, kp_ref: &[u8]) -> store::Result<Option<Reservation>> {
        dispatch!(self, b => b.take_reservation(kp_ref).await)
    }
    async fn reservations_before(&self, before: u64) -> store::Result<Vec<Reservation>> {
        dispatch!(self, b => b.reservations_before(before).await)
    }
    async fn put_binding(&self, d: &DeviceId, signed: &[u8]) -> store::Result<()> {
        dispatch!(self, b => b.put_binding(d, signed).await)
    }
    async fn binding(&self, d: &DeviceId) -> store::Result<Option<Vec<u8>>> {
        dispatch!(self, b => b.binding(d).await)
    }
    async fn put_revoked(&self, d: &DeviceId) -> store::Result<()> {
        dispatch!(self, b => b.put_revoked(d).await)
    }
    async fn is_revoked(&self, d: &DeviceId) -> store::Result<bool> {
        dispatch!(self, b => b.is_revoked(d).await)
    }
}

pub struct KeyDirectory {
    store: Backend,
    crypto: RustCrypto,
    cfg: config::Keydir,
    domain: String,
    signer: ed25519_dalek::SigningKey,
    limits: limits::RateLimits,
    metrics: Metrics,
    /// Devices known to be revoked. Revocation is permanent, so a hit never
    /// goes stale; a miss asks the store. Bounded: when full, it stops
    /// growing and misses keep asking the store.
    revoked: std::sync::Mutex<std::collections::HashSet<DeviceId>>,
}

/// Most entries in each list of a claim (suites, required capabilities).
pub const MAX_CLAIM_LIST: usize = 32;

/// Most revoked devices remembered in memory by one process.
const REVOKED_CACHE: usize = 65_536;

struct Parsed {
    kp: KeyPackage,
    stored: Stored,
    last_resort: bool,
}

impl KeyDirectory {
    pub fn new(store: Backend, cfg: config::Keydir, domain: String, seed: [u8; 32], metrics: Metrics) -> Self {
        let limits = limits::RateLimits::new(cfg.claims_per_minute_per_requester, cfg.claims_per_minute_per_user);
        Self {
            store,
            crypto: RustCrypto::default(),
            cfg,
            domain,
            signer: proto::identity::operator_key(&seed),
            limits,
            revoked: Default::default(),
            metrics,
        }
    }

    pub fn store(&self) -> &Backend {
        &self.store
    }

    /// The operator's binding key (base64 Ed25519 public key).
    pub fn operator_key(&self) -> String {
        proto::identity::public_key_b64(&self.signer)
    }

    /// Validates one KeyPackage for `device` (RFC 9420 §10.1).
    fn validate(&self, device: &DeviceId, bytes: &[u8], now: u64) -> Result<Parsed, ApiError> {
        precheck_key_package(bytes)?;
        let msg = MlsMessageIn::tls_deserialize_exact(bytes)
            .map_err(|x| api(ErrorCode::MalformedMessage, format!("cannot decode KeyPackage: {x}")))?;
        let kp_in = match msg.extract() {
            MlsMessageBodyIn::KeyPackage(k) => k,
            _ => return Err(api(ErrorCode::WrongWireFormat, "expected a KeyPackage")),
        };
        // validate() checks both signatures, the version, the lifetime
        // against the clock, init_key != encryption_key, and that every
        // extension is declared in the leaf capabilities (so a last-resort
        // extension without its capability is refused).
        let kp = kp_in.validate(&self.crypto, ProtocolVersion::Mls10).map_err(|x| match x {
            KeyPackageVerifyError::InvalidSignature | KeyPackageVerifyError::InvalidLeafNodeSignature => {
                api(ErrorCode::InvalidSignature, x.to_string())
            }
            KeyPackageVerifyError::LifetimeError(LifetimeError::Expired { .. }) => {
                api(ErrorCode::KeyPackageExpired, x.to_string())
            }
            KeyPackageVerifyError::LifetimeError(_) | KeyPackageVerifyError::MissingLifetime => {
                api(ErrorCode::InvalidKeyPackage, x.to_string())
            }
            KeyPackageVerifyError::InitKeyEqualsEncryptionKey => api(ErrorCode::InitKeyReused, x.to_string()),
            KeyPackageVerifyError::UnsupportedExtension => api(ErrorCode::LastResortNotInCapabilities, x.to_string()),
            KeyPackageVerifyError::InvalidProtocolVersion => api(ErrorCode::UnsupportedVersion, x.to_string()),
            other => api(ErrorCode::InvalidKeyPackage, other.to_string()),
        })?;
        let suite = u16::from(kp.ciphersuite());
        if !self.cfg.cipher_suites.contains(&suite) {
            return Err(api(
                ErrorCode::UnsupportedCipherSuite,
                format!("cipher suite {suite:#06x} is not accepted here"),
            ));
        }
        // Only basic credentials (RFC 9420 §5.3): the operator vouches for
        // identities by its own signed bindings, not by X.509 chains.
        if kp.leaf_node().credential().credential_type() != CredentialType::Basic {
            return Err(api(ErrorCode::UnsupportedCredential, "only basic credentials are supported"));
        }
        if kp.leaf_node().credential().serialized_content() != device.as_bytes() {
            return Err(api(ErrorCode::IdentityMismatch, "credential identity is not the uploading device"));
        }
        let lt = kp.life_time();
        if lt.not_after() <= now {
            return Err(api(ErrorCode::KeyPackageExpired, "KeyPackage has expired"));
        }
        // One hour of slack for clock skew between the client and us.
        if lt.not_after().saturating_sub(lt.not_before()) > self.cfg.max_lifetime_secs + 3600 {
            return Err(api(ErrorCode::LifetimeTooLong, "KeyPackage lifetime is longer than this operator accepts"));
        }
        let c = kp.leaf_node().capabilities();
        let caps = Caps {
            extensions: c.extensions().iter().map(|e| u16::from(*e)).collect(),
            proposals: c.proposals().iter().map(|p| u16::from(*p)).collect(),
            credentials: c.credentials().iter().map(|x| u16::from(*x)).collect(),
        };
        let kp_ref = kp
            .hash_ref(&self.crypto)
            .map_err(|_| api(ErrorCode::InvalidKeyPackage, "cannot hash KeyPackage"))?
            .as_slice()
            .to_vec();
        let last_resort = kp.last_resort();
        let stored = Stored { kp_ref, suite, not_after: lt.not_after(), caps, bytes: bytes.to_vec() };
        Ok(Parsed { kp, stored, last_resort })
    }

    /// Stores a batch of concatenated MLSMessage(KeyPackage) for `device`
    /// and (re)binds the device's signature key. The batch is all or
    /// nothing: the first invalid KeyPackage refuses it.
    pub async fn upload(&self, device: &DeviceId, body: &[u8], now: u64) -> Result<UploadReport, KeydirError> {
        let mut input = body;
        let mut parsed = Vec::new();
        while !input.is_empty() {
            if parsed.len() == MAX_BATCH {
                return Err(refused(ErrorCode::TooManyKeyPackages, format!("at most {MAX_BATCH} per upload")));
            }
            let start = input;
            let index = parsed.len();
            let fail = |source: ApiError| {
                self.metrics.uploads.with_label_values(&[source.code.as_str()]).inc();
                KeydirError::Invalid { index, source }
            };
            precheck_key_package(input).map_err(fail)?;
            if MlsMessageIn::tls_deserialize(&mut input).is_err() {
                return Err(fail(api(ErrorCode::MalformedMessage, "cannot decode KeyPackage")));
            }
            let raw = &start[..start.len() - input.len()];
            parsed.push(self.validate(device, raw, now).map_err(fail)?);
        }
        let Some(first) = parsed.first() else {
            return Err(refused(ErrorCode::InvalidRequest, "no KeyPackage in the request"));
        };
        let key = first.kp.leaf_node().signature_key().as_slice().to_vec();
        if parsed.iter().any(|p| p.kp.leaf_node().signature_key().as_slice() != key.as_slice()) {
            return Err(refused(ErrorCode::IdentityMismatch, "all KeyPackages of a device carry one signature key"));
        }
        let mut per_suite: HashMap<u16, usize> = HashMap::new();
        for p in parsed.iter().filter(|p| !p.last_resort) {
            *per_suite.entry(p.stored.suite).or_default() += 1;
        }
        for (suite, n) in &per_suite {
            if self.store.count_one_time(device, *suite).await? + n > self.cfg.max_per_device {
                return Err(refused(ErrorCode::TooManyKeyPackages, "this device's pool is full"));
            }
        }
        self.bind(device, &key, now).await?;
        let mut report = UploadReport::default();
        for p in parsed {
            if p.last_resort {
                self.store.put_last_resort(device, &p.stored).await?;
                report.last_resort += 1;
            } else {
                self.store.put_one_time(device, &p.stored).await?;
                report.accepted += 1;
            }
            self.metrics.uploads.with_label_values(&["accepted"]).inc();
        }
        self.store.add_device(&device.user(), device).await?;
        Ok(report)
    }

    /// Whether `device` was removed. A removed device id is dead for good:
    /// its token, even one still within its lifetime, opens nothing, and it
    /// can never be bound to a key again (the user adds a new device).
    pub async fn is_revoked(&self, device: &DeviceId) -> Result<bool, KeydirError> {
        if self.revoked.lock().map(|r| r.contains(device)).unwrap_or(false) {
            return Ok(true);
        }
        let revoked = self.store.is_revoked(device).await? || {
            // Devices removed before the permanent mark existed.
            match self.store.binding(device).await? {
                // Our own store: the signature was checked when written.
                Some(bytes) => serde_json::from_slice::<SignedBinding>(&bytes)
                    .ok()
                    .and_then(|s| B64.decode(&s.binding).ok())
                    .and_then(|b| serde_json::from_slice::<Binding>(&b).ok())
                    .is_some_and(|b| b.revoked),
                None => false,
            }
        };
        if revoked {
            if let Ok(mut r) = self.revoked.lock() {
                if r.len() < REVOKED_CACHE {
                    r.insert(device.clone());
                }
            }
        }
        Ok(revoked)
    }

    /// Signs a binding of `device` to `key` unless a live one exists.
    async fn bind(&self, device: &DeviceId, key: &[u8], now: u64) -> Result<(), KeydirError> {
        if self.store.is_revoked(device).await? {
            return Err(refused(ErrorCode::DeviceRevoked, "this device was removed"));
        }
        let key_b64 = B64.encode(key);
        if let Some(existing) = self.store.binding(device).await? {
            if let Ok(s) = serde_json::from_slice::<SignedBinding>(&existing) {
                if let Ok(b) = s.open(&self.operator_key()) {
                    if b.revoked {
                        return Err(refused(ErrorCode::DeviceRevoked, "this device was removed"));
                    }
                    let fresh = b.not_after > now + self.cfg.binding_lifetime_secs / 2;
                    if !b.revoked && b.signature_key == key_b64 && fresh {
                        return Ok(());
                    }
                }
            }
        }
        let b = Binding {
            device: device.clone(),
            user: device.user(),
            signature_key: key_b64,
            issued_at: now,
            not_after: now + self.cfg.binding_lifetime_secs,
            revoked: false,
        };
        let signed = proto::identity::sign(&self.signer, &b);
        let bytes = serde_json::to_vec(&signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put_binding(device, &bytes).await?;
        // A removal that raced this bind wins: its mark is permanent, and
        // the binding it may have lost is rewritten revoked.
        if self.store.is_revoked(device).await? {
            self.revoke_binding(device, now).await?;
            return Err(refused(ErrorCode::DeviceRevoked, "this device was removed"));
        }
        Ok(())
    }

    /// The signed binding of one of our devices (revoked ones included).
    pub async fn binding(&self, device: &DeviceId) -> Result<SignedBinding, KeydirError> {
        let bytes = self
            .store
            .binding(device)
            .await?
            .ok_or_else(|| refused(ErrorCode::UnknownDevice, "no binding for this device"))?;
        serde_json::from_slice(&bytes).map_err(|e| KeydirError::Store(StoreError::Corrupt(e.to_string())))
    }

    /// Removes a device: its binding is revoked (and stays, so lookups say
    /// so) and its KeyPackages are deleted.
    pub async fn remove_device(&self, device: &DeviceId, now: u64) -> Result<(), KeydirError> {
        // The permanent mark first: from here on no bind can succeed.
        self.binding(device).await?;
        self.store.put_revoked(device).await?;
        self.revoke_binding(device, now).await?;
        if let Ok(mut r) = self.revoked.lock() {
            if r.len() < REVOKED_CACHE {
                r.insert(device.clone());
            }
        }
        self.store.remove_device(device, &self.cfg.cipher_suites).await?;
        Ok(())
    }

    /// Rewrites `device`'s binding as revoked (lookups then say so).
    async fn revoke_binding(&self, device: &DeviceId, now: u64) -> Result<(), KeydirError> {
        let signed = self.binding(device).await?;
        let mut b =
            signed.open(&self.operator_key()).map_err(|e| KeydirError::Store(StoreError::Corrupt(e.to_string())))?;
        if b.revoked {
            return Ok(());
        }
        b.revoked = true;
        b.issued_at = now;
        let bytes = serde_json::to_vec(&proto::identity::sign(&self.signer, &b))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.store.put_binding(device, &bytes).await?;
        Ok(())
    }

    /// Claims one KeyPackage for each device of `user` except `requester`.
    pub async fn claim(
        &self,
        requester: &DeviceId,
        user: &UserId,
        req: &ClaimRequest,
        now: u64,
    ) -> Result<ClaimOutcome, KeydirError> {
        if user.domain() != self.domain {
            return Err(refused(ErrorCode::NotHub, "that user belongs to another operator"));
        }
        // Bounded input, bounded work: a claim's cost must not grow with
        // what the claimer lists (each suite and capability is checked
        // against a whole pool).
        let caps = &req.required_capabilities;
        if req.cipher_suites.len() > MAX_CLAIM_LIST
            || caps.extensions.len() > MAX_CLAIM_LIST
            || caps.proposals.len() > MAX_CLAIM_LIST
            || caps.credentials.len() > MAX_CLAIM_LIST
        {
            return Err(refused(
                ErrorCode::InvalidRequest,
                format!("a claim lists at most {MAX_CLAIM_LIST} cipher suites and {MAX_CLAIM_LIST} of each capability"),
            ));
        }
        if let Err(e) = self.limits.check(requester.as_str(), user.as_str()) {
            self.metrics.claims.with_label_values(&["rate_limited"]).inc();
            return Err(KeydirError::Refused(e));
        }
        let devices: Vec<DeviceId> = self.store.devices(user).await?.into_iter().filter(|d| d != requester).collect();
        if devices.is_empty() {
            self.metrics.claims.with_label_values(&["unknown_user"]).inc();
            return Err(refused(ErrorCode::UnknownUser, "no device of this user has published KeyPackages"));
        }
        let suites: Vec<u16> = if req.cipher_suites.is_empty() {
            self.cfg.cipher_suites.clone()
        } else {
            req.cipher_suites.iter().copied().filter(|s| self.cfg.cipher_suites.contains(s)).collect()
        };
        let accept = |s: &Stored| s.caps.covers(&req.required_capabilities);
        let mut out = ClaimOutcome::default();
        let mut incompatible = suites.is_empty();
        for d in &devices {
            let mut got = None;
            for suite in &suites {
                match self.store.take_one_time(d, *suite, now, &accept, requester).await? {
                    Take::Taken(s) => {
                        let remaining = self.store.count_up_to(d, *suite, self.cfg.low_water).await?;
                        if remaining < self.cfg.low_water {
                            out.low_stock.push(LowStock { device: d.clone(), cipher_suite: *suite, remaining });
                        }
                        got = Some(Claimed {
                            device: d.clone(),
                            cipher_suite: *suite,
                            last_resort: false,
                            key_package: s.bytes,
                        });
                    }
                    Take::NoneCompatible => incompatible = true,
                    Take::Empty => {}
                }
                if got.is_some() {
                    break;
                }
                match self.store.last_resort(d, *suite).await? {
                    Some(s) if s.not_after > now && accept(&s) => {
                        out.low_stock.push(LowStock { device: d.clone(), cipher_suite: *suite, remaining: 0 });
                        got = Some(Claimed {
                            device: d.clone(),
                            cipher_suite: *suite,
                            last_resort: true,
                            key_package: s.bytes,
                        });
                        break;
                    }
                    Some(s) if s.not_after > now => incompatible = true,
                    _ => {}
                }
            }
            if let Some(c) = got {
                self.metrics.claims.with_label_values(&[if c.last_resort { "last_resort" } else { "one_time" }]).inc();
                out.claimed.push(c);
            }
        }
        if out.claimed.is_empty() {
            let (code, label) = if incompatible {
                (ErrorCode::NoCompatibleMaterial, "no_compatible_material")
            } else {
                (ErrorCode::KeyMaterialExhausted, "exhausted")
            };
            self.metrics.claims.with_label_values(&[label]).inc();
            return Err(refused(code, "no KeyPackage of this user fits the request"));
        }
        Ok(out)
    }

    pub async fn stock(&self, d: &DeviceId) -> Result<Vec<Stock>, KeydirError> {
        let mut out = Vec::new();
        for suite in &self.cfg.cipher_suites {
            out.push(Stock {
                cipher_suite: *suite,
                one_time: self.store.count_one_time(d, *suite).await?,
                last_resort: self.store.last_resort(d, *suite).await?.is_some(),
            });
        }
        Ok(out)
    }

    /// A Welcome used these KeyPackages: their reservations are settled.
    pub async fn consumed(&self, kp_refs: &[Vec<u8>]) -> Result<(), KeydirError> {
        for r in kp_refs {
            self.store.take_reservation(r).await?;
        }
        Ok(())
    }

    /// Returns to their pools the KeyPackages claimed more than
    /// `reservation_secs` ago that no Welcome used; returns how many.
    pub async fn release_expired(&self, now: u64) -> Result<usize, KeydirError> {
        let mut n = 0;
        for r in self.store.reservations_before(now.saturating_sub(self.cfg.reservation_secs)).await? {
            // Put it back first, then drop the reservation: a crash in
            // between leaves it pooled and reserved, which the next pass
            // settles, rather than in neither place. (A claim interrupted
            // between reserving and taking also left it pooled.)
            let back = r.stored.not_after > now && !self.store.has_one_time(&r.device, &r.stored).await?;
            if back {
                let id = names::key_package_return_msg_id(&r.stored.kp_ref, r.at);
                self.store.put_back(&r.device, &r.stored, &id).await?;
            }
            if self.store.take_reservation(&r.stored.kp_ref).await?.is_some() && back {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes expired one-time KeyPackages of `d`.
    pub async fn sweep(&self, d: &DeviceId, now: u64) -> Result<usize, KeydirError> {
        let mut n = 0;
        for suite in &self.cfg.cipher_suites {
            n += self.store.sweep(d, *suite, now).await?;
        }
        Ok(n)
    }
}
