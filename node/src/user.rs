//! The state of one user account while it is loaded: bound sessions and their presence,
//! the roster with its subscriptions, the blocklist, and every RFC 6121 rule that
//! decides what happens to stanzas from and to the account.
//!
//! This is a plain struct: [`UserState`] methods take an input and return [`Effect`]s
//! (deliver, route, persist, run a storage job) for the shard actor to carry out, so
//! every rule is unit-tested without actix or storage. It is owned by exactly one shard
//! actor (DESIGN.md invariant 2) and never talks to a socket, storage or another actor
//! itself. `H` is the handle of a session (an actor address at run time, a number in
//! tests).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use parking_lot::RwLock;
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, MessageType, PresenceType, Stanza};
use shoal_xmpp::xml::{Element, escape};

use crate::model::{RosterItem, UserData};
use crate::roster::{self, ContactState, RosterLimits, RosterSet, SubscriptionOp};

/// Identifies one binding of a resource, so a late unbind from a replaced session does
/// not remove its replacement.
pub type SessionId = u64;

/// State a user's sessions read on their own hot path (never written by them): the
/// blocklist for outbound checks and how many sessions want carbons.
#[derive(Debug, Default)]
pub struct UserShared {
    blocklist: RwLock<HashSet<String>>,
    carbons: AtomicUsize,
}

impl UserShared {
    /// Whether stanzas to or from `jid` are blocked (XEP-0191 §3.4: a bare JID entry
    /// blocks all its resources, a domain entry the whole domain).
    pub fn is_blocked(&self, jid: &Jid) -> bool {
        let list = self.blocklist.read();
        !list.is_empty() && blocked_by(&list, jid)
    }

    /// Sessions of this user with carbons enabled.
    pub fn carbons_enabled(&self) -> usize {
        self.carbons.load(Ordering::Relaxed)
    }

    /// The blocklist (sorted) and carbons count, to copy to another node.
    pub fn snapshot(&self) -> (Vec<String>, usize) {
        let mut list: Vec<String> = self.blocklist.read().iter().cloned().collect();
        list.sort();
        (list, self.carbons_enabled())
    }

    /// Overwrites this copy with the owner's state (a session whose account is owned
    /// by another node reads a copy kept current by the owner).
    pub fn replace(&self, blocklist: Vec<String>, carbons: usize) {
        *self.blocklist.write() = blocklist.into_iter().collect();
        self.carbons.store(carbons, Ordering::Relaxed);
    }
}

/// What a session's node reports about it when a new owner attaches it: enough to
/// serve it as before without the client noticing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionFacts {
    /// The last broadcast presence, if the session is available.
    pub presence: Option<Stanza>,
    pub roster_requested: bool,
    pub blocklist_requested: bool,
    pub carbons: bool,
}

fn blocked_by(list: &HashSet<String>, jid: &Jid) -> bool {
    list.contains(jid.as_str())
        || list.contains(jid.to_bare().as_str())
        || list.contains(jid.domain().as_str())
}

#[derive(Debug, Clone)]
struct SessionEntry<H> {
    jid: FullJid,
    id: SessionId,
    handle: H,
    /// The last broadcast presence, once the session has sent available presence.
    presence: Option<Stanza>,
    priority: i8,
    /// Requested the roster, so it receives roster pushes (RFC 6121 §2.1.6).
    interested: bool,
    /// Requested the blocklist, so it receives blocklist pushes (XEP-0191 §3.3).
    blocklist_requested: bool,
    carbons: bool,
}

impl<H> SessionEntry<H> {
    fn available(&self) -> bool {
        self.presence.is_some()
    }
}

/// Ordered storage writes; the shard carries them out in order, fire-and-forget.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    PutItem(RosterItem),
    RemoveItem(String),
    PendingIn(String, Option<String>),
    Blocklist(Vec<String>),
    LastActivity {
        unix_secs: u64,
        status: String,
    },
    /// A MUC room's state and the name it is listed under (keyed by the room's JID).
    RoomState {
        state: String,
        listed: Option<String>,
    },
    /// A room occupant's record by full JID; `None` removes it.
    RoomOccupant(String, Option<String>),
    /// The room is gone.
    RoomDeleted,
}

/// Storage work whose result produces stanzas; run in order with the writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Job<H> {
    /// Store a message for later (XEP-0160); bounce it if the queue is full.
    StoreOffline(Stanza),
    /// Deliver stored messages to a session that just became available, then remove them.
    DeliverOffline(H),
    /// Answer a vCard get for `owner` (XEP-0054).
    VcardGet {
        request: Stanza,
        owner: BareJid,
    },
    VcardSet {
        request: Stanza,
        xml: String,
    },
    /// Answer a private XML get (XEP-0049) for the element `name`/`ns`.
    PrivateGet {
        request: Stanza,
        name: String,
        ns: String,
    },
    PrivateSet {
        request: Stanza,
        key: String,
        xml: String,
    },
    /// Answer a last-activity query about an offline account (XEP-0012).
    LastActivity {
        request: Stanza,
    },
    /// Change the password (XEP-0077 §3.3).
    ChangePassword {
        request: Stanza,
        password: String,
    },
    /// Remove the account and all its data, then close these sessions (XEP-0077 §3.2).
    RemoveAccount {
        request: Stanza,
        /// The session that asked. It gets the answer directly: the account is already
        /// gone for routing, which drops stanzas to a removed account.
        requester: Option<H>,
        sessions: Vec<H>,
    },
}

/// What the shard actor must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect<H> {
    /// Write this stanza to each of these sessions.
    Deliver(Vec<H>, Stanza),
    /// Route this stanza into the server (replies, errors, presence to contacts).
    Route(Stanza),
    /// This session was replaced by a new binding of the same full JID.
    Replaced(H),
    Persist(Write),
    Job(Job<H>),
    /// The state sessions read ([`UserShared`]: blocklist, carbons count) changed;
    /// sessions on other nodes need the new copy.
    SharedChanged,
}

