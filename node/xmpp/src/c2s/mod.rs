//! The client-to-server stream state machine (RFC 6120 §4–§7), sans-IO.
//!
//! The driver appends socket bytes to a buffer and calls [`C2sStream::receive`]; the
//! machine frames and parses them and returns [`Action`]s: bytes to send, a TLS upgrade
//! to perform, a credential lookup, account creation or resource binding to carry out
//! (answered through [`C2sStream::credentials`], [`C2sStream::register_result`] and
//! [`C2sStream::bind_result`]), stanzas to route, or the end of the stream. It owns
//! negotiation order (header → STARTTLS → [registration] → SASL → restart → bind),
//! stream-level errors and the `from` stamp on client stanzas. It never touches a
//! socket, a clock, storage or routing.
//!
//! In-band registration (XEP-0077) is the account-creation use case only: an
//! unauthenticated client on a TLS stream asks for the form and submits a username and
//! password, and may then authenticate as the new account on the same stream. The
//! machine validates the submission and says [`Action::Register`]; whether the account
//! can be created (rate limits, existing accounts) is the driver's call.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::BytesMut;
use jid::{BareJid, FullJid, Jid};

use crate::error::{StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition};
use crate::framer::{Frame, FrameError, Framer, FramerLimits};
use crate::ns;
use crate::sasl::{Mechanism, SaslFailure, SaslServer, SaslStep, StoredCredentials, saslprep_name};
use crate::stanza::{IqType, Kind, Stanza, StanzaParseError, TopLevel, parse_top_level};
use crate::stream::{STREAM_CLOSE, StreamHeader, proceed_with_tls, response_header};
use crate::xml::{Element, NsContext};

/// SASL attempts allowed on one stream before it is closed (RFC 6120 §6.4.5 asks for
/// a limit between 2 and 5).
pub const MAX_AUTH_ATTEMPTS: u32 = 3;

/// Longest password accepted by in-band registration, in bytes. Generous for any
/// passphrase, and it bounds the PBKDF2 input an anonymous peer can make us hash.
pub const MAX_PASSWORD_BYTES: usize = 1023;

/// The `<instructions/>` of the registration form (XEP-0077 §3.1).
const REGISTER_INSTRUCTIONS: &str = "Choose a username and password for use with this service.";

/// Static settings of a c2s stream.
#[derive(Debug, Clone)]
pub struct C2sConfig {
    /// The domain this server serves.
    pub domain: BareJid,
    pub limits: FramerLimits,
    /// A certificate is available, so STARTTLS can be offered.
    pub tls_available: bool,
    /// Refuse SASL until TLS is in place.
    pub tls_required: bool,
    /// XEP-0077 in-band registration is enabled. Even then it is only offered and
    /// accepted once the stream is encrypted, because the password travels in the iq.
    pub registration: bool,
    /// A per-deployment secret that makes the fake SCRAM salt shown for unknown
    /// accounts stable across attempts, so probing twice cannot tell a real account from
    /// a made-up one. Empty: the fake salt changes per exchange.
    pub fake_salt_secret: Arc<[u8]>,
}

