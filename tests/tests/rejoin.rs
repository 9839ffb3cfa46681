//! Members get back into their groups without anyone's help (RFC 9420
//! §12.4.3.2): after a Commit the hub accepted but no member can process,
//! and after their operator was cut off from the hub longer than the
//! outbox retention. Each rejoins by external commit from the GroupInfo the
//! hub keeps, and the group carries on.

use std::time::Duration;

use tests::client::Event;
use tests::proto::names;
use tests::{metric, nats_connect, raw, sync_until, wait_metric, Client, Federation};

const A: &str = "a.example";
const B: &str = "b.example";

/// Whether every client is at the same epoch with the same epoch
/// authenticator (they derived the same key schedule) in `g`.
fn converged(clients: &[&Client], g: &str) -> bool {
    let first = clients[0].epoch_authenticator(g);
    first.is_some() && clients.iter().all(|c| c.epoch_authenticator(g) == first && c.epoch(g) == clients[0].epoch(g))
}

fn rejoined(c: &Client, g: &str) -> bool {
    c.events().iter().any(|e| matches!(e, Event::Rejoined { group, .. } if group == g))
}

fn has_message(c: &Client, g: &str, text: &str) -> bool {
    c.messages(g).iter().any(|(_, _, t)| t == text)
}

/// The hub cannot check a Commit's membership tag (it holds no epoch
/// secrets, RFC 9420 §6.2), so a Commit with one flipped bit in it is
/// accepted, and every other member fails to process it. Before, the group
/// was stuck: the next sender gave up after repeated `wrong_epoch`. Now
/// each member reports the Commit, rejoins by external commit from the
/// GroupInfo the committer uploaded with it, and the group converges and
/// talks again, across two operators. (A flipped confirmation tag no longer
/// gets in: it must equal the GroupInfo's copy; see bad_input.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_no_member_can_process_is_healed_by_rejoining() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B], |_, _| {})?;
    let mut alice = fed.op(A).client("alice", "phone", 2).await?;
    let mut bob = fed.op(A).client("bob", "phone", 2).await?;
    let mut carol = fed.op(B).client("carol", "phone", 2).await?;
    let g = alice.create_group("wedged").await?;
    alice.add(&g, &[fed.op(A).user_id("bob"), fed.op(B).user_id("carol")]).await?;
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    alice.send(&g, "before").await?;
    sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(30), |c| has_message(c, &g, "before")).await?;

    // Bob's client is broken: its Commit's membership tag has one bit
    // flipped (the 32-byte MAC that ends a member's PublicMessage).
    let mut body = bob.prepare_update(&g)?;
    let commit_len = raw::first_len(&body);
    body[commit_len - 8] ^= 0x01;
    let bad = bob.submit_pending(&g, body).await?;

    // Alice's next message finds the group past an epoch she cannot reach:
    // she reports the Commit, rejoins, and sends in the new epoch.
    if let Err(e) = alice.send(&g, "after").await {
        let events = alice.sync().await?;
        anyhow::bail!("alice cannot send after the bad Commit: {e}; events: {events:?}");
    }
    alice.sync().await?;
    assert!(rejoined(&alice, &g), "alice did not rejoin: {:?}", alice.events());
    assert!(
        alice.failures().iter().any(|e| matches!(e, Event::Failed { position, .. } if *position == bad.position)),
        "alice did not fail on the bad Commit: {:?}",
        alice.events()
    );
    // Carol, on the other operator, finds out when she sends: she rejoins
    // through her operator, which asks the hub for the GroupInfo. Bob's
    // client finds out too, whatever it made of its own Commit.
    carol.send(&g, "carol is back").await?;
    bob.send(&g, "bob is back").await?;
    // Each rejoined on its first send; what was sent before a member's
    // rejoin is not readable to it. From here on, everyone hears everyone.
    alice.send(&g, "alice again").await?;
    carol.send(&g, "carol again").await?;
    bob.send(&g, "bob again").await?;
    let heard = sync_until(&mut [&mut alice, &mut bob, &mut carol], Duration::from_secs(60), |c| {
        ["alice again", "carol again", "bob again"].iter().all(|t| has_message(c, &g, t))
    })
    .await;
    if let Err(e) = heard {
        anyhow::bail!("{e}\nalice: {:?}\nbob: {:?}\ncarol: {:?}", alice.events(), bob.events(), carol.events());
    }
    assert!(converged(&[&alice, &bob, &carol], &g), "members did not converge");
    assert!(rejoined(&carol, &g), "carol did not rejoin: {:?}", carol.events());
    // Both reports reached the hub: alice's locally, carol's through B.
    wait_metric(fed.op(A), "mlsfed_group_commit_reports_total{via=\"local\"}", Duration::from_secs(10), |v| v >= 1.0)
        .await?;
    wait_metric(fed.op(A), "mlsfed_group_commit_reports_total{via=\"peer\"}", Duration::from_secs(10), |v| v >= 1.0)
        .await?;
    // Every device applied the group's entries in order, once.
    for c in [&alice, &bob, &carol] {
        let p = c.positions(&g);
        assert!(p.windows(2).all(|w| w[0] < w[1]), "out of order or twice: {p:?}");
    }
    Ok(())
}

