//! Who sits in which room in the `muc` scenario, and the XEP-0045 stanzas that get
//! them there, sans-IO: plain functions over indices, JIDs and parsed stanzas.
//!
//! Client `i` joins room `i / occupants`, named `{prefix}room{r}` (lowercased, as
//! servers normalise room names) on the MUC service, with its username as nick. The
//! first client of a room creates it; servers that lock a new room until its owner
//! configures it (ejabberd, Prosody) are given the instant-room form (§10.1.2) before
//! anyone else joins. This module never does I/O; `session` and `scenario` send what it
//! builds.

use shoal_xmpp::stanza::{Kind, PresenceType, Stanza};
use shoal_xmpp::xml::escape;

use crate::negotiate::stanza_error_condition;

/// `http://jabber.org/protocol/muc`: the join element.
pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
/// `http://jabber.org/protocol/muc#user`: occupant items and status codes.
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
/// `http://jabber.org/protocol/muc#owner`: room configuration.
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const NS_DATA: &str = "jabber:x:data";

/// The bare JID of room `room` of a run whose usernames start with `prefix`.
pub fn room_jid(prefix: &str, room: usize, service: &str) -> String {
    format!("{prefix}room{room}@{service}").to_lowercase()
}

/// The room client `index` joins when every room holds `occupants` clients.
pub fn room_of(index: usize, occupants: usize) -> usize {
    index / occupants
}

/// The join presence (§7.2.2) for `room` (bare JID) under `nick`, asking for no
/// discussion history, so only the run's own messages are counted.
pub fn join(room: &str, nick: &str) -> String {
    format!(
        "<presence to='{}/{}'><x xmlns='{NS_MUC}'><history maxstanzas='0'/></x></presence>",
        escape(room),
        escape(nick)
    )
}

/// The owner's acceptance of the default configuration of a new room (§10.1.2, the
/// instant room), as an iq with id `id`.
pub fn instant_room(room: &str, id: &str) -> String {
    format!(
        "<iq type='set' to='{}' id='{}'><query xmlns='{NS_MUC_OWNER}'><x xmlns='{NS_DATA}' type='submit'/></query></iq>",
        escape(room),
        escape(id)
    )
}

/// Whether a presence stanza comes from a MUC room (it carries a `muc#user` element),
/// without parsing it: occupants' presence is most of a join's traffic.
pub fn from_room(presence: &Stanza) -> bool {
    mentions(&presence.payload, NS_MUC_USER)
}

fn mentions(payload: &[u8], text: &str) -> bool {
    payload.windows(text.len()).any(|w| w == text.as_bytes())
}

/// What a presence from a room the client is joining says about the join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinAnswer {
    /// The client's own presence in the room (status 110); `created` when the room was
    /// new (status 201), so the client is its owner and must configure it.
    Entered { created: bool },
    /// The room refused the join: the error's defined condition.
    Refused(String),
}

/// How `presence` answers a join of its sender's room; `None` for another occupant's
/// presence.
pub fn join_answer(presence: &Stanza) -> Option<JoinAnswer> {
    match presence.kind {
        Kind::Presence(PresenceType::Error) => {
            Some(JoinAnswer::Refused(stanza_error_condition(presence)))
        }
        Kind::Presence(PresenceType::Available) => {
            // Most presence a joining client sees is other occupants', without a 110:
            // only a payload that mentions one is parsed.
            if !mentions(&presence.payload, "110") {
                return None;
            }
            let elements = presence.payload_elements().ok()?;
            let x = elements.iter().find(|e| e.is("x", NS_MUC_USER))?;
            let has = |code: &str| {
                x.elements()
                    .any(|s| s.is("status", NS_MUC_USER) && s.get_attr("code") == Some(code))
            };
            has("110").then(|| JoinAnswer::Entered {
                created: has("201"),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::stanza;

    #[test]
    fn rooms_and_stanzas() {
        assert_eq!(
            room_jid("Load", 3, "conference.localhost"),
            "loadroom3@conference.localhost"
        );
        assert_eq!(
            (room_of(0, 100), room_of(99, 100), room_of(100, 100)),
            (0, 0, 1)
        );
        assert_eq!(
            join("r@c.l", "a'b"),
            "<presence to='r@c.l/a&apos;b'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='0'/></x></presence>"
        );
        let iq = stanza(&instant_room("r@c.l", "cfg"));
        assert_eq!(iq.id.as_deref(), Some("cfg"));
        let query = iq.iq_payload().unwrap().unwrap();
        assert!(query.is("query", NS_MUC_OWNER));
        let x = query.get_child("x", NS_DATA).unwrap();
        assert_eq!(x.get_attr("type"), Some("submit"));
    }

    #[test]
    fn reads_join_answers() {
        let own = |codes: &str| {
            stanza(&format!(
                "<presence from='r@c.l/me'><x xmlns='{NS_MUC_USER}'><item affiliation='owner' role='moderator'/>{codes}</x></presence>"
            ))
        };
        let created = own("<status code='110'/><status code='201'/>");
        assert!(from_room(&created));
        assert_eq!(
            join_answer(&created),
            Some(JoinAnswer::Entered { created: true })
        );
        assert_eq!(
            join_answer(&own("<status code='100'/><status code='110'/>")),
            Some(JoinAnswer::Entered { created: false })
        );
        // Another occupant's presence says nothing about our join.
        assert_eq!(join_answer(&own("")), None);
        let plain = stanza("<presence from='a@l/r'><status>hi</status></presence>");
        assert!(!from_room(&plain));
        assert_eq!(join_answer(&plain), None);
        let refused = stanza(
            "<presence from='r@c.l/me' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>",
        );
        assert_eq!(
            join_answer(&refused),
            Some(JoinAnswer::Refused("item-not-found".into()))
        );
    }
}
