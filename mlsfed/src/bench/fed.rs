//! Federation figures (hub A, members on B and C, each operator with its own
//! nats-server), and KeyPackage claims per second.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use client::Device;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::unix_now;

pub struct Figures {
    pub link: f64,
    pub two_links: f64,
    pub catch_up: f64,
    pub link_p50_half_load_ms: f64,
    /// The catch-up as stored in the peer's LOG (JetStream timestamps).
    pub catch_up_appended: Option<f64>,
    pub link_p99_half_load_ms: f64,
    /// Each hop of the open loop at half rate: (hop, p50 ms, p99 ms).
    pub link_hops: Vec<(String, f64, f64)>,
}

/// Counts application entries of `g` a follower device reads after `cursor`
/// until `n` arrived (or `limit`); returns the new cursor and the arrival
/// time of each position.
async fn read_until(
    http: &client::Http,
    g: &str,
    cursor: &mut u64,
    n: usize,
    limit: Duration,
    arrivals: &mut Vec<(u64, Instant)>,
) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    let mut got = 0;
    while got < n && t0.elapsed() < limit {
        match http.entries(g, *cursor, None, 256).await {
            Ok(page) => {
                let now = Instant::now();
                for e in page.entries.iter().filter(|e| e.kind == "application") {
                    arrivals.push((e.position, now));
                    got += 1;
                }
                if page.entries.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                *cursor = page.next.max(*cursor);
            }
            // The peer's nats-server is still coming back.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(got)
}

/// As `read_until`, with the entries pushed on the device's WebSocket as
/// they are stored, which is how a device that is online gets them.
async fn push_until(
    http: &client::Http,
    g: &str,
    cursor: &mut u64,
    n: usize,
    limit: Duration,
    arrivals: &mut Vec<(u64, Instant)>,
) -> anyhow::Result<usize> {
    use client::http::{Frame, Item};
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = http.websocket_batched(0).await?;
    let follow = serde_json::json!({ "follow": { g: { "after": *cursor } } });
    ws.send(Message::Text(follow.to_string().into())).await?;
    let deadline = tokio::time::Instant::now() + limit;
    let before = arrivals.len();
    let take = |e: &Item, now: Instant, cursor: &mut u64, arrivals: &mut Vec<(u64, Instant)>| {
        if e.group.as_deref() == Some(g) {
            if e.kind == "application" {
                arrivals.push((e.position, now));
            }
            *cursor = e.seq.max(*cursor);
        }
    };
    while arrivals.len() - before < n {
        let m = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(m)) => m?,
            _ => break,
        };
        let Message::Text(t) = m else { continue };
        let now = Instant::now();
        match serde_json::from_str::<Frame>(&t)? {
            Frame::Entry(e) => take(&e, now, cursor, arrivals),
            Frame::Entries { entries } => entries.iter().for_each(|e| take(e, now, cursor, arrivals)),
            Frame::Error { group: Some(_), message, .. } => {
                anyhow::bail!("the socket stopped following {g}: {message}")
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(arrivals.len() - before)
}

async fn submit_all(
    http: &client::Http,
    bodies: Vec<Vec<u8>>,
    rate: Option<f64>,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    match rate {
        None => {
            let results: Vec<anyhow::Result<(u64, Instant)>> = futures::stream::iter(bodies.into_iter().map(|b| {
                let http = http.clone();
                async move {
                    let s = Instant::now();
                    Ok((http.submit(b, None).await?.position, s))
                }
            }))
            .buffer_unordered(64)
            .collect()
            .await;
            results.into_iter().collect()
        }
        Some(r) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1.0)));
            let mut tasks = Vec::new();
            for b in bodies {
                tick.tick().await;
                let http = http.clone();
                tasks.push(tokio::spawn(async move {
                    let s = Instant::now();
                    anyhow::Ok((http.submit(b, None).await?.position, s))
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await??);
            }
            Ok(out)
        }
    }
}

