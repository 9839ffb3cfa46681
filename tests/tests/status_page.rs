//! The operator's status page, loaded in headless Chromium during traffic
//! and a peer outage: the outage shows, and clears once the peer is back.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::{sync_until, wait_metric, Client, Federation};

const A: &str = "a.example";
const B: &str = "b.example";

/// Chromium: `MLSFED_CHROMIUM`, else the first browser on PATH. The test
/// needs one (.ci/run installs Debian's `chromium`).
fn chromium() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("MLSFED_CHROMIUM") {
        return Ok(p.into());
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !path.is_empty() {
                return Ok(path.into());
            }
        }
    }
    anyhow::bail!("no Chromium found: install Debian's `chromium` (scripts/install-chromium) or set MLSFED_CHROMIUM")
}

/// Runs headless Chromium on `url` with `args` (bounded); its stdout.
async fn browse(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let browser = chromium()?;
    let profile = tempfile::tempdir()?;
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(browser).args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.path().display())).args(args).arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    anyhow::ensure!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The state the page shows for peer `domain`.
fn peer_state(page: &str, domain: &str) -> Option<String> {
    let marker = format!("data-peer=\"{domain}\" data-state=\"");
    let rest = &page[page.find(&marker)? + marker.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_peer_outage() -> anyhow::Result<()> {
    let mut fed = Federation::start(&[A, B], |_, c| c.limits.submit_timeout_ms = 5000)?;
    let mut alice: Client = fed.op(A).client("alice", "phone", 2).await?;
    let mut bob = fed.op(B).client("bob", "phone", 2).await?;
    let g = alice.create_group("status").await?;
    alice.add(&g, &[fed.op(B).user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    for i in 0..5 {
        alice.send(&g, &format!("before {i}")).await?;
    }
    let url = format!("{}/status", fed.op(A).url);
    let page = browse(&url, &["--dump-dom"]).await?;
    assert_eq!(peer_state(&page, B).as_deref(), Some("idle"), "{page}");

    // B's server goes away while A keeps accepting messages for B.
    fed.nats_of(B).stop();
    let mut last = 0;
    for i in 0..5 {
        last = alice.send(&g, &format!("during {i}")).await?;
    }
    wait_metric(fed.op(A), "mlsfed_federation_send_failures_total{peer=\"b.example\"}", Duration::from_secs(30), |v| {
        v >= 1.0
    })
    .await?;
    let page = browse(&url, &["--dump-dom"]).await?;
    let state = peer_state(&page, B);
    assert!(matches!(state.as_deref(), Some("queued" | "needs_resync")), "the outage does not show: {state:?}\n{page}");
    assert!(page.contains("Dead letters"), "{page}");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page-peer-outage.png");
    let _ = std::fs::remove_file(&shot);
    browse(&url, &[&format!("--screenshot={}", shot.display()), "--window-size=1200,1100"]).await?;
    let size = std::fs::metadata(&shot)?.len();
    assert!(size > 5_000, "the screenshot is {size} bytes");
    eprintln!("status page during the outage: {}", shot.display());

    // B is back: the queue drains and the page says so.
    fed.nats_of(B).restart()?;
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let http = reqwest::Client::new();
    let mut state = None;
    for _ in 0..100 {
        let page = http.get(&url).send().await?.text().await?;
        state = peer_state(&page, B);
        if state.as_deref() == Some("idle") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state.as_deref(), Some("idle"), "the outage still shows after the peer came back");
    Ok(())
}
