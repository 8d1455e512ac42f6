//! The connection actor of a bound client session.
//!
//! It owns the session's protocol state ([`C2sStream`]) and its outbound queue. Bytes
//! from the reader task arrive as [`Incoming`]; stanzas for the client arrive from shard
//! hosts as [`Deliver`]. It stamps and routes what the client sends, enforces the idle
//! timeout and the outbound bound, and unbinds from its shard when it stops. It never
//! touches another session's state.
//!
//! Closing loses nothing the server accepted. When the server closes the stream (drain,
//! conflict, idle timeout) the session unbinds at once, so the account's owner routes
//! new stanzas elsewhere, and keeps reading until the client's own close (RFC 6120
//! §4.4, bounded by [`CLOSE_WAIT`]): what the client sent before it read our close is
//! routed. A stanza that reaches the session once it can write no more is handed back
//! to routing after the unbind, so the owner treats it as for a session that is gone
//! (another resource, offline storage, or an error to the sender: RFC 6121 §8.5).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use jid::{FullJid, Jid};
use shoal_xmpp::c2s::{Action, C2sStream};
use shoal_xmpp::error::{StreamError, StreamErrorCondition};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{
    IqType, Kind, MessageType, PresenceType, Stanza, TopLevel, parse_top_level,
};
use shoal_xmpp::xml::NsContext;
use tokio::task::AbortHandle;
use tracing::{debug, info};

use crate::c2s::io::{Outbound, QueueFull};
use crate::c2s::{fresh_id, stanza_kind, stream_error_label};
use crate::cluster::forward::NodeId;
use crate::cluster::link::ToOwner;
use crate::metrics::{ConnectionGuard, GaugeGuard, Metrics};
use crate::router::{self, Home, Router};
use crate::shard::{Attached, FromSession, FromSessionKind, SessionHandle, Unbind};
use crate::user::{SessionFacts, SessionId, UserShared};

/// Messages a session may queue. Beyond this, shard hosts drop stanzas for it (counted,
/// sender told `<resource-constraint/>`); the reader task waits instead, which is the
/// back-pressure on a client that sends faster than it is served.
const SESSION_MAILBOX: usize = 1024;

/// How long a stream we closed waits for the client's close (RFC 6120 §4.4 leaves
/// "reasonable" to the server). A client that reads answers within a round trip; one
/// that does not holds a draining node no longer than this (the drain's grace bounds it
/// too).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Bytes read from the client (`None`: the socket closed).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Incoming(pub Option<Bytes>);

/// A stanza for the client, already serialised.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub xml: Bytes,
    pub kind: Kind,
    pub since: Instant,
}

/// Close the stream with this error (conflict, shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close(pub StreamError);

/// Cluster mode: the account's shard moved to `owner`; report this session to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportAttach {
    pub owner: NodeId,
}

/// What a session is built from once negotiation has bound a resource.
pub struct SessionParts {
    pub stream: C2sStream,
    pub buf: BytesMut,
    pub jid: FullJid,
    pub id: SessionId,
    pub outbound: Outbound,
    pub reader: AbortHandle,
    pub router: Router,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    pub connection: ConnectionGuard,
    /// The read-only view of the user's state (blocklist, carbons) from its shard.
    pub shared: Arc<UserShared>,
    /// Called once when the session stops (releases the node's connection count).
    pub on_stop: Box<dyn FnOnce()>,
}

pub struct Session {
    stream: C2sStream,
    buf: BytesMut,
    jid: FullJid,
    id: SessionId,
    outbound: Option<Outbound>,
    reader: AbortHandle,
    router: Router,
    metrics: Metrics,
    idle_timeout: Duration,
    last_read: Instant,
    _connection: ConnectionGuard,
    _session: GaugeGuard,
    on_stop: Option<Box<dyn FnOnce()>>,
    shared: Arc<UserShared>,
    /// Entities this session sent directed available presence to.
    directed: HashSet<Jid>,
    /// What a new owner of the account needs to serve this session as before.
    facts: SessionFacts,
    /// Our stream close is written: nothing more goes to the client.
    close_sent: bool,
    /// The account's owner was told the session is gone.
    unbound: bool,
}

