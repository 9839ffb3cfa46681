//! The `mlsfed` binary: one subcommand per worker role, `run` for every role
//! in one process, and `demo`, `bench` and `token` for people.
#![forbid(unsafe_code)]

mod admin;
mod bench;
mod cluster;
mod demo;
mod procs;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mlsfed::nats::NatsProcess;
use mlsfed::Roles;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc malloc: under load the allocator was about a
/// seventh of the operator's CPU (docs/benchmarks.md), and the runtime's
/// many small, short-lived buffers are what mimalloc's per-thread pages
/// are made for.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mlsfed", about = "Federated MLS delivery service", version)]
struct Cli {
    /// TOML config file; MLSFED_* environment variables override it.
    #[arg(long, global = true, env = "MLSFED_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every role in one process (embedded nats-server when no NATS URL is set).
    Run,
    /// The client API (HTTP + WebSocket) and key directory.
    Ingest,
    /// The per-group sequencer.
    Sequencer,
    /// The local fan-out worker.
    Fanout,
    /// The federation bridge to peer operators.
    Bridge,
    /// Print this operator's Ed25519 public key (peers put it in their config).
    OperatorKey,
    /// Federation state with peers (needs the operator's NATS); also under
    /// `admin peers`.
    Peer {
        #[command(subcommand)]
        cmd: admin::PeerCmd,
    },
    /// Operator tools over the operator's NATS: peers, groups, streams and
    /// dead letters (`--json` for one JSON object per line).
    Admin(admin::AdminArgs),
    /// Issue a bearer token for a device of this operator.
    Token {
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 30 * 86_400)]
        ttl_secs: u64,
    },
    /// Start three federated operators on the embedded defaults and run a
    /// scripted conversation between devices of each.
    Demo,
    /// Two federated operators, each on its own 3-node NATS cluster (R3),
    /// with 2 ingest, 3 sequencer, 3 fanout and 2 bridge processes each.
    Cluster {
        /// Run a conversation across both operators, then stop.
        #[arg(long)]
        check: bool,
        /// Kill one process of each role and NATS nodes under traffic, check
        /// that nothing was lost, doubled or reordered, print the report.
        #[arg(long, conflicts_with = "check")]
        chaos: bool,
        /// Measure msgs/s with this many messages on the cluster and on one
        /// nats-server (same processes), then stop.
        #[arg(long, conflicts_with_all = ["check", "chaos"])]
        throughput: Option<usize>,
        /// Keep configs, data and logs here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Measure the ceiling, end-to-end delivery at every member, scale-out,
    /// federation and claims (docs/benchmarks.md); print a table and JSON.
    Bench {
        #[command(flatten)]
        opts: bench::Options,
        /// The bench nats-server's `sync_interval` ("always", "1s", or ""
        /// for nats-server's 2-minute default); default: streams.sync_interval.
        #[arg(long)]
        sync: Option<String>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLSFED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let cfg = config::Config::load(cli.config.as_deref())?;
    match cli.cmd {
        Cmd::Run => serve(cfg, Roles::ALL).await,
        Cmd::Ingest => serve(cfg, Roles { ingest: true, ..Roles::NONE }).await,
        Cmd::Sequencer => serve(cfg, Roles { sequencer: true, ..Roles::NONE }).await,
        Cmd::Fanout => serve(cfg, Roles { fanout: true, ..Roles::NONE }).await,
        Cmd::Bridge => serve(cfg, Roles { bridge: true, ..Roles::NONE }).await,
        Cmd::OperatorKey => {
            let key = proto::identity::operator_key(&cfg.operator_seed()?);
            println!("{}", proto::identity::public_key_b64(&key));
            Ok(())
        }
        Cmd::Peer { cmd } => admin::peer(&cfg, cmd).await,
        Cmd::Admin(args) => admin::admin(&cfg, args).await,
        Cmd::Token { device, ttl_secs } => {
            let d = proto::DeviceId::parse(&device)?;
            anyhow::ensure!(d.domain() == cfg.domain, "device {d} is not on this operator ({})", cfg.domain);
            println!("{}", proto::auth::issue(cfg.token_secret.expose().as_bytes(), &d, unix_now() + ttl_secs));
            Ok(())
        }
        Cmd::Demo => demo::run(cfg).await,
        Cmd::Cluster { check, chaos, throughput, dir } => {
            let mode = match (check, chaos, throughput) {
                (_, _, Some(n)) => cluster::Mode::Throughput(n),
                (true, _, _) => cluster::Mode::Check,
                (_, true, _) => cluster::Mode::Chaos,
                _ => cluster::Mode::Run,
            };
            cluster::run(cfg, dir, mode).await
        }
        Cmd::Bench { opts, sync } => {
            let mut cfg = cfg;
            if let Some(s) = sync {
                cfg.streams.sync_interval = s;
            }
            bench::run(cfg, opts).await
        }
    }
}

pub use proto::unix_now;

/// Starts the embedded nats-server when no URL is configured.
pub fn embedded_nats(cfg: &config::Config) -> anyhow::Result<Option<NatsProcess>> {
    if !cfg.nats_url.is_empty() {
        return Ok(None);
    }
    let bin = mlsfed::nats::find_binary(&cfg.nats_server_bin);
    let p = NatsProcess::start_embedded(&bin, &cfg.nats_dir(), 0, cfg)?;
    tracing::info!(url = %p.url(), "embedded nats-server started");
    Ok(Some(p))
}

async fn serve(mut cfg: config::Config, roles: Roles) -> anyhow::Result<()> {
    let mut embedded = embedded_nats(&cfg)?;
    if let Some(p) = &embedded {
        cfg.nats_url = p.url();
    }
    let client = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;
    // The streams exist before we announce ourselves, so whoever waits for
    // the announcement can use them at once.
    mlsfed::ensure_streams(&mlsfed::jetstream(client.clone()), &cfg).await?;
    let listener = if roles.ingest {
        let l = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        // Tests and scripts read this line to learn the port of `:0`.
        println!("mlsfed listening on http://{}", l.local_addr()?);
        Some(l)
    } else if !cfg.metrics_listen.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.metrics_listen))?;
        println!("mlsfed worker started; metrics on http://{}", l.local_addr()?);
        Some(l)
    } else {
        println!("mlsfed worker started");
        None
    };
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("stopping: draining in-flight work");
        sd.cancel();
    });
    // The embedded server outlives the drain: it stops only once every role
    // is done with NATS.
    let nats_stop = CancellationToken::new();
    let supervisor = embedded.take().map(|p| tokio::spawn(supervise(p, nats_stop.clone())));
    let nats = mlsfed::Connections::open(&cfg.nats_url, &cfg.nats_ca_file, roles, client).await?;
    let mut run = tokio::spawn(mlsfed::run(cfg, roles, nats, listener, prometheus::Registry::new(), shutdown.clone()));
    let result = tokio::select! {
        r = &mut run => r,
        _ = shutdown.cancelled() => match tokio::time::timeout(DRAIN, &mut run).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(limit = ?DRAIN, "drain did not finish in time; stopping anyway");
                run.abort();
                Ok(Ok(()))
            }
        },
    };
    // The roles are done with NATS: now stop the embedded server, if ours.
    shutdown.cancel();
    nats_stop.cancel();
    if let Some(s) = supervisor {
        let _ = s.await;
    }
    result.map_err(|e| anyhow::anyhow!("roles panicked: {e}"))?
}

/// How long a stopping process may take to finish what it holds.
const DRAIN: Duration = Duration::from_secs(30);

/// Resolves on SIGTERM or SIGINT: the signals a process manager or a person
/// sends to stop a process.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Keeps the embedded nats-server running (restarting it on the same port
/// if it dies) until `shutdown`; then stops it, so no server outlives us.
async fn supervise(mut p: NatsProcess, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if p.exited() {
            tracing::warn!("embedded nats-server exited; restarting");
            if let Err(e) = p.restart() {
                tracing::error!(error = %e, "cannot restart nats-server");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || p.terminate(Duration::from_secs(10))).await;
}
