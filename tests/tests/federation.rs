//! One group across three operators, each with its own nats-server: server
//! fan-out through the bridge, remote claims and identity checks, forged
//! envelopes, and a peer that goes away.

use std::time::Duration;

use futures::StreamExt as _;
use tests::proto::federation::{seal, Envelope, Payload, Response, RpcEnvelope};
use tests::proto::wire::Verdict;
use tests::{metric, operator_seed, sync_until, try_metric, Client, Federation};

const A: &str = "a.example";
const B: &str = "b.example";
const C: &str = "c.example";

struct World {
    fed: Federation,
    alice: Client,
    bob_phone: Client,
    bob_laptop: Client,
    carol: Client,
    group: String,
}

async fn world() -> anyhow::Result<World> {
    world_in(Federation::start(&[A, B, C], |_, c| c.limits.submit_timeout_ms = 5000)?).await
}

async fn world_in(fed: Federation) -> anyhow::Result<World> {
    let mut alice = fed.op(A).client("alice", "phone", 2).await?;
    let bob_phone = fed.op(B).client("bob", "phone", 2).await?;
    let bob_laptop = fed.op(B).client("bob", "laptop", 2).await?;
    let carol = fed.op(C).client("carol", "phone", 2).await?;
    let group = alice.create_group("fed").await?;
    // Claims and identity checks for B's and C's users go through A.
    alice.add(&group, &[fed.op(B).user_id("bob"), fed.op(C).user_id("carol")]).await?;
    Ok(World { fed, alice, bob_phone, bob_laptop, carol, group })
}

fn all(w: &mut World) -> [&mut Client; 4] {
    [&mut w.alice, &mut w.bob_phone, &mut w.bob_laptop, &mut w.carol]
}

