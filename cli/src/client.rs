//! HTTPS and websocket client for the Berth REST API: TLS verified against the remote's CA (or a
//! pinned certificate fingerprint), bearer-key authentication, the response envelope and
//! operations.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::api::{Operation, OperationStatus, Response, ResponseType};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::Target;

/// A request body: in memory or streamed from disk.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A websocket (an exec operation's, the event stream): upgraded from an HTTP/1.1 request.
pub type WebSocket = tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The sending half of one HTTP/1.1 connection.
type Sender = hyper::client::conn::http1::SendRequest<Body>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connect timeout per address when a remote has several: a controller that does not answer
/// is skipped quickly in favour of the next one.
const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long (from the first failure) requests that may be repeated keep being retried after a
/// 503 answer or a broken connection (a Raft leader election takes one to two seconds); the
/// last attempt may end later.
pub const RETRY_WINDOW: Duration = Duration::from_secs(5);

/// Deadline of the TLS handshake, after the TCP connect.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for the answer to an ordinary request (from sending it to its last byte).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Extra time over a long poll's own timeout (`/wait?timeout=N`) before its answer is overdue.
pub const LONG_POLL_MARGIN: Duration = Duration::from_secs(10);

/// The server's default `/wait` timeout, when the request names none.
const DEFAULT_WAIT_SECS: u64 = 3600;

/// TCP keepalive: a controller cut off without FIN or RST (host down, network partition) is
/// noticed after about idle + interval x retries even on a connection that only waits, such
/// as a file download or an exec websocket.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// The deadlines a [`Client`] applies (see [`Client::with_timeouts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The TLS handshake after the TCP connect.
    pub tls_handshake: Duration,
    /// The answer (head and body) to a request sent with [`Client::call`].
    pub response: Duration,
    /// Added to a `/wait` long poll's timeout to give its answer's deadline.
    pub long_poll_margin: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            tls_handshake: TLS_HANDSHAKE_TIMEOUT,
            response: RESPONSE_TIMEOUT,
            long_poll_margin: LONG_POLL_MARGIN,
        }
    }
}

impl Timeouts {
    /// The deadline for the answer to a request for `path`: a `/wait` long poll may be held by
    /// the server for its `timeout` (the server's default when it names none), so it gets that
    /// plus the margin; anything else gets [`Timeouts::response`].
    pub fn for_path(&self, path: &str) -> Duration {
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        if !route.ends_with("/wait") {
            return self.response;
        }
        let secs = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("timeout="))
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(DEFAULT_WAIT_SECS, |t| {
                u64::try_from(t).unwrap_or(DEFAULT_WAIT_SECS)
            });
        Duration::from_secs(secs) + self.long_poll_margin
    }
}

/// Errors talking to a Berth server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("remote URL \"{0}\" is not valid: expected https://HOST[:PORT]")]
    BadUrl(String),
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot set up TLS: {0}")]
    TlsSetup(String),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// None of a remote's several addresses could be reached.
    #[error("cannot connect to any address of remote \"{remote}\": {reasons}")]
    NoAddress { remote: String, reasons: String },
    #[error("request to {url} failed: {reason}")]
    Http { url: String, reason: String },
    /// The server answered with an error envelope (or an error status).
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),
    #[error("{0}")]
    OperationFailed(String),
    #[error("websocket connection failed: {0}")]
    Websocket(String),
    /// The server's certificate is not the one pinned when the remote was added.
    #[error(
        "the certificate of remote \"{remote}\" at {url} has changed: its sha256 fingerprint is now {seen} but {pinned} was pinned; if it was replaced on purpose, remove the remote and add it again"
    )]
    CertificateChanged {
        remote: String,
        url: String,
        seen: String,
        pinned: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One address of a remote.
#[derive(Clone)]
struct Endpoint {
    /// `https://host:port` as given (for messages).
    url: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Endpoint {
    fn new(url: &str) -> Result<Endpoint, ClientError> {
        let (host, port) = parse_url(url)?;
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            server_name: server_name(&host, url)?,
            host,
            port,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A Berth remote with its credentials: one address or several (the cluster's controllers).
///
/// Every request first connects to the address that answered last; when a connection cannot
/// be made the next address is tried (nothing was sent, so this is safe for any request).
/// Clones share the choice of address.
#[derive(Clone)]
pub struct Client {
    /// The remote's name (for messages).
    name: String,
    endpoints: Arc<Vec<Endpoint>>,
    /// Index into `endpoints` of the address to try first.
    current: Arc<AtomicUsize>,
    key: String,
    tls: TlsConnector,
    /// The verifier of a pinned certificate, to tell a changed certificate apart.
    pinned: Option<Arc<PinVerifier>>,
    timeouts: Timeouts,
    /// The project requests work in (`?project=`).
    project: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url()).finish()
    }
}

/// Whether a request with `method` that got a 503 answer (with or without a `Retry-After`
/// header) may be sent again. Reads always may. A write may only when the server said, with
/// `Retry-After`, that it did not commit it: a 503 alone can come after the command reached
/// the Raft log (the leader died before answering), and sending it again could do it twice.
pub fn may_retry_503(method: &Method, retry_after: bool) -> bool {
    matches!(*method, Method::GET | Method::HEAD) || retry_after
}

/// Splits `https://host[:port][/]` into host and port (default 8443).
pub fn parse_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadUrl(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), uri.port_u16().unwrap_or(8443)))
}

