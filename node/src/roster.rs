//! Roster management (RFC 6121 §2) and the presence subscription state machine
//! (RFC 6121 §3 and Appendix A), as pure functions over the stored [`Roster`].
//!
//! This module owns the protocol decisions: which subscription stanzas change a
//! contact's state, which are routed or delivered and which are dropped, when the server
//! answers on the user's behalf, how roster items look on the wire, and which roster
//! sets are refused with which error. It never performs I/O, never touches storage or
//! an actor, and never builds whole stanzas: the shard carries out a [`Transition`]
//! (route, deliver, push, persist) and wraps the elements built here in iqs.
//!
//! Two perspectives meet here, as in the RFC. [`outbound`] is the user's server
//! handling a subscription stanza the user sent to a contact (Appendix A.2);
//! [`inbound`] is the same server handling one a contact sent to the user
//! (Appendix A.3). Both read the same per-contact [`ContactState`].

use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::stanza::PresenceType;
use shoal_xmpp::xml::Element;

use crate::model::{Roster, RosterItem, Subscription};

/// The roster namespace (RFC 6121 §2.1).
pub const ROSTER: &str = "jabber:iq:roster";

// ---------------------------------------------------------------------------------------
// Subscription state machine
// ---------------------------------------------------------------------------------------

/// The full state of one contact for subscription purposes.
///
/// A contact the user never added has `in_roster == false` and can still have a pending
/// inbound request: RFC 6121 Appendix A.1 forbids creating a roster item merely because
/// a contact asked to subscribe. Combinations the RFC does not define (`ask` with a
/// subscription that already includes "to", `pending_in` with one that already includes
/// "from") are read as if the redundant flag were clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContactState {
    pub subscription: Subscription,
    /// "Pending Out": the user asked to subscribe and the contact has not answered.
    pub ask: bool,
    /// "Pending In": the contact asked to subscribe and the user has not answered.
    pub pending_in: bool,
    /// The user pre-approved a request from the contact (RFC 6121 §3.4).
    pub approved: bool,
    /// The contact has an item in the user's roster.
    pub in_roster: bool,
}

impl ContactState {
    /// The state of `jid` (a prepared bare JID) in `roster`.
    pub fn of(roster: &Roster, jid: &str) -> Self {
        let pending_in = roster.pending_in.contains_key(jid);
        match roster.items.get(jid) {
            Some(item) => Self {
                subscription: item.subscription,
                ask: item.ask,
                pending_in,
                approved: item.approved,
                in_roster: true,
            },
            None => Self {
                pending_in,
                ..Self::default()
            },
        }
    }

    /// What a roster item shows of this state; a change here is what roster pushes
    /// announce (pending-in is never shown, RFC 6121 §2.1.2).
    fn visible(self) -> (bool, Subscription, bool, bool) {
        (self.in_roster, self.subscription, self.ask, self.approved)
    }
}

/// A subscription-related presence type (RFC 6121 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionOp {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl SubscriptionOp {
    /// `None` for presence types that do not manage subscriptions.
    pub fn from_presence_type(t: PresenceType) -> Option<Self> {
        Some(match t {
            PresenceType::Subscribe => Self::Subscribe,
            PresenceType::Subscribed => Self::Subscribed,
            PresenceType::Unsubscribe => Self::Unsubscribe,
            PresenceType::Unsubscribed => Self::Unsubscribed,
            _ => return None,
        })
    }

    pub fn presence_type(self) -> PresenceType {
        match self {
            Self::Subscribe => PresenceType::Subscribe,
            Self::Subscribed => PresenceType::Subscribed,
            Self::Unsubscribe => PresenceType::Unsubscribe,
            Self::Unsubscribed => PresenceType::Unsubscribed,
        }
    }
}

/// What the user's server must do after processing one subscription stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// Equal to the old state when nothing changes.
    pub new_state: ContactState,
    /// `new_state` differs from the old one: persist it (the roster item and/or the
    /// pending-in record).
    pub changed: bool,
    /// The change is visible in the roster item: bump the roster version and push the
    /// item to the user's interested resources.
    pub roster_push: bool,
    /// Outbound: route the stanza to the contact (with the user's bare JID as `from`).
    /// Inbound: deliver it to the user's available resources; an inbound `subscribe`
    /// that leaves `pending_in` set is also stored for redelivery at the next login.
    /// `false` means the stanza is silently dropped.
    pub forward: bool,
    /// A stanza the server sends to the contact on the user's behalf, from the user's
    /// bare JID.
    pub auto_reply: Option<SubscriptionOp>,
    /// Send the user's current presence from each of the user's available resources to
    /// the contact, who has just gained a subscription (RFC 6121 §3.1.5).
    pub send_presence: bool,
    /// Send presence of type `unavailable` from each of the user's available resources
    /// to the contact, who has just lost its subscription (RFC 6121 §3.2.2, §3.3.3).
    pub send_unavailable: bool,
}

/// The nine states of RFC 6121 Appendix A.1, in the order the tables list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defined {
    None,
    NoneOut,
    NoneIn,
    NoneOutIn,
    To,
    ToIn,
    From,
    FromOut,
    Both,
}

impl Defined {
    fn of(s: &ContactState) -> Self {
        match s.subscription {
            Subscription::None => match (s.ask, s.pending_in) {
                (false, false) => Self::None,
                (true, false) => Self::NoneOut,
                (false, true) => Self::NoneIn,
                (true, true) => Self::NoneOutIn,
            },
            Subscription::To if s.pending_in => Self::ToIn,
            Subscription::To => Self::To,
            Subscription::From if s.ask => Self::FromOut,
            Subscription::From => Self::From,
            Subscription::Both => Self::Both,
        }
    }

    /// (subscription, pending out, pending in).
    fn parts(self) -> (Subscription, bool, bool) {
        match self {
            Self::None => (Subscription::None, false, false),
            Self::NoneOut => (Subscription::None, true, false),
            Self::NoneIn => (Subscription::None, false, true),
            Self::NoneOutIn => (Subscription::None, true, true),
            Self::To => (Subscription::To, false, false),
            Self::ToIn => (Subscription::To, false, true),
            Self::From => (Subscription::From, false, false),
            Self::FromOut => (Subscription::From, true, false),
            Self::Both => (Subscription::Both, false, false),
        }
    }
}

/// The "NEW STATE" column of an Appendix A.2 (outbound) table.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// "no state change".
    Keep,
    Goto(Defined),
    /// "pre-approval" (A.2.3, §3.4).
    PreApprove,
}

/// The "NEW STATE" column of an Appendix A.3 (inbound) table.
#[derive(Debug, Clone, Copy)]
enum In {
    /// "no state change".
    Keep,
    Goto(Defined),
    /// "no state change", and the server answers `subscribed` itself (A.3.1, the rows
    /// marked with an asterisk).
    AutoSubscribed,
}

