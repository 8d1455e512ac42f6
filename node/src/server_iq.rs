//! Requests the server answers itself (RFC 6120 §10.3.3): iqs addressed to the domain.
//!
//! Stateless apart from the start time: each request is answered from the request, the
//! clock and [`ServerInfo`]. Unknown namespaces get
//! `<service-unavailable/>` as RFC 6120 §8.4 requires; results and errors addressed to
//! the server are consumed silently. Anything needing an account's data belongs to the
//! user actor instead.

use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, MessageType, Stanza};
use shoal_xmpp::xml::Element;

use std::time::Instant;

use crate::jobs::{format_timestamp, now_ms};

/// Features advertised in disco#info on the server, sorted as XEP-0115 hashing wants.
const FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::LAST,
    ns::PRIVATE,
    ns::REGISTER,
    ns::ROSTER,
    ns::VERSION,
    "msgoffline",
    ns::BLOCKING,
    ns::CARBONS,
    ns::PING,
    ns::TIME,
    ns::VCARD,
];

/// What the server says about itself.
#[derive(Debug, Clone, Copy)]
pub struct ServerInfo {
    pub started: Instant,
}

/// The reply to a stanza addressed to the server (or, with no `to`, to the server on
/// the sender's behalf), if one is owed. The reply's `from` is the request's `to`, so a
/// request without `to` gets a reply without `from` (RFC 6120 §8.1.2.1).
pub fn handle(stanza: &Stanza, info: &ServerInfo) -> Option<Stanza> {
    match stanza.kind {
        Kind::Iq(IqType::Get | IqType::Set) => answer_iq(stanza, info),
        // A chat message to the server has no one to read it.
        Kind::Message(MessageType::Normal | MessageType::Chat) => {
            stanza.error_reply(&StanzaError::new(StanzaErrorCondition::ServiceUnavailable))
        }
        _ => None,
    }
}

fn answer_iq(iq: &Stanza, info: &ServerInfo) -> Option<Stanza> {
    let payload = match iq.iq_payload() {
        Ok(Some(p)) => p,
        _ => {
            return iq.error_reply(&StanzaError::with_text(
                StanzaErrorCondition::BadRequest,
                "an iq request carries exactly one payload element",
            ));
        }
    };
    let get = iq.kind == Kind::Iq(IqType::Get);
    match (get, payload.ns.as_str(), payload.name.as_str()) {
        (true, ns::PING, "ping") => Some(iq.iq_result(None)),
        (true, ns::DISCO_INFO, "query") if payload.get_attr("node").is_none() => {
            let mut query = Element::new("query", ns::DISCO_INFO).child(
                Element::new("identity", ns::DISCO_INFO)
                    .attr("category", "server")
                    .attr("type", "im")
                    .attr("name", "Shoal"),
            );
            for f in FEATURES {
                query = query.child(Element::new("feature", ns::DISCO_INFO).attr("var", *f));
            }
            Some(iq.iq_result(Some(&query)))
        }
        (true, ns::DISCO_ITEMS, "query") if payload.get_attr("node").is_none() => {
            Some(iq.iq_result(Some(&Element::new("query", ns::DISCO_ITEMS))))
        }
        // XEP-0092: name and version; the OS is left out on purpose (it helps attackers
        // more than users).
        (true, ns::VERSION, "query") => Some(
            iq.iq_result(Some(
                &Element::new("query", ns::VERSION)
                    .child(Element::new("name", ns::VERSION).text("Shoal"))
                    .child(Element::new("version", ns::VERSION).text(env!("CARGO_PKG_VERSION"))),
            )),
        ),
        // XEP-0202: the server keeps UTC.
        (true, ns::TIME, "time") => Some(
            iq.iq_result(Some(
                &Element::new("time", ns::TIME)
                    .child(Element::new("tzo", ns::TIME).text("+00:00"))
                    .child(Element::new("utc", ns::TIME).text(format_timestamp(now_ms()))),
            )),
        ),
        // XEP-0012 §5: asked of a server, last activity is its uptime.
        (true, ns::LAST, "query") => Some(
            iq.iq_result(Some(
                &Element::new("query", ns::LAST)
                    .attr("seconds", info.started.elapsed().as_secs().to_string()),
            )),
        ),
        _ => iq.error_reply(&StanzaError::new(StanzaErrorCondition::ServiceUnavailable)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_xmpp::stanza::{TopLevel, parse_top_level};
    use shoal_xmpp::xml::NsContext;

    fn ask(xml: &str) -> Option<String> {
        let st = match parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT) {
            Ok(TopLevel::Stanza(s)) => s,
            other => panic!("{other:?}"),
        };
        let info = ServerInfo {
            started: Instant::now(),
        };
        handle(&st, &info).map(|s| s.to_xml())
    }

    #[test]
    fn ping_and_disco() {
        assert_eq!(
            ask("<iq from='a@localhost/r' to='localhost' id='p' type='get'><ping xmlns='urn:xmpp:ping'/></iq>").unwrap(),
            "<iq to='a@localhost/r' from='localhost' id='p' type='result'/>"
        );
        let info = ask("<iq from='a@localhost/r' to='localhost' id='d' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").unwrap();
        assert_eq!(
            info,
            "<iq to='a@localhost/r' from='localhost' id='d' type='result'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='server' type='im' name='Shoal'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='jabber:iq:last'/><feature var='jabber:iq:private'/><feature var='jabber:iq:register'/><feature var='jabber:iq:roster'/><feature var='jabber:iq:version'/><feature var='msgoffline'/><feature var='urn:xmpp:blocking'/><feature var='urn:xmpp:carbons:2'/><feature var='urn:xmpp:ping'/><feature var='urn:xmpp:time'/><feature var='vcard-temp'/></query></iq>"
        );
    }

    #[test]
    fn unknown_namespaces_are_service_unavailable() {
        assert_eq!(
            ask("<iq from='a@localhost/r' to='localhost' id='x' type='get'><query xmlns='urn:unknown'/></iq>").unwrap(),
            "<iq to='a@localhost/r' from='localhost' id='x' type='error'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        );
        // A set of a get-only namespace.
        assert!(ask("<iq from='a@localhost/r' to='localhost' id='x' type='set'><ping xmlns='urn:xmpp:ping'/></iq>").unwrap().contains("service-unavailable"));
        assert!(
            ask("<iq from='a@localhost/r' to='localhost' id='x' type='get'/>")
                .unwrap()
                .contains("bad-request")
        );
        // Without 'to' the reply has no 'from'.
        assert_eq!(
            ask("<iq from='a@localhost/r' id='p' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
                .unwrap(),
            "<iq to='a@localhost/r' id='p' type='result'/>"
        );
        // Results, errors and presence to the server are consumed.
        assert_eq!(
            ask("<iq from='a@localhost/r' to='localhost' id='x' type='result'/>"),
            None
        );
        assert_eq!(ask("<presence from='a@localhost/r' to='localhost'/>"), None);
    }
}
