//! The router's side of cluster mode: which node owns each shard now, the frames that
//! carry work between an account's owner and the nodes holding its sessions, and the
//! node-local table of sessions that remote owners address.
//!
//! An account's state lives on the node holding its shard's lease (its *owner*); its
//! sessions live wherever the clients connected. So a session on node A whose account
//! is owned by node B binds, unbinds and sends its own presence and account iqs through
//! frames to B, and B delivers to it through frames to A. Nothing here waits: every
//! hand-over is a `try_send` or a queued frame (DESIGN.md invariant 4).
//!
//! While a shard has no valid owner (a handoff between release and claim, a dead
//! node's lease not yet expired) work for its accounts is *parked*: held in one
//! bounded queue and routed again on every change of the view, and bounced with
//! `<resource-constraint/>` if no owner appears within twice the lease TTL. A receiver
//! that is not (or no longer) the owner routes a frame on to the owner it knows; after
//! [`MAX_HOPS`] such passes the frame is parked where it is until the views settle
//! (and bounced if they do not in time), never dropped (invariant 6).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use parking_lot::{Mutex, RwLock};
use shoal_proto::v1::{self, from_session::Kind as FromKind, session_event::Kind as EventKind};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition};
use shoal_xmpp::stanza::{IqType, Kind, MessageType, PresenceType, Stanza, TopLevel};
use shoal_xmpp::xml::NsContext;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::directory::Directory;
use super::forward::{ForwardError, Forwarder, FrameHandler, FrameKind, NodeId};
use super::runtime::ShardView;
use crate::c2s::session::{Close, Deliver, ReportAttach, Session};
use crate::metrics::{Metrics, RedisOp, RerouteReason};
use crate::router::{Home, Router};
use crate::shard::{
    Attached, Bind, BindReplyTo, BindResult, FromSession, FromSessionKind, RouteToUser,
    SessionGone, SessionHandle, Unbind,
};
use crate::user::{SessionFacts, SessionId, UserShared};

/// Times a frame for an account may be passed on by nodes whose view of the owner is
/// stale before it is parked until the views settle.
pub const MAX_HOPS: u32 = 3;

/// Work parked while its shard has no valid owner; past this, it is bounced at once.
const PARK_CAPACITY: usize = 16_384;

/// Who serves a shard, as this node sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Here,
    Node(NodeId),
    /// No valid owner: park.
    Unknown,
}

/// The shard map the router reads on every stanza, rebuilt from each [`ShardView`].
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// Per shard, until when this node may serve it.
    valid_until: Vec<Option<Instant>>,
    owners: Vec<Option<NodeId>>,
    live: BTreeSet<NodeId>,
}

impl RouteTable {
    /// `withdrawn`: shards drained by the round of that generation; older views still
    /// list them as served and are not believed about them.
    fn from_view(view: &ShardView, shards: u32, withdrawn: &HashMap<u32, u64>) -> Self {
        let mut valid_until = vec![None; shards as usize];
        for (&s, &until) in &view.mine {
            if withdrawn.get(&s).is_some_and(|&g| view.generation < g) {
                continue;
            }
            if let Some(slot) = valid_until.get_mut(s as usize) {
                *slot = Some(until);
            }
        }
        let mut owners: Vec<Option<NodeId>> = view
            .owners
            .iter()
            .map(|o| o.as_deref().and_then(|id| NodeId::new(id).ok()))
            .collect();
        owners.resize(shards as usize, None);
        Self {
            valid_until,
            owners,
            live: view
                .live
                .iter()
                .filter_map(|id| NodeId::new(id).ok())
                .collect(),
        }
    }

    fn owner(&self, shard: u32, me: &NodeId, now: Instant) -> Owner {
        let shard = shard as usize;
        if self
            .valid_until
            .get(shard)
            .copied()
            .flatten()
            .is_some_and(|until| now < until)
        {
            return Owner::Here;
        }
        match self.owners.get(shard).cloned().flatten() {
            Some(node) if &node != me && self.live.contains(&node) => Owner::Node(node),
            _ => Owner::Unknown,
        }
    }

    /// Every shard has a live owner: the cluster can route everything.
    fn complete(&self) -> bool {
        self.owners
            .iter()
            .all(|o| o.as_ref().is_some_and(|n| self.live.contains(n)))
    }
}

/// Work for an account's owner, wherever the owner is.
pub enum ToOwner {
    Route(RouteToUser, u32),
    FromSession(FromSession),
    Unbind(Unbind),
    Gone(SessionGone),
    /// A bind of a session of this node, waiting while its account's shard moves.
    Bind(Bind),
}

impl ToOwner {
    pub fn user(&self) -> Option<BareJid> {
        match self {
            ToOwner::Route(r, _) => r.stanza.to.as_ref().map(|t| t.to_bare()),
            ToOwner::FromSession(f) => Some(f.from.to_bare()),
            ToOwner::Unbind(u) => Some(u.jid.to_bare()),
            ToOwner::Gone(g) => Some(g.jid.to_bare()),
            ToOwner::Bind(b) => Some(b.user.clone()),
        }
    }
}

struct Parked {
    msg: ToOwner,
    until: Instant,
}

/// A shard this node stopped serving, until its new owner is told.
struct Handoff {
    /// Given up after this (the new owner stops waiting at about the same time).
    until: Instant,
    /// Every storage write queued for the shard's accounts has finished: only then may
    /// the new owner load them.
    flushed: bool,
}

/// A session on this node, as remote owners address it.
struct LocalSession {
    jid: FullJid,
    id: SessionId,
    addr: Addr<Session>,
    shared: Arc<UserShared>,
}

/// A bind waiting for the remote owner's answer.
struct PendingBind {
    reply: oneshot::Sender<BindResult>,
}