fn texts(c: &Client, g: &str) -> Vec<String> {
    c.messages(g).into_iter().map(|m| m.2).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_operators_share_a_group() -> anyhow::Result<()> {
    let mut w = world().await?;
    let g = w.group.clone();
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    for c in all(&mut w) {
        assert!(c.failures().is_empty(), "{}: {:?}", c.id(), c.failures());
    }
    // Everyone talks; submissions from B and C are forwarded to the hub A.
    w.alice.send(&g, "hello from A").await?;
    w.bob_phone.send(&g, "bob phone on B").await?;
    w.carol.send(&g, "carol on C").await?;
    w.bob_laptop.send(&g, "bob laptop on B").await?;
    let last = w.alice.send(&g, "bye from A").await?;
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let want = ["hello from A", "bob phone on B", "carol on C", "bob laptop on B", "bye from A"];
    for c in all(&mut w) {
        assert_eq!(texts(c, &g), want, "{}", c.id());
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|p| p[0] < p[1]), "{}: {ps:?}", c.id());
        assert!(c.failures().is_empty(), "{}: {:?}", c.id(), c.failures());
    }
    // Each entry crossed each link once: A forwarded every entry from the
    // add onwards once to B (two devices) and once to C.
    let entries = (last - 1) as f64; // positions 2..=last
    assert_eq!(metric(w.fed.op(A), "mlsfed_fanout_forwarded_total").await, 2.0 * entries);
    assert_eq!(metric(w.fed.op(B), "mlsfed_federation_replays_total{peer=\"a.example\"}").await, 0.0);
    // All agree on the epoch.
    let ea = w.alice.epoch_authenticator(&g);
    for c in [&w.bob_phone, &w.bob_laptop, &w.carol] {
        assert_eq!(c.epoch_authenticator(&g), ea, "{}", c.id());
    }
    // A Commit from a follower is ordered by the hub too.
    w.carol.update(&g).await?;
    let p = w.bob_phone.send(&g, "after carol's update").await?;
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|x| *x >= p)).await?;
    let ea = w.alice.epoch_authenticator(&g);
    for c in all(&mut w) {
        assert_eq!(c.epoch_authenticator(&g), ea, "{}", c.id());
        assert_eq!(texts(c, &g).last().map(String::as_str), Some("after carol's update"), "{}", c.id());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_envelopes_are_refused_and_counted() -> anyhow::Result<()> {
    let mut w = world().await?;
    let g = w.group.clone();
    sync_until(&mut [&mut w.bob_phone, &mut w.carol], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let a_nats = tests::nats_connect(&w.fed.nats[0].url()).await?;
    let js = async_nats::jetstream::new(a_nats);
    let b_key = tests::proto::identity::operator_key(&operator_seed(B));
    let wrong_key = tests::proto::identity::operator_key(&[9; 32]);
    let b_js = async_nats::jetstream::new(tests::nats_connect(&w.fed.nats[1].url()).await?);
    let created = b_js.get_stream(tests::proto::names::FED_OUT_STREAM).await?.info().await?.created;
    let b_outbox = u64::try_from(created.unix_timestamp_nanos())?;
    let verdict = |seq: u64, origin: &str| Envelope {
        version: 1,
        origin: origin.into(),
        destination: A.into(),
        outbox: b_outbox,
        seq,
        payloads: vec![Payload::Verdict {
            submission_id: "forged".into(),
            verdict: Verdict::Accepted { position: 99, epoch: 9 },
        }],
    };
    let inbox = |origin: &str| tests::proto::names::fed_in_subject(origin);
    // 1. Bad signature: claims to be B, signed by someone else.
    js.publish(inbox(B), seal(&wrong_key, &verdict(1_000_000, B)).into()).await?.await?;
    // 2. Good signature from B, but a submission from a device of C.
    let bob_msg = w.bob_phone.encrypt_for_bench(&g, b"spoof")?;
    let sub = tests::proto::wire::Submission {
        id: "spoofed-sub".into(),
        device: w.fed.op(C).device_id("carol", "phone"),
        group: tests::proto::GroupId::parse(&g)?,
        kind: tests::proto::wire::SubmissionKind::Message { message: bob_msg, welcome: None, group_info: None },
        origin: None,
    };
    let spoof = Envelope {
        version: 1,
        origin: B.into(),
        destination: A.into(),
        outbox: b_outbox,
        seq: 1_000_001,
        payloads: vec![Payload::Submit(sub)],
    };
    js.publish(inbox(B), seal(&b_key, &spoof).into()).await?.await?;
    // 3. An origin that is not a peer (on B's subject: only our own account
    //    could publish on a subject of a domain we do not peer with, and no
    //    inbox consumer reads those).
    js.publish(inbox(B), seal(&wrong_key, &verdict(5, "z.example")).into()).await?.await?;
    // 4. A valid envelope whose record A applies (a submission of bob's
    //    into A's SUBMIT, which the sequencer then refuses as malformed),
    //    then its replay after the dedup window would have passed (a new
    //    Nats-Msg-Id, same envelope sequence).
    let bob = w.fed.op(B).device_id("bob", "phone");
    let junk = tests::proto::wire::Submission {
        // An id of the shape ours have: any other is refused outright.
        id: tests::proto::wire::submission_id(&bob, &[b"junk"]),
        device: bob,
        group: tests::proto::GroupId::parse(&g)?,
        kind: tests::proto::wire::SubmissionKind::Message {
            message: b"junk".to_vec(),
            welcome: None,
            group_info: None,
        },
        origin: None,
    };
    let applied = Envelope {
        version: 1,
        origin: B.into(),
        destination: A.into(),
        outbox: b_outbox,
        seq: 1_000_002,
        payloads: vec![Payload::Submit(junk)],
    };
    js.publish(inbox(B), seal(&b_key, &applied).into()).await?.await?;
    js.publish(inbox(B), seal(&b_key, &applied).into()).await?.await?;
    let a = w.fed.op(A);
    for _ in 0..100 {
        if try_metric(a, "mlsfed_federation_replays_total{peer=\"b.example\"}").await >= Some(1.0)
            && try_metric(a, "mlsfed_federation_refused_total{reason=\"unknown_peer\"}").await >= Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"bad_signature\"}").await, 1.0);
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"sender_not_origin\"}").await, 1.0);
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"unknown_peer\"}").await, 1.0);
    assert_eq!(metric(a, "mlsfed_federation_replays_total{peer=\"b.example\"}").await, 1.0);
    // Nothing forged reached anyone, and honest traffic still flows.
    let p = w.alice.send(&g, "still fine").await?;
    sync_until(&mut [&mut w.bob_phone, &mut w.carol], Duration::from_secs(30), |c| {
        c.positions(&g).last().is_some_and(|x| *x >= p)
    })
    .await?;
    for c in [&w.bob_phone, &w.carol] {
        assert_eq!(texts(c, &g), ["still fine"], "{}", c.id());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_while_the_peer_is_down_consumes_nothing() -> anyhow::Result<()> {
    let mut fed = Federation::start(&[A, C], |_, _| {})?;
    let mut alice = fed.op(A).client("alice", "phone", 1).await?;
    let carol = fed.op(C).client("carol", "phone", 3).await?;
    let stock = |op: &tests::Operator, c: &Client| {
        let (url, token) = (op.url.clone(), op.token(c.id()));
        async move {
            let (_, s) = tests::get(&url, "/v1/keypackages/stock", Some(&token)).await;
            s["stock"][0]["one_time"].as_u64().unwrap_or(999)
        }
    };
    assert_eq!(stock(fed.op(C), &carol).await, 3);
    fed.nats_of(C).stop();
    let err = alice.claim(&[fed.op(C).user_id("carol")]).await.expect_err("C is down");
    assert_eq!(err.code(), Some(tests::proto::ErrorCode::PeerUnreachable), "{err}");
    fed.nats_of(C).restart()?;
    // After C is back, the stock is untouched and a claim works.
    let mut ok = false;
    for _ in 0..60 {
        if stock(fed.op(C), &carol).await == 3 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ok, "carol's stock changed");
    // Wait until C answers A's requests again, then claim once.
    let path = format!("/v1/identity/{}", tests::client::http::encode_segment(carol.id().as_str()));
    let mut answered = false;
    for _ in 0..60 {
        if tests::get(&fed.op(A).url, &path, Some(&fed.op(A).token(alice.id()))).await.0 == 200 {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(answered, "C did not come back");
    let got = alice.claim(&[fed.op(C).user_id("carol")]).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(stock(fed.op(C), &carol).await, 2);
    drop(carol);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_from_two_followers() -> anyhow::Result<()> {
    let mut w = world().await?;
    let g = w.group.clone();
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    for round in 0..5 {
        let epoch = w.alice.epoch(&g);
        let (cb, cc) = (w.bob_phone.prepare_update(&g)?, w.carol.prepare_update(&g)?);
        let (hb, hc) = (w.bob_phone.http().clone(), w.carol.http().clone());
        let (rb, rc) = tokio::join!(hb.submit(cb, None), hc.submit(cc, None));
        let bob_won = match (&rb, &rc) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Some(tests::proto::ErrorCode::WrongEpoch), "round {round}: {e}");
                rb.is_ok()
            }
            _ => panic!("round {round}: expected exactly one winner: {rb:?} / {rc:?}"),
        };
        if bob_won {
            w.carol.discard_pending(&g)?
        } else {
            w.bob_phone.discard_pending(&g)?
        }
        let winner = rb.as_ref().or(rc.as_ref()).map(|a| a.position).unwrap_or_default();
        sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= winner))
            .await?;
        let ea = w.alice.epoch_authenticator(&g);
        assert_eq!(w.alice.epoch(&g), epoch.map(|e| e + 1), "round {round}");
        for c in all(&mut w) {
            assert_eq!(c.epoch_authenticator(&g), ea, "round {round}: {}", c.id());
            assert!(c.failures().is_empty(), "{}: {:?}", c.id(), c.failures());
        }
    }
    Ok(())
}