/// Limits applied to a user's data.
#[derive(Debug, Clone)]
pub struct UserLimits {
    pub max_resources: usize,
    pub roster: RosterLimits,
    pub max_blocklist: usize,
}

/// One loaded account.
#[derive(Debug)]
pub struct UserState<H> {
    bare: BareJid,
    data: UserData,
    sessions: Vec<SessionEntry<H>>,
    shared: Arc<UserShared>,
    limits: Arc<UserLimits>,
    /// The status of the last unavailable presence, stored with the last activity when
    /// the last session ends (XEP-0012 §4 answers it for an offline account).
    last_status: String,
}

impl<H: Clone + PartialEq> UserState<H> {
    pub fn new(bare: BareJid, data: UserData, limits: Arc<UserLimits>) -> Self {
        let shared = Arc::new(UserShared::default());
        *shared.blocklist.write() = data.blocklist.iter().cloned().collect();
        Self {
            bare,
            data,
            sessions: Vec::new(),
            shared,
            limits,
            last_status: String::new(),
        }
    }

    pub fn exists(&self) -> bool {
        self.data.exists
    }

    /// No session left: the shard may unload this state.
    pub fn is_idle(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn shared(&self) -> Arc<UserShared> {
        self.shared.clone()
    }

    /// Every bound session.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.sessions.iter().map(|s| &s.handle)
    }

    // ---- sessions -------------------------------------------------------------------

    /// Binds `resource` for a new session. A session already bound to the same full JID
    /// is replaced (RFC 6120 §7.7.2.2, the "override" policy).
    pub fn bind(
        &mut self,
        resource: &str,
        id: SessionId,
        handle: H,
    ) -> Result<(FullJid, Vec<Effect<H>>), StanzaError> {
        let jid = self
            .bare
            .with_resource_str(resource)
            .map_err(|_| StanzaError::new(StanzaErrorCondition::BadRequest))?;
        let mut effects = Vec::new();
        if let Some(pos) = self.sessions.iter().position(|s| s.jid == jid) {
            let old = self.remove_session(pos);
            effects.push(Effect::Replaced(old.handle.clone()));
            if old.available() {
                effects.extend(self.went_unavailable(&old.jid, None));
            }
        } else if self.sessions.len() >= self.limits.max_resources {
            return Err(StanzaError::with_text(
                StanzaErrorCondition::ResourceConstraint,
                "too many resources bound for this account",
            ));
        }
        // Most accounts bind one resource: no spare slots (memory per session).
        self.sessions.reserve_exact(1);
        self.sessions.push(SessionEntry {
            jid: jid.clone(),
            id,
            handle,
            presence: None,
            priority: 0,
            interested: false,
            blocklist_requested: false,
            carbons: false,
        });
        Ok((jid, effects))
    }

    /// The session ended: unavailable presence to contacts and own resources, and the
    /// last-activity record when it was the last one.
    pub fn unbind(&mut self, jid: &FullJid, id: SessionId, now_unix: u64) -> Vec<Effect<H>> {
        let Some(pos) = self
            .sessions
            .iter()
            .position(|s| &s.jid == jid && s.id == id)
        else {
            return Vec::new();
        };
        let old = self.remove_session(pos);
        let mut effects = Vec::new();
        if old.available() {
            effects.extend(self.went_unavailable(&old.jid, None));
        }
        if self.sessions.is_empty() && self.data.exists {
            effects.push(Effect::Persist(Write::LastActivity {
                unix_secs: now_unix,
                status: std::mem::take(&mut self.last_status),
            }));
        }
        effects
    }

    /// Removes a session whose mailbox is gone (its actor stopped without unbinding).
    pub fn remove_handle(&mut self, handle: &H, now_unix: u64) -> Vec<Effect<H>> {
        match self.sessions.iter().find(|s| &s.handle == handle) {
            Some(s) => {
                let (jid, id) = (s.jid.clone(), s.id);
                self.unbind(&jid, id, now_unix)
            }
            None => Vec::new(),
        }
    }

    fn remove_session(&mut self, pos: usize) -> SessionEntry<H> {
        let old = self.sessions.remove(pos);
        if old.carbons {
            self.shared.carbons.fetch_sub(1, Ordering::Relaxed);
        }
        old
    }

    /// Puts back the stored data after an in-memory change that storage refused (a
    /// failed account removal), keeping the bound sessions.
    pub fn restore(&mut self, data: UserData) {
        *self.shared.blocklist.write() = data.blocklist.iter().cloned().collect();
        self.data = data;
    }

    /// The binding id and handle of the session bound to `jid`.
    pub fn session(&self, jid: &FullJid) -> Option<(SessionId, &H)> {
        self.sessions
            .iter()
            .find(|s| &s.jid == jid)
            .map(|s| (s.id, &s.handle))
    }

    /// Attaches a session that was bound under a previous owner of this account (a
    /// handoff or a node's death moved the shard), as it was: no presence broadcast,
    /// contacts already saw it. Replaces a stale entry for the same full JID.
    pub fn attach(&mut self, jid: FullJid, id: SessionId, handle: H, facts: SessionFacts) {
        if let Some(pos) = self.sessions.iter().position(|s| s.jid == jid) {
            self.remove_session(pos);
        }
        if facts.carbons {
            self.shared.carbons.fetch_add(1, Ordering::Relaxed);
        }
        let priority = facts.presence.as_ref().map_or(0, Stanza::priority);
        self.sessions.push(SessionEntry {
            jid,
            id,
            handle,
            presence: facts.presence,
            priority,
            interested: facts.roster_requested,
            blocklist_requested: facts.blocklist_requested,
            carbons: facts.carbons,
        });
    }