/// One row per state: (route?, new state), indexed by `Defined as usize`.
type OutTable = [(bool, Out); 9];
/// One row per state: (deliver?, new state), indexed by `Defined as usize`.
type InTable = [(bool, In); 9];

/// A.2.1: outbound "subscribe". RFC 6121 routes it in every state, so that a contact's
/// server that lost state can resynchronise (it auto-replies when already subscribed).
const OUT_SUBSCRIBE: OutTable = [
    (true, Out::Goto(Defined::NoneOut)),
    (true, Out::Keep),
    (true, Out::Goto(Defined::NoneOutIn)),
    (true, Out::Keep),
    (true, Out::Keep),
    (true, Out::Keep),
    (true, Out::Goto(Defined::FromOut)),
    (true, Out::Keep),
    (true, Out::Keep),
];

/// A.2.2: outbound "unsubscribe", likewise routed in every state.
const OUT_UNSUBSCRIBE: OutTable = [
    (true, Out::Keep),
    (true, Out::Goto(Defined::None)),
    (true, Out::Keep),
    (true, Out::Goto(Defined::NoneIn)),
    (true, Out::Goto(Defined::None)),
    (true, Out::Goto(Defined::NoneIn)),
    (true, Out::Keep),
    (true, Out::Goto(Defined::From)),
    (true, Out::Goto(Defined::From)),
];

/// A.2.3: outbound "subscribed".
const OUT_SUBSCRIBED: OutTable = [
    (false, Out::PreApprove),
    (false, Out::PreApprove),
    (true, Out::Goto(Defined::From)),
    (true, Out::Goto(Defined::FromOut)),
    (false, Out::PreApprove),
    (true, Out::Goto(Defined::Both)),
    (false, Out::Keep),
    (false, Out::Keep),
    (false, Out::Keep),
];

/// A.2.4: outbound "unsubscribed".
const OUT_UNSUBSCRIBED: OutTable = [
    (false, Out::Keep),
    (false, Out::Keep),
    (true, Out::Goto(Defined::None)),
    (true, Out::Goto(Defined::NoneOut)),
    (false, Out::Keep),
    (true, Out::Goto(Defined::To)),
    (true, Out::Goto(Defined::None)),
    (true, Out::Goto(Defined::NoneOut)),
    (true, Out::Goto(Defined::To)),
];

/// A.3.1: inbound "subscribe".
const IN_SUBSCRIBE: InTable = [
    (true, In::Goto(Defined::NoneIn)),
    (true, In::Goto(Defined::NoneOutIn)),
    (false, In::Keep),
    (false, In::Keep),
    (true, In::Goto(Defined::ToIn)),
    (false, In::Keep),
    (false, In::AutoSubscribed),
    (false, In::AutoSubscribed),
    (false, In::AutoSubscribed),
];

/// A.3.2: inbound "unsubscribe".
const IN_UNSUBSCRIBE: InTable = [
    (false, In::Keep),
    (false, In::Keep),
    (true, In::Goto(Defined::None)),
    (true, In::Goto(Defined::NoneOut)),
    (false, In::Keep),
    (true, In::Goto(Defined::To)),
    (true, In::Goto(Defined::None)),
    (true, In::Goto(Defined::NoneOut)),
    (true, In::Goto(Defined::To)),
];

/// A.3.3: inbound "subscribed".
const IN_SUBSCRIBED: InTable = [
    (false, In::Keep),
    (true, In::Goto(Defined::To)),
    (false, In::Keep),
    (true, In::Goto(Defined::ToIn)),
    (false, In::Keep),
    (false, In::Keep),
    (false, In::Keep),
    (true, In::Goto(Defined::Both)),
    (false, In::Keep),
];

/// A.3.4: inbound "unsubscribed".
const IN_UNSUBSCRIBED: InTable = [
    (false, In::Keep),
    (true, In::Goto(Defined::None)),
    (false, In::Keep),
    (true, In::Goto(Defined::NoneIn)),
    (true, In::Goto(Defined::None)),
    (true, In::Goto(Defined::NoneIn)),
    (false, In::Keep),
    (true, In::Goto(Defined::From)),
    (true, In::Goto(Defined::From)),
];

/// Moves `state` to `to`, keeping the flags the tables do not cover.
fn goto(state: &ContactState, to: Defined) -> ContactState {
    let (subscription, ask, pending_in) = to.parts();
    let mut next = ContactState {
        subscription,
        ask,
        pending_in,
        ..*state
    };
    // Once the contact is subscribed, a pre-approval has been used up (§3.4).
    if subscription.has_from() {
        next.approved = false;
    }
    // The user's own subscription actions create the item (§3.1.2, §3.1.5, §3.4); a
    // pending inbound request alone never does (Appendix A.1).
    if next.ask || next.subscription != Subscription::None || next.approved {
        next.in_roster = true;
    }
    next
}

/// Fills the flags derived from the old and new states.
fn finish(old: &ContactState, mut t: Transition) -> Transition {
    t.changed = t.new_state != *old;
    t.roster_push = t.new_state.in_roster && t.new_state.visible() != old.visible();
    t
}

fn keep(state: &ContactState, forward: bool) -> Transition {
    Transition {
        new_state: *state,
        changed: false,
        roster_push: false,
        forward,
        auto_reply: None,
        send_presence: false,
        send_unavailable: false,
    }
}

/// The user's server processing an outbound subscription stanza from the user
/// (RFC 6121 Appendix A.2 and §3.1.2, §3.1.5, §3.2.2, §3.3.2, §3.4).
pub fn outbound(state: &ContactState, op: SubscriptionOp) -> Transition {
    let table = match op {
        SubscriptionOp::Subscribe => &OUT_SUBSCRIBE,
        SubscriptionOp::Unsubscribe => &OUT_UNSUBSCRIBE,
        SubscriptionOp::Subscribed => &OUT_SUBSCRIBED,
        SubscriptionOp::Unsubscribed => &OUT_UNSUBSCRIBED,
    };
    let (route, action) = table[Defined::of(state) as usize];
    let mut t = keep(state, route);
    match action {
        // §3.4: "unsubscribed" with nothing to deny or cancel withdraws a pre-approval.
        // It is not routed: the contact never learnt of the approval.
        Out::Keep if op == SubscriptionOp::Unsubscribed && state.approved => {
            t.new_state.approved = false;
        }
        Out::Keep => {}
        Out::Goto(to) => {
            t.new_state = goto(state, to);
            match op {
                // §3.1.5: approving a request makes the contact a subscriber, who gets
                // the user's current presence at once.
                SubscriptionOp::Subscribed => t.send_presence = true,
                // §3.2.2: cancelling the contact's subscription (not merely denying a
                // request) ends its view of the user's presence.
                SubscriptionOp::Unsubscribed => {
                    t.send_unavailable = state.subscription.has_from();
                }
                SubscriptionOp::Subscribe | SubscriptionOp::Unsubscribe => {}
            }
        }
        // §3.4: remember the approval, creating and pushing the item if needed; nothing
        // is routed to the contact.
        Out::PreApprove => {
            let approved = ContactState {
                approved: true,
                ..*state
            };
            t.new_state = goto(&approved, Defined::of(state));
        }
    }
    finish(state, t)
}

