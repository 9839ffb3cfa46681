//! A busy group: its waiting application messages are appended to LOG in
//! atomic batches and fanned out with one cursor write per run, and every
//! member still gets every message once, in hub order, with positions that
//! leave no gap. A Commit in the middle of the traffic ends a batch and is
//! decided on its own.

use std::time::Duration;

use futures::StreamExt;
use tests::{settle, sync_until, NatsServer, Operator};

/// Submits `bodies` with `in_flight` at once; each answer with the index of
/// its body, in the order they came.
async fn submit_all(
    http: tests::client::Http,
    bodies: Vec<Vec<u8>>,
    in_flight: usize,
) -> Vec<(usize, Result<tests::client::Accepted, tests::client::ClientError>)> {
    futures::stream::iter(bodies.into_iter().enumerate().map(|(i, b)| {
        let http = http.clone();
        async move { (i, http.submit(b, None).await) }
    }))
    .buffer_unordered(in_flight)
    .collect()
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_groups_messages_go_in_batches_once_and_in_order() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let mut carol = op.client("carol", "phone", 2).await?;
    let g = alice.create_group("busy").await?;
    alice.add(&g, &[op.user_id("bob"), op.user_id("carol")]).await?;
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;

    // Two senders, 150 messages each, pre-encrypted and submitted with 48
    // in flight per sender: far more than one decision at a time, so the
    // group's submissions queue up behind each other.
    let mut tasks = Vec::new();
    for (who, c) in [("a", &mut alice), ("b", &mut bob)] {
        let bodies: Vec<Vec<u8>> =
            (0..150).map(|i| c.encrypt_for_bench(&g, format!("{who}{i}").as_bytes())).collect::<Result<_, _>>()?;
        tasks.push(tokio::spawn(submit_all(c.http().clone(), bodies, 48)));
    }
    // Which text each accepted position must hold.
    let mut sent: std::collections::BTreeMap<u64, String> = Default::default();
    for (who, t) in ["a", "b"].into_iter().zip(tasks) {
        for (i, r) in t.await? {
            sent.insert(r?.position, format!("{who}{i}"));
        }
    }
    let mut positions: Vec<u64> = sent.keys().copied().collect();
    // Every submission got a position of its own, and together they fill
    // the LOG after the group's first entries without a gap.
    positions.sort_unstable();
    let first = positions[0];
    assert_eq!(positions, (first..first + 300).collect::<Vec<_>>(), "positions are not one run");

    // A Commit while a third sender keeps going.
    let bodies: Vec<Vec<u8>> =
        (0..40).map(|i| carol.encrypt_for_bench(&g, format!("c{i}").as_bytes())).collect::<Result<_, _>>()?;
    let burst = tokio::spawn(submit_all(carol.http().clone(), bodies, 16));
    bob.update(&g).await?;
    let mut accepted = 0;
    let mut refused = 0;
    for (i, r) in burst.await? {
        match r {
            Ok(a) => {
                sent.insert(a.position, format!("c{i}"));
                accepted += 1;
            }
            // Sent in the epoch the Commit ended: refused, never reordered.
            Err(e) if e.code() == Some(tests::proto::ErrorCode::WrongEpoch) => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(accepted + refused, 40);
    let last = alice.send(&g, "after the commit").await?;
    sync_until(&mut [&mut alice, &mut bob, &mut carol], Duration::from_secs(60), |c| {
        c.positions(&g).last().is_some_and(|p| *p >= last)
    })
    .await?;

    // Every member saw the same messages at the same positions, each once
    // and in order.
    let reference: Vec<u64> = carol.messages(&g).iter().map(|m| m.0).collect();
    assert_eq!(reference.len(), 300 + accepted + 1, "carol saw {} messages", reference.len());
    for c in [&alice, &bob, &carol] {
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|w| w[0] < w[1]), "{} out of order or twice: {ps:?}", c.id());
        let mine: Vec<u64> = c.messages(&g).iter().map(|m| m.0).collect();
        assert_eq!(mine, reference, "{} saw other messages", c.id());
        assert!(c.failures().is_empty(), "{:?}", c.failures());
    }
    assert_eq!(alice.epoch_authenticator(&g), carol.epoch_authenticator(&g));
    // Each verdict named the position of its own message: what the other
    // members decrypted there is the text that was sent (a sender's own
    // pre-encrypted messages come back without plaintext).
    let mut checked = std::collections::BTreeSet::new();
    for c in [&alice, &bob, &carol] {
        for (p, _, text) in c.messages(&g) {
            if let (Some(want), false) = (sent.get(&p), text.is_empty()) {
                assert_eq!(&text, want, "{} at position {p}", c.id());
                checked.insert(p);
            }
        }
    }
    assert_eq!(checked.len(), sent.len(), "positions nobody could check");

    // And they did go in batches: more entries than appends.
    let entries = tests::metric(&op, "mlsfed_sequencer_append_entries_sum").await;
    let appends = tests::metric(&op, "mlsfed_sequencer_append_entries_count").await;
    assert!(entries > appends, "{entries} entries in {appends} appends: nothing was batched");
    // Fanout got through all of them too (members may read ahead of it).
    tests::wait_metric(&op, "mlsfed_fanout_entries_total", Duration::from_secs(30), |v| v >= entries).await?;
    Ok(())
}

