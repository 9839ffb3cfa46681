//! Retention: a group's public state outlives the LOG entries that built it.
//! The hub checkpoints it durably (chunked, in the `mlsfed_state` object
//! store, named by a pointer in `mlsfed_groups`), so after LOG's max age
//! deleted every entry of a 1000-member group and the operator restarted,
//! the group goes on; a device whose unread entries expired is told so.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use tests::proto::{names, ErrorCode, GroupId};
use tests::raw::Local;
use tests::{metric, nats_connect, post, sync_until, wait_metric, Client, NatsServer, Operator};

/// Members besides alice, bob and carol: 1000 in all.
const CHEAP_MEMBERS: usize = 997;
/// Members added per Commit: a Commit and its Welcome (which carries the
/// ratchet tree) stay well under NATS' 1 MiB max payload.
const ADD_BATCH: usize = 100;
const LOG_MAX_AGE_SECS: u64 = 4;

/// Starts the (killed) operator again, points `clients` at it, and waits
/// until the new process owns every partition: until then nothing reads
/// LOG, and with a max age of seconds entries would expire before fanout
/// saw them.
async fn restart(op: &mut Operator, clients: &mut [&mut Client]) -> anyhow::Result<()> {
    op.restart()?;
    for c in clients.iter_mut() {
        c.reconnect(&op.url)?;
    }
    for role in ["sequencer", "fanout"] {
        let owned = format!("mlsfed_{role}_partitions_owned");
        wait_metric(op, &owned, Duration::from_secs(30), |v| v == 16.0).await?;
    }
    Ok(())
}

