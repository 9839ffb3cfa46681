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
        let sender = tokio::spawn(async move {
            let mut out = Vec::new();
            for (text, body) in bodies {
                out.push((text, http.submit(body, None).await.is_ok()));
            }
            out
        });
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
    // Whatever else arrives late (cut-off submissions) arrives within ack_wait.
    tokio::time::sleep(Duration::from_secs(6)).await;
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
