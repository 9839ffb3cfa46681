//! WebSocket push: one socket per device carries its mailbox items and the
//! entries of the groups it follows, as they are appended. Group entries
//! come from the process's shared tail of each group (`tails`), read once
//! for every socket here; a socket that is behind, or missed a batch, reads
//! the group itself by cursor. A mailbox publish is only a wake-up: items
//! are read from the stream by cursor. Either way nothing is skipped or sent
//! twice on one socket, and a mailbox wake-up lost to a NATS reconnect costs
//! at most the socket's next look at its connection (5 s). A group is
//! re-read on that timer only while it needs it (held at a membership
//! change, or its last read failed); otherwise its tail says when there is
//! something to read. A removed device's sockets close when its removal is
//! announced (`mlsfed.revoked`); reads on a long timer are only the backstop.
//! The device may also submit on its socket: a binary frame carries its ref
//! and a bundle, worked on like `POST /v1/messages` (at most
//! `limits.max_socket_submits` at once) and answered by ref.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{SinkExt, StreamExt};
use proto::{names, DeviceId, ErrorCode};
use serde::Deserialize;

use crate::groups::{self, Access};
use crate::mailbox::{next_seq, own_mailbox, purge};
use crate::submit::AcceptedJson;
use crate::tails::{Batch, Tail};
use crate::{Reject, Shared};

/// How often a socket re-reads the groups that need it (held at a
/// membership change, or a failed read), and looks whether its NATS
/// connection was re-established (a wake-up or a removal announced while
/// it was down was lost: the mailbox and the revocation are read then).
const RECHECK: Duration = Duration::from_secs(5);
/// How often a socket reads its mailbox and checks its device's revocation
/// with nothing telling it to: the backstop for a wake-up or a removal
/// announcement lost without a reconnect. Rare on purpose: with many
/// thousands of sockets per process, these reads are all the idle load.
const BACKSTOP: Duration = Duration::from_secs(60);
/// A socket's read buffer: device frames are small (acks, follows).
const READ_BUFFER: usize = 4096;
/// Most tail batches one socket writes with a single flush.
const COALESCE: usize = 64;
/// The longest a socket stays open, whatever its token's expiry.
const LONGEST_SOCKET: Duration = Duration::from_secs(365 * 86_400);
/// Most bytes of entries gathered into one `entries` frame.
const BATCH_BYTES: usize = 256 << 10;
/// A submission frame starts with the device's ref for it (big-endian u64).
const SUBMIT_REF_BYTES: usize = 8;
/// The route label of submissions over a socket in the API's metrics.
const SUBMIT_ROUTE: &str = "ws:submit";
/// How long a stopping socket waits for its submissions' verdicts.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

/// A submission's outcome, with the device's ref and when it arrived.
type Submitted = (u64, std::time::Instant, Result<AcceptedJson, Reject>);

#[derive(Deserialize)]
pub struct PushQuery {
    /// Mailbox cursor to push from.
    #[serde(default)]
    after: u64,
    /// Gather the entries at hand into `entries` frames.
    #[serde(default)]
    batch: bool,
}

/// `GET /v1/devices/{device}/ws?after=<mailbox seq>` (WebSocket upgrade).
pub async fn websocket(
    State(api): State<Shared>,
    crate::AuthDevice(device): crate::AuthDevice,
    axum::Extension(crate::TokenExpiry(expires)): axum::Extension<crate::TokenExpiry>,
    Path(path): Path<String>,
    Query(q): Query<PushQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, Reject> {
    own_mailbox(&device, &path)?;
    next_seq(q.after)?;
    // Bounded: each socket holds subscriptions and a task.
    let permit = api
        .websockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| Reject::new(ErrorCode::Unavailable, "too many push connections; retry later or fetch"))?;
    // tungstenite zeroes its whole read buffer before every read (128 KiB
    // by default): with thousands of sockets that memset was the largest
    // single cost of pushing. A device sends only small frames.
    // A submission's frame is its 8-byte ref and a bundle of at most
    // the body limit (`Api::max_body`); a larger frame closes the connection.
    let max_frame = api.max_body.saturating_add(SUBMIT_REF_BYTES);
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| async move {
            Socket::new(api, device, expires, q.after, q.batch).run(socket).await;
            drop(permit);
        })
        .into_response())
}

