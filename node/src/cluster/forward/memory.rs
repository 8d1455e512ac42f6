//! An in-process cluster network for tests: every node joins one [`MemoryNetwork`] and
//! gets a [`MemoryForwarder`]; frames go through a bounded FIFO queue per ordered node
//! pair, delivered by one task per pair.
//!
//! Faults are decided when a frame is queued, from the filters installed at that
//! moment, so a test that installs a filter, sends and heals gets the same outcome on
//! every run (after tikv's `transport_simulate`):
//!
//! - [`partition`](MemoryNetwork::partition) two nodes: frames between them, either
//!   way, are lost (counted in [`injected_drops`](MemoryNetwork::injected_drops)), as on
//!   a network that loses packets. [`heal`](MemoryNetwork::heal) ends every fault.
//! - [`drop_next`](MemoryNetwork::drop_next) loses the next `n` frames of one pair.
//! - [`delay`](MemoryNetwork::delay) holds each frame of a pair back by a duration.
//!   Delivery stays FIFO per pair, so a delay reorders nothing within the pair; frames
//!   behind a delayed one wait for it.
//! - [`hold`](MemoryNetwork::hold) stops a pair's delivery without losing anything (a
//!   stalled peer); the queue fills and `forward` reports `QueueFull` exactly at the
//!   capacity. [`release`](MemoryNetwork::release) resumes it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    ForwardConfig, ForwardError, Forwarder, Frame, FrameHandler, FrameKind, Inbox, NodeId,
    Rejected, stamp,
};
use crate::metrics::{ForwardDropReason, Metrics};

/// One simulated network. Dropping it (and every forwarder) stops its delivery tasks.
#[derive(Clone)]
pub struct MemoryNetwork {
    inner: Arc<Net>,
}

struct Net {
    capacity: usize,
    metrics: Metrics,
    state: Mutex<NetState>,
    /// Stops the pair tasks when the network goes away.
    stop: CancellationToken,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Default)]
struct NetState {
    handlers: HashMap<NodeId, Arc<dyn FrameHandler>>,
    pairs: HashMap<(NodeId, NodeId), Arc<Pair>>,
    /// Partitioned pairs, stored in both directions.
    partitions: HashSet<(NodeId, NodeId)>,
    delays: HashMap<(NodeId, NodeId), Duration>,
    /// Frames still to lose per pair.
    drop_next: HashMap<(NodeId, NodeId), u64>,
    injected_drops: u64,
}

/// The queue of one ordered node pair.
struct Pair {
    queue: Mutex<PairQueue>,
    wake: Notify,
}

#[derive(Default)]
struct PairQueue {
    /// Frames with the earliest time each may be delivered.
    frames: VecDeque<(Frame, Instant)>,
    held: bool,
}