/// A peer away longer than the outbox retention is marked for resync, and
/// its members find the entries they missed gone: they rejoin from the
/// hub's GroupInfo (through their own operator) and talk again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_peer_beyond_retention_rejoin() -> anyhow::Result<()> {
    let mut fed = Federation::start(&[A, B], |d, c| {
        if d == A {
            c.federation.outbox_max_age_secs = 3;
        }
    })?;
    let mut alice = fed.op(A).client("alice", "phone", 1).await?;
    let mut carol = fed.op(B).client("carol", "phone", 2).await?;
    let g = alice.create_group("resync").await?;
    alice.add(&g, &[fed.op(B).user_id("carol")]).await?;
    sync_until(&mut [&mut carol], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let gauge = "mlsfed_federation_peer_needs_resync{peer=\"b.example\"}";
    assert_eq!(metric(fed.op(A), gauge).await, 0.0);
    fed.nats_of(B).stop();
    alice.send(&g, "into the void").await?;
    wait_metric(fed.op(A), gauge, Duration::from_secs(10), |v| v == 1.0).await?;
    // The bridge still holds the record in memory; once it is past the
    // retention in the outbox, a restart of the hub loses it for good.
    let js = async_nats::jetstream::new(nats_connect(&fed.nats_of(A).url()).await?);
    let mut outbox = js.get_stream(names::FED_OUT_STREAM).await?;
    let mut expired = false;
    for _ in 0..100 {
        if outbox.info().await?.state.messages == 0 {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the outbox record did not expire");
    fed.ops.iter_mut().find(|o| o.domain == A).expect("A").restart()?;
    alice.reconnect(&fed.op(A).url.clone())?;
    fed.nats_of(B).restart()?;
    alice.send(&g, "after the outage").await?;
    // Carol reads on: the entry she missed is gone (history_expired), so
    // she rejoins, then speaks in the new epoch.
    if let Err(e) = sync_until(&mut [&mut carol], Duration::from_secs(60), |c| rejoined(c, &g)).await {
        anyhow::bail!("{e}\ncarol: {:?}", carol.events());
    }
    assert!(!has_message(&carol, &g, "into the void"), "an expired entry was delivered");
    // B's fanout delivered past the hole instead of waiting for it forever.
    wait_metric(fed.op(B), "mlsfed_fanout_lost_predecessors_total", Duration::from_secs(10), |v| v >= 1.0).await?;
    carol.send(&g, "carol is back").await?;
    alice.send(&g, "welcome back").await?;
    let heard = sync_until(&mut [&mut alice, &mut carol], Duration::from_secs(30), |c| {
        has_message(c, &g, "carol is back") && has_message(c, &g, "welcome back")
    })
    .await;
    if let Err(e) = heard {
        anyhow::bail!("{e}\nalice: {:?}\ncarol: {:?}", alice.events(), carol.events());
    }
    assert!(converged(&[&alice, &carol], &g), "alice and carol did not converge");
    Ok(())
}

/// A rejoin keeps the device's signature key, the one its operator vouches
/// for: with only the device's bearer token, someone else cannot swap in a
/// leaf with a key of their own (and read the group from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_with_another_key_is_refused() -> anyhow::Result<()> {
    let fed = Federation::start(&[A], |_, _| {})?;
    let op = fed.op(A);
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("keys").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let token = op.token(bob.id());
    let path = format!("/v1/groups/{}/group_info", tests::client::http::encode_segment(&g));
    let (status, info) = tests::get(&op.url, &path, Some(&token)).await;
    assert_eq!(status, 200, "{info}");
    use base64::Engine as _;
    let gi = base64::engine::general_purpose::STANDARD.decode(info["group_info"].as_str().unwrap_or_default())?;
    // Bob's identity, a stranger's key. (openmls removes the old leaf only
    // when the key matches, so this Commit is refused for keeping Bob's old
    // leaf; one built by hand to remove it meets the same-key rule.)
    let thief = raw::Local::new(bob.id().as_str());
    let (status, body) = tests::post(&op.url, "/v1/messages", Some(&token), thief.external_commit(&gi)).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("invalid_commit")), "{body}");
    // Bob himself still can: the group is not harmed.
    bob.rejoin(&g).await?;
    bob.send(&g, "still me").await?;
    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| has_message(c, &g, "still me")).await?;
    Ok(())
}
