//! A fleet of bench devices against one operator: in-memory members that
//! build what devices send (client crypto before the timed part), and one
//! WebSocket per device that counts every entry pushed to it. Deliveries are
//! counted at every member device, with the time each arrived.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use client::lite::Lite;
use client::Http;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::unix_now;

/// One delivery seen by one device: (group index, position, when).
type Arrival = (u32, u64, Instant);

/// Group ids to small indices, shared with the readers.
#[derive(Default)]
pub struct Groups {
    ids: RwLock<HashMap<String, u32>>,
    names: RwLock<Vec<String>>,
}

impl Groups {
    fn intern(&self, g: &str) -> u32 {
        if let Some(i) = self.ids.read().ok().and_then(|m| m.get(g).copied()) {
            return i;
        }
        let (Ok(mut ids), Ok(mut names)) = (self.ids.write(), self.names.write()) else {
            return u32::MAX;
        };
        let i = names.len() as u32;
        ids.insert(g.to_owned(), i);
        names.push(g.to_owned());
        i
    }
    fn index(&self, g: &str) -> u32 {
        self.ids.read().ok().and_then(|m| m.get(g).copied()).unwrap_or(u32::MAX)
    }
}

/// A submission's answer on a device's socket.
type Answer = Result<client::Accepted, proto::ApiError>;

/// How the fleet's devices submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /v1/messages`, one request each.
    Http,
    /// A binary frame on the device's own WebSocket.
    Socket,
}

struct Reader {
    follow: mpsc::UnboundedSender<Vec<(String, u64)>>,
    submit: mpsc::UnboundedSender<(Vec<u8>, oneshot::Sender<Answer>)>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Groups of 10 made by [`Fleet::groups_of_ten`].
pub struct Tens {
    /// The groups of each device.
    pub per_device: Vec<Vec<String>>,
    pub sizes: HashMap<String, usize>,
    /// Each group with its creator, who sends in it.
    pub senders: Vec<(String, usize)>,
}

pub struct Fleet {
    pub members: Vec<Lite>,
    pub https: Vec<Http>,
    pub groups: Arc<Groups>,
    readers: Vec<Reader>,
    /// Deliveries counted by every reader together.
    pub delivered: Arc<AtomicU64>,
    /// Entries pushed twice to one device (must stay 0).
    pub duplicates: Arc<AtomicU64>,
    /// How [`Fleet::run`] submits.
    pub via: Via,
}

/// What one closed- or open-loop run measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub messages: usize,
    pub deliveries_expected: u64,
    pub deliveries: u64,
    pub duplicates: u64,
    pub accept_secs: f64,
    pub deliver_secs: f64,
    pub latencies: Vec<Duration>,
}

impl Run {
    pub fn accepted_per_s(&self) -> f64 {
        self.messages as f64 / self.accept_secs.max(1e-9)
    }
    /// Messages whose every delivery arrived, per second of the whole run.
    pub fn delivered_per_s(&self) -> f64 {
        let complete = self.messages as f64 * (self.deliveries as f64 / self.deliveries_expected.max(1) as f64);
        complete / self.deliver_secs.max(1e-9)
    }
    pub fn deliveries_per_s(&self) -> f64 {
        self.deliveries as f64 / self.deliver_secs.max(1e-9)
    }
    pub fn pct_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)].as_secs_f64() * 1000.0
    }
}

/// One message to send: (group id, sender index, body).
pub type Outgoing = (String, usize, Vec<u8>);

impl Fleet {
    /// `n` devices of `domain`, with tokens signed by `secret`, reaching `url`.
    pub fn new(domain: &str, secret: &[u8], url: &str, n: usize, tag: &str) -> anyhow::Result<Self> {
        let mut members = Vec::with_capacity(n);
        let mut https = Vec::with_capacity(n);
        for i in 0..n {
            let id = proto::DeviceId::new(domain, &format!("{tag}{i}"), "d")?;
            let token = proto::auth::issue(secret, &id, unix_now() + 6 * 3600);
            https.push(Http::new(url, &token, id.clone()));
            members.push(Lite::new(id)?);
        }
        Ok(Self {
            members,
            https,
            groups: Arc::default(),
            readers: Vec::new(),
            delivered: Arc::default(),
            duplicates: Arc::default(),
            via: Via::Http,
        })
    }

    /// Points every device at another ingest (scale-out runs).
    pub fn reconnect(&mut self, urls: &[String]) {
        for (i, h) in self.https.iter_mut().enumerate() {
            let url = &urls[i % urls.len()];
            *h = Http::new(url, h.token(), h.device().clone());
        }
    }