/// What the driver must do.
///
/// `Debug` is written by hand so that [`Action::Register`] never prints its password:
/// actions end up in log lines.
#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes.
    Send(String),
    /// `<proceed/>` was queued in a preceding `Send`: flush it, then run the TLS
    /// handshake as server on the same socket. The framer has been reset; the buffer
    /// was checked to be empty.
    StartTls,
    /// Look up stored credentials for this account and call [`C2sStream::credentials`].
    LookupCredentials { user: BareJid },
    /// SASL succeeded.
    Authenticated { user: BareJid, mechanism: Mechanism },
    /// A SASL attempt failed (for metrics and per-address rate limits).
    AuthFailed {
        mechanism: Option<Mechanism>,
        condition: SaslFailure,
    },
    /// Create this account (XEP-0077) with credentials derived from `password`, which is
    /// already SASLprep'ed and at most [`MAX_PASSWORD_BYTES`] long, then call
    /// [`C2sStream::register_result`]. The driver must never log the password.
    Register { user: BareJid, password: String },
    /// Bind a resource (None: the server picks one) and call [`C2sStream::bind_result`].
    Bind { resource: Option<String> },
    /// A stanza from the bound client, `from` stamped with its full JID.
    Stanza(Stanza),
    /// The stream is over: close the socket once everything sent so far is flushed.
    /// `error` is what was sent to the peer, for the log line. When the machine is
    /// then [`C2sStream::is_closing`], only our side is closed (we closed a bound
    /// stream): RFC 6120 §4.4 asks us to keep handling what the client sends until its
    /// own close, which comes as a second `Close` without error.
    Close { error: Option<StreamError> },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Send(s) => f.debug_tuple("Send").field(s).finish(),
            Action::StartTls => f.write_str("StartTls"),
            Action::LookupCredentials { user } => f
                .debug_struct("LookupCredentials")
                .field("user", user)
                .finish(),
            Action::Authenticated { user, mechanism } => f
                .debug_struct("Authenticated")
                .field("user", user)
                .field("mechanism", mechanism)
                .finish(),
            Action::AuthFailed {
                mechanism,
                condition,
            } => f
                .debug_struct("AuthFailed")
                .field("mechanism", mechanism)
                .field("condition", condition)
                .finish(),
            Action::Register { user, password: _ } => f
                .debug_struct("Register")
                .field("user", user)
                .field("password", &format_args!("<redacted>"))
                .finish(),
            Action::Bind { resource } => {
                f.debug_struct("Bind").field("resource", resource).finish()
            }
            Action::Stanza(st) => f.debug_tuple("Stanza").field(st).finish(),
            Action::Close { error } => f.debug_struct("Close").field("error", error).finish(),
        }
    }
}

/// Where negotiation stands. Each state's data lives in its variant.
#[derive(Debug)]
enum State {
    /// Waiting for the client's header; `stage` says which restart this is.
    AwaitHeader(Stage),
    /// Header exchanged on a plaintext stream where TLS is required.
    AwaitStartTls,
    /// Features with mechanisms sent.
    AwaitAuth,
    /// A SASL exchange is running.
    Authenticating(Box<SaslServer>),
    /// Waiting for the driver's credential lookup.
    AwaitCredentials(Box<SaslServer>),
    /// Account creation requested from the driver; waiting for its answer. `request` is
    /// the registration iq stripped of its payload (which holds the password), kept to
    /// address the reply.
    Registering {
        request: Stanza,
    },
    /// Authenticated and restarted; waiting for the bind request.
    AwaitBind {
        user: BareJid,
    },
    /// Bind requested from the driver; waiting for its answer.
    Binding {
        user: BareJid,
        request: Stanza,
    },
    Established {
        jid: FullJid,
    },
    /// We closed a bound stream; the client's stanzas until its close still count.
    Closing {
        jid: FullJid,
    },
    Closed,
}

/// Which stream (of the up to three a connection opens) a header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Initial,
    AfterTls,
    AfterAuth,
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct C2sStream {
    config: C2sConfig,
    framer: Framer,
    state: State,
    /// TLS is active (STARTTLS done, or a direct-TLS listener).
    secure: bool,
    /// Our header has been sent on the current stream (needed before a stream error).
    header_sent: bool,
    auth_failures: u32,
    /// The authenticated account, kept across the post-auth restart.
    user: Option<BareJid>,
    /// An account was created on this stream; XEP-0077 §3.1.1 lets a server refuse a
    /// second one, which keeps one connection from minting accounts in a loop.
    registered: bool,
    lang: Option<String>,
}

impl C2sStream {
    /// A new stream; `secure` is true on a direct-TLS (XEP-0368) listener.
    pub fn new(config: C2sConfig, secure: bool) -> Self {
        Self {
            framer: Framer::new(config.limits),
            config,
            state: State::AwaitHeader(if secure {
                Stage::AfterTls
            } else {
                Stage::Initial
            }),
            secure,
            header_sent: false,
            auth_failures: 0,
            user: None,
            registered: false,
            lang: None,
        }
    }

    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The bound full JID, once established.
    pub fn jid(&self) -> Option<&FullJid> {
        match &self.state {
            State::Established { jid } => Some(jid),
            _ => None,
        }
    }