/// C's nats-server is down for a while during traffic that includes a
/// Commit: no sender notices, and when C is back its devices get everything
/// once and in order, and A's outbox to C drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outage_is_caught_up() -> anyhow::Result<()> {
    let mut w = world().await?;
    let g = w.group.clone();
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    w.fed.nats_of(C).stop();
    let mut want = Vec::new();
    for i in 0..5 {
        let t = format!("during outage {i}");
        w.alice.send(&g, &t).await?;
        want.push(t);
    }
    w.bob_phone.update(&g).await?;
    for i in 0..3 {
        let t = format!("bob after commit {i}");
        w.bob_phone.send(&g, &t).await?;
        want.push(t);
    }
    let last = w.alice.send(&g, "last").await?;
    want.push("last".into());
    assert!(metric(w.fed.op(A), "mlsfed_federation_outbox_pending{peer=\"c.example\"}").await >= 1.0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.fed.nats_of(C).restart()?;
    sync_until(&mut all(&mut w), Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    for c in all(&mut w) {
        assert_eq!(texts(c, &g), want, "{}", c.id());
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|p| p[0] < p[1]), "{}: {ps:?}", c.id());
        assert!(c.failures().is_empty(), "{}: {:?}", c.id(), c.failures());
    }
    assert_eq!(w.carol.epoch_authenticator(&g), w.alice.epoch_authenticator(&g));
    let mut drained = false;
    for _ in 0..40 {
        if metric(w.fed.op(A), "mlsfed_federation_outbox_pending{peer=\"c.example\"}").await == 0.0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(drained, "A's outbox to C did not drain");
    Ok(())
}

