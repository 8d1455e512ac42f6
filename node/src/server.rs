//! Assembles a node: storage, TLS, metrics, shard hosts, router, listeners and the admin
//! endpoint, and runs it until shutdown, then drains.
//!
//! [`run`] is a library function so tests boot real nodes in-process on port 0; the
//! binary's `main` only parses the command line. Shutdown is a drain: stop accepting,
//! close every stream with `<system-shutdown/>`, wait (bounded) for connections to end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use jid::BareJid;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::admin::{self, Health, ReadyComponent};
use crate::c2s::{self, Shared};
use crate::config::Config;
use crate::metrics::{self, Listener, Metrics};
use crate::roster::RosterLimits;
use crate::router::Router;
use crate::shard::{CloseAllSessions, DrainStorage, ShardConfig, ShardHost};
use crate::user::UserLimits;
use crate::{storage, tls};

/// Sockets a node serves, bound before it starts (so tests can bind port 0 and learn
/// the address first).
pub struct Listeners {
    pub c2s: std::net::TcpListener,
    pub direct_tls: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
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
}

/// Runs a node until `shutdown` resolves, then drains. Must run inside an actix
/// `System` (the binary and the test harness both provide one).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let domain = BareJid::new(&config.domain).context("invalid domain")?;
    let metrics = Metrics::new();
    let prometheus = metrics::install_recorder();
    let health = Health::requiring([ReadyComponent::Listeners, ReadyComponent::Storage]);
    let storage = storage::open(&config.storage)
        .await
        .context("cannot open storage")?;
    health.set_ready(ReadyComponent::Storage, true);
    let server_tls = tls::load_or_generate(
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
    let router = Router::new(domain.clone(), config.cluster.shards, metrics.clone());
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
    };
    let hosts = workers
        .iter()
        .map(|w| {
            let (router, storage, cfg) = (router.clone(), storage.clone(), shard_config.clone());
            ShardHost::start_in_arbiter(&w.handle(), move |_| ShardHost::new(router, storage, cfg))
        })
        .collect();
    router.set_hosts(hosts);

    let data_dir = config.data_dir.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
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
    health.set_ready(ReadyComponent::Listeners, true);
    if let Some(l) = listeners.admin {
        let l = tokio::net::TcpListener::from_std(l)?;
        info!(addr = %l.local_addr()?, "admin HTTP listening");
        let mut rx = stop_rx.clone();
        tasks.push(actix_rt::spawn(async move {
            let stopped = async move {
                let _ = rx.changed().await;
            };
            if let Err(e) = admin::serve(l, prometheus, health, stopped).await {
                warn!(error = %e, "admin endpoint failed");
            }
        }));
    }
    info!("node ready");

    shutdown.await;
    info!("shutting down: draining connections");
    let _ = stop_tx.send(true);
    for host in router.hosts() {
        let _ = host.try_send(CloseAllSessions);
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
    for t in tasks {
        t.abort();
    }
    // Wait for the workers to finish, so everything they hold (the store's lock among
    // it) is released when this returns: a restart in the same process must be able to
    // open the store again.
    for w in &workers {
        w.stop();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    info!("node stopped");
    Ok(())
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