impl Session {
    pub fn new(parts: SessionParts) -> Self {
        let session = parts.metrics.session_bound();
        Self {
            stream: parts.stream,
            buf: parts.buf,
            jid: parts.jid,
            id: parts.id,
            outbound: Some(parts.outbound),
            reader: parts.reader,
            router: parts.router,
            metrics: parts.metrics,
            idle_timeout: parts.idle_timeout,
            last_read: Instant::now(),
            _connection: parts.connection,
            _session: session,
            on_stop: Some(parts.on_stop),
            shared: parts.shared,
            directed: HashSet::new(),
            facts: SessionFacts::default(),
            close_sent: false,
            unbound: false,
        }
    }

    fn write(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        if self.close_sent {
            return;
        }
        let Some(out) = &self.outbound else { return };
        match out.send(bytes) {
            Ok(()) => {}
            Err(QueueFull::OverLimit) => {
                // The client does not read: stop buffering for it.
                info!(jid = %self.jid, "slow consumer disconnected: outbound buffer full");
                self.metrics.slow_consumer_disconnect();
                if let Some(out) = self.outbound.take() {
                    out.abort();
                }
                ctx.stop();
            }
            Err(QueueFull::Closed) => {
                self.outbound = None;
                ctx.stop();
            }
        }
    }

    fn process(&mut self, ctx: &mut Context<Self>) {
        let actions = self.stream.receive(&mut self.buf, &mut fresh_id);
        if self.buf.is_empty() {
            // Free the read buffer: an idle session holds none.
            self.buf = BytesMut::new();
        }
        self.run_actions(actions, ctx);
    }

    fn run_actions(&mut self, actions: Vec<Action>, ctx: &mut Context<Self>) {
        for action in actions {
            match action {
                Action::Send(s) => self.write(s.as_bytes(), ctx),
                Action::Stanza(st) => self.route(st, ctx),
                Action::Close { error } => {
                    if let Some(e) = &error {
                        info!(jid = %self.jid, condition = e.condition.as_str(), text = e.text.as_deref().unwrap_or(""), "stream error");
                        self.metrics.stream_error(stream_error_label(e.condition));
                    }
                    if self.stream.is_closing() {
                        self.await_client_close(ctx);
                    } else {
                        self.finish(ctx);
                    }
                    return;
                }
                // Negotiation actions cannot occur once bound.
                other => debug!(?other, "ignored negotiation action in a bound session"),
            }
        }
    }

    /// Routes a stanza the client sent (its `from` already stamped).
    fn route(&mut self, mut st: Stanza, ctx: &mut Context<Self>) {
        let since = Instant::now();
        self.metrics.stanza_in(stanza_kind(st.kind));
        let own_bare = self.jid.to_bare();
        if let Some(to) = &st.to
            && self.shared.is_blocked(to)
        {
            // XEP-0191 §3.4: nothing goes to a blocked entity; the client is told why.
            return self.refuse_blocked(&st, ctx);
        }
        let to_self = st
            .to
            .as_ref()
            .is_none_or(|t| t.is_bare() && t.to_bare() == own_bare);
        match st.kind {
            // Presence without 'to' is the session's broadcast presence.
            Kind::Presence(_) if st.to.is_none() => {
                self.send_own_shard(FromSessionKind::Presence, st, since)
            }
            Kind::Presence(
                PresenceType::Subscribe
                | PresenceType::Subscribed
                | PresenceType::Unsubscribe
                | PresenceType::Unsubscribed,
            ) => self.send_own_shard(FromSessionKind::Subscription, st, since),
            Kind::Presence(t) => {
                // Directed presence: remembered so the recipient learns when this
                // session goes away (RFC 6121 §4.6.3).
                if let Some(to) = &st.to {
                    match t {
                        PresenceType::Available => {
                            self.directed.insert(to.clone());
                        }
                        PresenceType::Unavailable => {
                            self.directed.remove(to);
                        }
                        _ => {}
                    }
                }
                // A room keeps where its occupants' sessions are, to hand them its
                // stanzas itself.
                if t == PresenceType::Available
                    && st.to.as_ref().is_some_and(|to| self.router.is_muc(to))
                {
                    let home = Home::Here(ctx.address(), self.shared.clone());
                    return self.router.route_from_session(st, since, home);
                }
                self.router.route(st, since)
            }
            Kind::Iq(_) if to_self && is_account_iq(&st) => {
                self.send_own_shard(FromSessionKind::AccountIq, st, since)
            }
            // XEP-0077 §3.3 addresses a password change to the server; it is still the
            // account's own business.
            Kind::Iq(_) if self.is_to_server(&st) && is_register_iq(&st) => {
                self.send_own_shard(FromSessionKind::AccountIq, st, since)
            }
            // An iq without 'to' is for the server, on behalf of the account; the
            // router hands stanzas without 'to' to the server.
            Kind::Iq(_) => self.router.route(st, since),
            Kind::Message(t) => {
                if st.to.is_none() {
                    // A message without 'to' is to the sender's own bare JID (RFC 6120
                    // §10.3.1).
                    st.to = Some(Jid::from(own_bare));
                }
                let carbon = t == MessageType::Chat && self.shared.carbons_enabled() > 0;
                let copy = carbon.then(|| st.clone());
                self.router.route(st, since);
                if let Some(copy) = copy {
                    self.send_own_shard(FromSessionKind::SentCarbon, copy, since);
                }
            }
        }
    }