/// Turns TCP keepalive on for `stream` (best effort: a failure only loses the early notice).
fn set_keepalive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Percent-encodes a value for a query string (keeps `/` and unreserved characters).
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// sha256 of a DER certificate, lowercase hex.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn read_ca(path: &Path) -> Result<RootCertStore, ClientError> {
    let fail = |reason: String| ClientError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("it holds no PEM certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| fail(e.to_string()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Accepts exactly one certificate, by sha256 fingerprint; with `pin = None` it accepts any
/// certificate and records its fingerprint (used once by `remote add` to show it to the user).
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    seen: Mutex<Option<String>>,
    /// The fingerprint of a certificate refused for not matching the pin.
    mismatch: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinVerifier {
    fn new(pin: Option<String>) -> PinVerifier {
        PinVerifier {
            pin,
            seen: Mutex::new(None),
            mismatch: Mutex::new(None),
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = cert_fingerprint(end_entity.as_ref());
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fp.clone());
        }
        match &self.pin {
            Some(pin) if !pin.eq_ignore_ascii_case(&fp) => {
                if let Ok(mut m) = self.mismatch.lock() {
                    *m = Some(fp.clone());
                }
                Err(rustls::Error::General(format!(
                    "server certificate fingerprint {fp} does not match the pinned {pin}"
                )))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(verifier: Arc<dyn ServerCertVerifier>) -> Result<rustls::ClientConfig, ClientError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TlsSetup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The TLS handshake on `tcp`, within `timeout`.
async fn tls_handshake(
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
    url: &str,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let fail = |reason: String| ClientError::Connect {
        url: url.to_string(),
        reason,
    };
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!(
            "TLS handshake timed out after {} s",
            timeout.as_secs_f32()
        ))),
    }
}

fn server_name(host: &str, url: &str) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(host.to_string()).map_err(|_| ClientError::BadUrl(url.to_string()))
}

async fn tcp_connect(
    host: &str,
    port: u16,
    url: &str,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let fail = |reason: String| ClientError::Connect {
        url: url.to_string(),
        reason,
    };
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            set_keepalive(&s);
            Ok(s)
        }
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail("timed out".into())),
    }
}

/// Connects once to `url` accepting any certificate and returns the server certificate's
/// sha256 fingerprint (for `remote add` without a CA file).
pub async fn fetch_fingerprint(url: &str) -> Result<String, ClientError> {
    let (host, port) = parse_url(url)?;
    let verifier = Arc::new(PinVerifier::new(None));
    let connector = TlsConnector::from(Arc::new(tls_config(verifier.clone())?));
    let tcp = tcp_connect(&host, port, url, CONNECT_TIMEOUT).await?;
    tls_handshake(
        &connector,
        server_name(&host, url)?,
        tcp,
        url,
        TLS_HANDSHAKE_TIMEOUT,
    )
    .await?;
    let seen = verifier.seen.lock().ok().and_then(|s| s.clone());
    seen.ok_or_else(|| ClientError::Connect {
        url: url.to_string(),
        reason: "the server presented no certificate".into(),
    })
}