/// What a device sends on its socket.
#[derive(Deserialize)]
struct ClientFrame {
    /// Mailbox items up to this cursor are persisted: purge them.
    #[serde(default)]
    ack: Option<u64>,
    /// Groups to push entries of, each from a cursor.
    #[serde(default)]
    follow: Option<BTreeMap<String, FollowFrom>>,
}

#[derive(Deserialize)]
struct FollowFrom {
    /// The group cursor (`seq`) of the last entry the device has.
    #[serde(default)]
    after: u64,
    /// The last position it applied: checked once against retention.
    #[serde(default)]
    position: Option<u64>,
}

struct Followed {
    access: Access,
    after: u64,
    position: Option<u64>,
    /// Stopped at a membership change: read the roster again first.
    held: bool,
    /// The last read failed (NATS unavailable): read again at the next
    /// check, whether or not the group's tail brings anything.
    retry: bool,
    /// Kept so the group's shared tail lives while this socket follows it.
    tail: Arc<Tail>,
}

/// What a group's tail hands a socket.
enum Tailed {
    Batch(Arc<Batch>),
    /// This socket fell behind the tail's backlog: read for itself.
    Lagged,
    /// The tail stopped (its subscription ended): read for itself, and
    /// take the group's current tail.
    Ended,
}

/// A tail's batches, tagged with the group's subject.
type Batches = BoxStream<'static, (String, Tailed)>;

fn batches(subject: String, rx: tokio::sync::broadcast::Receiver<Arc<Batch>>) -> Batches {
    futures::stream::unfold(Some((subject, rx)), |state| async move {
        use tokio::sync::broadcast::error::RecvError;
        let (subject, mut rx) = state?;
        match rx.recv().await {
            Ok(b) => Some(((subject.clone(), Tailed::Batch(b)), Some((subject, rx)))),
            Err(RecvError::Lagged(_)) => Some(((subject.clone(), Tailed::Lagged), Some((subject, rx)))),
            // Said once; the stream ends after it.
            Err(RecvError::Closed) => Some(((subject, Tailed::Ended), None)),
        }
    })
    .boxed()
}

struct Socket {
    api: Shared,
    device: DeviceId,
    /// When the token that opened the socket expires (unix seconds).
    expires: u64,
    /// `mlsfed_api_entries_served_total{via="push"}`, looked up once.
    served: prometheus::IntCounter,
    mailbox_cursor: u64,
    /// Followed groups by LOG subject.
    follows: HashMap<String, Followed>,
    /// Groups this socket holds a tail receiver for (followed now or
    /// before): bounded like `follows`.
    receiving: HashSet<String>,
    /// How entries go out: a frame each, or gathered.
    entries: EntryFrames,
    /// When each group last got a new tail here (its keys are among
    /// `receiving`, so bounded like it).
    retailed: HashMap<String, tokio::time::Instant>,
    /// Groups whose tail ended again too soon: a new tail at the next check.
    retail_later: HashSet<String>,
}

/// Writes entry frames: one WebSocket frame each, or, on a socket opened
/// with `batch=true`, the entries at hand gathered into
/// `{"type": "entries", "entries": [...]}` frames of at most
/// [`BATCH_BYTES`] (an entry larger than that goes alone). A device then
/// decodes, and can persist, many entries at once; under load that is most
/// of the cost of delivering to a large group.
struct EntryFrames {
    batch: bool,
    gathered: Vec<axum::extract::ws::Utf8Bytes>,
    bytes: usize,
}

impl EntryFrames {
    /// Queues one rendered entry (the caller calls [`Self::close`] before
    /// it flushes, so nothing stays gathered across a write).
    async fn put<S>(&mut self, frame: axum::extract::ws::Utf8Bytes, tx: &mut S) -> Result<(), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        if !self.batch {
            return tx.feed(Message::Text(frame)).await.map_err(|_| ());
        }
        if !self.gathered.is_empty() && self.bytes + frame.len() > BATCH_BYTES {
            self.close(tx).await?;
        }
        self.bytes += frame.len() + 1;
        self.gathered.push(frame);
        Ok(())
    }

    /// Queues what is gathered as one `entries` frame.
    async fn close<S>(&mut self, tx: &mut S) -> Result<(), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        if self.gathered.is_empty() {
            return Ok(());
        }
        const HEAD: &str = r#"{"type":"entries","entries":["#;
        let mut text = String::with_capacity(HEAD.len() + self.bytes + 2);
        text.push_str(HEAD);
        for (i, entry) in self.gathered.drain(..).enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(entry.as_str());
        }
        text.push_str("]}");
        self.bytes = 0;
        tx.feed(Message::Text(text.into())).await.map_err(|_| ())
    }
}

