//! The key directory: one conformance suite over both storage backends,
//! atomic claims through several keydir processes, every invalid upload with
//! its code, expiry, restarts, and identity bindings checked by clients.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use keydir::store::{Caps, KeyStore, Reservation, Stored, Take};
use openmls::prelude::Ciphersuite;
use tests::client::Event;
use tests::proto::{names, DeviceId, UserId};
use tests::raw::Local;
use tests::{bad_kp, get, post, unix_now, NatsServer, Operator};

fn stored(n: u8, not_after: u64, caps: Caps) -> Stored {
    Stored { kp_ref: vec![n; 16], suite: 1, not_after, caps, bytes: vec![n; 40] }
}

/// The behaviour every backend must have.
async fn conformance<S: KeyStore + 'static>(s: Arc<S>) -> anyhow::Result<()> {
    let now = unix_now();
    let d = DeviceId::parse("mimi://a.example/d/alice/one")?;
    let d2 = DeviceId::parse("mimi://a.example/d/alice/two")?;
    let u = UserId::parse("mimi://a.example/u/alice")?;
    let all: &(dyn Fn(&Stored) -> bool + Sync) = &|_| true;

    // Pools, counts, one-time takes.
    for n in 1..=3 {
        s.put_one_time(&d, &stored(n, now + 100, Caps::default())).await?;
    }
    assert_eq!(s.count_one_time(&d, 1).await?, 3);
    assert_eq!(s.count_one_time(&d, 2).await?, 0);
    assert_eq!(s.count_up_to(&d, 1, 2).await?, 2);
    assert_eq!(s.count_up_to(&d, 1, 10).await?, 3);
    let mut seen = HashSet::new();
    for _ in 0..3 {
        match s.take_one_time(&d, 1, now, all, &d2).await? {
            Take::Taken(k) => assert!(seen.insert(k.kp_ref)),
            other => panic!("expected a KeyPackage, got {other:?}"),
        }
    }
    assert_eq!(s.take_one_time(&d, 1, now, all, &d2).await?, Take::Empty);

    // Expired ones are never served and are deleted on the way.
    s.put_one_time(&d, &stored(9, now - 1, Caps::default())).await?;
    assert_eq!(s.take_one_time(&d, 1, now, all, &d2).await?, Take::Empty);
    assert_eq!(s.count_one_time(&d, 1).await?, 0);
    s.put_one_time(&d, &stored(10, now + 5, Caps::default())).await?;
    assert_eq!(s.sweep(&d, 1, now + 10).await?, 1);

    // Capability filters leave incompatible ones in the pool.
    s.put_one_time(&d, &stored(11, now + 100, Caps::default())).await?;
    let wants_ext: &(dyn Fn(&Stored) -> bool + Sync) =
        &|x| x.caps.covers(&Caps { extensions: vec![0xff00], ..Default::default() });
    assert_eq!(s.take_one_time(&d, 1, now, wants_ext, &d2).await?, Take::NoneCompatible);
    assert_eq!(s.count_one_time(&d, 1).await?, 1);

    // Last resort: replaced, never consumed.
    assert_eq!(s.last_resort(&d, 1).await?, None);
    s.put_last_resort(&d, &stored(20, now + 100, Caps::default())).await?;
    s.put_last_resort(&d, &stored(21, now + 100, Caps::default())).await?;
    assert_eq!(s.last_resort(&d, 1).await?.map(|x| x.kp_ref), Some(vec![21; 16]));
    assert!(s.last_resort(&d, 1).await?.is_some());

    // Devices of a user.
    s.add_device(&u, &d).await?;
    s.add_device(&u, &d).await?;
    s.add_device(&u, &d2).await?;
    let mut ds = s.devices(&u).await?;
    ds.sort();
    assert_eq!(ds, vec![d.clone(), d2.clone()]);
    s.put_one_time(&d2, &stored(30, now + 100, Caps::default())).await?;
    s.put_last_resort(&d2, &stored(31, now + 100, Caps::default())).await?;
    s.remove_device(&d2, &[1]).await?;
    assert_eq!(s.devices(&u).await?, vec![d.clone()]);
    assert_eq!(s.count_one_time(&d2, 1).await?, 0);
    assert_eq!(s.last_resort(&d2, 1).await?, None);

    // Reservations are taken once.
    let r = Reservation {
        device: d.clone(),
        claimer: d2.clone(),
        at: now - 50,
        stored: stored(40, now + 100, Caps::default()),
    };
    s.put_reservation(&r).await?;
    assert_eq!(s.reservations_before(now - 60).await?.len(), 0);
    // (Takes above reserved what they took, at `now`.)
    assert_eq!(s.reservations_before(now - 40).await?, vec![r.clone()]);
    assert_eq!(s.reservations_before(now).await?.len(), 1 + 3);
    assert_eq!(s.take_reservation(&r.stored.kp_ref).await?, Some(r.clone()));
    assert_eq!(s.take_reservation(&r.stored.kp_ref).await?, None);

    // Bindings.
    assert_eq!(s.binding(&d).await?, None);
    s.put_binding(&d, b"signed").await?;
    assert_eq!(s.binding(&d).await?, Some(b"signed".to_vec()));

    // Concurrent takes: each KeyPackage goes to exactly one taker.
    let d3 = DeviceId::parse("mimi://a.example/d/carol/one")?;
    for n in 100..120 {
        s.put_one_time(&d3, &stored(n, now + 100, Caps::default())).await?;
    }
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let s = s.clone();
        let d3 = d3.clone();
        tasks.push(tokio::spawn(async move { s.take_one_time(&d3, 1, now, &|_| true, &d3).await }));
    }
    let mut got = HashSet::new();
    for t in tasks {
        if let Take::Taken(k) = t.await?? {
            assert!(got.insert(k.kp_ref), "a KeyPackage was taken twice");
        }
    }
    assert_eq!(got.len(), 20);
    assert_eq!(s.count_one_time(&d3, 1).await?, 0);

    // Revocation is a permanent mark of its own: a binding written after
    // it (a concurrent upload) does not clear it.
    assert!(!s.is_revoked(&d2).await?);
    s.put_revoked(&d2).await?;
    s.put_binding(&d2, b"{}").await?;
    assert!(s.is_revoked(&d2).await?);
    assert!(!s.is_revoked(&d).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_sled() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path().join("kd"))?;
    conformance(Arc::new(keydir::SledStore::open(&db)?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_jetstream() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    conformance(Arc::new(keydir::JsStore::open(&js, 1).await?)).await
}

async fn claim(url: &str, token: &str, user: &str, extra: serde_json::Value) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({ "user": user });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    tests::send(client.post(format!("{url}/v1/keypackages/claim")).json(&body), Some(token)).await
}

