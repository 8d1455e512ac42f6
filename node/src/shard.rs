//! Shard host actors: each hosts the [`UserState`] of every loaded account whose shard
//! maps to it, and is the only place that state is read or changed (DESIGN.md
//! invariant 2).
//!
//! A user's state is loaded on the first message that needs it (roster, blocklist,
//! whether the account exists) through the host's [`StorageQueue`], ordered per user; messages
//! that arrive meanwhile wait in that user's queue and are then handled in order. The
//! host turns messages into calls on the plain user structs and carries out the
//! effects: delivering to session actors with `try_send`, routing, queueing writes and
//! jobs. It never waits on another mailbox and never does I/O itself.
//!
//! A user with no session stays loaded for [`IDLE_TTL`] after its last message (a
//! login storm probes the same offline contacts over and over), up to [`IDLE_MAX`] such
//! users per host; past that it is unloaded at once. Its state stays exact because
//! every change to it goes through this host. Presence broadcasts to a user that is not
//! loaded (so has no session) are ignored without loading it, as RFC 6121 §8.5 asks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use jid::{BareJid, FullJid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition};
use shoal_xmpp::stanza::{Kind, PresenceType, Stanza};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::c2s::session::{Close, Session};
use crate::cluster::directory::Entry;
use crate::cluster::forward::NodeId;
use crate::cluster::link::ToOwner;
use crate::jobs::{self, JobContext, StorageQueue};
use crate::metrics::{
    AttachResult, DirectoryLookup, Mailbox, Metrics, RedisOp, RerouteReason, RoomGauges,
};
use crate::model::UserData;
use crate::muc::Room;
use crate::router::{self, Home, Router, SendFail};
use crate::storage::{Storage, StorageError};
use crate::user::{Effect, Job, SessionFacts, SessionId, UserLimits, UserShared, UserState, Write};

/// Messages a shard host may queue. Past this, senders get `<resource-constraint/>`
/// (and the drop is counted) rather than waiting: one overloaded shard must not stall
/// the connections that route through it.
const SHARD_MAILBOX: usize = 16_384;

/// Messages one user may have waiting while its data loads; beyond this stanzas are
/// refused like a full mailbox (binds and unbinds never are).
const USER_QUEUE: usize = 1_024;

/// How long a user without sessions stays loaded after its last message.
const IDLE_TTL: Duration = Duration::from_secs(60);

/// How often idle users are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(10);

/// How often a new owner repeats unanswered reattach requests.
const ATTACH_RETRY: Duration = Duration::from_millis(500);

/// Most users without sessions one host keeps loaded.
const IDLE_MAX: usize = 50_000;

/// A session as the shard sees it: an actor on this node, or a binding on another node
/// (cluster mode), reached through frames.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionHandle {
    Local(Addr<Session>),
    Remote {
        node: NodeId,
        jid: FullJid,
        id: SessionId,
    },
}

impl SessionHandle {
    /// The node the session lives on; `None` for this node.
    fn node(&self) -> Option<&NodeId> {
        match self {
            SessionHandle::Local(_) => None,
            SessionHandle::Remote { node, .. } => Some(node),
        }
    }
}

/// Where a bind's answer goes.
pub enum BindReplyTo {
    /// A connection of this node waits for it.
    Local(oneshot::Sender<BindResult>),
    /// The session lives on that node: the answer is a frame.
    Node(NodeId),
}

/// What a bound session gets back: its JID and the read-only view of its user's state.
pub type BindResult = Result<(FullJid, Arc<UserShared>), StanzaError>;

/// Binds a resource for a new session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Bind {
    pub user: BareJid,
    pub resource: String,
    pub id: SessionId,
    pub session: SessionHandle,
    pub reply: BindReplyTo,
}

/// A session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unbind {
    pub jid: FullJid,
    pub id: SessionId,
}

/// A stanza for a local account or one of its resources.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteToUser {
    pub stanza: Stanza,
    pub since: Instant,
    /// Where it was sent from, when known: for a stanza a session sent to a room, that
    /// session when it is on this node, else the node that passed it on first.
    pub origin: Option<Home>,
}

/// Something one of the account's own sessions sent that the account handles:
/// broadcast presence, subscription requests, account iqs, sent-message carbons.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromSession {
    pub from: FullJid,
    pub kind: FromSessionKind,
    pub stanza: Stanza,
    pub since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromSessionKind {
    /// Presence without `to`.
    Presence,
    /// subscribe / subscribed / unsubscribe / unsubscribed to a contact.
    Subscription,
    /// An iq to the account itself.
    AccountIq,
    /// A chat message the session sent, for the other resources' carbons.
    SentCarbon,
}

/// A session of this account lived on `node`, which left the cluster; found in the
/// directory when it was purged.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionGone {
    pub jid: FullJid,
    pub node: NodeId,
}

/// A session's answer to this node's reattach request: `handle` and `facts` are `None`
/// when it is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attached {
    pub jid: FullJid,
    pub id: SessionId,
    pub handle: Option<SessionHandle>,
    pub facts: Option<SessionFacts>,
}

/// Cluster mode: this node stops serving `shards` (moved to another node, or lost).
/// The host forgets their users, passes their waiting work back to the router, and
/// answers `done` once every storage operation queued so far has finished.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseShards {
    pub shards: HashSet<u32>,
    pub done: oneshot::Sender<()>,
}

/// Storage refused a change already made in memory (a failed account removal): read
/// the account again and serve it as stored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reload {
    pub user: BareJid,
    /// Attempts left should reading fail (the store being down is why the change
    /// failed in the first place); one per second.
    pub attempts: u32,
}

