//! `Idempotency-Key` on mutations: a retry of a POST, PUT, PATCH or DELETE with the same key
//! and the same request gets the first answer, and nothing is done twice, even when the first
//! attempt's writes raced a leader change.
//!
//! How: the key (per API key: `<key id>/<header>`) names a replicated record
//! ([`crate::state::IdempotencyRecord`]). Each write a handler makes through
//! [`super::Scope::by`] carries a tag (key, request hash, its position among the request's
//! writes); `apply` records each write's result and answers a repeated one from the record
//! instead of applying it again. When the handler has answered (anything but a 5xx) after at
//! least one tagged write, the answer is stored too (`CompleteIdempotency`), and a retry
//! replays it with `Idempotency-Replayed: true`; a request that wrote nothing leaves no
//! record. One API key holds at most [`MAX_RECORDS_PER_KEY`] records (beyond: 429). The same key with another request (method, path, query or
//! body differ) is a 422. A retry that arrives while the first request still runs waits for its
//! answer (up to [`WAIT_FOR_FIRST`]), then gets a 409. Records are dropped after
//! [`RECORD_TTL`] ([`prune`], from the leader's reconciler).
//!
//! Routes whose answer holds a secret ([`answers_secret`]: key creation and rotation, exec
//! sessions) do not take part at all: the header is ignored there (no tag, no record), so that
//! no secret is ever written into the replicated state.
//!
//! Requests with a JSON body (or any other non-binary body: `curl -d` sends
//! `application/x-www-form-urlencoded`), or none, take part: the body is buffered (up to
//! [`super::MAX_JSON_BODY`]) to hash it before the handler runs. Binary uploads
//! (`application/octet-stream`, archives, `multipart/*`: file push, image upload) carrying the
//! header are refused with a 400 rather than silently not deduplicated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::{ApiError, Identity, MAX_JSON_BODY, SharedState};
use crate::state::{Command, IdempotencyTag, StoredResponse};

/// The request header.
pub const HEADER: &str = "idempotency-key";

/// The header set on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Largest answer stored for replay; a larger one is answered but not stored.
/// Mutation answers are an operation or an object, well under it; with
/// [`MAX_RECORDS_PER_KEY`] it bounds what one API key can keep in the replicated state (80 MB).
pub const MAX_STORED_BODY: usize = 8 * 1024;

/// How long a retry waits for the first request with its key to answer.
pub const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// Most records one API key may hold at once; a request with a new idempotency key beyond it
/// is refused with a 429 before it runs.
pub const MAX_RECORDS_PER_KEY: usize = 10_000;

/// How long records are kept.
pub const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);

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

    /// Whether the request made at least one tagged write.
    pub fn wrote(&self) -> bool {
        self.next_seq.load(Ordering::Relaxed) > 0
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

/// The routes (method, route pattern) whose answer carries a secret: a new API key's secret
/// or an exec session's websocket secrets. Idempotency does not apply to them.
const SECRET_ROUTES: [(Method, &str); 3] = [
    (Method::POST, "/1.0/keys"),
    (Method::POST, "/1.0/keys/{name}/rotate"),
    (Method::POST, "/1.0/instances/{name}/exec"),
];

/// Whether the request goes to a route whose answer holds a secret (then the
/// `Idempotency-Key` header is ignored). `matched` is the route pattern axum matched, when
/// known; otherwise the path's segments are compared with the patterns.
pub fn answers_secret(method: &Method, matched: Option<&str>, path: &str) -> bool {
    SECRET_ROUTES.iter().any(|(m, pattern)| {
        m == method
            && match matched {
                Some(route) => route == *pattern,
                None => {
                    let got: Vec<&str> = path.split('/').collect();
                    let want: Vec<&str> = pattern.split('/').collect();
                    got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(g, w)| w.starts_with('{') || g == w)
                }
            }
    })
}

