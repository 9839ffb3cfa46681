//! `mlsfed cluster` (scripts/cluster): the production shape on one machine.
//! Two federated operators, each on its own 3-node NATS cluster with R3
//! streams (peers isolated in NATS accounts, as in docs/federation.md),
//! each with 2 ingest, 3 sequencer, 3 fanout and 2 bridge processes, all
//! separate OS processes of this binary. `--check` runs a conversation
//! across both operators through different ingest processes and stops;
//! without it the topology runs until Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use client::Device;
use mlsfed::nats::NatsProcess;

use crate::demo::random_hex;
use crate::procs::{free_port, spawn, spawn_listening, Procs};
use crate::unix_now;

const DOMAINS: [&str; 2] = ["a.example", "b.example"];
const NODES: usize = 3;
/// Processes of each role per operator.
const ROLES: [(&str, usize); 4] = [("ingest", 2), ("sequencer", 3), ("fanout", 3), ("bridge", 2)];

/// One operator's cluster and processes.
struct Operator {
    cfg: config::Config,
    nodes: Vec<NatsProcess>,
    ingest_urls: Vec<String>,
}

pub async fn run(base: config::Config, dir: Option<PathBuf>, check: bool) -> anyhow::Result<()> {
    anyhow::ensure!(base.nats_url.is_empty(), "the cluster runs its own nats-servers; unset MLSFED_NATS_URL");
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
        let routes: Vec<u16> = (0..NODES).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut nodes = Vec::new();
        for k in 0..NODES {
            let conf = format!(
                "{accounts}{}{}",
                mlsfed::nats::jetstream_block(&base.streams.sync_interval),
                mlsfed::nats::cluster_block(&d.replace('.', "-"), k, &routes)
            );
            let node = NatsProcess::start_with_config(&bin, &dir.join(d).join(format!("nats-{k}")), 0, Some(&conf))
                .with_context(|| format!("cannot start {d}'s nats node {k}"))?;
            nodes.push(node);
        }
        let nats_url = nodes
            .iter()
            .map(|n| format!("nats://local:{}@127.0.0.1:{}", local_passwords[i], n.port()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cfg = base.clone();
        cfg.domain = (*d).to_owned();
        cfg.nats_url = nats_url;
        cfg.streams.replicas = NODES;
        // Several ingest processes share one key directory.
        cfg.keydir.backend = config::KeydirBackend::Jetstream;
        cfg.token_secret = random_hex().into();
        cfg.operator_key_seed = seeds[i].clone().into();
        cfg.metrics_listen = "127.0.0.1:0".into();
        ops.push(Operator { cfg, nodes, ingest_urls: Vec::new() });
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
        wait_ready(&op.cfg.nats_url, NODES).await?;
    }

    // 2. Every role as separate processes.
    let mut procs = Procs(Vec::new());
    for op in &mut ops {
        let d = op.cfg.domain.clone();
        let pdir = dir.join(&d);
        for (role, n) in ROLES {
            for k in 0..n {
                let name = format!("{role}{k}");
                if role == "ingest" {
                    let (child, url) = spawn_listening(&op.cfg, &pdir, &name, role)?;
                    procs.0.push(child);
                    op.ingest_urls.push(url);
                } else {
                    procs.0.push(spawn(&op.cfg, &pdir, &name, role)?);
                }
            }
        }
    }
    let http = reqwest::Client::new();
    for op in &ops {
        for u in &op.ingest_urls {
            let t0 = Instant::now();
            while !http.get(format!("{u}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(240), "ingest at {u} never became ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for op in &ops {
        let nodes: Vec<String> = op.nodes.iter().map(|n| n.url()).collect();
        println!("operator {}: NATS cluster {} (R{NODES})", op.cfg.domain, nodes.join(" "));
        println!("  ingest {} | 3 sequencer, 3 fanout, 2 bridge processes", op.ingest_urls.join(" "));
    }
    println!("logs and configs: {}", dir.display());

    let result = if check {
        conversation(&ops, &dir).await
    } else {
        println!("running; Ctrl-C stops everything");
        tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")
    };
    procs.stop();
    for op in &mut ops {
        for n in &mut op.nodes {
            n.terminate(Duration::from_secs(5));
        }
    }
    result
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
