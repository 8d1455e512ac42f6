//! The client side of stream negotiation as a sans-IO state machine: STARTTLS, SASL
//! (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN), resource binding and initial presence, or an
//! XEP-0077 in-band registration instead of a login.
//!
//! It owns the order of the exchange and the meaning of each reply. It never touches a
//! socket or a clock: the driver (`conn`) feeds it frames from `shoal-xmpp`'s framer and
//! carries out the [`Action`]s it returns, in order, timestamping the phase marks. The
//! state is an enum whose variants carry exactly what that step needs (the SCRAM client
//! lives only while SASL runs), replaced as a whole on every transition.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use shoal_xmpp::framer::Frame;
use shoal_xmpp::ns;
use shoal_xmpp::sasl::{ScramClient, ScramClientError, ScramHash, plain_initial_response};
use shoal_xmpp::stanza::{IqType, Kind, Stanza, TopLevel, parse_top_level};
use shoal_xmpp::stream::{StreamHeader, initial_header};
use shoal_xmpp::xml::{Element, NsContext, escape};

/// How the transport is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP throughout (the server must not require TLS).
    None,
    /// STARTTLS on the plain port (RFC 6120 §5).
    Starttls,
    /// TLS from the first byte (XEP-0368).
    Direct,
}

/// The SASL mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mech {
    #[value(name = "scram-sha-256")]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[value(name = "scram-sha-1")]
    #[serde(rename = "scram-sha-1")]
    ScramSha1,
    Plain,
}

impl Mech {
    /// The name servers advertise in `<mechanisms/>`.
    pub fn wire_name(self) -> &'static str {
        match self {
            Mech::ScramSha256 => "SCRAM-SHA-256",
            Mech::ScramSha1 => "SCRAM-SHA-1",
            Mech::Plain => "PLAIN",
        }
    }
}

/// What the negotiation is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// Authenticate, bind a resource (server-chosen when `None`) and send initial
    /// presence.
    Login { resource: Option<String> },
    /// Create the account by in-band registration, then stop.
    Register,
}

/// Everything one negotiation needs.
#[derive(Debug, Clone)]
pub struct Params {
    pub domain: String,
    pub username: String,
    pub password: String,
    pub mech: Mech,
    pub tls: TlsMode,
    /// The SCRAM client nonce: printable ASCII without `,`; unique per exchange.
    pub nonce: String,
    pub goal: Goal,
}

/// Phases whose duration the driver measures between [`Action::Begin`] and
/// [`Action::End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Tls,
    Auth,
    Bind,
}

/// What the negotiation ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Bound and presence sent: the session is ready for stanzas.
    Established {
        jid: String,
    },
    Registered,
    /// Registration answered `<conflict/>`: the account exists already.
    AlreadyRegistered,
}

/// Something the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(String),
    /// Start the TLS handshake on the plain socket, then call
    /// [`Negotiator::tls_established`].
    StartTls,
    /// A stream restart: reset the framer and discard buffered input.
    ResetStream,
    Begin(Phase),
    End(Phase),
    Done(Outcome),
}

/// Why a negotiation failed. [`NegotiationError::reason`] gives the short, stable key
/// failures are counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NegotiationError {
    StreamError(String),
    SaslFailure(String),
    Scram(ScramClientError),
    TlsRequired,
    TlsUnavailable,
    TlsRefused,
    MechanismUnavailable(&'static str),
    BindFailed(String),
    RegisterFailed(String),
    /// The server sent something that does not fit the state.
    Unexpected {
        state: &'static str,
        got: String,
    },
    /// The stream closed before the negotiation finished.
    Closed(&'static str),
    Malformed(String),
}

impl NegotiationError {
    pub fn reason(&self) -> String {
        match self {
            Self::StreamError(c) => format!("stream-error:{c}"),
            Self::SaslFailure(c) => format!("sasl:{c}"),
            Self::Scram(_) => "sasl:scram-verification".into(),
            Self::TlsRequired => "tls-required".into(),
            Self::TlsUnavailable => "tls-unavailable".into(),
            Self::TlsRefused => "tls-refused".into(),
            Self::MechanismUnavailable(m) => format!("mechanism-unavailable:{m}"),
            Self::BindFailed(c) => format!("bind:{c}"),
            Self::RegisterFailed(c) => format!("register:{c}"),
            Self::Unexpected { state, .. } => format!("unexpected:{state}"),
            Self::Closed(state) => format!("closed:{state}"),
            Self::Malformed(_) => "malformed".into(),
        }
    }
}

impl std::fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scram(e) => write!(f, "SCRAM: {e}"),
            Self::Unexpected { state, got } => write!(f, "unexpected {got} while {state}"),
            Self::Malformed(m) => write!(f, "malformed input: {m}"),
            other => f.write_str(&other.reason()),
        }
    }
}