/// The user's server processing an inbound subscription stanza that a contact sent to
/// the user (RFC 6121 Appendix A.3 and §3.1.3, §3.1.6, §3.2.3, §3.3.3, §3.4).
pub fn inbound(state: &ContactState, op: SubscriptionOp) -> Transition {
    let table = match op {
        SubscriptionOp::Subscribe => &IN_SUBSCRIBE,
        SubscriptionOp::Unsubscribe => &IN_UNSUBSCRIBE,
        SubscriptionOp::Subscribed => &IN_SUBSCRIBED,
        SubscriptionOp::Unsubscribed => &IN_UNSUBSCRIBED,
    };
    let (deliver, action) = table[Defined::of(state) as usize];
    let mut t = keep(state, deliver);
    match action {
        In::Keep => {}
        // §3.4: a pre-approved request is not delivered; the server approves it as the
        // user would have, following the A.2.3 row for the state the request leads to.
        In::Goto(pending) if op == SubscriptionOp::Subscribe && state.approved => {
            if let (_, Out::Goto(to)) = OUT_SUBSCRIBED[pending as usize] {
                t.new_state = goto(state, to);
                t.forward = false;
                t.auto_reply = Some(SubscriptionOp::Subscribed);
                t.send_presence = true;
            }
        }
        In::Goto(to) => {
            t.new_state = goto(state, to);
            // §3.3.3: the contact cancelled its subscription to the user, so the user's
            // server tells it the user is now unavailable to it.
            if op == SubscriptionOp::Unsubscribe {
                t.send_unavailable = state.subscription.has_from();
            }
        }
        // §3.1.3: the contact is already subscribed and its server has evidently lost
        // track; answer for the user, and resend the user's presence, which the
        // contact would otherwise not see until the user's next change.
        In::AutoSubscribed => {
            t.auto_reply = Some(SubscriptionOp::Subscribed);
            t.send_presence = true;
        }
    }
    finish(state, t)
}

/// Stores a contact's new state in `roster`: creates or updates its item, and records
/// (with `request_xml`, the subscribe request's payload to redeliver later) or clears
/// its pending inbound request. Bumps the version when the item changed visibly and
/// returns whether it did, i.e. whether a roster push with
/// `roster_push(roster.items.get(jid), jid, roster.version)` is owed.
pub fn apply_state(
    roster: &mut Roster,
    jid: &str,
    state: &ContactState,
    request_xml: &str,
) -> bool {
    let old = ContactState::of(roster, jid);
    if state.pending_in && !old.pending_in {
        roster
            .pending_in
            .insert(jid.to_owned(), request_xml.to_owned());
    } else if !state.pending_in {
        roster.pending_in.remove(jid);
    }
    if !state.in_roster || old.visible() == state.visible() {
        return false;
    }
    let item = roster
        .items
        .entry(jid.to_owned())
        .or_insert_with(|| RosterItem {
            jid: jid.to_owned(),
            ..RosterItem::default()
        });
    item.subscription = state.subscription;
    item.ask = state.ask;
    item.approved = state.approved;
    roster.version += 1;
    true
}

// ---------------------------------------------------------------------------------------
// Roster iqs
// ---------------------------------------------------------------------------------------

/// Server-configured limits on roster sets (RFC 6121 §2.3.3). Lengths are in bytes of
/// UTF-8, which is what storage pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RosterLimits {
    pub max_items: usize,
    pub max_name_len: usize,
    pub max_group_len: usize,
    pub max_groups: usize,
}

impl Default for RosterLimits {
    fn default() -> Self {
        Self {
            // Every item is loaded with the roster and walked on each presence
            // broadcast; large public servers cap rosters in the low thousands.
            max_items: 1000,
            // A display name; 1023 bytes is also the JID part limit of RFC 7622.
            max_name_len: 1023,
            max_group_len: 1023,
            // Clients show groups as folders; dozens per contact is already abuse.
            max_groups: 64,
        }
    }
}

/// A validated roster set (RFC 6121 §2.1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RosterSet {
    /// Add or update the item; its subscription state is left as it is.
    Update {
        jid: String,
        name: Option<String>,
        groups: Vec<String>,
    },
    /// Delete the item (§2.5).
    Remove { jid: String },
}

fn bad_request(text: &str) -> StanzaError {
    StanzaError::with_text(StanzaErrorCondition::BadRequest, text)
}

fn not_acceptable(text: &str) -> StanzaError {
    StanzaError::with_text(StanzaErrorCondition::NotAcceptable, text)
}

/// Parses and validates the payload of a roster set, `<query xmlns='jabber:iq:roster'>`
/// with exactly one `<item/>` (RFC 6121 §2.1.5, §2.3.3, §2.5.3).
///
/// The item's JID is returned prepared, as the roster is keyed. The `ask` and
/// `approved` attributes and any `subscription` value other than "remove" are ignored:
/// clients change subscriptions with presence stanzas, never with roster sets
/// (§2.1.2.1, §2.1.2.2, §2.1.5). The user's own bare JID is accepted, as RFC 6121 does
/// not forbid it and clients use such an item for notes to self.
pub fn parse_roster_set(
    payload: &Element,
    roster: &Roster,
    limits: &RosterLimits,
) -> Result<RosterSet, StanzaError> {
    if !payload.is("query", ROSTER) {
        return Err(bad_request("expected a jabber:iq:roster query"));
    }
    let mut items = payload.elements();
    let (Some(item), None) = (items.next(), items.next()) else {
        return Err(bad_request("a roster set carries exactly one item"));
    };
    if !item.is("item", ROSTER) {
        return Err(bad_request("expected a roster item"));
    }
    let raw_jid = item
        .get_attr("jid")
        .ok_or_else(|| bad_request("roster item without 'jid'"))?;
    let jid = jid::Jid::new(raw_jid).map_err(|e| {
        StanzaError::with_text(
            StanzaErrorCondition::JidMalformed,
            format!("invalid 'jid': {e}"),
        )
    })?;
    if !jid.is_bare() {
        return Err(bad_request("roster items are bare JIDs"));
    }
    let jid = jid.as_str().to_owned();

    if item.get_attr("subscription") == Some("remove") {
        // §2.5.3: removing an item that is not there.
        if !roster.items.contains_key(&jid) {
            return Err(StanzaError::new(StanzaErrorCondition::ItemNotFound));
        }
        return Ok(RosterSet::Remove { jid });
    }

    // An empty name is no name: clients send name='' to clear it.
    let name = item.get_attr("name").filter(|n| !n.is_empty());
    if name.is_some_and(|n| n.len() > limits.max_name_len) {
        return Err(not_acceptable("roster item name too long"));
    }
    let mut groups: Vec<String> = Vec::new();
    for group in item.elements().filter(|e| e.is("group", ROSTER)) {
        let g = group.text_content();
        if g.is_empty() {
            return Err(not_acceptable("empty roster group"));
        }
        if g.len() > limits.max_group_len {
            return Err(not_acceptable("roster group name too long"));
        }
        if groups.contains(&g) {
            return Err(bad_request("duplicate roster group"));
        }
        groups.push(g);
    }
    if groups.len() > limits.max_groups {
        return Err(not_acceptable("too many groups on one roster item"));
    }
    if !roster.items.contains_key(&jid) && roster.items.len() >= limits.max_items {
        return Err(not_acceptable("roster is full"));
    }
    Ok(RosterSet::Update {
        jid,
        name: name.map(str::to_owned),
        groups,
    })
}

