//! Inbound server-to-server connections: the accept loops (STARTTLS on `s2s.bind`,
//! direct TLS on `s2s.direct_tls_bind`) and the driver of [`S2sIn`]. TLS asks the peer
//! for its certificate; a peer that asks for SASL EXTERNAL is accepted if that
//! certificate is valid for the domain it claims ([`super::trust::Trust::valid_for`]).
//! A peer's dialback key is checked by asking the peer domain's authoritative server
//! over a verify stream of our own. Its stanzas are routed into the node (and the
//! cluster) like client traffic. Behind a load balancer (`s2s.proxy_protocol`), the
//! peer's address is the one its PROXY protocol header names.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use jid::BareJid;
use shoal_xmpp::error::{StreamError, StreamErrorCondition};
use shoal_xmpp::s2s::{Action, Purpose, S2sIn, S2sInConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::either::Either;
use tracing::{debug, info, warn};

use super::Settings;
use super::connect::Opened;
use crate::c2s::fresh_id;
use crate::c2s::io::Transport;
use crate::metrics::{ProxyService, S2sDirection};
use crate::router::Router;

/// What every inbound connection of a node shares.
pub struct Inbound {
    pub settings: Arc<Settings>,
    /// Our domains (the XMPP domain, the MUC service).
    pub domains: Vec<BareJid>,
    pub router: Router,
    /// How long a peer may take to authenticate.
    pub negotiation_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

impl Inbound {
    fn stream_config(&self) -> S2sInConfig {
        S2sInConfig {
            domains: self.domains.clone(),
            limits: self.settings.limits,
            tls_available: true,
            tls_required: self.settings.tls_required,
            dialback_secret: self.settings.dialback_secret.clone(),
        }
    }
}

/// Accepts peer servers until shutdown; on a `direct` TLS listener (XEP-0368), TLS
/// starts with the first byte.
pub async fn accept_loop(listener: TcpListener, inbound: Arc<Inbound>, direct: bool) {
    let mut shutdown = inbound.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve(tcp, peer, inbound.clone(), direct));
                }
                Err(e) => warn!(error = %e, "s2s accept failed"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// One inbound connection. The transport is an `Option` because the TLS upgrade
/// consumes the plaintext socket; it is `None` only while the handshake runs.
struct Conn {
    transport: Option<Transport>,
    stream: S2sIn,
    buf: BytesMut,
    peer: SocketAddr,
    /// A domain of the peer is authorized: the idle timeout applies, not the
    /// negotiation deadline.
    authorized: bool,
}

async fn serve(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    inbound: Arc<Inbound>,
    direct: bool,
) {
    // Behind a load balancer, the peer is who its PROXY protocol header names.
    let peer = match &inbound.settings.proxy_protocol {
        None => peer,
        Some(proxy) => {
            let metrics = inbound.router.metrics();
            match crate::proxy::real_source(&mut tcp, peer, proxy, ProxyService::S2s, metrics).await
            {
                Some(source) => source,
                None => return,
            }
        }
    };
    let _open = inbound.router.metrics().s2s_stream(S2sDirection::In);
    let started = Instant::now();
    let mut conn = Conn {
        transport: Some(Either::Left(tcp)),
        stream: S2sIn::new(inbound.stream_config(), direct),
        buf: BytesMut::with_capacity(4096),
        peer,
        authorized: false,
    };
    if direct {
        let handshake = conn.start_tls(&inbound);
        match tokio::time::timeout(inbound.negotiation_timeout, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return debug!(%peer, error = %e, "s2s direct TLS handshake failed"),
            Err(_) => return debug!(%peer, "s2s direct TLS handshake timed out"),
        }
    }
    let mut shutdown = inbound.shutdown.clone();
    loop {
        let wait = match conn.authorized {
            true => inbound.settings.idle_timeout,
            false => inbound
                .negotiation_timeout
                .saturating_sub(started.elapsed()),
        };
        let Some(transport) = conn.transport.as_mut() else {
            return;
        };
        let actions = tokio::select! {
            read = tokio::time::timeout(wait, transport.read_buf(&mut conn.buf)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => conn.stream.receive(&mut conn.buf, &mut fresh_id),
                Err(_) => conn.stream.close_with(StreamError::new(StreamErrorCondition::ConnectionTimeout)),
            },
            _ = shutdown.changed() => {
                conn.stream.close_with(StreamError::new(StreamErrorCondition::SystemShutdown))
            }
        };
        match conn.run(actions, &inbound).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                debug!(%peer, error = %e, "s2s inbound connection lost");
                return;
            }
        }
    }
}

