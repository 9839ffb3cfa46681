//! `mlsfed admin ...` against live operators, over their NATS only: peers
//! (list, show, pause, resume, reset-backoff, marks), groups show,
//! streams, and dead letters (list, requeue, purge).

use std::time::Duration;

use serde_json::{json, Value};
use tests::proto::wire::{EntryKind, LogEntry};
use tests::proto::{names, GroupId};
use tests::{sync_until, wait_metric, Federation, NatsServer, Operator};

const A: &str = "a.example";
const B: &str = "b.example";

/// `mlsfed admin <args> --json`, one object per line.
fn admin_json(op: &Operator, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = op.admin(&all)?;
    out.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// The one object a command printed.
fn admin_one(op: &Operator, args: &[&str]) -> anyhow::Result<Value> {
    let mut rows = admin_json(op, args)?;
    anyhow::ensure!(rows.len() == 1, "{args:?} printed {rows:?}");
    Ok(rows.remove(0))
}

/// Polls `admin peers show <peer>` until `done` holds (bounded); returns it.
async fn wait_peer(op: &Operator, peer: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = admin_one(op, &["peers", "show", peer])?;
        if done(&v) {
            return Ok(v);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "peer {peer} at {} is still {v}", op.domain);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn depth(v: &Value) -> u64 {
    v["outbox_depth"].as_u64().unwrap_or_default()
}

/// A paused peer's outbox holds what is queued for it (nothing is sent,
/// nothing is lost); resumed, it delivers. `peers list/show` report the
/// depth, the state and the marks all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_peer_gets_nothing_until_resumed() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B], |_, _| {})?;
    let (a, b) = (fed.op(A), fed.op(B));
    let mut alice = a.client("alice", "phone", 2).await?;
    let mut bob = b.client("bob", "phone", 2).await?;
    let g = alice.create_group("paused").await?;
    alice.add(&g, &[b.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    // Running: the Welcome went out, nothing stays queued, B took A's envelopes.
    let idle = wait_peer(a, B, Duration::from_secs(30), |v| depth(v) == 0).await?;
    assert_eq!((idle["state"].as_str(), idle["paused"].as_bool()), (Some("idle"), Some(false)), "{idle}");
    let list = admin_json(a, &["peers", "list"])?;
    assert_eq!(list.iter().map(|r| r["peer"].as_str()).collect::<Vec<_>>(), [Some(B)], "{list:?}");
    let table = a.admin(&["admin", "peers", "list"])?;
    assert!(table.starts_with("PEER") && table.contains(B) && table.contains("idle"), "{table}");
    let at_b = admin_one(b, &["peers", "show", A])?;
    assert!(at_b["mark_seq"].as_u64() > Some(0), "B has no mark for A: {at_b}");
    let marks = admin_one(b, &["peers", "marks"])?;
    assert_eq!(marks["seq"], at_b["mark_seq"], "{marks}");

    // Paused (applied by A's bridge before the command returns).
    let paused = admin_one(a, &["peers", "pause", B])?;
    assert_eq!((paused["paused"].as_bool(), paused["applied"].as_bool()), (Some(true), Some(true)), "{paused}");
    let p = alice.send(&g, "held while paused").await?;
    let held = wait_peer(a, B, Duration::from_secs(30), |v| depth(v) > 0).await?;
    assert_eq!(held["state"], "paused", "{held}");
    // An absence has no event to wait for: for 2 s (many sync rounds, far
    // longer than a delivery takes when running), bob must not get the
    // message while A's outbox still holds it.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        bob.sync().await?;
        assert!(!bob.positions(&g).contains(&p), "bob got a message while B was paused");
        let v = admin_one(a, &["peers", "show", B])?;
        assert!(depth(&v) > 0 && v["state"] == "paused", "{v}");
    }

    // Resumed: the held message is delivered, and the outbox drains.
    let resumed = admin_one(a, &["peers", "resume", B])?;
    assert_eq!((resumed["paused"].as_bool(), resumed["applied"].as_bool()), (Some(false), Some(true)), "{resumed}");
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).contains(&p)).await?;
    assert_eq!(bob.messages(&g).last().map(|m| m.2.as_str()), Some("held while paused"));
    let drained = wait_peer(a, B, Duration::from_secs(30), |v| depth(v) == 0).await?;
    assert_eq!(drained["state"], "idle", "{drained}");
    assert!(alice.failures().is_empty() && bob.failures().is_empty());

    // The group as the hub sees it: one device here, one at B.
    let shown = admin_one(a, &["groups", "show", &g])?;
    assert_eq!(shown["members_by_domain"], json!({ A: 1, B: 1 }), "{shown}");
    Ok(())
}

