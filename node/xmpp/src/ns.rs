//! XML namespace names used on the wire, in one place.

pub const CLIENT: &str = "jabber:client";
pub const SERVER: &str = "jabber:server";
pub const STREAM: &str = "http://etherx.jabber.org/streams";
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 session establishment, kept for old clients (RFC 6121 dropped it).
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const PING: &str = "urn:xmpp:ping";
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const ROSTER: &str = "jabber:iq:roster";
/// Stream feature announcing roster versioning (RFC 6121 §2.6.1).
pub const ROSTER_VER: &str = "urn:xmpp:features:rosterver";
/// Stream feature announcing subscription pre-approval (RFC 6121 §3.4.1).
pub const PRE_APPROVAL: &str = "urn:xmpp:features:pre-approval";
pub const VCARD: &str = "vcard-temp";
pub const PRIVATE: &str = "jabber:iq:private";
pub const BLOCKING: &str = "urn:xmpp:blocking";
pub const BLOCKING_ERRORS: &str = "urn:xmpp:blocking:errors";
pub const CARBONS: &str = "urn:xmpp:carbons:2";
pub const FORWARD: &str = "urn:xmpp:forward:0";
pub const DELAY: &str = "urn:xmpp:delay";
pub const VERSION: &str = "jabber:iq:version";
pub const TIME: &str = "urn:xmpp:time";
pub const LAST: &str = "jabber:iq:last";
pub const HINTS: &str = "urn:xmpp:hints";
/// XEP-0077 in-band registration: the iq payload namespace.
pub const REGISTER: &str = "jabber:iq:register";
/// XEP-0077 §8: the stream feature advertising in-band registration.
pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
