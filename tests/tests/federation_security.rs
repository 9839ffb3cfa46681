//! What a peer operator cannot do to us, whatever it signs: decide our
//! devices' submissions, rewrite an answer, silence itself with one
//! envelope, or replay a request; and what honest peers may do: restart
//! their outbox, or run a clock minutes off ours.

use std::time::Duration;

use tests::proto::federation::{seal, Capabilities, Envelope, Payload, Request, Response, RpcEnvelope};
use tests::proto::wire::{Submission, SubmissionKind, Verdict};
use tests::proto::{identity, names, ErrorCode, GroupId};
use tests::{metric, operator_seed, sync_until, unix_now, Client, Federation, NatsServer};

const A: &str = "a.example";
const B: &str = "b.example";

/// The incarnation of an operator's outbox, as its envelopes carry it.
async fn outbox_id(nats: &NatsServer) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let mut stream = js.get_stream(names::FED_OUT_STREAM).await?;
    Ok(u64::try_from(stream.info().await?.created.unix_timestamp_nanos())?)
}

/// Publishes `env`, sealed with `origin`'s key, into `to`'s inbound stream
/// with `origin`'s own NATS user there, as `origin`'s bridge would.
async fn inject(to: &NatsServer, origin: &str, env: &Envelope) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(tests::nats_connect(&to.peer_url(origin)).await?);
    let key = identity::operator_key(&operator_seed(origin));
    js.publish(names::fed_in_subject(origin), seal(&key, env).into()).await?.await?;
    Ok(())
}

/// Waits until `name` reads `want` on `op` (bounded).
async fn wait_metric(op: &tests::Operator, name: &str, want: f64) -> anyhow::Result<()> {
    tests::wait_metric(op, name, Duration::from_secs(10), |v| v == want).await.map(|_| ())
}

/// Submits `body` as `device` with an Idempotency-Key: (status, JSON).
async fn submit(op: &tests::Operator, c: &Client, key: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let req = tests::http()
        .post(format!("{}/v1/messages", op.url))
        .header("content-type", "message/mls")
        .header("idempotency-key", key)
        .body(body);
    tests::send(req, Some(&op.token(c.id()))).await
}

fn verdict(id: &str, outbox: u64, seq: u64) -> Envelope {
    Envelope {
        version: 1,
        origin: A.into(),
        destination: B.into(),
        outbox,
        seq,
        payloads: vec![Payload::Verdict {
            submission_id: id.into(),
            verdict: Verdict::Accepted { position: 4242, epoch: 9 },
        }],
    }
}

/// A peer's signed verdict is taken only from the hub a submission was
/// forwarded to, for that submission, once: neither a verdict on one of
/// our local submissions nor a second verdict from the real hub changes
/// the answer a retry gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_verdict_changes_no_answer() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B], |_, c| c.limits.submit_timeout_ms = 5000)?;
    let (a_op, b_op) = (fed.op(A), fed.op(B));
    let mut alice = a_op.client("alice", "phone", 1).await?;
    let mut bob = b_op.client("bob", "phone", 2).await?;
    let a_outbox = outbox_id(&fed.nats[0]).await?;

    // 1. Bob's submission to a group hosted by B: A has no say in it.
    let local = bob.create_group("local").await?;
    let body = bob.encrypt_for_bench(&local, b"local")?;
    let (status, first) = submit(b_op, &bob, "k1", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let id = tests::proto::wire::submission_id(bob.id(), &[b"key", b"k1"]);
    inject(&fed.nats[1], A, &verdict(&id, a_outbox, 1_000)).await?;
    wait_metric(b_op, "mlsfed_federation_refused_total{reason=\"unsolicited_verdict\"}", 1.0).await?;
    let (status, retry) = submit(b_op, &bob, "k1", body).await;
    assert_eq!((status, &retry), (200, &first), "the retry's answer changed");

    // 2. Bob's submission to a group hosted by A: A answers it once; a
    //    second, different verdict from A itself is refused.
    let hosted = alice.create_group("hosted").await?;
    alice.add(&hosted, &[b_op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&hosted)).await?;
    let body = bob.encrypt_for_bench(&hosted, b"forwarded")?;
    let (status, first) = submit(b_op, &bob, "k2", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let id = tests::proto::wire::submission_id(bob.id(), &[b"key", b"k2"]);
    inject(&fed.nats[1], A, &verdict(&id, a_outbox, 2_000)).await?;
    wait_metric(b_op, "mlsfed_federation_refused_total{reason=\"verdict_conflict\"}", 1.0).await?;
    let (status, retry) = submit(b_op, &bob, "k2", body).await;
    assert_eq!((status, &retry), (200, &first), "the retry's answer changed");
    assert_ne!(first["position"], 4242);
    Ok(())
}

/// A group hosted by A with bob of B in it, and a sender that checks bob
/// receives each message.
struct Link {
    fed: Federation,
    alice: Client,
    bob: Client,
    group: String,
}

impl Link {
    async fn start() -> anyhow::Result<Self> {
        let fed = Federation::start(&[A, B], |_, c| c.limits.submit_timeout_ms = 5000)?;
        let mut alice = fed.op(A).client("alice", "phone", 1).await?;
        let mut bob = fed.op(B).client("bob", "phone", 2).await?;
        let group = alice.create_group("link").await?;
        alice.add(&group, &[fed.op(B).user_id("bob")]).await?;
        sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&group)).await?;
        Ok(Self { fed, alice, bob, group })
    }

    /// Alice sends `text`; bob must receive it.
    async fn delivered(&mut self, text: &str) -> anyhow::Result<()> {
        let g = self.group.clone();
        self.alice.send(&g, text).await?;
        sync_until(&mut [&mut self.bob], Duration::from_secs(30), |c| c.messages(&g).iter().any(|m| m.2 == text))
            .await
            .map_err(|e| anyhow::anyhow!("bob did not receive {text:?}: {e}"))
    }
}

