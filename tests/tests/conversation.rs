//! One operator carries a real MLS conversation end to end: KeyPackages,
//! group creation, a two-member add, messages (one device offline),
//! an update, a removal, and state that survives a client restart.

use std::process::Command;

use tests::client::Event;
use tests::proto::ErrorCode;
use tests::{binary, NatsServer, Operator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converse_in_hub_order() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 3).await?;
    let mut bob = op.client("bob", "phone", 3).await?;
    let mut carol = op.client("carol", "laptop", 3).await?;

    let g = alice.create_group("room1").await?;
    assert!(g.starts_with("mimi://a.example/r/"));
    alice.add(&g, &[op.user_id("bob"), op.user_id("carol")]).await?;
    bob.sync().await?;
    carol.sync().await?;
    assert!(bob.log.iter().any(|e| matches!(e, Event::Joined { epoch: 1, .. })), "{:?}", bob.log);
    assert!(carol.log.iter().any(|e| matches!(e, Event::Joined { epoch: 1, .. })), "{:?}", carol.log);

    // Carol goes offline; alice and bob talk.
    let p1 = alice.send(&g, "a1").await?;
    let p2 = bob.send(&g, "b1").await?;
    let p3 = alice.send(&g, "a2").await?;
    assert!(p1 < p2 && p2 < p3);
    alice.sync().await?;
    bob.sync().await?;
    // Carol reconnects and catches up from her cursor, in hub order.
    carol.sync().await?;
    let want = vec![
        (p1, op.device_id("alice", "phone").to_string(), "a1".to_string()),
        (p2, op.device_id("bob", "phone").to_string(), "b1".to_string()),
        (p3, op.device_id("alice", "phone").to_string(), "a2".to_string()),
    ];
    for c in [&alice, &bob, &carol] {
        assert_eq!(c.messages(&g), want, "device {}", c.id());
    }
    let c1 = carol.send(&g, "c1").await?;

    // Bob rotates his leaf; alice removes carol.
    bob.update(&g).await?;
    alice.sync().await?;
    carol.sync().await?;
    assert_eq!(alice.epoch(&g), Some(2));
    assert_eq!(carol.epoch(&g), Some(2));
    // Carol encrypts before she learns of her removal; the hub refuses her.
    alice.remove(&g, &op.device_id("carol", "laptop")).await?;
    let refused = carol.send(&g, "still here?").await.expect_err("a removed member cannot send");
    assert_eq!(refused.code(), Some(ErrorCode::NotAMember), "{refused}");
    carol.sync().await?;
    assert!(matches!(carol.log.last(), Some(Event::Removed { .. })), "{:?}", carol.log);
    assert!(carol.groups().is_empty());

    let a3 = alice.send(&g, "a3").await?;
    bob.sync().await?;
    alice.sync().await?;

    // Every device saw every position once, strictly increasing.
    for c in [&alice, &bob, &carol] {
        let ps = c.positions(&g);
        assert!(ps.windows(2).all(|w| w[0] < w[1]), "device {} positions {ps:?}", c.id());
        assert!(c.failures().is_empty(), "{:?}", c.failures());
    }
    let texts = |c: &tests::Client| c.messages(&g).into_iter().map(|m| m.2).collect::<Vec<_>>();
    assert_eq!(texts(&alice), ["a1", "b1", "a2", "c1", "a3"]);
    assert_eq!(texts(&bob), ["a1", "b1", "a2", "c1", "a3"]);
    assert_eq!(texts(&carol), ["a1", "b1", "a2", "c1"]);
    assert!(c1 < a3);
    assert_eq!(alice.epoch_authenticator(&g), bob.epoch_authenticator(&g));

    // A restarted client process resumes from its stored state.
    let epoch_before = bob.epoch(&g);
    bob.reopen()?;
    assert_eq!(bob.epoch(&g), epoch_before);
    alice.send(&g, "after restart").await?;
    bob.sync().await?;
    assert_eq!(texts(&bob).last().map(String::as_str), Some("after restart"));
    Ok(())
}