/// Entries per second over the last `n` entries of `group` in an operator's
/// LOG, from the first one's JetStream timestamp to the last one's.
async fn appended_per_s(cfg: &config::Config, group: &str, n: usize) -> anyhow::Result<f64> {
    let subject = proto::names::log_subject(&proto::GroupId::parse(group)?, cfg.streams.partitions);
    let at = super::stages::stored(cfg, proto::names::LOG_STREAM, subject, super::stages::log_position).await?;
    let mut stored: Vec<i128> = at.into_values().collect();
    stored.sort_unstable();
    anyhow::ensure!(stored.len() >= n && n > 1, "{} entries in the LOG, expected at least {n}", stored.len());
    let span = (stored[stored.len() - 1] - stored[stored.len() - n]) as f64 / 1e9;
    Ok(n as f64 / span.max(1e-3))
}

/// The `q` quantile (0..=1) of submit→read latency, in ms.
fn pct_ms(starts: &[(u64, Instant)], arrivals: &[(u64, Instant)], q: f64) -> f64 {
    let starts: std::collections::HashMap<u64, Instant> = starts.iter().copied().collect();
    let mut lat: Vec<Duration> =
        arrivals.iter().filter_map(|(p, at)| starts.get(p).map(|s| at.saturating_duration_since(*s))).collect();
    lat.sort_unstable();
    lat.get(((lat.len() as f64 - 1.0) * q).round().max(0.0) as usize)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN)
}

