//! WebSocket push: items arrive as they are delivered, in order, and a
//! reconnect from the last cursor resumes without loss or repetition.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tests::client::Item;
use tests::{settle, NatsServer, Operator};
use tokio_tungstenite::tungstenite::Message;

async fn next_item<S>(ws: &mut S) -> anyhow::Result<Item>
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_in_order_and_resumed_from_the_cursor() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("ws").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    let start = bob.cursor();

    let mut ws = bob.http().websocket(start).await?;
    let mut positions = Vec::new();
    for i in 0..5 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let item = next_item(&mut ws).await?;
        if item.kind == "application" {
            got.push(item);
        }
    }
    assert_eq!(got.iter().map(|i| i.position).collect::<Vec<_>>(), positions);
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    // Ack the first three over the socket, drop it, send more, reconnect
    // from the last cursor seen: the rest arrives once, in order.
    ws.send(Message::Text(format!("{{\"ack\": {}}}", got[2].seq).into())).await?;
    drop(ws);
    for i in 5..8 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }
    let mut ws = bob.http().websocket(got[4].seq).await?;
    let mut rest = Vec::new();
    while rest.len() < 3 {
        let item = next_item(&mut ws).await?;
        if item.kind == "application" {
            rest.push(item.position);
        }
    }
    assert_eq!(rest, positions[5..]);
    // The items the device applied from the socket decrypt like fetched
    // ones: each is a message with its text, none a failure.
    for (i, item) in got.iter().enumerate() {
        match bob.apply(item).await? {
            Some(tests::client::Event::Message { text, .. }) => assert_eq!(text, format!("m{i}")),
            other => panic!("item {i} did not apply as a message: {other:?}"),
        }
    }
    // Acked items are gone from the mailbox; the others are still there.
    let left = bob.http().fetch(start, 256).await?;
    assert!(!left.is_empty(), "the unacked items are gone too");
    assert!(left.iter().all(|i| i.seq > got[2].seq), "acked items remain");
    assert!(left.iter().any(|i| i.seq == got[3].seq), "an unacked item is gone");
    Ok(())
}
