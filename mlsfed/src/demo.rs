//! `mlsfed demo`: three operators on the embedded defaults (each with its own
//! nats-server in a temporary directory, federated with the other two) and
//! three scripted devices, one per operator, that converse through their own
//! operators' real HTTP APIs, printing what each device decrypts.

use std::time::Duration;

use anyhow::Context as _;
use client::{Device, Event};
use mlsfed::nats::NatsProcess;
use tokio_util::sync::CancellationToken;

use crate::unix_now;

const DOMAINS: [&str; 3] = ["a.example", "b.example", "c.example"];

pub(crate) fn random_hex() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

pub(crate) struct Running {
    pub(crate) nats: Vec<NatsProcess>,
    pub(crate) urls: Vec<String>,
    pub(crate) configs: Vec<config::Config>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        for s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
    }
}

async fn start(base: config::Config, dir: &std::path::Path) -> anyhow::Result<Running> {
    start_domains(base, &DOMAINS, dir).await
}

/// Starts one federated operator per domain, each with its own nats-server.
pub(crate) async fn start_domains(
    base: config::Config,
    domains: &[&str],
    dir: &std::path::Path,
) -> anyhow::Result<Running> {
    let bin = mlsfed::nats::find_binary(&base.nats_server_bin);
    // Fresh secrets for every run: tokens, operator keys and NATS passwords.
    let seeds: Vec<String> = domains.iter().map(|_| random_hex()).collect();
    let local_passwords: Vec<String> = domains.iter().map(|_| random_hex()).collect();
    // peer_passwords[i][j]: the password of j's user on i's server.
    let peer_passwords: Vec<Vec<String>> =
        domains.iter().map(|_| domains.iter().map(|_| random_hex()).collect()).collect();
    let user_of = |d: &str| format!("peer-{d}");
    let mut nats = Vec::new();
    for (i, d) in domains.iter().enumerate() {
        // Each peer in its own NATS account (docs/federation.md).
        let users: Vec<String> = domains.iter().map(|p| user_of(p)).collect();
        let peers: Vec<mlsfed::nats::PeerUser<'_>> = domains
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, p)| mlsfed::nats::PeerUser { domain: p, user: &users[j], password: &peer_passwords[i][j] })
            .collect();
        let mut conf = mlsfed::nats::federation_accounts("local", &local_passwords[i], &peers);
        conf.push_str(&mlsfed::nats::server_settings(&base));
        nats.push(
            NatsProcess::start_with_config(&bin, &dir.join(d).join("nats"), 0, Some(&conf))
                .context("cannot start nats-server")?,
        );
    }
    let shutdown = CancellationToken::new();
    let (mut urls, mut configs, mut servers) = (Vec::new(), Vec::new(), Vec::new());
    for (i, d) in domains.iter().enumerate() {
        let mut cfg = base.clone();
        cfg.domain = (*d).to_owned();
        cfg.data_dir = dir.join(d);
        cfg.nats_url = format!("nats://local:{}@127.0.0.1:{}", local_passwords[i], nats[i].port());
        cfg.token_secret = random_hex().into();
        cfg.operator_key_seed = seeds[i].clone().into();
        cfg.peers = domains
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, p)| {
                let seed: [u8; 32] = hex_seed(&seeds[j]);
                config::Peer {
                    domain: (*p).to_owned(),
                    nats_url: format!("nats://127.0.0.1:{}", nats[j].port()),
                    nats_user: user_of(d),
                    nats_password: peer_passwords[j][i].clone().into(),
                    nats_ca_file: String::new(),
                    public_key: proto::identity::public_key_b64(&proto::identity::operator_key(&seed)),
                }
            })
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        println!("operator {d} listening on {url} (nats {})", nats[i].url());
        let client = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;
        let nats = mlsfed::Connections::open(&cfg.nats_url, &cfg.nats_ca_file, mlsfed::Roles::ALL, client).await?;
        let registry = prometheus::Registry::new();
        servers.push(tokio::spawn(mlsfed::run(
            cfg.clone(),
            mlsfed::Roles::ALL,
            nats,
            Some(listener),
            registry,
            shutdown.clone(),
        )));
        urls.push(url);
        configs.push(cfg);
    }
    Ok(Running { nats, urls, configs, shutdown, servers })
}