/// The hub is unreachable when a follower's device submits: the device gets
/// a retryable error, the submission stays queued, and it is delivered once
/// the hub is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_while_the_hub_is_down_is_queued_not_lost() -> anyhow::Result<()> {
    let mut w = world().await?;
    let g = w.group.clone();
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    w.fed.nats_of(A).stop();
    let err = w.bob_phone.send(&g, "while the hub is down").await.expect_err("no verdict without the hub");
    let code = err.code().expect("a typed error");
    assert!(code.retryable(), "{err}");
    w.fed.nats_of(A).restart()?;
    sync_until(&mut [&mut w.alice, &mut w.carol], Duration::from_secs(60), |c| {
        texts(c, &g).iter().any(|t| t == "while the hub is down")
    })
    .await?;
    for c in [&w.alice, &w.carol] {
        assert_eq!(texts(c, &g), ["while the hub is down"], "{}", c.id());
    }
    Ok(())
}

/// A peer's NATS user sees nothing of ours (design decision 5): subscribed
/// to everything it may subscribe to, through a whole three-operator
/// conversation with claims, identity lookups, forwarded submissions and a
/// Commit, it receives only the replies to its own requests: PubAcks of its
/// publishes into its inbound stream and our signed answers addressed to it.
/// With the peer in our own account, it would also receive the batches and
/// direct-get replies our consumers get on `_INBOX.*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_only_the_replies_to_its_own_requests() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B, C], |_, c| c.limits.submit_timeout_ms = 5000)?;
    // B's own credentials on A's server, as B's bridge uses them.
    let spy = tests::nats_connect(&fed.nats[0].peer_url(B)).await?;
    let mut replies = spy.subscribe("_INBOX.>").await?;
    // Refused by the user's permissions; anything it did receive is checked too.
    let mut everything = spy.subscribe(">").await?;
    spy.flush().await?;
    let mut w = world_in(fed).await?;
    let g = w.group.clone();
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    w.alice.send(&g, "from the hub").await?;
    w.bob_phone.send(&g, "forwarded by B").await?;
    w.carol.update(&g).await?;
    // B's bridge asks A: a claim of alice's KeyPackages and identity lookups.
    w.bob_laptop.claim(&[w.fed.op(A).user_id("alice")]).await?;
    let last = w.bob_laptop.send(&g, "after the claim").await?;
    sync_until(&mut all(&mut w), Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let keys: std::collections::HashMap<String, _> =
        [(A.to_owned(), tests::proto::identity::operator_key(&operator_seed(A)).verifying_key())].into();
    let (mut acks, mut answers) = (0, 0);
    loop {
        let next = tokio::select! {
            m = replies.next() => m,
            m = everything.next() => m,
            _ = tokio::time::sleep(Duration::from_secs(2)) => None,
        };
        let Some(m) = next else { break };
        if m.payload.is_empty() && m.status.is_some() {
            // A bare status (no responders, timeout) carries nothing of ours.
            continue;
        }
        if let Ok(ack) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
            let ours = tests::proto::names::fed_in_stream(B);
            assert_eq!(ack["stream"], ours.as_str(), "B received JSON that is not its PubAck: {ack}");
            acks += 1;
            continue;
        }
        type Answer = RpcEnvelope<Response>;
        match tests::proto::federation::open::<Answer, _>(&m.payload, &keys, B) {
            Ok(env) => {
                assert_eq!(env.origin, A);
                answers += 1;
            }
            Err(e) => {
                let head = &m.payload[..m.payload.len().min(64)];
                panic!("B received something that is not a reply to it on {}: {e}: {head:?}", m.subject);
            }
        }
    }
    assert!(acks > 0 && answers > 0, "the spy saw no replies at all ({acks} acks, {answers} answers)");
    Ok(())
}

