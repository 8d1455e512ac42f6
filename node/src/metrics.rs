//! Every metric the node exports, named in this one module (prefix `shoal_`).
//!
//! [`Metrics`] registers each metric and each label combination once, up front, and
//! hands out cheap clones; hot paths only touch pre-registered handles, never the
//! registry. Label values come only from the enums below, so cardinality is fixed at
//! compile time. This module must never accept a JID, domain, IP address or any other
//! peer-supplied string as a label value, and no other module may call the `metrics`
//! macros directly.
//!
//! The one label that is not an enum is `peer` on the cluster forwarding metrics: a
//! node id, which is a cluster member's name, validated by
//! [`NodeId`](crate::cluster::forward::NodeId) (short, `[A-Za-z0-9._-]`). Cluster size
//! bounds those series, and [`MAX_PEER_LABELS`] caps them in case a misconfigured or
//! hostile peer keeps saying hello under new names: past the cap, peers share the
//! `peer="other"` series.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

const C2S_CONNECTIONS: &str = "shoal_c2s_connections";
const C2S_ACCEPTED: &str = "shoal_c2s_connections_accepted_total";
const C2S_REJECTED: &str = "shoal_c2s_connections_rejected_total";
const STANZAS_IN: &str = "shoal_stanzas_in_total";
const STANZAS_OUT: &str = "shoal_stanzas_out_total";
const AUTH_SUCCESS: &str = "shoal_auth_success_total";
const AUTH_FAILURE: &str = "shoal_auth_failure_total";
const ROUTING_LATENCY: &str = "shoal_routing_latency_seconds";
const MAILBOX_DROPS: &str = "shoal_mailbox_drops_total";
const SLOW_CONSUMER_DISCONNECTS: &str = "shoal_slow_consumer_disconnects_total";
const STREAM_ERRORS: &str = "shoal_stream_errors_total";
const SESSIONS: &str = "shoal_sessions";
const REGISTRATIONS: &str = "shoal_registrations_total";
const FORWARDS_SENT: &str = "shoal_cluster_forwards_sent_total";
const FORWARDS_RECEIVED: &str = "shoal_cluster_forwards_received_total";
const FORWARDS_DROPPED: &str = "shoal_cluster_forwards_dropped_total";
const FORWARDS_UNKNOWN_KIND: &str = "shoal_cluster_forwards_unknown_kind_total";
const FORWARD_BATCH_FRAMES: &str = "shoal_cluster_forward_batch_frames";
const FORWARD_LATENCY: &str = "shoal_cluster_forward_latency_seconds";
const PEER_STATE: &str = "shoal_cluster_peer_state";
const SHARDS_OWNED: &str = "shoal_cluster_shards_owned";
const SHARD_CHANGES: &str = "shoal_cluster_shard_changes_total";
const REDIS_LATENCY: &str = "shoal_cluster_redis_seconds";
const REDIS_ERRORS: &str = "shoal_cluster_redis_errors_total";
const PARKED: &str = "shoal_cluster_parked_total";
const PARK_DEPTH: &str = "shoal_cluster_park_depth";
const STORAGE_QUEUE_DEPTH: &str = "shoal_storage_queue_depth";
const REROUTED: &str = "shoal_cluster_rerouted_total";
const ATTACHES: &str = "shoal_cluster_session_attaches_total";
const DIRECTORY_LOOKUPS: &str = "shoal_cluster_directory_lookups_total";
const MUC_COPIES: &str = "shoal_muc_copies_total";
const MUC_ROOMS: &str = "shoal_muc_rooms";
const MUC_OCCUPANTS: &str = "shoal_muc_occupants";
const ROUTED: &str = "shoal_routed_total";
const SHARDS: &str = "shoal_cluster_shards";
const S2S_STREAMS: &str = "shoal_s2s_streams";
const S2S_DIALBACK: &str = "shoal_s2s_dialback_total";
const S2S_EXTERNAL: &str = "shoal_s2s_external_total";
const S2S_QUEUED: &str = "shoal_s2s_queued";
const S2S_BOUNCES: &str = "shoal_s2s_bounces_total";
const PROXY_HEADERS: &str = "shoal_proxy_headers_total";

/// How many distinct `peer` label values the forwarding metrics take before further
/// peers share `peer="other"`. Far above any real cluster; only there so that peer
/// names arriving in hellos cannot grow the registry without bound.
pub const MAX_PEER_LABELS: usize = 256;

/// The `peer` value shared by peers past [`MAX_PEER_LABELS`] and by frames for a node
/// that is not a known peer.
const OTHER_PEER: &str = "other";

/// Routing latency buckets, 50µs to 5s. A local hop is tens of microseconds and a
/// cross-node hop about a millisecond; anything past a second means a stuck mailbox, so
/// the resolution goes where the interesting distinctions are.
const ROUTING_LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Frames per forward batch: powers of two up to the writer's default bound of 256 and
/// one past it, so both "one frame per write" (idle) and "full batches" (saturated)
/// stand out.
const FORWARD_BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Declares a label enum with its wire spelling and the list of all variants, so every
/// combination can be registered (and exported as zero) before it first happens.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order (which is also the handle index).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value exported for this variant.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }
    };
}

label_enum! {
    /// Which c2s listener accepted a connection (`listener` label).
    Listener {
        /// Port 5222: plaintext stream upgraded with STARTTLS.
        StartTls => "starttls",
        /// Port 5223: TLS from the first byte (XEP-0368).
        DirectTls => "direct_tls",
    }
}

