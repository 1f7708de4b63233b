//! API errors: an HTTP status and one sentence, answered in LXD's error envelope. Internal
//! errors are mapped here, at the edge, and nowhere else.

use axum::Json;
use axum::response::{IntoResponse, Response};
use berth_proto::api;
use http::StatusCode;
use tracing::error;

use crate::agents::AgentError;
use crate::raft::{ReadError, WriteError};
use crate::state::{ApplyError, ApplyErrorKind};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header: set on a 503 only when nothing was changed, so
    /// that clients may repeat even a write.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A 503 for a request that changed nothing and may be repeated after `secs` seconds.
    pub fn unavailable_retry(message: impl Into<String>, secs: u32) -> Self {
        ApiError {
            retry_after: Some(secs),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "missing or invalid API key")
    }
    /// 403: the object is visible to the caller, the action is not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// 412: an `If-Match` ETag no longer matches.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, message)
    }
    /// 413: a body over `limit` bytes (`what` names it, e.g. "image upload").
    pub fn too_large(what: &str, limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what} is larger than the limit of {limit} bytes"),
        )
    }
}

/// The ETag an `If-Match` header asks for: `None` without the header (or with `*`); quotes
/// and a weak `W/` prefix are removed. A header that is not text is a 400.
pub fn if_match(headers: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(http::header::IF_MATCH) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::bad_request("If-Match header is not text"))?
        .trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    if v.is_empty() || v == "*" {
        return Ok(None);
    }
    Ok(Some(v.to_string()))
}

/// `command` guarded by the request's `If-Match` on `key` (see [`crate::state::Command::IfMatch`]):
/// applied only while the object still has that ETag, else 412. Unchanged without the header.
pub fn guard_if_match(
    headers: &http::HeaderMap,
    key: crate::state::ObjectKey,
    command: crate::state::Command,
) -> Result<crate::state::Command, ApiError> {
    Ok(match if_match(headers)? {
        Some(etag) => crate::state::Command::IfMatch {
            expect: vec![(key, etag)],
            command: Box::new(command),
        },
        None => command,
    })
}

/// Adds `ETag: "<etag>"` to an answer (nothing when `etag` is `None`).
pub fn with_etag(mut resp: Response, etag: Option<String>) -> Response {
    if let Some(v) = etag.and_then(|e| http::HeaderValue::from_str(&format!("\"{e}\"")).ok()) {
        resp.headers_mut().insert(http::header::ETAG, v);
    }
    resp
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            error!(status = self.status.as_u16(), error = %self.message, "request failed");
        }
        let mut resp = (
            self.status,
            Json(api::Response::error(self.status.as_u16(), self.message)),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        resp
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        let status = match e.kind {
            ApplyErrorKind::NotFound => StatusCode::NOT_FOUND,
            ApplyErrorKind::Conflict => StatusCode::CONFLICT,
            ApplyErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ApplyErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ApplyErrorKind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApplyErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.message)
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Rejected(a) => a.into(),
            // Nothing was proposed: the client may repeat the write.
            WriteError::Unavailable(u) => ApiError::unavailable_retry(u.to_string(), 1),
            // It may still be applied: the client must look before repeating it.
            e @ WriteError::Unsure(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            WriteError::Raft(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cluster could not commit the change: {e}"),
            ),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Unavailable(u) => ApiError::unavailable_retry(u.to_string(), 1),
            ReadError::Raft(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cluster state cannot be read right now: {e}"),
            ),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let msg = if s.code() == Code::Unavailable {
            format!("the node agent cannot be reached: {}", s.message())
        } else {
            s.message().to_string()
        };
        ApiError::new(status, msg)
    }
}
