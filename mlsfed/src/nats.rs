//! A nats-server child process on 127.0.0.1 with JetStream, its data in a
//! directory we own. Used for the embedded default and by the test harness.
//! The process is killed when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub struct NatsProcess {
    child: Option<Child>,
    bin: String,
    dir: PathBuf,
    port: u16,
    /// A nats-server config file (authorization, permissions), if any.
    config: Option<PathBuf>,
}

/// Where to find nats-server: `$MLSFED_NATS_SERVER_BIN`, then the copy that
/// scripts/install-nats installs under `.tools/bin`, then PATH.
pub fn find_binary(configured: &str) -> String {
    if let Ok(b) = std::env::var("MLSFED_NATS_SERVER_BIN") {
        return b;
    }
    if configured != "nats-server" {
        return configured.to_owned();
    }
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let candidate = d.join(".tools/bin/nats-server");
        if candidate.exists() {
            return candidate.to_string_lossy().into_owned();
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    "nats-server".to_owned()
}

impl NatsProcess {
    /// Starts nats-server on a random loopback port (`port` 0) or on `port`.
    pub fn start(bin: &str, dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with_config(bin, dir, port, None)
    }

    /// Starts the embedded server of an operator: like [`NatsProcess::start`],
    /// with JetStream's `sync_interval` set (empty: the server's default)
    /// and room for the operator's largest body (`server_settings`).
    pub fn start_embedded(bin: &str, dir: &Path, port: u16, cfg: &config::Config) -> anyhow::Result<Self> {
        let config = server_settings(cfg);
        Self::start_with_config(bin, dir, port, (!config.is_empty()).then_some(config.as_str()))
    }

    /// Starts with a nats-server config file holding `config` (for example
    /// an `authorization` block); the command line still sets the address,
    /// port and JetStream directory.
    pub fn start_with_config(bin: &str, dir: &Path, port: u16, config: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = match config {
            Some(text) => {
                let path = dir.join("nats.conf");
                std::fs::write(&path, text).context("cannot write nats.conf")?;
                Some(path)
            }
            None => None,
        };
        let mut p = Self { child: None, bin: bin.to_owned(), dir: dir.to_owned(), port, config };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let ports = self.dir.join("ports");
        stop_orphan(&self.dir);
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports)?;
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let mut cmd = Command::new(&self.bin);
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        let child = cmd
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "--http_port", "0"])
            .arg("-sd")
            .arg(self.dir.join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.join("nats-server.log")).context("cannot create nats log")?,
            ))
            .spawn()
            .with_context(|| format!("cannot start {} (run scripts/install-nats)", self.bin))?;
        self.child = Some(child);
        self.port = self.wait_port(&ports)?;
        Ok(())
    }

    fn wait_port(&mut self, ports: &Path) -> anyhow::Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("nats-server exited at start ({status}); see {}", self.dir.join("nats-server.log").display());
                }
            }
            if let Some(port) = read_port(ports) {
                return Ok(port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("nats-server did not report its port within 20 s")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running server's process id (for tools that measure it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server the way an operator would: SIGTERM, so it flushes
    /// and closes its stores, then SIGKILL if it is still running after
    /// `grace`. Blocks the calling thread (it runs once, at shutdown).
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else { return };
        // std has no portable SIGTERM; `kill` is everywhere nats-server is.
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Restarts on the same port and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

/// Whether process `pid` exists and has not exited (a zombie waits only to
/// be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Whether the parent of process `pid` is an mlsfed process.
fn parent_is_mlsfed(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
    ppid.is_some_and(|ppid| std::fs::read_to_string(format!("/proc/{ppid}/comm")).is_ok_and(|c| c.trim() == "mlsfed"))
}

fn read_port(ports: &Path) -> Option<u16> {
    // nats-server writes one `<exe>_<pid>.ports` JSON file here.
    let entry = std::fs::read_dir(ports).ok()?.next()?.ok()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = v.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What an operator's own nats-server is started with: `max_payload` with
/// room for a submission of `limits.max_body_bytes` and what wraps it
/// (`proto::limits::NATS_HEADROOM`), when NATS' default 1 MiB is not enough, and
/// JetStream's `sync_interval`.
pub fn server_settings(cfg: &config::Config) -> String {
    const NATS_DEFAULT: usize = 1 << 20;
    let needed = cfg.limits.max_body_bytes.saturating_add(proto::limits::NATS_HEADROOM);
    let mut out = String::new();
    if needed > NATS_DEFAULT {
        out.push_str(&format!("max_payload: {needed}\n"));
    }
    out.push_str(&jetstream_block(&cfg.streams.sync_interval));
    out
}

/// The `jetstream { ... }` block for a `sync_interval` (empty: none).
pub fn jetstream_block(sync_interval: &str) -> String {
    if sync_interval.is_empty() {
        return String::new();
    }
    let quoted = serde_json::to_string(sync_interval).unwrap_or_default();
    format!("jetstream {{\n  sync_interval: {quoted}\n}}\n")
}

/// The part of node `index`'s config that joins it to a cluster `name` on
/// 127.0.0.1 whose nodes route on `routes` (this node's is `routes[index]`).
pub fn cluster_block(name: &str, index: usize, routes: &[u16]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let others: Vec<String> = routes
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != index)
        .map(|(_, p)| quote(&format!("nats-route://127.0.0.1:{p}")))
        .collect();
    format!(
        "server_name: {}\ncluster {{\n  name: {}\n  listen: {}\n  routes: [{}]\n}}\n",
        quote(&format!("{name}-n{index}")),
        quote(name),
        quote(&format!("127.0.0.1:{}", routes[index])),
        others.join(", ")
    )
}

/// A peer operator's user on our nats-server.
pub struct PeerUser<'a> {
    pub domain: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

/// The NATS account layout that isolates peers (design decision 5,
/// docs/federation.md): our own processes' users in account `LOCAL`, where
/// JetStream and every stream live; each peer's user alone in an account of
/// its own, without JetStream. `LOCAL` exports to each peer's account, as
/// services, exactly two subjects: that peer's inbound subject and its
/// request subject. Subjects, `_INBOX` replies and JetStream are per
/// account, so a peer cannot see the batches and direct-get replies our
/// consumers receive on `_INBOX.*`, whatever it subscribes to. A peer's
/// publish into a service import is a request, so its JetStream publish
/// still gets the PubAck.
pub fn federation_accounts(local_user: &str, local_password: &str, peers: &[PeerUser<'_>]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut exports = Vec::new();
    let mut peer_accounts = Vec::new();
    for p in peers {
        let account = peer_account(p.domain);
        let inbox = proto::names::fed_in_subject(p.domain);
        let rpc = proto::names::peer_rpc_subject(p.domain);
        for subject in [&inbox, &rpc] {
            exports.push(format!("      {{ service: {}, accounts: [{account}] }}", quote(subject)));
        }
        peer_accounts.push(format!(
            "  {account}: {{\n    users: [\n      {{ user: {}, password: {},\n        permissions: {{ publish: {{ allow: [{}, {}] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }}\n    ]\n    imports: [\n      {{ service: {{ account: LOCAL, subject: {} }} }}\n      {{ service: {{ account: LOCAL, subject: {} }} }}\n    ]\n  }}",
            quote(p.user),
            quote(p.password),
            quote(&inbox),
            quote(&rpc),
            quote(&inbox),
            quote(&rpc),
        ));
    }
    let mut out = String::from("accounts {\n  LOCAL: {\n    jetstream: enabled\n");
    out.push_str(&format!(
        "    users: [\n      {{ user: {}, password: {} }}\n    ]\n",
        quote(local_user),
        quote(local_password)
    ));
    if !exports.is_empty() {
        out.push_str(&format!("    exports: [\n{}\n    ]\n", exports.join("\n")));
    }
    out.push_str("  }\n");
    for a in peer_accounts {
        out.push_str(&a);
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

/// The NATS account of a peer: `PEER_` and the hex of its domain, so any
/// domain maps to a distinct, valid account name.
pub fn peer_account(domain: &str) -> String {
    let hex: String = domain.bytes().map(|b| format!("{b:02x}")).collect();
    format!("PEER_{hex}")
}

/// Stops a nats-server that a killed process of ours left running on its
/// directory `dir` (SIGKILL gives it no time to stop its child): it holds
/// the JetStream store, and a server started beside it would fight it for
/// the store's lock. Its pid is in the name of the ports file it wrote; only
/// a nats-server whose command line names this very store is stopped (the
/// pid may belong to another process by now).
pub fn stop_orphan(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("ports")) else { return };
    let store = dir.join("jetstream").to_string_lossy().into_owned();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_suffix(".ports").and_then(|n| n.rsplit('_').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("nats-server") && c.contains(&store)
        });
        // A server whose mlsfed is alive is not an orphan: a second
        // operator started on the same directory by mistake must fail
        // on the store's lock, not stop the first one's NATS.
        if !ours || !running(pid) || parent_is_mlsfed(pid) {
            continue;
        }
        tracing::warn!(pid, "stopping the nats-server a killed operator left running on its directory");
        for (signal, wait) in [("-TERM", Duration::from_secs(15)), ("-KILL", Duration::from_secs(5))] {
            let _ = Command::new("kill").arg(signal).arg(pid.to_string()).status();
            let deadline = Instant::now() + wait;
            while running(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !running(pid) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod server_settings_tests {
    use super::*;

    #[test]
    fn the_embedded_server_gets_room_for_the_body_limit_only_when_needed() {
        let mut cfg = config::Config::default();
        // The default limit fits NATS' default payload: nothing to set.
        assert!(!server_settings(&cfg).contains("max_payload"));
        cfg.limits.max_body_bytes = 2 << 20;
        let needed = (2 << 20) + proto::limits::NATS_HEADROOM;
        assert!(server_settings(&cfg).contains(&format!("max_payload: {needed}\n")));
        cfg.streams.sync_interval = "1s".into();
        assert!(server_settings(&cfg).contains("sync_interval: \"1s\""));
    }
}
