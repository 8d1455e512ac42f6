//! The receiving side of a server-to-server stream (RFC 6120 §4–§6, §13.7; XEP-0220
//! Server Dialback; XEP-0178 SASL EXTERNAL), sans-IO, like [`crate::c2s`].
//!
//! A peer server connects to us to send stanzas from its domains. The driver appends
//! socket bytes and calls [`S2sIn::receive`]; the machine answers with [`Action`]s:
//! bytes to send, the TLS upgrade, a dialback key to verify with the peer's
//! authoritative server ([`S2sIn::dialback_result`] answers it), the peer's certificate
//! to check for SASL EXTERNAL ([`S2sIn::certificate_result`]), stanzas to route, the
//! end of the stream. It owns the order (header → STARTTLS → EXTERNAL or dialback),
//! which domains the peer has proven it may send from on this stream (dialback may add
//! several), the `from`/`to` checks on every stanza (`<invalid-from/>`,
//! `<host-unknown/>`, `<improper-addressing/>`), and answering `db:verify` requests
//! about keys our own nodes issued ([`dialback_key`], with the secret all nodes share).

pub mod dialback;
mod out;

pub use dialback::dialback_key;
pub use out::{OutAction, Purpose, S2sOut, S2sOutConfig};

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::BytesMut;
use jid::BareJid;

use crate::error::{StreamError, StreamErrorCondition};
use crate::framer::{Frame, Framer, FramerLimits};
use crate::ns;
use crate::stanza::{Stanza, StanzaParseError, TopLevel, parse_top_level};
use crate::stream::{self, STREAM_CLOSE, StreamHeader, proceed_with_tls};
use crate::xml::{Element, NsContext, escape};

