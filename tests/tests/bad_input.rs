//! Hostile input: each refusal has its own status and stable code, nothing
//! answers 500, and the operator keeps serving the honest devices.

use openmls::prelude::{PURE_CIPHERTEXT_WIRE_FORMAT_POLICY, PURE_PLAINTEXT_WIRE_FORMAT_POLICY};
use tests::raw::{first_len, Local};
use tests::{get, post, settle, NatsServer, Operator};

fn code(v: &serde_json::Value) -> &str {
    v.get("code").and_then(|c| c.as_str()).unwrap_or("<none>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_typed_errors() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.limits.max_body_bytes = 8192)?;
    let mut alice = op.client("alice", "phone", 3).await?;
    let mut bob = op.client("bob", "phone", 3).await?;
    let g = alice.create_group("room").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    let (ta, tb) = (op.token(alice.id()), op.token(bob.id()));
    let url = op.url.clone();
    let alice_raw = Local::new(alice.id().as_str());
    let good = alice.encrypt_for_bench(&g, b"valid")?;

    let mut cases: Vec<(&str, u16, &str, (u16, serde_json::Value))> = Vec::new();
    let mut case = |name, status, code, got| cases.push((name, status, code, got));

    // Malformed bytes.
    case(
        "truncated",
        400,
        "malformed_message",
        post(&url, "/v1/messages", Some(&ta), good[..good.len() / 2].to_vec()).await,
    );
    let mut garbage = vec![0, 1, 0, 2];
    garbage.extend_from_slice(&[0xff; 64]);
    case("garbage", 400, "malformed_message", post(&url, "/v1/messages", Some(&ta), garbage).await);
    case("tiny", 400, "malformed_message", post(&url, "/v1/messages", Some(&ta), vec![0]).await);
    let mut wrong_version = good.clone();
    wrong_version[1] = 7;
    case("wrong version", 400, "unsupported_version", post(&url, "/v1/messages", Some(&ta), wrong_version).await);
    case(
        "key package as message",
        400,
        "wrong_wire_format",
        post(&url, "/v1/messages", Some(&ta), alice_raw.key_package()).await,
    );
    let mut bad_wf = good.clone();
    bad_wf[3] = 9;
    case("unknown wire format", 400, "wrong_wire_format", post(&url, "/v1/messages", Some(&ta), bad_wf).await);
    case("oversize", 413, "body_too_large", post(&url, "/v1/messages", Some(&ta), vec![0; 9000]).await);

    // Group state.
    let mut ghost = alice_raw.group("mimi://a.example/r/ghost", PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    case(
        "unknown group",
        404,
        "unknown_group",
        post(&url, "/v1/messages", Some(&ta), alice_raw.app_message(&mut ghost, "boo")).await,
    );
    let mut elsewhere = alice_raw.group("mimi://b.example/r/x", PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    case(
        "not our group",
        421,
        "not_hub",
        post(&url, "/v1/messages", Some(&ta), alice_raw.app_message(&mut elsewhere, "x")).await,
    );
    let mut ciphertext = alice_raw.group("mimi://a.example/r/ghost2", PURE_CIPHERTEXT_WIRE_FORMAT_POLICY);
    case(
        "encrypted handshake",
        400,
        "encrypted_handshake",
        post(&url, "/v1/messages", Some(&ta), alice_raw.update_commit(&mut ciphertext)).await,
    );
    let mut not_uri = alice_raw.group("not a mimi id", PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    case(
        "group id not a uri",
        400,
        "invalid_identifier",
        post(&url, "/v1/messages", Some(&ta), alice_raw.app_message(&mut not_uri, "x")).await,
    );
    // Alice's real Commit, submitted with Bob's token.
    let commit = alice.prepare_update(&g)?;
    case(
        "sender leaf is not the device",
        403,
        "sender_mismatch",
        post(&url, "/v1/messages", Some(&tb), commit.clone()).await,
    );
    // The same Commit without the GroupInfo of the epoch it starts, with
    // another group's, and with one bit of its confirmation tag flipped
    // (the 32-byte MAC before the membership tag, RFC 9420 §6.2): the hub
    // cannot verify the tag, but it must equal the GroupInfo's copy.
    let n = first_len(&commit);
    case(
        "commit without its GroupInfo",
        422,
        "missing_group_info",
        post(&url, "/v1/messages", Some(&ta), commit[..n].to_vec()).await,
    );
    let elsewhere_info =
        alice_raw.group_info(&alice_raw.group("mimi://a.example/r/other", PURE_PLAINTEXT_WIRE_FORMAT_POLICY));
    case(
        "commit with another group's GroupInfo",
        422,
        "invalid_group_info",
        post(&url, "/v1/messages", Some(&ta), [&commit[..n], &elsewhere_info[..]].concat()).await,
    );
    let mut flipped = commit.clone();
    flipped[n - 33 - 8] ^= 0x01;
    case(
        "commit with a damaged confirmation tag",
        422,
        "invalid_commit",
        post(&url, "/v1/messages", Some(&ta), flipped).await,
    );
    alice.discard_pending(&g)?;
    // A Commit that adds a member but lost its Welcome.
    let carol = op.client("carol", "phone", 1).await?;
    let kps = alice.claim(&[op.user_id("carol")]).await?;
    let with_welcome = alice.prepare_add(&g, &kps)?;
    let n = first_len(&with_welcome);
    case(
        "commit without its welcome",
        422,
        "welcome_mismatch",
        post(&url, "/v1/messages", Some(&ta), with_welcome[..n].to_vec()).await,
    );
    alice.discard_pending(&g)?;
    // A second device claiming the same room id.
    let squat = Local::new(bob.id().as_str());
    let taken = squat.group(&g, PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    case("group exists", 409, "group_exists", post(&url, "/v1/groups", Some(&tb), squat.group_info(&taken)).await);
    // A GroupInfo whose creator is not the authenticated device.
    let fresh = alice_raw.group("mimi://a.example/r/fresh", PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    case(
        "group created for someone else",
        422,
        "invalid_group_info",
        post(&url, "/v1/groups", Some(&tb), alice_raw.group_info(&fresh)).await,
    );

    // Authentication and authorization.
    case("no token", 401, "unauthenticated", post(&url, "/v1/messages", None, good.clone()).await);
    let forged = tb.replace("mft1.", "mft1.x");
    case("forged token", 401, "unauthenticated", post(&url, "/v1/messages", Some(&forged), good.clone()).await);
    let foreign = tests::proto::auth::issue(
        tests::SECRET.as_bytes(),
        &tests::proto::DeviceId::parse("mimi://b.example/d/eve/x")?,
        tests::unix_now() + 60,
    );
    case(
        "token of another operator",
        401,
        "unauthenticated",
        post(&url, "/v1/messages", Some(&foreign), good.clone()).await,
    );
    let alice_box = format!("/v1/devices/{}/mailbox", tests::client::http::encode_segment(alice.id().as_str()));
    case("reading another device's mailbox", 403, "forbidden_device", get(&url, &alice_box, Some(&tb)).await);
    case(
        "acking another device's mailbox",
        403,
        "forbidden_device",
        post(&url, &format!("{alice_box}/ack"), Some(&tb), b"{\"up_to\":1}".to_vec()).await,
    );

    // Key directory.
    case(
        "key package of another identity",
        403,
        "identity_mismatch",
        post(&url, "/v1/keypackages", Some(&tb), alice_raw.key_package()).await,
    );
    case(
        "empty key package upload",
        400,
        "invalid_request",
        post(&url, "/v1/keypackages", Some(&tb), Vec::new()).await,
    );
    let claim = |u: &str| serde_json::to_vec(&serde_json::json!({ "user": u })).expect("json");
    let claim_at = |body| {
        let url = url.clone();
        let tb = tb.clone();
        async move {
            let resp = tests::http()
                .post(format!("{url}/v1/keypackages/claim"))
                .bearer_auth(tb)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("claim");
            (resp.status().as_u16(), resp.json().await.unwrap_or(serde_json::Value::Null))
        }
    };
    case("claim for unknown user", 404, "unknown_user", claim_at(claim("mimi://a.example/u/nobody")).await);
    case("claim with bad user id", 400, "invalid_identifier", claim_at(claim("bob")).await);
    case("claim with bad json", 400, "invalid_request", claim_at(b"{".to_vec()).await);
    case("unknown endpoint", 400, "invalid_request", get(&url, "/v1/nope", Some(&tb)).await);

    let mut failed = Vec::new();
    for (name, status, want, (got_status, body)) in &cases {
        assert_ne!(*got_status, 500, "{name} answered 500");
        if got_status != status || code(body) != *want {
            failed.push(format!("{name}: want {status} {want}, got {got_status} {body}"));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n"));

    // The operator still serves honest traffic, and nothing accepted changed.
    assert!(op.healthy().await);
    let p = alice.send(&g, "still here").await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    assert_eq!(bob.messages(&g).last().map(|m| (m.0, m.2.as_str())), Some((p, "still here")));
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    drop(carol);
    // Each refusal is counted by code.
    let metrics = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    for want in ["malformed_message", "sender_mismatch", "unauthenticated", "forbidden_device"] {
        assert!(metrics.contains(&format!("mlsfed_api_errors_total{{code=\"{want}\"}}")), "metric for {want}");
    }
    Ok(())
}

/// A message within `limits.max_body_bytes` that NATS could not carry (its
/// `max_payload` is 1 MiB unless raised) is refused once as
/// `body_too_large`, not as a retryable `unavailable` at every resend; the
/// group goes on. An operator's own nats-server is started with room for
/// its configured limit, so there the same message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_nats_cannot_carry_is_too_large_unless_the_operator_runs_nats() -> anyhow::Result<()> {
    use tests::proto::ErrorCode;
    let big = "x".repeat(1_200_000);
    let texts = |c: &tests::Client, g: &str| c.messages(g).into_iter().map(|m| m.2).collect::<Vec<_>>();

    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.limits.max_body_bytes = 2 << 20)?;
    let mut alice = op.client("alice", "phone", 3).await?;
    let mut bob = op.client("bob", "phone", 3).await?;
    let g = alice.create_group("room").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    let refused = alice.send(&g, &big).await.expect_err("NATS cannot carry it");
    assert_eq!(refused.code(), Some(ErrorCode::BodyTooLarge), "{refused}");
    alice.send(&g, "small").await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    assert_eq!(texts(&bob, &g), ["small"]);

    let op = Operator::start_embedded_with("b.example", |c| c.limits.max_body_bytes = 2 << 20)?;
    let mut carol = op.client("carol", "phone", 3).await?;
    let mut dave = op.client("dave", "phone", 3).await?;
    let g = carol.create_group("room").await?;
    carol.add(&g, &[op.user_id("dave")]).await?;
    settle(&mut [&mut carol, &mut dave]).await?;
    carol.send(&g, &big).await?;
    settle(&mut [&mut carol, &mut dave]).await?;
    assert_eq!(texts(&dave, &g), [big.as_str()]);
    Ok(())
}
