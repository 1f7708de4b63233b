//! `GET /1.0/metrics`: cluster-wide figures in the Prometheus text format.

use axum::extract::State;
use axum::response::Response;

use super::{ApiError, SharedState};

/// `GET /1.0/metrics` (filled in by the observability work; 501 until then).
pub async fn get(State(_state): State<SharedState>) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "not implemented yet",
    ))
}
