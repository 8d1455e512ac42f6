//! A room as stored records ([`crate::storage::RoomStore`]) and a room restored from
//! them. Both records are XML in the `jabber:client` namespace, so an occupant's
//! presence payload is stored exactly as it is broadcast:
//!
//! - the state: `<room [locked='1']><x xmlns='jabber:x:data' type='form'>…</x><affiliation
//!   jid='…' value='…'/>…<subject nick='…'>…</subject></room>`, the configuration as
//!   the room's own configuration form, read back through the form's submission;
//! - an occupant: `<occupant nick='…' role='…'>presence payload</occupant>`, keyed by
//!   its real JID.
//!
//! The discussion history is not stored: it is the recent past of a live room.

use bytes::Bytes;
use jid::{BareJid, FullJid};
use shoal_xmpp::ns;
use shoal_xmpp::xml::{Element, Node, NsContext, parse_fragment};

use super::{Affiliation, NS_DATA, Occupant, Role, Room};
use crate::router::Home;
use crate::storage::{Storage, StorageError, StoredRoom};
use crate::user::Write;

impl Room {
    /// The storage writes for what changed since the last call, in order.
    pub fn writes(&mut self) -> Vec<Write> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::new();
        if dirty.state {
            out.push(Write::RoomState {
                state: self.state_record(),
                listed: (!self.config.hidden).then(|| self.name().to_owned()),
            });
        }
        for jid in dirty.occupants {
            let record = self
                .position(&jid)
                .map(|i| occupant_record(&self.occupants[i]));
            out.push(Write::RoomOccupant(jid.to_string(), record));
        }
        out
    }

    fn state_record(&self) -> String {
        let mut room = Element::new("room", ns::CLIENT);
        if self.locked {
            room = room.attr("locked", "1");
        }
        room = room.child(self.config.form());
        let mut affiliations: Vec<_> = self.affiliations.iter().collect();
        affiliations.sort_by_key(|(jid, _)| jid.as_str());
        for (jid, affiliation) in affiliations {
            room = room.child(
                Element::new("affiliation", ns::CLIENT)
                    .attr("jid", jid.as_str())
                    .attr("value", affiliation.as_str()),
            );
        }
        if let Some((nick, text)) = &self.subject {
            room = room.child(
                Element::new("subject", ns::CLIENT)
                    .attr("nick", nick.clone())
                    .text(text.clone()),
            );
        }
        room.to_xml(ns::CLIENT)
    }

    /// The room `stored` describes, with the stored occupants whose sessions are still
    /// there, where `session` finds them; the others are written away.
    pub fn restore(
        jid: BareJid,
        presence_max: usize,
        stored: &StoredRoom,
        session: impl Fn(&FullJid) -> Option<Home>,
    ) -> Result<Room, String> {
        let mut room = Room::new(jid, presence_max);
        room.new = false;
        let state = Element::parse(stored.state.as_bytes(), NsContext::CLIENT)
            .map_err(|e| format!("room record: {e}"))?;
        room.locked = state.get_attr("locked") == Some("1");
        for child in state.elements() {
            match child.name.as_str() {
                "x" if child.ns == NS_DATA => room
                    .config
                    .submit(child)
                    .map_err(|c| format!("room configuration: {c:?}"))?,
                "affiliation" => {
                    let jid = child
                        .get_attr("jid")
                        .and_then(|j| j.parse::<BareJid>().ok());
                    let value = child.get_attr("value").and_then(Affiliation::parse);
                    let (Some(jid), Some(value)) = (jid, value) else {
                        return Err("room record: bad affiliation".to_owned());
                    };
                    room.affiliations.insert(jid, value);
                }
                "subject" => {
                    let nick = child.get_attr("nick").unwrap_or_default().to_owned();
                    room.subject = Some((nick, child.text_content()));
                }
                _ => {}
            }
        }
        for (jid, record) in &stored.occupants {
            let Ok(jid) = jid.parse::<FullJid>() else {
                return Err(format!("occupant record key {jid:?} is not a full JID"));
            };
            match (session(&jid), occupant_from(jid.clone(), record, &room)) {
                (Some(home), Some(occupant)) => {
                    room.occupants.push(occupant);
                    room.homes.insert(jid, home);
                }
                (Some(_), None) => {
                    tracing::warn!(room = %room.jid, occupant = %jid, "unreadable occupant record dropped");
                    room.touch(&jid);
                }
                (None, _) => room.touch(&jid),
            }
        }
        Ok(room)
    }
}

fn occupant_record(o: &Occupant) -> String {
    let mut occupant = Element::new("occupant", ns::CLIENT)
        .attr("nick", o.nick.clone())
        .attr("role", o.role.as_str());
    if let Ok(nodes) = parse_fragment(&o.presence, ns::CLIENT) {
        occupant.children = nodes;
    }
    occupant.to_xml(ns::CLIENT)
}

