//! The state of one user account that is online: its bound sessions and their presence,
//! and the RFC 6121 §8 rules for delivering stanzas addressed to the account.
//!
//! This is a plain struct: [`UserState`] methods take an input and return [`Effect`]s
//! for the shard actor to carry out, so every rule is unit-tested without actix. It is
//! owned by exactly one shard actor (DESIGN.md invariant 2) and never talks to a socket,
//! storage or another actor itself. `H` is the handle of a session (an actor address at
//! run time, a plain number in tests).

use jid::{BareJid, FullJid, Jid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::stanza::{IqType, Kind, MessageType, PresenceType, Stanza};

/// Identifies one binding of a resource, so a late unbind from a replaced session does
/// not remove its replacement.
pub type SessionId = u64;

#[derive(Debug, Clone)]
struct SessionEntry<H> {
    jid: FullJid,
    id: SessionId,
    handle: H,
    /// The session has sent available presence (and not unavailable since).
    available: bool,
    priority: i8,
}

/// What the shard actor must do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect<H> {
    /// Write this stanza to each of these sessions.
    Deliver(Vec<H>, Stanza),
    /// Route this stanza (an error or a reply) back into the server.
    Route(Stanza),
    /// This session was replaced by a new binding of the same full JID: close it with
    /// `<conflict/>`.
    Replaced(H),
}

/// One online account.
#[derive(Debug)]
pub struct UserState<H> {
    bare: BareJid,
    sessions: Vec<SessionEntry<H>>,
}

impl<H: Clone + PartialEq> UserState<H> {
    pub fn new(bare: BareJid) -> Self {
        Self {
            bare,
            sessions: Vec::new(),
        }
    }

    /// No session left: the shard may drop this state.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Binds `resource` for a new session. A session already bound to the same full JID
    /// is replaced (RFC 6120 §7.7.2.2, the "override" policy).
    pub fn bind(
        &mut self,
        resource: &str,
        id: SessionId,
        handle: H,
        max_resources: usize,
    ) -> Result<(FullJid, Vec<Effect<H>>), StanzaError> {
        let jid = self
            .bare
            .with_resource_str(resource)
            .map_err(|_| StanzaError::new(StanzaErrorCondition::BadRequest))?;
        let mut effects = Vec::new();
        if let Some(pos) = self.sessions.iter().position(|s| s.jid == jid) {
            let old = self.sessions.remove(pos);
            effects.push(Effect::Replaced(old.handle));
            // The replaced session vanishes for the user's other resources too.
            if old.available {
                effects.extend(self.broadcast_own(unavailable_from(&old.jid)));
            }
        } else if self.sessions.len() >= max_resources {
            return Err(StanzaError::with_text(
                StanzaErrorCondition::ResourceConstraint,
                "too many resources bound for this account",
            ));
        }
        self.sessions.push(SessionEntry {
            jid: jid.clone(),
            id,
            handle,
            available: false,
            priority: 0,
        });
        Ok((jid, effects))
    }

    /// The session ended. Returns the unavailable broadcast owed to the other resources.
    pub fn unbind(&mut self, jid: &FullJid, id: SessionId) -> Vec<Effect<H>> {
        let Some(pos) = self
            .sessions
            .iter()
            .position(|s| &s.jid == jid && s.id == id)
        else {
            return Vec::new();
        };
        let old = self.sessions.remove(pos);
        if old.available {
            self.broadcast_own(unavailable_from(&old.jid))
        } else {
            Vec::new()
        }
    }

    /// Removes a session whose mailbox is gone (its actor stopped without unbinding).
    pub fn remove_handle(&mut self, handle: &H) -> Vec<Effect<H>> {
        match self.sessions.iter().find(|s| &s.handle == handle) {
            Some(s) => {
                let (jid, id) = (s.jid.clone(), s.id);
                self.unbind(&jid, id)
            }
            None => Vec::new(),
        }
    }

    /// Presence with no `to` from one of this user's sessions: its broadcast presence
    /// (RFC 6121 §4.2, §4.4, §4.5). The user's own available resources, including the
    /// sender, receive it. Subscriptions and contacts come with the roster.
    pub fn own_presence(&mut self, from: &FullJid, stanza: Stanza) -> Vec<Effect<H>> {
        let Some(entry) = self.sessions.iter_mut().find(|s| &s.jid == from) else {
            return Vec::new();
        };
        match stanza.kind {
            Kind::Presence(PresenceType::Available) => {
                entry.available = true;
                entry.priority = stanza.priority();
            }
            Kind::Presence(PresenceType::Unavailable) => {
                if !entry.available {
                    return Vec::new();
                }
                let recipients = self.available_handles();
                self.sessions
                    .iter_mut()
                    .filter(|s| &s.jid == from)
                    .for_each(|s| s.available = false);
                return vec![Effect::Deliver(recipients, stanza)];
            }
            // Subscription management and probes need the roster; until then they are
            // not handled for the user's own account.
            _ => return Vec::new(),
        }
        self.broadcast_own(stanza)
    }

