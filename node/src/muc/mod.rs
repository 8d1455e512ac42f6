//! Multi-user chat rooms (XEP-0045): the core of a room as a plain struct, like the
//! user state: stanzas in, stanzas to route out, no I/O.
//!
//! A room lives at `room@<muc service>` and is hosted by the shard host that owns its
//! bare JID (so, in a cluster, by the node holding that shard). This covers the core
//! flows: entering (instant rooms, created by the first occupant, who becomes owner
//! and moderator), the occupant list, self-presence with status 110 (and 201 on
//! creation), discussion history and the subject on entry, groupchat messages to
//! every occupant, private messages between occupants, presence updates, nick changes
//! (303) and conflicts (`<conflict/>`), and leaving; a room with no occupant left
//! vanishes. Rooms are semi-anonymous: occupants see each other's real JIDs only when
//! they are moderators.

mod listing;
mod record;

pub use listing::answer as list_rooms;
pub use record::after_restart;

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, MessageType, PresenceType, Stanza};
use shoal_xmpp::xml::{Element, Node};

use crate::router::Home;

/// `http://jabber.org/protocol/muc`: the join element.
pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
/// `http://jabber.org/protocol/muc#user`: occupant items and status codes.
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// Groupchat messages kept for new occupants when they ask for no limit (XEP-0045 §7.2.15
/// leaves the number to the service; 20 is what common services send).
const HISTORY: usize = 20;

/// `http://jabber.org/protocol/muc#owner`: room configuration and destruction.
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const NS_DATA: &str = "jabber:x:data";

/// `http://jabber.org/protocol/muc#admin`: role and affiliation changes.
pub const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";

/// A user's long-lived standing in a room (XEP-0045 §5.2), by bare JID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    fn as_str(self) -> &'static str {
        match self {
            Affiliation::Owner => "owner",
            Affiliation::Admin => "admin",
            Affiliation::Member => "member",
            Affiliation::None => "none",
            Affiliation::Outcast => "outcast",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "owner" => Affiliation::Owner,
            "admin" => Affiliation::Admin,
            "member" => Affiliation::Member,
            "none" => Affiliation::None,
            "outcast" => Affiliation::Outcast,
            _ => return None,
        })
    }

    /// The role an occupant with this affiliation gets on entering (§5.1.2).
    fn default_role(self) -> Role {
        match self {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            _ => Role::Participant,
        }
    }
}

/// An occupant's role for this visit (XEP-0045 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Moderator,
    Participant,
    Visitor,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "moderator" => Role::Moderator,
            "participant" => Role::Participant,
            "visitor" => Role::Visitor,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Moderator => "moderator",
            Role::Participant => "participant",
            Role::Visitor => "visitor",
        }
    }
}

/// What a muc#admin item asks for.
enum Change {
    /// A new role for the occupant with this nick; `None` is a kick.
    Role(String, Option<Role>),
    /// A new affiliation for a bare JID.
    Affiliation(BareJid, Affiliation),
}

#[derive(Debug, Clone)]
struct Occupant {
    nick: String,
    jid: FullJid,
    affiliation: Affiliation,
    role: Role,
    /// The occupant's presence payload (show, status, priority …), without the MUC
    /// element it was sent with.
    presence: Bytes,
}

/// A groupchat message kept for the history sent on entry.
#[derive(Debug, Clone)]
struct Past {
    nick: String,
    /// The message payload as sent.
    payload: Bytes,
    id: Option<Box<str>>,
    /// When the room broadcast it (ms since the Unix epoch), for the delay stamp
    /// (XEP-0203) and the `seconds` limit.
    at_ms: u64,
}

/// A room's configuration (XEP-0045 §10.2, form `muc#roomconfig`). New rooms are
/// instant: open, unmoderated, semi-anonymous, temporary, public, no password.
#[derive(Debug, Clone, Default, PartialEq)]
struct RoomConfig {
    name: String,
    description: String,
    persistent: bool,
    hidden: bool,
    members_only: bool,
    moderated: bool,
    /// The password, when the room is password-protected.
    password: Option<String>,
    /// Real JIDs visible to every occupant (`whois = anyone`), not only moderators.
    non_anonymous: bool,
    max_users: Option<usize>,
    /// Participants may change the subject too, not only moderators.
    change_subject: bool,
}

const NS_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
const NS_ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";

impl RoomConfig {
    /// The configuration form (§10.2), with the current values.
    fn form(&self) -> Element {
        let field = |var: &str, kind: &str, label: &str, value: String| {
            Element::new("field", NS_DATA)
                .attr("var", var)
                .attr("type", kind)
                .attr("label", label)
                .child(Element::new("value", NS_DATA).text(value))
        };
        let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
        Element::new("x", NS_DATA)
            .attr("type", "form")
            .child(field("FORM_TYPE", "hidden", "", NS_ROOMCONFIG.to_owned()))
            .child(field(
                "muc#roomconfig_roomname",
                "text-single",
                "Name",
                self.name.clone(),
            ))
            .child(field(
                "muc#roomconfig_roomdesc",
                "text-single",
                "Description",
                self.description.clone(),
            ))
            .child(field(
                "muc#roomconfig_persistentroom",
                "boolean",
                "Persistent",
                flag(self.persistent),
            ))
            .child(field(
                "muc#roomconfig_publicroom",
                "boolean",
                "Listed in the directory",
                flag(!self.hidden),
            ))
            .child(field(
                "muc#roomconfig_membersonly",
                "boolean",
                "Members only",
                flag(self.members_only),
            ))
            .child(field(
                "muc#roomconfig_moderatedroom",
                "boolean",
                "Moderated",
                flag(self.moderated),
            ))
            .child(field(
                "muc#roomconfig_passwordprotectedroom",
                "boolean",
                "Password required",
                flag(self.password.is_some()),
            ))
            .child(field(
                "muc#roomconfig_roomsecret",
                "text-private",
                "Password",
                self.password.clone().unwrap_or_default(),
            ))
            .child(field(
                "muc#roomconfig_whois",
                "list-single",
                "Who may see real JIDs",
                if self.non_anonymous {
                    "anyone"
                } else {
                    "moderators"
                }
                .to_owned(),
            ))
            .child(field(
                "muc#roomconfig_maxusers",
                "list-single",
                "Maximum occupants",
                self.max_users.map_or("none".to_owned(), |n| n.to_string()),
            ))
            .child(field(
                "muc#roomconfig_changesubject",
                "boolean",
                "Participants may change the subject",
                flag(self.change_subject),
            ))
    }

    /// Applies a submitted form; fields not given keep their values (§10.2). An
    /// unusable value is a `<not-acceptable/>`.
    fn submit(&mut self, form: &Element) -> Result<(), StanzaErrorCondition> {
        let mut next = self.clone();
        let mut protected = self.password.is_some();
        let mut secret = self.password.clone();
        for field in form.elements().filter(|e| e.is("field", NS_DATA)) {
            let value = field
                .get_child("value", NS_DATA)
                .map(|v| v.text_content())
                .unwrap_or_default();
            let flag = || match value.as_str() {
                "1" | "true" => Ok(true),
                "0" | "false" => Ok(false),
                _ => Err(StanzaErrorCondition::NotAcceptable),
            };
            match field.get_attr("var").unwrap_or_default() {
                "muc#roomconfig_roomname" => next.name = value.clone(),
                "muc#roomconfig_roomdesc" => next.description = value.clone(),
                "muc#roomconfig_persistentroom" => next.persistent = flag()?,
                "muc#roomconfig_publicroom" => next.hidden = !flag()?,
                "muc#roomconfig_membersonly" => next.members_only = flag()?,
                "muc#roomconfig_moderatedroom" => next.moderated = flag()?,
                "muc#roomconfig_passwordprotectedroom" => protected = flag()?,
                "muc#roomconfig_roomsecret" => secret = Some(value.clone()),
                "muc#roomconfig_whois" => {
                    next.non_anonymous = match value.as_str() {
                        "anyone" => true,
                        "moderators" => false,
                        _ => return Err(StanzaErrorCondition::NotAcceptable),
                    }
                }
                "muc#roomconfig_maxusers" => {
                    next.max_users = match value.as_str() {
                        "" | "none" | "0" => None,
                        n => Some(n.parse().map_err(|_| StanzaErrorCondition::NotAcceptable)?),
                    }
                }
                "muc#roomconfig_changesubject" => next.change_subject = flag()?,
                _ => {}
            }
        }
        next.password = match (protected, secret) {
            (true, Some(s)) if !s.is_empty() => Some(s),
            (true, _) => return Err(StanzaErrorCondition::NotAcceptable),
            (false, _) => None,
        };
        *self = next;
        Ok(())
    }
}

