//! Forwarder tests: the in-memory network's faults, and the tonic forwarder over real
//! loopback TCP between endpoints in this process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use shoal_proto::v1::cluster_client::ClusterClient;
use shoal_proto::v1::{
    Batch, Hello, PresenceFanout, ReceiverMessage, RoomBroadcast, SenderMessage, SessionEvent,
    ShardHandoff, ToBareJid, ToFullJid, receiver_message, sender_message, session_event,
    shard_handoff,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::grpc::{ClusterEndpoint, GrpcForwarder};
use super::memory::MemoryNetwork;
use super::*;
use crate::metrics::PeerState;

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Records what a node received, in order.
#[derive(Default)]
struct Collector {
    frames: Mutex<Vec<(NodeId, FrameKind)>>,
}

impl FrameHandler for Collector {
    fn handle(&self, from: &NodeId, kind: FrameKind) {
        self.frames.lock().push((from.clone(), kind));
    }
}

impl Collector {
    fn len(&self) -> usize {
        self.frames.lock().len()
    }

    /// The indices (see [`mixed`]) of the frames received from `from`, in order.
    fn indices_from(&self, from: &NodeId) -> Vec<u64> {
        let frames = self.frames.lock();
        frames
            .iter()
            .filter(|(f, _)| f == from)
            .map(|(_, kind)| index_of(kind))
            .collect()
    }

    /// Waits until at least `n` frames arrived; fails the test after `within`.
    async fn wait_for(&self, n: usize, within: Duration) {
        eventually(&format!("{n} frames"), within, || self.len() >= n).await;
    }
}

/// Waits until `check` holds; fails the test with `what` after `within`.
async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Frame number `i`, cycling through every frame kind, with `i` recoverable by
/// [`index_of`] so tests can check order and completeness.
fn mixed(i: u64) -> FrameKind {
    let stanza = Bytes::from(format!("<message id='{i}'><body>{i}</body></message>"));
    let jid = format!("user{i}@example.com");
    match i % 6 {
        0 => FrameKind::ToBare(ToBareJid {
            to: jid,
            stanza,
            hops: 0,
        }),
        1 => FrameKind::ToFull(ToFullJid {
            to: format!("{jid}/res"),
            stanza,
            session_id: i,
        }),
        2 => FrameKind::PresenceFanout(PresenceFanout {
            stanza,
            recipients: vec![jid.clone(), format!("{jid}/other")],
        }),
        3 => FrameKind::RoomBroadcast(RoomBroadcast {
            room: "room@muc.example.com".into(),
            stanza,
            recipients: vec![format!("{jid}/res")],
        }),
        4 => FrameKind::SessionEvent(SessionEvent {
            kind: session_event::Kind::Bound as i32,
            full_jid: format!("{jid}/res"),
            node: "a".into(),
            session_id: i,
        }),
        _ => FrameKind::ShardHandoff(ShardHandoff {
            shard: 7,
            epoch: 3,
            from_node: "a".into(),
            to_node: "b".into(),
            phase: shard_handoff::Phase::State as i32,
            chunk: u32::try_from(i).unwrap(),
            state: Bytes::from(vec![0xab; 64]),
        }),
    }
}

fn index_of(kind: &FrameKind) -> u64 {
    let from_stanza = |stanza: &Bytes| {
        let text = std::str::from_utf8(stanza).unwrap();
        let start = text.find("id='").unwrap() + 4;
        let end = start + text[start..].find('\'').unwrap();
        text[start..end].parse().unwrap()
    };
    match kind {
        FrameKind::ToBare(f) => from_stanza(&f.stanza),
        FrameKind::ToFull(f) => from_stanza(&f.stanza),
        FrameKind::PresenceFanout(f) => from_stanza(&f.stanza),
        FrameKind::RoomBroadcast(f) => from_stanza(&f.stanza),
        FrameKind::SessionEvent(f) => f.session_id,
        FrameKind::ShardHandoff(f) => u64::from(f.chunk),
        other => panic!("mixed() makes no {other:?}"),
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn node_ids_are_validated() {
    assert_eq!(node("node-1.eu_west").as_str(), "node-1.eu_west");
    assert!(NodeId::new("").is_err());
    assert!(NodeId::new("a b").is_err());
    assert!(NodeId::new("ünïcode").is_err());
    assert!(NodeId::new(&"x".repeat(65)).is_err());
    assert!(NodeId::new(&"x".repeat(64)).is_ok());
}

// ---------------------------------------------------------------------------------
// In-memory network
// ---------------------------------------------------------------------------------

struct Mesh {
    net: MemoryNetwork,
    forwarders: Vec<memory::MemoryForwarder>,
    collectors: Vec<Arc<Collector>>,
}

fn mesh(names: &[&str], config: &ForwardConfig) -> Mesh {
    let net = MemoryNetwork::new(config, Metrics::new());
    let mut forwarders = Vec::new();
    let mut collectors = Vec::new();
    for name in names {
        let collector = Arc::new(Collector::default());
        forwarders.push(net.join(node(name), collector.clone()));
        collectors.push(collector);
    }
    Mesh {
        net,
        forwarders,
        collectors,
    }
}

#[tokio::test]
async fn memory_keeps_order_per_pair() {
    let m = mesh(&["a", "b", "c"], &ForwardConfig::default());
    let (a, b, c) = (node("a"), node("b"), node("c"));
    for i in 0..1000 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
        m.forwarders[0].forward(&c, mixed(i)).unwrap();
        m.forwarders[2].forward(&b, mixed(i + 5000)).unwrap();
    }
    m.collectors[1].wait_for(2000, WAIT).await;
    m.collectors[2].wait_for(1000, WAIT).await;
    assert_eq!(
        m.collectors[1].indices_from(&a),
        (0..1000).collect::<Vec<_>>()
    );
    assert_eq!(
        m.collectors[1].indices_from(&c),
        (5000..6000).collect::<Vec<_>>()
    );
    assert_eq!(
        m.collectors[2].indices_from(&a),
        (0..1000).collect::<Vec<_>>()
    );
    // The frames themselves arrive intact, kind for kind.
    let received = m.collectors[2].frames.lock();
    for (i, (_, kind)) in received.iter().enumerate() {
        assert_eq!(*kind, mixed(i as u64));
    }
}

#[tokio::test]
async fn memory_partition_drops_and_heal_resumes() {
    let m = mesh(&["a", "b", "c"], &ForwardConfig::default());
    let (a, b, c) = (node("a"), node("b"), node("c"));
    for i in 0..10 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    m.net.partition(&a, &b);
    for i in 10..20 {
        // Lost on the wire: the sender cannot tell, as on a real network.
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    // Both directions are cut, and only that pair.
    m.forwarders[1].forward(&a, mixed(100)).unwrap();
    m.forwarders[0].forward(&c, mixed(200)).unwrap();
    assert_eq!(m.net.injected_drops(), 11);
    m.net.heal();
    for i in 20..30 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    m.collectors[1].wait_for(20, WAIT).await;
    m.collectors[2].wait_for(1, WAIT).await;
    let expected: Vec<u64> = (0..10).chain(20..30).collect();
    assert_eq!(m.collectors[1].indices_from(&a), expected);
    assert_eq!(m.collectors[0].len(), 0, "b's frame crossed the partition");
    assert_eq!(m.collectors[2].indices_from(&a), vec![200]);

    // heal_between ends one partition and leaves others in place.
    m.net.partition(&a, &b);
    m.net.partition(&a, &c);
    m.net.heal_between(&a, &b);
    m.forwarders[0].forward(&b, mixed(30)).unwrap();
    m.forwarders[0].forward(&c, mixed(201)).unwrap();
    m.collectors[1].wait_for(21, WAIT).await;
    assert_eq!(m.net.injected_drops(), 12);
    assert_eq!(m.collectors[2].indices_from(&a), vec![200]);
}

#[tokio::test]
async fn memory_drop_next_loses_exactly_n() {
    let m = mesh(&["a", "b"], &ForwardConfig::default());
    let (a, b) = (node("a"), node("b"));
    m.net.drop_next(&a, &b, 3);
    for i in 0..10 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    m.collectors[1].wait_for(7, WAIT).await;
    assert_eq!(
        m.collectors[1].indices_from(&a),
        (3..10).collect::<Vec<_>>()
    );
    assert_eq!(m.net.injected_drops(), 3);
}

#[tokio::test]
async fn memory_delay_reorders_nothing_within_a_pair() {
    let m = mesh(&["a", "b", "c"], &ForwardConfig::default());
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let delay = Duration::from_millis(100);
    m.net.delay(&a, &b, delay);
    let start = Instant::now();
    for i in 0..50 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    // Undelayed frames queued after delayed ones must still wait behind them.
    m.net.delay(&a, &b, Duration::ZERO);
    for i in 50..100 {
        m.forwarders[0].forward(&b, mixed(i)).unwrap();
    }
    // Another pair is not delayed at all.
    for i in 0..10 {
        m.forwarders[0].forward(&c, mixed(i)).unwrap();
    }
    m.collectors[2].wait_for(10, WAIT).await;
    assert_eq!(m.collectors[1].len(), 0, "delayed frames arrived early");
    assert_eq!(m.net.queued(&a, &b), 100);
    m.collectors[1].wait_for(100, WAIT).await;
    assert!(start.elapsed() >= delay);
    assert_eq!(
        m.collectors[1].indices_from(&a),
        (0..100).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn memory_full_queue_reports_drops_exactly() {
    let config = ForwardConfig {
        queue_capacity: 16,
        ..ForwardConfig::default()
    };
    let m = mesh(&["a", "b"], &config);
    let (a, b) = (node("a"), node("b"));
    m.net.hold(&a, &b);
    let mut refused = Vec::new();
    for i in 0..20 {
        if let Err(rejected) = m.forwarders[0].forward(&b, mixed(i)) {
            assert_eq!(rejected.error, ForwardError::QueueFull);
            refused.push(index_of(&rejected.kind));
            // The caller gets the frame back, intact, to bounce it.
            assert_eq!(*rejected.kind, mixed(i));
        }
    }
    assert_eq!(refused, (16..20).collect::<Vec<_>>());
    assert_eq!(m.net.queued(&a, &b), 16);
    m.net.release(&a, &b);
    m.collectors[1].wait_for(16, WAIT).await;
    // Room again once drained.
    eventually("queue drained", WAIT, || m.net.queued(&a, &b) == 0).await;
    m.forwarders[0].forward(&b, mixed(20)).unwrap();
    m.collectors[1].wait_for(17, WAIT).await;
    let expected: Vec<u64> = (0..16).chain([20]).collect();
    assert_eq!(m.collectors[1].indices_from(&a), expected);
}

#[tokio::test]
async fn memory_unknown_and_departed_peers() {
    let m = mesh(&["a", "b"], &ForwardConfig::default());
    let rejected = m.forwarders[0].forward(&node("z"), mixed(1)).unwrap_err();
    assert_eq!(rejected.error, ForwardError::UnknownPeer);
    m.net.leave(&node("b"));
    let rejected = m.forwarders[0].forward(&node("b"), mixed(2)).unwrap_err();
    assert_eq!(rejected.error, ForwardError::UnknownPeer);
    assert_eq!(m.forwarders[0].node(), &node("a"));
}

// ---------------------------------------------------------------------------------
// tonic over loopback
// ---------------------------------------------------------------------------------

fn fast_config() -> ForwardConfig {
    ForwardConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        ..ForwardConfig::default()
    }
}

async fn endpoint(
    addr: SocketAddr,
    name: &str,
    config: &ForwardConfig,
) -> (ClusterEndpoint, Arc<Collector>) {
    let collector = Arc::new(Collector::default());
    let endpoint =
        ClusterEndpoint::bind(addr, node(name), collector.clone(), config, Metrics::new())
            .await
            .unwrap();
    (endpoint, collector)
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_delivers_ten_thousand_mixed_frames_in_order() {
    let config = ForwardConfig {
        queue_capacity: 16_384,
        ..fast_config()
    };
    let (b_end, b_got) = endpoint(loopback(), "b", &config).await;
    let (c_end, c_got) = endpoint(loopback(), "c", &config).await;
    let a = GrpcForwarder::new(node("a"), config.clone(), Metrics::new());
    a.add_peer(node("b"), b_end.local_addr());
    a.add_peer(node("c"), c_end.local_addr());
    for i in 0..10_000 {
        a.forward(&node("b"), mixed(i)).unwrap();
        if i % 10 == 0 {
            a.forward(&node("c"), mixed(i)).unwrap();
        }
    }
    b_got.wait_for(10_000, WAIT).await;
    c_got.wait_for(1_000, WAIT).await;
    let received = b_got.frames.lock();
    assert_eq!(received.len(), 10_000);
    for (i, (from, kind)) in received.iter().enumerate() {
        assert_eq!(from, &node("a"));
        assert_eq!(*kind, mixed(i as u64), "frame {i}");
    }
    assert_eq!(
        c_got.indices_from(&node("a")),
        (0..10_000).step_by(10).collect::<Vec<_>>()
    );
    let status = a.peer_status(&node("b")).unwrap();
    assert_eq!(status.state, PeerState::Connected);
    assert_eq!(status.version, Some(shoal_proto::PROTOCOL_VERSION));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_sender_reconnects_after_peer_restart() {
    let config = fast_config();
    let (b_end, first) = endpoint(loopback(), "b", &config).await;
    let addr = b_end.local_addr();
    let a = GrpcForwarder::new(node("a"), config.clone(), Metrics::new());
    a.add_peer(node("b"), addr);
    for i in 0..100 {
        a.forward(&node("b"), mixed(i)).unwrap();
    }
    first.wait_for(100, WAIT).await;
    assert_eq!(first.indices_from(&node("a")), (0..100).collect::<Vec<_>>());

    b_end.shutdown().await;
    eventually("the sender to notice", WAIT, || {
        a.peer_status(&node("b")).unwrap().state != PeerState::Connected
    })
    .await;
    // Queued while the peer is down: held in the queue, sent after the reconnect.
    for i in 100..150 {
        a.forward(&node("b"), mixed(i)).unwrap();
    }
    let (b_end, second) = endpoint(addr, "b", &config).await;
    for i in 150..200 {
        a.forward(&node("b"), mixed(i)).unwrap();
    }
    second.wait_for(100, WAIT).await;
    eventually("the rest of the frames", WAIT, || {
        second.indices_from(&node("a")).last() == Some(&199)
    })
    .await;
    // The restarted receiver forgot what it acknowledged, so batches whose ack was lost
    // in the restart may come again; everything after them arrives once, in order.
    let got = second.indices_from(&node("a"));
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    let later: Vec<u64> = got.into_iter().filter(|i| *i >= 100).collect();
    assert_eq!(later, (100..200).collect::<Vec<_>>());
    assert_eq!(
        a.peer_status(&node("b")).unwrap().state,
        PeerState::Connected
    );
    drop(b_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_accepts_a_peer_one_version_older() {
    // This node runs version 2 and still accepts 1; the sender is a version-1 node.
    let receiver_config = ForwardConfig {
        versions: (2, 1),
        ..fast_config()
    };
    let sender_config = ForwardConfig {
        versions: (1, 1),
        ..fast_config()
    };
    let (b_end, b_got) = endpoint(loopback(), "b", &receiver_config).await;
    let a = GrpcForwarder::new(node("a"), sender_config, Metrics::new());
    a.add_peer(node("b"), b_end.local_addr());
    a.forward(&node("b"), mixed(0)).unwrap();
    b_got.wait_for(1, WAIT).await;
    let status = a.peer_status(&node("b")).unwrap();
    assert_eq!(status.state, PeerState::Connected);
    assert_eq!(status.version, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_a_peer_below_the_minimum_version() {
    let receiver_config = ForwardConfig {
        versions: (3, 2),
        ..fast_config()
    };
    let (b_end, b_got) = endpoint(loopback(), "b", &receiver_config).await;
    let a = GrpcForwarder::new(
        node("a"),
        ForwardConfig {
            versions: (1, 1),
            ..fast_config()
        },
        Metrics::new(),
    );
    a.add_peer(node("b"), b_end.local_addr());
    a.forward(&node("b"), mixed(0)).unwrap();
    eventually("the refusal", WAIT, || {
        a.peer_status(&node("b")).unwrap().state == PeerState::Refused
    })
    .await;
    let status = a.peer_status(&node("b")).unwrap();
    assert_eq!(
        status.last_error.as_deref(),
        Some(
            "incompatible cluster protocol: peer speaks v1 and accepts v1 or newer, \
             this node speaks v3 and accepts v2 or newer"
        )
    );
    assert_eq!(b_got.len(), 0);

    // The same, seen by a raw client: the call fails with FAILED_PRECONDITION.
    let (_tx, status) = raw_stream(b_end.local_addr(), hello("x", 1, 1, 9)).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("peer speaks v1"), "{status:?}");
}

fn hello(node: &str, version: u32, min: u32, incarnation: u64) -> SenderMessage {
    SenderMessage {
        kind: Some(sender_message::Kind::Hello(Hello {
            protocol_version: version,
            min_version: min,
            node_id: node.into(),
            incarnation,
        })),
    }
}

fn batch(seq: u64, frames: Vec<Frame>) -> SenderMessage {
    SenderMessage {
        kind: Some(sender_message::Kind::Batch(Batch { seq, frames })),
    }
}

type RawInbound = Result<tonic::Streaming<ReceiverMessage>, tonic::Status>;

/// Opens a Forward stream by hand, sending `first` before anything else.
async fn raw_stream(
    addr: SocketAddr,
    first: SenderMessage,
) -> (mpsc::Sender<SenderMessage>, RawInbound) {
    let mut client = ClusterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let inbound = client
        .forward(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, inbound)
}

async fn next(inbound: &mut tonic::Streaming<ReceiverMessage>) -> receiver_message::Kind {
    tokio::time::timeout(WAIT, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receiver_skips_unknown_kinds_and_resent_batches() {
    let config = fast_config();
    let (b_end, b_got) = endpoint(loopback(), "b", &config).await;
    let addr = b_end.local_addr();
    let frame = |i| stamp(mixed(i));
    let unknown = Frame {
        enqueued_at_unix_micros: 1,
        kind: None,
    };

    let (tx, inbound) = raw_stream(addr, hello("a", 1, 1, 42)).await;
    let mut inbound = inbound.unwrap();
    let receiver_message::Kind::Welcome(welcome) = next(&mut inbound).await else {
        panic!("expected a welcome");
    };
    assert_eq!(welcome.node_id, "b");
    assert_eq!(welcome.resume_after, 0);
    // A frame of a kind from a newer version sits between two known ones.
    tx.send(batch(1, vec![frame(0), unknown, frame(1)]))
        .await
        .unwrap();
    tx.send(batch(2, vec![frame(2)])).await.unwrap();
    b_got.wait_for(3, WAIT).await;
    loop {
        match next(&mut inbound).await {
            receiver_message::Kind::Ack(ack) if ack.seq == 2 => break,
            receiver_message::Kind::Ack(ack) => assert_eq!(ack.seq, 1),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(tx);

    // The same sender incarnation reconnects: told to resume after 2, and a resent
    // batch 2 is skipped rather than delivered twice.
    let (tx, inbound) = raw_stream(addr, hello("a", 1, 1, 42)).await;
    let mut inbound = inbound.unwrap();
    let receiver_message::Kind::Welcome(welcome) = next(&mut inbound).await else {
        panic!("expected a welcome");
    };
    assert_eq!(welcome.resume_after, 2);
    tx.send(batch(2, vec![frame(2)])).await.unwrap();
    tx.send(batch(3, vec![frame(3)])).await.unwrap();
    b_got.wait_for(4, WAIT).await;
    assert_eq!(b_got.indices_from(&node("a")), vec![0, 1, 2, 3]);

    // A new incarnation (the sender restarted) starts over from 1.
    let (_tx2, inbound) = raw_stream(addr, hello("a", 1, 1, 43)).await;
    let receiver_message::Kind::Welcome(welcome) = next(&mut inbound.unwrap()).await else {
        panic!("expected a welcome");
    };
    assert_eq!(welcome.resume_after, 0);

    // A stream that does not start with a hello, or names an invalid node, is refused.
    let (_tx3, refused) = raw_stream(addr, batch(1, vec![frame(9)])).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    let (_tx4, refused) = raw_stream(addr, hello("bad node", 1, 1, 1)).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(b_got.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_full_queue_is_reported_while_the_peer_is_down() {
    // Nothing listens at the peer's address, so nothing drains.
    let addr = unused_port();
    let config = ForwardConfig {
        queue_capacity: 8,
        ..fast_config()
    };
    let a = GrpcForwarder::new(node("a"), config, Metrics::new());
    a.add_peer(node("b"), addr);
    let results: Vec<_> = (0..10).map(|i| a.forward(&node("b"), mixed(i))).collect();
    assert!(results[..8].iter().all(Result::is_ok));
    for (i, result) in results[8..].iter().enumerate() {
        let rejected = result.as_ref().unwrap_err();
        assert_eq!(rejected.error, ForwardError::QueueFull);
        assert_eq!(*rejected.kind, mixed(8 + i as u64));
    }
    let rejected = a.forward(&node("nobody"), mixed(0)).unwrap_err();
    assert_eq!(rejected.error, ForwardError::UnknownPeer);
    eventually("backoff after the failed connect", WAIT, || {
        let status = a.peer_status(&node("b")).unwrap();
        status.state == PeerState::Backoff && status.last_error.is_some()
    })
    .await;
    a.remove_peer(&node("b"));
    assert!(a.peer_status(&node("b")).is_none());
    a.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_newer_stream_from_a_sender_supersedes_the_old_one() {
    // A sender reconnects while its old connection still lingers (a half-open TCP
    // connection, say): the old stream must stop delivering, so no seq is handed over
    // twice or out of order.
    let (b_end, b_got) = endpoint(loopback(), "b", &fast_config()).await;
    let addr = b_end.local_addr();
    let frame = |i| stamp(mixed(i));

    let (old_tx, old_inbound) = raw_stream(addr, hello("a", 1, 1, 7)).await;
    let mut old_inbound = old_inbound.unwrap();
    assert!(matches!(
        next(&mut old_inbound).await,
        receiver_message::Kind::Welcome(_)
    ));
    old_tx.send(batch(1, vec![frame(0)])).await.unwrap();
    b_got.wait_for(1, WAIT).await;

    let (new_tx, new_inbound) = raw_stream(addr, hello("a", 1, 1, 7)).await;
    let receiver_message::Kind::Welcome(welcome) = next(&mut new_inbound.unwrap()).await else {
        panic!("expected a welcome");
    };
    assert_eq!(welcome.resume_after, 1);
    // The old stream's next batch is not delivered, and the old stream ends.
    old_tx.send(batch(2, vec![frame(100)])).await.unwrap();
    let ended = tokio::time::timeout(WAIT, async {
        // Acks may still come; the stream's end (or failure) is what counts.
        while let Ok(Some(_)) = old_inbound.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the superseded stream did not end");
    new_tx.send(batch(2, vec![frame(1)])).await.unwrap();
    b_got.wait_for(2, WAIT).await;
    assert_eq!(b_got.indices_from(&node("a")), vec![0, 1]);
}

/// A port nothing listens on (bound, then closed).
fn unused_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_writes_what_queued_as_full_batches() {
    // Frames queued while the peer is unreachable go out, once it answers, as batches
    // of `max_batch_frames` (256): one write each, not one per frame. Seen through the
    // batch size histogram; other tests share the recorder, but none of them makes
    // batches of 129 to 256 frames unless batching works, so the delta is ours.
    let handle = crate::metrics::install_recorder();
    let full_batches = || {
        let rendered = handle.render();
        let bucket = |le: &str| {
            let series = format!("shoal_cluster_forward_batch_frames_bucket{{le=\"{le}\"}} ");
            rendered
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .map_or(0.0, |v| v.parse::<f64>().unwrap())
        };
        bucket("256") - bucket("128")
    };
    let addr = unused_port();
    let config = ForwardConfig {
        queue_capacity: 4096,
        ..fast_config()
    };
    let a = GrpcForwarder::new(node("a"), config.clone(), Metrics::new());
    let before = full_batches();
    a.add_peer(node("b"), addr);
    for i in 0..1024 {
        a.forward(&node("b"), mixed(i)).unwrap();
    }
    let (_b_end, b_got) = endpoint(addr, "b", &config).await;
    b_got.wait_for(1024, WAIT).await;
    assert_eq!(
        b_got.indices_from(&node("a")),
        (0..1024).collect::<Vec<_>>()
    );
    assert!(
        full_batches() - before >= 4.0,
        "expected four batches of 256 frames"
    );
}
