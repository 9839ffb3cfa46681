//! `mlsfed demo`: one operator on the embedded defaults (its own nats-server
//! in a temporary directory) and three scripted devices that converse through
//! its real HTTP API, printing what each device decrypts.

use std::time::Duration;

use anyhow::Context as _;
use client::{Device, Event};
use tokio_util::sync::CancellationToken;

use crate::{embedded_nats, unix_now};

pub async fn run(mut cfg: config::Config) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    cfg.data_dir = tmp.path().join("operator");
    cfg.listen = "127.0.0.1:0".into();
    let embedded = embedded_nats(&cfg)?.context("the demo runs its own nats-server; unset MLSFED_NATS_URL")?;
    cfg.nats_url = embedded.url();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("operator {} listening on {url} (nats {})", cfg.domain, cfg.nats_url);
    let shutdown = CancellationToken::new();
    let nats = mlsfed::connect(&cfg.nats_url).await?;
    let server = tokio::spawn(mlsfed::run(
        cfg.clone(),
        mlsfed::Roles::ALL,
        nats,
        Some(listener),
        prometheus::Registry::new(),
        shutdown.clone(),
    ));
    let result = script(&cfg, &url, tmp.path()).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
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
            Event::Failed { reason, .. } => println!("  {who:>5} FAILED: {reason}"),
            _ => {}
        }
    }
}

async fn script(cfg: &config::Config, url: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut devices = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let id = proto::DeviceId::new(&cfg.domain, name, "phone")?;
        let token = proto::auth::issue(cfg.token_secret.as_bytes(), &id, unix_now() + 3600);
        let mut d = Device::open(&dir.join(name), url, &token, Some(&id))?;
        d.publish_key_packages(3, true).await?;
        devices.push(d);
    }
    let [alice, bob, carol] = &mut devices[..] else { unreachable!() };
    let room = format!("demo{}", rand::random::<u32>());
    let g = alice.create_group(&room).await?;
    println!("alice created {g}");
    let users: Vec<_> =
        ["bob", "carol"].iter().map(|u| proto::UserId::new(&cfg.domain, u)).collect::<Result<_, _>>()?;
    alice.add(&g, &users).await?;
    println!("alice added bob and carol in one commit");
    show("bob", &bob.sync().await?);
    show("carol", &carol.sync().await?);
    alice.send(&g, "hello from alice").await?;
    bob.send(&g, "hi, bob here").await?;
    carol.send(&g, "carol says hey").await?;
    for (who, d) in [("alice", &mut *alice), ("bob", &mut *bob), ("carol", &mut *carol)] {
        show(who, &d.sync().await?);
    }
    bob.update(&g).await?;
    println!("bob rotated his leaf (epoch {})", bob.epoch(&g).unwrap_or_default());
    alice.remove(&g, carol.id()).await?;
    println!("alice removed carol");
    // Carol has not synced yet, so her client still encrypts for the group;
    // the hub refuses her because she is no longer a member.
    match carol.send(&g, "am I still here?").await {
        Err(e) => println!("  carol's send refused: {e}"),
        Ok(_) => anyhow::bail!("carol was able to send after removal"),
    }
    show("carol", &carol.sync().await?);
    alice.send(&g, "just us now").await?;
    show("bob", &bob.sync().await?);
    let same = alice.epoch_authenticator(&g) == bob.epoch_authenticator(&g);
    println!("alice and bob agree on epoch {} authenticator: {same}", alice.epoch(&g).unwrap_or_default());
    anyhow::ensure!(same, "epoch authenticators differ");
    println!("demo OK");
    Ok(())
}
