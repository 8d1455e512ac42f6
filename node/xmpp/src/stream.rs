//! Stream headers (RFC 6120 §4.7): parsing the peer's and writing ours.
//!
//! The header is the one element the framer hands over as a bare start tag; it is
//! checked here for the streams namespace, the content namespace, the version and the
//! addressed domain. Writing stream features and errors lives here too, so the exact
//! bytes a peer sees at stream level are produced in one place.

use jid::BareJid;
use quick_xml::Reader;
use quick_xml::events::Event;

use crate::error::{StreamError, StreamErrorCondition};
use crate::ns;
use crate::xml::escape_into;

/// What a peer's stream header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The domain the stream is addressed to, prepared; `None` when absent.
    pub to: Option<BareJid>,
    pub from: Option<String>,
    /// The stream id a responding entity assigned (RFC 6120 §4.7.3).
    pub id: Option<String>,
    pub lang: Option<String>,
    /// `(major, minor)` of the `version` attribute.
    pub version: (u32, u32),
    /// The header declares the dialback prefix (`xmlns:db='jabber:server:dialback'`,
    /// XEP-0220 §2.1): the peer speaks dialback.
    pub dialback: bool,
}

impl StreamHeader {
    /// Parses and checks a header start tag. `content_ns` is the default namespace the
    /// stream must declare (`jabber:client` for c2s).
    pub fn parse(tag: &[u8], content_ns: &str) -> Result<StreamHeader, StreamError> {
        let mut reader = Reader::from_reader(tag);
        let start = match reader.read_event() {
            Ok(Event::Start(s)) => s,
            _ => {
                return Err(StreamError::with_text(
                    StreamErrorCondition::NotWellFormed,
                    "stream header is not a start tag",
                ));
            }
        };
        let name = start.name();
        let (prefix, local) = match name.as_ref().iter().position(|&c| c == b':') {
            Some(i) => (&name.as_ref()[..i], &name.as_ref()[i + 1..]),
            None => (&b""[..], name.as_ref()),
        };
        let mut header = StreamHeader {
            to: None,
            from: None,
            id: None,
            lang: None,
            version: (0, 9),
            dialback: false,
        };
        let mut default_ns = None;
        let mut element_ns = None;
        for attr in start.attributes() {
            let attr = attr.map_err(|e| {
                StreamError::with_text(StreamErrorCondition::NotWellFormed, e.to_string())
            })?;
            let value = attr
                .unescape_value()
                .map_err(|e| {
                    StreamError::with_text(StreamErrorCondition::NotWellFormed, e.to_string())
                })?
                .into_owned();
            let key = attr.key.as_ref();
            if key == b"xmlns" {
                default_ns = Some(value.clone());
            }
            if key == b"xmlns:db" && value == crate::s2s::dialback::NS {
                header.dialback = true;
            }
            if key.strip_prefix(b"xmlns:") == Some(prefix) || (prefix.is_empty() && key == b"xmlns")
            {
                element_ns = Some(value.clone());
            }
            match key {
                b"to" => {
                    header.to = Some(BareJid::new(&value).map_err(|_| {
                        StreamError::with_text(
                            StreamErrorCondition::HostUnknown,
                            "malformed 'to' domain",
                        )
                    })?)
                }
                b"from" => header.from = Some(value),
                b"id" => header.id = Some(value),
                b"xml:lang" => header.lang = Some(value),
                b"version" => header.version = parse_version(&value)?,
                _ => {}
            }
        }
        if local != b"stream" || element_ns.as_deref() != Some(ns::STREAM) {
            return Err(StreamError::with_text(
                StreamErrorCondition::InvalidNamespace,
                "stream element must be 'stream' in http://etherx.jabber.org/streams",
            ));
        }
        if default_ns.as_deref() != Some(content_ns) {
            return Err(StreamError::with_text(
                StreamErrorCondition::InvalidNamespace,
                format!("content namespace must be '{content_ns}'"),
            ));
        }
        if header.version.0 != 1 {
            // Pre-1.0 streams (no version attribute) have no SASL or TLS negotiation,
            // which this server requires; a major version we do not know is refused
            // per RFC 6120 §4.7.5.
            return Err(StreamError::with_text(
                StreamErrorCondition::UnsupportedVersion,
                "stream version 1.0 is required",
            ));
        }
        Ok(header)
    }
}

