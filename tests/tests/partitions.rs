//! Partitioned ordering: the server puts each group in the partition we
//! compute, sequencer processes split the partitions, and a dead sequencer
//! delays only the groups of the partitions it owned, until they fail over.

use std::time::Duration;

use tests::client::http::Http;
use tests::proto::{names, GroupId};
use tests::{sync_until, wait_metric, Client, NatsServer, Operator};

const PARTITIONS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_partitions_groups_as_we_compute() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let cfg = tests::config::Config {
        streams: tests::config::Streams { partitions: PARTITIONS, ..Default::default() },
        ..Default::default()
    };
    let topo = tests::proto::streams::ensure(&js, &cfg).await?;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64 {
        let g = GroupId::parse(&format!("mimi://a.example/r/room{i}"))?;
        js.publish(names::submit_subject(&g), "x".into()).await?.await?;
        let k = names::partition_of(&g, PARTITIONS);
        let stored = format!("{}.{}", names::submit_partition_filter(k).trim_end_matches(".*"), g.token());
        let msg = topo.submit.get_last_raw_message_by_subject(stored.as_str()).await;
        assert!(msg.is_ok(), "{g} is not in partition {k}: {msg:?}");
        seen.insert(k);
    }
    assert!(seen.len() > PARTITIONS as usize / 2, "64 groups fell in only {} partitions", seen.len());
    Ok(())
}

/// The partitions a sequencer process owns now.
async fn owned(op: &Operator) -> Vec<u32> {
    owned_by(op, "sequencer").await
}

/// The partitions a process of `role` (sequencer, fanout) owns now.
async fn owned_by(op: &Operator, role: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for k in 0..PARTITIONS {
        if tests::try_metric(op, &format!("mlsfed_{role}_partition_owned{{partition=\"{k}\"}}")).await == Some(1.0) {
            out.push(k);
        }
    }
    out
}