/// The NATS permissions of docs/federation.md, as the tests run them: a
/// peer's user may write only its own inbound subject on our server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_write_only_its_own_inbox() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B, C], |_, _| {})?;
    let as_b = tests::nats_connect(&fed.nats[0].peer_url(B)).await?;
    let js = async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(as_b);
    // Its own inbox: accepted by JetStream (and then refused by A's bridge,
    // since it is not a sealed envelope).
    let own = js.publish(tests::proto::names::fed_in_subject(B), "not an envelope".into()).await?.await;
    assert!(own.is_ok(), "B could not write its own inbox on A: {own:?}");
    // C's inbox, A's own streams and A's JetStream API: refused by NATS.
    let impersonate = js.publish(tests::proto::names::fed_in_subject(C), "x".into()).await?.await;
    assert!(impersonate.is_err(), "B could write C's inbox on A");
    let submit = js.publish("mlsfed.submit.00", "x".into()).await?.await;
    assert!(submit.is_err(), "B could write A's SUBMIT");
    assert!(js.get_stream("MLSFED_LOG").await.is_err(), "B could read A's streams");
    let a = fed.op(A);
    for _ in 0..40 {
        if try_metric(a, "mlsfed_federation_refused_total{reason=\"malformed\"}").await >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"malformed\"}").await, 1.0);
    Ok(())
}

/// Peers with no federation version in common: a clear error and a metric,
/// and nothing is sent that the other side could not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_peers_get_a_clear_error() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, C], |d, c| {
        if d == C {
            c.federation.versions = vec![2];
        }
    })?;
    let mut alice = fed.op(A).client("alice", "phone", 1).await?;
    let _carol = fed.op(C).client("carol", "phone", 2).await?;
    let a = fed.op(A);
    let mut seen = false;
    for _ in 0..100 {
        // Present and 0 (an absent gauge would also read as 0).
        let text = reqwest::get(format!("{}/metrics", a.url)).await?.text().await?;
        if text.contains("mlsfed_federation_peer_compatible{peer=\"c.example\"} 0") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "A did not mark C incompatible");
    let err = alice.claim(&[fed.op(C).user_id("carol")]).await.expect_err("no common version");
    assert_eq!(err.code(), Some(tests::proto::ErrorCode::IncompatiblePeer), "{err}");
    Ok(())
}

/// docs/federation.md shows the NATS accounts exactly as the tests run them
/// (for the server of `a.example` peering with `b.example`).
#[test]
fn the_docs_show_the_nats_accounts_the_tests_use() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/federation.md")).expect("docs");
    let want = tests::federation_nats_config(&[B]);
    assert!(doc.contains(&want), "docs/federation.md lacks the accounts block the tests use:\n{want}");
}