enum Sent {
    Ok,
    Closed,
}

impl Socket {
    fn new(api: Shared, device: DeviceId, expires: u64, after: u64, batch: bool) -> Self {
        let served = api.metrics.entries_served.with_label_values(&["push"]);
        Self {
            api,
            device,
            expires,
            served,
            mailbox_cursor: after,
            follows: HashMap::new(),
            receiving: HashSet::new(),
            retailed: HashMap::new(),
            retail_later: HashSet::new(),
            entries: EntryFrames { batch, gathered: Vec::new(), bytes: 0 },
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        let client = self.api.topo.js.client();
        let Ok(mut mail_wake) = client.subscribe(names::mailbox_subject(&self.device)).await else {
            return;
        };
        let mut tails: SelectAll<Batches> = SelectAll::new();
        let mut submits: FuturesUnordered<BoxFuture<'static, Submitted>> = FuturesUnordered::new();
        let mut mailbox_due = true;
        // A wake-up can come before its item is readable: a read that finds
        // nothing after one is retried a few times, briefly.
        let mut mailbox_announced = false;
        let mut mailbox_tries = 0u32;
        // The last mailbox read failed, or a wake-up's item never became
        // readable: read again at the next check, not only at the backstop.
        let mut mailbox_retry = false;
        // The token that opened the socket bounds it: a device reconnects
        // with a fresh one (and submits nothing on an expired one).
        // Capped: an operator may issue tokens that expire in centuries, and
        // a deadline that far would overflow the clock.
        let left = self.expires.saturating_sub(crate::now_unix()).min(LONGEST_SOCKET.as_secs());
        let expiry = tokio::time::sleep(Duration::from_secs(left));
        tokio::pin!(expiry);
        let mut due: HashSet<String> = HashSet::new();
        // Each socket keeps its own phase: sockets opened together (a
        // restart, a reconnect storm) must not all read at once.
        let mut recheck =
            tokio::time::interval_at(tokio::time::Instant::now() + proto::streams::spread(RECHECK), RECHECK);
        let mut backstop =
            tokio::time::interval_at(tokio::time::Instant::now() + proto::streams::spread(BACKSTOP), BACKSTOP);
        let removal = self.api.removals.watch(&self.device);
        let statistics = client.statistics();
        let mut connects = statistics.connects.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            if mailbox_due {
                match self.push_mailbox(&mut tx).await {
                    Ok((Sent::Ok, 0, _)) if mailbox_announced && mailbox_tries < 20 => {
                        mailbox_tries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                    Ok((Sent::Ok, n, full)) => {
                        mailbox_retry = mailbox_announced && n == 0;
                        mailbox_due = full;
                        mailbox_announced = false;
                        mailbox_tries = 0;
                    }
                    Ok((Sent::Closed, _, _)) => return,
                    Err(()) => {
                        mailbox_due = false;
                        mailbox_retry = true;
                    }
                }
            }
            for subject in std::mem::take(&mut due) {
                match self.push_group(&subject, &mut tx).await {
                    Ok((Sent::Ok, more)) => {
                        if more {
                            due.insert(subject);
                        }
                    }
                    Ok((Sent::Closed, _)) => return,
                    Err(()) => {}
                }
            }
            if (mailbox_due || !due.is_empty()) && !self.api.shutdown.is_cancelled() {
                // A long catch-up reads page after page without waiting:
                // an expired token or a removal still ends it at once.
                if futures::FutureExt::now_or_never(removal.removed()).is_some() {
                    let _ = tx.send(Message::Close(None)).await;
                    return;
                }
                if expiry.is_elapsed() {
                    self.close_after_answers(&mut submits, &mut tx).await;
                    return;
                }
                // Nor may it hold back the answers to the device's
                // submissions: those ready go out between pages.
                if let Some(done) = futures::FutureExt::now_or_never(submits.next()).flatten() {
                    if !self.answer_ready(done, &mut submits, &mut tx).await {
                        return;
                    }
                }
                continue;
            }
            tokio::select! {
                // The device reconnects with a fresh token; what it
                // submitted on this one is answered first.
                _ = &mut expiry => {
                    self.close_after_answers(&mut submits, &mut tx).await;
                    return;
                }
                _ = self.api.shutdown.cancelled() => {
                    self.close_after_answers(&mut submits, &mut tx).await;
                    return;
                }
                Some(first) = submits.next(), if !submits.is_empty() => {
                    if !self.answer_ready(first, &mut submits, &mut tx).await {
                        return;
                    }
                }
                _ = mail_wake.next() => { mailbox_due = true; mailbox_announced = true; }
                Some(first) = tails.next(), if !tails.is_empty() => {
                    // Whatever else the tails hold already goes in the same
                    // write: under load a socket sends many entries per
                    // syscall instead of one.
                    let mut next = Some(first);
                    let mut taken = 0;
                    while let Some((subject, batch)) = next.take() {
                        match batch {
                            Tailed::Batch(b) => match self.push_batch(&subject, &b, &mut tx).await {
                                Ok(true) => {}
                                Ok(false) => { due.insert(subject); }
                                Err(()) => return,
                            },
                            Tailed::Lagged => { due.insert(subject); }
                            Tailed::Ended => {
                                // A tail that ends again at once (its NATS
                                // client is closing) must not make the socket
                                // spin: one new tail per group per check.
                                let now = tokio::time::Instant::now();
                                if self.retailed.get(&subject).is_some_and(|t| now - *t < RECHECK) {
                                    self.retail_later.insert(subject.clone());
                                } else if let Some(rx) = self.retail(&subject) {
                                    tails.push(batches(subject.clone(), rx));
                                }
                                due.insert(subject);
                            }
                        }
                        taken += 1;
                        if taken < COALESCE {
                            next = futures::FutureExt::now_or_never(tails.next()).flatten();
                        }
                    }
                    if self.entries.close(&mut tx).await.is_err() || tx.flush().await.is_err() {
                        return;
                    }
                }
                _ = removal.removed() => {
                    // A device removed while connected loses its socket at
                    // once: revocation outlives every credential.
                    let _ = tx.send(Message::Close(None)).await;
                    return;
                }
                _ = backstop.tick() => {
                    if self.api.keydir.is_revoked(&self.device).await.unwrap_or(false) {
                        let _ = tx.send(Message::Close(None)).await;
                        return;
                    }
                    mailbox_due = true;
                }
                _ = recheck.tick() => {
                    // Reconnected since the last look: a mailbox wake-up or
                    // a removal announced meanwhile may be lost.
                    if std::mem::take(&mut mailbox_retry) {
                        mailbox_due = true;
                    }
                    for subject in std::mem::take(&mut self.retail_later) {
                        if let Some(rx) = self.retail(&subject) {
                            tails.push(batches(subject.clone(), rx));
                            due.insert(subject);
                        }
                    }
                    let now = statistics.connects.load(std::sync::atomic::Ordering::Relaxed);
                    if now != connects {
                        connects = now;
                        if self.api.keydir.is_revoked(&self.device).await.unwrap_or(false) {
                            let _ = tx.send(Message::Close(None)).await;
                            return;
                        }
                        mailbox_due = true;
                    }
                    // A group needs no re-read on a timer: its tail finds a
                    // lost republish by itself, a lagging socket reads at
                    // once, and a socket whose tail ended takes the new one.
                    // Only a group held at a membership change, or whose
                    // last read failed, is read again here.
                    due.extend(self.follows.iter().filter(|(_, f)| f.held || f.retry).map(|(s, _)| s.clone()));
                }
                frame = rx.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(f) = serde_json::from_str::<ClientFrame>(&t) else {
                            let e = Reject::new(ErrorCode::InvalidRequest, "expected {\"ack\": n} or {\"follow\": {...}}");
                            if send_error(&mut tx, None, &e).await.is_err() { return; }
                            continue;
                        };
                        if let Some(up_to) = f.ack {
                            let _ = purge(&self.api, &self.device, up_to).await;
                        }
                        for (group, from) in f.follow.unwrap_or_default() {
                            match self.follow(&group, from).await {
                                Ok((subject, rx)) => {
                                    if let Some(rx) = rx {
                                        tails.push(batches(subject.clone(), rx));
                                    }
                                    due.insert(subject);
                                }
                                Err(e) => if send_error(&mut tx, Some(&group), &e).await.is_err() { return; },
                            }
                        }
                    }
                    Some(Ok(Message::Binary(frame))) => {
                        if let Err(RefReject(reference, e)) = self.take_submission(frame, &mut submits) {
                            let frame = error_frame(reference, None, &e).to_string();
                            if tx.send(Message::Text(frame.into())).await.is_err() { return; }
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    _ => return,
                },
            }
        }
    }

    /// Starts the submission a binary frame carries (its ref, then the
    /// bundle `POST /v1/messages` takes). A refusal before it starts is
    /// answered here; the verdict comes back through `submits`.
    fn take_submission(
        &self,
        frame: bytes::Bytes,
        submits: &mut FuturesUnordered<BoxFuture<'static, Submitted>>,
    ) -> Result<(), RefReject> {
        let at = std::time::Instant::now();
        let Some(head) = frame.first_chunk::<SUBMIT_REF_BYTES>() else {
            let e = Reject::new(ErrorCode::InvalidRequest, "a submission frame starts with an 8-byte ref");
            self.observe(at, Err(e.0.code));
            return Err(RefReject(None, e));
        };
        let reference = u64::from_be_bytes(*head);
        let busy = |why: String| {
            let e = Reject::new(ErrorCode::Unavailable, why);
            self.observe(at, Err(e.0.code));
            Err(RefReject(Some(reference), e))
        };
        if submits.len() >= self.api.cfg.limits.max_socket_submits {
            let n = submits.len();
            return busy(format!("this socket has {n} submissions waiting for verdicts; retry when one is answered"));
        }
        let Ok(permit) = self.api.socket_submits.clone().try_acquire_owned() else {
            return busy("too many submissions in progress; retry later".into());
        };
        // The body is a view of the frame, not a copy.
        let (api, device, body) = (self.api.clone(), self.device.clone(), frame.slice(SUBMIT_REF_BYTES..));
        submits.push(Box::pin(async move {
            let _permit = permit;
            // As over HTTP, a removed device is refused at once, not only
            // at the socket's next revocation check.
            let outcome = match crate::not_removed(&api, &device).await {
                Ok(()) => crate::submit::submit(&api, device, &body, None).await,
                Err(e) => Err(e),
            };
            (reference, at, outcome)
        }));
        Ok(())
    }

    /// Answers `first` and every other verdict ready now, in one write.
    /// `false`: the socket is done (closed, or its device was removed and
    /// it was told so).
    async fn answer_ready<S>(
        &self,
        first: Submitted,
        submits: &mut FuturesUnordered<BoxFuture<'static, Submitted>>,
        tx: &mut S,
    ) -> bool
    where
        S: futures::Sink<Message> + Unpin,
    {
        let mut next = Some(first);
        let mut revoked = false;
        while let Some(done) = next.take() {
            revoked |= matches!(&done.2, Err(e) if e.0.code == ErrorCode::DeviceRevoked);
            if self.answer(done, tx).await.is_err() {
                return false;
            }
            next = futures::FutureExt::now_or_never(submits.next()).flatten();
        }
        if tx.flush().await.is_err() || revoked {
            let _ = tx.send(Message::Close(None)).await;
            return false;
        }
        true
    }

    /// Answers the submissions still being worked on (for `DRAIN` at most),
    /// then closes the socket. One cut off is learnt by sending the same
    /// bytes again.
    async fn close_after_answers<S>(&self, submits: &mut FuturesUnordered<BoxFuture<'static, Submitted>>, tx: &mut S)
    where
        S: futures::Sink<Message> + Unpin,
    {
        let _ = tokio::time::timeout(DRAIN, async {
            while let Some(done) = submits.next().await {
                if self.answer(done, tx).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let _ = tx.send(Message::Close(None)).await;
    }

    /// Queues a submission's answer frame (the caller flushes).
    async fn answer<S>(&self, (reference, at, outcome): Submitted, tx: &mut S) -> Result<(), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        let frame = match outcome {
            Ok(a) => {
                self.observe(at, Ok(()));
                serde_json::json!({
                    "type": "accepted",
                    "ref": reference,
                    "group": a.group,
                    "position": a.position,
                    "epoch": a.epoch,
                })
            }
            Err(e) => {
                self.observe(at, Err(e.0.code));
                error_frame(Some(reference), None, &e)
            }
        };
        tx.feed(Message::Text(frame.to_string().into())).await.map_err(|_| ())
    }

    /// Counts a socket submission like an HTTP one: latency by the status
    /// its outcome has over HTTP, refusals by code.
    fn observe(&self, at: std::time::Instant, outcome: Result<(), ErrorCode>) {
        let status = match outcome {
            Ok(()) => 200,
            Err(code) => {
                self.api.metrics.errors.with_label_values(&[code.as_str()]).inc();
                code.http_status()
            }
        };
        let status = status.to_string();
        self.api
            .metrics
            .requests
            .with_label_values(&[SUBMIT_ROUTE, status.as_str()])
            .observe(at.elapsed().as_secs_f64());
    }

    /// Follows a group from the device's cursor; returns its subject and,
    /// the first time, a receiver of its shared tail.
    async fn follow(
        &mut self,
        group: &str,
        from: FollowFrom,
    ) -> Result<(String, Option<tokio::sync::broadcast::Receiver<Arc<Batch>>>), Reject> {
        let g = groups::parse_group(group)?;
        next_seq(from.after)?;
        let subject = names::log_subject(&g, self.api.cfg.streams.partitions);
        let known = self.receiving.contains(&subject);
        if !known && self.receiving.len() >= self.api.cfg.limits.max_followed_groups {
            return Err(Reject::new(
                ErrorCode::InvalidRequest,
                format!("a socket follows at most {} groups", self.api.cfg.limits.max_followed_groups),
            ));
        }
        let access = groups::access(&self.api, &self.device, &g).await?;
        let (tail, rx) = match self.follows.remove(&subject) {
            Some(f) => (f.tail, None),
            None => {
                let t = self.api.tails.get(&self.api.topo.js.client(), &subject);
                // One receiver per group per socket, however often the
                // device follows it again after an error frame.
                let rx = self.receiving.insert(subject.clone()).then(|| t.subscribe());
                (t, rx)
            }
        };
        let f = Followed { access, after: from.after, position: from.position, held: false, retry: false, tail };
        self.follows.insert(subject.clone(), f);
        Ok((subject, rx))
    }

    /// Takes the group's current tail after ours ended (`Tails::get`
    /// starts a new one); `None` when the socket no longer follows it (a
    /// later `follow` then subscribes afresh).
    fn retail(&mut self, subject: &str) -> Option<tokio::sync::broadcast::Receiver<Arc<Batch>>> {
        let Some(f) = self.follows.get_mut(subject) else {
            self.receiving.remove(subject);
            self.retailed.remove(subject);
            return None;
        };
        let t = self.api.tails.get(&self.api.topo.js.client(), subject);
        let rx = t.subscribe();
        f.tail = t;
        self.retailed.insert(subject.to_owned(), tokio::time::Instant::now());
        Some(rx)
    }

    /// Sends what a tail batch holds for this device. `Ok(false)`: the batch
    /// does not fit this socket's cursor (behind, a hole, or a membership
    /// change to read first): read the group directly instead.
    async fn push_batch<S>(&mut self, subject: &str, batch: &Batch, tx: &mut S) -> Result<bool, ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        let Some(f) = self.follows.get_mut(subject) else {
            return Ok(true);
        };
        if f.held || batch.after > f.after {
            return Ok(batch.next <= f.after);
        }
        let mut frames: Vec<axum::extract::ws::Utf8Bytes> = Vec::new();
        let mut fits = true;
        let start = f.after;
        for read in batch.entries.iter().filter(|r| r.seq > start) {
            let (seq, entry) = (read.seq, &read.entry);
            match groups::admit(&f.access, entry, f.position) {
                groups::Admit::Before => {
                    f.after = seq;
                    continue;
                }
                groups::Admit::Removed => {
                    f.held = true;
                    break;
                }
                // A hole, or a Commit to apply first: the socket's own read
                // sorts it out.
                groups::Admit::Hole | groups::Admit::Unapplied => {
                    fits = false;
                    break;
                }
                groups::Admit::Take => {}
            }
            if entry.sender == self.device {
                // Only its sender sees `own: true`: render that one here.
                let json = groups::entry_json(&self.device, entry, seq);
                frames.push(serde_json::to_string(&json).unwrap_or_default().into());
            } else {
                frames.push(read.frame.clone());
            }
            f.after = seq;
            f.position = Some(entry.position);
        }
        if fits && !f.held {
            f.after = f.after.max(batch.next);
        }
        let served = frames.len() as u64;
        // Queued only: written when the caller closes the gathered frame
        // and flushes, once for every batch it had at hand.
        for frame in frames {
            self.entries.put(frame, tx).await?;
        }
        self.served.inc_by(served);
        Ok(fits)
    }

    /// Stops following a group after a refusal, and says why on the socket.
    async fn unfollow<S>(&mut self, subject: &str, e: &Reject, tx: &mut S) -> Result<(Sent, bool), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        let group = self.follows.remove(subject).map(|f| f.access.group.to_string());
        match send_error(tx, group.as_deref(), e).await {
            Ok(()) => Ok((Sent::Ok, false)),
            Err(()) => Ok((Sent::Closed, false)),
        }
    }

    /// Pushes what is new in one followed group; `more` when a full page
    /// was sent (read again at once).
    async fn push_group<S>(&mut self, subject: &str, tx: &mut S) -> Result<(Sent, bool), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        let limit = self.api.cfg.limits.max_fetch;
        let Some(f) = self.follows.get_mut(subject) else {
            return Err(());
        };
        if f.held {
            match groups::access(&self.api, &self.device, &f.access.group).await {
                Ok(a) => f.access = a,
                Err(e) if e.0.code == ErrorCode::Unavailable => {
                    f.retry = true;
                    return Err(());
                }
                Err(e) => return self.unfollow(subject, &e, tx).await,
            }
        }
        let page = match groups::read(&self.api, &self.device, &f.access, f.after, f.position, limit).await {
            Ok(p) => p,
            Err(e) if e.0.code == ErrorCode::Unavailable => {
                tracing::warn!(error = %e.0.message, "socket read of a group failed; retried at the next check");
                f.retry = true;
                return Err(());
            }
            Err(e) => return self.unfollow(subject, &e, tx).await,
        };
        let full = page.entries.len() == limit;
        if let Some(last) = page.entries.last() {
            f.position = Some(last.position);
        }
        f.after = page.next;
        f.held = page.held;
        f.retry = false;
        let served = page.entries.len() as u64;
        for entry in page.entries {
            let Ok(text) = serde_json::to_string(&entry) else { continue };
            if self.entries.put(text.into(), tx).await.is_err() {
                return Ok((Sent::Closed, false));
            }
        }
        if self.entries.close(tx).await.is_err() || tx.flush().await.is_err() {
            return Ok((Sent::Closed, false));
        }
        self.served.inc_by(served);
        Ok((Sent::Ok, full))
    }

    /// Pushes new mailbox items: (outcome, items sent, whether a full page).
    async fn push_mailbox<S>(&mut self, tx: &mut S) -> Result<(Sent, usize, bool), ()>
    where
        S: futures::Sink<Message> + Unpin,
    {
        let limit = self.api.cfg.limits.max_fetch;
        let (items, cut) =
            crate::mailbox::read(&self.api, &self.device, self.mailbox_cursor, limit).await.map_err(|_| ())?;
        let (n, full) = (items.len(), items.len() == limit);
        for item in items {
            self.mailbox_cursor = item.seq;
            let Ok(text) = serde_json::to_string(&item) else { continue };
            if tx.send(Message::Text(text.into())).await.is_err() {
                return Ok((Sent::Closed, 0, false));
            }
        }
        if cut {
            // Cut before a Welcome not readable yet: read on at the next
            // check, as after a failed read.
            return Err(());
        }
        Ok((Sent::Ok, n, full))
    }
}

/// A refusal of a submission frame, with its ref when it had one.
struct RefReject(Option<u64>, Reject);

/// An error frame: `{"type": "error", "group": ..., "code": ..., "message": ...}`,
/// with `ref` when it answers a submission (and then never a group: a
/// frame naming a group says the socket stopped following it), and the
/// `wrong_epoch` fields when they apply.
fn error_frame(reference: Option<u64>, group: Option<&str>, e: &Reject) -> serde_json::Value {
    let mut frame = serde_json::json!({
        "type": "error",
        "group": group,
        "code": e.0.code,
        "message": e.0.message,
        "retryable": e.0.retryable,
    });
    let extra = [
        ("ref", reference),
        ("current_epoch", e.0.current_epoch),
        ("winning_commit_position", e.0.winning_commit_position),
    ];
    if let Some(map) = frame.as_object_mut() {
        for (key, value) in extra {
            if let Some(v) = value {
                map.insert(key.into(), v.into());
            }
        }
    }
    frame
}

async fn send_error<S>(tx: &mut S, group: Option<&str>, e: &Reject) -> Result<(), ()>
where
    S: futures::Sink<Message> + Unpin,
{
    let frame = error_frame(None, group, e);
    tx.send(Message::Text(frame.to_string().into())).await.map_err(|_| ())
}
