//! The one error body of the API: `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An API error: an HTTP status, a stable code and a human message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `not_found`,
    /// `conflict`, `too_many_sessions`, `payload_too_large`, `launch_failed`, `internal`.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API token is required: Authorization: Bearer TOKEN",
        )
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
}

/// Maps engine errors: what the caller got wrong is a 4xx, the rest a 5xx.
impl From<strata_engine::Error> for ApiError {
    fn from(e: strata_engine::Error) -> ApiError {
        use strata_engine::Error as E;
        let message = error_chain(&e);
        match &e {
            E::Package(strata_package::Error::NotFound { .. } | strata_package::Error::NotOnOs { .. }) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            E::Package(_) | E::Config(_) => Self::bad_request(message),
            E::InstallFailed { .. } | E::NotReady { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "launch_failed", message)
            }
            E::Refused(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_full", message),
            _ => Self::internal(message),
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        (self.status, axum::Json(body)).into_response()
    }
}
