//! Server-to-server federation (RFC 6120, XEP-0220, XEP-0178, XEP-0368).
//!
//! Outbound: [`S2s::send`] queues a stanza for its remote domain; one task per (our
//! domain, their domain) pair on this node opens the stream ([`connect`]: DNS, TLS,
//! dialback), writes what is queued, and closes the stream when idle. What cannot be
//! delivered bounces (`<remote-server-not-found/>`, `<remote-server-timeout/>`).
//! Inbound: [`inbound`] accepts peer servers (after STARTTLS, or direct TLS), checks
//! their certificates for SASL EXTERNAL ([`trust`]) or verifies their dialback keys with
//! their authoritative servers, and routes their stanzas like client traffic.

pub mod connect;
pub mod inbound;
pub mod resolve;
pub mod trust;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use jid::BareJid;
use parking_lot::Mutex;
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::framer::FramerLimits;
use shoal_xmpp::s2s::{OutAction, Purpose, S2sOutConfig};
use shoal_xmpp::stanza::Stanza;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use self::connect::{Connector, OpenStream, Opened};
use crate::config::S2sConfig;
use crate::metrics::{Metrics, S2sBounce, S2sDirection};
use crate::router::{Router, WeakRouter};

/// Which remote domains may federate with us.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// If not empty, the only domains allowed.
    pub allow: HashSet<BareJid>,
    pub deny: HashSet<BareJid>,
}

impl Policy {
    pub fn allows(&self, domain: &BareJid) -> bool {
        !self.deny.contains(domain) && (self.allow.is_empty() || self.allow.contains(domain))
    }
}

/// What every stream of this node shares.
pub struct Settings {
    pub connector: Connector,
    pub trust: trust::Trust,
    /// Our domains our certificate is valid for by the roots we trust ourselves: only
    /// from these is SASL EXTERNAL worth trying.
    pub external_domains: HashSet<BareJid>,
    /// The TLS configuration of the s2s listeners.
    pub server_tls: Arc<rustls::ServerConfig>,
    pub policy: Policy,
    pub dialback_secret: Vec<u8>,
    pub tls_required: bool,
    pub limits: FramerLimits,
    pub idle_timeout: std::time::Duration,
    pub queue_max: usize,
    /// The PROXY protocol on the s2s listeners (`s2s.proxy_protocol`).
    pub proxy_protocol: Option<crate::config::ProxyProtocolConfig>,
}

impl Settings {
    /// From `[s2s]`, our certificate and our domains (`ours`); a missing dialback
    /// secret becomes a random one (single node).
    pub fn from_config(
        config: &S2sConfig,
        limits: FramerLimits,
        identity: &crate::tls::Identity,
        ours: &[BareJid],
    ) -> anyhow::Result<Self> {
        let resolver = resolve::Resolver::new(&resolve::ResolverConfig {
            nameservers: config.nameservers.clone(),
            ..Default::default()
        })?;
        let domains = |list: &[String]| -> HashSet<BareJid> {
            list.iter().filter_map(|d| BareJid::new(d).ok()).collect()
        };
        let trust = trust::Trust::new(config.ca_file.as_deref())?;
        let connector = Connector::new(
            resolver,
            &trust,
            identity,
            domains(&config.insecure_domains),
            config.connect_timeout,
            config.connect_timeout,
        )?;
        let dialback_secret = match config.dialback_secret.as_str() {
            "" => crate::c2s::fresh_id().into_bytes(),
            s => s.as_bytes().to_vec(),
        };
        Ok(Self {
            connector,
            server_tls: trust.server_config(identity)?,
            external_domains: ours
                .iter()
                .filter(|d| trust.valid_for(&identity.chain, d))
                .cloned()
                .collect(),
            trust,
            policy: Policy {
                allow: domains(&config.allow_domains),
                deny: domains(&config.deny_domains),
            },
            dialback_secret,
            tls_required: config.tls_required,
            limits,
            idle_timeout: config.idle_timeout,
            queue_max: config.queue_max,
            proxy_protocol: config.proxy_protocol.clone(),
        })
    }

    /// An outbound stream's settings from `local` to `remote`.
    pub fn stream(&self, local: &BareJid, remote: &BareJid, purpose: Purpose) -> S2sOutConfig {
        S2sOutConfig {
            local: local.clone(),
            remote: remote.clone(),
            limits: self.limits,
            tls_required: self.tls_required,
            sasl_external: self.external_domains.contains(local),
            dialback_secret: self.dialback_secret.clone(),
            purpose,
        }
    }
}

type Pair = (BareJid, BareJid);
type Queued = (Stanza, Instant);

/// The outbound side of federation on this node. Cheap to clone.
#[derive(Clone)]
pub struct S2s {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    metrics: Metrics,
    /// Becomes true when the node drains: open streams send what is queued and close.
    shutdown: watch::Receiver<bool>,
    /// The queue of each (our domain, their domain) stream that is open or opening.
    streams: Mutex<HashMap<Pair, mpsc::Sender<Queued>>>,
}

impl S2s {
    pub fn new(settings: Arc<Settings>, metrics: Metrics, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                metrics,
                shutdown,
                streams: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.inner.settings
    }