    /// A stanza addressed to this account (bare JID) or one of its resources (full JID),
    /// following RFC 6121 §8.5.
    pub fn deliver(&mut self, stanza: Stanza) -> Vec<Effect<H>> {
        let to_full = stanza
            .to
            .as_ref()
            .and_then(|t| t.try_as_full().ok().cloned());
        match to_full {
            Some(full) => self.deliver_to_full(&full, stanza),
            None => self.deliver_to_bare(stanza),
        }
    }

    /// RFC 6121 §8.5.3.
    fn deliver_to_full(&mut self, full: &FullJid, stanza: Stanza) -> Vec<Effect<H>> {
        if let Some(s) = self.sessions.iter().find(|s| &s.jid == full) {
            return vec![Effect::Deliver(vec![s.handle.clone()], stanza)];
        }
        match stanza.kind {
            // §8.5.3.2.1: no such resource — normal, chat and headline messages are
            // treated as if sent to the bare JID; groupchat gets an error.
            Kind::Message(MessageType::Normal | MessageType::Chat | MessageType::Headline) => {
                self.deliver_to_bare(stanza)
            }
            Kind::Message(MessageType::Groupchat) => bounce(&stanza),
            // §8.5.3.2.2: subscription-related presence is handled as to the bare JID;
            // other presence is silently ignored.
            Kind::Presence(
                PresenceType::Subscribe
                | PresenceType::Subscribed
                | PresenceType::Unsubscribe
                | PresenceType::Unsubscribed,
            ) => self.deliver_to_bare(stanza),
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
                    .filter(|s| s.available && s.priority >= 0)
                    .map(|s| s.priority)
                    .max();
                match best {
                    Some(p) => {
                        let to = self
                            .sessions
                            .iter()
                            .filter(|s| s.available && s.priority == p)
                            .map(|s| s.handle.clone())
                            .collect();
                        vec![Effect::Deliver(to, stanza)]
                    }
                    // No available resource: offline storage comes with the IM work;
                    // until then the sender learns the message was not delivered.
                    None => bounce(&stanza),
                }
            }
            Kind::Message(MessageType::Headline) => {
                let to: Vec<H> = self
                    .sessions
                    .iter()
                    .filter(|s| s.available && s.priority >= 0)
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
            // Probes are answered by the server, never shown to clients (RFC 6121
            // §4.3.2); answering needs the roster's subscription state, so until then
            // they are consumed.
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
            // §8.5.2.1.3: the server answers iqs to the bare JID on the account's behalf;
            // no account namespace is served yet.
            Kind::Iq(IqType::Get | IqType::Set) => bounce(&stanza),
            Kind::Iq(_) => Vec::new(),
        }
    }

    /// Every bound session.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.sessions.iter().map(|s| &s.handle)
    }

    fn available_handles(&self) -> Vec<H> {
        self.sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| s.handle.clone())
            .collect()
    }

    fn broadcast_own(&self, stanza: Stanza) -> Vec<Effect<H>> {
        let to = self.available_handles();
        if to.is_empty() {
            Vec::new()
        } else {
            vec![Effect::Deliver(to, stanza)]
        }
    }
}

fn unavailable_from(jid: &FullJid) -> Stanza {
    let mut p = Stanza::new(Kind::Presence(PresenceType::Unavailable));
    p.from = Some(Jid::from(jid.clone()));
    p
}

