//! Typed stanzas (RFC 6120 §8): message, presence and iq.
//!
//! A [`Stanza`] holds what routing needs (kind and type, `to`, `from`, `id`) as typed
//! fields and keeps the payload as the raw bytes it arrived in, already validated as
//! well-formed: a router forwards payloads it does not understand without parsing or
//! re-serialising them. Handlers that need the payload parse it on demand with
//! [`Stanza::payload`]. Nothing here knows about sessions or routing decisions.

use std::fmt::Write as _;

use bytes::Bytes;
use jid::Jid;
use quick_xml::Reader;
use quick_xml::events::Event;

use crate::error::{StanzaError, StanzaErrorCondition, StreamError};
use crate::ns;
use crate::xml::{self, Element, Node, NsContext, XmlError, escape_into};

/// `type` of a message (RFC 6121 §5.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Normal,
    Chat,
    Groupchat,
    Headline,
    Error,
}

/// `type` of a presence (RFC 6121 §4.7.1); `Available` is the absent attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceType {
    Available,
    Unavailable,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Probe,
    Error,
}

/// `type` of an iq (RFC 6120 §8.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IqType {
    Get,
    Set,
    Result,
    Error,
}

/// Which stanza, with its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Message(MessageType),
    Presence(PresenceType),
    Iq(IqType),
}

impl MessageType {
    /// RFC 6121 §5.2.2: a missing or unknown type is `normal`.
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("chat") => Self::Chat,
            Some("groupchat") => Self::Groupchat,
            Some("headline") => Self::Headline,
            Some("error") => Self::Error,
            _ => Self::Normal,
        }
    }

    fn as_attr(self) -> Option<&'static str> {
        match self {
            Self::Normal => None,
            Self::Chat => Some("chat"),
            Self::Groupchat => Some("groupchat"),
            Self::Headline => Some("headline"),
            Self::Error => Some("error"),
        }
    }
}

impl PresenceType {
    fn parse(s: Option<&str>) -> Option<Self> {
        Some(match s {
            None => Self::Available,
            Some("unavailable") => Self::Unavailable,
            Some("subscribe") => Self::Subscribe,
            Some("subscribed") => Self::Subscribed,
            Some("unsubscribe") => Self::Unsubscribe,
            Some("unsubscribed") => Self::Unsubscribed,
            Some("probe") => Self::Probe,
            Some("error") => Self::Error,
            Some(_) => return None,
        })
    }

    fn as_attr(self) -> Option<&'static str> {
        match self {
            Self::Available => None,
            Self::Unavailable => Some("unavailable"),
            Self::Subscribe => Some("subscribe"),
            Self::Subscribed => Some("subscribed"),
            Self::Unsubscribe => Some("unsubscribe"),
            Self::Unsubscribed => Some("unsubscribed"),
            Self::Probe => Some("probe"),
            Self::Error => Some("error"),
        }
    }
}

impl IqType {
    fn parse(s: Option<&str>) -> Option<Self> {
        Some(match s? {
            "get" => Self::Get,
            "set" => Self::Set,
            "result" => Self::Result,
            "error" => Self::Error,
            _ => return None,
        })
    }

    fn as_attr(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::Result => "result",
            Self::Error => "error",
        }
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Message(_) => "message",
            Kind::Presence(_) => "presence",
            Kind::Iq(_) => "iq",
        }
    }

    fn type_attr(self) -> Option<&'static str> {
        match self {
            Kind::Message(t) => t.as_attr(),
            Kind::Presence(t) => t.as_attr(),
            Kind::Iq(t) => Some(t.as_attr()),
        }
    }

    /// Whether this is an error stanza (which must never be answered with an error).
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Kind::Message(MessageType::Error)
                | Kind::Presence(PresenceType::Error)
                | Kind::Iq(IqType::Error)
        )
    }

    /// The same stanza name with type `error`.
    fn to_error(self) -> Self {
        match self {
            Kind::Message(_) => Kind::Message(MessageType::Error),
            Kind::Presence(_) => Kind::Presence(PresenceType::Error),
            Kind::Iq(_) => Kind::Iq(IqType::Error),
        }
    }
}

/// A message, presence or iq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    pub kind: Kind,
    pub to: Option<Jid>,
    pub from: Option<Jid>,
    pub id: Option<Box<str>>,
    /// Attributes other than `to`, `from`, `id` and `type` (such as `xml:lang` and
    /// prefix declarations the payload uses), values unescaped.
    pub extra_attrs: Vec<(Box<str>, Box<str>)>,
    /// The raw, validated XML between the start and end tags.
    pub payload: Bytes,
}

