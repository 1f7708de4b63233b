//! Joining a cluster and the agent's TLS identity.
//!
//! A join token (base64 JSON: controller addresses, the cluster CA's sha256 fingerprint and a
//! one-time secret) is all an agent needs. The agent makes its own key, sends a CSR with the
//! secret to `POST /1.0/cluster/join` over TLS, accepting the controller only if its chain holds
//! a CA with the token's fingerprint, and stores the certificate it gets back. From then on it
//! serves gRPC with mutual TLS: only holders of certificates from the same CA may call it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_proto::api::{self, ClusterJoinPost, ClusterJoinResponse, JoinToken};
use berth_proto::https;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the join token is not valid: {0}")]
    BadToken(String),
    #[error("cannot reach the controller at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("the controller refused the join: {0}")]
    Refused(String),
    /// An answer that is not the controller's last word (a 503 during a leader election, a
    /// 500): the token's other addresses may still take the join.
    #[error("the controller at {addr} cannot take the join now: {detail}")]
    Unavailable { addr: String, detail: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot store the agent's certificate in {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's certificate, key and the cluster CA, as PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Identity {
    fn dir(state_dir: &Path) -> PathBuf {
        state_dir.join("tls")
    }

    /// Loads the identity saved by an earlier join, if any.
    pub fn load(state_dir: &Path) -> Option<Identity> {
        let d = Self::dir(state_dir);
        Some(Identity {
            cert_pem: std::fs::read_to_string(d.join("agent.crt")).ok()?,
            key_pem: std::fs::read_to_string(d.join("agent.key")).ok()?,
            ca_pem: std::fs::read_to_string(d.join("ca.crt")).ok()?,
        })
    }

    fn save(&self, state_dir: &Path) -> Result<(), JoinError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let d = Self::dir(state_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JoinError::Io { path, source }
        };
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        for (name, contents, mode) in [
            ("agent.key", &self.key_pem, 0o600),
            ("agent.crt", &self.cert_pem, 0o644),
            ("ca.crt", &self.ca_pem, 0o644),
        ] {
            let path = d.join(name);
            let tmp = d.join(format!("{name}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// The tonic server TLS config: this identity, and client certificates required from the CA.
    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }
}

/// Decodes a join token.
pub fn decode_token(token: &str) -> Result<JoinToken, JoinError> {
    JoinToken::decode(token).map_err(JoinError::BadToken)
}

/// How long one join attempt may take, all of it (connect, handshake, answer).
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Rounds over the token's addresses while some controller answers that it cannot take the
/// join now (a leader election takes a second or two), and the pause between them.
const JOIN_ROUNDS: usize = 3;
const JOIN_ROUND_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the agent tells the controller about itself when joining.
pub struct JoinFacts {
    pub name: String,
    pub address: String,
    pub bridge_ipv4_cidr: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// Joins the cluster with `token` and saves the identity, and the controllers' peer addresses
/// the answer names, under `state_dir`.
pub async fn join(state_dir: &Path, token: &str, facts: JoinFacts) -> Result<Identity, JoinError> {
    let token = decode_token(token)?;
    let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Tls(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(vec![facts.name.clone()])
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::Tls(e.to_string()))?;
    let body = ClusterJoinPost {
        secret: token.secret.clone(),
        name: facts.name.clone(),
        address: facts.address.clone(),
        csr,
        bridge_ipv4_cidr: facts.bridge_ipv4_cidr.clone(),
        cpus: facts.cpus,
        memory_bytes: facts.memory_bytes,
    };
    let mut last = None;
    for round in 0..JOIN_ROUNDS {
        if round > 0 {
            if !matches!(last, Some(JoinError::Unavailable { .. })) {
                break;
            }
            tokio::time::sleep(JOIN_ROUND_PAUSE).await;
        }
        for addr in &token.addresses {
            match join_at(state_dir, addr, &token, &key, &body).await {
                Ok(id) => return Ok(id),
                Err(e @ JoinError::Refused(_)) => return Err(e),
                Err(e) => {
                    warn!(addr = %addr, "join attempt failed: {e}");
                    // An "unavailable" answer is remembered over a later unreachable address,
                    // so that another round is tried.
                    if !matches!(
                        (&last, &e),
                        (
                            Some(JoinError::Unavailable { .. }),
                            JoinError::Unreachable { .. }
                        )
                    ) {
                        last = Some(e);
                    }
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| JoinError::BadToken("it names no controller address".into())))
}

/// One join attempt at `addr`; saves the identity when it succeeds.
async fn join_at(
    state_dir: &Path,
    addr: &str,
    token: &JoinToken,
    key: &rcgen::KeyPair,
    body: &ClusterJoinPost,
) -> Result<Identity, JoinError> {
    let resp = post_join(addr, &token.fingerprint, body).await?;
    let controllers = resp.controllers.clone();
    let id = Identity {
        cert_pem: resp.certificate,
        key_pem: key.serialize_pem(),
        ca_pem: resp.ca,
    };
    if fingerprint_of_pem(&id.ca_pem).as_deref() != Some(token.fingerprint.as_str()) {
        return Err(JoinError::Tls(
            "the CA the controller returned does not match the token".into(),
        ));
    }
    id.save(state_dir)?;
    if !controllers.is_empty() {
        let known = crate::heartbeat::KnownControllers {
            controllers,
            leader: String::new(),
        };
        known.save(state_dir).map_err(|e| match e {
            crate::heartbeat::HeartbeatError::Io { path, source } => JoinError::Io { path, source },
            other => JoinError::Tls(other.to_string()),
        })?;
    }
    Ok(id)
}

fn fingerprint_of_pem(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(hex::encode(Sha256::digest(der.as_ref())))
}

async fn post_join(
    addr: &str,
    fingerprint: &str,
    body: &ClusterJoinPost,
) -> Result<ClusterJoinResponse, JoinError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(berth_proto::tls::ControllerVerifier::with_ca_fingerprint(
        fingerprint,
        provider,
    ));
    let json = serde_json::to_vec(body).map_err(|e| JoinError::Tls(e.to_string()))?;
    let request = https::Request {
        method: http::Method::POST,
        path: "/1.0/cluster/join",
        bearer: None,
        body: Some(json),
        headers: &[],
        timeout: JOIN_TIMEOUT,
    };
    let answer = https::send(addr, verifier, request)
        .await
        .map_err(|e| match e {
            https::HttpsError::Unreachable { addr, detail } => {
                JoinError::Unreachable { addr, detail }
            }
            https::HttpsError::Tls(e) => JoinError::Tls(e),
        })?;
    if answer.envelope.kind != api::ResponseType::Sync {
        return Err(join_failure(addr, answer.status, &answer.envelope));
    }
    serde_json::from_value(answer.envelope.metadata)
        .map_err(|e| JoinError::Refused(format!("the answer lacks the certificate: {e}")))
}

/// What a join answer that is not `sync` means: a 4xx is the controller's last word (a bad
/// or used token, a name taken); anything else (a 503 during an election, a 500) lets the
/// token's other addresses be tried.
fn join_failure(addr: &str, status: http::StatusCode, envelope: &api::Response) -> JoinError {
    let code = if envelope.error_code != 0 {
        envelope.error_code
    } else {
        status.as_u16()
    };
    let message = if envelope.error.is_empty() {
        format!("it answered HTTP {code}")
    } else {
        envelope.error.clone()
    };
    if (400..500).contains(&code) {
        JoinError::Refused(message)
    } else {
        JoinError::Unavailable {
            addr: addr.to_string(),
            detail: format!("HTTP {code}: {message}"),
        }
    }
}

/// Refuses gRPC calls whose client certificate is not a controller's. The TLS layer already
/// checked that the certificate chains to the cluster CA; this checks the role, so that a
/// certificate the CA gave another agent cannot drive this one.
#[allow(clippy::result_large_err)]
pub fn require_controller(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    if !is_controller_cert(leaf) {
        return Err(tonic::Status::permission_denied(
            "only controllers may call a node agent",
        ));
    }
    Ok(req)
}

/// Whether a certificate (already verified against the cluster CA) names the controller role.
pub fn is_controller_cert(der: &CertificateDer<'_>) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(berth_proto::CONTROLLER_TLS_NAME) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The DNS name an agent's certificate carries (the controller issues it at join).
pub fn agent_tls_name(node: &str) -> String {
    format!("{node}.agent.berth")
}

/// Whether a certificate (already verified against the cluster CA) is the agent certificate
/// of `node`.
pub fn is_agent_cert_for(der: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(agent_tls_name(node)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Refuses calls to the agent-to-agent `Transfer` service without a client certificate or
/// with a controller's: only peer agents call it (which one is checked against the transfer's
/// ticket).
#[allow(clippy::result_large_err)]
pub fn require_peer_agent(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let leaf = req
        .peer_certs()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    if is_controller_cert(&leaf) {
        return Err(tonic::Status::permission_denied(
            "only peer agents may send transfers",
        ));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    #[test]
    fn controller_role_from_the_certificate() {
        let make = |names: Vec<String>| {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(names)
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .der()
                .clone()
        };
        let ctl = make(vec![
            berth_proto::CONTROLLER_TLS_NAME.into(),
            "127.0.0.1".into(),
        ]);
        let agent = make(vec!["node1.agent.berth".into(), "127.0.0.1".into()]);
        assert!(is_controller_cert(&ctl));
        assert!(!is_controller_cert(&agent));
        assert!(!is_controller_cert(&CertificateDer::from(vec![1, 2, 3])));
        assert!(is_agent_cert_for(&agent, "node1"));
        assert!(!is_agent_cert_for(&agent, "node2"));
        assert!(!is_agent_cert_for(&ctl, "node1"));
    }

    #[test]
    fn only_a_4xx_join_answer_is_final() {
        let env = |code: u16, msg: &str| api::Response {
            kind: api::ResponseType::Error,
            status: String::new(),
            status_code: 0,
            operation: String::new(),
            error_code: code,
            error: msg.into(),
            metadata: serde_json::Value::Null,
        };
        let e = join_failure("a:1", http::StatusCode::FORBIDDEN, &env(403, "bad token"));
        assert!(
            matches!(&e, JoinError::Refused(m) if m == "bad token"),
            "{e}"
        );
        let e = join_failure(
            "a:1",
            http::StatusCode::SERVICE_UNAVAILABLE,
            &env(503, "no leader"),
        );
        assert!(matches!(e, JoinError::Unavailable { .. }), "{e}");
        let e = join_failure("a:1", http::StatusCode::INTERNAL_SERVER_ERROR, &env(0, ""));
        assert!(e.to_string().contains("HTTP 500"), "{e}");
        let e = join_failure("a:1", http::StatusCode::CONFLICT, &env(0, ""));
        assert!(matches!(e, JoinError::Refused(_)), "{e}");
    }

    #[test]
    fn tokens() {
        assert!(decode_token("not base64!").is_err());
        let enc =
            |v: serde_json::Value| base64::engine::general_purpose::STANDARD.encode(v.to_string());
        assert!(
            decode_token(&enc(
                serde_json::json!({"addresses": [], "fingerprint": "a".repeat(64), "secret": "s"})
            ))
            .is_err()
        );
        assert!(decode_token(&enc(serde_json::json!({"addresses": ["127.0.0.1:8443"], "fingerprint": "xyz", "secret": "s"}))).is_err());
        let ok = decode_token(&enc(serde_json::json!({"addresses": ["127.0.0.1:8443"], "fingerprint": "a".repeat(64), "secret": "s"}))).unwrap();
        assert_eq!(ok.addresses, vec!["127.0.0.1:8443".to_string()]);
    }
}