impl std::error::Error for NegotiationError {}

/// How far the stream has come; decides what the next features element is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Initial,
    Secured,
    Authenticated,
}

enum State {
    AwaitHeader(Stage),
    AwaitFeatures(Stage),
    AwaitProceed,
    Handshaking,
    AwaitChallenge(Box<ScramClient>),
    AwaitSuccess(Option<Box<ScramClient>>),
    AwaitBind,
    AwaitRegister,
    Done,
    /// Transient while a transition runs; never observed from outside.
    Poisoned,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitHeader(_) => "header",
            State::AwaitFeatures(_) => "features",
            State::AwaitProceed => "starttls",
            State::Handshaking => "tls",
            State::AwaitChallenge(_) | State::AwaitSuccess(_) => "auth",
            State::AwaitBind => "bind",
            State::AwaitRegister => "register",
            State::Done => "done",
            State::Poisoned => "poisoned",
        }
    }
}

const BIND_ID: &str = "bind1";
const REGISTER_ID: &str = "reg1";

/// One client negotiation.
pub struct Negotiator {
    params: Params,
    state: State,
}

impl Negotiator {
    /// A negotiation and its first actions. With [`TlsMode::Direct`] the driver has
    /// completed the TLS handshake before calling this.
    pub fn new(params: Params) -> (Self, Vec<Action>) {
        let stage = if params.tls == TlsMode::Direct {
            Stage::Secured
        } else {
            Stage::Initial
        };
        let header = initial_header(ns::CLIENT, &params.domain);
        (
            Self {
                params,
                state: State::AwaitHeader(stage),
            },
            vec![Action::Send(header)],
        )
    }

    /// Where the negotiation is, for timeout and failure reports.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The TLS handshake asked for by [`Action::StartTls`] finished.
    pub fn tls_established(&mut self) -> Vec<Action> {
        self.state = State::AwaitHeader(Stage::Secured);
        vec![
            Action::End(Phase::Tls),
            Action::Send(initial_header(ns::CLIENT, &self.params.domain)),
        ]
    }

    /// Feeds one frame; returns the actions it calls for.
    pub fn handle(&mut self, frame: Frame) -> Result<Vec<Action>, NegotiationError> {
        let state = std::mem::replace(&mut self.state, State::Poisoned);
        let name = state.name();
        let element = match frame {
            Frame::Whitespace => {
                self.state = state;
                return Ok(Vec::new());
            }
            Frame::StreamClose => return Err(NegotiationError::Closed(name)),
            Frame::StreamOpen(tag) => {
                let State::AwaitHeader(stage) = state else {
                    return Err(unexpected(name, "stream header"));
                };
                StreamHeader::parse(&tag, ns::CLIENT)
                    .map_err(|e| NegotiationError::Malformed(format!("stream header: {e:?}")))?;
                self.state = State::AwaitFeatures(stage);
                return Ok(Vec::new());
            }
            Frame::Element(bytes) => bytes,
        };
        let top = parse(&element)?;
        if let TopLevel::Nonza(e) = &top
            && e.is("error", ns::STREAM)
        {
            let cond = e
                .elements()
                .find(|c| c.ns == ns::STREAM_ERRORS && c.name != "text")
                .map(|c| c.name.clone())
                .unwrap_or_else(|| "undefined-condition".into());
            return Err(NegotiationError::StreamError(cond));
        }
        let (next, actions) = self.step(state, top)?;
        self.state = next;
        Ok(actions)
    }

