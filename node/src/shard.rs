//! Shard host actors: each hosts the [`UserState`] of every loaded account whose shard
//! maps to it, and is the only place that state is read or changed (DESIGN.md
//! invariant 2).
//!
//! A user's state is loaded on the first message that needs it (roster, blocklist,
//! whether the account exists) through the host's ordered [`StorageQueue`]; messages
//! that arrive meanwhile wait in that user's queue and are then handled in order. The
//! host turns messages into calls on the plain user structs and carries out the
//! effects: delivering to session actors with `try_send`, routing, queueing writes and
//! jobs. It never waits on another mailbox and never does I/O itself. A user with no
//! session is unloaded after each message; storage order keeps the next load exact.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use jid::{BareJid, FullJid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use shoal_xmpp::stanza::Stanza;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::c2s::session::{Close, Deliver, Session};
use crate::jobs::{self, JobContext, StorageQueue};
use crate::metrics::{Mailbox, Metrics};
use crate::model::UserData;
use crate::router::Router;
use crate::storage::Storage;
use crate::user::{Effect, Job, SessionId, UserLimits, UserShared, UserState};

/// Messages a shard host may queue. Past this, senders get `<resource-constraint/>`
/// (and the drop is counted) rather than waiting: one overloaded shard must not stall
/// the connections that route through it.
const SHARD_MAILBOX: usize = 16_384;

/// Messages one user may have waiting while its data loads; beyond this stanzas are
/// refused like a full mailbox (binds and unbinds never are).
const USER_QUEUE: usize = 1_024;

/// A session as the shard sees it: its actor's address.
pub type SessionHandle = Addr<Session>;

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
    pub reply: oneshot::Sender<BindResult>,
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

/// Node shutdown: close every session with `<system-shutdown/>`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAllSessions;

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
}

enum Slot {
    Loading(VecDeque<UserMsg>),
    Ready(UserState<SessionHandle>),
}

/// Settings of a shard host.
#[derive(Clone)]
pub struct ShardConfig {
    pub limits: Arc<UserLimits>,
    pub max_offline: usize,
}

pub struct ShardHost {
    users: HashMap<BareJid, Slot>,
    router: Router,
    metrics: Metrics,
    queue: StorageQueue,
    config: ShardConfig,
}

impl ShardHost {
    pub fn new(router: Router, storage: Storage, config: ShardConfig) -> Self {
        let metrics = router.metrics().clone();
        Self {
            users: HashMap::new(),
            router,
            metrics,
            queue: StorageQueue::start(storage),
            config,
        }
    }