impl Conn {
    /// The TLS handshake as server, on the plaintext socket.
    async fn start_tls(&mut self, inbound: &Inbound) -> std::io::Result<()> {
        let Some(Either::Left(tcp)) = self.transport.take() else {
            return Err(std::io::Error::other("STARTTLS twice"));
        };
        let tls = crate::tls::accept(inbound.settings.server_tls.clone(), tcp).await?;
        self.stream
            .peer_certificate(tls.peer_certificates().is_some());
        self.transport = Some(Either::Right(Box::new(tls)));
        Ok(())
    }

    /// The chain the peer presented in the TLS handshake, if any.
    fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match &self.transport {
            Some(Either::Right(tls)) => tls.peer_certificates(),
            _ => None,
        }
    }

    /// Carries out `actions`; false once the stream is over.
    async fn run(&mut self, actions: Vec<Action>, inbound: &Inbound) -> std::io::Result<bool> {
        let peer = self.peer;
        let mut actions = VecDeque::from(actions);
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Send(s) => {
                    let transport = self.transport.as_mut().expect("connected");
                    transport.write_all(s.as_bytes()).await?;
                    transport.flush().await?;
                }
                Action::StartTls => self.start_tls(inbound).await?,
                Action::CheckCertificate { domain } => {
                    let valid = inbound.settings.policy.allows(&domain)
                        && self
                            .peer_certificates()
                            .is_some_and(|chain| inbound.settings.trust.valid_for(chain, &domain));
                    info!(%peer, %domain, valid, "s2s SASL EXTERNAL");
                    inbound.router.metrics().s2s_external(valid);
                    actions.extend(self.stream.certificate_result(&domain, valid));
                    actions.extend(self.stream.receive(&mut self.buf, &mut fresh_id));
                }
                Action::VerifyDialback {
                    originating,
                    receiving,
                    key,
                    stream_id,
                } => {
                    let valid = inbound.settings.policy.allows(&originating)
                        && verify(inbound, &originating, &receiving, key, stream_id).await;
                    info!(%peer, from = %originating, to = %receiving, valid, "s2s dialback");
                    inbound.router.metrics().s2s_dialback(valid);
                    actions.extend(self.stream.dialback_result(&originating, &receiving, valid));
                }
                Action::Authorized { domain } => {
                    info!(%peer, %domain, "s2s inbound stream authorized");
                    self.authorized = true;
                }
                Action::Stanza(st) => inbound.router.route(st, Instant::now()),
                Action::Close { error } => {
                    if let Some(e) = error {
                        info!(%peer, error = %e, "s2s inbound stream closed");
                    }
                    if let Some(transport) = self.transport.as_mut() {
                        let _ = transport.shutdown().await;
                    }
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Asks `originating`'s authoritative server whether it issued `key` (XEP-0220 §2.3).
async fn verify(
    inbound: &Inbound,
    originating: &BareJid,
    receiving: &BareJid,
    key: String,
    stream_id: String,
) -> bool {
    let purpose = Purpose::Verify {
        receiving: receiving.clone(),
        stream_id,
        key,
    };
    let config = inbound.settings.stream(receiving, originating, purpose);
    match inbound.settings.connector.open(config).await {
        Ok(Opened::Verified(valid)) => valid,
        Ok(Opened::Ready(_)) => false,
        Err(e) => {
            warn!(from = %originating, error = %e, "s2s dialback verification failed");
            false
        }
    }
}