/// 50 parallel claims through two keydir processes on the JetStream backend
/// against a device with 10 one-time KeyPackages and one last-resort one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_claims_through_two_processes() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let a = Operator::start_with(&nats, "a.example", "ingest", |c| {
        c.keydir.backend = config::KeydirBackend::Jetstream;
    })?;
    let b = a.worker("ingest")?;
    let mut bob = a.client("bob", "phone", 10).await?;
    let claimers: Vec<String> = (0..5).map(|i| a.token(&a.device_id(&format!("c{i}"), "d"))).collect();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = if i % 2 == 0 { a.url.clone() } else { b.url.clone() };
        let token = claimers[i % 5].clone();
        tasks.push(tokio::spawn(
            async move { claim(&url, &token, "mimi://a.example/u/bob", serde_json::json!({})).await },
        ));
    }
    let (mut one_time, mut last_resort, mut seen) = (HashSet::new(), HashSet::new(), 0);
    for t in tasks {
        let (status, body) = t.await?;
        assert_eq!(status, 200, "{body}");
        let kps = body["key_packages"].as_array().cloned().unwrap_or_default();
        assert_eq!(kps.len(), 1, "{body}");
        let kp = kps[0]["key_package"].as_str().unwrap_or_default().to_owned();
        if kps[0]["last_resort"].as_bool() == Some(true) {
            last_resort.insert(kp);
        } else {
            assert!(one_time.insert(kp), "a one-time KeyPackage was served twice");
        }
        seen += 1;
    }
    assert_eq!((seen, one_time.len(), last_resort.len()), (50, 10, 1));
    let (status, stock) = get(&a.url, "/v1/keypackages/stock", Some(&a.token(bob.id()))).await;
    assert_eq!(status, 200);
    assert_eq!(stock["stock"][0]["one_time"], 0, "{stock}");
    assert_eq!(stock["stock"][0]["last_resort"], true, "{stock}");
    let notices: Vec<Event> =
        bob.sync().await?.into_iter().filter(|e| matches!(e, Event::KeyPackagesLow { .. })).collect();
    assert!(notices.contains(&Event::KeyPackagesLow { cipher_suite: 1, remaining: 0 }), "{notices:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_uploads_are_refused_with_their_codes() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.keydir.max_lifetime_secs = 30 * 86_400)?;
    let me = op.device_id("mallory", "m");
    let token = op.token(&me);
    let l = Local::new(me.as_str());
    let now = unix_now();
    let mut wrong_version = l.key_package();
    wrong_version[1] = 2;
    // The MLSMessage says mls10, the KeyPackage inside says version 2.
    let mut kp_version_2 = l.key_package();
    kp_version_2[5] = 2;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("bad signature", bad_kp::bad_signature(&l), 422, "invalid_signature"),
        ("wrong version", wrong_version, 400, "unsupported_version"),
        ("KeyPackage of MLS version 2", kp_version_2, 400, "unsupported_version"),
        ("X.509 credential", bad_kp::x509_credential(&l), 422, "unsupported_credential"),
        (
            "cipher suite not accepted",
            bad_kp::with_suite(&l, Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519),
            422,
            "unsupported_cipher_suite",
        ),
        ("expired", bad_kp::with_lifetime(&l, now - 1000, now - 10), 422, "key_package_expired"),
        ("lifetime too long", bad_kp::with_lifetime(&l, now, now + 60 * 86_400), 422, "lifetime_too_long"),
        ("another identity", Local::new("mimi://a.example/d/alice/x").key_package(), 403, "identity_mismatch"),
        ("init key == encryption key", bad_kp::init_equals_encryption(&l), 422, "init_key_equals_encryption_key"),
        ("last resort not in capabilities", bad_kp::last_resort_undeclared(&l), 422, "last_resort_not_in_capabilities"),
        ("truncated", l.key_package()[..50].to_vec(), 400, "malformed_message"),
    ];
    for (name, body, status, code) in cases {
        let (got, json) = post(&op.url, "/v1/keypackages", Some(&token), body).await;
        assert_eq!((got, json["code"].as_str().unwrap_or_default()), (status, code), "{name}: {json}");
    }
    // A good one in the same batch as a bad one: nothing is stored.
    let mut batch = l.key_package();
    batch.extend(bad_kp::bad_signature(&l));
    let (got, _) = post(&op.url, "/v1/keypackages", Some(&token), batch).await;
    assert_eq!(got, 422);
    let (_, stock) = get(&op.url, "/v1/keypackages/stock", Some(&token)).await;
    assert_eq!(stock["stock"][0]["one_time"], 0, "{stock}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_filter_by_suite_and_capabilities_and_never_serve_expired() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let carol = op.device_id("carol", "c");
    let l = Local::new(carol.as_str());
    let now = unix_now();
    // One KeyPackage that expires in three seconds, and no last resort.
    let (got, body) =
        post(&op.url, "/v1/keypackages", Some(&op.token(&carol)), bad_kp::with_lifetime(&l, now - 10, now + 3)).await;
    assert_eq!(got, 200, "{body}");
    let asker = op.token(&op.device_id("dave", "d"));
    let (got, body) =
        claim(&op.url, &asker, "mimi://a.example/u/carol", serde_json::json!({ "cipher_suites": [3] })).await;
    assert_eq!((got, body["code"].as_str()), (404, Some("no_compatible_material")), "{body}");
    let (got, body) = claim(
        &op.url,
        &asker,
        "mimi://a.example/u/carol",
        serde_json::json!({ "required_capabilities": { "extensions": [65280] } }),
    )
    .await;
    assert_eq!((got, body["code"].as_str()), (404, Some("no_compatible_material")), "{body}");
    let (got, body) = claim(&op.url, &asker, "mimi://a.example/u/nobody", serde_json::json!({})).await;
    assert_eq!((got, body["code"].as_str()), (404, Some("unknown_user")), "{body}");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (got, body) = claim(&op.url, &asker, "mimi://a.example/u/carol", serde_json::json!({})).await;
    assert_eq!((got, body["code"].as_str()), (404, Some("key_material_exhausted")), "{body}");
    Ok(())
}

