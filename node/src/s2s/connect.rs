//! Opening a stream to a remote domain's server: resolve (RFC 6120 §3.2, XEP-0368),
//! try the endpoints in order, each within a connect timeout, open TLS at once or by
//! STARTTLS, and drive [`S2sOut`] until the peer accepts us (or, for a verify stream,
//! answers about a dialback key).
//!
//! TLS certificates are checked for the remote domain against the roots of [`Trust`],
//! except for the domains configured as insecure (test setups with self-signed
//! certificates), whose certificate is not checked at all: dialback then authenticates
//! the peer, TLS only encrypts. Our own certificate goes to every peer that asks for
//! it, for SASL EXTERNAL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use jid::BareJid;
use rustls::pki_types::ServerName;
use shoal_xmpp::error::{StanzaErrorCondition, StreamError};
use shoal_xmpp::s2s::{OutAction, S2sOut, S2sOutConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::resolve::{ResolveError, Resolver};
use super::trust::Trust;
use crate::tls::Identity;

/// A connection to a peer server, before or after TLS.
pub type ClientTransport = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// An accepted outbound stream, ready for stanzas.
pub struct OpenStream {
    pub transport: ClientTransport,
    pub stream: S2sOut,
    /// Bytes read past the negotiation.
    pub buf: BytesMut,
}

/// What opening a stream achieved.
pub enum Opened {
    /// A [`shoal_xmpp::s2s::Purpose::Send`] stream the peer accepted.
    Ready(Box<OpenStream>),
    /// The answer of a verify stream.
    Verified(bool),
}

/// Why no stream could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Every endpoint failed to connect or to negotiate; the last failure says why.
    #[error("no server of {domain} could be reached: {last}")]
    Unreachable { domain: BareJid, last: String },
    /// A server of the domain refused us (stream error).
    #[error("{domain} refused the stream: {error}")]
    Refused { domain: BareJid, error: String },
}

impl ConnectError {
    /// The stanza error for what was queued (RFC 6120 §8.3.3.15, §8.3.3.16): the
    /// domain has no server, or it could not be reached in time.
    pub fn condition(&self) -> StanzaErrorCondition {
        match self {
            ConnectError::Resolve(ResolveError::Failure { .. })
            | ConnectError::Unreachable { .. } => StanzaErrorCondition::RemoteServerTimeout,
            _ => StanzaErrorCondition::RemoteServerNotFound,
        }
    }
}

/// How outbound streams are opened.
pub struct Connector {
    resolver: Resolver,
    /// TLS that checks the peer's certificate for its domain: after STARTTLS, and
    /// direct (ALPN `xmpp-server`, XEP-0368 §3).
    verified: [TlsConnector; 2],
    /// TLS that takes any certificate, for the insecure domains.
    unchecked: [TlsConnector; 2],
    insecure: HashSet<BareJid>,
    connect_timeout: Duration,
    negotiation_timeout: Duration,
}

impl Connector {
    pub fn new(
        resolver: Resolver,
        trust: &Trust,
        identity: &Identity,
        insecure: HashSet<BareJid>,
        connect_timeout: Duration,
        negotiation_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        // ALPN on direct TLS only: a STARTTLS peer may accept only `xmpp-client`.
        let both = |check: bool| -> Result<[TlsConnector; 2], rustls::Error> {
            let connector = |alpn: bool| {
                trust
                    .client_config(identity, check, alpn)
                    .map(|c| TlsConnector::from(Arc::new(c)))
            };
            Ok([connector(false)?, connector(true)?])
        };
        Ok(Self {
            resolver,
            verified: both(true)?,
            unchecked: both(false)?,
            insecure,
            connect_timeout,
            negotiation_timeout,
        })
    }