impl MemoryNetwork {
    /// A network whose pair queues hold `config.queue_capacity` frames.
    pub fn new(config: &ForwardConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Net {
                capacity: config.queue_capacity,
                metrics,
                state: Mutex::new(NetState::default()),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Adds a node whose received frames go to `handler`, and returns its forwarder.
    /// Joining again under the same id replaces the handler (a restarted node).
    pub fn join(&self, node: NodeId, handler: Arc<dyn FrameHandler>) -> MemoryForwarder {
        self.inner
            .state
            .lock()
            .handlers
            .insert(node.clone(), handler);
        MemoryForwarder {
            node,
            net: self.inner.clone(),
        }
    }

    /// Removes a node: frames for it are refused with `UnknownPeer` from now on, and
    /// frames already queued for it are lost when their turn comes (counted as
    /// shutdown drops).
    pub fn leave(&self, node: &NodeId) {
        self.inner.state.lock().handlers.remove(node);
    }

    /// Cuts `a` and `b` apart, both ways, until healed.
    pub fn partition(&self, a: &NodeId, b: &NodeId) {
        let mut state = self.inner.state.lock();
        state.partitions.insert((a.clone(), b.clone()));
        state.partitions.insert((b.clone(), a.clone()));
    }

    /// Ends the partition between `a` and `b`.
    pub fn heal_between(&self, a: &NodeId, b: &NodeId) {
        let mut state = self.inner.state.lock();
        state.partitions.remove(&(a.clone(), b.clone()));
        state.partitions.remove(&(b.clone(), a.clone()));
    }

    /// Ends every partition, delay, pending drop and hold.
    pub fn heal(&self) {
        let pairs: Vec<Arc<Pair>> = {
            let mut state = self.inner.state.lock();
            state.partitions.clear();
            state.delays.clear();
            state.drop_next.clear();
            state.pairs.values().cloned().collect()
        };
        for pair in pairs {
            pair.set_held(false);
        }
    }

    /// Loses the next `n` frames from `from` to `to`.
    pub fn drop_next(&self, from: &NodeId, to: &NodeId, n: u64) {
        let mut state = self.inner.state.lock();
        *state
            .drop_next
            .entry((from.clone(), to.clone()))
            .or_default() += n;
    }

    /// Delays every frame queued from now on from `from` to `to` by `delay`
    /// (`Duration::ZERO` removes the delay).
    pub fn delay(&self, from: &NodeId, to: &NodeId, delay: Duration) {
        let mut state = self.inner.state.lock();
        let key = (from.clone(), to.clone());
        if delay.is_zero() {
            state.delays.remove(&key);
        } else {
            state.delays.insert(key, delay);
        }
    }

    /// Stops delivery from `from` to `to`, keeping what is queued.
    pub fn hold(&self, from: &NodeId, to: &NodeId) {
        self.inner.pair(from, to).set_held(true);
    }

    /// Resumes delivery from `from` to `to`.
    pub fn release(&self, from: &NodeId, to: &NodeId) {
        self.inner.pair(from, to).set_held(false);
    }

    /// Frames lost to partitions and `drop_next` so far.
    pub fn injected_drops(&self) -> u64 {
        self.inner.state.lock().injected_drops
    }

    /// Frames queued from `from` to `to` and not yet delivered.
    pub fn queued(&self, from: &NodeId, to: &NodeId) -> usize {
        let pair = self
            .inner
            .state
            .lock()
            .pairs
            .get(&(from.clone(), to.clone()))
            .cloned();
        pair.map_or(0, |pair| pair.queue.lock().frames.len())
    }
}

impl Net {
    /// The queue of `from → to`, created with its delivery task on first use.
    fn pair(self: &Arc<Self>, from: &NodeId, to: &NodeId) -> Arc<Pair> {
        let mut state = self.state.lock();
        self.pair_locked(&mut state, from, to)
    }

    fn pair_locked(
        self: &Arc<Self>,
        state: &mut NetState,
        from: &NodeId,
        to: &NodeId,
    ) -> Arc<Pair> {
        let key = (from.clone(), to.clone());
        if let Some(pair) = state.pairs.get(&key) {
            return pair.clone();
        }
        let pair = Arc::new(Pair {
            queue: Mutex::new(PairQueue::default()),
            wake: Notify::new(),
        });
        state.pairs.insert(key, pair.clone());
        tokio::spawn(deliver_pair(
            Arc::downgrade(self),
            pair.clone(),
            from.clone(),
            to.clone(),
            self.stop.clone(),
        ));
        pair
    }
}

impl Pair {
    fn set_held(&self, held: bool) {
        self.queue.lock().held = held;
        self.wake.notify_one();
    }
}

/// Delivers one pair's frames in order, each no earlier than its time.
async fn deliver_pair(
    net: Weak<Net>,
    pair: Arc<Pair>,
    from: NodeId,
    to: NodeId,
    stop: CancellationToken,
) {
    // The receiving side as seen from this pair; rebuilt when `to` rejoins with a new
    // handler.
    let mut inbox: Option<Inbox> = None;
    loop {
        // Registered before looking, so a frame queued in between still wakes us.
        let woken = pair.wake.notified();
        let next = {
            let queue = pair.queue.lock();
            if queue.held {
                None
            } else {
                queue.frames.front().map(|(_, at)| *at)
            }
        };
        match next {
            None => {
                tokio::select! {
                    () = woken => {}
                    () = stop.cancelled() => return,
                }
            }
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = woken => {}
                    () = stop.cancelled() => return,
                }
            }
            Some(_) => {
                let Some((frame, _)) = pair.queue.lock().frames.pop_front() else {
                    continue;
                };
                let Some(net) = net.upgrade() else { return };
                let handler = net.state.lock().handlers.get(&to).cloned();
                match handler {
                    Some(handler) => {
                        let current = inbox
                            .take()
                            .filter(|inbox| Arc::ptr_eq(&inbox.handler, &handler))
                            .unwrap_or_else(|| {
                                Inbox::new(from.clone(), handler, net.metrics.clone())
                            });
                        current.deliver([frame]);
                        inbox = Some(current);
                    }
                    // The node left after the frame was queued.
                    None => net
                        .metrics
                        .cluster_peer(to.as_str())
                        .dropped(ForwardDropReason::Shutdown, 1),
                }
            }
        }
    }
}

/// One node's handle on a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryForwarder {
    node: NodeId,
    net: Arc<Net>,
}

impl Forwarder for MemoryForwarder {
    fn node(&self) -> &NodeId {
        &self.node
    }

    fn forward(&self, to: &NodeId, kind: FrameKind) -> Result<(), Rejected> {
        let net = &self.net;
        let mut state = net.state.lock();
        if !state.handlers.contains_key(to) {
            net.metrics
                .cluster_unknown_peer()
                .dropped(ForwardDropReason::UnknownPeer, 1);
            return Err(Rejected {
                error: ForwardError::UnknownPeer,
                kind: Box::new(kind),
            });
        }
        let peer = net.metrics.cluster_peer(to.as_str());
        let key = (self.node.clone(), to.clone());
        // Faults are decided now, so the outcome does not depend on task timing.
        let lost = state.partitions.contains(&key)
            || match state.drop_next.get_mut(&key) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            };
        if lost {
            state.injected_drops += 1;
            peer.dropped(ForwardDropReason::Injected, 1);
            return Ok(());
        }
        let at = Instant::now() + state.delays.get(&key).copied().unwrap_or_default();
        let pair = net.pair_locked(&mut state, &self.node, to);
        drop(state);
        let mut queue = pair.queue.lock();
        // Overload policy: the pair queue is bounded at `queue_capacity`; a full queue
        // refuses the frame and hands it back for a bounce (invariant 4).
        if queue.frames.len() >= net.capacity {
            drop(queue);
            peer.dropped(ForwardDropReason::QueueFull, 1);
            return Err(Rejected {
                error: ForwardError::QueueFull,
                kind: Box::new(kind),
            });
        }
        queue.frames.push_back((stamp(kind), at));
        drop(queue);
        peer.sent(1);
        pair.wake.notify_one();
        Ok(())
    }
}
