//! Two Commits for the same epoch, submitted concurrently with random timing:
//! exactly one wins each time, the loser gets 409 `wrong_epoch` naming the
//! current epoch and the winning Commit, the loser's Welcome is never
//! delivered, and all devices converge.

use std::time::Duration;

use rand::Rng;
use tests::client::Event;
use tests::proto::ErrorCode;
use tests::{settle, NatsServer, Operator};

const ROUNDS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_wins_each_epoch() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let mut carol = op.client("carol", "phone", 2).await?;
    let g = alice.create_group("race").await?;
    alice.add(&g, &[op.user_id("bob"), op.user_id("carol")]).await?;
    settle(&mut [&mut alice, &mut bob, &mut carol]).await?;

    let mut rng = rand::thread_rng();
    let mut candidates = Vec::new();
    let mut losers = Vec::new();
    for round in 0..ROUNDS {
        let epoch = bob.epoch(&g).expect("bob is a member");
        assert_eq!(carol.epoch(&g), Some(epoch));
        // Every tenth round races two adds, so a losing Welcome exists.
        let (body_b, body_c) = if round % 10 == 0 {
            let x = op.client(&format!("x{round}"), "d", 1).await?;
            let y = op.client(&format!("y{round}"), "d", 1).await?;
            let kx = bob.claim(&[op.user_id(&format!("x{round}"))]).await?;
            let ky = carol.claim(&[op.user_id(&format!("y{round}"))]).await?;
            let b = bob.prepare_add(&g, &kx)?;
            let c = carol.prepare_add(&g, &ky)?;
            candidates.push((x, y));
            (b, c)
        } else {
            (bob.prepare_update(&g)?, carol.prepare_update(&g)?)
        };
        let (db, dc) = (rng.gen_range(0..4000u64), rng.gen_range(0..4000u64));
        let hb = bob.http().clone();
        let hc = carol.http().clone();
        let tb = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(db)).await;
            hb.submit(body_b, None).await
        });
        let tc = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(dc)).await;
            hc.submit(body_c, None).await
        });
        let (rb, rc) = (tb.await?, tc.await?);
        let (winner_pos, loser_err, bob_won) = match (rb, rc) {
            (Ok(a), Err(e)) => (a.position, e, true),
            (Err(e), Ok(a)) => (a.position, e, false),
            (b, c) => panic!("round {round}: expected exactly one winner, got {b:?} / {c:?}"),
        };
        let tests::client::ClientError::Api(e) = loser_err else { panic!("round {round}: {loser_err}") };
        assert_eq!(e.code, ErrorCode::WrongEpoch, "round {round}");
        assert_eq!(e.current_epoch, Some(epoch + 1), "round {round}");
        assert_eq!(e.winning_commit_position, Some(winner_pos), "round {round}");
        // The loser discards its pending Commit; everyone applies the winner.
        if bob_won {
            carol.discard_pending(&g)?;
        } else {
            bob.discard_pending(&g)?;
        }
        settle(&mut [&mut alice, &mut bob, &mut carol]).await?;
        let ea = alice.epoch_authenticator(&g);
        assert_eq!(alice.epoch(&g), Some(epoch + 1), "round {round}");
        assert_eq!(bob.epoch_authenticator(&g), ea, "round {round}");
        assert_eq!(carol.epoch_authenticator(&g), ea, "round {round}");
        if round % 10 == 0 {
            // Exactly one of the two candidates got a Welcome.
            let (mut x, mut y) = candidates.pop().expect("pushed above");
            // (Each candidate also gets a replenish notice: its only
            // one-time KeyPackage was claimed.)
            let joined = |ev: Vec<Event>| ev.iter().filter(|e| matches!(e, Event::Joined { .. })).count();
            let jx = joined(x.sync().await?);
            let jy = joined(y.sync().await?);
            assert_eq!((jx, jy), if bob_won { (1, 0) } else { (0, 1) }, "round {round}");
            losers.push(if bob_won { y } else { x });
        }
    }
    for c in [&alice, &bob, &carol] {
        assert!(c.failures().is_empty(), "{:?}", c.failures());
    }
    // The devices whose add lost never receive anything, even later.
    for l in losers.iter_mut() {
        assert!(l.sync().await?.iter().all(|e| matches!(e, Event::KeyPackagesLow { .. })));
        assert!(l.groups().is_empty());
    }
    Ok(())
}