/// What a roster set asks of the server beyond the roster itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The roster push payload for all interested resources (§2.1.6); `None` when the
    /// set left the roster as it was.
    pub push: Option<Element>,
    /// Stanzas to route to the contact from the user's bare JID, in this order, when
    /// an item is removed (§2.5.2): `unsubscribe` if the user was subscribed or asked to
    /// be, `unsubscribed` if the contact was subscribed or asked to be.
    pub send: Vec<SubscriptionOp>,
    /// The contact was subscribed to the user: also send it `unavailable` from each of
    /// the user's available resources, as for an outbound "unsubscribed".
    pub send_unavailable: bool,
}

/// Applies a validated roster set to `roster`, bumping its version if anything
/// changed.
///
/// Setting an item exactly as it already is changes nothing: no new version, no push.
/// A version names one roster content (§2.6.1), and storage keeps the version of an
/// identical item unbumped, so bumping here would hand clients versions that a reload
/// from storage reuses for different content.
pub fn apply_roster_set(roster: &mut Roster, set: &RosterSet) -> Applied {
    match set {
        RosterSet::Update { jid, name, groups } => {
            if roster
                .items
                .get(jid)
                .is_some_and(|i| i.name == *name && i.groups == *groups)
            {
                return Applied {
                    push: None,
                    send: Vec::new(),
                    send_unavailable: false,
                };
            }
            roster.version += 1;
            let item = roster
                .items
                .entry(jid.clone())
                .or_insert_with(|| RosterItem {
                    jid: jid.clone(),
                    ..RosterItem::default()
                });
            item.name = name.clone();
            item.groups = groups.clone();
            Applied {
                push: Some(roster_push(Some(item), jid, roster.version)),
                send: Vec::new(),
                send_unavailable: false,
            }
        }
        RosterSet::Remove { jid } => {
            roster.version += 1;
            let state = ContactState::of(roster, jid);
            roster.items.remove(jid);
            roster.pending_in.remove(jid);
            let mut send = Vec::new();
            if state.subscription.has_to() || state.ask {
                send.push(SubscriptionOp::Unsubscribe);
            }
            if state.subscription.has_from() || state.pending_in {
                send.push(SubscriptionOp::Unsubscribed);
            }
            Applied {
                push: Some(roster_push(None, jid, roster.version)),
                send,
                send_unavailable: state.subscription.has_from(),
            }
        }
    }
}

/// The version string of a roster (RFC 6121 §2.6): its counter in decimal.
pub fn version_string(version: u64) -> String {
    version.to_string()
}

/// The `<query xmlns='jabber:iq:roster' ver='N'>` with every item, answering a roster
/// get (§2.2); `None` when the client's cached `ver` is current, in which case the
/// result iq carries no payload (§2.6.3). An empty `ver` from the client means it
/// supports versioning but has no cache, and gets the whole roster.
pub fn roster_result(roster: &Roster, client_ver: Option<&str>) -> Option<Element> {
    let ver = version_string(roster.version);
    if client_ver == Some(ver.as_str()) {
        return None;
    }
    let mut query = Element::new("query", ROSTER).attr("ver", ver);
    for item in roster.items.values() {
        query = query.child(item_element(item));
    }
    Some(query)
}

/// The `<query ver='N'><item/></query>` of a roster push (§2.1.6): the item as it now
/// is, or, when `item` is `None`, `<item jid='…' subscription='remove'/>`.
pub fn roster_push(item: Option<&RosterItem>, jid: &str, version: u64) -> Element {
    let item = match item {
        Some(item) => item_element(item),
        None => Element::new("item", ROSTER)
            .attr("jid", jid)
            .attr("subscription", "remove"),
    };
    Element::new("query", ROSTER)
        .attr("ver", version_string(version))
        .child(item)
}

