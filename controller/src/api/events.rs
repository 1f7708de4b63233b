//! `/1.0/events`: operation and lifecycle events over a websocket. (Being written.)

use axum::response::Response;

use super::{ApiError, Identity};

pub async fn websocket(_who: Identity) -> Result<Response, ApiError> {
    Err(ApiError::new(
        http::StatusCode::NOT_IMPLEMENTED,
        "events are being built",
    ))
}
