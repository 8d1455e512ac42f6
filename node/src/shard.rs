//! Shard host actors: each hosts the [`UserState`] of every online account whose shard
//! maps to it, and is the only place that state is read or changed (DESIGN.md
//! invariant 2).
//!
//! A shard host turns messages into calls on the plain user structs and carries out the
//! resulting effects: delivering to session actors with `try_send`, routing replies,
//! closing replaced sessions. It never waits on another mailbox and never does I/O.

use std::collections::HashMap;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use jid::{BareJid, FullJid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use shoal_xmpp::stanza::Stanza;
use tokio::sync::oneshot;
use tracing::debug;

use crate::c2s::session::{Close, Deliver, Session};
use crate::metrics::{Mailbox, Metrics};
use crate::router::Router;
use crate::user::{Effect, SessionId, UserState};

/// Messages a shard host may queue. Past this, senders get `<resource-constraint/>`
/// (and the drop is counted) rather than waiting: one overloaded shard must not stall
/// the connections that route through it.
const SHARD_MAILBOX: usize = 16_384;

/// A session as the shard sees it: its actor's address.
pub type SessionHandle = Addr<Session>;

/// The result of a bind request.
pub type BindResult = Result<FullJid, StanzaError>;

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

/// Broadcast presence (no `to`) from one of the account's own sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OwnPresence {
    pub from: FullJid,
    pub stanza: Stanza,
    pub since: Instant,
}

/// Node shutdown: close every session with `<system-shutdown/>`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAllSessions;

pub struct ShardHost {
    users: HashMap<BareJid, UserState<SessionHandle>>,
    router: Router,
    metrics: Metrics,
    max_resources: usize,
}

impl ShardHost {
    pub fn new(router: Router, max_resources: usize) -> Self {
        let metrics = router.metrics().clone();
        Self {
            users: HashMap::new(),
            router,
            metrics,
            max_resources,
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
            }
        }
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
            if let Some(state) = self.users.get_mut(user) {
                let effects = state.remove_handle(&session);
                self.apply(user, effects, since);
            }
        }
        self.forget_if_empty(user);
    }

    fn forget_if_empty(&mut self, user: &BareJid) {
        if self.users.get(user).is_some_and(UserState::is_empty) {
            self.users.remove(user);
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

    fn handle(&mut self, msg: Bind, _: &mut Self::Context) {
        let state = self
            .users
            .entry(msg.user.clone())
            .or_insert_with(|| UserState::new(msg.user.clone()));
        let result = state.bind(&msg.resource, msg.id, msg.session, self.max_resources);
        let reply = match result {
            Ok((jid, effects)) => {
                self.apply(&msg.user, effects, Instant::now());
                Ok(jid)
            }
            Err(e) => Err(e),
        };
        self.forget_if_empty(&msg.user);
        // The connection may have gone while waiting; then there is no one to tell and
        // its unbind follows.
        let _ = msg.reply.send(reply);
    }
}

impl Handler<Unbind> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: Unbind, _: &mut Self::Context) {
        let bare = msg.jid.to_bare();
        if let Some(state) = self.users.get_mut(&bare) {
            let effects = state.unbind(&msg.jid, msg.id);
            self.apply(&bare, effects, Instant::now());
            self.forget_if_empty(&bare);
        }
    }
}

impl Handler<RouteToUser> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: RouteToUser, _: &mut Self::Context) {
        let Some(bare) = msg.stanza.to.as_ref().map(|t| t.to_bare()) else {
            return;
        };
        let effects = match self.users.get_mut(&bare) {
            Some(state) => state.deliver(msg.stanza),
            // Nobody online: the offline rules of the same struct apply.
            None => UserState::new(bare.clone()).deliver(msg.stanza),
        };
        self.apply(&bare, effects, msg.since);
    }
}

impl Handler<OwnPresence> for ShardHost {
    type Result = ();

    fn handle(&mut self, msg: OwnPresence, _: &mut Self::Context) {
        let bare = msg.from.to_bare();
        if let Some(state) = self.users.get_mut(&bare) {
            let effects = state.own_presence(&msg.from, msg.stanza);
            self.apply(&bare, effects, msg.since);
        } else {
            debug!(from = %msg.from, "presence from a session that is not bound");
        }
    }
}

impl Handler<CloseAllSessions> for ShardHost {
    type Result = ();

    fn handle(&mut self, _: CloseAllSessions, _: &mut Self::Context) {
        for state in self.users.values() {
            for session in state.handles() {
                // Sessions that cannot take the message are closed by the final stop.
                let _ = session.try_send(Close(StreamErrorCondition::SystemShutdown));
            }
        }
    }
}