/// keydir killed with SIGKILL in the middle of claims, on both backends:
/// no KeyPackage is lost or served twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_claims_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    for backend in [config::KeydirBackend::Sled, config::KeydirBackend::Jetstream] {
        let nats = NatsServer::start()?;
        let mut op = Operator::start_with(&nats, "a.example", "ingest", |c| {
            c.keydir.backend = backend;
            c.keydir.reservation_secs = 2;
        })?;
        let erin = op.client("erin", "e", 40).await?;
        let asker = op.token(&op.device_id("frank", "f"));
        let mut served = HashSet::new();
        for round in 0..3 {
            let mut tasks = Vec::new();
            for _ in 0..10 {
                let (url, asker) = (op.url.clone(), asker.clone());
                tasks.push(tokio::spawn(async move {
                    let r = tests::http()
                        .post(format!("{url}/v1/keypackages/claim"))
                        .bearer_auth(asker)
                        .json(&serde_json::json!({ "user": "mimi://a.example/u/erin" }))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                        _ => None,
                    }
                }));
            }
            // Kill under load: once the first claim of the round has been
            // answered, the others are in flight.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !tasks.iter().any(|t| t.is_finished()) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(tasks.iter().any(|t| t.is_finished()), "{backend:?}: no claim was answered before the kill");
            tokio::time::sleep(Duration::from_millis(2 * round)).await;
            op.kill();
            for t in tasks {
                if let Some(body) = t.await? {
                    let kp = &body["key_packages"][0];
                    if kp["last_resort"] == false {
                        let k = kp["key_package"].as_str().unwrap_or_default().to_owned();
                        assert!(served.insert(k), "{backend:?}: served twice");
                    }
                }
            }
            op.restart()?;
        }
        // No Welcome used any of them, so once their reservations run out
        // every KeyPackage is back: claims cut off by the kill, and the
        // served ones, alike. None was lost; none was served twice while
        // reserved (checked above).
        let mut left = 0;
        for _ in 0..80 {
            let (_, stock) = get(&op.url, "/v1/keypackages/stock", Some(&op.token(erin.id()))).await;
            left = stock["stock"][0]["one_time"].as_u64().unwrap_or(999) as usize;
            if left >= 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(left, 40, "{backend:?}: {} served, {left} back in the pool", served.len());
    }
    Ok(())
}

