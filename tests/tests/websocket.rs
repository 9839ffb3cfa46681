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

/// Waits until the operator runs the socket: it answers a frame that does
/// not parse with `invalid_request`.
async fn until_up(ws: &mut tests::client::http::WebSocket) -> anyhow::Result<()> {
    ws.send(Message::Text("not json".into())).await?;
    match next_frame(ws).await? {
        Frame::Error { code: tests::proto::ErrorCode::InvalidRequest, .. } => Ok(()),
        other => anyhow::bail!("expected invalid_request, got {other:?}"),
    }
}

/// Whether the operator closes the socket within `limit` (anything else
/// it sends meanwhile is skipped).
async fn closes_within(ws: &mut tests::client::http::WebSocket, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
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

/// Reads frames until every ref in `refs` has its answer; returns them by
/// ref. An entry or mailbox frame on the way is skipped; an answer twice,
/// or to a ref never sent, fails.
async fn answers<S>(ws: &mut S, refs: &[u64]) -> anyhow::Result<std::collections::BTreeMap<u64, Frame>>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut got = std::collections::BTreeMap::new();
    while got.len() < refs.len() {
        let frame = next_frame(ws).await?;
        let reference = match &frame {
            Frame::Accepted { reference, .. } => *reference,
            Frame::Error { reference: Some(r), .. } => *r,
            Frame::Error { reference: None, .. } => anyhow::bail!("an error frame without a ref: {frame:?}"),
            _ => continue,
        };
        anyhow::ensure!(refs.contains(&reference), "an answer to ref {reference}, never sent: {frame:?}");
        anyhow::ensure!(got.insert(reference, frame).is_none(), "ref {reference} answered twice");
    }
    Ok(got)
}

