//! `mlsfed bench`: figures on this machine, printed and written as JSON,
//! never asserted. One run, one nats-server:
//! 1. the ceiling: raw JetStream publish and consume+ack at the bench's
//!    message size;
//! 2. one operator, end to end: 1000 groups of 10 members (closed loop, then
//!    open loop at half the measured rate), one group each of 2, 10, 100 and
//!    1000 members, Commits on one group and across 1000 groups; with
//!    JetStream writes and stored bytes per message;
//! 3. scale-out: the 1000 × 10 load with 1, 2 and 4 sequencer and fanout
//!    processes (separate OS processes against the same nats-server);
//! 4. federation: one link, two links, and catch-up after a peer's outage;
//! 5. KeyPackage claims per second on each keydir backend.
//!
//! Every delivery is counted at the member device it reached (one WebSocket
//! per device); client crypto happens before the timed parts.

mod cpu;
mod fed;
pub(crate) mod fleet;
mod scale;
mod stages;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::embedded_nats;
use fleet::{Fleet, Run, Via};

#[derive(clap::Args)]
pub struct Options {
    /// Messages of the 1000 groups x 10 members run; others scale from it.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Application message size before encryption, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Skip the multi-process scale-out runs.
    #[arg(long)]
    pub no_scale_out: bool,
    /// Submissions in flight at once in the closed-loop runs of many groups.
    #[arg(long, default_value_t = 1024)]
    pub in_flight: usize,
    /// Run the in-process operator's roles on one NATS connection instead
    /// of one each (to measure what that costs).
    #[arg(long)]
    pub shared_connection: bool,
    /// Only the ceiling and the federation runs (for tuning a link).
    #[arg(long, conflicts_with = "groups_only")]
    pub federation_only: bool,
    /// Only the ceiling and the one-group runs (for tuning delivery).
    #[arg(long, conflicts_with = "claims_only")]
    pub groups_only: bool,
    /// Only the ceiling and the KeyPackage claims on each backend.
    #[arg(long, conflicts_with = "federation_only")]
    pub claims_only: bool,
}

const DEVICES: usize = 1000;
const GROUPS: usize = 1000;

/// Sum over every stream (KV buckets included) of the last sequence (every
/// write takes one) and of the stored bytes.
async fn js_totals(js: &async_nats::jetstream::Context) -> anyhow::Result<(u64, i64)> {
    let mut names = js.stream_names();
    let (mut writes, mut bytes) = (0u64, 0i64);
    while let Some(name) = names.next().await {
        let name = name?;
        if name.starts_with("BENCH_") {
            continue;
        }
        let mut s = js.get_stream(&name).await?;
        let info = s.info().await?;
        writes += info.state.last_sequence;
        bytes += info.state.bytes as i64;
    }
    Ok((writes, bytes))
}

/// Runs `f` and returns its result with the JetStream writes and stored
/// bytes per message it cost.
struct Cost {
    writes_per_msg: f64,
    bytes_per_msg: f64,
}

async fn cost_of(js: &async_nats::jetstream::Context, before: (u64, i64), messages: usize) -> anyhow::Result<Cost> {
    // Let the workers finish what the messages started (cursors, acks).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = js_totals(js).await?;
    let n = messages.max(1) as f64;
    Ok(Cost { writes_per_msg: (after.0 - before.0) as f64 / n, bytes_per_msg: (after.1 - before.1) as f64 / n })
}

pub(crate) fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    // Tooling, not behaviour: the CPU model names the machine in the report.
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({ "cores": cores, "cpu": model, "os": std::env::consts::OS })
}