/// A top-level element of a client or server stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopLevel {
    Stanza(Stanza),
    /// Anything else (`<starttls/>`, `<auth/>`, stream management, …).
    Nonza(Element),
}

/// Why a top-level element was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StanzaParseError {
    /// The stream is broken: send this stream error and close.
    Stream(StreamError),
    /// The stanza is refused but the stream is fine: answer the sender with `reply`
    /// (absent when the faulty stanza was itself an error, which is never answered).
    Stanza {
        reply: Option<Box<Stanza>>,
        error: StanzaError,
    },
}

impl From<XmlError> for StanzaParseError {
    fn from(e: XmlError) -> Self {
        Self::Stream(e.into())
    }
}

/// Parses a frame into a stanza or nonza. Stanzas are recognised by name in the stream's
/// default namespace; their payload is validated but not turned into a tree.
pub fn parse_top_level(frame: &Bytes, ctx: NsContext) -> Result<TopLevel, StanzaParseError> {
    let mut reader = Reader::from_reader(&frame[..]);
    let (start, empty) = match reader.read_event().map_err(XmlError::from)? {
        Event::Start(s) => (s, false),
        Event::Empty(s) => (s, true),
        _ => return Err(XmlError::NotWellFormed("expected an element".into()).into()),
    };
    let is_stanza = matches!(start.name().as_ref(), b"message" | b"presence" | b"iq")
        && !start
            .attributes()
            .flatten()
            .any(|a| a.key.as_ref() == b"xmlns" && a.value.as_ref() != ctx.default_ns.as_bytes());
    if !is_stanza {
        return Ok(TopLevel::Nonza(Element::parse(frame, ctx)?));
    }
    let payload_start = reader.buffer_position() as usize;
    let payload = if empty {
        Bytes::new()
    } else {
        // The frame is one element, so its end tag is the frame's tail.
        let name_len = start.name().as_ref().len();
        let payload_end = frame.len() - (name_len + 3);
        if payload_end < payload_start || frame[payload_end..].first() != Some(&b'<') {
            return Err(XmlError::NotWellFormed("malformed end tag".into()).into());
        }
        frame.slice(payload_start..payload_end)
    };
    // Validate the whole element (end tag included) with the stanza's own declarations
    // in scope, so a payload using a prefix declared on the stanza is accepted.
    xml::validate_fragment(frame, ctx.default_ns)?;

    let mut to = None;
    let mut from = None;
    let mut id = None;
    let mut type_attr: Option<String> = None;
    let mut extra_attrs = Vec::new();
    let mut bad_jid = None;
    for attr in start.attributes() {
        let attr = attr.map_err(XmlError::from)?;
        let value = attr.unescape_value().map_err(XmlError::from)?;
        match attr.key.as_ref() {
            b"to" => match Jid::new(&value) {
                Ok(j) => to = Some(j),
                Err(e) => bad_jid = Some(format!("malformed 'to' address: {e}")),
            },
            b"from" => match Jid::new(&value) {
                Ok(j) => from = Some(j),
                Err(e) => bad_jid = Some(format!("malformed 'from' address: {e}")),
            },
            b"id" => id = Some(Box::from(value.as_ref())),
            b"type" => type_attr = Some(value.into_owned()),
            b"xmlns" => {}
            key => {
                let key = String::from_utf8_lossy(key);
                extra_attrs.push((Box::from(key.as_ref()), Box::from(value.as_ref())));
            }
        }
    }
    let kind = match start.name().as_ref() {
        b"message" => Some(Kind::Message(MessageType::parse(type_attr.as_deref()))),
        b"presence" => PresenceType::parse(type_attr.as_deref()).map(Kind::Presence),
        _ => IqType::parse(type_attr.as_deref()).map(Kind::Iq),
    };
    let stanza = |kind| Stanza {
        kind,
        to: to.clone(),
        from: from.clone(),
        id: id.clone(),
        extra_attrs: extra_attrs.clone(),
        payload: payload.clone(),
    };
    let refuse = |kind: Kind, error: StanzaError| {
        let original = stanza(kind);
        StanzaParseError::Stanza {
            reply: original.error_reply(&error).map(Box::new),
            error,
        }
    };
    let Some(kind) = kind else {
        // Type unknown: answer as an iq/presence of no particular type.
        let kind = if start.name().as_ref() == b"iq" {
            Kind::Iq(IqType::Get)
        } else {
            Kind::Presence(PresenceType::Available)
        };
        return Err(refuse(
            kind,
            StanzaError::with_text(
                StanzaErrorCondition::BadRequest,
                "missing or unknown 'type' attribute",
            ),
        ));
    };
    if let Some(text) = bad_jid {
        return Err(refuse(
            kind,
            StanzaError::with_text(StanzaErrorCondition::JidMalformed, text),
        ));
    }
    if matches!(kind, Kind::Iq(_)) && id.is_none() {
        return Err(refuse(
            kind,
            StanzaError::with_text(StanzaErrorCondition::BadRequest, "iq without 'id'"),
        ));
    }
    Ok(TopLevel::Stanza(stanza(kind)))
}