/// A Welcome naming a member whose key is not the one its operator bound
/// is refused by the client, which then does not join. Then the device is
/// removed, and its revocation outlives its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_welcome_with_unbound_member_key() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut op = Operator::start(&nats, "a.example")?;
    let alice = op.client("alice", "phone", 1).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    // An impostor with alice's identity but a key the operator never bound.
    let impostor = Local::new(alice.id().as_str());
    let token = op.token(alice.id());
    let mut group = impostor.group("mimi://a.example/r/trap", openmls::prelude::PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    let (got, body) = post(&op.url, "/v1/groups", Some(&token), impostor.group_info(&group)).await;
    assert_eq!(got, 201, "{body}");
    let (_, claimed) = claim(&op.url, &token, "mimi://a.example/u/bob", serde_json::json!({})).await;
    let kp_b64 = claimed["key_packages"][0]["key_package"].as_str().unwrap_or_default();
    let kp_bytes = base64::engine::general_purpose::STANDARD.decode(kp_b64)?;
    let bundle = impostor.add(&mut group, &kp_bytes);
    let (got, body) = post(&op.url, "/v1/messages", Some(&token), bundle).await;
    assert_eq!(got, 200, "{body}");
    let events = bob.sync().await?;
    assert!(
        events.iter().any(|e| matches!(e, Event::Failed { reason, .. } if reason.contains("does not match"))),
        "{events:?}"
    );
    assert!(bob.groups().is_empty());

    // A removed device's binding is revoked, and lookups say so.
    let (got, _) = tests::http()
        .delete(format!("{}/v1/devices/{}", op.url, tests::client::http::encode_segment(alice.id().as_str())))
        .bearer_auth(&token)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))?;
    assert_eq!(got, 204);
    let (got, body) = get(
        &op.url,
        &format!("/v1/identity/{}", tests::client::http::encode_segment(alice.id().as_str())),
        Some(&op.token(bob.id())),
    )
    .await;
    assert_eq!(got, 410, "{body}");
    let (got, body) = claim(&op.url, &op.token(bob.id()), "mimi://a.example/u/alice", serde_json::json!({})).await;
    assert_eq!((got, body["code"].as_str()), (404, Some("unknown_user")), "{body}");

    // Revocation outlives the token: the removed device's still-valid token
    // opens nothing, and above all cannot bind a key to the device again.
    let identity_path = format!("/v1/identity/{}", tests::client::http::encode_segment(alice.id().as_str()));
    let (got, body) =
        post(&op.url, "/v1/keypackages", Some(&token), Local::new(alice.id().as_str()).key_package()).await;
    assert_eq!((got, body["code"].as_str()), (410, Some("device_revoked")), "{body}");
    let mailbox = format!("/v1/devices/{}/mailbox", tests::client::http::encode_segment(alice.id().as_str()));
    for path in [identity_path.as_str(), "/v1/keypackages/stock", mailbox.as_str()] {
        let (got, body) = get(&op.url, path, Some(&token)).await;
        assert_eq!((got, body["code"].as_str()), (410, Some("device_revoked")), "{path}: {body}");
    }
    let (got, body) =
        post(&op.url, "/v1/messages", Some(&token), impostor.app_message(&mut group, "still here?")).await;
    assert_eq!((got, body["code"].as_str()), (410, Some("device_revoked")), "{body}");
    // Others still see the binding as revoked, after the attempts above.
    let (got, body) = get(&op.url, &identity_path, Some(&op.token(bob.id()))).await;
    assert_eq!(got, 410, "{body}");
    let binding = tests::proto::identity::SignedBinding {
        binding: body["binding"].as_str().unwrap_or_default().into(),
        signature: body["signature"].as_str().unwrap_or_default().into(),
    };
    let opened = binding.open(body["operator_key"].as_str().unwrap_or_default())?;
    assert!(opened.revoked, "{opened:?}");
    // A process that never saw the removal (nothing cached) refuses it too.
    op.restart()?;
    let (got, body) = get(&op.url, "/v1/keypackages/stock", Some(&token)).await;
    assert_eq!((got, body["code"].as_str()), (410, Some("device_revoked")), "{body}");
    Ok(())
}

