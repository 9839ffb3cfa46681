//! `/status` on the metrics listener: one HTML page, no external assets,
//! for an operator without Grafana. Per-peer delivery lag, outbox depth and
//! state; this process's stage rates and errors over the last ten minutes;
//! stream usage against limits; dead letters. Peer and stream figures come
//! from NATS (`inspect`, as the admin CLI reads them), rates from this
//! process's own metrics, sampled every ten seconds.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use axum::response::Html;
use prometheus::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::inspect;

/// How often the rates are sampled, and how many samples are kept.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES: usize = 61;
/// Longest the page waits for NATS before it shows what it has.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The stages whose rates the page shows: a title and the counter families
/// summed over all their labels (the first that exists is used).
const STAGES: &[(&str, &[&str])] = &[
    ("submissions accepted", &["mlsfed_sequencer_accepted_total"]),
    ("submissions rejected", &["mlsfed_sequencer_rejected_total"]),
    ("API errors", &["mlsfed_api_errors_total"]),
    ("entries served to devices", &["mlsfed_api_entries_served_total"]),
    ("entries fanned out", &["mlsfed_fanout_entries_total"]),
    ("records sent to peers", &["mlsfed_federation_sent_total"]),
    ("envelopes received from peers", &["mlsfed_federation_received_total"]),
    ("failed sends to peers", &["mlsfed_federation_send_failures_total"]),
    ("sequencer CAS conflicts", &["mlsfed_sequencer_cas_conflicts_total"]),
];
const DEAD_LETTER_FAMILIES: &[&str] = &[
    "mlsfed_sequencer_dead_letters_total",
    "mlsfed_fanout_dead_letters_total",
    "mlsfed_federation_dead_letters_total",
];

/// Counter sums over time, newest last.
type History = Arc<Mutex<VecDeque<(tokio::time::Instant, Vec<Option<f64>>)>>>;

#[derive(Clone)]
pub struct Status {
    js: jetstream::Context,
    cfg: Arc<config::Config>,
    registry: Registry,
    history: History,
}

impl Status {
    /// Starts sampling `registry` until `shutdown`.
    pub fn start(js: jetstream::Context, cfg: config::Config, registry: Registry, shutdown: CancellationToken) -> Self {
        let history: History = Arc::default();
        let status = Self { js, cfg: Arc::new(cfg), registry, history: history.clone() };
        let sampler = status.clone();
        tokio::spawn(async move {
            // The first sample once the roles have registered their
            // metrics, then every ten seconds.
            let first = tokio::time::Instant::now() + Duration::from_secs(2);
            let mut tick = tokio::time::interval_at(first, SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let sample = sampler.sample();
                if let Ok(mut h) = history.lock() {
                    h.push_back((tokio::time::Instant::now(), sample));
                    while h.len() > SAMPLES {
                        h.pop_front();
                    }
                }
            }
        });
        status
    }

    /// The page's route.
    pub fn router(self) -> axum::Router {
        axum::Router::new().route(
            "/status",
            axum::routing::get(move || {
                let status = self.clone();
                async move { Html(status.render().await) }
            }),
        )
    }

    fn sample(&self) -> Vec<Option<f64>> {
        let families = self.registry.gather();
        let sum = |names: &[&str]| {
            names.iter().find_map(|n| {
                let f = families.iter().find(|f| f.name() == *n)?;
                Some(f.get_metric().iter().map(|m| m.get_counter().get_value()).sum::<f64>())
            })
        };
        let mut out: Vec<Option<f64>> = STAGES.iter().map(|(_, names)| sum(names)).collect();
        out.push(
            sum(DEAD_LETTER_FAMILIES)
                .or(Some(0.0))
                .filter(|_| DEAD_LETTER_FAMILIES.iter().any(|n| families.iter().any(|f| f.name() == *n))),
        );
        out
    }

