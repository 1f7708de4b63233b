//! HTTPS and websocket client for the Berth REST API: TLS verified against the remote's CA (or a
//! pinned certificate fingerprint), bearer-key authentication, the response envelope and
//! operations.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The websocket of an exec operation.
pub type WebSocket = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

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

/// One Berth endpoint with its credentials.
#[derive(Clone)]
pub struct Client {
    /// `https://host:port` as given (for messages).
    url: String,
    host: String,
    port: u16,
    key: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).finish()
    }
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
    provider: Arc<rustls::crypto::CryptoProvider>,
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
            Some(pin) if !pin.eq_ignore_ascii_case(&fp) => Err(rustls::Error::General(format!(
                "server certificate fingerprint {fp} does not match the pinned {pin}"
            ))),
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

fn server_name(host: &str, url: &str) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(host.to_string()).map_err(|_| ClientError::BadUrl(url.to_string()))
}

async fn tcp_connect(host: &str, port: u16, url: &str) -> Result<TcpStream, ClientError> {
    let fail = |reason: String| ClientError::Connect {
        url: url.to_string(),
        reason,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
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
    let verifier = Arc::new(PinVerifier {
        pin: None,
        seen: Mutex::new(None),
        provider: provider(),
    });
    let connector = TlsConnector::from(Arc::new(tls_config(verifier.clone())?));
    let tcp = tcp_connect(&host, port, url).await?;
    connector
        .connect(server_name(&host, url)?, tcp)
        .await
        .map_err(|e| ClientError::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let seen = verifier.seen.lock().ok().and_then(|s| s.clone());
    seen.ok_or_else(|| ClientError::Connect {
        url: url.to_string(),
        reason: "the server presented no certificate".into(),
    })
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
        let (host, port) = parse_url(&target.url)?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&target.ca_file, &target.fingerprint) {
            (Some(ca), _) => {
                let roots = read_ca(ca)?;
                Arc::new(
                    berth_proto::tls::ControllerVerifier::with_roots(roots, provider())
                        .map_err(|e| ClientError::TlsSetup(e.to_string()))?,
                )
            }
            (None, Some(fp)) => Arc::new(PinVerifier {
                pin: Some(fp.clone()),
                seen: Mutex::new(None),
                provider: provider(),
            }),
            (None, None) => {
                return Err(ClientError::TlsSetup(format!(
                    "remote \"{}\" has neither a CA file nor a certificate fingerprint to trust",
                    target.name
                )));
            }
        };
        Ok(Client {
            url: target.url.trim_end_matches('/').to_string(),
            server_name: server_name(&host, &target.url)?,
            host,
            port,
            key: target.key.clone(),
            tls: TlsConnector::from(Arc::new(tls_config(verifier)?)),
        })
    }

    /// The remote's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, ClientError> {
        let tcp = tcp_connect(&self.host, self.port, &self.url).await?;
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ClientError::Connect {
                url: self.url.clone(),
                reason: e.to_string(),
            })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request (a fresh connection each time) and returns the raw answer.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_err(path, e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.authority())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(
                header::USER_AGENT,
                format!("berth/{}", berth_proto::VERSION),
            );
        if let Some(h) = builder.headers_mut() {
            h.extend(headers);
        }
        let req = builder.body(body).map_err(|e| self.http_err(path, e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.http_err(path, e))
    }

    fn http_err(&self, path: &str, e: impl std::fmt::Display) -> ClientError {
        ClientError::Http {
            url: format!("{}{}", self.url, path),
            reason: e.to_string(),
        }
    }

    /// Reads a whole answer body.
    pub async fn read_body(&self, resp: http::Response<Incoming>) -> Result<Bytes, ClientError> {
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| self.http_err("", e))
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
    pub async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response, ClientError> {
        let mut headers = HeaderMap::new();
        let body = match body {
            Some(b) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                full_body(serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))?)
            }
            None => empty_body(),
        };
        self.envelope(method, path, headers, body).await
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
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = self.connect().await?;
        let url = format!("wss://{}{}", self.authority(), path);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Websocket(e.to_string()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.key))
            .map_err(|e| ClientError::Websocket(e.to_string()))?;
        req.headers_mut().insert(header::AUTHORIZATION, auth);
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let status = resp.status();
                    let body = resp.body().clone().unwrap_or_default();
                    match parse_envelope(status, &body) {
                        Err(api) => api,
                        Ok(_) => ClientError::Websocket(format!("server answered {status}")),
                    }
                }
                other => ClientError::Websocket(other.to_string()),
            })?;
        Ok(ws)
    }
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
