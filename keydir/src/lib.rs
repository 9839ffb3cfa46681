//! The key directory: devices publish KeyPackages (RFC 9420 §10) here, and
//! anyone adding a device to a group claims one. Claims are one-time and
//! atomic; a device's last-resort KeyPackage is served when its pool is empty
//! and kept (RFC 9420 §10.1, RFC 9750 §5.2).
//!
//! This crate validates and stores; it speaks no HTTP. The embedded store is
//! sled (one process). Metrics use closed label sets only.
#![forbid(unsafe_code)]

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    KeyPackage, KeyPackageVerifyError, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion,
};
use openmls_rust_crypto::RustCrypto;
use prometheus::{IntCounterVec, Opts, Registry};
use proto::mls::wire_format;
use proto::{ApiError, DeviceId, ErrorCode, UserId};
use serde::{Deserialize, Serialize};

/// Most KeyPackages accepted in one upload request.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum KeydirError {
    #[error("KeyPackage {index}: {source}")]
    Invalid { index: usize, source: ApiError },
    #[error("{0}")]
    Refused(ApiError),
    #[error("key store failure: {0}")]
    Store(#[from] sled::Error),
}

impl KeydirError {
    pub fn to_api(&self) -> ApiError {
        match self {
            KeydirError::Invalid { index, source } => ApiError::new(
                source.code,
                format!("KeyPackage {index}: {}", source.message),
            ),
            KeydirError::Refused(e) => e.clone(),
            KeydirError::Store(_) => ApiError::new(ErrorCode::Unavailable, "key store unavailable"),
        }
    }
}

fn refused(code: ErrorCode, msg: impl Into<String>) -> KeydirError {
    KeydirError::Refused(ApiError::new(code, msg))
}

#[derive(Serialize, Deserialize)]
struct Stored {
    not_after: u64,
    bytes: Vec<u8>,
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
                Opts::new(
                    "mlsfed_keydir_uploads_total",
                    "KeyPackages uploaded, by result code.",
                ),
                &["result"],
            )?,
            claims: IntCounterVec::new(
                Opts::new(
                    "mlsfed_keydir_claims_total",
                    "KeyPackage claims, by result.",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.uploads.clone()))?;
        registry.register(Box::new(m.claims.clone()))?;
        Ok(m)
    }
}

pub struct KeyDirectory {
    /// device ‖ 0 ‖ suite(be16) ‖ KeyPackageRef → Stored
    one_time: sled::Tree,
    /// device ‖ 0 ‖ suite(be16) → Stored
    last_resort: sled::Tree,
    /// user ‖ 0 ‖ device → ()
    devices: sled::Tree,
    crypto: RustCrypto,
    cfg: config::Keydir,
    metrics: Metrics,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

impl KeyDirectory {
    pub fn open(db: &sled::Db, cfg: config::Keydir, metrics: Metrics) -> Result<Self, KeydirError> {
        Ok(Self {
            one_time: db.open_tree("kp_one_time")?,
            last_resort: db.open_tree("kp_last_resort")?,
            devices: db.open_tree("kp_devices")?,
            crypto: RustCrypto::default(),
            cfg,
            metrics,
        })
    }

