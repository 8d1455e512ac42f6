//! A certificate authority of a test's own, as a private federation would run: it
//! issues node certificates for domains, and nodes that trust it (`s2s.ca_file`) accept
//! each other's certificates, so peers authenticate by SASL EXTERNAL (XEP-0178).

use std::path::PathBuf;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use tempfile::TempDir;

/// A CA whose certificate and issued pairs live in a temporary directory.
pub struct TestCa {
    dir: TempDir,
    cert: Certificate,
    key: KeyPair,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let dir = TempDir::new().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "Shoal test federation CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write the CA");
        Self { dir, cert, key }
    }

    /// The CA's certificate (PEM), for `s2s.ca_file`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `domain` and `*.domain`; returns the paths of the
    /// chain (the certificate, then the CA's) and of its key (PEM), for `tls.cert` and
    /// `tls.key`.
    pub fn issue(&self, domain: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![domain.to_owned(), format!("*.{domain}")])
            .expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, domain);
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("issue a certificate");
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{domain}.pem")),
            self.dir.path().join(format!("{domain}.key")),
        );
        let chain = cert.pem() + &self.cert.pem();
        std::fs::write(&cert_path, chain).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        (cert_path, key_path)
    }
}
