//! HTTP rendering of [`ApiError`]: the status from its code and a JSON body
//! with the stable `code`. Never a 500: internal trouble is `unavailable`
//! (503, retryable).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::{ApiError, ErrorCode};

pub struct Reject(pub ApiError);

impl Reject {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self(ApiError::new(code, msg))
    }
}

impl From<ApiError> for Reject {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let code = self.0.code;
        // Only `wrong_epoch` carries the epoch fields: leave out the nulls.
        let mut body = serde_json::to_value(&self.0).unwrap_or_default();
        if let Some(map) = body.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        let mut resp = (status, Json(body)).into_response();
        // Overload and rate limits say when to come back.
        if code.retryable() && matches!(status.as_u16(), 429 | 503) {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        // Read back by the metrics middleware.
        resp.extensions_mut().insert(code);
        resp
    }
}
