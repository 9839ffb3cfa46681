//! Crash safety: an operator killed with SIGKILL after accepting messages
//! and before fanning them out loses nothing and duplicates nothing.

use std::time::Duration;

use tests::{settle, sync_until, NatsServer, Operator};

/// Without fanout, application messages are still read straight from the
/// group's LOG; a membership change waits for fanout (readers stop at the
/// Commit, the new member has no Welcome yet). Then SIGKILL, a restart with
/// every role, and each device has everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_before_fanout_survives_sigkill() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("crash").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    op.kill();

    // The same operator without its fanout role.
    let mut front = Operator::start_with(&nats, "a.example", "ingest", |_| {})?;
    let _seq = front.worker("sequencer")?;
    for c in [&mut alice, &mut bob] {
        c.reconnect(&front.url)?;
    }
    let mut carol = front.client("carol", "phone", 2).await?;
    let first = alice.send(&g, "read from the log").await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= first))
        .await?;
    alice.add(&g, &[op.user_id("carol")]).await?;
    let pos = alice.send(&g, "survives the crash").await?;
    bob.sync().await?;
    carol.sync().await?;
    assert!(
        bob.positions(&g).last().is_some_and(|p| *p < pos),
        "an entry after an unapplied membership change was readable"
    );
    assert!(!carol.groups().contains(&g), "a Welcome went out without fanout");
    front.kill();
    drop(_seq);

    // Restart everything; the accepted messages are delivered once.
    op.restart()?;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.reconnect(&op.url)?;
    }
    // The restarted fanout takes the killed one's partitions once its
    // membership expires; wait for the message, not for a quiet moment.
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= pos)
    })
    .await?;
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;
    let alice_id = op.device_id("alice", "phone").to_string();
    assert_eq!(
        bob.messages(&g),
        vec![
            (first, alice_id.clone(), "read from the log".to_string()),
            (pos, alice_id.clone(), "survives the crash".to_string())
        ]
    );
    assert_eq!(carol.messages(&g), vec![(pos, alice_id, "survives the crash".to_string())]);
    Ok(())
}

/// SIGKILL at a random moment while messages flow: every message whose
/// submit succeeded is delivered to every device once, in order; messages
/// whose submit was cut off are delivered at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_delivers_exactly_once() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let mut carol = op.client("carol", "phone", 2).await?;
    let g = alice.create_group("load").await?;
    alice.add(&g, &[op.user_id("bob"), op.user_id("carol")]).await?;
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;

    let mut accepted = Vec::new();
    let mut uncertain = Vec::new();
    for round in 0..3 {
        let http = alice.http().clone();
        let mut bodies = Vec::new();
        for i in 0..40 {
            let text = format!("r{round}m{i}");
            bodies.push((text.clone(), alice.encrypt_for_bench(&g, text.as_bytes())?));
        }
        // The kill lands while submissions are in flight: after the first
        // is accepted (however slow the machine), then a random moment.
        let first = std::sync::Arc::new(tokio::sync::Notify::new());
        let accepted_one = first.clone();
        let sender = tokio::spawn(async move {
            let mut out = Vec::new();
            for (text, body) in bodies {
                let ok = http.submit(body, None).await.is_ok();
                if ok {
                    accepted_one.notify_one();
                }
                out.push((text, ok));
            }
            out
        });
        let _ = tokio::time::timeout(Duration::from_secs(30), first.notified()).await;
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 60)).await;
        op.kill();
        for (text, ok) in sender.await? {
            if ok {
                accepted.push(text)
            } else {
                uncertain.push(text)
            }
        }
        op.restart()?;
        for c in [&mut alice, &mut bob, &mut carol] {
            c.reconnect(&op.url)?;
        }
    }
    // Redelivery (ack_wait 5 s in tests) finishes what the killed workers held.
    let n = accepted.len();
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| c.messages(&g).len() >= n).await?;
    // Cut-off submissions are still queued until redelivery decides them:
    // wait until SUBMIT (a work queue) holds nothing, not for a fixed time.
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let t0 = std::time::Instant::now();
    loop {
        let mut submit = js.get_stream(tests::proto::names::SUBMIT_STREAM).await?;
        if submit.info().await?.state.messages == 0 {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "submissions were never decided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;
    for c in [&bob, &carol] {
        assert!(c.failures().is_empty(), "{:?}", c.failures());
        let texts: Vec<String> = c.messages(&g).into_iter().map(|m| m.2).collect();
        let positions: Vec<u64> = c.messages(&g).into_iter().map(|m| m.0).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "order {positions:?}");
        let mut dedup = texts.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), texts.len(), "duplicates in {texts:?}");
        for t in &accepted {
            assert!(texts.contains(t), "accepted {t} missing on {}: got {texts:?}, uncertain {uncertain:?}", c.id());
        }
        for t in &texts {
            assert!(accepted.contains(t) || uncertain.contains(t), "unknown {t}");
        }
        assert!(c.failures().is_empty(), "{:?}", c.failures());
    }
    assert!(!accepted.is_empty());
    drop(op);
    Ok(())
}

