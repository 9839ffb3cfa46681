//! The client-facing API of an operator (HTTP + WebSocket, axum): KeyPackage
//! upload and claim, group creation, message submission, group reads (each
//! group's entries straight from its LOG), the per-device mailbox (Welcomes,
//! notices) and WebSocket push of both. Submissions go into SUBMIT and the handler waits for the
//! sequencer's verdict. The server takes its listener, NATS topology, key
//! directory and shutdown token, so tests inject `127.0.0.1:0`.
//!
//! docs/client-api.md is the contract this module implements.
#![forbid(unsafe_code)]

mod edge;
mod error;
mod groups;
mod keyed;
mod keys;
mod mailbox;
mod push;
mod rejoin;
pub mod removals;
mod submit;
mod tails;
mod verdicts;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keydir::KeyDirectory;
use prometheus::{HistogramVec, IntCounterVec, Opts, Registry};
use proto::streams::Topology;
use proto::{DeviceId, ErrorCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::Reject;

#[derive(Clone)]
pub struct Metrics {
    pub requests: HistogramVec,
    pub errors: IntCounterVec,
    pub entries_served: IntCounterVec,
    /// Members' reports of Commits they could not process, at the hub.
    pub commit_reports: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            requests: HistogramVec::new(
                prometheus::HistogramOpts::new("mlsfed_api_request_seconds", "Client API request latency, by route.")
                    .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                &["route", "status"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("mlsfed_api_errors_total", "Client API refusals, by stable error code."),
                &["code"],
            )?,
            entries_served: IntCounterVec::new(
                Opts::new(
                    "mlsfed_api_entries_served_total",
                    "Group entries handed to devices, by how (fetch, push): every member's read counts.",
                ),
                &["via"],
            )?,
            commit_reports: IntCounterVec::new(
                Opts::new(
                    "mlsfed_group_commit_reports_total",
                    "Reports from members that could not process a Commit this hub accepted (via: local, peer).",
                ),
                &["via"],
            )?,
        };
        for via in ["local", "peer"] {
            m.commit_reports.with_label_values(&[via]);
        }
        registry.register(Box::new(m.commit_reports.clone()))?;
        for via in ["fetch", "push"] {
            m.entries_served.with_label_values(&[via]);
        }
        registry.register(Box::new(m.entries_served.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        Ok(m)
    }
}

/// Everything a request handler needs.
pub struct Api {
    pub topo: Topology,
    pub keydir: Arc<KeyDirectory>,
    pub cfg: config::Config,
    pub registry: Registry,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    /// Permits for WebSocket push connections (`limits.max_websockets`).
    pub websockets: Arc<tokio::sync::Semaphore>,
    /// This process's shared reader of each group WebSockets follow.
    pub tails: tails::Tails,
    /// This process's one subscription to verdicts.
    pub verdicts: verdicts::Verdicts,
    /// This process's sockets by device, woken when their device is
    /// removed at any ingest process (`mlsfed.revoked`).
    pub removals: removals::Removals,
    /// Submissions sent on sockets and not answered yet, in the whole
    /// process (`limits.max_in_flight_requests`, like HTTP requests): the
    /// per-socket limit alone would let one device with many sockets pin
    /// any number of bodies.
    pub socket_submits: Arc<tokio::sync::Semaphore>,
    /// The operator's status page (`/status`), served beside `/metrics`.
    pub status_page: Router,
    /// Reads groups' checkpoints (for their current GroupInfo).
    pub checkpoints: proto::checkpoint::Reader,
    /// The largest request body or submission frame taken (`body_limit`).
    pub max_body: usize,
}

pub type Shared = Arc<Api>;

pub use proto::limits::{body_limit, NATS_HEADROOM};
pub use proto::unix_now as now_unix;

/// The authenticated device of a request (`Authorization: Bearer <token>`).
pub struct AuthDevice(pub DeviceId);

/// When the request's token expires (unix seconds), set by [`AuthDevice`]
/// for the handlers that outlive the request (the WebSocket).
#[derive(Clone, Copy)]
pub struct TokenExpiry(pub u64);

impl FromRequestParts<Shared> for AuthDevice {
    type Rejection = Reject;

    async fn from_request_parts(parts: &mut Parts, api: &Shared) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Reject::new(ErrorCode::Unauthenticated, "missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Reject::new(ErrorCode::Unauthenticated, "expected a bearer token"))?;
        let (device, expires) =
            proto::auth::verify_until(api.cfg.token_secret.expose().as_bytes(), token.trim(), now_unix())
                .map_err(|e| Reject::new(ErrorCode::Unauthenticated, e.to_string()))?;
        parts.extensions.insert(TokenExpiry(expires));
        if device.domain() != api.cfg.domain {
            return Err(Reject::new(ErrorCode::Unauthenticated, "token is for a device of another operator"));
        }
        // Revocation outlives the token: a removed device is refused
        // whatever it asks, however long its token still runs.
        not_removed(api, &device).await?;
        Ok(AuthDevice(device))
    }
}

/// Reads a request body up to the configured limit.
/// Refuses a removed device (`device_revoked`): on every request, and on
/// every submission sent on a socket.
pub(crate) async fn not_removed(api: &Api, device: &DeviceId) -> Result<(), Reject> {
    if api.keydir.is_revoked(device).await.map_err(|e| Reject(e.to_api()))? {
        return Err(Reject::new(ErrorCode::DeviceRevoked, "this device was removed"));
    }
    Ok(())
}

pub async fn read_body(api: &Api, body: axum::body::Body) -> Result<bytes::Bytes, Reject> {
    let limit = api.max_body;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Reject::new(ErrorCode::BodyTooLarge, format!("request body is larger than {limit} bytes")))
}

pub fn router(api: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/operator", get(keys::operator))
        .route("/v1/keypackages", post(keys::upload_key_packages))
        .route("/v1/keypackages/stock", get(keys::stock))
        .route("/v1/keypackages/claim", post(keys::claim))
        .route("/v1/identity/{device}", get(keys::identity))
        .route("/v1/devices/{device}", axum::routing::delete(keys::remove_device))
        .route("/v1/groups", post(submit::create_group))
        .route("/v1/messages", post(submit::submit_message))
        .route("/v1/devices/{device}/mailbox", get(mailbox::fetch))
        .route("/v1/devices/{device}/mailbox/ack", post(mailbox::ack))
        .route("/v1/groups/{group}/entries", get(groups::entries))
        .route("/v1/groups/{group}/group_info", get(rejoin::group_info))
        .route("/v1/groups/{group}/reports", post(rejoin::report))
        .route("/v1/devices/{device}/groups", get(groups::sync))
        .route("/v1/devices/{device}/ws", get(push::websocket))
        .route_service("/status", api.status_page.clone())
        .fallback(|| async { Reject::new(ErrorCode::InvalidRequest, "no such endpoint") })
        .layer(middleware::from_fn_with_state(api.clone(), edge::declared_length))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_millis(api.cfg.limits.request_timeout_ms),
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(|_: tower::BoxError| async {
                    Reject::new(ErrorCode::Unavailable, "too many requests in progress; retry later")
                }))
                .load_shed()
                .concurrency_limit(api.cfg.limits.max_in_flight_requests.max(1)),
        )
        .layer(middleware::from_fn(edge::typed_errors))
        .layer(middleware::from_fn_with_state(api.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(api)
}

async fn observe(State(api): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        api.metrics.errors.with_label_values(&[code.as_str()]).inc();
    }
    api.metrics
        .requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn readyz(State(api): State<Shared>) -> Response {
    match api.topo.js.client().connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ready").into_response(),
        _ => Reject::new(ErrorCode::Unavailable, "not connected to NATS").into_response(),
    }
}

async fn metrics(State(api): State<Shared>) -> Response {
    match prometheus::TextEncoder::new().encode_to_string(&api.registry.gather()) {
        Ok(text) => text.into_response(),
        Err(e) => Reject::new(ErrorCode::Internal, e.to_string()).into_response(),
    }
}

/// Returns unused KeyPackage reservations to their pools, periodically.
async fn release_reservations(api: Shared) {
    let every = std::time::Duration::from_secs((api.cfg.keydir.reservation_secs / 4).clamp(1, 300));
    loop {
        tokio::select! {
            _ = api.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match api.keydir.release_expired(now_unix()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "unused KeyPackage reservations returned to their pools"),
            Err(e) => tracing::warn!(error = %e, "cannot release reservations"),
        }
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, api: Shared) -> std::io::Result<()> {
    tokio::spawn(release_reservations(api.clone()));
    tokio::spawn(keys::serve_keydir_requests(api.clone()));
    tokio::spawn(keys::settle_consumed(api.clone()));
    tokio::spawn(keys::hear_revocations(api.clone()));
    edge::serve(listener, router(api.clone()), api).await
}

pub(crate) fn json<T: serde::Serialize>(v: T) -> Json<T> {
    Json(v)
}