/// The header that makes a write safe to retry (the server answers a repeat with the first
/// result).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Whether a write to `path` (query allowed) takes an `Idempotency-Key`: not the routes whose
/// answer holds a secret (`POST /1.0/keys`, `POST /1.0/keys/{name}/rotate`,
/// `POST /1.0/instances/{name}/exec`), where the server ignores it and stores nothing.
pub fn takes_idempotency_key(method: &Method, path: &str) -> bool {
    if *method != Method::POST {
        return true;
    }
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    !matches!(
        segments.as_slice(),
        ["1.0", "keys"] | ["1.0", "keys", _, "rotate"] | ["1.0", "instances", _, "exec"]
    )
}

/// A fresh idempotency key: unique per request (process id, time, counter), not secret.
pub fn idempotency_key() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}-{}-{}",
        std::process::id(),
        now.as_nanos(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    hex::encode(&Sha256::digest(seed.as_bytes())[..16])
}

/// Headers with `If-Match: etag` (none when there is no ETag).
pub fn if_match(etag: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(v) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::IF_MATCH, v);
    }
    h
}

/// Whether requests to `path` name a project: everything but the server root, API keys,
/// projects themselves and the cluster (nodes, controllers, join tokens).
pub fn takes_project(path: &str) -> bool {
    let route = path.split('?').next().unwrap_or(path);
    let under = |prefix: &str| {
        route == prefix
            || route
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    route.starts_with("/1.0/")
        && !under("/1.0/keys")
        && !under("/1.0/projects")
        && !under("/1.0/cluster")
}

/// `path` with `project=P` added to its query when the endpoint takes a project and the
/// query names none yet (neither `project=` nor `all-projects=`).
pub fn scoped_path(path: &str, project: Option<&str>) -> String {
    let Some(project) = project.filter(|p| !p.is_empty()) else {
        return path.to_string();
    };
    if !takes_project(path) {
        return path.to_string();
    }
    let (route, query) = match path.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (path, None),
    };
    if let Some(q) = query
        && q.split('&')
            .any(|kv| kv.starts_with("project=") || kv.starts_with("all-projects="))
    {
        return path.to_string();
    }
    let p = encode_query(project);
    match query {
        Some(q) if !q.is_empty() => format!("{route}?{q}&project={p}"),
        _ => format!("{route}?project={p}"),
    }
}