/// A device submits on its own socket: each binary frame (ref, bundle) is
/// answered by ref, as `POST /v1/messages` would answer it; refusals carry
/// their stable code, and a socket with too many submissions waiting
/// refuses one more at once with `unavailable` instead of stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_on_the_socket_are_answered_by_ref() -> anyhow::Result<()> {
    use tests::client::http::submit_frame;
    use tests::proto::ErrorCode;
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| c.limits.max_socket_submits = 2)?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("ws-submit").await?;
    // Encrypted in epoch 0, sent after the add moved the group to epoch 1.
    let stale = alice.encrypt_for_bench(&g, b"stale")?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut bob]).await?;
    let mut bob_ws = bob.http().websocket(bob.cursor()).await?;
    bob_ws.send(Message::Text(bob.follow_frame().into())).await?;
    let mut ws = alice.http().websocket(alice.cursor()).await?;

    // Accepted, answered by ref; the same bytes again are the same
    // submission (the bytes are its idempotency key), at the same position.
    let m0 = alice.encrypt_for_bench(&g, b"m0")?;
    ws.send(Message::Binary(submit_frame(1, &m0).into())).await?;
    ws.send(Message::Binary(submit_frame(2, &m0).into())).await?;
    let got = answers(&mut ws, &[1, 2]).await?;
    let position = |f: &Frame| match f {
        Frame::Accepted { position, group, epoch, .. } if *group == g && *epoch == 1 => Ok(*position),
        other => Err(anyhow::anyhow!("expected an acceptance in epoch 1 of {g}, got {other:?}")),
    };
    let p0 = position(&got[&1])?;
    assert_eq!(position(&got[&2])?, p0, "a resend was stored twice");
    // The member gets it pushed, once, and reads the text.
    let pushed = next_entries(&mut bob_ws, 1).await?;
    assert_eq!(pushed[0].position, p0);
    match bob.apply_entry(&pushed[0]).await? {
        Some(tests::client::Event::Message { text, .. }) => assert_eq!(text, "m0"),
        other => panic!("the pushed entry did not apply as m0: {other:?}"),
    }

    // Refusals: by ref with the stable code (and the epoch fields of
    // `wrong_epoch`), never naming a group, and the socket goes on.
    ws.send(Message::Binary(submit_frame(3, &stale).into())).await?;
    // A real message cut short: it no longer decodes.
    ws.send(Message::Binary(submit_frame(4, &m0[..12]).into())).await?;
    let got = answers(&mut ws, &[3, 4]).await?;
    match &got[&3] {
        Frame::Error { code: ErrorCode::WrongEpoch, current_epoch: Some(1), group: None, .. } => {}
        other => panic!("expected wrong_epoch at epoch 1, got {other:?}"),
    }
    match &got[&4] {
        Frame::Error { code: ErrorCode::MalformedMessage, group: None, .. } => {}
        other => panic!("expected malformed_message, got {other:?}"),
    }
    // A frame too short to hold a ref is answered without one.
    ws.send(Message::Binary(vec![0, 1, 2].into())).await?;
    match next_frame(&mut ws).await? {
        Frame::Error { code: ErrorCode::InvalidRequest, reference: None, group: None, .. } => {}
        other => panic!("expected invalid_request without a ref, got {other:?}"),
    }

    // Twelve at once on a socket that holds two: every one is answered
    // once, some with `unavailable`, and the accepted ones are stored once
    // each and pushed to the member.
    let refs: Vec<u64> = (10..22).collect();
    for &r in &refs {
        let body = alice.encrypt_for_bench(&g, format!("burst {r}").as_bytes())?;
        ws.feed(Message::Binary(submit_frame(r, &body).into())).await?;
    }
    ws.flush().await?;
    let got = answers(&mut ws, &refs).await?;
    let mut accepted = Vec::new();
    let mut busy = 0;
    for frame in got.values() {
        match frame {
            Frame::Accepted { .. } => accepted.push(position(frame)?),
            Frame::Error { code: ErrorCode::Unavailable, .. } => busy += 1,
            other => panic!("expected an acceptance or unavailable, got {other:?}"),
        }
    }
    assert!(busy > 0, "twelve submissions fit a socket that holds two");
    assert!(!accepted.is_empty(), "none of twelve was accepted");
    accepted.sort_unstable();
    let pushed: Vec<u64> = next_entries(&mut bob_ws, accepted.len()).await?.iter().map(|e| e.position).collect();
    assert_eq!(pushed, accepted, "the member got other entries than those accepted");

    // Counted like HTTP requests: by route and status, refusals by code.
    let ok = tests::metric(&op, r#"mlsfed_api_request_seconds_count{route="ws:submit",status="200"}"#).await;
    assert!(ok >= 1.0 + accepted.len() as f64, "accepted socket submissions counted {ok}");
    assert!(tests::metric(&op, r#"mlsfed_api_errors_total{code="wrong_epoch"}"#).await >= 1.0);
    assert!(tests::metric(&op, r#"mlsfed_api_errors_total{code="unavailable"}"#).await >= busy as f64);
    Ok(())
}

/// A socket opened with `batch=true` gathers the entries at hand into
/// `entries` frames: a device that follows a group with a backlog gets the
/// whole page in one frame, then new entries as they come, each once and in
/// order, and they apply as the texts sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_socket_gathers_entries_into_frames() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("batched").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    settle(&mut [&mut bob]).await?;
    let mut positions = Vec::new();
    for i in 0..30 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }

    let mut ws = bob.http().websocket_batched(bob.cursor()).await?;
    ws.send(Message::Text(bob.follow_frame().into())).await?;
    // The backlog is one read of the group: one frame.
    let backlog = match next_frame(&mut ws).await? {
        Frame::Entries { entries } => entries,
        other => panic!("expected one entries frame with the backlog, got {other:?}"),
    };
    let mut got: Vec<Item> = backlog.into_iter().filter(|e| e.kind == "application").collect();
    assert_eq!(got.len(), 30, "the backlog came in more than one frame");
    for i in 30..36 {
        positions.push(alice.send(&g, &format!("m{i}")).await?);
    }
    while got.len() < positions.len() {
        match next_frame(&mut ws).await? {
            Frame::Entries { entries } => got.extend(entries.into_iter().filter(|e| e.kind == "application")),
            Frame::Entry(e) => panic!("a batched socket sent a lone entry frame: {e:?}"),
            Frame::Error { code, message, .. } => anyhow::bail!("error frame {code:?}: {message}"),
            _ => {}
        }
    }
    assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), positions);
    for (i, item) in got.iter().enumerate() {
        match bob.apply_entry(item).await? {
            Some(tests::client::Event::Message { text, .. }) => assert_eq!(text, format!("m{i}")),
            other => panic!("entry {i} did not apply as a message: {other:?}"),
        }
    }
    // Nothing more comes: each entry was pushed once.
    let extra = tokio::time::timeout(Duration::from_millis(700), next_frame(&mut ws)).await;
    assert!(extra.is_err(), "more was pushed: {extra:?}");
    Ok(())
}

