//! The integration-test harness: RAII fixtures for real processes, so a test
//! reads like the scenario it checks.
//!
//! - [`NatsServer`]: a nats-server on 127.0.0.1, random port, temp dir,
//!   killed on drop.
//! - [`Operator`]: the real `mlsfed` binary as a child process (all roles, or
//!   chosen ones), its own data dir, its API on `127.0.0.1:0`; SIGKILL-able.
//! - [`Client`]: a real openmls device (the client SDK) talking to an
//!   operator over HTTP, with its state in a temp dir.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use client::{Device, Event};
use proto::{DeviceId, UserId};
use tempfile::TempDir;

pub use client;
pub use config;
pub use proto;

pub const SECRET: &str = "test-secret-0123456789";

pub use proto::unix_now;

fn target_dir() -> PathBuf {
    // Test binaries live in target/<profile>/deps; the workspace binaries
    // one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default()
}

/// Path of a workspace binary (`scripts/test` builds them before the tests).
pub fn binary(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` (scripts/test does)", p.display());
    p
}

pub struct NatsServer {
    process: mlsfed::nats::NatsProcess,
    _dir: TempDir,
    secured: bool,
    /// Whether clients must speak TLS (`tls://`), verified against [`test_ca`].
    tls: bool,
}

/// A certificate authority made for this test process, and a server
/// certificate it signed for `localhost` and `127.0.0.1`.
pub struct TestCa {
    _dir: TempDir,
    /// The CA certificate (PEM file): what clients trust.
    pub ca_file: PathBuf,
    pub ca_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn generate() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "mlsfed test CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let key = KeyPair::generate()?;
        let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
        let dir = tempfile::tempdir()?;
        let (ca_file, cert_file, key_file) =
            (dir.path().join("ca.pem"), dir.path().join("server.pem"), dir.path().join("server-key.pem"));
        std::fs::write(&ca_file, ca_cert.pem())?;
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok(Self {
            _dir: dir,
            ca_file,
            ca_pem: ca_cert.pem(),
            cert_file,
            key_file,
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// The CA of this test process (made once).
pub fn test_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::generate().expect("test CA"))
}

const LOCAL_PASSWORD: &str = "local-secret";

pub fn peer_user(peer: &str) -> String {
    format!("peer-{peer}")
}

fn peer_password(peer: &str) -> String {
    format!("secret-{peer}")
}

/// The nats-server accounts of docs/federation.md: the operator's own
/// processes in `LOCAL`, each peer alone in its own account.
pub fn federation_nats_config(peers: &[&str]) -> String {
    let users: Vec<(String, String)> = peers.iter().map(|p| (peer_user(p), peer_password(p))).collect();
    let peers: Vec<mlsfed::nats::PeerUser<'_>> = peers
        .iter()
        .zip(&users)
        .map(|(p, (user, password))| mlsfed::nats::PeerUser { domain: p, user, password })
        .collect();
    mlsfed::nats::federation_accounts("local", LOCAL_PASSWORD, &peers)
}

impl NatsServer {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = mlsfed::nats::find_binary("nats-server");
        let process = mlsfed::nats::NatsProcess::start(&bin, dir.path(), 0)?;
        Ok(Self { process, _dir: dir, secured: false, tls: false })
    }

    /// A server with the permission layout of docs/federation.md: a `local`
    /// user for the operator's own processes, and one user per peer that may
    /// only publish into its own inbound subject and send requests on its
    /// own request subject.
    pub fn start_secured(peers: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = mlsfed::nats::find_binary("nats-server");
        let conf = federation_nats_config(peers);
        let process = mlsfed::nats::NatsProcess::start_with_config(&bin, dir.path(), 0, Some(&conf))?;
        Ok(Self { process, _dir: dir, secured: true, tls: false })
    }

    /// [`NatsServer::start_secured`], and clients must speak TLS: the
    /// server presents a certificate of [`test_ca`], which every client
    /// verifies.
    pub fn start_secured_tls(peers: &[&str]) -> anyhow::Result<Self> {
        Self::start_secured_tls_with(peers, "")
    }