/// Node shutdown: close every session with this error (`<system-shutdown/>`, or
/// `<see-other-host/>` where configured).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAllSessions(pub StreamError);

/// Node shutdown: answers `done` once every storage operation queued before this
/// message has finished, so a stopping node loses no write.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainStorage {
    pub done: oneshot::Sender<()>,
}

/// A user's pending work while its data loads.
enum UserMsg {
    Bind(Bind),
    Unbind(Unbind),
    Route(RouteToUser),
    FromSession(FromSession),
    Gone(SessionGone),
    Attach(Attached),
}

impl UserMsg {
    /// Passes the message back to the router (the shard moved away meanwhile).
    fn reroute(self, router: &Router) {
        match self {
            // A bind of a session of this node follows the account; one another node
            // asked for is refused (that node's client retries).
            UserMsg::Bind(b) if matches!(b.reply, BindReplyTo::Local(_)) => {
                router.to_owner(ToOwner::Bind(b));
            }
            UserMsg::Bind(b) => b.reply.refuse(
                router,
                b.id,
                StanzaError::with_text(
                    StanzaErrorCondition::ResourceConstraint,
                    "the account is moving between nodes; try again",
                ),
            ),
            UserMsg::Unbind(u) => router.to_owner(ToOwner::Unbind(u)),
            UserMsg::Route(r) => router.to_owner(ToOwner::Route(r, 0)),
            UserMsg::FromSession(f) => router.to_owner(ToOwner::FromSession(f)),
            UserMsg::Gone(g) => router.to_owner(ToOwner::Gone(g)),
            // The session reports again to whoever owns the account next.
            UserMsg::Attach(_) => {}
        }
    }
}

/// A MUC room, or its stanzas while it is read from storage.
enum RoomSlot {
    Loading(VecDeque<RouteToUser>),
    Ready(Box<Room>),
}

enum Slot {
    Loading(VecDeque<UserMsg>),
    /// Loaded; waiting for the nodes of these sessions to report them (cluster mode,
    /// after the account's shard moved here).
    Attaching {
        state: UserState<SessionHandle>,
        queue: VecDeque<UserMsg>,
        waiting: Vec<(FullJid, SessionId, NodeId)>,
    },
    Ready(UserState<SessionHandle>),
}

/// Settings of a shard host.
#[derive(Clone)]
pub struct ShardConfig {
    pub limits: Arc<UserLimits>,
    pub max_offline: usize,
    /// Cluster mode: how long a new owner waits for the nodes holding an account's
    /// sessions to report them before it serves the account without the ones that
    /// did not answer (the lease TTL: a node that is alive is back in the membership
    /// well within it).
    pub attach_timeout: Duration,
    /// `muc.presence_broadcast_max`: see [`Room::new`].
    pub muc_presence_max: usize,
}

pub struct ShardHost {
    users: HashMap<BareJid, Slot>,
    /// The MUC rooms whose shard maps here.
    rooms: HashMap<BareJid, RoomSlot>,
    /// The ready rooms and their occupants, in the node's gauges.
    room_gauges: RoomGauges,
    /// Loaded users without sessions, and since when.
    idle: HashMap<BareJid, Instant>,
    router: Router,
    metrics: Metrics,
    queue: StorageQueue,
    config: ShardConfig,
}

impl ShardHost {
    pub fn new(router: Router, storage: Storage, config: ShardConfig) -> Self {
        let metrics = router.metrics().clone();
        let depth = metrics.storage_queue_depth();
        Self {
            users: HashMap::new(),
            rooms: HashMap::new(),
            room_gauges: metrics.muc_rooms(),
            idle: HashMap::new(),
            router,
            metrics,
            queue: StorageQueue::start(storage, depth),
            config,
        }
    }

    /// Handles a message for `user`, loading its state first if needed. Work for an
    /// account this node no longer owns goes back to the router.
    fn dispatch(&mut self, user: BareJid, msg: UserMsg, ctx: &mut Context<Self>) {
        if !self.router.serves(&user) {
            self.metrics.rerouted(RerouteReason::NotOwner, 1);
            return msg.reroute(&self.router);
        }
        match self.users.get_mut(&user) {
            Some(Slot::Ready(_)) => self.handle_ready(&user, msg),
            Some(Slot::Loading(queue) | Slot::Attaching { queue, .. }) => {
                // Binds and unbinds always wait their turn: a flood of stanzas to the
                // account must not refuse its owner's login, and a dropped unbind would
                // leave a dead session bound. Both are bounded by the connections.
                let control = matches!(msg, UserMsg::Bind(_) | UserMsg::Unbind(_));
                if queue.len() >= USER_QUEUE && !control {
                    self.metrics.mailbox_drop(Mailbox::Shard);
                    self.refuse(msg);
                } else {
                    queue.push_back(msg);
                }
            }
            None => {
                self.users
                    .insert(user.clone(), Slot::Loading(VecDeque::from([msg])));
                self.start_load(user, ctx);
            }
        }
    }