    /// A session of this account ended somewhere this state never knew of (its node
    /// died along with the account's previous owner): contacts may have seen it
    /// available, so they get its unavailable presence.
    pub fn gone_elsewhere(&self, jid: &FullJid) -> Vec<Effect<H>> {
        if self.session(jid).is_some() {
            return Vec::new();
        }
        self.went_unavailable(jid, None)
    }

    // ---- own presence -----------------------------------------------------------------

    /// Presence with no `to` from one of this user's sessions (RFC 6121 §4.2, §4.4,
    /// §4.5): broadcast to contacts with a `from` subscription and to the user's own
    /// available resources; the first available presence also probes the contacts the
    /// user subscribes to, delivers stored messages and pending subscription requests.
    pub fn own_presence(&mut self, from: &FullJid, mut stanza: Stanza) -> Vec<Effect<H>> {
        let Some(pos) = self.sessions.iter().position(|s| &s.jid == from) else {
            return Vec::new();
        };
        match stanza.kind {
            Kind::Presence(PresenceType::Available) => {
                stanza.to = None;
                let initial = !self.sessions[pos].available();
                let priority = stanza.priority();
                let entry = &mut self.sessions[pos];
                entry.presence = Some(stanza.clone());
                entry.priority = priority;
                let handle = entry.handle.clone();
                let mut effects = self.broadcast(&stanza, from);
                if initial {
                    effects.extend(self.probes());
                    effects.extend(self.own_sibling_presence(pos));
                    for (contact, payload) in &self.data.roster.pending_in {
                        effects.push(Effect::Deliver(
                            vec![handle.clone()],
                            subscription_presence(
                                PresenceType::Subscribe,
                                contact,
                                &self.bare,
                                payload,
                            ),
                        ));
                    }
                    if priority >= 0 {
                        effects.push(Effect::Job(Job::DeliverOffline(handle)));
                    }
                }
                effects
            }
            Kind::Presence(PresenceType::Unavailable) => {
                if !self.sessions[pos].available() {
                    return Vec::new();
                }
                self.sessions[pos].presence = None;
                self.last_status = stanza.status().unwrap_or_default();
                self.went_unavailable(from, Some(stanza))
            }
            _ => Vec::new(),
        }
    }

