//! `Idempotency-Key` on mutations. (Being written: for now every request passes through.)

use std::sync::atomic::{AtomicU32, Ordering};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::SharedState;
use crate::state::IdempotencyTag;

/// What the middleware puts into a request's extensions (as `Arc<RequestContext>`) when it
/// carries an `Idempotency-Key`: [`super::Scope::by`] tags each write with it.
#[derive(Debug)]
pub struct RequestContext {
    /// `<api key id>/<Idempotency-Key>`.
    pub key: String,
    /// sha256 (hex) of method, path, query and body.
    pub request_hash: String,
    /// When the request arrived (RFC 3339).
    pub now: String,
    next_seq: AtomicU32,
}

impl RequestContext {
    pub fn new(key: String, request_hash: String, now: String) -> RequestContext {
        RequestContext {
            key,
            request_hash,
            now,
            next_seq: AtomicU32::new(0),
        }
    }

    /// The tag of the request's next write.
    pub fn next_tag(&self) -> IdempotencyTag {
        IdempotencyTag {
            key: self.key.clone(),
            request_hash: self.request_hash.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            now: self.now.clone(),
        }
    }
}

/// The middleware every authenticated route runs behind.
pub async fn middleware(State(_state): State<SharedState>, req: Request, next: Next) -> Response {
    next.run(req).await
}