    /// Reads the account, and in cluster mode the directory's list of its sessions
    /// (more than none only when the account's shard moved here while they were bound).
    fn start_load(&mut self, user: BareJid, ctx: &mut Context<Self>) {
        let (tx, rx) = oneshot::channel();
        let storage = self.queue.storage.clone();
        let link = self.router.cluster().cloned();
        let u = user.clone();
        self.queue.submit(&user, async move {
            let data = storage.loader.load_user(u.as_str()).await;
            let sessions = match (&data, link) {
                (Ok(_), Some(link)) => {
                    link.timed(
                        RedisOp::DirectoryLookup,
                        link.directory().resources(u.as_str()),
                    )
                    .await
                }
                _ => Ok(Vec::new()),
            };
            let _ = tx.send((data, sessions));
        });
        ctx.spawn(rx.into_actor(self).map(move |result, act, ctx| {
            let (data, sessions) = match result {
                Ok((Ok(data), Ok(sessions))) => (data, sessions),
                Ok((Err(e), _)) => {
                    // The account's stanzas are refused rather than handled on a guess.
                    warn!(%user, error = %e, "loading user data failed");
                    return act.fail_load(&user);
                }
                Ok((_, Err(e))) => {
                    warn!(%user, error = %e, "reading the session directory failed");
                    return act.fail_load(&user);
                }
                Err(_) => return act.fail_load(&user),
            };
            act.loaded(user, data, sessions, ctx);
        }));
    }

    fn loaded(
        &mut self,
        user: BareJid,
        data: UserData,
        sessions: Vec<(String, Entry)>,
        ctx: &mut Context<Self>,
    ) {
        let Some(Slot::Loading(queue)) = self.users.remove(&user) else {
            return;
        };
        let mut state = UserState::new(user.clone(), data, self.config.limits.clone());
        // Sessions that reported on their own while the account loaded are attached
        // first: the directory lists them too, and they must not be waited for.
        let (reports, rest): (VecDeque<UserMsg>, VecDeque<UserMsg>) = queue
            .into_iter()
            .partition(|msg| matches!(msg, UserMsg::Attach(a) if a.handle.is_some()));
        let queue = rest;
        let mut reported = Vec::new();
        for msg in reports {
            if let UserMsg::Attach(Attached {
                jid,
                id,
                handle: Some(handle),
                facts: Some(facts),
            }) = msg
            {
                reported.push((jid.clone(), id));
                state.attach(jid, id, handle, facts);
            }
        }
        if self.router.cluster().is_some() {
            self.metrics.directory_lookup(if sessions.is_empty() {
                DirectoryLookup::Empty
            } else {
                DirectoryLookup::Sessions
            });
        }
        let mut waiting = Vec::new();
        let mut gone = Vec::new();
        for (resource, entry) in sessions {
            let Ok(jid) = user.with_resource_str(&resource) else {
                continue;
            };
            if reported.contains(&(jid.clone(), entry.session)) {
                continue;
            }
            match NodeId::new(&entry.node) {
                Ok(node) if self.router.cluster().is_some_and(|l| l.is_live(&node)) => {
                    self.router
                        .request_attach(&node, jid.clone(), entry.session);
                    waiting.push((jid, entry.session, node));
                }
                _ => gone.push((jid, entry)),
            }
        }
        // Sessions of nodes that are gone: contacts may have seen them available.
        let mut effects = Vec::new();
        for (jid, entry) in gone {
            effects.extend(state.gone_elsewhere(&jid));
            self.unregister(&user, jid.resource().as_str(), entry);
        }
        self.users.insert(
            user.clone(),
            Slot::Attaching {
                state,
                queue,
                waiting,
            },
        );
        self.apply(&user, effects, Instant::now());
        if matches!(self.users.get(&user), Some(Slot::Attaching { waiting, .. }) if waiting.is_empty())
        {
            return self.attach_done(&user);
        }
        self.ask_again(user.clone(), ctx);
        ctx.run_later(self.config.attach_timeout, move |act, _| {
            if let Some(Slot::Attaching { waiting, .. }) = act.users.get(&user) {
                warn!(%user, missing = waiting.len(), "sessions did not report to the new owner in time");
                for _ in 0..waiting.len() {
                    act.metrics.attach(AttachResult::Gone);
                }
                act.attach_done(&user);
            }
        });
    }

    /// Repeats the reattach requests still unanswered every [`ATTACH_RETRY`] while the
    /// user waits for them: a request or its answer may have met a peer link being
    /// replaced while the cluster's view changed.
    fn ask_again(&mut self, user: BareJid, ctx: &mut Context<Self>) {
        ctx.run_later(ATTACH_RETRY, move |act, ctx| {
            let Some(Slot::Attaching { waiting, .. }) = act.users.get(&user) else {
                return;
            };
            for (jid, id, node) in waiting.clone() {
                act.router.request_attach(&node, jid, id);
            }
            act.ask_again(user, ctx);
        });
    }

    /// Handles what waited for the load, in order, then unloads the user if idle.
    fn drain_queue(&mut self, user: &BareJid, queue: VecDeque<UserMsg>) {
        // Unload (if idle) only once the whole queue is handled: unloading after the
        // first message would leave the rest with no state to be handled by.
        for msg in queue {
            self.handle_one(user, msg);
        }
        self.unload_if_idle(user);
    }

    /// Every session reported (or the wait ended): serve the account.
    fn attach_done(&mut self, user: &BareJid) {
        let Some(Slot::Attaching { state, queue, .. }) = self.users.remove(user) else {
            return;
        };
        self.users.insert(user.clone(), Slot::Ready(state));
        if let Some(Slot::Ready(state)) = self.users.get(user) {
            let shared = state.shared();
            self.router.shared_changed(user, &shared, state.handles());
        }
        self.drain_queue(user, queue);
    }

