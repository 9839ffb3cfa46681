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
    Env { name: String, reason: String },
    #[error("config is not valid: {0}")]
    Invalid(String),
}

/// Everything one operator needs to run any of its worker roles.
#[derive(Clone, Serialize, Deserialize)]
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
    /// CA certificate (PEM file) that the NATS server's certificate must
    /// chain to, for a `tls://` `nats_url`. Empty: the system's roots.
    pub nats_ca_file: String,
    /// Secret that signs client bearer tokens (see `proto::auth`). Required
    /// (at least 16 bytes), except on the embedded quick start, which
    /// generates one into `data_dir` on first run.
    pub token_secret: Secret,
    /// Hex seed (32 bytes) of the operator's Ed25519 key, which signs
    /// identity bindings and federation envelopes. Required, except on the
    /// embedded quick start (generated like `token_secret`).
    pub operator_key_seed: Secret,
    pub limits: Limits,
    pub streams: Streams,
    pub keydir: Keydir,
    pub federation: Federation,
    pub tracing: Tracing,
    /// Peer operators we federate with (static; discovery is out of scope).
    pub peers: Vec<Peer>,
}

/// A configured secret: serialized as the plain string, never shown by
/// `Debug` or `Display`, so a config printed or logged leaks nothing.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(empty)" } else { "Secret(redacted)" })
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// One peer operator.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub domain: String,
    /// The peer's NATS, where we publish into its inbound stream. Credentials
    /// there allow only our own inbound subject (docs/federation.md). Use
    /// `tls://` across the Internet.
    pub nats_url: String,
    /// Optional NATS user credentials for the peer's server.
    #[serde(default)]
    pub nats_user: String,
    #[serde(default)]
    pub nats_password: Secret,
    /// CA certificate (PEM file) the peer's NATS certificate must chain to.
    /// Empty: the system's roots.
    #[serde(default)]
    pub nats_ca_file: String,
    /// The peer's Ed25519 operator key (base64), which signs its envelopes
    /// and its identity bindings.
    pub public_key: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `nats_url` may carry a password (`nats://user:pass@host`).
        let (nats_url, creds) = split_credentials(&self.nats_url);
        f.debug_struct("Config")
            .field("domain", &self.domain)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("nats_url", &nats_url)
            .field("nats_url_credentials", &creds.is_some())
            .field("nats_server_bin", &self.nats_server_bin)
            .field("nats_ca_file", &self.nats_ca_file)
            .field("token_secret", &self.token_secret)
            .field("operator_key_seed", &self.operator_key_seed)
            .field("limits", &self.limits)
            .field("streams", &self.streams)
            .field("keydir", &self.keydir)
            .field("federation", &self.federation)
            .field("peers", &self.peers)
            .finish()
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A URL may carry a password (`nats://user:pass@host`).
        let (url, creds) = split_credentials(&self.nats_url);
        f.debug_struct("Peer")
            .field("domain", &self.domain)
            .field("nats_url", &url)
            .field("url_credentials", &creds.is_some())
            .field("nats_user", &self.nats_user)
            .field("nats_password", &self.nats_password)
            .field("nats_ca_file", &self.nats_ca_file)
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// Message traces: one span per stage, linked through NATS headers
/// (`proto::trace`), exported over OTLP/HTTP (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP traces URL, e.g.
    /// `http://127.0.0.1:4318/v1/traces`. Empty: spans are not recorded.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Finished spans waiting for export, at most; beyond, new ones are
    /// dropped and counted (`mlsfed_trace_spans_dropped_total`).
    pub max_queued_spans: usize,
}

impl Default for Tracing {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), service_name: "mlsfed".into(), max_queued_spans: 8192 }
    }
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
    /// How far a peer's signed request time may be from ours, either way,
    /// and still be answered. Replays inside the window are caught by the
    /// request's nonce, so this only has to cover clock skew.
    pub request_window_secs: u64,
    /// Largest step a peer's high-water mark may take at once. An envelope
    /// further ahead of the mark is refused (`seq_jump`) until an operator
    /// accepts it with `mlsfed peer reset-mark`. It must exceed the records
    /// our FED_OUT holds for all peers between two envelopes to one peer.
    pub max_seq_jump: u64,
    /// Federation protocol versions we offer (the highest common one is
    /// used; none in common makes a peer incompatible).
    pub versions: Vec<u16>,
    /// Requests (ours to peers, and peers' to us) one bridge process works
    /// on at once; beyond, a request is answered `unavailable` at once.
    pub max_concurrent_requests: usize,
    /// Bytes each peer's inbound stream may hold; beyond, its publishes are
    /// refused (its outbox keeps them and retries).
    pub inbox_max_bytes: i64,
}

