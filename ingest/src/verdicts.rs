//! Verdicts reach the submit handlers of this process through one
//! subscription (`mlsfed.verdict.*`), not one per request: a subscription
//! made and dropped for every submission makes nats-server rework its
//! subject routing thousands of times a second under load.

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, OnceCell};

use crate::keyed::{Keyed, Registered};

/// Submit handlers waiting for a verdict, by submission id. One id may
/// have several: a device that resends a submission (the same bytes, or
/// the same idempotency key) before the first send was answered waits for
/// the same verdict, and each must get it.
type Waiting = Keyed<String, oneshot::Sender<Bytes>>;

#[derive(Default)]
pub struct Verdicts {
    waiting: Waiting,
    /// Subscribed once, on the first submission.
    started: OnceCell<()>,
}

/// A registered wait; dropping it (a timeout, a cancelled request) forgets
/// it and only it, so the map holds no more than the requests in flight.
pub struct Wait {
    rx: Option<oneshot::Receiver<Bytes>>,
    _registered: Registered<String, oneshot::Sender<Bytes>>,
}

impl Wait {
    /// The verdict's bytes, or `None` when the process's subscription ended.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.as_mut()?.await.ok()
    }
}

impl Verdicts {
    /// Registers interest in `id`'s verdict; call before publishing it.
    pub async fn wait(&self, client: &async_nats::Client, id: &str) -> Result<Wait, async_nats::SubscribeError> {
        self.started
            .get_or_try_init(|| async {
                let mut sub = client.subscribe(proto::names::VERDICT_WILDCARD).await?;
                let waiting = self.waiting.clone();
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        let Some(id) = m.subject.as_str().rsplit('.').next() else { continue };
                        for tx in waiting.take(id) {
                            let _ = tx.send(m.payload.clone());
                        }
                    }
                });
                Ok::<(), async_nats::SubscribeError>(())
            })
            .await?;
        let (tx, rx) = oneshot::channel();
        let registered = self.waiting.insert(id.to_owned(), tx);
        Ok(Wait { rx: Some(rx), _registered: registered })
    }
}
