//! A small namespace-aware XML element tree for parsed frames, and XML escaping.
//!
//! Frames come from the [`framer`](crate::framer) already complete, UTF-8 and free of
//! restricted constructs; this module turns one into an [`Element`] with resolved
//! namespaces, or walks one to validate it without building a tree. A frame does not
//! carry the stream header's namespace declarations, so parsing starts from an
//! [`NsContext`] holding them. It never reads from a socket and keeps no state between
//! calls.

use std::fmt::Write as _;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

use crate::ns;

/// Why a frame is not acceptable XML. Maps to `<not-well-formed/>` or
/// `<bad-namespace-prefix/>` at stream level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("undeclared namespace prefix {0:?}")]
    BadNamespacePrefix(String),
}

impl From<quick_xml::Error> for XmlError {
    fn from(e: quick_xml::Error) -> Self {
        Self::NotWellFormed(e.to_string())
    }
}

impl From<quick_xml::events::attributes::AttrError> for XmlError {
    fn from(e: quick_xml::events::attributes::AttrError) -> Self {
        Self::NotWellFormed(e.to_string())
    }
}

/// Namespaces in scope where a frame starts: the stream's default namespace and the
/// `stream` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsContext {
    pub default_ns: &'static str,
}

impl NsContext {
    pub const CLIENT: Self = Self {
        default_ns: ns::CLIENT,
    };
    pub const SERVER: Self = Self {
        default_ns: ns::SERVER,
    };
}

/// A child of an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// An XML element with its namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Local name (no prefix).
    pub name: String,
    /// Resolved namespace URI.
    pub ns: String,
    /// Attributes other than namespace declarations, by qualified name as written
    /// (`xml:lang` keeps its prefix), values unescaped.
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder: adds an attribute.
    pub fn attr(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attrs.push((name.into(), value.into()));
        self
    }

    /// Builder: adds a child element.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: adds text.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// Concatenated text children.
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    /// Parses one complete element (a frame) in `ctx`.
    pub fn parse(xml: &[u8], ctx: NsContext) -> Result<Element, XmlError> {
        let mut nodes = parse_fragment(xml, ctx.default_ns)?;
        match (nodes.len(), nodes.pop()) {
            (1, Some(Node::Element(e))) => Ok(e),
            _ => Err(XmlError::NotWellFormed(
                "expected exactly one element".into(),
            )),
        }
    }

    /// Serialises the element; `parent_ns` is the default namespace in scope where it is
    /// written, so `xmlns` is only written where it changes.
    pub fn write_to(&self, out: &mut String, parent_ns: &str) {
        out.push('<');
        out.push_str(&self.name);
        if self.ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, &self.ns);
            out.push('\'');
        }
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}='");
            escape_into(out, v);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for child in &self.children {
            match child {
                Node::Element(e) => e.write_to(out, &self.ns),
                Node::Text(t) => escape_into(out, t),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }

    /// Serialises the element as it would appear in a stream whose default namespace is
    /// `stream_ns`.
    pub fn to_xml(&self, stream_ns: &str) -> String {
        let mut s = String::new();
        self.write_to(&mut s, stream_ns);
        s
    }
}

/// Parses a sequence of elements and text (such as a stanza's payload) in a scope whose
/// default namespace is `default_ns`.
pub fn parse_fragment(xml: &[u8], default_ns: &str) -> Result<Vec<Node>, XmlError> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().check_end_names = true;
    let mut scopes = Scopes::new(default_ns);
    // Stack of elements being built; the bottom entry collects the top-level nodes.
    let mut stack: Vec<Element> = vec![Element::default()];
    loop {
        match reader.read_event()? {
            Event::Start(start) => {
                let el = scopes.open(&start)?;
                stack.push(el);
            }
            Event::Empty(start) => {
                let el = scopes.open(&start)?;
                scopes.close();
                push_child(&mut stack, Node::Element(el));
            }
            Event::End(_) => {
                scopes.close();
                let el = stack
                    .pop()
                    .filter(|_| !stack.is_empty())
                    .ok_or_else(|| XmlError::NotWellFormed("unmatched end tag".into()))?;
                push_child(&mut stack, Node::Element(el));
            }
            Event::Text(t) => {
                let text = t.unescape()?;
                if !text.is_empty() {
                    push_text(&mut stack, &text);
                }
            }
            Event::CData(c) => {
                let raw = c.into_inner();
                let text = std::str::from_utf8(&raw)
                    .map_err(|_| XmlError::NotWellFormed("invalid UTF-8 in CDATA".into()))?;
                push_text(&mut stack, text);
            }
            Event::Eof => break,
            // The framer has already rejected comments, PIs and DOCTYPE in frames;
            // these can only come from payloads built elsewhere.
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                return Err(XmlError::NotWellFormed("restricted XML construct".into()));
            }
        }
    }
    if stack.len() != 1 {
        return Err(XmlError::NotWellFormed("unclosed element".into()));
    }
    Ok(stack.pop().map(|root| root.children).unwrap_or_default())
}