async fn join(d: &mut Device, g: &str) -> anyhow::Result<()> {
    for _ in 0..400 {
        d.sync().await?;
        if d.epoch(g).is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{} did not join {g} across the link", d.id())
}

pub async fn run(mut cfg: config::Config, dir: &std::path::Path, n: usize) -> anyhow::Result<Figures> {
    cfg.nats_url = String::new();
    let fdir = dir.join("federation");
    let domains = ["a.example", "b.example", "c.example"];
    let mut running = crate::demo::start_domains(cfg, &domains, &fdir).await?;
    let device = |i: usize, user: &str| -> anyhow::Result<Device> {
        let c = &running.configs[i];
        let id = proto::DeviceId::new(&c.domain, user, "d")?;
        let token = proto::auth::issue(c.token_secret.expose().as_bytes(), &id, unix_now() + 3600);
        Ok(Device::open(&fdir.join(user), &running.urls[i], &token, Some(&id))?)
    };
    let mut alice = device(0, "alice")?;
    let mut bob = device(1, "bob")?;
    let mut carol = device(2, "carol")?;
    alice.publish_key_packages(1, false).await?;
    bob.publish_key_packages(2, false).await?;
    carol.publish_key_packages(1, false).await?;
    // One link: a group of alice (A) and bob (B).
    let g1 = alice.create_group("fed1").await?;
    alice.add(&g1, &[proto::UserId::new("b.example", "bob")?]).await?;
    join(&mut bob, &g1).await?;
    // Two links: alice (A), bob (B) and carol (C).
    let g2 = alice.create_group("fed2").await?;
    alice.add(&g2, &[proto::UserId::new("b.example", "bob")?, proto::UserId::new("c.example", "carol")?]).await?;
    join(&mut bob, &g2).await?;
    join(&mut carol, &g2).await?;

    let bodies = |alice: &mut Device, g: &str, n: usize| -> anyhow::Result<Vec<Vec<u8>>> {
        (0..n).map(|i| alice.encrypt_for_bench(g, format!("fed {i}").as_bytes()).map_err(anyhow::Error::from)).collect()
    };
    let limit = Duration::from_secs(120);

    let mut bob1 = bob.group_cursor(&g1);
    let b = bodies(&mut alice, &g1, n)?;
    let t0 = Instant::now();
    let sender = alice.http().clone();
    let send = tokio::spawn(async move { submit_all(&sender, b, None).await });
    let mut arrivals = Vec::new();
    let got = push_until(bob.http(), &g1, &mut bob1, n, limit, &mut arrivals).await?;
    send.await??;
    let link = got as f64 / t0.elapsed().as_secs_f64();
    println!("across one federation link (A -> B, 64 submits in flight): {link:.0} msgs/s ({got}/{n})");

    // Open loop at half that rate across the link.
    let half = (link / 2.0).max(10.0);
    let m = ((half * 4.0) as usize).clamp(100, 5000);
    let b = bodies(&mut alice, &g1, m)?;
    let sender = alice.http().clone();
    let send = tokio::spawn(async move { submit_all(&sender, b, Some(half)).await });
    let mut arrivals = Vec::new();
    let clock = super::stages::Clock::now();
    push_until(bob.http(), &g1, &mut bob1, m, limit, &mut arrivals).await?;
    let starts = send.await??;
    let link_p99 = pct_ms(&starts, &arrivals, 0.99);
    let link_p50 = pct_ms(&starts, &arrivals, 0.5);
    println!("across one link, open loop at {half:.0} msgs/s: p50 {link_p50:.1} ms, p99 {link_p99:.1} ms");
    let hops =
        match super::stages::link(&running.configs[0], &running.configs[1], &g1, &clock, &starts, &arrivals).await {
            Ok(hops) => hops,
            Err(e) => {
                println!("  cannot read the link's hops: {e:#}");
                Vec::new()
            }
        };

    let (mut bob2, mut carol2) = (bob.group_cursor(&g2), carol.group_cursor(&g2));
    let b = bodies(&mut alice, &g2, n)?;
    let t0 = Instant::now();
    let sender = alice.http().clone();
    let send = tokio::spawn(async move { submit_all(&sender, b, None).await });
    let (bh, ch, g2c) = (bob.http().clone(), carol.http().clone(), g2.clone());
    let at_c = tokio::spawn(async move {
        let mut a = Vec::new();
        push_until(&ch, &g2c, &mut carol2, n, limit, &mut a).await
    });
    let mut a = Vec::new();
    let got_b = push_until(&bh, &g2, &mut bob2, n, limit, &mut a).await?;
    let got_c = at_c.await??;
    send.await??;
    let two_links = got_b.min(got_c) as f64 / t0.elapsed().as_secs_f64();
    println!("across two links (A -> B and A -> C): {two_links:.0} msgs/s ({got_b}/{n} at B, {got_c}/{n} at C)");

    // Catch-up: B's nats-server is down while A accepts n messages.
    running.nats[1].stop();
    let b = bodies(&mut alice, &g1, n)?;
    submit_all(alice.http(), b, None).await?;
    running.nats[1].restart()?;
    let t1 = Instant::now();
    let mut arrivals = Vec::new();
    let caught = read_until(bob.http(), &g1, &mut bob1, n, Duration::from_secs(180), &mut arrivals).await?;
    // From the first entry read (B back and reachable) to the last.
    let span = match (arrivals.first(), arrivals.last()) {
        (Some(f), Some(l)) if l.1 > f.1 => l.1.duration_since(f.1),
        _ => t1.elapsed(),
    };
    let catch_up = caught as f64 / span.as_secs_f64().max(1e-3);
    println!(
        "catch-up after B's nats-server was down: {caught}/{n} queued msgs, {catch_up:.0} msgs/s once B was back ({:?} including its restart)",
        t1.elapsed()
    );
    // The same catch-up seen in B's LOG, before any device reads it: one
    // device reading pages of 256 can be slower than the link.
    let appended = match appended_per_s(&running.configs[1], &g1, n).await {
        Ok(rate) => {
            println!("  the same in B's LOG: {rate:.0} msgs/s from the first to the last entry stored");
            Some(rate)
        }
        Err(e) => {
            println!("  cannot read B's LOG for the catch-up: {e:#}");
            None
        }
    };
    running.stop().await;
    Ok(Figures {
        link,
        two_links,
        catch_up,
        link_p99_half_load_ms: link_p99,
        link_p50_half_load_ms: link_p50,
        catch_up_appended: appended,
        link_hops: hops,
    })
}

/// Uploads `per_device` KeyPackages for each of `users` devices, then claims
/// them all; returns claims per second.
pub async fn claims(
    cfg: config::Config,
    dir: &std::path::Path,
    users: usize,
    per_device: usize,
) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let nats = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;
    let roles = mlsfed::Roles { ingest: true, ..mlsfed::Roles::NONE };
    let server = tokio::spawn(mlsfed::run(
        cfg.clone(),
        roles,
        mlsfed::Connections::shared(nats),
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
        r.context("claim")?;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(total as f64 / elapsed.as_secs_f64())
}
