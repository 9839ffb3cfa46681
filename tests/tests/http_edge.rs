//! The HTTP edge under hostile clients: every refusal is typed JSON, slow
//! and idle connections are cut off, connections and requests are bounded,
//! and overload is a 503 with `Retry-After`.

use std::time::Duration;

use tests::client::http::encode_segment;
use tests::{get, NatsServer, Operator};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn addr(op: &Operator) -> String {
    op.url.trim_start_matches("http://").to_owned()
}

/// Writes `raw`, then reads whatever comes back until the server closes or
/// `limit` passes: (what was read, whether the server closed).
async fn raw(op: &Operator, raw: &[u8], limit: Duration) -> anyhow::Result<(String, bool)> {
    let mut s = TcpStream::connect(addr(op)).await?;
    s.write_all(raw).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    Ok((String::from_utf8_lossy(&out).into_owned(), closed))
}

fn json_code(response: &str) -> Option<String> {
    let body = response.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    v["code"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_typed_json() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start(&nats, "a.example")?;
    let me = op.device_id("alice", "phone");
    let token = op.token(&me);
    let mailbox = format!("/v1/devices/{}/mailbox", encode_segment(me.as_str()));
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v1/devices/%FF/mailbox".into(), 400, "invalid_request"),
        (format!("{mailbox}?after=abc"), 400, "invalid_request"),
        (format!("{mailbox}?after=18446744073709551616"), 400, "invalid_request"),
        (format!("{mailbox}?after=18446744073709551615"), 400, "invalid_cursor"),
        (format!("{mailbox}/ws?after=0"), 400, "invalid_request"),
        ("/v1/nothing-here".into(), 400, "invalid_request"),
    ];
    for (path, status, code) in cases {
        let (got, body) = get(&op.url, &path, Some(&token)).await;
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{path}: {body}");
    }
    // A wrong method.
    let (got, body) = tests::send(tests::http().put(format!("{}/v1/messages", op.url)), Some(&token)).await;
    assert_eq!((got, body["code"].as_str()), (405, Some("method_not_allowed")), "{body}");
    // A declared body over the limit is refused before it is sent.
    let head =
        "POST /v1/keypackages HTTP/1.1\r\nhost: x\r\ncontent-type: message/mls\r\ncontent-length: 10000000000\r\n";
    let req = format!("{head}authorization: Bearer {token}\r\n\r\nabcd");
    let (resp, _) = raw(&op, req.as_bytes(), Duration::from_secs(5)).await?;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(json_code(&resp).as_deref(), Some("body_too_large"), "{resp}");
    // A claim that would make the key directory scan forever.
    let suites: Vec<u16> = (0..10_000).map(|i| i as u16).collect();
    let req = tests::http()
        .post(format!("{}/v1/keypackages/claim", op.url))
        .json(&serde_json::json!({ "user": "mimi://a.example/u/bob", "cipher_suites": suites }));
    let (got, body) = tests::send(req, Some(&token)).await;
    assert_eq!((got, body["code"].as_str()), (400, Some("invalid_request")), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_cut_off_and_bounded() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let op = Operator::start_with(&nats, "a.example", "run", |c| {
        // Long enough that the idle sockets below still hold their slots
        // when a loaded machine gets to the next connection.
        c.limits.header_read_timeout_ms = 3000;
        c.limits.submit_timeout_ms = 1000;
        c.limits.request_timeout_ms = 2000;
        c.limits.max_connections = 8;
    })?;
    let token = op.token(&op.device_id("alice", "phone"));
    // Slowloris: a request head that never ends is closed.
    let (_, closed) = raw(&op, b"GET /healthz HTTP/1.1\r\nhost: x\r\n", Duration::from_secs(10)).await?;
    assert!(closed, "a never-ending request head kept its connection");
    // A body that drips: 408, typed, within the request timeout.
    let req = format!(
        "POST /v1/keypackages HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nauthorization: Bearer {token}\r\n\r\nabcd"
    );
    let (resp, _) = raw(&op, req.as_bytes(), Duration::from_secs(10)).await?;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(json_code(&resp).as_deref(), Some("request_timeout"), "{resp}");
    // A chunk size that overflows: refused or closed, never waited on.
    let req = b"POST /v1/keypackages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nab";
    let (resp, closed) = raw(&op, req, Duration::from_secs(10)).await?;
    assert!(closed || resp.starts_with("HTTP/1.1 4"), "an overflowing chunk size was waited on: {resp}");

    // Idle sockets take every connection slot: the next client gets a
    // typed 503 with Retry-After, not a hang. The server accepts in order,
    // so the idle ones hold their slots before the next one is accepted.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr(&op)).await?);
    }
    let (resp, _) = raw(&op, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(5)).await?;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after: 1"), "{resp}");
    assert_eq!(json_code(&resp).as_deref(), Some("unavailable"), "{resp}");
    // The idle ones are closed after the header timeout, and the operator
    // serves again.
    let mut served = false;
    for _ in 0..75 {
        let r = tests::http().get(format!("{}/healthz", op.url)).send().await;
        if r.is_ok_and(|r| r.status().is_success()) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served, "idle connections locked the operator out");
    drop(idle);
    Ok(())
}