pub struct ClusterLink {
    me: NodeId,
    shards: u32,
    forwarder: Arc<dyn Forwarder>,
    table: RwLock<Arc<RouteTable>>,
    sessions: Mutex<HashMap<BareJid, Vec<LocalSession>>>,
    binds: Mutex<HashMap<SessionId, PendingBind>>,
    parked: Mutex<VecDeque<Parked>>,
    /// Shards drained, with the generation of the round that drained them.
    withdrawn: Mutex<HashMap<u32, u64>>,
    /// Shards this node handed off and whose new owner has not yet been told that
    /// everything for them was passed on (see [`ClusterLink::handoff_complete`]).
    handed_off: Mutex<HashMap<u32, Handoff>>,
    /// Shards gained from a live node: until it says it passed everything on (or the
    /// deadline), only work coming from it is served; the rest is parked, so nothing
    /// overtakes what it still forwards.
    awaiting: Mutex<HashMap<u32, (NodeId, Instant)>>,
    awaiting_count: std::sync::atomic::AtomicUsize,
    /// The last owner seen for each shard, to know whom a gained shard comes from.
    last_owner: Mutex<Vec<Option<NodeId>>>,
    /// Handoff completions that arrived before this node saw itself the new owner.
    early_completions: Mutex<HashMap<u32, (NodeId, Instant)>>,
    /// When this node last claimed each shard it claimed (see [`ClusterLink::settling`]).
    claimed_at: Mutex<HashMap<u32, Instant>>,
    directory: Directory,
    park_for: Duration,
    metrics: Metrics,
}

