//! `mlsfed cluster` (scripts/cluster): the production shape on one machine.
//! Two federated operators, each on its own 3-node NATS cluster with R3
//! streams (peers isolated in NATS accounts, as in docs/federation.md),
//! each with 2 ingest, 3 sequencer, 3 fanout and 2 bridge processes, all
//! separate OS processes of this binary. `--check` runs a conversation
//! across both operators through different ingest processes and stops;
//! `--chaos` kills one process of each role and NATS nodes under traffic
//! (`chaos.rs`); `--throughput` measures msgs/s on this topology and on the
//! same processes over one nats-server (`throughput.rs`). Without any, the
//! topology runs until Ctrl-C.

mod chaos;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use client::Device;
use mlsfed::nats::NatsProcess;

use crate::demo::random_hex;
use crate::procs::{free_port, spawn, spawn_listening};
use crate::unix_now;

const DOMAINS: [&str; 2] = ["a.example", "b.example"];
const NODES: usize = 3;
/// Processes of each role per operator.
const ROLES: [(&str, usize); 4] = [("ingest", 2), ("sequencer", 3), ("fanout", 3), ("bridge", 2)];

/// What `mlsfed cluster` does once the topology runs.
pub enum Mode {
    /// Until Ctrl-C.
    Run,
    Check,
    Chaos,
    /// This many messages, on 3 nodes and on 1.
    Throughput(usize),
}

/// One operator's cluster and processes.
pub(crate) struct Operator {
    pub(crate) cfg: config::Config,
    pub(crate) nodes: Vec<NatsProcess>,
    pub(crate) ingest_urls: Vec<String>,
    dir: PathBuf,
}

/// One worker process of an operator.
struct Worker {
    op: usize,
    role: &'static str,
    index: usize,
    child: Option<Child>,
}

/// Both operators with every process, stopped on drop.
pub(crate) struct Topology {
    pub(crate) ops: Vec<Operator>,
    workers: Vec<Worker>,
    pub(crate) dir: PathBuf,
    _tmp: tempfile::TempDir,
}

pub async fn run(base: config::Config, dir: Option<PathBuf>, mode: Mode) -> anyhow::Result<()> {
    anyhow::ensure!(base.nats_url.is_empty(), "the cluster runs its own nats-servers; unset MLSFED_NATS_URL");
    if let Mode::Throughput(messages) = mode {
        return throughput::run(&base, dir, messages).await;
    }
    let mut topo = Topology::start(&base, dir, NODES).await?;
    topo.print();
    let result = match mode {
        Mode::Check => conversation(&topo.ops, &topo.dir).await,
        Mode::Chaos => chaos::run(&mut topo).await,
        Mode::Run | Mode::Throughput(_) => {
            println!("running; Ctrl-C stops everything");
            tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")
        }
    };
    topo.stop();
    result
}

impl Topology {
    /// Starts both operators, each on a cluster of `nodes` nats-servers
    /// (streams replicated on all of them), with every role's processes.
    pub(crate) async fn start(base: &config::Config, dir: Option<PathBuf>, nodes: usize) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
        let bin = mlsfed::nats::find_binary(&base.nats_server_bin);
        let seeds: Vec<String> = DOMAINS.iter().map(|_| random_hex()).collect();
        let local_passwords: Vec<String> = DOMAINS.iter().map(|_| random_hex()).collect();
        // peer_passwords[i][j]: the password of j's user on i's cluster.
        let peer_passwords: Vec<Vec<String>> =
            DOMAINS.iter().map(|_| DOMAINS.iter().map(|_| random_hex()).collect()).collect();
        let user_of = |d: &str| format!("peer-{d}");
        let users: Vec<String> = DOMAINS.iter().map(|d| user_of(d)).collect();