    fn attached(&mut self, msg: Attached) {
        let user = msg.jid.to_bare();
        let (state, waiting) = match self.users.get_mut(&user) {
            Some(Slot::Attaching { state, waiting, .. }) => (state, Some(waiting)),
            Some(Slot::Ready(state)) => (state, None),
            _ => return,
        };
        if let Some(waiting) = waiting {
            waiting.retain(|(jid, id, _)| !(jid == &msg.jid && *id == msg.id));
        }
        let effects = match (msg.handle, msg.facts) {
            (Some(handle), Some(facts)) => {
                self.metrics.attach(AttachResult::Attached);
                state.attach(msg.jid, msg.id, handle, facts);
                Vec::new()
            }
            // Gone meanwhile: as if its node had left.
            _ => {
                self.metrics.attach(AttachResult::Gone);
                state.gone_elsewhere(&msg.jid)
            }
        };
        self.apply(&user, effects, Instant::now());
        if matches!(self.users.get(&user), Some(Slot::Attaching { waiting, .. }) if waiting.is_empty())
        {
            self.attach_done(&user);
        }
    }

    fn fail_load(&mut self, user: &BareJid) {
        if let Some(Slot::Loading(queue)) = self.users.remove(user) {
            for msg in queue {
                self.refuse(msg);
            }
        }
    }

    /// Answers a message that cannot be handled with `<resource-constraint/>` /
    /// `<internal-server-error/>` as fits.
    fn refuse(&mut self, msg: UserMsg) {
        let now = Instant::now();
        let err = StanzaError::with_text(
            StanzaErrorCondition::ResourceConstraint,
            "server busy, try again",
        );
        match msg {
            UserMsg::Bind(b) => b.reply.refuse(&self.router, b.id, err),
            UserMsg::Route(r) => self.router.bounce(&r.stanza, err, r.since),
            UserMsg::FromSession(f) => self.router.bounce(&f.stanza, err, now),
            UserMsg::Unbind(_) | UserMsg::Gone(_) | UserMsg::Attach(_) => {}
        }
    }

    /// Handles a message for a loaded user, then unloads the user if it has no session.
    fn handle_ready(&mut self, user: &BareJid, msg: UserMsg) {
        self.handle_one(user, msg);
        self.unload_if_idle(user);
    }

    /// Handles a message for a loaded user (which stays loaded).
    fn handle_one(&mut self, user: &BareJid, msg: UserMsg) {
        let Some(Slot::Ready(state)) = self.users.get_mut(user) else {
            return;
        };
        let now_unix = jobs::now_ms() / 1000;
        let (effects, since) = match msg {
            UserMsg::Bind(b) => {
                let result = state.bind(&b.resource, b.id, b.session.clone());
                match result {
                    Ok((jid, effects)) => {
                        let shared = state.shared();
                        match b.reply {
                            // The connection may have gone while waiting; its unbind
                            // follows.
                            BindReplyTo::Local(tx) => {
                                let _ = tx.send(Ok((jid.clone(), shared)));
                            }
                            BindReplyTo::Node(node) => {
                                self.router
                                    .bind_reply(&node, b.id, Ok((jid.clone(), &shared)));
                            }
                        }
                        self.register(user, &jid, b.id, &b.session);
                        self.apply(user, effects, Instant::now());
                    }
                    Err(e) => b.reply.refuse(&self.router, b.id, e),
                }
                return;
            }
            UserMsg::Unbind(u) => {
                let node = session_node(state, &u.jid, u.id);
                let effects = state.unbind(&u.jid, u.id, now_unix);
                if let Some(node) = node {
                    self.unregister_session(user, &u.jid, u.id, node);
                }
                (effects, Instant::now())
            }
            UserMsg::Route(r) => {
                let effects = state.deliver(r.stanza);
                (effects, r.since)
            }
            UserMsg::FromSession(f) => {
                let effects = match f.kind {
                    FromSessionKind::Presence => state.own_presence(&f.from, f.stanza),
                    FromSessionKind::Subscription => state.outbound_subscription(f.stanza),
                    FromSessionKind::AccountIq => state.account_iq(&f.from, f.stanza),
                    FromSessionKind::SentCarbon => state.sent_carbon(&f.from, &f.stanza),
                };
                (effects, f.since)
            }
            UserMsg::Attach(a) => {
                if let (Some(handle), Some(facts)) = (a.handle, a.facts) {
                    state.attach(a.jid, a.id, handle, facts);
                    let shared = state.shared();
                    self.router.shared_changed(user, &shared, state.handles());
                }
                return;
            }
            UserMsg::Gone(g) => {
                let bound = state
                    .session(&g.jid)
                    .filter(|(_, h)| h.node() == Some(&g.node))
                    .map(|(id, _)| id);
                let effects = match bound {
                    Some(id) => state.unbind(&g.jid, id, now_unix),
                    None => state.gone_elsewhere(&g.jid),
                };
                (effects, Instant::now())
            }
        };
        self.apply(user, effects, since);
    }

    /// Cluster mode: records in the directory where a new binding lives, in the user's
    /// storage order.
    fn register(&mut self, user: &BareJid, jid: &FullJid, id: SessionId, session: &SessionHandle) {
        let Some(link) = self.router.cluster().cloned() else {
            return;
        };
        let entry = Entry {
            node: session.node().unwrap_or(link.me()).to_string(),
            session: id,
        };
        let (bare, resource) = (user.to_string(), jid.resource().to_string());
        self.queue.submit(user, async move {
            let register = link.directory().register(&bare, &resource, &entry);
            if let Err(e) = link.timed(RedisOp::DirectoryRegister, register).await {
                warn!(user = %bare, error = %e, "recording a session in the directory failed");
            }
        });
    }