/// The same conversation driven through the `mlsfed-client` CLI, one process
/// per command: the device's openmls state lives in sled between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_state_survives_process_restarts() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let dave = op.device_id("dave", "cli");
    let home = tempfile::tempdir()?;
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(binary("mlsfed-client"))
            .arg("--home")
            .arg(home.path())
            .args(["--server", &op.url, "--token", &op.token(&dave), "--device", dave.as_str()])
            .args(args)
            .output()?;
        anyhow::ensure!(out.status.success(), "mlsfed-client {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    cli(&["publish-key-packages", "--count", "2"])?;
    let g = alice.create_group("cli-room").await?;
    alice.add(&g, &[op.user_id("dave")]).await?;
    let out = cli(&["sync"])?;
    assert!(out.contains("Joined"), "{out}");
    alice.send(&g, "hello dave").await?;
    let out = cli(&["sync"])?;
    assert!(out.contains("hello dave"), "{out}");
    cli(&["send", &g, "hello alice"])?;
    cli(&["update", &g])?;
    alice.sync().await?;
    assert_eq!(alice.messages(&g).last().map(|m| m.2.as_str()), Some("hello alice"));
    assert_eq!(alice.epoch(&g), Some(2));
    let status = cli(&["status"])?;
    assert!(status.contains("\"epoch\":2"), "{status}");
    Ok(())
}

/// A Welcome carries the whole ratchet tree, and it is the same bytes for
/// every device its Commit adds: it is stored once, and each added device's
/// mailbox item points to it, so adding k devices to a group of n does not
/// store k copies of n leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_is_stored_once_for_every_device_it_adds() -> anyhow::Result<()> {
    use tests::proto::wire::{EntryKind, MailboxItem};
    use tests::proto::{names, GroupId};
    const ADDED: usize = 6;
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 3).await?;
    let mut joiners = Vec::new();
    for i in 0..ADDED {
        joiners.push(op.client(&format!("user{i}"), "phone", 3).await?);
    }
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let mailbox = js.get_stream(names::MAILBOX_STREAM).await?;
    let g = alice.create_group("room").await?;
    let users: Vec<_> = (0..ADDED).map(|i| op.user_id(&format!("user{i}"))).collect();
    alice.add(&g, &users).await?;

    // Each joiner's own Welcome item, read before its ack purges it: a
    // pointer without the Welcome's bytes.
    let mut items = 0;
    for j in &joiners {
        let subject = names::mailbox_subject(j.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let item = 'found: loop {
            let mut from = 1;
            while let Ok(m) = mailbox.direct_get_next_for_subject(subject.as_str(), Some(from)).await {
                from = m.sequence + 1;
                let item: MailboxItem = tests::proto::wire::decode(&m.payload)?;
                if item.kind == EntryKind::Welcome {
                    break 'found (item, m.payload.len());
                }
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "no Welcome item for {}", j.id());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(item.0.message.is_empty(), "{} got its own copy of the Welcome", j.id());
        items += item.1;
    }
    // One Welcome stored, at its Commit's subject.
    let welcome = mailbox.direct_get_next_for_subject(names::WELCOME_WILDCARD, None).await?;
    let group = GroupId::parse(&g)?;
    let stored: MailboxItem = tests::proto::wire::decode(&welcome.payload)?;
    assert_eq!(stored.group.as_ref(), Some(&group));
    assert_eq!(welcome.subject.as_str(), names::welcome_subject(&group, stored.position));
    assert!(!stored.message.is_empty());
    let another = mailbox.direct_get_next_for_subject(names::WELCOME_WILDCARD, Some(welcome.sequence + 1)).await;
    assert!(another.is_err(), "a second Welcome was stored");
    // Six pointers together are smaller than the one Welcome they name.
    assert!(items < welcome.payload.len(), "{ADDED} items of {items} bytes for a Welcome of {}", welcome.payload.len());

    // Every joiner joins from it, and reads what the group says next.
    for j in &mut joiners {
        j.sync().await?;
        assert!(j.log.iter().any(|e| matches!(e, Event::Joined { epoch: 1, .. })), "{:?}", j.log);
    }
    alice.send(&g, "welcome, all").await?;
    for j in &mut joiners {
        j.sync().await?;
        assert_eq!(j.messages(&g).into_iter().map(|m| m.2).collect::<Vec<_>>(), ["welcome, all"]);
    }
    Ok(())
}

/// The reference client never passes a Welcome item that comes without its
/// bytes (an ingest of a version before shared Welcomes hands one out so
/// during an upgrade): it refuses the item, and its mailbox cursor stays
/// before it, so the item is read again rather than lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_does_not_pass_a_welcome_without_its_bytes() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut bob = op.client("bob", "phone", 1).await?;
    let before = bob.cursor();
    let item: tests::client::http::Item = serde_json::from_value(serde_json::json!({
        "seq": before + 7, "group": "mimi://a.example/r/room", "position": 3, "epoch": 1,
        "kind": "welcome", "own": false, "message": "",
    }))?;
    let refused = bob.apply(&item).await.expect_err("a Welcome without bytes is not applied");
    assert!(refused.to_string().contains("without its bytes"), "{refused}");
    assert_eq!(bob.cursor(), before, "the cursor passed the Welcome");
    Ok(())
}