label_enum! {
    /// Why a connection was refused before any XML was read (`reason` label).
    RejectReason {
        RateLimited => "rate_limited",
        TooManyConnections => "too_many_connections",
    }
}

label_enum! {
    /// Which listener read a PROXY protocol header (`service` label).
    ProxyService {
        /// Either client listener (STARTTLS or direct TLS).
        C2s => "c2s",
        S2s => "s2s",
    }
}

label_enum! {
    /// What became of a connection on a PROXY protocol listener before its first XMPP
    /// byte (`result` label).
    ProxyResult {
        /// A valid header from a trusted load balancer: the connection is served.
        Accepted => "accepted",
        /// Not from a trusted load balancer: closed before reading.
        Rejected => "rejected",
        /// No valid header (none, malformed, oversized, or the connection closed).
        Invalid => "invalid",
        /// No complete header within the header timeout.
        Timeout => "timeout",
    }
}

label_enum! {
    /// Top-level stanza kind (`kind` label). Nonzas are not counted as stanzas.
    StanzaKind {
        Message => "message",
        Presence => "presence",
        Iq => "iq",
    }
}

label_enum! {
    /// SASL mechanism of an authentication attempt (`mechanism` label).
    SaslMechanism {
        ScramSha256 => "scram_sha_256",
        ScramSha1 => "scram_sha_1",
        Plain => "plain",
    }
}

label_enum! {
    /// Where the router sent a stanza (`route` label of `shoal_routed_total`).
    Route {
        /// To the server itself or to the MUC service (disco, ping, the room directory).
        Server => "server",
        /// To a local account, through the shard host that owns it (on this node or,
        /// in a cluster, another one: `shoal_cluster_forwards_sent_total` counts those).
        Account => "account",
        /// To a MUC room, through the shard host that owns it.
        Room => "room",
        /// To another domain (server-to-server), or bounced when federation is off.
        Remote => "remote",
    }
}

label_enum! {
    /// Which bounded mailbox refused a message (`mailbox` label).
    Mailbox {
        Shard => "shard",
        Connection => "connection",
    }
}

label_enum! {
    /// Why a frame for another node was not delivered (`reason` label).
    ForwardDropReason {
        /// The per-peer queue was full; the caller was told and bounces the stanza.
        QueueFull => "queue_full",
        /// The frame named a node that is not a known peer.
        UnknownPeer => "unknown_peer",
        /// The forwarder or the peer link shut down with the frame still queued.
        Shutdown => "shutdown",
        /// Dropped on purpose by a test fault filter (in-memory forwarder only).
        Injected => "injected",
    }
}

label_enum! {
    /// State of the outgoing stream to a peer (`state` label of `shoal_cluster_peer_state`,
    /// exactly one of which is 1 per peer).
    PeerState {
        /// Dialling, or waiting for the peer's welcome.
        Connecting => "connecting",
        /// The stream is open and frames flow.
        Connected => "connected",
        /// The last attempt failed; waiting out the backoff before the next.
        Backoff => "backoff",
        /// The peer refused our protocol version (or we refused its); retried slowly,
        /// since only an upgrade of one side fixes it.
        Refused => "refused",
    }
}

label_enum! {
    /// How this node's set of shards changed (`change` label).
    ShardChange {
        /// Claimed: a shard whose target this node is, free or expired.
        Gained => "gained",
        /// Drained and released to its new target (join of another node, leave).
        HandedOff => "handed_off",
        /// Found taken by another node (this node had lost Redis for too long).
        Lost => "lost",
    }
}

label_enum! {
    /// The cluster's Redis operations (`op` label).
    RedisOp {
        /// One coordinator round: heartbeat, membership, lease renewal and claims.
        Round => "round",
        /// Releasing shards after a drain.
        Release => "release",
        DirectoryRegister => "directory_register",
        DirectoryUnregister => "directory_unregister",
        DirectoryLookup => "directory_lookup",
        DirectoryPurge => "directory_purge",
    }
}

label_enum! {
    /// Why work for an account was routed again (`reason` label).
    RerouteReason {
        /// The receiving node did not own the account's shard (any more).
        NotOwner => "not_owner",
        /// A departed peer had not acknowledged it.
        DepartedPeer => "departed_peer",
    }
}

label_enum! {
    /// Outcome of a new owner's request to a session to report itself (`result` label).
    AttachResult {
        Attached => "attached",
        /// The session had ended, or its node did not answer in time.
        Gone => "gone",
    }
}

label_enum! {
    /// What loading an account found in the session directory (`result` label): sessions
    /// bound under a previous owner, or none (the usual case).
    DirectoryLookup {
        Sessions => "sessions",
        Empty => "empty",
    }
}

label_enum! {
    /// How a room's copy of a stanza left its node (`path` label): to a session of
    /// this node, in a frame to the node holding the session, or through the
    /// recipient's account (outside cluster mode, or where the session is unknown).
    MucPath {
        Here => "here",
        Node => "node",
        Account => "account",
    }
}

label_enum! {
    /// Which way a server-to-server stream goes (`direction` label).
    S2sDirection {
        In => "in",
        Out => "out",
    }
}

label_enum! {
    /// Whether a peer proved its domain (`result` label): what its authoritative
    /// server said of its dialback key, or whether its certificate is valid for it.
    S2sAuthResult {
        Valid => "valid",
        Invalid => "invalid",
    }
}

impl S2sAuthResult {
    fn of(valid: bool) -> Self {
        if valid { Self::Valid } else { Self::Invalid }
    }
}