/// A claimed KeyPackage that no Welcome used returns to its pool after the
/// reservation time; one that a Welcome used does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_reservations_return_to_the_pool() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.keydir.reservation_secs = 2)?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let _bob = op.client("bob", "phone", 2).await?;
    let _carol = op.client("carol", "phone", 2).await?;
    let stock = |d: DeviceId| {
        let (url, token) = (op.url.clone(), op.token(&d));
        async move {
            let (_, s) = get(&url, "/v1/keypackages/stock", Some(&token)).await;
            s["stock"][0]["one_time"].as_u64().unwrap_or(999)
        }
    };
    // Bob's KeyPackage is claimed and used in a Welcome; carol's is claimed
    // and never used.
    let g = alice.create_group("r").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    let (got, _) = claim(&op.url, &op.token(alice.id()), "mimi://a.example/u/carol", serde_json::json!({})).await;
    assert_eq!(got, 200);
    assert_eq!(stock(op.device_id("bob", "phone")).await, 1);
    assert_eq!(stock(op.device_id("carol", "phone")).await, 1);
    let mut back = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if stock(op.device_id("carol", "phone")).await == 2 {
            back = true;
            break;
        }
    }
    assert!(back, "carol's unused KeyPackage did not return");
    assert_eq!(stock(op.device_id("bob", "phone")).await, 1, "a used KeyPackage must not return");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_rate_limited_per_requester() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.keydir.claims_per_minute_per_requester = 2)?;
    let _bob = op.client("bob", "phone", 5).await?;
    let asker = op.token(&op.device_id("eve", "e"));
    let other = op.token(&op.device_id("frank", "f"));
    for _ in 0..2 {
        assert_eq!(claim(&op.url, &asker, "mimi://a.example/u/bob", serde_json::json!({})).await.0, 200);
    }
    let (got, body) = claim(&op.url, &asker, "mimi://a.example/u/bob", serde_json::json!({})).await;
    assert_eq!((got, body["code"].as_str()), (429, Some("rate_limited")), "{body}");
    assert_eq!(claim(&op.url, &other, "mimi://a.example/u/bob", serde_json::json!({})).await.0, 200, "per requester");
    Ok(())
}