pub async fn run(mut cfg: config::Config, opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    cfg.data_dir = tmp.path().join("operator");
    cfg.limits.max_connections = 8192;
    cfg.limits.max_in_flight_requests = 8192;
    cfg.limits.max_body_bytes = 4 << 20;
    let embedded = embedded_nats(&cfg)?.context("bench runs its own nats-server; unset MLSFED_NATS_URL")?;
    cfg.nats_url = embedded.url();
    let nats = mlsfed::connect(&cfg.nats_url, &cfg.nats_ca_file).await?;
    let js = mlsfed::jetstream(nats.clone());
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    report.insert("nats_sync_interval".into(), json!(cfg.streams.sync_interval));

    // The message size: one encrypted application message as sent.
    let mut probe = client::lite::Lite::new(proto::DeviceId::new(&cfg.domain, "probe", "d")?)?;
    let (pg, _) = probe.create_group("probe")?;
    let msg_bytes = probe.encrypt(&pg, &vec![b'x'; opts.size])?.len();
    report.insert("message_bytes".into(), json!(msg_bytes));

    // 1. The ceiling.
    let (publish, consume) = ceiling(&js, msg_bytes).await?;
    println!("raw JetStream (R1 file, {msg_bytes} B): publish {publish:.0} msgs/s, consume+ack {consume:.0} msgs/s");
    report.insert("raw_publish_msgs_per_s".into(), json!(publish));
    report.insert("raw_consume_msgs_per_s".into(), json!(consume));

    // Sections 2 and 3 are skipped with `--federation-only`.
    'operator: {
        if opts.federation_only || opts.claims_only {
            break 'operator;
        }
        // 2. One operator, in this process.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let connections = if opts.shared_connection {
            mlsfed::Connections::shared(nats.clone())
        } else {
            mlsfed::Connections::open(&cfg.nats_url, &cfg.nats_ca_file, mlsfed::Roles::ALL, nats.clone()).await?
        };
        report.insert("shared_connection".into(), json!(opts.shared_connection));
        let server = tokio::spawn(mlsfed::run(
            cfg.clone(),
            mlsfed::Roles::ALL,
            connections,
            Some(listener),
            registry.clone(),
            shutdown.clone(),
        ));
        let secret = cfg.token_secret.expose().as_bytes().to_vec();
        let mut fleet = Fleet::new(&cfg.domain, &secret, &url, DEVICES, "dev")?;
        let in_flight = opts.in_flight.max(1);
        let tens = if opts.groups_only {
            None
        } else {
            let t_setup = Instant::now();
            let tens = fleet.groups_of_ten(GROUPS).await?;
            println!(
                "setup: {DEVICES} devices, {GROUPS} groups of 10, one WebSocket per device: {:?}",
                t_setup.elapsed()
            );
            Some(tens)
        };
        if let Some(fleet::Tens { sizes, senders, .. }) = &tens {
            // 2a. 1000 groups × 10, closed loop then open loop: submitted
            // over HTTP, then on each sender's own socket (the headline
            // figures).
            for via in [Via::Http, Via::Socket] {
                fleet.via = via;
                let (label, prefix) = match via {
                    Via::Http => ("POST /v1/messages", "end_to_end_http_"),
                    Via::Socket => ("the sender's WebSocket", "end_to_end_"),
                };
                let key = |k: &str| format!("{prefix}{k}");
                let bodies = fleet.messages(senders, opts.messages, opts.size)?;
                // Profilers start on this line: what follows is the timed run.
                println!("sending {} messages over {GROUPS} groups through {label}", bodies.len());
                let before = js_totals(&js).await?;
                let stages_before = stages(&registry);
                let clock = cpu::Clock::start(vec![
                    cpu::Group::new("bench process (operator and devices)", [std::process::id()]),
                    cpu::Group::new("nats-server", embedded.pid()),
                ]);
                let a = fleet.run(bodies, sizes, in_flight, None, Duration::from_secs(90)).await?;
                let used = clock.stop();
                let cost = cost_of(&js, before, a.messages).await?;
                print_run(
                    &format!("1000 groups x 10 members, {in_flight} submits in flight through {label}"),
                    &a,
                    Some(&cost),
                );
                cpu::note(&mut report, &key("cpu_cores"), &used);
                // Where a submit's time goes, from the operator's own
                // histograms: the submit (auth to verdict), and the
                // sequencer's decision.
                let stages_after = stages(&registry);
                for (name, (sum, count)) in &stages_after {
                    let (s0, c0) = stages_before.get(name).copied().unwrap_or((0.0, 0));
                    let n = count.saturating_sub(c0);
                    if n > 0 {
                        let mean_ms = (sum - s0) / n as f64 * 1000.0;
                        println!("  operator: {name} mean {mean_ms:.2} ms over {n}");
                        report.insert(format!("{prefix}stage_{name}_mean_ms"), json!(mean_ms));
                    }
                }
                report.insert(key("msgs_per_s"), json!(a.delivered_per_s()));
                report.insert(key("accepted_msgs_per_s"), json!(a.accepted_per_s()));
                report.insert(key("deliveries_per_s"), json!(a.deliveries_per_s()));
                report.insert(key("p50_ms"), json!(a.pct_ms(0.5)));
                report.insert(key("p99_ms"), json!(a.pct_ms(0.99)));
                report.insert(key("p999_ms"), json!(a.pct_ms(0.999)));
                report.insert(key("writes_per_msg"), json!(cost.writes_per_msg));
                report.insert(key("bytes_per_msg"), json!(cost.bytes_per_msg));
                report.insert(key("duplicates"), json!(a.duplicates));

                // 2a'. Open loop at half the measured rate, the same way.
                let half = (a.delivered_per_s() / 2.0).max(10.0);
                let n = ((half * 5.0) as usize).clamp(200, 20_000);
                let bodies = fleet.messages(senders, n, opts.size)?;
                let o = fleet.run(bodies, sizes, 0, Some(half), Duration::from_secs(60)).await?;
                print_run(&format!("open loop at {half:.0} msgs/s (half the maximum) through {label}"), &o, None);
                let suffix = match via {
                    Via::Http => "_http",
                    Via::Socket => "",
                };
                report.insert(format!("half_load{suffix}_msgs_per_s"), json!(half));
                report.insert(format!("p50_half_load{suffix}_ms"), json!(o.pct_ms(0.5)));
                report.insert(format!("p99_half_load{suffix}_ms"), json!(o.pct_ms(0.99)));
                report.insert(format!("p999_half_load{suffix}_ms"), json!(o.pct_ms(0.999)));
            }
            report.insert("in_flight".into(), json!(in_flight));

            // 2c. Commits across 1000 groups (one self-update each), then on one.
            let mut updates = Vec::new();
            for (g, who) in senders {
                updates.push((*who, fleet.members[*who].update(g)?, false));
            }
            let t0 = Instant::now();
            fleet::submit_all(&fleet.https, updates, 256).await?;
            let commits_many = GROUPS as f64 / t0.elapsed().as_secs_f64();
            for (g, who) in senders {
                fleet.members[*who].merge(g)?;
            }
            println!("commits: {commits_many:.0}/s across {GROUPS} groups");
            report.insert("commits_1000_groups_per_s".into(), json!(commits_many));
        }

        // 2b. One group each of 2, 10, 100 and 1000 members, one sender.
        let mut by_size = Vec::new();
        for size in [2usize, 10, 100, 1000] {
            let spec = (format!("size{size}"), 0usize, (1..size).collect::<Vec<_>>());
            let built = js_totals(&js).await?;
            let g = fleet.create_groups(std::slice::from_ref(&spec)).await?.remove(0);
            // What building the group stored (its Commits with their
            // Welcomes, checkpoints, mailbox items): a Welcome copied per
            // added device made this grow with the square of the size.
            let setup = cost_of(&js, built, 1).await?;
            println!(
                "built one group of {size} (adds of at most 100): {:.0} JetStream writes, {:.0} KiB stored",
                setup.writes_per_msg,
                setup.bytes_per_msg / 1024.0
            );
            report.insert(format!("group_{size}_setup_bytes"), json!(setup.bytes_per_msg));
            let mut follow: Vec<Vec<String>> = vec![Vec::new(); DEVICES];
            for f in follow.iter_mut().take(size) {
                f.push(g.clone());
            }
            fleet.follow(&follow).await?;
            let n = if size >= 1000 { opts.messages / 20 } else { opts.messages / 10 }.max(50);
            let bodies = fleet.messages(&[(g.clone(), 0)], n, opts.size)?;
            let sizes = HashMap::from([(g.clone(), size)]);
            let before = js_totals(&js).await?;
            let clock = cpu::Clock::start(vec![
                cpu::Group::new("bench process", [std::process::id()]),
                cpu::Group::new("nats-server", embedded.pid()),
            ]);
            println!("sending {n} messages to one group of {size}");
            let r = fleet.run(bodies, &sizes, 32, None, Duration::from_secs(90)).await?;
            let used = clock.stop();
            let cost = cost_of(&js, before, r.messages).await?;
            print_run(&format!("one group of {size}, one sender, 32 submits in flight"), &r, Some(&cost));
            cpu::note(&mut report, &format!("group_{size}_cpu_cores"), &used);
            report.insert(format!("group_{size}_msgs_per_s"), json!(r.delivered_per_s()));
            report.insert(format!("group_{size}_deliveries_per_s"), json!(r.deliveries_per_s()));
            report.insert(format!("group_{size}_bytes_per_msg"), json!(cost.bytes_per_msg));
            report.insert(format!("group_{size}_writes_per_msg"), json!(cost.writes_per_msg));
            report.insert(format!("group_{size}_p99_ms"), json!(r.pct_ms(0.99)));
            by_size.push((size, g));
        }
        // Commits on one group are serial by nature: each waits for the last.
        let g2 = &by_size[0].1;
        let mut serial = Duration::ZERO;
        let rounds = 100;
        for _ in 0..rounds {
            let body = fleet.members[0].update(g2)?;
            let t = Instant::now();
            fleet.https[0].submit(body, None).await?;
            serial += t.elapsed();
            fleet.members[0].merge(g2)?;
        }
        let commits_one = f64::from(rounds) / serial.as_secs_f64();
        println!("commits: {commits_one:.0}/s on one group (serial)");
        report.insert("commits_one_group_per_s".into(), json!(commits_one));
        anyhow::ensure!(
            fleet.duplicates.load(std::sync::atomic::Ordering::Relaxed) == 0,
            "a device got an entry twice"
        );
        fleet.close();
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;

        // 3. Scale-out with separate processes, against the same nats-server.
        // A stage that fails is reported and the run goes on: one broken figure
        // should not cost the others.
        if let (false, Some(fleet::Tens { per_device, sizes, senders })) = (opts.no_scale_out, &tens) {
            let n = opts.messages;
            for k in [1usize, 2, 4] {
                match scale::run(
                    &js,
                    &cfg,
                    tmp.path(),
                    &mut fleet,
                    per_device,
                    senders,
                    sizes,
                    k,
                    n,
                    opts.size,
                    in_flight,
                    embedded.pid(),
                )
                .await
                {
                    Ok((r, used)) => {
                        print_run(
                            &format!("{k} sequencer + {k} fanout processes, {} ingest processes", scale::INGESTS),
                            &r,
                            None,
                        );
                        cpu::note(&mut report, &format!("sequencers_{k}_cpu_cores"), &used);
                        report.insert(format!("sequencers_{k}_msgs_per_s"), json!(r.delivered_per_s()));
                        report.insert(format!("sequencers_{k}_accepted_msgs_per_s"), json!(r.accepted_per_s()));
                        report.insert(format!("sequencers_{k}_p99_ms"), json!(r.pct_ms(0.99)));
                    }
                    Err(e) => println!("scale-out with {k} processes failed: {e:#}"),
                }
            }
        }
    }
    drop(embedded);

    // 4. Federation.
    if opts.groups_only {
        return finish(report, started, opts.json.as_deref());
    }
    let federation = if opts.claims_only {
        Ok(None)
    } else {
        fed::run(cfg.clone(), tmp.path(), (opts.messages / 4).max(200)).await.map(Some)
    };
    match federation {
        Ok(None) => {}
        Ok(Some(f)) => {
            report.insert("link_msgs_per_s".into(), json!(f.link));
            report.insert("two_links_msgs_per_s".into(), json!(f.two_links));
            report.insert("catch_up_msgs_per_s".into(), json!(f.catch_up));
            report.insert("link_p99_half_load_ms".into(), json!(f.link_p99_half_load_ms));
            report.insert("link_p50_half_load_ms".into(), json!(f.link_p50_half_load_ms));
            let hops: Vec<_> =
                f.link_hops.iter().map(|(hop, p50, p99)| json!({"hop": hop, "p50_ms": p50, "p99_ms": p99})).collect();
            report.insert("link_hops_half_load".into(), json!(hops));
            report.insert("catch_up_appended_msgs_per_s".into(), json!(f.catch_up_appended));
        }
        Err(e) => println!("federation failed: {e:#}"),
    }

    // 5. KeyPackage claims per backend.
    let backends = if opts.federation_only {
        &[][..]
    } else {
        &[config::KeydirBackend::Sled, config::KeydirBackend::Jetstream][..]
    };
    for &backend in backends {
        let mut kcfg = cfg.clone();
        kcfg.keydir.backend = backend;
        kcfg.keydir.claims_per_minute_per_requester = 1_000_000;
        kcfg.keydir.claims_per_minute_per_user = 1_000_000;
        kcfg.data_dir = tmp.path().join(format!("keydir-{backend:?}"));
        kcfg.nats_url = String::new();
        let emb = embedded_nats(&kcfg)?.context("no embedded nats")?;
        kcfg.nats_url = emb.url();
        match fed::claims(kcfg, tmp.path(), 20, 50).await {
            Ok(rate) => {
                println!("KeyPackage claims through the API ({backend:?} backend, 16 in flight): {rate:.0} claims/s");
                report.insert(format!("claims_{}_per_s", format!("{backend:?}").to_lowercase()), json!(rate));
            }
            Err(e) => println!("claims on {backend:?} failed: {e:#}"),
        }
    }
    finish(report, started, opts.json.as_deref())
}

