//! Operator configuration. This is the only crate that reads files or the
//! environment: every other crate receives typed values.
//!
//! Sources, later ones winning: built-in defaults, an optional TOML file,
//! then `MLSFED_*` environment variables for the most-tuned settings.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("environment variable {name} is not valid: {reason}")]
    Env { name: &'static str, reason: String },
    #[error("config is not valid: {0}")]
    Invalid(String),
}

/// Everything one operator needs to run any of its worker roles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The operator's domain, e.g. `a.example`; it names the operator in every
    /// identifier it owns.
    pub domain: String,
    /// Where embedded nats-server data and local sled state live.
    pub data_dir: PathBuf,
    /// Address of the client HTTP/WebSocket API.
    pub listen: String,
    /// Where worker processes without the API (sequencer, fanout, bridge)
    /// serve `/metrics`, `/healthz` and `/readyz`. Empty: not served.
    pub metrics_listen: String,
    /// NATS server URL. Empty: start and supervise an embedded nats-server.
    pub nats_url: String,
    /// The nats-server binary for the embedded mode (default: from PATH).
    pub nats_server_bin: String,
    /// Secret that signs client bearer tokens (see `proto::auth`).
    pub token_secret: String,
    /// Hex seed (32 bytes) of the operator's Ed25519 key, which signs
    /// identity bindings. Empty: derived from `token_secret` (development
    /// only; set it in production).
    pub operator_key_seed: String,
    pub limits: Limits,
    pub streams: Streams,
    pub keydir: Keydir,
    pub federation: Federation,
    /// Peer operators we federate with (static; discovery is out of scope).
    pub peers: Vec<Peer>,
}

/// One peer operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub domain: String,
    /// The peer's NATS, where we publish into its inbound stream. Credentials
    /// there allow only our own inbound subject (docs/federation.md).
    pub nats_url: String,
    /// Optional NATS user credentials for the peer's server.
    #[serde(default)]
    pub nats_user: String,
    #[serde(default)]
    pub nats_password: String,
    /// The peer's Ed25519 operator key (base64), which signs its envelopes
    /// and its identity bindings.
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Federation {
    /// How long our outbox keeps messages for an unreachable peer: the
    /// outage we tolerate. Beyond it the peer needs a resync.
    pub outbox_max_age_secs: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Timeout of a request to a peer (claims, identity lookups).
    pub request_timeout_ms: u64,
    /// Federation protocol versions we offer (the highest common one is
    /// used; none in common makes a peer incompatible).
    pub versions: Vec<u16>,
}

impl Default for Federation {
    fn default() -> Self {
        Self {
            outbox_max_age_secs: 14 * 86_400,
            backoff_initial_ms: 200,
            backoff_max_ms: 60_000,
            request_timeout_ms: 5_000,
            versions: vec![1],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted request body (an MLS bundle or a KeyPackage batch).
    pub max_body_bytes: usize,
    /// How long a submit waits for the sequencer's verdict before answering
    /// a retryable `timeout` (the submission stays queued and is still applied).
    pub submit_timeout_ms: u64,
    /// Most items returned by one mailbox fetch.
    pub max_fetch: usize,
}

/// JetStream settings. Retention is what sets the outage a device or a peer
/// may have and still catch up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Streams {
    pub replicas: usize,
    /// Dedup window of SUBMIT and MAILBOX: longer than any client retry.
    pub duplicate_window_secs: u64,
    pub log_max_age_secs: u64,
    pub mailbox_max_age_secs: u64,
    /// How long a sequencer or fanout worker may hold a message before
    /// JetStream redelivers it to another worker.
    pub ack_wait_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keydir {
    /// `sled` (embedded, one ingest process) or `jetstream` (any number).
    pub backend: KeydirBackend,
    /// Cipher suites this operator accepts (RFC 9420 §17.1 values).
    pub cipher_suites: Vec<u16>,
    /// Longest KeyPackage lifetime accepted at upload.
    pub max_lifetime_secs: u64,
    /// Most KeyPackages one device may hold per cipher suite.
    pub max_per_device: usize,
    /// Below this many one-time KeyPackages a device gets a replenish notice.
    pub low_water: usize,
    /// A claimed KeyPackage that no Welcome used returns to the pool after this.
    pub reservation_secs: u64,
    pub claims_per_minute_per_requester: u32,
    pub claims_per_minute_per_user: u32,
    /// Lifetime of an identity binding signed by the operator.
    pub binding_lifetime_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeydirBackend {
    Sled,
    Jetstream,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            domain: "a.example".into(),
            data_dir: PathBuf::from("./mlsfed-data"),
            listen: "127.0.0.1:8080".into(),
            metrics_listen: String::new(),
            nats_url: String::new(),
            nats_server_bin: "nats-server".into(),
            token_secret: "dev-secret-change-me".into(),
            operator_key_seed: String::new(),
            limits: Limits::default(),
            streams: Streams::default(),
            keydir: Keydir::default(),
            federation: Federation::default(),
            peers: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 1 << 20, submit_timeout_ms: 10_000, max_fetch: 256 }
    }
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window_secs: 600,
            log_max_age_secs: 30 * 86_400,
            mailbox_max_age_secs: 30 * 86_400,
            ack_wait_secs: 30,
        }
    }
}

