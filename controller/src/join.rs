//! A new controller joining a cluster (`berthd --join ADDRESS --token TOKEN`): it makes a key
//! and a CSR, posts them with the token's secret to `/1.0/cluster/join-controller` on a running
//! controller, trusting that controller only if its chain holds the CA whose fingerprint the
//! token carries, and keeps the certificate, the CA and its Raft id ([`PeerIdentity`]).
//! Also the small HTTPS client controllers use to talk to each other's REST API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::api::{self, ControllerJoinPost, ControllerJoinResponse, JoinToken};
use berth_proto::https;
use berth_proto::tls::ControllerVerifier;

use crate::daemon::write_private;

/// How long one join attempt may take, all of it (connect, handshake, answer).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors joining a cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the join token is not valid: {0}")]
    BadToken(String),
    #[error("cannot reach the controller at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("the controller refused the join: {0}")]
    Refused(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot store the controller's identity in {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Decodes and checks a join token (base64 of [`JoinToken`]).
pub fn decode_token(token: &str) -> Result<JoinToken, JoinError> {
    JoinToken::decode(token).map_err(JoinError::BadToken)
}

/// This controller's peer identity: its Raft id, its certificate (which names
/// `controller.berth`) and key, and the cluster CA. Kept under the state directory so that a
/// restart needs no token.
#[derive(Clone)]
pub struct PeerIdentity {
    pub raft_id: u64,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("raft_id", &self.raft_id)
            .finish_non_exhaustive()
    }
}

impl PeerIdentity {
    const ID: &'static str = "raft-id";
    const CERT: &'static str = "tls/peer.crt";
    const KEY: &'static str = "tls/peer.key";
    const CA: &'static str = "tls/ca.crt";

    /// Loads the identity saved under `state_dir`, if there is a complete one.
    pub fn load(state_dir: &Path) -> Option<PeerIdentity> {
        let read = |p: &str| std::fs::read_to_string(state_dir.join(p)).ok();
        Some(PeerIdentity {
            raft_id: read(Self::ID)?.trim().parse().ok()?,
            cert_pem: read(Self::CERT)?,
            key_pem: read(Self::KEY)?,
            ca_pem: read(Self::CA)?,
        })
    }

    /// Saves the identity under `state_dir` (the Raft id last, so that a partial save is
    /// never taken for a complete one).
    pub fn save(&self, state_dir: &Path) -> Result<(), JoinError> {
        let tls = state_dir.join("tls");
        std::fs::create_dir_all(&tls).map_err(|source| JoinError::Io {
            path: tls.clone(),
            source,
        })?;
        let write = |p: &str, contents: &str, mode: u32| {
            write_private(&state_dir.join(p), contents, mode).map_err(|e| JoinError::Io {
                path: state_dir.join(p),
                source: std::io::Error::other(e.to_string()),
            })
        };
        write(Self::KEY, &self.key_pem, 0o600)?;
        write(Self::CERT, &self.cert_pem, 0o644)?;
        write(Self::CA, &self.ca_pem, 0o644)?;
        write(Self::ID, &format!("{}\n", self.raft_id), 0o644)
    }
}

/// What a joining controller says about itself.
pub struct JoinFacts {
    pub name: String,
    pub peer_address: String,
    pub api_address: String,
}

/// Joins the cluster at `address` (falling back to the token's addresses) with `token`.
pub async fn join(
    address: Option<&str>,
    token: &str,
    facts: &JoinFacts,
) -> Result<PeerIdentity, JoinError> {
    let token = decode_token(token)?;
    let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Tls(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(vec![facts.name.clone()])
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::Tls(e.to_string()))?;
    let body = ControllerJoinPost {
        secret: token.secret.clone(),
        name: facts.name.clone(),
        csr,
        peer_address: facts.peer_address.clone(),
        api_address: facts.api_address.clone(),
    };
    let json = serde_json::to_vec(&body).map_err(|e| JoinError::Tls(e.to_string()))?;
    let mut addresses: Vec<String> = address.map(str::to_string).into_iter().collect();
    addresses.extend(token.addresses.iter().cloned());
    addresses.dedup();
    if addresses.is_empty() {
        return Err(JoinError::BadToken("it names no controller address".into()));
    }
    let verifier = verifier_for_fingerprint(&token.fingerprint);
    let mut last = None;
    for addr in &addresses {
        let attempt = https_json(
            addr,
            verifier.clone(),
            http::Method::POST,
            "/1.0/cluster/join-controller",
            None,
            Some(json.clone()),
        );
        // The request carries its own deadline (JOIN_TIMEOUT, in https_json_with).
        match attempt.await {
            Ok(value) => {
                let resp: ControllerJoinResponse = serde_json::from_value(value).map_err(|e| {
                    JoinError::Refused(format!("the answer is not a controller join answer: {e}"))
                })?;
                let fp = crate::tls::cert_fingerprint(&resp.ca)
                    .map_err(|e| JoinError::Tls(e.to_string()))?;
                if fp != token.fingerprint.to_ascii_lowercase() {
                    return Err(JoinError::Tls(
                        "the CA the controller returned does not match the token".into(),
                    ));
                }
                return Ok(PeerIdentity {
                    raft_id: resp.id,
                    cert_pem: resp.certificate,
                    key_pem: key.serialize_pem(),
                    ca_pem: resp.ca,
                });
            }
            Err(HttpsError::Refused { message, .. }) => return Err(JoinError::Refused(message)),
            Err(HttpsError::Tls(e)) => last = Some(JoinError::Tls(e)),
            Err(HttpsError::Unreachable { addr, detail }) => {
                last = Some(JoinError::Unreachable { addr, detail })
            }
        }
    }
    Err(last.unwrap_or_else(|| JoinError::BadToken("it names no controller address".into())))
}

