//! A real HAProxy (Debian's `haproxy`, installed by `scripts/test-deps.sh`) in front of
//! a node, forwarding TCP and announcing each client with a PROXY protocol header.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::program::Program;

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
    /// Held for its lifetime: dropping it stops HAProxy.
    _program: Program,
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
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&config_path);
        let mut program = Program::spawn("haproxy", command, dir, &[]);
        program.wait_until(Duration::from_secs(20), || {
            matches!(crate::node::http_get(ready, "/ready"), Ok((200, _)))
        });
        HaProxy {
            frontends,
            _program: program,
        }
    }
}
