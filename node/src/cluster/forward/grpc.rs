//! The real forwarder: the tonic `Cluster` service of `shoal-proto`.
//!
//! [`ClusterEndpoint`] serves the receiving side on the cluster address (default port
//! 7070): it checks each stream's hello against the version rule, hands the frames of
//! every batch to the [`FrameHandler`] in order, and acknowledges batches
//! cumulatively. [`GrpcForwarder`] is the sending side: one task per peer owns the
//! peer's bounded queue and its single `Forward` stream, writes whatever is queued as
//! one batch, keeps at most a window of unacknowledged batches, and when the stream
//! breaks reconnects with exponential backoff and resends the batches the receiver has
//! not acknowledged (the receiver skips any it had already handed over), so a
//! reconnect neither loses nor reorders frames. Only across a restart of the receiver
//! can a batch be handed over twice (by the old process, whose ack was lost, and again
//! by the new one): the new process has no memory of what the old one handed over.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use shoal_proto::prost::Message as _;
use shoal_proto::v1::cluster_client::ClusterClient;
use shoal_proto::v1::cluster_server::{Cluster, ClusterServer};
use shoal_proto::v1::{
    Ack, Batch, Hello, ReceiverMessage, SenderMessage, Welcome, receiver_message, sender_message,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::{
    ForwardConfig, ForwardError, Forwarder, Frame, FrameHandler, FrameKind, Inbox, NodeId,
    Rejected, stamp,
};
use crate::metrics::{ForwardDropReason, Metrics, PeerMetrics, PeerState};

/// Largest message either side decodes: a batch is cut at `max_batch_bytes` (1 MiB by
/// default) unless a single frame is larger, such as a shard state chunk; 16 MiB leaves
/// room for those and still bounds what one peer can make us allocate.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How many distinct sending nodes a receiver remembers (for resuming their streams).
/// Far above any real cluster; it only stops a peer that says hello under ever new
/// names from growing the map without bound.
const MAX_SENDERS: usize = 1024;

// ---------------------------------------------------------------------------------
// Receiving side
// ---------------------------------------------------------------------------------

/// The cluster gRPC service, listening. Dropping it stops it too, without waiting.
pub struct ClusterEndpoint {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ClusterEndpoint {
    /// Binds `addr` and serves the `Cluster` service, handing received frames to
    /// `handler`. A node binds `cluster.listen` (default `0.0.0.0:7070`, see
    /// [`DEFAULT_PORT`](super::DEFAULT_PORT)) with [`Listeners`](crate::server::Listeners)
    /// and calls [`ClusterEndpoint::serve`].
    pub async fn bind(
        addr: SocketAddr,
        node: NodeId,
        handler: Arc<dyn FrameHandler>,
        config: &ForwardConfig,
        metrics: Metrics,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::serve(listener, node, handler, config, metrics)
    }

    /// Serves the `Cluster` service on a listener bound beforehand.
    pub fn serve(
        listener: TcpListener,
        node: NodeId,
        handler: Arc<dyn FrameHandler>,
        config: &ForwardConfig,
        metrics: Metrics,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let service = Receiver {
            node,
            versions: config.versions,
            handler,
            metrics,
            senders: Arc::new(Mutex::new(HashMap::new())),
            stop: stop.clone(),
        };
        let server = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .add_service(ClusterServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let task = tokio::spawn(async move {
            if let Err(error) = server.await {
                warn!(%error, "cluster endpoint failed");
            }
        });
        info!(%local_addr, "cluster endpoint listening");
        Ok(Self {
            local_addr,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends every open stream (senders see the end and reconnect
    /// elsewhere or later) and waits until the listener is closed.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // Streams end as soon as they see the token, so this is quick; the bound
            // only guards against a connection that never finishes its goodbye.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for ClusterEndpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the receiver remembers of one sending node: which incarnation of it last said
/// hello, the last batch handed over, and which stream is the current one.
#[derive(Default)]
struct SenderState {
    incarnation: u64,
    last_seq: u64,
    /// Bumped by every hello; a stream whose generation is no longer current (the
    /// sender reconnected while the old connection lingered) stops delivering.
    generation: u64,
}

struct Receiver {
    node: NodeId,
    versions: (u32, u32),
    handler: Arc<dyn FrameHandler>,
    metrics: Metrics,
    senders: Arc<Mutex<HashMap<NodeId, Arc<Mutex<SenderState>>>>>,
    stop: CancellationToken,
}

type ReceiverStreamOut = Pin<Box<dyn Stream<Item = Result<ReceiverMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for Receiver {
    type ForwardStream = ReceiverStreamOut;

    async fn forward(
        &self,
        request: Request<Streaming<SenderMessage>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(SenderMessage {
                kind: Some(sender_message::Kind::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        let from =
            NodeId::new(&hello.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let version =
            shoal_proto::negotiate(self.versions, (hello.protocol_version, hello.min_version))
                .map_err(|e| {
                    warn!(peer = %from, error = %e, "refused a cluster stream");
                    Status::failed_precondition(e.to_string())
                })?;

        let sender = {
            let mut senders = self.senders.lock();
            // Bounded: one entry per sending node name, and a cluster has a handful.
            // Names past the bound are refused rather than remembered.
            if senders.len() >= MAX_SENDERS && !senders.contains_key(&from) {
                warn!(peer = %from, "refused a cluster stream: too many sending nodes");
                return Err(Status::resource_exhausted("too many sending nodes"));
            }
            senders.entry(from.clone()).or_default().clone()
        };
        let (generation, resume_after) = {
            let mut state = sender.lock();
            if state.incarnation != hello.incarnation {
                // A restarted sender numbers its batches from 1 again.
                state.incarnation = hello.incarnation;
                state.last_seq = 0;
            }
            state.generation += 1;
            (state.generation, state.last_seq)
        };
        debug!(peer = %from, version, resume_after, "cluster stream accepted");

        // Acks are cumulative, so the latest value is all the sender needs: a watch
        // channel keeps one, however far the sender's reading lags (bounded by design).
        let (acks, ack_rx) = watch::channel(resume_after);
        let inbox = Inbox::new(from, self.handler.clone(), self.metrics.clone());
        tokio::spawn(receive(
            inbound,
            inbox,
            sender,
            generation,
            acks,
            self.stop.clone(),
        ));

        let welcome = ReceiverMessage {
            kind: Some(receiver_message::Kind::Welcome(Welcome {
                protocol_version: version,
                node_id: self.node.as_str().to_owned(),
                resume_after,
            })),
        };
        let acks = WatchStream::from_changes(ack_rx).map(|seq| {
            Ok(ReceiverMessage {
                kind: Some(receiver_message::Kind::Ack(Ack { seq })),
            })
        });
        let out = tokio_stream::once(Ok(welcome)).chain(acks);
        Ok(Response::new(Box::pin(out)))
    }
}

/// Reads one stream's batches and hands their frames over in order. Ends (and with it
/// the ack stream, so the sender sees the end) when the sender closes, the stream
/// fails, a newer stream from the same sender takes over, or the endpoint stops.
async fn receive(
    mut inbound: Streaming<SenderMessage>,
    inbox: Inbox,
    sender: Arc<Mutex<SenderState>>,
    generation: u64,
    acks: watch::Sender<u64>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = stop.cancelled() => return,
        };
        let batch = match message {
            Ok(Some(SenderMessage {
                kind: Some(sender_message::Kind::Batch(batch)),
            })) => batch,
            // A second hello or a message kind from a newer version: nothing to do.
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(status) => {
                debug!(peer = %inbox.from, %status, "cluster stream ended");
                return;
            }
        };
        let seq = batch.seq;
        {
            // Holding the sender's lock while handing over keeps two overlapping
            // streams of one sender from delivering the same seq twice or out of
            // order; the handler never blocks, so this is brief.
            let mut state = sender.lock();
            if state.generation != generation {
                return;
            }
            if seq <= state.last_seq {
                // Already handed over on an earlier stream; the sender resent it
                // because our ack did not reach it.
                continue;
            }
            // A sender resumes with its oldest unacknowledged batch; a receiver that
            // has seen nothing of this incarnation (it restarted) takes whatever seq
            // comes first. After that a sender never skips one.
            if state.last_seq != 0 && seq != state.last_seq + 1 {
                warn!(peer = %inbox.from, seq, expected = state.last_seq + 1, "batch gap; closing the stream");
                return;
            }
            inbox.deliver(batch.frames);
            state.last_seq = seq;
        }
        acks.send_replace(seq);
    }
}

// ---------------------------------------------------------------------------------
// Sending side
// ---------------------------------------------------------------------------------

/// What a peer link looks like from outside, for tests and the admin view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub state: PeerState,
    /// The version spoken on the current stream, once welcomed.
    pub version: Option<u32>,
    /// Why the last stream or attempt ended, if it did.
    pub last_error: Option<String>,
}

/// The sending side: one link per peer. Cheap to clone; the links stop when
/// [`shutdown`](Self::shutdown) is called or the last clone is dropped.
#[derive(Clone)]
pub struct GrpcForwarder {
    inner: Arc<SenderSide>,
}

struct SenderSide {
    node: NodeId,
    config: ForwardConfig,
    metrics: Metrics,
    links: RwLock<HashMap<NodeId, Link>>,
    stop: CancellationToken,
    /// Takes the frames of a removed peer that it did not acknowledge.
    undelivered: OnceLock<Undelivered>,
}

/// What happens to the frames a removed peer never acknowledged: the router routes
/// them again (the peer died; their accounts have new owners).
pub type Undelivered = Arc<dyn Fn(&NodeId, Vec<FrameKind>) + Send + Sync>;

impl Drop for SenderSide {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Link {
    addr: SocketAddr,
    queue: mpsc::Sender<Frame>,
    /// Ends after handing back what the peer did not acknowledge.
    task: JoinHandle<()>,
    /// Frames written to the peer and not yet acknowledged.
    unacked: Arc<AtomicUsize>,
    peer: PeerMetrics,
    status: Arc<Mutex<PeerStatus>>,
    stop: CancellationToken,
}

impl GrpcForwarder {
    pub fn new(node: NodeId, config: ForwardConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(SenderSide {
                node,
                config,
                metrics,
                links: RwLock::new(HashMap::new()),
                undelivered: OnceLock::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Starts (or keeps) the link to `peer` at `addr` (must be called on a tokio
    /// runtime: the link is a task). A known peer at a new address
    /// gets a new link; what the old one still held is counted as dropped.
    pub fn add_peer(&self, peer: NodeId, addr: SocketAddr) {
        let side = &self.inner;
        let mut links = side.links.write();
        if links.get(&peer).is_some_and(|link| link.addr == addr) {
            return;
        }
        // Overload policy: the queue is bounded at `queue_capacity` and `forward`
        // only ever `try_send`s into it; a full queue is a drop reported to the caller.
        let (queue, frames) = mpsc::channel(side.config.queue_capacity);
        let peer_metrics = side.metrics.cluster_peer(peer.as_str());
        let status = Arc::new(Mutex::new(PeerStatus {
            state: PeerState::Connecting,
            version: None,
            last_error: None,
        }));
        let stop = side.stop.child_token();
        let unacked = Arc::new(AtomicUsize::new(0));
        let task = PeerTask {
            shutdown: side.stop.clone(),
            unacked_shared: unacked.clone(),
            me: side.node.clone(),
            // Random per link: lets the receiver tell a reconnect of this link (same
            // incarnation, resume) from a new link after a restart or after the peer
            // was removed and added again (new incarnation, seqs count from 1).
            incarnation: rand::random(),
            peer: peer.clone(),
            addr,
            config: side.config.clone(),
            metrics: side.metrics.clone(),
            peer_metrics: peer_metrics.clone(),
            status: status.clone(),
            frames,
            unacked: VecDeque::new(),
            unacked_frames: 0,
            next_seq: 1,
            undelivered: side.undelivered.get().cloned(),
        };
        let task = tokio::spawn(task.run(stop.clone()));
        let link = Link {
            addr,
            queue,
            task,
            unacked,
            peer: peer_metrics,
            status,
            stop,
        };
        if let Some(old) = links.insert(peer, link) {
            old.stop.cancel();
        }
    }

    /// Installs what receives a removed peer's unacknowledged frames (once; without
    /// it they are counted as dropped). Frames the peer handled but had not yet
    /// acknowledged when it died are among them, so they may arrive twice.
    pub fn on_undelivered(&self, f: Undelivered) {
        let _ = self.inner.undelivered.set(f);
    }

    /// Ends the link to `peer` (it left the cluster); frames still queued or
    /// unacknowledged go to the [`on_undelivered`](Self::on_undelivered) handler, or
    /// are counted as dropped.
    ///
    /// Returns the link's task, which ends once the frames were handed back: from the
    /// moment this returns, `forward` to `peer` is refused with `UnknownPeer`.
    pub fn remove_peer(&self, peer: &NodeId) -> Option<JoinHandle<()>> {
        let link = self.inner.links.write().remove(peer)?;
        link.stop.cancel();
        Some(link.task)
    }

    /// The link's state, or `None` for an unknown peer.
    pub fn peer_status(&self, peer: &NodeId) -> Option<PeerStatus> {
        let links = self.inner.links.read();
        links.get(peer).map(|link| link.status.lock().clone())
    }

    /// Frames for all peers not yet acknowledged: queued, or written and unanswered.
    pub fn pending(&self) -> usize {
        let links = self.inner.links.read();
        links
            .values()
            .map(|l| {
                l.queue.max_capacity() - l.queue.capacity() + l.unacked.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Stops every link. Frames not yet acknowledged are counted as dropped.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }
}

impl Forwarder for GrpcForwarder {
    fn node(&self) -> &NodeId {
        &self.inner.node
    }

    fn forward(&self, to: &NodeId, kind: FrameKind) -> Result<(), Rejected> {
        let links = self.inner.links.read();
        let Some(link) = links.get(to) else {
            self.inner
                .metrics
                .cluster_unknown_peer()
                .dropped(ForwardDropReason::UnknownPeer, 1);
            return Err(Rejected {
                error: ForwardError::UnknownPeer,
                kind: Box::new(kind),
            });
        };
        let (error, reason, frame) = match link.queue.try_send(stamp(kind)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                (ForwardError::QueueFull, ForwardDropReason::QueueFull, frame)
            }
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                (ForwardError::Closed, ForwardDropReason::Shutdown, frame)
            }
        };
        link.peer.dropped(reason, 1);
        Err(Rejected {
            error,
            kind: Box::new(frame.kind.expect("stamped frames have a kind")),
        })
    }
}

/// How one stream to the peer ended.
enum StreamEnd {
    /// The link was stopped.
    Stopped,
    /// The peer refused our version (or we refused its); only an upgrade helps.
    Refused(String),
    /// Connection failed, broke or ended; try again after the backoff.
    Failed {
        error: String,
        /// Whether the peer had welcomed us, which resets the backoff.
        welcomed: bool,
    },
}

/// The task that owns one peer's queue and stream.
struct PeerTask {
    me: NodeId,
    incarnation: u64,
    peer: NodeId,
    addr: SocketAddr,
    config: ForwardConfig,
    metrics: Metrics,
    peer_metrics: PeerMetrics,
    status: Arc<Mutex<PeerStatus>>,
    frames: mpsc::Receiver<Frame>,
    /// Batches written and not yet acknowledged, oldest first; resent after a
    /// reconnect. Bounded by `window_batches`.
    unacked: VecDeque<Batch>,
    unacked_frames: usize,
    next_seq: u64,
    undelivered: Option<Undelivered>,
    /// The whole forwarder's stop: on shutdown nothing is handed back.
    shutdown: CancellationToken,
    /// `unacked_frames`, readable by [`GrpcForwarder::pending`].
    unacked_shared: Arc<AtomicUsize>,
}

impl PeerTask {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = self.config.backoff_min;
        loop {
            self.set_state(PeerState::Connecting, None);
            let end = tokio::select! {
                end = self.stream() => end,
                () = stop.cancelled() => StreamEnd::Stopped,
            };
            let wait = match end {
                StreamEnd::Stopped => break,
                StreamEnd::Refused(error) => {
                    warn!(peer = %self.peer, %error, "cluster peer refused");
                    self.set_state(PeerState::Refused, Some(error));
                    self.config.backoff_max
                }
                StreamEnd::Failed { error, welcomed } => {
                    debug!(peer = %self.peer, %error, "cluster stream to peer ended");
                    self.set_state(PeerState::Backoff, Some(error));
                    if welcomed {
                        backoff = self.config.backoff_min;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => break,
            }
        }
        // Whatever is still here will not reach this peer: handed back for routing
        // elsewhere, or counted as dropped.
        self.frames.close();
        let mut left: Vec<Frame> = self.unacked.drain(..).flat_map(|b| b.frames).collect();
        while let Ok(frame) = self.frames.try_recv() {
            left.push(frame);
        }
        match &self.undelivered {
            Some(handler) if !left.is_empty() && !self.shutdown.is_cancelled() => {
                handler(
                    &self.peer,
                    left.into_iter().filter_map(|f| f.kind).collect(),
                );
            }
            _ if !left.is_empty() => {
                self.peer_metrics
                    .dropped(ForwardDropReason::Shutdown, left.len());
            }
            _ => {}
        }
    }

    fn set_state(&self, state: PeerState, error: Option<String>) {
        self.peer_metrics.state(state);
        let mut status = self.status.lock();
        status.state = state;
        if state != PeerState::Connected {
            status.version = None;
        }
        if error.is_some() {
            status.last_error = error;
        }
    }

    /// One stream: connect, hello, resend, then write batches and read acks until it
    /// breaks. Never returns `Ok`: a stream ends only by failing or being stopped.
    async fn stream(&mut self) -> StreamEnd {
        let failed = |error: String| StreamEnd::Failed {
            error,
            welcomed: false,
        };
        let channel = match self.connect().await {
            Ok(channel) => channel,
            Err(error) => return failed(error),
        };
        let mut client = ClusterClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        // Room for the hello and a full window: the writer below only adds a batch
        // while fewer than `window_batches` are unacknowledged, so sends never wait.
        let (out, out_rx) = mpsc::channel(self.config.window_batches + 1);
        let hello = SenderMessage {
            kind: Some(sender_message::Kind::Hello(Hello {
                protocol_version: self.config.versions.0,
                min_version: self.config.versions.1,
                node_id: self.me.as_str().to_owned(),
                incarnation: self.incarnation,
            })),
        };
        if out.send(hello).await.is_err() {
            return failed("request stream closed".into());
        }
        let mut inbound = match client.forward(ReceiverStream::new(out_rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                return StreamEnd::Refused(status.message().to_owned());
            }
            Err(status) => return failed(status.to_string()),
        };
        let welcome = match inbound.message().await {
            Ok(Some(ReceiverMessage {
                kind: Some(receiver_message::Kind::Welcome(welcome)),
            })) => welcome,
            Ok(_) => return failed("the peer did not answer with a welcome".into()),
            Err(status) => return failed(status.to_string()),
        };
        if welcome.node_id != self.peer.as_str() {
            // Two nodes must never share an address in a cluster's view: frames would
            // land on the wrong node. Treated as a failure until membership catches up.
            return failed(format!(
                "the peer at {} is {:?}, not {}",
                self.addr, welcome.node_id, self.peer
            ));
        }
        self.acknowledge(welcome.resume_after);
        for batch in &self.unacked {
            // Cannot wait: at most a window of batches plus the hello fit in `out`.
            if out
                .send(SenderMessage {
                    kind: Some(sender_message::Kind::Batch(batch.clone())),
                })
                .await
                .is_err()
            {
                return failed("request stream closed".into());
            }
        }
        self.set_state(PeerState::Connected, None);
        self.status.lock().version = Some(welcome.protocol_version);
        debug!(peer = %self.peer, resent = self.unacked.len(), "cluster stream open");

        let ended = |error: String| StreamEnd::Failed {
            error,
            welcomed: true,
        };
        loop {
            let room = self.unacked.len() < self.config.window_batches;
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(ReceiverMessage { kind: Some(receiver_message::Kind::Ack(ack)) })) => {
                        self.acknowledge(ack.seq);
                    }
                    // Kinds from a newer version: nothing to do.
                    Ok(Some(_)) => {}
                    Ok(None) => return ended("the peer ended the stream".into()),
                    Err(status) => return ended(status.to_string()),
                },
                first = self.frames.recv(), if room => {
                    let Some(first) = first else {
                        // Every sender handle is gone: the forwarder was dropped.
                        return StreamEnd::Stopped;
                    };
                    let batch = self.batch(first);
                    if out
                        .send(SenderMessage { kind: Some(sender_message::Kind::Batch(batch)) })
                        .await
                        .is_err()
                    {
                        return ended("request stream closed".into());
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true);
        endpoint
            .connect()
            .await
            .map_err(|e| format!("connect to {}: {e}", self.addr))
    }

    /// Cuts the next batch: `first` and whatever else is queued right now, up to the
    /// frame and byte bounds. Records it as unacknowledged and returns a copy to write.
    fn batch(&mut self, first: Frame) -> Batch {
        let mut bytes = first.encoded_len();
        let mut frames = vec![first];
        while frames.len() < self.config.max_batch_frames && bytes < self.config.max_batch_bytes {
            let Ok(frame) = self.frames.try_recv() else {
                break;
            };
            bytes += frame.encoded_len();
            frames.push(frame);
        }
        let batch = Batch {
            seq: self.next_seq,
            frames,
        };
        self.next_seq += 1;
        self.metrics.forward_batch(batch.frames.len());
        self.peer_metrics.sent(batch.frames.len());
        self.unacked_frames += batch.frames.len();
        self.unacked_shared
            .store(self.unacked_frames, Ordering::Relaxed);
        self.unacked.push_back(batch.clone());
        batch
    }

    /// Forgets every batch up to `seq`: the receiver has handed it over.
    fn acknowledge(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|batch| batch.seq <= seq) {
            if let Some(batch) = self.unacked.pop_front() {
                self.unacked_frames -= batch.frames.len();
            }
        }
        self.unacked_shared
            .store(self.unacked_frames, Ordering::Relaxed);
    }
}