/// An outbox backing off from an unreachable peer (here for 5 minutes)
/// retries at once after `reset-backoff`, and delivers once the peer is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_backoff_makes_a_backed_off_outbox_retry_at_once() -> anyhow::Result<()> {
    let mut fed = Federation::start(&[A, B], |d, c| {
        if d == A {
            c.federation.backoff_initial_ms = 300_000;
            c.federation.backoff_max_ms = 300_000;
        }
    })?;
    // A's own first capabilities request found B not started yet and backs
    // off; B's request to A is what agreed on a version at A.
    let compatible = format!("mlsfed_federation_peer_compatible{{peer=\"{B}\"}}");
    wait_metric(fed.op(A), &compatible, Duration::from_secs(30), |v| v == 1.0).await?;
    let mut alice = fed.op(A).client("alice", "phone", 2).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let g = alice.create_group("backoff").await?;
    alice.add(&g, &[fed.op(B).user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    // B goes away entirely (no contact from B wakes A's outbox either).
    fed.ops.iter_mut().find(|o| o.domain == B).expect("B").kill();
    fed.nats_of(B).stop();
    let p = alice.send(&g, "across the outage").await?;
    let failures = format!("mlsfed_federation_send_failures_total{{peer=\"{B}\"}}");
    let first = wait_metric(fed.op(A), &failures, Duration::from_secs(30), |v| v >= 1.0).await?;
    let reset = admin_one(fed.op(A), &["peers", "reset-backoff", B])?;
    assert_eq!((reset["backoff_resets"].as_u64(), reset["applied"].as_bool()), (Some(1), Some(true)), "{reset}");
    // Its next attempt comes now, not in 5 minutes (an attempt takes at most
    // the peer publish timeout, 5 s).
    wait_metric(fed.op(A), &failures, Duration::from_secs(20), |v| v > first).await?;
    let queued = admin_one(fed.op(A), &["peers", "show", B])?;
    assert!(depth(&queued) > 0 && queued["state"] == "queued", "{queued}");

    // B is back: what was queued arrives.
    fed.nats_of(B).restart()?;
    fed.ops.iter_mut().find(|o| o.domain == B).expect("B").restart()?;
    admin_one(fed.op(A), &["peers", "reset-backoff", B])?;
    bob.reconnect(&fed.op(B).url)?;
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).contains(&p)).await?;
    assert_eq!(bob.messages(&g).last().map(|m| m.2.as_str()), Some("across the outage"));
    Ok(())
}

