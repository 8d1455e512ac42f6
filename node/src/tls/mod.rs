//! TLS server configuration: loads the node's certificate chain and private key from PEM
//! files, or generates a self-signed pair on first start, and builds the one
//! `rustls::ServerConfig` shared by the STARTTLS and direct-TLS (XEP-0368) c2s listeners.
//! The same [`Identity`] is what federation presents, as a server and as a client.
//!
//! [`stream`] is the server side of a TLS connection over that configuration.
//!
//! This module owns certificate files on disk and the TLS record layer, nothing else. It must never overwrite
//! an operator's existing certificate or key when loading (generation only happens when
//! both files are absent), and it must never log key material.

use std::fs;
use std::io::{self, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod stream;

pub use stream::{ServerStream, accept};

/// ALPN protocol identifier for c2s over direct TLS (XEP-0368 §4).
pub const ALPN_XMPP_CLIENT: &[u8] = b"xmpp-client";

/// Everything that can go wrong while loading or generating the node's certificate.
///
/// All of these are configuration faults: each names the file involved so the operator
/// can fix it without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },

    #[error("{} is not valid PEM: {source}", path.display())]
    InvalidPem { path: PathBuf, source: io::Error },

    #[error("{} contains no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },

    #[error("{} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoPrivateKey { path: PathBuf },

    #[error(
        "{} does not exist and certificate generation is disabled",
        path.display()
    )]
    Missing { path: PathBuf },

    /// Exactly one of the two files exists. Generating would overwrite half of an
    /// operator-provided pair, so this is refused rather than "repaired".
    #[error(
        "{} exists but {} does not; provide both or remove both to generate a new pair",
        present.display(),
        missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },

    #[error("cannot generate a self-signed certificate for {domain:?}: {source}")]
    Generate {
        domain: String,
        source: rcgen::Error,
    },

    #[error(
        "certificate {} and key {} are not usable together: {source}",
        cert.display(),
        key.display()
    )]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The node's certificate chain and private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Never shows the key.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Loads the certificate chain at `cert` and the private key at `key` and builds the c2s
/// TLS server configuration; returns it with the pair.
///
/// When both files are missing and `generate_if_missing` is set, a self-signed pair for
/// `domain` is generated and written first (see [`generate_self_signed`]); this is the
/// zero-configuration default so a fresh node can start, and it is logged as a warning
/// because clients will not trust it.
pub fn load_or_generate(
    cert: &Path,
    key: &Path,
    generate_if_missing: bool,
    domain: &str,
) -> Result<(Arc<ServerConfig>, Identity), TlsError> {
    let incomplete = |present: &Path, missing: &Path| TlsError::Incomplete {
        present: present.into(),
        missing: missing.into(),
    };
    match (exists(cert)?, exists(key)?) {
        (true, true) => {}
        (false, false) if generate_if_missing => {
            generate_self_signed(domain, cert, key)?;
            tracing::warn!(
                cert = %cert.display(),
                key = %key.display(),
                domain,
                "generated a self-signed certificate; clients will not trust it, \
                 configure a real certificate for production"
            );
        }
        (true, false) if generate_if_missing => return Err(incomplete(cert, key)),
        (false, true) if generate_if_missing => return Err(incomplete(key, cert)),
        (false, _) => return Err(TlsError::Missing { path: cert.into() }),
        (true, false) => return Err(TlsError::Missing { path: key.into() }),
    }

    let identity = Identity {
        chain: read_certs(cert)?,
        key: read_key(key)?,
    };
    let config = server_config(identity.clone()).map_err(|source| TlsError::Config {
        cert: cert.into(),
        key: key.into(),
        source,
    })?;
    Ok((config, identity))
}

/// Generates a self-signed certificate for `domain` (SANs: `domain` and `*.domain`, the
/// latter so MUC and upload subdomains are covered) and writes it to `cert` and `key`,
/// creating parent directories. The key file is created with mode 0600.
///
/// Existing files are replaced; callers that must not clobber (startup) check first.
pub fn generate_self_signed(domain: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let mut names = vec![domain.to_owned()];
    // A wildcard only makes sense under a DNS name; `*.127.0.0.1` is not a valid SAN.
    if domain.parse::<IpAddr>().is_err() {
        names.push(format!("*.{domain}"));
    }
    let generate_error = |source| TlsError::Generate {
        domain: domain.to_owned(),
        source,
    };
    let mut params = rcgen::CertificateParams::new(names).map_err(generate_error)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, domain);
    let key_pair = rcgen::KeyPair::generate().map_err(generate_error)?;
    let certificate = params.self_signed(&key_pair).map_err(generate_error)?;

    // Key first: a crash between the two writes then leaves "key without cert", which
    // startup reports as `Incomplete` instead of silently pairing an old cert with it.
    write_file(key, key_pair.serialize_pem().as_bytes(), true)?;
    write_file(cert, certificate.pem().as_bytes(), false)?;
    Ok(())
}