/// Static settings of the receiving side.
#[derive(Debug, Clone)]
pub struct S2sInConfig {
    /// The domains this server serves (the XMPP domain, the MUC service …).
    pub domains: Vec<BareJid>,
    pub limits: FramerLimits,
    /// A certificate is available, so STARTTLS can be offered.
    pub tls_available: bool,
    /// Refuse dialback and SASL until TLS is in place (the default policy).
    pub tls_required: bool,
    /// The dialback secret every node of this deployment shares (XEP-0185).
    pub dialback_secret: Vec<u8>,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes.
    Send(String),
    /// `<proceed/>` was queued: flush it, then run the TLS handshake as server.
    StartTls,
    /// Check whether the peer's TLS certificate is valid for `domain` (XEP-0178), then
    /// call [`S2sIn::certificate_result`].
    CheckCertificate { domain: BareJid },
    /// Ask `originating`'s authoritative server whether `key` is the one it issued for
    /// this stream (`db:verify` with `stream_id`), then call [`S2sIn::dialback_result`].
    VerifyDialback {
        originating: BareJid,
        receiving: BareJid,
        key: String,
        stream_id: String,
    },
    /// The peer may now send from `domain` on this stream.
    Authorized { domain: BareJid },
    /// A stanza from an authorized domain to one of ours.
    Stanza(Stanza),
    /// The stream is over: close the socket once everything sent is flushed.
    Close { error: Option<StreamError> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the peer's header.
    AwaitHeader,
    /// Features sent; negotiating (STARTTLS, SASL EXTERNAL, dialback) or exchanging
    /// stanzas once a domain is authorized.
    Open,
    /// Waiting for the driver's certificate check for SASL EXTERNAL.
    AwaitCertificate,
    Closed,
}

/// One inbound server-to-server connection's protocol state.
#[derive(Debug)]
pub struct S2sIn {
    config: S2sInConfig,
    framer: Framer,
    state: State,
    secure: bool,
    /// The peer presented a certificate in the TLS handshake: EXTERNAL is offered.
    peer_certificate: bool,
    header_sent: bool,
    /// This stream's id (dialback keys are bound to it).
    stream_id: String,
    /// The domain the peer's header names, if any.
    peer: Option<BareJid>,
    /// The peer declared the dialback namespace.
    dialback: bool,
    /// The peer's domains it proved on this stream (dialback may add several).
    authorized: HashSet<BareJid>,
    /// SASL EXTERNAL succeeded: every domain of ours may be addressed.
    sasl_done: bool,
    /// Dialback requests waiting for the authoritative server's answer.
    pending: Vec<(BareJid, BareJid)>,
}

impl S2sIn {
    /// A new inbound stream; `secure` is true on a direct-TLS (XEP-0368) listener.
    pub fn new(config: S2sInConfig, secure: bool) -> Self {
        Self {
            framer: Framer::new(config.limits),
            config,
            state: State::AwaitHeader,
            secure,
            peer_certificate: false,
            header_sent: false,
            stream_id: String::new(),
            peer: None,
            dialback: false,
            authorized: HashSet::new(),
            sasl_done: false,
            pending: Vec::new(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// After a TLS handshake (STARTTLS or direct): whether the peer presented a
    /// certificate. Only then is SASL EXTERNAL offered (XEP-0178 §2), so a peer without
    /// one goes straight to dialback.
    pub fn peer_certificate(&mut self, presented: bool) {
        self.peer_certificate = presented;
    }

    /// The domains the peer may send from on this stream.
    pub fn authorized(&self) -> impl Iterator<Item = &BareJid> {
        self.authorized.iter()
    }

    /// Frames and handles everything complete in `buf`; `fresh_id` makes stream ids.
    pub fn receive(
        &mut self,
        buf: &mut BytesMut,
        fresh_id: &mut dyn FnMut() -> String,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        while !self.is_closed() && self.state != State::AwaitCertificate {
            match self.framer.next_frame(buf) {
                Ok(Some(frame)) => self.on_frame(frame, buf, fresh_id, &mut out),
                Ok(None) => break,
                Err(e) => self.stream_error(e.into(), fresh_id, &mut out),
            }
        }
        out
    }

    /// The answer to [`Action::VerifyDialback`] (XEP-0220 §2.1.2, §2.4): the verdict is
    /// sent to the peer; a valid key authorizes `originating` on this stream, an invalid
    /// one ends the stream with `<not-authorized/>`.
    pub fn dialback_result(
        &mut self,
        originating: &BareJid,
        receiving: &BareJid,
        valid: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let pair = (originating.clone(), receiving.clone());
        let Some(i) = self.pending.iter().position(|p| *p == pair) else {
            return out;
        };
        self.pending.remove(i);
        let verdict = if valid { "valid" } else { "invalid" };
        out.push(Action::Send(format!(
            "<db:result from='{}' to='{}' type='{verdict}'/>",
            escape(receiving.as_str()),
            escape(originating.as_str())
        )));
        if valid {
            self.authorized.insert(originating.clone());
            out.push(Action::Authorized {
                domain: originating.clone(),
            });
        } else {
            self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::NotAuthorized,
                    "dialback key not confirmed by the authoritative server",
                ),
                &mut || String::new(),
                &mut out,
            );
        }
        out
    }

    /// The answer to [`Action::CheckCertificate`]: SASL EXTERNAL succeeds (and the
    /// stream restarts) or fails with `<not-authorized/>`.
    pub fn certificate_result(&mut self, domain: &BareJid, valid: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state != State::AwaitCertificate {
            return out;
        }
        if valid {
            out.push(Action::Send(format!("<success xmlns='{}'/>", ns::SASL)));
            self.authorized.insert(domain.clone());
            self.sasl_done = true;
            out.push(Action::Authorized {
                domain: domain.clone(),
            });
            self.restart();
        } else {
            out.push(Action::Send(format!(
                "<failure xmlns='{}'><not-authorized/></failure>",
                ns::SASL
            )));
            self.state = State::Open;
        }
        out
    }

    /// Closes the stream from our side (shutdown, idle).
    pub fn close_with(&mut self, error: StreamError) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.is_closed() {
            self.stream_error(error, &mut || String::from("closing"), &mut out);
        }
        out
    }

    fn restart(&mut self) {
        self.framer.reset();
        self.header_sent = false;
        self.state = State::AwaitHeader;
    }

    fn ours(&self, domain: &BareJid) -> bool {
        self.config.domains.contains(domain)
    }