    /// The current presence of the user's other available resources, for a resource
    /// that just became available.
    fn own_sibling_presence(&self, pos: usize) -> Vec<Effect<H>> {
        let target = self.sessions[pos].handle.clone();
        self.sessions
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != pos && s.available())
            .filter_map(|(_, s)| {
                let mut p = s.presence.clone()?;
                p.from = Some(Jid::from(s.jid.clone()));
                p.to = Some(Jid::from(self.sessions[pos].jid.clone()));
                Some(Effect::Deliver(vec![target.clone()], p))
            })
            .collect()
    }

    /// Sends `stanza` (from `from`) to every contact with a `from` subscription and to
    /// the user's own available resources.
    fn broadcast(&self, stanza: &Stanza, from: &FullJid) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        for item in self.data.roster.items.values() {
            if item.subscription.has_from() {
                let Ok(to) = Jid::new(&item.jid) else {
                    continue;
                };
                if self.shared.is_blocked(&to) {
                    continue;
                }
                let mut p = stanza.clone();
                p.from = Some(Jid::from(from.clone()));
                p.to = Some(to);
                effects.push(Effect::Route(p));
            }
        }
        let own = self.available_handles();
        if !own.is_empty() {
            let mut p = stanza.clone();
            p.from = Some(Jid::from(from.clone()));
            p.to = None;
            effects.push(Effect::Deliver(own, p));
        }
        effects
    }

    /// `unavailable` from `jid` to contacts and own resources (after the session's
    /// presence was cleared or the session removed).
    fn went_unavailable(&self, jid: &FullJid, original: Option<Stanza>) -> Vec<Effect<H>> {
        let mut p =
            original.unwrap_or_else(|| Stanza::new(Kind::Presence(PresenceType::Unavailable)));
        p.to = None;
        let mut effects = self.broadcast(&p, jid);
        // The resource that went unavailable hears its own unavailable too when it
        // sent it explicitly and is still bound.
        if let Some(s) = self.sessions.iter().find(|s| &s.jid == jid) {
            p.from = Some(Jid::from(jid.clone()));
            effects.push(Effect::Deliver(vec![s.handle.clone()], p));
        }
        effects
    }

    /// Probes to every contact the user subscribes to (RFC 6121 §4.2.2).
    fn probes(&self) -> Vec<Effect<H>> {
        self.data
            .roster
            .items
            .values()
            .filter(|i| i.subscription.has_to())
            .filter_map(|i| {
                let mut p = Stanza::new(Kind::Presence(PresenceType::Probe));
                p.from = Some(Jid::from(self.bare.clone()));
                p.to = Some(Jid::new(&i.jid).ok()?);
                Some(Effect::Route(p))
            })
            .collect()
    }

    // ---- subscriptions ------------------------------------------------------------------

    /// A subscription stanza the user sends (RFC 6121 §3, outbound side).
    pub fn outbound_subscription(&mut self, stanza: Stanza) -> Vec<Effect<H>> {
        let Some(op) = subscription_op(stanza.kind) else {
            return Vec::new();
        };
        let Some(contact) = stanza.to.as_ref().map(Jid::to_bare) else {
            return Vec::new();
        };
        if contact == self.bare {
            // Subscribing to oneself is meaningless; the server already shares presence
            // among the user's own resources.
            return Vec::new();
        }
        let key = contact.to_string();
        let state = ContactState::of(&self.data.roster, &key);
        let t = roster::outbound(&state, op);
        let mut effects = self.apply_transition(&key, &state, &t.new_state, "");
        if t.forward {
            // RFC 6121 §3.1.2: the user's server stamps the bare JID.
            let mut out = stanza.clone();
            out.from = Some(Jid::from(self.bare.clone()));
            out.to = Some(Jid::from(contact.clone()));
            effects.push(Effect::Route(out));
        }
        if t.send_presence {
            // §3.1.5: approving a subscription sends the user's current presence.
            effects.extend(self.current_presence_to(&Jid::from(contact.clone())));
        }
        if t.send_unavailable {
            // §3.2.1: cancelling sends unavailable from each available resource.
            effects.extend(self.unavailable_to(&Jid::from(contact.clone())));
        }
        effects
    }

    /// A subscription stanza from a contact to this user (RFC 6121 §3, inbound side).
    fn inbound_subscription(&mut self, stanza: Stanza) -> Vec<Effect<H>> {
        let Some(op) = subscription_op(stanza.kind) else {
            return Vec::new();
        };
        let Some(contact) = stanza.from.as_ref().map(Jid::to_bare) else {
            return Vec::new();
        };
        let key = contact.to_string();
        let state = ContactState::of(&self.data.roster, &key);
        let t = roster::inbound(&state, op);
        let request_xml = String::from_utf8_lossy(&stanza.payload).into_owned();
        let mut effects = self.apply_transition(&key, &state, &t.new_state, &request_xml);
        if t.forward {
            let mut st = stanza.clone();
            st.from = Some(Jid::from(contact.clone()));
            st.to = Some(Jid::from(self.bare.clone()));
            let to = self.available_handles();
            if !to.is_empty() {
                effects.push(Effect::Deliver(to, st));
            }
        }
        if t.send_unavailable {
            // §3.3.3: the contact stopped following this user's presence.
            effects.extend(self.unavailable_to(&Jid::from(contact.clone())));
        }
        if let Some(reply_op) = t.auto_reply {
            let mut reply = Stanza::new(Kind::Presence(reply_op.presence_type()));
            reply.from = Some(Jid::from(self.bare.clone()));
            reply.to = Some(Jid::from(contact.clone()));
            effects.push(Effect::Route(reply));
        }
        if t.send_presence {
            // A subscription granted on the user's behalf also carries its presence.
            effects.extend(self.current_presence_to(&Jid::from(contact.clone())));
        }
        effects
    }

    /// Stores a contact's new subscription state; persists and pushes what changed.
    fn apply_transition(
        &mut self,
        key: &str,
        old: &ContactState,
        new: &ContactState,
        request_xml: &str,
    ) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        let pushed = roster::apply_state(&mut self.data.roster, key, new, request_xml);
        if old.pending_in != new.pending_in {
            let stored = self.data.roster.pending_in.get(key).cloned();
            effects.push(Effect::Persist(Write::PendingIn(key.to_string(), stored)));
        }
        if pushed && let Some(item) = self.data.roster.items.get(key).cloned() {
            effects.push(Effect::Persist(Write::PutItem(item.clone())));
            effects.extend(self.roster_push(Some(&item), key));
        }
        effects
    }

    /// A roster push of one item to every interested resource (RFC 6121 §2.1.6).
    fn roster_push(&self, item: Option<&RosterItem>, jid: &str) -> Vec<Effect<H>> {
        self.push_to_interested(&roster::roster_push(item, jid, self.data.roster.version))
    }

    fn push_to_interested(&self, query: &Element) -> Vec<Effect<H>> {
        self.sessions
            .iter()
            .filter(|s| s.interested)
            .map(|s| {
                let mut iq = Stanza::new(Kind::Iq(IqType::Set));
                iq.to = Some(Jid::from(s.jid.clone()));
                iq.id = Some(format!("push{}", self.data.roster.version).into());
                iq.payload = Bytes::from(query.to_xml(ns::CLIENT));
                Effect::Deliver(vec![s.handle.clone()], iq)
            })
            .collect()
    }

    // ---- requests to the account --------------------------------------------------------

    /// An iq from one of the user's sessions to its own account (no `to`, or its own
    /// bare JID): roster, blocking, carbons, vCard, private storage, registration.
    pub fn account_iq(&mut self, from: &FullJid, iq: Stanza) -> Vec<Effect<H>> {
        if !matches!(iq.kind, Kind::Iq(IqType::Get | IqType::Set)) {
            // A result or error answers one of the server's own requests, such as a
            // client acknowledging a roster push with the query echoed back; it is not
            // a request and gets no answer (RFC 6120 §8.2.3).
            return Vec::new();
        }
        let Ok(Some(payload)) = iq.iq_payload() else {
            return reply_error(&iq, StanzaErrorCondition::BadRequest);
        };
        let set = iq.kind == Kind::Iq(IqType::Set);
        let Some(pos) = self.sessions.iter().position(|s| &s.jid == from) else {
            return Vec::new();
        };
        match (payload.ns.as_str(), payload.name.as_str(), set) {
            (ns::ROSTER, "query", false) => {
                self.sessions[pos].interested = true;
                let ver = payload.get_attr("ver");
                let result = roster::roster_result(&self.data.roster, ver);
                vec![Effect::Route(result_to(&iq, from, result.as_ref()))]
            }
            (ns::ROSTER, "query", true) => self.roster_set(from, &iq, &payload),
            (ns::BLOCKING, "blocklist", false) => {
                self.sessions[pos].blocklist_requested = true;
                let mut list = Element::new("blocklist", ns::BLOCKING);
                for j in &self.data.blocklist {
                    list = list.child(Element::new("item", ns::BLOCKING).attr("jid", j.as_str()));
                }
                vec![Effect::Route(result_to(&iq, from, Some(&list)))]
            }
            (ns::BLOCKING, "block" | "unblock", true) => self.block(from, &iq, &payload),
            (ns::CARBONS, "enable" | "disable", true) => {
                let enable = payload.name == "enable";
                let entry = &mut self.sessions[pos];
                if entry.carbons != enable {
                    entry.carbons = enable;
                    if enable {
                        self.shared.carbons.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.shared.carbons.fetch_sub(1, Ordering::Relaxed);
                    }
                    return vec![
                        Effect::SharedChanged,
                        Effect::Route(result_to(&iq, from, None)),
                    ];
                }
                vec![Effect::Route(result_to(&iq, from, None))]
            }
            (ns::VCARD, "vCard", false) => vec![Effect::Job(Job::VcardGet {
                request: addressed(&iq, from),
                owner: self.bare.clone(),
            })],
            (ns::VCARD, "vCard", true) => vec![Effect::Job(Job::VcardSet {
                request: addressed(&iq, from),
                xml: payload.to_xml(ns::CLIENT),
            })],
            (ns::PRIVATE, "query", _) => self.private(from, &iq, &payload, set),
            (ns::REGISTER, "query", true) => self.register(from, &iq, &payload),
            _ => reply_error(
                &addressed(&iq, from),
                StanzaErrorCondition::ServiceUnavailable,
            ),
        }
    }

    fn roster_set(&mut self, from: &FullJid, iq: &Stanza, payload: &Element) -> Vec<Effect<H>> {
        let req = addressed(iq, from);
        let set = match roster::parse_roster_set(payload, &self.data.roster, &self.limits.roster) {
            Ok(set) => set,
            Err(e) => return req.error_reply(&e).map(Effect::Route).into_iter().collect(),
        };
        let had_pending = match &set {
            RosterSet::Remove { jid } => self.data.roster.pending_in.contains_key(jid),
            RosterSet::Update { .. } => false,
        };
        let applied = roster::apply_roster_set(&mut self.data.roster, &set);
        let mut effects = vec![Effect::Route(result_to(iq, from, None))];
        match &set {
            RosterSet::Update { jid, .. } => {
                if let Some(item) = self.data.roster.items.get(jid) {
                    effects.push(Effect::Persist(Write::PutItem(item.clone())));
                }
            }
            RosterSet::Remove { jid } => {
                effects.push(Effect::Persist(Write::RemoveItem(jid.clone())));
                if had_pending {
                    effects.push(Effect::Persist(Write::PendingIn(jid.clone(), None)));
                }
                // RFC 6121 §2.5.2: removal cancels the subscriptions both ways.
                if let Ok(contact) = Jid::new(jid) {
                    for op in &applied.send {
                        effects.push(Effect::Route(bare_presence(
                            op.presence_type(),
                            &self.bare,
                            &contact,
                        )));
                    }
                    if applied.send_unavailable {
                        effects.extend(self.unavailable_to(&contact));
                    }
                }
            }
        }
        if let Some(push) = &applied.push {
            effects.extend(self.push_to_interested(push));
        }
        effects
    }

    /// The current presence of each available resource, to `contact`.
    fn current_presence_to(&self, contact: &Jid) -> Vec<Effect<H>> {
        self.sessions
            .iter()
            .filter_map(|s| {
                let mut p = s.presence.clone()?;
                p.from = Some(Jid::from(s.jid.clone()));
                p.to = Some(contact.clone());
                Some(Effect::Route(p))
            })
            .collect()
    }

    /// `unavailable` from each available resource to `contact`.
    fn unavailable_to(&self, contact: &Jid) -> Vec<Effect<H>> {
        self.sessions
            .iter()
            .filter(|s| s.available())
            .map(|s| {
                let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
                p.from = Some(Jid::from(s.jid.clone()));
                p.to = Some(contact.clone());
                Effect::Route(p)
            })
            .collect()
    }

    fn block(&mut self, from: &FullJid, iq: &Stanza, payload: &Element) -> Vec<Effect<H>> {
        let block = payload.name == "block";
        let mut jids = Vec::new();
        for item in payload.elements().filter(|e| e.is("item", ns::BLOCKING)) {
            match item.get_attr("jid").map(Jid::new) {
                Some(Ok(j)) => jids.push(j.to_string()),
                _ => return reply_error(&addressed(iq, from), StanzaErrorCondition::JidMalformed),
            }
        }
        if block && jids.is_empty() {
            // XEP-0191 §3.2: a block with no items is a bad request.
            return reply_error(&addressed(iq, from), StanzaErrorCondition::BadRequest);
        }
        let before: HashSet<String> = self.data.blocklist.iter().cloned().collect();
        let mut list: Vec<String> = self.data.blocklist.clone();
        if block {
            for j in &jids {
                if !list.contains(j) {
                    list.push(j.clone());
                }
            }
            if list.len() > self.limits.max_blocklist {
                return reply_error(&addressed(iq, from), StanzaErrorCondition::NotAcceptable);
            }
        } else if jids.is_empty() {
            list.clear();
        } else {
            list.retain(|j| !jids.contains(j));
        }
        list.sort();
        self.data.blocklist = list.clone();
        let after: HashSet<String> = list.iter().cloned().collect();
        *self.shared.blocklist.write() = after.clone();
        let mut effects = vec![
            Effect::SharedChanged,
            Effect::Route(result_to(iq, from, None)),
            Effect::Persist(Write::Blocklist(list)),
        ];
        // XEP-0191 §3.3: push the change to every resource that asked for the list.
        let mut push = Element::new(payload.name.clone(), ns::BLOCKING);
        for j in &jids {
            push = push.child(Element::new("item", ns::BLOCKING).attr("jid", j.as_str()));
        }
        for s in self.sessions.iter().filter(|s| s.blocklist_requested) {
            let mut p = Stanza::new(Kind::Iq(IqType::Set));
            p.to = Some(Jid::from(s.jid.clone()));
            p.id = Some("block-push".into());
            p.payload = Bytes::from(push.to_xml(ns::CLIENT));
            effects.push(Effect::Deliver(vec![s.handle.clone()], p));
        }
        // XEP-0191 §3.3: a contact allowed to see the user's presence sees the user go
        // offline when blocked, and gets the current presence back when unblocked;
        // anyone else learns nothing.
        for item in self.data.roster.items.values() {
            if !item.subscription.has_from() {
                continue;
            }
            let Ok(contact) = Jid::new(&item.jid) else {
                continue;
            };
            match (blocked_by(&before, &contact), blocked_by(&after, &contact)) {
                (false, true) => effects.extend(self.unavailable_to(&contact)),
                (true, false) => effects.extend(self.current_presence_to(&contact)),
                _ => {}
            }
        }
        effects
    }

    fn private(
        &mut self,
        from: &FullJid,
        iq: &Stanza,
        payload: &Element,
        set: bool,
    ) -> Vec<Effect<H>> {
        let req = addressed(iq, from);
        let mut children = payload.elements();
        let (Some(child), None) = (children.next(), children.next()) else {
            return reply_error(&req, StanzaErrorCondition::BadRequest);
        };
        // XEP-0049 §3: the jabber:* namespaces are reserved.
        if child.ns.starts_with("jabber:") || child.ns.is_empty() {
            return reply_error(&req, StanzaErrorCondition::NotAcceptable);
        }
        let key = format!("{} {}", child.name, child.ns);
        if set {
            vec![Effect::Job(Job::PrivateSet {
                request: req,
                key,
                xml: child.to_xml(ns::CLIENT),
            })]
        } else {
            vec![Effect::Job(Job::PrivateGet {
                request: req,
                name: child.name.clone(),
                ns: child.ns.clone(),
            })]
        }
    }

    fn register(&mut self, from: &FullJid, iq: &Stanza, payload: &Element) -> Vec<Effect<H>> {
        let req = addressed(iq, from);
        if payload.get_child("remove", ns::REGISTER).is_some() {
            return self.remove_account(req);
        }
        let username = payload
            .get_child("username", ns::REGISTER)
            .map(|e| e.text_content());
        let password = payload
            .get_child("password", ns::REGISTER)
            .map(|e| e.text_content());
        match (username, password) {
            (Some(u), Some(p))
                if !p.is_empty()
                    && p.len() <= 1023
                    && self
                        .bare
                        .node()
                        .is_some_and(|n| n.as_str() == u.to_lowercase()) =>
            {
                vec![Effect::Job(Job::ChangePassword {
                    request: req,
                    password: p,
                })]
            }
            _ => reply_error(&req, StanzaErrorCondition::NotAcceptable),
        }
    }

    /// XEP-0077 §3.2: cancels every subscription (contacts get `unsubscribe` and
    /// `unsubscribed`), forgets the account in memory so nothing more is written for
    /// it, then has the storage job delete its data and close its sessions.
    fn remove_account(&mut self, request: Stanza) -> Vec<Effect<H>> {
        let mut effects = Vec::new();
        for item in self.data.roster.items.values() {
            let Ok(contact) = Jid::new(&item.jid) else {
                continue;
            };
            if item.subscription.has_to() || item.ask {
                effects.push(Effect::Route(bare_presence(
                    PresenceType::Unsubscribe,
                    &self.bare,
                    &contact,
                )));
            }
            if item.subscription.has_from() {
                effects.extend(self.unavailable_to(&contact));
                effects.push(Effect::Route(bare_presence(
                    PresenceType::Unsubscribed,
                    &self.bare,
                    &contact,
                )));
            }
        }
        self.data = UserData::default();
        let requester = self
            .sessions
            .iter()
            .find(|s| request.from.as_ref() == Some(&Jid::from(s.jid.clone())))
            .map(|s| s.handle.clone());
        effects.push(Effect::Job(Job::RemoveAccount {
            request,
            requester,
            sessions: self.sessions.iter().map(|s| s.handle.clone()).collect(),
        }));
        effects
    }

    // ---- stanzas to the account ---------------------------------------------------------

    /// A stanza addressed to this account (bare JID) or one of its resources (full JID),
    /// following RFC 6121 §8.5, with blocking, subscriptions, probes and offline storage.
    pub fn deliver(&mut self, stanza: Stanza) -> Vec<Effect<H>> {
        if let Some(from) = &stanza.from
            && self.shared.is_blocked(from)
        {
            // XEP-0191 §3.4: nothing from a blocked entity reaches the user. Presence
            // gets no answer; messages SHOULD and iqs MUST get <service-unavailable/>.
            return match stanza.kind {
                Kind::Iq(IqType::Get | IqType::Set) => {
                    reply_error(&stanza, StanzaErrorCondition::ServiceUnavailable)
                }
                Kind::Message(t) if t != MessageType::Error => {
                    reply_error(&stanza, StanzaErrorCondition::ServiceUnavailable)
                }
                _ => Vec::new(),
            };
        }
        if !self.data.exists {
            // RFC 6121 §8.5.1: no such account.
            return match stanza.kind {
                Kind::Message(MessageType::Normal | MessageType::Chat | MessageType::Groupchat)
                | Kind::Iq(IqType::Get | IqType::Set) => {
                    reply_error(&stanza, StanzaErrorCondition::ServiceUnavailable)
                }
                _ => Vec::new(),
            };
        }
        if matches!(
            stanza.kind,
            Kind::Presence(
                PresenceType::Subscribe
                    | PresenceType::Subscribed
                    | PresenceType::Unsubscribe
                    | PresenceType::Unsubscribed
            )
        ) {
            return self.inbound_subscription(stanza);
        }
        if stanza.kind == Kind::Presence(PresenceType::Probe) {
            return self.answer_probe(&stanza);
        }
        let to_full = stanza
            .to
            .as_ref()
            .and_then(|t| t.try_as_full().ok().cloned());
        match to_full {
            Some(full) => self.deliver_to_full(&full, stanza),
            None => self.deliver_to_bare(stanza),
        }
    }

    /// RFC 6121 §4.3.2: a probe from a contact with a `from` subscription gets each
    /// available resource's presence, or `unavailable` when there is none; anyone else
    /// learns nothing.
    fn answer_probe(&self, probe: &Stanza) -> Vec<Effect<H>> {
        let Some(from) = probe.from.clone() else {
            return Vec::new();
        };
        let key = from.to_bare().to_string();
        let allowed = self
            .data
            .roster
            .items
            .get(&key)
            .is_some_and(|i| i.subscription.has_from());
        if !allowed {
            return Vec::new();
        }
        let available: Vec<Effect<H>> = self
            .sessions
            .iter()
            .filter_map(|s| {
                let mut p = s.presence.clone()?;
                p.from = Some(Jid::from(s.jid.clone()));
                p.to = Some(from.clone());
                Some(Effect::Route(p))
            })
            .collect();
        if available.is_empty() {
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = Some(Jid::from(self.bare.clone()));
            p.to = Some(from);
            vec![Effect::Route(p)]
        } else {
            available
        }
    }

    /// RFC 6121 §8.5.3.
    fn deliver_to_full(&mut self, full: &FullJid, stanza: Stanza) -> Vec<Effect<H>> {
        if let Some(s) = self.sessions.iter().find(|s| &s.jid == full) {
            let mut effects = vec![Effect::Deliver(vec![s.handle.clone()], stanza.clone())];
            effects.extend(self.received_carbons(&stanza, std::slice::from_ref(&s.handle)));
            return effects;
        }
        match stanza.kind {
            // §8.5.3.2.1: no such resource — normal, chat and headline messages are
            // treated as if sent to the bare JID; groupchat gets an error.
            Kind::Message(MessageType::Normal | MessageType::Chat | MessageType::Headline) => {
                self.deliver_to_bare(stanza)
            }
            Kind::Message(MessageType::Groupchat) => bounce(&stanza),
            // §8.5.3.2.2: other presence is silently ignored.
            Kind::Presence(_) => Vec::new(),
            // §8.5.3.2.3: iq to an unknown resource.
            Kind::Iq(IqType::Get | IqType::Set) => bounce(&stanza),
            Kind::Message(MessageType::Error) | Kind::Iq(_) => Vec::new(),
        }
    }

    /// RFC 6121 §8.5.2.
    fn deliver_to_bare(&mut self, stanza: Stanza) -> Vec<Effect<H>> {
        match stanza.kind {
            Kind::Message(MessageType::Normal | MessageType::Chat) => {
                // §8.5.2.1.1: the highest-priority non-negative resources.
                let best = self
                    .sessions
                    .iter()
                    .filter(|s| s.available() && s.priority >= 0)
                    .map(|s| s.priority)
                    .max();
                match best {
                    Some(p) => {
                        let to: Vec<H> = self
                            .sessions
                            .iter()
                            .filter(|s| s.available() && s.priority == p)
                            .map(|s| s.handle.clone())
                            .collect();
                        let mut effects = self.received_carbons(&stanza, &to);
                        effects.insert(0, Effect::Deliver(to, stanza));
                        effects
                    }
                    // §8.5.2.2.1: no available resource — store it (XEP-0160).
                    None if worth_storing(&stanza) => vec![Effect::Job(Job::StoreOffline(stanza))],
                    None => Vec::new(),
                }
            }
            Kind::Message(MessageType::Headline) => {
                let to: Vec<H> = self
                    .sessions
                    .iter()
                    .filter(|s| s.available() && s.priority >= 0)
                    .map(|s| s.handle.clone())
                    .collect();
                if to.is_empty() {
                    Vec::new()
                } else {
                    vec![Effect::Deliver(to, stanza)]
                }
            }
            Kind::Message(MessageType::Groupchat) => bounce(&stanza),
            Kind::Message(MessageType::Error) => Vec::new(),
            Kind::Presence(PresenceType::Error | PresenceType::Probe) => Vec::new(),
            // §8.5.2.1.2: presence goes to all available resources.
            Kind::Presence(_) => {
                let to = self.available_handles();
                if to.is_empty() {
                    Vec::new()
                } else {
                    vec![Effect::Deliver(to, stanza)]
                }
            }
            // §8.5.2.1.3: the server answers iqs to the bare JID on the account's behalf.
            Kind::Iq(IqType::Get) => self.account_query(stanza),
            Kind::Iq(IqType::Set) => bounce(&stanza),
            Kind::Iq(_) => Vec::new(),
        }
    }

    /// Queries anyone may send to an account's bare JID.
    fn account_query(&self, iq: Stanza) -> Vec<Effect<H>> {
        let Ok(Some(payload)) = iq.iq_payload() else {
            return reply_error(&iq, StanzaErrorCondition::BadRequest);
        };
        match (payload.ns.as_str(), payload.name.as_str()) {
            (ns::VCARD, "vCard") => vec![Effect::Job(Job::VcardGet {
                request: iq,
                owner: self.bare.clone(),
            })],
            (ns::LAST, "query") => self.last_activity(iq),
            (ns::DISCO_INFO, "query") if payload.get_attr("node").is_none() => {
                let query = Element::new("query", ns::DISCO_INFO)
                    .child(
                        Element::new("identity", ns::DISCO_INFO)
                            .attr("category", "account")
                            .attr("type", "registered"),
                    )
                    .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::DISCO_INFO))
                    .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::VCARD))
                    .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::LAST));
                vec![Effect::Route(iq.iq_result(Some(&query)))]
            }
            (ns::PING, "ping") => vec![Effect::Route(iq.iq_result(None))],
            _ => bounce(&iq),
        }
    }

    /// XEP-0012 §4: only contacts with a subscription to the user's presence may ask;
    /// an online account answers 0, an offline one from storage.
    fn last_activity(&self, iq: Stanza) -> Vec<Effect<H>> {
        let allowed = iq.from.as_ref().is_some_and(|f| {
            f.to_bare() == self.bare
                || self
                    .data
                    .roster
                    .items
                    .get(f.to_bare().as_str())
                    .is_some_and(|i| i.subscription.has_from())
        });
        if !allowed {
            return reply_error(&iq, StanzaErrorCondition::Forbidden);
        }
        if self.sessions.iter().any(SessionEntry::available) {
            let q = Element::new("query", ns::LAST).attr("seconds", "0");
            vec![Effect::Route(iq.iq_result(Some(&q)))]
        } else {
            vec![Effect::Job(Job::LastActivity { request: iq })]
        }
    }

    /// XEP-0280 §6: a copy of a chat message to the user's other carbons-enabled
    /// resources that did not receive it.
    fn received_carbons(&self, stanza: &Stanza, delivered: &[H]) -> Vec<Effect<H>> {
        if !is_carbon_eligible(stanza) {
            return Vec::new();
        }
        let to: Vec<&SessionEntry<H>> = self
            .sessions
            .iter()
            .filter(|s| s.carbons && s.available() && !delivered.contains(&s.handle))
            .collect();
        to.into_iter()
            .map(|s| {
                Effect::Deliver(
                    vec![s.handle.clone()],
                    wrap_carbon("received", stanza, &self.bare, &s.jid),
                )
            })
            .collect()
    }

    /// XEP-0280 §7: a copy of a chat message a resource sent, for the user's other
    /// carbons-enabled resources.
    pub fn sent_carbon(&self, from: &FullJid, stanza: &Stanza) -> Vec<Effect<H>> {
        if !is_carbon_eligible(stanza) {
            return Vec::new();
        }
        self.sessions
            .iter()
            .filter(|s| s.carbons && &s.jid != from)
            .map(|s| {
                Effect::Deliver(
                    vec![s.handle.clone()],
                    wrap_carbon("sent", stanza, &self.bare, &s.jid),
                )
            })
            .collect()
    }

    fn available_handles(&self) -> Vec<H> {
        self.sessions
            .iter()
            .filter(|s| s.available())
            .map(|s| s.handle.clone())
            .collect()
    }
}

