//! How a client decides it is talking to a controller: the certificate must chain to the
//! cluster CA and carry [`CONTROLLER_TLS_NAME`](crate::CONTROLLER_TLS_NAME), whatever address
//! was dialled, so that a certificate the CA gave a node agent never passes for a controller.
//! The CLI trusts a CA it was given; a joining agent trusts the CA whose fingerprint its join
//! token carries.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Which CA a [`ControllerVerifier`] trusts.
#[derive(Debug)]
enum Trust {
    /// A CA the client holds.
    Roots(Arc<WebPkiServerVerifier>),
    /// The CA whose certificate has this sha256 (lowercase hex); the server presents it in
    /// its chain (controllers send the CA after their own certificate).
    Fingerprint(String),
}

/// Verifies that the server is a controller of the expected cluster.
#[derive(Debug)]
pub struct ControllerVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl ControllerVerifier {
    /// Trusts the CA certificates in `roots`.
    pub fn with_roots(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ControllerVerifier {
            trust: Trust::Roots(inner),
            provider,
        })
    }

    /// Trusts the CA whose DER certificate hashes (sha256) to `fingerprint`.
    pub fn with_ca_fingerprint(fingerprint: &str, provider: Arc<CryptoProvider>) -> Self {
        ControllerVerifier {
            trust: Trust::Fingerprint(fingerprint.to_ascii_lowercase()),
            provider,
        }
    }

    fn chain_verifier(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        match &self.trust {
            Trust::Roots(v) => Ok(v.clone()),
            Trust::Fingerprint(fp) => {
                let ca = intermediates
                    .iter()
                    .find(|c| hex::encode(Sha256::digest(c.as_ref())) == *fp)
                    .ok_or_else(|| {
                        rustls::Error::General(
                            "the server's certificate is not from the expected cluster CA".into(),
                        )
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            }
        }
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let controller = ServerName::try_from(crate::CONTROLLER_TLS_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        match self.chain_verifier(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            &controller,
            ocsp,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Err(rustls::Error::General(
                "the server's certificate is from the cluster CA but is not a controller's".into(),
            )),
            other => other,
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