    /// The authenticated account, once SASL has succeeded.
    pub fn user(&self) -> Option<&BareJid> {
        self.user.as_ref()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether our side of a bound stream is closed and the client's is not yet.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }

    /// Frames and handles everything complete in `buf`. `fresh_id` produces random
    /// tokens (stream ids, SASL nonces); it is a parameter because this crate reads no
    /// randomness.
    pub fn receive(
        &mut self,
        buf: &mut BytesMut,
        fresh_id: &mut dyn FnMut() -> String,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        while !self.is_closed() {
            // A pending lookup, registration or bind stops framing: what follows must be
            // handled in the state the answer leads to.
            if matches!(
                self.state,
                State::AwaitCredentials(_) | State::Registering { .. } | State::Binding { .. }
            ) {
                break;
            }
            match self.framer.next_frame(buf) {
                Ok(Some(frame)) if self.is_closing() => self.on_frame_closing(frame, &mut out),
                Ok(Some(frame)) => self.on_frame(frame, buf, fresh_id, &mut out),
                Ok(None) => break,
                Err(_) if self.is_closing() => {
                    self.state = State::Closed;
                    out.push(Action::Close { error: None });
                }
                Err(e) => self.fail_frame(e, fresh_id, &mut out),
            }
        }
        out
    }

    /// The answer to [`Action::LookupCredentials`].
    pub fn credentials(
        &mut self,
        creds: Option<&StoredCredentials>,
        fresh_id: &mut dyn FnMut() -> String,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if let State::AwaitCredentials(mut sasl) = std::mem::replace(&mut self.state, State::Closed)
        {
            let step = sasl.credentials(creds);
            self.on_sasl_step(sasl, step, fresh_id, &mut out);
        }
        out
    }

    /// The answer to [`Action::Register`]: `Ok` when the account was created, else the
    /// error for the client (`<conflict/>` for an existing account, `<not-allowed/>`,
    /// `<resource-constraint/>` when rate limited). Either way the client may go on to
    /// authenticate.
    pub fn register_result(&mut self, result: Result<(), StanzaError>) -> Vec<Action> {
        let mut out = Vec::new();
        let State::Registering { request } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return out;
        };
        match result {
            Ok(()) => {
                out.push(Action::Send(request.iq_result(None).to_xml()));
                self.registered = true;
            }
            Err(error) => {
                if let Some(reply) = request.error_reply(&error) {
                    out.push(Action::Send(reply.to_xml()));
                }
            }
        }
        self.state = State::AwaitAuth;
        out
    }

