//! Assembles a node: storage, TLS, metrics, shard hosts, router, listeners and the admin
//! endpoint, and runs it until shutdown, then drains.
//!
//! [`run`] is a library function so tests boot real nodes in-process on port 0; the
//! binary's `main` only parses the command line. Shutdown is a drain: stop accepting,
//! close every stream with `<system-shutdown/>` (or `<see-other-host/>` when
//! `shutdown.see_other_host` is set), wait (bounded) for connections to end.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use futures_util::future::BoxFuture;
use jid::BareJid;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::admin::{self, Health, ReadyComponent};
use crate::c2s::{self, Shared};
use crate::cluster::directory::Directory;
use crate::cluster::forward::grpc::{ClusterEndpoint, GrpcForwarder};
use crate::cluster::forward::{ForwardConfig, NodeId};
use crate::cluster::link::{self, ClusterLink, Inbound};
use crate::cluster::membership::Node;
use crate::cluster::runtime::{self, Cluster, Drain};
use crate::cluster::shards::ShardId;
use crate::config::Config;
use crate::metrics::{self, Listener, Metrics};
use crate::roster::RosterLimits;
use crate::router::{MucService, Router};
use crate::shard::{CloseAllSessions, DrainStorage, ReleaseShards, ShardConfig, ShardHost};
use crate::user::UserLimits;
use crate::{s2s, storage, tls};

/// Sockets a node serves, bound before it starts (so tests can bind port 0 and learn
/// the address first).
pub struct Listeners {
    pub c2s: std::net::TcpListener,
    pub direct_tls: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
    /// The node-to-node endpoint, in cluster mode.
    pub cluster: Option<std::net::TcpListener>,
    /// Peer servers (federation), unless `s2s.bind` is empty.
    pub s2s: Option<std::net::TcpListener>,
    /// Peer servers over direct TLS (XEP-0368), if `s2s.direct_tls_bind` is set.
    pub s2s_direct_tls: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds every address the configuration names.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &str| {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} ({what})"))?;
            l.set_nonblocking(true)?;
            anyhow::Ok(l)
        };
        Ok(Self {
            c2s: bind(config.c2s.bind, "c2s")?,
            direct_tls: config
                .c2s
                .direct_tls_bind
                .map(|a| bind(a, "c2s direct TLS"))
                .transpose()?,
            admin: config.admin.bind.map(|a| bind(a, "admin")).transpose()?,
            cluster: config
                .cluster
                .enabled
                .then(|| bind(config.cluster.listen, "cluster"))
                .transpose()?,
            s2s: config.s2s.bind.map(|a| bind(a, "s2s")).transpose()?,
            s2s_direct_tls: config
                .s2s
                .direct_tls_bind
                .map(|a| bind(a, "s2s direct TLS"))
                .transpose()?,
        })
    }

    pub fn c2s_addr(&self) -> SocketAddr {
        self.c2s.local_addr().expect("bound socket has an address")
    }

    pub fn direct_tls_addr(&self) -> Option<SocketAddr> {
        self.direct_tls.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn s2s_addr(&self) -> Option<SocketAddr> {
        self.s2s.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn s2s_direct_tls_addr(&self) -> Option<SocketAddr> {
        self.s2s_direct_tls
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }
}

/// What a cluster node runs besides the single-node parts.
struct ClusterParts {
    cluster: Cluster,
    endpoint: ClusterEndpoint,
    forwarder: Arc<GrpcForwarder>,
    follower: tokio::task::JoinHandle<()>,
}

/// Drains shards by asking every shard host to release them.
struct HostsDrain {
    router: Router,
    wait: Duration,
}

impl Drain for HostsDrain {
    /// Stops routing the shards here and queues their release at every host at once;
    /// the future waits (bounded) for the hosts' storage writes.
    fn drain(&self, shards: Vec<ShardId>, generation: u64) -> BoxFuture<'static, ()> {
        let router = self.router.clone();
        let wait = self.wait;
        if let Some(link) = router.cluster() {
            link.withdraw(&shards, generation);
        }
        let set: HashSet<u32> = shards.iter().copied().collect();
        // `send`, not `try_send`: a release must not be lost to a full mailbox. It
        // is queued now; only its answer is awaited.
        let done: Vec<_> = router
            .hosts()
            .iter()
            .map(|host| {
                let (tx, rx) = oneshot::channel();
                let queued = host.send(ReleaseShards {
                    shards: set.clone(),
                    done: tx,
                });
                async move {
                    let _ = queued.await;
                    let _ = rx.await;
                }
            })
            .collect();
        Box::pin(async move {
            // The new owner may load the shards' accounts once every write queued
            // here has landed; the handoff completes only then. The round itself
            // waits a bounded time.
            let flushed = {
                let router = router.clone();
                tokio::spawn(async move {
                    futures_util::future::join_all(done).await;
                    if let Some(link) = router.cluster() {
                        link.flushed(&shards);
                    }
                })
            };
            if tokio::time::timeout(wait, flushed).await.is_err() {
                warn!("shard storage writes still pending at handoff");
            }
            router.retry_parked();
        })
    }
}