/// Errors of [`https_json`].
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("cannot reach {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("tls: {0}")]
    Tls(String),
    /// The API answered with an error envelope.
    #[error("{message}")]
    Refused { status: u16, message: String },
}

/// A verifier that trusts the CA with this sha256 fingerprint (joining).
pub fn verifier_for_fingerprint(fingerprint: &str) -> Arc<ControllerVerifier> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(ControllerVerifier::with_ca_fingerprint(
        fingerprint,
        provider,
    ))
}

/// A verifier that trusts the cluster CA in `ca_pem` (controllers calling each other).
pub fn verifier_for_ca(ca_pem: &str) -> Result<Arc<ControllerVerifier>, HttpsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::parse_certs(ca_pem).map_err(|e| HttpsError::Tls(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| HttpsError::Tls(e.to_string()))?;
    }
    ControllerVerifier::with_roots(roots, provider)
        .map(Arc::new)
        .map_err(|e| HttpsError::Tls(e.to_string()))
}

/// One HTTPS request to a controller's REST API at `addr` (host:port), verified with
/// `verifier`; answers the `metadata` of a sync answer, or the error envelope's message.
pub async fn https_json(
    addr: &str,
    verifier: Arc<ControllerVerifier>,
    method: http::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<serde_json::Value, HttpsError> {
    https_json_with(addr, verifier, method, path, bearer, body, &[]).await
}

/// [`https_json`] with extra request headers.
pub async fn https_json_with(
    addr: &str,
    verifier: Arc<ControllerVerifier>,
    method: http::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, HttpsError> {
    let request = https::Request {
        method,
        path,
        bearer,
        body,
        headers,
        timeout: JOIN_TIMEOUT,
    };
    let answer = https::send(addr, verifier, request)
        .await
        .map_err(|e| match e {
            https::HttpsError::Unreachable { addr, detail } => {
                HttpsError::Unreachable { addr, detail }
            }
            https::HttpsError::Tls(e) => HttpsError::Tls(e),
        })?;
    if answer.envelope.kind != api::ResponseType::Sync {
        return Err(HttpsError::Refused {
            status: answer.status.as_u16(),
            message: answer.envelope.error,
        });
    }
    Ok(answer.envelope.metadata)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    #[test]
    fn tokens_are_checked() {
        let enc =
            |v: serde_json::Value| base64::engine::general_purpose::STANDARD.encode(v.to_string());
        assert!(matches!(
            decode_token("not base64!"),
            Err(JoinError::BadToken(_))
        ));
        assert!(decode_token(&enc(serde_json::json!({"x": 1}))).is_err());
        assert!(
            decode_token(&enc(
                serde_json::json!({"addresses": ["a:1"], "fingerprint": "xyz", "secret": "s"})
            ))
            .is_err()
        );
        assert!(
            decode_token(&enc(
                serde_json::json!({"addresses": ["a:1"], "fingerprint": "a".repeat(64), "secret": ""})
            ))
            .is_err()
        );
        let t = decode_token(&enc(
            serde_json::json!({"addresses": ["a:1"], "fingerprint": "a".repeat(64), "secret": "s"}),
        ))
        .unwrap();
        assert_eq!(t.addresses, ["a:1"]);
    }

    #[test]
    fn identity_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PeerIdentity::load(dir.path()).is_none());
        let id = PeerIdentity {
            raft_id: 3,
            cert_pem: "c".into(),
            key_pem: "k".into(),
            ca_pem: "ca".into(),
        };
        id.save(dir.path()).unwrap();
        let back = PeerIdentity::load(dir.path()).unwrap();
        assert_eq!(back.raft_id, 3);
        assert_eq!(back.ca_pem, "ca");
    }
}
