//! Faults that must not duplicate anything: a submission that reaches the
//! sequencer again long after it was appended is answered from the LOG, not
//! appended twice.

use std::time::Duration;

use futures::StreamExt as _;
use tests::proto::wire::{Submission, SubmissionKind, Verdict};
use tests::proto::{names, GroupId};
use tests::{sync_until, NatsServer, Operator};

/// The sequencer's memory of recent verdicts holds 512 submissions per
/// group. A copy of an appended submission that arrives after 600 others
/// (as after a crash between append and ack, with the group busy) gets the
/// original position from the append's duplicate ack, and the LOG keeps
/// one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_an_appended_submission_is_not_appended_twice() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("dup").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    let first = alice.encrypt_for_bench(&g, b"first")?;
    let original = alice.http().submit(first.clone(), None).await?;
    let bodies: Vec<Vec<u8>> =
        (0..600).map(|i| alice.encrypt_for_bench(&g, format!("m{i}").as_bytes())).collect::<Result<_, _>>()?;
    let http = alice.http().clone();
    let results: Vec<_> = futures::stream::iter(bodies.into_iter().map(|b| {
        let http = http.clone();
        async move { http.submit(b, None).await }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    let last = results.into_iter().map(|r| r.map(|a| a.position)).collect::<Result<Vec<_>, _>>()?;
    let last = last.into_iter().max().unwrap_or_default();

    // The same submission again, past SUBMIT's dedup (a new Nats-Msg-Id).
    let client = tests::nats_connect(&nats.url()).await?;
    let sub = Submission {
        id: tests::proto::wire::submission_id(alice.id(), &[b"msg", &first]),
        device: alice.id().clone(),
        group: GroupId::parse(&g)?,
        kind: SubmissionKind::Message { message: first, welcome: None, group_info: None },
        origin: None,
    };
    let mut verdicts = client.subscribe(names::verdict_subject(&sub.id)).await?;
    let js = async_nats::jetstream::new(client);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(tests::proto::wire::encode(&sub).into())
        .message_id("a-late-copy");
    js.send_publish(names::submit_subject(&sub.group), publish).await?.await?;
    let verdict = tokio::time::timeout(Duration::from_secs(30), verdicts.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no verdict"))?;
    assert_eq!(
        Verdict::from_bytes(&verdict.payload)?,
        Verdict::Accepted { position: original.position, epoch: original.epoch },
        "the late copy was not answered with the original position"
    );
    assert_eq!(tests::metric(&op, "mlsfed_sequencer_duplicate_appends_total").await, 1.0);

    // Bob gets "first" once, and every message once, in order.
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let got = bob.messages(&g);
    assert_eq!(got.iter().filter(|m| m.2 == "first").count(), 1);
    assert_eq!(got.len(), 601, "bob got {} messages", got.len());
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    Ok(())
}

/// A Commit whose submit timed out (no sequencer running) is kept by its
/// sender; the hub applies it once a sequencer is back, and the sender
/// merges it from its echo instead of being stranded an epoch behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_timed_out_does_not_strand_its_sender() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let front = Operator::start_with(&nats, "a.example", "ingest", |c| c.limits.submit_timeout_ms = 500)?;
    let _fanout = front.worker("fanout")?;
    let mut sequencer = front.worker("sequencer")?;
    let mut alice = front.client("alice", "phone", 2).await?;
    let mut bob = front.client("bob", "phone", 2).await?;
    let g = alice.create_group("timeout").await?;
    alice.add(&g, &[front.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    assert_eq!(alice.epoch(&g), Some(1));

    sequencer.kill();
    let err = alice.update(&g).await.expect_err("no sequencer, no verdict");
    assert_eq!(err.code(), Some(tests::proto::ErrorCode::Timeout), "{err}");
    assert!(alice.has_pending_commit(&g), "the undecided Commit was thrown away");

    let _back = front.worker("sequencer")?;
    sync_until(&mut [&mut alice, &mut bob], Duration::from_secs(60), |c| c.epoch(&g) == Some(2)).await?;
    assert!(!alice.has_pending_commit(&g));
    let p = alice.send(&g, "after the timeout").await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|x| *x >= p)).await?;
    assert_eq!(bob.messages(&g).last().map(|m| m.2.as_str()), Some("after the timeout"));
    assert_eq!(alice.epoch_authenticator(&g), bob.epoch_authenticator(&g));
    assert!(alice.failures().is_empty() && bob.failures().is_empty(), "{:?} {:?}", alice.failures(), bob.failures());
    Ok(())
}

/// A LOG entry whose predecessor never comes is retried with backoff a
/// bounded number of times, then moved to MLSFED_DEAD with its reason and
/// counted, instead of looping fanout forever; other groups keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_without_its_predecessor_is_dead_lettered_not_looped() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| {
        c.streams.max_deliver = 3;
        c.streams.retry_base_ms = 50;
    })?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("alive").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    // Position 5 of a group whose positions 1 to 4 never reach this fanout.
    let orphan = tests::proto::wire::LogEntry {
        group: GroupId::parse("mimi://a.example/r/orphan")?,
        position: 5,
        prev_position: 4,
        epoch: 1,
        kind: tests::proto::wire::EntryKind::Application,
        sender: alice.id().clone(),
        submission_id: "orphan".into(),
        message: b"orphan".to_vec(),
        removed: vec![],
        welcome: None,
        welcome_recipients: vec![],
    };
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let subject = names::log_subject(&orphan.group, tests::config::Config::default().streams.partitions);
    js.publish(subject, tests::proto::wire::encode(&orphan).into()).await?.await?;
    let dead = "mlsfed_fanout_dead_letters_total{reason=\"predecessor_missing\"}";
    tests::wait_metric(&op, dead, Duration::from_secs(30), |v| v == 1.0).await?;
    let stream = js.get_stream(names::DEAD_STREAM).await?;
    let letter = stream.get_last_raw_message_by_subject(&names::dead_subject("fanout")).await?;
    let letter: tests::proto::wire::DeadLetter = serde_json::from_slice(&letter.payload)?;
    assert_eq!((letter.reason.as_str(), letter.delivered), ("predecessor_missing", 3), "{letter:?}");
    assert!(tests::metric(&op, "mlsfed_fanout_order_waits_total").await <= 3.0, "the orphan was retried unbounded");

    let p = alice.send(&g, "still flowing").await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.positions(&g).last().is_some_and(|x| *x >= p)).await?;
    Ok(())
}

