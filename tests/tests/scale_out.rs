//! Horizontal workers: one ingest, two sequencer and two fanout processes on
//! one NATS server, under concurrent load from several senders, and the
//! sequencer that owns the group's partition SIGKILLed mid-load: no
//! duplicate, no reordering, nothing lost, and every worker worked.

use std::time::Duration;

use tests::{settle, sync_until, NatsServer, Operator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequencers_two_fanouts_keep_order() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let front = Operator::start_with(&nats, "a.example", "ingest", |c| c.metrics_listen = "127.0.0.1:0".into())?;
    let mut workers =
        [front.worker("sequencer")?, front.worker("sequencer")?, front.worker("fanout")?, front.worker("fanout")?];
    tests::wait_partitions_split(&[&workers[0], &workers[1]], "sequencer", 16).await?;
    tests::wait_partitions_split(&[&workers[2], &workers[3]], "fanout", 16).await?;
    let mut alice = front.client("alice", "phone", 2).await?;
    let mut bob = front.client("bob", "phone", 2).await?;
    let mut carol = front.client("carol", "phone", 2).await?;
    let mut dave = front.client("dave", "phone", 2).await?;
    let g = alice.create_group("scale").await?;
    alice.add(&g, &[front.user_id("bob"), front.user_id("carol"), front.user_id("dave")]).await?;
    settle(&mut [&mut alice, &mut bob, &mut carol, &mut dave]).await?;

    // Three senders at once, 40 messages each, pre-encrypted and submitted
    // with 8 in flight per sender.
    let mut tasks = Vec::new();
    for (who, c) in [("a", &mut alice), ("b", &mut bob), ("c", &mut carol)] {
        let mut bodies = Vec::new();
        for i in 0..40 {
            let text = format!("{who}{i}");
            bodies.push(c.encrypt_for_bench(&g, text.as_bytes())?);
        }
        let http = c.http().clone();
        tasks.push(tokio::spawn(async move {
            use futures::StreamExt;
            futures::stream::iter(bodies.into_iter().map(|b| {
                let http = http.clone();
                async move {
                    // A submission queued while its partition fails over
                    // answers `timeout`; the same bytes again learn the
                    // verdict (docs/client-api.md).
                    let mut tries = 0;
                    loop {
                        match http.submit(b.clone(), None).await {
                            Err(e) if e.code().is_some_and(|c| c.retryable()) && tries < 10 => tries += 1,
                            other => break other,
                        }
                    }
                }
            }))
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
        }));
    }
    // Kill the sequencer that owns the group's partition while the load runs.
    let k = tests::proto::names::partition_of(&tests::proto::GroupId::parse(&g)?, 16);
    let label = format!("mlsfed_sequencer_partition_owned{{partition=\"{k}\"}}");
    let owner = if tests::try_metric(&workers[0], &label).await == Some(1.0) { 0 } else { 1 };
    assert_eq!(tests::metric(&workers[owner], &label).await, 1.0, "no sequencer owns partition {k}");
    let before_kill =
        tests::wait_metric(&workers[owner], "mlsfed_sequencer_accepted_total", Duration::from_secs(60), |v| v >= 20.0)
            .await?;
    workers[owner].kill();
    let mut accepted = 0;
    for t in tasks {
        for r in t.await? {
            r?;
            accepted += 1;
        }
    }
    assert_eq!(accepted, 120);
    // A commit in the middle of the traffic must be ordered too.
    dave.update(&g).await?;
    let last = alice.send(&g, "after the commit").await?;
    sync_until(&mut [&mut alice, &mut bob, &mut carol, &mut dave], Duration::from_secs(60), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= last)
    })
    .await?;

    let reference: Vec<(u64, String)> = dave.messages(&g).into_iter().map(|m| (m.0, m.2)).collect();
    assert_eq!(reference.len(), 121, "dave saw {} messages", reference.len());
    for c in [&alice, &bob, &carol, &dave] {
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|w| w[0] < w[1]), "{} out of order: {ps:?}", c.id());
        assert!(c.failures().is_empty(), "{:?}", c.failures());
        // Every device saw the same messages at the same positions. Own
        // messages come back as echoes; the pre-encrypted ones carry no
        // local plaintext, so only their position is compared.
        let mine: Vec<(u64, String)> = c.messages(&g).into_iter().map(|m| (m.0, m.2)).collect();
        assert_eq!(mine.len(), reference.len(), "{}", c.id());
        for ((p, t), (rp, rt)) in mine.iter().zip(&reference) {
            assert_eq!(p, rp, "{}", c.id());
            assert!(t.is_empty() || t == rt, "{}: {t} != {rt}", c.id());
        }
    }
    assert_eq!(alice.epoch_authenticator(&g), dave.epoch_authenticator(&g));
    // Each worker process serves its own metrics: the killed sequencer
    // worked before it died, the survivor took its partition over, and
    // both fanout workers delivered.
    let survivor = tests::metric(&workers[1 - owner], "mlsfed_sequencer_accepted_total").await;
    assert!(before_kill >= 20.0 && survivor >= 1.0, "sequencers accepted {before_kill} and {survivor}");
    // One group lives in one LOG partition, so one fanout worker carried
    // it; a second group in a partition of the other shows that one works
    // too.
    let k = tests::proto::names::partition_of(&tests::proto::GroupId::parse(&g)?, 16);
    let label = format!("mlsfed_fanout_partition_owned{{partition=\"{k}\"}}");
    let busy = if tests::try_metric(&workers[2], &label).await == Some(1.0) { 2 } else { 3 };
    let other = 5 - busy;
    let mut second = None;
    for i in 0..200 {
        let id = tests::proto::GroupId::parse(&format!("mimi://a.example/r/second{i}"))?;
        let k = tests::proto::names::partition_of(&id, 16);
        let label = format!("mlsfed_fanout_partition_owned{{partition=\"{k}\"}}");
        if tests::try_metric(&workers[other], &label).await == Some(1.0) {
            second = Some(format!("second{i}"));
            break;
        }
    }
    let room = second.ok_or_else(|| anyhow::anyhow!("no room in the other fanout's partitions"))?;
    let g2 = alice.create_group(&room).await?;
    alice.add(&g2, &[front.user_id("bob")]).await?;
    let p = alice.send(&g2, "through the other fanout").await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g2).last().is_some_and(|x| *x >= p)).await?;
    let fanned = [
        tests::metric(&workers[busy], "mlsfed_fanout_entries_total").await,
        tests::metric(&workers[other], "mlsfed_fanout_entries_total").await,
    ];
    assert!(fanned[0] >= 124.0, "the fanout of the busy group delivered {fanned:?} entries");
    assert!(fanned[1] >= 3.0, "the other fanout delivered {fanned:?} entries");
    Ok(())
}