/// Submits `body`, resending the same bytes while the answer is retryable
/// (a `timeout` while a partition fails over): the API's way to learn the
/// verdict of a queued submission.
async fn submit(http: &Http, body: Vec<u8>) -> anyhow::Result<u64> {
    for _ in 0..10 {
        match http.submit(body.clone(), None).await {
            Ok(a) => return Ok(a.position),
            Err(e) if e.code().is_some_and(|c| c.retryable()) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("no verdict after 10 tries")
}

/// A group of alice and bob whose partition is owned by `owner`.
async fn group_owned_by(
    front: &Operator,
    alice: &mut Client,
    bob: &mut Client,
    owner: &[u32],
    tag: &str,
) -> anyhow::Result<String> {
    for i in 0..200 {
        let id = format!("mimi://a.example/r/{tag}{i}");
        if owner.contains(&names::partition_of(&GroupId::parse(&id)?, PARTITIONS)) {
            let g = alice.create_group(&format!("{tag}{i}")).await?;
            assert_eq!(g, id);
            alice.add(&g, &[front.user_id("bob")]).await?;
            sync_until(&mut [bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
            return Ok(g);
        }
    }
    anyhow::bail!("no room id fell in {owner:?}")
}

/// Two sequencers split the partitions. The one that owns group 1 is
/// SIGKILLed with a submission of group 1 waiting; group 2, owned by the
/// survivor, keeps flowing meanwhile; then group 1's partition fails over
/// and everything is delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sequencer_delays_only_its_own_partitions() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let metrics = |c: &mut tests::config::Config| c.metrics_listen = "127.0.0.1:0".into();
    let front = Operator::start_with(&nats, "a.example", "ingest", metrics)?;
    let _fanout = front.worker("fanout")?;
    let mut s1 = front.worker("sequencer")?;
    let s2 = front.worker("sequencer")?;
    // Both joined and split the partitions between them.
    tests::wait_partitions_split(&[&s1, &s2], "sequencer", PARTITIONS).await?;
    let (own1, own2) = (owned(&s1).await, owned(&s2).await);
    assert!(!own1.is_empty() && !own2.is_empty(), "{own1:?} / {own2:?}");
    assert_eq!(own1.len() + own2.len(), PARTITIONS as usize);

    let mut alice = front.client("alice", "phone", 4).await?;
    let mut bob = front.client("bob", "phone", 4).await?;
    let g1 = group_owned_by(&front, &mut alice, &mut bob, &own1, "one").await?;
    let g2 = group_owned_by(&front, &mut alice, &mut bob, &own2, "two").await?;
    for i in 0..5 {
        alice.send(&g1, &format!("g1 before {i}")).await?;
        alice.send(&g2, &format!("g2 before {i}")).await?;
    }

    // Pre-encrypted, so the submissions below are pure server work.
    let waiting = alice.encrypt_for_bench(&g1, b"g1 waits for failover")?;
    let flowing: Vec<Vec<u8>> =
        (0..5).map(|i| alice.encrypt_for_bench(&g2, format!("g2 flows {i}").as_bytes())).collect::<Result<_, _>>()?;
    s1.kill();
    let http = alice.http().clone();
    let g1_task = tokio::spawn(async move { submit(&http, waiting).await });
    for body in flowing {
        submit(alice.http(), body).await?;
    }
    assert!(!g1_task.is_finished(), "group 1 was decided before its partition could fail over");
    let p1 = g1_task.await??;
    wait_metric(&s2, "mlsfed_sequencer_partitions_owned", Duration::from_secs(30), |v| v == f64::from(PARTITIONS))
        .await?;
    let last1 = alice.send(&g1, "g1 after").await?;
    let last2 = alice.send(&g2, "g2 after").await?;
    assert!(last1 > p1);
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(60), |c| {
        c.positions(&g1).last().is_some_and(|p| *p >= last1) && c.positions(&g2).last().is_some_and(|p| *p >= last2)
    })
    .await?;
    for g in [&g1, &g2] {
        let ps = bob.positions(g);
        assert!(ps.windows(2).all(|w| w[0] < w[1]), "{g}: {ps:?}");
        let texts: Vec<String> = bob.messages(g).into_iter().map(|m| m.2).collect();
        let mut unique = texts.clone();
        unique.dedup();
        assert_eq!(unique, texts, "{g}: a message arrived twice");
    }
    let t1: Vec<String> = bob.messages(&g1).into_iter().map(|m| m.2).collect();
    assert_eq!(t1.len(), 7, "{t1:?}");
    assert_eq!(t1[5], "g1 waits for failover");
    let t2: Vec<String> = bob.messages(&g2).into_iter().map(|m| m.2).collect();
    assert_eq!(t2.len(), 11, "{t2:?}");
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    Ok(())
}

/// Two fanout workers split the LOG partitions, and the one that follows
/// group 1 is SIGKILLed. Messages never wait for fanout (devices read them
/// from the LOG), so both groups keep flowing; what waits is group 1's
/// membership change: its Welcome goes out only once the partition fails
/// over, while group 2's goes out at once. Nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fanout_delays_only_its_own_partitions() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let cfg = |c: &mut tests::config::Config| {
        c.metrics_listen = "127.0.0.1:0".into();
        // Long enough that "before the failover" is not a race.
        c.streams.partition_failover_secs = 10;
    };
    let front = Operator::start_with(&nats, "a.example", "ingest", cfg)?;
    let _sequencer = front.worker("sequencer")?;
    let mut f1 = front.worker("fanout")?;
    let f2 = front.worker("fanout")?;
    tests::wait_partitions_split(&[&f1, &f2], "fanout", PARTITIONS).await?;
    let (own1, own2) = (owned_by(&f1, "fanout").await, owned_by(&f2, "fanout").await);
    assert!(!own1.is_empty() && !own2.is_empty(), "{own1:?} / {own2:?}");
    assert_eq!(own1.len() + own2.len(), PARTITIONS as usize);

    let mut alice = front.client("alice", "phone", 4).await?;
    let mut bob = front.client("bob", "phone", 4).await?;
    let mut carol = front.client("carol", "phone", 4).await?;
    let g1 = group_owned_by(&front, &mut alice, &mut bob, &own1, "one").await?;
    let g2 = group_owned_by(&front, &mut alice, &mut bob, &own2, "two").await?;
    f1.kill();
    let p1 = alice.send(&g1, "g1 flows without its fanout").await?;
    let p2 = alice.send(&g2, "g2 flows").await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| {
        c.positions(&g1).last().is_some_and(|p| *p >= p1) && c.positions(&g2).last().is_some_and(|p| *p >= p2)
    })
    .await?;
    alice.add(&g1, &[front.user_id("carol")]).await?;
    alice.add(&g2, &[front.user_id("carol")]).await?;
    sync_until(&mut [&mut carol], Duration::from_secs(30), |c| c.groups().contains(&g2)).await?;
    assert!(
        tests::metric(&f2, "mlsfed_fanout_partitions_owned").await < f64::from(PARTITIONS),
        "the partition failed over too early for this test to show anything"
    );
    assert!(!carol.groups().contains(&g1), "group 1's Welcome went out before its partition could fail over");
    wait_metric(&f2, "mlsfed_fanout_partitions_owned", Duration::from_secs(30), |v| v == f64::from(PARTITIONS)).await?;
    sync_until(&mut [&mut carol], Duration::from_secs(30), |c| c.groups().contains(&g1)).await?;
    let last1 = alice.send(&g1, "g1 after").await?;
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(30), |c| {
        c.positions(&g1).last().is_some_and(|p| *p >= last1)
    })
    .await?;
    for g in [&g1, &g2] {
        let texts: Vec<String> = bob.messages(g).into_iter().map(|m| m.2).collect();
        let mut unique = texts.clone();
        unique.dedup();
        assert_eq!(unique, texts, "{g}: a message arrived twice");
    }
    assert_eq!(bob.messages(&g1).len(), 2);
    assert_eq!(carol.messages(&g1).into_iter().map(|m| m.2).collect::<Vec<_>>(), ["g1 after"]);
    assert!(bob.failures().is_empty() && carol.failures().is_empty(), "{:?} {:?}", bob.failures(), carol.failures());
    Ok(())
}

/// The groups a process caches are bounded: with room for two per
/// partition and one partition, messages to four groups in turn are all
/// decided, each new group making room by evicting an idle one at once
/// rather than after the (here: ten-minute) idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_groups_are_bounded_and_evicted_when_idle() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| {
        c.streams.partitions = 1;
        c.streams.max_groups_per_partition = 2;
        c.streams.group_idle_secs = 600;
    })?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let mut groups = Vec::new();
    for i in 0..4 {
        groups.push(alice.create_group(&format!("bounded{i}")).await?);
    }
    let t0 = std::time::Instant::now();
    let mut last = Vec::new();
    for round in 0..3 {
        for g in &groups {
            last.push((g.clone(), alice.send(g, &format!("round {round}")).await?));
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(60), "a new group waited for an idle one to time out");
    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| {
        last.iter().all(|(g, p)| c.positions(g).last().is_some_and(|x| x >= p))
    })
    .await?;
    for g in &groups {
        assert_eq!(alice.messages(g).len(), 3, "{g}: {:?}", alice.messages(g));
    }
    Ok(())
}