    /// Validates one KeyPackage for `device` (RFC 9420 §10.1).
    fn validate(&self, device: &DeviceId, bytes: &[u8], now: u64) -> Result<KeyPackage, ApiError> {
        fn e(code: ErrorCode, msg: impl Into<String>) -> ApiError {
            ApiError::new(code, msg)
        }
        proto::mls::precheck(bytes, &[wire_format::KEY_PACKAGE])?;
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|x| {
            e(
                ErrorCode::MalformedMessage,
                format!("cannot decode KeyPackage: {x}"),
            )
        })?;
        let kp_in = match msg.extract() {
            MlsMessageBodyIn::KeyPackage(k) => k,
            _ => return Err(e(ErrorCode::WrongWireFormat, "expected a KeyPackage")),
        };
        // validate() checks both signatures, the version, the lifetime against
        // the clock, init_key != encryption_key, and that every extension is
        // declared in the leaf capabilities (which covers last_resort).
        let kp = kp_in
            .validate(&self.crypto, ProtocolVersion::Mls10)
            .map_err(|x| match x {
                KeyPackageVerifyError::InvalidSignature
                | KeyPackageVerifyError::InvalidLeafNodeSignature => {
                    e(ErrorCode::InvalidSignature, x.to_string())
                }
                KeyPackageVerifyError::LifetimeError(_)
                | KeyPackageVerifyError::MissingLifetime => {
                    e(ErrorCode::KeyPackageExpired, x.to_string())
                }
                KeyPackageVerifyError::UnsupportedExtension => {
                    e(ErrorCode::LastResortNotInCapabilities, x.to_string())
                }
                KeyPackageVerifyError::InvalidProtocolVersion => {
                    e(ErrorCode::UnsupportedVersion, x.to_string())
                }
                other => e(ErrorCode::InvalidKeyPackage, other.to_string()),
            })?;
        if kp.leaf_node().credential().serialized_content() != device.as_bytes() {
            return Err(e(
                ErrorCode::IdentityMismatch,
                "credential identity is not the uploading device",
            ));
        }
        let lt = kp.life_time();
        if lt.not_after() <= now {
            return Err(e(ErrorCode::KeyPackageExpired, "KeyPackage has expired"));
        }
        if lt.not_after().saturating_sub(lt.not_before()) > self.cfg.max_lifetime_secs + 3600 {
            return Err(e(
                ErrorCode::LifetimeTooLong,
                "KeyPackage lifetime is longer than this operator accepts",
            ));
        }
        Ok(kp)
    }

    /// Stores a batch of concatenated MLSMessage(KeyPackage) for `device`.
    /// The batch is all-or-nothing: the first invalid KeyPackage refuses it.
    pub fn upload(
        &self,
        device: &DeviceId,
        body: &[u8],
        now: u64,
    ) -> Result<UploadReport, KeydirError> {
        let mut input = body;
        let mut parsed = Vec::new();
        while !input.is_empty() {
            if parsed.len() == MAX_BATCH {
                return Err(refused(
                    ErrorCode::TooManyKeyPackages,
                    format!("at most {MAX_BATCH} per upload"),
                ));
            }
            let start = input;
            let index = parsed.len();
            let fail = |source: ApiError| {
                self.metrics
                    .uploads
                    .with_label_values(&[source.code.as_str()])
                    .inc();
                KeydirError::Invalid { index, source }
            };
            proto::mls::precheck(input, &[wire_format::KEY_PACKAGE]).map_err(fail)?;
            if MlsMessageIn::tls_deserialize(&mut input).is_err() {
                return Err(fail(ApiError::new(
                    ErrorCode::MalformedMessage,
                    "cannot decode KeyPackage",
                )));
            }
            let raw = &start[..start.len() - input.len()];
            let kp = self.validate(device, raw, now).map_err(fail)?;
            parsed.push((raw.to_vec(), kp));
        }
        if parsed.is_empty() {
            return Err(refused(
                ErrorCode::InvalidRequest,
                "no KeyPackage in the request",
            ));
        }
        let mut report = UploadReport::default();
        for (raw, kp) in parsed {
            let suite = u16::from(kp.ciphersuite()).to_be_bytes();
            let stored = proto::wire::encode(&Stored {
                not_after: kp.life_time().not_after(),
                bytes: raw,
            });
            if kp.last_resort() {
                self.last_resort
                    .insert(key(&[device.as_bytes(), &suite]), stored)?;
                report.last_resort += 1;
            } else {
                let count = self
                    .one_time
                    .scan_prefix(key(&[device.as_bytes(), &suite]))
                    .count();
                if count >= self.cfg.max_per_device {
                    return Err(refused(
                        ErrorCode::TooManyKeyPackages,
                        "this device's pool is full",
                    ));
                }
                let r = kp
                    .hash_ref(&self.crypto)
                    .map_err(|_| refused(ErrorCode::InvalidKeyPackage, "cannot hash KeyPackage"))?;
                self.one_time
                    .insert(key(&[device.as_bytes(), &suite, r.as_slice()]), stored)?;
                report.accepted += 1;
            }
            self.metrics.uploads.with_label_values(&["accepted"]).inc();
        }
        self.devices
            .insert(key(&[device.user().as_bytes(), device.as_bytes()]), &[])?;
        Ok(report)
    }