    /// Removes the directory entry of binding `id` of `jid` on `node` (this node when
    /// `None`), if it is still that one.
    fn unregister_session(
        &mut self,
        user: &BareJid,
        jid: &FullJid,
        id: SessionId,
        node: Option<NodeId>,
    ) {
        let Some(link) = self.router.cluster() else {
            return;
        };
        let node = node.unwrap_or_else(|| link.me().clone()).to_string();
        self.unregister(user, jid.resource().as_str(), Entry { node, session: id });
    }

    fn unregister(&mut self, user: &BareJid, resource: &str, entry: Entry) {
        let Some(link) = self.router.cluster().cloned() else {
            return;
        };
        let (bare, resource) = (user.to_string(), resource.to_owned());
        self.queue.submit(user, async move {
            let unregister = link.directory().unregister(&bare, &resource, &entry);
            if let Err(e) = link.timed(RedisOp::DirectoryUnregister, unregister).await {
                warn!(user = %bare, error = %e, "removing a session from the directory failed");
            }
        });
    }

    /// Notes when a user is left without sessions; unloads it at once if this host
    /// already keeps [`IDLE_MAX`] such users.
    fn unload_if_idle(&mut self, user: &BareJid) {
        let Some(Slot::Ready(state)) = self.users.get(user) else {
            return;
        };
        if !state.is_idle() {
            self.idle.remove(user);
        } else if self.idle.len() < IDLE_MAX || self.idle.contains_key(user) {
            self.idle.insert(user.clone(), Instant::now());
        } else {
            self.users.remove(user);
        }
    }

    /// Unloads the users that have had no session and no message for [`IDLE_TTL`].
    fn sweep_idle(&mut self, now: Instant) {
        let users = &mut self.users;
        self.idle.retain(|user, since| {
            let idle = matches!(users.get(user), Some(Slot::Ready(s)) if s.is_idle());
            if !idle {
                return false;
            }
            if now.duration_since(*since) < IDLE_TTL {
                return true;
            }
            users.remove(user);
            false
        });
    }

    fn apply(&mut self, user: &BareJid, effects: Vec<Effect<SessionHandle>>, since: Instant) {
        // A presence broadcast is one stanza to many contacts: consecutive copies that
        // differ only in `to` leave as one fan-out per node (cluster mode). Any other
        // effect first sends what was gathered, so effects keep their order.
        let mut fanout: Vec<Stanza> = Vec::new();
        for effect in effects {
            let effect = match effect {
                Effect::Route(stanza) if matches!(stanza.kind, Kind::Presence(_)) => {
                    if fanout
                        .first()
                        .is_some_and(|first| !router::same_but_to(first, &stanza))
                    {
                        self.router.route_fanout(std::mem::take(&mut fanout), since);
                    }
                    fanout.push(stanza);
                    continue;
                }
                other => other,
            };
            if !fanout.is_empty() {
                self.router.route_fanout(std::mem::take(&mut fanout), since);
            }
            match effect {
                Effect::Deliver(sessions, stanza) => self.deliver(user, sessions, stanza, since),
                Effect::Route(stanza) => self.router.route(stanza, since),
                Effect::Replaced(old) => {
                    self.router
                        .close_session(&old, StreamErrorCondition::Conflict);
                }
                Effect::SharedChanged => {
                    if let Some(Slot::Ready(state) | Slot::Attaching { state, .. }) =
                        self.users.get(user)
                    {
                        let shared = state.shared();
                        self.router.shared_changed(user, &shared, state.handles());
                    }
                }
                Effect::Persist(w) => {
                    let storage = self.queue.storage.clone();
                    let u = user.clone();
                    self.queue
                        .submit(user, async move { jobs::write(&storage, &u, w).await });
                }
                Effect::Job(job) => self.job(user, job, since),
            }
        }
        if !fanout.is_empty() {
            self.router.route_fanout(fanout, since);
        }
    }

    fn job(&mut self, user: &BareJid, job: Job<SessionHandle>, since: Instant) {
        let optional = matches!(
            job,
            Job::StoreOffline(_) | Job::VcardSet { .. } | Job::PrivateSet { .. }
        );
        if optional && self.queue.is_congested() {
            let request = match &job {
                Job::StoreOffline(s) => s,
                Job::VcardSet { request, .. } | Job::PrivateSet { request, .. } => request,
                _ => unreachable!("only optional jobs"),
            };
            self.router.bounce(
                request,
                StanzaError::with_text(StanzaErrorCondition::ResourceConstraint, "storage busy"),
                since,
            );
            return;
        }
        let cx = JobContext {
            storage: self.queue.storage.clone(),
            router: self.router.clone(),
            max_offline: self.config.max_offline,
        };
        let u = user.clone();
        self.queue.submit(user, jobs::run(cx, u, job));
    }