/// `groups show`: hub, partition, position, epoch and member devices
/// counted by domain; never who the members are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_show_counts_member_devices_by_domain() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, A)?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob_phone = op.client("bob", "phone", 2).await?;
    let mut bob_laptop = op.client("bob", "laptop", 2).await?;
    let g = alice.create_group("counted").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob_phone, &mut bob_laptop], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let p = alice.send(&g, "hello").await?;

    let shown = admin_one(&op, &["groups", "show", &g])?;
    let partitions = tests::config::Config::default().streams.partitions;
    let want_partition = names::partition_of(&GroupId::parse(&g)?, partitions);
    assert_eq!(shown["hub"], A, "{shown}");
    assert_eq!(shown["partition"].as_u64(), Some(u64::from(want_partition)), "{shown}");
    assert_eq!(shown["position"].as_u64(), Some(p), "{shown}");
    assert_eq!(shown["epoch"].as_u64(), Some(1), "{shown}");
    assert_eq!(shown["member_devices"].as_u64(), Some(3), "{shown}");
    assert_eq!(shown["members_by_domain"], json!({ A: 3 }), "{shown}");
    let table = op.admin(&["admin", "groups", "show", &g])?;
    assert!(table.contains(&format!("a.example={}", 3)), "{table}");
    for out in [shown.to_string(), table] {
        for secret in ["alice", "bob", "phone", "laptop", "hello"] {
            assert!(!out.contains(secret), "groups show printed {secret:?}: {out}");
        }
    }
    let err = op.admin(&["admin", "groups", "show", "mimi://a.example/r/nowhere"]).expect_err("unknown group");
    assert!(err.to_string().contains("not known here"), "{err}");
    Ok(())
}

/// `streams`: every stream and bucket with what it holds, its limits and
/// its usage where it has a byte limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lists_contents_limits_and_usage() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    // A peer (never reachable) gives us an inbound stream with a byte limit.
    let op = Operator::start_with(&nats, A, "run", |c| {
        c.federation.inbox_max_bytes = 1 << 20;
        c.peers = vec![tests::config::Peer {
            domain: B.into(),
            nats_url: "nats://127.0.0.1:1".into(),
            nats_user: String::new(),
            nats_password: Default::default(),
            nats_ca_file: String::new(),
            public_key: tests::operator_public_key(B),
        }];
    })?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let g = alice.create_group("sized").await?;
    alice.send(&g, "one").await?;

    let rows = admin_json(&op, &["streams"])?;
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).cloned().unwrap_or(Value::Null);
    let cfg = tests::config::Config::default();
    let log = row(names::LOG_STREAM);
    assert_eq!(log["kind"], "stream", "{rows:?}");
    assert_eq!(log["messages"].as_u64(), Some(2), "{log}");
    assert!(log["bytes"].as_u64() > Some(0), "{log}");
    assert_eq!(log["max_age_secs"].as_u64(), Some(cfg.streams.log_max_age_secs), "{log}");
    assert_eq!((log["replicas"].as_u64(), log["max_bytes"].is_null(), log["usage"].is_null()), (Some(1), true, true));
    let rosters = row(names::ROSTERS_BUCKET);
    assert_eq!((rosters["kind"].as_str(), rosters["messages"].as_u64()), (Some("kv"), Some(1)), "{rosters}");
    assert_eq!(row(names::STATE_BUCKET)["kind"], "object", "{rows:?}");
    assert_eq!(row(names::DEAD_STREAM)["messages"].as_u64(), Some(0), "{rows:?}");
    let inbox = row(&names::fed_in_stream(B));
    assert_eq!(inbox["max_bytes"].as_i64(), Some(1 << 20), "{inbox}");
    let usage = inbox["usage"].as_f64().expect("usage where max_bytes is set");
    assert!((usage - inbox["bytes"].as_f64().unwrap_or(-1.0) / f64::from(1 << 20)).abs() < 1e-3, "{inbox}");
    assert!(rows.iter().all(|r| r["max_bytes"].is_null() == r["usage"].is_null()), "{rows:?}");
    let table = op.admin(&["admin", "streams"])?;
    assert!(table.starts_with("NAME") && table.contains(names::LOG_STREAM) && table.contains(names::ROSTERS_BUCKET));
    Ok(())
}