label_enum! {
    /// Why stanzas to another domain bounced (`condition` label).
    S2sBounce {
        /// The domain has no server (DNS), or it refused us.
        NotFound => "remote_server_not_found",
        /// Its servers could not be reached in time, or the stream broke.
        Timeout => "remote_server_timeout",
        /// Too much was queued for it.
        Busy => "resource_constraint",
    }
}

label_enum! {
    /// Stream error condition sent to a peer (`condition` label, RFC 6120 §4.9.3).
    /// Conditions that Shoal sends rarely enough not to need their own series are
    /// reported as `Other`.
    StreamErrorCondition {
        BadFormat => "bad_format",
        Conflict => "conflict",
        ConnectionTimeout => "connection_timeout",
        HostUnknown => "host_unknown",
        InvalidFrom => "invalid_from",
        InvalidNamespace => "invalid_namespace",
        InvalidXml => "invalid_xml",
        NotAuthorized => "not_authorized",
        NotWellFormed => "not_well_formed",
        PolicyViolation => "policy_violation",
        ResourceConstraint => "resource_constraint",
        RestrictedXml => "restricted_xml",
        SeeOtherHost => "see_other_host",
        SystemShutdown => "system_shutdown",
        UnsupportedVersion => "unsupported_version",
        Other => "other",
    }
}

label_enum! {
    /// Outcome of an in-band registration (XEP-0077) that passed validation (`result`
    /// label). Malformed submissions are answered by the protocol core and not counted.
    RegistrationResult {
        /// The account was created.
        Created => "created",
        /// The account exists already.
        Conflict => "conflict",
        /// Turned down: rate limited, registration disabled, or the store failed.
        Refused => "refused",
    }
}

/// Installs the Prometheus recorder as the process-wide `metrics` recorder and returns
/// the handle that renders it.
///
/// Installation happens at most once per process; later calls return the same handle.
/// This matters because tests boot several nodes in one process: they share one
/// recorder, so their counters add up, and assertions must compare deltas or look for
/// series rather than absolute values.
///
/// If some other recorder was installed first (only possible from foreign code), the
/// error is logged and a detached recorder's handle is returned, so the admin endpoint
/// still serves well-formed (if empty) output instead of taking the node down.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(ROUTING_LATENCY.to_owned()),
                    ROUTING_LATENCY_BUCKETS,
                )
                // Only fails for an empty bucket list, which the constant is not.
                .expect("routing latency buckets are non-empty")
                .set_buckets_for_metric(
                    Matcher::Full(FORWARD_LATENCY.to_owned()),
                    ROUTING_LATENCY_BUCKETS,
                )
                .expect("forward latency buckets are non-empty")
                .set_buckets_for_metric(
                    Matcher::Full(FORWARD_BATCH_FRAMES.to_owned()),
                    FORWARD_BATCH_BUCKETS,
                )
                .expect("forward batch buckets are non-empty")
                .set_buckets_for_metric(
                    Matcher::Full(REDIS_LATENCY.to_owned()),
                    ROUTING_LATENCY_BUCKETS,
                )
                .expect("Redis latency buckets are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::error!(%error, "a foreign metrics recorder is installed; /metrics will be empty");
            }
            describe();
            process_collector().describe();
            handle
        })
        .clone()
}