/// Checks an `Idempotency-Key` value: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
pub fn validate_key(value: &[u8]) -> Result<&str, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_KEY_LEN
        && value.iter().all(|b| (0x21..=0x7e).contains(b));
    match std::str::from_utf8(value) {
        Ok(s) if ok => Ok(s),
        _ => Err(ApiError::bad_request(format!(
            "the Idempotency-Key header must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        ))),
    }
}

/// sha256 (hex) of what makes two requests the same: method, path, query and body.
pub fn request_hash(method: &Method, path: &str, query: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [
        method.as_str().as_bytes(),
        path.as_bytes(),
        query.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    hex::encode(h.finalize())
}

/// Content types of binary uploads (image upload, file push): a request carrying one of these
/// with a body does not take part in idempotency.
fn is_upload_type(essence: &str) -> bool {
    matches!(
        essence,
        "application/octet-stream"
            | "application/x-tar"
            | "application/gzip"
            | "application/x-gzip"
            | "application/x-xz"
            | "application/zstd"
            | "application/x-zstd"
            | "application/x-bzip2"
    ) || essence.starts_with("multipart/")
}

/// Whether the body can be buffered and hashed: anything but a binary upload (JSON, no
/// content type, `curl -d`'s form type, text...) or an empty body. Bodies larger than
/// [`MAX_JSON_BODY`] are refused later (413).
fn bufferable(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let Some(ct) = content_type else {
        return Ok(());
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !is_upload_type(essence) {
        return Ok(());
    }
    let empty = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0");
    if empty {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "Idempotency-Key is not supported on uploads ({essence}); send the upload without it"
    )))
}

/// Keys of the requests this process is answering.
static RUNNING: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
> = std::sync::LazyLock::new(Default::default);

/// Held while a request with an idempotency key runs; lets the next one with that key go when
/// dropped (also when the request is cancelled).
struct Running {
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Running {
    async fn acquire(key: &str) -> Result<Running, ApiError> {
        let lock = RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let mut running = Running {
            key: key.to_string(),
            lock: lock.clone(),
            guard: None,
        };
        match tokio::time::timeout(WAIT_FOR_FIRST, lock.lock_owned()).await {
            Ok(guard) => {
                running.guard = Some(guard);
                Ok(running)
            }
            Err(_) => Err(ApiError::conflict(
                "a request with this idempotency key is still being answered; retry later",
            )),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.guard.take();
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this handle hold it: nobody waits, forget the key.
        if running
            .get(&self.key)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(l) == 2)
        {
            running.remove(&self.key);
        }
    }
}

enum Found {
    /// No record: run the request.
    Absent,
    /// The first request's answer.
    Replay(StoredResponse),
    /// The first request was applied (in part) but has no stored answer yet.
    Unanswered,
}

/// What the state holds for `key`, compared with this request's `hash`.
fn classify(m: &crate::state::State, key: &str, hash: &str) -> Result<Found, ApiError> {
    match m.idempotency.get(key) {
        None => Ok(Found::Absent),
        Some(r) if r.request_hash != hash => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the idempotency key was already used for a different request; use a new key for a new request",
        )),
        Some(r) => Ok(match &r.response {
            Some(resp) => Found::Replay(resp.clone()),
            None => Found::Unanswered,
        }),
    }
}

/// One linearizable read: the record for `key` and how many records the API key holds.
async fn look_up(
    state: &SharedState,
    key: &str,
    hash: &str,
    key_id: &str,
) -> Result<(Found, usize), ApiError> {
    let (found, held) = state
        .cp
        .read(|m| {
            (
                classify(m, key, hash),
                count_records(&m.idempotency, key_id),
            )
        })
        .await?;
    Ok((found?, held))
}

/// How many of `records` belong to the API key `key_id` (those keyed `<key_id>/...`).
pub fn count_records<V>(records: &std::collections::BTreeMap<String, V>, key_id: &str) -> usize {
    let from = format!("{key_id}/");
    // '0' follows '/' in ASCII: the range is exactly the keys starting with `<key_id>/`.
    let to = format!("{key_id}0");
    records.range(from..to).count()
}

/// 429 when an API key holding `held` records may not start another (`cap` at most).
fn within_cap(held: usize, cap: usize) -> Result<(), ApiError> {
    if held < cap {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "this API key already holds {cap} idempotency records from the last 24 hours; send the request without Idempotency-Key or retry later"
        ),
    ))
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, stored.body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    if let Some(etag) = stored.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        headers.insert(http::header::ETAG, etag);
    }
    resp
}

