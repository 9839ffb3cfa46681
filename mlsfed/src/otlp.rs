//! Exports this process's finished spans (`proto::trace`) to an OTLP/HTTP
//! collector (`tracing.otlp_endpoint`) as JSON, in batches of at most
//! [`MAX_BATCH`] or every [`FLUSH`]. Tracing never holds a message up: the
//! sink is bounded, a full one drops spans, and an unreachable collector
//! only costs the batches it was sent (counted, and logged at most once a
//! minute).

use std::time::Duration;

use prometheus::{IntCounter, Registry};
use tokio_util::sync::CancellationToken;

const MAX_BATCH: usize = 512;
const FLUSH: Duration = Duration::from_secs(1);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

struct Metrics {
    exported: IntCounter,
    failures: IntCounter,
    dropped: IntCounter,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            exported: IntCounter::new("mlsfed_trace_spans_exported_total", "Spans the OTLP collector accepted.")?,
            failures: IntCounter::new(
                "mlsfed_trace_export_failures_total",
                "Batches of spans the OTLP collector did not take (unreachable, or an error answer).",
            )?,
            dropped: IntCounter::new(
                "mlsfed_trace_spans_dropped_total",
                "Spans dropped because the export queue (tracing.max_queued_spans) was full.",
            )?,
        };
        registry.register(Box::new(m.exported.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        Ok(m)
    }
}

/// Starts the exporter when an endpoint is configured. One per process:
/// a second operator in the same process (the bench) shares the first's.
pub fn start(cfg: &config::Tracing, registry: &Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    if cfg.otlp_endpoint.is_empty() {
        return Ok(());
    }
    let Some(spans) = proto::trace::install(cfg.max_queued_spans) else {
        return Ok(());
    };
    let metrics = Metrics::new(registry)?;
    let http = reqwest::Client::builder().timeout(POST_TIMEOUT).build()?;
    let (endpoint, service) = (cfg.otlp_endpoint.clone(), cfg.service_name.clone());
    tokio::spawn(export(spans, http, endpoint, service, metrics, shutdown));
    Ok(())
}

async fn export(
    mut spans: tokio::sync::mpsc::Receiver<proto::trace::Finished>,
    http: reqwest::Client,
    endpoint: String,
    service: String,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let mut batch = Vec::new();
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            s = spans.recv() => match s {
                Some(s) => { batch.push(s); false }
                None => true,
            },
        };
        let flush_at = tokio::time::Instant::now() + FLUSH;
        while batch.len() < MAX_BATCH {
            tokio::select! {
                s = spans.recv() => match s { Some(s) => batch.push(s), None => break },
                _ = tokio::time::sleep_until(flush_at) => break,
            }
        }
        // What the queue took in while we posted is drained on the way out.
        while stopping && batch.len() < MAX_BATCH {
            match spans.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let dropped = proto::trace::dropped();
        metrics.dropped.inc_by(dropped.saturating_sub(metrics.dropped.get()));
        if !batch.is_empty() {
            let body = proto::trace::otlp_json(&service, &batch);
            let posted = http.post(&endpoint).json(&body).send().await;
            match posted {
                Ok(r) if r.status().is_success() => metrics.exported.inc_by(batch.len() as u64),
                other => {
                    metrics.failures.inc();
                    let now = tokio::time::Instant::now();
                    if last_warning.is_none_or(|t| now.duration_since(t) > Duration::from_secs(60)) {
                        last_warning = Some(now);
                        let why = match other {
                            Ok(r) => format!("HTTP {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(error = %why, spans = batch.len(), "cannot export spans to the OTLP collector");
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}
