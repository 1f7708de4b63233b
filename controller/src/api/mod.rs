//! The REST API: LXD-shaped `/1.0/...` routes, one file per resource, behind a visible middleware
//! stack (request id and tracing, auth, body limit).

pub mod auth;
pub mod cluster;
pub mod error;
pub mod evacuate;
pub mod events;
pub mod exec;
pub mod files;
pub mod filter;
pub mod idempotency;
pub mod images;
pub mod instances;
pub mod keys;
pub mod metrics;
pub mod operations;
pub mod profiles;
pub mod projects;
pub mod server;
pub mod snapshots;
pub mod transfers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::agents::AgentPool;
use crate::raft::ControlPlane;
use crate::tls::ClusterCa;
pub use auth::{Identity, Scope, key_hash};
pub use error::ApiError;

/// Largest JSON body accepted (1 MiB).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// What every handler can reach.
pub struct AppState {
    pub cp: ControlPlane,
    pub agents: AgentPool,
    pub ca: ClusterCa,
    /// This controller's name (the `location` of what it answers).
    pub name: String,
    /// Operations that run on this controller: exec sessions waiting for their websocket.
    pub execs: exec::PendingExecs,
    /// Request counts and latencies of this controller's API.
    pub metrics: crate::metrics::ApiMetrics,
    /// Node liveness from agent heartbeats (meaningful on the leader).
    pub liveness: crate::liveness::Liveness,
    /// One lock per instance: changes to one instance never interleave.
    pub instance_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Image pulls between nodes in flight (the leader's reconciler shares them).
    pub image_pulls: crate::reconcile::ImagePulls,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The lock that serializes changes to `instance`.
    pub fn instance_lock(&self, instance: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .instance_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(instance.to_string()).or_default().clone()
    }
}

#[cfg(test)]
impl AppState {
    /// The API state of a controller named `c1` for tests: `cp`, the CA `ca`, and a
    /// certificate from it.
    #[allow(clippy::unwrap_used)]
    pub fn for_test(cp: ControlPlane, ca: ClusterCa) -> SharedState {
        let cert = ca.issue("c1", &["c1".into()]).unwrap();
        Arc::new(AppState {
            cp,
            agents: AgentPool::new(ca.cert_pem.clone(), cert.cert_pem, cert.key_pem),
            ca,
            name: "c1".into(),
            execs: Default::default(),
            metrics: Default::default(),
            liveness: crate::liveness::Liveness::new(std::time::Duration::from_secs(10)),
            instance_locks: Default::default(),
            image_pulls: Default::default(),
        })
    }
}

/// The router with every route and the middleware stack.
pub fn router(state: SharedState) -> Router {
    let authed = Router::new()
        .route("/1.0", get(server::get_server))
        .route(
            "/1.0/instances",
            get(instances::list).post(instances::create),
        )
        .route(
            "/1.0/instances/{name}",
            get(instances::get_one)
                .put(instances::put)
                .patch(instances::patch)
                .delete(instances::delete)
                .post(instances::rename),
        )
        .route(
            "/1.0/instances/{name}/state",
            get(instances::get_state).put(instances::put_state),
        )
        .route(
            "/1.0/instances/{name}/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route(
            "/1.0/instances/{name}/snapshots/{snapshot}",
            get(snapshots::get_one)
                .post(snapshots::rename)
                .delete(snapshots::delete),
        )
        .route("/1.0/instances/{name}/console", get(instances::console))
        .route("/1.0/instances/{name}/exec", post(exec::post_exec))
        .route(
            "/1.0/instances/{name}/files",
            get(files::pull).post(files::push).delete(files::delete),
        )
        .route("/1.0/images", get(images::list).post(images::create))
        .route(
            "/1.0/images/aliases",
            get(images::list_aliases).post(images::create_alias),
        )
        .route(
            "/1.0/images/aliases/{*alias}",
            get(images::get_alias).delete(images::delete_alias),
        )
        .route(
            "/1.0/images/{fingerprint}",
            get(images::get_one)
                .put(images::put)
                .patch(images::patch)
                .delete(images::delete),
        )
        .route("/1.0/images/{fingerprint}/export", get(images::export))
        .route("/1.0/operations", get(operations::list))
        .route(
            "/1.0/operations/{id}",
            get(operations::get_one).delete(operations::cancel),
        )
        .route("/1.0/operations/{id}/wait", get(operations::wait))
        .route("/1.0/operations/{id}/websocket", get(exec::websocket))
        .route(
            "/1.0/cluster",
            get(cluster::overview).patch(cluster::patch_cluster),
        )
        .route("/1.0/cluster/members", get(cluster::members))
        .route(
            "/1.0/cluster/members/{name}",
            get(cluster::member)
                .patch(cluster::patch_member)
                .delete(cluster::remove_member),
        )
        .route(
            "/1.0/cluster/members/{name}/state",
            post(evacuate::post_state),
        )
        .route("/1.0/cluster/join-tokens", post(cluster::create_join_token))
        .route(
            "/1.0/cluster/controller-tokens",
            post(cluster::create_controller_token),
        )
        .route("/1.0/metrics", get(metrics::get))
        .route("/1.0/events", get(events::websocket))
        .route("/1.0/projects", get(projects::list).post(projects::create))
        .route(
            "/1.0/projects/{name}",
            get(projects::get_one)
                .put(projects::put)
                .patch(projects::patch)
                .delete(projects::delete)
                .post(projects::rename),
        )
        .route("/1.0/projects/{name}/state", get(projects::get_state))
        .route("/1.0/profiles", get(profiles::list).post(profiles::create))
        .route(
            "/1.0/profiles/{name}",
            get(profiles::get_one)
                .put(profiles::put)
                .patch(profiles::patch)
                .delete(profiles::delete)
                .post(profiles::rename),
        )
        .route("/1.0/keys", get(keys::list).post(keys::create))
        .route("/1.0/keys/{name}", get(keys::get_one).delete(keys::delete))
        .route("/1.0/keys/{name}/rotate", post(keys::rotate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::middleware,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/", get(server::get_root))
        .route("/1.0/cluster/join", post(cluster::join))
        .route(
            "/1.0/cluster/join-controller",
            post(cluster::join_controller),
        )
        .merge(authed)
        .fallback(not_found)
        .layer(middleware::map_response(envelope_rejections))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track_requests,
        ))
        .layer(middleware::from_fn(trace_requests))
        .with_state(state)
}

/// Errors that axum's own extractors answer (a malformed query string, a bad path) come as
/// plain text; every error of this API is the LXD envelope, so rewrap them.
async fn envelope_rejections(resp: Response) -> Response {
    let status = resp.status();
    let is_text = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !is_text {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = text.trim().trim_end_matches('.').to_string();
    ApiError::new(
        status,
        if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            message
        },
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such API endpoint")
}

/// One span per request, with a request id, method and path; logs the status.
async fn trace_requests(req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let span =
        info_span!("request", req = %&id[..12], method = %req.method(), path = %req.uri().path());
    async move {
        let resp = next.run(req).await;
        debug!(status = resp.status().as_u16(), "answered");
        resp
    }
    .instrument(span)
    .await
}

/// Forwards an upload to an agent's client-streaming call: `header` first, then (when
/// `send_data`) every chunk of the request body wrapped by `wrap`, through a channel, so the
/// call streams the body as it arrives. The receiver fires when the client's upload breaks
/// off: race the call against it, so that the call is cancelled (not ended) and the agent
/// never commits a short upload.
pub fn forward_upload<M: Send + 'static>(
    header: M,
    mut data: axum::body::BodyDataStream,
    send_data: bool,
    wrap: fn(Bytes) -> M,
) -> (
    tokio_stream::wrappers::ReceiverStream<M>,
    tokio::sync::oneshot::Receiver<String>,
) {
    use futures::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel::<M>(8);
    let (broke_tx, broke_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        if tx.send(header).await.is_err() || !send_data {
            return;
        }
        while let Some(chunk) = data.next().await {
            let bytes = match chunk {
                Ok(b) => b,
                Err(e) => {
                    let _ = broke_tx.send(e.to_string());
                    return;
                }
            };
            if tx.send(wrap(bytes)).await.is_err() {
                return;
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), broke_rx)
}

/// A JSON body, parsed with our own error: one sentence in the LXD error envelope.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {MAX_JSON_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
    }
}

/// Serves the API over TLS until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    info!(addr = %listener.local_addr()?, "REST API listening");
    loop {
        let (tcp, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => {
                // Answers are small: send them now, not after a delayed ACK.
                let _ = c.0.set_nodelay(true);
                c
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