    /// Creates groups `(room, creator, members)` concurrently: every body is
    /// built first, then the creations, then the adds (in Commits of at most
    /// 100 members, so each stays under NATS' payload limit).
    pub async fn create_groups(&mut self, specs: &[(String, usize, Vec<usize>)]) -> anyhow::Result<Vec<String>> {
        let mut creates = Vec::new();
        let mut ids = Vec::new();
        for (room, creator, _) in specs {
            let (g, gi) = self.members[*creator].create_group(room)?;
            self.groups.intern(&g);
            creates.push((*creator, gi));
            ids.push(g);
        }
        submit_all(&self.https, creates.into_iter().map(|(c, b)| (c, b, true)).collect(), 64).await?;
        let mut round = 0;
        loop {
            let mut adds = Vec::new();
            for ((_, creator, members), g) in specs.iter().zip(&ids) {
                let chunk: Vec<usize> = members.iter().copied().skip(round * 100).take(100).collect();
                if chunk.is_empty() {
                    continue;
                }
                let kps = chunk.iter().map(|m| self.members[*m].key_package()).collect::<Result<Vec<_>, _>>()?;
                adds.push((*creator, g.clone(), self.members[*creator].add(g, &kps)?));
            }
            if adds.is_empty() {
                break;
            }
            let bodies = adds.iter().map(|(c, _, b)| (*c, b.clone(), false)).collect();
            submit_all(&self.https, bodies, 64).await?;
            for (c, g, _) in &adds {
                self.members[*c].merge(g)?;
            }
            round += 1;
        }
        Ok(ids)
    }

    /// `n` groups of 10 (group i: device i and the nine after it, of all
    /// the fleet's devices), created, and followed on every member device.
    pub async fn groups_of_ten(&mut self, n: usize) -> anyhow::Result<Tens> {
        let devices = self.members.len();
        let specs: Vec<(String, usize, Vec<usize>)> =
            (0..n).map(|i| (format!("g{i}"), i % devices, (1..10).map(|k| (i + k) % devices).collect())).collect();
        let groups = self.create_groups(&specs).await?;
        let mut per_device: Vec<Vec<String>> = vec![Vec::new(); devices];
        for ((_, creator, members), g) in specs.iter().zip(&groups) {
            per_device[*creator].push(g.clone());
            for m in members {
                per_device[*m].push(g.clone());
            }
        }
        self.follow(&per_device).await?;
        let sizes = groups.iter().map(|g| (g.clone(), 10)).collect();
        let senders = groups.iter().cloned().zip(0..).map(|(g, i)| (g, i % devices)).collect();
        Ok(Tens { per_device, sizes, senders })
    }