/// An envelope cannot silence its peer. A correctly signed one far ahead
/// whose records are all refused leaves the high-water mark where it was;
/// one far ahead with records we would apply is refused as a jump; and an
/// operator's `mlsfed peer reset-mark` is counted and keeps the link up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_runaway_envelope_never_silences_a_peer() -> anyhow::Result<()> {
    let mut l = Link::start().await?;
    l.delivered("before").await?;
    let a_outbox = outbox_id(&l.fed.nats[0]).await?;
    let b = l.fed.op(B);

    // Far ahead, within the jump bound, and nothing in it is applied.
    inject(&l.fed.nats[1], A, &verdict("never-forwarded", a_outbox, 1_000_000_000)).await?;
    wait_metric(b, "mlsfed_federation_refused_total{reason=\"unsolicited_verdict\"}", 1.0).await?;
    l.delivered("after a refused envelope").await?;

    let b = l.fed.op(B);
    let junk = Submission {
        id: "runaway".into(),
        device: l.fed.op(A).device_id("alice", "phone"),
        group: GroupId::parse("mimi://b.example/r/none")?,
        kind: SubmissionKind::Message { message: b"junk".to_vec(), welcome: None, group_info: None },
        origin: None,
    };
    let runaway = Envelope {
        version: 1,
        origin: A.into(),
        destination: B.into(),
        outbox: a_outbox,
        seq: 1_000_000_000_000,
        payloads: vec![Payload::Submit(junk)],
    };
    inject(&l.fed.nats[1], A, &runaway).await?;
    wait_metric(b, "mlsfed_federation_refused_total{reason=\"seq_jump\"}", 1.0).await?;
    l.delivered("after a runaway envelope").await?;

    let b = l.fed.op(B);
    let out = b.admin(&["peer", "reset-mark", A])?;
    assert!(out.contains("\"reset\":true"), "{out}");
    l.delivered("after the reset").await?;
    let b = l.fed.op(B);
    wait_metric(b, "mlsfed_federation_mark_resets_total{peer=\"a.example\"}", 1.0).await?;
    let marks = b.admin(&["peer", "marks"])?;
    let mark: serde_json::Value = serde_json::from_str(marks.lines().next().unwrap_or_default())?;
    assert_eq!((mark["peer"].as_str(), mark["reset"].as_bool()), (Some(A), Some(false)), "{marks}");
    assert!(mark["seq"].as_u64().is_some_and(|s| s < 1_000_000), "{marks}");
    Ok(())
}

/// A peer chooses the ids of the submissions it forwards, and at the hub
/// they become headers, subjects and keys. One of any shape but ours (here
/// with a line break, which the NATS client cannot put in a header) is
/// refused and counted, and the link goes on both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_submission_with_a_forged_id_is_refused() -> anyhow::Result<()> {
    let mut l = Link::start().await?;
    l.delivered("before").await?;
    let b_outbox = outbox_id(&l.fed.nats[1]).await?;
    let forged = Submission {
        id: "forged\nid".into(),
        device: l.fed.op(B).device_id("bob", "phone"),
        group: GroupId::parse(&l.group)?,
        kind: SubmissionKind::Message { message: b"junk".to_vec(), welcome: None, group_info: None },
        origin: None,
    };
    // Ahead of B's mark at A, within the jump bound: judged, not replayed.
    let env = Envelope {
        version: 1,
        origin: B.into(),
        destination: A.into(),
        outbox: b_outbox,
        seq: 1_000_000_000,
        payloads: vec![Payload::Submit(forged)],
    };
    inject(&l.fed.nats[0], B, &env).await?;
    wait_metric(l.fed.op(A), "mlsfed_federation_refused_total{reason=\"bad_submission_id\"}", 1.0).await?;
    l.delivered("after the forged id").await?;
    // Bob's own submissions still reach the hub through the same inbox.
    let g = l.group.clone();
    l.bob.send(&g, "from bob").await?;
    sync_until(&mut [&mut l.alice], Duration::from_secs(30), |c| c.messages(&g).iter().any(|m| m.2 == "from bob"))
        .await?;
    Ok(())
}