    /// A gauge of this process for one peer, when this process has it.
    fn peer_gauge(&self, name: &str, peer: &str) -> Option<f64> {
        self.registry.gather().iter().find(|f| f.name() == name).and_then(|f| {
            f.get_metric().iter().find(|m| m.get_label().iter().any(|l| l.name() == "peer" && l.value() == peer)).map(
                |m| {
                    if m.get_gauge().get_value() != 0.0 {
                        m.get_gauge().get_value()
                    } else {
                        m.get_counter().get_value()
                    }
                },
            )
        })
    }

    async fn render(&self) -> String {
        let mut page = String::with_capacity(16 << 10);
        let _ = write!(
            page,
            "<!doctype html><html><head><meta charset=utf-8><title>mlsfed {d}</title>\
             <meta http-equiv=refresh content=10><style>{STYLE}</style></head><body>\
             <h1>mlsfed <span>{d}</span></h1><p class=note>Refreshes every 10 s. Peers and streams from \
             NATS; rates from this process's own metrics.</p>",
            d = esc(&self.cfg.domain)
        );
        self.peers(&mut page).await;
        self.rates(&mut page);
        self.streams(&mut page).await;
        page.push_str("</body></html>");
        page
    }

    async fn peers(&self, page: &mut String) {
        page.push_str("<h2>Peers</h2>");
        if self.cfg.peers.is_empty() {
            page.push_str("<p class=note>No peers configured.</p>");
            return;
        }
        page.push_str(
            "<table><tr><th>peer<th>state<th>delivery lag (s)<th>outbox depth<th>unacked\
             <th>inbox depth<th>failed sends here</tr>",
        );
        for p in &self.cfg.peers {
            let domain = &p.domain;
            let report = tokio::time::timeout(QUERY_TIMEOUT, inspect::peer(&self.js, &self.cfg, domain)).await;
            let row = match report {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = write!(
                        page,
                        "<tr><td>{}<td colspan=6 class=bad>unavailable: {}</tr>",
                        esc(domain),
                        esc(&e.to_string())
                    );
                    continue;
                }
                Err(_) => {
                    let _ =
                        write!(page, "<tr><td>{}<td colspan=6 class=bad>NATS did not answer in time</tr>", esc(domain));
                    continue;
                }
            };
            let state = row.get("state").and_then(Value::as_str).unwrap_or("unknown").to_owned();
            let class = match state.as_str() {
                "idle" => "ok",
                "queued" => "warn",
                _ => "bad",
            };
            let failures = self.peer_gauge("mlsfed_federation_send_failures_total", domain);
            let _ = write!(
                page,
                "<tr data-peer=\"{peer}\" data-state=\"{state}\"><td>{peer}<td class={class}>{state}<td>{lag}<td>{depth}\
                 <td>{unacked}<td>{inbox}<td>{failures}</tr>",
                peer = esc(domain),
                state = esc(&state),
                lag = cell(row.get("outbox_oldest_age_secs")),
                depth = cell(row.get("outbox_depth")),
                unacked = cell(row.get("outbox_unacked")),
                inbox = cell(row.get("inbox_depth")),
                failures = failures.map_or("–".into(), |f| format!("{f:.0}")),
            );
        }
        page.push_str("</table>");
    }

    fn rates(&self, page: &mut String) {
        // The stored samples and one taken now, so rates show from the
        // first sample on.
        let mut history: Vec<(tokio::time::Instant, Vec<Option<f64>>)> =
            self.history.lock().map(|h| h.iter().cloned().collect()).unwrap_or_default();
        history.push((tokio::time::Instant::now(), self.sample()));
        page.push_str("<h2>Stages (this process)</h2>");
        if history.len() < 2 {
            page.push_str("<p class=note>Collecting: rates appear once a sample was taken.</p>");
            return;
        }
        page.push_str("<table><tr><th>stage<th>per second, last minute<th>last 10 minutes<th>total</tr>");
        let titles = STAGES.iter().map(|(t, _)| *t).chain(std::iter::once("dead letters"));
        for (i, title) in titles.enumerate() {
            let series: Vec<(tokio::time::Instant, f64)> =
                history.iter().filter_map(|(t, v)| v.get(i).copied().flatten().map(|x| (*t, x))).collect();
            let Some(&(t_last, last)) = series.last() else { continue };
            let rate = |since: Duration| {
                let first = series.iter().find(|(t, _)| t_last.duration_since(*t) <= since)?;
                let dt = t_last.duration_since(first.0).as_secs_f64();
                (dt > 0.0).then(|| (last - first.1) / dt)
            };
            let bad = (title.contains("error")
                || title.contains("failed")
                || title.contains("dead")
                || title.contains("rejected"))
                && rate(Duration::from_secs(60)).is_some_and(|r| r > 0.0);
            let rates: Vec<f64> = series
                .windows(2)
                .map(|w| (w[1].1 - w[0].1) / w[1].0.duration_since(w[0].0).as_secs_f64().max(1e-3))
                .collect();
            let _ = write!(
                page,
                "<tr><td>{title}<td class={}>{}<td>{}<td>{last:.0}</tr>",
                if bad { "bad" } else { "ok" },
                rate(Duration::from_secs(60)).map_or("–".into(), |r| format!("{r:.1}")),
                sparkline(&rates),
            );
        }
        page.push_str("</table>");
    }

    async fn streams(&self, page: &mut String) {
        page.push_str("<h2>Streams</h2>");
        match tokio::time::timeout(QUERY_TIMEOUT, inspect::dead_letters(&self.js)).await {
            Ok(Ok(n)) => {
                let _ = write!(
                    page,
                    "<p>Dead letters in MLSFED_DEAD: <b class={}>{n}</b> (<code>mlsfed admin dead list</code>)</p>",
                    if n > 0 { "bad" } else { "ok" }
                );
            }
            _ => page.push_str("<p class=bad>Dead letters: NATS did not answer</p>"),
        }
        let rows = match tokio::time::timeout(QUERY_TIMEOUT, inspect::streams(&self.js)).await {
            Ok(Ok(rows)) => rows,
            _ => {
                page.push_str("<p class=bad>Streams: NATS did not answer</p>");
                return;
            }
        };
        page.push_str("<table><tr><th>name<th>kind<th>messages<th>bytes<th>max bytes<th>max age (s)<th>usage</tr>");
        for r in rows {
            let usage = r.get("usage").and_then(Value::as_f64);
            let class = match usage {
                Some(u) if u >= 0.9 => "bad",
                Some(u) if u >= 0.75 => "warn",
                _ => "ok",
            };
            let _ = write!(
                page,
                "<tr><td>{}<td>{}<td>{}<td>{}<td>{}<td>{}<td class={class}>{}</tr>",
                cell(r.get("name")),
                cell(r.get("kind")),
                cell(r.get("messages")),
                cell(r.get("bytes")),
                cell(r.get("max_bytes")),
                cell(r.get("max_age_secs")),
                usage.map_or("no limit".into(), |u| format!("{:.1}%", u * 100.0)),
            );
        }
        page.push_str("</table>");
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1 span{color:#555}\
table{border-collapse:collapse;margin:8px 0 24px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}\
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.ok{color:#1a7f37}.warn{color:#9a6700;font-weight:600}\
.bad{color:#cf222e;font-weight:600}.note{color:#666}svg{vertical-align:middle}";

/// A JSON value as a table cell ("–" when absent).
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "–".into(),
        Some(Value::String(s)) => esc(s),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Some(other) => esc(&other.to_string()),
    }
}

/// An inline SVG line of `values` (no external assets).
fn sparkline(values: &[f64]) -> String {
    if values.is_empty() {
        return String::new();
    }
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
    let (w, h) = (120.0, 20.0);
    let step = if values.len() > 1 { w / (values.len() - 1) as f64 } else { w };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, h - (v.max(0.0) / max) * (h - 2.0) - 1.0))
        .collect();
    format!(
        "<svg width=120 height=20 viewBox=\"0 0 120 20\"><polyline fill=none stroke=#0969da stroke-width=1.5 points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_and_text_are_escaped() {
        assert_eq!(esc("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
        assert_eq!(cell(Some(&Value::String("<b>".into()))), "&lt;b&gt;");
        assert_eq!(cell(None), "–");
        assert!(sparkline(&[0.0, 1.0, 2.0]).starts_with("<svg"));
    }
}