/// A fanout frozen (SIGSTOP) while it holds the group's partition, another
/// taking over, nats-server SIGKILLed and restarted (it forgets what its
/// dedup window knew of anything no longer stored), then the frozen fanout
/// thawed with its stale state: every device still has each position once,
/// in order, and the member added meanwhile joined once. Positions come
/// from the group's LOG, so this holds by construction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_fanout_and_a_nats_restart_duplicate_nothing() -> anyhow::Result<()> {
    let mut nats = NatsServer::start()?;
    let metrics = |c: &mut tests::config::Config| c.metrics_listen = "127.0.0.1:0".into();
    let front = Operator::start_with(&nats, "a.example", "ingest", metrics)?;
    let _seq = front.worker("sequencer")?;
    let f1 = front.worker("fanout")?;
    tests::wait_metric(&f1, "mlsfed_fanout_partitions_owned", Duration::from_secs(30), |v| v > 0.0).await?;
    let mut alice = front.client("alice", "phone", 2).await?;
    let mut bob = front.client("bob", "phone", 2).await?;
    let mut carol = front.client("carol", "phone", 2).await?;
    let g = alice.create_group("frozen").await?;
    alice.add(&g, &[front.user_id("bob")]).await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send(&g, &format!("before {i}")).await?);
    }

    f1.signal("STOP")?;
    let f2 = front.worker("fanout")?;
    alice.add(&g, &[front.user_id("carol")]).await?;
    for i in 0..5 {
        sent.push(alice.send(&g, &format!("frozen {i}")).await?);
    }
    let last = *sent.last().unwrap_or(&0);
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= last)
    })
    .await?;
    tests::wait_metric(&f2, "mlsfed_fanout_partitions_owned", Duration::from_secs(30), |v| v > 0.0).await?;

    nats.stop();
    nats.restart()?;
    f1.signal("CONT")?;
    for i in 0..5 {
        let text = format!("after {i}");
        // The workers reconnect to the restarted server; a submit may meet
        // them still reconnecting.
        let mut tries = 0;
        loop {
            match alice.send(&g, &text).await {
                Ok(p) => {
                    sent.push(p);
                    break;
                }
                Err(e) if tries < 20 => {
                    tries += 1;
                    eprintln!("retrying after: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let last = *sent.last().unwrap_or(&0);
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= last)
    })
    .await?;
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;
    for (c, want) in [(&bob, 15usize), (&carol, 10)] {
        assert!(c.failures().is_empty(), "{:?}", c.failures());
        let positions = c.positions(&g);
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "order or a repeat: {positions:?}");
        assert_eq!(c.messages(&g).len(), want, "{:?}", c.messages(&g));
    }
    let joined = carol
        .events()
        .iter()
        .filter(|e| matches!(e, tests::client::Event::Joined { group, .. } if *group == g))
        .count();
    assert_eq!(joined, 1, "carol joined {joined} times");
    drop(f1);
    Ok(())
}