    fn deliver(
        &mut self,
        user: &BareJid,
        sessions: Vec<SessionHandle>,
        stanza: Stanza,
        since: Instant,
    ) {
        // Serialised once, shared by every recipient.
        let xml = Bytes::from(stanza.to_xml());
        let recipients = sessions.len();
        let mut gone = Vec::new();
        for session in sessions {
            match self
                .router
                .send_to_session(&session, &xml, stanza.kind, since)
            {
                Ok(()) => {}
                Err(SendFail::Full) => {
                    self.metrics.mailbox_drop(Mailbox::Connection);
                    self.router.bounce(
                        &stanza,
                        StanzaError::with_text(
                            StanzaErrorCondition::ResourceConstraint,
                            "recipient is not keeping up",
                        ),
                        since,
                    );
                }
                Err(SendFail::Gone) => gone.push(session),
            }
        }
        // A session whose actor is gone without unbinding (it crashed, or stopped with
        // its unbind still on the way) or whose node left is detected here and removed,
        // so the next stanza is routed right; a stanza none of its sessions took is
        // routed again once they are forgotten, as for sessions that are gone (offline
        // storage, say).
        let mut removed = 0;
        for session in gone {
            if let SessionHandle::Remote { node, jid, id } = &session {
                self.unregister_session(user, jid, *id, Some(node.clone()));
            }
            if let Some(Slot::Ready(state)) = self.users.get_mut(user) {
                let effects = state.remove_handle(&session, jobs::now_ms() / 1000);
                self.apply(user, effects, since);
                removed += 1;
            }
        }
        if removed > 0 && removed == recipients && router::worth_handing_back(stanza.kind) {
            self.router.route(stanza, since);
        }
    }

    /// A stanza for a room: one that is not here yet is read from storage first (a
    /// persistent room, or one whose shard moved here), or else created by its first
    /// occupant; a temporary room is gone with its last occupant.
    fn room(&mut self, jid: BareJid, msg: RouteToUser, ctx: &mut Context<Self>) {
        if !self.router.serves(&jid) {
            self.metrics.rerouted(RerouteReason::NotOwner, 1);
            return self.router.to_owner(ToOwner::Route(msg, 0));
        }
        match self.rooms.get_mut(&jid) {
            Some(RoomSlot::Ready(_)) => self.room_ready(&jid, msg),
            Some(RoomSlot::Loading(queue)) if queue.len() < USER_QUEUE => queue.push_back(msg),
            Some(RoomSlot::Loading(_)) => {
                self.metrics.mailbox_drop(Mailbox::Shard);
                self.refuse(UserMsg::Route(msg));
            }
            None => {
                self.rooms
                    .insert(jid.clone(), RoomSlot::Loading(VecDeque::from([msg])));
                self.start_room_load(jid, ctx);
            }
        }
    }

    /// Reads a room and, in cluster mode, where its stored occupants' sessions are: an
    /// occupant whose session is still bound on a live node stays in the room. Outside
    /// cluster mode a stored room is read only after a restart, which ended every
    /// session.
    fn start_room_load(&mut self, jid: BareJid, ctx: &mut Context<Self>) {
        let (tx, rx) = oneshot::channel();
        let storage = self.queue.storage.clone();
        let link = self.router.cluster().cloned();
        let room = jid.clone();
        self.queue.submit(&jid, async move {
            let result = async {
                let Some(stored) = storage.rooms.room(room.as_str()).await? else {
                    return Ok((None, HashMap::new()));
                };
                let mut sessions = HashMap::new();
                if let Some(link) = link {
                    let users: HashSet<BareJid> = stored
                        .occupants
                        .iter()
                        .filter_map(|(j, _)| j.parse::<FullJid>().ok())
                        .map(|j| j.to_bare())
                        .collect();
                    for user in users {
                        let found = link
                            .timed(
                                RedisOp::DirectoryLookup,
                                link.directory().resources(user.as_str()),
                            )
                            .await
                            .map_err(|e| StorageError::Backend(Box::new(e)))?;
                        for (resource, entry) in found {
                            if let Ok(full) = user.with_resource_str(&resource) {
                                sessions.insert(full, entry.node);
                            }
                        }
                    }
                }
                Ok::<_, StorageError>((Some(stored), sessions))
            };
            let _ = tx.send(result.await);
        });
        ctx.spawn(rx.into_actor(self).map(move |result, act, _| {
            let Some(RoomSlot::Loading(queue)) = act.rooms.remove(&jid) else {
                return;
            };
            let link = act.router.cluster();
            let home = |occupant: &FullJid, sessions: &HashMap<FullJid, String>| {
                let link = link?;
                let node = NodeId::new(sessions.get(occupant)?).ok()?;
                match node == *link.me() {
                    true => link
                        .local_session_of(occupant)
                        .map(|(addr, shared)| Home::Here(addr, shared)),
                    false => link.is_live(&node).then_some(Home::Node(node)),
                }
            };
            let max = act.config.muc_presence_max;
            let room = match result {
                Ok(Ok((None, _))) => Ok(Room::new(jid.clone(), max)),
                Ok(Ok((Some(stored), sessions))) => {
                    Room::restore(jid.clone(), max, &stored, |o| home(o, &sessions))
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("storage task lost".to_owned()),
            };
            match room {
                Ok(room) => {
                    act.room_gauges.room_added(room.occupant_count());
                    act.rooms
                        .insert(jid.clone(), RoomSlot::Ready(Box::new(room)));
                    for msg in queue {
                        act.room_ready(&jid, msg);
                    }
                }
                Err(e) => {
                    // Its stanzas are refused rather than handled by a room made up anew.
                    warn!(room = %jid, error = %e, "loading the room failed");
                    for msg in queue {
                        act.refuse(UserMsg::Route(msg));
                    }
                }
            }
        }));
    }

    /// Handles a stanza for a room that is here, stores what changed and routes what
    /// the room sent. An occupant's presence tells the room where its session is: the
    /// session itself when it is on this node, else the node the presence came from.
    fn room_ready(&mut self, jid: &BareJid, msg: RouteToUser) {
        let Some(RoomSlot::Ready(room)) = self.rooms.get_mut(jid) else {
            return;
        };
        let sender = match (&msg.stanza.kind, &msg.stanza.from) {
            (Kind::Presence(PresenceType::Available), Some(from)) => {
                from.clone().try_into_full().ok()
            }
            _ => None,
        };
        let before = room.occupant_count();
        let out = room.handle(msg.stanza, jobs::now_ms());
        self.room_gauges
            .occupants_changed(before, room.occupant_count());
        if let (Some(sender), Some(home)) = (sender, msg.origin) {
            room.set_home(&sender, home);
        }
        let copies = out
            .into_iter()
            .map(|stanza| {
                let home = stanza
                    .to
                    .clone()
                    .and_then(|to| to.try_into_full().ok())
                    .and_then(|to| room.home(&to).cloned());
                (stanza, home)
            })
            .collect();
        let writes = match (room.can_vanish(), room.is_new()) {
            (true, new) => {
                self.rooms.remove(jid);
                self.room_gauges.room_removed(0);
                // A room nobody created was never stored.
                if new {
                    Vec::new()
                } else {
                    vec![Write::RoomDeleted]
                }
            }
            (false, _) => room.writes(),
        };
        self.apply(
            jid,
            writes.into_iter().map(Effect::Persist).collect(),
            msg.since,
        );
        self.router.route_room(jid, copies, msg.since);
    }

    /// Forgets the users and rooms of `shards` (cluster mode: they moved away or were
    /// lost), passing their waiting work back to the router.
    fn release(&mut self, shards: &HashSet<u32>) {
        let router = self.router.clone();
        let rooms: Vec<BareJid> = self
            .rooms
            .keys()
            .filter(|r| shards.contains(&router.shard(r)))
            .cloned()
            .collect();
        for room in rooms {
            match self.rooms.remove(&room) {
                Some(RoomSlot::Loading(queue)) => {
                    for msg in queue {
                        router.to_owner(ToOwner::Route(msg, 0));
                    }
                }
                Some(RoomSlot::Ready(room)) => self.room_gauges.room_removed(room.occupant_count()),
                None => {}
            }
        }
        let leaving: Vec<BareJid> = self
            .users
            .keys()
            .filter(|u| shards.contains(&router.shard(u)))
            .cloned()
            .collect();
        for user in leaving {
            self.idle.remove(&user);
            match self.users.remove(&user) {
                Some(Slot::Loading(queue) | Slot::Attaching { queue, .. }) => {
                    for msg in queue {
                        msg.reroute(&router);
                    }
                }
                Some(Slot::Ready(_)) | None => {}
            }
        }
    }
}

impl Actor for ShardHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(SHARD_MAILBOX);
        ctx.run_interval(IDLE_SWEEP, |act, _| act.sweep_idle(Instant::now()));
    }
}