/// `dead list/requeue/purge` on a real dead letter: a LOG entry whose
/// predecessor never comes (fanout gives up after `max_deliver`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_and_purged() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, A, "run", |c| {
        c.streams.max_deliver = 3;
        c.streams.retry_base_ms = 50;
    })?;
    let group = GroupId::parse("mimi://a.example/r/orphan")?;
    let orphan = |position: u64| LogEntry {
        group: group.clone(),
        position,
        prev_position: position - 1,
        epoch: 1,
        kind: EntryKind::Application,
        sender: op.device_id("alice", "phone"),
        submission_id: format!("orphan-{position}"),
        message: b"orphan".to_vec(),
        removed: vec![],
        welcome: None,
        welcome_recipients: vec![],
    };
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let subject = names::log_subject(&group, tests::config::Config::default().streams.partitions);
    let log = js.get_stream(names::LOG_STREAM).await?;
    js.publish(subject.clone(), tests::proto::wire::encode(&orphan(5)).into()).await?.await?;
    let dead = "mlsfed_fanout_dead_letters_total{reason=\"predecessor_missing\"}";
    wait_metric(&op, dead, Duration::from_secs(30), |v| v == 1.0).await?;

    // Listed with where it came from and why, never with its payload.
    let letters = admin_json(&op, &["dead", "list"])?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!((l["role"].as_str(), l["reason"].as_str()), (Some("fanout"), Some("predecessor_missing")), "{l}");
    assert_eq!((l["stream"].as_str(), l["subject"].as_str()), (Some(names::LOG_STREAM), Some(subject.as_str())));
    assert_eq!(l["delivered"].as_u64(), Some(3), "{l}");
    assert!(l.get("payload").is_none(), "{l}");
    assert!(admin_json(&op, &["dead", "list", "--role", "sequencer"])?.is_empty());
    let table = op.admin(&["admin", "dead", "list", "--role", "fanout"])?;
    assert!(table.starts_with("SEQ") && table.contains("predecessor_missing"), "{table}");

    // Requeued: back in the LOG, the letter gone; fanout gives up on it
    // again after its bounded deliveries, as a new letter.
    let seq = l["seq"].as_u64().expect("seq");
    let before = log.get_info().await?.state.messages;
    let requeued = admin_one(&op, &["dead", "requeue", &seq.to_string()])?;
    assert_eq!(requeued["stream"], names::LOG_STREAM, "{requeued}");
    assert_eq!(log.get_info().await?.state.messages, before + 1);
    wait_metric(&op, dead, Duration::from_secs(30), |v| v == 2.0).await?;
    let again = admin_json(&op, &["dead", "list"])?;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0]["seq"], l["seq"]);
    assert_eq!(again[0]["stream_seq"], requeued["stream_seq"], "{again:?}");
    let err = op.admin(&["admin", "dead", "requeue", &seq.to_string()]).expect_err("requeued twice");
    assert!(err.to_string().contains("no dead letter"), "{err}");

    // Once the group's LOG holds a later position, the old entry is not put
    // back at its tail (the sequencer would take that for the group's
    // position): refused, and left where it is.
    js.publish(subject.clone(), tests::proto::wire::encode(&orphan(6)).into()).await?.await?;
    wait_metric(&op, dead, Duration::from_secs(30), |v| v == 3.0).await?;
    let five = again[0]["seq"].as_u64().expect("seq").to_string();
    let err = op.admin(&["admin", "dead", "requeue", &five]).expect_err("an old position at the tail");
    assert!(err.to_string().contains("later entries"), "{err}");
    assert_eq!(admin_json(&op, &["dead", "list", "--role", "fanout"])?.len(), 2);

    // Purged, by role.
    let none = admin_one(&op, &["dead", "purge", "--role", "sequencer"])?;
    assert_eq!(none["purged"].as_u64(), Some(0), "{none}");
    let purged = admin_one(&op, &["dead", "purge", "--role", "fanout"])?;
    assert_eq!(purged["purged"].as_u64(), Some(2), "{purged}");
    assert!(admin_json(&op, &["dead", "list"])?.is_empty());
    Ok(())
}
