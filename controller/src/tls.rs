//! The cluster CA and the certificates it signs.
//!
//! At bootstrap the first controller generates a self-signed cluster CA (ECDSA P-256). The CA
//! signs every controller's and agent's certificate: the REST API's server certificate, the
//! certificate a controller presents to agents, and each agent's certificate (from its CSR at
//! join time). Clients trust the CA, never individual certificates.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("tls configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// The cluster CA: its certificate and key, as PEM.
#[derive(Clone)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

fn current_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn validity(params: &mut CertificateParams, years: i32) {
    let year = current_year();
    // From the start of last year, so that clocks a little behind still accept it.
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

impl ClusterCa {
    /// Generates a new CA for the cluster `name`.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("berth cluster CA {name}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "berth");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 20);
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// sha256 of the CA certificate's DER, lowercase hex: what join tokens carry.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        cert_fingerprint(&self.cert_pem)
    }

    /// Issues a certificate with a new key, for `names` (DNS names or IP addresses), usable
    /// both as a TLS server and as a TLS client.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<CertifiedKeyPem, TlsError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(common_name, names)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a joining agent's CSR. Only the CSR's public key is used: the subject and names
    /// are the controller's choice, never the requester's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        common_name: &str,
        names: &[String],
    ) -> Result<String, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = leaf_params(common_name, names)?;
        Ok(csr.signed_by(&self.issuer()?)?.pem())
    }
}

fn leaf_params(common_name: &str, names: &[String]) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "berth");
    let mut sans = Vec::new();
    for n in names {
        match n.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(n.clone().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, 10);
    Ok(params)
}

/// sha256 of the first certificate in `pem`, lowercase hex.
pub fn cert_fingerprint(pem: &str) -> Result<String, TlsError> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

/// Parses every certificate in a PEM bundle.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate found".into()));
    }
    Ok(certs)
}

/// Parses a private key.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// The REST API's rustls server config: the server certificate followed by the CA (so that a
/// joining agent can check the CA against its token's fingerprint), no client certificates.
pub fn api_server_config(
    cert: &CertifiedKeyPem,
    ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut chain = parse_certs(&cert.cert_pem)?;
    chain.extend(parse_certs(ca_pem)?);
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, parse_key(&cert.key_pem)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a verified client certificate on the peer port is allowed to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRole {
    /// A controller: the certificate carries [`berth_proto::CONTROLLER_TLS_NAME`].
    Controller,
    /// The agent of this node: the certificate carries `<node>.agent.berth`.
    Agent(String),
}

/// The role a certificate (already verified against the cluster CA) names, from its DNS
/// subject alternative names; `None` when it names neither role (or cannot be parsed).
/// A certificate that names the controller role is a controller whatever else it names.
pub fn peer_role(der: &CertificateDer<'_>) -> Option<PeerRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut agent = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
            if *dns == berth_proto::CONTROLLER_TLS_NAME {
                return Some(PeerRole::Controller);
            }
            if let Some(node) = dns.strip_suffix(".agent.berth")
                && !node.is_empty()
                && agent.is_none()
            {
                agent = Some(node.to_string());
            }
        }
    }
    agent.map(PeerRole::Agent)
}

/// The role of the caller of a gRPC request on a mutual-TLS listener: the first certificate
/// the client presented (tonic has verified its chain against the cluster CA).
pub fn caller_role<T>(req: &tonic::Request<T>) -> Result<PeerRole, tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        tonic::Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    peer_role(leaf).ok_or_else(|| {
        tonic::Status::permission_denied(
            "the client certificate names neither a controller nor an agent",
        )
    })
}

/// Checks that the caller is a controller (when `tls` is on; plain listeners exist only in
/// tests).
pub fn require_controller<T>(req: &tonic::Request<T>, tls: bool) -> Result<(), tonic::Status> {
    if !tls {
        return Ok(());
    }
    match caller_role(req)? {
        PeerRole::Controller => Ok(()),
        PeerRole::Agent(_) => Err(tonic::Status::permission_denied(
            "only controllers may call this service",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_and_signs_csr() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = ClusterCa::generate("test").unwrap();
        assert_eq!(ca.fingerprint().unwrap().len(), 64);
        let leaf = ca
            .issue("berthd", &["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        assert!(api_server_config(&leaf, &ca.cert_pem).is_ok());

        let agent_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&agent_key)
            .unwrap()
            .pem()
            .unwrap();
        let signed = ca.sign_csr(&csr, "node1", &["node1".into()]).unwrap();
        assert!(parse_certs(&signed).is_ok());
        assert!(ca.sign_csr("not a csr", "n", &[]).is_err());
    }

    #[test]
    fn roles_from_certificates() {
        let ca = ClusterCa::generate("test").unwrap();
        let der = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            parse_certs(&ca.issue("x", &names).unwrap().cert_pem)
                .unwrap()
                .remove(0)
        };
        assert_eq!(
            peer_role(&der(&["controller.berth", "127.0.0.1"])),
            Some(PeerRole::Controller)
        );
        assert_eq!(
            peer_role(&der(&["n1.agent.berth", "10.0.0.1"])),
            Some(PeerRole::Agent("n1".into()))
        );
        assert_eq!(peer_role(&der(&["example.com"])), None);
        assert_eq!(peer_role(&der(&[".agent.berth"])), None);
        assert_eq!(peer_role(&CertificateDer::from(vec![1, 2, 3])), None);
    }
}