/// One room. Plain data: the shard host calls it and routes what it returns.
#[derive(Debug)]
pub struct Room {
    jid: BareJid,
    config: RoomConfig,
    /// Above this many occupants (0: never), an occupant's arrival, departure and
    /// presence changes are sent only to itself and the moderators: in very large
    /// rooms presence traffic grows with the square of the occupants.
    presence_max: usize,
    occupants: Vec<Occupant>,
    /// Affiliations other than `none`, by bare JID.
    affiliations: HashMap<BareJid, Affiliation>,
    subject: Option<(String, String)>,
    history: VecDeque<Past>,
    /// What changed since the host last took the writes.
    dirty: Dirty,
    /// Nobody has entered yet: the first to enter creates the room (201).
    new: bool,
    /// Created and not yet configured by its owner: nobody else may enter (§10.1.1).
    locked: bool,
    /// Where occupants' sessions are, where known.
    homes: HashMap<FullJid, Home>,
}

/// What of a room changed since its writes were last taken: its state (configuration,
/// affiliations, subject), and the occupants (by real JID) that came, changed or left.
#[derive(Debug, Default)]
struct Dirty {
    state: bool,
    occupants: Vec<FullJid>,
}

impl Room {
    pub fn new(jid: BareJid, presence_max: usize) -> Self {
        Self {
            jid,
            config: RoomConfig::default(),
            presence_max,
            occupants: Vec::new(),
            affiliations: HashMap::new(),
            subject: None,
            history: VecDeque::new(),
            dirty: Dirty::default(),
            new: true,
            locked: false,
            homes: HashMap::new(),
        }
    }

    /// No occupant left in a temporary room: it goes away.
    pub fn can_vanish(&self) -> bool {
        self.occupants.is_empty() && !self.config.persistent
    }

    /// How many occupants the room has.
    pub fn occupant_count(&self) -> usize {
        self.occupants.len()
    }

    /// Nobody has created it yet: nothing of it was stored.
    pub fn is_new(&self) -> bool {
        self.new
    }

    /// Where occupant `jid`'s session is, when known: the room's stanzas for it can
    /// go there directly, not through its account's owner.
    pub fn home(&self, jid: &FullJid) -> Option<&Home> {
        self.homes.get(jid)
    }

    /// Records where `jid`'s session is, if `jid` is an occupant.
    pub fn set_home(&mut self, jid: &FullJid, home: Home) {
        if self.position(jid).is_some() {
            self.homes.insert(jid.clone(), home);
        }
    }

    /// The occupant with this real JID came, changed or left.
    fn touch(&mut self, jid: &FullJid) {
        if !self.dirty.occupants.contains(jid) {
            self.dirty.occupants.push(jid.clone());
        }
    }

    /// Handles a stanza addressed to the room or to an occupant's room JID, at `now_ms`
    /// (ms since the Unix epoch). Returns what to route.
    pub fn handle(&mut self, stanza: Stanza, now_ms: u64) -> Vec<Stanza> {
        let Some(from) = stanza.from.clone().and_then(|f| f.try_into_full().ok()) else {
            return Vec::new();
        };
        let nick = stanza
            .to
            .as_ref()
            .and_then(|t| t.resource())
            .map(|r| r.as_str().to_owned());
        // A room nobody created exists only for the presence that creates it.
        if self.new
            && !matches!(
                (stanza.kind, &nick),
                (Kind::Presence(PresenceType::Available), Some(_))
            )
        {
            return match stanza.kind {
                Kind::Presence(_) => Vec::new(),
                _ => refuse(&stanza, StanzaErrorCondition::ItemNotFound),
            };
        }
        match (stanza.kind, nick) {
            (Kind::Presence(PresenceType::Available), Some(nick)) => {
                self.presence(from, nick, stanza, now_ms)
            }
            (Kind::Presence(PresenceType::Unavailable), Some(_)) => self.leave(&from, &stanza),
            (Kind::Presence(PresenceType::Error), _) => self.leave_quietly(&from),
            (Kind::Presence(_), _) => Vec::new(),
            (Kind::Message(MessageType::Groupchat), None) => self.groupchat(&from, stanza, now_ms),
            (Kind::Message(MessageType::Error), _) => self.leave_quietly(&from),
            (Kind::Message(MessageType::Groupchat), Some(_)) => {
                refuse(&stanza, StanzaErrorCondition::BadRequest)
            }
            (Kind::Message(_), Some(nick)) => self.private(&from, &nick, stanza),
            (Kind::Message(_), None) => self.invite(&from, stanza),
            (Kind::Iq(IqType::Get | IqType::Set), None) => match stanza.iq_payload() {
                Ok(Some(q)) if q.is("query", NS_MUC_OWNER) => self.owner(&from, &stanza, &q),
                Ok(Some(q))
                    if q.is("query", NS_MUC_ADMIN) && stanza.kind == Kind::Iq(IqType::Get) =>
                {
                    self.admin_list(&from, &stanza, &q)
                }
                _ if stanza.kind == Kind::Iq(IqType::Get) => self.iq(&stanza),
                _ => self.admin(&from, &stanza),
            },
            (Kind::Iq(IqType::Get), Some(nick)) => self.self_ping(&from, &nick, &stanza),
            (Kind::Iq(IqType::Set), _) => {
                refuse(&stanza, StanzaErrorCondition::FeatureNotImplemented)
            }
            (Kind::Iq(_), _) => Vec::new(),
        }
    }

    /// The room's name: the configured one, else its JID's local part.
    fn name(&self) -> &str {
        match self.config.name.as_str() {
            "" => self.jid.node().map_or("", |n| n.as_str()),
            name => name,
        }
    }

    fn position(&self, jid: &FullJid) -> Option<usize> {
        self.occupants.iter().position(|o| &o.jid == jid)
    }

    fn room_jid(&self, nick: &str) -> Option<Jid> {
        self.jid.with_resource_str(nick).ok().map(Jid::from)
    }

    /// Available presence to `room/nick`: entering, a nick change, or a presence
    /// update (XEP-0045 §7.2, §7.6, §7.7).
    fn presence(
        &mut self,
        from: FullJid,
        nick: String,
        stanza: Stanza,
        now_ms: u64,
    ) -> Vec<Stanza> {
        let payload = without_muc_elements(&stanza);
        let taken = self
            .occupants
            .iter()
            .any(|o| o.nick == nick && o.jid != from);
        match self.position(&from) {
            _ if taken => refuse(&stanza, StanzaErrorCondition::Conflict),
            Some(i) if self.occupants[i].nick == nick => {
                self.occupants[i].presence = payload;
                self.touch(&from);
                let occupant = self.occupants[i].clone();
                self.broadcast_presence(&occupant, &[])
            }
            Some(i) => self.change_nick(i, nick, payload),
            None => self.enter(from, nick, payload, &stanza, now_ms),
        }
    }

