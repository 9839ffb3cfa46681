//! Verdicts reach the submit handlers of this process through one
//! subscription (`mlsfed.verdict.*`), not one per request: a subscription
//! made and dropped for every submission makes nats-server rework its
//! subject routing thousands of times a second under load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, OnceCell};

/// Submit handlers waiting for a verdict, by submission id. One id may
/// have several: a device that resends a submission (the same bytes, or
/// the same idempotency key) before the first send was answered waits for
/// the same verdict, and each must get it.
type Waiting = Arc<Mutex<HashMap<String, Vec<(u64, oneshot::Sender<Bytes>)>>>>;

#[derive(Default)]
pub struct Verdicts {
    waiting: Waiting,
    /// Tells apart the waits for one id.
    next: std::sync::atomic::AtomicU64,
    /// Subscribed once, on the first submission.
    started: OnceCell<()>,
}

/// A registered wait; dropping it (a timeout, a cancelled request) forgets
/// it and only it, so the map holds no more than the requests in flight.
pub struct Wait {
    id: String,
    token: u64,
    rx: Option<oneshot::Receiver<Bytes>>,
    waiting: Waiting,
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiting.lock() {
            if let Some(waiters) = w.get_mut(&self.id) {
                waiters.retain(|(t, _)| *t != self.token);
                if waiters.is_empty() {
                    w.remove(&self.id);
                }
            }
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
                        let waiters = waiting.lock().ok().and_then(|mut w| w.remove(id)).unwrap_or_default();
                        for (_, tx) in waiters {
                            let _ = tx.send(m.payload.clone());
                        }
                    }
                });
                Ok::<(), async_nats::SubscribeError>(())
            })
            .await?;
        let (tx, rx) = oneshot::channel();
        let token = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut w) = self.waiting.lock() {
            w.entry(id.to_owned()).or_default().push((token, tx));
        }
        Ok(Wait { id: id.to_owned(), token, rx: Some(rx), waiting: self.waiting.clone() })
    }
}
