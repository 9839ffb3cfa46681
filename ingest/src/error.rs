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
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let code = self.0.code;
        let mut resp = (status, Json(self.0)).into_response();
        // Read back by the metrics middleware.
        resp.extensions_mut().insert(code);
        resp
    }
}