    fn enter(
        &mut self,
        from: FullJid,
        nick: String,
        payload: Bytes,
        join: &Stanza,
        now_ms: u64,
    ) -> Vec<Stanza> {
        let created = std::mem::take(&mut self.new);
        if created {
            self.affiliations.insert(from.to_bare(), Affiliation::Owner);
            self.locked = true;
            self.dirty.state = true;
        }
        let affiliation = self.affiliation(&from.to_bare());
        if let Err(condition) = self.admission(affiliation, join) {
            return refuse(join, condition);
        }
        let role = match affiliation.default_role() {
            // §7.2.1: newcomers to a moderated room have no voice.
            Role::Participant if self.config.moderated && affiliation == Affiliation::None => {
                Role::Visitor
            }
            role => role,
        };
        let occupant = Occupant {
            nick,
            jid: from.clone(),
            affiliation,
            role,
            presence: payload,
        };
        // §7.2.3: first the others' presence, then the others learn of the newcomer,
        // then its own presence (110, and 201 for a new room), history, subject.
        let mut out: Vec<Stanza> = self
            .occupants
            .iter()
            .map(|o| self.presence_of(o, &occupant, &[]))
            .collect();
        self.occupants.push(occupant.clone());
        self.touch(&from);
        // §7.2.3: 100 tells a newcomer that every occupant sees its real JID.
        let own: &[&str] = match (created, self.config.non_anonymous) {
            (true, true) => &["100", "110", "201"],
            (true, false) => &["110", "201"],
            (false, true) => &["100", "110"],
            (false, false) => &["110"],
        };
        out.extend(self.broadcast_presence(&occupant, own));
        out.extend(self.history_for(&from, join, now_ms));
        out.push(self.subject_for(&from));
        out
    }

    /// Whether a user with `affiliation` may enter with `join` (§7.2.7 banned, §7.2.6
    /// members only, §7.2.5 password, §7.2.10 full).
    fn admission(
        &self,
        affiliation: Affiliation,
        join: &Stanza,
    ) -> Result<(), StanzaErrorCondition> {
        if affiliation == Affiliation::Outcast {
            return Err(StanzaErrorCondition::Forbidden);
        }
        // §10.1.1: a new room waits for its owner's configuration.
        if self.locked && affiliation != Affiliation::Owner {
            return Err(StanzaErrorCondition::ItemNotFound);
        }
        if self.config.members_only && affiliation < Affiliation::Member {
            return Err(StanzaErrorCondition::RegistrationRequired);
        }
        if let Some(password) = &self.config.password {
            let given = join
                .payload_elements()
                .ok()
                .and_then(|es| es.into_iter().find(|e| e.is("x", NS_MUC)))
                .and_then(|x| x.get_child("password", NS_MUC).map(Element::text_content));
            if given.as_deref() != Some(password.as_str()) {
                return Err(StanzaErrorCondition::NotAuthorized);
            }
        }
        if self
            .config
            .max_users
            .is_some_and(|max| self.occupants.len() >= max)
            && affiliation < Affiliation::Admin
        {
            return Err(StanzaErrorCondition::ServiceUnavailable);
        }
        Ok(())
    }

    /// Whether `to` is told of `about`'s presence: always below the room's presence
    /// limit, else only itself and the moderators.
    fn hears_presence(&self, to: &Occupant, about: &Occupant) -> bool {
        self.presence_max == 0
            || self.occupants.len() <= self.presence_max
            || to.jid == about.jid
            || to.role == Role::Moderator
    }

    /// Whether `to` sees occupants' real JIDs.
    fn sees_jids(&self, to: &Occupant) -> bool {
        self.config.non_anonymous || to.role == Role::Moderator
    }

    fn change_nick(&mut self, i: usize, nick: String, payload: Bytes) -> Vec<Stanza> {
        // §7.6: unavailable from the old nick with the new one and status 303, then
        // available from the new nick.
        let old = self.occupants[i].clone();
        let mut out = Vec::new();
        for o in &self.occupants {
            let mut codes = vec!["303"];
            if o.jid == old.jid {
                codes.push("110");
            }
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = self.room_jid(&old.nick);
            p.to = Some(Jid::from(o.jid.clone()));
            let x = user_x(
                &old,
                old.role.as_str(),
                self.sees_jids(o),
                Some(&nick),
                &codes,
            );
            p.payload = Bytes::from(x);
            out.push(p);
        }
        self.occupants[i].nick = nick;
        self.occupants[i].presence = payload;
        self.touch(&old.jid);
        let occupant = self.occupants[i].clone();
        out.extend(self.broadcast_presence(&occupant, &[]));
        out
    }

    /// Unavailable presence from an occupant: it leaves (§7.14).
    fn leave(&mut self, from: &FullJid, stanza: &Stanza) -> Vec<Stanza> {
        let Some(i) = self.position(from) else {
            return Vec::new();
        };
        let gone = self.occupants.remove(i);
        self.touch(from);
        self.homes.remove(from);
        let status = stanza.status();
        let mut out = Vec::new();
        let told = self.occupants.iter().filter(|o| {
            self.presence_max == 0
                || self.occupants.len() < self.presence_max
                || o.role == Role::Moderator
        });
        for o in told.chain(std::iter::once(&gone)) {
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = self.room_jid(&gone.nick);
            p.to = Some(Jid::from(o.jid.clone()));
            let codes: &[&str] = if o.jid == gone.jid { &["110"] } else { &[] };
            let mut payload = status
                .as_ref()
                .map(|s| {
                    Element::new("status", ns::CLIENT)
                        .text(s.clone())
                        .to_xml(ns::CLIENT)
                })
                .unwrap_or_default();
            payload.push_str(&user_x(&gone, "none", self.sees_jids(o), None, codes));
            p.payload = Bytes::from(payload);
            out.push(p);
        }
        out
    }

    /// An occupant whose client answered with an error is gone (§7.2: a service may
    /// remove it); nobody else is told anything more than that it left.
    fn leave_quietly(&mut self, from: &FullJid) -> Vec<Stanza> {
        let unavailable = Stanza::new(Kind::Presence(PresenceType::Unavailable));
        self.leave(from, &unavailable)
    }

    /// A groupchat message from an occupant, to every occupant (§7.4).
    fn groupchat(&mut self, from: &FullJid, stanza: Stanza, now_ms: u64) -> Vec<Stanza> {
        let Some(i) = self.position(from) else {
            return refuse(&stanza, StanzaErrorCondition::NotAcceptable);
        };
        if self.occupants[i].role == Role::Visitor {
            // §7.4: no voice.
            return refuse(&stanza, StanzaErrorCondition::Forbidden);
        }
        let nick = self.occupants[i].nick.clone();
        if let Ok(elements) = stanza.payload_elements()
            && let Some(subject) = elements.iter().find(|e| e.is("subject", ns::CLIENT))
        {
            // §8.1: moderators change the subject, participants only if allowed.
            if self.occupants[i].role != Role::Moderator && !self.config.change_subject {
                return refuse(&stanza, StanzaErrorCondition::Forbidden);
            }
            self.subject = Some((nick.clone(), subject.text_content()));
            self.dirty.state = true;
        }
        let mut template = stanza.clone();
        template.from = self.room_jid(&nick);
        let out = self
            .occupants
            .iter()
            .map(|o| {
                let mut m = template.clone();
                m.to = Some(Jid::from(o.jid.clone()));
                m
            })
            .collect();
        if has_body(&stanza) {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(Past {
                nick,
                payload: stanza.payload.clone(),
                id: stanza.id.clone(),
                at_ms: now_ms,
            });
        }
        out
    }

