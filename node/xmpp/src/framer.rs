//! The stream framer: finds complete top-level units in a byte stream.
//!
//! An XMPP stream is one long XML document, so a parser cannot wait for "the document"
//! to end. The framer scans the bytes at markup level only (tags, quotes, comments,
//! references) and cuts the stream into frames: the stream header, one complete
//! top-level element (a stanza or nonza), whitespace keepalives, and the stream close.
//! Only a complete frame is handed to the XML parser, so a parser never sees truncated
//! input, and the size and depth limits are enforced here, before any allocation that
//! grows with the input.
//!
//! The framer also enforces RFC 6120 §11.1 restricted XML: comments, processing
//! instructions (other than the XML declaration that may open a stream), DOCTYPE and
//! entity declarations, and references to entities other than the five predefined ones
//! are rejected. It never builds a tree and never allocates per byte; incomplete input
//! is `Ok(None)` and scanning resumes where it stopped when more bytes arrive.

use bytes::{Bytes, BytesMut};

/// Limits enforced while framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramerLimits {
    /// Largest top-level element, in bytes, including its tags.
    pub max_stanza_size: usize,
    /// Deepest element nesting inside a top-level element (the top-level element itself
    /// is depth 1).
    pub max_depth: usize,
}

impl Default for FramerLimits {
    fn default() -> Self {
        // 256 KiB is the stanza size most deployments use (it fits avatars and large
        // rosters); 32 levels is far beyond any real payload and keeps recursive
        // consumers of the parsed tree safe.
        Self {
            max_stanza_size: 256 * 1024,
            max_depth: 32,
        }
    }
}

/// One unit of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The `<stream:stream ...>` start tag, bytes of the tag only.
    StreamOpen(Bytes),
    /// A complete top-level element (stanza or nonza).
    Element(Bytes),
    /// Whitespace between top-level elements (keepalives).
    Whitespace,
    /// `</stream:stream>`.
    StreamClose,
}

/// Why the stream cannot be framed. Each maps to one stream error condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not well-formed: {0}")]
    NotWellFormed(&'static str),
    #[error("restricted XML: {0}")]
    RestrictedXml(&'static str),
    #[error("element larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("elements nested deeper than {limit}")]
    TooDeep { limit: usize },
    #[error("invalid UTF-8")]
    InvalidUtf8,
}

/// Where the scanner is inside the markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Character data (or nothing) between tags.
    Text,
    /// Just after `<`.
    Open,
    /// Inside a start tag, outside quotes.
    StartTag { self_closing_slash: bool },
    /// Inside a quoted attribute value.
    Quoted(u8),
    /// Inside an end tag.
    EndTag,
    /// After `<!`, deciding between CDATA (allowed) and everything else (restricted).
    Bang,
    /// Inside a CDATA section; `brackets` counts trailing `]`.
    Cdata { brackets: u8 },
    /// Inside the `<?xml ...?>` declaration.
    XmlDecl { question: bool },
    /// After `&` in text or an attribute value; collects the reference name.
    Reference { len: u8, in_quote: Option<u8> },
}

/// Incremental framer. Feed it a buffer that the driver appends socket reads to; each call
/// to [`Framer::next_frame`] removes one frame from the front of the buffer.
#[derive(Debug)]
pub struct Framer {
    limits: FramerLimits,
    scan: Scan,
    /// Bytes of `buf` already scanned (scanning resumes here).
    pos: usize,
    /// Depth of open elements: 0 before the stream header, 1 inside the stream, more
    /// inside a top-level element.
    depth: usize,
    /// Start offset in `buf` of the markup construct being scanned (tag, declaration).
    tag_start: usize,
    /// Whether a stream header has been seen since the last reset (an XML declaration
    /// is only allowed before it).
    header_seen: bool,
    /// Bytes of the `<!` lookahead matched so far against `[CDATA[`.
    bang_len: u8,
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

impl Framer {
    pub fn new(limits: FramerLimits) -> Self {
        Self {
            limits,
            scan: Scan::Text,
            pos: 0,
            depth: 0,
            tag_start: 0,
            header_seen: false,
            bang_len: 0,
        }
    }

    pub fn limits(&self) -> FramerLimits {
        self.limits
    }

    /// Forgets all state: used at a stream restart (after STARTTLS and after SASL), when a
    /// new stream header (optionally preceded by an XML declaration) must follow. The
    /// caller must also clear its buffer: bytes pipelined behind `<starttls/>` are a
    /// protocol violation that the caller detects before resetting.
    pub fn reset(&mut self) {
        *self = Self::new(self.limits);
    }