impl Handler<Bind> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: Bind, ctx: &mut Self::Context) {
        let user = msg.user.clone();
        self.dispatch(user, UserMsg::Bind(msg), ctx);
    }
}

impl Handler<Unbind> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: Unbind, ctx: &mut Self::Context) {
        let user = msg.jid.to_bare();
        // Nothing to unbind for a user that is not loaded, unless the account moved
        // here from another node since the session was bound (cluster mode): then the
        // load finds the session in the directory.
        if self.users.contains_key(&user) || self.router.cluster().is_some() {
            self.dispatch(user, UserMsg::Unbind(msg), ctx);
        }
    }
}

impl Handler<RouteToUser> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: RouteToUser, ctx: &mut Self::Context) {
        let Some(user) = msg.stanza.to.as_ref().map(|t| t.to_bare()) else {
            return;
        };
        if msg
            .stanza
            .to
            .as_ref()
            .is_some_and(|t| self.router.is_muc(t))
        {
            return self.room(user, msg, ctx);
        }
        // A user that is not loaded has no session: available and unavailable presence
        // for it is silently ignored (RFC 6121 §8.5.1, §8.5.2.2.1, §8.5.3.2.2), so
        // there is nothing to load it for. Except just after this node claimed the
        // account's shard (cluster mode): its sessions elsewhere may not have reported
        // yet, and loading it finds them in the directory.
        let broadcast = matches!(
            msg.stanza.kind,
            Kind::Presence(PresenceType::Available | PresenceType::Unavailable)
        );
        let settling = || {
            self.router
                .cluster()
                .is_some_and(|l| l.settling(self.router.shard(&user)))
        };
        if broadcast && !self.users.contains_key(&user) && !settling() {
            return;
        }
        self.dispatch(user, UserMsg::Route(msg), ctx);
    }
}

impl Handler<FromSession> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: FromSession, ctx: &mut Self::Context) {
        let user = msg.from.to_bare();
        if !self.users.contains_key(&user) && self.router.cluster().is_none() {
            debug!(from = %msg.from, "stanza from a session that is not bound");
            return;
        }
        self.dispatch(user, UserMsg::FromSession(msg), ctx);
    }
}

impl Handler<SessionGone> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: SessionGone, ctx: &mut Self::Context) {
        let user = msg.jid.to_bare();
        self.dispatch(user, UserMsg::Gone(msg), ctx);
    }
}

impl Handler<Attached> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: Attached, ctx: &mut Self::Context) {
        let user = msg.jid.to_bare();
        match self.users.get(&user) {
            Some(Slot::Attaching { .. } | Slot::Ready(_)) => self.attached(msg),
            // A session reporting on its own (its account's shard moved here): load
            // the account, then attach.
            Some(Slot::Loading(_)) | None if msg.handle.is_some() => {
                self.dispatch(user, UserMsg::Attach(msg), ctx);
            }
            _ => {}
        }
    }
}

