//! `TestNode`: a real node on loopback, port 0, with its own data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shoal_node::config::Config;
use shoal_node::server::{self, Listeners, Stop};
use shoal_node::storage;
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Builds a [`TestNode`].
pub struct TestNodeBuilder {
    env: Vec<(String, String)>,
    users: Vec<(String, String)>,
    data_dir: Option<Arc<TempDir>>,
}

impl TestNodeBuilder {
    /// Sets a configuration key the way an operator would, through `SHOAL_*` variables
    /// (`key` is the dotted path, e.g. `c2s.max_stanza_size`).
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        let var = format!("SHOAL_{}", key.replace('.', "_").to_uppercase());
        self.env.push((var, value.to_string()));
        self
    }

    /// An account created before the node starts.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// Reuses another node's data directory (for restart tests).
    pub fn data_dir(mut self, dir: Arc<TempDir>) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// Starts the node and waits until it listens.
    pub fn start(self) -> TestNode {
        crate::init_logging();
        let dir = self
            .data_dir
            .unwrap_or_else(|| Arc::new(TempDir::new().expect("temp dir")));
        let mut env = vec![
            (
                "SHOAL_DATA_DIR".to_string(),
                dir.path().display().to_string(),
            ),
            ("SHOAL_C2S_BIND".into(), "127.0.0.1:0".into()),
            ("SHOAL_C2S_DIRECT_TLS_BIND".into(), "127.0.0.1:0".into()),
            ("SHOAL_ADMIN_BIND".into(), "127.0.0.1:0".into()),
            // Tests open many connections from one address.
            (
                "SHOAL_LIMITS_CONNECTIONS_PER_IP_PER_MINUTE".into(),
                "0".into(),
            ),
            (
                "SHOAL_LIMITS_AUTH_FAILURES_PER_IP_PER_MINUTE".into(),
                "0".into(),
            ),
            ("SHOAL_CLUSTER_SHARD_HOSTS".into(), "2".into()),
            // Federation off unless a test turns it on with its own DNS server: a
            // stanza to another domain would otherwise ask the system's resolver.
            ("SHOAL_S2S_BIND".into(), "".into()),
            ("SHOAL_SHUTDOWN_GRACE_SECS".into(), "5".into()),
        ];
        env.extend(self.env);
        let config = Config::load(None, env).unwrap_or_else(|e| panic!("test config: {e}"));
        if !self.users.is_empty() {
            provision(&config, &self.users);
        }
        let listeners = Listeners::bind(&config).expect("bind loopback listeners");
        let c2s = listeners.c2s_addr();
        let direct_tls = listeners.direct_tls_addr();
        let admin = listeners.admin_addr().expect("admin listener");
        let (stop_tx, stop_rx) = oneshot::channel::<Stop>();
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("shoal-test-node".into())
            .spawn(move || {
                let stopped = async { stop_rx.await.unwrap_or(Stop::Drain) };
                if let Err(e) =
                    actix_rt::System::new().block_on(server::run_until(cfg, listeners, stopped))
                {
                    panic!("node failed: {e:#}");
                }
            })
            .expect("node thread");
        let node = TestNode {
            c2s,
            direct_tls,
            admin,
            domain: config.domain.clone(),
            cert: config.tls.cert.clone(),
            dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        node.wait_ready();
        node
    }
}

/// Creates accounts in the node's store before it runs (the embedded store is locked
/// while a node holds it).
fn provision(config: &Config, users: &[(String, String)]) {
    // On its own thread: the caller is usually inside a test's async runtime.
    std::thread::scope(|s| {
        s.spawn(|| provision_blocking(config, users))
            .join()
            .expect("provisioning panicked");
    });
}

fn provision_blocking(config: &Config, users: &[(String, String)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = storage::open(&config.storage).await.expect("open store");
        for (name, password) in users {
            let jid = format!("{name}@{}", config.domain);
            let creds = storage::new_credentials(password);
            match store.accounts.create_account(&jid, &creds).await {
                Ok(()) | Err(storage::StorageError::AlreadyExists) => {}
                Err(e) => panic!("create {jid}: {e}"),
            }
        }
    });
}

/// A running node. Dropping it stops it gracefully.
pub struct TestNode {
    pub c2s: SocketAddr,
    pub direct_tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub domain: String,
    cert: PathBuf,
    dir: Arc<TempDir>,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<JoinHandle<()>>,
}

impl TestNode {
    pub fn builder() -> TestNodeBuilder {
        TestNodeBuilder {
            env: Vec::new(),
            users: Vec::new(),
            data_dir: None,
        }
    }

    /// The node's certificate (self-signed, generated at start), for clients to trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    pub fn data_dir(&self) -> Arc<TempDir> {
        self.dir.clone()
    }

    /// Stops the node gracefully (SIGTERM's path) and waits for it.
    pub fn stop(mut self) {
        self.shutdown(Stop::Drain);
    }

    /// Stops the node at once, as if its process died: clients and peers see their
    /// connections drop, the cluster learns of it only when its leases expire.
    pub fn kill(mut self) {
        self.shutdown(Stop::Abort);
    }

    fn shutdown(&mut self, how: Stop) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(how);
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("node thread panicked");
        }
    }

    fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok((200, _)) = http_get(self.admin, "/readyz") {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("node did not become ready");
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("scrape").1
    }

    /// The value of one sample in `/metrics` (`name{labels}` exactly as exported), 0 if
    /// absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown(Stop::Drain);
    }
}

/// A minimal blocking HTTP/1.0 GET (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}
