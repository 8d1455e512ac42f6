//! The service's room directory (XEP-0045 §6.3): disco#items on the service lists
//! the public rooms, from storage (rooms live on every shard and, in a cluster, on
//! every node), a page at a time with Result Set Management (XEP-0059).

use shoal_xmpp::error::StanzaErrorCondition;
use shoal_xmpp::ns;
use shoal_xmpp::stanza::Stanza;
use shoal_xmpp::xml::Element;

/// `http://jabber.org/protocol/rsm`: result set management.
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";

/// The most rooms one answer holds, asked for or not: a directory of thousands of
/// rooms in one stanza would be refused by clients as oversized.
pub const PAGE_MAX: usize = 100;

/// The answer to a disco#items `request` on the service, given every stored room
/// with its listing name (sorted by JID).
pub fn answer(request: &Stanza, rooms: &[(String, Option<String>)]) -> Stanza {
    let listed: Vec<(&str, &str)> = rooms
        .iter()
        .filter_map(|(jid, name)| name.as_deref().map(|n| (jid.as_str(), n)))
        .collect();
    let set = request
        .iq_payload()
        .ok()
        .flatten()
        .and_then(|q| q.get_child("set", NS_RSM).cloned());
    let page = match set.as_ref().map(|s| page(s, &listed)) {
        Some(Ok(page)) => page,
        Some(Err(condition)) => {
            return request
                .error_reply(&shoal_xmpp::error::StanzaError::new(condition))
                .unwrap_or_else(|| request.iq_result(None));
        }
        None => 0..listed.len().min(PAGE_MAX),
    };
    let mut query = Element::new("query", ns::DISCO_ITEMS);
    for (jid, name) in &listed[page.clone()] {
        query = query.child(
            Element::new("item", ns::DISCO_ITEMS)
                .attr("jid", *jid)
                .attr("name", *name),
        );
    }
    // §6.3: a partial list says so, even when the request did not use RSM.
    if set.is_some() || page.len() < listed.len() {
        let mut answer_set = Element::new("set", NS_RSM);
        if let (false, Some(first), Some(last)) = (
            page.is_empty(),
            listed.get(page.start),
            listed.get(page.end.wrapping_sub(1)),
        ) {
            answer_set = answer_set
                .child(
                    Element::new("first", NS_RSM)
                        .attr("index", page.start.to_string())
                        .text(first.0),
                )
                .child(Element::new("last", NS_RSM).text(last.0));
        }
        query = query
            .child(answer_set.child(Element::new("count", NS_RSM).text(listed.len().to_string())));
    }
    request.iq_result(Some(&query))
}