/// `<service-unavailable/>` back to the sender (RFC 6121 §8.5.2.2, §8.5.3.2).
fn bounce<H>(stanza: &Stanza) -> Vec<Effect<H>> {
    stanza
        .error_reply(&StanzaError::new(StanzaErrorCondition::ServiceUnavailable))
        .map(Effect::Route)
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_xmpp::stanza::{TopLevel, parse_top_level};
    use shoal_xmpp::xml::NsContext;

    fn stanza(xml: &str) -> Stanza {
        match parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT) {
            Ok(TopLevel::Stanza(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    fn full(s: &str) -> FullJid {
        FullJid::new(s).unwrap()
    }

    /// juliet with resources a (prio 1), b (prio 5), c (prio -1), d (bound, no presence).
    fn juliet() -> UserState<u32> {
        let mut u = UserState::new(BareJid::new("juliet@localhost").unwrap());
        for (i, (r, prio)) in [("a", Some(1)), ("b", Some(5)), ("c", Some(-1)), ("d", None)]
            .into_iter()
            .enumerate()
        {
            let (jid, _) = u.bind(r, i as u64, i as u32, 10).unwrap();
            if let Some(p) = prio {
                u.own_presence(
                    &jid,
                    stanza(&format!("<presence><priority>{p}</priority></presence>")),
                );
            }
        }
        u
    }

    fn delivered_to(effects: &[Effect<u32>]) -> Vec<u32> {
        match effects {
            [Effect::Deliver(to, _)] => to.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn bounced(effects: &[Effect<u32>]) -> String {
        match effects {
            [Effect::Route(s)] => s.to_xml(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bare_chat_goes_to_highest_non_negative_priority() {
        let mut u = juliet();
        let e = u.deliver(stanza("<message from='romeo@localhost/x' to='juliet@localhost' type='chat'><body>hi</body></message>"));
        assert_eq!(delivered_to(&e), vec![1]);
    }

    #[test]
    fn equal_priorities_all_receive() {
        let mut u = juliet();
        u.own_presence(
            &full("juliet@localhost/a"),
            stanza("<presence><priority>5</priority></presence>"),
        );
        let e = u.deliver(stanza(
            "<message to='juliet@localhost'><body>hi</body></message>",
        ));
        assert_eq!(delivered_to(&e), vec![0, 1]);
    }

    #[test]
    fn only_negative_or_unavailable_resources_bounce() {
        let mut u = UserState::new(BareJid::new("juliet@localhost").unwrap());
        let (c, _) = u.bind("c", 1, 7u32, 10).unwrap();
        u.own_presence(&c, stanza("<presence><priority>-1</priority></presence>"));
        u.bind("d", 2, 8, 10).unwrap();
        let e = u.deliver(stanza(
            "<message from='romeo@localhost/x' to='juliet@localhost' id='m1' type='chat'><body>hi</body></message>",
        ));
        assert_eq!(
            bounced(&e),
            "<message to='romeo@localhost/x' from='juliet@localhost' id='m1' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        );
        // A negative-priority resource still gets messages to its full JID.
        let e = u.deliver(stanza(
            "<message to='juliet@localhost/c'><body>hi</body></message>",
        ));
        assert_eq!(delivered_to(&e), vec![7]);
    }

    #[test]
    fn full_jid_rules() {
        let mut u = juliet();
        // Existing resource, even with negative priority or no presence.
        assert_eq!(
            delivered_to(&u.deliver(stanza("<message to='juliet@localhost/d'/>"))),
            vec![3]
        );
        // Unknown resource: chat falls back to the bare JID.
        assert_eq!(
            delivered_to(&u.deliver(stanza("<message to='juliet@localhost/zz' type='chat'/>"))),
            vec![1]
        );
        // Unknown resource: groupchat and iq bounce, presence is ignored.
        assert!(
            bounced(&u.deliver(stanza(
                "<message from='r@localhost/x' to='juliet@localhost/zz' type='groupchat'/>"
            )))
            .contains("service-unavailable")
        );
        assert!(bounced(&u.deliver(stanza("<iq from='r@localhost/x' to='juliet@localhost/zz' id='1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"))).contains("service-unavailable"));
        assert!(
            u.deliver(stanza("<presence to='juliet@localhost/zz'/>"))
                .is_empty()
        );
        // Errors are never answered.
        assert!(
            u.deliver(stanza("<iq to='juliet@localhost/zz' id='1' type='error'/>"))
                .is_empty()
        );
        // iq to a bound resource passes through untouched.
        let iq = stanza(
            "<iq from='r@localhost/x' to='juliet@localhost/a' id='j1' type='set'><jingle xmlns='urn:xmpp:jingle:1' action='session-initiate'/></iq>",
        );
        match &u.deliver(iq.clone())[..] {
            [Effect::Deliver(to, s)] => {
                assert_eq!(to, &vec![0]);
                assert_eq!(s, &iq);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn headline_and_presence_go_to_all_available() {
        let mut u = juliet();
        assert_eq!(
            delivered_to(&u.deliver(stanza("<message to='juliet@localhost' type='headline'/>"))),
            vec![0, 1]
        );
        assert_eq!(
            delivered_to(&u.deliver(stanza(
                "<presence to='juliet@localhost' from='r@localhost/x'/>"
            ))),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn rebinding_replaces_and_limits_apply() {
        let mut u = juliet();
        let (_, effects) = u.bind("a", 10, 10, 10).unwrap();
        assert_eq!(effects[0], Effect::Replaced(0));
        // a was available, so the others learn it went away.
        assert!(
            matches!(&effects[1], Effect::Deliver(to, s) if to == &vec![1, 2] && s.kind == Kind::Presence(PresenceType::Unavailable))
        );
        // A late unbind of the replaced session does not remove the new one.
        assert!(u.unbind(&full("juliet@localhost/a"), 0).is_empty());
        assert_eq!(
            delivered_to(&u.deliver(stanza("<message to='juliet@localhost/a'/>"))),
            vec![10]
        );
        let err = u.bind("e", 11, 11, 4).unwrap_err();
        assert_eq!(err.condition, StanzaErrorCondition::ResourceConstraint);
    }

    #[test]
    fn unavailable_broadcast_on_unbind() {
        let mut u = juliet();
        let e = u.unbind(&full("juliet@localhost/b"), 1);
        assert!(
            matches!(&e[..], [Effect::Deliver(to, s)] if to == &vec![0, 2] && s.from.as_ref().unwrap().as_str() == "juliet@localhost/b")
        );
        assert!(u.unbind(&full("juliet@localhost/d"), 3).is_empty());
        u.unbind(&full("juliet@localhost/a"), 0);
        u.unbind(&full("juliet@localhost/c"), 2);
        assert!(u.is_empty());
    }
}
