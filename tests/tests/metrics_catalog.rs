//! The Prometheus rules in deploy/prometheus/ and the Grafana dashboards in
//! deploy/grafana/ name only metrics a real operator exports: a renamed or
//! removed metric fails here, by name, instead of silencing an alert.
//! nats.rules.yml is left out: it reads prometheus-nats-exporter's metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use openmls::prelude::PURE_PLAINTEXT_WIRE_FORMAT_POLICY;
use tests::raw::Local;
use tests::{post, settle, wait_metric, Federation};

const A: &str = "a.example";
const B: &str = "b.example";

/// Rule files whose expressions read another exporter's metrics.
const NOT_OURS: &[&str] = &["nats.rules.yml"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    out.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)));
    out.sort();
    out
}

/// The `expr:` values of a rule file: inline, or a block scalar (`>-`, `|`)
/// made of the lines indented deeper than the key.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else { continue };
        let value = value.trim();
        if value.starts_with('>') || value.starts_with('|') {
            let mut block = String::new();
            while i < lines.len()
                && (lines[i].trim().is_empty() || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push_str(lines[i].trim());
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            out.push(value.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    out
}

/// The names that `record:` rules define.
fn recorded(yaml: &str) -> BTreeSet<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix("record:"))
        .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_owned())
        .collect()
}

/// Every `expr` string anywhere in a dashboard's JSON.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Metric names in a PromQL expression: whole identifiers starting with
/// `mlsfed_`. Names with a colon are recorded series (returned apart).
fn names_in(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut metrics, mut recorded) = (BTreeSet::new(), BTreeSet::new());
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut rest = expr;
    while let Some(start) = rest.find(is_name) {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_name(c)).unwrap_or(tail.len());
        let word = &tail[..end];
        if word.contains(':') {
            if word.contains("mlsfed_") {
                recorded.insert(word.to_owned());
            }
        } else if word.starts_with("mlsfed_") {
            metrics.insert(word.to_owned());
        }
        rest = &tail[end..];
    }
    (metrics, recorded)
}

/// Metric name → the files that use it, over our rule files and every
/// dashboard; and the recorded series they use, with what the rule files
/// record.
struct Catalog {
    /// The files read, as named in `metrics`.
    files: Vec<String>,
    metrics: BTreeMap<String, BTreeSet<String>>,
    used_recorded: BTreeMap<String, BTreeSet<String>>,
    recorded: BTreeSet<String>,
}

fn catalog() -> anyhow::Result<Catalog> {
    let mut c = Catalog {
        files: Vec::new(),
        metrics: BTreeMap::new(),
        used_recorded: BTreeMap::new(),
        recorded: BTreeSet::new(),
    };
    let mut add = |file: &Path, exprs: Vec<String>| {
        let name = file.strip_prefix(deploy()).unwrap_or(file).display().to_string();
        c.files.push(name.clone());
        for e in exprs {
            let (m, r) = names_in(&e);
            for n in m {
                c.metrics.entry(n).or_default().insert(name.clone());
            }
            for n in r {
                c.used_recorded.entry(n).or_default().insert(name.clone());
            }
        }
    };
    let rules = files(&deploy().join("prometheus"), ".rules.yml");
    anyhow::ensure!(!rules.is_empty(), "no rule files in {}", deploy().join("prometheus").display());
    let mut recorded_all = BTreeSet::new();
    for f in &rules {
        let text = std::fs::read_to_string(f)?;
        recorded_all.extend(recorded(&text));
        if !NOT_OURS.iter().any(|n| f.ends_with(n)) {
            add(f, rule_exprs(&text));
        }
    }
    for f in files(&deploy().join("grafana"), ".json") {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        let mut exprs = Vec::new();
        dashboard_exprs(&json, &mut exprs);
        add(&f, exprs);
    }
    c.recorded = recorded_all;
    Ok(c)
}

/// Names a scrape exposes: every sample's name and every `# TYPE` family.
fn exposed(scrape: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut names, mut histograms) = (BTreeSet::new(), BTreeSet::new());
    for line in scrape.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                names.insert(name.to_owned());
                if kind == "histogram" {
                    histograms.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    (names, histograms)
}

/// A histogram is used through `_bucket`, `_sum` and `_count`.
fn histogram_base(name: &str) -> Option<&str> {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s))
}

#[test]
fn rules_and_dashboards_name_metrics_and_only_recorded_series() -> anyhow::Result<()> {
    let c = catalog()?;
    // The parser finds what the files certainly use.
    for known in [
        "mlsfed_federation_outbox_lag_seconds",
        "mlsfed_federation_peer_needs_resync",
        "mlsfed_api_request_seconds_count",
        "mlsfed_keydir_claims_total",
    ] {
        assert!(c.metrics.contains_key(known), "{known} not found in {:?}", c.metrics.keys());
    }
    // Every file read names some of our metrics (else its parse went wrong).
    for f in &c.files {
        assert!(c.metrics.values().any(|used_in| used_in.contains(f)), "no mlsfed_ metric found in {f}");
    }
    let unrecorded: Vec<_> = c.used_recorded.iter().filter(|(n, _)| !c.recorded.contains(*n)).collect();
    assert!(unrecorded.is_empty(), "recorded series used but recorded by no rule: {unrecorded:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboards_use_is_exported() -> anyhow::Result<()> {
    let wanted = catalog()?.metrics;
    // A peer, so the per-peer series exist (all of them are created at 0
    // for each configured peer, but `peer_compatible` needs an exchange).
    let fed = Federation::start(&[A, B], |_, _| {})?;
    let a = fed.op(A);

    // Traffic for the series created on first use: claims (adding bob), API
    // requests, an entry fanned out.
    let mut alice = a.client("alice", "phone", 2).await?;
    let mut bob = a.client("bob", "phone", 2).await?;
    let g = alice.create_group("catalog").await?;
    alice.add(&g, &[a.user_id("bob")]).await?;
    alice.send(&g, "hello").await?;
    settle(&mut [&mut alice, &mut bob]).await?;
    // A sequencer rejection (and an API error): a message to a group the
    // hub never saw.
    let raw = Local::new(alice.id().as_str());
    let mut ghost = raw.group(&format!("mimi://{A}/r/ghost"), PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    let (status, body) =
        post(&a.url, "/v1/messages", Some(&a.token(alice.id())), raw.app_message(&mut ghost, "x")).await;
    assert_eq!(status, 404, "{body}");
    // A federation refusal: B writes something that is no envelope into
    // its inbox on A.
    let as_b = tests::nats_connect(&fed.nats[0].peer_url(B)).await?;
    let js = async_nats::jetstream::new(as_b);
    js.publish(tests::proto::names::fed_in_subject(B), "not an envelope".into()).await?.await?;
    let limit = Duration::from_secs(30);
    wait_metric(a, "mlsfed_federation_refused_total{reason=\"malformed\"}", limit, |v| v >= 1.0).await?;
    wait_metric(a, &format!("mlsfed_federation_peer_compatible{{peer=\"{B}\"}}"), limit, |v| v == 1.0).await?;

    let scrape = tests::http().get(format!("{}/metrics", a.url)).send().await?.error_for_status()?.text().await?;
    let (names, histograms) = exposed(&scrape);
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(n, _)| !names.contains(*n) && !histogram_base(n).is_some_and(|b| histograms.contains(b)))
        .map(|(n, used_in)| format!("{n} (used in {})", used_in.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the rules or dashboards use but the operator does not export:\n{}",
        missing.join("\n")
    );
    Ok(())
}