/// A's outbox stream is lost and recreated (its sequence starts again at
/// 1): B follows the new outbox instead of taking everything for replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_outbox_restarts_lower_is_still_heard() -> anyhow::Result<()> {
    let mut l = Link::start().await?;
    for i in 0..5 {
        l.delivered(&format!("first life {i}")).await?;
    }
    l.fed.ops[0].kill();
    let js = async_nats::jetstream::new(tests::nats_connect(&l.fed.nats[0].url()).await?);
    js.delete_stream(names::FED_OUT_STREAM).await?;
    l.fed.ops[0].restart()?;
    // The killed process's partitions move to its successor once its
    // membership expires.
    let all = f64::from(tests::config::Config::default().streams.partitions);
    tests::wait_metric(&l.fed.ops[0], "mlsfed_sequencer_partitions_owned", Duration::from_secs(30), |v| v == all)
        .await?;
    let url = l.fed.ops[0].url.clone();
    l.alice.reconnect(&url)?;
    l.delivered("after the outbox began anew").await?;
    wait_metric(l.fed.op(B), "mlsfed_federation_peer_outbox_restarts_total{peer=\"a.example\"}", 1.0).await?;
    assert_eq!(metric(l.fed.op(B), "mlsfed_federation_replays_total{peer=\"a.example\"}").await, 0.0);
    Ok(())
}

/// Requests carry a nonce and a time: a peer whose clock is two minutes
/// off either way is answered; a replay of an answered request, or one
/// from ten minutes ago, is refused and counted. The capabilities A
/// answers with give the body size its ingest takes: A is configured for
/// 4 MiB, but its nats-server carries 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_tolerate_clock_skew_but_not_replays() -> anyhow::Result<()> {
    let fed = Federation::start(&[A, B], |d, c| {
        if d == A {
            c.limits.max_body_bytes = 4 << 20;
        }
    })?;
    // B's NATS user on A's server, and B's key: what B's bridge holds.
    let as_b = tests::nats_connect(&fed.nats[0].peer_url(B)).await?;
    let b_key = identity::operator_key(&operator_seed(B));
    let keys: std::collections::HashMap<String, _> =
        [(A.to_owned(), identity::operator_key(&operator_seed(A)).verifying_key())].into();
    let caps =
        Capabilities { versions: vec![1], mls_versions: vec![1], cipher_suites: vec![1], max_message_bytes: 1 << 20 };
    let request = |sent_at: u64| {
        let env = RpcEnvelope {
            version: 1,
            origin: B.to_owned(),
            destination: A.to_owned(),
            sent_at,
            nonce: rand::random(),
            body: Request::Capabilities(caps.clone()),
        };
        (env.nonce, bytes::Bytes::from(seal(&b_key, &env)))
    };
    let subject = names::peer_rpc_subject(B);
    // A's bridge subscribes on a connection of its own once it is up:
    // until then a request has no responders (bounded wait).
    for _ in 0..100 {
        match as_b.request(subject.clone(), request(unix_now()).1).await {
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            _ => break,
        }
    }
    let mut first = None;
    for sent_at in [unix_now() - 120, unix_now() + 120] {
        let (nonce, req) = request(sent_at);
        let reply = as_b.request(subject.clone(), req.clone()).await?;
        let answer: RpcEnvelope<Response> = tests::proto::federation::open(&reply.payload, &keys, B).map_err(|e| {
            anyhow::anyhow!("a request {} s off was not answered: {e}", sent_at as i64 - unix_now() as i64)
        })?;
        assert_eq!(answer.nonce, nonce, "the answer is not bound to the request");
        match &answer.body {
            Response::Capabilities(c) => assert_eq!(
                c.max_message_bytes,
                ((1 << 20) - tests::proto::limits::NATS_HEADROOM) as u64,
                "A advertised a body size its NATS cannot carry"
            ),
            other => anyhow::bail!("not capabilities: {other:?}"),
        }
        first.get_or_insert(req);
    }
    let refused = |payload: &[u8]| match tests::proto::wire::decode::<Response>(payload) {
        Ok(Response::Error(e)) => e.code == ErrorCode::ForgedEnvelope,
        _ => false,
    };
    let replay = as_b.request(subject.clone(), first.unwrap_or_default()).await?;
    assert!(refused(&replay.payload), "a replayed request was answered");
    let (_, stale) = request(unix_now() - 600);
    let stale = as_b.request(subject.clone(), stale).await?;
    assert!(refused(&stale.payload), "a ten-minute-old request was answered");
    let a = fed.op(A);
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"replayed_request\"}").await, 1.0);
    assert_eq!(metric(a, "mlsfed_federation_refused_total{reason=\"stale_request\"}").await, 1.0);
    Ok(())
}
