//! Node configuration: one optional TOML file plus `SHOAL_*` environment overrides,
//! turned into one typed struct per component.
//!
//! This module owns the list of keys, their defaults (with the reason for each next to
//! the field), and validation. Loading never stops at the first problem: every type
//! error, unknown key and out-of-range value is collected and reported together, so an
//! operator fixes a config in one round trip instead of one restart per typo.
//!
//! It must never act on the configuration: it opens no sockets, creates no directories
//! and generates no certificates. It only reads the one file it is given.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// Environment variables with the `SHOAL_` prefix that are not config keys and so must
/// not be reported as unknown.
const NON_KEY_ENV_VARS: &[&str] = &["SHOAL_LOG", "SHOAL_CONFIG"];

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `domain`, default `localhost`: the XMPP domain this node serves. `localhost` lets a
    /// fresh install accept local clients without any DNS set up.
    pub domain: String,
    /// `data_dir`, default `./data`: where the embedded store and the generated
    /// certificate live unless their own paths are given. Relative to the working
    /// directory so a first start needs no configuration at all.
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub tls: TlsConfig,
    pub c2s: C2sConfig,
    pub limits: LimitsConfig,
    pub registration: RegistrationConfig,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub muc: MucConfig,
    pub s2s: S2sConfig,
    pub shutdown: ShutdownConfig,
}

/// `[s2s]`: federation with other XMPP servers (RFC 6120, XEP-0220 dialback, XEP-0178
/// SASL EXTERNAL, XEP-0368 direct TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S2sConfig {
    /// `s2s.bind`, default `0.0.0.0:5269`: where peer servers connect. `""` turns
    /// federation off: no listener, and stanzas to other domains bounce with
    /// `<remote-server-not-found/>`.
    pub bind: Option<SocketAddr>,
    /// `s2s.direct_tls_bind`, default `""` (off): where peer servers connect with TLS
    /// from the first byte (XEP-0368), as an `_xmpps-server._tcp` SRV record of the
    /// domain announces. Needs `s2s.bind`.
    pub direct_tls_bind: Option<SocketAddr>,
    /// `s2s.ca_file`: a PEM file of certificate authorities trusted for peers'
    /// certificates besides the web PKI roots (a private federation's CA). A peer with
    /// a certificate valid for its domain may authenticate by SASL EXTERNAL
    /// (XEP-0178); any other falls back to dialback.
    pub ca_file: Option<PathBuf>,
    /// `s2s.dialback_secret`: the XEP-0185 key secret. Every node of a deployment must
    /// share it, so any node can confirm a key another issued; required in cluster mode.
    /// Default (single node): a random one per start.
    pub dialback_secret: String,
    /// `s2s.nameservers`: `ip:port` of the DNS servers asked for remote domains' SRV
    /// records; empty (the default) uses the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// `s2s.tls_required`, default `true`: no stream without TLS, either way.
    pub tls_required: bool,
    /// `s2s.insecure_domains`: remote domains whose TLS certificates are not checked
    /// (test setups with self-signed certificates); dialback still authenticates them.
    pub insecure_domains: Vec<String>,
    /// `s2s.allow_domains`: if not empty, the only remote domains federated with.
    pub allow_domains: Vec<String>,
    /// `s2s.deny_domains`: remote domains never federated with.
    pub deny_domains: Vec<String>,
    /// `s2s.connect_timeout_secs`, default 10: one connection attempt, and separately
    /// the stream negotiation on it.
    pub connect_timeout: Duration,
    /// `s2s.idle_timeout_secs`, default 600: an outbound stream with nothing to send
    /// for this long is closed; an inbound one that sends nothing, too.
    pub idle_timeout: Duration,
    /// `s2s.queue_max`, default 1000: stanzas waiting for one remote domain's stream
    /// while it connects; beyond it they bounce with `<resource-constraint/>`.
    pub queue_max: usize,
    /// `s2s.proxy_protocol`, `s2s.proxy_trusted`, `s2s.proxy_header_timeout_secs`: as
    /// for `c2s`, on the s2s listener. `None` (the default): off.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// The PROXY protocol (HAProxy's v1 and v2 headers) on a listener that sits behind a
/// TCP load balancer, so the node learns each connection's real source address.
///
/// Read from `<section>.proxy_protocol` (default `false`), `<section>.proxy_trusted`
/// and `<section>.proxy_header_timeout_secs`; present only when turned on. Then every
/// connection must come from a trusted address and start with a header: the listener
/// serves the load balancers only, so nobody can reach it directly with a spoofed
/// header, and nobody can bypass the balancer and be counted as it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolConfig {
    /// `<section>.proxy_trusted`, required when on: the load balancers' networks
    /// (`10.0.0.0/8`, `fd00::/8`) or addresses. Connections from anywhere else are
    /// refused before a byte is read.
    pub trusted: Vec<IpNet>,
    /// `<section>.proxy_header_timeout_secs`, default 5 s, must be > 0: how long a
    /// trusted connection may take to send its header. A balancer sends it with its
    /// first segment; the bound frees the slot of a connection that sends nothing.
    pub header_timeout: Duration,
}

impl ProxyProtocolConfig {
    /// Whether `ip` is one of the trusted load balancers. IPv4-mapped IPv6 addresses
    /// (a dual-stack socket's view of an IPv4 peer) count as their IPv4 address.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// `[muc]`: the multi-user chat service (XEP-0045).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MucConfig {
    /// `muc.enabled`, default `true`: group chat is something users of a server expect.
    pub enabled: bool,
    /// `muc.service`, default `conference.<domain>`: the service's domain; rooms are
    /// `room@<service>`. The conventional name clients look for first.
    pub service: String,
    /// `muc.presence_broadcast_max`, default 0 = no limit: above this many occupants a
    /// room tells only the moderators (and the occupant itself) of arrivals,
    /// departures and presence changes, because that traffic grows with the square
    /// of the occupants. Off by default, as XEP-0045 has every occupant told.
    pub presence_broadcast_max: usize,
}

/// Which storage backend holds accounts and the rest of the persistent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageBackend {
    /// A single redb file: durable, needs no external service.
    Embedded,
    /// Process memory: everything is lost on exit. For tests and throwaway nodes.
    Memory,
    /// A Redis server shared by every node of a cluster; durable when Redis runs with
    /// the append-only file on.
    Redis,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// `storage.backend`, default `embedded`: single-node installs should keep their data
    /// across restarts without running anything else.
    pub backend: StorageBackend,
    /// `storage.path`, default `<data_dir>/shoal.redb`: the embedded store's file. Unused
    /// by the other backends.
    pub path: PathBuf,
    /// `storage.redis_url`, default `redis://127.0.0.1:6379/`: the Redis server of the
    /// redis backend: `redis://[[user]:password@]host[:port][/db]` or
    /// `redis+unix:///path`. TLS (`rediss://`) is not built in; reach a remote Redis
    /// over a private network or a TLS tunnel. The default is where a local Redis
    /// listens out of the box. Unused by the other backends, but checked whenever it
    /// is given.
    pub redis_url: String,
    /// `storage.redis_key_prefix`, default `shoal:`, must not be empty: the start of
    /// every key Shoal writes, so that several deployments (or other applications) can
    /// share one Redis without their keys meeting.
    pub redis_key_prefix: String,
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// `tls.cert`, default `<data_dir>/tls/cert.pem`: PEM certificate chain.
    pub cert: PathBuf,
    /// `tls.key`, default `<data_dir>/tls/key.pem`: PEM private key.
    pub key: PathBuf,
    /// True when neither `tls.cert` nor `tls.key` was given: the node generates a
    /// self-signed certificate at the default paths on first start (and reuses it
    /// afterwards), so TLS works out of the box. Certificates the operator names are
    /// never generated or overwritten.
    pub self_signed: bool,
}