    /// Handles a message for `user`, loading its state first if needed.
    fn dispatch(&mut self, user: BareJid, msg: UserMsg, ctx: &mut Context<Self>) {
        match self.users.get_mut(&user) {
            Some(Slot::Ready(_)) => self.handle_ready(&user, msg),
            Some(Slot::Loading(queue)) => {
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

    fn start_load(&mut self, user: BareJid, ctx: &mut Context<Self>) {
        let (tx, rx) = oneshot::channel();
        let storage = self.queue.storage.clone();
        let u = user.clone();
        self.queue.submit(async move {
            let _ = tx.send(storage.loader.load_user(u.as_str()).await);
        });
        ctx.spawn(rx.into_actor(self).map(move |result, act, _| {
            let data = match result {
                Ok(Ok(data)) => data,
                Ok(Err(e)) => {
                    // The account's stanzas are refused rather than handled on a guess.
                    warn!(%user, error = %e, "loading user data failed");
                    act.fail_load(&user);
                    return;
                }
                Err(_) => return act.fail_load(&user),
            };
            act.loaded(user, data);
        }));
    }

    fn loaded(&mut self, user: BareJid, data: UserData) {
        let Some(Slot::Loading(queue)) = self.users.remove(&user) else {
            return;
        };
        let state = UserState::new(user.clone(), data, self.config.limits.clone());
        self.users.insert(user.clone(), Slot::Ready(state));
        // Unload (if idle) only once the whole queue is handled: unloading after the
        // first message would leave the rest with no state to be handled by.
        for msg in queue {
            self.handle_one(&user, msg);
        }
        self.unload_if_idle(&user);
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
            UserMsg::Bind(b) => {
                let _ = b.reply.send(Err(err));
            }
            UserMsg::Route(r) => self.router.bounce(&r.stanza, err, r.since),
            UserMsg::FromSession(f) => self.router.bounce(&f.stanza, err, now),
            UserMsg::Unbind(_) => {}
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
                let result = state.bind(&b.resource, b.id, b.session);
                let reply = match result {
                    Ok((jid, effects)) => {
                        let shared = state.shared();
                        self.apply(user, effects, Instant::now());
                        Ok((jid, shared))
                    }
                    Err(e) => Err(e),
                };
                // The connection may have gone while waiting; its unbind follows.
                let _ = b.reply.send(reply);
                return;
            }
            UserMsg::Unbind(u) => (state.unbind(&u.jid, u.id, now_unix), Instant::now()),
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
        };
        self.apply(user, effects, since);
    }

    fn unload_if_idle(&mut self, user: &BareJid) {
        if let Some(Slot::Ready(state)) = self.users.get(user)
            && state.is_idle()
        {
            self.users.remove(user);
        }
    }

    fn apply(&mut self, user: &BareJid, effects: Vec<Effect<SessionHandle>>, since: Instant) {
        for effect in effects {
            match effect {
                Effect::Deliver(sessions, stanza) => self.deliver(user, sessions, stanza, since),
                Effect::Route(stanza) => self.router.route(stanza, since),
                Effect::Replaced(old) => {
                    // If the old session's mailbox is full it is already being
                    // disconnected as a slow consumer, so the close is not needed.
                    let _ = old.try_send(Close(StreamErrorCondition::Conflict));
                }
                Effect::Persist(w) => {
                    let storage = self.queue.storage.clone();
                    let u = user.clone();
                    self.queue
                        .submit(async move { jobs::write(&storage, &u, w).await });
                }
                Effect::Job(job) => self.job(user, job, since),
            }
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
        self.queue.submit(jobs::run(cx, u, job));
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
        let mut gone = Vec::new();
        for session in sessions {
            let msg = Deliver {
                xml: xml.clone(),
                kind: stanza.kind,
                since,
            };
            match session.try_send(msg) {
                Ok(()) => {}
                Err(SendError::Full(_)) => {
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
                Err(SendError::Closed(_)) => gone.push(session),
            }
        }
        // A session whose actor is gone without unbinding (it crashed or its unbind was
        // dropped) is detected here and removed, so the next stanza is routed right.
        for session in gone {
            if let Some(Slot::Ready(state)) = self.users.get_mut(user) {
                let effects = state.remove_handle(&session, jobs::now_ms() / 1000);
                self.apply(user, effects, since);
            }
        }
    }
}

impl Actor for ShardHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(SHARD_MAILBOX);
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
        // Nothing to unbind for a user that is not loaded.
        if self.users.contains_key(&user) {
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
        self.dispatch(user, UserMsg::Route(msg), ctx);
    }
}

impl Handler<FromSession> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: FromSession, ctx: &mut Self::Context) {
        let user = msg.from.to_bare();
        if !self.users.contains_key(&user) {
            debug!(from = %msg.from, "stanza from a session that is not bound");
            return;
        }
        self.dispatch(user, UserMsg::FromSession(msg), ctx);
    }
}

impl Handler<CloseAllSessions> for ShardHost {
    type Result = ();

    fn handle(&mut self, _: CloseAllSessions, _: &mut Self::Context) {
        for slot in self.users.values() {
            if let Slot::Ready(state) = slot {
                for session in state.handles() {
                    // Sessions that cannot take the message are closed by the final stop.
                    let _ = session.try_send(Close(StreamErrorCondition::SystemShutdown));
                }
            }
        }
    }
}

impl Handler<DrainStorage> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: DrainStorage, _: &mut Self::Context) {
        // The queue runs in order, so this marker completes after everything before it.
        self.queue.submit(async move {
            let _ = msg.done.send(());
        });
    }
}
