//! The `mlsfed` runtime: wiring of the worker roles onto NATS (a connection
//! per role), and the supervised embedded nats-server used when no NATS URL is configured
//! (and by the test harness).
#![forbid(unsafe_code)]

pub mod inspect;
pub mod nats;
mod otlp;
pub mod status;

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which worker roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
    pub sequencer: bool,
    pub fanout: bool,
    /// The federation bridge (runs only when peers are configured).
    pub bridge: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { ingest: true, sequencer: true, fanout: true, bridge: true };
    pub const NONE: Roles = Roles { ingest: false, sequencer: false, fanout: false, bridge: false };
}

/// Connects to NATS (one URL, or a cluster's as a comma-separated list)
/// with reconnects forever: a worker rides out a NATS restart or the loss
/// of a cluster node. `ca_file` (PEM), when set, is the CA the server's certificate
/// must chain to, and TLS is required.
pub async fn connect(url: &str, ca_file: &str) -> anyhow::Result<async_nats::Client> {
    // A cluster is a comma-separated list of URLs; the first one's
    // credentials are used for all of them.
    let (bare, creds) = config::split_cluster_url(url);
    let addrs = bare
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>().with_context(|| format!("{u} is not a NATS URL")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shown = bare.join(",");
    let mut opts = match creds {
        Some((user, pass)) => async_nats::ConnectOptions::with_user_and_password(user, pass),
        None => async_nats::ConnectOptions::new(),
    };
    if !ca_file.is_empty() {
        opts = opts.add_root_certificates(ca_file.into()).require_tls(true);
    }
    let noise = Arc::new(Mutex::new(NatsNoise::default()));
    opts.retry_on_initial_connect()
        .max_reconnects(None)
        .name("mlsfed")
        // A lost connection fails every request in flight on it, and a
        // full subscription drops messages: both must show in the log, or
        // a burst of timeouts elsewhere has no cause anyone can see.
        .event_callback(move |event| {
            let noise = noise.clone();
            async move { log_nats_event(event, &noise) }
        })
        .connect(addrs)
        .await
        .with_context(|| format!("cannot connect to NATS at {shown}"))
}

/// A line that can repeat fast (a message dropped by a full subscription,
/// a failed reconnect attempt in a long outage): the first is logged, then
/// at most one line per 10 s, with how many came since.
#[derive(Default)]
struct Repeats {
    since: u64,
    said_at: Option<tokio::time::Instant>,
}

impl Repeats {
    /// Counts one; `Some(n)` when a line is due, for the `n` it covers.
    fn count(&mut self) -> Option<u64> {
        self.since += 1;
        let now = tokio::time::Instant::now();
        let due = self.said_at.is_none_or(|t| now - t >= std::time::Duration::from_secs(10));
        due.then(|| {
            self.said_at = Some(now);
            std::mem::take(&mut self.since)
        })
    }
}

/// The repeating connection events of one connection.
#[derive(Default)]
struct NatsNoise {
    dropped: Repeats,
    failed: Repeats,
}

/// Logs one connection event. Messages dropped for a full subscription and
/// errors of reconnect attempts are rate-limited ([`Repeats`]). A server
/// error's text may name subjects, which hold group and device ids, so only
/// that it happened is logged above debug.
fn log_nats_event(event: async_nats::Event, noise: &Mutex<NatsNoise>) {
    match event {
        async_nats::Event::Connected => {
            // The next outage's first failure is logged at once.
            if let Ok(mut n) = noise.lock() {
                n.failed = Repeats::default();
            }
            tracing::info!("NATS connection (re)established");
        }
        async_nats::Event::SlowConsumer(_) => {
            if let Some(n) = noise.lock().ok().and_then(|mut n| n.dropped.count()) {
                tracing::warn!(dropped = n, "NATS subscription full: messages to it were dropped");
            }
        }
        async_nats::Event::ClientError(e) => {
            if let Some(n) = noise.lock().ok().and_then(|mut n| n.failed.count()) {
                tracing::warn!(error = %e, attempts = n, "NATS connection attempt failed");
            }
        }
        async_nats::Event::ServerError(e) => {
            tracing::warn!("NATS server error (its text is logged at debug)");
            tracing::debug!(error = %e, "NATS server error");
        }
        // Reconnects are unlimited, so a close is always this process's
        // own (it is stopping), not trouble.
        async_nats::Event::Closed => tracing::info!("NATS connection closed"),
        other => tracing::warn!(event = %other, "NATS connection event"),
    }
}

/// The NATS connections of one process, one per role it runs. A connection
/// is one task in async-nats and one read loop in nats-server, each of
/// which handles its messages one at a time: roles that share one queue
/// behind each other's traffic (measured in docs/benchmarks.md).
#[derive(Clone)]
pub struct Connections {
    pub ingest: async_nats::Client,
    pub sequencer: async_nats::Client,
    pub fanout: async_nats::Client,
    pub bridge: async_nats::Client,
}

impl Connections {
    /// One connection for everything (tools, and tests of one role).
    pub fn shared(client: async_nats::Client) -> Self {
        Self { ingest: client.clone(), sequencer: client.clone(), fanout: client.clone(), bridge: client }
    }

    /// A connection of its own for each role in `roles`; `first` serves
    /// the roles this process does not run.
    pub async fn open(url: &str, ca_file: &str, roles: Roles, first: async_nats::Client) -> anyhow::Result<Self> {
        let own = |on: bool| {
            let first = first.clone();
            async move {
                if on {
                    connect(url, ca_file).await
                } else {
                    Ok(first)
                }
            }
        };
        Ok(Self {
            ingest: own(roles.ingest).await?,
            sequencer: own(roles.sequencer).await?,
            fanout: own(roles.fanout).await?,
            bridge: own(roles.bridge).await?,
        })
    }
}

/// Creates (or updates) every stream, consumer and bucket, retrying for a
/// while: at a cluster's start, or when many processes start at once, the
/// JetStream API answers slowly, and a refused start would only be
/// restarted into the same storm. A configuration the server refuses
/// fails the same way every time and is reported after the last try.
pub async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    cfg: &config::Config,
) -> anyhow::Result<proto::streams::Topology> {
    const TRIES: u32 = 8;
    let mut wait = std::time::Duration::from_millis(500);
    for attempt in 1.. {
        // Boxed: `ensure` is a large future (see `run`).
        match Box::pin(proto::streams::ensure(js, cfg)).await {
            Ok(topo) => return Ok(topo),
            // A partition count that does not match the streams is a
            // configuration error, the same on every try.
            Err(e @ proto::streams::EnsureStreamsError::Partitions { .. }) => {
                return Err(e).context("cannot create streams")
            }
            Err(e) if attempt < TRIES => {
                tracing::warn!(attempt, error = %e, ?wait, "cannot create streams yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e).context("cannot create streams"),
        }
    }
    unreachable!("the loop returns")
}

pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(std::time::Duration::from_secs(10))
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client)
}

