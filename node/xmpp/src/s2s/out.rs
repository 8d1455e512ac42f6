//! The initiating side of a server-to-server stream, sans-IO: we connect to a peer
//! server to send stanzas from one of our domains ([`Purpose::Send`]), or to ask it,
//! as the authoritative server of a domain, whether a dialback key is its own
//! ([`Purpose::Verify`], XEP-0220 §2.3).
//!
//! Order: header → STARTTLS (required by default) → SASL EXTERNAL when the peer offers
//! it and our certificate can be used, else dialback (`db:result` with a XEP-0185 key)
//! → ready. The driver calls [`S2sOut::start`], writes what it is told, performs the
//! client TLS handshake on [`OutAction::StartTls`] and then calls
//! [`S2sOut::tls_established`], feeds received bytes to [`S2sOut::receive`], and once
//! [`OutAction::Ready`] writes stanzas serialised by [`S2sOut::stanza`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::BytesMut;
use jid::BareJid;

use super::dialback::{self, dialback_key};
use super::header;
use crate::error::{StreamError, StreamErrorCondition};
use crate::framer::{Frame, Framer, FramerLimits};
use crate::ns;
use crate::stanza::{Stanza, TopLevel, parse_top_level};
use crate::stream::{STREAM_CLOSE, StreamHeader};
use crate::xml::{Element, NsContext, escape};

/// Why we open the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// To send stanzas from `local` to the peer's domain.
    Send,
    /// To ask the peer whether `key` is the dialback key it issued for its stream
    /// `stream_id` to `receiving` (one of our domains).
    Verify {
        receiving: BareJid,
        stream_id: String,
        key: String,
    },
}