/// `[c2s]`: client-to-server listeners and per-connection limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2sConfig {
    /// `c2s.bind`, default `0.0.0.0:5222`: the STARTTLS listener on the IANA c2s port.
    pub bind: SocketAddr,
    /// `c2s.direct_tls_bind`, default `0.0.0.0:5223`: the XEP-0368 direct TLS listener,
    /// on by default because it saves clients a round trip. An empty string disables it.
    pub direct_tls_bind: Option<SocketAddr>,
    /// `c2s.starttls_required`, default `true`: RFC 6120 §5.1 says servers should require
    /// TLS; turning it off is only for debugging with plaintext captures.
    pub starttls_required: bool,
    /// `c2s.max_stanza_size`, default 262144 bytes, allowed 4096..=16 MiB: the largest
    /// top-level element accepted. 256 KiB fits avatars and file-transfer offers;
    /// RFC 6120 §13.12 requires at least 10000 bytes, and beyond 16 MiB one client could
    /// pin too much memory.
    pub max_stanza_size: usize,
    /// `c2s.max_depth`, default 32, allowed 2..=256: the deepest element nesting accepted.
    /// Real stanzas rarely exceed 10 levels; the cap keeps parsing cost linear.
    pub max_depth: usize,
    /// `c2s.negotiation_timeout_secs`, default 30 s, must be > 0: time allowed from TCP
    /// accept to resource binding, so half-open or stalled handshakes free their slot.
    pub negotiation_timeout: Duration,
    /// `c2s.idle_timeout_secs`, default 600 s, must be > 0: an established stream that
    /// sends nothing for this long is closed. Ten minutes outlasts mobile clients' usual
    /// keepalive interval.
    pub idle_timeout: Duration,
    /// `c2s.outbound_buffer_max`, default 1048576 bytes, must be ≥ `max_stanza_size`: how
    /// much unsent output a slow reader may accumulate before it is disconnected. Four
    /// maximum-size stanzas; smaller than one stanza could never be delivered.
    pub outbound_buffer_max: usize,
    /// `c2s.read_rate_bytes_per_sec`, default 0 = unlimited: per-connection read traffic
    /// shaping. Off by default because the right rate depends on the deployment.
    pub read_rate_bytes_per_sec: u64,
    /// `c2s.read_burst_bytes`, default 65536, must be > 0 when shaping is on: how far a
    /// connection may run ahead of the shaping rate, so short bursts (login, roster
    /// fetch) are not slowed.
    pub read_burst_bytes: u64,
    /// `c2s.max_connections`, default 100000, must be > 0: total c2s connections this node
    /// accepts, a bound on memory and file descriptors.
    pub max_connections: usize,
    /// `c2s.proxy_protocol` (default `false`), `c2s.proxy_trusted`,
    /// `c2s.proxy_header_timeout_secs`: the PROXY protocol on both client listeners.
    /// Off by default, since a client reaching the node directly sends no header.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// `[limits]`: abuse limits keyed by client IP or account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `limits.connections_per_ip_per_minute`, default 120, 0 = unlimited: generous for
    /// NATed offices, low enough to blunt connection floods.
    pub connections_per_ip_per_minute: u32,
    /// `limits.auth_failures_per_ip_per_minute`, default 10, 0 = unlimited: slows password
    /// guessing without locking out someone who mistyped a few times.
    pub auth_failures_per_ip_per_minute: u32,
    /// `limits.max_resources_per_user`, default 10, must be > 0: concurrent sessions per
    /// account, enough for every device a person owns.
    pub max_resources_per_user: usize,
    /// `limits.max_offline_messages`, default 1000, must be > 0: messages kept for an
    /// offline account (XEP-0160); beyond it senders get `<service-unavailable/>`, so
    /// one flooded account cannot fill the disk.
    pub max_offline_messages: usize,
    /// `limits.max_roster_items`, default 2000, must be > 0: roster size; adding more
    /// is `<not-acceptable/>` (RFC 6121 §2.3.3). Large enough for busy support desks.
    pub max_roster_items: usize,
    /// `limits.max_roster_name_len`, default 1023 bytes: longest item name or group.
    pub max_roster_name_len: usize,
    /// `limits.max_roster_groups`, default 32: groups per roster item.
    pub max_roster_groups: usize,
    /// `limits.max_blocklist_items`, default 1000, must be > 0 (XEP-0191).
    pub max_blocklist_items: usize,
}

/// `[registration]`: XEP-0077 in-band registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// `registration.enabled`, default `true`: a fresh node should be usable without an
    /// admin tool to create the first accounts.
    pub enabled: bool,
    /// `registration.per_ip_per_hour`, default 10, 0 = unlimited: bounds account spam from
    /// one address.
    pub per_ip_per_hour: u32,
}

/// `[admin]`: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `admin.bind`, default `127.0.0.1:9090`: loopback only, because metrics are not for
    /// the public internet; set `0.0.0.0:9090` for scraping from outside a pod. An empty
    /// string disables it.
    pub bind: Option<SocketAddr>,
}

/// `[cluster]`: how work is divided into shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `cluster.shards`, default 1024, a power of two in 16..=65536: the number of shards
    /// bare JIDs hash onto. A power of two so the shard is a mask of the hash; 1024 spreads
    /// evenly over many nodes while keeping per-shard overhead small. Must be the same on
    /// every node of a cluster.
    pub shards: u32,
    /// `cluster.shard_hosts`, default 0 = one per CPU core: how many shard-host tasks run
    /// the shards on this node. Use [`ClusterConfig::effective_shard_hosts`].
    pub shard_hosts: usize,
    /// `cluster.enabled`, default `false`: run as one node of a cluster. Off by default
    /// so a single node needs nothing but itself; on, it needs `storage.backend =
    /// "redis"` (every node must see the same data) and coordinates through that same
    /// Redis server (`storage.redis_url`, keys under `storage.redis_key_prefix`).
    pub enabled: bool,
    /// `cluster.node_id`, required when the cluster is enabled: this node's stable name,
    /// 1 to 64 characters from `A-Z a-z 0-9 . _ -` (a StatefulSet pod name fits). Stable
    /// across restarts, so a restarted node is recognised and its old sessions purged.
    pub node_id: String,
    /// `cluster.listen`, default `0.0.0.0:7070`: where the node-to-node gRPC endpoint
    /// listens.
    pub listen: SocketAddr,
    /// `cluster.endpoint`, default: `cluster.listen` when it names a specific address,
    /// else required: `host:port` the other nodes dial to reach this one (a pod's
    /// headless-service name, for example), announced through Redis.
    pub endpoint: String,
    /// `cluster.lease_ttl_ms`, default 6000 ms, allowed 300..=60000: how long a shard
    /// lease lasts without renewal (renewed every third of it). It is how long the
    /// shards of a node that died stay unserved, against how many Redis round trips a
    /// healthy node spends renewing: 6 s fails over well inside client reconnect times.
    pub lease_ttl: Duration,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// `shutdown.grace_secs`, default 10 s: how long a draining node waits for streams to
    /// close and shards to hand off before exiting anyway. Well under Kubernetes' default
    /// 30 s termination grace period.
    pub grace: Duration,
    /// `shutdown.see_other_host`, default none: `host` or `host:port` (`[v6]:port`)
    /// of a server that takes over. When set, a draining node closes client streams
    /// with `<see-other-host/>` naming it (RFC 6120 §4.9.3.19) instead of
    /// `<system-shutdown/>`, so clients reconnect there at once rather than after
    /// their back-off. Empty (the default): clients reconnect through the usual
    /// address, which a load balancer already sends to the remaining nodes.
    pub see_other_host: Option<String>,
}