/// A removed device's sockets close as soon as the removal is announced,
/// at every ingest process: here the socket is held by another process
/// than the one that removed the device, and closes long before the
/// sockets' periodic backstop (60 s) would find the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_devices_socket_closes_at_once_at_every_ingest() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    // Two processes share the key directory only on JetStream.
    let op = Operator::start_with(&nats, "a.example", "run", |c| {
        c.keydir.backend = tests::config::KeydirBackend::Jetstream
    })?;
    let other = op.worker("ingest")?;
    let alice = op.client("alice", "phone", 1).await?;
    let token = op.token(alice.id());
    let on_other = tests::client::Http::new(&other.url, &token, alice.id().clone());
    let mut ws = on_other.websocket(0).await?;
    until_up(&mut ws).await?;
    let path = format!("/v1/devices/{}", tests::client::http::encode_segment(alice.id().as_str()));
    let (status, body) = tests::send(tests::http().delete(format!("{}{path}", op.url)), Some(&token)).await;
    assert_eq!(status, 204, "{body}");
    let closed = closes_within(&mut ws, Duration::from_secs(3)).await;
    assert!(closed, "the removed device's socket at another ingest stayed open");
    Ok(())
}

/// A socket lives as long as the token that opened it: at its expiry the
/// operator closes it, and nothing more is pushed or accepted on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closes_when_its_token_expires() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let alice = op.client("alice", "phone", 1).await?;
    // Expires in 2 to 3 s (expiry is in whole unix seconds).
    let token = op.token_for(alice.id(), Duration::from_secs(3));
    let http = tests::client::Http::new(&op.url, &token, alice.id().clone());
    let mut ws = http.websocket(0).await?;
    until_up(&mut ws).await?;
    let t0 = std::time::Instant::now();
    let closed = closes_within(&mut ws, Duration::from_secs(10)).await;
    assert!(closed, "the socket outlived its token by more than 10 s");
    assert!(t0.elapsed() >= Duration::from_secs(1), "the socket closed before its token expired");
    Ok(())
}

/// An operator told to stop answers the submissions its sockets hold
/// before closing them: here the verdict can only come after SIGTERM (the
/// sequencer is paused until the API has stopped listening), and the device
/// still gets its `accepted` frame, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_operator_answers_what_its_sockets_hold() -> anyhow::Result<()> {
    use tests::client::http::submit_frame;
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "ingest", |c| {
        c.keydir.backend = tests::config::KeydirBackend::Jetstream
    })?;
    let sequencer = op.worker("sequencer")?;
    let _fanout = op.worker("fanout")?;
    let mut alice = op.client("alice", "phone", 1).await?;
    let g = alice.create_group("drain").await?;
    let mut ws = alice.http().websocket(alice.cursor()).await?;
    sequencer.signal("STOP")?;
    let body = alice.encrypt_for_bench(&g, b"in flight at shutdown")?;
    ws.send(Message::Binary(submit_frame(7, &body).into())).await?;
    // Queued: the paused sequencer leaves it in SUBMIT.
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let mut queued = false;
    for _ in 0..200 {
        let mut s = js.get_stream(tests::proto::names::SUBMIT_STREAM).await?;
        if s.info().await?.state.messages > 0 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the socket's submission never reached SUBMIT");
    op.signal("TERM")?;
    // The API stops listening first; only then may the verdict come.
    let addr = op.url.trim_start_matches("http://").to_owned();
    let mut stopped = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the operator kept listening after SIGTERM");
    sequencer.signal("CONT")?;
    match next_frame(&mut ws).await? {
        Frame::Accepted { reference: 7, group, .. } => assert_eq!(group, g),
        other => panic!("expected the submission's acceptance before the close, got {other:?}"),
    }
    let closed = closes_within(&mut ws, Duration::from_secs(10)).await;
    assert!(closed, "the socket stayed open after its answers");
    Ok(())
}
