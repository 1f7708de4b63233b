//! `Idempotency-Key` on mutations. (Being written: for now every request passes through.)

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::SharedState;

/// The middleware every authenticated route runs behind.
pub async fn middleware(State(_state): State<SharedState>, req: Request, next: Next) -> Response {
    next.run(req).await
}