/// The middleware every authenticated route runs behind (after authentication: it needs the
/// caller's [`Identity`]).
pub async fn middleware(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    match handle(state, req, next).await {
        Ok(resp) | Err(resp) => resp,
    }
}

async fn handle(state: SharedState, req: Request, next: Next) -> Result<Response, Response> {
    let mutation = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let secret = answers_secret(
        req.method(),
        req.extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|m| m.as_str()),
        req.uri().path(),
    );
    let Some(raw) = req.headers().get(HEADER).filter(|_| mutation && !secret) else {
        return Ok(next.run(req).await);
    };
    let header = validate_key(raw.as_bytes())
        .map_err(IntoResponse::into_response)?
        .to_string();
    let Some(identity) = req.extensions().get::<Identity>().cloned() else {
        return Err(ApiError::unauthorized().into_response());
    };
    bufferable(req.headers()).map_err(IntoResponse::into_response)?;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|e| {
            // axum reports the limit only in words.
            let too_large = format!("{e:#}").contains("length limit")
                || std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("length limit"));
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {MAX_JSON_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read request body: {e}"))
            }
            .into_response()
        })?;
    let hash = request_hash(
        &parts.method,
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &bytes,
    );
    let key = format!("{}/{}", identity.key_id, header);
    // Requests with the same key on this controller run one at a time: a retry sent before
    // the first answer waits for it and replays it.
    let _running = Running::acquire(&key)
        .await
        .map_err(IntoResponse::into_response)?;
    let (mut found, held) = look_up(&state, &key, &hash, &identity.key_id)
        .await
        .map_err(IntoResponse::into_response)?;
    if matches!(found, Found::Unanswered) {
        debug!(idempotency_key = %header, "waiting for the first request with this key to answer");
        // The read above was linearizable; the local copy only moves forward from it, so
        // following it costs no quorum round per poll.
        let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
        while matches!(found, Found::Unanswered) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            found = state
                .cp
                .read_local(|m| classify(m, &key, &hash))
                .map_err(IntoResponse::into_response)?;
        }
    }
    match found {
        Found::Replay(stored) => {
            debug!(idempotency_key = %header, status = stored.status, "replaying the first answer");
            return Ok(replay(stored));
        }
        Found::Unanswered => {
            return Err(ApiError::conflict(
                "the first request with this key was applied but its answer was lost; read the object to see its state",
            )
            .into_response());
        }
        Found::Absent => {}
    }
    within_cap(held, MAX_RECORDS_PER_KEY).map_err(IntoResponse::into_response)?;
    let ctx = Arc::new(RequestContext::new(
        key.clone(),
        hash.clone(),
        crate::clock::now(),
    ));
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(ctx.clone());
    let resp = next.run(req).await;
    // Only a request that changed (or tried to change) something leaves a record: one refused
    // before any write (a viewer's, a bad body) is simply answered again on a retry.
    if resp.status().is_server_error() || resp.status().is_informational() || !ctx.wrote() {
        return Ok(resp);
    }
    Ok(store_answer(&state, &ctx, resp).await)
}

