//! Client-to-server listeners (RFC 6120 on 5222 with STARTTLS, XEP-0368 direct TLS on
//! 5223): accepting, admission control, and handing each socket to a worker arbiter.
//!
//! Admission (per-address connection rate, the global connection cap) is decided here
//! before any XMPP byte is read. Behind a load balancer speaking the PROXY protocol
//! (`c2s.proxy_protocol`) the address is the one its header names ([`crate::proxy`]),
//! so the per-address rate is checked once the header is read, on the worker.
//! Negotiation runs in [`negotiate`]; a bound session becomes a [`session::Session`]
//! actor. This module never parses XMPP itself.

pub mod io;
pub mod negotiate;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use actix::prelude::*;
use jid::BareJid;
use rand::Rng;
use rand::distributions::Alphanumeric;
use shoal_xmpp::c2s::C2sConfig;
use shoal_xmpp::error::{StreamError, StreamErrorCondition};
use shoal_xmpp::framer::FramerLimits;
use shoal_xmpp::sasl::Mechanism;
use shoal_xmpp::stanza::Kind;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics::{self, Listener, Metrics, ProxyService, RejectReason};
use crate::ratelimit::IpLimiter;
use crate::router::Router;
use crate::storage::Storage;

/// Everything a connection needs, shared by all connections of a node.
pub struct Shared {
    pub config: Config,
    pub stream_config: C2sConfig,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub storage: Storage,
    pub router: Router,
    pub metrics: Metrics,
    pub auth_limiter: IpLimiter,
    /// In-band registrations per source address per hour.
    pub register_limiter: IpLimiter,
    /// Open client connections (negotiating or bound), for the global cap and drain.
    pub open: AtomicUsize,
    next_session: AtomicU64,
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub fn new(
        config: Config,
        domain: BareJid,
        tls: Option<Arc<rustls::ServerConfig>>,
        storage: Storage,
        router: Router,
        shutdown: watch::Receiver<bool>,
        secret: Arc<[u8]>,
    ) -> Self {
        let metrics = router.metrics().clone();
        let stream_config = C2sConfig {
            domain,
            limits: FramerLimits {
                max_stanza_size: config.c2s.max_stanza_size,
                max_depth: config.c2s.max_depth,
            },
            tls_available: tls.is_some(),
            tls_required: config.c2s.starttls_required,
            registration: config.registration.enabled,
            fake_salt_secret: secret,
        };
        Self {
            auth_limiter: IpLimiter::new(config.limits.auth_failures_per_ip_per_minute),
            register_limiter: IpLimiter::per_hour(config.registration.per_ip_per_hour),
            config,
            stream_config,
            tls,
            storage,
            router,
            metrics,
            open: AtomicUsize::new(0),
            // Random start: binding ids name sessions across the cluster (and a
            // restarted node's new sessions must not match its old ones); below 2^63
            // so counting never wraps to 0, which frames use for "any binding".
            next_session: AtomicU64::new((rand::random::<u64>() >> 1).max(1)),
            shutdown,
        }
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The stream error a draining node closes client streams with: where to go
    /// instead (`shutdown.see_other_host`), or `<system-shutdown/>`.
    pub fn farewell(&self) -> StreamError {
        match &self.config.shutdown.see_other_host {
            Some(host) => StreamError::see_other_host(host.as_str()),
            None => StreamError::new(StreamErrorCondition::SystemShutdown),
        }
    }
}

/// Accepts connections on `listener` until shutdown, spreading them over `workers`.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    workers: Vec<ArbiterHandle>,
) {
    let conn_limiter = Arc::new(IpLimiter::new(
        shared.config.limits.connections_per_ip_per_minute,
    ));
    let proxy = shared.config.c2s.proxy_protocol.is_some();
    let mut shutdown = shared.shutdown.clone();
    let mut next = 0usize;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and similar: keep serving the others.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Without a PROXY header to wait for, the source is known now: a refused one
        // costs nothing more than the accept.
        if !proxy && !within_rate(&conn_limiter, peer, &shared.metrics) {
            continue;
        }
        if shared.open.load(Ordering::Relaxed) >= shared.config.c2s.max_connections {
            warn!(%peer, "connection refused: max_connections reached");
            shared
                .metrics
                .connection_rejected(RejectReason::TooManyConnections);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        // A tokio socket belongs to the runtime that created it; move it as a std socket
        // and re-register it on the worker's runtime.
        let Ok(std_tcp) = tcp.into_std() else {
            continue;
        };
        let worker = &workers[next % workers.len()];
        next = next.wrapping_add(1);
        shared.open.fetch_add(1, Ordering::Relaxed);
        let conn_shared = shared.clone();
        let limiter = conn_limiter.clone();
        // The negotiation future holds the session's actor context, which is not
        // `Send`, so it is created on the worker's thread.
        let spawned = worker.spawn_fn(move || {
            actix_rt::spawn(async move {
                let mut tcp = match tokio::net::TcpStream::from_std(std_tcp) {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        conn_shared.open.fetch_sub(1, Ordering::Relaxed);
                        warn!(error = %e, "could not register socket");
                        return;
                    }
                };
                let peer = match &conn_shared.config.c2s.proxy_protocol {
                    None => Some(peer),
                    Some(settings) => {
                        let metrics = &conn_shared.metrics;
                        crate::proxy::real_source(
                            &mut tcp,
                            peer,
                            settings,
                            ProxyService::C2s,
                            metrics,
                        )
                        .await
                        .filter(|source| within_rate(&limiter, *source, metrics))
                    }
                };
                match peer {
                    Some(peer) => negotiate::run(tcp, peer, kind, conn_shared).await,
                    None => {
                        conn_shared.open.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            });
        });
        if !spawned {
            shared.open.fetch_sub(1, Ordering::Relaxed);
            warn!("worker arbiter gone; connection dropped");
        }
    }
}

/// Takes one connection from `peer`'s budget; false (logged, counted) when it is spent.
fn within_rate(limiter: &IpLimiter, peer: SocketAddr, metrics: &Metrics) -> bool {
    if limiter.check(peer.ip(), Instant::now()) {
        return true;
    }
    debug!(%peer, "connection rate limit exceeded");
    metrics.connection_rejected(RejectReason::RateLimited);
    false
}

/// A random token for stream ids, SASL nonces and server-chosen resources.
pub fn fresh_id() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(16)
        .map(char::from)
        .collect()
}