/// More busy groups at once than the process may have atomic batches in
/// flight (here one): a run that finds none free is appended one entry at
/// a time instead of waiting its turn, and nothing is lost, doubled or
/// reordered either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_groups_beyond_the_batch_limit_are_appended_one_by_one() -> anyhow::Result<()> {
    const GROUPS: usize = 6;
    const EACH: usize = 60;
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.streams.max_batches_in_flight = 1)?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", GROUPS + 2).await?;
    let mut groups = Vec::new();
    for i in 0..GROUPS {
        let g = alice.create_group(&format!("busy{i}")).await?;
        alice.add(&g, &[op.user_id("bob")]).await?;
        groups.push(g);
    }
    settle(&mut [&mut alice, &mut bob]).await?;

    // Every group's messages at once, 24 in flight per group; again (at
    // most 20 rounds) until some run found the one batch in flight, which
    // takes two runs overlapping within a round trip: on two busy cores a
    // few rounds in a row can go without (5 rounds fell short twice in
    // about ten runs of the suite).
    let mut sent: Vec<std::collections::BTreeMap<u64, String>> = vec![Default::default(); GROUPS];
    for round in 0..20 {
        let mut tasks = Vec::new();
        for g in &groups {
            let bodies: Vec<Vec<u8>> = (0..EACH)
                .map(|i| alice.encrypt_for_bench(g, format!("r{round}m{i}").as_bytes()))
                .collect::<Result<_, _>>()?;
            tasks.push(tokio::spawn(submit_all(alice.http().clone(), bodies, 24)));
        }
        for (t, at) in tasks.into_iter().zip(&mut sent) {
            let mut this: std::collections::BTreeMap<u64, String> = Default::default();
            for (i, r) in t.await? {
                this.insert(r?.position, format!("r{round}m{i}"));
            }
            // This round's messages took the positions after the last
            // round's, without a gap.
            let first = at.keys().last().map_or_else(|| *this.keys().next().unwrap_or(&0), |p| p + 1);
            let positions: Vec<u64> = this.keys().copied().collect();
            assert_eq!(positions, (first..first + EACH as u64).collect::<Vec<_>>(), "a round is not one run");
            at.extend(this);
        }
        if tests::metric(&op, "mlsfed_sequencer_batches_busy_total").await > 0.0 {
            break;
        }
    }
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| {
        groups.iter().zip(&sent).all(|(g, at)| c.positions(g).last() >= at.keys().last())
    })
    .await?;
    for (g, at) in groups.iter().zip(&sent) {
        // Each message once, in order, and the text sent at each position.
        let got: Vec<(u64, String)> =
            bob.messages(g).into_iter().filter(|(p, _, _)| at.contains_key(p)).map(|(p, _, t)| (p, t)).collect();
        let want: Vec<(u64, String)> = at.iter().map(|(p, t)| (*p, t.clone())).collect();
        assert_eq!(got, want, "bob's messages in {g}");
    }
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    // Both ways of appending were taken.
    let busy = tests::metric(&op, "mlsfed_sequencer_batches_busy_total").await;
    assert!(busy > 0.0, "no run found the batch in flight: the one-by-one path went untested");
    let entries = tests::metric(&op, "mlsfed_sequencer_append_entries_sum").await;
    let appends = tests::metric(&op, "mlsfed_sequencer_append_entries_count").await;
    assert!(entries > appends, "{entries} entries in {appends} appends: nothing was batched");
    Ok(())
}
