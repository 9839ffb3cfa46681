//! The HTTP edge: how connections are accepted and bounded, and how every
//! refusal becomes typed JSON (design decision 12, "Bounded, always").
//!
//! - Connections: at most `limits.max_connections` at once; one more is
//!   answered `503 unavailable` (JSON, `Retry-After`) and closed. hyper's
//!   `header_read_timeout` closes a connection whose request head does not
//!   arrive in time (slowloris, and idle keep-alive connections).
//! - Requests: at most `limits.max_in_flight_requests` at once (tower's
//!   concurrency limit with load shedding: overload is a 503, never a
//!   queue), each within `limits.request_timeout_ms` (tower-http), body
//!   included; a declared `Content-Length` over the body limit is refused
//!   before any byte is read.
//! - Every error response the framework makes itself (unknown method, a bad
//!   path or query, a failed WebSocket upgrade, a timeout, overload) is
//!   rewritten into the one error type, so clients always get JSON with a
//!   stable `code`. What hyper answers before a request exists (malformed
//!   framing) stays hyper's.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proto::ErrorCode;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::{Reject, Shared};

/// Refuses a request whose declared body is over the limit at once, rather
/// than after reading (or waiting for) that many bytes.
pub(crate) async fn declared_length(State(api): State<Shared>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = api.max_body as u64;
    if declared.is_some_and(|n| n > limit) {
        return Reject::new(ErrorCode::BodyTooLarge, format!("request body is larger than {limit} bytes"))
            .into_response();
    }
    next.run(req).await
}

/// Rewrites every error response that is not already ours (JSON) into the
/// error type: the framework's own rejections are plain text or empty.
pub(crate) async fn typed_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    // Ours already: a typed refusal, or a JSON answer that carries its
    // status on purpose (a revoked binding's 410).
    if !(status.is_client_error() || status.is_server_error()) || json || resp.extensions().get::<ErrorCode>().is_some()
    {
        return resp;
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::BodyTooLarge,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ErrorCode::HeadersTooLarge,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
        s if s.is_server_error() => ErrorCode::Unavailable,
        _ => ErrorCode::InvalidRequest,
    };
    // The framework's text says what was wrong (a bad query, a missing
    // upgrade header); keep it as the message, bounded.
    let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        text.into_owned()
    };
    Reject::new(code, message).into_response()
}

/// The answer to a connection over `limits.max_connections`: written
/// straight to the socket, since no request was read.
fn overloaded() -> Vec<u8> {
    let body = serde_json::json!({
        "code": ErrorCode::Unavailable.as_str(),
        "message": "too many connections; retry later",
        "retryable": true,
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `api.shutdown`, then lets the open
/// connections finish (bounded).
pub(crate) async fn serve(listener: TcpListener, router: Router, api: Shared) -> std::io::Result<()> {
    let limits = &api.cfg.limits;
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    // HTTP/1.1 only (WebSockets upgrade from it): HTTP/2's preface sniffing
    // and idle streams have no read timeout to bound them.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms.max(1)))
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (mut stream, _) = tokio::select! {
            _ = api.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or similar: wait, never spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Pushed frames and answers are small writes in quick succession:
        // with Nagle's algorithm each one after the first would wait for
        // the device's delayed ACK (40 ms on Linux).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            api.metrics.errors.with_label_values(&[ErrorCode::Unavailable.as_str()]).inc();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&overloaded())).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let service = hyper::service::service_fn({
            let router = router.clone();
            move |req: hyper::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    Ok::<_, Infallible>(
                        router.oneshot(req.map(axum::body::Body::new)).await.unwrap_or_else(|e| match e {}),
                    )
                }
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = Duration::from_millis(limits.header_read_timeout_ms.max(1));
        tokio::spawn(async move {
            // hyper times a request head from its first byte: a socket that
            // sends nothing at all is closed here, after the same time.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, failed, or silent for too long.
                _ => {
                    drop(permit);
                    return;
                }
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(20), graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after 20 s; closing them");
    }
    // An upgraded connection leaves hyper at the upgrade: its socket runs
    // in a task of its own, which answers the submissions it holds before
    // closing. Wait for every socket to hand its permit back (the workers
    // that decide those submissions stop only after this returns).
    let sockets = u32::try_from(api.cfg.limits.max_websockets).unwrap_or(u32::MAX);
    let drained =
        tokio::time::timeout(crate::push::DRAIN + Duration::from_secs(1), api.websockets.acquire_many(sockets));
    if drained.await.is_err() {
        tracing::warn!("push sockets still open after their drain time; closing them");
    }
    Ok(())
}