/// Joins the cluster: the link the router uses, the gRPC endpoint, the coordinator's
/// rounds and the task that follows the shard view.
async fn start_cluster(
    config: &Config,
    listener: std::net::TcpListener,
    metrics: &Metrics,
) -> anyhow::Result<(
    Arc<ClusterLink>,
    Arc<GrpcForwarder>,
    tokio::net::TcpListener,
)> {
    let me = NodeId::new(&config.cluster.node_id)?;
    let forwarder = Arc::new(GrpcForwarder::new(
        me.clone(),
        ForwardConfig::default(),
        metrics.clone(),
    ));
    let client = redis::Client::open(config.storage.redis_url.as_str())?;
    let redis = crate::cluster::connect(client, config.cluster.lease_ttl)
        .await
        .context("cannot reach Redis for the cluster")?;
    let directory = Directory::new(redis, &cluster_prefix(config));
    let link = Arc::new(ClusterLink::new(
        me,
        config.cluster.shards,
        forwarder.clone(),
        directory,
        config.cluster.lease_ttl,
        metrics.clone(),
    ));
    Ok((
        link,
        forwarder,
        tokio::net::TcpListener::from_std(listener)?,
    ))
}

/// Cluster keys live next to the data, under their own sub-prefix.
fn cluster_prefix(config: &Config) -> String {
    format!("{}cluster:", config.storage.redis_key_prefix)
}

/// Runs a node until `shutdown` resolves, then drains. Must run inside an actix
/// `System` (the binary and the test harness both provide one).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_until(config, listeners, async {
        shutdown.await;
        Stop::Drain
    })
    .await
}

/// How a node stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Gracefully: close streams with `<system-shutdown/>`, finish writes, hand shards
    /// off (SIGTERM).
    Drain,
    /// At once, as if the process died: no goodbye to clients or to the cluster. For
    /// fault tests.
    Abort,
}