        // 1. A NATS cluster per operator.
        let mut ops = Vec::new();
        for (i, d) in DOMAINS.iter().enumerate() {
            let peers: Vec<mlsfed::nats::PeerUser<'_>> = DOMAINS
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| mlsfed::nats::PeerUser { domain: p, user: &users[j], password: &peer_passwords[i][j] })
                .collect();
            let accounts = mlsfed::nats::federation_accounts("local", &local_passwords[i], &peers);
            let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect::<Result<_, _>>()?;
            let mut started = Vec::new();
            for k in 0..nodes {
                let cluster = if nodes > 1 {
                    mlsfed::nats::cluster_block(&d.replace('.', "-"), k, &routes)
                } else {
                    String::new()
                };
                let conf = format!("{accounts}{}{cluster}", mlsfed::nats::server_settings(base));
                let node = NatsProcess::start_with_config(&bin, &dir.join(d).join(format!("nats-{k}")), 0, Some(&conf))
                    .with_context(|| format!("cannot start {d}'s nats node {k}"))?;
                started.push(node);
            }
            let nats_url = started
                .iter()
                .map(|n| format!("nats://local:{}@127.0.0.1:{}", local_passwords[i], n.port()))
                .collect::<Vec<_>>()
                .join(",");
            let mut cfg = base.clone();
            cfg.domain = (*d).to_owned();
            cfg.nats_url = nats_url;
            cfg.streams.replicas = nodes;
            // Several ingest processes share one key directory.
            cfg.keydir.backend = config::KeydirBackend::Jetstream;
            cfg.token_secret = random_hex().into();
            cfg.operator_key_seed = seeds[i].clone().into();
            cfg.metrics_listen = "127.0.0.1:0".into();
            ops.push(Operator { cfg, nodes: started, ingest_urls: Vec::new(), dir: dir.join(d) });
        }
        for (i, d) in DOMAINS.iter().enumerate() {
            let peers = DOMAINS
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, p)| {
                    let seed = crate::demo::hex_seed(&seeds[j]);
                    config::Peer {
                        domain: (*p).to_owned(),
                        nats_url: ops[j].nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(","),
                        nats_user: user_of(d),
                        nats_password: peer_passwords[j][i].clone().into(),
                        nats_ca_file: String::new(),
                        public_key: proto::identity::public_key_b64(&proto::identity::operator_key(&seed)),
                    }
                })
                .collect();
            ops[i].cfg.peers = peers;
        }
        for op in &ops {
            wait_ready(&op.cfg.nats_url, nodes).await?;
        }
        let mut topo = Self { ops, workers: Vec::new(), dir, _tmp: tmp };

        // 2. Every role as separate processes.
        for op in 0..topo.ops.len() {
            for (role, n) in ROLES {
                for index in 0..n {
                    topo.workers.push(Worker { op, role, index, child: None });
                    topo.spawn(op, role, index)?;
                }
            }
        }
        for op in 0..topo.ops.len() {
            for index in 0..topo.ops[op].ingest_urls.len() {
                topo.wait_ingest(op, index).await?;
            }
        }
        Ok(topo)
    }

    fn print(&self) {
        for op in &self.ops {
            let nodes: Vec<String> = op.nodes.iter().map(|n| n.url()).collect();
            println!("operator {}: NATS cluster {} (R{})", op.cfg.domain, nodes.join(" "), op.nodes.len());
            println!("  ingest {} | 3 sequencer, 3 fanout, 2 bridge processes", op.ingest_urls.join(" "));
        }
        println!("logs and configs: {}", self.dir.display());
    }

    /// Starts (again) the `index`th process of `role` at operator `op`.
    fn spawn(&mut self, op: usize, role: &str, index: usize) -> anyhow::Result<()> {
        let name = format!("{role}{index}");
        let o = &mut self.ops[op];
        let child = if role == "ingest" {
            let (child, url) = spawn_listening(&o.cfg, &o.dir, &name, role)?;
            if o.ingest_urls.len() <= index {
                o.ingest_urls.resize(index + 1, String::new());
            }
            o.ingest_urls[index] = url;
            child
        } else {
            spawn(&o.cfg, &o.dir, &name, role)?
        };
        let w = self
            .workers
            .iter_mut()
            .find(|w| w.op == op && w.role == role && w.index == index)
            .ok_or_else(|| anyhow::anyhow!("no {name} at operator {op}"))?;
        w.child = Some(child);
        Ok(())
    }

    /// Waits (bounded) until the `index`th ingest of `op` is ready.
    async fn wait_ingest(&self, op: usize, index: usize) -> anyhow::Result<()> {
        let u = &self.ops[op].ingest_urls[index];
        let http = reqwest::Client::new();
        let t0 = Instant::now();
        while !http.get(format!("{u}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(240), "ingest at {u} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// SIGKILLs the `index`th process of `role` at operator `op`.
    pub(crate) fn kill(&mut self, op: usize, role: &str, index: usize) -> anyhow::Result<()> {
        let w = self
            .workers
            .iter_mut()
            .find(|w| w.op == op && w.role == role && w.index == index)
            .ok_or_else(|| anyhow::anyhow!("no {role}{index} at operator {op}"))?;
        if let Some(mut c) = w.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the killed process again (an ingest gets a new port).
    pub(crate) async fn restart(&mut self, op: usize, role: &str, index: usize) -> anyhow::Result<()> {
        self.spawn(op, role, index)?;
        if role == "ingest" {
            self.wait_ingest(op, index).await?;
        }
        Ok(())
    }

    /// SIGTERM to every process (each hands its partitions over), then the
    /// NATS nodes.
    pub(crate) fn stop(&mut self) {
        let mut children: Vec<Child> = self.workers.iter_mut().filter_map(|w| w.child.take()).collect();
        crate::procs::Procs(std::mem::take(&mut children)).stop();
        for op in &mut self.ops {
            for n in &mut op.nodes {
                n.terminate(Duration::from_secs(5));
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(mut c) = w.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Waits (bounded) until a cluster can create a replicated stream.
async fn wait_ready(url: &str, replicas: usize) -> anyhow::Result<()> {
    let js = mlsfed::jetstream(mlsfed::connect(url, "").await?);
    let t0 = Instant::now();
    loop {
        let probe = async_nats::jetstream::stream::Config {
            name: "MLSFED_CLUSTER_PROBE".into(),
            subjects: vec!["mlsfed.cluster.probe".into()],
            num_replicas: replicas,
            ..Default::default()
        };
        if js.get_or_create_stream(probe).await.is_ok() {
            let _ = js.delete_stream("MLSFED_CLUSTER_PROBE").await;
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "the NATS cluster never became ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// alice on a.example (through its first ingest) and bob on b.example
/// (through its second) share a group and talk.
async fn conversation(ops: &[Operator], dir: &Path) -> anyhow::Result<()> {
    let open = |op: &Operator, name: &str, url: &str| -> anyhow::Result<Device> {
        let id = proto::DeviceId::new(&op.cfg.domain, name, "phone")?;
        let token = proto::auth::issue(op.cfg.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        Ok(Device::open(&dir.join(name), url, &token, Some(&id))?)
    };
    let mut alice = open(&ops[0], "alice", &ops[0].ingest_urls[0])?;
    let mut bob = open(&ops[1], "bob", &ops[1].ingest_urls[1])?;
    alice.publish_key_packages(2, true).await?;
    bob.publish_key_packages(2, true).await?;
    let g = alice.create_group(&format!("cluster{}", rand::random::<u32>())).await?;
    alice.add(&g, &[proto::UserId::new("b.example", "bob")?]).await?;
    let mut last = 0;
    for i in 0..10 {
        last = alice.send(&g, &format!("hello {i} from a.example")).await?;
    }
    let t0 = Instant::now();
    while bob.applied(&g) < last {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "bob never got alice's messages");
        bob.sync().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = bob.send(&g, "hi from b.example").await?;
    while alice.applied(&g) < reply {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(90), "alice never got bob's reply");
        alice.sync().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(alice.epoch_authenticator(&g) == bob.epoch_authenticator(&g), "epoch authenticators differ");
    println!("alice@a.example and bob@b.example exchanged 11 messages across both clusters: cluster OK");
    Ok(())
}