/// One peer's poison never delays another. A corrupt record at the tail of
/// a B-hosted group's LOG here makes every Deliver B sends for that group
/// fail at A's inbox, delivery after delivery. A's inbox for C is another
/// stream with another consumer, so C's messages reach alice meanwhile;
/// B's envelope ends as a dead letter counted for B, not as a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peers_poison_never_delays_another() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B, C], |_, c| {
        c.limits.submit_timeout_ms = 5000;
        c.streams.max_deliver = 3;
        // Slow retries, so "meanwhile" is seconds long, not a race.
        c.streams.retry_base_ms = 3000;
    })?;
    let mut alice = fed.op(A).client("alice", "phone", 4).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let mut carol = fed.op(C).client("carol", "phone", 2).await?;
    let poisoned = bob.create_group("poisoned").await?;
    bob.add(&poisoned, &[fed.op(A).user_id("alice")]).await?;
    let healthy = carol.create_group("healthy").await?;
    carol.add(&healthy, &[fed.op(A).user_id("alice")]).await?;
    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| {
        c.groups().contains(&poisoned) && c.groups().contains(&healthy)
    })
    .await?;

    let js = async_nats::jetstream::new(tests::nats_connect(&fed.nats[0].url()).await?);
    let partitions = tests::config::Config::default().streams.partitions;
    let subject = tests::proto::names::log_subject(&tests::proto::GroupId::parse(&poisoned)?, partitions);
    js.publish(subject, b"not a record of ours".to_vec().into()).await?.await?;
    bob.send(&poisoned, "stuck behind the poison").await?;
    let b_dead = "mlsfed_federation_dead_letters_total{peer=\"b.example\"}";
    let p = carol.send(&healthy, "flows meanwhile").await?;
    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| c.positions(&healthy).last().is_some_and(|x| *x >= p))
        .await?;
    assert_eq!(
        try_metric(fed.op(A), b_dead).await.unwrap_or(0.0),
        0.0,
        "B's poison was already given up on: C's message did not arrive meanwhile"
    );
    assert!(!texts(&alice, &poisoned).iter().any(|t| t == "stuck behind the poison"));
    tests::wait_metric(fed.op(A), b_dead, Duration::from_secs(60), |v| v >= 1.0).await?;
    let c_dead = try_metric(fed.op(A), "mlsfed_federation_dead_letters_total{peer=\"c.example\"}").await;
    assert!(c_dead.is_none_or(|v| v == 0.0), "C's envelopes were dead-lettered too: {c_dead:?}");
    assert!(alice.failures().is_empty(), "{:?}", alice.failures());
    Ok(())
}