    /// A private message from one occupant to another (§7.5).
    fn private(&self, from: &FullJid, to_nick: &str, stanza: Stanza) -> Vec<Stanza> {
        let Some(sender) = self.position(from).map(|i| &self.occupants[i]) else {
            return refuse(&stanza, StanzaErrorCondition::NotAcceptable);
        };
        let Some(target) = self.occupants.iter().find(|o| o.nick == to_nick) else {
            return refuse(&stanza, StanzaErrorCondition::ItemNotFound);
        };
        let mut m = stanza.clone();
        m.from = self.room_jid(&sender.nick);
        m.to = Some(Jid::from(target.jid.clone()));
        let mut payload = String::from_utf8_lossy(&stanza.payload).into_owned();
        payload.push_str(&Element::new("x", NS_MUC_USER).to_xml(ns::CLIENT));
        m.payload = Bytes::from(payload);
        vec![m]
    }

    fn affiliation(&self, jid: &BareJid) -> Affiliation {
        self.affiliations
            .get(jid)
            .copied()
            .unwrap_or(Affiliation::None)
    }

    /// A muc#admin request (§8: kick, voice; §9: ban, membership, admins, owners).
    fn admin(&mut self, from: &FullJid, iq: &Stanza) -> Vec<Stanza> {
        let Some(actor) = self.position(from).map(|i| self.occupants[i].clone()) else {
            return refuse(iq, StanzaErrorCondition::Forbidden);
        };
        let Ok(Some(query)) = iq.iq_payload() else {
            return refuse(iq, StanzaErrorCondition::BadRequest);
        };
        if !query.is("query", NS_MUC_ADMIN) {
            return refuse(iq, StanzaErrorCondition::FeatureNotImplemented);
        }
        let mut changes = Vec::new();
        for item in query.elements().filter(|e| e.is("item", NS_MUC_ADMIN)) {
            let change = match (
                item.get_attr("nick"),
                item.get_attr("role"),
                item.get_attr("jid"),
                item.get_attr("affiliation"),
            ) {
                (Some(nick), Some(role), _, None) => Change::Role(
                    nick.to_owned(),
                    match (role, Role::parse(role)) {
                        ("none", _) => None,
                        (_, Some(role)) => Some(role),
                        _ => return refuse(iq, StanzaErrorCondition::BadRequest),
                    },
                ),
                (_, None, Some(jid), Some(aff)) => {
                    match (jid.parse::<BareJid>(), Affiliation::parse(aff)) {
                        (Ok(jid), Some(aff)) => Change::Affiliation(jid, aff),
                        _ => return refuse(iq, StanzaErrorCondition::BadRequest),
                    }
                }
                _ => return refuse(iq, StanzaErrorCondition::BadRequest),
            };
            let reason = item
                .get_child("reason", NS_MUC_ADMIN)
                .map(|r| r.text_content());
            if let Err(condition) = self.allowed(&actor, &change) {
                return refuse(iq, condition);
            }
            changes.push((change, reason));
        }
        let mut out = vec![iq.iq_result(None)];
        for (change, reason) in changes {
            out.extend(self.apply_change(&actor, change, reason.as_deref()));
        }
        out
    }

    /// A muc#admin list (one item naming an affiliation or a role): members (§9.5),
    /// outcasts (the ban list, §9.2), admins (§10.8) and owners (§10.5) by bare
    /// JID; participants (the voice list, §8.5) and moderators (§9.8) by nick.
    fn admin_list(&self, from: &FullJid, iq: &Stanza, query: &Element) -> Vec<Stanza> {
        let mut items = query.elements().filter(|e| e.is("item", NS_MUC_ADMIN));
        let (Some(item), None) = (items.next(), items.next()) else {
            return refuse(iq, StanzaErrorCondition::BadRequest);
        };
        let actor_aff = self.affiliation(&from.to_bare());
        let actor_role = self.position(from).map(|i| self.occupants[i].role);
        let mut answer = Element::new("query", NS_MUC_ADMIN);
        match (item.get_attr("affiliation"), item.get_attr("role")) {
            (Some(aff), None) => {
                let Some(aff) = Affiliation::parse(aff).filter(|a| *a != Affiliation::None) else {
                    return refuse(iq, StanzaErrorCondition::BadRequest);
                };
                let needs = match aff {
                    Affiliation::Owner | Affiliation::Admin => Affiliation::Owner,
                    _ => Affiliation::Admin,
                };
                if actor_aff < needs {
                    return refuse(iq, StanzaErrorCondition::Forbidden);
                }
                let mut listed: Vec<&BareJid> = self
                    .affiliations
                    .iter()
                    .filter(|(_, a)| **a == aff)
                    .map(|(jid, _)| jid)
                    .collect();
                listed.sort_by_key(|jid| jid.as_str());
                for jid in listed {
                    answer = answer.child(
                        Element::new("item", NS_MUC_ADMIN)
                            .attr("affiliation", aff.as_str())
                            .attr("jid", jid.as_str()),
                    );
                }
            }
            (None, Some(role @ ("participant" | "moderator"))) => {
                let allowed = match role {
                    "participant" => actor_role == Some(Role::Moderator),
                    _ => actor_aff >= Affiliation::Admin,
                };
                if !allowed {
                    return refuse(iq, StanzaErrorCondition::Forbidden);
                }
                for o in self.occupants.iter().filter(|o| o.role.as_str() == role) {
                    answer = answer.child(
                        Element::new("item", NS_MUC_ADMIN)
                            .attr("affiliation", o.affiliation.as_str())
                            .attr("jid", o.jid.as_str())
                            .attr("nick", o.nick.clone())
                            .attr("role", role),
                    );
                }
            }
            _ => return refuse(iq, StanzaErrorCondition::BadRequest),
        }
        vec![iq.iq_result(Some(&answer))]
    }

