//! Several bridges per operator: a peer's outbox is sent by one of them at
//! a time, and moves to another when that one dies, with nothing skipped,
//! reordered or delivered twice at the peer's devices.

use std::time::{Duration, Instant};

use tests::{sync_until, try_metric, Client, Federation, Operator};

const A: &str = "a.example";
const B: &str = "b.example";
const SENT_TO_B: &str = "mlsfed_federation_sent_total{peer=\"b.example\"}";

fn texts(c: &Client, g: &str) -> Vec<String> {
    c.messages(g).into_iter().map(|m| m.2).collect()
}

async fn sent(bridge: &Operator) -> f64 {
    try_metric(bridge, SENT_TO_B).await.unwrap_or(0.0)
}

/// A hub (A) whose roles run as separate processes with two bridges, a
/// peer (B), and a group of alice@A and bob@B that bob has joined.
struct World {
    fed: Federation,
    bridges: [Operator; 2],
    _workers: [Operator; 2],
    alice: Client,
    bob: Client,
    g: String,
}

async fn world(tweak: impl Fn(&mut tests::config::Config)) -> anyhow::Result<World> {
    let fed = Federation::start_roles(
        &[A, B],
        |d| if d == A { "ingest" } else { "run" },
        |_, c| {
            c.metrics_listen = "127.0.0.1:0".into();
            c.limits.submit_timeout_ms = 5000;
            tweak(c);
        },
    )?;
    let a = fed.op(A);
    let workers = [a.worker("sequencer")?, a.worker("fanout")?];
    let bridges = [a.worker("bridge")?, a.worker("bridge")?];
    let mut alice = a.client("alice", "phone", 2).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let g = alice.create_group("failover").await?;
    // A's bridges are processes of their own, started a moment ago.
    tests::add_when_reachable(&mut alice, &g, &[fed.op(B).user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    Ok(World { fed, bridges, _workers: workers, alice, bob, g })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bridge_hands_the_outbox_to_another() -> anyhow::Result<()> {
    let World { mut fed, mut bridges, _workers, mut alice, mut bob, g } = world(|_| {}).await?;

    let mut want = Vec::new();
    let mut last = 0;
    for i in 0..10 {
        let t = format!("before {i}");
        last = alice.send(&g, &t).await?;
        want.push(t);
    }
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    // Exactly one bridge has sent to B: it owns the outbox.
    let (s0, s1) = (sent(&bridges[0]).await, sent(&bridges[1]).await);
    anyhow::ensure!((s0 > 0.0) != (s1 > 0.0), "both or neither bridge sent to B: {s0} and {s1}");
    let (owner, standby) = if s0 > 0.0 { (0, 1) } else { (1, 0) };

    // The owner holds a batch it cannot hand over (B's server is down),
    // unacked, when it is killed; newer messages queue behind it.
    fed.nats_of(B).stop();
    for i in 0..10 {
        let t = format!("held by the owner {i}");
        alice.send(&g, &t).await?;
        want.push(t);
    }
    let failures = format!("mlsfed_federation_send_failures_total{{peer=\"{B}\"}}");
    let t0 = Instant::now();
    while try_metric(&bridges[owner], &failures).await.unwrap_or(0.0) < 1.0 {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "the owner never tried to send to the stopped peer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridges[owner].kill();
    let killed = Instant::now();
    for i in 0..10 {
        let t = format!("after the kill {i}");
        last = alice.send(&g, &t).await?;
        want.push(t);
    }
    fed.nats_of(B).restart()?;
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let failover = killed.elapsed();
    assert_eq!(texts(&bob, &g), want, "every message once, in order, at the peer");
    let ps = bob.positions(&g);
    assert!(ps.windows(2).all(|p| p[0] < p[1]), "{ps:?}");
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    assert!(sent(&bridges[standby]).await > 0.0, "the standby bridge never sent");
    eprintln!("bridge failover: the peer had every message {failover:?} after the owner was killed");
    Ok(())
}

/// A peer outage far longer than the failover time: the bridge holding the
/// batch keeps pulling, so the outbox stays with it and the standby never
/// sends newer records past the held ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_keeps_the_outbox_with_its_owner() -> anyhow::Result<()> {
    let World { mut fed, bridges, _workers, mut alice, mut bob, g } = world(|c| {
        c.federation.backoff_initial_ms = 200;
        c.federation.backoff_max_ms = 1000;
    })
    .await?;
    fed.nats_of(B).stop();
    let mut want = Vec::new();
    for i in 0..5 {
        let t = format!("early in the outage {i}");
        alice.send(&g, &t).await?;
        want.push(t);
    }
    // Failover is 3 s here: let the outage run well past three of them,
    // measured by the owner's failed sends (backoff at most 1 s).
    let failures = format!("mlsfed_federation_send_failures_total{{peer=\"{B}\"}}");
    let t0 = Instant::now();
    loop {
        let f = sent_or(&bridges[0], &failures).await + sent_or(&bridges[1], &failures).await;
        if f >= 8.0 {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "only {f} failed sends to the stopped peer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last = 0;
    for i in 0..5 {
        let t = format!("late in the outage {i}");
        last = alice.send(&g, &t).await?;
        want.push(t);
    }
    fed.nats_of(B).restart()?;
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    assert_eq!(texts(&bob, &g), want, "every message once, in order, at the peer");
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    Ok(())
}

async fn sent_or(bridge: &Operator, metric: &str) -> f64 {
    try_metric(bridge, metric).await.unwrap_or(0.0)
}

/// The receiving side: B runs two bridges, and the one applying A's
/// envelopes freezes (SIGSTOP) holding what it was handed, then dies. The
/// other takes B's inbox over and gets newer envelopes at once, but applies
/// none of them before the dead one's come back to it: otherwise B's mark
/// for A would pass them, and they would be dropped as replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bridge_hands_the_inbox_to_another() -> anyhow::Result<()> {
    let received = format!("mlsfed_federation_received_total{{peer=\"{A}\"}}");
    let mut fed = Federation::start_roles(
        &[A, B],
        |_| "ingest",
        |_, c| {
            c.metrics_listen = "127.0.0.1:0".into();
            c.limits.submit_timeout_ms = 5000;
        },
    )?;
    let b_nats = tests::nats_connect(&fed.nats_of(B).url()).await?;
    let (a, b) = (fed.op(A), fed.op(B));
    let _workers =
        [a.worker("sequencer")?, a.worker("fanout")?, a.worker("bridge")?, b.worker("sequencer")?, b.worker("fanout")?];
    let mut inbox = [b.worker("bridge")?, b.worker("bridge")?];
    let mut alice = a.client("alice", "phone", 2).await?;
    let mut bob = b.client("bob", "phone", 2).await?;
    let g = alice.create_group("inbox-failover").await?;
    // Both operators' bridges are processes of their own, started a moment ago.
    tests::add_when_reachable(&mut alice, &g, &[b.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    let mut want = Vec::new();
    let mut last = 0;
    for i in 0..5 {
        let t = format!("before {i}");
        last = alice.send(&g, &t).await?;
        want.push(t);
    }
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let r0 = try_metric(&inbox[0], &received).await.unwrap_or(0.0);
    let r1 = try_metric(&inbox[1], &received).await.unwrap_or(0.0);
    anyhow::ensure!((r0 > 0.0) != (r1 > 0.0), "both or neither of B's bridges applied A's envelopes: {r0} and {r1}");
    let (owner, standby) = if r0 > 0.0 { (0, 1) } else { (1, 0) };

    // Frozen, the owner still holds its pull requests for a moment: what A
    // sends now is handed to it and stays unacked.
    inbox[owner].signal("STOP")?;
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(1) {
        let t = format!("held by the frozen bridge {}", want.len());
        alice.send(&g, &t).await?;
        want.push(t);
    }
    // The frozen owner was handed envelopes it never acked: the standby
    // must wait for them.
    let fed_in = async_nats::jetstream::new(b_nats).get_stream(proto::names::fed_in_stream(A)).await?;
    let pending = fed_in.consumer_info(proto::names::bridge_in_consumer(A)).await?.num_ack_pending;
    anyhow::ensure!(pending > 0, "the frozen bridge held no envelope");
    inbox[owner].kill();
    // The standby gets these as soon as the inbox is pinned to it, seconds
    // before the dead bridge's come back after their ack wait.
    for i in 0..20 {
        let t = format!("after the kill {i}");
        last = alice.send(&g, &t).await?;
        want.push(t);
    }
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    assert_eq!(texts(&bob, &g), want, "every message once, in order, at the peer");
    let ps = bob.positions(&g);
    assert!(ps.windows(2).all(|p| p[0] < p[1]), "{ps:?}");
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    assert!(
        try_metric(&inbox[standby], &received).await.unwrap_or(0.0) > 0.0,
        "the standby bridge never applied an envelope"
    );
    Ok(())
}