/// Prints the report as JSON, and writes it to `json` when asked.
fn finish(
    mut report: serde_json::Map<String, serde_json::Value>,
    started: Instant,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    report.insert("bench_secs".into(), json!(started.elapsed().as_secs_f64()));
    let out = serde_json::Value::Object(report);
    println!("{}", serde_json::to_string_pretty(&out)?);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Sum and count of the histograms that time a submission's stages.
fn stages(registry: &prometheus::Registry) -> HashMap<String, (f64, u64)> {
    let mut out = HashMap::new();
    for family in registry.gather() {
        let name = family.name();
        let wanted = ["mlsfed_api_request_seconds", "mlsfed_sequencer_step_seconds", "mlsfed_fanout_lag_seconds"];
        if !wanted.contains(&name) {
            continue;
        }
        for m in family.get_metric() {
            let route = m.get_label().iter().find(|l| l.name() == "route").map(|l| l.value().to_owned());
            if name == "mlsfed_api_request_seconds" && !matches!(route.as_deref(), Some("/v1/messages" | "ws:submit")) {
                continue;
            }
            let h = m.get_histogram();
            let e = out.entry(name.trim_start_matches("mlsfed_").to_owned()).or_insert((0.0, 0));
            e.0 += h.get_sample_sum();
            e.1 += h.get_sample_count();
        }
    }
    out
}

fn print_run(what: &str, r: &Run, cost: Option<&Cost>) {
    println!(
        "{what}:\n  {} msgs: accepted {:.0} msgs/s; delivered to every member {:.0} msgs/s ({:.0} deliveries/s, {}/{} counted, {} duplicates)\n  submit -> delivered p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms",
        r.messages,
        r.accepted_per_s(),
        r.delivered_per_s(),
        r.deliveries_per_s(),
        r.deliveries,
        r.deliveries_expected,
        r.duplicates,
        r.pct_ms(0.5),
        r.pct_ms(0.99),
        r.pct_ms(0.999),
    );
    if let Some(c) = cost {
        println!("  JetStream: {:.2} writes and {:.0} stored bytes per message", c.writes_per_msg, c.bytes_per_msg);
    }
}

/// Raw publish (pipelined) and consume+ack (pull, batches) of `size`-byte
/// messages on a file stream of the same server.
async fn ceiling(js: &async_nats::jetstream::Context, size: usize) -> anyhow::Result<(f64, f64)> {
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw".into()],
            ..Default::default()
        })
        .await?;
    let n = 50_000;
    let payload = Bytes::from(vec![7u8; size]);
    let start = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        acks.push(std::future::IntoFuture::into_future(js.publish("bench.raw", payload.clone()).await?));
        if acks.len() >= 512 {
            acks.next().await.transpose()?;
        }
    }
    while acks.next().await.transpose()?.is_some() {}
    let publish = n as f64 / start.elapsed().as_secs_f64();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut msgs = consumer.stream().max_messages_per_batch(500).messages().await?;
    let mut got = 0;
    while got < n {
        let m = msgs.next().await.context("consumer ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        got += 1;
    }
    let consume = n as f64 / start.elapsed().as_secs_f64();
    js.delete_stream("BENCH_RAW").await?;
    Ok((publish, consume))
}