/// Help texts, registered once together with the recorder.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(C2S_CONNECTIONS, "Open client connections, by listener.");
    describe_counter!(C2S_ACCEPTED, "Client connections accepted, by listener.");
    describe_counter!(
        C2S_REJECTED,
        "Client connections refused before the stream started, by reason."
    );
    describe_counter!(
        STANZAS_IN,
        "Stanzas received from clients and peers, by kind."
    );
    describe_counter!(
        STANZAS_OUT,
        "Stanzas written to clients and peers, by kind."
    );
    describe_counter!(
        AUTH_SUCCESS,
        "Successful SASL authentications, by mechanism."
    );
    describe_counter!(AUTH_FAILURE, "Failed SASL authentications, by mechanism.");
    describe_histogram!(
        ROUTING_LATENCY,
        Unit::Seconds,
        "Time from a stanza being parsed to it being handed to the recipient's connection."
    );
    describe_counter!(
        MAILBOX_DROPS,
        "Messages dropped because a bounded mailbox was full, by mailbox."
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Clients disconnected because their outbound buffer passed the high-water mark."
    );
    describe_counter!(STREAM_ERRORS, "Stream errors sent, by condition.");
    describe_gauge!(SESSIONS, "Bound resources (sessions) on this node.");
    describe_counter!(
        REGISTRATIONS,
        "In-band account registrations (XEP-0077), by result."
    );
    describe_counter!(
        FORWARDS_SENT,
        "Frames written to the stream to another node, by peer."
    );
    describe_counter!(
        FORWARDS_RECEIVED,
        "Frames received from another node and handed to the router, by peer."
    );
    describe_counter!(
        FORWARDS_DROPPED,
        "Frames for another node that were not delivered, by peer and reason."
    );
    describe_counter!(
        FORWARDS_UNKNOWN_KIND,
        "Frames of a kind this node does not know (sent by a newer node), skipped, by peer."
    );
    describe_histogram!(
        FORWARD_BATCH_FRAMES,
        Unit::Count,
        "Frames per batch written to another node."
    );
    describe_histogram!(
        FORWARD_LATENCY,
        Unit::Seconds,
        "Time from a frame being queued for another node to that node receiving it (clocks of both nodes)."
    );
    describe_gauge!(
        PEER_STATE,
        "State of the outgoing stream to each peer: 1 for the current state, 0 for the others."
    );
    describe_gauge!(SHARDS_OWNED, "Shards this node serves now.");
    describe_counter!(
        SHARD_CHANGES,
        "Shards gained, handed off and lost by this node."
    );
    describe_histogram!(
        REDIS_LATENCY,
        Unit::Seconds,
        "Duration of the cluster's Redis operations, by operation."
    );
    describe_counter!(
        REDIS_ERRORS,
        "Failed cluster Redis operations, by operation."
    );
    describe_counter!(
        PARKED,
        "Stanzas and session events held because their account's shard had no owner."
    );
    describe_gauge!(
        STORAGE_QUEUE_DEPTH,
        "Storage operations (loads, writes, jobs) the shard hosts' queues hold now, running or waiting."
    );
    describe_gauge!(
        PARK_DEPTH,
        "Stanzas and session events held now because their account's shard has no owner."
    );
    describe_counter!(
        REROUTED,
        "Stanzas and session events routed again: the receiver was not the owner, or a departed peer had not acknowledged them."
    );
    describe_counter!(
        ATTACHES,
        "Sessions a new owner asked to report themselves, by outcome."
    );
    describe_counter!(
        DIRECTORY_LOOKUPS,
        "Account loads that found sessions in the directory (bound under a previous owner) or none."
    );
    describe_gauge!(S2S_STREAMS, "Open server-to-server streams, by direction.");
    describe_counter!(
        S2S_DIALBACK,
        "Dialback keys of peers checked with their authoritative servers, by result."
    );
    describe_counter!(
        S2S_EXTERNAL,
        "SASL EXTERNAL attempts of peers, by whether their certificate was valid for their domain."
    );
    describe_gauge!(
        S2S_QUEUED,
        "Stanzas waiting for an outbound server-to-server stream."
    );
    describe_counter!(
        S2S_BOUNCES,
        "Stanzas to other domains that bounced, by error condition."
    );
    describe_counter!(
        PROXY_HEADERS,
        "Connections on PROXY protocol listeners by what their header was: accepted, rejected (untrusted source), invalid, timeout; by service."
    );
    describe_counter!(
        MUC_COPIES,
        "Copies of room stanzas sent by the rooms of this node, by path."
    );
    describe_gauge!(MUC_ROOMS, "MUC rooms live on this node.");
    describe_gauge!(
        MUC_OCCUPANTS,
        "Occupants of the MUC rooms live on this node."
    );
    describe_counter!(
        ROUTED,
        "Stanzas routed, by kind and by where the router sent them."
    );
    describe_gauge!(
        SHARDS,
        "Shards of the cluster (`cluster.shards`): every one should have an owner."
    );
}

/// The collector of the standard process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, ...), named by the
/// `metrics-process` crate after the Prometheus client conventions so that existing
/// dashboards and alerts understand them.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process metrics from the operating system into the registry; called
/// before each rendering, so they are as fresh as the scrape. Cheap: a few reads of
/// `/proc/self`.
pub fn collect_process() {
    process_collector().collect();
}