impl ClusterConfig {
    /// The number of shard hosts to run: `shard_hosts`, or the CPU count when it is 0.
    pub fn effective_shard_hosts(&self) -> usize {
        if self.shard_hosts > 0 {
            return self.shard_hosts;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

impl Default for Config {
    /// The configuration used with no file and no environment overrides.
    fn default() -> Self {
        Self::load(None, std::iter::empty()).expect("built-in defaults are valid")
    }
}

impl Config {
    /// Loads the configuration from an optional TOML file, then applies `SHOAL_*`
    /// overrides from `env` (usually `std::env::vars()`), then validates everything.
    ///
    /// An override's name is its key path with dots as `_`, uppercased:
    /// `c2s.max_stanza_size` is `SHOAL_C2S_MAX_STANZA_SIZE`. Overrides win over the file.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let table = match path {
            Some(path) => read_file(path).unwrap_or_else(|e| {
                // Keep going with an empty file so environment problems are reported too.
                errors.push(e);
                toml::Table::new()
            }),
            None => toml::Table::new(),
        };
        let env = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SHOAL_") && !NON_KEY_ENV_VARS.contains(&k.as_str()))
            .collect();
        let mut r = Reader::new(table, env, errors);
        let config = read_config(&mut r);
        r.finish()?;
        Ok(config)
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
}

/// Reads every known key, then checks ranges and relations between keys. Range checks
/// are skipped for keys that already failed to parse, so one mistake yields one error.
fn read_config(r: &mut Reader) -> Config {
    let domain: String = r.get("domain", "localhost".to_owned());
    if let Err(reason) = validate_domain(&domain) {
        r.invalid("domain", reason);
    }
    let data_dir: PathBuf = r.get("data_dir", PathBuf::from("./data"));

    let storage = StorageConfig {
        backend: r.get("storage.backend", StorageBackend::Embedded),
        path: r.get("storage.path", data_dir.join("shoal.redb")),
        redis_url: r.get("storage.redis_url", "redis://127.0.0.1:6379/".to_owned()),
        redis_key_prefix: r.get("storage.redis_key_prefix", "shoal:".to_owned()),
    };
    if !r.failed("storage.redis_url")
        && let Err(reason) = validate_redis_url(&storage.redis_url)
    {
        r.invalid("storage.redis_url", reason);
    }
    if !r.failed("storage.redis_key_prefix") && storage.redis_key_prefix.is_empty() {
        r.invalid(
            "storage.redis_key_prefix",
            "must not be empty, so Shoal's keys stay apart from anything else in Redis".to_owned(),
        );
    }

    let cert: Option<PathBuf> = r.get("tls.cert", None);
    let key: Option<PathBuf> = r.get("tls.key", None);
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => TlsConfig {
            cert,
            key,
            self_signed: false,
        },
        (cert, key) => {
            // One without the other is almost certainly a mistake; generating a key for a
            // given certificate (or the reverse) could never produce a working pair.
            if !r.failed("tls.cert") && !r.failed("tls.key") && (cert.is_some() || key.is_some()) {
                let (given, missing) = if cert.is_some() {
                    ("tls.cert", "tls.key")
                } else {
                    ("tls.key", "tls.cert")
                };
                r.invalid(
                    given,
                    format!("is set but {missing} is not; give both or neither"),
                );
            }
            TlsConfig {
                cert: data_dir.join("tls").join("cert.pem"),
                key: data_dir.join("tls").join("key.pem"),
                self_signed: true,
            }
        }
    };

    let c2s = C2sConfig {
        bind: r.get("c2s.bind", SocketAddr::from(([0, 0, 0, 0], 5222))),
        direct_tls_bind: r.get(
            "c2s.direct_tls_bind",
            Some(SocketAddr::from(([0, 0, 0, 0], 5223))),
        ),
        starttls_required: r.get("c2s.starttls_required", true),
        max_stanza_size: r.get_in("c2s.max_stanza_size", 262_144, 4096..=16 << 20),
        max_depth: r.get_in("c2s.max_depth", 32, 2..=256),
        negotiation_timeout: r.get_secs("c2s.negotiation_timeout_secs", 30),
        idle_timeout: r.get_secs("c2s.idle_timeout_secs", 600),
        outbound_buffer_max: r.get("c2s.outbound_buffer_max", 1_048_576),
        read_rate_bytes_per_sec: r.get("c2s.read_rate_bytes_per_sec", 0),
        read_burst_bytes: r.get("c2s.read_burst_bytes", 65_536),
        max_connections: r.get_at_least("c2s.max_connections", 100_000, 1),
        proxy_protocol: read_proxy_protocol(
            r,
            [
                "c2s.proxy_protocol",
                "c2s.proxy_trusted",
                "c2s.proxy_header_timeout_secs",
            ],
        ),
    };
    for (key, value) in [
        ("c2s.negotiation_timeout_secs", c2s.negotiation_timeout),
        ("c2s.idle_timeout_secs", c2s.idle_timeout),
    ] {
        if !r.failed(key) && value.is_zero() {
            r.invalid(key, "must be greater than 0".to_owned());
        }
    }
    if !r.failed("c2s.outbound_buffer_max")
        && !r.failed("c2s.max_stanza_size")
        && c2s.outbound_buffer_max < c2s.max_stanza_size
    {
        r.invalid(
            "c2s.outbound_buffer_max",
            format!(
                "is {} but must be at least c2s.max_stanza_size ({}), or a maximum-size \
                 stanza could never be sent",
                c2s.outbound_buffer_max, c2s.max_stanza_size
            ),
        );
    }
    if !r.failed("c2s.read_burst_bytes")
        && !r.failed("c2s.read_rate_bytes_per_sec")
        && c2s.read_rate_bytes_per_sec > 0
        && c2s.read_burst_bytes == 0
    {
        r.invalid(
            "c2s.read_burst_bytes",
            "must be greater than 0 when c2s.read_rate_bytes_per_sec is set".to_owned(),
        );
    }

    let limits = LimitsConfig {
        connections_per_ip_per_minute: r.get("limits.connections_per_ip_per_minute", 120),
        auth_failures_per_ip_per_minute: r.get("limits.auth_failures_per_ip_per_minute", 10),
        max_resources_per_user: r.get_at_least("limits.max_resources_per_user", 10, 1),
        max_offline_messages: r.get_at_least("limits.max_offline_messages", 1000, 1),
        max_roster_items: r.get_at_least("limits.max_roster_items", 2000, 1),
        max_roster_name_len: r.get_at_least("limits.max_roster_name_len", 1023, 1),
        max_roster_groups: r.get_at_least("limits.max_roster_groups", 32, 1),
        max_blocklist_items: r.get_at_least("limits.max_blocklist_items", 1000, 1),
    };
    let muc = MucConfig {
        enabled: r.get("muc.enabled", true),
        service: r.get("muc.service", format!("conference.{domain}")),
        presence_broadcast_max: r.get("muc.presence_broadcast_max", 0),
    };
    if r.failed("domain") {
        // The default service name is derived from the domain: one error is enough.
    } else if let Err(reason) = validate_domain(&muc.service) {
        r.invalid("muc.service", reason);
    } else if muc.service == domain {
        r.invalid(
            "muc.service",
            "must differ from domain: rooms and accounts would share addresses".to_owned(),
        );
    }
    let mut s2s = S2sConfig {
        bind: r.get("s2s.bind", Some(SocketAddr::from(([0, 0, 0, 0], 5269)))),
        direct_tls_bind: r.get("s2s.direct_tls_bind", None),
        ca_file: r.get("s2s.ca_file", None),
        dialback_secret: r.get("s2s.dialback_secret", String::new()),
        nameservers: Vec::new(),
        tls_required: r.get("s2s.tls_required", true),
        insecure_domains: r.get("s2s.insecure_domains", Vec::new()),
        allow_domains: r.get("s2s.allow_domains", Vec::new()),
        deny_domains: r.get("s2s.deny_domains", Vec::new()),
        connect_timeout: r.get_secs("s2s.connect_timeout_secs", 10),
        idle_timeout: r.get_secs("s2s.idle_timeout_secs", 600),
        queue_max: r.get_at_least("s2s.queue_max", 1000, 1),
        proxy_protocol: read_proxy_protocol(
            r,
            [
                "s2s.proxy_protocol",
                "s2s.proxy_trusted",
                "s2s.proxy_header_timeout_secs",
            ],
        ),
    };
    let nameservers: Vec<String> = r.get("s2s.nameservers", Vec::new());
    for ns in nameservers {
        match ns.parse() {
            Ok(addr) => s2s.nameservers.push(addr),
            Err(_) => r.invalid(
                "s2s.nameservers",
                format!("{ns:?} is not an IP address and port such as \"192.0.2.53:53\""),
            ),
        }
    }
    for (key, domains) in [
        ("s2s.insecure_domains", &s2s.insecure_domains),
        ("s2s.allow_domains", &s2s.allow_domains),
        ("s2s.deny_domains", &s2s.deny_domains),
    ] {
        for d in domains {
            if let Err(reason) = validate_domain(d) {
                r.invalid(key, format!("{d:?}: {reason}"));
            }
        }
    }
    if s2s.bind.is_none() && s2s.direct_tls_bind.is_some() {
        r.invalid(
            "s2s.direct_tls_bind",
            "needs s2s.bind: with s2s.bind = \"\" federation is off".to_owned(),
        );
    }
    let registration = RegistrationConfig {
        enabled: r.get("registration.enabled", true),
        per_ip_per_hour: r.get("registration.per_ip_per_hour", 10),
    };
    let admin = AdminConfig {
        bind: r.get("admin.bind", Some(SocketAddr::from(([127, 0, 0, 1], 9090)))),
    };

    let mut cluster = ClusterConfig {
        shards: r.get_in("cluster.shards", 1024, 16..=65_536),
        shard_hosts: r.get("cluster.shard_hosts", 0),
        enabled: r.get("cluster.enabled", false),
        node_id: r.get("cluster.node_id", String::new()),
        listen: r.get("cluster.listen", SocketAddr::from(([0, 0, 0, 0], 7070))),
        endpoint: r.get("cluster.endpoint", String::new()),
        lease_ttl: Duration::from_millis(r.get_in("cluster.lease_ttl_ms", 6000, 300..=60_000)),
    };
    if cluster.enabled {
        check_cluster(r, &mut cluster, storage.backend);
        if s2s.bind.is_some() && s2s.dialback_secret.is_empty() {
            r.invalid(
                "s2s.dialback_secret",
                "must be set in cluster mode (or s2s.bind = \"\"): every node must confirm \
                 the dialback keys the others issue"
                    .to_owned(),
            );
        }
    }
    if !r.failed("cluster.shards") && !cluster.shards.is_power_of_two() {
        r.invalid(
            "cluster.shards",
            format!("is {} but must be a power of two", cluster.shards),
        );
    }
    let shutdown = ShutdownConfig {
        grace: r.get_secs("shutdown.grace_secs", 10),
        see_other_host: r.get("shutdown.see_other_host", None),
    };
    if let Some(host) = &shutdown.see_other_host
        && !valid_host_port(host)
    {
        let reason = format!("{host:?} is not host or host:port (IPv6 as [address]:port)");
        r.invalid("shutdown.see_other_host", reason);
    }

    Config {
        domain,
        data_dir,
        storage,
        tls,
        c2s,
        limits,
        registration,
        admin,
        cluster,
        muc,
        s2s,
        shutdown,
    }
}

/// What cluster mode needs: Redis storage, a valid node id, an endpoint others can
/// dial. Fills the endpoint from `cluster.listen` when that names a specific address.
fn check_cluster(r: &mut Reader, cluster: &mut ClusterConfig, backend: StorageBackend) {
    if backend != StorageBackend::Redis && !r.failed("storage.backend") {
        r.invalid(
            "cluster.enabled",
            "requires storage.backend = \"redis\": every node must read and write the \
             same data"
                .to_owned(),
        );
    }
    if cluster.node_id.is_empty() {
        r.invalid(
            "cluster.node_id",
            "must be set when cluster.enabled is true".to_owned(),
        );
    } else if let Err(e) = crate::cluster::forward::NodeId::new(&cluster.node_id) {
        r.invalid("cluster.node_id", e.to_string());
    }
    if cluster.endpoint.is_empty() {
        if cluster.listen.ip().is_unspecified() {
            r.invalid(
                "cluster.endpoint",
                format!(
                    "must be set when cluster.listen ({}) does not name one address: \
                     give the host:port other nodes dial",
                    cluster.listen
                ),
            );
        } else {
            cluster.endpoint = cluster.listen.to_string();
        }
    } else if !valid_endpoint(&cluster.endpoint) {
        let reason = format!("{:?} is not host:port", cluster.endpoint);
        r.invalid("cluster.endpoint", reason);
    }
}

/// `host:port` with a non-empty host without spaces and a port number.
fn valid_endpoint(endpoint: &str) -> bool {
    endpoint.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

/// The content of `<see-other-host/>` (RFC 6120 §4.9.3.19): a domain name or IPv4
/// address with an optional port, or an IPv6 address in brackets with an optional port.
fn valid_host_port(s: &str) -> bool {
    let (host_ok, port) = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let host = s.split(':').next().unwrap_or_default();
            let name_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            (
                !host.is_empty() && host.chars().all(name_chars),
                &s[host.len()..],
            )
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

/// The PROXY protocol keys of one listener: `[on/off, trusted networks, header timeout]`.
/// `None` when off; when on, a trusted network is required.
fn read_proxy_protocol(r: &mut Reader, keys: [&'static str; 3]) -> Option<ProxyProtocolConfig> {
    let [on_key, trusted_key, timeout_key] = keys;
    let on = r.get(on_key, false);
    let listed: Vec<String> = r.get(trusted_key, Vec::new());
    let header_timeout = r.get_secs(timeout_key, 5);
    if !r.failed(timeout_key) && header_timeout.is_zero() {
        r.invalid(timeout_key, "must be greater than 0".to_owned());
    }
    let mut trusted = Vec::with_capacity(listed.len());
    for entry in listed {
        // A bare address is the network of that one address.
        match entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        {
            Ok(net) => trusted.push(net.trunc()),
            Err(_) => r.invalid(
                trusted_key,
                format!("{entry:?} is not an IP network such as \"10.0.0.0/8\" or an address"),
            ),
        }
    }
    if on && trusted.is_empty() && !r.failed(trusted_key) {
        r.invalid(
            trusted_key,
            format!(
                "must name the load balancers' networks when {on_key} is true: only they may \
                 say where a connection comes from"
            ),
        );
    }
    on.then_some(ProxyProtocolConfig {
        trusted,
        header_timeout,
    })
}

/// The checks a served domain must pass (RFC 7622 §3.2, without IDNA processing).
fn validate_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if domain.len() > 1023 {
        return Err(format!("is {} bytes long; the limit is 1023", domain.len()));
    }
    if let Some(c) = domain
        .chars()
        .find(|c| matches!(c, '@' | '/') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{domain:?} contains {c:?}, which no domain may contain"
        ));
    }
    Ok(())
}

/// Whether the redis crate can connect with `url` (scheme, host, port, database).
/// Parsing only: nothing is contacted here. The message repeats the URL only when it
/// carries no password.
fn validate_redis_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    match url.into_connection_info() {
        Ok(_) => Ok(()),
        Err(e) => {
            let shown = if url.contains('@') {
                "the URL".to_owned()
            } else {
                format!("{url:?}")
            };
            Err(format!(
                "is not a usable Redis URL: {shown}: {e}; expected \
                 redis://[[user]:password@]host[:port][/db] or redis+unix:///path"
            ))
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File,
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File => f.write_str("config file"),
            Self::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// One problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{key} (from {origin}): expected {expected}, found {found}")]
    WrongType {
        key: String,
        origin: Origin,
        expected: &'static str,
        found: String,
    },
    #[error("unknown key `{key}` in config file")]
    UnknownKey { key: String },
    #[error("unknown environment variable {var}: no config key has that name")]
    UnknownEnv { var: String },
    #[error("{key} {reason}")]
    Invalid { key: String, reason: String },
}

/// Every problem found while loading the configuration, in the order found.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A type a config key can have: how to read it from TOML and from an environment
/// variable's text.
trait ConfigValue: Sized {
    /// What a valid value looks like, for error messages.
    const EXPECTED: &'static str;
    fn from_toml(value: &toml::Value) -> Option<Self>;
    fn from_env(text: &str) -> Option<Self>;
}

macro_rules! unsigned_config_value {
    ($($t:ty),*) => {$(
        impl ConfigValue for $t {
            const EXPECTED: &'static str = concat!("a non-negative integer fitting ", stringify!($t));
            fn from_toml(value: &toml::Value) -> Option<Self> {
                value.as_integer().and_then(|i| <$t>::try_from(i).ok())
            }
            fn from_env(text: &str) -> Option<Self> {
                text.trim().parse().ok()
            }
        }
    )*};
}
unsigned_config_value!(u32, u64, usize);

impl ConfigValue for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_bool()
    }
    fn from_env(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }
}