    fn step(&self, state: State, top: TopLevel) -> Result<(State, Vec<Action>), NegotiationError> {
        let name = state.name();
        match (state, top) {
            (State::AwaitFeatures(stage), TopLevel::Nonza(f)) if f.is("features", ns::STREAM) => {
                self.on_features(stage, &f)
            }
            (State::AwaitProceed, TopLevel::Nonza(e)) if e.is("proceed", ns::TLS) => Ok((
                State::Handshaking,
                vec![Action::ResetStream, Action::StartTls],
            )),
            (State::AwaitProceed, TopLevel::Nonza(e)) if e.is("failure", ns::TLS) => {
                Err(NegotiationError::TlsRefused)
            }
            (State::AwaitChallenge(mut scram), TopLevel::Nonza(e))
                if e.is("challenge", ns::SASL) =>
            {
                let response = scram
                    .handle_challenge(&sasl_payload(&e)?)
                    .map_err(NegotiationError::Scram)?;
                Ok((
                    State::AwaitSuccess(Some(scram)),
                    vec![Action::Send(format!(
                        "<response xmlns='{}'>{}</response>",
                        ns::SASL,
                        B64.encode(response)
                    ))],
                ))
            }
            (State::AwaitSuccess(scram), TopLevel::Nonza(e)) if e.is("success", ns::SASL) => {
                if let Some(scram) = scram {
                    scram
                        .verify_success(&sasl_payload(&e)?)
                        .map_err(NegotiationError::Scram)?;
                }
                Ok((
                    State::AwaitHeader(Stage::Authenticated),
                    vec![
                        Action::End(Phase::Auth),
                        Action::ResetStream,
                        Action::Send(initial_header(ns::CLIENT, &self.params.domain)),
                    ],
                ))
            }
            (State::AwaitChallenge(_) | State::AwaitSuccess(_), TopLevel::Nonza(e))
                if e.is("failure", ns::SASL) =>
            {
                let cond = e
                    .elements()
                    .next()
                    .map(|c| c.name.clone())
                    .unwrap_or_else(|| "unknown".into());
                Err(NegotiationError::SaslFailure(cond))
            }
            (State::AwaitBind, TopLevel::Stanza(s)) if s.id.as_deref() == Some(BIND_ID) => {
                match s.kind {
                    Kind::Iq(IqType::Result) => {
                        let jid = s
                            .iq_payload()
                            .ok()
                            .flatten()
                            .and_then(|b| b.get_child("jid", ns::BIND).map(|j| j.text_content()))
                            .ok_or_else(|| NegotiationError::BindFailed("no-jid".into()))?;
                        Ok((
                            State::Done,
                            vec![
                                Action::End(Phase::Bind),
                                Action::Send("<presence/>".into()),
                                Action::Done(Outcome::Established { jid }),
                            ],
                        ))
                    }
                    _ => Err(NegotiationError::BindFailed(stanza_error_condition(&s))),
                }
            }
            (State::AwaitRegister, TopLevel::Stanza(s)) if s.id.as_deref() == Some(REGISTER_ID) => {
                match s.kind {
                    Kind::Iq(IqType::Result) => {
                        Ok((State::Done, vec![Action::Done(Outcome::Registered)]))
                    }
                    _ => match stanza_error_condition(&s).as_str() {
                        "conflict" => {
                            Ok((State::Done, vec![Action::Done(Outcome::AlreadyRegistered)]))
                        }
                        other => Err(NegotiationError::RegisterFailed(other.into())),
                    },
                }
            }
            // Stanzas the server pushes while we wait for our answer (none are expected
            // before binding, but a server may send presence or roster pushes early)
            // are not ours to handle.
            (state @ (State::AwaitBind | State::AwaitRegister), TopLevel::Stanza(_)) => {
                Ok((state, Vec::new()))
            }
            (_, TopLevel::Stanza(s)) => Err(unexpected(name, s.kind.name())),
            (_, TopLevel::Nonza(e)) => Err(unexpected(name, &e.name)),
        }
    }