    /// [`NatsServer::start_secured_tls`] with `extra` added to the server's
    /// configuration (a smaller `max_payload`, say).
    pub fn start_secured_tls_with(peers: &[&str], extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = mlsfed::nats::find_binary("nats-server");
        let ca = test_ca();
        let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap_or_default();
        let conf = format!(
            "{}tls {{\n  cert_file: {}\n  key_file: {}\n  timeout: 5\n}}\n{extra}\n",
            federation_nats_config(peers),
            quote(&ca.cert_file),
            quote(&ca.key_file)
        );
        let process = mlsfed::nats::NatsProcess::start_with_config(&bin, dir.path(), 0, Some(&conf))?;
        Ok(Self { process, _dir: dir, secured: true, tls: true })
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "tls"
        } else {
            "nats"
        }
    }

    /// The CA file clients of this server need (empty: plain NATS).
    pub fn ca_file(&self) -> String {
        if self.tls {
            test_ca().ca_file.display().to_string()
        } else {
            String::new()
        }
    }

    /// The URL the operator's own processes use.
    pub fn url(&self) -> String {
        if self.secured {
            format!("{}://local:{LOCAL_PASSWORD}@127.0.0.1:{}", self.scheme(), self.process.port())
        } else {
            self.process.url()
        }
    }

    /// The URL a peer uses, with its restricted credentials.
    pub fn peer_url(&self, peer: &str) -> String {
        format!("{}://{}:{}@127.0.0.1:{}", self.scheme(), peer_user(peer), peer_password(peer), self.process.port())
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()
    }
}

/// A JetStream cluster of `n` nats-servers on 127.0.0.1 (random client
/// ports, routes between them), killed on drop. Streams with
/// `streams.replicas = 3` live on every node.
pub struct NatsCluster {
    pub nodes: Vec<mlsfed::nats::NatsProcess>,
    _dir: TempDir,
}

