//! WebSocket push: the Welcome arrives from the mailbox, the group's entries
//! as they are appended, in order; a reconnect from the last group cursor
//! resumes without loss or repetition.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tests::client::http::Frame;
use tests::client::Item;
use tests::{settle, NatsServer, Operator};
use tokio_tungstenite::tungstenite::Message;

async fn next_frame<S>(ws: &mut S) -> anyhow::Result<Frame>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??;
        if let Message::Text(t) = frame {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

async fn next_entries<S>(ws: &mut S, n: usize) -> anyhow::Result<Vec<Item>>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut got = Vec::new();
    while got.len() < n {
        match next_frame(ws).await? {
            Frame::Entry(e) if e.kind == "application" => got.push(e),
            Frame::Error { code, message, .. } => anyhow::bail!("error frame {code:?}: {message}"),
            _ => {}
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_in_order_and_resumed_from_the_cursor() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("ws").await?;
    settle(&mut [&mut bob]).await?;

    // The Welcome is pushed from the mailbox, with the group cursor to
    // follow the group from.
    let mut ws = bob.http().websocket(bob.cursor()).await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    let welcome = loop {
        match next_frame(&mut ws).await? {
            Frame::Mailbox(i) if i.kind == "welcome" => break i,
            _ => {}
        }
    };
    assert!(welcome.group_seq.is_some_and(|s| s > 0), "{welcome:?}");
    bob.apply(&welcome).await?;
    assert!(bob.groups().contains(&g));
    ws.send(Message::Text(bob.follow_frame().into())).await?;

    let mut positions = Vec::new();
    for i in 0..5 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }
    let got = next_entries(&mut ws, 5).await?;
    assert_eq!(got.iter().map(|i| i.position).collect::<Vec<_>>(), positions);
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq && w[1].prev_position == w[0].position));
    // Apply three, drop the socket, send more, reconnect from the device's
    // own cursor: the rest arrives once, in order.
    for (i, item) in got.iter().take(3).enumerate() {
        match bob.apply_entry(item).await? {
            Some(tests::client::Event::Message { text, .. }) => assert_eq!(text, format!("m{i}")),
            other => panic!("entry {i} did not apply as a message: {other:?}"),
        }
    }
    drop(ws);
    for i in 5..8 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }
    let mut ws = bob.http().websocket(bob.cursor()).await?;
    ws.send(Message::Text(bob.follow_frame().into())).await?;
    let rest = next_entries(&mut ws, 5).await?;
    assert_eq!(rest.iter().map(|i| i.position).collect::<Vec<_>>(), positions[3..]);
    for (i, item) in rest.iter().enumerate() {
        match bob.apply_entry(item).await? {
            Some(tests::client::Event::Message { text, .. }) => assert_eq!(text, format!("m{}", i + 3)),
            other => panic!("entry {} did not apply as a message: {other:?}", i + 3),
        }
    }
    // Nothing more comes: each entry was pushed once on this socket.
    let extra = tokio::time::timeout(Duration::from_millis(700), next_entries(&mut ws, 1)).await;
    assert!(extra.is_err(), "an entry was pushed twice: {extra:?}");

    // Following a group one is not a member of is refused on the socket.
    let carol = op.client("carol", "phone", 1).await?;
    let mut ws = carol.http().websocket(0).await?;
    ws.send(Message::Text(format!("{{\"follow\": {{\"{g}\": {{\"after\": 0}}}}}}").into())).await?;
    match next_frame(&mut ws).await? {
        Frame::Error { code, group, .. } => {
            assert_eq!(code, tests::proto::ErrorCode::NotAMember);
            assert_eq!(group.as_deref(), Some(g.as_str()));
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    Ok(())
}