fn subscription_op(kind: Kind) -> Option<SubscriptionOp> {
    match kind {
        Kind::Presence(t) => SubscriptionOp::from_presence_type(t),
        _ => None,
    }
}

fn bare_presence(t: PresenceType, from: &BareJid, to: &Jid) -> Stanza {
    let mut p = Stanza::new(Kind::Presence(t));
    p.from = Some(Jid::from(from.clone()));
    p.to = Some(to.to_bare().into());
    p
}

fn subscription_presence(t: PresenceType, from: &str, to: &BareJid, payload: &str) -> Stanza {
    let mut p = Stanza::new(Kind::Presence(t));
    p.from = Jid::new(from).ok();
    p.to = Some(Jid::from(to.clone()));
    p.payload = Bytes::from(payload.to_owned());
    p
}

/// The request with `from` stamped and `to` pointing at the account, so replies built
/// with `error_reply`/`iq_result` come from the account and go to the session.
fn addressed(iq: &Stanza, from: &FullJid) -> Stanza {
    let mut req = iq.clone();
    req.from = Some(Jid::from(from.clone()));
    req
}

/// An iq result to `from`, with no `from` of its own when the request had no `to`
/// (RFC 6120 §8.1.2.1).
fn result_to(iq: &Stanza, from: &FullJid, payload: Option<&Element>) -> Stanza {
    addressed(iq, from).iq_result(payload)
}