    /// Whether `actor` may make `change` (§8, §9, and the table of §5.2.1).
    fn allowed(&self, actor: &Occupant, change: &Change) -> Result<(), StanzaErrorCondition> {
        let actor_aff = actor.affiliation;
        match change {
            Change::Role(nick, role) => {
                let target = self
                    .occupants
                    .iter()
                    .find(|o| &o.nick == nick)
                    .ok_or(StanzaErrorCondition::ItemNotFound)?;
                if actor.role != Role::Moderator {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                // Admins and owners cannot be kicked or silenced (§8.2); moderator
                // status is given and taken by admins and owners (§9.6).
                let touches_moderators =
                    *role == Some(Role::Moderator) || target.role == Role::Moderator;
                if target.affiliation >= Affiliation::Admin && *role != Some(Role::Moderator)
                    || touches_moderators && actor_aff < Affiliation::Admin
                {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                Ok(())
            }
            Change::Affiliation(jid, aff) => {
                let current = self.affiliation(jid);
                let needs = if *aff >= Affiliation::Admin || current >= Affiliation::Admin {
                    Affiliation::Owner
                } else {
                    Affiliation::Admin
                };
                if actor_aff < needs {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                // §10.4: a room keeps at least one owner.
                let owners = self
                    .affiliations
                    .values()
                    .filter(|a| **a == Affiliation::Owner)
                    .count();
                if current == Affiliation::Owner && *aff != Affiliation::Owner && owners == 1 {
                    return Err(StanzaErrorCondition::Conflict);
                }
                Ok(())
            }
        }
    }

    fn apply_change(
        &mut self,
        actor: &Occupant,
        change: Change,
        reason: Option<&str>,
    ) -> Vec<Stanza> {
        match change {
            Change::Role(nick, None) => self.remove_occupant(&nick, actor, reason, "307"),
            Change::Role(nick, Some(role)) => {
                let Some(i) = self.occupants.iter().position(|o| o.nick == nick) else {
                    return Vec::new();
                };
                self.occupants[i].role = role;
                let occupant = self.occupants[i].clone();
                self.touch(&occupant.jid);
                self.broadcast_presence(&occupant, &[])
            }
            Change::Affiliation(jid, aff) => {
                if aff == Affiliation::None {
                    self.affiliations.remove(&jid);
                } else {
                    self.affiliations.insert(jid.clone(), aff);
                }
                self.dirty.state = true;
                let present: Vec<String> = self
                    .occupants
                    .iter()
                    .filter(|o| o.jid.to_bare() == jid)
                    .map(|o| o.nick.clone())
                    .collect();
                let mut out = Vec::new();
                for nick in present {
                    if aff == Affiliation::Outcast {
                        out.extend(self.remove_occupant(&nick, actor, reason, "301"));
                        continue;
                    }
                    if let Some(o) = self.occupants.iter_mut().find(|o| o.nick == nick) {
                        o.affiliation = aff;
                        o.role = aff.default_role();
                    }
                    if let Some(o) = self.occupants.iter().find(|o| o.nick == nick).cloned() {
                        self.touch(&o.jid);
                        out.extend(self.broadcast_presence(&o, &[]));
                    }
                }
                out
            }
        }
    }

    /// Removes the occupant `nick` (kicked: 307, banned: 301), telling everyone, with
    /// the actor and reason (§8.2, §9.1).
    fn remove_occupant(
        &mut self,
        nick: &str,
        actor: &Occupant,
        reason: Option<&str>,
        code: &str,
    ) -> Vec<Stanza> {
        let Some(i) = self.occupants.iter().position(|o| o.nick == nick) else {
            return Vec::new();
        };
        let gone = self.occupants.remove(i);
        self.touch(&gone.jid);
        self.homes.remove(&gone.jid);
        let mut out = Vec::new();
        for o in self.occupants.iter().chain(std::iter::once(&gone)) {
            let mut item = Element::new("item", NS_MUC_USER)
                .attr(
                    "affiliation",
                    self.affiliation(&gone.jid.to_bare()).as_str(),
                )
                .attr("role", "none");
            if self.sees_jids(o) {
                item = item.attr("jid", gone.jid.as_str());
            }
            item = item.child(Element::new("actor", NS_MUC_USER).attr("nick", actor.nick.clone()));
            if let Some(reason) = reason {
                item = item.child(Element::new("reason", NS_MUC_USER).text(reason));
            }
            let mut x = Element::new("x", NS_MUC_USER)
                .child(item)
                .child(Element::new("status", NS_MUC_USER).attr("code", code));
            if o.jid == gone.jid {
                x = x.child(Element::new("status", NS_MUC_USER).attr("code", "110"));
            }
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = self.room_jid(&gone.nick);
            p.to = Some(Jid::from(o.jid.clone()));
            p.payload = Bytes::from(x.to_xml(ns::CLIENT));
            out.push(p);
        }
        out
    }

    /// XEP-0410: an occupant pinging its own room JID learns whether it is still in
    /// the room; pings to other occupants are not passed on (yet).
    fn self_ping(&self, from: &FullJid, nick: &str, iq: &Stanza) -> Vec<Stanza> {
        let occupant = self.position(from).map(|i| &self.occupants[i]);
        match occupant {
            None => refuse(iq, StanzaErrorCondition::NotAcceptable),
            Some(o) if o.nick == nick && is_ping(iq) => vec![iq.iq_result(None)],
            Some(_) => refuse(iq, StanzaErrorCondition::FeatureNotImplemented),
        }
    }

    /// A mediated invitation (§7.8.2): an occupant asks the room to invite someone;
    /// the room sends the invitation from itself, naming the inviter.
    fn invite(&self, from: &FullJid, stanza: Stanza) -> Vec<Stanza> {
        let invite = stanza
            .payload_elements()
            .ok()
            .and_then(|es| es.into_iter().find(|e| e.is("x", NS_MUC_USER)))
            .and_then(|x| x.get_child("invite", NS_MUC_USER).cloned());
        let Some(invite) = invite else {
            return refuse(&stanza, StanzaErrorCondition::BadRequest);
        };
        if self.position(from).is_none() {
            return refuse(&stanza, StanzaErrorCondition::Forbidden);
        }
        let Some(to) = invite.get_attr("to").and_then(|t| t.parse::<Jid>().ok()) else {
            return refuse(&stanza, StanzaErrorCondition::JidMalformed);
        };
        let mut forwarded = Element::new("invite", NS_MUC_USER).attr("from", from.as_str());
        if let Some(reason) = invite.get_child("reason", NS_MUC_USER) {
            forwarded =
                forwarded.child(Element::new("reason", NS_MUC_USER).text(reason.text_content()));
        }
        let mut m = Stanza::new(Kind::Message(MessageType::Normal));
        m.from = Some(Jid::from(self.jid.clone()));
        m.to = Some(to);
        m.payload = Bytes::from(
            Element::new("x", NS_MUC_USER)
                .child(forwarded)
                .to_xml(ns::CLIENT),
        );
        vec![m]
    }

    /// The owner's requests (§10): accepting the instant room's default
    /// configuration, and destroying the room (§10.9).
    fn owner(&mut self, from: &FullJid, iq: &Stanza, query: &Element) -> Vec<Stanza> {
        if self.affiliation(&from.to_bare()) != Affiliation::Owner {
            return refuse(iq, StanzaErrorCondition::Forbidden);
        }
        if let Some(destroy) = query.get_child("destroy", NS_MUC_OWNER) {
            return self.destroy(iq, destroy);
        }
        let form = query.get_child("x", NS_DATA);
        match (iq.kind, form.and_then(|x| x.get_attr("type"))) {
            // §10.2: the configuration form.
            (Kind::Iq(IqType::Get), _) => {
                let answer = Element::new("query", NS_MUC_OWNER).child(self.config.form());
                vec![iq.iq_result(Some(&answer))]
            }
            // §10.1.2 (an empty form: the instant room) and §10.2: the new values;
            // occupants are told the configuration changed (104).
            (_, Some("submit")) => {
                let before = self.config.clone();
                if let Err(condition) = self.config.submit(form.expect("typed form")) {
                    return refuse(iq, condition);
                }
                // §10.1.2, §10.1.3: the instant room accepted or the room configured;
                // others may enter now.
                if std::mem::take(&mut self.locked) {
                    self.dirty.state = true;
                }
                let mut out = vec![iq.iq_result(None)];
                if self.config != before {
                    self.dirty.state = true;
                    out.extend(self.occupants.iter().map(|o| {
                        let mut m = Stanza::new(Kind::Message(MessageType::Groupchat));
                        m.from = Some(Jid::from(self.jid.clone()));
                        m.to = Some(Jid::from(o.jid.clone()));
                        m.payload = Bytes::from(
                            Element::new("x", NS_MUC_USER)
                                .child(Element::new("status", NS_MUC_USER).attr("code", "104"))
                                .to_xml(ns::CLIENT),
                        );
                        m
                    }));
                }
                out
            }
            // §10.1.3: an owner cancelling a new room's configuration does not want it.
            (_, Some("cancel")) if self.locked => {
                self.destroy(iq, &Element::new("destroy", NS_MUC_OWNER))
            }
            (_, Some("cancel")) => vec![iq.iq_result(None)],
            _ => refuse(iq, StanzaErrorCondition::BadRequest),
        }
    }

    /// Every occupant leaves with the `<destroy/>` element (alternate venue and reason
    /// as the owner gave them); the host drops the empty room.
    fn destroy(&mut self, iq: &Stanza, destroy: &Element) -> Vec<Stanza> {
        let mut notice = Element::new("destroy", NS_MUC_USER);
        if let Some(venue) = destroy.get_attr("jid") {
            notice = notice.attr("jid", venue);
        }
        if let Some(reason) = destroy.get_child("reason", NS_MUC_OWNER) {
            notice = notice.child(Element::new("reason", NS_MUC_USER).text(reason.text_content()));
        }
        let mut out = vec![iq.iq_result(None)];
        for o in std::mem::take(&mut self.occupants) {
            let x = Element::new("x", NS_MUC_USER)
                .child(
                    Element::new("item", NS_MUC_USER)
                        .attr("affiliation", "none")
                        .attr("role", "none"),
                )
                .child(notice.clone());
            let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
            p.from = self.room_jid(&o.nick);
            p.to = Some(Jid::from(o.jid));
            p.payload = Bytes::from(x.to_xml(ns::CLIENT));
            out.push(p);
        }
        // Gone for good, even when persistent: the host drops it and its record.
        self.affiliations.clear();
        self.homes.clear();
        self.config.persistent = false;
        out
    }

    /// Service discovery on the room (XEP-0045 §6.4).
    fn iq(&self, iq: &Stanza) -> Vec<Stanza> {
        match iq.iq_payload() {
            Ok(Some(q)) if q.is("query", ns::DISCO_INFO) => {
                let mut info = Element::new("query", ns::DISCO_INFO).child(
                    Element::new("identity", ns::DISCO_INFO)
                        .attr("category", "conference")
                        .attr("type", "text")
                        .attr("name", self.name()),
                );
                let c = &self.config;
                for feature in [
                    NS_MUC,
                    if c.hidden { "muc_hidden" } else { "muc_public" },
                    if c.members_only {
                        "muc_membersonly"
                    } else {
                        "muc_open"
                    },
                    if c.moderated {
                        "muc_moderated"
                    } else {
                        "muc_unmoderated"
                    },
                    if c.non_anonymous {
                        "muc_nonanonymous"
                    } else {
                        "muc_semianonymous"
                    },
                    if c.persistent {
                        "muc_persistent"
                    } else {
                        "muc_temporary"
                    },
                    if c.password.is_some() {
                        "muc_passwordprotected"
                    } else {
                        "muc_unsecured"
                    },
                ] {
                    info = info.child(Element::new("feature", ns::DISCO_INFO).attr("var", feature));
                }
                vec![iq.iq_result(Some(&info.child(self.info_form())))]
            }
            _ => refuse(iq, StanzaErrorCondition::FeatureNotImplemented),
        }
    }

    /// The room information form (§6.4, XEP-0128 `muc#roominfo`) of its disco#info.
    fn info_form(&self) -> Element {
        let field = |var: &str, label: &str, value: String| {
            Element::new("field", NS_DATA)
                .attr("var", var)
                .attr("label", label)
                .child(Element::new("value", NS_DATA).text(value))
        };
        let form_type = Element::new("field", NS_DATA)
            .attr("var", "FORM_TYPE")
            .attr("type", "hidden")
            .child(Element::new("value", NS_DATA).text(NS_ROOMINFO));
        let subject = self.subject.as_ref().map(|(_, s)| s.clone());
        Element::new("x", NS_DATA)
            .attr("type", "result")
            .child(form_type)
            .child(field(
                "muc#roominfo_description",
                "Description",
                self.config.description.clone(),
            ))
            .child(field(
                "muc#roominfo_occupants",
                "Number of occupants",
                self.occupants.len().to_string(),
            ))
            .child(field(
                "muc#roominfo_subject",
                "Current subject",
                subject.unwrap_or_default(),
            ))
            .child(field(
                "muc#roomconfig_changesubject",
                "Occupants may change the subject",
                if self.config.change_subject { "1" } else { "0" }.to_owned(),
            ))
    }

    /// `occupant`'s presence as `to` sees it, with `codes`.
    fn presence_of(&self, occupant: &Occupant, to: &Occupant, codes: &[&str]) -> Stanza {
        let mut p = Stanza::new(Kind::Presence(PresenceType::Available));
        p.from = self.room_jid(&occupant.nick);
        p.to = Some(Jid::from(to.jid.clone()));
        let mut payload = String::from_utf8_lossy(&occupant.presence).into_owned();
        let moderator_view = self.sees_jids(to);
        payload.push_str(&user_x(
            occupant,
            occupant.role.as_str(),
            moderator_view,
            None,
            codes,
        ));
        p.payload = Bytes::from(payload);
        p
    }

    /// `occupant`'s presence to every occupant; it sees its own with `own_codes`. The
    /// others see one of two stanzas (with the real JID or without), each built once.
    fn broadcast_presence(&self, occupant: &Occupant, own_codes: &[&str]) -> Vec<Stanza> {
        let mut seen: [Option<Stanza>; 2] = [None, None];
        self.occupants
            .iter()
            .filter(|o| self.hears_presence(o, occupant))
            .map(|o| {
                if o.jid == occupant.jid {
                    let own: &[&str] = match own_codes {
                        [] => &["110"],
                        codes => codes,
                    };
                    return self.presence_of(occupant, o, own);
                }
                let view = &mut seen[usize::from(self.sees_jids(o))];
                let mut p = view
                    .get_or_insert_with(|| self.presence_of(occupant, o, &[]))
                    .clone();
                p.to = Some(Jid::from(o.jid.clone()));
                p
            })
            .collect()
    }

    /// The discussion history for a newcomer, within the limits of its join request
    /// (§7.2.15: `maxstanzas`, `maxchars`, `seconds`, `since`; `maxchars='0'` and
    /// `seconds='0'` ask for none).
    fn history_for(&self, to: &FullJid, join: &Stanza, now_ms: u64) -> Vec<Stanza> {
        let limits = join
            .payload_elements()
            .ok()
            .and_then(|es| es.into_iter().find(|e| e.is("x", NS_MUC)))
            .and_then(|x| x.get_child("history", NS_MUC).cloned());
        let attr = |name: &str| {
            limits
                .as_ref()
                .and_then(|h| h.get_attr(name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let max = attr("maxstanzas").map_or(HISTORY, |n| n as usize);
        let since = limits
            .as_ref()
            .and_then(|h| h.get_attr("since"))
            .and_then(parse_timestamp_ms);
        let oldest = [
            attr("seconds").map(|s| now_ms.saturating_sub(s * 1000)),
            since,
        ]
        .into_iter()
        .flatten()
        .max();
        let mut chars_left = attr("maxchars");
        // Newest first while the limits allow, then sent oldest first.
        let mut out: Vec<Stanza> = Vec::new();
        for past in self.history.iter().rev() {
            if out.len() >= max || oldest.is_some_and(|t| past.at_ms < t) {
                break;
            }
            let m = self.replay(past, to);
            if let Some(left) = chars_left.as_mut() {
                // §7.2.15: maxchars counts the characters of the whole XML stanzas.
                let len = m.to_xml().chars().count() as u64;
                if len > *left {
                    break;
                }
                *left -= len;
            }
            out.push(m);
        }
        out.reverse();
        out
    }

    /// A past groupchat message as a newcomer gets it, with its delay stamp.
    fn replay(&self, past: &Past, to: &FullJid) -> Stanza {
        let mut m = Stanza::new(Kind::Message(MessageType::Groupchat));
        m.from = self.room_jid(&past.nick);
        m.to = Some(Jid::from(to.clone()));
        m.id = past.id.clone();
        let mut payload = String::from_utf8_lossy(&past.payload).into_owned();
        payload.push_str(
            &Element::new("delay", ns::DELAY)
                .attr("from", self.jid.as_str())
                .attr("stamp", crate::jobs::format_timestamp(past.at_ms))
                .to_xml(ns::CLIENT),
        );
        m.payload = Bytes::from(payload);
        m
    }

    /// The subject message every newcomer gets last, empty when none was set (§7.2.15).
    fn subject_for(&self, to: &FullJid) -> Stanza {
        let mut m = Stanza::new(Kind::Message(MessageType::Groupchat));
        m.to = Some(Jid::from(to.clone()));
        let subject = Element::new("subject", ns::CLIENT);
        match &self.subject {
            Some((nick, text)) => {
                m.from = self.room_jid(nick);
                m.payload = Bytes::from(subject.text(text.clone()).to_xml(ns::CLIENT));
            }
            None => {
                m.from = Some(Jid::from(self.jid.clone()));
                m.payload = Bytes::from(subject.to_xml(ns::CLIENT));
            }
        }
        m
    }
}

/// What the service itself answers at once (XEP-0045 §6.1): disco#info with the
/// conference identity, and errors for anything but disco#items (the directory, read
/// from storage: [`is_room_listing`], [`list_rooms`]) that asks for an answer.
pub fn service_iq(stanza: &Stanza) -> Option<Stanza> {
    if !matches!(stanza.kind, Kind::Iq(IqType::Get | IqType::Set)) {
        return None;
    }
    match stanza.iq_payload() {
        Ok(Some(q)) if stanza.kind == Kind::Iq(IqType::Get) && q.is("query", ns::DISCO_INFO) => {
            let mut info = Element::new("query", ns::DISCO_INFO).child(
                Element::new("identity", ns::DISCO_INFO)
                    .attr("category", "conference")
                    .attr("type", "text")
                    .attr("name", "Chatrooms"),
            );
            for feature in [ns::DISCO_INFO, ns::DISCO_ITEMS, NS_MUC, listing::NS_RSM] {
                info = info.child(Element::new("feature", ns::DISCO_INFO).attr("var", feature));
            }
            Some(stanza.iq_result(Some(&info)))
        }
        _ => stanza.error_reply(&StanzaError::new(
            StanzaErrorCondition::FeatureNotImplemented,
        )),
    }
}

/// Whether `stanza` to the service asks for its room directory (disco#items).
pub fn is_room_listing(stanza: &Stanza) -> bool {
    stanza.kind == Kind::Iq(IqType::Get)
        && matches!(stanza.iq_payload(), Ok(Some(q)) if q.is("query", ns::DISCO_ITEMS))
}

/// The error reply for `stanza`, if it may have one.
fn refuse(stanza: &Stanza, condition: StanzaErrorCondition) -> Vec<Stanza> {
    stanza
        .error_reply(&StanzaError::new(condition))
        .into_iter()
        .collect()
}

/// An XEP-0082 timestamp (`2002-10-13T23:58:37Z`, fractions and offsets allowed) in
/// ms since the Unix epoch.
fn parse_timestamp_ms(stamp: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

fn is_ping(iq: &Stanza) -> bool {
    matches!(iq.iq_payload(), Ok(Some(p)) if p.is("ping", ns::PING))
}

fn has_body(stanza: &Stanza) -> bool {
    stanza
        .payload_elements()
        .is_ok_and(|es| es.iter().any(|e| e.is("body", ns::CLIENT)))
}

/// A presence payload without its MUC join element (which is not broadcast).
fn without_muc_elements(stanza: &Stanza) -> Bytes {
    let Ok(nodes) = stanza.payload() else {
        return Bytes::new();
    };
    let mut out = String::new();
    for node in nodes {
        if let Node::Element(e) = node
            && !e.is("x", NS_MUC)
        {
            e.write_to(&mut out, ns::CLIENT);
        }
    }
    Bytes::from(out)
}

/// `<x xmlns='…muc#user'><item …/><status code='…'/>…</x>` for `occupant` in `role`,
/// with its real JID when the receiver is a moderator, and the new nick of a nick
/// change.
fn user_x(
    occupant: &Occupant,
    role: &str,
    moderator_view: bool,
    new_nick: Option<&str>,
    codes: &[&str],
) -> String {
    let mut item = Element::new("item", NS_MUC_USER)
        .attr("affiliation", occupant.affiliation.as_str())
        .attr("role", role);
    if moderator_view {
        item = item.attr("jid", occupant.jid.as_str());
    }
    if let Some(nick) = new_nick {
        item = item.attr("nick", nick);
    }
    let mut x = Element::new("x", NS_MUC_USER).child(item);
    for code in codes {
        x = x.child(Element::new("status", NS_MUC_USER).attr("code", *code));
    }
    x.to_xml(ns::CLIENT)
}

#[cfg(test)]
mod tests {
    use shoal_xmpp::stanza::{TopLevel, parse_top_level};
    use shoal_xmpp::xml::NsContext;

    use super::*;

    pub(super) fn stanza(xml: &str) -> Stanza {
        match parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT) {
            Ok(TopLevel::Stanza(s)) => s,
            other => panic!("not a stanza: {other:?}"),
        }
    }

    /// A room created by a@localhost/x ("first"), accepted as an instant room, and
    /// entered by b@localhost/y ("second").
    pub(super) fn room() -> Room {
        let mut room = Room::new("coven@conference.localhost".parse().unwrap(), 0);
        for xml in [
            "<presence from='a@localhost/x' to='coven@conference.localhost/first'/>",
            INSTANT,
            "<presence from='b@localhost/y' to='coven@conference.localhost/second'/>",
        ] {
            room.handle(stanza(xml), 0);
        }
        room
    }

    /// The creator a@localhost/x accepts the instant room (§10.1.2).
    const INSTANT: &str = "<iq type='set' id='instant' from='a@localhost/x' to='coven@conference.localhost'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>";

    fn xml(out: &[Stanza]) -> Vec<String> {
        out.iter().map(Stanza::to_xml).collect()
    }

    #[test]
    fn wrong_addresses_get_the_xep_0045_errors() {
        let mut room = room();
        // §7.5: a groupchat message to an occupant's room JID is a bad request.
        let out = room.handle(
            stanza("<message from='a@localhost/x' to='coven@conference.localhost/second' type='groupchat'><body>x</body></message>"),
            0,
        );
        assert!(xml(&out)[0].contains("<bad-request"), "{out:?}");
        // A private message to a nick nobody has.
        let out = room.handle(
            stanza("<message from='a@localhost/x' to='coven@conference.localhost/ghost' type='chat'><body>x</body></message>"),
            0,
        );
        assert!(xml(&out)[0].contains("<item-not-found"), "{out:?}");
        // Not an occupant: no private messages either.
        let out = room.handle(
            stanza("<message from='c@localhost/z' to='coven@conference.localhost/first' type='chat'><body>x</body></message>"),
            0,
        );
        assert!(xml(&out)[0].contains("<not-acceptable"), "{out:?}");
        // A room nobody created: only entering creates it.
        let mut none = Room::new("none@conference.localhost".parse().unwrap(), 0);
        for xml_in in [
            "<message from='a@localhost/x' to='none@conference.localhost' type='groupchat'><body>x</body></message>",
            "<iq from='a@localhost/x' to='none@conference.localhost' type='get' id='i'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        ] {
            let out = xml(&none.handle(stanza(xml_in), 0));
            assert!(out[0].contains("<item-not-found"), "{out:?}");
        }
        assert!(none.is_new() && none.can_vanish());
    }

    /// §7.2.15: `seconds` keeps the recent messages, `maxchars` as many of the newest
    /// as fit whole; both with `maxstanzas` the tightest wins.
    #[test]
    fn history_limits() {
        let mut room = room();
        for (i, at) in [(0, 1_000), (1, 50_000), (2, 90_000)] {
            room.handle(
                stanza(&format!("<message from='a@localhost/x' to='coven@conference.localhost' type='groupchat'><body>{i}</body></message>")),
                at,
            );
        }
        let enter = |room: &mut Room, who: &str, history: &str| {
            let out = room.handle(
                stanza(&format!("<presence from='{who}' to='coven@conference.localhost/{who}'><x xmlns='http://jabber.org/protocol/muc'>{history}</x></presence>")),
                100_000,
            );
            out.iter()
                .filter(|s| s.to_xml().contains("<delay"))
                .map(|s| {
                    String::from_utf8_lossy(&s.payload)
                        .split("</body>")
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            enter(&mut room, "c@localhost/1", "<history seconds='60'/>"),
            ["<body>1", "<body>2"]
        );
        assert_eq!(
            enter(&mut room, "c@localhost/2", "<history maxstanzas='1'/>"),
            ["<body>2"]
        );
        assert_eq!(
            enter(&mut room, "c@localhost/3", "<history maxchars='0'/>"),
            Vec::<String>::new()
        );
        // One replayed stanza is under 300 characters, two are over.
        assert_eq!(
            enter(&mut room, "c@localhost/4", "<history maxchars='300'/>"),
            ["<body>2"]
        );
        assert_eq!(
            enter(&mut room, "c@localhost/5", ""),
            ["<body>0", "<body>1", "<body>2"]
        );
        // 1970-01-01T00:00:50Z: the message sent at 50 s and the later one.
        assert_eq!(
            enter(
                &mut room,
                "c@localhost/6",
                "<history since='1970-01-01T00:00:50Z'/>"
            ),
            ["<body>1", "<body>2"]
        );
        assert_eq!(
            enter(
                &mut room,
                "c@localhost/7",
                "<history since='1970-01-01T01:00:50.5+01:00'/>"
            ),
            ["<body>2"]
        );
    }

    /// §10.1: a new room is locked until its owner accepts it as an instant room or
    /// configures it; cancelling the configuration destroys it.
    #[test]
    fn new_rooms_wait_for_their_owner() {
        let mut room = Room::new("coven@conference.localhost".parse().unwrap(), 0);
        let join = |who: &str| {
            stanza(&format!(
                "<presence from='{who}' to='coven@conference.localhost/{who}'/>"
            ))
        };
        room.handle(join("a@localhost/x"), 0);
        let refused = xml(&room.handle(join("b@localhost/y"), 0));
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].contains("type='error'") && refused[0].contains("<item-not-found"),
            "{refused:?}"
        );
        // Another resource of the owner may enter.
        assert!(
            xml(&room.handle(join("a@localhost/z"), 0))
                .iter()
                .any(|s| s.contains("code='110'"))
        );
        assert_eq!(
            xml(&room.handle(stanza(INSTANT), 0)),
            [
                "<iq to='a@localhost/x' from='coven@conference.localhost' id='instant' type='result'/>"
            ]
        );
        assert!(
            xml(&room.handle(join("b@localhost/y"), 0))
                .iter()
                .any(|s| s.contains("code='110'"))
        );

        let mut other = Room::new("other@conference.localhost".parse().unwrap(), 0);
        other.handle(
            stanza("<presence from='a@localhost/x' to='other@conference.localhost/a'/>"),
            0,
        );
        let out = xml(&other.handle(stanza("<iq type='set' id='c' from='a@localhost/x' to='other@conference.localhost'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='cancel'/></query></iq>"), 0));
        assert!(
            out[1].contains("type='unavailable'") && out[1].contains("<destroy"),
            "{out:?}"
        );
        assert!(other.can_vanish());
    }

    /// Affiliation lists for admins and owners, role lists for moderators, and a
    /// room that keeps an owner.
    #[test]
    fn admin_lists_and_the_last_owner() {
        let mut room = room();
        let ask = |room: &mut Room, who: &str, query: &str, kind: &str| {
            xml(&room.handle(
                stanza(&format!("<iq type='{kind}' id='q' from='{who}' to='coven@conference.localhost'><query xmlns='http://jabber.org/protocol/muc#admin'>{query}</query></iq>")),
                0,
            ))
        };
        let member = "<item jid='c@localhost' affiliation='member'/>";
        assert_eq!(ask(&mut room, "a@localhost/x", member, "set").len(), 1);
        assert_eq!(
            ask(
                &mut room,
                "a@localhost/x",
                "<item affiliation='member'/>",
                "get"
            ),
            [
                "<iq to='a@localhost/x' from='coven@conference.localhost' id='q' type='result'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='c@localhost'/></query></iq>"
            ]
        );
        assert_eq!(
            ask(
                &mut room,
                "a@localhost/x",
                "<item role='participant'/>",
                "get"
            ),
            [
                "<iq to='a@localhost/x' from='coven@conference.localhost' id='q' type='result'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='none' jid='b@localhost/y' nick='second' role='participant'/></query></iq>"
            ]
        );
        // A participant may see neither.
        for query in ["<item affiliation='member'/>", "<item role='participant'/>"] {
            let out = ask(&mut room, "b@localhost/y", query, "get");
            assert!(out[0].contains("<forbidden"), "{out:?}");
        }
        let out = ask(
            &mut room,
            "a@localhost/x",
            "<item affiliation='none'/>",
            "get",
        );
        assert!(out[0].contains("<bad-request"), "{out:?}");
        // The only owner cannot step down; with a second owner, it can.
        let out = ask(
            &mut room,
            "a@localhost/x",
            "<item jid='a@localhost' affiliation='admin'/>",
            "set",
        );
        assert!(out[0].contains("<conflict"), "{out:?}");
        ask(
            &mut room,
            "a@localhost/x",
            "<item jid='b@localhost' affiliation='owner'/>",
            "set",
        );
        let out = ask(
            &mut room,
            "a@localhost/x",
            "<item jid='a@localhost' affiliation='admin'/>",
            "set",
        );
        assert!(out[0].contains("type='result'"), "{out:?}");
        assert_eq!(
            ask(
                &mut room,
                "b@localhost/y",
                "<item affiliation='owner'/>",
                "get"
            ),
            [
                "<iq to='b@localhost/y' from='coven@conference.localhost' id='q' type='result'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='owner' jid='b@localhost'/></query></iq>"
            ]
        );
    }

    /// Above the presence limit, arrivals and departures reach only the moderators
    /// and the occupant itself.
    #[test]
    fn presence_limit_spares_participants() {
        let mut room = Room::new("coven@conference.localhost".parse().unwrap(), 2);
        let join = |who: &str, nick: &str| {
            stanza(&format!(
                "<presence from='{who}' to='coven@conference.localhost/{nick}'/>"
            ))
        };
        room.handle(join("a@localhost/x", "owner"), 0);
        room.handle(stanza(INSTANT), 0);
        room.handle(join("b@localhost/y", "second"), 0);
        let to = |out: &[Stanza]| -> Vec<String> {
            out.iter()
                .filter(|s| matches!(s.kind, Kind::Presence(_)))
                .filter(|s| {
                    s.from
                        .as_ref()
                        .and_then(|f| f.resource())
                        .map(|r| r.as_str())
                        == Some("third")
                })
                .map(|s| s.to.as_ref().unwrap().to_string())
                .collect()
        };
        let out = room.handle(join("c@localhost/z", "third"), 0);
        assert_eq!(to(&out), ["a@localhost/x", "c@localhost/z"]);
        let out = room.handle(
            stanza("<presence from='c@localhost/z' to='coven@conference.localhost/third' type='unavailable'/>"),
            0,
        );
        assert_eq!(to(&out), ["a@localhost/x", "c@localhost/z"]);
        // Back at the limit: everyone hears again.
        let out = room.handle(
            stanza("<presence from='b@localhost/y' to='coven@conference.localhost/second'><show>away</show></presence>"),
            0,
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn history_keeps_the_last_messages_and_the_room_empties() {
        let mut room = room();
        for i in 0..(HISTORY + 5) {
            room.handle(
                stanza(&format!("<message from='a@localhost/x' to='coven@conference.localhost' type='groupchat'><body>{i}</body></message>")),
                0,
            );
        }
        assert_eq!(room.history.len(), HISTORY);
        assert_eq!(&room.history[0].payload[..], b"<body>5</body>");
        // An error bounced by an occupant's client takes it out (§7.2).
        room.handle(
            stanza("<message from='b@localhost/y' to='coven@conference.localhost' type='error'/>"),
            0,
        );
        room.handle(
            stanza("<presence from='a@localhost/x' to='coven@conference.localhost/first' type='unavailable'/>"),
            0,
        );
        assert!(room.can_vanish());
    }
}