    fn on_frame(
        &mut self,
        frame: Frame,
        buf: &BytesMut,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        match frame {
            Frame::StreamOpen(tag) => self.on_header(&tag, fresh_id, out),
            Frame::Whitespace => {}
            Frame::StreamClose => {
                out.push(Action::Send(STREAM_CLOSE.into()));
                self.state = State::Closed;
                out.push(Action::Close { error: None });
            }
            Frame::Element(bytes) if self.state == State::Open => {
                match parse_top_level(&bytes, NsContext::SERVER) {
                    Ok(TopLevel::Nonza(el)) => self.on_nonza(el, buf, fresh_id, out),
                    Ok(TopLevel::Stanza(st)) => self.on_stanza(st, fresh_id, out),
                    Err(StanzaParseError::Stream(e)) => self.stream_error(e, fresh_id, out),
                    Err(StanzaParseError::Stanza { .. }) => self.stream_error(
                        StreamError::with_text(StreamErrorCondition::InvalidXml, "bad stanza"),
                        fresh_id,
                        out,
                    ),
                }
            }
            Frame::Element(_) => self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::NotWellFormed,
                    "element before header",
                ),
                fresh_id,
                out,
            ),
        }
    }

    fn on_header(
        &mut self,
        tag: &[u8],
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        if self.state != State::AwaitHeader {
            return self.stream_error(
                StreamError::with_text(StreamErrorCondition::NotWellFormed, "unexpected header"),
                fresh_id,
                out,
            );
        }
        let peer_header = match StreamHeader::parse(tag, ns::SERVER) {
            Ok(h) => h,
            Err(e) => return self.stream_error(e, fresh_id, out),
        };
        self.stream_id = fresh_id();
        self.dialback = peer_header.dialback;
        self.peer = peer_header
            .from
            .as_deref()
            .and_then(|f| BareJid::new(f).ok());
        let ours = peer_header
            .to
            .clone()
            .or_else(|| self.config.domains.first().cloned());
        out.push(Action::Send(header(
            ours.as_ref().map_or("", |d| d.as_str()),
            self.peer.as_ref().map(|p| p.as_str()),
            Some(&self.stream_id),
        )));
        self.header_sent = true;
        match &peer_header.to {
            Some(to) if self.ours(to) => {}
            // RFC 6120 §4.9.3.6: a domain we do not serve.
            _ => {
                return self.stream_error(
                    StreamError::with_text(
                        StreamErrorCondition::HostUnknown,
                        "this server does not serve the domain the stream is addressed to",
                    ),
                    fresh_id,
                    out,
                );
            }
        }
        let mut features = String::from("<stream:features>");
        let offer_tls = !self.secure && self.config.tls_available;
        if offer_tls {
            features.push_str(&format!("<starttls xmlns='{}'>", ns::TLS));
            if self.config.tls_required {
                features.push_str("<required/>");
            }
            features.push_str("</starttls>");
        }
        let negotiable = !offer_tls || !self.config.tls_required;
        if negotiable && !self.sasl_done {
            if self.secure && self.peer_certificate {
                features.push_str(&format!(
                    "<mechanisms xmlns='{}'><mechanism>EXTERNAL</mechanism></mechanisms>",
                    ns::SASL
                ));
            }
            features.push_str(&format!(
                "<dialback xmlns='{}'><errors/></dialback>",
                NS_DIALBACK_FEATURE
            ));
        }
        features.push_str("</stream:features>");
        out.push(Action::Send(features));
        self.state = State::Open;
    }

    fn on_nonza(
        &mut self,
        el: Element,
        buf: &BytesMut,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let tls_pending = !self.secure && self.config.tls_available && self.config.tls_required;
        match (el.ns.as_str(), el.name.as_str()) {
            (ns::TLS, "starttls") if !self.secure && self.config.tls_available => {
                match proceed_with_tls(buf) {
                    Ok(proceed) => {
                        out.push(Action::Send(proceed));
                        out.push(Action::StartTls);
                        self.secure = true;
                        self.restart();
                    }
                    Err(e) => self.stream_error(e, fresh_id, out),
                }
            }
            (_, _) if tls_pending => self.stream_error(
                StreamError::with_text(StreamErrorCondition::PolicyViolation, "TLS is required"),
                fresh_id,
                out,
            ),
            (ns::SASL, "auth") if self.secure && !self.sasl_done => {
                // XEP-0178 §3: the authorization identity, if given, is the peer's
                // domain; else the stream header's `from`.
                let identity = match el.text_content().trim() {
                    "" | "=" => self.peer.clone(),
                    b64 => B64
                        .decode(b64)
                        .ok()
                        .and_then(|raw| String::from_utf8(raw).ok())
                        .and_then(|s| BareJid::new(&s).ok()),
                };
                match (el.get_attr("mechanism"), identity) {
                    (Some("EXTERNAL"), Some(domain)) => {
                        self.state = State::AwaitCertificate;
                        out.push(Action::CheckCertificate { domain });
                    }
                    (Some("EXTERNAL"), None) => out.push(Action::Send(format!(
                        "<failure xmlns='{}'><invalid-authzid/></failure>",
                        ns::SASL
                    ))),
                    _ => out.push(Action::Send(format!(
                        "<failure xmlns='{}'><invalid-mechanism/></failure>",
                        ns::SASL
                    ))),
                }
            }
            (dialback::NS, "result") if self.dialback => self.on_db_result(&el, out),
            (dialback::NS, "verify") if self.dialback => self.on_db_verify(&el, out),
            _ => self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("unexpected <{}/> in {}", el.name, el.ns),
                ),
                fresh_id,
                out,
            ),
        }
    }

    /// `<db:result from='theirs' to='ours'>key</db:result>` (XEP-0220 §2.1.2): the
    /// driver asks the peer's authoritative server.
    fn on_db_result(&mut self, el: &Element, out: &mut Vec<Action>) {
        let from = el.get_attr("from").and_then(|f| BareJid::new(f).ok());
        let to = el.get_attr("to").and_then(|t| BareJid::new(t).ok());
        let (Some(from), Some(to)) = (from, to) else {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::ImproperAddressing,
                    "db:result without from or to",
                ),
                &mut String::new,
                out,
            );
        };
        if !self.ours(&to) {
            // XEP-0220 §2.4.3: the error goes in the result; the stream lives on.
            out.push(Action::Send(format!(
                "<db:result from='{}' to='{}' type='error'><error type='cancel'><item-not-found xmlns='{}'/></error></db:result>",
                escape(to.as_str()),
                escape(from.as_str()),
                ns::STANZA_ERRORS
            )));
            return;
        }
        self.pending.push((from.clone(), to.clone()));
        out.push(Action::VerifyDialback {
            originating: from,
            receiving: to,
            key: el.text_content(),
            stream_id: self.stream_id.clone(),
        });
    }

    /// `<db:verify from='receiving' to='ours' id='stream'>key</db:verify>` (XEP-0220
    /// §2.3): whether one of our nodes issued `key` for that stream.
    fn on_db_verify(&mut self, el: &Element, out: &mut Vec<Action>) {
        let (Some(from), Some(to), Some(id)) =
            (el.get_attr("from"), el.get_attr("to"), el.get_attr("id"))
        else {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::ImproperAddressing,
                    "db:verify without from, to or id",
                ),
                &mut String::new,
                out,
            );
        };
        let valid = BareJid::new(to).is_ok_and(|d| self.ours(&d))
            && dialback::verify(
                &self.config.dialback_secret,
                from,
                to,
                id,
                &el.text_content(),
            );
        out.push(Action::Send(format!(
            "<db:verify from='{}' to='{}' id='{}' type='{}'/>",
            escape(to),
            escape(from),
            escape(id),
            if valid { "valid" } else { "invalid" }
        )));
    }

    /// RFC 6120 §8.1.1.2, §8.1.2.2: a stanza must name one of our domains and come from
    /// a domain the peer has proven on this stream.
    fn on_stanza(
        &mut self,
        st: Stanza,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let (Some(from), Some(to)) = (st.from.as_ref(), st.to.as_ref()) else {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::ImproperAddressing,
                    "stanza without from or to",
                ),
                fresh_id,
                out,
            );
        };
        let from_domain = BareJid::new(from.domain().as_str()).ok();
        if !from_domain.is_some_and(|d| self.authorized.contains(&d)) {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::InvalidFrom,
                    format!("{} is not authorized on this stream", from.domain()),
                ),
                fresh_id,
                out,
            );
        }
        if !BareJid::new(to.domain().as_str()).is_ok_and(|d| self.ours(&d)) {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::HostUnknown,
                    format!("this server does not serve {}", to.domain()),
                ),
                fresh_id,
                out,
            );
        }
        out.push(Action::Stanza(st));
    }

    fn stream_error(
        &mut self,
        error: StreamError,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let mut s = String::new();
        if !self.header_sent {
            let ours = self.config.domains.first().map_or("", |d| d.as_str());
            s.push_str(&header(ours, None, Some(&fresh_id())));
        }
        s.push_str(&error.to_xml());
        s.push_str(STREAM_CLOSE);
        out.push(Action::Send(s));
        out.push(Action::Close { error: Some(error) });
        self.state = State::Closed;
    }
}

/// `urn:xmpp:features:dialback`: the dialback stream feature (XEP-0220 §2.1).
pub const NS_DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";

/// A header on an s2s stream: `jabber:server` with the dialback prefix declared, `from`
/// our domain, `to` the peer's (when known) and, answering, our stream `id`.
fn header(from: &str, to: Option<&str>, id: Option<&str>) -> String {
    let attrs: Vec<(&str, &str)> = [
        ("xmlns:db", Some(dialback::NS)),
        ("from", Some(from)),
        ("to", to),
        ("id", id),
        ("version", Some("1.0")),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.filter(|v| !v.is_empty()).map(|v| (k, v)))
    .collect();
    stream::header(ns::SERVER, &attrs)
}

#[cfg(test)]
mod tests;
