//! Worker processes of this binary, for the tools that run a topology on
//! one machine (`bench` scale-out, `cluster`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Child processes of this binary, stopped together.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Procs {
    /// SIGTERM, so each process hands its partitions over before it exits.
    pub(crate) fn stop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        }
        let t0 = Instant::now();
        for c in &mut self.0 {
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `role` of this binary with `cfg` (its own data dir and config file
/// under `dir`), logging to `dir/<name>.log`.
pub(crate) fn spawn(cfg: &config::Config, dir: &Path, name: &str, role: &str) -> anyhow::Result<Child> {
    let mut c = cfg.clone();
    c.data_dir = dir.join(name);
    std::fs::create_dir_all(&c.data_dir)?;
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml::to_string(&c)?)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok(Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&file)
        .arg(role)
        .env("MLSFED_LOG", "warn")
        .env_remove("MLSFED_NATS_URL")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Starts an `ingest` (or `run`) process listening on a port of its own
/// choosing (`127.0.0.1:0`) and returns it with its base URL, read from the
/// line it prints once it listens: a port picked in advance could be taken
/// by another process before it binds.
pub(crate) fn spawn_listening(
    cfg: &config::Config,
    dir: &Path,
    name: &str,
    role: &str,
) -> anyhow::Result<(Child, String)> {
    use std::io::BufRead as _;
    let mut c = cfg.clone();
    c.listen = "127.0.0.1:0".into();
    c.data_dir = dir.join(name);
    std::fs::create_dir_all(&c.data_dir)?;
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml::to_string(&c)?)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&file)
        .arg(role)
        .env("MLSFED_LOG", "warn")
        .env_remove("MLSFED_NATS_URL")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("{name}: no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some(url) = line.strip_prefix("mlsfed listening on ") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(240)) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{name} did not start listening; see {}", dir.join(format!("{name}.log")).display())
        }
    }
}