/// The KV pointer of group `g`, parsed.
async fn pointer(js: &jetstream::Context, g: &GroupId) -> anyhow::Result<serde_json::Value> {
    let pointers = js.get_key_value(names::GROUPS_BUCKET).await?;
    let value = pointers.get(names::group_key(g)).await?.context("no checkpoint pointer")?;
    Ok(serde_json::from_slice(&value)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1000_member_group_outlives_its_expired_log_and_a_restart() -> anyhow::Result<()> {
    let started = Instant::now();
    let nats = NatsServer::start()?;
    let mut op = Operator::start_with(&nats, "a.example", "run", |c| {
        c.streams.log_max_age_secs = LOG_MAX_AGE_SECS;
        // The dedup windows may not outlast the LOG.
        c.streams.duplicate_window_secs = 2;
        c.keydir.claims_per_minute_per_requester = 1_000_000;
        c.keydir.claims_per_minute_per_user = 1_000_000;
    })?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let mut bob = op.client("bob", "phone", 1).await?;
    let mut carol = op.client("carol", "phone", 1).await?;

    // 997 cheap members: a raw openmls identity each, one KeyPackage
    // uploaded with that device's own token.
    let uploads = (0..CHEAP_MEMBERS).map(|i| {
        let id = op.device_id(&format!("m{i}"), "d");
        let token = op.token(&id);
        let url = op.url.clone();
        async move {
            let kp = Local::new(id.as_str()).key_package();
            let (status, body) = post(&url, "/v1/keypackages", Some(&token), kp).await;
            anyhow::ensure!((200..300).contains(&status), "upload for {id}: {status} {body}");
            anyhow::Ok(())
        }
    });
    let uploaded: Vec<anyhow::Result<()>> = futures::stream::iter(uploads).buffer_unordered(16).collect().await;
    uploaded.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let built = Instant::now();

    let g = alice.create_group("big").await?;
    let gid = GroupId::parse(&g)?;
    let mut users: Vec<_> = (0..CHEAP_MEMBERS).map(|i| op.user_id(&format!("m{i}"))).collect();
    // Bob and carol come last, so they join the group as it ends up.
    users.push(op.user_id("bob"));
    users.push(op.user_id("carol"));
    for batch in users.chunks(ADD_BATCH) {
        alice.add(&g, batch).await?;
    }
    assert_eq!(alice.members(&g).len(), 1000);
    let last_commit = alice.applied(&g);
    let joined = sync_until(&mut [&mut bob, &mut carol], Duration::from_secs(60), |c| c.groups().contains(&g)).await;
    if let Err(e) = joined {
        anyhow::bail!("{e}; bob: {:?}; carol: {:?}", bob.failures(), carol.failures());
    }
    let grown = Instant::now();

    alice.send(&g, "everyone reads this").await?;
    let read_all = |c: &Client| c.messages(&g).iter().any(|m| m.2 == "everyone reads this");
    sync_until(&mut [&mut alice, &mut bob, &mut carol], Duration::from_secs(30), read_all).await?;
    // Carol goes offline; she misses the next message.
    let missed = alice.send(&g, "carol misses this").await?;
    // Everyone else reads it (the sender too: its own entries expire as well).
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(30), |c| c.applied(&g) == missed).await?;
    let last_seq = bob.group_cursor(&g);

    // The state is checkpointed at the last Commit: a pointer in KV, the
    // state itself a chunked object.
    let js = jetstream::new(nats_connect(&nats.url()).await?);
    let states = js.get_object_store(names::STATE_BUCKET).await?;
    let at = pointer(&js, &gid).await?;
    assert_eq!(at["v"], 1, "{at}");
    assert_eq!(at["position"], last_commit, "{at}");
    let object = at["object"].as_str().context("pointer names no object")?.to_owned();
    let info = states.info(&object).await?;
    eprintln!(
        "checkpoint of the 1000-member group: {} bytes in {} chunks; group built in {:?} (uploads {:?})",
        info.size,
        info.chunks,
        grown - started,
        built - started
    );
    assert!(info.chunks > 1, "a 1000-member state is stored in chunks: {info:?}");
    let saves = metric(&op, "mlsfed_sequencer_checkpoint_seconds_count").await;
    let spent = metric(&op, "mlsfed_sequencer_checkpoint_seconds_sum").await;
    eprintln!("{saves} checkpoints, {:.1} ms each on average", spent / saves * 1000.0);

    // Retention deletes every LOG entry of the group (bounded wait).
    let log = js.get_stream(names::LOG_STREAM).await?;
    let deadline = Instant::now() + Duration::from_secs(LOG_MAX_AGE_SECS * 5 + 10);
    while log.get_info().await?.state.first_sequence <= last_seq {
        anyhow::ensure!(Instant::now() < deadline, "LOG entries up to {last_seq} were not deleted by max age");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A restart: no cache survives; the state comes from the checkpoint.
    restart(&mut op, &mut [&mut alice, &mut bob, &mut carol]).await?;
    let after = alice.send(&g, "after the restart").await?;
    assert_eq!(after, missed + 1, "positions go on from the last one, whose entry expired");
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(30), |c| c.applied(&g) == after).await?;
    assert_eq!(bob.messages(&g).last().map(|m| m.2.as_str()), Some("after the restart"));
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_restores_total").await, 1.0);
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_fallbacks_total").await, 0.0);

    // Carol's next entry is the one after what expired: she is told.
    let err = carol
        .http()
        .entries(&g, carol.group_cursor(&g), Some(carol.applied(&g)), 256)
        .await
        .err()
        .context("reading past expired entries succeeded")?;
    assert_eq!(err.code(), Some(ErrorCode::HistoryExpired), "{err}");

    // A new Commit is validated against the restored state and accepted.
    let epoch = alice.epoch(&g);
    alice.update(&g).await?;
    assert_eq!(alice.epoch(&g), epoch.map(|e| e + 1));
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.epoch(&g) == alice.epoch(&g)).await?;
    assert_eq!(bob.epoch_authenticator(&g), alice.epoch_authenticator(&g));
    assert!(bob.failures().is_empty(), "{:?}", bob.failures());
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_failures_total").await, 0.0);

    // The Commit moved the pointer; the checkpoint it replaced is gone,
    // tombstone included: the store holds one object's chunks and metadata.
    let at = pointer(&js, &gid).await?;
    assert_eq!(at["position"], alice.applied(&g), "{at}");
    let current = states.info(at["object"].as_str().context("no object")?).await?;
    assert!(states.info(&object).await.is_err(), "the superseded checkpoint is still there");
    let held = js.get_stream(names::STATE_STREAM).await?.get_info().await?.state.messages;
    assert_eq!(held, current.chunks as u64 + 1, "only the current checkpoint is stored");
    eprintln!("test took {:?}", started.elapsed());
    Ok(())
}