    /// Queues `stanza` (from one of our domains to another domain) on its stream,
    /// opening the stream if there is none.
    pub fn send(&self, router: &Router, stanza: Stanza, since: Instant) {
        let domain = |j: Option<&jid::Jid>| j.and_then(|j| BareJid::new(j.domain().as_str()).ok());
        let (Some(local), Some(remote)) =
            (domain(stanza.from.as_ref()), domain(stanza.to.as_ref()))
        else {
            return;
        };
        if !self.inner.settings.policy.allows(&remote) {
            let text = format!("federation with {remote} is not allowed here");
            let error = StanzaError::with_text(StanzaErrorCondition::RemoteServerNotFound, text);
            return self.bounce(router, &stanza, error, since);
        }
        let pair = (local, remote);
        let mut streams = self.inner.streams.lock();
        let tx = streams.entry(pair.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.inner.settings.queue_max);
            tokio::spawn(run(self.clone(), router.downgrade(), pair.clone(), rx));
            tx
        });
        match tx.try_send((stanza, since)) {
            Ok(()) => self.inner.metrics.s2s_queued(1.0),
            Err(e) => {
                let (stanza, since) = e.into_inner();
                let error = StanzaError::with_text(
                    StanzaErrorCondition::ResourceConstraint,
                    "too many stanzas waiting for that server",
                );
                drop(streams);
                self.bounce(router, &stanza, error, since);
            }
        }
    }

    /// Returns a stanza that cannot reach its domain to its sender, counted.
    fn bounce(&self, router: &Router, stanza: &Stanza, error: StanzaError, since: Instant) {
        self.inner.metrics.s2s_bounce(match error.condition {
            StanzaErrorCondition::RemoteServerTimeout => S2sBounce::Timeout,
            StanzaErrorCondition::ResourceConstraint => S2sBounce::Busy,
            _ => S2sBounce::NotFound,
        });
        router.bounce(stanza, error, since);
    }

    /// A stanza left its queue.
    fn dequeued(&self) {
        self.inner.metrics.s2s_queued(-1.0);
    }
}

/// One (our domain, their domain) stream: connects, writes what is queued, reconnects
/// when stanzas wait after the stream ended, and goes away when it ends idle.
async fn run(s2s: S2s, router: WeakRouter, pair: Pair, mut rx: mpsc::Receiver<Queued>) {
    let settings = s2s.inner.settings.clone();
    let (local, remote) = &pair;
    loop {
        let config = settings.stream(local, remote, Purpose::Send);
        match settings.connector.open(config).await {
            Ok(Opened::Ready(open)) => {
                info!(from = %local, to = %remote, "s2s stream open");
                let _open = s2s.inner.metrics.s2s_stream(S2sDirection::Out);
                serve(&s2s, *open, &mut rx, &router).await;
            }
            Ok(Opened::Verified(_)) => unreachable!("a send stream is not a verify stream"),
            Err(e) => {
                warn!(from = %local, to = %remote, error = %e, "s2s stream failed");
                let error = StanzaError::with_text(e.condition(), e.to_string());
                let router = router.upgrade();
                while let Ok((stanza, since)) = rx.try_recv() {
                    s2s.dequeued();
                    if let Some(router) = &router {
                        s2s.bounce(router, &stanza, error.clone(), since);
                    }
                }
            }
        }
        // Gone only if nothing is waiting: a sender queues under the same lock.
        let mut streams = s2s.inner.streams.lock();
        if rx.is_empty() {
            streams.remove(&pair);
            return;
        }
    }
}

/// Writes queued stanzas until the stream is idle for `idle`, breaks, is closed or the
/// node drains (then what is queued goes out first); a stanza the broken stream did not
/// take bounces with `<remote-server-timeout/>`.
async fn serve(
    s2s: &S2s,
    mut open: OpenStream,
    rx: &mut mpsc::Receiver<Queued>,
    router: &WeakRouter,
) {
    let idle = s2s.inner.settings.idle_timeout;
    let mut read = std::mem::take(&mut open.buf);
    let mut shutdown = s2s.inner.shutdown.clone();
    loop {
        tokio::select! {
            queued = rx.recv() => {
                let Some(queued) = queued else { return };
                if !write(s2s, &mut open, queued, router).await {
                    return;
                }
            }
            _ = draining(&mut shutdown) => {
                while let Ok(queued) = rx.try_recv() {
                    if !write(s2s, &mut open, queued, router).await {
                        return;
                    }
                }
                return close(&mut open).await;
            }
            n = open.transport.read_buf(&mut read) => {
                if !matches!(n, Ok(n) if n > 0) {
                    return;
                }
                for action in open.stream.receive(&mut read) {
                    match action {
                        OutAction::Send(s) => {
                            let _ = open.transport.write_all(s.as_bytes()).await;
                        }
                        OutAction::Close { .. } => return,
                        _ => {}
                    }
                }
            }
            _ = tokio::time::sleep(idle) => return close(&mut open).await,
        }
    }
}

/// Returns once the node drains.
async fn draining(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Writes one queued stanza; false (and the stanza bounced) if the stream broke.
async fn write(
    s2s: &S2s,
    open: &mut OpenStream,
    (stanza, since): Queued,
    router: &WeakRouter,
) -> bool {
    s2s.dequeued();
    let xml = open.stream.stanza(&stanza);
    if open.transport.write_all(xml.as_bytes()).await.is_ok()
        && open.transport.flush().await.is_ok()
    {
        return true;
    }
    warn!(to = ?stanza.to, "s2s stream broke while writing");
    if let Some(router) = router.upgrade() {
        let error = StanzaError::with_text(
            StanzaErrorCondition::RemoteServerTimeout,
            "the stream to that server broke",
        );
        s2s.bounce(&router, &stanza, error, since);
    }
    false
}

/// Ends the stream (`</stream:stream>`) and the connection.
async fn close(open: &mut OpenStream) {
    for action in open.stream.close() {
        if let OutAction::Send(s) = action {
            let _ = open.transport.write_all(s.as_bytes()).await;
        }
    }
    let _ = open.transport.shutdown().await;
}