    /// Removes and returns the next complete frame from the front of `buf`, `Ok(None)` if
    /// more bytes are needed.
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        while self.pos < buf.len() {
            let b = buf[self.pos];
            self.pos += 1;
            match self.scan {
                Scan::Text => {
                    if b == b'<' {
                        // Whitespace at stream level is a complete frame on its own.
                        if self.depth == 1 && self.pos > 1 {
                            self.pos -= 1;
                            return self.take_whitespace(buf);
                        }
                        self.tag_start = self.pos - 1;
                        self.scan = Scan::Open;
                    } else if b == b'&' {
                        self.check_text_allowed(b)?;
                        self.scan = Scan::Reference {
                            len: 0,
                            in_quote: None,
                        };
                    } else {
                        self.check_text_allowed(b)?;
                    }
                }
                Scan::Open => match b {
                    b'/' => self.scan = Scan::EndTag,
                    b'!' => {
                        self.bang_len = 0;
                        self.scan = Scan::Bang;
                    }
                    b'?' => {
                        if self.depth == 0 && !self.header_seen {
                            self.scan = Scan::XmlDecl { question: false };
                        } else {
                            return Err(FrameError::RestrictedXml("processing instruction"));
                        }
                    }
                    b if is_name_start(b) => {
                        if self.depth == 1 {
                            // A new top-level element starts here: drop what came before
                            // it so the frame begins at its '<'.
                            self.discard_prefix(buf);
                        }
                        self.scan = Scan::StartTag {
                            self_closing_slash: false,
                        }
                    }
                    _ => return Err(FrameError::NotWellFormed("invalid character after '<'")),
                },
                Scan::StartTag { self_closing_slash } => match b {
                    b'"' | b'\'' => self.scan = Scan::Quoted(b),
                    b'/' => {
                        self.scan = Scan::StartTag {
                            self_closing_slash: true,
                        }
                    }
                    b'>' => {
                        self.scan = Scan::Text;
                        if let Some(frame) = self.close_start_tag(buf, self_closing_slash)? {
                            return Ok(Some(frame));
                        }
                    }
                    b'<' => return Err(FrameError::NotWellFormed("'<' inside a tag")),
                    _ => {
                        if self_closing_slash {
                            return Err(FrameError::NotWellFormed("'/' inside a start tag"));
                        }
                    }
                },
                Scan::Quoted(q) => {
                    if b == q {
                        self.scan = Scan::StartTag {
                            self_closing_slash: false,
                        };
                    } else if b == b'&' {
                        self.scan = Scan::Reference {
                            len: 0,
                            in_quote: Some(q),
                        };
                    } else if b == b'<' {
                        return Err(FrameError::NotWellFormed("'<' in an attribute value"));
                    }
                }
                Scan::EndTag => {
                    if b == b'>' {
                        self.scan = Scan::Text;
                        if let Some(frame) = self.close_end_tag(buf)? {
                            return Ok(Some(frame));
                        }
                    } else if b == b'<' {
                        return Err(FrameError::NotWellFormed("'<' inside an end tag"));
                    }
                }
                Scan::Bang => {
                    let i = self.bang_len as usize;
                    if b != CDATA_OPEN[i] {
                        return Err(FrameError::RestrictedXml(if i == 0 && b == b'-' {
                            "comment"
                        } else {
                            "DOCTYPE or markup declaration"
                        }));
                    }
                    if self.depth < 2 {
                        return Err(FrameError::NotWellFormed("CDATA outside an element"));
                    }
                    self.bang_len += 1;
                    if self.bang_len as usize == CDATA_OPEN.len() {
                        self.scan = Scan::Cdata { brackets: 0 };
                    }
                }
                Scan::Cdata { brackets } => {
                    self.scan = match (b, brackets) {
                        (b']', n) => Scan::Cdata {
                            brackets: (n + 1).min(2),
                        },
                        (b'>', 2) => Scan::Text,
                        _ => Scan::Cdata { brackets: 0 },
                    };
                }
                Scan::XmlDecl { question } => {
                    if question && b == b'>' {
                        // The declaration carries nothing we use (XMPP is always UTF-8),
                        // so it is dropped.
                        self.scan = Scan::Text;
                        self.discard_prefix_to(buf, self.pos);
                    } else {
                        self.scan = Scan::XmlDecl {
                            question: b == b'?',
                        };
                    }
                }
                Scan::Reference { len, in_quote } => {
                    if b == b';' {
                        let name = &buf[self.pos - 1 - len as usize..self.pos - 1];
                        check_reference(name)?;
                        self.scan = match in_quote {
                            Some(q) => Scan::Quoted(q),
                            None => Scan::Text,
                        };
                    } else if len >= 10 || !(b.is_ascii_alphanumeric() || b == b'#') {
                        // No predefined entity or character reference is this long or
                        // contains other characters; a bare '&' is not well-formed.
                        return Err(FrameError::NotWellFormed("malformed reference"));
                    } else {
                        self.scan = Scan::Reference {
                            len: len + 1,
                            in_quote,
                        };
                    }
                }
            }
            self.check_size()?;
        }
        if self.depth == 1 && self.scan == Scan::Text && !buf.is_empty() {
            // Whitespace keepalive with nothing after it yet: report it now so idle
            // timers see the activity.
            return self.take_whitespace(buf);
        }
        Ok(None)
    }

