//! API request metrics, kept per controller.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::api::SharedState;

/// Request counts and latencies (filled in by the observability work).
#[derive(Default)]
pub struct ApiMetrics {}

/// Middleware that records each request in [`ApiMetrics`].
pub async fn track_requests(
    State(_state): State<SharedState>,
    req: Request,
    next: Next,
) -> Response {
    next.run(req).await
}
