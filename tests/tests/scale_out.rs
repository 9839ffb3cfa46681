//! Horizontal workers: one ingest, two sequencer and two fanout processes on
//! one NATS server, under concurrent load from several senders: no
//! duplicate, no reordering, nothing lost.

use std::time::Duration;

use tests::{settle, sync_until, NatsServer, Operator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequencers_two_fanouts_keep_order() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let front = Operator::start_with(&nats, "a.example", "ingest", |c| c.metrics_listen = "127.0.0.1:0".into())?;
    let _workers =
        [front.worker("sequencer")?, front.worker("sequencer")?, front.worker("fanout")?, front.worker("fanout")?];
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
                async move { http.submit(b, None).await }
            }))
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
        }));
    }
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
    // Each worker process serves its own metrics; together the two
    // sequencers accepted every submission.
    let accepted = tests::metric(&_workers[0], "mlsfed_sequencer_accepted_total").await
        + tests::metric(&_workers[1], "mlsfed_sequencer_accepted_total").await;
    assert!(accepted >= 124.0, "sequencers accepted {accepted}");
    let fanned = tests::metric(&_workers[2], "mlsfed_fanout_entries_total").await
        + tests::metric(&_workers[3], "mlsfed_fanout_entries_total").await;
    assert!(fanned >= 124.0, "fanout workers delivered {fanned} entries");
    Ok(())
}