/// [`run`], with the way of stopping chosen when `stop` resolves.
pub async fn run_until(
    config: Config,
    listeners: Listeners,
    stop: impl Future<Output = Stop>,
) -> anyhow::Result<()> {
    let domain = BareJid::new(&config.domain).context("invalid domain")?;
    let metrics = Metrics::new();
    let prometheus = metrics::install_recorder();
    let mut required = vec![ReadyComponent::Listeners, ReadyComponent::Storage];
    if config.cluster.enabled {
        required.push(ReadyComponent::Cluster);
    }
    let health = Health::requiring(required);
    let storage = storage::open(&config.storage)
        .await
        .context("cannot open storage")?;
    if !config.cluster.enabled {
        crate::muc::after_restart(&storage)
            .await
            .context("cannot clear the rooms of the last run")?;
    }
    health.set_ready(ReadyComponent::Storage, true);
    let (server_tls, identity) = tls::load_or_generate(
        &config.tls.cert,
        &config.tls.key,
        config.tls.self_signed,
        &config.domain,
    )
    .context("TLS certificate")?;
    let tls = Some(server_tls);

    // Shard hosts and connections share the worker arbiters (one per core).
    let workers: Vec<Arbiter> = (0..config.cluster.effective_shard_hosts())
        .map(|_| Arbiter::new())
        .collect();
    let mut listeners = listeners;
    let cluster_start = match listeners.cluster.take() {
        Some(l) => Some(start_cluster(&config, l, &metrics).await?),
        None => None,
    };
    let muc = match config.muc.enabled {
        true => Some(MucService {
            domain: BareJid::new(&config.muc.service).context("invalid MUC service")?,
            rooms: storage.rooms.clone(),
        }),
        false => None,
    };
    let router = Router::with_parts(
        domain.clone(),
        config.cluster.shards,
        metrics.clone(),
        cluster_start.as_ref().map(|(link, _, _)| link.clone()),
        muc,
    );
    let shard_config = ShardConfig {
        limits: Arc::new(UserLimits {
            max_resources: config.limits.max_resources_per_user,
            roster: RosterLimits {
                max_items: config.limits.max_roster_items,
                max_name_len: config.limits.max_roster_name_len,
                max_group_len: config.limits.max_roster_name_len,
                max_groups: config.limits.max_roster_groups,
            },
            max_blocklist: config.limits.max_blocklist_items,
        }),
        max_offline: config.limits.max_offline_messages,
        attach_timeout: config.cluster.lease_ttl.max(Duration::from_secs(2)),
        muc_presence_max: config.muc.presence_broadcast_max,
    };
    let hosts = workers
        .iter()
        .map(|w| {
            let (router, storage, cfg) = (router.clone(), storage.clone(), shard_config.clone());
            ShardHost::start_in_arbiter(&w.handle(), move |_| ShardHost::new(router, storage, cfg))
        })
        .collect();
    router.set_hosts(hosts);
    let cluster = match cluster_start {
        Some((link, forwarder, listener)) => {
            let weak = router.downgrade();
            forwarder.on_undelivered(Arc::new(move |peer, frames| {
                if let Some(router) = weak.upgrade() {
                    link::reroute_undelivered(&router, peer, frames);
                }
            }));
            let endpoint = ClusterEndpoint::serve(
                listener,
                link.me().clone(),
                Arc::new(Inbound(router.clone())),
                &ForwardConfig::default(),
                metrics.clone(),
            )?;
            // The announced endpoint: as configured, or the address actually bound
            // when it defaulted to `cluster.listen` (port 0 in tests).
            let announced = if config.cluster.endpoint == config.cluster.listen.to_string() {
                endpoint.local_addr().to_string()
            } else {
                config.cluster.endpoint.clone()
            };
            let settings = runtime::Settings {
                node: Node {
                    id: link.me().to_string(),
                    endpoint: announced,
                },
                redis_url: config.storage.redis_url.clone(),
                prefix: cluster_prefix(&config),
                shards: config.cluster.shards,
                lease_ttl: config.cluster.lease_ttl,
            };
            let drain = Arc::new(HostsDrain {
                router: router.clone(),
                // Drains run inside a coordinator round: bounded so that renewing
                // the other shards' leases is never late.
                wait: config.cluster.lease_ttl / 3,
            });
            let mut cluster = Cluster::start(settings, drain, metrics.clone())
                .await
                .context("cannot join the cluster")?;
            let ready = health.clone();
            let follower = actix_rt::spawn(link::follow_view(
                router.clone(),
                cluster.view(),
                cluster.gains(),
                forwarder.clone(),
                move |ok| ready.set_ready(ReadyComponent::Cluster, ok),
            ));
            Some(ClusterParts {
                cluster,
                endpoint,
                forwarder,
                follower,
            })
        }
        None => None,
    };

    // Federation: outbound streams through the router, and the inbound listener below.
    let limits = shoal_xmpp::framer::FramerLimits {
        max_stanza_size: config.c2s.max_stanza_size,
        max_depth: config.c2s.max_depth,
    };
    let mut s2s_domains = vec![domain.clone()];
    if let Some(muc) = router.muc_domain() {
        s2s_domains.push(muc.clone());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let s2s_settings = match config.s2s.bind {
        Some(_) => Some(Arc::new(
            s2s::Settings::from_config(&config.s2s, limits, &identity, &s2s_domains)
                .context("s2s")?,
        )),
        None => None,
    };
    if let Some(settings) = &s2s_settings {
        router.set_s2s(s2s::S2s::new(
            settings.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    let s2s_negotiation = config.c2s.negotiation_timeout;

    let data_dir = config.data_dir.clone();
    let grace = config.shutdown.grace;
    let shared = Arc::new(Shared::new(
        config,
        domain,
        tls,
        storage,
        router.clone(),
        stop_rx.clone(),
        node_secret(&data_dir).context("node secret")?,
    ));
    let handles: Vec<ArbiterHandle> = workers.iter().map(Arbiter::handle).collect();
    let mut tasks = Vec::new();
    let c2s = tokio::net::TcpListener::from_std(listeners.c2s)?;
    info!(addr = %c2s.local_addr()?, "c2s listening (STARTTLS)");
    tasks.push(actix_rt::spawn(c2s::accept_loop(
        c2s,
        Listener::StartTls,
        shared.clone(),
        handles.clone(),
    )));
    if let Some(l) = listeners.direct_tls {
        let l = tokio::net::TcpListener::from_std(l)?;
        info!(addr = %l.local_addr()?, "c2s listening (direct TLS)");
        tasks.push(actix_rt::spawn(c2s::accept_loop(
            l,
            Listener::DirectTls,
            shared.clone(),
            handles.clone(),
        )));
    }
    if let (Some(l), Some(settings)) = (listeners.s2s, s2s_settings) {
        let inbound = Arc::new(s2s::inbound::Inbound {
            settings,
            domains: s2s_domains,
            router: router.clone(),
            negotiation_timeout: s2s_negotiation,
            shutdown: stop_rx.clone(),
        });
        let direct = listeners.s2s_direct_tls.map(|l| (l, true));
        for (l, direct) in std::iter::once((l, false)).chain(direct) {
            let l = tokio::net::TcpListener::from_std(l)?;
            info!(addr = %l.local_addr()?, direct_tls = direct, "s2s listening");
            tasks.push(actix_rt::spawn(s2s::inbound::accept_loop(
                l,
                inbound.clone(),
                direct,
            )));
        }
    }
    health.set_ready(ReadyComponent::Listeners, true);
    if let Some(l) = listeners.admin {
        let l = tokio::net::TcpListener::from_std(l)?;
        info!(addr = %l.local_addr()?, "admin HTTP listening");
        let health = health.clone();
        // Up until the node has stopped (the task is aborted then): while it drains,
        // `/readyz` says so and `/metrics` shows the drain.
        tasks.push(actix_rt::spawn(async move {
            let stopped = std::future::pending();
            if let Err(e) = admin::serve(l, prometheus, health, stopped).await {
                warn!(error = %e, "admin endpoint failed");
            }
        }));
    }
    info!("node ready");

    if stop.await == Stop::Abort {
        warn!("stopping at once, without draining");
        if let Some(parts) = cluster {
            parts.follower.abort();
            parts.forwarder.shutdown();
            parts.cluster.abort();
            drop(parts.endpoint);
        }
        for t in tasks {
            t.abort();
        }
        stop_workers(workers).await;
        return Ok(());
    }
    info!("shutting down: draining connections");
    // Load balancers and Kubernetes stop sending clients here at once.
    health.set_ready(ReadyComponent::Listeners, false);
    let _ = stop_tx.send(true);
    let farewell = shared.farewell();
    match router.cluster() {
        Some(link) => link.close_all(&farewell),
        None => {
            for host in router.hosts() {
                let _ = host.try_send(CloseAllSessions(farewell.clone()));
            }
        }
    }
    let deadline = Instant::now() + grace;
    while shared.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.open.load(Ordering::Relaxed);
    if left > 0 {
        warn!(left, "connections still open after the grace period");
    }
    // Every write queued so far (last activity of the sessions just closed, roster
    // changes) reaches the store before the workers stop.
    let drained: Vec<_> = router
        .hosts()
        .iter()
        .filter_map(|host| {
            let (done, rx) = oneshot::channel();
            host.try_send(DrainStorage { done }).ok().map(|()| rx)
        })
        .collect();
    let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    if tokio::time::timeout(wait, futures_all(drained))
        .await
        .is_err()
    {
        warn!("storage writes still pending at shutdown");
    }
    if let Some(parts) = cluster {
        leave_cluster(parts, &router, grace).await;
    }
    for t in tasks {
        t.abort();
    }
    stop_workers(workers).await;
    info!("node stopped");
    Ok(())
}

/// Waits for the workers to finish, so everything they hold (the store's lock among
/// it) is released when this returns: a restart in the same process must be able to
/// open the store again.
async fn stop_workers(workers: Vec<Arbiter>) {
    for w in &workers {
        w.stop();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
}

/// Graceful leave: hands every shard off, routes what was parked meanwhile to the new
/// owners, lets the peer links send what they hold, then stops them.
async fn leave_cluster(parts: ClusterParts, router: &Router, grace: Duration) {
    let ClusterParts {
        cluster,
        endpoint,
        forwarder,
        follower,
    } = parts;
    if let Err(e) = cluster.leave(grace).await {
        warn!(error = %e, "leaving the cluster failed; other nodes take over when the leases expire");
    }
    router.retry_parked();
    let deadline = Instant::now() + grace;
    // Handoffs complete only towards a node that took the shards; the last node of a
    // cluster has none to wait for.
    let pending = || {
        router.parked() > 0
            || forwarder.pending() > 0
            || router
                .cluster()
                .is_some_and(|l| l.pending_handoffs() > 0 && l.has_peers())
    };
    while Instant::now() < deadline && pending() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        router.retry_parked();
    }
    follower.abort();
    forwarder.shutdown();
    endpoint.shutdown().await;
}

/// Waits for every receiver (a closed one counts as done).
async fn futures_all(receivers: Vec<oneshot::Receiver<()>>) {
    for rx in receivers {
        let _ = rx.await;
    }
}

/// The node's persistent secret (`<data_dir>/node-secret`, created with 32 random bytes
/// on first start, readable by the owner only). It keeps the fake SCRAM salts of unknown
/// accounts stable across attempts and restarts. Nodes of one cluster may share it.
fn node_secret(data_dir: &std::path::Path) -> std::io::Result<Arc<[u8]>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("node-secret");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() >= 16 => return Ok(Arc::from(bytes)),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is shorter than 16 bytes",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let secret: [u8; 32] = rand::random();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(&secret)?;
    file.sync_all()?;
    Ok(Arc::from(&secret[..]))
}