fn occupant_from(jid: FullJid, record: &str, room: &Room) -> Option<Occupant> {
    let e = Element::parse(record.as_bytes(), NsContext::CLIENT).ok()?;
    let role = Role::parse(e.get_attr("role")?)?;
    let mut presence = String::new();
    for child in &e.children {
        if let Node::Element(c) = child {
            c.write_to(&mut presence, ns::CLIENT);
        }
    }
    Some(Occupant {
        nick: e.get_attr("nick")?.to_owned(),
        affiliation: room.affiliation(&jid.to_bare()),
        jid,
        role,
        presence: Bytes::from(presence),
    })
}

/// A single node starting again: no session of the last run survives, so stored rooms
/// have no occupant left and the temporary ones are gone (and no longer listed).
pub async fn after_restart(storage: &Storage) -> Result<(), StorageError> {
    let mut cleared = 0;
    for (jid, _) in storage.rooms.rooms().await? {
        let (Ok(bare), Some(stored)) = (jid.parse::<BareJid>(), storage.rooms.room(&jid).await?)
        else {
            continue;
        };
        let Ok(mut room) = Room::restore(bare, 0, &stored, |_| None) else {
            // Left as it is for an operator to look at; loading it reports it again.
            tracing::warn!(room = %jid, "unreadable room record left alone");
            continue;
        };
        let writes = room.writes();
        if room.can_vanish() {
            storage.rooms.delete_room(&jid).await?;
        } else if writes.is_empty() {
            continue;
        } else {
            for write in writes {
                if let Write::RoomOccupant(occupant, None) = write {
                    storage.rooms.set_occupant(&jid, &occupant, None).await?;
                }
            }
        }
        cleared += 1;
    }
    if cleared > 0 {
        tracing::info!(
            rooms = cleared,
            "rooms of the last run cleared of their occupants"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::forward::NodeId;
    use crate::muc::tests::{room, stanza};

    /// What a room's writes leave in storage, applied in order.
    fn stored(writes: Vec<Write>, into: &mut StoredRoom) {
        for w in writes {
            match w {
                Write::RoomState { state, .. } => into.state = state,
                Write::RoomOccupant(jid, record) => {
                    into.occupants.retain(|(j, _)| *j != jid);
                    if let Some(record) = record {
                        into.occupants.push((jid, record));
                    }
                }
                other => panic!("not a room write: {other:?}"),
            }
        }
    }

    #[test]
    fn a_room_comes_back_from_its_records() {
        let mut original = room();
        for xml in [
            // A configured, persistent, hidden room with a member and a subject.
            "<iq type='set' id='c' from='a@localhost/x' to='coven@conference.localhost'>\
             <query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>\
             <field var='muc#roomconfig_roomname'><value>The Coven</value></field>\
             <field var='muc#roomconfig_persistentroom'><value>1</value></field>\
             <field var='muc#roomconfig_publicroom'><value>0</value></field></x></query></iq>",
            "<iq type='set' id='m' from='a@localhost/x' to='coven@conference.localhost'>\
             <query xmlns='http://jabber.org/protocol/muc#admin'>\
             <item jid='c@localhost' affiliation='member'/></query></iq>",
            "<message type='groupchat' from='a@localhost/x' to='coven@conference.localhost'>\
             <subject>Spells &amp; more</subject></message>",
            "<presence from='b@localhost/y' to='coven@conference.localhost/second'>\
             <show>away</show><status>brewing</status></presence>",
        ] {
            original.handle(stanza(xml), 0);
        }
        let mut records = StoredRoom::default();
        stored(original.writes(), &mut records);
        assert_eq!(records.occupants.len(), 2);
        assert!(original.writes().is_empty(), "nothing changed since");

        // Only b's session is still there.
        let jid: BareJid = "coven@conference.localhost".parse().unwrap();
        let b: FullJid = "b@localhost/y".parse().unwrap();
        let node = NodeId::new("node1").unwrap();
        let home = || Home::Node(node.clone());
        let mut back = Room::restore(jid, 0, &records, |o| (*o == b).then(home)).unwrap();
        assert!(matches!(back.home(&b), Some(Home::Node(n)) if *n == node));
        assert_eq!(back.config, original.config);
        assert_eq!(back.affiliations, original.affiliations);
        assert_eq!(back.subject, original.subject);
        assert_eq!(back.occupants.len(), 1);
        let (was, is) = (&original.occupants[1], &back.occupants[0]);
        assert_eq!(
            (&is.nick, &is.jid, is.role, is.affiliation, &is.presence),
            (
                &was.nick,
                &was.jid,
                was.role,
                was.affiliation,
                &was.presence
            )
        );
        // The occupant that is gone is removed from storage.
        let writes = back.writes();
        assert_eq!(
            writes,
            [Write::RoomOccupant("a@localhost/x".to_owned(), None)]
        );
    }
}
