//! Certificates in federation (RFC 6120 §13.7.2, XEP-0178): the roots a peer's
//! certificate must chain to (the web PKI's, plus the operator's `s2s.ca_file`), the
//! TLS configurations of outbound streams (which present our certificate as a client)
//! and of the s2s listeners (which ask peers for theirs).
//!
//! A listener takes any client certificate during the handshake, so a peer with a
//! self-signed one still gets its stream and authenticates by dialback; the chain is
//! checked only when the peer asks for SASL EXTERNAL, for the domain it claims
//! ([`Trust::valid_for`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use jid::BareJid;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig};
use rustls::{RootCertStore, SignatureScheme};

use crate::tls::Identity;

/// ALPN protocol of server-to-server streams over TLS (XEP-0368 §3).
pub const ALPN_XMPP_SERVER: &[u8] = b"xmpp-server";

/// Which certificates identify a peer server.
pub struct Trust {
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
}

impl Trust {
    /// The web PKI roots (webpki-roots), and the certificates in `ca_file` if given.
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("s2s.ca_file {}: {e}", path.display()))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| anyhow::anyhow!("s2s.ca_file {}: {e}", path.display()))?;
                roots.add(cert)?;
                added += 1;
            }
            anyhow::ensure!(
                added > 0,
                "s2s.ca_file {} holds no PEM certificate",
                path.display()
            );
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        Ok(Self { provider, verifier })
    }

    /// Whether `chain` (end entity first) is valid now for `domain` (XEP-0178 §2: a
    /// DNS name of the certificate matches the domain, and it chains to a root).
    pub fn valid_for(&self, chain: &[CertificateDer<'static>], domain: &BareJid) -> bool {
        let (Some((end_entity, intermediates)), Ok(name)) = (
            chain.split_first(),
            ServerName::try_from(domain.as_str().to_owned()),
        ) else {
            return false;
        };
        self.verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .is_ok()
    }

    /// The TLS client side of outbound streams: presents `identity`, and checks the
    /// peer's certificate for its domain unless `check` is false (a domain configured
    /// as insecure); with `alpn`, offers `xmpp-server` (direct TLS).
    pub fn client_config(
        &self,
        identity: &Identity,
        check: bool,
        alpn: bool,
    ) -> Result<ClientConfig, rustls::Error> {
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            true => self.verifier.clone(),
            false => Arc::new(AnyCertificate(self.provider.clone())),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
        if alpn {
            config.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
        }
        Ok(config)
    }

    /// The TLS server side of s2s listeners, STARTTLS and direct: serves `identity`,
    /// asks for a client certificate without requiring one, and accepts ALPN
    /// `xmpp-server` only (a peer that offers no ALPN is served too).
    pub fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(AnyCertificate(self.provider.clone())))
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
        config.alpn_protocols = vec![ALPN_XMPP_SERVER.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Takes any certificate, as a client (of insecure domains) or as a server (from peers
/// that are checked later); the handshake's signatures are still checked, so the peer
/// holds the certificate's key.
struct AnyCertificate(Arc<CryptoProvider>);

impl fmt::Debug for AnyCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AnyCertificate")
    }
}

impl AnyCertificate {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for AnyCertificate {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &Path, domain: &str) -> Identity {
        let (cert, key) = (dir.join(format!("{domain}.pem")), dir.join("key.pem"));
        crate::tls::load_or_generate(&cert, &key, true, domain)
            .map(|(_, identity)| identity)
            .unwrap()
    }

    #[test]
    fn a_certificate_is_valid_for_its_domain_once_its_issuer_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let ours = identity(dir.path(), "a.example");
        let domain = BareJid::new("a.example").unwrap();
        // Self-signed: no web PKI root vouches for it.
        assert!(!Trust::new(None).unwrap().valid_for(&ours.chain, &domain));
        // The operator trusts it (it is its own issuer): valid for its domain and its
        // subdomains, not for another domain.
        let trust = Trust::new(Some(&dir.path().join("a.example.pem"))).unwrap();
        assert!(trust.valid_for(&ours.chain, &domain));
        assert!(trust.valid_for(&ours.chain, &BareJid::new("muc.a.example").unwrap()));
        assert!(!trust.valid_for(&ours.chain, &BareJid::new("b.example").unwrap()));
        assert!(!trust.valid_for(&[], &domain));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let err = Trust::new(Some(&empty)).err().unwrap().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = Trust::new(Some(&dir.path().join("missing.pem")))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