    /// Opens a stream as `config` says, trying the remote domain's endpoints in order.
    /// When every endpoint fails, the last failure is the answer: an endpoint without
    /// addresses is "not found", one that did not answer is "unreachable".
    pub async fn open(&self, config: S2sOutConfig) -> Result<Opened, ConnectError> {
        let domain = config.remote.clone();
        let unreachable = |last: String| ConnectError::Unreachable {
            domain: domain.clone(),
            last,
        };
        let mut failure = unreachable("no endpoint".to_owned());
        for candidate in self.resolver.candidates(domain.as_str()).await? {
            let addrs = match self.resolver.addresses(&candidate).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    failure = ConnectError::Resolve(e);
                    continue;
                }
            };
            for addr in addrs {
                let connect = TcpStream::connect(addr);
                let tcp = match tokio::time::timeout(self.connect_timeout, connect).await {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(e)) => {
                        failure = unreachable(format!("{addr}: {e}"));
                        continue;
                    }
                    Err(_) => {
                        failure = unreachable(format!("{addr}: connect timed out"));
                        continue;
                    }
                };
                let negotiation = self.negotiate(tcp, candidate.direct_tls, config.clone());
                match tokio::time::timeout(self.negotiation_timeout, negotiation).await {
                    Ok(Ok(opened)) => return Ok(opened),
                    Ok(Err(Failure::Refused(error))) => {
                        return Err(ConnectError::Refused {
                            domain,
                            error: error.to_string(),
                        });
                    }
                    Ok(Err(Failure::Io(e))) => failure = unreachable(format!("{addr}: {e}")),
                    Err(_) => failure = unreachable(format!("{addr}: negotiation timed out")),
                }
            }
        }
        Err(failure)
    }

    fn tls_for(&self, domain: &BareJid, direct: bool) -> &TlsConnector {
        let connectors = match self.insecure.contains(domain) {
            true => &self.unchecked,
            false => &self.verified,
        };
        &connectors[usize::from(direct)]
    }

    async fn negotiate(
        &self,
        tcp: TcpStream,
        direct_tls: bool,
        config: S2sOutConfig,
    ) -> Result<Opened, Failure> {
        let remote = config.remote.clone();
        let name = ServerName::try_from(remote.as_str().to_owned())
            .map_err(|e| Failure::Io(std::io::Error::other(e)))?;
        let mut transport: ClientTransport = match direct_tls {
            true => Either::Right(Box::new(
                self.tls_for(&remote, true)
                    .connect(name.clone(), tcp)
                    .await?,
            )),
            false => Either::Left(tcp),
        };
        let mut stream = S2sOut::new(config, direct_tls);
        let mut buf = BytesMut::with_capacity(4096);
        let mut actions = std::collections::VecDeque::from(stream.start());
        loop {
            while let Some(action) = actions.pop_front() {
                match action {
                    OutAction::Send(s) => {
                        transport.write_all(s.as_bytes()).await?;
                        transport.flush().await?;
                    }
                    OutAction::StartTls => {
                        let Either::Left(tcp) = transport else {
                            return Err(Failure::Io(std::io::Error::other("STARTTLS twice")));
                        };
                        transport = Either::Right(Box::new(
                            self.tls_for(&remote, false)
                                .connect(name.clone(), tcp)
                                .await?,
                        ));
                        actions.extend(stream.tls_established());
                    }
                    OutAction::Ready => {
                        return Ok(Opened::Ready(Box::new(OpenStream {
                            transport,
                            stream,
                            buf,
                        })));
                    }
                    OutAction::Verified { valid } => return Ok(Opened::Verified(valid)),
                    OutAction::Close { error: Some(error) } => return Err(Failure::Refused(error)),
                    OutAction::Close { error: None } => {
                        return Err(Failure::Io(std::io::Error::other(
                            "the peer closed the stream",
                        )));
                    }
                }
            }
            if transport.read_buf(&mut buf).await? == 0 {
                return Err(Failure::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            actions.extend(stream.receive(&mut buf));
        }
    }
}

/// How one endpoint failed.
enum Failure {
    Io(std::io::Error),
    Refused(StreamError),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}