impl ConfigValue for String {
    const EXPECTED: &'static str = "a string";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
    fn from_env(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

impl ConfigValue for PathBuf {
    const EXPECTED: &'static str = "a non-empty path";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        (!text.is_empty()).then(|| PathBuf::from(text))
    }
}

/// Optional paths: an empty string means "not set", so an override can unset a path the
/// file gives.
impl ConfigValue for Option<PathBuf> {
    const EXPECTED: &'static str = "a path, or \"\" for none";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        Some((!text.is_empty()).then(|| PathBuf::from(text)))
    }
}

impl ConfigValue for SocketAddr {
    const EXPECTED: &'static str = "an IP address and port such as \"0.0.0.0:5222\"";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

/// Optional listeners: an empty string disables them.
impl ConfigValue for Option<SocketAddr> {
    const EXPECTED: &'static str =
        "an IP address and port such as \"0.0.0.0:5222\", or \"\" to disable";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() {
            Some(None)
        } else {
            text.parse().ok().map(Some)
        }
    }
}

/// Optional strings: an empty string means "not set".
impl ConfigValue for Option<String> {
    const EXPECTED: &'static str = "a string, or \"\" for none";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        let text = text.trim();
        Some((!text.is_empty()).then(|| text.to_owned()))
    }
}

/// Lists: a TOML array of strings, or comma-separated in the environment.
impl ConfigValue for Vec<String> {
    const EXPECTED: &'static str = "a list of strings (comma-separated in the environment)";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect()
    }
    fn from_env(text: &str) -> Option<Self> {
        Some(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
}

impl ConfigValue for StorageBackend {
    const EXPECTED: &'static str = "\"embedded\", \"memory\" or \"redis\"";
    fn from_toml(value: &toml::Value) -> Option<Self> {
        value.as_str().and_then(Self::from_env)
    }
    fn from_env(text: &str) -> Option<Self> {
        match text.trim() {
            "embedded" => Some(Self::Embedded),
            "memory" => Some(Self::Memory),
            "redis" => Some(Self::Redis),
            _ => None,
        }
    }
}

/// Reads keys out of the file and the environment, consuming each as it goes so that
/// whatever is left at the end is unknown, and collecting every error on the way.
struct Reader {
    /// The file's leaf values by dotted key path.
    file: BTreeMap<String, toml::Value>,
    /// `SHOAL_*` variables not yet matched to a key.
    env: BTreeMap<String, String>,
    errors: Vec<ConfigError>,
    /// Keys whose value was present but unusable; their defaults stand in, and checks
    /// that depend on them are skipped.
    failed: HashSet<&'static str>,
}

impl Reader {
    fn new(table: toml::Table, env: BTreeMap<String, String>, errors: Vec<ConfigError>) -> Self {
        let mut file = BTreeMap::new();
        flatten("", table, &mut file);
        Self {
            file,
            env,
            errors,
            failed: HashSet::new(),
        }
    }

    /// The value of `key`: the environment override if set, else the file's value, else
    /// `default`. A value of the wrong type is recorded and `default` returned.
    fn get<T: ConfigValue>(&mut self, key: &'static str, default: T) -> T {
        let var = env_var_name(key);
        // Always consume the file entry, even when the environment overrides it, so it is
        // not later reported as unknown.
        let from_file = self.file.remove(key);
        let parsed = if let Some(text) = self.env.remove(&var) {
            T::from_env(&text).ok_or_else(|| (Origin::Env(var), format!("{text:?}")))
        } else if let Some(value) = from_file {
            T::from_toml(&value).ok_or_else(|| (Origin::File, describe(&value)))
        } else {
            return default;
        };
        parsed.unwrap_or_else(|(origin, found)| {
            self.failed.insert(key);
            self.errors.push(ConfigError::WrongType {
                key: key.to_owned(),
                origin,
                expected: T::EXPECTED,
                found,
            });
            default
        })
    }

    /// Like [`Reader::get`], and also requires the value to be within `range`.
    fn get_in<T>(&mut self, key: &'static str, default: T, range: std::ops::RangeInclusive<T>) -> T
    where
        T: ConfigValue + PartialOrd + fmt::Display + Copy,
    {
        let value = self.get(key, default);
        if !self.failed(key) && !range.contains(&value) {
            self.invalid(
                key,
                format!(
                    "is {value} but must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            );
            return default;
        }
        value
    }

    /// Like [`Reader::get`], and also requires the value to be at least `min`.
    fn get_at_least(&mut self, key: &'static str, default: usize, min: usize) -> usize {
        let value = self.get(key, default);
        if !self.failed(key) && value < min {
            self.invalid(key, format!("is {value} but must be at least {min}"));
            return default;
        }
        value
    }

    /// A duration given in whole seconds.
    fn get_secs(&mut self, key: &'static str, default_secs: u64) -> Duration {
        Duration::from_secs(self.get(key, default_secs))
    }

    fn failed(&self, key: &'static str) -> bool {
        self.failed.contains(key)
    }

    fn invalid(&mut self, key: &'static str, reason: String) {
        self.failed.insert(key);
        self.errors.push(ConfigError::Invalid {
            key: key.to_owned(),
            reason,
        });
    }

    /// Reports whatever was not consumed, then all errors if there are any.
    fn finish(mut self) -> Result<(), ConfigErrors> {
        for key in std::mem::take(&mut self.file).into_keys() {
            self.errors.push(ConfigError::UnknownKey { key });
        }
        for var in std::mem::take(&mut self.env).into_keys() {
            self.errors.push(ConfigError::UnknownEnv { var });
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// The override variable for a key: `c2s.max_stanza_size` → `SHOAL_C2S_MAX_STANZA_SIZE`.
fn env_var_name(key: &str) -> String {
    format!("SHOAL_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Collects the leaves of `table` under dotted paths. Sections are tables, so a section
/// given as a scalar (`c2s = 5`) stays a leaf and is reported as an unknown key.
fn flatten(prefix: &str, table: toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&path, t, out),
            v => {
                out.insert(path, v);
            }
        }
    }
}

/// A short description of a TOML value for "expected X, found Y" messages.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(x) => format!("the float {x}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the datetime {d}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load_err(path: Option<&Path>, vars: &[(&str, &str)]) -> Vec<ConfigError> {
        Config::load(path, env(vars)).unwrap_err().0
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.backend, StorageBackend::Embedded);
        assert_eq!(c.storage.path, PathBuf::from("./data/shoal.redb"));
        assert_eq!(c.storage.redis_url, "redis://127.0.0.1:6379/");
        assert_eq!(c.storage.redis_key_prefix, "shoal:");
        assert!(c.tls.self_signed);
        assert_eq!(c.tls.cert, PathBuf::from("./data/tls/cert.pem"));
        assert_eq!(c.tls.key, PathBuf::from("./data/tls/key.pem"));
        assert_eq!(c.c2s.bind, "0.0.0.0:5222".parse().unwrap());
        assert_eq!(c.c2s.direct_tls_bind, Some("0.0.0.0:5223".parse().unwrap()));
        assert!(c.c2s.starttls_required);
        assert_eq!(c.c2s.max_stanza_size, 262_144);
        assert_eq!(c.c2s.max_depth, 32);
        assert_eq!(c.c2s.negotiation_timeout, Duration::from_secs(30));
        assert_eq!(c.c2s.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.c2s.outbound_buffer_max, 1_048_576);
        assert_eq!(c.c2s.read_rate_bytes_per_sec, 0);
        assert_eq!(c.c2s.read_burst_bytes, 65_536);
        assert_eq!(c.c2s.max_connections, 100_000);
        assert_eq!(c.limits.connections_per_ip_per_minute, 120);
        assert_eq!(c.limits.auth_failures_per_ip_per_minute, 10);
        assert_eq!(c.limits.max_resources_per_user, 10);
        assert_eq!(c.limits.max_offline_messages, 1000);
        assert_eq!(c.limits.max_roster_items, 2000);
        assert!(c.registration.enabled);
        assert_eq!(c.registration.per_ip_per_hour, 10);
        assert_eq!(c.admin.bind, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.cluster.shards, 1024);
        assert_eq!(c.cluster.shard_hosts, 0);
        assert!(c.cluster.effective_shard_hosts() >= 1);
        assert_eq!(c.shutdown.grace, Duration::from_secs(10));
        assert_eq!(c.shutdown.see_other_host, None);
        assert_eq!(c.c2s.proxy_protocol, None);
        assert_eq!(c.s2s.proxy_protocol, None);
    }

    #[test]
    fn proxy_protocol_with_trusted_networks() {
        let f = file(
            r#"
            [c2s]
            proxy_protocol = true
            proxy_trusted = ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]

            [s2s]
            proxy_protocol = true
            proxy_trusted = ["10.1.2.3/16"]
            proxy_header_timeout_secs = 2
            "#,
        );
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        let c2s = c.c2s.proxy_protocol.unwrap();
        assert_eq!(c2s.header_timeout, Duration::from_secs(5));
        assert!(c2s.trusts("10.200.0.1".parse().unwrap()));
        assert!(c2s.trusts("192.0.2.7".parse().unwrap()));
        assert!(!c2s.trusts("192.0.2.8".parse().unwrap()));
        assert!(c2s.trusts("fd12::1".parse().unwrap()));
        // A dual-stack socket's view of an IPv4 balancer.
        assert!(c2s.trusts("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c2s.trusts("11.0.0.1".parse().unwrap()));
        let s2s = c.s2s.proxy_protocol.unwrap();
        assert_eq!(s2s.header_timeout, Duration::from_secs(2));
        // Host bits after the prefix are dropped: the network is 10.1.0.0/16.
        assert_eq!(s2s.trusted, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert!(s2s.trusts("10.1.255.1".parse().unwrap()));
    }

    #[test]
    fn proxy_protocol_errors_are_reported_together() {
        let errors = Config::load(
            None,
            env(&[
                ("SHOAL_C2S_PROXY_PROTOCOL", "true"),
                ("SHOAL_S2S_PROXY_PROTOCOL", "true"),
                ("SHOAL_S2S_PROXY_TRUSTED", "10.0.0.0/8, lb.example"),
                ("SHOAL_S2S_PROXY_HEADER_TIMEOUT_SECS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            errors,
            "c2s.proxy_trusted must name the load balancers' networks when \
             c2s.proxy_protocol is true: only they may say where a connection comes from\n\
             s2s.proxy_header_timeout_secs must be greater than 0\n\
             s2s.proxy_trusted \"lb.example\" is not an IP network such as \"10.0.0.0/8\" \
             or an address"
        );
    }

    #[test]
    fn see_other_host() {
        for good in [
            "xmpp.example.org",
            "xmpp.example.org:5222",
            "192.0.2.1:5222",
            "[2001:db8::1]:5222",
            "[::1]",
        ] {
            let c = Config::load(None, env(&[("SHOAL_SHUTDOWN_SEE_OTHER_HOST", good)])).unwrap();
            assert_eq!(c.shutdown.see_other_host.as_deref(), Some(good));
        }
        for bad in [
            "a b",
            "host:",
            "host:0",
            "host:70000",
            "[::1",
            "[xyz]:1",
            ":5222",
            "h<st",
        ] {
            let e = Config::load(None, env(&[("SHOAL_SHUTDOWN_SEE_OTHER_HOST", bad)])).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "shutdown.see_other_host {bad:?} is not host or host:port (IPv6 as [address]:port)"
                )
            );
        }
        let c = Config::load(None, env(&[("SHOAL_SHUTDOWN_SEE_OTHER_HOST", "")])).unwrap();
        assert_eq!(c.shutdown.see_other_host, None);
    }

    #[test]
    fn ignores_non_shoal_and_reserved_env() {
        let c = Config::load(
            None,
            env(&[
                ("PATH", "/bin"),
                ("SHOAL_LOG", "debug"),
                ("SHOAL_CONFIG", "x.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn parses_file() {
        let f = file(
            r#"
            domain = "example.org"
            data_dir = "/var/lib/shoal"

            [storage]
            backend = "memory"

            [tls]
            cert = "/etc/shoal/cert.pem"
            key = "/etc/shoal/key.pem"

            [c2s]
            bind = "[::]:5222"
            direct_tls_bind = ""
            starttls_required = false
            max_stanza_size = 65536
            idle_timeout_secs = 60

            [admin]
            bind = ""

            [cluster]
            shards = 64
            shard_hosts = 4

            [shutdown]
            grace_secs = 0
            "#,
        );
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.domain, "example.org");
        assert_eq!(c.storage.backend, StorageBackend::Memory);
        // A derived default follows data_dir.
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/shoal/shoal.redb"));
        assert_eq!(
            c.tls,
            TlsConfig {
                cert: "/etc/shoal/cert.pem".into(),
                key: "/etc/shoal/key.pem".into(),
                self_signed: false,
            }
        );
        assert_eq!(c.c2s.bind, "[::]:5222".parse().unwrap());
        assert_eq!(c.c2s.direct_tls_bind, None);
        assert!(!c.c2s.starttls_required);
        assert_eq!(c.c2s.max_stanza_size, 65_536);
        assert_eq!(c.c2s.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.admin.bind, None);
        assert_eq!(c.cluster.shards, 64);
        assert_eq!(c.cluster.effective_shard_hosts(), 4);
        assert_eq!(c.shutdown.grace, Duration::ZERO);
        // Untouched keys keep their defaults.
        assert_eq!(c.c2s.max_depth, 32);
    }

    #[test]
    fn env_overrides_file() {
        let f = file("domain = \"file.example\"\n[c2s]\nmax_stanza_size = 65536\n");
        let c = Config::load(
            Some(f.path()),
            env(&[
                ("SHOAL_DOMAIN", "env.example"),
                ("SHOAL_C2S_MAX_STANZA_SIZE", "131072"),
                ("SHOAL_REGISTRATION_ENABLED", "false"),
                ("SHOAL_ADMIN_BIND", ""),
            ]),
        )
        .unwrap();
        assert_eq!(c.domain, "env.example");
        assert_eq!(c.c2s.max_stanza_size, 131_072);
        assert!(!c.registration.enabled);
        assert_eq!(c.admin.bind, None);
    }

    #[test]
    fn reports_every_error_at_once() {
        let f = file(
            r#"
            [c2s]
            max_stanza_size = "big"
            max_depth = 1000
            colour = "blue"

            [tls]
            cert = "/etc/cert.pem"
            "#,
        );
        let errors = load_err(Some(f.path()), &[]);
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors.iter().any(|e| matches!(e,
            ConfigError::WrongType { key, origin: Origin::File, .. } if key == "c2s.max_stanza_size")));
        assert!(errors.iter().any(|e| matches!(e,
            ConfigError::Invalid { key, .. } if key == "c2s.max_depth")));
        assert!(errors.iter().any(|e| matches!(e,
            ConfigError::UnknownKey { key } if key == "c2s.colour")));
        assert!(errors.iter().any(|e| matches!(e,
            ConfigError::Invalid { key, .. } if key == "tls.cert")));

        // Display puts each problem on its own line.
        let text = Config::load(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert_eq!(text.lines().count(), 4, "{text}");
    }

    #[test]
    fn redis_storage_keys() {
        let f = file(
            r#"
            [storage]
            backend = "redis"
            redis_url = "redis://:pw@redis.internal:6380/2"
            redis_key_prefix = "xmpp:"
            "#,
        );
        let c = Config::load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Redis);
        assert_eq!(c.storage.redis_url, "redis://:pw@redis.internal:6380/2");
        assert_eq!(c.storage.redis_key_prefix, "xmpp:");

        let c = Config::load(
            Some(f.path()),
            env(&[
                ("SHOAL_STORAGE_REDIS_URL", "redis://cache.example/"),
                ("SHOAL_STORAGE_REDIS_KEY_PREFIX", "other:"),
            ]),
        )
        .unwrap();
        assert_eq!(c.storage.redis_url, "redis://cache.example/");
        assert_eq!(c.storage.redis_key_prefix, "other:");
        let c = Config::load(None, env(&[("SHOAL_STORAGE_BACKEND", "redis")])).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Redis);
        let c = Config::load(
            None,
            env(&[("SHOAL_STORAGE_REDIS_URL", "redis+unix:///run/redis.sock")]),
        );
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn muc_keys() {
        let c = Config::load(None, env(&[("SHOAL_DOMAIN", "example.org")])).unwrap();
        assert!(c.muc.enabled);
        assert_eq!(c.muc.service, "conference.example.org");
        assert_eq!(c.muc.presence_broadcast_max, 0);
        let errors = load_err(None, &[("SHOAL_MUC_SERVICE", "localhost")]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("must differ from domain"));
    }

    #[test]
    fn s2s_keys() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.s2s.bind, Some(SocketAddr::from(([0, 0, 0, 0], 5269))));
        assert!(c.s2s.tls_required && c.s2s.nameservers.is_empty());
        assert_eq!(c.s2s.idle_timeout, Duration::from_secs(600));
        let c = Config::load(
            None,
            env(&[
                ("SHOAL_S2S_BIND", ""),
                ("SHOAL_S2S_NAMESERVERS", "127.0.0.1:5353, [::1]:53"),
                ("SHOAL_S2S_DENY_DOMAINS", "spam.example,evil.example"),
            ]),
        )
        .unwrap();
        assert_eq!(c.s2s.bind, None);
        assert_eq!(
            c.s2s.nameservers,
            [
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(c.s2s.deny_domains, ["spam.example", "evil.example"]);
        let errors = load_err(
            None,
            &[
                ("SHOAL_S2S_NAMESERVERS", "dns.example"),
                ("SHOAL_S2S_ALLOW_DOMAINS", "not a domain"),
            ],
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(c.s2s.direct_tls_bind, None);
        let c = Config::load(
            None,
            env(&[
                ("SHOAL_S2S_DIRECT_TLS_BIND", "127.0.0.1:5270"),
                ("SHOAL_S2S_CA_FILE", "/etc/shoal/federation-ca.pem"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.s2s.direct_tls_bind,
            Some("127.0.0.1:5270".parse().unwrap())
        );
        assert_eq!(
            c.s2s.ca_file.as_deref(),
            Some(Path::new("/etc/shoal/federation-ca.pem"))
        );
        let errors = load_err(
            None,
            &[
                ("SHOAL_S2S_BIND", ""),
                ("SHOAL_S2S_DIRECT_TLS_BIND", "127.0.0.1:5270"),
            ],
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("needs s2s.bind"));
    }

    #[test]
    fn cluster_keys() {
        let c = Config::default();
        assert!(!c.cluster.enabled);
        assert_eq!(c.cluster.lease_ttl, Duration::from_secs(6));
        let c = Config::load(
            None,
            env(&[
                ("SHOAL_STORAGE_BACKEND", "redis"),
                ("SHOAL_CLUSTER_ENABLED", "true"),
                ("SHOAL_CLUSTER_NODE_ID", "shoal-0"),
                ("SHOAL_CLUSTER_LISTEN", "127.0.0.2:7071"),
                ("SHOAL_CLUSTER_LEASE_TTL_MS", "900"),
                ("SHOAL_S2S_DIALBACK_SECRET", "shared"),
            ]),
        )
        .unwrap();
        assert!(c.cluster.enabled);
        assert_eq!(c.cluster.node_id, "shoal-0");
        assert_eq!(c.cluster.endpoint, "127.0.0.2:7071", "defaults to listen");
        assert_eq!(c.cluster.lease_ttl, Duration::from_millis(900));
        let c = Config::load(
            None,
            env(&[
                ("SHOAL_STORAGE_BACKEND", "redis"),
                ("SHOAL_CLUSTER_ENABLED", "true"),
                ("SHOAL_CLUSTER_NODE_ID", "shoal-1"),
                ("SHOAL_CLUSTER_ENDPOINT", "shoal-1.shoal:7070"),
                ("SHOAL_S2S_BIND", ""),
            ]),
        )
        .unwrap();
        assert_eq!(c.cluster.endpoint, "shoal-1.shoal:7070");
        assert_eq!(c.cluster.listen, SocketAddr::from(([0, 0, 0, 0], 7070)));
    }

    #[test]
    fn cluster_mode_errors_are_reported_together() {
        let errors = load_err(
            None,
            &[
                ("SHOAL_CLUSTER_ENABLED", "true"),
                ("SHOAL_CLUSTER_NODE_ID", "node one"),
                ("SHOAL_CLUSTER_LEASE_TTL_MS", "10"),
            ],
        );
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| match e {
                ConfigError::Invalid { key, .. } => key.as_str(),
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "cluster.lease_ttl_ms",
                "cluster.enabled",
                "cluster.node_id",
                "cluster.endpoint",
                "s2s.dialback_secret"
            ]
        );
        let text = ConfigErrors(errors).to_string();
        assert!(
            text.contains("requires storage.backend = \"redis\""),
            "{text}"
        );
        assert!(text.contains("invalid node id"), "{text}");
        let errors = load_err(
            None,
            &[
                ("SHOAL_STORAGE_BACKEND", "redis"),
                ("SHOAL_CLUSTER_ENABLED", "true"),
                ("SHOAL_CLUSTER_NODE_ID", "a"),
                ("SHOAL_CLUSTER_ENDPOINT", "no-port"),
                ("SHOAL_S2S_DIALBACK_SECRET", "shared"),
            ],
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("is not host:port"));
    }

    #[test]
    fn redis_storage_errors_are_reported_with_the_rest() {
        let f = file(
            r#"
            [storage]
            backend = "valkey"
            redis_url = "http://:hunter2@127.0.0.1:6379/"
            redis_key_prefix = ""
            [c2s]
            max_depth = 1
            "#,
        );
        let errors = load_err(Some(f.path()), &[]);
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(matches!(&errors[0],
            ConfigError::WrongType { key, expected, .. }
                if key == "storage.backend" && expected.contains("\"redis\"")));
        let ConfigError::Invalid { key, reason } = &errors[1] else {
            panic!("{errors:#?}");
        };
        assert_eq!(key, "storage.redis_url");
        assert!(reason.contains("not a usable Redis URL"), "{reason}");
        // A password in a rejected URL is not repeated in the message.
        assert!(!reason.contains("hunter2"), "{reason}");
        assert!(matches!(&errors[2],
            ConfigError::Invalid { key, .. } if key == "storage.redis_key_prefix"));
        assert!(matches!(&errors[3],
            ConfigError::Invalid { key, .. } if key == "c2s.max_depth"));

        // Without a password the URL is shown, which makes a typo easy to spot.
        let errors = load_err(None, &[("SHOAL_STORAGE_REDIS_URL", "redis//localhost")]);
        let [ConfigError::Invalid { key, reason }] = &errors[..] else {
            panic!("{errors:#?}");
        };
        assert_eq!(key, "storage.redis_url");
        assert!(reason.contains("\"redis//localhost\""), "{reason}");
        // TLS is not compiled in, which is said at start rather than at first connect.
        let errors = load_err(None, &[("SHOAL_STORAGE_REDIS_URL", "rediss://x/")]);
        let [ConfigError::Invalid { reason, .. }] = &errors[..] else {
            panic!("{errors:#?}");
        };
        assert!(reason.contains("TLS"), "{reason}");
    }

    #[test]
    fn unknown_env_var() {
        let errors = load_err(None, &[("SHOAL_C2S_MAX_STANZA", "1")]);
        assert!(
            matches!(&errors[..], [ConfigError::UnknownEnv { var }] if var == "SHOAL_C2S_MAX_STANZA")
        );
    }

    #[test]
    fn env_type_error_names_the_variable() {
        let errors = load_err(None, &[("SHOAL_C2S_STARTTLS_REQUIRED", "yes")]);
        let [ConfigError::WrongType { origin, .. }] = &errors[..] else {
            panic!("{errors:?}");
        };
        assert_eq!(*origin, Origin::Env("SHOAL_C2S_STARTTLS_REQUIRED".into()));
    }

    #[test]
    fn semantic_checks() {
        let errors = load_err(
            None,
            &[
                ("SHOAL_DOMAIN", "user@example.org"),
                ("SHOAL_CLUSTER_SHARDS", "100"),
                ("SHOAL_C2S_OUTBOUND_BUFFER_MAX", "8192"),
                ("SHOAL_C2S_IDLE_TIMEOUT_SECS", "0"),
                ("SHOAL_C2S_READ_RATE_BYTES_PER_SEC", "1000"),
                ("SHOAL_C2S_READ_BURST_BYTES", "0"),
                ("SHOAL_TLS_KEY", "/k.pem"),
            ],
        );
        let keys: Vec<_> = errors
            .iter()
            .map(|e| match e {
                ConfigError::Invalid { key, .. } => key.as_str(),
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "domain",
                "tls.key",
                "c2s.idle_timeout_secs",
                "c2s.outbound_buffer_max",
                "c2s.read_burst_bytes",
                "cluster.shards"
            ]
        );
        assert!(validate_domain(&"a".repeat(1024)).is_err());
        assert!(validate_domain("").is_err());
        assert!(validate_domain("a/b").is_err());
        assert!(validate_domain("example.org").is_ok());
    }

    #[test]
    fn section_as_scalar_and_bad_toml() {
        let f = file("c2s = 5\n");
        let errors = load_err(Some(f.path()), &[]);
        assert!(matches!(&errors[..], [ConfigError::UnknownKey { key }] if key == "c2s"));

        // A syntax error does not hide environment problems.
        let f = file("domain = \n");
        let errors = load_err(Some(f.path()), &[("SHOAL_NOPE", "1")]);
        assert!(matches!(
            &errors[..],
            [ConfigError::Syntax { .. }, ConfigError::UnknownEnv { .. }]
        ));
    }

    #[test]
    fn missing_file() {
        let errors = load_err(Some(Path::new("/nonexistent/shoal.toml")), &[]);
        assert!(matches!(&errors[..], [ConfigError::Read { .. }]));
    }
}
