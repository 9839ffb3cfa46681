//! One reader per followed group per ingest process. However many of a
//! group's devices hold a WebSocket here, the group's new entries reach it
//! once (LOG republishes each stored entry with its sequence and its
//! predecessor's, so an entry that follows the tail's cursor needs no read;
//! a gap costs one batched direct get) and are handed to each socket in
//! memory; a socket checks each entry against its own device's
//! place in the roster before it sends it. A socket that is behind the
//! tail, or missed a batch, reads the group itself (`groups::read`) until
//! it has caught up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE};
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
    /// The entry's frame as every member but its sender sees it, checked
    /// as UTF-8 once here rather than once per socket.
    pub frame: axum::extract::ws::Utf8Bytes,
}

pub struct Tail {
    /// Weak: the task holds the only sender, so its receivers see the
    /// channel close when the task ends, and take a new tail.
    tx: broadcast::WeakSender<Arc<Batch>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tail {
    /// A receiver of the tail's batches; one that is closed already when
    /// the tail's task has ended (its holder then takes a new tail).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        match self.tx.upgrade() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
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
        // Its task held the only sender, which is gone as soon as the task
        // stops (before the task counts as finished).
        if let Some(t) = live.get(subject).and_then(Weak::upgrade).filter(|t| t.tx.upgrade().is_some()) {
            return t;
        }
        live.retain(|_, t| t.strong_count() > 0);
        let t = start(client.clone(), subject.to_owned());
        live.insert(subject.to_owned(), Arc::downgrade(&t));
        t
    }
}

fn start(client: async_nats::Client, subject: String) -> Arc<Tail> {
    let (sender, _) = broadcast::channel(BACKLOG);
    let tx = sender.downgrade();
    let task = tokio::spawn(async move {
        // LOG republishes each stored entry with its sequence and the
        // sequence of the group's previous entry: an entry that follows our
        // cursor is handed on as it arrives, without reading it back. Only
        // a gap (a republish lost to a reconnect, or one whose predecessor
        // expired) costs a read.
        let Ok(mut wake) = client.subscribe(names::tail_subject(&subject)).await else {
            return;
        };
        // Start at the group's current end (subscribed first, so nothing
        // stored after this read is missed): a socket behind it reads for
        // itself until it catches up.
        let mut cursor =
            match direct::multi_last(&client, names::LOG_STREAM, std::slice::from_ref(&subject), None, READ_TIMEOUT)
                .await
            {
                Ok(last) => last.first().map_or(0, |m| m.seq),
                Err(_) => 0,
            };
        // Where the tail starts, told to the sockets that already follow:
        // one whose own read stopped before it (an entry stored between
        // that read and ours) reads again, rather than wait for the next
        // entry or its periodic re-read to find what it missed.
        let _ = sender.send(Arc::new(Batch { after: cursor, next: cursor, entries: Vec::new() }));
        loop {
            let mut arrived = Vec::new();
            tokio::select! {
                w = wake.next() => match w { Some(m) => arrived.push(m), None => return },
                // Nothing for a while: look anyway, for a lost republish.
                _ = tokio::time::sleep(proto::streams::spread(RECHECK)) => {}
            }
            // Take what queued meanwhile too: one batch carries it all.
            while let Some(Some(m)) = futures::FutureExt::now_or_never(wake.next()) {
                arrived.push(m);
            }
            let mut gap = arrived.is_empty();
            let after = cursor;
            let mut entries = Vec::new();
            for m in &arrived {
                match republished(m) {
                    Some((seq, _)) if seq <= cursor => {}
                    Some((seq, previous)) if previous == cursor && !gap => {
                        entries.extend(render(seq, &m.payload));
                        cursor = seq;
                    }
                    _ => gap = true,
                }
            }
            if cursor > after {
                // No receiver: every socket left; the last one drops us.
                let _ = sender.send(Arc::new(Batch { after, next: cursor, entries }));
            }
            if gap {
                cursor = read_from(&client, &subject, cursor, &sender).await;
            }
        }
    });
    Arc::new(Tail { tx, task })
}

/// A republished entry's stream sequence and the sequence of the entry
/// before it on the same subject (0 when there is none, or it was deleted).
fn republished(m: &async_nats::Message) -> Option<(u64, u64)> {
    let headers = m.headers.as_ref()?;
    let seq = headers.get(NATS_SEQUENCE)?.as_str().parse().ok()?;
    let previous = headers.get(NATS_LAST_SEQUENCE)?.as_str().parse().ok()?;
    Some((seq, previous))
}

/// One entry, decoded and its frame rendered; `None` for an undecodable one
/// (a socket then finds a hole, and its own read reports it).
fn render(seq: u64, payload: &[u8]) -> Option<Read> {
    let entry = proto::wire::decode::<LogEntry>(payload).ok()?;
    let json = crate::groups::entry_json_as(&entry, seq, false, B64.encode(&entry.message));
    let frame = serde_json::to_string(&json).ok()?.into();
    Some(Read { seq, entry, frame })
}

/// Entries (and bytes, about) one read of a tail takes.
const PAGE: usize = 256;
const PAGE_BYTES: usize = 1 << 20;

/// Reads the group's entries after `cursor` from LOG and hands them on;
/// returns the new cursor.
async fn read_from(
    client: &async_nats::Client,
    subject: &str,
    mut cursor: u64,
    sender: &broadcast::Sender<Arc<Batch>>,
) -> u64 {
    loop {
        let got =
            match direct::batch(client, names::LOG_STREAM, subject, cursor + 1, PAGE, Some(PAGE_BYTES), READ_TIMEOUT)
                .await
            {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "group tail read failed; the next wake-up retries");
                    return cursor;
                }
            };
        let Some(last) = got.last().map(|m| m.seq) else {
            return cursor;
        };
        let full = !direct::is_last_page(&got, PAGE, PAGE_BYTES);
        let entries = got.iter().filter_map(|m| render(m.seq, &m.payload)).collect();
        let _ = sender.send(Arc::new(Batch { after: cursor, next: last, entries }));
        cursor = last;
        if !full {
            return cursor;
        }
    }
}