fn server_config(identity: Identity) -> Result<Arc<ServerConfig>, rustls::Error> {
    // The provider is named explicitly so the result does not depend on which crypto
    // provider some other crate in the process happened to install as the default.
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(identity.chain, identity.key)?;
    // rustls only enforces ALPN when the client offers it, so STARTTLS clients (which
    // send none) share this config with the direct-TLS listener.
    config.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
    Ok(Arc::new(config))
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn open(path: &Path) -> Result<BufReader<fs::File>, TlsError> {
    fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::InvalidPem {
            path: path.into(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| TlsError::InvalidPem {
            path: path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey { path: path.into() })
}

/// Writes `contents` to `path` via a sibling temporary file and a rename, so a reader
/// never sees a half-written file and a secret is never briefly world-readable.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(write_error)?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);

    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;

    let result = (|| {
        let mut file = options.open(&tmp)?;
        // `mode` only applies when the file is created; a stale temporary file left by
        // an earlier crash keeps its old mode, so the permissions are forced here too.
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn generates_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("nested/tls/cert.pem");
        let key = dir.path().join("nested/tls/key.pem");

        let (config, _) = load_or_generate(&cert, &key, true, "example.org").unwrap();
        assert_eq!(config.alpn_protocols, vec![b"xmpp-client".to_vec()]);
        assert!(cert.exists() && key.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A second start loads the same files instead of regenerating them.
        let before = fs::read(&cert).unwrap();
        load_or_generate(&cert, &key, true, "example.org").unwrap();
        assert_eq!(fs::read(&cert).unwrap(), before);
        load_or_generate(&cert, &key, false, "example.org").unwrap();
    }

    #[test]
    fn missing_files_without_generation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = load_or_generate(&cert, &key, false, "example.org").unwrap_err();
        assert!(matches!(err, TlsError::Missing { ref path } if path == &cert));
        assert!(!cert.exists() && !key.exists());
    }

    #[test]
    fn half_a_pair_is_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        fs::write(&cert, "operator's certificate").unwrap();
        let err = load_or_generate(&cert, &key, true, "example.org").unwrap_err();
        assert!(matches!(err, TlsError::Incomplete { .. }), "{err}");
        assert_eq!(fs::read_to_string(&cert).unwrap(), "operator's certificate");
    }

    #[test]
    fn garbage_certificate_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        generate_self_signed("example.org", &cert, &key).unwrap();
        fs::write(&cert, "this is not a certificate\n").unwrap();

        let err = load_or_generate(&cert, &key, true, "example.org").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&cert.display().to_string()), "{message}");
        assert!(message.contains("no PEM certificate"), "{message}");

        // A PEM block with a broken body is reported as invalid PEM, again by file name.
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = read_key(&key).unwrap_err();
        assert!(matches!(err, TlsError::InvalidPem { .. }), "{err:?}");
        assert!(err.to_string().contains(&key.display().to_string()));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        let (cert_b, key_b) = (dir.path().join("b.crt"), dir.path().join("b.key"));
        generate_self_signed("a.example", &cert_a, &key_a).unwrap();
        generate_self_signed("b.example", &cert_b, &key_b).unwrap();
        let err = load_or_generate(&cert_a, &key_b, false, "a.example").unwrap_err();
        assert!(matches!(err, TlsError::Config { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn client_completes_handshake_over_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let (server_config, connector) = test_support::pair(dir.path(), "example.org");
        let (addr, server) =
            test_support::serve_once(server_config.clone(), |mut tls| async move {
                assert_eq!(tls.alpn_protocol(), Some(ALPN_XMPP_CLIENT));
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(&buf).await.unwrap();
                tls.shutdown().await.unwrap();
            })
            .await;

        // The client trusts exactly the generated certificate, and verifies the
        // wildcard SAN as well as the bare domain. (The domain has two labels because
        // webpki refuses to match a wildcard directly under a single-label name such as
        // `*.localhost`; the default `localhost` certificate is still valid for
        // `localhost` itself.)
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("example.org").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_XMPP_CLIENT));
        tls.write_all(b"ping").await.unwrap();
        let mut echoed = Vec::new();
        // Ends without error only on the server's close_notify.
        tls.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"ping");
        server.await.unwrap();

        // Loading the same pair again serves the wildcard name too.
        let (reloaded, _) = load_or_generate(
            &dir.path().join("cert.pem"),
            &dir.path().join("key.pem"),
            false,
            "example.org",
        )
        .unwrap();
        let (addr, server) = test_support::serve_once(reloaded, |_| async {}).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("conference.example.org").unwrap();
        connector.connect(name, tcp).await.unwrap();
        server.await.unwrap();
    }
}

/// A server configuration with a generated certificate and a client that trusts it.
#[cfg(test)]
pub(crate) mod test_support {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;

    use rustls::ServerConfig;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    use super::{ALPN_XMPP_CLIENT, ServerStream, accept, load_or_generate, read_certs};

    /// Generates `cert.pem` and `key.pem` for `domain` in `dir`.
    pub fn pair(dir: &Path, domain: &str) -> (Arc<ServerConfig>, TlsConnector) {
        let cert = dir.join("cert.pem");
        let (server, _) = load_or_generate(&cert, &dir.join("key.pem"), true, domain).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&cert).unwrap() {
            roots.add(c).unwrap();
        }
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_XMPP_CLIENT.to_vec()];
        (server, TlsConnector::from(Arc::new(client)))
    }

    /// Accepts one TLS connection on a loopback port and runs `serve` on it.
    pub async fn serve_once<F, Fut>(
        config: Arc<ServerConfig>,
        serve: F,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(ServerStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve(accept(config, tcp).await.unwrap()).await;
        });
        (addr, task)
    }
}