/// Checks that `xml` is a well-formed fragment with every prefix declared, without
/// building a tree. Used for stanza payloads that are routed as raw bytes.
pub fn validate_fragment(xml: &[u8], default_ns: &str) -> Result<(), XmlError> {
    let mut reader = Reader::from_reader(xml);
    reader.config_mut().check_end_names = true;
    let mut scopes = Scopes::new(default_ns);
    let mut depth = 0usize;
    loop {
        match reader.read_event()? {
            Event::Start(start) => {
                scopes.open_validate(&start)?;
                depth += 1;
            }
            Event::Empty(start) => {
                scopes.open_validate(&start)?;
                scopes.close();
            }
            Event::End(_) => {
                if depth == 0 {
                    return Err(XmlError::NotWellFormed("unmatched end tag".into()));
                }
                depth -= 1;
                scopes.close();
            }
            Event::Text(t) => {
                t.unescape()?;
            }
            Event::CData(_) => {}
            Event::Eof => break,
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) | Event::Decl(_) => {
                return Err(XmlError::NotWellFormed("restricted XML construct".into()));
            }
        }
    }
    if depth != 0 {
        return Err(XmlError::NotWellFormed("unclosed element".into()));
    }
    Ok(())
}

fn push_child(stack: &mut [Element], node: Node) {
    if let Some(parent) = stack.last_mut() {
        parent.children.push(node);
    }
}

fn push_text(stack: &mut [Element], text: &str) {
    if let Some(parent) = stack.last_mut() {
        if let Some(Node::Text(prev)) = parent.children.last_mut() {
            prev.push_str(text);
        } else {
            parent.children.push(Node::Text(text.to_owned()));
        }
    }
}

/// Namespace scopes: one entry per declaration, with the depth that declared it.
struct Scopes {
    /// (prefix, namespace); prefix "" is the default namespace.
    decls: Vec<(String, String)>,
    /// Number of declarations each open element added.
    marks: Vec<usize>,
}

impl Scopes {
    fn new(default_ns: &str) -> Self {
        let mut decls = vec![
            (String::new(), default_ns.to_owned()),
            ("stream".into(), ns::STREAM.into()),
            ("xml".into(), ns::XML.into()),
        ];
        // Server streams declare the dialback prefix on their root (XEP-0220 §2.1).
        if default_ns == ns::SERVER {
            decls.push(("db".into(), crate::s2s::dialback::NS.into()));
        }
        Self {
            decls,
            marks: Vec::new(),
        }
    }

    fn lookup(&self, prefix: &str) -> Option<&str> {
        self.decls
            .iter()
            .rev()
            .find(|(p, _)| p == prefix)
            .map(|(_, n)| n.as_str())
    }