/// Stores a small JSON answer for replay, then gives it back.
async fn store_answer(state: &SharedState, ctx: &RequestContext, resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let small = axum::body::HttpBody::size_hint(&body)
        .upper()
        .is_some_and(|u| u <= MAX_STORED_BODY as u64);
    if !small {
        warn!(idempotency_key = %ctx.key, "answer too large to store for replay");
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, MAX_STORED_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::internal(format!("cannot read the answer: {e}")).into_response();
        }
    };
    match String::from_utf8(bytes.to_vec()) {
        Ok(text) => {
            let etag = parts
                .headers
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let cmd = Command::CompleteIdempotency {
                key: ctx.key.clone(),
                request_hash: ctx.request_hash.clone(),
                status: parts.status.as_u16(),
                body: text,
                etag,
                now: ctx.now.clone(),
            };
            if let Err(e) = state.cp.write(cmd).await {
                warn!(idempotency_key = %ctx.key, error = %e, "cannot store the answer for replay");
            }
        }
        Err(_) => warn!(idempotency_key = %ctx.key, "answer is not text; not stored for replay"),
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Drops records older than [`RECORD_TTL`] (call it on the leader now and then; it writes
/// only when there is something to drop).
pub async fn prune(state: &SharedState) {
    let before = crate::clock::ago(RECORD_TTL);
    let any = state.cp.read_local(|m| {
        m.idempotency
            .values()
            .any(|r| r.created_at.as_str() < before.as_str())
    });
    if any && let Err(e) = state.cp.write(Command::PruneIdempotency { before }).await {
        warn!(error = %e, "could not prune idempotency records");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::api::{AppState, key_hash, router};
    use crate::raft::ControlPlane;
    use crate::state::{ApiKey, Requestor, Role};

    #[test]
    fn keys_are_checked() {
        assert!(validate_key(b"abc-123_XYZ/=").is_ok());
        assert!(validate_key(&[b'a'; 255]).is_ok());
        assert!(validate_key(&[b'a'; 256]).is_err());
        assert!(validate_key(b"").is_err());
        assert!(validate_key(b"a b").is_err());
        assert!(validate_key("é".as_bytes()).is_err());
        assert!(validate_key(b"a\tb").is_err());
    }

    #[test]
    fn secret_routes_are_recognized() {
        let m = |r: &str| answers_secret(&Method::POST, Some(r), "/ignored");
        assert!(m("/1.0/keys"));
        assert!(m("/1.0/keys/{name}/rotate"));
        assert!(m("/1.0/instances/{name}/exec"));
        assert!(!m("/1.0/keys/{name}"));
        assert!(!m("/1.0/instances"));
        assert!(!answers_secret(
            &Method::DELETE,
            Some("/1.0/keys/{name}"),
            "/1.0/keys/x"
        ));
        let p = |path: &str| answers_secret(&Method::POST, None, path);
        assert!(p("/1.0/keys"));
        assert!(p("/1.0/keys/ci/rotate"));
        assert!(p("/1.0/instances/web/exec"));
        assert!(!p("/1.0/instances/web/files"));
        assert!(!p("/1.0/keys/ci"));
        assert!(!answers_secret(&Method::PUT, None, "/1.0/keys/ci/rotate"));
    }

    #[test]
    fn records_are_counted_per_api_key() {
        let mut m = std::collections::BTreeMap::new();
        for k in [
            "k1/a", "k1/b", "k1/zz/z", "k1x/a", "k10/a", "k/a", "k1", "k2/a",
        ] {
            m.insert(k.to_string(), ());
        }
        assert_eq!(count_records(&m, "k1"), 3);
        assert_eq!(count_records(&m, "k"), 1);
        assert_eq!(count_records(&m, "k3"), 0);
        assert!(within_cap(0, 2).is_ok());
        assert!(within_cap(1, 2).is_ok());
        let e = within_cap(2, 2).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(within_cap(MAX_RECORDS_PER_KEY, MAX_RECORDS_PER_KEY).is_err());
    }

    #[test]
    fn hashes_tell_requests_apart() {
        let h = |m: Method, p: &str, q: &str, b: &[u8]| request_hash(&m, p, q, b);
        let base = h(Method::POST, "/1.0/instances", "project=a", b"{}");
        assert_eq!(base, h(Method::POST, "/1.0/instances", "project=a", b"{}"));
        assert_ne!(base, h(Method::PUT, "/1.0/instances", "project=a", b"{}"));
        assert_ne!(base, h(Method::POST, "/1.0/instances", "project=b", b"{}"));
        assert_ne!(base, h(Method::POST, "/1.0/instances", "", b"{}"));
        assert_ne!(base, h(Method::POST, "/1.0/instances", "project=a", b"{ }"));
        // Parts are length-prefixed: moving bytes between them changes the hash.
        assert_ne!(
            h(Method::POST, "/1.0/a", "b", b""),
            h(Method::POST, "/1.0/ab", "", b"")
        );
    }

    fn post(path: &str, body: &str, key: Option<&str>) -> http::Request<Body> {
        let mut b = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", "Bearer secret")
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header(HEADER, k);
        }
        b.body(Body::from(body.to_string())).unwrap()
    }

    async fn answer(app: &axum::Router, req: http::Request<Body>) -> (u16, bool, String) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let replayed = resp.headers().get(REPLAYED_HEADER).is_some();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, replayed, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn retries_replay_the_first_answer_and_do_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::open(dir.path(), 1, "127.0.0.1:1".into(), true, None)
            .await
            .unwrap();
        assert!(cp.wait_for_leader(Duration::from_secs(10)).await.is_some());
        cp.write(Command::AddApiKey {
            key: ApiKey {
                id: "k1".into(),
                name: "ci".into(),
                hash: key_hash("secret"),
                role: Role::Admin,
                ..Default::default()
            },
        })
        .await
        .unwrap();
        let ca = crate::tls::ClusterCa::generate("test").unwrap();
        let state = AppState::for_test(cp.clone(), ca);
        let app = router(state);
        let mut events = cp.events().subscribe();
        let p1 = r#"{"name":"p1"}"#;

        let first = answer(&app, post("/1.0/projects", p1, Some("abc"))).await;
        assert!(first.0 < 300, "{first:?}");
        assert!(!first.1);
        let again = answer(&app, post("/1.0/projects", p1, Some("abc"))).await;
        assert_eq!((again.0, &again.2), (first.0, &first.2));
        assert!(again.1, "the retry is marked as replayed");
        // Without the key, the same request is a new one: the project exists.
        let plain = answer(&app, post("/1.0/projects", p1, None)).await;
        assert_eq!(plain.0, 409, "{plain:?}");
        // The same key for another request: 422, and nothing is done.
        let other = answer(&app, post("/1.0/projects", r#"{"name":"p2"}"#, Some("abc"))).await;
        assert_eq!(other.0, 422, "{other:?}");
        assert!(other.2.contains("different request"), "{other:?}");
        assert!(!cp.read_local(|m| m.projects.contains_key("p2")));
        // A rejected request is answered the same way again too.
        let bad = answer(&app, post("/1.0/projects", r#"{"name":"p1"}"#, Some("dup"))).await;
        assert_eq!(bad.0, 409);
        let bad_again = answer(&app, post("/1.0/projects", r#"{"name":"p1"}"#, Some("dup"))).await;
        assert_eq!((bad_again.0, bad_again.1), (409, true));
        // Two at once on one controller: one runs, the other waits and replays its answer.
        let p4 = r#"{"name":"p4"}"#;
        let (x, y) = tokio::join!(
            answer(&app, post("/1.0/projects", p4, Some("conc"))),
            answer(&app, post("/1.0/projects", p4, Some("conc")))
        );
        assert_eq!((x.0, &x.2), (y.0, &y.2));
        assert!(x.0 < 300, "{x:?}");
        assert!(x.1 ^ y.1, "exactly one is replayed: {x:?} {y:?}");
        assert!(RUNNING.lock().unwrap().get("k1/conc").is_none());
        // A request refused before it wrote anything leaves no record.
        let before = cp.read_local(|m| m.idempotency.len());
        let bad = answer(
            &app,
            post("/1.0/projects", r#"{"name":"Bad Name"}"#, Some("nw")),
        )
        .await;
        assert_eq!(bad.0, 400, "{bad:?}");
        let bad = answer(
            &app,
            post("/1.0/projects", r#"{"name":"Bad Name"}"#, Some("nw")),
        )
        .await;
        assert_eq!((bad.0, bad.1), (400, false), "{bad:?}");
        assert_eq!(cp.read_local(|m| m.idempotency.len()), before);
        // Too large to hash.
        let big = format!("{{\"name\":\"{}\"}}", "x".repeat(MAX_JSON_BODY));
        let e = answer(&app, post("/1.0/projects", &big, Some("big"))).await;
        assert_eq!(e.0, 413, "{}", &e.2[..e.2.len().min(200)]);
        // Malformed keys and uploads.
        let e = answer(&app, post("/1.0/projects", p1, Some("a b"))).await;
        assert_eq!(e.0, 400);
        let upload = http::Request::builder()
            .method("POST")
            .uri("/1.0/images")
            .header("authorization", "Bearer secret")
            .header("content-type", "application/octet-stream")
            .header("content-length", "3")
            .header(HEADER, "up")
            .body(Body::from("abc"))
            .unwrap();
        let e = answer(&app, upload).await;
        assert_eq!(e.0, 400, "{e:?}");
        assert!(e.2.contains("not supported on uploads"), "{e:?}");
        // `curl -d` sends JSON as a form: hashed like JSON, and replayed.
        let form = |key: &str| {
            http::Request::builder()
                .method("POST")
                .uri("/1.0/projects")
                .header("authorization", "Bearer secret")
                .header("content-type", "application/x-www-form-urlencoded")
                .header(HEADER, key)
                .body(Body::from(r#"{"name":"p5"}"#))
                .unwrap()
        };
        let f1 = answer(&app, form("form")).await;
        let f2 = answer(&app, form("form")).await;
        assert!(f1.0 < 300, "{f1:?}");
        assert_eq!((f1.0, f1.1, &f1.2), (f2.0, !f2.1, &f2.2), "{f1:?} {f2:?}");

        // One project-created event naming the key, nothing for the replay or the stored
        // answers.
        let mut created = Vec::new();
        while let Ok(p) = events.try_recv() {
            assert_eq!(p.event.kind, "lifecycle");
            created.push(p.event.metadata.clone());
        }
        assert_eq!(created.len(), 3, "{created:?}");
        assert_eq!(created[1]["source"], "/1.0/projects/p4");
        assert_eq!(created[2]["source"], "/1.0/projects/p5");
        assert_eq!(created[0]["action"], "project-created");
        assert_eq!(created[0]["source"], "/1.0/projects/p1");
        assert_eq!(created[0]["requestor"]["key"], "ci");

        // Routes that answer a secret ignore the header: no record, a retry is a new request.
        let records = cp.read_local(|m| m.idempotency.len());
        let k = r#"{"name":"deploy","role":"viewer"}"#;
        let first = answer(&app, post("/1.0/keys", k, Some("key1"))).await;
        assert!(first.0 < 300, "{first:?}");
        assert!(first.2.contains("secret"), "{first:?}");
        let again = answer(&app, post("/1.0/keys", k, Some("key1"))).await;
        assert_eq!((again.0, again.1), (409, false), "{again:?}");
        assert!(again.2.contains("already exists"), "{again:?}");
        let rotate = answer(&app, post("/1.0/keys/deploy/rotate", "{}", Some("rot"))).await;
        assert!(rotate.0 < 300, "{rotate:?}");
        let rotate2 = answer(&app, post("/1.0/keys/deploy/rotate", "{}", Some("rot"))).await;
        assert!(rotate2.0 < 300 && !rotate2.1, "{rotate2:?}");
        assert_ne!(rotate.2, rotate2.2, "a retried rotate rotates again");
        assert_eq!(cp.read_local(|m| m.idempotency.len()), records);
        let stored = cp.read_local(|m| serde_json::to_string(&m.idempotency).unwrap());
        assert!(!stored.contains("secret"), "{stored}");
        while events.try_recv().is_ok() {}

        // A request whose write was applied but whose answer was never stored: the retry
        // waits, then says so.
        let body = r#"{"name":"p3"}"#;
        let hash = request_hash(&Method::POST, "/1.0/projects", "", body.as_bytes());
        cp.write(Command::By {
            requestor: Requestor::default(),
            idempotency: Some(IdempotencyTag {
                key: "k1/lost".into(),
                request_hash: hash,
                seq: 0,
                now: crate::clock::now(),
            }),
            command: Box::new(Command::CreateProject {
                project: crate::state::Project {
                    name: "p3".into(),
                    ..Default::default()
                },
            }),
        })
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let lost = answer(&app, post("/1.0/projects", body, Some("lost"))).await;
        assert_eq!(lost.0, 409, "{lost:?}");
        assert!(lost.2.contains("answer was lost"), "{lost:?}");
        assert!(started.elapsed() >= WAIT_FOR_FIRST);

        // Pruning keeps fresh records.
        prune_test_hook(&cp).await;
        cp.shutdown().await;
    }

    async fn prune_test_hook(cp: &ControlPlane) {
        let n = cp.read_local(|m| m.idempotency.len());
        assert!(n >= 2);
        cp.write(Command::PruneIdempotency {
            before: "2000-01-01T00:00:00Z".into(),
        })
        .await
        .unwrap();
        assert_eq!(cp.read_local(|m| m.idempotency.len()), n);
    }
}