    /// Character data is only allowed inside top-level elements; at stream level only
    /// whitespace may appear (RFC 6120 §11.7 keepalives).
    fn check_text_allowed(&self, b: u8) -> Result<(), FrameError> {
        if self.depth >= 2 || b.is_ascii_whitespace() {
            Ok(())
        } else if self.depth == 0 && (b == 0xEF || b == 0xBB || b == 0xBF) && self.pos <= 3 {
            // A UTF-8 byte order mark before the stream is tolerated (and discarded
            // with the rest of the prefix).
            Ok(())
        } else {
            Err(FrameError::NotWellFormed("character data at stream level"))
        }
    }

    fn take_whitespace(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let _ = buf.split_to(self.pos);
        self.pos = 0;
        self.tag_start = 0;
        Ok(Some(Frame::Whitespace))
    }

    /// Drops bytes before the construct now being scanned (stream-level whitespace).
    fn discard_prefix(&mut self, buf: &mut BytesMut) {
        let start = self.tag_start;
        self.discard_prefix_to(buf, start);
    }

    fn discard_prefix_to(&mut self, buf: &mut BytesMut, upto: usize) {
        let _ = buf.split_to(upto);
        self.pos -= upto;
        self.tag_start -= upto.min(self.tag_start);
    }

    fn close_start_tag(
        &mut self,
        buf: &mut BytesMut,
        self_closing: bool,
    ) -> Result<Option<Frame>, FrameError> {
        match self.depth {
            0 => {
                if self_closing {
                    return Err(FrameError::NotWellFormed("self-closing stream header"));
                }
                // Anything before the header (XML declaration, whitespace, BOM) is
                // dropped; the frame is the header tag alone.
                self.discard_prefix(buf);
                let tag = buf.split_to(self.pos).freeze();
                self.pos = 0;
                self.tag_start = 0;
                self.depth = 1;
                self.header_seen = true;
                check_utf8(&tag)?;
                Ok(Some(Frame::StreamOpen(tag)))
            }
            level => {
                // Inside the stream, `depth` is the nesting level the new element gets
                // (a top-level element is level 1); self-closing ones count too.
                if level > self.limits.max_depth {
                    return Err(FrameError::TooDeep {
                        limit: self.limits.max_depth,
                    });
                }
                if !self_closing {
                    self.depth += 1;
                    Ok(None)
                } else if level == 1 {
                    self.take_element(buf).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn close_end_tag(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.depth {
            0 => Err(FrameError::NotWellFormed(
                "end tag before the stream header",
            )),
            1 => {
                let _ = buf.split_to(self.pos);
                self.pos = 0;
                self.tag_start = 0;
                self.depth = 0;
                Ok(Some(Frame::StreamClose))
            }
            2 => {
                self.depth = 1;
                self.take_element(buf).map(Some)
            }
            _ => {
                self.depth -= 1;
                Ok(None)
            }
        }
    }

    fn take_element(&mut self, buf: &mut BytesMut) -> Result<Frame, FrameError> {
        let element = buf.split_to(self.pos).freeze();
        self.pos = 0;
        self.tag_start = 0;
        check_utf8(&element)?;
        Ok(Frame::Element(element))
    }

    /// The size limit covers the element being assembled, and also stream-level bytes
    /// that are not yet a frame (a header that never ends, endless whitespace).
    fn check_size(&self) -> Result<(), FrameError> {
        if self.pos > self.limits.max_stanza_size {
            Err(FrameError::TooLarge {
                limit: self.limits.max_stanza_size,
            })
        } else {
            Ok(())
        }
    }
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':' || b >= 0x80
}

/// Only the five predefined entities and character references are allowed (RFC 6120
/// §11.1); anything else would need a DTD, which XMPP forbids.
fn check_reference(name: &[u8]) -> Result<(), FrameError> {
    match name {
        b"amp" | b"lt" | b"gt" | b"quot" | b"apos" => Ok(()),
        [b'#', b'x', hex @ ..] if !hex.is_empty() && hex.iter().all(u8::is_ascii_hexdigit) => {
            Ok(())
        }
        [b'#', dec @ ..] if !dec.is_empty() && dec.iter().all(u8::is_ascii_digit) => Ok(()),
        [] => Err(FrameError::NotWellFormed("empty reference")),
        _ if name.iter().all(|c| c.is_ascii_alphanumeric()) => {
            Err(FrameError::RestrictedXml("entity reference"))
        }
        _ => Err(FrameError::NotWellFormed("malformed reference")),
    }
}

fn check_utf8(bytes: &[u8]) -> Result<(), FrameError> {
    std::str::from_utf8(bytes)
        .map(|_| ())
        .map_err(|_| FrameError::InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    fn framer() -> Framer {
        Framer::new(FramerLimits {
            max_stanza_size: 1024,
            max_depth: 4,
        })
    }

    /// Frames all of `input` fed in one piece.
    fn frames(input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut f = framer();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(frame) = f.next_frame(&mut buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    /// Frames `input` fed in pieces split at `cuts`.
    fn frames_split(input: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, FrameError> {
        let mut f = framer();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[last..cut]);
            last = cut;
            while let Some(frame) = f.next_frame(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    /// Joins consecutive whitespace frames, which depend on how the input was split.
    fn normalize(frames: Vec<Frame>) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        for f in frames {
            if f == Frame::Whitespace && out.last() == Some(&Frame::Whitespace) {
                continue;
            }
            out.push(f);
        }
        out
    }

    fn el(s: &str) -> Frame {
        Frame::Element(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn frames_a_stream() {
        let input = format!(
            "{HEADER}<message to='a@b'><body>hi &amp; bye &#x41;</body></message> \n<presence/></stream:stream>"
        );
        let got = frames(input.as_bytes()).unwrap();
        let header = HEADER.trim_start_matches("<?xml version='1.0'?>");
        assert_eq!(
            got,
            vec![
                Frame::StreamOpen(Bytes::copy_from_slice(header.as_bytes())),
                el("<message to='a@b'><body>hi &amp; bye &#x41;</body></message>"),
                Frame::Whitespace,
                el("<presence/>"),
                Frame::StreamClose,
            ]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let input = format!(
            "\u{feff}{HEADER} <iq type='get' id=\"a>b\"><query xmlns='x'><![CDATA[<not a tag>]]]></query></iq><message><body>caf\u{e9} \u{1F600}</body></message></stream:stream>"
        );
        let bytes = input.as_bytes();
        let whole = normalize(frames(bytes).unwrap());
        assert_eq!(whole.len(), 5, "{whole:?}");
        for cut in 0..=bytes.len() {
            assert_eq!(
                normalize(frames_split(bytes, &[cut]).unwrap()),
                whole,
                "cut at {cut}"
            );
        }
        // And byte by byte.
        let all: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(normalize(frames_split(bytes, &all).unwrap()), whole);
    }

    #[test]
    fn incomplete_is_none_not_error() {
        let mut f = framer();
        let mut buf = BytesMut::from(&b"<stream:stream xmlns='jabber:cl"[..]);
        assert_eq!(f.next_frame(&mut buf), Ok(None));
        buf.extend_from_slice(b"ient'><message><bo");
        assert!(matches!(
            f.next_frame(&mut buf),
            Ok(Some(Frame::StreamOpen(_)))
        ));
        assert_eq!(f.next_frame(&mut buf), Ok(None));
        buf.extend_from_slice(b"dy/></message>");
        assert_eq!(
            f.next_frame(&mut buf),
            Ok(Some(el("<message><body/></message>")))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_element_is_rejected_before_it_completes() {
        let mut f = framer();
        let mut buf = BytesMut::from(format!("{HEADER}<message><body>").as_bytes());
        assert!(matches!(
            f.next_frame(&mut buf),
            Ok(Some(Frame::StreamOpen(_)))
        ));
        assert_eq!(f.next_frame(&mut buf), Ok(None));
        buf.extend_from_slice(&[b'a'; 1100]);
        assert_eq!(
            f.next_frame(&mut buf),
            Err(FrameError::TooLarge { limit: 1024 })
        );
    }

    #[test]
    fn endless_header_is_rejected() {
        let mut input = b"<stream:stream a='".to_vec();
        input.extend_from_slice(&[b'x'; 2000]);
        assert_eq!(frames(&input), Err(FrameError::TooLarge { limit: 1024 }));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let ok = format!("{HEADER}<a><b><c><d/></c></b></a>");
        assert_eq!(frames(ok.as_bytes()).unwrap().len(), 2);
        let deep = format!("{HEADER}<a><b><c><d><e/></d></c></b></a>");
        assert_eq!(
            frames(deep.as_bytes()),
            Err(FrameError::TooDeep { limit: 4 })
        );
    }

    #[test]
    fn restricted_xml_is_rejected() {
        for (input, want) in [
            (
                format!("{HEADER}<!-- hi -->"),
                FrameError::RestrictedXml("comment"),
            ),
            (
                format!("{HEADER}<message><!-- hi --></message>"),
                FrameError::RestrictedXml("comment"),
            ),
            (
                "<!DOCTYPE foo [<!ENTITY x 'y'>]><stream:stream>".to_string(),
                FrameError::RestrictedXml("DOCTYPE or markup declaration"),
            ),
            (
                format!("{HEADER}<message><?pi x?></message>"),
                FrameError::RestrictedXml("processing instruction"),
            ),
            (
                format!("{HEADER}<?xml version='1.0'?>"),
                FrameError::RestrictedXml("processing instruction"),
            ),
            (
                format!("{HEADER}<message><body>&lol;</body></message>"),
                FrameError::RestrictedXml("entity reference"),
            ),
            (
                format!("{HEADER}<message a='&xxe;'/>"),
                FrameError::RestrictedXml("entity reference"),
            ),
        ] {
            assert_eq!(frames(input.as_bytes()), Err(want), "{input}");
        }
    }

    #[test]
    fn malformed_input_is_rejected() {
        for (input, want) in [
            (format!("{HEADER}hello"), "character data at stream level"),
            (
                format!("{HEADER}<message>a & b</message>"),
                "malformed reference",
            ),
            (
                format!("{HEADER}<1message/>"),
                "invalid character after '<'",
            ),
            (
                format!("{HEADER}<message a='<'/>"),
                "'<' in an attribute value",
            ),
            (
                "</stream:stream>".to_string(),
                "end tag before the stream header",
            ),
            ("<stream:stream/>".to_string(), "self-closing stream header"),
        ] {
            assert_eq!(
                frames(input.as_bytes()),
                Err(FrameError::NotWellFormed(want)),
                "{input}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut input = format!("{HEADER}<message><body>").into_bytes();
        input.extend_from_slice(&[0xC3, 0x28]);
        input.extend_from_slice(b"</body></message>");
        assert_eq!(frames(&input), Err(FrameError::InvalidUtf8));
    }

    #[test]
    fn reset_accepts_a_new_header() {
        let mut f = framer();
        let mut buf = BytesMut::from(format!("{HEADER}<starttls/>").as_bytes());
        assert!(matches!(
            f.next_frame(&mut buf),
            Ok(Some(Frame::StreamOpen(_)))
        ));
        assert_eq!(f.next_frame(&mut buf), Ok(Some(el("<starttls/>"))));
        f.reset();
        buf.extend_from_slice(HEADER.as_bytes());
        assert!(matches!(
            f.next_frame(&mut buf),
            Ok(Some(Frame::StreamOpen(_)))
        ));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // Bounded fuzzing in CI: arbitrary bytes, split arbitrarily, must never panic
            // and must frame identically however they are split.
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..600) {
                let cut = cut.min(data.len());
                let whole = frames(&data).map(normalize);
                let split = frames_split(&data, &[cut]).map(normalize);
                match (&whole, &split) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                    (Err(_), Err(_)) => {}
                    // An error may be found later in the whole input than in a prefix only
                    // when the frames before it are the same; compare what is comparable.
                    _ => {}
                }
            }

            #[test]
            fn xmlish_input_never_panics(parts in proptest::collection::vec(prop_oneof![
                Just("<a>"), Just("</a>"), Just("<b x='1'/>"), Just("&amp;"), Just("&x;"),
                Just("<!--"), Just("-->"), Just("<![CDATA["), Just("]]>"), Just("<?"),
                Just("?>"), Just(" "), Just("text"), Just("'"), Just("\""), Just(">"),
                Just("<stream:stream>"), Just("</stream:stream>"),
            ], 0..60)) {
                let input: String = parts.concat();
                let _ = frames(input.as_bytes());
            }
        }
    }
}