    fn on_features(
        &self,
        stage: Stage,
        features: &Element,
    ) -> Result<(State, Vec<Action>), NegotiationError> {
        let p = &self.params;
        let starttls = features.get_child("starttls", ns::TLS);
        match stage {
            Stage::Initial if p.tls == TlsMode::Starttls => {
                if starttls.is_none() {
                    return Err(NegotiationError::TlsUnavailable);
                }
                return Ok((
                    State::AwaitProceed,
                    vec![
                        Action::Begin(Phase::Tls),
                        Action::Send(format!("<starttls xmlns='{}'/>", ns::TLS)),
                    ],
                ));
            }
            Stage::Initial
                if starttls.is_some_and(|s| s.get_child("required", ns::TLS).is_some()) =>
            {
                return Err(NegotiationError::TlsRequired);
            }
            Stage::Authenticated => {
                return Ok((
                    State::AwaitBind,
                    vec![
                        Action::Begin(Phase::Bind),
                        Action::Send(format!(
                            "<iq type='set' id='{BIND_ID}'><bind xmlns='{}'>{}</bind></iq>",
                            ns::BIND,
                            match &p.goal {
                                Goal::Login { resource: Some(r) } =>
                                    format!("<resource>{}</resource>", escape(r)),
                                _ => String::new(),
                            }
                        )),
                    ],
                ));
            }
            Stage::Initial | Stage::Secured => {}
        }
        if p.goal == Goal::Register {
            return Ok((
                State::AwaitRegister,
                vec![Action::Send(format!(
                    "<iq type='set' id='{REGISTER_ID}'><query xmlns='{}'><username>{}</username><password>{}</password></query></iq>",
                    ns::REGISTER,
                    escape(&p.username),
                    escape(&p.password)
                ))],
            ));
        }
        let offered = features
            .get_child("mechanisms", ns::SASL)
            .map(|m| {
                m.elements()
                    .any(|c| c.name == "mechanism" && c.text_content().trim() == p.mech.wire_name())
            })
            .unwrap_or(false);
        if !offered {
            return Err(NegotiationError::MechanismUnavailable(p.mech.wire_name()));
        }
        let auth = |payload: &[u8]| {
            format!(
                "<auth xmlns='{}' mechanism='{}'>{}</auth>",
                ns::SASL,
                p.mech.wire_name(),
                B64.encode(payload)
            )
        };
        let (state, send) = match p.mech {
            Mech::Plain => (
                State::AwaitSuccess(None),
                auth(&plain_initial_response(&p.username, &p.password)),
            ),
            Mech::ScramSha256 | Mech::ScramSha1 => {
                let hash = if p.mech == Mech::ScramSha256 {
                    ScramHash::Sha256
                } else {
                    ScramHash::Sha1
                };
                let scram = ScramClient::new(hash, &p.username, &p.password, p.nonce.clone());
                let first = auth(&scram.client_first());
                (State::AwaitChallenge(Box::new(scram)), first)
            }
        };
        Ok((state, vec![Action::Begin(Phase::Auth), Action::Send(send)]))
    }
}

fn unexpected(state: &'static str, got: &str) -> NegotiationError {
    NegotiationError::Unexpected {
        state,
        got: got.to_owned(),
    }
}

fn parse(bytes: &Bytes) -> Result<TopLevel, NegotiationError> {
    match parse_top_level(bytes, NsContext::CLIENT) {
        Ok(top) => Ok(top),
        // A stanza the strict parser refuses (an id-less error iq, say) is still an
        // element we can judge by name.
        Err(_) => Element::parse(bytes, NsContext::CLIENT)
            .map(TopLevel::Nonza)
            .map_err(|e| NegotiationError::Malformed(e.to_string())),
    }
}

/// The decoded text of a SASL element (`=` and empty both mean no data).
fn sasl_payload(e: &Element) -> Result<Vec<u8>, NegotiationError> {
    let text = e.text_content();
    let text = text.trim();
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    B64.decode(text)
        .map_err(|_| NegotiationError::Malformed("SASL payload is not base64".into()))
}