pub fn stanza_kind(kind: Kind) -> metrics::StanzaKind {
    match kind {
        Kind::Message(_) => metrics::StanzaKind::Message,
        Kind::Presence(_) => metrics::StanzaKind::Presence,
        Kind::Iq(_) => metrics::StanzaKind::Iq,
    }
}

pub fn mechanism_label(m: Mechanism) -> metrics::SaslMechanism {
    match m {
        Mechanism::ScramSha256 => metrics::SaslMechanism::ScramSha256,
        Mechanism::ScramSha1 => metrics::SaslMechanism::ScramSha1,
        Mechanism::Plain => metrics::SaslMechanism::Plain,
    }
}

pub fn stream_error_label(c: StreamErrorCondition) -> metrics::StreamErrorCondition {
    use metrics::StreamErrorCondition as M;
    match c {
        StreamErrorCondition::BadFormat => M::BadFormat,
        StreamErrorCondition::Conflict => M::Conflict,
        StreamErrorCondition::ConnectionTimeout => M::ConnectionTimeout,
        StreamErrorCondition::HostUnknown => M::HostUnknown,
        StreamErrorCondition::InvalidFrom => M::InvalidFrom,
        StreamErrorCondition::InvalidNamespace => M::InvalidNamespace,
        StreamErrorCondition::InvalidXml => M::InvalidXml,
        StreamErrorCondition::NotAuthorized => M::NotAuthorized,
        StreamErrorCondition::NotWellFormed => M::NotWellFormed,
        StreamErrorCondition::PolicyViolation => M::PolicyViolation,
        StreamErrorCondition::ResourceConstraint => M::ResourceConstraint,
        StreamErrorCondition::RestrictedXml => M::RestrictedXml,
        StreamErrorCondition::SeeOtherHost => M::SeeOtherHost,
        StreamErrorCondition::SystemShutdown => M::SystemShutdown,
        StreamErrorCondition::UnsupportedVersion => M::UnsupportedVersion,
        _ => M::Other,
    }
}