    /// Opens one WebSocket per device (once) and follows `groups[i]` on
    /// device i from the group's current end, after waiting until the
    /// operator lists them for the device.
    pub async fn follow(&mut self, per_device: &[Vec<String>]) -> anyhow::Result<()> {
        let waits = per_device.iter().enumerate().filter(|(_, gs)| !gs.is_empty()).map(|(i, groups)| {
            let http = self.https[i].clone();
            async move {
                let want: HashSet<&String> = groups.iter().collect();
                let t0 = Instant::now();
                loop {
                    let heads = http.groups().await?;
                    let from: Vec<(String, u64)> =
                        heads.into_iter().filter(|h| want.contains(&h.group)).map(|h| (h.group, h.seq)).collect();
                    if from.len() == want.len() {
                        return anyhow::Ok((i, from));
                    }
                    anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "device {i} never listed its groups");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        type Ready = anyhow::Result<(usize, Vec<(String, u64)>)>;
        let ready: Vec<Ready> = futures::stream::iter(waits).buffer_unordered(64).collect().await;
        for r in ready {
            let (i, from) = r?;
            while self.readers.len() <= i {
                let r = self.open_reader(self.readers.len()).await?;
                self.readers.push(r);
            }
            self.readers[i].follow.send(from).ok().context("reader gone")?;
        }
        Ok(())
    }

    async fn open_reader(&self, i: usize) -> anyhow::Result<Reader> {
        // Entries gathered into frames: a device of a busy group decodes
        // (and would persist) many at once.
        let mut ws = self.https[i].websocket_batched(0).await?;
        let (follow, mut rx) = mpsc::unbounded_channel::<Vec<(String, u64)>>();
        let (submit, mut submits) = mpsc::unbounded_channel::<(Vec<u8>, oneshot::Sender<Answer>)>();
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let (arr, groups, delivered) = (arrivals.clone(), self.groups.clone(), self.delivered.clone());
        let task = tokio::spawn(async move {
            #[derive(serde::Deserialize)]
            struct Entry<'a> {
                #[serde(borrow)]
                group: &'a str,
                position: u64,
                kind: &'a str,
            }
            #[derive(serde::Deserialize)]
            struct Frame<'a> {
                #[serde(rename = "type")]
                frame: &'a str,
                #[serde(default)]
                group: Option<&'a str>,
                #[serde(default)]
                position: u64,
                #[serde(default)]
                epoch: u64,
                #[serde(default)]
                kind: &'a str,
                #[serde(default, rename = "ref")]
                reference: Option<u64>,
                #[serde(default, borrow)]
                entries: Vec<Entry<'a>>,
            }
            // Submissions sent on this socket, by ref, until answered.
            let mut pending: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
            let mut next_ref = 0u64;
            loop {
                tokio::select! {
                    f = rx.recv() => {
                        let Some(gs) = f else { return Ok(()) };
                        let follow: serde_json::Map<String, serde_json::Value> =
                            gs.into_iter().map(|(g, after)| (g, serde_json::json!({ "after": after }))).collect();
                        ws.send(Message::Text(serde_json::json!({ "follow": follow }).to_string().into())).await?;
                    }
                    Some((body, answer)) = submits.recv() => {
                        next_ref += 1;
                        pending.insert(next_ref, answer);
                        ws.send(Message::Binary(client::http::submit_frame(next_ref, &body).into())).await?;
                    }
                    m = ws.next() => {
                        let Some(m) = m else { return Ok(()) };
                        if let Message::Text(t) = m? {
                            let at = Instant::now();
                            let f: Frame<'_> = serde_json::from_str(&t)?;
                            match (f.frame, f.reference) {
                                ("entry", _) if f.kind == "application" => {
                                    let g = groups.index(f.group.unwrap_or_default());
                                    arr.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push((g, f.position, at));
                                    delivered.fetch_add(1, Ordering::Relaxed);
                                }
                                ("entries", _) => {
                                    let mut arr = arr.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                                    let mut n = 0;
                                    // Consecutive entries are mostly of one group.
                                    let mut last: Option<(&str, u32)> = None;
                                    for e in f.entries.iter().filter(|e| e.kind == "application") {
                                        let g = match last {
                                            Some((name, g)) if name == e.group => g,
                                            _ => groups.index(e.group),
                                        };
                                        last = Some((e.group, g));
                                        arr.push((g, e.position, at));
                                        n += 1;
                                    }
                                    delivered.fetch_add(n, Ordering::Relaxed);
                                }
                                ("accepted", Some(r)) => {
                                    let a = client::Accepted {
                                        group: f.group.unwrap_or_default().to_owned(),
                                        position: f.position,
                                        epoch: f.epoch,
                                    };
                                    if let Some(tx) = pending.remove(&r) {
                                        let _ = tx.send(Ok(a));
                                    }
                                }
                                ("error", Some(r)) => {
                                    let e: proto::ApiError = serde_json::from_str(&t)?;
                                    if let Some(tx) = pending.remove(&r) {
                                        let _ = tx.send(Err(e));
                                    }
                                }
                                ("error", None) => anyhow::bail!("reader {i}: {t}"),
                                _ => {}
                            }
                        }
                    }
                }
            }
        });
        Ok(Reader { follow, submit, arrivals, task })
    }

    /// Sends `bodies` with `in_flight` submits at a time (closed loop), or
    /// at `rate` msgs/s (open loop), and waits until every member of each
    /// message's group has it (or `timeout`).
    pub async fn run(
        &mut self,
        bodies: Vec<Outgoing>,
        group_sizes: &HashMap<String, usize>,
        in_flight: usize,
        rate: Option<f64>,
        timeout: Duration,
    ) -> anyhow::Result<Run> {
        self.take_arrivals();
        let base = self.delivered.load(Ordering::Relaxed);
        let expected: u64 = bodies.iter().map(|(g, _, _)| group_sizes.get(g).copied().unwrap_or(0) as u64).sum();
        let messages = bodies.len();
        let starts: Arc<Mutex<HashMap<(u32, u64), Instant>>> = Arc::default();
        let t0 = Instant::now();
        let send = |(g, who, body): Outgoing| {
            let (http, starts, gi) = (self.https[who].clone(), starts.clone(), self.groups.index(&g));
            let socket = match self.via {
                Via::Socket => self.readers.get(who).map(|r| r.submit.clone()),
                Via::Http => None,
            };
            async move {
                let s = Instant::now();
                let a = match socket {
                    Some(socket) => submit_on_socket(&socket, body).await?,
                    None => submit(&http, body).await?,
                };
                starts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert((gi, a.position), s);
                anyhow::Ok(())
            }
        };
        match rate {
            None => {
                let results: Vec<anyhow::Result<()>> =
                    futures::stream::iter(bodies.into_iter().map(send)).buffer_unordered(in_flight).collect().await;
                results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
            }
            Some(r) => {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1.0)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut tasks = Vec::with_capacity(bodies.len());
                for b in bodies {
                    tick.tick().await;
                    tasks.push(tokio::spawn(send(b)));
                }
                for t in tasks {
                    t.await??;
                }
            }
        }
        let accept_secs = t0.elapsed().as_secs_f64();
        while self.delivered.load(Ordering::Relaxed) - base < expected && t0.elapsed() < timeout {
            for (i, r) in self.readers.iter_mut().enumerate() {
                if r.task.is_finished() {
                    let why = futures::FutureExt::now_or_never(&mut r.task);
                    anyhow::bail!("reader {i} stopped: {why:?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deliver_secs = t0.elapsed().as_secs_f64();
        let deliveries = self.delivered.load(Ordering::Relaxed) - base;
        let starts = std::mem::take(&mut *starts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        let mut latencies = Vec::with_capacity(deliveries as usize);
        let mut duplicates = 0;
        for per_device in self.take_arrivals() {
            let mut seen = HashSet::with_capacity(per_device.len());
            for (g, p, at) in per_device {
                if !seen.insert((g, p)) {
                    duplicates += 1;
                }
                if let Some(s) = starts.get(&(g, p)) {
                    latencies.push(at.saturating_duration_since(*s));
                }
            }
        }
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        latencies.sort_unstable();
        Ok(Run {
            messages,
            deliveries_expected: expected,
            deliveries,
            duplicates,
            accept_secs,
            deliver_secs,
            latencies,
        })
    }

    fn take_arrivals(&self) -> Vec<Vec<Arrival>> {
        self.readers.iter().filter_map(|r| r.arrivals.lock().ok().map(|mut a| std::mem::take(&mut *a))).collect()
    }

    /// `n` application messages spread round-robin over `groups`, each from
    /// the group's creator, encrypted now.
    pub fn messages(&mut self, groups: &[(String, usize)], n: usize, size: usize) -> anyhow::Result<Vec<Outgoing>> {
        let text = vec![b'x'; size];
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (g, who) = &groups[i % groups.len()];
            out.push((g.clone(), *who, self.members[*who].encrypt(g, &text)?));
        }
        Ok(out)
    }

    pub fn close(&mut self) {
        for r in self.readers.drain(..) {
            r.task.abort();
        }
    }
}

/// Submits `(sender, body, is_creation)` with `in_flight` at a time; every
/// one must be accepted.
pub async fn submit_all(https: &[Http], bodies: Vec<(usize, Vec<u8>, bool)>, in_flight: usize) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(bodies.into_iter().map(|(who, body, create)| {
        let http = https[who].clone();
        async move {
            if create {
                http.create_group(body).await?;
            } else {
                submit(&http, body).await?;
            }
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(in_flight)
    .collect()
    .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

/// Submits `body` on a device's socket, resending the same bytes while the
/// answer is retryable, as [`submit`] does over HTTP.
async fn submit_on_socket(
    socket: &mpsc::UnboundedSender<(Vec<u8>, oneshot::Sender<Answer>)>,
    body: Vec<u8>,
) -> anyhow::Result<client::Accepted> {
    let mut last = None;
    for _ in 0..6 {
        let (tx, rx) = oneshot::channel();
        socket.send((body.clone(), tx)).ok().context("the device's socket is gone")?;
        match rx.await.context("the device's socket closed before answering")? {
            Ok(a) => return Ok(a),
            Err(e) if e.code.retryable() && e.code != proto::ErrorCode::WrongEpoch => {
                last = Some(e);
                // `unavailable` (the socket's or the process's limit): let
                // some of the answers come first.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => anyhow::bail!("{:?}: {}", e.code, e.message),
        }
    }
    Err(last.map(|e| anyhow::anyhow!("{:?}: {}", e.code, e.message)).unwrap_or_else(|| anyhow::anyhow!("no verdict")))
}

/// Submits `body`, resending the same bytes while the answer is retryable
/// (a `timeout` leaves the submission queued): the API's way to learn it.
pub async fn submit(http: &Http, body: Vec<u8>) -> anyhow::Result<client::Accepted> {
    let mut last = None;
    for _ in 0..6 {
        match http.submit(body.clone(), None).await {
            Ok(a) => return Ok(a),
            Err(e) if e.code().is_some_and(|c| c.retryable() && c != proto::ErrorCode::WrongEpoch) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("no verdict")))
}
