//! One trace per message, across operators: ingest, sequencer and fanout at
//! the hub, its bridge, the peer's bridge and fanout, linked through NATS
//! headers and exported over OTLP to a collector. Ids only, never contents.

use std::time::Duration;

use tests::{metric, sync_until, Federation, OtlpCollector};

const A: &str = "a.example";
const B: &str = "b.example";

fn attr(span: &serde_json::Value, key: &str) -> Option<String> {
    span["attributes"].as_array()?.iter().find(|a| a["key"] == key)?["value"]["stringValue"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_one_trace_from_ingest_to_the_peers_delivery() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let fed = Federation::start(&[A, B], |d, c| {
        c.tracing.otlp_endpoint = collector.url.clone();
        c.tracing.service_name = format!("mlsfed-{d}");
    })?;
    let mut alice = fed.op(A).client("alice", "phone", 2).await?;
    let mut carol = fed.op(B).client("carol", "phone", 2).await?;
    let g = alice.create_group("traced").await?;
    alice.add(&g, &[fed.op(B).user_id("carol")]).await?;
    sync_until(&mut [&mut carol], Duration::from_secs(30), |c| c.groups().contains(&g)).await?;
    let text = "a secret the traces must not carry";
    let position = alice.send(&g, text).await?;
    sync_until(&mut [&mut carol], Duration::from_secs(30), |c| c.messages(&g).iter().any(|m| m.2 == text)).await?;

    // The stages of that message, wherever they ran.
    let want = [
        ("mlsfed-a.example", "ingest.submit"),
        ("mlsfed-a.example", "sequencer.decide"),
        ("mlsfed-a.example", "fanout.deliver"),
        ("mlsfed-a.example", "bridge.send"),
        ("mlsfed-b.example", "bridge.receive"),
        ("mlsfed-b.example", "fanout.deliver"),
    ];
    let mut ours = Vec::new();
    for _ in 0..100 {
        let spans = collector.spans();
        let trace = spans
            .iter()
            .find(|s| s["name"] == "ingest.submit" && attr(s, "mlsfed.position") == Some(position.to_string()))
            .map(|s| s["traceId"].clone());
        ours = spans.into_iter().filter(|s| trace.as_ref() == Some(&s["traceId"])).collect();
        if want.iter().all(|(svc, name)| ours.iter().any(|s| s["service"] == *svc && s["name"] == *name)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = ours.iter().map(|s| format!("{}/{}", s["service"], s["name"])).collect();
    for (svc, name) in want {
        assert!(
            ours.iter().any(|s| s["service"] == svc && s["name"] == name),
            "no {name} span at {svc} in the message's trace: {names:?}"
        );
    }
    // One tree: every span but the first names a parent in the trace.
    let ids: Vec<&serde_json::Value> = ours.iter().map(|s| &s["spanId"]).collect();
    for s in &ours {
        if s["name"] == "ingest.submit" {
            assert_eq!(s["parentSpanId"], "", "the first span has no parent");
        } else {
            assert!(ids.contains(&&s["parentSpanId"]), "{} has a parent outside the trace", s["name"]);
        }
        if s["name"] != "bridge.send" {
            assert_eq!(attr(s, "mlsfed.group").as_deref(), Some(g.as_str()), "{}", s["name"]);
        }
    }
    // Ids only: every attribute of every span is one of these.
    let allowed = ["mlsfed.group", "mlsfed.position", "mlsfed.peer", "mlsfed.refused", "mlsfed.deferred"];
    for s in collector.spans() {
        for a in s["attributes"].as_array().into_iter().flatten() {
            let key = a["key"].as_str().unwrap_or_default();
            assert!(allowed.contains(&key), "{} carries {key}", s["name"]);
        }
    }
    assert!(metric(fed.op(A), "mlsfed_trace_spans_exported_total").await >= 4.0);
    assert_eq!(metric(fed.op(A), "mlsfed_trace_spans_dropped_total").await, 0.0);
    Ok(())
}