/// Builds the body of a request from bytes.
pub fn full_body(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> Body {
    full_body(Bytes::new())
}

impl Client {
    /// A client for `target`: its CA file is read now.
    pub fn new(target: &Target) -> Result<Client, ClientError> {
        let endpoints = std::iter::once(&target.url)
            .chain(&target.more_urls)
            .map(|u| Endpoint::new(u))
            .collect::<Result<Vec<_>, _>>()?;
        let mut pinned = None;
        let verifier: Arc<dyn ServerCertVerifier> = match (&target.ca_file, &target.fingerprint) {
            (Some(ca), _) => {
                let roots = read_ca(ca)?;
                Arc::new(
                    berth_proto::tls::ControllerVerifier::with_roots(roots, provider())
                        .map_err(|e| ClientError::TlsSetup(e.to_string()))?,
                )
            }
            (None, Some(fp)) => {
                let v = Arc::new(PinVerifier::new(Some(fp.clone())));
                pinned = Some(v.clone());
                v
            }
            (None, None) => {
                return Err(ClientError::TlsSetup(format!(
                    "remote \"{}\" has neither a CA file nor a certificate fingerprint to trust",
                    target.name
                )));
            }
        };
        Ok(Client {
            name: target.name.clone(),
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
            key: target.key.clone(),
            tls: TlsConnector::from(Arc::new(tls_config(verifier)?)),
            pinned,
            timeouts: Timeouts::default(),
            project: None,
        })
    }

    /// The same client working in `project`: requests to project-scoped endpoints carry
    /// `?project=` (see [`scoped_path`]); `None` sends none (the server then uses the key's
    /// project, or `default`).
    pub fn with_project(mut self, project: Option<String>) -> Client {
        self.project = project.filter(|p| !p.is_empty());
        self
    }

    /// The project requests name, if any.
    pub fn project(&self) -> Option<&str> {
        self.project.as_deref()
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `path` with this client's project added where the endpoint takes one.
    pub fn path_for(&self, path: &str) -> String {
        scoped_path(path, self.project.as_deref())
    }

    /// The same client with other deadlines.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Client {
        self.timeouts = timeouts;
        self
    }

    /// The URL of the address tried first (the one that answered last).
    pub fn url(&self) -> String {
        self.endpoint(self.current_index()).url.clone()
    }

    /// Every address of the remote, in configured order.
    pub fn urls(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.url.clone()).collect()
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len().max(1)
    }

    fn endpoint(&self, i: usize) -> &Endpoint {
        // `new` refuses a target without addresses, so there is always an element 0.
        &self.endpoints[i % self.endpoints.len()]
    }

    /// Makes the next address the one tried first (after a failure at the current one).
    fn rotate(&self, from: usize) {
        let next = (from + 1) % self.endpoints.len().max(1);
        let _ = self
            .current
            .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn connect_to(&self, ep: &Endpoint) -> Result<TlsStream<TcpStream>, ClientError> {
        let timeout = if self.endpoints.len() > 1 {
            FAILOVER_CONNECT_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        };
        let tcp = tcp_connect(&ep.host, ep.port, &ep.url, timeout).await?;
        let result = tls_handshake(
            &self.tls,
            ep.server_name.clone(),
            tcp,
            &ep.url,
            self.timeouts.tls_handshake,
        )
        .await;
        match (result, &self.pinned) {
            (Err(e), Some(v)) => {
                let seen = v.mismatch.lock().ok().and_then(|m| m.clone());
                match (seen, &v.pin) {
                    (Some(seen), Some(pinned)) => Err(ClientError::CertificateChanged {
                        remote: self.name.clone(),
                        url: ep.url.clone(),
                        seen,
                        pinned: pinned.clone(),
                    }),
                    _ => Err(e),
                }
            }
            (result, _) => result,
        }
    }

    /// Connects to the first address that answers, starting with the current one; returns the
    /// stream and the index of the address.
    async fn connect(&self) -> Result<(TlsStream<TcpStream>, usize), ClientError> {
        let n = self.endpoints.len();
        let start = self.current_index();
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            match self.connect_to(self.endpoint(i)).await {
                Ok(stream) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok((stream, i));
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.len() == 1
            && let Some(e) = errors.pop()
        {
            return Err(e);
        }
        Err(ClientError::NoAddress {
            remote: self.name.clone(),
            reasons: errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    /// Sends one request (a fresh connection each time) and returns the raw answer.
    ///
    /// There is no deadline on the answer (the body may be a long upload, which the server
    /// answers only once it has it all); TCP keepalive still notices a controller that is gone.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Response<Incoming>, ClientError> {
        self.send(method, path, headers, body, None).await
    }

    /// [`Client::raw`], with a deadline on the answer's head when `head_timeout` is set: a
    /// connection without an answer in time is treated as broken (next address next time).
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
        head_timeout: Option<Duration>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let (mut sender, i) = self.open().await?;
        self.send_on(&mut sender, i, method, path, headers, body, head_timeout)
            .await
    }

    /// Connects (see [`Client::connect`]) and starts HTTP/1.1 on the connection; it can carry
    /// several requests in turn, and be upgraded to a websocket.
    async fn open(&self) -> Result<(Sender, usize), ClientError> {
        let (stream, i) = self.connect().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http {
                url: self.endpoint(i).url.clone(),
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok((sender, i))
    }

    /// A request for `path` (already scoped) to address `i`, with the key and our headers.
    fn request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Request<Body>, ClientError> {
        let ep = self.endpoint(i);
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, ep.authority())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(
                header::USER_AGENT,
                format!("berth/{}", berth_proto::VERSION),
            );
        if let Some(h) = builder.headers_mut() {
            h.extend(headers);
        }
        builder.body(body).map_err(|e| ClientError::Http {
            url: format!("{}{}", ep.url, path),
            reason: e.to_string(),
        })
    }

    /// [`Client::send`] on an open connection to address `i`.
    #[allow(clippy::too_many_arguments)]
    async fn send_on(
        &self,
        sender: &mut Sender,
        i: usize,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
        head_timeout: Option<Duration>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let path = &self.path_for(path);
        let ep = self.endpoint(i);
        let http_err = |e: &dyn std::fmt::Display| ClientError::Http {
            url: format!("{}{}", ep.url, path),
            reason: e.to_string(),
        };
        let req = self.request(i, method, path, headers, body)?;
        let result = match head_timeout {
            None => sender.send_request(req).await.map_err(|e| http_err(&e)),
            Some(t) => match tokio::time::timeout(t, sender.send_request(req)).await {
                Ok(r) => r.map_err(|e| http_err(&e)),
                Err(_) => Err(http_err(&format_args!(
                    "no answer within {} s",
                    t.as_secs_f32()
                ))),
            },
        };
        if result.is_err() {
            // The connection broke mid-request: start with another address next time.
            self.rotate(i);
        }
        result
    }

    /// Reads a whole answer body.
    pub async fn read_body(&self, resp: http::Response<Incoming>) -> Result<Bytes, ClientError> {
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| ClientError::Http {
                url: self.url(),
                reason: e.to_string(),
            })
    }

    /// Sends a request and decodes the envelope; an `error` envelope (or an error status
    /// without one) becomes [`ClientError::Api`].
    pub async fn envelope(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response, ClientError> {
        let resp = self.raw(method, path, headers, body).await?;
        let status = resp.status();
        let bytes = self.read_body(resp).await?;
        parse_envelope(status, &bytes)
    }

    /// Sends JSON (or nothing) and decodes the envelope.
    ///
    /// The answer's head, then its body, must each come within [`Timeouts::for_path`]; an
    /// answer that does not counts as a broken connection. Retries for up to [`RETRY_WINDOW`] from the first failure, moving
    /// to the remote's next address each time: reads after a 503 answer or a connection that
    /// broke mid-request; writes only after a 503 answer with `Retry-After` (see
    /// [`may_retry_503`]). Other answers are returned as they are.
    pub async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response, ClientError> {
        self.call_with(method, path, body, HeaderMap::new())
            .await
            .map(|(r, _)| r)
    }

    /// [`Client::call`] with extra request headers (`If-Match`); also returns the answer's
    /// headers (`ETag`). Writes carry an `Idempotency-Key` (the same on every retry) unless
    /// `headers` has one or the route answers a secret ([`takes_idempotency_key`]).
    pub async fn call_with<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        headers: HeaderMap,
    ) -> Result<(Response, HeaderMap), ClientError> {
        let (headers, bytes) = json_request(&method, path, body, headers)?;
        let read = matches!(method, Method::GET | Method::HEAD);
        let deadline = self.timeouts.for_path(path);
        let mut first_failure: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let body = bytes.clone().map(full_body).unwrap_or_else(empty_body);
            // The address to move away from before retrying (`raw` itself moves on from one
            // whose connection broke).
            let mut used = None;
            let (result, retry) = match self
                .send(method.clone(), path, headers.clone(), body, Some(deadline))
                .await
            {
                Ok(resp) => {
                    used = Some(self.current_index());
                    let status = resp.status();
                    let answer_headers = resp.headers().clone();
                    let retry_after = resp.headers().contains_key(header::RETRY_AFTER);
                    let bytes = match tokio::time::timeout(deadline, self.read_body(resp)).await {
                        Ok(b) => b,
                        Err(_) => Err(ClientError::Http {
                            url: format!("{}{}", self.url(), path),
                            reason: format!(
                                "the answer did not end within {} s",
                                deadline.as_secs_f32()
                            ),
                        }),
                    };
                    match bytes {
                        Ok(b) => {
                            let parsed = parse_envelope(status, &b).map(|r| (r, answer_headers));
                            let retry = matches!(&parsed, Err(e) if e.status() == Some(503))
                                && may_retry_503(&method, retry_after);
                            (parsed, retry)
                        }
                        Err(e) => (Err(e), read),
                    }
                }
                Err(e @ ClientError::Http { .. }) => (Err(e), read),
                Err(e) => (Err(e), false),
            };
            if !retry {
                return result;
            }
            let since = *first_failure.get_or_insert_with(Instant::now);
            if since.elapsed() + pause > RETRY_WINDOW {
                return result;
            }
            if let Some(i) = used {
                self.rotate(i);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// `GET` a sync answer and decode its metadata, with the object's `ETag` if it has one.
    pub async fn get_tagged<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(T, Option<String>), ClientError> {
        let (resp, headers) = self
            .call_with::<()>(Method::GET, path, None, HeaderMap::new())
            .await?;
        let etag = headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((decode_metadata(resp.metadata)?, etag))
    }

    /// `GET` a sync answer and decode its metadata.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.call::<()>(Method::GET, path, None).await?;
        decode_metadata(resp.metadata)
    }

    /// Sends a request expected to answer `sync`; returns its metadata.
    pub async fn sync<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self.call(method, path, body).await?;
        Ok(resp.metadata)
    }

    /// Sends a request that starts an operation and waits for it to end successfully.
    pub async fn run<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Operation, ClientError> {
        let resp = self.call(method, path, body).await?;
        self.finish(resp).await
    }

    /// Waits for the operation of an `async` answer (a `sync` answer is returned as a finished
    /// operation whose metadata is the answer's).
    pub async fn finish(&self, resp: Response) -> Result<Operation, ClientError> {
        match resp.kind {
            ResponseType::Async => {
                let op = operation_of(&resp)?;
                self.wait(&op.id).await
            }
            _ => Ok(Operation {
                status: OperationStatus::Success,
                status_code: OperationStatus::Success.code(),
                metadata: resp.metadata,
                ..Operation::default()
            }),
        }
    }

    /// Waits until operation `id` reaches a final status; `Failure` and `Cancelled` are errors.
    pub async fn wait(&self, id: &str) -> Result<Operation, ClientError> {
        loop {
            let op: Operation = self
                .get(&format!(
                    "/1.0/operations/{}/wait?timeout=30",
                    encode_query(id)
                ))
                .await?;
            match op.status {
                OperationStatus::Success => return Ok(op),
                OperationStatus::Failure => {
                    let err = if op.err.is_empty() {
                        format!("operation {} failed", op.id)
                    } else {
                        op.err
                    };
                    return Err(ClientError::OperationFailed(err));
                }
                OperationStatus::Cancelled => {
                    return Err(ClientError::OperationFailed(format!(
                        "operation {} was cancelled",
                        op.id
                    )));
                }
                OperationStatus::Pending | OperationStatus::Running => {}
            }
        }
    }

    /// Opens a websocket at `path` (same TLS and bearer key as every request).
    pub async fn websocket(&self, path: &str) -> Result<WebSocket, ClientError> {
        let (mut sender, i) = self.open().await?;
        self.upgrade(&mut sender, i, path).await
    }

    /// Sends a JSON request whose answer names a websocket (`exec`), then opens that websocket
    /// (at the path `ws_path` makes of the answer) on the same connection: one TCP connection
    /// and one TLS handshake instead of two. The request is sent once, as [`Client::call`]
    /// would (with its retries when the server answers 503 with `Retry-After`); when the
    /// server closes the connection after its answer, the websocket gets a new one.
    pub async fn call_then_websocket<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        json: Option<&B>,
        ws_path: impl FnOnce(&Response) -> Result<String, ClientError>,
    ) -> Result<(Response, WebSocket), ClientError> {
        let (headers, bytes) = json_request(&method, path, json, HeaderMap::new())?;
        let deadline = self.timeouts.for_path(path);
        let (mut sender, i) = self.open().await?;
        let body = bytes.map(full_body).unwrap_or_else(empty_body);
        let resp = self
            .send_on(
                &mut sender,
                i,
                method.clone(),
                path,
                headers.clone(),
                body,
                Some(deadline),
            )
            .await?;
        let status = resp.status();
        let retry_after = resp.headers().contains_key(header::RETRY_AFTER);
        let answer = match tokio::time::timeout(deadline, self.read_body(resp)).await {
            Ok(b) => parse_envelope(status, &b?),
            Err(_) => Err(ClientError::Http {
                url: format!("{}{}", self.endpoint(i).url, path),
                reason: format!("the answer did not end within {} s", deadline.as_secs_f32()),
            }),
        };
        let answer = match answer {
            Err(e) if e.status() == Some(503) && may_retry_503(&method, retry_after) => {
                // Not done: the usual retries (next address, backing off), then a connection
                // of its own for the websocket.
                self.rotate(i);
                let (resp, _) = self.call_with(method, path, json, headers).await?;
                let ws = self.websocket(&ws_path(&resp)?).await?;
                return Ok((resp, ws));
            }
            other => other?,
        };
        let ws_path = ws_path(&answer)?;
        let ws = if sender.ready().await.is_ok() {
            self.upgrade(&mut sender, i, &ws_path).await?
        } else {
            // The server did not keep the connection open.
            self.websocket(&ws_path).await?
        };
        Ok((answer, ws))
    }

    /// Asks for a websocket at `path` on the open connection `sender` (to address `i`).
    async fn upgrade(
        &self,
        sender: &mut Sender,
        i: usize,
        path: &str,
    ) -> Result<WebSocket, ClientError> {
        use tokio_tungstenite::tungstenite::handshake::client::generate_key;
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
        let path = &self.path_for(path);
        let key = generate_key();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).map_err(|e| ClientError::Websocket(e.to_string()))?,
        );
        let req = self.request(i, Method::GET, path, headers, empty_body())?;
        // A deadline on the upgrade answer only: the websocket itself may stay quiet for long.
        let deadline = self.timeouts.response;
        let late = || {
            ClientError::Websocket(format!(
                "no answer to the upgrade within {} s",
                deadline.as_secs_f32()
            ))
        };
        let mut resp = tokio::time::timeout(deadline, sender.send_request(req))
            .await
            .map_err(|_| late())?
            .map_err(|e| ClientError::Websocket(e.to_string()))?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let body = tokio::time::timeout(deadline, self.read_body(resp))
                .await
                .map_err(|_| late())?
                .unwrap_or_default();
            return Err(match parse_envelope(status, &body) {
                Err(api) => api,
                Ok(_) => ClientError::Websocket(format!("server answered {status}")),
            });
        }
        let accept = resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .and_then(|v| v.to_str().ok());
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(ClientError::Websocket(
                "the server's upgrade answer carries a wrong Sec-WebSocket-Accept".into(),
            ));
        }
        let upgraded = tokio::time::timeout(deadline, hyper::upgrade::on(&mut resp))
            .await
            .map_err(|_| late())?
            .map_err(|e| ClientError::Websocket(e.to_string()))?;
        Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await)
    }
}

