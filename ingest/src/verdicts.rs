//! Verdicts reach the submit handlers of this process through one
//! subscription (`mlsfed.verdict.*`), not one per request: a subscription
//! made and dropped for every submission makes nats-server rework its
//! subject routing thousands of times a second under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, OnceCell};

/// Submit handlers waiting for a verdict, by submission id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Bytes>>>>;

#[derive(Default)]
pub struct Verdicts {
    waiting: Waiting,
    /// Subscribed once, on the first submission.
    started: OnceCell<()>,
}

/// A registered wait; dropping it (a timeout, a cancelled request) forgets
/// it, so the map holds no more than the requests in flight.
pub struct Wait {
    id: String,
    rx: Option<oneshot::Receiver<Bytes>>,
    waiting: Waiting,
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&self.id);
        }
    }
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
                        let waiter = waiting.lock().ok().and_then(|mut w| w.remove(id));
                        if let Some(tx) = waiter {
                            let _ = tx.send(m.payload);
                        }
                    }
                });
                Ok::<(), async_nats::SubscribeError>(())
            })
            .await?;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id.to_owned(), tx);
        }
        Ok(Wait { id: id.to_owned(), rx: Some(rx), waiting: self.waiting.clone() })
    }
}