/// Settings of one outbound stream.
#[derive(Debug, Clone)]
pub struct S2sOutConfig {
    /// Our domain the stream is from.
    pub local: BareJid,
    /// The peer's domain.
    pub remote: BareJid,
    pub limits: FramerLimits,
    /// Refuse to go on without TLS (the default policy).
    pub tls_required: bool,
    /// Our certificate is valid for `local`, so SASL EXTERNAL may be tried.
    pub sasl_external: bool,
    /// The dialback secret every node of this deployment shares (XEP-0185).
    pub dialback_secret: Vec<u8>,
    pub purpose: Purpose,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutAction {
    Send(String),
    /// `<proceed/>` arrived: run the TLS handshake as client (server name: the peer's
    /// domain), then call [`S2sOut::tls_established`].
    StartTls,
    /// The peer accepted us: stanzas may be written.
    Ready,
    /// The answer to a [`Purpose::Verify`] stream.
    Verified {
        valid: bool,
    },
    /// The stream is over; `error` says why, for the log and for bouncing what was
    /// queued (`<remote-server-not-found/>` or the like).
    Close {
        error: Option<StreamError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHeader,
    AwaitFeatures,
    AwaitProceed,
    AwaitTls,
    AwaitSasl,
    AwaitDialback,
    AwaitVerify,
    Ready,
    Closed,
}

#[derive(Debug)]
pub struct S2sOut {
    config: S2sOutConfig,
    framer: Framer,
    state: State,
    secure: bool,
    /// EXTERNAL was refused once: dialback next.
    external_failed: bool,
    /// SASL EXTERNAL succeeded: the restarted stream is ready once it opens.
    authenticated: bool,
    /// The peer's header declared the dialback prefix.
    peer_dialback: bool,
    stream_id: Option<String>,
}

impl S2sOut {
    /// A new outbound stream; `secure` when the connection is direct TLS (XEP-0368).
    pub fn new(config: S2sOutConfig, secure: bool) -> Self {
        Self {
            framer: Framer::new(config.limits),
            config,
            state: State::AwaitHeader,
            secure,
            external_failed: false,
            authenticated: false,
            peer_dialback: false,
            stream_id: None,
        }
    }

    /// Our stream header; write it first.
    pub fn start(&mut self) -> Vec<OutAction> {
        self.framer.reset();
        self.state = State::AwaitHeader;
        vec![OutAction::Send(header(
            self.config.local.as_str(),
            Some(self.config.remote.as_str()),
            None,
        ))]
    }

    /// The TLS handshake finished: the stream starts over.
    pub fn tls_established(&mut self) -> Vec<OutAction> {
        self.secure = true;
        self.start()
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// A stanza as it is written on this stream (its `from` must be in our domain).
    pub fn stanza(&self, st: &Stanza) -> String {
        st.to_xml()
    }

    /// Closes the stream from our side (idle, shutdown).
    pub fn close(&mut self) -> Vec<OutAction> {
        if self.is_closed() {
            return Vec::new();
        }
        self.state = State::Closed;
        vec![
            OutAction::Send(STREAM_CLOSE.into()),
            OutAction::Close { error: None },
        ]
    }

    pub fn receive(&mut self, buf: &mut BytesMut) -> Vec<OutAction> {
        let mut out = Vec::new();
        while !self.is_closed() && self.state != State::AwaitTls {
            match self.framer.next_frame(buf) {
                Ok(Some(frame)) => self.on_frame(frame, &mut out),
                Ok(None) => break,
                Err(e) => self.fail(e.into(), &mut out),
            }
        }
        out
    }

    fn on_frame(&mut self, frame: Frame, out: &mut Vec<OutAction>) {
        match frame {
            Frame::Whitespace => {}
            Frame::StreamClose => {
                out.push(OutAction::Send(STREAM_CLOSE.into()));
                self.state = State::Closed;
                out.push(OutAction::Close { error: None });
            }
            Frame::StreamOpen(tag) if self.state == State::AwaitHeader => {
                match StreamHeader::parse(&tag, ns::SERVER) {
                    Ok(h) => {
                        self.peer_dialback = h.dialback;
                        self.stream_id = h.id;
                        self.state = State::AwaitFeatures;
                    }
                    Err(e) => self.fail(e, out),
                }
            }
            Frame::StreamOpen(_) => self.fail(
                StreamError::with_text(StreamErrorCondition::NotWellFormed, "unexpected header"),
                out,
            ),
            Frame::Element(bytes) => match parse_top_level(&bytes, NsContext::SERVER) {
                Ok(TopLevel::Nonza(el)) => self.on_nonza(el, out),
                // Stanzas come the other way on their own stream.
                Ok(TopLevel::Stanza(_)) | Err(_) => self.fail(
                    StreamError::with_text(
                        StreamErrorCondition::UnsupportedStanzaType,
                        "stanzas are not expected on an outbound stream",
                    ),
                    out,
                ),
            },
        }
    }

    fn on_nonza(&mut self, el: Element, out: &mut Vec<OutAction>) {
        match (self.state, el.ns.as_str(), el.name.as_str()) {
            (_, ns::STREAM, "error") => {
                let condition = el
                    .elements()
                    .find(|e| e.ns == ns::STREAM_ERRORS)
                    .and_then(|e| StreamErrorCondition::from_name(&e.name))
                    .unwrap_or(StreamErrorCondition::UndefinedCondition);
                self.state = State::Closed;
                out.push(OutAction::Close {
                    error: Some(StreamError::with_text(
                        condition,
                        "the peer closed the stream",
                    )),
                });
            }
            (State::AwaitFeatures, ns::STREAM, "features") => self.on_features(&el, out),
            (State::AwaitProceed, ns::TLS, "proceed") => {
                self.state = State::AwaitTls;
                out.push(OutAction::StartTls);
            }
            (State::AwaitSasl, ns::SASL, "success") => {
                self.authenticated = true;
                out.extend(self.start());
            }
            (State::AwaitSasl, ns::SASL, "failure") => {
                self.external_failed = true;
                self.dialback(out);
            }
            (State::AwaitDialback, dialback::NS, "result") => match el.get_attr("type") {
                Some("valid") => {
                    self.state = State::Ready;
                    out.push(OutAction::Ready);
                }
                _ => self.fail(
                    StreamError::with_text(
                        StreamErrorCondition::NotAuthorized,
                        format!("{} refused our dialback key", self.config.remote),
                    ),
                    out,
                ),
            },
            (State::AwaitVerify, dialback::NS, "verify") => {
                out.push(OutAction::Verified {
                    valid: el.get_attr("type") == Some("valid"),
                });
                out.extend(self.close());
            }
            _ => self.fail(
                StreamError::with_text(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("unexpected <{}/> in {}", el.name, el.ns),
                ),
                out,
            ),
        }
    }

    fn on_features(&mut self, features: &Element, out: &mut Vec<OutAction>) {
        let starttls = features.get_child("starttls", ns::TLS).is_some();
        if !self.secure {
            if starttls {
                self.state = State::AwaitProceed;
                out.push(OutAction::Send(format!("<starttls xmlns='{}'/>", ns::TLS)));
                return;
            }
            if self.config.tls_required {
                return self.fail(
                    StreamError::with_text(
                        StreamErrorCondition::PolicyViolation,
                        format!(
                            "{} does not offer TLS, which is required",
                            self.config.remote
                        ),
                    ),
                    out,
                );
            }
        }
        let external = features
            .get_child("mechanisms", ns::SASL)
            .is_some_and(|m| m.elements().any(|e| e.text_content().trim() == "EXTERNAL"));
        if let Purpose::Verify {
            receiving,
            stream_id,
            key,
        } = &self.config.purpose
        {
            self.state = State::AwaitVerify;
            out.push(OutAction::Send(format!(
                "<db:verify from='{}' to='{}' id='{}'>{}</db:verify>",
                escape(receiving.as_str()),
                escape(self.config.remote.as_str()),
                escape(stream_id),
                escape(key)
            )));
            return;
        }
        if external && self.config.sasl_external && !self.external_failed {
            self.state = State::AwaitSasl;
            out.push(OutAction::Send(format!(
                "<auth xmlns='{}' mechanism='EXTERNAL'>{}</auth>",
                ns::SASL,
                B64.encode(self.config.local.as_str())
            )));
            return;
        }
        if self.authenticated {
            self.state = State::Ready;
            out.push(OutAction::Ready);
            return;
        }
        self.dialback(out);
    }

    /// XEP-0220 §2.1.1: `<db:result>` with the key for the peer's stream id.
    fn dialback(&mut self, out: &mut Vec<OutAction>) {
        let Some(id) = self.stream_id.clone().filter(|_| self.peer_dialback) else {
            return self.fail(
                StreamError::with_text(
                    StreamErrorCondition::NotAuthorized,
                    format!(
                        "{} offers no way to authenticate we can use",
                        self.config.remote
                    ),
                ),
                out,
            );
        };
        let key = dialback_key(
            &self.config.dialback_secret,
            self.config.remote.as_str(),
            self.config.local.as_str(),
            &id,
        );
        self.state = State::AwaitDialback;
        out.push(OutAction::Send(format!(
            "<db:result from='{}' to='{}'>{key}</db:result>",
            escape(self.config.local.as_str()),
            escape(self.config.remote.as_str())
        )));
    }

    fn fail(&mut self, error: StreamError, out: &mut Vec<OutAction>) {
        let mut s = error.to_xml();
        s.push_str(STREAM_CLOSE);
        out.push(OutAction::Send(s));
        out.push(OutAction::Close { error: Some(error) });
        self.state = State::Closed;
    }
}
