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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use jid::{BareJid, FullJid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use shoal_xmpp::stanza::{Kind, PresenceType, Stanza};
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

/// How long a user without sessions stays loaded after its last message.
const IDLE_TTL: Duration = Duration::from_secs(60);

/// How often idle users are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(10);

/// Most users without sessions one host keeps loaded.
const IDLE_MAX: usize = 50_000;

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
        Self {
            users: HashMap::new(),
            idle: HashMap::new(),
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
        self.queue.submit(&user, async move {
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
                        .submit(user, async move { jobs::write(&storage, &u, w).await });
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
        // A user that is not loaded has no session: available and unavailable presence
        // for it is silently ignored (RFC 6121 §8.5.1, §8.5.2.2.1, §8.5.3.2.2), so
        // there is nothing to load it for.
        let broadcast = matches!(
            msg.stanza.kind,
            Kind::Presence(PresenceType::Available | PresenceType::Unavailable)
        );
        if broadcast && !self.users.contains_key(&user) {
            return;
        }
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
        self.queue.barrier(async move {
            let _ = msg.done.send(());
        });
    }
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
