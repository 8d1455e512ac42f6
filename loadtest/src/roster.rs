//! Who is whose contact in the presence scenarios, and the roster stanzas that set it
//! up, sans-IO: plain functions over indices, JIDs and parsed stanzas.
//!
//! The contact graph is a ring: client `i` of `n` has the `k` clients nearest to it
//! (`i±1`, `i±2`, … and, when `k` is odd, the one opposite `i+n/2`). The graph is
//! symmetric, so every contact can be mutual (`subscription='both'`) and every client
//! has exactly `k` contacts: each presence update fans out to `k` sessions, and each
//! roster holds `k` items. This module never does I/O; `scenario` sends what it builds.

use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, Stanza};
use shoal_xmpp::xml::escape;

/// Why `k` contacts cannot be laid out symmetrically among `n` clients, if they cannot.
pub fn check(n: usize, k: usize) -> Result<(), String> {
    if k == 0 || k >= n {
        return Err(format!(
            "--contacts must be between 1 and --clients - 1 ({})",
            n.saturating_sub(1)
        ));
    }
    if k % 2 == 1 && n % 2 == 1 {
        // Each client needs k contacts and each contact pair uses two of the n*k
        // endpoints, so n*k must be even.
        return Err("an odd --contacts needs an even --clients".into());
    }
    Ok(())
}

/// The contacts of client `i` among `n`, in ring order from `i`. [`check`] must hold.
pub fn contacts(i: usize, n: usize, k: usize) -> Vec<usize> {
    debug_assert!(check(n, k).is_ok() && i < n);
    let mut out = Vec::with_capacity(k);
    for d in 1..=k / 2 {
        out.push((i + d) % n);
        out.push((i + n - d) % n);
    }
    if k % 2 == 1 {
        out.push((i + n / 2) % n);
    }
    out
}

/// The subscription state of one roster item (RFC 6121 §2.1.2.5), as two directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterItem {
    pub jid: String,
    /// We receive the contact's presence (`to` or `both`).
    pub to: bool,
    /// The contact receives ours (`from` or `both`).
    pub from: bool,
}

impl RosterItem {
    pub fn both(&self) -> bool {
        self.to && self.from
    }
}

/// The roster request with id `id`.
pub fn roster_get(id: &str) -> String {
    format!(
        "<iq type='get' id='{}'><query xmlns='{}'/></iq>",
        escape(id),
        ns::ROSTER
    )
}

/// The items of a roster result; `None` when the stanza is not one (an error reply).
pub fn parse_roster(stanza: &Stanza) -> Option<Vec<RosterItem>> {
    if stanza.kind != Kind::Iq(IqType::Result) {
        return None;
    }
    let query = stanza.iq_payload().ok()??;
    if !query.is("query", ns::ROSTER) {
        return None;
    }
    Some(
        query
            .elements()
            .filter(|e| e.is("item", ns::ROSTER))
            .filter_map(|e| {
                let sub = e.get_attr("subscription").unwrap_or("none");
                Some(RosterItem {
                    jid: e.get_attr("jid")?.to_owned(),
                    to: matches!(sub, "to" | "both"),
                    from: matches!(sub, "from" | "both"),
                })
            })
            .collect(),
    )
}

/// What one client still lacks of its contacts, and the stanzas that ask for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    pub stanzas: String,
    pub subscribe: u64,
    pub subscribed: u64,
    /// Contacts not yet `both`.
    pub contacts: u64,
}

/// What one client must still send so every contact in `wanted` (bare JIDs) becomes
/// mutual, given its current roster: `subscribe` where it lacks the contact's presence,
/// `subscribed` where the contact lacks its own (approving a pending request, or
/// pre-approving one still on its way, RFC 6121 §3.4).
///
/// Sending both kinds at once, without waiting for the requests to arrive, is what lets
/// provisioning finish in a few round trips; a server without pre-approval ignores the
/// early `subscribed`, and the request is then answered when it arrives.
pub fn missing(roster: &[RosterItem], wanted: &[String]) -> Missing {
    let mut m = Missing::default();
    for jid in wanted {
        let item = roster.iter().find(|r| r.jid == *jid);
        let (to, from) = item.map_or((false, false), |r| (r.to, r.from));
        if to && from {
            continue;
        }
        m.contacts += 1;
        let jid = escape(jid);
        if !to {
            m.subscribe += 1;
            m.stanzas
                .push_str(&format!("<presence to='{jid}' type='subscribe'/>"));
        }
        if !from {
            m.subscribed += 1;
            m.stanzas.push_str(&approve(&jid));
        }
    }
    m
}

/// The answer approving a subscription request from `jid` (already escaped).
pub fn approve(jid: &str) -> String {
    format!("<presence to='{jid}' type='subscribed'/>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::stanza;

    #[test]
    fn ring_is_symmetric_with_exactly_k_contacts() {
        for (n, k) in [(6, 2), (6, 3), (10, 4), (7, 6), (2, 1), (100, 9)] {
            check(n, k).unwrap();
            for i in 0..n {
                let c = contacts(i, n, k);
                assert_eq!(c.len(), k, "n={n} k={k} i={i}");
                assert!(!c.contains(&i));
                let mut dedup = c.clone();
                dedup.sort();
                dedup.dedup();
                assert_eq!(dedup.len(), k, "distinct contacts n={n} k={k} i={i}");
                for j in c {
                    assert!(contacts(j, n, k).contains(&i), "{j} lists {i}");
                }
            }
        }
        assert_eq!(contacts(0, 6, 2), [1, 5]);
        assert_eq!(contacts(0, 6, 3), [1, 5, 3]);
        assert!(check(5, 3).is_err());
        assert!(check(5, 5).is_err());
        assert!(check(5, 0).is_err());
    }

    #[test]
    fn parses_rosters_and_lists_what_is_missing() {
        let r = stanza(
            "<iq type='result' id='r'><query xmlns='jabber:iq:roster' ver='1'>\
             <item jid='a@x' subscription='both'/><item jid='b@x' subscription='to'/>\
             <item jid='c@x' subscription='from' ask='subscribe'/><item jid='d@x'/>\
             </query></iq>",
        );
        let items = parse_roster(&r).unwrap();
        assert_eq!(items.len(), 4);
        assert!(items[0].both());
        assert_eq!((items[1].to, items[1].from), (true, false));
        assert_eq!((items[2].to, items[2].from), (false, true));
        assert_eq!((items[3].to, items[3].from), (false, false));
        let wanted: Vec<String> = ["a@x", "b@x", "c@x", "e@x"].map(String::from).into();
        let m = missing(&items, &wanted);
        assert_eq!((m.contacts, m.subscribe, m.subscribed), (3, 2, 2));
        assert_eq!(
            m.stanzas,
            "<presence to='b@x' type='subscribed'/>\
             <presence to='c@x' type='subscribe'/>\
             <presence to='e@x' type='subscribe'/><presence to='e@x' type='subscribed'/>"
        );
        assert_eq!(missing(&items[..1], &wanted[..1]), Missing::default());
        assert!(parse_roster(&stanza("<iq type='error' id='r'/>")).is_none());
        assert_eq!(
            parse_roster(&stanza(
                "<iq type='result' id='r'><query xmlns='jabber:iq:roster'/></iq>"
            )),
            Some(vec![])
        );
    }
}