/// The headers and body of a JSON request (or one without a body): `Content-Type` when there
/// is a body, and an `Idempotency-Key` for a write that takes one (unless `headers` has one).
fn json_request<B: Serialize>(
    method: &Method,
    path: &str,
    body: Option<&B>,
    mut headers: HeaderMap,
) -> Result<(HeaderMap, Option<Bytes>), ClientError> {
    if !matches!(*method, Method::GET | Method::HEAD)
        && takes_idempotency_key(method, path)
        && !headers.contains_key(IDEMPOTENCY_KEY)
        && let Ok(v) = HeaderValue::from_str(&idempotency_key())
    {
        headers.insert(IDEMPOTENCY_KEY, v);
    }
    let bytes = match body {
        Some(b) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Some(Bytes::from(
                serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))?,
            ))
        }
        None => None,
    };
    Ok((headers, bytes))
}

/// The operation carried by an `async` answer.
pub fn operation_of(resp: &Response) -> Result<Operation, ClientError> {
    let mut op: Operation = decode_metadata(resp.metadata.clone())?;
    if op.id.is_empty() {
        op.id = resp
            .operation
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
    }
    if op.id.is_empty() {
        return Err(ClientError::Decode(
            "the async answer names no operation".into(),
        ));
    }
    Ok(op)
}