/// A checkpoint in the format before objects (the whole state in the KV
/// value) is used and rewritten as an object; a pointer whose object is
/// gone falls back to replaying the LOG from its start (counted), and the
/// group gets a usable checkpoint again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_lost_checkpoints_are_replaced() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let mut bob = op.client("bob", "phone", 1).await?;
    let g = alice.create_group("room").await?;
    let gid = GroupId::parse(&g)?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let js = jetstream::new(nats_connect(&nats.url()).await?);
    let pointers = js.get_key_value(names::GROUPS_BUCKET).await?;
    let states = js.get_object_store(names::STATE_BUCKET).await?;

    // The older format: the snapshot itself as the KV value.
    let at = pointer(&js, &gid).await?;
    let object = at["object"].as_str().context("no object")?.to_owned();
    let mut snapshot = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut states.get(&object).await?, &mut snapshot).await?;
    op.kill();
    pointers.put(names::group_key(&gid), snapshot.into()).await?;
    restart(&mut op, &mut [&mut alice, &mut bob]).await?;
    let p = alice.send(&g, "from the legacy snapshot").await?;
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(30), |c| c.applied(&g) == p).await?;
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_restores_total").await, 1.0);
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_fallbacks_total").await, 0.0);
    let at = pointer(&js, &gid).await?;
    assert_eq!((at["v"].clone(), at["position"].clone()), (1.into(), p.into()), "rewritten as a checkpoint: {at}");

    // The object the pointer names is lost: the LOG still holds the whole
    // group, so replaying it from the start rebuilds the state.
    op.kill();
    states.delete(at["object"].as_str().context("no object")?).await?;
    restart(&mut op, &mut [&mut alice, &mut bob]).await?;
    let p = alice.send(&g, "from the LOG").await?;
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(30), |c| c.applied(&g) == p).await?;
    assert_eq!(metric(&op, "mlsfed_sequencer_checkpoint_fallbacks_total").await, 1.0);
    let at = pointer(&js, &gid).await?;
    assert_eq!(at["position"], p, "{at}");
    states.info(at["object"].as_str().context("no object")?).await?;

    // And the group goes on: a Commit validated against the rebuilt state.
    alice.update(&g).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.epoch(&g) == alice.epoch(&g)).await?;
    assert_eq!(bob.epoch_authenticator(&g), alice.epoch_authenticator(&g));
    assert_eq!(bob.messages(&g).len(), 2);
    Ok(())
}

/// A group that goes quiet has its last position in its checkpoint once
/// its sequencer task lets it go, not only after every 32 messages: its
/// state then never rests on LOG entries that retention may delete while
/// nobody writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_groups_checkpoint_holds_its_last_position() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.streams.group_idle_secs = 1)?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let g = alice.create_group("quiet").await?;
    let mut last = 0;
    for i in 0..3 {
        last = alice.send(&g, &format!("message {i}")).await?;
    }
    let checkpointed = || -> anyhow::Result<Option<u64>> {
        let out = op.admin(&["admin", "groups", "show", &g, "--json"])?;
        let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())?;
        Ok(row["checkpoint_position"].as_u64())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = checkpointed()?;
    while seen != Some(last) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        seen = checkpointed()?;
    }
    assert_eq!(seen, Some(last), "the idle group's checkpoint is not at its last position");
    Ok(())
}