impl Default for Federation {
    fn default() -> Self {
        Self {
            outbox_max_age_secs: 14 * 86_400,
            backoff_initial_ms: 200,
            backoff_max_ms: 60_000,
            request_timeout_ms: 5_000,
            request_window_secs: 300,
            max_seq_jump: 1 << 32,
            versions: vec![1],
            max_concurrent_requests: 256,
            inbox_max_bytes: 1 << 30,
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
    /// Most WebSocket push connections one ingest process holds; beyond,
    /// an upgrade answers 503 `unavailable` with `Retry-After`.
    pub max_websockets: usize,
    /// Most groups one WebSocket follows (and one sync request reports).
    pub max_followed_groups: usize,
    /// Most submissions one WebSocket has waiting for their verdicts; one
    /// more is answered `unavailable` on the socket at once.
    pub max_socket_submits: usize,
    /// Most open client connections per ingest process (keep it under the
    /// process's file-descriptor limit); one more gets a 503 and is closed.
    pub max_connections: usize,
    /// A connection whose request head has not arrived within this is
    /// closed (slowloris, idle keep-alive connections).
    pub header_read_timeout_ms: u64,
    /// Longest a request may take, body upload included (408 beyond).
    pub request_timeout_ms: u64,
    /// Requests worked on at once per ingest process; beyond, 503 at once.
    /// Submissions sent on sockets have a pool of the same size of their own.
    pub max_in_flight_requests: usize,
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
    /// Groups are spread over this many partitions; each is ordered by one
    /// sequencer process at a time, so it bounds how many sequencers help.
    /// Fixed when SUBMIT is created: changing it re-maps groups, which is a
    /// migration (drain SUBMIT first).
    pub partitions: u32,
    /// Submissions one sequencer holds unacknowledged per partition: the
    /// bound on its in-flight work (and on its cached groups, with
    /// `group_idle_secs`).
    pub max_in_flight_per_partition: u32,
    /// Atomic batches (a busy group's waiting messages in one LOG append)
    /// one sequencer process has in flight at once. nats-server holds at
    /// most 50 per stream (`jetstream.limits.batch.max_inflight_per_stream`)
    /// for all processes together: with many sequencer processes, keep
    /// their sum under it. A run that finds none free is appended one entry
    /// at a time instead of waiting.
    pub max_batches_in_flight: u32,
    /// Store a Commit's Welcome once for all the local devices it adds
    /// (`mlsfed.welcome.<group>.<position>`), each device's mailbox item
    /// pointing to it, instead of one copy per device. Ingest processes of
    /// versions before this one hand such an item out empty: an operator
    /// upgrading a running deployment sets this to false until every
    /// process runs this version (docs/operations.md).
    pub shared_welcomes: bool,
    /// A sequencer forgets a group's cached state after this long idle.
    pub group_idle_secs: u64,
    /// Most groups one process keeps a task (and a cached state) for, per
    /// partition: beyond, idle groups are forgotten at once to make room.
    pub max_groups_per_partition: u32,
    /// How long a partition stays with a process that stopped pulling it
    /// (crashed) before another takes it.
    pub partition_failover_secs: u64,
    /// Deliveries of one message before a worker gives up on it and moves
    /// it to `MLSFED_DEAD` with the reason (retries back off exponentially
    /// from `retry_base_ms`, capped at 30 s).
    pub max_deliver: i64,
    pub retry_base_ms: u64,
    /// How long dead letters are kept for an operator to look at.
    pub dead_letter_max_age_secs: u64,
    /// The embedded nats-server's JetStream `sync_interval`: `always`
    /// (fsync every write: an acknowledged Commit survives a host crash),
    /// a duration such as `1s` (a host crash loses at most that much), or
    /// empty for nats-server's default (2 min). Clustered deployments set
    /// this on their own servers and rely on replication (docs/operations.md).
    pub sync_interval: String,
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
            nats_ca_file: String::new(),
            token_secret: Secret::default(),
            operator_key_seed: Secret::default(),
            limits: Limits::default(),
            streams: Streams::default(),
            keydir: Keydir::default(),
            federation: Federation::default(),
            tracing: Tracing::default(),
            peers: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // NATS' default max_payload (1 MiB) less the room a submission
            // and a federation envelope need around a body: what every
            // operator on default NATS settings can carry and forward.
            max_body_bytes: (1 << 20) - (64 << 10),
            submit_timeout_ms: 10_000,
            max_fetch: 256,
            max_websockets: 10_000,
            max_followed_groups: 1024,
            max_socket_submits: 64,
            max_connections: 512,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_in_flight_requests: 1024,
        }
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
            partitions: 16,
            max_in_flight_per_partition: 256,
            max_batches_in_flight: 8,
            shared_welcomes: true,
            group_idle_secs: 60,
            max_groups_per_partition: 1024,
            partition_failover_secs: 5,
            max_deliver: 16,
            retry_base_ms: 250,
            dead_letter_max_age_secs: 30 * 86_400,
            sync_interval: "always".into(),
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

/// `MLSFED_*` variables that belong to tools, not to the configuration.
const TOOL_VARS: &[&str] = &[
    "MLSFED_CONFIG",
    "MLSFED_LOG",
    "MLSFED_TEST_LOG",
    "MLSFED_TOKEN",
    "MLSFED_SERVER",
    "MLSFED_CLIENT_HOME",
    "MLSFED_CA_FILE",
];

/// Older names kept working: variable, setting path.
const ENV_ALIASES: &[(&str, &[&str])] = &[("MLSFED_MAX_BODY_BYTES", &["limits", "max_body_bytes"])];

/// Sets the existing setting at `path` in `tree` to `raw`, parsed as that
/// setting's type. `Err(None)`: no such setting; `Err(Some(why))`: the
/// value does not fit it.
fn set_path(tree: &mut toml::Value, path: &[String], raw: &str) -> Result<(), Option<String>> {
    let (last, sections) = path.split_last().ok_or(None)?;
    let mut node = tree;
    for section in sections {
        node = node.as_table_mut().and_then(|t| t.get_mut(section.as_str())).ok_or(None)?;
    }
    let slot = node.as_table_mut().and_then(|t| t.get_mut(last.as_str())).ok_or(None)?;
    let value = match slot {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|e| Some(format!("{e}")))?),
        toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|e| Some(format!("{e}")))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.trim().parse().map_err(|e| Some(format!("{e}")))?),
        toml::Value::Array(_) => {
            let parsed: toml::Table =
                toml::from_str(&format!("v = {raw}")).map_err(|_| Some("expected a TOML list, like [1, 3]".into()))?;
            parsed.get("v").filter(|v| v.is_array()).cloned().ok_or_else(|| Some("expected a TOML list".into()))?
        }
        toml::Value::Table(_) => return Err(Some("names a section; set its keys as MLSFED_<SECTION>__<KEY>".into())),
        toml::Value::Datetime(_) => return Err(Some("dates are not settable from the environment".into())),
    };
    *slot = value;
    Ok(())
}

