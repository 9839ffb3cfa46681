//! Batched direct gets (ADR-31) against a real nats-server: what devices'
//! reads and the shared group tails rely on.

use std::time::{Duration, Instant};

use tests::proto::direct;
use tests::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_multi_last_answer_in_order_and_promptly_when_empty() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = tests::nats_connect(&nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "D".into(),
        subjects: vec!["d.*".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    for i in 0..10u8 {
        let subject = if i % 2 == 0 { "d.a" } else { "d.b" };
        js.publish(subject, vec![i].into()).await?.await?;
    }
    let t = Duration::from_secs(5);
    let a = direct::batch(&client, "D", "d.a", 1, 100, None, t).await?;
    assert_eq!(a.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), [0, 2, 4, 6, 8]);
    assert!(a.windows(2).all(|w| w[0].seq < w[1].seq));
    let some = direct::batch(&client, "D", "d.b", a[2].seq, 2, None, t).await?;
    assert_eq!(some.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), [5, 7]);
    // Nothing after the end, and a subject with nothing at all: an empty
    // answer at once, not a wait for the timeout.
    for (subject, from) in [("d.a", 100), ("d.c", 1)] {
        let t0 = Instant::now();
        assert!(direct::batch(&client, "D", subject, from, 10, None, t).await?.is_empty());
        assert!(t0.elapsed() < Duration::from_secs(1), "an empty batch took {:?}", t0.elapsed());
    }
    // A byte cap below the first message still returns that message: the
    // readers of LOG (tails, a device's reads, the sequencer's replay) take
    // a short page for the end, and an entry larger than their cap must
    // not look like one.
    js.publish("d.big", vec![7u8; 64 << 10].into()).await?.await?;
    js.publish("d.big", vec![8u8; 64 << 10].into()).await?.await?;
    let capped = direct::batch(&client, "D", "d.big", 1, 10, Some(1024), t).await?;
    assert_eq!(capped.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), [7]);
    let last = direct::multi_last(&client, "D", &["d.a".into(), "d.b".into(), "d.c".into()], None, t).await?;
    let mut got: Vec<(String, u8)> = last.iter().map(|m| (m.subject.clone(), m.payload[0])).collect();
    got.sort();
    assert_eq!(got, [("d.a".to_owned(), 8), ("d.b".to_owned(), 9)]);
    let t0 = Instant::now();
    assert!(direct::multi_last(&client, "D", &["d.none".into()], None, t).await?.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(1), "an empty multi_last took {:?}", t0.elapsed());
    Ok(())
}

/// Atomic batches (ADR-50), as the bridge appends a hub's entries: stored
/// all together after the expected entry, or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batches_store_all_or_nothing_after_the_expected_entry() -> anyhow::Result<()> {
    use tests::proto::batch::{publish_atomic, PublishAtomicError};
    let nats = NatsServer::start()?;
    let client = tests::nats_connect(&nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "B".into(),
            subjects: vec!["b.*".into()],
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await?;
    let batch = |from: u8, n: u8| -> Vec<(bytes::Bytes, async_nats::HeaderMap)> {
        (from..from + n).map(|i| (bytes::Bytes::from(vec![i]), async_nats::HeaderMap::new())).collect()
    };
    let last = publish_atomic(&client, "b.g", 0, batch(0, 3)).await?;
    assert_eq!(last, 3);
    // Another writer's entry lands first: a batch expecting the old end is
    // refused whole, and nothing of it is stored.
    js.publish("b.g", vec![9].into()).await?.await?;
    match publish_atomic(&client, "b.g", last, batch(3, 5)).await {
        Err(PublishAtomicError::WrongLastSequence) => {}
        other => anyhow::bail!("a stale batch was not refused: {other:?}"),
    }
    assert_eq!(stream.info().await?.state.messages, 4);
    // Expecting the true end, it goes in after it, in order.
    let end = publish_atomic(&client, "b.g", 4, batch(3, 5)).await?;
    assert_eq!(end, 9);
    let stored: Vec<u8> = futures::future::try_join_all((1..=9).map(|s| stream.get_raw_message(s)))
        .await?
        .into_iter()
        .map(|m| m.payload[0])
        .collect();
    assert_eq!(stored, [0, 1, 2, 9, 3, 4, 5, 6, 7]);
    // A batch holding a message already stored (same Nats-Msg-Id, as a
    // sequencer's redelivered submission has) is refused whole: the
    // sequencer counts on a stored batch being all of it, consecutively.
    let with_ids = |ids: &[&str]| -> Vec<(bytes::Bytes, async_nats::HeaderMap)> {
        ids.iter()
            .map(|id| {
                let mut h = async_nats::HeaderMap::new();
                h.insert(async_nats::header::NATS_MESSAGE_ID, *id);
                (bytes::Bytes::from(id.as_bytes().to_vec()), h)
            })
            .collect()
    };
    let end = publish_atomic(&client, "b.g", end, with_ids(&["x", "y"])).await?;
    assert_eq!(end, 11);
    let refused = publish_atomic(&client, "b.g", end, with_ids(&["z", "y"])).await;
    assert!(refused.is_err(), "a batch with a duplicate was stored: {refused:?}");
    assert_eq!(stream.info().await?.state.messages, 11, "nothing of a refused batch is stored");
    // A stream that does not allow batches says so, at the commit (the
    // first message's answer is not awaited), and stores none of it.
    let mut plain = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "N".into(),
            subjects: vec!["n.*".into()],
            ..Default::default()
        })
        .await?;
    assert!(matches!(publish_atomic(&client, "n.g", 0, batch(0, 3)).await, Err(PublishAtomicError::Refused { .. })));
    assert_eq!(plain.info().await?.state.messages, 0, "a refused batch left messages behind");
    Ok(())
}