/// One `<item/>` of a roster result or push.
///
/// Attributes are written in alphabetical order, which is the order of every example in
/// RFC 6121: `approved` (only when pre-approved), `ask` (only when pending out), `jid`,
/// `name` (when set), `subscription`; then one `<group/>` per group, in stored order.
pub fn item_element(item: &RosterItem) -> Element {
    let mut el = Element::new("item", ROSTER);
    if item.approved {
        el = el.attr("approved", "true");
    }
    if item.ask {
        el = el.attr("ask", "subscribe");
    }
    el = el.attr("jid", item.jid.as_str());
    if let Some(name) = &item.name {
        el = el.attr("name", name.as_str());
    }
    el = el.attr("subscription", item.subscription.as_str());
    for group in &item.groups {
        el = el.child(Element::new("group", ROSTER).text(group.as_str()));
    }
    el
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_xmpp::ns;
    use shoal_xmpp::stanza::{TopLevel, parse_top_level};
    use shoal_xmpp::xml::NsContext;

    // -- Appendix A, row by row ------------------------------------------------------

    /// A state as RFC 6121 Appendix A.1 names it, for a contact on the roster.
    fn named(name: &str) -> ContactState {
        let (subscription, ask, pending_in) = match name {
            "None" => (Subscription::None, false, false),
            "None + Pending Out" => (Subscription::None, true, false),
            "None + Pending In" => (Subscription::None, false, true),
            "None + Pending Out/In" => (Subscription::None, true, true),
            "To" => (Subscription::To, false, false),
            "To + Pending In" => (Subscription::To, false, true),
            "From" => (Subscription::From, false, false),
            "From + Pending Out" => (Subscription::From, true, false),
            "Both" => (Subscription::Both, false, false),
            other => panic!("unknown state {other:?}"),
        };
        ContactState {
            subscription,
            ask,
            pending_in,
            approved: false,
            in_roster: true,
        }
    }

    type Row = (&'static str, &'static str, &'static str);

    /// The tables of RFC 6121 Appendix A.2 and A.3, transcribed: (existing state,
    /// "ROUTE?"/"DELIVER?", new state).
    const TABLES: [(&str, bool, SubscriptionOp, [Row; 9]); 8] = [
        (
            "A.2.1 outbound subscribe",
            true,
            SubscriptionOp::Subscribe,
            [
                ("None", "yes", "None + Pending Out"),
                ("None + Pending Out", "yes", "no state change"),
                ("None + Pending In", "yes", "None + Pending Out/In"),
                ("None + Pending Out/In", "yes", "no state change"),
                ("To", "yes", "no state change"),
                ("To + Pending In", "yes", "no state change"),
                ("From", "yes", "From + Pending Out"),
                ("From + Pending Out", "yes", "no state change"),
                ("Both", "yes", "no state change"),
            ],
        ),
        (
            "A.2.2 outbound unsubscribe",
            true,
            SubscriptionOp::Unsubscribe,
            [
                ("None", "yes", "no state change"),
                ("None + Pending Out", "yes", "None"),
                ("None + Pending In", "yes", "no state change"),
                ("None + Pending Out/In", "yes", "None + Pending In"),
                ("To", "yes", "None"),
                ("To + Pending In", "yes", "None + Pending In"),
                ("From", "yes", "no state change"),
                ("From + Pending Out", "yes", "From"),
                ("Both", "yes", "From"),
            ],
        ),
        (
            "A.2.3 outbound subscribed",
            true,
            SubscriptionOp::Subscribed,
            [
                ("None", "no", "pre-approval"),
                ("None + Pending Out", "no", "pre-approval"),
                ("None + Pending In", "yes", "From"),
                ("None + Pending Out/In", "yes", "From + Pending Out"),
                ("To", "no", "pre-approval"),
                ("To + Pending In", "yes", "Both"),
                ("From", "no", "no state change"),
                ("From + Pending Out", "no", "no state change"),
                ("Both", "no", "no state change"),
            ],
        ),
        (
            "A.2.4 outbound unsubscribed",
            true,
            SubscriptionOp::Unsubscribed,
            [
                ("None", "no", "no state change"),
                ("None + Pending Out", "no", "no state change"),
                ("None + Pending In", "yes", "None"),
                ("None + Pending Out/In", "yes", "None + Pending Out"),
                ("To", "no", "no state change"),
                ("To + Pending In", "yes", "To"),
                ("From", "yes", "None"),
                ("From + Pending Out", "yes", "None + Pending Out"),
                ("Both", "yes", "To"),
            ],
        ),
        (
            "A.3.1 inbound subscribe",
            false,
            SubscriptionOp::Subscribe,
            [
                ("None", "yes", "None + Pending In"),
                ("None + Pending Out", "yes", "None + Pending Out/In"),
                ("None + Pending In", "no", "no state change"),
                ("None + Pending Out/In", "no", "no state change"),
                ("To", "yes", "To + Pending In"),
                ("To + Pending In", "no", "no state change"),
                ("From", "no *", "no state change"),
                ("From + Pending Out", "no *", "no state change"),
                ("Both", "no *", "no state change"),
            ],
        ),
        (
            "A.3.2 inbound unsubscribe",
            false,
            SubscriptionOp::Unsubscribe,
            [
                ("None", "no", "no state change"),
                ("None + Pending Out", "no", "no state change"),
                ("None + Pending In", "yes", "None"),
                ("None + Pending Out/In", "yes", "None + Pending Out"),
                ("To", "no", "no state change"),
                ("To + Pending In", "yes", "To"),
                ("From", "yes", "None"),
                ("From + Pending Out", "yes", "None + Pending Out"),
                ("Both", "yes", "To"),
            ],
        ),
        (
            "A.3.3 inbound subscribed",
            false,
            SubscriptionOp::Subscribed,
            [
                ("None", "no", "no state change"),
                ("None + Pending Out", "yes", "To"),
                ("None + Pending In", "no", "no state change"),
                ("None + Pending Out/In", "yes", "To + Pending In"),
                ("To", "no", "no state change"),
                ("To + Pending In", "no", "no state change"),
                ("From", "no", "no state change"),
                ("From + Pending Out", "yes", "Both"),
                ("Both", "no", "no state change"),
            ],
        ),
        (
            "A.3.4 inbound unsubscribed",
            false,
            SubscriptionOp::Unsubscribed,
            [
                ("None", "no", "no state change"),
                ("None + Pending Out", "yes", "None"),
                ("None + Pending In", "no", "no state change"),
                ("None + Pending Out/In", "yes", "None + Pending In"),
                ("To", "yes", "None"),
                ("To + Pending In", "yes", "None + Pending In"),
                ("From", "no", "no state change"),
                ("From + Pending Out", "yes", "From"),
                ("Both", "yes", "From"),
            ],
        ),
    ];

    #[test]
    fn every_row_of_appendix_a() {
        let mut rows = 0;
        for (table, is_outbound, op, table_rows) in TABLES {
            for (existing, route, new) in table_rows {
                let row = format!("{table}, row \"{existing}\"");
                let old = named(existing);
                let t = if is_outbound {
                    outbound(&old, op)
                } else {
                    inbound(&old, op)
                };
                assert_eq!(t.forward, route == "yes", "{row}: route/deliver");
                let want = match new {
                    "no state change" => old,
                    "pre-approval" => ContactState {
                        approved: true,
                        ..old
                    },
                    name => named(name),
                };
                assert_eq!(t.new_state, want, "{row}: new state");
                assert_eq!(t.changed, want != old, "{row}: changed");
                // Every state here has a roster item, so any change but pending-in's is
                // pushed.
                let visible = (want.subscription, want.ask, want.approved)
                    != (old.subscription, old.ask, old.approved);
                assert_eq!(t.roster_push, visible, "{row}: roster push");
                let auto = (route == "no *").then_some(SubscriptionOp::Subscribed);
                assert_eq!(t.auto_reply, auto, "{row}: auto-reply");
                rows += 1;
            }
        }
        assert_eq!(rows, 72);
    }

    #[test]
    fn presence_follows_subscription_changes() {
        // §3.1.5: approving sends the user's presence to the new subscriber.
        for s in [
            "None + Pending In",
            "None + Pending Out/In",
            "To + Pending In",
        ] {
            let t = outbound(&named(s), SubscriptionOp::Subscribed);
            assert!(t.send_presence && !t.send_unavailable, "{s}");
        }
        // §3.2.2: cancelling a subscription sends unavailable; denying a request does
        // not, as the contact never saw the user's presence.
        for (s, cancel) in [
            ("None + Pending In", false),
            ("None + Pending Out/In", false),
            ("To + Pending In", false),
            ("From", true),
            ("From + Pending Out", true),
            ("Both", true),
        ] {
            let t = outbound(&named(s), SubscriptionOp::Unsubscribed);
            assert_eq!(t.send_unavailable, cancel, "{s}");
            assert!(!t.send_presence, "{s}");
        }
        // §3.3.3: the contact unsubscribing gets unavailable from the user as well.
        for (s, cancel) in [("None + Pending In", false), ("From", true), ("Both", true)] {
            let t = inbound(&named(s), SubscriptionOp::Unsubscribe);
            assert_eq!(t.send_unavailable, cancel, "{s}");
        }
        // An already subscribed contact asking again gets "subscribed" and presence.
        let t = inbound(&named("Both"), SubscriptionOp::Subscribe);
        assert_eq!(t.auto_reply, Some(SubscriptionOp::Subscribed));
        assert!(t.send_presence && !t.forward && !t.changed);
        // Nothing else sends presence.
        for s in ["None", "To", "From + Pending Out"] {
            for op in [SubscriptionOp::Subscribe, SubscriptionOp::Unsubscribe] {
                let t = outbound(&named(s), op);
                assert!(!t.send_presence && !t.send_unavailable, "{s} {op:?}");
            }
        }
    }

    #[test]
    fn unknown_contacts() {
        let unknown = ContactState::default();
        // Appendix A.1: a request from a stranger is delivered and remembered but does
        // not create a roster item, so nothing is pushed.
        let t = inbound(&unknown, SubscriptionOp::Subscribe);
        assert!(t.forward && t.changed && !t.roster_push && t.auto_reply.is_none());
        assert!(t.new_state.pending_in && !t.new_state.in_roster);
        // §3.1.2: asking a stranger creates the item with ask='subscribe'.
        let t = outbound(&unknown, SubscriptionOp::Subscribe);
        assert!(t.forward && t.roster_push);
        assert!(t.new_state.in_roster && t.new_state.ask);
        // §3.1.5: approving a stranger's stored request creates the item as "from".
        let t = outbound(&t_pending_in_only(), SubscriptionOp::Subscribed);
        assert!(t.forward && t.roster_push && t.send_presence);
        assert_eq!(t.new_state.subscription, Subscription::From);
        assert!(t.new_state.in_roster && !t.new_state.pending_in);
        // Denying it creates nothing.
        let t = outbound(&t_pending_in_only(), SubscriptionOp::Unsubscribed);
        assert!(t.forward && t.changed && !t.roster_push && !t.new_state.in_roster);
        // Unsolicited approvals and cancellations from strangers are dropped.
        for op in [
            SubscriptionOp::Subscribed,
            SubscriptionOp::Unsubscribed,
            SubscriptionOp::Unsubscribe,
        ] {
            let t = inbound(&unknown, op);
            assert!(!t.forward && !t.changed && !t.roster_push, "{op:?}");
        }
        // Cancelling what does not exist is still routed (A.2.2) but changes nothing.
        let t = outbound(&unknown, SubscriptionOp::Unsubscribe);
        assert!(t.forward && !t.changed && !t.roster_push);
    }

    fn t_pending_in_only() -> ContactState {
        ContactState {
            pending_in: true,
            ..ContactState::default()
        }
    }

    #[test]
    fn pre_approval() {
        // §3.4: approving before being asked is remembered, pushed, and not routed.
        let t = outbound(&ContactState::default(), SubscriptionOp::Subscribed);
        assert!(!t.forward && t.roster_push && !t.send_presence);
        assert!(t.new_state.approved && t.new_state.in_roster);
        assert_eq!(t.new_state.subscription, Subscription::None);
        // Approving twice changes nothing.
        let again = outbound(&t.new_state, SubscriptionOp::Subscribed);
        assert!(!again.changed && !again.roster_push && !again.forward);

        // A pre-approved request is answered by the server and not delivered.
        for (state, after) in [
            ("None", "From"),
            ("None + Pending Out", "From + Pending Out"),
            ("To", "Both"),
        ] {
            let old = ContactState {
                approved: true,
                ..named(state)
            };
            let t = inbound(&old, SubscriptionOp::Subscribe);
            assert_eq!(t.new_state, named(after), "{state}");
            assert!(!t.new_state.approved, "{state}: approval used up");
            assert!(!t.forward && t.roster_push && t.send_presence, "{state}");
            assert_eq!(t.auto_reply, Some(SubscriptionOp::Subscribed), "{state}");
        }

        // "unsubscribed" withdraws a pre-approval without telling the contact.
        let old = ContactState {
            approved: true,
            ..named("To")
        };
        let t = outbound(&old, SubscriptionOp::Unsubscribed);
        assert_eq!(t.new_state, named("To"));
        assert!(!t.forward && t.roster_push && !t.send_unavailable);
        // Other stanzas leave it in place.
        let t = inbound(&old, SubscriptionOp::Unsubscribed);
        assert!(t.new_state.approved && t.new_state.subscription == Subscription::None);
    }

    #[test]
    fn subscription_ops_map_presence_types() {
        for op in [
            SubscriptionOp::Subscribe,
            SubscriptionOp::Subscribed,
            SubscriptionOp::Unsubscribe,
            SubscriptionOp::Unsubscribed,
        ] {
            assert_eq!(
                SubscriptionOp::from_presence_type(op.presence_type()),
                Some(op)
            );
        }
        assert_eq!(
            SubscriptionOp::from_presence_type(PresenceType::Probe),
            None
        );
        assert_eq!(
            SubscriptionOp::from_presence_type(PresenceType::Available),
            None
        );
    }

    #[test]
    fn apply_state_records_requests_and_items() {
        let mut roster = Roster::default();
        let jid = "romeo@example.net";
        let request = "<status>Hi</status>";

        let t = inbound(&ContactState::of(&roster, jid), SubscriptionOp::Subscribe);
        assert!(!apply_state(&mut roster, jid, &t.new_state, request));
        assert_eq!(
            roster.pending_in.get(jid).map(String::as_str),
            Some(request)
        );
        assert!(roster.items.is_empty());
        assert_eq!(roster.version, 0);
        assert_eq!(ContactState::of(&roster, jid), t.new_state);

        // A repeated request keeps the first payload.
        assert!(!apply_state(
            &mut roster,
            jid,
            &t.new_state,
            "<status>again</status>"
        ));
        assert_eq!(
            roster.pending_in.get(jid).map(String::as_str),
            Some(request)
        );

        let t = outbound(&ContactState::of(&roster, jid), SubscriptionOp::Subscribed);
        assert!(apply_state(&mut roster, jid, &t.new_state, ""));
        assert!(roster.pending_in.is_empty());
        assert_eq!(roster.version, 1);
        let item = &roster.items[jid];
        assert_eq!(item.subscription, Subscription::From);
        assert_eq!(ContactState::of(&roster, jid), t.new_state);
    }

    // -- Roster sets ---------------------------------------------------------------

    fn query(xml: &str) -> Element {
        Element::parse(xml.as_bytes(), NsContext::CLIENT).unwrap()
    }

    fn limits() -> RosterLimits {
        RosterLimits {
            max_items: 2,
            max_name_len: 8,
            max_group_len: 8,
            max_groups: 2,
        }
    }

    fn roster_with(jids: &[&str]) -> Roster {
        let mut roster = Roster::default();
        for jid in jids {
            roster.items.insert(
                jid.to_string(),
                RosterItem {
                    jid: jid.to_string(),
                    ..RosterItem::default()
                },
            );
        }
        roster
    }

    fn set(xml: &str, roster: &Roster) -> Result<RosterSet, StanzaError> {
        parse_roster_set(&query(xml), roster, &limits())
    }

    #[test]
    fn parses_roster_sets() {
        let roster = roster_with(&["nurse@example.com"]);
        assert_eq!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='Nurse@Example.com' name='Nurse'>\
                 <group>Servants</group><group>Staff</group></item></query>",
                &roster
            ),
            Ok(RosterSet::Update {
                jid: "nurse@example.com".into(),
                name: Some("Nurse".into()),
                groups: vec!["Servants".into(), "Staff".into()],
            })
        );
        // §2.1.5: subscription values other than "remove" are ignored, as are 'ask' and
        // 'approved' (subscriptions change only by presence); an empty name is none.
        assert_eq!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='romeo@example.net' name='' \
                 subscription='both' ask='subscribe' approved='true'/></query>",
                &roster
            ),
            Ok(RosterSet::Update {
                jid: "romeo@example.net".into(),
                name: None,
                groups: vec![],
            })
        );
        assert_eq!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='nurse@example.com' subscription='remove'/></query>",
                &roster
            ),
            Ok(RosterSet::Remove {
                jid: "nurse@example.com".into()
            })
        );
        // The user's own JID and domain JIDs are allowed.
        assert!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='juliet@example.com'/></query>",
                &roster
            )
            .is_ok()
        );
        assert!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='gateway.example.com'/></query>",
                &roster
            )
            .is_ok()
        );
        // A full roster still accepts updates of existing items.
        let full = roster_with(&["a@example.com", "b@example.com"]);
        assert!(
            set(
                "<query xmlns='jabber:iq:roster'><item jid='b@example.com' name='B'/></query>",
                &full
            )
            .is_ok()
        );
    }

    #[test]
    fn roster_set_errors() {
        use StanzaErrorCondition::*;
        let roster = roster_with(&["a@example.com"]);
        let full = roster_with(&["a@example.com", "b@example.com"]);
        let q = |inner: &str| format!("<query xmlns='jabber:iq:roster'>{inner}</query>");
        let cases: [(&str, String, &Roster, StanzaErrorCondition); 14] = [
            (
                "wrong payload",
                "<query xmlns='jabber:iq:private'/>".into(),
                &roster,
                BadRequest,
            ),
            ("no item", q(""), &roster, BadRequest),
            (
                "two items (§2.1.5)",
                q("<item jid='x@example.com'/><item jid='y@example.com'/>"),
                &roster,
                BadRequest,
            ),
            (
                "not an item",
                q("<thing jid='x@example.com'/>"),
                &roster,
                BadRequest,
            ),
            ("no jid", q("<item name='X'/>"), &roster, BadRequest),
            (
                "malformed jid",
                q("<item jid='@example.com'/>"),
                &roster,
                JidMalformed,
            ),
            (
                "full jid",
                q("<item jid='x@example.com/phone'/>"),
                &roster,
                BadRequest,
            ),
            (
                "remove unknown (§2.5.3)",
                q("<item jid='x@example.com' subscription='remove'/>"),
                &roster,
                ItemNotFound,
            ),
            (
                "name too long",
                q("<item jid='x@example.com' name='123456789'/>"),
                &roster,
                NotAcceptable,
            ),
            (
                "empty group",
                q("<item jid='x@example.com'><group/></item>"),
                &roster,
                NotAcceptable,
            ),
            (
                "group too long",
                q("<item jid='x@example.com'><group>123456789</group></item>"),
                &roster,
                NotAcceptable,
            ),
            (
                "duplicate group",
                q("<item jid='x@example.com'><group>G</group><group>G</group></item>"),
                &roster,
                BadRequest,
            ),
            (
                "too many groups",
                q(
                    "<item jid='x@example.com'><group>1</group><group>2</group><group>3</group></item>",
                ),
                &roster,
                NotAcceptable,
            ),
            (
                "roster full",
                q("<item jid='x@example.com'/>"),
                &full,
                NotAcceptable,
            ),
        ];
        for (what, xml, roster, want) in cases {
            let err = set(&xml, roster).expect_err(what);
            assert_eq!(err.condition, want, "{what}");
            assert_eq!(err.error_type, want.default_type(), "{what}");
        }
    }

    #[test]
    fn roster_set_from_an_iq_stanza() {
        let frame = Bytes::from_static(
            b"<iq from='juliet@example.com/balcony' id='ph1xaz53' type='set'>\
              <query xmlns='jabber:iq:roster'><item jid='nurse@example.com' name='Nurse'>\
              <group>Servants</group></item></query></iq>",
        );
        let Ok(TopLevel::Stanza(iq)) = parse_top_level(&frame, NsContext::CLIENT) else {
            panic!("not a stanza");
        };
        let payload = iq.iq_payload().unwrap().unwrap();
        let mut roster = Roster::default();
        let parsed = parse_roster_set(&payload, &roster, &RosterLimits::default()).unwrap();
        let applied = apply_roster_set(&mut roster, &parsed);
        // RFC 6121 §2.3.2, the push that follows this very roster set.
        assert_eq!(
            applied.push.unwrap().to_xml(ns::CLIENT),
            "<query xmlns='jabber:iq:roster' ver='1'><item jid='nurse@example.com' \
             name='Nurse' subscription='none'><group>Servants</group></item></query>"
        );
        assert!(applied.send.is_empty() && !applied.send_unavailable);
        assert_eq!(roster.items["nurse@example.com"].groups, ["Servants"]);

        // The same set again changes nothing: same version, nothing to push.
        let again = apply_roster_set(&mut roster, &parsed);
        assert_eq!(again.push, None);
        assert_eq!(roster.version, 1);
        // A different name is a change.
        let renamed = RosterSet::Update {
            jid: "nurse@example.com".into(),
            name: Some("Angelica".into()),
            groups: vec!["Servants".into()],
        };
        assert!(apply_roster_set(&mut roster, &renamed).push.is_some());
        assert_eq!(roster.version, 2);
    }

    #[test]
    fn removing_an_item_cancels_subscriptions() {
        let mut roster = roster_with(&["a@example.com", "b@example.com", "c@example.com"]);
        roster.items.get_mut("a@example.com").unwrap().subscription = Subscription::Both;
        roster.items.get_mut("b@example.com").unwrap().ask = true;
        roster
            .pending_in
            .insert("c@example.com".into(), String::new());
        let remove = |jid: &str| RosterSet::Remove { jid: jid.into() };

        let a = apply_roster_set(&mut roster, &remove("a@example.com"));
        assert_eq!(
            a.send,
            [SubscriptionOp::Unsubscribe, SubscriptionOp::Unsubscribed]
        );
        assert!(a.send_unavailable);
        assert_eq!(
            a.push.unwrap().to_xml(ns::CLIENT),
            "<query xmlns='jabber:iq:roster' ver='1'>\
             <item jid='a@example.com' subscription='remove'/></query>"
        );
        let b = apply_roster_set(&mut roster, &remove("b@example.com"));
        assert_eq!(b.send, [SubscriptionOp::Unsubscribe]);
        assert!(!b.send_unavailable);
        let c = apply_roster_set(&mut roster, &remove("c@example.com"));
        assert_eq!(c.send, [SubscriptionOp::Unsubscribed]);
        assert!(roster.items.is_empty() && roster.pending_in.is_empty());
        assert_eq!(roster.version, 3);
    }

    // -- Serialisation ---------------------------------------------------------------

    fn item(jid: &str) -> RosterItem {
        RosterItem {
            jid: jid.into(),
            ..RosterItem::default()
        }
    }

    #[test]
    fn items_serialise_as_in_rfc_6121() {
        // §2.1.4 (roster result).
        let romeo = RosterItem {
            name: Some("Romeo".into()),
            groups: vec!["Friends".into()],
            subscription: Subscription::Both,
            ..item("romeo@example.net")
        };
        // §3.1.2 (push after an outbound subscribe).
        let asked = RosterItem {
            ask: true,
            ..item("contact@example.org")
        };
        // §3.4 (push after a pre-approval).
        let approved = RosterItem {
            approved: true,
            ..item("contact@example.org")
        };
        let name_escaped = RosterItem {
            name: Some("R&J's".into()),
            subscription: Subscription::To,
            ..item("x@example.com")
        };
        let cases = [
            (
                romeo,
                "<item jid='romeo@example.net' name='Romeo' subscription='both'>\
                 <group>Friends</group></item>",
            ),
            (
                asked,
                "<item ask='subscribe' jid='contact@example.org' subscription='none'/>",
            ),
            (
                approved,
                "<item approved='true' jid='contact@example.org' subscription='none'/>",
            ),
            (
                name_escaped,
                "<item jid='x@example.com' name='R&amp;J&apos;s' subscription='to'/>",
            ),
        ];
        for (item, want) in cases {
            assert_eq!(item_element(&item).to_xml(ROSTER), want);
        }
    }

    /// Reads an item back the way a client would.
    fn parse_item(el: &Element) -> RosterItem {
        RosterItem {
            jid: el.get_attr("jid").unwrap().into(),
            name: el.get_attr("name").map(Into::into),
            groups: el
                .elements()
                .filter(|g| g.is("group", ROSTER))
                .map(Element::text_content)
                .collect(),
            subscription: Subscription::from_name(el.get_attr("subscription").unwrap()).unwrap(),
            ask: el.get_attr("ask") == Some("subscribe"),
            approved: el.get_attr("approved") == Some("true"),
        }
    }

    fn sample_roster() -> Roster {
        let mut roster = Roster {
            version: 42,
            ..Roster::default()
        };
        for it in [
            RosterItem {
                name: Some("Nurse".into()),
                groups: vec!["Servants".into(), "<Staff>".into()],
                ..item("nurse@example.com")
            },
            RosterItem {
                subscription: Subscription::From,
                ask: true,
                ..item("romeo@example.net")
            },
            RosterItem {
                approved: true,
                subscription: Subscription::To,
                ..item("tybalt@example.org")
            },
        ] {
            roster.items.insert(it.jid.clone(), it);
        }
        roster
    }

    #[test]
    fn roster_result_round_trips() {
        let roster = sample_roster();
        let result = roster_result(&roster, None).unwrap();
        let xml = result.to_xml(ns::CLIENT);
        assert!(xml.starts_with("<query xmlns='jabber:iq:roster' ver='42'><item "));
        let parsed = Element::parse(xml.as_bytes(), NsContext::CLIENT).unwrap();
        assert_eq!(parsed, result);
        let items: Vec<RosterItem> = parsed.elements().map(parse_item).collect();
        assert_eq!(items, roster.items.values().cloned().collect::<Vec<_>>());

        // What a client sends back for an item it received is accepted unchanged.
        for it in roster.items.values() {
            let q = Element::new("query", ROSTER).child(item_element(it));
            let reparsed =
                Element::parse(q.to_xml(ns::CLIENT).as_bytes(), NsContext::CLIENT).unwrap();
            assert_eq!(
                parse_roster_set(&reparsed, &roster, &RosterLimits::default()),
                Ok(RosterSet::Update {
                    jid: it.jid.clone(),
                    name: it.name.clone(),
                    groups: it.groups.clone(),
                })
            );
        }
    }

    #[test]
    fn roster_versioning() {
        let roster = sample_roster();
        // §2.6.3: the client's version is current, so the result is empty.
        assert_eq!(roster_result(&roster, Some("42")), None);
        // No version, an empty one (versioning without a cache) or a stale one: the
        // whole roster with the current version.
        for ver in [None, Some(""), Some("41"), Some("ver11")] {
            let q = roster_result(&roster, ver).expect("full roster");
            assert_eq!(q.get_attr("ver"), Some("42"));
            assert_eq!(q.elements().count(), 3);
        }
        let empty = roster_result(&Roster::default(), None).unwrap();
        assert_eq!(
            empty.to_xml(ns::CLIENT),
            "<query xmlns='jabber:iq:roster' ver='0'/>"
        );
        assert_eq!(
            roster_push(
                roster.items.get("tybalt@example.org"),
                "tybalt@example.org",
                43
            )
            .to_xml(ns::CLIENT),
            "<query xmlns='jabber:iq:roster' ver='43'>\
             <item approved='true' jid='tybalt@example.org' subscription='to'/></query>"
        );
    }
}