fn reply_error<H>(stanza: &Stanza, condition: StanzaErrorCondition) -> Vec<Effect<H>> {
    stanza
        .error_reply(&StanzaError::new(condition))
        .map(Effect::Route)
        .into_iter()
        .collect()
}

/// `<service-unavailable/>` back to the sender (RFC 6121 §8.5.2.2, §8.5.3.2).
fn bounce<H>(stanza: &Stanza) -> Vec<Effect<H>> {
    reply_error(stanza, StanzaErrorCondition::ServiceUnavailable)
}

/// Chat messages with a body (or normal messages) are carbon-copied unless marked
/// private or no-copy (XEP-0280 §6.1, XEP-0334).
fn is_carbon_eligible(stanza: &Stanza) -> bool {
    if stanza.kind != Kind::Message(MessageType::Chat) {
        return false;
    }
    let Ok(els) = stanza.payload_elements() else {
        return false;
    };
    !els.iter()
        .any(|e| e.is("private", ns::CARBONS) || e.is("no-copy", ns::HINTS) || e.ns == ns::CARBONS)
}

/// Messages with content are stored for an offline user; bodiless ones (chat states,
/// receipts) are not (XEP-0160 §3), nor are those the sender marked `<no-store/>`
/// (XEP-0334), unless marked `<store/>`.
fn worth_storing(stanza: &Stanza) -> bool {
    let Ok(els) = stanza.payload_elements() else {
        return false;
    };
    let hinted = |name| els.iter().any(|e| e.is(name, ns::HINTS));
    if hinted("no-store") {
        return false;
    }
    hinted("store")
        || els
            .iter()
            .any(|e| e.is("body", ns::CLIENT) || e.is("subject", ns::CLIENT))
}

fn wrap_carbon(direction: &str, stanza: &Stanza, bare: &BareJid, to: &FullJid) -> Stanza {
    let mut m = Stanza::new(Kind::Message(MessageType::Chat));
    m.from = Some(Jid::from(bare.clone()));
    m.to = Some(Jid::from(to.clone()));
    let inner = stanza.to_xml();
    m.payload = Bytes::from(format!(
        "<{direction} xmlns='{}'><forwarded xmlns='{}'>{}</forwarded></{direction}>",
        ns::CARBONS,
        ns::FORWARD,
        // The forwarded stanza keeps the client namespace explicitly.
        inner.replacen(
            "<message",
            &format!("<message xmlns='{}'", escape(ns::CLIENT)),
            1
        )
    ));
    m
}

#[cfg(test)]
pub(crate) mod tests;