/// Two ingest processes release the same expired reservations at once:
/// each KeyPackage goes back to its pool once, not twice (a twice-pooled
/// KeyPackage would be handed to two claimers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_releases_return_each_key_package_once() -> anyhow::Result<()> {
    use keydir::{Backend, ClaimRequest, KeyDirectory};
    let nats = NatsServer::start()?;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let cfg = config::Keydir { reservation_secs: 1, ..Default::default() };
    let directory = |js: async_nats::jetstream::Context| {
        let cfg = cfg.clone();
        async move {
            let store = Backend::JetStream(Box::new(keydir::JsStore::open(&js, 1).await?));
            let metrics = keydir::Metrics::new(&prometheus::Registry::new())?;
            anyhow::Ok(KeyDirectory::new(store, cfg, "a.example".into(), tests::operator_seed("a.example"), metrics))
        }
    };
    let (one, two) = (directory(js.clone()).await?, directory(js.clone()).await?);
    let erin = DeviceId::new("a.example", "erin", "e")?;
    let local = Local::new(erin.as_str());
    let mut batch = Vec::new();
    for _ in 0..20 {
        batch.extend(local.key_package());
    }
    let now = unix_now();
    one.upload(&erin, &batch, now).await?;
    let frank = DeviceId::new("a.example", "frank", "f")?;
    for _ in 0..20 {
        let got = one.claim(&frank, &erin.user(), &ClaimRequest::default(), now).await?;
        assert_eq!(got.claimed.len(), 1);
    }
    assert_eq!(one.store().count_one_time(&erin, 1).await?, 0);
    let later = now + 10;
    let (a, b) = tokio::join!(one.release_expired(later), two.release_expired(later));
    a?;
    b?;
    assert_eq!(one.store().count_one_time(&erin, 1).await?, 20, "a KeyPackage was pooled twice or lost");
    Ok(())
}

/// The settlement of a used KeyPackage is durable: its notice waits while
/// no ingest runs, and once one is back the reservation is settled, so the
/// used KeyPackage never returns to the pool when the reservation expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_key_package_stays_used_across_an_ingest_outage() -> anyhow::Result<()> {
    use openmls::prelude::tls_codec::Deserialize as _;
    use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};
    use openmls_traits::OpenMlsProvider as _;
    let nats = NatsServer::start()?;
    let mut op = Operator::start_with(&nats, "a.example", "run", |c| {
        c.keydir.backend = config::KeydirBackend::Jetstream;
        c.keydir.reservation_secs = 2;
    })?;
    let bob = op.client("bob", "phone", 2).await?;
    let alice = op.device_id("alice", "phone");
    let (_, claimed) = claim(&op.url, &op.token(&alice), "mimi://a.example/u/bob", serde_json::json!({})).await;
    let kp = base64::engine::general_purpose::STANDARD
        .decode(claimed["key_packages"][0]["key_package"].as_str().unwrap_or_default())?;
    let local = Local::new("x");
    let kp_ref = match MlsMessageIn::tls_deserialize_exact(kp.as_slice())?.extract() {
        MlsMessageBodyIn::KeyPackage(k) => {
            k.validate(local.provider.crypto(), ProtocolVersion::Mls10)?.hash_ref(local.provider.crypto())?
        }
        _ => anyhow::bail!("not a KeyPackage"),
    };
    let stock = |op: &Operator| {
        let (url, token) = (op.url.clone(), op.token(bob.id()));
        async move {
            let (_, s) = get(&url, "/v1/keypackages/stock", Some(&token)).await;
            s["stock"][0]["one_time"].as_u64()
        }
    };
    assert_eq!(stock(&op).await, Some(1));
    // The Welcome that used it is delivered while no ingest runs: its
    // notice must wait in JetStream.
    op.kill();
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let refs = vec![kp_ref.as_slice().to_vec()];
    js.publish(names::KP_USED_SUBJECT, tests::proto::wire::encode(&refs).into()).await?.await?;
    op.restart()?;
    // Well past the reservation time: the used KeyPackage is not back.
    for _ in 0..40 {
        assert_eq!(stock(&op).await, Some(1), "a used KeyPackage went back to the pool");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = js.get_stream(names::KP_USED_STREAM).await?;
    assert_eq!(stream.cached_info().state.messages, 0, "the notice was not consumed");
    Ok(())
}
