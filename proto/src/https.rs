//! One JSON request to a controller's REST API over HTTPS, trusting the server only when a
//! [`ControllerVerifier`] accepts it: what a joining agent or controller, and a follower
//! asking its leader, need before they hold a client configuration of their own.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::api;
use crate::tls::ControllerVerifier;

/// Why no answer came back.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// No connection, or it broke, or the answer is not Berth's API.
    #[error("cannot reach {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    /// The TLS handshake failed (wrong CA, not a controller certificate, ...).
    #[error("tls: {0}")]
    Tls(String),
}

/// The answer: its HTTP status and its envelope, whatever its type.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub envelope: api::Response,
}

/// What to send.
pub struct Request<'a> {
    pub method: http::Method,
    pub path: &'a str,
    /// An API key, sent as `Authorization: Bearer`.
    pub bearer: Option<&'a str>,
    /// A JSON body.
    pub body: Option<Vec<u8>>,
    /// Extra headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// How long the whole exchange may take: connection, handshake, request and answer.
    pub timeout: Duration,
}

/// Largest answer read (controllers answer joins and cluster views with a few KiB).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Sends `req` to the API at `addr` (`host:port`) and reads the whole answer, within
/// `req.timeout`.
pub async fn send(
    addr: &str,
    verifier: Arc<ControllerVerifier>,
    req: Request<'_>,
) -> Result<Answer, HttpsError> {
    let timeout = req.timeout;
    tokio::time::timeout(timeout, exchange(addr, verifier, req))
        .await
        .unwrap_or_else(|_| {
            Err(HttpsError::Unreachable {
                addr: addr.to_string(),
                detail: format!("no answer within {timeout:?}"),
            })
        })
}

async fn exchange(
    addr: &str,
    verifier: Arc<ControllerVerifier>,
    req: Request<'_>,
) -> Result<Answer, HttpsError> {
    let unreachable = |detail: String| HttpsError::Unreachable {
        addr: addr.to_string(),
        detail,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|_| unreachable("the address is not a host:port".into()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| HttpsError::Tls(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let mut builder = http::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header(http::header::HOST, addr)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(b) = req.bearer {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
    }
    for (name, value) in req.headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(bytes::Bytes::from(req.body.unwrap_or_default())))
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let envelope: api::Response = serde_json::from_slice(&bytes)
        .map_err(|_| unreachable(format!("the answer (HTTP {status}) is not Berth's API")))?;
    Ok(Answer { status, envelope })
}
