//! `TestCluster`: a real `redis-server` on a free loopback port and several real nodes
//! sharing it, each with its own c2s, admin and cluster gRPC ports (all port 0).
//!
//! Nodes can be stopped gracefully (`stop`: they hand their shards off), killed
//! (`kill`: no goodbye, their leases expire), restarted under the same node id and on
//! the same client port (as a pod keeps its name, so clients find it again), and
//! Redis itself can be restarted. Shard leases are short (3 s) so failover tests
//! finish quickly.

use std::net::SocketAddr;
use std::time::Duration;

use jid::BareJid;
use shoal_node::cluster::shards::target;
use shoal_node::router::shard_of;
use shoal_node::testing::RedisServer;
use tempfile::TempDir;

use crate::{TestNode, eventually};

/// Shards per test cluster: enough to spread users over several nodes, few enough to
/// claim quickly.
pub const SHARDS: u32 = 64;

/// The first account name `{prefix}{n}` whose shard a cluster of `nodes` nodes (ids
/// `node0`…) gives to node `owner`: lets a test choose where an account lives.
pub fn account_owned_by(owner: usize, nodes: usize, prefix: &str, domain: &str) -> String {
    let ids: Vec<String> = (0..nodes).map(|i| format!("node{i}")).collect();
    (0..10_000)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| {
            let bare = BareJid::new(&format!("{name}@{domain}")).expect("valid JID");
            target(shard_of(&bare, SHARDS), &ids) == Some(ids[owner].as_str())
        })
        .expect("some account lands on every node")
}

/// Lease TTL of test nodes: a killed node's shards move within about this long.
pub const LEASE_TTL: Duration = Duration::from_millis(3000);

pub struct TestCluster {
    // Nodes first: fields drop in order, and nodes stop gracefully through Redis.
    nodes: Vec<Option<TestNode>>,
    pub redis: RedisServer,
    users: Vec<(String, String)>,
    /// One certificate for every node, as a deployment behind one name has.
    tls: TempDir,
    /// Settings of every node beyond the defaults, then those of node `i`.
    settings: Vec<(String, String)>,
    node_settings: Vec<Vec<(String, String)>>,
    /// Each node's client (STARTTLS) address, kept across restarts.
    c2s: Vec<SocketAddr>,
}

impl TestCluster {
    /// Starts Redis and `n` nodes, with these accounts created, and waits until every
    /// node is ready (member, every shard owned).
    pub fn start(n: usize, users: &[(&str, &str)]) -> Self {
        Self::start_with(n, users, "localhost", Vec::new(), Vec::new())
    }

    /// Like [`start`](Self::start) for `domain`, with `settings` for every node and
    /// `node_settings[i]` for node `i` (federation ports, say).
    pub fn start_with(
        n: usize,
        users: &[(&str, &str)],
        domain: &str,
        settings: Vec<(String, String)>,
        node_settings: Vec<Vec<(String, String)>>,
    ) -> Self {
        let tls = TempDir::new().expect("temp dir");
        shoal_node::tls::generate_self_signed(
            domain,
            &tls.path().join("cert.pem"),
            &tls.path().join("key.pem"),
        )
        .expect("test certificate");
        let mut cluster = Self {
            tls,
            settings: std::iter::once(("domain".to_owned(), domain.to_owned()))
                .chain(settings)
                .collect(),
            node_settings,
            nodes: Vec::new(),
            c2s: Vec::new(),
            redis: RedisServer::start(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
        };
        for _ in 0..n {
            cluster.add_node();
        }
        cluster
    }

    fn boot(&self, i: usize) -> TestNode {
        let mut builder = TestNode::builder()
            .set("storage.backend", "redis")
            .set("storage.redis_url", self.redis.url())
            .set("cluster.enabled", true)
            .set("cluster.node_id", format!("node{i}"))
            .set("cluster.listen", "127.0.0.1:0")
            .set("cluster.shards", SHARDS)
            .set("cluster.lease_ttl_ms", LEASE_TTL.as_millis())
            .set("s2s.dialback_secret", "shared by the test cluster's nodes")
            .set("tls.cert", self.tls.path().join("cert.pem").display())
            .set("tls.key", self.tls.path().join("key.pem").display());
        for (key, value) in self
            .settings
            .iter()
            .chain(self.node_settings.get(i).into_iter().flatten())
        {
            builder = builder.set(key, value);
        }
        // The accounts live in the shared Redis: the first node creates them.
        if self.c2s.is_empty() {
            for (u, p) in &self.users {
                builder = builder.user(u, p);
            }
        }
        if let Some(addr) = self.c2s.get(i) {
            builder = builder.set("c2s.bind", addr);
        }
        builder.start()
    }

    /// Starts one more node; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let node = self.boot(i);
        self.c2s.push(node.c2s);
        self.nodes.push(Some(node));
        i
    }

    /// Every node's client address, running or not (a restarted node listens there
    /// again).
    pub fn c2s_addrs(&self) -> &[SocketAddr] {
        &self.c2s
    }

    pub fn node(&self, i: usize) -> &TestNode {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Graceful stop (SIGTERM's path): streams closed, shards handed off.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].take().expect("node is running").stop();
    }

    /// Abrupt stop: as if the process died.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("node is running").kill();
    }

    /// Starts node `i` again under the same node id.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "stop or kill node {i} first");
        self.nodes[i] = Some(self.boot(i));
    }

    /// Running nodes' indexes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_some())
            .collect()
    }

    /// Waits until every running node reports ready (a member, every shard owned by a
    /// live node) and owns a share of the shards, as `/metrics` says.
    pub async fn settled(&self) {
        for i in self.running() {
            let node = self.node(i);
            eventually(Duration::from_secs(20), "node ready", || {
                matches!(crate::node::http_get(node.admin, "/readyz"), Ok((200, _)))
            })
            .await;
        }
    }
}
