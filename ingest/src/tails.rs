//! One reader per followed group per ingest process. However many of a
//! group's devices hold a WebSocket here, the group's new entries are read
//! from LOG once (a batched direct get per wake-up) and handed to each
//! socket in memory; a socket checks each entry against its own device's
//! place in the roster before it sends it. A socket that is behind the
//! tail, or missed a batch, reads the group itself (`groups::read`) until
//! it has caught up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::StreamExt;
use proto::wire::LogEntry;
use proto::{direct, names};
use tokio::sync::broadcast;

/// Batches a slow socket may fall behind by before it reads for itself.
const BACKLOG: usize = 64;
/// How often a tail reads without a wake-up (one lost to a reconnect).
const RECHECK: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// New entries of one group, read once.
pub struct Batch {
    /// Every entry of the group with a sequence in `(after, next]` is here.
    pub after: u64,
    pub next: u64,
    pub entries: Vec<Read>,
}

/// One entry, decoded and rendered once for every socket.
pub struct Read {
    pub seq: u64,
    pub entry: LogEntry,
    /// The entry's frame as every member but its sender sees it.
    pub frame: bytes::Bytes,
}

pub struct Tail {
    tx: broadcast::Sender<Arc<Batch>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tail {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.tx.subscribe()
    }
}

/// The tails of this process, by LOG subject; a tail lives while a socket
/// holds it.
#[derive(Default)]
pub struct Tails {
    live: Mutex<HashMap<String, Weak<Tail>>>,
}

impl Tails {
    pub fn get(&self, client: &async_nats::Client, subject: &str) -> Arc<Tail> {
        let Ok(mut live) = self.live.lock() else {
            // A poisoned registry only costs sharing: this socket gets a
            // tail of its own.
            return start(client.clone(), subject.to_owned());
        };
        // A tail whose task ended (its subscription closed) is replaced.
        if let Some(t) = live.get(subject).and_then(Weak::upgrade).filter(|t| !t.task.is_finished()) {
            return t;
        }
        live.retain(|_, t| t.strong_count() > 0);
        let t = start(client.clone(), subject.to_owned());
        live.insert(subject.to_owned(), Arc::downgrade(&t));
        t
    }
}

fn start(client: async_nats::Client, subject: String) -> Arc<Tail> {
    let (tx, _) = broadcast::channel(BACKLOG);
    let sender = tx.clone();
    let task = tokio::spawn(async move {
        let Ok(mut wake) = client.subscribe(subject.clone()).await else {
            return;
        };
        // The highest position a wake-up announced: its entry may not be
        // readable yet when the wake-up arrives (the stream stores it while
        // subscribers already hear the publish), so reads retry until it is.
        let mut announced = 0u64;
        let mut have = 0u64;
        // Start at the group's current end: a socket behind it reads for
        // itself until it catches up.
        let mut cursor =
            match direct::multi_last(&client, names::LOG_STREAM, std::slice::from_ref(&subject), None, READ_TIMEOUT)
                .await
            {
                Ok(last) => match last.first() {
                    Some(m) => {
                        have = proto::wire::decode::<LogEntry>(&m.payload).map(|e| e.position).unwrap_or(0);
                        m.seq
                    }
                    None => 0,
                },
                Err(_) => 0,
            };
        loop {
            let mut note = |m: &async_nats::Message| {
                if let Ok(e) = proto::wire::decode::<LogEntry>(&m.payload) {
                    announced = announced.max(e.position);
                }
            };
            tokio::select! {
                w = wake.next() => match w { Some(m) => note(&m), None => return },
                _ = tokio::time::sleep(RECHECK) => {}
            }
            // Drain the wake-ups that queued meanwhile: one read covers them.
            while let Some(Some(m)) = futures::FutureExt::now_or_never(wake.next()) {
                note(&m);
            }
            let mut tries = 0;
            loop {
                let got = match direct::batch(
                    &client,
                    names::LOG_STREAM,
                    &subject,
                    cursor + 1,
                    256,
                    Some(1 << 20),
                    READ_TIMEOUT,
                )
                .await
                {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "group tail read failed; the next wake-up retries");
                        break;
                    }
                };
                let Some(last) = got.last().map(|m| m.seq) else {
                    // Announced but not readable yet: look again shortly.
                    if have < announced && tries < 50 {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    break;
                };
                // A short batch is the end, unless the byte cap cut it.
                let full = got.len() == 256 || got.iter().map(|m| m.payload.len()).sum::<usize>() >= 1 << 19;
                let entries: Vec<Read> = got
                    .into_iter()
                    .filter_map(|m| {
                        let entry = proto::wire::decode::<LogEntry>(&m.payload).ok()?;
                        let json = crate::groups::entry_json_as(&entry, m.seq, false, B64.encode(&entry.message));
                        let frame = bytes::Bytes::from(serde_json::to_vec(&json).ok()?);
                        Some(Read { seq: m.seq, entry, frame })
                    })
                    .collect();
                if let Some(r) = entries.last() {
                    have = have.max(r.entry.position);
                }
                let batch = Arc::new(Batch { after: cursor, next: last, entries });
                cursor = last;
                // No receiver: every socket left; the last one drops us.
                let _ = sender.send(batch);
                if !full {
                    break;
                }
            }
        }
    });
    Arc::new(Tail { tx, task })
}