impl Config {
    /// Defaults, then `path` if given, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, LoadConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        cfg.apply_env(std::env::vars())?;
        if cfg.nats_url.is_empty() {
            cfg.embedded_secrets()?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The embedded quick start's exception to "no secret, no start": an
    /// empty token secret or operator seed is read from
    /// `data_dir/secrets.toml`, which the first run creates with random
    /// values (mode 0600) and later runs keep using, so tokens and the
    /// operator key survive restarts.
    pub fn embedded_secrets(&mut self) -> Result<(), LoadConfigError> {
        if !self.token_secret.is_empty() && !self.operator_key_seed.is_empty() {
            return Ok(());
        }
        #[derive(Serialize, Deserialize)]
        struct Stored {
            token_secret: Secret,
            operator_key_seed: Secret,
        }
        let path = self.data_dir.join("secrets.toml");
        let read = |source| LoadConfigError::Read { path: path.clone(), source };
        let stored: Stored = match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).map_err(|source| LoadConfigError::Parse { path: path.clone(), source })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let stored = Stored { token_secret: random_hex().into(), operator_key_seed: random_hex().into() };
                std::fs::create_dir_all(&self.data_dir).map_err(read)?;
                write_private(&path, toml::to_string(&stored).unwrap_or_default().as_bytes()).map_err(read)?;
                // Whoever renamed last won: use what is on disk.
                let text = std::fs::read_to_string(&path).map_err(read)?;
                toml::from_str(&text).map_err(|source| LoadConfigError::Parse { path: path.clone(), source })?
            }
            Err(e) => return Err(read(e)),
        };
        if self.token_secret.is_empty() {
            self.token_secret = stored.token_secret;
        }
        if self.operator_key_seed.is_empty() {
            self.operator_key_seed = stored.operator_key_seed;
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<Self, LoadConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LoadConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| LoadConfigError::Parse { path: path.into(), source })
    }

    /// Layers `MLSFED_*` variables over the configuration: every setting
    /// has one. A top-level key is `MLSFED_<KEY>` (`MLSFED_DOMAIN`), a
    /// key in a section `MLSFED_<SECTION>__<KEY>`
    /// (`MLSFED_STREAMS__LOG_MAX_AGE_SECS`). A value is parsed as the
    /// setting's type; a list is written as TOML (`[1, 3]`). A variable of
    /// a tool (`MLSFED_LOG`, the client's) is left alone; a sectioned name
    /// that names no setting is an error, not silently ignored.
    fn apply_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), LoadConfigError> {
        let ours: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with("MLSFED_") && !TOOL_VARS.contains(&name.as_str()))
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        let mut tree = toml::Value::try_from(&*self)
            .map_err(|e| LoadConfigError::Invalid(format!("cannot layer the environment over the config: {e}")))?;
        let mut changed = false;
        for (name, raw) in ours {
            let rest = &name["MLSFED_".len()..];
            let path: Vec<String> = match ENV_ALIASES.iter().find(|(alias, _)| *alias == name) {
                Some((_, path)) => path.iter().map(|p| (*p).to_owned()).collect(),
                None => rest.split("__").map(str::to_ascii_lowercase).collect(),
            };
            match set_path(&mut tree, &path, &raw) {
                Ok(()) => changed = true,
                // Not a setting, and not sectioned: another tool's variable.
                Err(None) if path.len() == 1 => {}
                Err(None) => return Err(LoadConfigError::Env { name, reason: "names no setting".into() }),
                Err(Some(reason)) => return Err(LoadConfigError::Env { name, reason }),
            }
        }
        if changed {
            *self = tree.try_into().map_err(|e: toml::de::Error| LoadConfigError::Env {
                name: "MLSFED_*".into(),
                reason: e.message().to_owned(),
            })?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), LoadConfigError> {
        if proto_like_domain(&self.domain) {
            Ok(())
        } else {
            Err(LoadConfigError::Invalid(format!("domain {:?} is not a lowercase DNS name", self.domain)))
        }?;
        // No default secret exists: an operator that forgot to set one must
        // not run with a value anyone can read in our source.
        if self.token_secret.expose().len() < 16 || KNOWN_PLACEHOLDERS.contains(&self.token_secret.expose()) {
            return Err(LoadConfigError::Invalid(
                "token_secret must be set to a random value of at least 16 bytes (MLSFED_TOKEN_SECRET)".into(),
            ));
        }
        self.operator_seed()?;
        // Shorter than both max ages, strictly: a mailbox item that names
        // a Welcome stored once may outlive it by the window, and one
        // younger than the max age less the window is read as not stored
        // yet (docs/operations.md). And not 0, which JetStream takes as
        // its own default of two minutes while ingest would assume none.
        let dup = self.streams.duplicate_window_secs;
        if dup == 0 || dup >= self.streams.log_max_age_secs || dup >= self.streams.mailbox_max_age_secs {
            return Err(LoadConfigError::Invalid(
                "streams.duplicate_window_secs must be at least 1 and shorter than the log and mailbox max ages".into(),
            ));
        }
        let otlp = &self.tracing.otlp_endpoint;
        if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
            return Err(LoadConfigError::Invalid(format!(
                "tracing.otlp_endpoint {otlp:?} must be an http:// or https:// URL (OTLP/HTTP), or empty"
            )));
        }
        if self.tracing.max_queued_spans == 0 {
            return Err(LoadConfigError::Invalid("tracing.max_queued_spans must be at least 1".into()));
        }
        if !(1..=1024).contains(&self.streams.partitions) {
            return Err(LoadConfigError::Invalid("streams.partitions must be within 1..=1024".into()));
        }
        if !valid_sync_interval(&self.streams.sync_interval) {
            return Err(LoadConfigError::Invalid(
                "streams.sync_interval must be empty, \"always\", or a duration like \"500ms\", \"1s\", \"2m\"".into(),
            ));
        }
        if self.streams.max_deliver < 2 {
            return Err(LoadConfigError::Invalid("streams.max_deliver must be at least 2".into()));
        }
        if self.streams.partition_failover_secs < 3 {
            return Err(LoadConfigError::Invalid("streams.partition_failover_secs must be at least 3".into()));
        }
        if self.limits.request_timeout_ms <= self.limits.submit_timeout_ms {
            return Err(LoadConfigError::Invalid(
                "limits.request_timeout_ms must exceed limits.submit_timeout_ms".into(),
            ));
        }
        if self.limits.max_body_bytes < 1024 {
            return Err(LoadConfigError::Invalid("limits.max_body_bytes must be at least 1024".into()));
        }
        // The embedded nats-server's max_payload follows it, and nats-server
        // refuses a max_payload over its max_pending (64 MiB).
        if self.limits.max_body_bytes > 16 << 20 {
            return Err(LoadConfigError::Invalid("limits.max_body_bytes must be at most 16 MiB".into()));
        }
        Ok(())
    }

    pub fn peer(&self, domain: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.domain == domain)
    }

    /// The operator's Ed25519 seed (identity bindings, envelopes).
    pub fn operator_seed(&self) -> Result<[u8; 32], LoadConfigError> {
        let seed: [u8; 32] =
            hex::decode(self.operator_key_seed.expose()).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
                LoadConfigError::Invalid(
                    "operator_key_seed must be set to 64 random hex characters (MLSFED_OPERATOR_KEY_SEED)".into(),
                )
            })?;
        if seed.iter().all(|b| *b == seed[0]) {
            return Err(LoadConfigError::Invalid("operator_key_seed is not random".into()));
        }
        Ok(seed)
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
/// A NATS URL, or a cluster's comma-separated list of them, as bare URLs
/// and the credentials of the first that carries any.
pub fn split_cluster_url(url: &str) -> (Vec<String>, Option<(String, String)>) {
    let mut creds = None;
    let mut bare = Vec::new();
    for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (u, c) = split_credentials(one);
        creds = creds.or(c);
        bare.push(u);
    }
    (bare, creds)
}

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