/// Runs `roles` until `shutdown` fires or a role fails.
pub async fn run(
    cfg: config::Config,
    roles: Roles,
    nats: Connections,
    listener: Option<TcpListener>,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Each role's handles are bound to its own connection.
    // Boxed: `ensure` is a large future, and several of them inline would
    // overflow a worker thread's stack.
    let topology = |client: &async_nats::Client| {
        let js = jetstream(client.clone());
        let cfg = cfg.clone();
        Box::pin(async move { ensure_streams(&js, &cfg).await })
    };
    let mut tasks = JoinSet::new();
    // Stopping drains front to back: the API stops accepting and finishes
    // its requests first, while the workers still decide and deliver what
    // those requests wait for; then the workers stop.
    let workers_stop = CancellationToken::new();
    let api_done = Arc::new(tokio::sync::Notify::new());
    {
        let (shutdown, workers_stop, api_done) = (shutdown.clone(), workers_stop.clone(), api_done.clone());
        let has_api = roles.ingest;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if has_api {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(25), api_done.notified()).await;
            }
            workers_stop.cancel();
        });
    }
    let shutdown_api = shutdown.clone();
    let shutdown = workers_stop;
    otlp::start(&cfg.tracing, &registry, shutdown.clone())?;
    let status = status::Status::start(jetstream(nats.ingest.clone()), cfg.clone(), registry.clone(), shutdown.clone());
    if roles.sequencer {
        let seq = sequencer::Sequencer::new(
            topology(&nats.sequencer).await?,
            cfg.domain.clone(),
            cfg.streams.clone(),
            sequencer::Metrics::new(&registry)?,
        );
        let sd = shutdown.clone();
        tasks.spawn(async move { seq.run(sd).await.map_err(anyhow::Error::from) });
    }
    if roles.fanout {
        let fo = fanout::Fanout::new(
            topology(&nats.fanout).await?,
            cfg.domain.clone(),
            cfg.streams.clone(),
            fanout::Metrics::new(&registry)?,
        );
        let sd = shutdown.clone();
        tasks.spawn(async move { fo.run(sd).await.map_err(anyhow::Error::from) });
    }
    if roles.bridge && !cfg.peers.is_empty() {
        let topo = topology(&nats.bridge).await?;
        let bridge = federation_bridge::Bridge::new(topo, &cfg, federation_bridge::Metrics::new(&registry)?).await?;
        let sd = shutdown.clone();
        tasks.spawn(async move { bridge.run(sd).await.map_err(anyhow::Error::from) });
    }
    if !roles.ingest {
        // A worker's listener, if any, serves its metrics.
        if let Some(listener) = listener {
            let client = if roles.sequencer { &nats.sequencer } else { &nats.fanout };
            tasks.spawn(serve_metrics(listener, registry.clone(), client.clone(), status.router(), shutdown.clone()));
        }
    } else {
        let listener = listener.context("the ingest role needs a listener")?;
        let topo = topology(&nats.ingest).await?;
        let js = &topo.js;
        let store = match cfg.keydir.backend {
            config::KeydirBackend::Sled => {
                std::fs::create_dir_all(&cfg.data_dir).context("cannot create data dir")?;
                let db = sled::open(cfg.keydir_path()).context("cannot open key directory")?;
                keydir::Backend::Sled(keydir::SledStore::open(&db)?)
            }
            config::KeydirBackend::Jetstream => {
                keydir::Backend::JetStream(Box::new(keydir::JsStore::open(js, cfg.streams.replicas).await?))
            }
        };
        let kd = keydir::KeyDirectory::new(
            store,
            cfg.keydir.clone(),
            cfg.domain.clone(),
            cfg.operator_seed()?,
            keydir::Metrics::new(&registry)?,
        );
        let max_payload = topo.js.client().server_info().max_payload;
        let max_body = proto::limits::body_limit(cfg.limits.max_body_bytes, max_payload);
        if max_body < cfg.limits.max_body_bytes {
            tracing::warn!(
                max_body_bytes = cfg.limits.max_body_bytes,
                nats_max_payload = max_payload,
                limit = max_body,
                "NATS' max_payload leaves too little room for limits.max_body_bytes; bodies are limited to less"
            );
        }
        let api = Arc::new(ingest::Api {
            max_body,
            checkpoints: proto::checkpoint::Reader::new(&topo),
            topo,
            keydir: Arc::new(kd),
            cfg: cfg.clone(),
            registry: registry.clone(),
            metrics: ingest::Metrics::new(&registry)?,
            shutdown: shutdown_api.clone(),
            websockets: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_websockets)),
            tails: Default::default(),
            verdicts: Default::default(),
            removals: Default::default(),
            socket_submits: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_in_flight_requests.max(1))),
            status_page: status.router(),
        });
        let done = api_done.clone();
        tasks.spawn(async move {
            let served = ingest::serve(listener, api).await.map_err(anyhow::Error::from);
            done.notify_one();
            served
        });
    }
    // The first role to stop (shutdown, or a failure) stops the process.
    let first = tasks.join_next().await;
    shutdown_api.cancel();
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    match first {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(anyhow::anyhow!("a role panicked: {e}")),
        None => Ok(()),
    }
}

/// `/metrics`, `/healthz`, `/readyz` and `/status` for worker processes
/// without the API.
async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    nats: async_nats::Client,
    status: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let metrics = move || {
        let registry = registry.clone();
        async move { prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap_or_default() }
    };
    let ready = move || {
        let nats = nats.clone();
        async move {
            match nats.connection_state() {
                async_nats::connection::State::Connected => (axum::http::StatusCode::OK, "ready"),
                _ => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS"),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(status);
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

#[cfg(test)]
mod noise_tests {
    use super::Repeats;
    use std::time::Duration;

    /// The first of a burst is said at once; the rest of the burst is said
    /// once, 10 s later, with its count; nothing is said in between.
    #[tokio::test(start_paused = true)]
    async fn repeats_are_said_once_per_ten_seconds_with_their_count() {
        let mut r = Repeats::default();
        assert_eq!(r.count(), Some(1));
        for _ in 0..99 {
            assert_eq!(r.count(), None);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.count(), Some(100), "the 99 held back and this one");
        assert_eq!(r.count(), None);
    }
}