    /// Claims one KeyPackage for each device of `user` (except `skip`).
    pub fn claim(
        &self,
        user: &UserId,
        skip: Option<&DeviceId>,
        suites: &[u16],
        now: u64,
    ) -> Result<Vec<Claimed>, KeydirError> {
        let mut prefix = user.as_bytes().to_vec();
        prefix.push(0);
        let mut devices = Vec::new();
        for item in self.devices.scan_prefix(&prefix) {
            let (k, _) = item?;
            if let Ok(d) = DeviceId::from_credential_identity(&k[prefix.len()..]) {
                if Some(&d) != skip {
                    devices.push(d);
                }
            }
        }
        if devices.is_empty() {
            self.metrics
                .claims
                .with_label_values(&["unknown_user"])
                .inc();
            return Err(refused(
                ErrorCode::UnknownUser,
                "no device of this user has published KeyPackages",
            ));
        }
        let mut out = Vec::new();
        for d in &devices {
            if let Some(c) = self.claim_device(d, suites, now)? {
                out.push(c);
            }
        }
        if out.is_empty() {
            self.metrics.claims.with_label_values(&["exhausted"]).inc();
            return Err(refused(
                ErrorCode::KeyMaterialExhausted,
                "no KeyPackage is available for this user",
            ));
        }
        self.metrics.claims.with_label_values(&["ok"]).inc();
        Ok(out)
    }

    fn claim_device(
        &self,
        d: &DeviceId,
        suites: &[u16],
        now: u64,
    ) -> Result<Option<Claimed>, KeydirError> {
        for suite in suites {
            let s = suite.to_be_bytes();
            // One-time first. remove() is atomic: of two concurrent claimers
            // only one gets Some for the same key.
            for item in self.one_time.scan_prefix(key(&[d.as_bytes(), &s])) {
                let (k, _) = item?;
                let Some(v) = self.one_time.remove(&k)? else {
                    continue;
                };
                let Ok(stored) = proto::wire::decode::<Stored>(&v) else {
                    continue;
                };
                if stored.not_after <= now {
                    continue; // Expired: swept, never served.
                }
                return Ok(Some(Claimed {
                    device: d.clone(),
                    cipher_suite: *suite,
                    last_resort: false,
                    key_package: stored.bytes,
                }));
            }
            if let Some(v) = self.last_resort.get(key(&[d.as_bytes(), &s]))? {
                if let Ok(stored) = proto::wire::decode::<Stored>(&v) {
                    if stored.not_after > now {
                        return Ok(Some(Claimed {
                            device: d.clone(),
                            cipher_suite: *suite,
                            last_resort: true,
                            key_package: stored.bytes,
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    pub fn stock(&self, d: &DeviceId, suites: &[u16]) -> Result<Vec<Stock>, KeydirError> {
        let mut out = Vec::new();
        for suite in suites {
            let s = suite.to_be_bytes();
            out.push(Stock {
                cipher_suite: *suite,
                one_time: self.one_time.scan_prefix(key(&[d.as_bytes(), &s])).count(),
                last_resort: self.last_resort.contains_key(key(&[d.as_bytes(), &s]))?,
            });
        }
        Ok(out)
    }
}