/// Pre-registered handles for every metric. Build once with [`Metrics::new`] and clone
/// it into every component; a clone is one `Arc` increment.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    // Each array is indexed by the label enum's discriminant, in `ALL` order.
    c2s_connections: Vec<Gauge>,
    c2s_accepted: Vec<Counter>,
    c2s_rejected: Vec<Counter>,
    stanzas_in: Vec<Counter>,
    stanzas_out: Vec<Counter>,
    auth_success: Vec<Counter>,
    auth_failure: Vec<Counter>,
    routing_latency: Histogram,
    mailbox_drops: Vec<Counter>,
    slow_consumer_disconnects: Counter,
    stream_errors: Vec<Counter>,
    sessions: Gauge,
    registrations: Vec<Counter>,
    forward_batch_frames: Histogram,
    forward_latency: Histogram,
    shard_changes: Vec<Counter>,
    redis_latency: Vec<Histogram>,
    redis_errors: Vec<Counter>,
    parked: Counter,
    park_depth: Gauge,
    storage_queue_depth: Gauge,
    rerouted: Vec<Counter>,
    attaches: Vec<Counter>,
    directory_lookups: Vec<Counter>,
    muc_copies: Vec<Counter>,
    muc_rooms: Gauge,
    muc_occupants: Gauge,
    /// Indexed by `kind * Route::ALL.len() + route`.
    routed: Vec<Counter>,
    s2s_streams: Vec<Gauge>,
    s2s_dialback: Vec<Counter>,
    s2s_external: Vec<Counter>,
    s2s_queued: Gauge,
    s2s_bounces: Vec<Counter>,
    /// Indexed by [`ProxyService`], then [`ProxyResult`].
    proxy_headers: Vec<Vec<Counter>>,
    /// Per-peer handles, registered on a peer's first use and kept for the process.
    peers: Mutex<HashMap<String, PeerMetrics>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric and label combination.
    ///
    /// Calls [`install_recorder`] first: handles registered before a recorder exists
    /// are permanently no-ops, and making that ordering impossible to get wrong is worth
    /// tying `Metrics` to the Prometheus recorder.
    pub fn new() -> Self {
        install_recorder();
        Self {
            inner: Arc::new(Inner {
                c2s_connections: per_label(
                    Listener::ALL,
                    |l| metrics::gauge!(C2S_CONNECTIONS, "listener" => l.as_str()),
                ),
                c2s_accepted: per_label(
                    Listener::ALL,
                    |l| metrics::counter!(C2S_ACCEPTED, "listener" => l.as_str()),
                ),
                c2s_rejected: per_label(
                    RejectReason::ALL,
                    |r| metrics::counter!(C2S_REJECTED, "reason" => r.as_str()),
                ),
                stanzas_in: per_label(
                    StanzaKind::ALL,
                    |k| metrics::counter!(STANZAS_IN, "kind" => k.as_str()),
                ),
                stanzas_out: per_label(
                    StanzaKind::ALL,
                    |k| metrics::counter!(STANZAS_OUT, "kind" => k.as_str()),
                ),
                auth_success: per_label(
                    SaslMechanism::ALL,
                    |m| metrics::counter!(AUTH_SUCCESS, "mechanism" => m.as_str()),
                ),
                auth_failure: per_label(
                    SaslMechanism::ALL,
                    |m| metrics::counter!(AUTH_FAILURE, "mechanism" => m.as_str()),
                ),
                routing_latency: metrics::histogram!(ROUTING_LATENCY),
                mailbox_drops: per_label(
                    Mailbox::ALL,
                    |m| metrics::counter!(MAILBOX_DROPS, "mailbox" => m.as_str()),
                ),
                slow_consumer_disconnects: metrics::counter!(SLOW_CONSUMER_DISCONNECTS),
                stream_errors: per_label(
                    StreamErrorCondition::ALL,
                    |c| metrics::counter!(STREAM_ERRORS, "condition" => c.as_str()),
                ),
                sessions: metrics::gauge!(SESSIONS),
                registrations: per_label(
                    RegistrationResult::ALL,
                    |r| metrics::counter!(REGISTRATIONS, "result" => r.as_str()),
                ),
                forward_batch_frames: metrics::histogram!(FORWARD_BATCH_FRAMES),
                forward_latency: metrics::histogram!(FORWARD_LATENCY),
                shard_changes: per_label(
                    ShardChange::ALL,
                    |c| metrics::counter!(SHARD_CHANGES, "change" => c.as_str()),
                ),
                redis_latency: per_label(
                    RedisOp::ALL,
                    |o| metrics::histogram!(REDIS_LATENCY, "op" => o.as_str()),
                ),
                redis_errors: per_label(
                    RedisOp::ALL,
                    |o| metrics::counter!(REDIS_ERRORS, "op" => o.as_str()),
                ),
                parked: metrics::counter!(PARKED),
                park_depth: metrics::gauge!(PARK_DEPTH),
                storage_queue_depth: metrics::gauge!(STORAGE_QUEUE_DEPTH),
                rerouted: per_label(
                    RerouteReason::ALL,
                    |r| metrics::counter!(REROUTED, "reason" => r.as_str()),
                ),
                attaches: per_label(
                    AttachResult::ALL,
                    |r| metrics::counter!(ATTACHES, "result" => r.as_str()),
                ),
                directory_lookups: per_label(
                    DirectoryLookup::ALL,
                    |r| metrics::counter!(DIRECTORY_LOOKUPS, "result" => r.as_str()),
                ),
                muc_copies: per_label(
                    MucPath::ALL,
                    |p| metrics::counter!(MUC_COPIES, "path" => p.as_str()),
                ),
                muc_rooms: metrics::gauge!(MUC_ROOMS),
                muc_occupants: metrics::gauge!(MUC_OCCUPANTS),
                routed: StanzaKind::ALL
                    .iter()
                    .flat_map(|k| {
                        Route::ALL.iter().map(move |r| {
                            metrics::counter!(ROUTED, "kind" => k.as_str(), "route" => r.as_str())
                        })
                    })
                    .collect(),
                s2s_streams: per_label(
                    S2sDirection::ALL,
                    |d| metrics::gauge!(S2S_STREAMS, "direction" => d.as_str()),
                ),
                s2s_dialback: per_label(
                    S2sAuthResult::ALL,
                    |r| metrics::counter!(S2S_DIALBACK, "result" => r.as_str()),
                ),
                s2s_external: per_label(
                    S2sAuthResult::ALL,
                    |r| metrics::counter!(S2S_EXTERNAL, "result" => r.as_str()),
                ),
                s2s_queued: metrics::gauge!(S2S_QUEUED),
                s2s_bounces: per_label(
                    S2sBounce::ALL,
                    |c| metrics::counter!(S2S_BOUNCES, "condition" => c.as_str()),
                ),
                proxy_headers: per_label(ProxyService::ALL, |service| {
                    per_label(
                        ProxyResult::ALL,
                        |result| metrics::counter!(PROXY_HEADERS, "service" => service.as_str(), "result" => result.as_str()),
                    )
                }),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts an accepted connection and holds it in the open-connections gauge until
    /// the returned guard is dropped, so no exit path can leak a count.
    #[must_use = "the connection is counted as open only while the guard lives"]
    pub fn connection_accepted(&self, listener: Listener) -> ConnectionGuard {
        let inner = &self.inner;
        inner.c2s_accepted[listener as usize].increment(1);
        let gauge = inner.c2s_connections[listener as usize].clone();
        gauge.increment(1.0);
        ConnectionGuard { gauge }
    }

    pub fn connection_rejected(&self, reason: RejectReason) {
        self.inner.c2s_rejected[reason as usize].increment(1);
    }

    pub fn stanza_in(&self, kind: StanzaKind) {
        self.inner.stanzas_in[kind as usize].increment(1);
    }

    pub fn stanza_out(&self, kind: StanzaKind) {
        self.inner.stanzas_out[kind as usize].increment(1);
    }

    pub fn auth_success(&self, mechanism: SaslMechanism) {
        self.inner.auth_success[mechanism as usize].increment(1);
    }

    pub fn auth_failure(&self, mechanism: SaslMechanism) {
        self.inner.auth_failure[mechanism as usize].increment(1);
    }

    /// Records the time from a stanza being parsed to it being handed to the
    /// recipient's connection.
    pub fn routing_latency(&self, elapsed: Duration) {
        self.inner.routing_latency.record(elapsed.as_secs_f64());
    }

    pub fn mailbox_drop(&self, mailbox: Mailbox) {
        self.inner.mailbox_drops[mailbox as usize].increment(1);
    }

    pub fn slow_consumer_disconnect(&self) {
        self.inner.slow_consumer_disconnects.increment(1);
    }

    pub fn stream_error(&self, condition: StreamErrorCondition) {
        self.inner.stream_errors[condition as usize].increment(1);
    }

    pub fn registration(&self, result: RegistrationResult) {
        self.inner.registrations[result as usize].increment(1);
    }

    /// The forwarding metrics of one peer, registered on first use. `node` must be a
    /// validated node id (see the module comment); callers look this up once per peer
    /// link or stream, not per frame.
    pub fn cluster_peer(&self, node: &str) -> PeerMetrics {
        let mut peers = self.inner.peers.lock();
        if let Some(peer) = peers.get(node) {
            return peer.clone();
        }
        let label = if peers.len() < MAX_PEER_LABELS {
            node
        } else {
            OTHER_PEER
        };
        let peer = PeerMetrics::register(label);
        peers.insert(label.to_owned(), peer.clone());
        peer
    }

    /// The series for frames addressed to a node that is not a known peer.
    pub fn cluster_unknown_peer(&self) -> PeerMetrics {
        self.cluster_peer(OTHER_PEER)
    }

    /// Records how many frames one write to a peer carried.
    pub fn forward_batch(&self, frames: usize) {
        self.inner.forward_batch_frames.record(frames as f64);
    }

    /// Records the time from a frame being queued on the sending node to it arriving
    /// here. The two timestamps come from two clocks; a negative difference (skew) is
    /// recorded as zero rather than dropped, so the count stays the received count.
    pub fn forward_latency(&self, elapsed: Duration) {
        self.inner.forward_latency.record(elapsed.as_secs_f64());
    }

    /// The gauge of shards `node` owns. Labelled with the node id (one value per
    /// process, except in tests that run several nodes in one process).
    pub fn shards_owned(&self, node: &str) -> Gauge {
        metrics::gauge!(SHARDS_OWNED, "node" => node.to_owned())
    }

    /// Records the cluster's shard count, against which the owned shards of all nodes
    /// are compared.
    pub fn shard_count(&self, shards: u32) {
        metrics::gauge!(SHARDS).set(shards);
    }

    pub fn shard_change(&self, change: ShardChange, shards: usize) {
        self.inner.shard_changes[change as usize].increment(shards as u64);
    }

    /// Records one Redis operation of the cluster: its duration, and whether it failed.
    pub fn redis_op(&self, op: RedisOp, elapsed: Duration, ok: bool) {
        self.inner.redis_latency[op as usize].record(elapsed.as_secs_f64());
        if !ok {
            self.inner.redis_errors[op as usize].increment(1);
        }
    }

    /// Work for an account parked while its shard had no owner.
    pub fn parked(&self) {
        self.inner.parked.increment(1);
    }

    /// The gauge of the shard hosts' storage queues: each host adds what it submits
    /// and takes off what finished.
    pub fn storage_queue_depth(&self) -> Gauge {
        self.inner.storage_queue_depth.clone()
    }

    /// How much work the park holds now.
    pub fn park_depth(&self, parked: usize) {
        self.inner.park_depth.set(parked as f64);
    }

    pub fn rerouted(&self, reason: RerouteReason, frames: usize) {
        self.inner.rerouted[reason as usize].increment(frames as u64);
    }

    pub fn attach(&self, result: AttachResult) {
        self.inner.attaches[result as usize].increment(1);
    }

    pub fn directory_lookup(&self, result: DirectoryLookup) {
        self.inner.directory_lookups[result as usize].increment(1);
    }

    /// Counts an open server-to-server stream until the guard is dropped.
    pub fn s2s_stream(&self, direction: S2sDirection) -> GaugeGuard {
        let gauge = self.inner.s2s_streams[direction as usize].clone();
        gauge.increment(1.0);
        GaugeGuard { gauge }
    }

    pub fn s2s_dialback(&self, valid: bool) {
        self.inner.s2s_dialback[S2sAuthResult::of(valid) as usize].increment(1);
    }

    /// A peer's SASL EXTERNAL attempt: its certificate was valid for its domain or not.
    pub fn s2s_external(&self, valid: bool) {
        self.inner.s2s_external[S2sAuthResult::of(valid) as usize].increment(1);
    }

    /// Stanzas put in (`+n`) or taken out of (`-n`) outbound queues.
    pub fn s2s_queued(&self, delta: f64) {
        self.inner.s2s_queued.increment(delta);
    }

    pub fn s2s_bounce(&self, condition: S2sBounce) {
        self.inner.s2s_bounces[condition as usize].increment(1);
    }

    /// What a PROXY protocol listener made of a new connection.
    pub fn proxy_header(&self, service: ProxyService, result: ProxyResult) {
        self.inner.proxy_headers[service as usize][result as usize].increment(1);
    }

    pub fn muc_copies(&self, path: MucPath, copies: usize) {
        self.inner.muc_copies[path as usize].increment(copies as u64);
    }

    /// The rooms and occupants one shard host holds, counted in the node's gauges
    /// until the returned value is dropped.
    pub fn muc_rooms(&self) -> RoomGauges {
        RoomGauges {
            rooms: self.inner.muc_rooms.clone(),
            occupants: self.inner.muc_occupants.clone(),
            counted: (0, 0),
        }
    }

    pub fn routed(&self, kind: StanzaKind, route: Route) {
        self.inner.routed[kind as usize * Route::ALL.len() + route as usize].increment(1);
    }

    /// Counts a bound resource until the returned guard is dropped.
    #[must_use = "the session is counted only while the guard lives"]
    pub fn session_bound(&self) -> GaugeGuard {
        let gauge = self.inner.sessions.clone();
        gauge.increment(1.0);
        GaugeGuard { gauge }
    }
}

/// The forwarding metrics of one peer. Cheap to clone; every handle is registered.
#[derive(Clone)]
pub struct PeerMetrics {
    inner: Arc<PeerInner>,
}

struct PeerInner {
    sent: Counter,
    received: Counter,
    unknown_kind: Counter,
    dropped: Vec<Counter>,
    state: Vec<Gauge>,
}

impl std::fmt::Debug for PeerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerMetrics").finish_non_exhaustive()
    }
}

impl PeerMetrics {
    fn register(peer: &str) -> Self {
        let peer = peer.to_owned();
        Self {
            inner: Arc::new(PeerInner {
                sent: metrics::counter!(FORWARDS_SENT, "peer" => peer.clone()),
                received: metrics::counter!(FORWARDS_RECEIVED, "peer" => peer.clone()),
                unknown_kind: metrics::counter!(FORWARDS_UNKNOWN_KIND, "peer" => peer.clone()),
                dropped: per_label(
                    ForwardDropReason::ALL,
                    |r| metrics::counter!(FORWARDS_DROPPED, "peer" => peer.clone(), "reason" => r.as_str()),
                ),
                state: per_label(
                    PeerState::ALL,
                    |s| metrics::gauge!(PEER_STATE, "peer" => peer.clone(), "state" => s.as_str()),
                ),
            }),
        }
    }

    /// Frames written to the peer (each frame once, not again when resent).
    pub fn sent(&self, frames: usize) {
        self.inner.sent.increment(frames as u64);
    }

    /// Frames received from the peer and handed over.
    pub fn received(&self, frames: usize) {
        self.inner.received.increment(frames as u64);
    }

    /// A received frame of a kind this build does not know, skipped.
    pub fn unknown_kind(&self) {
        self.inner.unknown_kind.increment(1);
    }

    pub fn dropped(&self, reason: ForwardDropReason, frames: usize) {
        self.inner.dropped[reason as usize].increment(frames as u64);
    }

    /// Sets the one-hot state gauge: 1 for `state`, 0 for the others.
    pub fn state(&self, state: PeerState) {
        for (i, gauge) in self.inner.state.iter().enumerate() {
            gauge.set(if i == state as usize { 1.0 } else { 0.0 });
        }
    }
}

fn per_label<L: Copy, T>(all: &[L], register: impl Fn(L) -> T) -> Vec<T> {
    all.iter().copied().map(register).collect()
}

/// Keeps one connection counted in `shoal_c2s_connections`; decrements on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Keeps one thing counted in a gauge (a bound resource in `shoal_sessions`, an open
/// stream in `shoal_s2s_streams`); decrements on drop.
#[derive(Debug)]
pub struct GaugeGuard {
    gauge: Gauge,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// The MUC rooms and occupants of one shard host, added to the node's gauges; what it
/// still counts is taken off them when it is dropped (the host stopped), so the gauges
/// never keep rooms that are gone.
#[derive(Debug)]
pub struct RoomGauges {
    rooms: Gauge,
    occupants: Gauge,
    /// Rooms and occupants counted so far.
    counted: (usize, usize),
}

impl RoomGauges {
    /// A room with `occupants` became live.
    pub fn room_added(&mut self, occupants: usize) {
        self.counted.0 += 1;
        self.rooms.increment(1.0);
        self.occupants_changed(0, occupants);
    }

    /// A room with `occupants` went away.
    pub fn room_removed(&mut self, occupants: usize) {
        self.counted.0 -= 1;
        self.rooms.decrement(1.0);
        self.occupants_changed(occupants, 0);
    }

    /// A live room went from `before` to `after` occupants.
    pub fn occupants_changed(&mut self, before: usize, after: usize) {
        self.counted.1 = self.counted.1 + after - before;
        self.occupants.increment(after as f64 - before as f64);
    }
}

impl Drop for RoomGauges {
    fn drop(&mut self) {
        self.rooms.decrement(self.counted.0 as f64);
        self.occupants.decrement(self.counted.1 as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series whose line starts with `series ` in a rendering.
    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn label_spellings_are_stable() {
        assert_eq!(Listener::DirectTls.as_str(), "direct_tls");
        assert_eq!(SaslMechanism::ScramSha256.as_str(), "scram_sha_256");
        assert_eq!(
            StreamErrorCondition::SeeOtherHost.as_str(),
            "see_other_host"
        );
        assert_eq!(StreamErrorCondition::ALL.len(), 16);
        // Handle arrays are indexed by discriminant, so `ALL` must be in that order.
        for (i, c) in StreamErrorCondition::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn peer_labels_are_capped() {
        let metrics = Metrics::new();
        for i in 0..MAX_PEER_LABELS + 10 {
            metrics.cluster_peer(&format!("cap-test-{i}"));
        }
        // The first MAX_PEER_LABELS names got their own series, the rest share one.
        assert_eq!(metrics.inner.peers.lock().len(), MAX_PEER_LABELS + 1);
        assert!(metrics.inner.peers.lock().contains_key(OTHER_PEER));
        // A name seen before keeps its handles.
        metrics.cluster_peer("cap-test-0");
        assert_eq!(metrics.inner.peers.lock().len(), MAX_PEER_LABELS + 1);
    }

    #[test]
    fn render_contains_names_and_labels() {
        let handle = install_recorder();
        let metrics = Metrics::new();
        // Later calls return the same recorder rather than failing or starting over.
        let again = install_recorder();

        // Other tests in this process may share the recorder, so compare deltas.
        let before = handle.render();
        let stanzas = r#"shoal_stanzas_in_total{kind="iq"}"#;
        let stanzas_before = value(&before, stanzas).unwrap_or(0.0);

        let connection = metrics.connection_accepted(Listener::DirectTls);
        metrics.connection_rejected(RejectReason::RateLimited);
        metrics.stanza_in(StanzaKind::Iq);
        metrics.stanza_out(StanzaKind::Message);
        metrics.auth_success(SaslMechanism::ScramSha256);
        metrics.auth_failure(SaslMechanism::Plain);
        metrics.routing_latency(Duration::from_micros(70));
        metrics.mailbox_drop(Mailbox::Shard);
        metrics.slow_consumer_disconnect();
        metrics.stream_error(StreamErrorCondition::NotWellFormed);
        metrics.registration(RegistrationResult::Conflict);
        let session = metrics.clone().session_bound();
        let peer = metrics.cluster_peer("node-b");
        peer.sent(3);
        peer.received(2);
        peer.unknown_kind();
        peer.dropped(ForwardDropReason::QueueFull, 1);
        peer.state(PeerState::Connected);
        metrics.forward_batch(3);
        metrics.forward_latency(Duration::from_micros(900));
        metrics.proxy_header(ProxyService::C2s, ProxyResult::Accepted);
        metrics.routed(StanzaKind::Presence, Route::Remote);
        collect_process();

        let rendered = again.render();
        for expected in [
            r#"shoal_c2s_connections{listener="direct_tls"}"#,
            r#"shoal_c2s_connections{listener="starttls"}"#,
            r#"shoal_c2s_connections_accepted_total{listener="direct_tls"}"#,
            r#"shoal_c2s_connections_rejected_total{reason="rate_limited"}"#,
            r#"shoal_c2s_connections_rejected_total{reason="too_many_connections"}"#,
            r#"shoal_stanzas_out_total{kind="message"}"#,
            r#"shoal_auth_success_total{mechanism="scram_sha_256"}"#,
            r#"shoal_auth_failure_total{mechanism="plain"}"#,
            r#"shoal_mailbox_drops_total{mailbox="shard"}"#,
            "shoal_slow_consumer_disconnects_total",
            r#"shoal_stream_errors_total{condition="not_well_formed"}"#,
            r#"shoal_stream_errors_total{condition="other"}"#,
            "shoal_sessions",
            r#"shoal_registrations_total{result="created"}"#,
            r#"shoal_registrations_total{result="conflict"}"#,
            r#"shoal_registrations_total{result="refused"}"#,
            r#"shoal_routing_latency_seconds_bucket{le="0.0001"}"#,
            r#"shoal_routing_latency_seconds_bucket{le="5"}"#,
            "shoal_routing_latency_seconds_count",
            "# HELP shoal_stream_errors_total Stream errors sent, by condition.",
            "# TYPE shoal_routing_latency_seconds histogram",
            r#"shoal_cluster_forwards_sent_total{peer="node-b"}"#,
            r#"shoal_cluster_forwards_received_total{peer="node-b"}"#,
            r#"shoal_cluster_forwards_unknown_kind_total{peer="node-b"}"#,
            r#"shoal_cluster_forwards_dropped_total{peer="node-b",reason="queue_full"}"#,
            r#"shoal_cluster_forwards_dropped_total{peer="node-b",reason="shutdown"}"#,
            r#"shoal_cluster_peer_state{peer="node-b",state="connected"} 1"#,
            r#"shoal_cluster_peer_state{peer="node-b",state="backoff"} 0"#,
            r#"shoal_cluster_forward_batch_frames_bucket{le="4"}"#,
            r#"shoal_cluster_forward_latency_seconds_bucket{le="0.001"}"#,
            r#"shoal_proxy_headers_total{service="c2s",result="accepted"}"#,
            r#"shoal_proxy_headers_total{service="s2s",result="timeout"}"#,
            r#"shoal_routed_total{kind="presence",route="remote"}"#,
            r#"shoal_routed_total{kind="iq",route="server"}"#,
            "shoal_muc_rooms",
            "shoal_muc_occupants",
            "shoal_storage_queue_depth",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(
                rendered.contains(expected),
                "missing {expected}:\n{rendered}"
            );
        }
        assert_eq!(value(&rendered, stanzas), Some(stanzas_before + 1.0));

        let open = r#"shoal_c2s_connections{listener="direct_tls"}"#;
        let open_before = value(&rendered, open).unwrap();
        drop(connection);
        drop(session);
        assert_eq!(value(&handle.render(), open), Some(open_before - 1.0));
    }
}