fn parse_version(v: &str) -> Result<(u32, u32), StreamError> {
    let bad = || StreamError::with_text(StreamErrorCondition::UnsupportedVersion, "bad version");
    let (major, minor) = v.split_once('.').ok_or_else(bad)?;
    Ok((
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    ))
}

/// Writes our response header: `from` our domain, a fresh stream `id`.
pub fn response_header(content_ns: &str, from: &str, id: &str, lang: Option<&str>) -> String {
    header(
        content_ns,
        &[
            ("id", id),
            ("from", from),
            ("version", "1.0"),
            ("xml:lang", lang.unwrap_or("en")),
        ],
    )
}

/// Writes an initiating header (the client side, used by test and load clients).
pub fn initial_header(content_ns: &str, to: &str) -> String {
    header(
        content_ns,
        &[("to", to), ("version", "1.0"), ("xml:lang", "en")],
    )
}

/// `<?xml?>` and a `stream:stream` start tag in `content_ns` with `attrs` in order.
pub(crate) fn header(content_ns: &str, attrs: &[(&str, &str)]) -> String {
    let mut s = String::with_capacity(200);
    s.push_str("<?xml version='1.0'?><stream:stream xmlns='");
    s.push_str(content_ns);
    s.push_str("' xmlns:stream='");
    s.push_str(ns::STREAM);
    s.push('\'');
    for (k, v) in attrs {
        s.push(' ');
        s.push_str(k);
        s.push_str("='");
        escape_into(&mut s, v);
        s.push('\'');
    }
    s.push('>');
    s
}

pub const STREAM_CLOSE: &str = "</stream:stream>";

/// The answer to `<starttls/>` (RFC 6120 §5.4.2.3): `<proceed/>`, unless bytes arrived
/// behind it before the handshake. Those would be read as if they had come over TLS
/// (STARTTLS command injection), so the stream ends with `<policy-violation/>`.
pub fn proceed_with_tls(unread: &[u8]) -> Result<String, StreamError> {
    if !unread.is_empty() {
        return Err(StreamError::with_text(
            StreamErrorCondition::PolicyViolation,
            "data after <starttls/> before the TLS handshake",
        ));
    }
    Ok(format!("<proceed xmlns='{}'/>", ns::TLS))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='LocalHost' version='1.0' xml:lang='de'>";

    #[test]
    fn parses_a_good_header() {
        let h = StreamHeader::parse(GOOD.as_bytes(), ns::CLIENT).unwrap();
        assert_eq!(h.to.unwrap().as_str(), "localhost");
        assert_eq!(h.lang.as_deref(), Some("de"));
        assert_eq!(h.version, (1, 0));
        // Other prefixes for the streams namespace are legal XML.
        let other = "<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams' version='1.0'>";
        assert!(StreamHeader::parse(other.as_bytes(), ns::CLIENT).is_ok());
    }

    #[test]
    fn rejects_bad_headers() {
        use StreamErrorCondition::*;
        for (tag, want) in [
            (
                GOOD.replace("jabber:client", "jabber:server"),
                InvalidNamespace,
            ),
            (
                GOOD.replace("etherx.jabber.org/streams", "example.com/streams"),
                InvalidNamespace,
            ),
            (
                GOOD.replace("stream:stream ", "stream:strea "),
                InvalidNamespace,
            ),
            (
                GOOD.replace("version='1.0'", "version='2.0'"),
                UnsupportedVersion,
            ),
            (GOOD.replace(" version='1.0'", ""), UnsupportedVersion),
            (
                GOOD.replace("version='1.0'", "version='x'"),
                UnsupportedVersion,
            ),
            (GOOD.replace("to='LocalHost'", "to='a@@b'"), HostUnknown),
        ] {
            assert_eq!(
                StreamHeader::parse(tag.as_bytes(), ns::CLIENT)
                    .unwrap_err()
                    .condition,
                want,
                "{tag}"
            );
        }
    }

    #[test]
    fn writes_headers() {
        assert_eq!(
            response_header(ns::CLIENT, "localhost", "abc", None),
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='localhost' version='1.0' xml:lang='en'>"
        );
        let ours = initial_header(ns::CLIENT, "localhost");
        let tag = ours.trim_start_matches("<?xml version='1.0'?>");
        assert!(StreamHeader::parse(tag.as_bytes(), ns::CLIENT).is_ok());
    }
}
