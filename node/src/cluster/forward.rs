//! Forwarding: handing frames (stanzas, presence and room batches, session events,
//! shard handoff steps) to other nodes of the cluster.
//!
//! [`Forwarder`] is what the router will call. It queues a frame for one peer and
//! returns at once: every peer has one bounded FIFO queue, a full queue is a counted
//! drop handed back to the caller with the frame so that it can bounce the stanza with
//! `<resource-constraint/>` (DESIGN.md invariant 4), and one writer per peer drains the
//! queue in order into one stream, so frames from this node to a peer arrive in the
//! order they were queued (invariant 5). Received frames go to a [`FrameHandler`], in
//! order per sending peer.
//!
//! Two implementations: [`grpc`] over the tonic `Cluster` service of `shoal-proto`
//! (the real one: batching, acks, reconnect with backoff, resume after a reconnect), and
//! [`memory`], an in-process network with deterministic faults (drop, delay, hold,
//! partition, heal) for cluster tests.
//!
//! This module never decides where a stanza goes, never parses one, and never waits
//! for room in a queue.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use shoal_proto::v1::Frame;
pub use shoal_proto::v1::frame::Kind as FrameKind;

use crate::metrics::{Metrics, PeerMetrics};

pub mod grpc;
pub mod memory;

#[cfg(test)]
mod tests;

/// The default port of the cluster gRPC service (DESIGN.md "Ports and endpoints").
pub const DEFAULT_PORT: u16 = 7070;

/// A cluster member's name: 1 to 64 characters from `[A-Za-z0-9._-]`. Validated because
/// it arrives in hellos from the network and becomes a metric label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

/// A node id that breaks the [`NodeId`] rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {0:?}: expected 1 to 64 characters from A-Z a-z 0-9 . _ -")]
pub struct InvalidNodeId(pub String);

impl NodeId {
    pub const MAX_LEN: usize = 64;

    pub fn new(id: &str) -> Result<Self, InvalidNodeId> {
        let valid = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(id.into()))
        } else {
            Err(InvalidNodeId(id.chars().take(Self::MAX_LEN + 1).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The peer's queue is full: the peer or the link to it is slower than the traffic
    /// for it. The caller bounces with `<resource-constraint/>`.
    #[error("the queue to the peer is full")]
    QueueFull,
    /// No link to that node: it is not (or no longer) a known peer. The caller's view of
    /// the cluster is stale; it re-routes or bounces (invariant 6).
    #[error("not a known peer")]
    UnknownPeer,
    /// The forwarder is shutting down.
    #[error("the forwarder is shut down")]
    Closed,
}

/// A frame that was not queued, handed back so the caller can bounce what it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub error: ForwardError,
    /// Boxed: frame kinds are large and this travels in every `Result`.
    pub kind: Box<FrameKind>,
}

/// Sends frames to other nodes. Implementations are cheap to share across threads.
pub trait Forwarder: Send + Sync {
    /// This node's id.
    fn node(&self) -> &NodeId;

    /// Queues `kind` for node `to` and returns at once; never waits for room. `Ok`
    /// means queued: frames queued for one peer are delivered in this order, or not
    /// at all if the link is lost for good (peer removed, forwarder shut down), which
    /// is counted.
    fn forward(&self, to: &NodeId, kind: FrameKind) -> Result<(), Rejected>;
}

/// Receives the frames other nodes sent to this one.
///
/// Called from the receiving task of each peer's stream, in the order that peer sent
/// them; different peers call concurrently. It must not block or await: the router
/// behind it hands frames on with `try_send` (invariant 4), because a slow handler
/// stalls the whole stream from that peer.
pub trait FrameHandler: Send + Sync + 'static {
    fn handle(&self, from: &NodeId, kind: FrameKind);
}

/// Per-peer queue and batching bounds, shared by both implementations.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// Frames queued per peer before `forward` refuses (`QueueFull`). 8,192 frames is
    /// about a quarter of a second of a busy peer pair's traffic: enough to ride out a
    /// scheduling hiccup or a reconnect, small enough that a dead peer turns into
    /// bounces quickly rather than stale deliveries later.
    pub queue_capacity: usize,
    /// Frames per batch (one write). 256 keeps a batch well under the message size
    /// limit for ordinary stanzas while amortising the per-message cost.
    pub max_batch_frames: usize,
    /// Encoded bytes per batch, checked before adding a frame (a single larger frame
    /// still goes alone). 1 MiB, a quarter of gRPC's default message limit.
    pub max_batch_bytes: usize,
    /// Batches written but not yet acknowledged. Past this the writer stops draining
    /// the queue, so a receiver that cannot keep up fills the sender's queue and turns
    /// into bounces instead of growing buffers anywhere. 32 batches of up to 256 frames.
    pub window_batches: usize,
    /// First wait after a failed connection attempt, doubled per failure.
    pub backoff_min: Duration,
    /// Longest wait between attempts; also the wait after a version refusal.
    pub backoff_max: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval; a peer that stops answering for
    /// `keepalive_timeout` is treated as gone and the stream is reopened.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// `(protocol_version, min_version)` this node speaks and accepts. The crate
    /// constants except in tests, which play older and newer nodes.
    pub versions: (u32, u32),
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 8192,
            max_batch_frames: 256,
            max_batch_bytes: 1 << 20,
            window_batches: 32,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
            versions: (
                shoal_proto::PROTOCOL_VERSION,
                shoal_proto::MIN_PROTOCOL_VERSION,
            ),
        }
    }
}

/// Microseconds since the Unix epoch, the frame timestamp's unit.
fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Stamps a frame with the time it was queued.
fn stamp(kind: FrameKind) -> Frame {
    Frame {
        enqueued_at_unix_micros: unix_micros(SystemTime::now()),
        kind: Some(kind),
    }
}

/// The receiving side shared by both implementations: counts, measures and hands
/// over one peer's frames, skipping kinds this build does not know.
#[derive(Clone)]
struct Inbox {
    from: NodeId,
    handler: Arc<dyn FrameHandler>,
    metrics: Metrics,
    peer: PeerMetrics,
}

impl Inbox {
    fn new(from: NodeId, handler: Arc<dyn FrameHandler>, metrics: Metrics) -> Self {
        let peer = metrics.cluster_peer(from.as_str());
        Self {
            from,
            handler,
            metrics,
            peer,
        }
    }

    fn deliver(&self, frames: impl IntoIterator<Item = Frame>) {
        let now = unix_micros(SystemTime::now());
        let mut received = 0;
        for frame in frames {
            // A frame kind added by a newer node decodes as no kind at all: the
            // versioning rule says count it and go on.
            let Some(kind) = frame.kind else {
                self.peer.unknown_kind();
                continue;
            };
            let latency = now.saturating_sub(frame.enqueued_at_unix_micros);
            self.metrics.forward_latency(Duration::from_micros(latency));
            received += 1;
            self.handler.handle(&self.from, kind);
        }
        self.peer.received(received);
    }
}