impl ClusterLink {
    pub fn new(
        me: NodeId,
        shards: u32,
        forwarder: Arc<dyn Forwarder>,
        directory: Directory,
        lease_ttl: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            me,
            shards,
            forwarder,
            table: RwLock::new(Arc::new(RouteTable::default())),
            sessions: Mutex::new(HashMap::new()),
            binds: Mutex::new(HashMap::new()),
            parked: Mutex::new(VecDeque::new()),
            withdrawn: Mutex::new(HashMap::new()),
            handed_off: Mutex::new(HashMap::new()),
            awaiting: Mutex::new(HashMap::new()),
            awaiting_count: std::sync::atomic::AtomicUsize::new(0),
            last_owner: Mutex::new(vec![None; shards as usize]),
            claimed_at: Mutex::new(HashMap::new()),
            early_completions: Mutex::new(HashMap::new()),
            directory,
            park_for: lease_ttl * 2,
            metrics,
        }
    }

    /// Runs one Redis operation of the directory, recording its duration and outcome.
    pub async fn timed<T>(
        &self,
        op: RedisOp,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        super::timed(&self.metrics, op, f).await
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn owner(&self, shard: u32) -> Owner {
        self.table.read().owner(shard, &self.me, Instant::now())
    }

    /// [`owner`](Self::owner) for work that came from `from` (`None`: from this node's
    /// own sessions or shards): a shard still awaiting its previous owner's handoff
    /// serves only work from that owner; anything else waits.
    pub fn owner_for(&self, shard: u32, from: Option<&NodeId>) -> Owner {
        let owner = self.owner(shard);
        if owner == Owner::Here
            && self
                .awaiting_count
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            && let Some((previous, until)) = self.awaiting.lock().get(&shard)
            && from != Some(previous)
            && Instant::now() < *until
        {
            return Owner::Unknown;
        }
        owner
    }

    /// Notes the shards this node gained from a live previous owner, whose handoff it
    /// must wait for, and remembers every shard's owner.
    fn note_owners(&self, before: &RouteTable, after: &RouteTable) {
        let now = Instant::now();
        let mut last = self.last_owner.lock();
        let mut awaiting = self.awaiting.lock();
        let mut early = self.early_completions.lock();
        early.retain(|_, (_, until)| now < *until);
        for shard in 0..self.shards {
            let i = shard as usize;
            let gained = after.owner(shard, &self.me, now) == Owner::Here
                && before.owner(shard, &self.me, now) != Owner::Here;
            if gained
                && let Some(previous) = last[i].clone()
                && previous != self.me
                && after.live.contains(&previous)
                && early
                    .remove(&shard)
                    .is_none_or(|(from, _)| from != previous)
            {
                debug!(shard, from = %previous, "awaiting the previous owner's handoff");
                awaiting.insert(shard, (previous, now + self.park_for / 2));
            }
            if let Some(owner) = after.owners.get(i).cloned().flatten() {
                last[i] = Some(owner);
            }
        }
        self.awaiting_count
            .store(awaiting.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops waiting for handoffs whose previous owner did not finish in time.
    fn expire_awaiting(&self) {
        let now = Instant::now();
        let mut awaiting = self.awaiting.lock();
        awaiting.retain(|shard, (previous, until)| {
            let keep = now < *until;
            if !keep {
                warn!(shard, %previous, "the previous owner did not complete its handoff in time");
            }
            keep
        });
        self.awaiting_count
            .store(awaiting.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The previous owner of `shard` says everything for it was passed on. It may say
    /// so before this node's view shows the shard as its own: then it is remembered
    /// (for a lease TTL) and no wait starts.
    pub fn handoff_complete(&self, shard: u32, from: &NodeId) {
        let mut awaiting = self.awaiting.lock();
        if awaiting.get(&shard).is_some_and(|(p, _)| p == from) {
            awaiting.remove(&shard);
            self.awaiting_count
                .store(awaiting.len(), std::sync::atomic::Ordering::Relaxed);
        } else {
            let until = Instant::now() + self.park_for / 2;
            self.early_completions
                .lock()
                .insert(shard, (from.clone(), until));
        }
    }

    /// Tells the new owners of the shards this node handed off that everything for
    /// them was passed on (after the parked work was routed to them, on the same
    /// ordered stream). Shards whose new owner is not known yet stay listed.
    fn complete_handoffs(&self, table: &RouteTable) {
        let now = Instant::now();
        let mut handed = self.handed_off.lock();
        handed.retain(|&shard, handoff| {
            if now >= handoff.until {
                return false;
            }
            let Owner::Node(owner) = table.owner(shard, &self.me, now) else {
                return true;
            };
            if !handoff.flushed {
                return true;
            }
            let frame = FrameKind::ShardHandoff(v1::ShardHandoff {
                shard,
                from_node: self.me.to_string(),
                to_node: owner.to_string(),
                phase: v1::shard_handoff::Phase::Complete.into(),
                ..Default::default()
            });
            if let Err(e) = self.forward(&owner, frame) {
                debug!(shard, %owner, error = %e, "handoff completion not sent");
            }
            false
        });
    }

    /// The storage writes of `shards`' accounts have all finished.
    pub fn flushed(&self, shards: &[u32]) {
        let mut handed = self.handed_off.lock();
        for s in shards {
            if let Some(h) = handed.get_mut(s) {
                h.flushed = true;
            }
        }
    }

    /// Whether another live node is known.
    pub fn has_peers(&self) -> bool {
        self.table.read().live.iter().any(|n| n != &self.me)
    }

    /// Handoffs not yet completed, for a leaving node to wait on.
    pub fn pending_handoffs(&self) -> usize {
        self.handed_off.lock().len()
    }

    /// Stops routing `shards` to this node at once (the drain before a handoff).
    pub fn withdraw(&self, shards: &[u32], generation: u64) {
        let mut withdrawn = self.withdrawn.lock();
        let mut table = self.table.write();
        let mut updated = RouteTable::clone(&table);
        let until = Instant::now() + self.park_for;
        let mut handed = self.handed_off.lock();
        for &s in shards {
            withdrawn.insert(s, generation);
            handed.insert(
                s,
                Handoff {
                    until,
                    flushed: false,
                },
            );
            if let Some(slot) = updated.valid_until.get_mut(s as usize) {
                *slot = None;
            }
        }
        *table = Arc::new(updated);
    }

    /// Whether `node` is a live member now.
    pub fn is_live(&self, node: &NodeId) -> bool {
        node == &self.me || self.table.read().live.contains(node)
    }

    /// Queues a frame for `to`.
    pub fn forward(&self, to: &NodeId, kind: FrameKind) -> Result<(), ForwardError> {
        self.forwarder.forward(to, kind).map_err(|r| r.error)
    }

    // ---- parking -------------------------------------------------------------------

    /// Parks `work` ahead of everything parked, in its order (however full the park
    /// is: it was already accepted once).
    fn park_front(&self, work: Vec<ToOwner>) {
        let until = Instant::now() + self.park_for;
        let mut parked = self.parked.lock();
        for msg in work.into_iter().rev() {
            self.metrics.parked();
            parked.push_front(Parked { msg, until });
        }
        self.metrics.park_depth(parked.len());
    }

    /// How much work is parked.
    pub fn parked(&self) -> usize {
        self.parked.lock().len()
    }

    /// Holds `msg` until its shard has an owner; gives it back when the park is full.
    pub fn park(&self, msg: ToOwner) -> Option<ToOwner> {
        let mut parked = self.parked.lock();
        if parked.len() >= PARK_CAPACITY {
            return Some(msg);
        }
        parked.push_back(Parked {
            msg,
            until: Instant::now() + self.park_for,
        });
        self.metrics.parked();
        self.metrics.park_depth(parked.len());
        None
    }

    // ---- local sessions --------------------------------------------------------------

    /// Records a session started on this node, so owners can reach it.
    pub fn session_started(
        &self,
        jid: &FullJid,
        id: SessionId,
        addr: Addr<Session>,
        shared: Arc<UserShared>,
    ) {
        self.sessions
            .lock()
            .entry(jid.to_bare())
            .or_default()
            .push(LocalSession {
                jid: jid.clone(),
                id,
                addr,
                shared,
            });
    }

    pub fn session_ended(&self, jid: &FullJid, id: SessionId) {
        let mut sessions = self.sessions.lock();
        let bare = jid.to_bare();
        if let Some(list) = sessions.get_mut(&bare) {
            list.retain(|s| !(s.id == id && &s.jid == jid));
            if list.is_empty() {
                sessions.remove(&bare);
            }
        }
    }

    /// Closes every session of this node with `error` (shutdown: the accounts'
    /// owners may be other nodes, so their shard hosts do not know these sessions).
    pub fn close_all(&self, error: &StreamError) {
        for s in self.sessions.lock().values().flatten() {
            // Sessions that cannot take the message are closed by the final stop.
            let _ = s.addr.try_send(Close(error.clone()));
        }
    }

    /// The newest session of `jid` on this node, with what it reads of its account.
    pub fn local_session_of(&self, jid: &FullJid) -> Option<(Addr<Session>, Arc<UserShared>)> {
        let sessions = self.sessions.lock();
        sessions
            .get(&jid.to_bare())?
            .iter()
            .rev()
            .find(|s| &s.jid == jid)
            .map(|s| (s.addr.clone(), s.shared.clone()))
    }

    fn local_session(&self, jid: &FullJid, id: SessionId) -> Option<Addr<Session>> {
        let sessions = self.sessions.lock();
        sessions
            .get(&jid.to_bare())?
            .iter()
            .find(|s| s.id == id && &s.jid == jid)
            .map(|s| s.addr.clone())
    }

    /// The owner's new copy of what this user's sessions read.
    pub fn update_shared(&self, user: &BareJid, blocklist: &[String], carbons: usize) {
        if let Some(list) = self.sessions.lock().get(user) {
            for s in list {
                s.shared.replace(blocklist.to_vec(), carbons);
            }
        }
    }

    /// Asks every session of this node whose account hashes onto one of `shards` to
    /// report itself to `owner`, which just claimed them.
    pub fn report_sessions(&self, owner: &NodeId, shards: &HashSet<u32>, router: &Router) {
        let sessions: Vec<Addr<Session>> = self
            .sessions
            .lock()
            .iter()
            .filter(|(user, _)| shards.contains(&router.shard(user)))
            .flat_map(|(_, list)| list.iter().map(|s| s.addr.clone()))
            .collect();
        if !sessions.is_empty() {
            debug!(%owner, sessions = sessions.len(), "sessions report to their accounts' new owner");
        }
        for addr in sessions {
            let _ = addr.try_send(ReportAttach {
                owner: owner.clone(),
            });
        }
    }

    /// Whether `shard` was claimed so recently (within twice the lease TTL) that the
    /// sessions of its accounts may not all have reported yet: then an account that is
    /// not loaded may still have sessions, and presence for it must not be ignored.
    pub fn settling(&self, shard: u32) -> bool {
        let mut claimed = self.claimed_at.lock();
        let now = Instant::now();
        claimed.retain(|_, at| now.duration_since(*at) < self.park_for);
        claimed.contains_key(&shard)
    }

    /// This node claimed `shards`: its own sessions of their accounts and every other
    /// node's report to it.
    fn want_sessions(&self, shards: Vec<u32>, router: &Router) {
        let now = Instant::now();
        self.claimed_at
            .lock()
            .extend(shards.iter().map(|&s| (s, now)));
        self.report_sessions(&self.me, &shards.iter().copied().collect(), router);
        let peers: Vec<NodeId> = self
            .table
            .read()
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        self.ask_peers(&peers, shards);
    }

    /// Asks `peers` for the sessions of the accounts of `shards`.
    fn ask_peers(&self, peers: &[NodeId], shards: Vec<u32>) {
        for peer in peers {
            let frame = FrameKind::SessionsWanted(v1::SessionsWanted {
                shards: shards.clone(),
            });
            if let Err(e) = self.forward(peer, frame) {
                debug!(%peer, error = %e, "sessions request not sent");
            }
        }
    }

    /// Asks the session `jid`/`id` on this node to report itself to `owner` (a node
    /// that took over the account). Answers "gone" at once when it is not here.
    pub fn request_attach(&self, owner: &NodeId, jid: FullJid, id: SessionId, router: &Router) {
        let asked = self.local_session(&jid, id).is_some_and(|addr| {
            addr.try_send(ReportAttach {
                owner: owner.clone(),
            })
            .is_ok()
        });
        if !asked {
            router.attached(
                owner,
                Attached {
                    jid,
                    id,
                    handle: None,
                    facts: None,
                },
            );
        }
    }

    // ---- binds -------------------------------------------------------------------------

    pub fn bind_remote(&self, owner: &NodeId, bind: Bind) {
        let id = bind.id;
        let request = FrameKind::BindRequest(v1::BindRequest {
            user: bind.user.to_string(),
            resource: bind.resource.clone(),
            session_id: id,
        });
        let BindReplyTo::Local(reply) = bind.reply else {
            return;
        };
        self.binds.lock().insert(id, PendingBind { reply });
        if let Err(e) = self.forward(owner, request)
            && let Some(p) = self.binds.lock().remove(&id)
        {
            let _ = p.reply.send(Err(StanzaError::with_text(
                StanzaErrorCondition::ResourceConstraint,
                format!("cannot reach the account's node: {e}"),
            )));
        }
    }

    /// Forgets binds whose connection gave up waiting.
    pub fn sweep_binds(&self) {
        self.binds.lock().retain(|_, p| !p.reply.is_closed());
    }
}

// ---- the view watcher --------------------------------------------------------------

/// Keeps the route table, the peer links and the parked work in step with the shard
/// view, and purges the sessions of nodes that died. Runs until the view's sender is
/// dropped.
pub async fn follow_view(
    router: Router,
    mut view: watch::Receiver<ShardView>,
    mut gains: tokio::sync::mpsc::UnboundedReceiver<Vec<u32>>,
    peers: Arc<dyn PeerSet>,
    ready: impl Fn(bool) + Send + 'static,
) {
    let Some(link) = router.cluster().cloned() else {
        return;
    };
    let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
    let mut live: BTreeSet<String> = BTreeSet::new();
    let mut absent: HashMap<String, Instant> = HashMap::new();
    let mut claimed: Vec<u32> = Vec::new();
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    // A node restarted under the same id finds its previous life's sessions in the
    // directory: they are gone, and their contacts are told.
    purge(&router, &link, link.me.as_str()).await;
    loop {
        let snapshot = view.borrow_and_update().clone();
        let table = {
            let mut withdrawn = link.withdrawn.lock();
            let table = RouteTable::from_view(&snapshot, link.shards, &withdrawn);
            withdrawn.retain(|_, g| snapshot.generation < *g);
            Arc::new(table)
        };
        let before = link.table.read().clone();
        // Shards of a node that is gone from the membership now have other owners:
        // what was queued for it is taken back before the new owners are routed to,
        // so it goes ahead of everything sent to them.
        let last = link.last_owner.lock().clone();
        for node in taken_over(&last, &table) {
            if let Some(task) = peers.remove(&node) {
                let _ = tokio::time::timeout(link.park_for / 2, task).await;
            }
            // A fresh link: the node may yet be alive (it lost Redis for a while) and
            // its sessions still need reaching; if it is dead, the link only queues
            // until the node is given up.
            if let Some(endpoint) = endpoints.get(node.as_str())
                && let Some(addr) = resolve(endpoint).await
            {
                peers.add(node, addr);
            }
        }
        link.note_owners(&before, &table);
        let complete = table.complete();
        *link.table.write() = table;
        for (id, endpoint) in &snapshot.endpoints {
            if id != link.me.as_str() && endpoints.get(id) != Some(endpoint) {
                match resolve(endpoint).await {
                    Some(addr) => {
                        if let Ok(node) = NodeId::new(id) {
                            peers.add(node, addr);
                            endpoints.insert(id.clone(), endpoint.clone());
                        }
                    }
                    None => warn!(node = %id, %endpoint, "cannot resolve a peer's endpoint"),
                }
            }
        }
        let now_live: BTreeSet<String> = snapshot.live.iter().cloned().collect();
        let now = Instant::now();
        for gone in live.difference(&now_live) {
            absent.entry(gone.clone()).or_insert(now);
        }
        absent.retain(|node, _| !now_live.contains(node));
        // A node is given up for gone only after a lease TTL of absence: one that is
        // alive heartbeats again well within it (Redis restarted and lost the
        // membership keys, say), and its sessions must not be purged.
        let departed: Vec<String> = absent
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= link.park_for / 2)
            .map(|(node, _)| node.clone())
            .collect();
        for gone in departed {
            absent.remove(&gone);
            info!(node = %gone, "node left the cluster");
            endpoints.remove(&gone);
            if let Ok(node) = NodeId::new(&gone) {
                peers.remove(&node);
            }
            // One node purges: the first live one in id order.
            if now_live.first().map(String::as_str) == Some(link.me.as_str()) {
                purge(&router, &link, &gone).await;
            }
        }
        // A node that (re)appears may hold sessions of accounts this node took over
        // while it was missing (after a Redis restart, say): it reports them.
        let appeared: Vec<NodeId> = now_live
            .difference(&live)
            .filter(|id| id.as_str() != link.me.as_str())
            .filter_map(|id| NodeId::new(id).ok())
            .collect();
        if !appeared.is_empty() {
            let mine: Vec<u32> = snapshot.mine.keys().copied().collect();
            link.ask_peers(&appeared, mine);
        }
        live = now_live;
        ready(complete && snapshot.reachable && live.contains(link.me.as_str()));
        router.retry_parked();
        link.complete_handoffs(&link.table.read().clone());
        if !claimed.is_empty() {
            link.want_sessions(std::mem::take(&mut claimed), &router);
        }
        // Until the next change: forget abandoned binds, retry parked work, ask for
        // the sessions of the shards claimed.
        loop {
            tokio::select! {
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                // Asked for once the view that has them claimed is applied (the round
                // reports its gains before it publishes its view).
                Some(shards) = gains.recv() => claimed.extend(shards),
                _ = sweep.tick() => {
                    link.sweep_binds();
                    link.expire_awaiting();
                    router.retry_parked();
                    link.complete_handoffs(&link.table.read().clone());
                }
            }
        }
    }
}

/// Nodes missing from `after`'s membership that were the last known owners (`last`,
/// per shard, across views in which a shard may have had no owner for a while) of
/// shards another node owns in `after`.
fn taken_over(last: &[Option<NodeId>], after: &RouteTable) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = Vec::new();
    for (old, new) in last.iter().zip(&after.owners) {
        if let (Some(old), Some(new)) = (old, new)
            && old != new
            && !after.live.contains(old)
            && !nodes.contains(old)
        {
            nodes.push(old.clone());
        }
    }
    nodes
}

/// The peer links a view change adds and removes.
pub trait PeerSet: Send + Sync {
    fn add(&self, node: NodeId, addr: SocketAddr);
    /// Drops the link; the task it returns ends once the frames the node did not
    /// acknowledge were handed back.
    fn remove(&self, node: &NodeId) -> Option<tokio::task::JoinHandle<()>>;
}

impl PeerSet for super::forward::grpc::GrpcForwarder {
    fn add(&self, node: NodeId, addr: SocketAddr) {
        self.add_peer(node, addr);
    }

    fn remove(&self, node: &NodeId) -> Option<tokio::task::JoinHandle<()>> {
        self.remove_peer(node)
    }
}

async fn resolve(endpoint: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(endpoint).await.ok()?.next()
}

/// Removes `node`'s sessions from the directory and tells each account's owner that
/// the session is gone.
async fn purge(router: &Router, link: &ClusterLink, node: &str) {
    let gone = match link
        .timed(RedisOp::DirectoryPurge, link.directory.purge_node(node))
        .await
    {
        Ok(gone) => gone,
        Err(e) => {
            warn!(%node, error = %e, "purging a departed node's sessions failed");
            return;
        }
    };
    if !gone.is_empty() {
        info!(%node, sessions = gone.len(), "purged the sessions of a departed node");
    }
    let Ok(node) = NodeId::new(node) else { return };
    for full in gone {
        if let Ok(jid) = full.parse::<FullJid>() {
            router.to_owner(ToOwner::Gone(SessionGone {
                jid,
                node: node.clone(),
            }));
        }
    }
}

// ---- receiving -------------------------------------------------------------------

/// Parses a stanza another node serialised.
fn decode(bytes: &Bytes) -> Option<Stanza> {
    match shoal_xmpp::stanza::parse_top_level(bytes, NsContext::CLIENT) {
        Ok(TopLevel::Stanza(s)) => Some(s),
        _ => None,
    }
}

/// The stanza kind of serialised bytes, for metrics only.
fn kind_of(bytes: &[u8]) -> Kind {
    if bytes.starts_with(b"<message") {
        Kind::Message(MessageType::Normal)
    } else if bytes.starts_with(b"<presence") {
        Kind::Presence(PresenceType::Available)
    } else {
        Kind::Iq(IqType::Result)
    }
}

fn from_session_kind(kind: FromKind) -> Option<FromSessionKind> {
    Some(match kind {
        FromKind::Presence => FromSessionKind::Presence,
        FromKind::Subscription => FromSessionKind::Subscription,
        FromKind::AccountIq => FromSessionKind::AccountIq,
        FromKind::SentCarbon => FromSessionKind::SentCarbon,
        FromKind::Unspecified => return None,
    })
}

pub fn to_wire_kind(kind: FromSessionKind) -> FromKind {
    match kind {
        FromSessionKind::Presence => FromKind::Presence,
        FromSessionKind::Subscription => FromKind::Subscription,
        FromSessionKind::AccountIq => FromKind::AccountIq,
        FromSessionKind::SentCarbon => FromKind::SentCarbon,
    }
}

/// The work for accounts' owners a frame carries: a stanza for an account, a
/// session's own stanza, a session event; a delivery to a session that is not there
/// (any more) becomes its unbind and the stanza routed again, after it on the same
/// path. Other kinds carry none.
fn owner_work(kind: FrameKind, now: Instant, from: Option<&NodeId>) -> Vec<ToOwner> {
    let route = |stanza, origin| RouteToUser {
        stanza,
        since: now,
        origin,
    };
    match kind {
        FrameKind::ToBare(f) => match decode(&f.stanza) {
            Some(stanza) => {
                // Forwarded once (hops counts the forwards): `from` is where it was
                // sent.
                let origin = from.filter(|_| f.hops == 1).cloned().map(Home::Node);
                vec![ToOwner::Route(route(stanza, origin), f.hops)]
            }
            None => {
                warn!("undecodable stanza from a peer dropped");
                Vec::new()
            }
        },
        // One copy per recipient, each one hop along.
        FrameKind::PresenceFanout(f) => {
            let Some(template) = decode(&f.stanza) else {
                warn!("undecodable presence fan-out from a peer dropped");
                return Vec::new();
            };
            f.recipients
                .iter()
                .filter_map(|r| r.parse::<Jid>().ok())
                .map(|to| {
                    let mut stanza = template.clone();
                    stanza.to = Some(to);
                    ToOwner::Route(route(stanza, None), 1)
                })
                .collect()
        }
        FrameKind::ToFull(f) => {
            let Ok(jid) = f.to.parse::<FullJid>() else {
                return Vec::new();
            };
            let mut work = vec![ToOwner::Unbind(Unbind {
                jid,
                id: f.session_id,
            })];
            if let Some(stanza) = decode(&f.stanza) {
                work.push(ToOwner::Route(route(stanza, None), 0));
            }
            work
        }
        FrameKind::FromSession(f) => {
            let (Ok(from), Some(kind), Some(stanza)) = (
                f.from.parse::<FullJid>(),
                from_session_kind(f.kind()),
                decode(&f.stanza),
            ) else {
                return Vec::new();
            };
            vec![ToOwner::FromSession(FromSession {
                from,
                kind,
                stanza,
                since: now,
            })]
        }
        FrameKind::SessionEvent(e) if e.kind() == EventKind::Unbound => {
            let Ok(jid) = e.full_jid.parse::<FullJid>() else {
                return Vec::new();
            };
            vec![match NodeId::new(&e.node) {
                // Session id 0: whichever session of that full JID lived on that node.
                Ok(node) if e.session_id == 0 => ToOwner::Gone(SessionGone { jid, node }),
                _ => ToOwner::Unbind(Unbind {
                    jid,
                    id: e.session_id,
                }),
            }]
        }
        _ => Vec::new(),
    }
}

/// Frames from other nodes, handed to this node's router.
pub struct Inbound(pub Router);

impl FrameHandler for Inbound {
    fn handle(&self, from: &NodeId, kind: FrameKind) {
        let router = &self.0;
        let Some(link) = router.cluster() else { return };
        let now = Instant::now();
        match kind {
            FrameKind::ToBare(_)
            | FrameKind::PresenceFanout(_)
            | FrameKind::FromSession(_)
            | FrameKind::SessionEvent(_) => {
                for msg in owner_work(kind, now, Some(from)) {
                    router.to_owner_from(msg, Some(from));
                }
            }
            FrameKind::ToFull(f) => {
                let Ok(jid) = f.to.parse::<FullJid>() else {
                    return;
                };
                let delivered = link.local_session(&jid, f.session_id).is_some_and(|addr| {
                    addr.try_send(Deliver {
                        kind: kind_of(&f.stanza),
                        xml: f.stanza.clone(),
                        since: now,
                    })
                    .is_ok()
                });
                if !delivered {
                    for msg in owner_work(FrameKind::ToFull(f), now, Some(from)) {
                        router.to_owner(msg);
                    }
                }
            }
            FrameKind::BindRequest(b) => {
                let Ok(user) = b.user.parse::<BareJid>() else {
                    return;
                };
                let Ok(jid) = user.with_resource_str(&b.resource) else {
                    return router.bind_reply(
                        from,
                        b.session_id,
                        Err(StanzaError::new(StanzaErrorCondition::BadRequest)),
                    );
                };
                router.bind_here(Bind {
                    user,
                    resource: b.resource,
                    id: b.session_id,
                    session: SessionHandle::Remote {
                        node: from.clone(),
                        jid,
                        id: b.session_id,
                    },
                    reply: BindReplyTo::Node(from.clone()),
                });
            }
            FrameKind::BindReply(r) => {
                let Some(pending) = link.binds.lock().remove(&r.session_id) else {
                    return;
                };
                let result = if r.error.is_empty() {
                    match r.full_jid.parse::<FullJid>() {
                        Ok(jid) => {
                            let shared = Arc::new(UserShared::default());
                            if let Some(s) = &r.shared {
                                shared.replace(s.blocklist.clone(), s.carbons as usize);
                            }
                            Ok((jid, shared))
                        }
                        Err(_) => Err(StanzaError::new(StanzaErrorCondition::InternalServerError)),
                    }
                } else {
                    let condition = StanzaErrorCondition::from_name(&r.error)
                        .unwrap_or(StanzaErrorCondition::InternalServerError);
                    Err(StanzaError::with_text(condition, &r.error_text))
                };
                let bound = result.as_ref().ok().map(|(jid, _)| jid.clone());
                if pending.reply.send(result).is_err()
                    && let Some(jid) = bound
                {
                    // The connection went away while the owner bound it.
                    router.to_owner(ToOwner::Unbind(Unbind {
                        jid,
                        id: r.session_id,
                    }));
                }
            }
            FrameKind::SharedState(s) => {
                if let Ok(user) = s.user.parse::<BareJid>() {
                    link.update_shared(&user, &s.blocklist, s.carbons as usize);
                }
            }
            FrameKind::CloseSession(c) => {
                let (Ok(jid), Some(condition)) = (
                    c.full_jid.parse::<FullJid>(),
                    StreamErrorCondition::from_name(&c.condition),
                ) else {
                    return;
                };
                if let Some(addr) = link.local_session(&jid, c.session_id) {
                    let _ = addr.try_send(Close(condition.into()));
                }
            }
            FrameKind::Reattach(r) => {
                if let Ok(jid) = r.full_jid.parse::<FullJid>() {
                    link.request_attach(from, jid, r.session_id, router);
                }
            }
            FrameKind::Attached(a) => {
                let Ok(jid) = a.full_jid.parse::<FullJid>() else {
                    return;
                };
                let facts = a.present.then(|| SessionFacts {
                    presence: (!a.presence.is_empty())
                        .then(|| decode(&a.presence))
                        .flatten(),
                    roster_requested: a.roster_requested,
                    blocklist_requested: a.blocklist_requested,
                    carbons: a.carbons,
                });
                let handle = facts.is_some().then(|| SessionHandle::Remote {
                    node: from.clone(),
                    jid: jid.clone(),
                    id: a.session_id,
                });
                router.attached_here(Attached {
                    jid,
                    id: a.session_id,
                    handle,
                    facts,
                });
            }
            FrameKind::ShardHandoff(h) => {
                if h.phase() == v1::shard_handoff::Phase::Complete {
                    link.handoff_complete(h.shard, from);
                    router.retry_parked();
                }
            }
            FrameKind::SessionsWanted(w) => {
                link.report_sessions(from, &w.shards.into_iter().collect(), router);
            }
            FrameKind::RoomBroadcast(b) => match decode(&b.stanza) {
                Some(template) => router.deliver_room_broadcast(&template, &b.recipients, now),
                None => warn!(room = %b.room, "undecodable room broadcast from a peer dropped"),
            },
        }
    }
}

/// Routes again the frames a departed peer never acknowledged: stanzas and session
/// events go to their accounts' new owners (a frame the peer handled just before it
/// died may so arrive twice: duplicates over loss), a bind that waited on it is
/// refused so the client retries, the rest concerned only the peer itself.
pub fn reroute_undelivered(router: &Router, peer: &NodeId, frames: Vec<FrameKind>) {
    let Some(link) = router.cluster() else { return };
    info!(%peer, frames = frames.len(), "routing again what a departed node did not acknowledge");
    link.metrics
        .rerouted(RerouteReason::DepartedPeer, frames.len());
    let now = Instant::now();
    let mut work = Vec::new();
    for kind in frames {
        match kind {
            FrameKind::BindRequest(b) => {
                if let Some(p) = link.binds.lock().remove(&b.session_id) {
                    let _ = p.reply.send(Err(StanzaError::with_text(
                        StanzaErrorCondition::ResourceConstraint,
                        "the account's node left; try again",
                    )));
                }
            }
            kind => work.extend(owner_work(kind, now, None)),
        }
    }
    // Ahead of anything parked since: these are older.
    link.park_front(work);
    router.retry_parked();
}

/// Bounces or counts what could not be parked or whose time ran out.
pub fn give_up(router: &Router, msg: ToOwner, why: &str) {
    let error = StanzaError::with_text(StanzaErrorCondition::ResourceConstraint, why);
    match msg {
        ToOwner::Route(r, _) => {
            info!(to = ?r.stanza.to, "stanza bounced: {why}");
            router.bounce(&r.stanza, error, r.since);
        }
        ToOwner::FromSession(f) => {
            info!(from = %f.from, "stanza bounced: {why}");
            router.bounce(&f.stanza, error, f.since);
        }
        ToOwner::Unbind(u) => warn!(jid = %u.jid, "unbind lost: {why}"),
        ToOwner::Gone(g) => warn!(jid = %g.jid, "departed session not purged: {why}"),
        ToOwner::Bind(b) => {
            info!(user = %b.user, "bind refused: {why}");
            b.reply.refuse(router, b.id, error);
        }
    }
}

/// Routes again the parked work whose shard has an owner now, and bounces what waited
/// too long.
pub fn retry_parked(router: &Router, link: &ClusterLink) {
    let now = Instant::now();
    let ready: Vec<Parked> = {
        let mut parked = link.parked.lock();
        if parked.is_empty() {
            return;
        }
        let table = link.table.read().clone();
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) =
            std::mem::take(&mut *parked).into_iter().partition(|p| {
                now >= p.until
                    || p.msg.user().is_none_or(|user| {
                        let shard = crate::router::shard_of(&user, link.shards);
                        table.owner(shard, &link.me, now) != Owner::Unknown
                    })
            });
        *parked = waiting.into();
        link.metrics.park_depth(parked.len());
        ready
    };
    for p in ready {
        if now >= p.until {
            give_up(router, p.msg, "no node serves this account right now");
        } else {
            router.to_owner(p.msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::forward::ForwardConfig;
    use crate::cluster::forward::memory::MemoryNetwork;
    use crate::testing::RedisServer;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    /// A view of 4 shards: `me` holds `mine` (valid for a minute), owners as given.
    fn view(generation: u64, mine: &[u32], owners: [&str; 4], live: &[&str]) -> ShardView {
        let until = Instant::now() + Duration::from_secs(60);
        ShardView {
            generation,
            reachable: true,
            endpoints: BTreeMap::new(),
            mine: mine.iter().map(|&s| (s, until)).collect(),
            owners: owners
                .iter()
                .map(|o| (!o.is_empty()).then(|| o.to_string()))
                .collect(),
            live: live.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn route_table_owners_and_withdrawn_shards() {
        let me = node("a");
        let v = view(5, &[0, 1], ["a", "a", "b", "c"], &["a", "b"]);
        let t = RouteTable::from_view(&v, 4, &HashMap::new());
        let now = Instant::now();
        assert_eq!(t.owner(0, &me, now), Owner::Here);
        assert_eq!(t.owner(2, &me, now), Owner::Node(node("b")));
        // c is not live: its shard has no owner to route to.
        assert_eq!(t.owner(3, &me, now), Owner::Unknown);
        assert!(!t.complete());
        // Past its validity a held shard is not served.
        assert_eq!(
            t.owner(0, &me, now + Duration::from_secs(61)),
            Owner::Unknown
        );

        // Shard 1 was drained by round 6: views of earlier rounds do not bring it back,
        // the view of round 6 (or later) is believed.
        let withdrawn = HashMap::from([(1, 6)]);
        let t = RouteTable::from_view(&v, 4, &withdrawn);
        assert_ne!(t.owner(1, &me, now), Owner::Here);
        let v6 = view(6, &[0, 1], ["a", "a", "b", "b"], &["a", "b"]);
        let t = RouteTable::from_view(&v6, 4, &withdrawn);
        assert_eq!(t.owner(1, &me, now), Owner::Here);
        assert!(t.complete());
    }

    #[test]
    fn taken_over_lists_departed_owners_whose_shards_moved() {
        let before = RouteTable::from_view(
            &view(1, &[], ["a", "b", "c", "c"], &["a", "b", "c"]),
            4,
            &HashMap::new(),
        );
        // c left the membership; one of its shards has a new owner already.
        let after = RouteTable::from_view(
            &view(2, &[], ["a", "b", "b", "c"], &["a", "b"]),
            4,
            &HashMap::new(),
        );
        assert_eq!(taken_over(&before.owners, &after), [node("c")]);
        // Merely missing (no shard moved yet): nothing is taken back.
        let missing = RouteTable::from_view(
            &view(2, &[], ["a", "b", "c", "c"], &["a", "b"]),
            4,
            &HashMap::new(),
        );
        assert!(taken_over(&before.owners, &missing).is_empty());
    }

    /// c's lease expires (a view in which its shard has no owner) before b claims it:
    /// going by the last owner known, c's frames are still taken back.
    #[test]
    fn taken_over_remembers_owners_across_an_ownerless_view() {
        let redis = RedisServer::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let link = link(&redis, rt.handle());
        apply(
            &link,
            &view(1, &[0], ["a", "b", "c", "c"], &["a", "b", "c"]),
        );
        apply(&link, &view(2, &[0], ["a", "b", "", ""], &["a", "b"]));
        let claimed = RouteTable::from_view(
            &view(3, &[0], ["a", "b", "b", ""], &["a", "b"]),
            4,
            &HashMap::new(),
        );
        let last = link.last_owner.lock().clone();
        assert_eq!(taken_over(&last, &claimed), [node("c")]);
    }

    fn link(redis: &RedisServer, runtime: &tokio::runtime::Handle) -> ClusterLink {
        let net = MemoryNetwork::new(&ForwardConfig::default(), Metrics::new());
        let forwarder = Arc::new(net.join(node("a"), Arc::new(Ignore)));
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = runtime
            .block_on(crate::cluster::connect(client, Duration::from_secs(3)))
            .unwrap();
        ClusterLink::new(
            node("a"),
            4,
            forwarder,
            Directory::new(conn, "t:"),
            Duration::from_secs(3),
            Metrics::new(),
        )
    }

    struct Ignore;

    impl FrameHandler for Ignore {
        fn handle(&self, _: &NodeId, _: FrameKind) {}
    }

    fn apply(link: &ClusterLink, v: &ShardView) {
        let table = Arc::new(RouteTable::from_view(v, 4, &HashMap::new()));
        let before = link.table.read().clone();
        link.note_owners(&before, &table);
        *link.table.write() = table;
    }

    /// A shard gained from a live node serves only that node's work until it says the
    /// handoff is complete; a completion that arrives first means no wait at all.
    #[test]
    fn gained_shards_wait_for_the_previous_owner() {
        let redis = RedisServer::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let link = link(&redis, rt.handle());
        let b = node("b");
        apply(&link, &view(1, &[0, 1], ["a", "a", "b", "b"], &["a", "b"]));
        assert_eq!(link.owner_for(2, None), Owner::Node(b.clone()));

        // b hands shard 2 over.
        apply(
            &link,
            &view(2, &[0, 1, 2], ["a", "a", "a", "b"], &["a", "b"]),
        );
        assert_eq!(link.owner_for(2, None), Owner::Unknown, "parked meanwhile");
        assert_eq!(
            link.owner_for(2, Some(&b)),
            Owner::Here,
            "b's own work passes"
        );
        assert_eq!(link.owner_for(0, None), Owner::Here);
        link.handoff_complete(2, &node("c"));
        assert_eq!(
            link.owner_for(2, None),
            Owner::Unknown,
            "only b completes it"
        );
        link.handoff_complete(2, &b);
        assert_eq!(link.owner_for(2, None), Owner::Here);

        // b completes shard 3 before this node has seen the claim: no wait.
        link.handoff_complete(3, &b);
        apply(
            &link,
            &view(3, &[0, 1, 2, 3], ["a", "a", "a", "a"], &["a", "b"]),
        );
        assert_eq!(link.owner_for(3, None), Owner::Here);
    }
}