/// Records carry a format version. A LOG entry written before versions
/// existed (format 0) is still read and delivered; one of a newer format
/// is refused by name and set aside in MLSFED_DEAD, not dropped silently
/// and not mistaken for garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_records_are_read_and_newer_ones_refused_by_name() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let bob = op.client("bob", "phone", 1).await?;
    // A group's first entry makes its sender a member who may read it.
    let entry = |room: &str| -> anyhow::Result<tests::proto::wire::LogEntry> {
        Ok(tests::proto::wire::LogEntry {
            group: GroupId::parse(&format!("mimi://a.example/r/{room}"))?,
            position: 1,
            prev_position: 0,
            epoch: 0,
            kind: tests::proto::wire::EntryKind::Created,
            sender: bob.id().clone(),
            submission_id: room.into(),
            message: room.as_bytes().to_vec(),
            removed: vec![],
            welcome: None,
            welcome_recipients: vec![],
        })
    };
    let partitions = tests::config::Config::default().streams.partitions;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    // Format 0: the bare postcard, as this operator wrote it before.
    let old = entry("legacy")?;
    let bytes = postcard_bytes(&old);
    js.publish(names::log_subject(&old.group, partitions), bytes.into()).await?.await?;
    // A newer format than this build knows.
    let new = entry("future")?;
    let mut bytes = tests::proto::wire::encode(&new);
    bytes[2] = tests::proto::wire::RECORD_VERSION + 1;
    js.publish(names::log_subject(&new.group, partitions), bytes.into()).await?.await?;

    let dead = "mlsfed_fanout_dead_letters_total{reason=\"unsupported_version\"}";
    tests::wait_metric(&op, dead, Duration::from_secs(30), |v| v == 1.0).await?;
    let stream = js.get_stream(names::DEAD_STREAM).await?;
    let letter = stream.get_last_raw_message_by_subject(&names::dead_subject("fanout")).await?;
    let letter: tests::proto::wire::DeadLetter = serde_json::from_slice(&letter.payload)?;
    assert_eq!(letter.reason, "unsupported_version", "{letter:?}");
    let legacy = "mimi://a.example/r/legacy";
    let mut legacy_delivered = false;
    for _ in 0..100 {
        if bob.http().groups().await?.iter().any(|h| h.group == legacy && h.position == 1) {
            legacy_delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(legacy_delivered, "a format-0 LOG entry was not applied by fanout");
    let page = bob.http().entries(legacy, 0, None, 10).await?;
    assert_eq!(page.entries.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["bGVnYWN5"], "{page:?}");
    assert!(!bob.http().groups().await?.iter().any(|h| h.group.ends_with("/future")), "a newer record was applied");
    Ok(())
}

/// A mailbox item of a newer format (written by a newer fanout during a
/// rolling upgrade) is never passed: this ingest ends the device's page
/// before it (`unavailable` when it is the first), so no ack can purge it
/// unread; what comes before it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_item_of_a_newer_format_is_never_passed() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let bob = op.client("bob", "phone", 1).await?;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let notice = |text: &str| tests::proto::wire::MailboxItem {
        group: None,
        position: 0,
        epoch: 0,
        kind: tests::proto::wire::EntryKind::Notice,
        own: false,
        message: serde_json::to_vec(&serde_json::json!({ "text": text })).unwrap_or_default(),
        log_seq: 0,
    };
    let subject = names::mailbox_subject(bob.id());
    let before = js.publish(subject.clone(), tests::proto::wire::encode(&notice("before")).into()).await?.await?;
    let mut newer = tests::proto::wire::encode(&notice("newer"));
    newer[2] = tests::proto::wire::RECORD_VERSION + 1;
    js.publish(subject.clone(), newer.into()).await?.await?;
    js.publish(subject.clone(), tests::proto::wire::encode(&notice("after")).into()).await?.await?;

    // The device may have other items before these (a notice of its
    // KeyPackage stock): the page holds "before" and ends there.
    let page: Vec<u64> = bob.http().fetch(0, 10).await?.iter().map(|i| i.seq).collect();
    assert_eq!(page.last(), Some(&before.sequence), "the page passed the newer item: {page:?}");
    match bob.http().fetch(before.sequence, 10).await {
        Err(e) => assert_eq!(e.code(), Some(tests::proto::ErrorCode::Unavailable), "{e}"),
        Ok(items) => anyhow::bail!("the newer item was passed: {items:?}"),
    }
    Ok(())
}

/// A record as format 0 wrote it: postcard with no marker.
fn postcard_bytes(entry: &tests::proto::wire::LogEntry) -> Vec<u8> {
    tests::proto::wire::encode(entry)[3..].to_vec()
}