/// Decodes a metadata value into `T`.
pub fn decode_metadata<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Decodes an envelope from an HTTP status and body.
pub fn parse_envelope(status: StatusCode, body: &[u8]) -> Result<Response, ClientError> {
    match serde_json::from_slice::<Response>(body) {
        Ok(r) if r.kind == ResponseType::Error => Err(ClientError::Api {
            status: if r.error_code != 0 {
                r.error_code
            } else {
                status.as_u16()
            },
            message: if r.error.is_empty() {
                format!("server answered {status}")
            } else {
                r.error
            },
        }),
        Ok(_) if !status.is_success() => Err(ClientError::Api {
            status: status.as_u16(),
            message: format!("server answered {status}"),
        }),
        Ok(r) => Ok(r),
        Err(e) if status.is_success() => Err(ClientError::Decode(e.to_string())),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let line = text.lines().next().unwrap_or("").trim();
            Err(ClientError::Api {
                status: status.as_u16(),
                message: if line.is_empty() {
                    format!("server answered {status}")
                } else {
                    format!("server answered {status}: {line}")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://127.0.0.1:8443").unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(
            parse_url("https://example.org/").unwrap(),
            ("example.org".into(), 8443)
        );
        assert_eq!(parse_url("https://[::1]:9").unwrap(), ("::1".into(), 9));
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("x:1").is_err());
        assert!(parse_url("https://x/1.0").is_err());
    }

    #[test]
    fn project_in_paths() {
        let p = Some("team-a");
        assert_eq!(
            scoped_path("/1.0/instances", p),
            "/1.0/instances?project=team-a"
        );
        assert_eq!(
            scoped_path("/1.0/instances?recursion=2", p),
            "/1.0/instances?recursion=2&project=team-a"
        );
        assert_eq!(
            scoped_path("/1.0/operations/x/wait?timeout=30", p),
            "/1.0/operations/x/wait?timeout=30&project=team-a"
        );
        assert_eq!(
            scoped_path("/1.0/instances?all-projects=true", p),
            "/1.0/instances?all-projects=true"
        );
        assert_eq!(
            scoped_path("/1.0/profiles/web?project=b", p),
            "/1.0/profiles/web?project=b"
        );
        for fleet in [
            "/1.0",
            "/1.0/keys",
            "/1.0/keys/ci/rotate",
            "/1.0/projects?recursion=1",
            "/1.0/projects/a/state",
            "/1.0/cluster",
            "/1.0/cluster/members/node1",
        ] {
            assert_eq!(scoped_path(fleet, p), fleet);
        }
        assert_eq!(
            scoped_path("/1.0/keystone", p),
            "/1.0/keystone?project=team-a"
        );
        assert_eq!(scoped_path("/1.0/instances", None), "/1.0/instances");
        assert_eq!(
            Timeouts::default().for_path("/1.0/operations/x/wait?timeout=5&project=a"),
            Duration::from_secs(5) + LONG_POLL_MARGIN
        );
    }

    #[test]
    fn idempotency_keys_differ() {
        let a = idempotency_key();
        assert_eq!(a.len(), 32);
        assert_ne!(a, idempotency_key());
        assert!(if_match(None).is_empty());
        assert!(takes_idempotency_key(
            &Method::POST,
            "/1.0/instances?project=a"
        ));
        assert!(takes_idempotency_key(&Method::DELETE, "/1.0/keys/ci"));
        assert!(!takes_idempotency_key(&Method::POST, "/1.0/keys"));
        assert!(!takes_idempotency_key(&Method::POST, "/1.0/keys/ci/rotate"));
        assert!(!takes_idempotency_key(
            &Method::POST,
            "/1.0/instances/web/exec?project=a"
        ));
        assert_eq!(if_match(Some("\"abc\""))[header::IF_MATCH], "\"abc\"");
    }

    #[test]
    fn query_encoding() {
        assert_eq!(encode_query("/etc/a b&c"), "/etc/a%20b%26c");
        assert_eq!(encode_query("é"), "%C3%A9");
    }

    #[test]
    fn envelopes() {
        let ok = br#"{"type":"sync","status":"Success","status_code":200,"metadata":{"a":1}}"#;
        let r = parse_envelope(StatusCode::OK, ok).unwrap();
        assert_eq!(r.metadata["a"], 1);
        let err = br#"{"type":"error","error":"instance \"x\" not found","error_code":404}"#;
        match parse_envelope(StatusCode::NOT_FOUND, err) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 404);
                assert_eq!(message, "instance \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
        match parse_envelope(StatusCode::BAD_GATEWAY, b"upstream down\nmore") {
            Err(e) => assert_eq!(
                e.to_string(),
                "server answered 502 Bad Gateway: upstream down"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_envelope(StatusCode::OK, b"nope"),
            Err(ClientError::Decode(_))
        ));
    }

    #[test]
    fn async_operation_id_from_path() {
        let resp = Response {
            kind: ResponseType::Async,
            status: String::new(),
            status_code: 100,
            operation: "/1.0/operations/abc".into(),
            error_code: 0,
            error: String::new(),
            metadata: serde_json::json!({"id": "", "class": "task", "description": "",
                "created_at": "", "updated_at": "", "status": "Running", "status_code": 103,
                "resources": {}, "metadata": null, "may_cancel": false, "err": "", "location": ""}),
        };
        assert_eq!(operation_of(&resp).unwrap().id, "abc");
    }
}
