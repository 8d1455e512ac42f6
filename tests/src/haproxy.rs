//! A real HAProxy (Debian's `haproxy`, installed by `scripts/test-deps.sh`) in front of
//! a node, forwarding TCP and announcing each client with a PROXY protocol header.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Which PROXY header HAProxy sends to the node (`send-proxy` / `send-proxy-v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    V1,
    V2,
}

impl ProxyHeader {
    fn server_option(self) -> &'static str {
        match self {
            ProxyHeader::V1 => "send-proxy",
            ProxyHeader::V2 => "send-proxy-v2",
        }
    }
}

/// HAProxy in the foreground (`-db`) with one TCP frontend per route, each on its own
/// free loopback port. Killed when dropped.
pub struct HaProxy {
    /// The frontends, in the order of the routes given to [`HaProxy::start`].
    pub frontends: Vec<SocketAddr>,
    dir: TempDir,
    child: Child,
}

impl HaProxy {
    /// Starts HAProxy forwarding frontend `i` to `routes[i].0` with header `routes[i].1`,
    /// and waits until it serves.
    pub fn start(routes: &[(SocketAddr, ProxyHeader)]) -> HaProxy {
        let dir = TempDir::new().expect("temp dir");
        let frontends: Vec<SocketAddr> = routes
            .iter()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], crate::free_port())))
            .collect();
        // An HTTP frontend that answers by itself: probing it tells that HAProxy is up
        // (it binds every frontend before serving any) without sending a connection
        // to the node.
        let ready = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut config = format!(
            "global\n    maxconn 256\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend ready\n    mode http\n    bind {ready}\n    monitor-uri /ready\n"
        );
        for (i, ((backend, header), frontend)) in routes.iter().zip(&frontends).enumerate() {
            config.push_str(&format!(
                "\nfrontend f{i}\n    bind {frontend}\n    default_backend b{i}\n\n\
                 backend b{i}\n    server node {backend} {}\n",
                header.server_option()
            ));
        }
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config).expect("write HAProxy's configuration");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log file");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run haproxy ({e}): run `bash scripts/test-deps.sh` to install it")
            });
        let mut haproxy = HaProxy {
            frontends,
            dir,
            child,
        };
        haproxy.wait_ready(ready);
        haproxy
    }

    /// What HAProxy printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.log")
    }

    fn wait_ready(&mut self, ready: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(crate::node::http_get(ready, "/ready"), Ok((200, _))) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("haproxy exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not serve within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(crate::POLL);
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- HAProxy's output ---\n{}", self.log());
        }
    }
}
