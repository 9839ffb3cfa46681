//! Stream settings come from configuration, and a restart with new ones
//! applies them to the streams that already exist.

use std::time::Duration;

use tests::{NatsServer, Operator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_retention_reaches_existing_streams_at_restart() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut op = Operator::start(&nats, "a.example")?;
    let js = async_nats::jetstream::new(tests::nats_connect(&nats.url()).await?);
    let max_age = |name: &'static str| {
        let js = js.clone();
        async move { anyhow::Ok(js.get_stream(name).await?.info().await?.config.max_age) }
    };
    assert_eq!(max_age("MLSFED_LOG").await?, Duration::from_secs(30 * 86_400));
    op.reconfigure(|c| {
        c.streams.log_max_age_secs = 3600;
        c.streams.mailbox_max_age_secs = 7200;
        c.streams.duplicate_window_secs = 300;
    })?;
    op.restart()?;
    assert_eq!(max_age("MLSFED_LOG").await?, Duration::from_secs(3600));
    assert_eq!(max_age("MLSFED_MAILBOX").await?, Duration::from_secs(7200));
    let log = js.get_stream("MLSFED_LOG").await?.info().await?.config.clone();
    assert_eq!(log.duplicate_window, Duration::from_secs(300));
    // What the code relies on is kept through the update.
    assert!(log.republish.is_some() && log.allow_atomic_publish && log.allow_direct);
    // KV buckets whose age follows a setting take it too.
    assert_eq!(max_age("KV_mlsfed_verdicts").await?, Duration::from_secs(300));
    // The operator still works on the updated streams.
    let mut alice = op.client("alice", "phone", 1).await?;
    let g = alice.create_group("tuned").await?;
    alice.send(&g, "after the change").await?;
    Ok(())
}