/// The range of `listed` a request's `<set/>` asks for (XEP-0059 §2: `max`, `after`,
/// `before`, `index`). Rooms are ordered by JID, so `after` and `before` work even for
/// a room that is gone since the previous page.
fn page(
    set: &Element,
    listed: &[(&str, &str)],
) -> Result<std::ops::Range<usize>, StanzaErrorCondition> {
    let number = |name: &str| {
        set.get_child(name, NS_RSM)
            .map(|e| {
                e.text_content()
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| StanzaErrorCondition::BadRequest)
            })
            .transpose()
    };
    let max = number("max")?.unwrap_or(PAGE_MAX).min(PAGE_MAX);
    let position = |id: &str| listed.partition_point(|(jid, _)| *jid <= id);
    if let Some(before) = set.get_child("before", NS_RSM) {
        // An empty <before/> asks for the last page.
        let id = before.text_content();
        let end = match id.as_str() {
            "" => listed.len(),
            id => listed.partition_point(|(jid, _)| *jid < id),
        };
        return Ok(end.saturating_sub(max)..end);
    }
    let start = match (set.get_child("after", NS_RSM), number("index")?) {
        (Some(after), _) => position(&after.text_content()),
        (None, Some(index)) => index.min(listed.len()),
        (None, None) => 0,
    };
    Ok(start..(start + max).min(listed.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::muc::tests::stanza;

    fn rooms(n: usize) -> Vec<(String, Option<String>)> {
        (0..n)
            .map(|i| {
                let hidden = i % 3 == 2;
                let jid = format!("room{i:03}@conference.example.org");
                (jid, (!hidden).then(|| format!("Room {i}")))
            })
            .collect()
    }

    fn ask(set: &str) -> Stanza {
        let xml = format!(
            "<iq xmlns='jabber:client' type='get' id='d' from='a@example.org/r' \
             to='conference.example.org'><query xmlns='{}'>{set}</query></iq>",
            ns::DISCO_ITEMS
        );
        stanza(&xml)
    }

    /// An answer's `<set/>`: first, its index, last, count.
    type Set = (String, String, String, String);

    /// The JIDs listed and the answer's `<set/>`.
    fn listed(answer: &Stanza) -> (Vec<String>, Option<Set>) {
        let q = answer.iq_payload().unwrap().unwrap();
        let jids = q
            .elements()
            .filter(|e| e.is("item", ns::DISCO_ITEMS))
            .map(|e| e.get_attr("jid").unwrap().to_owned())
            .collect();
        let set = q.get_child("set", NS_RSM).map(|s| {
            let text = |n: &str| {
                s.get_child(n, NS_RSM)
                    .map(Element::text_content)
                    .unwrap_or_default()
            };
            let index = s
                .get_child("first", NS_RSM)
                .and_then(|f| f.get_attr("index"))
                .unwrap_or_default()
                .to_owned();
            (text("first"), index, text("last"), text("count"))
        });
        (jids, set)
    }

    #[test]
    fn hidden_rooms_are_not_listed_and_small_lists_need_no_set() {
        let (jids, set) = listed(&answer(&ask(""), &rooms(4)));
        assert_eq!(
            jids,
            [
                "room000@conference.example.org",
                "room001@conference.example.org",
                "room003@conference.example.org"
            ]
        );
        assert_eq!(set, None);
    }

    #[test]
    fn pages_forward_backward_and_by_index() {
        let all = rooms(30); // 20 listed
        let first = answer(
            &ask("<set xmlns='http://jabber.org/protocol/rsm'><max>8</max></set>"),
            &all,
        );
        let (jids, set) = listed(&first);
        assert_eq!(jids.len(), 8);
        let (first_id, index, last_id, count) = set.unwrap();
        assert_eq!(
            (first_id.as_str(), index.as_str(), count.as_str()),
            ("room000@conference.example.org", "0", "20")
        );
        assert_eq!(last_id, jids[7]);
        let next = answer(
            &ask(&format!(
                "<set xmlns='http://jabber.org/protocol/rsm'><max>8</max><after>{last_id}</after></set>"
            )),
            &all,
        );
        let (jids2, set2) = listed(&next);
        assert_eq!(jids2.len(), 8);
        assert!(jids2[0] > jids[7]);
        assert_eq!(set2.unwrap().1, "8");
        let last = answer(
            &ask("<set xmlns='http://jabber.org/protocol/rsm'><max>8</max><before/></set>"),
            &all,
        );
        let (jids3, set3) = listed(&last);
        assert_eq!(jids3.len(), 8);
        assert_eq!(jids3[7], "room028@conference.example.org");
        assert_eq!(set3.unwrap().1, "12");
        let by_index = answer(
            &ask("<set xmlns='http://jabber.org/protocol/rsm'><max>5</max><index>18</index></set>"),
            &all,
        );
        assert_eq!(listed(&by_index).0.len(), 2);
        // Past the end: an empty page with the count.
        let (none, set4) = listed(&answer(
            &ask(
                "<set xmlns='http://jabber.org/protocol/rsm'><after>room999@conference.example.org</after></set>",
            ),
            &all,
        ));
        assert!(none.is_empty());
        assert_eq!(
            set4.unwrap(),
            (String::new(), String::new(), String::new(), "20".to_owned())
        );
    }

    #[test]
    fn large_directories_are_cut_and_say_so() {
        let all = rooms(300); // 200 listed
        let (jids, set) = listed(&answer(&ask(""), &all));
        assert_eq!(jids.len(), PAGE_MAX);
        assert_eq!(set.unwrap().3, "200");
        let bad = answer(
            &ask("<set xmlns='http://jabber.org/protocol/rsm'><max>many</max></set>"),
            &all,
        );
        assert!(bad.to_xml().contains("<bad-request"));
    }
}
