//! `mlsfed bench`: figures on this machine, printed, never asserted.
//! 1. raw JetStream publish rate on the same nats-server;
//! 2. end-to-end submit -> delivered rate and latency for one operator and a
//!    group of `members` devices, observed by one member over WebSocket.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use openmls_like::{Device, Item};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{embedded_nats, unix_now};

mod openmls_like {
    pub use client::{Device, Item};
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(mut cfg: config::Config, messages: usize, members: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    cfg.data_dir = tmp.path().join("operator");
    let embedded = embedded_nats(&cfg)?.context("bench runs its own nats-server; unset MLSFED_NATS_URL")?;
    cfg.nats_url = embedded.url();
    let nats = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;

    // 1. Raw JetStream publish, pipelined, 256-byte payloads, file storage.
    let js = mlsfed::jetstream(nats.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw".into()],
        ..Default::default()
    })
    .await?;
    let raw_n = 20_000;
    let payload = Bytes::from(vec![7u8; 256]);
    let start = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..raw_n {
        acks.push(std::future::IntoFuture::into_future(js.publish("bench.raw", payload.clone()).await?));
        if acks.len() >= 512 {
            acks.next().await.transpose()?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    let raw_rate = raw_n as f64 / start.elapsed().as_secs_f64();
    println!("raw JetStream publish (R1 file, 256 B, 512 in flight): {raw_rate:.0} msgs/s over {raw_n} msgs");

    // 2. End to end through the real operator.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(mlsfed::run(
        cfg.clone(),
        mlsfed::Roles::ALL,
        nats,
        Some(listener),
        prometheus::Registry::new(),
        shutdown.clone(),
    ));
    let mut devices = Vec::new();
    for i in 0..members {
        let id = proto::DeviceId::new(&cfg.domain, &format!("user{i}"), "d")?;
        let token = proto::auth::issue(cfg.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        let mut d = Device::open(&tmp.path().join(format!("dev{i}")), &url, &token, Some(&id))?;
        d.publish_key_packages(1, false).await?;
        devices.push(d);
    }
    let g = devices[0].create_group("bench").await?;
    let users: Vec<_> =
        (1..members).map(|i| proto::UserId::new(&cfg.domain, &format!("user{i}"))).collect::<Result<_, _>>()?;
    devices[0].add(&g, &users).await?;
    for d in devices.iter_mut().skip(1) {
        d.sync().await?;
    }
    // Pre-encrypt so the figure measures the server, not openmls.
    let mut bodies = Vec::with_capacity(messages);
    for i in 0..messages {
        bodies.push(devices[0].encrypt_for_bench(&g, format!("bench message {i}").as_bytes())?);
    }
    let observer = devices.last().context("need members")?;
    let ws_http = observer.http().clone();
    let start_cursor = observer.cursor();
    let arrivals: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let arr = arrivals.clone();
    let want = messages;
    let watcher = tokio::spawn(async move {
        let mut ws = ws_http.websocket(start_cursor).await?;
        while arr.lock().await.len() < want {
            let Some(frame) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await? else {
                break;
            };
            if let tokio_tungstenite::tungstenite::Message::Text(t) = frame? {
                let item: Item = serde_json::from_str(&t)?;
                if item.kind == "application" {
                    arr.lock().await.insert(item.position, Instant::now());
                }
            }
        }
        anyhow::Ok(())
    });
    let sender = devices[0].http().clone();
    let starts: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let t0 = Instant::now();
    let results = futures::stream::iter(bodies.into_iter().map(|b| {
        let sender = sender.clone();
        let starts = starts.clone();
        async move {
            let s = Instant::now();
            let a = sender.submit(b, None).await?;
            starts.lock().await.insert(a.position, s);
            anyhow::Ok(s.elapsed())
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    let accept_elapsed = t0.elapsed();
    let mut submit_lat: Vec<Duration> = results.into_iter().collect::<Result<_, _>>()?;
    watcher.await??;
    let delivered_elapsed = t0.elapsed();
    let starts = starts.lock().await;
    let arrivals = arrivals.lock().await;
    let mut e2e: Vec<Duration> =
        arrivals.iter().filter_map(|(p, at)| starts.get(p).map(|s| at.saturating_duration_since(*s))).collect();
    submit_lat.sort();
    e2e.sort();
    let deliveries = messages * members;
    println!(
        "end to end, 1 operator, {members}-member group, {messages} msgs, 32 submits in flight:\n  \
         accepted: {:.0} msgs/s (submit p50 {:?}, p99 {:?})\n  \
         delivered to the last member: {:.0} msgs/s ({:.0} mailbox deliveries/s)\n  \
         submit -> delivered latency p50 {:?}, p99 {:?}",
        messages as f64 / accept_elapsed.as_secs_f64(),
        pct(&submit_lat, 0.5),
        pct(&submit_lat, 0.99),
        messages as f64 / delivered_elapsed.as_secs_f64(),
        deliveries as f64 / delivered_elapsed.as_secs_f64(),
        pct(&e2e, 0.5),
        pct(&e2e, 0.99),
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;

    // 3. Across one federation link.
    federation(cfg.clone(), tmp.path(), messages.min(1000)).await?;

    // 4. KeyPackage claims per second through the API, on each backend.
    for backend in [config::KeydirBackend::Sled, config::KeydirBackend::Jetstream] {
        let mut kcfg = cfg.clone();
        kcfg.keydir.backend = backend;
        kcfg.keydir.claims_per_minute_per_requester = 1_000_000;
        kcfg.keydir.claims_per_minute_per_user = 1_000_000;
        kcfg.data_dir = tmp.path().join(format!("keydir-{backend:?}"));
        let rate = claims(kcfg, tmp.path(), 20, 50).await?;
        println!("KeyPackage claims through the API ({backend:?} backend, 16 in flight): {rate:.0} claims/s");
    }
    drop(embedded);
    Ok(())
}

/// Uploads `per_device` KeyPackages for each of `users` devices, then claims
/// them all; returns claims per second.
async fn claims(cfg: config::Config, dir: &std::path::Path, users: usize, per_device: usize) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let nats = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;
    let roles = mlsfed::Roles { ingest: true, ..mlsfed::Roles::NONE };
    let server = tokio::spawn(mlsfed::run(
        cfg.clone(),
        roles,
        nats,
        Some(listener),
        prometheus::Registry::new(),
        shutdown.clone(),
    ));
    let tag = format!("{:?}", cfg.keydir.backend).to_lowercase();
    for i in 0..users {
        let id = proto::DeviceId::new(&cfg.domain, &format!("k{tag}{i}"), "d")?;
        let token = proto::auth::issue(cfg.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        let mut d = Device::open(&dir.join(format!("k{tag}{i}")), &url, &token, Some(&id))?;
        d.publish_key_packages(per_device, false).await?;
    }
    let claimer = proto::DeviceId::new(&cfg.domain, "claimer", "d")?;
    let token = proto::auth::issue(cfg.token_secret.expose().as_bytes(), &claimer, unix_now() + 3600);
    let http = reqwest::Client::new();
    let total = users * per_device;
    let t0 = Instant::now();
    let results = futures::stream::iter((0..total).map(|i| {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        let user = format!("mimi://{}/u/k{tag}{}", cfg.domain, i % users);
        async move {
            let r = http
                .post(format!("{url}/v1/keypackages/claim"))
                .bearer_auth(token)
                .json(&serde_json::json!({ "user": user }))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "claim failed: {}", r.status());
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    let elapsed = t0.elapsed();
    for r in results {
        r?;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Messages per second across one federation link (hub A, member on B),
/// and the rate at which B catches up after its nats-server was down.
async fn federation(mut cfg: config::Config, dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    cfg.nats_url = String::new();
    let fdir = dir.join("federation");
    let mut running = crate::demo::start_domains(cfg, &["a.example", "b.example"], &fdir).await?;
    let device = |i: usize, user: &str| -> anyhow::Result<Device> {
        let c = &running.configs[i];
        let id = proto::DeviceId::new(&c.domain, user, "d")?;
        let token = proto::auth::issue(c.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        Ok(Device::open(&fdir.join(user), &running.urls[i], &token, Some(&id))?)
    };
    let mut alice = device(0, "alice")?;
    let mut bob = device(1, "bob")?;
    alice.publish_key_packages(1, false).await?;
    bob.publish_key_packages(1, false).await?;
    let g = alice.create_group("fedbench").await?;
    alice.add(&g, &[proto::UserId::new("b.example", "bob")?]).await?;
    for _ in 0..200 {
        bob.sync().await?;
        if bob.epoch(&g).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::ensure!(bob.epoch(&g).is_some(), "bob did not join across the link");

    // Throughput: n messages from A, counted as they reach bob's mailbox on B.
    let send = |alice: &mut Device, n: usize| -> anyhow::Result<Vec<Vec<u8>>> {
        (0..n)
            .map(|i| alice.encrypt_for_bench(&g, format!("fed {i}").as_bytes()).map_err(anyhow::Error::from))
            .collect()
    };
    let submit_all = |bodies: Vec<Vec<u8>>, http: client::Http| async move {
        let results = futures::stream::iter(bodies.into_iter().map(|b| {
            let http = http.clone();
            async move { http.submit(b, None).await }
        }))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
        results.into_iter().collect::<Result<Vec<_>, _>>().map(|v| v.len())
    };
    let count_after = |http: client::Http, mut cursor: u64| async move {
        let mut count = 0;
        loop {
            let items = http.fetch(cursor, 256).await?;
            if items.is_empty() {
                return anyhow::Ok((count, cursor));
            }
            cursor = items.last().map(|i| i.seq).unwrap_or(cursor);
            count += items.iter().filter(|i| i.kind == "application").count();
        }
    };
    let bodies = send(&mut alice, n)?;
    let (bob_http, start_cursor) = (bob.http().clone(), bob.cursor());
    let t0 = Instant::now();
    submit_all(bodies, alice.http().clone()).await?;
    let (mut got, mut cursor) = (0, start_cursor);
    while got < n && t0.elapsed() < Duration::from_secs(120) {
        let (c, next) = count_after(bob_http.clone(), cursor).await?;
        got += c;
        cursor = next;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let link_rate = got as f64 / t0.elapsed().as_secs_f64();
    println!(
        "across one federation link (hub A -> member on B, 32 submits in flight): {link_rate:.0} msgs/s ({got} msgs)"
    );

    // Catch-up: B's nats-server is down while A accepts n messages.
    running.nats[1].stop();
    let bodies = send(&mut alice, n)?;
    submit_all(bodies, alice.http().clone()).await?;
    running.nats[1].restart()?;
    let t1 = Instant::now();
    let mut caught = 0;
    while caught < n && t1.elapsed() < Duration::from_secs(180) {
        match count_after(bob_http.clone(), cursor).await {
            Ok((c, next)) => {
                caught += c;
                cursor = next;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = caught as f64 / t1.elapsed().as_secs_f64();
    println!(
        "catch-up after B's nats-server was down: {caught} queued msgs delivered in {:?} ({catch_up:.0} msgs/s, including B's reconnect)",
        t1.elapsed()
    );
    running.stop().await;
    Ok(())
}