/// The defined condition of an error stanza, `unknown` if there is none.
pub fn stanza_error_condition(s: &Stanza) -> String {
    s.payload_elements()
        .ok()
        .and_then(|children| {
            children.iter().find(|c| c.name == "error").and_then(|e| {
                e.elements()
                    .find(|c| c.ns == ns::STANZA_ERRORS)
                    .map(|c| c.name.clone())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use shoal_xmpp::framer::{Framer, FramerLimits};

    const HEADER: &str = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='localhost' version='1.0'>";

    fn params(tls: TlsMode, mech: Mech, goal: Goal) -> Params {
        Params {
            domain: "localhost".into(),
            username: "u1".into(),
            password: "pw".into(),
            mech,
            tls,
            nonce: "nonce".into(),
            goal,
        }
    }

    /// Feeds server bytes through a real framer and collects the actions.
    fn feed(n: &mut Negotiator, server: &str) -> Result<Vec<Action>, NegotiationError> {
        let mut framer = Framer::new(FramerLimits::default());
        let mut buf = BytesMut::from(server.as_bytes());
        let mut out = Vec::new();
        // Server bytes in these tests start mid-stream unless they open with a header.
        if !server.starts_with("<stream:stream") {
            let mut head = BytesMut::from(HEADER.as_bytes());
            framer.next_frame(&mut head).unwrap();
        }
        while let Some(f) = framer.next_frame(&mut buf).unwrap() {
            out.extend(n.handle(f)?);
        }
        Ok(out)
    }

    fn features(inner: &str) -> String {
        format!("<stream:features>{inner}</stream:features>")
    }

    #[test]
    fn plain_login_without_tls() {
        let (mut n, first) = Negotiator::new(params(
            TlsMode::None,
            Mech::Plain,
            Goal::Login { resource: None },
        ));
        assert!(matches!(&first[..], [Action::Send(h)] if h.contains("to='localhost'")));
        let mechs = features(
            "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms>",
        );
        let a = feed(&mut n, &format!("{HEADER}{mechs}")).unwrap();
        assert_eq!(a[0], Action::Begin(Phase::Auth));
        assert_eq!(
            a[1],
            Action::Send(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AHUxAHB3</auth>"
                    .into()
            )
        );
        let a = feed(
            &mut n,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        )
        .unwrap();
        assert_eq!(a[0], Action::End(Phase::Auth));
        assert_eq!(a[1], Action::ResetStream);
        let bind = features("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>");
        let a = feed(&mut n, &format!("{HEADER}{bind}")).unwrap();
        assert_eq!(a[0], Action::Begin(Phase::Bind));
        assert_eq!(n.state_name(), "bind");
        let a = feed(
            &mut n,
            "<iq type='result' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>u1@localhost/r</jid></bind></iq>",
        )
        .unwrap();
        assert_eq!(
            a,
            vec![
                Action::End(Phase::Bind),
                Action::Send("<presence/>".into()),
                Action::Done(Outcome::Established {
                    jid: "u1@localhost/r".into()
                })
            ]
        );
    }

    #[test]
    fn starttls_then_scram_failure() {
        let (mut n, _) = Negotiator::new(params(
            TlsMode::Starttls,
            Mech::ScramSha256,
            Goal::Login { resource: None },
        ));
        let tls =
            features("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>");
        let a = feed(&mut n, &format!("{HEADER}{tls}")).unwrap();
        assert_eq!(a[0], Action::Begin(Phase::Tls));
        let a = feed(&mut n, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").unwrap();
        assert_eq!(a, vec![Action::ResetStream, Action::StartTls]);
        let a = n.tls_established();
        assert_eq!(a[0], Action::End(Phase::Tls));
        let mechs = features(
            "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism></mechanisms>",
        );
        let a = feed(&mut n, &format!("{HEADER}{mechs}")).unwrap();
        // base64("n,,n=u1,r=nonce")
        assert!(
            matches!(&a[1], Action::Send(s) if s.contains("mechanism='SCRAM-SHA-256'>biwsbj11MSxyPW5vbmNl<"))
        );
        let err = feed(
            &mut n,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
        )
        .unwrap_err();
        assert_eq!(err.reason(), "sasl:not-authorized");
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let (mut n, _) = Negotiator::new(params(
            TlsMode::None,
            Mech::Plain,
            Goal::Login { resource: None },
        ));
        let tls =
            features("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>");
        assert_eq!(
            feed(&mut n, &format!("{HEADER}{tls}")).unwrap_err(),
            NegotiationError::TlsRequired
        );
        let (mut n, _) = Negotiator::new(params(
            TlsMode::None,
            Mech::ScramSha1,
            Goal::Login { resource: None },
        ));
        let mechs = features(
            "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms>",
        );
        assert_eq!(
            feed(&mut n, &format!("{HEADER}{mechs}"))
                .unwrap_err()
                .reason(),
            "mechanism-unavailable:SCRAM-SHA-1"
        );
        let (mut n, _) = Negotiator::new(params(
            TlsMode::None,
            Mech::Plain,
            Goal::Login { resource: None },
        ));
        let err = feed(
            &mut n,
            &format!("{HEADER}<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "stream-error:policy-violation");
    }

    #[test]
    fn registration() {
        for (answer, want) in [
            ("<iq type='result' id='reg1'/>", Ok(Outcome::Registered)),
            (
                "<iq type='error' id='reg1'><error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                Ok(Outcome::AlreadyRegistered),
            ),
            (
                "<iq type='error' id='reg1'><error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                Err("register:resource-constraint".to_string()),
            ),
        ] {
            let (mut n, _) = Negotiator::new(params(TlsMode::None, Mech::Plain, Goal::Register));
            let a = feed(&mut n, &format!("{HEADER}{}", features(""))).unwrap();
            assert!(
                matches!(&a[0], Action::Send(s) if s.contains("<username>u1</username><password>pw</password>"))
            );
            let got = feed(&mut n, answer)
                .map_err(|e| e.reason())
                .map(|mut a| match a.pop() {
                    Some(Action::Done(o)) => o,
                    other => panic!("{other:?}"),
                });
            assert_eq!(got, want);
        }
    }
}