impl Stanza {
    /// A new stanza with no payload.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            to: None,
            from: None,
            id: None,
            extra_attrs: Vec::new(),
            payload: Bytes::new(),
        }
    }

    /// The payload parsed into nodes.
    pub fn payload(&self) -> Result<Vec<Node>, XmlError> {
        xml::parse_fragment(&self.payload, ns::CLIENT)
    }

    /// The payload's child elements (text between them dropped).
    pub fn payload_elements(&self) -> Result<Vec<Element>, XmlError> {
        Ok(self
            .payload()?
            .into_iter()
            .filter_map(|n| match n {
                Node::Element(e) => Some(e),
                Node::Text(_) => None,
            })
            .collect())
    }

    /// For an iq get/set: its one payload element, which names the request.
    pub fn iq_payload(&self) -> Result<Option<Element>, XmlError> {
        let mut els = self.payload_elements()?;
        Ok(if els.len() == 1 { els.pop() } else { None })
    }

    /// Presence priority (RFC 6121 §4.7.2.3): 0 when absent or invalid.
    pub fn priority(&self) -> i8 {
        self.child_text("priority")
            .and_then(|p| p.trim().parse::<i8>().ok())
            .unwrap_or(0)
    }

    /// The text of a presence's `<status/>` (the first one), if any.
    pub fn status(&self) -> Option<String> {
        self.child_text("status")
    }

    /// The text content of the first payload child `name` in the client namespace.
    fn child_text(&self, name: &str) -> Option<String> {
        self.payload_elements()
            .ok()?
            .iter()
            .find(|e| e.is(name, ns::CLIENT))
            .map(|e| e.text_content())
    }

    /// The error stanza answering this one: addresses swapped, same id, type `error`.
    /// `None` for error stanzas, which are never answered (RFC 6120 §8.3.1).
    pub fn error_reply(&self, error: &StanzaError) -> Option<Stanza> {
        if self.kind.is_error() {
            return None;
        }
        let mut payload = String::new();
        error.write_to(&mut payload);
        Some(Stanza {
            kind: self.kind.to_error(),
            to: self.from.clone(),
            from: self.to.clone(),
            id: self.id.clone(),
            extra_attrs: Vec::new(),
            payload: Bytes::from(payload),
        })
    }

    /// An iq result answering this iq, with an optional payload element.
    pub fn iq_result(&self, payload: Option<&Element>) -> Stanza {
        Stanza {
            kind: Kind::Iq(IqType::Result),
            to: self.from.clone(),
            from: self.to.clone(),
            id: self.id.clone(),
            extra_attrs: Vec::new(),
            payload: payload
                .map(|e| Bytes::from(e.to_xml(ns::CLIENT)))
                .unwrap_or_default(),
        }
    }

    /// Appends the stanza's XML, in a stream whose default namespace is the client one.
    pub fn write_to(&self, out: &mut String) {
        let name = self.kind.name();
        out.push('<');
        out.push_str(name);
        let mut attr = |k: &str, v: &str| {
            let _ = write!(out, " {k}='");
            escape_into(out, v);
            out.push('\'');
        };
        if let Some(to) = &self.to {
            attr("to", to.as_str());
        }
        if let Some(from) = &self.from {
            attr("from", from.as_str());
        }
        if let Some(id) = &self.id {
            attr("id", id);
        }
        if let Some(t) = self.kind.type_attr() {
            attr("type", t);
        }
        for (k, v) in &self.extra_attrs {
            attr(k, v);
        }
        if self.payload.is_empty() {
            out.push_str("/>");
        } else {
            out.push('>');
            // The payload was validated as UTF-8 by the framer (or built from a String).
            out.push_str(&String::from_utf8_lossy(&self.payload));
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
    }

    pub fn to_xml(&self) -> String {
        let mut s = String::with_capacity(64 + self.payload.len());
        self.write_to(&mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<TopLevel, StanzaParseError> {
        parse_top_level(&Bytes::copy_from_slice(s.as_bytes()), NsContext::CLIENT)
    }

    fn stanza(s: &str) -> Stanza {
        match parse(s) {
            Ok(TopLevel::Stanza(st)) => st,
            other => panic!("not a stanza: {other:?}"),
        }
    }

    #[test]
    fn parses_message() {
        let st = stanza(
            "<message to='Juliet@Example.com/balcony' id='m1' type='chat' xml:lang='en'><body>Art thou &lt;here&gt;?</body><x:y xmlns:x='urn:x'/></message>",
        );
        assert_eq!(st.kind, Kind::Message(MessageType::Chat));
        assert_eq!(
            st.to.as_ref().unwrap().as_str(),
            "juliet@example.com/balcony"
        );
        assert_eq!(st.id.as_deref(), Some("m1"));
        assert_eq!(
            &st.payload[..],
            b"<body>Art thou &lt;here&gt;?</body><x:y xmlns:x='urn:x'/>"
        );
        assert_eq!(st.extra_attrs, vec![("xml:lang".into(), "en".into())]);
    }

    #[test]
    fn round_trips() {
        for xml in [
            "<message to='a@b/c' from='d@e/f' id='1' type='chat'><body>hi &amp; bye</body></message>",
            "<presence/>",
            "<presence type='unavailable'/>",
            "<iq to='b' id='x&apos;y' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
            "<message id='2' xmlns:p='urn:p'><p:q/></message>",
        ] {
            let st = stanza(xml);
            assert_eq!(st.to_xml(), xml);
            assert_eq!(stanza(&st.to_xml()), st);
        }
    }

    #[test]
    fn unknown_message_type_is_normal() {
        assert_eq!(
            stanza("<message type='bogus'/>").kind,
            Kind::Message(MessageType::Normal)
        );
    }

    #[test]
    fn nonzas_are_elements() {
        match parse("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").unwrap() {
            TopLevel::Nonza(e) => assert!(e.is("starttls", ns::TLS)),
            other => panic!("{other:?}"),
        }
        // A <message/> in another namespace is not a stanza.
        assert!(matches!(
            parse("<message xmlns='urn:other'/>").unwrap(),
            TopLevel::Nonza(_)
        ));
    }

    fn refused(s: &str) -> (Option<String>, StanzaErrorCondition) {
        match parse(s) {
            Err(StanzaParseError::Stanza { reply, error }) => {
                (reply.map(|r| r.to_xml()), error.condition)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_stanzas_get_stanza_errors() {
        let (reply, cond) = refused("<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>");
        assert_eq!(cond, StanzaErrorCondition::BadRequest);
        assert!(
            reply
                .unwrap()
                .starts_with("<iq type='error'><error type='modify'><bad-request")
        );

        let (reply, cond) = refused("<iq id='7' type='fetch'/>");
        assert_eq!(cond, StanzaErrorCondition::BadRequest);
        assert!(reply.unwrap().starts_with("<iq id='7' type='error'>"));

        let (reply, cond) = refused("<message to='a@b@c' id='m'><body>x</body></message>");
        assert_eq!(cond, StanzaErrorCondition::JidMalformed);
        assert_eq!(
            reply.unwrap(),
            "<message id='m' type='error'><error type='modify'><jid-malformed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>malformed &apos;to&apos; address: second @ found before parsing the resource</text></error></message>"
        );

        // Errors are never answered.
        let (reply, cond) = refused("<message to='@b' type='error'/>");
        assert_eq!(cond, StanzaErrorCondition::JidMalformed);
        assert_eq!(reply, None);

        assert_eq!(
            refused("<presence type='dance'/>").1,
            StanzaErrorCondition::BadRequest
        );
    }

    #[test]
    fn malformed_payload_is_a_stream_error() {
        assert!(matches!(
            parse("<message><a></b></message>"),
            Err(StanzaParseError::Stream(_))
        ));
        assert!(matches!(
            parse("<message><p:a/></message>"),
            Err(StanzaParseError::Stream(e)) if e.condition == crate::error::StreamErrorCondition::BadNamespacePrefix
        ));
    }

    #[test]
    fn priority_and_replies() {
        let p = stanza("<presence><priority>-5</priority></presence>");
        assert_eq!(p.priority(), -5);
        assert_eq!(
            stanza("<presence><priority>900</priority></presence>").priority(),
            0
        );
        assert_eq!(stanza("<presence/>").priority(), 0);

        let iq =
            stanza("<iq from='a@b/c' to='b' id='1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>");
        assert_eq!(iq.iq_payload().unwrap().unwrap().ns, ns::PING);
        assert_eq!(
            iq.iq_result(None).to_xml(),
            "<iq to='a@b/c' from='b' id='1' type='result'/>"
        );
    }

    #[test]
    fn hot_type_sizes_are_pinned() {
        // Stanzas sit in mailboxes by the thousand; growth here should be a decision.
        assert_eq!(std::mem::size_of::<Stanza>(), 144);
        assert_eq!(std::mem::size_of::<Kind>(), 2);
    }
}