    /// The answer to [`Action::Bind`]: the bound JID or the error for the client.
    pub fn bind_result(&mut self, result: Result<FullJid, StanzaError>) -> Vec<Action> {
        let mut out = Vec::new();
        let State::Binding { user, request } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return out;
        };
        match result {
            Ok(jid) => {
                let bind = Element::new("bind", ns::BIND)
                    .child(Element::new("jid", ns::BIND).text(jid.as_str()));
                let mut reply = request.iq_result(Some(&bind));
                reply.from = None;
                out.push(Action::Send(reply.to_xml()));
                self.state = State::Established { jid };
            }
            Err(error) => {
                if let Some(mut reply) = request.error_reply(&error) {
                    reply.from = None;
                    out.push(Action::Send(reply.to_xml()));
                }
                self.state = State::AwaitBind { user };
            }
        }
        out
    }

    /// Closes the stream from our side (shutdown, conflict, idle timeout). A bound
    /// stream is then [closing](Self::is_closing): the client's stanzas until its
    /// close are still handed over (RFC 6120 §4.4), so that nothing it sent before it
    /// read our close is lost.
    pub fn close_with(&mut self, error: StreamError) -> Vec<Action> {
        let mut out = Vec::new();
        if self.is_closed() || self.is_closing() {
            return out;
        }
        let bound = match &self.state {
            State::Established { jid } => Some(jid.clone()),
            _ => None,
        };
        self.stream_error(error, &mut || String::from("closing"), &mut out);
        if let Some(jid) = bound {
            self.state = State::Closing { jid };
        }
        out
    }

    /// A frame after we closed a bound stream: its stanzas are routed as before, the
    /// client's close (or anything a client cannot send on a stream it keeps) ends it.
    /// Nothing is sent any more.
    fn on_frame_closing(&mut self, frame: Frame, out: &mut Vec<Action>) {
        let State::Closing { jid } = &self.state else {
            return;
        };
        let stanza = match frame {
            Frame::Whitespace => return,
            Frame::Element(bytes) => match parse_top_level(&bytes, NsContext::CLIENT) {
                Ok(TopLevel::Stanza(st)) => Some(st),
                Ok(TopLevel::Nonza(_)) | Err(StanzaParseError::Stanza { .. }) => return,
                Err(StanzaParseError::Stream(_)) => None,
            },
            Frame::StreamOpen(_) | Frame::StreamClose => None,
        };
        match stanza {
            Some(st) => {
                // The same rules as on the open stream, minus the answers: a stanza
                // that names someone else or asks for a binding is dropped.
                let own = st.from.as_ref().is_none_or(|from| names_itself(from, jid));
                if own && !is_iq_set_of(&st, ns::SESSION) && !is_iq_set_of(&st, ns::BIND) {
                    let mut st = st;
                    st.from = Some(Jid::from(jid.clone()));
                    out.push(Action::Stanza(st));
                }
            }
            None => {
                self.state = State::Closed;
                out.push(Action::Close { error: None });
            }
        }
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
            Frame::Element(bytes) => match parse_top_level(&bytes, NsContext::CLIENT) {
                Ok(TopLevel::Nonza(el)) => self.on_nonza(el, buf, fresh_id, out),
                Ok(TopLevel::Stanza(st)) => self.on_stanza(st, fresh_id, out),
                Err(StanzaParseError::Stream(e)) => self.stream_error(e, fresh_id, out),
                Err(StanzaParseError::Stanza { reply, .. }) => {
                    if self.jid().is_none() {
                        // Before binding, any stanza is a stream-level fault.
                        self.not_authorized(fresh_id, out);
                    } else if let Some(reply) = reply {
                        out.push(Action::Send(reply.to_xml()));
                    }
                }
            },
        }
    }

    fn on_header(
        &mut self,
        tag: &[u8],
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let State::AwaitHeader(stage) = self.state else {
            self.stream_error(
                StreamError::with_text(StreamErrorCondition::NotWellFormed, "unexpected header"),
                fresh_id,
                out,
            );
            return;
        };
        let header = match StreamHeader::parse(tag, ns::CLIENT) {
            Ok(h) => h,
            Err(e) => return self.stream_error(e, fresh_id, out),
        };
        out.push(Action::Send(response_header(
            ns::CLIENT,
            self.config.domain.as_str(),
            &fresh_id(),
            header.lang.as_deref(),
        )));
        self.header_sent = true;
        if let Some(to) = header.to.as_ref().filter(|to| *to != &self.config.domain) {
            return self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::HostUnknown,
                    format!("this server does not serve {}", to.as_str()),
                ),
                fresh_id,
                out,
            );
        }
        self.lang = header.lang.clone();
        let mut features = String::from("<stream:features>");
        match stage {
            Stage::Initial | Stage::AfterTls => {
                let offer_tls = !self.secure && self.config.tls_available;
                if offer_tls {
                    features.push_str("<starttls xmlns='");
                    features.push_str(ns::TLS);
                    features.push_str(if self.config.tls_required {
                        "'><required/></starttls>"
                    } else {
                        "'/>"
                    });
                }
                if offer_tls && self.config.tls_required {
                    self.state = State::AwaitStartTls;
                } else {
                    features.push_str("<mechanisms xmlns='");
                    features.push_str(ns::SASL);
                    features.push_str("'>");
                    for m in self.offered_mechanisms() {
                        features.push_str("<mechanism>");
                        features.push_str(m.name());
                        features.push_str("</mechanism>");
                    }
                    features.push_str("</mechanisms>");
                    if self.secure && self.config.registration {
                        features.push_str("<register xmlns='");
                        features.push_str(ns::REGISTER_FEATURE);
                        features.push_str("'/>");
                    }
                    self.state = State::AwaitAuth;
                }
            }
            Stage::AfterAuth => {
                features.push_str("<bind xmlns='");
                features.push_str(ns::BIND);
                features.push_str("'/><session xmlns='");
                features.push_str(ns::SESSION);
                features.push_str("'><optional/></session><ver xmlns='");
                // Roster versioning (RFC 6121 §2.6.1) and subscription pre-approval
                // (§3.4.1, which must be announced) are served by the user actor.
                features.push_str(ns::ROSTER_VER);
                features.push_str("'/><sub xmlns='");
                features.push_str(ns::PRE_APPROVAL);
                features.push_str("'/>");
                let user = self.user.clone().expect("authenticated before restart");
                self.state = State::AwaitBind { user };
            }
        }
        features.push_str("</stream:features>");
        out.push(Action::Send(features));
    }

    /// SCRAM always; PLAIN only under TLS, where the password is not exposed.
    fn offered_mechanisms(&self) -> impl Iterator<Item = Mechanism> + '_ {
        Mechanism::ALL
            .into_iter()
            .filter(|m| self.secure || *m != Mechanism::Plain)
    }

    fn on_nonza(
        &mut self,
        el: Element,
        buf: &BytesMut,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        match (&self.state, el.ns.as_str(), el.name.as_str()) {
            (State::AwaitStartTls | State::AwaitAuth, ns::TLS, "starttls")
                if !self.secure && self.config.tls_available =>
            {
                match proceed_with_tls(buf) {
                    Ok(proceed) => {
                        out.push(Action::Send(proceed));
                        out.push(Action::StartTls);
                        self.secure = true;
                        self.restart(Stage::AfterTls);
                    }
                    Err(e) => self.stream_error(e, fresh_id, out),
                }
            }
            (State::AwaitStartTls, ns::SASL, "auth") => {
                self.sasl_failure(None, SaslFailure::EncryptionRequired, fresh_id, out)
            }
            (State::AwaitAuth, ns::SASL, "auth") => self.on_auth(&el, fresh_id, out),
            (State::Authenticating(_), ns::SASL, "response") => {
                let State::Authenticating(mut sasl) =
                    std::mem::replace(&mut self.state, State::Closed)
                else {
                    unreachable!("matched above")
                };
                let step = match decode_sasl_payload(&el.text_content()) {
                    Ok(data) => sasl.respond(&data),
                    Err(f) => SaslStep::Failure(f),
                };
                self.on_sasl_step(sasl, step, fresh_id, out);
            }
            (State::Authenticating(sasl), ns::SASL, "abort") => {
                let m = sasl.mechanism();
                self.state = State::AwaitAuth;
                self.sasl_failure(Some(m), SaslFailure::Aborted, fresh_id, out);
            }
            (State::Established { .. } | State::AwaitBind { .. }, _, _) => self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::UnsupportedStanzaType,
                    format!("unsupported element <{}/> in {}", el.name, el.ns),
                ),
                fresh_id,
                out,
            ),
            _ => self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::PolicyViolation,
                    format!("<{}/> in {} is not allowed at this point", el.name, el.ns),
                ),
                fresh_id,
                out,
            ),
        }
    }

    fn on_auth(
        &mut self,
        el: &Element,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let mechanism = el
            .get_attr("mechanism")
            .and_then(Mechanism::from_name)
            .filter(|m| self.offered_mechanisms().any(|o| o == *m));
        let Some(mechanism) = mechanism else {
            return self.sasl_failure(None, SaslFailure::InvalidMechanism, fresh_id, out);
        };
        let initial = match decode_sasl_payload(&el.text_content()) {
            Ok(d) => d,
            Err(f) => return self.sasl_failure(Some(mechanism), f, fresh_id, out),
        };
        let mut sasl = SaslServer::new(mechanism, fresh_id());
        if !self.config.fake_salt_secret.is_empty() {
            sasl = sasl.with_fake_salt_secret(&self.config.fake_salt_secret);
        }
        let mut sasl = Box::new(sasl);
        let step = sasl.start(&initial);
        self.on_sasl_step(sasl, step, fresh_id, out);
    }

    fn on_sasl_step(
        &mut self,
        sasl: Box<SaslServer>,
        step: SaslStep,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let mechanism = sasl.mechanism();
        match step {
            SaslStep::NeedCredentials { username } => match self.account(&username) {
                Some(user) => {
                    out.push(Action::LookupCredentials { user });
                    self.state = State::AwaitCredentials(sasl);
                }
                None => {
                    self.state = State::AwaitAuth;
                    self.sasl_failure(Some(mechanism), SaslFailure::NotAuthorized, fresh_id, out)
                }
            },
            SaslStep::Challenge(data) => {
                out.push(Action::Send(format!(
                    "<challenge xmlns='{}'>{}</challenge>",
                    ns::SASL,
                    B64.encode(data)
                )));
                self.state = State::Authenticating(sasl);
            }
            SaslStep::Success {
                username,
                additional_data,
            } => {
                let Some(user) = self.account(&username) else {
                    self.state = State::AwaitAuth;
                    return self.sasl_failure(
                        Some(mechanism),
                        SaslFailure::NotAuthorized,
                        fresh_id,
                        out,
                    );
                };
                out.push(Action::Send(match additional_data {
                    Some(d) => format!("<success xmlns='{}'>{}</success>", ns::SASL, B64.encode(d)),
                    None => format!("<success xmlns='{}'/>", ns::SASL),
                }));
                out.push(Action::Authenticated {
                    user: user.clone(),
                    mechanism,
                });
                self.user = Some(user);
                self.restart(Stage::AfterAuth);
            }
            SaslStep::Failure(f) => {
                self.state = State::AwaitAuth;
                self.sasl_failure(Some(mechanism), f, fresh_id, out);
            }
        }
    }

    /// The account a SASL username names on this domain, if it is a valid localpart.
    fn account(&self, username: &str) -> Option<BareJid> {
        if username.contains(['@', '/']) {
            return None;
        }
        BareJid::new(&format!("{username}@{}", self.config.domain.as_str())).ok()
    }

    fn sasl_failure(
        &mut self,
        mechanism: Option<Mechanism>,
        condition: SaslFailure,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        out.push(Action::Send(format!(
            "<failure xmlns='{}'><{}/></failure>",
            ns::SASL,
            condition.element_name()
        )));
        out.push(Action::AuthFailed {
            mechanism,
            condition,
        });
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_ATTEMPTS {
            self.stream_error(
                StreamError::with_text(
                    StreamErrorCondition::PolicyViolation,
                    "too many failed authentication attempts",
                ),
                fresh_id,
                out,
            );
        }
    }

    fn on_stanza(
        &mut self,
        mut st: Stanza,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        match &self.state {
            State::Established { jid } => {
                if let Some(from) = &st.from
                    && !names_itself(from, jid)
                {
                    return self.stream_error(
                        StreamError::with_text(
                            StreamErrorCondition::InvalidFrom,
                            "'from' does not match the bound JID",
                        ),
                        fresh_id,
                        out,
                    );
                }
                st.from = Some(Jid::from(jid.clone()));
                if is_iq_set_of(&st, ns::SESSION) {
                    // RFC 3921 session establishment is a no-op kept for old clients.
                    let mut reply = st.iq_result(None);
                    reply.from = None;
                    out.push(Action::Send(reply.to_xml()));
                } else if is_iq_set_of(&st, ns::BIND) {
                    self.reply_error(&st, StanzaErrorCondition::NotAllowed, out);
                } else {
                    out.push(Action::Stanza(st));
                }
            }
            State::AwaitBind { user } => {
                if is_iq_set_of(&st, ns::BIND) {
                    let resource = match st.iq_payload() {
                        Ok(Some(bind)) => bind
                            .get_child("resource", ns::BIND)
                            .map(|r| r.text_content())
                            .filter(|r| !r.is_empty()),
                        _ => None,
                    };
                    if resource
                        .as_ref()
                        .is_some_and(|r| user.with_resource_str(r).is_err())
                    {
                        return self.reply_error(&st, StanzaErrorCondition::BadRequest, out);
                    }
                    out.push(Action::Bind {
                        resource: resource.clone(),
                    });
                    self.state = State::Binding {
                        user: user.clone(),
                        request: st,
                    };
                } else if matches!(st.kind, Kind::Iq(IqType::Get | IqType::Set)) {
                    // Only resource binding is possible before a resource is bound.
                    self.reply_error(&st, StanzaErrorCondition::NotAuthorized, out);
                } else {
                    self.not_authorized(fresh_id, out);
                }
            }
            State::AwaitStartTls | State::AwaitAuth if self.is_register_iq(&st) => {
                self.on_register(st, out)
            }
            _ => self.not_authorized(fresh_id, out),
        }
    }

    /// An iq get or set carrying a `jabber:iq:register` query, addressed to this server
    /// (or to no one, which means the same on a client stream).
    fn is_register_iq(&self, st: &Stanza) -> bool {
        matches!(st.kind, Kind::Iq(IqType::Get | IqType::Set))
            && st
                .to
                .as_ref()
                .is_none_or(|to| to.as_str() == self.config.domain.as_str())
            && matches!(st.iq_payload(), Ok(Some(q)) if q.is("query", ns::REGISTER))
    }

    /// XEP-0077 §3.1, registration with a server before authentication.
    fn on_register(&mut self, st: Stanza, out: &mut Vec<Action>) {
        // The client has no address yet, so any 'from' it wrote is meaningless and the
        // reply goes to the stream. The payload (with the password) is not kept.
        let request = Stanza {
            kind: st.kind,
            to: st.to.clone(),
            from: None,
            id: st.id.clone(),
            extra_attrs: Vec::new(),
            payload: Default::default(),
        };
        let refuse = |error: StanzaError, out: &mut Vec<Action>| {
            if let Some(reply) = request.error_reply(&error) {
                out.push(Action::Send(reply.to_xml()));
            }
        };
        if !self.config.registration {
            return refuse(
                StanzaError::new(StanzaErrorCondition::ServiceUnavailable),
                out,
            );
        }
        if !self.secure {
            // Never offered here; a client that tries anyway is told why (the condition
            // XEP-0077 §3.3 uses for a channel not safe enough for a password).
            return refuse(
                StanzaError::with_text(
                    StanzaErrorCondition::NotAuthorized,
                    "in-band registration requires TLS",
                ),
                out,
            );
        }
        if st.kind == Kind::Iq(IqType::Get) {
            let form = Element::new("query", ns::REGISTER)
                .child(Element::new("instructions", ns::REGISTER).text(REGISTER_INSTRUCTIONS))
                .child(Element::new("username", ns::REGISTER))
                .child(Element::new("password", ns::REGISTER));
            out.push(Action::Send(request.iq_result(Some(&form)).to_xml()));
            return;
        }
        let Ok(Some(query)) = st.iq_payload() else {
            unreachable!("is_register_iq checked the payload")
        };
        match self.validate_registration(&query) {
            Ok((user, password)) => {
                out.push(Action::Register { user, password });
                self.state = State::Registering { request };
            }
            Err(error) => refuse(error, out),
        }
    }

    /// Checks a registration submission: the account it names and the SASLprep'ed
    /// password, or the stanza error XEP-0077 asks for.
    fn validate_registration(&self, query: &Element) -> Result<(BareJid, String), StanzaError> {
        use StanzaErrorCondition::{JidMalformed, NotAcceptable, UnexpectedRequest};
        if query.get_child("remove", ns::REGISTER).is_some() {
            // Cancelling needs an account, and an unauthenticated stream has none
            // (XEP-0077 §3.2).
            return Err(StanzaError::with_text(
                UnexpectedRequest,
                "authenticate before cancelling a registration",
            ));
        }
        if self.registered {
            return Err(StanzaError::with_text(
                NotAcceptable,
                "an account was already registered on this stream; authenticate first",
            ));
        }
        let field = |name: &str| {
            query
                .get_child(name, ns::REGISTER)
                .map(Element::text_content)
                .filter(|v| !v.is_empty())
        };
        // §3.1: a missing or empty field, the password included, is not acceptable.
        let (Some(username), Some(password)) = (field("username"), field("password")) else {
            return Err(StanzaError::with_text(
                NotAcceptable,
                "both <username/> and <password/> are required",
            ));
        };
        // The same preparation SASL applies to the name a client logs in with, so the
        // account created is the one that login finds.
        let user = saslprep_name(&username)
            .and_then(|name| self.account(&name))
            .ok_or_else(|| {
                StanzaError::with_text(JidMalformed, "the username is not a valid localpart")
            })?;
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(StanzaError::with_text(
                NotAcceptable,
                format!("the password is longer than {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        // SCRAM keys are derived from the prepared password, as SASL prepares the one a
        // client logs in with; one SASLprep prohibits could never be used to log in.
        let password = saslprep_name(&password).ok_or_else(|| {
            StanzaError::with_text(
                NotAcceptable,
                "the password contains characters SASLprep prohibits",
            )
        })?;
        Ok((user, password))
    }

    fn reply_error(&self, st: &Stanza, condition: StanzaErrorCondition, out: &mut Vec<Action>) {
        if let Some(mut reply) = st.error_reply(&StanzaError::new(condition)) {
            reply.from = None;
            out.push(Action::Send(reply.to_xml()));
        }
    }

    fn not_authorized(&mut self, fresh_id: &mut dyn FnMut() -> String, out: &mut Vec<Action>) {
        self.stream_error(
            StreamError::with_text(
                StreamErrorCondition::NotAuthorized,
                "stanzas are not allowed before authentication and resource binding",
            ),
            fresh_id,
            out,
        );
    }

    fn restart(&mut self, stage: Stage) {
        self.framer.reset();
        self.header_sent = false;
        self.state = State::AwaitHeader(stage);
    }

    fn fail_frame(
        &mut self,
        e: FrameError,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        self.stream_error(e.into(), fresh_id, out);
    }

    /// Sends a stream error (after our header if it was not yet sent) and the close.
    fn stream_error(
        &mut self,
        error: StreamError,
        fresh_id: &mut dyn FnMut() -> String,
        out: &mut Vec<Action>,
    ) {
        let mut s = String::new();
        if !self.header_sent {
            s.push_str(&response_header(
                ns::CLIENT,
                self.config.domain.as_str(),
                &fresh_id(),
                self.lang.as_deref(),
            ));
        }
        s.push_str(&error.to_xml());
        s.push_str(STREAM_CLOSE);
        out.push(Action::Send(s));
        out.push(Action::Close { error: Some(error) });
        self.state = State::Closed;
    }
}

/// Whether a client bound as `jid` names itself with `from` (RFC 6120 §8.1.2.1: a
/// client may only name itself, by full or bare JID).
fn names_itself(from: &Jid, jid: &FullJid) -> bool {
    if from.is_full() {
        from.as_str() == jid.as_str()
    } else {
        from.as_str() == jid.to_bare().as_str()
    }
}

fn is_iq_set_of(st: &Stanza, namespace: &str) -> bool {
    st.kind == Kind::Iq(IqType::Set)
        && matches!(st.iq_payload(), Ok(Some(el)) if el.ns == namespace)
}

/// SASL payloads are base64; a lone `=` means an empty response (RFC 6120 §6.4.2).
fn decode_sasl_payload(text: &str) -> Result<Vec<u8>, SaslFailure> {
    let text = text.trim();
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    B64.decode(text).map_err(|_| SaslFailure::IncorrectEncoding)
}

#[cfg(test)]
mod tests;