    /// Whether the stanza is addressed to this server's domain itself.
    fn is_to_server(&self, st: &Stanza) -> bool {
        st.to
            .as_ref()
            .is_some_and(|t| t.is_bare() && t.to_bare() == *self.router.domain())
    }

    fn send_own_shard(&mut self, kind: FromSessionKind, stanza: Stanza, since: Instant) {
        self.note_facts(kind, &stanza);
        self.router.to_owner(ToOwner::FromSession(FromSession {
            from: self.jid.clone(),
            kind,
            stanza,
            since,
        }));
    }

    /// Keeps [`SessionFacts`] in step with what the session asked of its account.
    fn note_facts(&mut self, kind: FromSessionKind, stanza: &Stanza) {
        match (kind, stanza.kind) {
            (FromSessionKind::Presence, Kind::Presence(PresenceType::Available)) => {
                self.facts.presence = Some(stanza.clone());
            }
            (FromSessionKind::Presence, Kind::Presence(PresenceType::Unavailable)) => {
                self.facts.presence = None;
            }
            (FromSessionKind::AccountIq, Kind::Iq(t)) => {
                let Ok(Some(p)) = stanza.iq_payload() else {
                    return;
                };
                match (p.ns.as_str(), p.name.as_str(), t) {
                    (ns::ROSTER, "query", IqType::Get) => self.facts.roster_requested = true,
                    (ns::BLOCKING, "blocklist", IqType::Get) => {
                        self.facts.blocklist_requested = true;
                    }
                    (ns::CARBONS, name @ ("enable" | "disable"), IqType::Set) => {
                        self.facts.carbons = name == "enable";
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// `<not-acceptable/>` with XEP-0191's `<blocked/>` for a stanza to a blocked JID.
    fn refuse_blocked(&mut self, st: &Stanza, ctx: &mut Context<Self>) {
        if st.kind.is_error() {
            return;
        }
        let mut reply = st.clone();
        std::mem::swap(&mut reply.to, &mut reply.from);
        reply.kind = match st.kind {
            Kind::Message(_) => Kind::Message(MessageType::Error),
            Kind::Presence(_) => Kind::Presence(PresenceType::Error),
            Kind::Iq(_) => Kind::Iq(IqType::Error),
        };
        reply.extra_attrs.clear();
        reply.payload = Bytes::from(format!(
            "<error type='cancel'><not-acceptable xmlns='{}'/><blocked xmlns='{}'/></error>",
            ns::STANZA_ERRORS,
            ns::BLOCKING_ERRORS
        ));
        self.write(reply.to_xml().as_bytes(), ctx);
    }

    /// We closed the stream: the owner learns now that the session is gone, and the
    /// client's stanzas are still routed until its close or [`CLOSE_WAIT`].
    fn await_client_close(&mut self, ctx: &mut Context<Self>) {
        self.close_sent = true;
        self.unbind();
        ctx.run_later(CLOSE_WAIT, |act, ctx| {
            debug!(jid = %act.jid, "no close from the client");
            act.finish(ctx);
        });
    }

    /// Tells the account's owner, once, that this session is gone. It goes the way
    /// routed stanzas go, so a stanza handed back afterwards reaches the owner after it.
    fn unbind(&mut self) {
        if std::mem::replace(&mut self.unbound, true) {
            return;
        }
        self.router.to_owner(ToOwner::Unbind(Unbind {
            jid: self.jid.clone(),
            id: self.id,
        }));
    }

    /// A stanza for a client that reads no more: routed again after the unbind, so
    /// the owner handles it as for a session that is gone.
    fn hand_back(&mut self, msg: Deliver) {
        self.unbind();
        if let Ok(TopLevel::Stanza(st)) = parse_top_level(&msg.xml, NsContext::CLIENT)
            && router::worth_handing_back(st.kind)
        {
            self.router.route(st, msg.since);
        }
    }

    /// Stops the actor; the stream close has been queued (or cannot be sent).
    fn finish(&mut self, ctx: &mut Context<Self>) {
        if let Some(out) = self.outbound.take() {
            out.close();
        }
        ctx.stop();
    }

    fn close_with(&mut self, error: StreamError, ctx: &mut Context<Self>) {
        let actions = self.stream.close_with(error);
        self.run_actions(actions, ctx);
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(SESSION_MAILBOX);
        self.router
            .session_started(&self.jid, self.id, ctx.address(), self.shared.clone());
        // Bytes that arrived behind the bind request are processed now.
        if !self.buf.is_empty() {
            self.process(ctx);
        }
        let period = (self.idle_timeout / 4).max(Duration::from_millis(250));
        ctx.run_interval(period, |act, ctx| {
            if act.last_read.elapsed() >= act.idle_timeout {
                info!(jid = %act.jid, "idle timeout");
                act.close_with(StreamErrorCondition::ConnectionTimeout.into(), ctx);
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.reader.abort();
        if let Some(out) = self.outbound.take() {
            out.close();
        }
        // Directed presence recipients learn the session went away (RFC 6121 §4.6.3).
        for to in self.directed.drain() {
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = Some(Jid::from(self.jid.clone()));
            p.to = Some(to);
            self.router.route(p, Instant::now());
        }
        self.unbind();
        if let Some(f) = self.on_stop.take() {
            f();
        }
        debug!(jid = %self.jid, "session ended");
    }
}

impl Handler<Incoming> for Session {
    type Result = bool;

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) -> bool {
        match msg.0 {
            Some(bytes) => {
                self.last_read = Instant::now();
                if self.buf.is_empty() {
                    // Usually the whole chunk is framed at once: take it without a copy.
                    self.buf = BytesMut::from(bytes);
                } else {
                    self.buf.extend_from_slice(&bytes);
                }
                self.process(ctx);
                !self.stream.is_closed()
            }
            None => {
                debug!(jid = %self.jid, "client closed the connection");
                self.finish(ctx);
                false
            }
        }
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        if self.close_sent || self.stream.is_closed() {
            return self.hand_back(msg);
        }
        self.metrics.stanza_out(stanza_kind(msg.kind));
        self.metrics.routing_latency(msg.since.elapsed());
        self.write(&msg.xml, ctx);
    }
}

impl Handler<Close> for Session {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        info!(jid = %self.jid, error = %msg.0, "closing session");
        self.close_with(msg.0, ctx);
    }
}

impl Handler<ReportAttach> for Session {
    type Result = ();

    fn handle(&mut self, msg: ReportAttach, ctx: &mut Self::Context) {
        // A session that unbound (closing) is gone for its account: it answers so, or
        // the new owner would attach it again and deliver to it.
        let present = !self.unbound;
        let attached = Attached {
            jid: self.jid.clone(),
            id: self.id,
            handle: present.then(|| SessionHandle::Local(ctx.address())),
            facts: present.then(|| self.facts.clone()),
        };
        self.router.attached(&msg.owner, attached);
    }
}

/// Namespaces of requests the account answers from its own state.
fn is_account_iq(st: &Stanza) -> bool {
    matches!(
        st.iq_payload(),
        Ok(Some(p)) if [ns::ROSTER, ns::BLOCKING, ns::CARBONS, ns::VCARD, ns::PRIVATE, ns::REGISTER]
            .contains(&p.ns.as_str())
    )
}

/// An in-band registration request (XEP-0077): a password change or account removal
/// once authenticated.
fn is_register_iq(st: &Stanza) -> bool {
    matches!(st.iq_payload(), Ok(Some(p)) if p.ns == ns::REGISTER)
}