    /// Declares the element's namespaces, resolves its name, and collects attributes.
    fn open(&mut self, start: &BytesStart<'_>) -> Result<Element, XmlError> {
        let mut attrs = Vec::new();
        let mut added = 0;
        for attr in start.attributes() {
            let attr = attr?;
            let key = std::str::from_utf8(attr.key.as_ref())
                .map_err(|_| XmlError::NotWellFormed("attribute name".into()))?;
            let value = attr.unescape_value()?.into_owned();
            if key == "xmlns" {
                self.decls.push((String::new(), value));
                added += 1;
            } else if let Some(prefix) = key.strip_prefix("xmlns:") {
                self.decls.push((prefix.to_owned(), value.clone()));
                added += 1;
                // Prefix declarations are kept so payloads that use the prefix still
                // serialise correctly.
                attrs.push((key.to_owned(), value));
            } else {
                attrs.push((key.to_owned(), value));
            }
        }
        self.marks.push(added);
        let qname = start.name();
        let (prefix, local) = split_name(qname.as_ref())?;
        let ns = self
            .lookup(prefix)
            .ok_or_else(|| XmlError::BadNamespacePrefix(prefix.to_owned()))?
            .to_owned();
        for (k, _) in &attrs {
            if let Some((p, _)) = k.split_once(':')
                && p != "xmlns"
                && self.lookup(p).is_none()
            {
                return Err(XmlError::BadNamespacePrefix(p.to_owned()));
            }
        }
        Ok(Element {
            name: local.to_owned(),
            ns,
            attrs,
            children: Vec::new(),
        })
    }

    /// Like `open`, without building the element.
    fn open_validate(&mut self, start: &BytesStart<'_>) -> Result<(), XmlError> {
        self.open(start).map(|_| ())
    }

    fn close(&mut self) {
        let n = self.marks.pop().unwrap_or(0);
        self.decls.truncate(self.decls.len() - n);
    }
}

fn split_name(name: &[u8]) -> Result<(&str, &str), XmlError> {
    let name =
        std::str::from_utf8(name).map_err(|_| XmlError::NotWellFormed("element name".into()))?;
    Ok(match name.split_once(':') {
        Some((p, l)) => (p, l),
        None => ("", name),
    })
}

/// Escapes text or an attribute value (single-quoted) into `out`.
pub fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

/// Escapes into a fresh string.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_and_text() {
        let xml = br#"<iq type='get' id='1'><query xmlns='jabber:iq:roster' xmlns:x='urn:x'><x:item a="1 &amp; 2">t&lt;<![CDATA[<raw>]]></x:item></query></iq>"#;
        let iq = Element::parse(xml, NsContext::CLIENT).unwrap();
        assert!(iq.is("iq", ns::CLIENT));
        assert_eq!(iq.get_attr("id"), Some("1"));
        let q = iq.get_child("query", "jabber:iq:roster").unwrap();
        let item = q.get_child("item", "urn:x").unwrap();
        assert_eq!(item.get_attr("a"), Some("1 & 2"));
        assert_eq!(item.text_content(), "t<<raw>");
    }

    #[test]
    fn stream_prefix_is_known() {
        let e = Element::parse(
            b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
            NsContext::CLIENT,
        )
        .unwrap();
        assert!(e.is("error", ns::STREAM));
    }

    #[test]
    fn round_trip() {
        let xml = "<iq type='set' id='a&apos;b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r &amp; &lt;x&gt;</resource></bind></iq>";
        let e = Element::parse(xml.as_bytes(), NsContext::CLIENT).unwrap();
        assert_eq!(e.to_xml(ns::CLIENT), xml);
        assert_eq!(
            Element::parse(e.to_xml(ns::CLIENT).as_bytes(), NsContext::CLIENT).unwrap(),
            e
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Element::parse(b"<a><b></a></b>", NsContext::CLIENT),
            Err(XmlError::NotWellFormed(_))
        ));
        assert_eq!(
            Element::parse(b"<foo:a/>", NsContext::CLIENT),
            Err(XmlError::BadNamespacePrefix("foo".into()))
        );
        assert_eq!(
            Element::parse(b"<a bar:x='1'/>", NsContext::CLIENT),
            Err(XmlError::BadNamespacePrefix("bar".into()))
        );
        assert!(validate_fragment(b"<a><b/></a><c>text</c>", ns::CLIENT).is_ok());
        assert!(validate_fragment(b"<a><b></a>", ns::CLIENT).is_err());
        assert!(validate_fragment(b"</a>", ns::CLIENT).is_err());
        assert!(validate_fragment(b"<p:a/>", ns::CLIENT).is_err());
    }
}