fn valid_sync_interval(v: &str) -> bool {
    if v.is_empty() || v == "always" {
        return true;
    }
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && matches!(&v[digits..], "ms" | "s" | "m" | "h")
}

/// Secrets that once appeared in our docs or defaults.
const KNOWN_PLACEHOLDERS: &[&str] = &["dev-secret-change-me", "change-me-change-me"];

fn random_hex() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes `bytes` to `path`, readable by its owner only, atomically: a
/// crash leaves either no file or the whole one (written to a temporary
/// name, synced, then renamed), never an empty file that would stop every
/// later start.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // Two processes starting at once: the first rename wins, the second
    // replaces it with its own; both then read the file back below.
    std::fs::rename(&tmp, path)
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

    fn configured() -> Config {
        Config {
            token_secret: "0123456789abcdef0123".into(),
            operator_key_seed: "11".repeat(31).chars().chain("22".chars()).collect::<String>().into(),
            ..Config::default()
        }
    }

    #[test]
    fn secrets_are_required_and_never_shown() {
        let c = Config::default();
        assert!(c.validate().is_err(), "the defaults carry no secret");
        let mut c = configured();
        assert!(c.validate().is_ok());
        c.token_secret = "dev-secret-change-me".into();
        assert!(c.validate().is_err());
        let mut c = configured();
        c.operator_key_seed = "00".repeat(32).into();
        assert!(c.validate().is_err(), "a constant seed is not a secret");
        let mut c = configured();
        c.nats_url = "nats://local:hunter1@127.0.0.1:4222".into();
        c.peers.push(Peer {
            domain: "b.example".into(),
            nats_url: "nats://peer:hunter2@b.example:4222".into(),
            nats_user: String::new(),
            nats_password: "hunter3".into(),
            nats_ca_file: String::new(),
            public_key: String::new(),
        });
        let shown = format!("{c:?}");
        for secret in ["0123456789abcdef0123", "1111", "hunter1", "hunter2", "hunter3"] {
            assert!(!shown.contains(secret), "Debug shows {secret}: {shown}");
        }
    }

    #[test]
    fn the_duplicate_window_is_shorter_than_what_it_guards() {
        let mut c = configured();
        c.streams.log_max_age_secs = 4;
        c.streams.mailbox_max_age_secs = 4;
        c.streams.duplicate_window_secs = 3;
        assert!(c.validate().is_ok());
        for bad in [0, 4, 5] {
            c.streams.duplicate_window_secs = bad;
            assert!(c.validate().is_err(), "a window of {bad} s with max ages of 4 s");
        }
    }

    #[test]
    fn sync_interval_is_validated() {
        for ok in ["", "always", "500ms", "1s", "2m"] {
            let mut c = configured();
            c.streams.sync_interval = ok.into();
            assert!(c.validate().is_ok(), "{ok:?}");
        }
        for bad in ["sometimes", "1", "s", "1d", "-1s"] {
            let mut c = configured();
            c.streams.sync_interval = bad.into();
            assert!(c.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn embedded_quick_start_generates_and_keeps_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config { data_dir: dir.path().join("data"), ..Config::default() };
        c.embedded_secrets().unwrap();
        assert!(c.validate().is_ok());
        let path = dir.path().join("data/secrets.toml");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let mut again = Config { data_dir: dir.path().join("data"), ..Config::default() };
        again.embedded_secrets().unwrap();
        assert_eq!(again.token_secret, c.token_secret);
        assert_eq!(again.operator_key_seed, c.operator_key_seed);
        let other = tempfile::tempdir().unwrap();
        let mut fresh = Config { data_dir: other.path().to_path_buf(), ..Config::default() };
        fresh.embedded_secrets().unwrap();
        assert_ne!(fresh.token_secret, c.token_secret, "each quick start gets its own secret");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn every_setting_comes_from_the_environment() {
        let mut c = configured();
        c.apply_env(env(&[
            ("MLSFED_STREAMS__LOG_MAX_AGE_SECS", "86400"),
            ("MLSFED_STREAMS__REPLICAS", "3"),
            ("MLSFED_STREAMS__SYNC_INTERVAL", "1s"),
            ("MLSFED_FEDERATION__BACKOFF_MAX_MS", "30000"),
            ("MLSFED_KEYDIR__BACKEND", "jetstream"),
            ("MLSFED_KEYDIR__CIPHER_SUITES", "[1, 3]"),
            ("MLSFED_LIMITS__MAX_FETCH", "128"),
            ("MLSFED_MAX_BODY_BYTES", "4096"),
            // Tools' variables and other programs' are left alone.
            ("MLSFED_LOG", "debug"),
            ("MLSFED_SERVER", "http://x"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(c.streams.log_max_age_secs, 86400);
        assert_eq!(c.streams.replicas, 3);
        assert_eq!(c.streams.sync_interval, "1s");
        assert_eq!(c.federation.backoff_max_ms, 30000);
        assert_eq!(c.keydir.backend, KeydirBackend::Jetstream);
        assert_eq!(c.keydir.cipher_suites, vec![1, 3]);
        assert_eq!(c.limits.max_fetch, 128);
        assert_eq!(c.limits.max_body_bytes, 4096);
        for (name, value) in [
            ("MLSFED_STREAMS__NO_SUCH_SETTING", "1"),
            ("MLSFED_STREAMS__REPLICAS", "three"),
            ("MLSFED_KEYDIR__BACKEND", "floppy"),
            ("MLSFED_STREAMS", "1"),
            ("MLSFED_KEYDIR__CIPHER_SUITES", "1,3"),
        ] {
            let e = c.apply_env(env(&[(name, value)]));
            assert!(
                matches!(&e, Err(LoadConfigError::Env { name: n, .. }) if n == name || n == "MLSFED_*"),
                "{name}: {e:?}"
            );
        }
    }

    #[test]
    fn env_overrides_and_validation() {
        let mut c = configured();
        c.apply_env(env(&[("MLSFED_DOMAIN", "b.example")])).unwrap();
        assert_eq!(c.domain, "b.example");
        assert!(c.validate().is_ok());
        c.domain = "Bad Domain".into();
        assert!(c.validate().is_err());
        let e = c.apply_env(env(&[("MLSFED_MAX_BODY_BYTES", "x")]));
        assert!(matches!(e, Err(LoadConfigError::Env { .. })));
        let parsed: Config = toml::from_str("domain = \"c.example\"\n[limits]\nmax_body_bytes = 2048\n").unwrap();
        assert_eq!(parsed.limits.max_body_bytes, 2048);
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
    }
}
