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
    let last = direct::multi_last(&client, "D", &["d.a".into(), "d.b".into(), "d.c".into()], None, t).await?;
    let mut got: Vec<(String, u8)> = last.iter().map(|m| (m.subject.clone(), m.payload[0])).collect();
    got.sort();
    assert_eq!(got, [("d.a".to_owned(), 8), ("d.b".to_owned(), 9)]);
    let t0 = Instant::now();
    assert!(direct::multi_last(&client, "D", &["d.none".into()], None, t).await?.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(1), "an empty multi_last took {:?}", t0.elapsed());
    Ok(())
}
