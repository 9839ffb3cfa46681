//! SIGTERM stops every role cleanly: it stops accepting, drains what it
//! holds, stops the embedded nats-server it started, and exits 0; nothing
//! it accepted is lost.

use std::time::Duration;

use tests::{sync_until, NatsServer, Operator};

/// The pid of the nats-server an embedded operator started (nats-server
/// names its ports file `<exe>_<pid>.ports`).
fn embedded_nats_pid(op: &Operator) -> anyhow::Result<u32> {
    let ports = op.data_dir().join("nats").join("ports");
    for entry in std::fs::read_dir(&ports)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_suffix(".ports").and_then(|n| n.rsplit('_').next()) {
            return Ok(pid.parse()?);
        }
    }
    anyhow::bail!("no ports file in {}", ports.display())
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_stops_nats_and_loses_nothing() -> anyhow::Result<()> {
    let mut op = Operator::start_embedded("a.example")?;
    let nats_pid = embedded_nats_pid(&op)?;
    assert!(alive(nats_pid));
    let mut alice = op.client("alice", "phone", 2).await?;
    let mut bob = op.client("bob", "phone", 2).await?;
    let g = alice.create_group("signals").await?;
    alice.add(&g, &[op.user_id("bob")]).await?;
    sync_until(&mut [&mut bob], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;

    // A sender keeps submitting; SIGTERM lands in the middle.
    let bodies: Vec<Vec<u8>> =
        (0..200).map(|i| alice.encrypt_for_bench(&g, format!("m{i}").as_bytes())).collect::<Result<_, _>>()?;
    let http = alice.http().clone();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    let sender = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for b in bodies {
            match http.submit(b, None).await {
                Ok(a) => accepted.push(a.position),
                Err(_) => break,
            }
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        accepted
    });
    while !sender.is_finished() && answered.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::block_in_place(|| op.terminate())?;
    assert_eq!(status.code(), Some(0), "mlsfed run exited with {status}");
    assert!(!alive(nats_pid), "the embedded nats-server outlived its operator");
    let accepted = sender.await?;
    assert!(accepted.len() >= 20, "only {} accepted before the signal", accepted.len());

    // Back up on the same data: every accepted message is delivered once,
    // in order.
    op.restart()?;
    bob.reconnect(&op.url)?;
    let last = *accepted.iter().max().unwrap_or(&0);
    sync_until(&mut [&mut bob], Duration::from_secs(60), |c| c.positions(&g).last().is_some_and(|p| *p >= last))
        .await?;
    let got: Vec<u64> = bob.messages(&g).into_iter().map(|m| m.0).collect();
    for p in &accepted {
        assert_eq!(got.iter().filter(|x| *x == p).count(), 1, "position {p} delivered {} times", got.len());
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    // Stopped the way it was started, so its embedded nats-server goes
    // too: dropping the fixture would SIGKILL mlsfed and orphan it.
    let nats_pid = embedded_nats_pid(&op)?;
    let status = tokio::task::block_in_place(|| op.terminate())?;
    assert_eq!(status.code(), Some(0), "mlsfed run exited with {status}");
    assert!(!alive(nats_pid), "the restarted operator's nats-server outlived it");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_each_worker_role_with_exit_zero() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let mut front = Operator::start_with(&nats, "a.example", "ingest", |c| c.metrics_listen = "127.0.0.1:0".into())?;
    let mut workers = [front.worker("sequencer")?, front.worker("fanout")?, front.worker("bridge")?];
    let mut alice = front.client("alice", "phone", 2).await?;
    let g = alice.create_group("workers").await?;
    alice.send(&g, "hello").await?;
    for w in workers.iter_mut() {
        let status = tokio::task::block_in_place(|| w.terminate())?;
        assert_eq!(status.code(), Some(0), "a worker exited with {status}");
    }
    let status = tokio::task::block_in_place(|| front.terminate())?;
    assert_eq!(status.code(), Some(0), "ingest exited with {status}");
    Ok(())
}

/// SIGKILL gives an operator no time to stop its embedded nats-server. The
/// next start finds it running on the same directory, stops it, and starts
/// its own on the same store: what the operator held before is still
/// there, and no orphan is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_sigkill_stops_the_orphaned_nats_server() -> anyhow::Result<()> {
    let mut op = Operator::start_embedded("a.example")?;
    let orphan = embedded_nats_pid(&op)?;
    let mut alice = op.client("alice", "phone", 2).await?;
    let g = alice.create_group("orphan").await?;
    let sent = alice.send(&g, "before the kill").await?;
    op.kill();
    assert!(alive(orphan), "nothing to test: the nats-server died with its operator");
    op.restart()?;
    let fresh = embedded_nats_pid(&op)?;
    assert_ne!(fresh, orphan);
    assert!(!alive(orphan), "the orphaned nats-server still runs beside the new one");
    // The store survived: the restarted operator (on a new port) lists
    // the group with what was sent before the kill.
    let http = tests::client::Http::new(&op.url, &op.token(alice.id()), alice.id().clone());
    let heads = http.groups().await?;
    assert!(heads.iter().any(|h| h.group == g && h.position == sent), "{heads:?}");
    // Stopped cleanly, so that this test leaves no orphan of its own.
    let status = tokio::task::block_in_place(|| op.terminate())?;
    assert_eq!(status.code(), Some(0), "mlsfed run exited with {status}");
    assert!(!alive(fresh), "the embedded nats-server outlived its operator");
    Ok(())
}
