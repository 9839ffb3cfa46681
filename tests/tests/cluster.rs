//! mlsfed on a 3-node NATS cluster with R3 streams: each node in turn is
//! SIGKILLed under traffic and restarted, once while two members race
//! Commits. Nothing accepted is lost or delivered twice, every device sees
//! the group in one order, and no epoch has two Commits.

use std::time::Duration;

use tests::proto::names;
use tests::{sync_until, Client, NatsCluster, Operator};

const A: &str = "a.example";

/// Sends `text`; `Ok(true)` when accepted, `Ok(false)` when the answer was
/// lost to the outage (the message may or may not be in the group).
async fn send(c: &mut Client, g: &str, text: &str) -> anyhow::Result<bool> {
    match c.send(g, text).await {
        Ok(_) => Ok(true),
        Err(e) if e.code().is_some_and(|code| code.retryable()) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_nats_node_killed_under_traffic_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = NatsCluster::start(3)?;
    cluster.wait_ready(3).await?;
    let op = Operator::start_on(&cluster.url(), A, "run", |c| {
        c.streams.replicas = 3;
        c.limits.submit_timeout_ms = 5000;
    })?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let mut carol = op.client("carol", "phone", 2).await?;
    let g = alice.create_group("cluster").await?;
    alice.add(&g, &[op.user_id("bob"), op.user_id("carol")]).await?;
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| c.groups().contains(&g)).await?;

    let (mut accepted, mut uncertain) = (Vec::new(), Vec::new());
    let mut killed = Vec::new();
    for victim in 0..3 {
        for i in 0..4 {
            let t = format!("node {victim} up, {i}");
            if send(&mut alice, &g, &t).await? {
                accepted.push(t)
            } else {
                uncertain.push(t)
            }
        }
        cluster.nodes[victim].stop();
        killed.push(format!("nats node n{victim} (SIGKILL)"));
        for i in 0..4 {
            let t = format!("node {victim} down, {i}");
            if send(&mut alice, &g, &t).await? {
                accepted.push(t)
            } else {
                uncertain.push(t)
            }
        }
        if victim == 1 {
            // Two members race a Commit while a node is down: one wins the
            // epoch; the other is refused with wrong_epoch, and the SDK
            // rebuilds it on the next epoch. A fork would show below as
            // members in different epochs.
            sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |_| true).await?;
            let (b, c) = tokio::join!(bob.update(&g), carol.update(&g));
            for r in [b, c] {
                if let Err(e) = r {
                    anyhow::ensure!(e.code().is_some_and(|c| c.retryable()), "a Commit failed for good: {e}");
                }
            }
            killed.push("a Commit race during the outage".into());
        }
        cluster.nodes[victim].restart()?;
        cluster.wait_ready(3).await?;
    }
    // Once the cluster is whole again, a message goes through (the first
    // tries may still meet a stream electing its leader).
    let mut last = None;
    for attempt in 0..60 {
        let t = format!("all nodes back, try {attempt}");
        match alice.send(&g, &t).await {
            Ok(p) => {
                accepted.push(t);
                last = Some(p);
                break;
            }
            Err(e) if e.code().is_some_and(|c| c.retryable()) => {
                uncertain.push(t);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("no message accepted after every node came back"))?;
    sync_until(&mut [&mut alice, &mut bob, &mut carol], Duration::from_secs(90), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= last)
    })
    .await?;

    for c in [&alice, &bob, &carol] {
        let texts: Vec<String> = c.messages(&g).into_iter().map(|m| m.2).collect();
        // Accepted: each exactly once, in the order they were accepted.
        let got: Vec<&String> = texts.iter().filter(|t| accepted.contains(t)).collect();
        assert_eq!(
            got,
            accepted.iter().collect::<Vec<_>>(),
            "{}: accepted messages lost, doubled or reordered",
            c.id()
        );
        // Unanswered: at most once.
        for t in &uncertain {
            assert!(texts.iter().filter(|x| *x == t).count() <= 1, "{}: {t:?} delivered twice", c.id());
        }
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|p| p[0] < p[1]), "{}: {ps:?}", c.id());
        assert!(c.failures().is_empty(), "{}: {:?}", c.id(), c.failures());
    }
    // No epoch has two Commits in the LOG, the order of record.
    let js = async_nats::jetstream::new(tests::nats_connect(&cluster.nodes[0].url()).await?);
    let mut log = js.get_stream("MLSFED_LOG").await?;
    let end = log.info().await?.state.last_sequence;
    let mut commit_epochs = Vec::new();
    for seq in 1..=end {
        let Ok(m) = log.get_raw_message(seq).await else { continue };
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        if header(names::headers::KIND).as_deref() == Some("commit") {
            commit_epochs.push(header(names::headers::EPOCH).unwrap_or_default());
        }
    }
    let mut unique = commit_epochs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), commit_epochs.len(), "two Commits for one epoch: {commit_epochs:?}");
    // One epoch history: every member ends in the same epoch.
    assert_eq!(bob.epoch_authenticator(&g), alice.epoch_authenticator(&g));
    assert_eq!(carol.epoch_authenticator(&g), alice.epoch_authenticator(&g));
    eprintln!(
        "cluster kill report: killed {}; {} messages accepted, {} unanswered during outages, each delivered at most once",
        killed.join(", "),
        accepted.len(),
        uncertain.len()
    );
    Ok(())
}

/// `scripts/cluster --chaos`: the whole production shape (two federated
/// operators, each on a 3-node cluster with R3 streams and 2 ingest, 3
/// sequencer, 3 fanout and 2 bridge processes) under traffic, while one
/// process of each role at each operator, then a NATS node of each, is
/// SIGKILLed and started again, and two members race Commits during a node
/// outage. The command checks that nothing accepted was lost, doubled or
/// reordered at any member, that the members agree on one epoch, and that
/// no epoch has two Commits; it prints the kill report, shown here.
#[test]
fn every_role_and_a_nats_node_killed_on_the_cluster_topology_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new("timeout")
        .arg("420")
        .arg(tests::binary("mlsfed"))
        .args(["cluster", "--chaos", "--dir"])
        .arg(dir.path())
        .env_remove("MLSFED_NATS_URL")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("chaos OK"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let killed = stdout.lines().filter(|l| l.contains("(SIGKILL) under load")).count();
    assert_eq!(killed, 10, "{stdout}");
    eprintln!("{stdout}");
    Ok(())
}