/// Envelopes that reach our inbox together are applied together, but a
/// group we cannot append to holds back only the envelope with its entries
/// (and what follows it), never one before it: the envelope before is
/// applied and acked, the poisoned one alone is dead-lettered after its
/// bounded tries, and the one after it is applied then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_group_dead_letters_only_its_own_envelope() -> anyhow::Result<()> {
    let b_dead = "mlsfed_federation_dead_letters_total{peer=\"b.example\"}";
    let mut fed = Federation::start_roles(
        &[A, B],
        |d| if d == A { "ingest" } else { "run" },
        |_, c| {
            c.metrics_listen = "127.0.0.1:0".into();
            c.limits.submit_timeout_ms = 5000;
            c.streams.max_deliver = 3;
            c.streams.retry_base_ms = 200;
        },
    )?;
    let a_nats = tests::nats_connect(&fed.nats_of(A).url()).await?;
    let a = fed.op(A);
    let _workers = [a.worker("sequencer")?, a.worker("fanout")?];
    let bridge = a.worker("bridge")?;
    let mut alice = a.client("alice", "phone", 4).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let healthy = bob.create_group("healthy").await?;
    // A's bridge is a process of its own, started a moment ago.
    tests::add_when_reachable(&mut bob, &healthy, &[a.user_id("alice")]).await?;
    let poisoned = bob.create_group("poisoned").await?;
    bob.add(&poisoned, &[a.user_id("alice")]).await?;
    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| {
        c.groups().contains(&healthy) && c.groups().contains(&poisoned)
    })
    .await?;

    // Our LOG's last entry of one group is unreadable: its entries from B
    // cannot be appended.
    let js = async_nats::jetstream::new(a_nats);
    let partitions = tests::config::Config::default().streams.partitions;
    let subject = tests::proto::names::log_subject(&tests::proto::GroupId::parse(&poisoned)?, partitions);
    js.publish(subject, b"not a record of ours".to_vec().into()).await?.await?;

    // Three envelopes wait in our inbox while the bridge is frozen, then
    // come to it at once.
    bridge.signal("STOP")?;
    bob.send(&healthy, "before the poison").await?;
    bob.send(&poisoned, "poisoned").await?;
    let last = bob.send(&healthy, "after the poison").await?;
    bridge.signal("CONT")?;

    sync_until(&mut [&mut alice], Duration::from_secs(30), |c| {
        c.positions(&healthy).last().is_some_and(|p| *p >= last)
    })
    .await?;
    tests::wait_metric(&bridge, b_dead, Duration::from_secs(60), |v| v >= 1.0).await?;
    // Everything from B is settled: nothing is left to dead-letter later.
    let fed_in = js.get_stream(tests::proto::names::fed_in_stream(B)).await?;
    let t0 = std::time::Instant::now();
    loop {
        let c = fed_in.consumer_info(tests::proto::names::bridge_in_consumer(B)).await?;
        if c.num_pending == 0 && c.num_ack_pending == 0 {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "B's envelopes never settled: {c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&bridge, b_dead).await, 1.0, "only the poisoned envelope is dead-lettered");
    assert_eq!(texts(&alice, &healthy), ["before the poison", "after the poison"]);
    assert!(texts(&alice, &poisoned).is_empty());
    Ok(())
}

/// A record larger than a peer's NATS takes (its `max_payload`) can never
/// be sent: it is set aside (dead-lettered and counted) instead of holding
/// everything after it for that peer for good, and what follows it still
/// reaches the peer, whose members' group then goes on past the hole. One
/// too large to copy into a dead letter (base64 in JSON is a third larger)
/// is set aside all the same, the letter without its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_a_peer_is_set_aside_and_the_link_goes_on() -> anyhow::Result<()> {
    let small = |d: &str| if d == B { "max_payload: 307200".to_owned() } else { String::new() };
    let fed = Federation::start_with_nats(&[A, B], |_| "run", small, |_, _| {})?;
    let mut alice = fed.op(A).client("alice", "phone", 2).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let g = alice.create_group("room").await?;
    alice.add(&g, &[fed.op(B).user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    // A takes both (A's limit is NATS' default less the headroom); B's
    // server takes neither, and the second does not fit in a dead letter
    // on A's server with its copy.
    alice.send(&g, &"x".repeat(400_000)).await?;
    alice.send(&g, &"y".repeat(900_000)).await?;
    alice.send(&g, "after").await?;
    let dead = format!("mlsfed_federation_dead_letters_total{{peer=\"{B}\"}}");
    tests::wait_metric(fed.op(A), &dead, Duration::from_secs(30), |v| v >= 2.0).await?;
    // "after" reached B past the hole they left.
    tests::wait_metric(fed.op(B), "mlsfed_fanout_lost_predecessors_total", Duration::from_secs(30), |v| v >= 1.0)
        .await?;
    assert_eq!(metric(fed.op(A), &dead).await, 2.0, "only the large records were set aside");
    let js = async_nats::jetstream::new(tests::nats_connect(&fed.nats[0].url()).await?);
    let stream = js.get_stream(tests::proto::names::DEAD_STREAM).await?;
    let subject = tests::proto::names::dead_subject("bridge");
    let mut letters = Vec::new();
    let mut next = 1;
    while let Ok(m) = stream.raw_message_builder().sequence(next).next_by_subject(subject.as_str()).send().await {
        next = m.sequence + 1;
        letters.push(serde_json::from_slice::<tests::proto::wire::DeadLetter>(&m.payload)?);
        anyhow::ensure!(letters.len() <= 2, "more dead letters than records set aside");
    }
    let kept: Vec<(&str, bool, bool)> =
        letters.iter().map(|l| (l.reason.as_str(), l.payload.is_empty(), l.payload_omitted)).collect();
    assert_eq!(
        kept,
        [("too_large_for_peer", false, false), ("too_large_for_peer", true, true)],
        "the first letter holds its record, the second names it without a copy"
    );
    Ok(())
}