pub(crate) fn hex_seed(hex: &str) -> [u8; 32] {
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or_default();
    }
    seed
}

pub async fn run(cfg: config::Config) -> anyhow::Result<()> {
    anyhow::ensure!(cfg.nats_url.is_empty(), "the demo runs its own nats-servers; unset MLSFED_NATS_URL");
    let tmp = tempfile::tempdir()?;
    let running = start(cfg, tmp.path()).await?;
    let result = script(&running, tmp.path()).await;
    running.stop().await;
    result
}

fn show(who: &str, events: &[Event]) {
    for e in events {
        match e {
            Event::Message { position, sender, text, own: false, .. } => {
                println!("  {who:>5} decrypted #{position} from {sender}: {text}")
            }
            Event::Joined { epoch, .. } => println!("  {who:>5} joined the group at epoch {epoch}"),
            Event::Commit { epoch, position, .. } => println!("  {who:>5} applied commit #{position} -> epoch {epoch}"),
            Event::Removed { .. } => println!("  {who:>5} was removed from the group"),
            Event::Rejoined { epoch, position, .. } => {
                println!("  {who:>5} rejoined by external commit #{position} -> epoch {epoch}")
            }
            Event::Failed { reason, .. } => println!("  {who:>5} FAILED: {reason}"),
            _ => {}
        }
    }
}

/// Syncs until the device has applied `position` of `g` (bounded).
async fn catch_up(who: &str, d: &mut Device, g: &str, position: u64) -> anyhow::Result<()> {
    for _ in 0..200 {
        let ev = d.sync().await?;
        show(who, &ev);
        if ev.iter().any(|e| matches!(e, Event::Removed { .. })) {
            return Ok(());
        }
        if d.epoch(g).is_some() && d.applied(g) >= position {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{who} did not receive position {position}")
}

async fn script(r: &Running, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut devices = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let cfg = &r.configs[i];
        let id = proto::DeviceId::new(&cfg.domain, name, "phone")?;
        let token = proto::auth::issue(cfg.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        let mut d = Device::open(&dir.join(name), &r.urls[i], &token, Some(&id))?;
        d.publish_key_packages(3, true).await?;
        devices.push(d);
    }
    let [alice, bob, carol] = &mut devices[..] else { unreachable!() };
    let g = alice.create_group(&format!("demo{}", rand::random::<u32>())).await?;
    println!("alice@a.example created {g} (hub: a.example)");
    let users = [proto::UserId::new("b.example", "bob")?, proto::UserId::new("c.example", "carol")?];
    alice.add(&g, &users).await?;
    println!("alice added bob@b.example and carol@c.example in one commit (KeyPackages claimed through a.example)");
    let p = alice.applied(&g);
    catch_up("bob", bob, &g, p).await?;
    catch_up("carol", carol, &g, p).await?;
    alice.send(&g, "hello from operator A").await?;
    bob.send(&g, "hi, bob here on operator B").await?;
    let last = carol.send(&g, "carol says hey from operator C").await?;
    for (who, d) in [("alice", &mut *alice), ("bob", &mut *bob), ("carol", &mut *carol)] {
        catch_up(who, d, &g, last).await?;
    }
    bob.update(&g).await?;
    println!("bob rotated his leaf through his own operator (epoch {})", bob.epoch(&g).unwrap_or_default());
    alice.remove(&g, carol.id()).await?;
    println!("alice removed carol");
    match carol.send(&g, "am I still here?").await {
        Err(e) => println!("  carol's send refused by the hub: {e}"),
        Ok(_) => anyhow::bail!("carol was able to send after removal"),
    }
    catch_up("carol", carol, &g, u64::MAX).await?;
    let last = alice.send(&g, "just bob and me now").await?;
    catch_up("bob", bob, &g, last).await?;
    let same = alice.epoch_authenticator(&g) == bob.epoch_authenticator(&g);
    println!("alice and bob agree on epoch {} authenticator: {same}", alice.epoch(&g).unwrap_or_default());
    anyhow::ensure!(same, "epoch authenticators differ");
    println!("demo OK");
    Ok(())
}