impl Handler<Reload> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: Reload, ctx: &mut Self::Context) {
        if !matches!(self.users.get(&msg.user), Some(Slot::Ready(_))) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let storage = self.queue.storage.clone();
        let u = msg.user.clone();
        self.queue.submit(&msg.user, async move {
            let _ = tx.send(storage.loader.load_user(u.as_str()).await);
        });
        let (user, attempts) = (msg.user, msg.attempts);
        ctx.spawn(rx.into_actor(self).map(move |result, act, ctx| {
            match (result, act.users.get_mut(&user)) {
                (Ok(Ok(data)), Some(Slot::Ready(state))) => state.restore(data),
                (Ok(Err(e)), _) if attempts > 0 => {
                    warn!(%user, error = %e, "reading the account again failed; retrying");
                    ctx.notify_later(
                        Reload {
                            user,
                            attempts: attempts - 1,
                        },
                        Duration::from_secs(1),
                    );
                }
                (Ok(Err(e)), _) => warn!(%user, error = %e, "reading the account again failed"),
                _ => {}
            }
        }));
    }
}

impl Handler<ReleaseShards> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: ReleaseShards, _: &mut Self::Context) {
        self.release(&msg.shards);
        let done = msg.done;
        self.queue.barrier(async move {
            let _ = done.send(());
        });
    }
}

impl Handler<CloseAllSessions> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: CloseAllSessions, _: &mut Self::Context) {
        for slot in self.users.values() {
            if let Slot::Ready(state) = slot {
                // Only this node's sessions: the others' nodes are not shutting down.
                for session in state.handles() {
                    if let SessionHandle::Local(addr) = session {
                        // Sessions that cannot take the message are closed by the final
                        // stop.
                        let _ = addr.try_send(Close(msg.0.clone()));
                    }
                }
            }
        }
    }
}

impl Handler<DrainStorage> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: DrainStorage, _: &mut Self::Context) {
        self.queue.barrier(async move {
            let _ = msg.done.send(());
        });
    }
}

/// The node of binding `id` of `jid`, if bound: `Some(None)` for this node.
fn session_node(
    state: &UserState<SessionHandle>,
    jid: &FullJid,
    id: SessionId,
) -> Option<Option<NodeId>> {
    state
        .session(jid)
        .filter(|(bound, _)| *bound == id)
        .map(|(_, h)| h.node().cloned())
}

#[cfg(test)]
mod tests {
    use shoal_xmpp::stanza::MessageType;

    use super::*;
    use crate::metrics::Metrics;
    use crate::storage::MemoryStore;

    /// How many users are loaded, and how many of them have no session.
    #[derive(Message)]
    #[rtype(result = "(usize, usize)")]
    struct Inspect;

    impl Handler<Inspect> for ShardHost {
        type Result = MessageResult<Inspect>;

        fn handle(&mut self, _: Inspect, _: &mut Self::Context) -> Self::Result {
            MessageResult((self.users.len(), self.idle.len()))
        }
    }

    /// Runs the idle sweep as if at `now`.
    #[derive(Message)]
    #[rtype(result = "()")]
    struct SweepAt(Instant);

    impl Handler<SweepAt> for ShardHost {
        type Result = ();

        fn handle(&mut self, msg: SweepAt, _: &mut Self::Context) {
            self.sweep_idle(msg.0);
        }
    }

    async fn host() -> Addr<ShardHost> {
        let storage = Storage::from_backend(Arc::new(MemoryStore::new()));
        let creds = crate::storage::new_credentials("pw");
        storage
            .accounts
            .create_account("juliet@localhost", &creds)
            .await
            .unwrap();
        let router = Router::new("localhost".parse().unwrap(), 1, Metrics::new());
        let config = ShardConfig {
            limits: crate::user::tests::limits(),
            max_offline: 10,
            attach_timeout: Duration::from_secs(2),
            muc_presence_max: 0,
        };
        let host = ShardHost::new(router.clone(), storage, config).start();
        router.set_hosts(vec![host.clone()]);
        host
    }

    fn to_juliet(kind: Kind) -> RouteToUser {
        let mut stanza = Stanza::new(kind);
        stanza.from = Some("romeo@example.net/a".parse().unwrap());
        stanza.to = Some("juliet@localhost".parse().unwrap());
        RouteToUser {
            stanza,
            since: Instant::now(),
            origin: None,
        }
    }

    /// Presence broadcasts to an account without sessions are dropped without loading
    /// it; a message loads it, it stays loaded while idle, and the sweep unloads it
    /// once it has been idle for the TTL.
    #[actix_rt::test]
    async fn idle_users_stay_loaded_for_a_while_and_presence_does_not_load() {
        let host = host().await;
        for t in [PresenceType::Available, PresenceType::Unavailable] {
            host.send(to_juliet(Kind::Presence(t))).await.unwrap();
        }
        assert_eq!(host.send(Inspect).await.unwrap(), (0, 0));

        host.send(to_juliet(Kind::Message(MessageType::Chat)))
            .await
            .unwrap();
        // The load completes asynchronously; the user then stays, idle.
        let mut state = (0, 0);
        for _ in 0..100 {
            state = host.send(Inspect).await.unwrap();
            if state == (1, 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state, (1, 1));

        host.send(SweepAt(Instant::now())).await.unwrap();
        assert_eq!(
            host.send(Inspect).await.unwrap(),
            (1, 1),
            "kept within the TTL"
        );
        host.send(SweepAt(Instant::now() + IDLE_TTL)).await.unwrap();
        assert_eq!(
            host.send(Inspect).await.unwrap(),
            (0, 0),
            "unloaded after it"
        );
    }
}