impl NatsCluster {
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = mlsfed::nats::find_binary("nats-server");
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let conf = mlsfed::nats::cluster_block("mlsfed", i, &routes);
            let node_dir = dir.path().join(format!("n{i}"));
            nodes.push(mlsfed::nats::NatsProcess::start_with_config(&bin, &node_dir, 0, Some(&conf))?);
        }
        Ok(Self { nodes, _dir: dir })
    }

    /// Every node's client URL, comma-separated, as an operator's `nats_url`.
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",")
    }

    /// Waits (bounded) until the cluster has a JetStream leader and can
    /// create a replicated stream.
    pub async fn wait_ready(&self, replicas: usize) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(nats_connect(&self.nodes[0].url()).await?);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let made = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "CLUSTER_PROBE".into(),
                    subjects: vec!["cluster.probe".into()],
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await;
            if made.is_ok() {
                let _ = js.delete_stream("CLUSTER_PROBE").await;
                return Ok(());
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "the NATS cluster never became ready: {made:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// An operator process (or one worker-role process) of the real binary.
pub struct Operator {
    child: Option<Child>,
    pub domain: String,
    pub url: String,
    config_path: PathBuf,
    role: String,
    dir: TempDirOrShared,
}

enum TempDirOrShared {
    Own(TempDir),
    Shared(PathBuf),
}

impl TempDirOrShared {
    fn path(&self) -> &Path {
        match self {
            TempDirOrShared::Own(t) => t.path(),
            TempDirOrShared::Shared(p) => p,
        }
    }
}

impl Operator {
    /// All roles in one process.
    pub fn start(nats: &NatsServer, domain: &str) -> anyhow::Result<Self> {
        Self::start_with(nats, domain, "run", |_| {})
    }

    /// `role` is a subcommand of `mlsfed` (run, ingest, sequencer, fanout);
    /// `tweak` adjusts the config written for it.
    pub fn start_with(
        nats: &NatsServer,
        domain: &str,
        role: &str,
        tweak: impl FnOnce(&mut config::Config),
    ) -> anyhow::Result<Self> {
        Self::with_config(domain, role, |cfg| {
            cfg.nats_url = nats.url();
            cfg.nats_ca_file = nats.ca_file();
            tweak(cfg);
        })
    }

    /// `role` against NATS at `url` (a cluster's comma-separated list).
    pub fn start_on(
        url: &str,
        domain: &str,
        role: &str,
        tweak: impl FnOnce(&mut config::Config),
    ) -> anyhow::Result<Self> {
        Self::with_config(domain, role, |cfg| {
            cfg.nats_url = url.to_owned();
            tweak(cfg);
        })
    }

    /// Writes a test config (`tweak`ed) into a new temp dir and starts
    /// `role` with it.
    fn with_config(domain: &str, role: &str, tweak: impl FnOnce(&mut config::Config)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cfg = config::Config {
            domain: domain.into(),
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            token_secret: SECRET.into(),
            operator_key_seed: hex_seed(domain).into(),
            ..Default::default()
        };
        cfg.streams.ack_wait_secs = 5;
        // A crashed sequencer's partitions move on after 3 s (the least
        // allowed), so tests that kill one wait little.
        cfg.streams.partition_failover_secs = 3;
        tweak(&mut cfg);
        let config_path = dir.path().join("mlsfed.toml");
        std::fs::write(&config_path, toml::to_string(&cfg)?)?;
        let mut op = Self {
            child: None,
            domain: domain.into(),
            url: String::new(),
            config_path,
            role: role.into(),
            dir: TempDirOrShared::Own(dir),
        };
        op.spawn()?;
        Ok(op)
    }

    /// `mlsfed run` on the embedded defaults: no NATS URL, so the process
    /// starts and supervises its own nats-server under its data dir.
    pub fn start_embedded(domain: &str) -> anyhow::Result<Self> {
        Self::start_embedded_with(domain, |_| {})
    }

    /// [`Operator::start_embedded`] with its configuration changed first.
    pub fn start_embedded_with(domain: &str, tweak: impl FnOnce(&mut config::Config)) -> anyhow::Result<Self> {
        Self::with_config(domain, "run", tweak)
    }

    /// The operator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGTERM, as a process manager stops a process; waits (bounded) for
    /// it to exit and returns its exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                bail!("mlsfed did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Another process of the same operator (same config and data), running `role`.
    pub fn worker(&self, role: &str) -> anyhow::Result<Self> {
        let mut op = Self {
            child: None,
            domain: self.domain.clone(),
            url: String::new(),
            config_path: self.config_path.clone(),
            role: role.into(),
            dir: TempDirOrShared::Shared(self.dir.path().to_path_buf()),
        };
        op.spawn()?;
        Ok(op)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", self.role)))?;
        let mut child = Command::new(binary("mlsfed"))
            .arg("--config")
            .arg(&self.config_path)
            .arg(&self.role)
            .env("MLSFED_LOG", std::env::var("MLSFED_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("MLSFED_NATS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start mlsfed")?;
        let stdout = child.stdout.take().context("no stdout")?;
        self.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let first = rx.recv_timeout(Duration::from_secs(30)).context("mlsfed did not start within 30 s")?;
        if let Some(url) = first.strip_prefix("mlsfed listening on ") {
            self.url = url.trim().to_owned();
        } else if let Some((_, url)) = first.split_once("metrics on ") {
            self.url = url.trim().to_owned();
        } else if !first.starts_with("mlsfed worker started") {
            bail!("unexpected first line from mlsfed: {first}");
        }
        Ok(())
    }

    /// Runs `mlsfed <args>` with this operator's config (an admin command)
    /// and returns what it printed.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binary("mlsfed"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env("MLSFED_LOG", "warn")
            .env_remove("MLSFED_NATS_URL")
            .stdin(Stdio::null())
            .output()
            .context("cannot run mlsfed")?;
        if !out.status.success() {
            bail!("mlsfed {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the running process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?.success();
        anyhow::ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Changes this operator's config file; the process reads it at its
    /// next start (`restart`).
    pub fn reconfigure(&self, tweak: impl FnOnce(&mut config::Config)) -> anyhow::Result<()> {
        let mut cfg: config::Config = toml::from_str(&std::fs::read_to_string(&self.config_path)?)?;
        tweak(&mut cfg);
        std::fs::write(&self.config_path, toml::to_string(&cfg)?)?;
        Ok(())
    }

    /// Starts the same process again (same config, data and role).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.role))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.role))).unwrap_or_default()
    }

    pub fn token(&self, device: &DeviceId) -> String {
        self.token_for(device, std::time::Duration::from_secs(3600))
    }

    /// A token of `device` that expires after `ttl` (whole seconds).
    pub fn token_for(&self, device: &DeviceId, ttl: std::time::Duration) -> String {
        proto::auth::issue(SECRET.as_bytes(), device, unix_now() + ttl.as_secs())
    }

    pub fn device_id(&self, user: &str, device: &str) -> DeviceId {
        DeviceId::new(&self.domain, user, device).expect("valid device id")
    }

    pub fn user_id(&self, user: &str) -> UserId {
        UserId::new(&self.domain, user).expect("valid user id")
    }

    /// A new device of `user` on this operator, with `kps` KeyPackages (and a
    /// last-resort one) already published.
    pub async fn client(&self, user: &str, device: &str, kps: usize) -> anyhow::Result<Client> {
        let id = self.device_id(user, device);
        let home = tempfile::tempdir()?;
        let mut d = Device::open(home.path(), &self.url, &self.token(&id), Some(&id))?;
        if kps > 0 {
            d.publish_key_packages(kps, true).await?;
        }
        Ok(Client { device: Some(d), home, url: self.url.clone(), token: self.token(&id), log: Vec::new() })
    }

    pub async fn healthy(&self) -> bool {
        matches!(reqwest::get(format!("{}/healthz", self.url)).await, Ok(r) if r.status().is_success())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        // An embedded operator's nats-server outlives the SIGKILL: stop it,
        // or every such test would leave one running.
        let embedded = std::fs::read_to_string(&self.config_path)
            .ok()
            .and_then(|t| toml::from_str::<config::Config>(&t).ok())
            .is_some_and(|c| c.nats_url.is_empty());
        if embedded {
            mlsfed::nats::stop_orphan(&self.data_dir().join("nats"));
        }
        // A failing test shows what the operator said; the temp dir goes.
        if std::thread::panicking() || std::env::var_os("MLSFED_TEST_LOG").is_some() {
            let log = self.log();
            // A panic's message first: its backtrace would push it out of the tail.
            for l in log.lines().filter(|l| l.contains("panicked at")) {
                eprintln!("--- {} ({}) PANIC: {l}", self.role, self.domain);
            }
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} ({}) log tail ---", self.role, self.domain);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A device under test; keeps every event it observed, in order.
pub struct Client {
    device: Option<Device>,
    home: TempDir,
    url: String,
    token: String,
    pub log: Vec<Event>,
}

impl std::ops::Deref for Client {
    type Target = Device;
    fn deref(&self) -> &Device {
        self.device.as_ref().expect("device is open")
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Device {
        self.device.as_mut().expect("device is open")
    }
}

impl Client {
    pub async fn sync(&mut self) -> anyhow::Result<Vec<Event>> {
        let ev = self.device.as_mut().context("closed")?.sync().await?;
        self.log.extend(ev.iter().cloned());
        Ok(ev)
    }

    /// Closes and reopens the device from its stored state, as a restarted
    /// client process would.
    pub fn reopen(&mut self) -> anyhow::Result<()> {
        self.device = None;
        self.device = Some(Device::open(self.home.path(), &self.url, &self.token, None)?);
        Ok(())
    }

    /// Points the device at another URL (a restarted operator).
    pub fn reconnect(&mut self, url: &str) -> anyhow::Result<()> {
        self.url = url.to_owned();
        self.reopen()
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// The texts of application messages observed, in order, as (position, sender, text).
    pub fn messages(&self, group: &str) -> Vec<(u64, String, String)> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Message { group: g, position, sender, text, .. } if g == group => {
                    Some((*position, sender.clone(), text.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Every hub position this device applied in `group`, in order.
    pub fn positions(&self, group: &str) -> Vec<u64> {
        self.log
            .iter()
            .filter_map(|e| match e {
                Event::Message { group: g, position, .. }
                | Event::Commit { group: g, position, .. }
                | Event::Joined { group: g, position, .. }
                | Event::Proposal { group: g, position }
                | Event::Removed { group: g, position }
                | Event::Rejoined { group: g, position, .. } => (g == group).then_some(*position),
                Event::Failed { .. } | Event::KeyPackagesLow { .. } => None,
            })
            .collect()
    }

    /// Every event this client applied, in order.
    pub fn events(&self) -> &[Event] {
        &self.log
    }

    pub fn failures(&self) -> Vec<Event> {
        self.log.iter().filter(|e| matches!(e, Event::Failed { .. })).cloned().collect()
    }
}

/// Syncs every client until they agree: every group is at the same
/// position on every client that is in it, and nothing new arrived for
/// three passes in a row (bounded). Agreement, not one quiet pass, is the
/// condition: a quiet pass can come before a slow fanout delivers.
pub async fn settle(clients: &mut [&mut Client]) -> anyhow::Result<()> {
    let mut quiet = 0;
    for _ in 0..200 {
        let mut any = false;
        for c in clients.iter_mut() {
            any |= !c.sync().await?.is_empty();
        }
        let mut at: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        let mut agree = true;
        for c in clients.iter() {
            for g in c.groups() {
                let p = c.applied(&g);
                agree &= *at.entry(g).or_insert(p) == p;
            }
        }
        quiet = if !any && agree { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("clients did not settle")
}

/// `who` adds `users` to `group`, retrying (for at most 30 s) while the
/// claim of their KeyPackages gets a retryable refusal: a peer's bridge
/// started a moment ago may not answer requests yet (`peer_unreachable`).
/// A failed claim changes nothing, so trying again is safe.
pub async fn add_when_reachable(who: &mut Client, group: &str, users: &[UserId]) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        match who.add(group, users).await {
            Ok(()) => return Ok(()),
            Err(e) if e.code().is_some_and(|c| c.retryable()) && t0.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Syncs `clients` until `done` holds for every one of them, or `limit` passes.
pub async fn sync_until(
    clients: &mut [&mut Client],
    limit: Duration,
    done: impl Fn(&Client) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut unavailable = None;
    loop {
        for c in clients.iter_mut() {
            // A retryable refusal (the operator's NATS is failing over) is
            // what a client waits out; anything else ends the wait.
            match c.sync().await {
                Ok(_) => {}
                Err(e) if retryable(&e) => unavailable = Some(e),
                Err(e) => return Err(e),
            }
        }
        if clients.iter().all(|c| done(c)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            match unavailable {
                Some(e) => bail!("condition not reached within {limit:?}; last refusal: {e:#}"),
                None => bail!("condition not reached within {limit:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `e` is a typed refusal a client retries (`unavailable`, ...).
pub fn retryable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<client::ClientError>().and_then(|c| c.code()).is_some_and(|c| c.retryable())
}

/// Raw HTTP to an operator, for tests that send bytes no SDK would.
pub async fn post(url: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, serde_json::Value) {
    send(http().post(format!("{url}{path}")).header("content-type", "message/mls").body(body), token).await
}

pub async fn get(url: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    send(http().get(format!("{url}{path}")), token).await
}

/// An HTTP client for tests: every request is bounded, so a test fails
/// instead of hanging on a server that never answers.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client")
}

/// Sends `req` (with the bearer token, if any) and returns the status and
/// the JSON body (`Null` when there is none).
pub async fn send(mut req: reqwest::RequestBuilder, token: Option<&str>) -> (u16, serde_json::Value) {
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Raw MLS objects built directly with openmls, for tests that need bytes
/// the SDK would never send.
pub mod raw {
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    pub const CS: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

    pub struct Local {
        pub provider: OpenMlsRustCrypto,
        pub signer: SignatureKeyPair,
        pub identity: Vec<u8>,
    }

    impl Local {
        pub fn new(identity: &str) -> Self {
            let provider = OpenMlsRustCrypto::default();
            let signer = SignatureKeyPair::new(CS.signature_algorithm()).expect("keys");
            signer.store(provider.storage()).expect("store");
            Self { provider, signer, identity: identity.as_bytes().to_vec() }
        }

        fn cwk(&self) -> CredentialWithKey {
            CredentialWithKey {
                credential: BasicCredential::new(self.identity.clone()).into(),
                signature_key: self.signer.public().into(),
            }
        }

        /// An MLSMessage(KeyPackage).
        pub fn key_package(&self) -> Vec<u8> {
            let kpb = KeyPackage::builder().build(CS, &self.provider, &self.signer, self.cwk()).expect("kp");
            MlsMessageOut::from(kpb.key_package().clone()).tls_serialize_detached().expect("ser")
        }

        /// A group that exists only here (never registered with a hub).
        pub fn group(&self, group_id: &str, policy: WireFormatPolicy) -> MlsGroup {
            let cfg = MlsGroupCreateConfig::builder()
                .ciphersuite(CS)
                .wire_format_policy(policy)
                .use_ratchet_tree_extension(true)
                .build();
            MlsGroup::new_with_group_id(
                &self.provider,
                &self.signer,
                &cfg,
                GroupId::from_slice(group_id.as_bytes()),
                self.cwk(),
            )
            .expect("group")
        }

        pub fn app_message(&self, g: &mut MlsGroup, text: &str) -> Vec<u8> {
            g.create_message(&self.provider, &self.signer, text.as_bytes())
                .expect("msg")
                .tls_serialize_detached()
                .expect("ser")
        }

        /// An external commit (RFC 9420 §12.4.3.2) into the group of
        /// `group_info` (MLSMessage bytes, with the ratchet tree), with
        /// this identity's key, followed by the new epoch's GroupInfo.
        pub fn external_commit(&self, group_info: &[u8]) -> Vec<u8> {
            use openmls::prelude::tls_codec::Deserialize as _;
            let vgi = match MlsMessageIn::tls_deserialize_exact(group_info).expect("gi").extract() {
                MlsMessageBodyIn::GroupInfo(vgi) => vgi,
                _ => panic!("not a GroupInfo"),
            };
            let (_, bundle) = MlsGroup::external_commit_builder()
                .with_config(
                    MlsGroupJoinConfig::builder()
                        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
                        .use_ratchet_tree_extension(true)
                        .build(),
                )
                .build_group(&self.provider, vgi, self.cwk())
                .expect("group")
                .load_psks(self.provider.storage())
                .expect("psks")
                .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
                .expect("commit")
                .finalize(&self.provider)
                .expect("finalize");
            let (commit, _, gi) = bundle.into_contents();
            let mut out = commit.tls_serialize_detached().expect("ser");
            if let Some(gi) = gi {
                out.extend(MlsMessageOut::from(gi).tls_serialize_detached().expect("ser"));
            }
            out
        }

        pub fn update_commit(&self, g: &mut MlsGroup) -> Vec<u8> {
            let b = g.self_update(&self.provider, &self.signer, LeafNodeParameters::default()).expect("update");
            let mut out = b.commit().tls_serialize_detached().expect("ser");
            if let Some(gi) = b.group_info() {
                out.extend(MlsMessageOut::from(gi.clone()).tls_serialize_detached().expect("ser"));
            }
            out
        }

        pub fn group_info(&self, g: &MlsGroup) -> Vec<u8> {
            g.export_group_info(self.provider.crypto(), &self.signer, true)
                .expect("gi")
                .tls_serialize_detached()
                .expect("ser")
        }
    }

    /// Length of the first MLSMessage in `bytes`.
    pub fn first_len(bytes: &[u8]) -> usize {
        use openmls::prelude::tls_codec::Deserialize as _;
        let mut rest = bytes;
        MlsMessageIn::tls_deserialize(&mut rest).expect("one message");
        bytes.len() - rest.len()
    }
}

/// KeyPackages with chosen defects, built with openmls and, where openmls
/// refuses to build the defect, edited and re-signed by hand.
pub mod bad_kp {
    use openmls::prelude::tls_codec::Serialize as _;
    use openmls::prelude::*;
    use openmls_traits::signatures::Signer as _;

    use crate::raw::Local;

    fn wrap(kp: &KeyPackage) -> Vec<u8> {
        MlsMessageOut::from(kp.clone()).tls_serialize_detached().expect("ser")
    }

    fn cwk(l: &Local) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(l.identity.clone()).into(),
            signature_key: l.signer.public().into(),
        }
    }

    pub fn with_lifetime(l: &Local, not_before: u64, not_after: u64) -> Vec<u8> {
        let kpb = KeyPackage::builder()
            .key_package_lifetime(Lifetime::init(not_before, not_after))
            .build(crate::raw::CS, &l.provider, &l.signer, cwk(l))
            .expect("kp");
        wrap(kpb.key_package())
    }

    pub fn with_suite(l: &Local, suite: Ciphersuite) -> Vec<u8> {
        let signer = openmls_basic_credential::SignatureKeyPair::new(suite.signature_algorithm()).expect("keys");
        let cwk = CredentialWithKey {
            credential: BasicCredential::new(l.identity.clone()).into(),
            signature_key: signer.public().into(),
        };
        let kpb = KeyPackage::builder().build(suite, &l.provider, &signer, cwk).expect("kp");
        wrap(kpb.key_package())
    }

    /// A correctly signed KeyPackage whose leaf carries an X.509-type
    /// credential (declared in its capabilities), with the device's id as
    /// its content.
    pub fn x509_credential(l: &Local) -> Vec<u8> {
        let cwk = CredentialWithKey {
            credential: Credential::new(CredentialType::X509, l.identity.clone()),
            signature_key: l.signer.public().into(),
        };
        let caps = Capabilities::new(None, None, None, None, Some(&[CredentialType::Basic, CredentialType::X509]));
        let kpb = KeyPackage::builder()
            .leaf_node_capabilities(caps)
            .build(crate::raw::CS, &l.provider, &l.signer, cwk)
            .expect("kp");
        wrap(kpb.key_package())
    }

    /// A last-resort KeyPackage whose leaf does not list the extension.
    pub fn last_resort_undeclared(l: &Local) -> Vec<u8> {
        let kpb = KeyPackage::builder()
            .mark_as_last_resort()
            .build(crate::raw::CS, &l.provider, &l.signer, cwk(l))
            .expect("kp");
        wrap(kpb.key_package())
    }

    /// A KeyPackage whose signature no longer verifies.
    pub fn bad_signature(l: &Local) -> Vec<u8> {
        let mut b = l.key_package();
        let n = b.len();
        b[n - 1] ^= 0x01;
        b
    }

    fn varint(n: usize) -> Vec<u8> {
        // RFC 9420 §2.1.2 variable-size length.
        if n < 64 {
            vec![n as u8]
        } else if n < 16384 {
            vec![0x40 | (n >> 8) as u8, n as u8]
        } else {
            let n = n as u32;
            vec![0x80 | (n >> 24) as u8, (n >> 16) as u8, (n >> 8) as u8, n as u8]
        }
    }

    /// A correctly signed KeyPackage whose init_key equals its leaf's
    /// encryption_key (RFC 9420 §10.1 forbids it). Ed25519 and X25519 keys
    /// are 32 bytes, so the offsets are fixed.
    pub fn init_equals_encryption(l: &Local) -> Vec<u8> {
        let mut b = l.key_package();
        // MLSMessage header (4) + version (2) + suite (2) + len (1) = 9.
        assert_eq!(b[8], 32, "init_key length");
        assert_eq!(b[41], 32, "encryption_key length");
        let enc: Vec<u8> = b[42..74].to_vec();
        b[9..41].copy_from_slice(&enc);
        // Re-sign KeyPackageTBS: SignWithLabel(key, "KeyPackageTBS", tbs)
        // over SignContent { label<V>, content<V> } (RFC 9420 §5.1.2).
        let n = b.len();
        assert_eq!(&b[n - 66..n - 64], &[0x40, 0x40], "64-byte signature");
        let tbs = &b[4..n - 66];
        let label = b"MLS 1.0 KeyPackageTBS";
        let mut content = varint(label.len());
        content.extend_from_slice(label);
        content.extend(varint(tbs.len()));
        content.extend_from_slice(tbs);
        let sig = l.signer.sign(&content).expect("sign");
        b[n - 64..].copy_from_slice(&sig);
        b
    }
}

impl raw::Local {
    /// A Commit adding the KeyPackage `kp` (MLSMessage bytes), followed by its
    /// Welcome and the new epoch's GroupInfo: a submission bundle.
    pub fn add(&self, g: &mut openmls::prelude::MlsGroup, kp: &[u8]) -> Vec<u8> {
        use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
        use openmls::prelude::*;
        let kp = match MlsMessageIn::tls_deserialize_exact(kp).expect("kp").extract() {
            MlsMessageBodyIn::KeyPackage(k) => {
                k.validate(self.provider.crypto(), ProtocolVersion::Mls10).expect("valid")
            }
            _ => panic!("not a KeyPackage"),
        };
        let (commit, welcome, group_info) = g.add_members(&self.provider, &self.signer, &[kp]).expect("add");
        let mut out = commit.tls_serialize_detached().expect("ser");
        out.extend(welcome.tls_serialize_detached().expect("ser"));
        if let Some(gi) = group_info {
            out.extend(MlsMessageOut::from(gi).tls_serialize_detached().expect("ser"));
        }
        out
    }
}

/// A federation of operators, each with its own nats-server, every one
/// configured as a peer of every other.
pub struct Federation {
    pub nats: Vec<NatsServer>,
    pub ops: Vec<Operator>,
}

/// A fixed Ed25519 seed per test domain, so peers can be configured with
/// each other's public keys before they start.
pub fn operator_seed(domain: &str) -> [u8; 32] {
    let mut seed = [7u8; 32];
    for (i, b) in domain.bytes().take(32).enumerate() {
        seed[i] = b;
    }
    seed
}

/// [`operator_seed`] as the config writes it.
pub fn hex_seed(domain: &str) -> String {
    operator_seed(domain).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn operator_public_key(domain: &str) -> String {
    proto::identity::public_key_b64(&proto::identity::operator_key(&operator_seed(domain)))
}

impl Federation {
    /// `tweak` adjusts each operator's config (it is told the domain).
    pub fn start(domains: &[&str], tweak: impl Fn(&str, &mut config::Config)) -> anyhow::Result<Self> {
        Self::start_roles(domains, |_| "run", tweak)
    }

    /// Like [`Federation::start`], with each operator's process running
    /// `role(domain)` (`run`, or `ingest` for an operator whose other roles
    /// a test starts as workers).
    pub fn start_roles(
        domains: &[&str],
        role: impl Fn(&str) -> &'static str,
        tweak: impl Fn(&str, &mut config::Config),
    ) -> anyhow::Result<Self> {
        Self::start_with_nats(domains, role, |_| String::new(), tweak)
    }

    /// Like [`Federation::start_roles`], with `nats(domain)` added to each
    /// operator's nats-server configuration.
    pub fn start_with_nats(
        domains: &[&str],
        role: impl Fn(&str) -> &'static str,
        nats: impl Fn(&str) -> String,
        tweak: impl Fn(&str, &mut config::Config),
    ) -> anyhow::Result<Self> {
        let extra = nats;
        let nats: Vec<NatsServer> = domains
            .iter()
            .map(|d| {
                let others: Vec<&str> = domains.iter().copied().filter(|p| p != d).collect();
                // Federation runs over TLS, as across the Internet.
                NatsServer::start_secured_tls_with(&others, &extra(d))
            })
            .collect::<Result<_, _>>()?;
        let mut ops = Vec::new();
        for (i, d) in domains.iter().enumerate() {
            let peers = domains
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| config::Peer {
                    domain: (*p).to_owned(),
                    // Our user on the peer's server: it may only write our
                    // inbound subject there.
                    nats_url: nats[j].peer_url(d),
                    nats_user: String::new(),
                    nats_password: Default::default(),
                    nats_ca_file: nats[j].ca_file(),
                    public_key: operator_public_key(p),
                })
                .collect::<Vec<_>>();
            ops.push(Operator::start_with(&nats[i], d, role(d), |c| {
                c.peers = peers.clone();
                c.federation.backoff_initial_ms = 100;
                c.federation.backoff_max_ms = 1000;
                c.federation.request_timeout_ms = 2000;
                tweak(d, c);
            })?);
        }
        Ok(Self { nats, ops })
    }

    pub fn op(&self, domain: &str) -> &Operator {
        self.ops.iter().find(|o| o.domain == domain).expect("operator in the federation")
    }

    pub fn nats_of(&mut self, domain: &str) -> &mut NatsServer {
        let i = self.ops.iter().position(|o| o.domain == domain).expect("operator in the federation");
        &mut self.nats[i]
    }
}

/// Waits until `done` holds for the value of `name_and_labels` on `op`
/// (bounded); returns the last value read.
pub async fn wait_metric(
    op: &Operator,
    name_and_labels: &str,
    limit: Duration,
    done: impl Fn(f64) -> bool,
) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = try_metric(op, name_and_labels).await;
        if let Some(v) = v.filter(|v| done(*v)) {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{name_and_labels} on {} is {v:?} after {limit:?}", op.domain);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every one of `workers` (processes of `role`: sequencer or
/// fanout) owns some partitions and together they own all `partitions`
/// (bounded).
pub async fn wait_partitions_split(workers: &[&Operator], role: &str, partitions: u32) -> anyhow::Result<()> {
    let name = format!("mlsfed_{role}_partitions_owned");
    for _ in 0..200 {
        let mut owned = Vec::new();
        for s in workers {
            owned.push(try_metric(s, &name).await.unwrap_or(0.0));
        }
        if owned.iter().all(|n| *n > 0.0) && owned.iter().sum::<f64>() == f64::from(partitions) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the {role} processes did not split the {partitions} partitions")
}

/// Reads one sample of a Prometheus metric from an operator. A series that
/// is absent is a test failure, never a 0: a renamed or unregistered metric
/// must not pass an `== 0.0` check.
pub async fn metric(op: &Operator, name_and_labels: &str) -> f64 {
    match try_metric(op, name_and_labels).await {
        Some(v) => v,
        None => panic!("metric {name_and_labels} is missing on {} ({})", op.domain, op.url),
    }
}

/// One sample of a Prometheus metric, or `None` while the series does not
/// exist (or the operator does not answer): for polling.
pub async fn try_metric(op: &Operator, name_and_labels: &str) -> Option<f64> {
    let text = http().get(format!("{}/metrics", op.url)).send().await.ok()?.text().await.ok()?;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

/// A NATS connection that is established when this returns (credentials may
/// be in the URL; a `tls://` URL is verified against [`test_ca`]).
pub async fn nats_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let (url, creds) = config::split_credentials(url);
    let mut opts = match creds {
        Some((u, p)) => async_nats::ConnectOptions::with_user_and_password(u, p),
        None => async_nats::ConnectOptions::new(),
    };
    if url.starts_with("tls://") {
        opts = opts.add_root_certificates(test_ca().ca_file.clone()).require_tls(true);
    }
    Ok(opts.connect(url.as_str()).await?)
}

/// A TLS-terminating proxy in front of an operator's API, with a
/// certificate of [`test_ca`]: `https://` and `wss://` for tests, as a
/// load balancer gives them in production. Stops on drop.
pub struct TlsProxy {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let ca = test_ca();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(ca.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.key_der.clone())),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        Ok(Self { url, task })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/HTTP traces collector on 127.0.0.1 that keeps every span posted
/// to it (JSON encoding), for tests of `tracing.otlp_endpoint`. Stopped on
/// drop.
pub struct OtlpCollector {
    pub url: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpCollector {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/traces", listener.local_addr()?);
        let spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(Self::serve(conn, kept.clone()));
            }
        });
        Ok(Self { url, spans, task })
    }

    /// HTTP/1.1 with keep-alive, as the exporter's client speaks it: one
    /// POST after another, each answered 200 `{}`.
    async fn serve(mut conn: tokio::net::TcpStream, kept: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 8192];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 65536];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
            buf.drain(..head_end + len);
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"][0]["value"]["stringValue"].clone();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let mut span = span.clone();
                        span["service"] = service.clone();
                        if let Ok(mut k) = kept.lock() {
                            k.push(span);
                        }
                    }
                }
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            if conn.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    /// Every span received so far, each with its `service` added.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