impl Default for Keydir {
    fn default() -> Self {
        Self {
            backend: KeydirBackend::Sled,
            cipher_suites: vec![1],
            max_lifetime_secs: 90 * 86_400,
            max_per_device: 1000,
            low_water: 5,
            reservation_secs: 3600,
            claims_per_minute_per_requester: 120,
            claims_per_minute_per_user: 600,
            binding_lifetime_secs: 30 * 86_400,
        }
    }
}

impl Streams {
    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.duplicate_window_secs)
    }
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
}

impl Limits {
    pub fn submit_timeout(&self) -> Duration {
        Duration::from_millis(self.submit_timeout_ms)
    }
}

impl Config {
    /// Defaults, then `path` if given, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, LoadConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, LoadConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LoadConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| LoadConfigError::Parse { path: path.into(), source })
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), LoadConfigError> {
        if let Some(v) = get("MLSFED_DOMAIN") {
            self.domain = v;
        }
        if let Some(v) = get("MLSFED_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("MLSFED_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("MLSFED_METRICS_LISTEN") {
            self.metrics_listen = v;
        }
        if let Some(v) = get("MLSFED_NATS_URL") {
            self.nats_url = v;
        }
        if let Some(v) = get("MLSFED_NATS_SERVER_BIN") {
            self.nats_server_bin = v;
        }
        if let Some(v) = get("MLSFED_TOKEN_SECRET") {
            self.token_secret = v;
        }
        if let Some(v) = get("MLSFED_MAX_BODY_BYTES") {
            self.limits.max_body_bytes = v
                .parse()
                .map_err(|e| LoadConfigError::Env { name: "MLSFED_MAX_BODY_BYTES", reason: format!("{e}") })?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), LoadConfigError> {
        if proto_like_domain(&self.domain) {
            Ok(())
        } else {
            Err(LoadConfigError::Invalid(format!("domain {:?} is not a lowercase DNS name", self.domain)))
        }?;
        if self.token_secret.len() < 8 {
            return Err(LoadConfigError::Invalid("token_secret must be at least 8 bytes".into()));
        }
        let dup = self.streams.duplicate_window_secs;
        if dup > self.streams.log_max_age_secs || dup > self.streams.mailbox_max_age_secs {
            return Err(LoadConfigError::Invalid(
                "streams.duplicate_window_secs must not exceed the log and mailbox max ages".into(),
            ));
        }
        if self.limits.max_body_bytes < 1024 {
            return Err(LoadConfigError::Invalid("limits.max_body_bytes must be at least 1024".into()));
        }
        Ok(())
    }

    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.domain == domain)
    }

    /// The operator's Ed25519 seed for identity bindings.
    pub fn operator_seed(&self) -> Result<[u8; 32], LoadConfigError> {
        if self.operator_key_seed.is_empty() {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(b"mlsfed operator key v1\0");
            h.update(self.token_secret.as_bytes());
            return Ok(h.finalize().into());
        }
        hex::decode(&self.operator_key_seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| LoadConfigError::Invalid("operator_key_seed must be 64 hex characters".into()))
    }

    /// The embedded nats-server's directory.
    pub fn nats_dir(&self) -> PathBuf {
        self.data_dir.join("nats")
    }

    /// The embedded key directory's sled database.
    pub fn keydir_path(&self) -> PathBuf {
        self.data_dir.join("keydir.sled")
    }
}

/// Splits `nats://user:pass@host:port` into the URL without credentials and
/// the credentials (the NATS client takes them separately).
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_owned(), None) };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (format!("{scheme}://{host}"), Some((user.to_owned(), pass.to_owned())))
        }
        None => (url.to_owned(), None),
    }
}

fn proto_like_domain(d: &str) -> bool {
    !d.is_empty()
        && d.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls() {
        assert_eq!(split_credentials("nats://127.0.0.1:4222"), ("nats://127.0.0.1:4222".into(), None));
        assert_eq!(
            split_credentials("nats://u:p@127.0.0.1:4222"),
            ("nats://127.0.0.1:4222".into(), Some(("u".into(), "p".into())))
        );
    }

    #[test]
    fn env_overrides_and_validation() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "MLSFED_DOMAIN").then(|| "b.example".to_string())).unwrap();
        assert_eq!(c.domain, "b.example");
        assert!(c.validate().is_ok());
        c.domain = "Bad Domain".into();
        assert!(c.validate().is_err());
        let e = c.apply_env(|k| (k == "MLSFED_MAX_BODY_BYTES").then(|| "x".to_string()));
        assert!(matches!(e, Err(LoadConfigError::Env { .. })));
        let parsed: Config = toml::from_str("domain = \"c.example\"\n[limits]\nmax_body_bytes = 2048\n").unwrap();
        assert_eq!(parsed.limits.max_body_bytes, 2048);
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
    }
}
