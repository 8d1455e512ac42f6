//! Byte-level fixtures for the c2s state machine: every test feeds the exact bytes a
//! client would send and checks the exact bytes and actions that come back.

use super::*;
use crate::sasl::{ScramClient, ScramHash, plain_initial_response};

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
const RESP_HEADER_PREFIX: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='id";

struct Harness {
    stream: C2sStream,
    buf: BytesMut,
    next_id: u32,
}

impl Harness {
    fn new(tls_required: bool, secure: bool) -> Self {
        Self::with_registration(tls_required, secure, false)
    }

    fn with_registration(tls_required: bool, secure: bool, registration: bool) -> Self {
        let config = C2sConfig {
            domain: BareJid::new("localhost").unwrap(),
            limits: FramerLimits {
                max_stanza_size: 4096,
                max_depth: 8,
            },
            tls_available: true,
            tls_required,
            fake_salt_secret: std::sync::Arc::from(&b"test secret"[..]),
            registration,
        };
        Self {
            stream: C2sStream::new(config, secure),
            buf: BytesMut::new(),
            next_id: 0,
        }
    }

    fn feed(&mut self, bytes: &str) -> Vec<Action> {
        self.buf.extend_from_slice(bytes.as_bytes());
        let mut next_id = self.next_id;
        let mut ids = || {
            next_id += 1;
            format!("id{next_id}")
        };
        let out = self.stream.receive(&mut self.buf, &mut ids);
        self.next_id = next_id;
        out
    }

    fn creds(&mut self, creds: Option<&StoredCredentials>) -> Vec<Action> {
        let mut n = self.next_id;
        let mut ids = || {
            n += 1;
            format!("nonce{n}")
        };
        self.stream.credentials(creds, &mut ids)
    }

    /// Runs PLAIN to success on a secure stream and restarts.
    fn authenticate_plain(&mut self) {
        self.feed(HEADER);
        let auth = B64.encode(plain_initial_response("juliet", "pencil"));
        let out = self.feed(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ));
        assert_eq!(
            out,
            vec![Action::LookupCredentials {
                user: BareJid::new("juliet@localhost").unwrap()
            }]
        );
        let out = self.creds(Some(&creds()));
        assert_eq!(
            sent(&out),
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
        );
        let out = self.feed(HEADER);
        assert!(sent(&out).ends_with("<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><ver xmlns='urn:xmpp:features:rosterver'/><sub xmlns='urn:xmpp:features:pre-approval'/></stream:features>"));
    }

    fn bind(&mut self, resource: &str) {
        let out = self.feed(&format!("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"));
        assert_eq!(
            out,
            vec![Action::Bind {
                resource: Some(resource.into())
            }]
        );
        let jid = BareJid::new("juliet@localhost")
            .unwrap()
            .with_resource_str(resource)
            .unwrap();
        let out = self.stream.bind_result(Ok(jid));
        assert_eq!(
            sent(&out),
            format!(
                "<iq id='b1' type='result'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>juliet@localhost/{resource}</jid></bind></iq>"
            )
        );
    }
}

fn creds() -> StoredCredentials {
    StoredCredentials::derive("pencil", b"salt-for-sha1-xx", b"salt-for-sha256x", 4096)
}

/// Everything sent, concatenated.
fn sent(actions: &[Action]) -> String {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn closed_with(actions: &[Action]) -> Option<StreamErrorCondition> {
    actions.iter().find_map(|a| match a {
        Action::Close { error } => Some(error.as_ref().map(|e| e.condition)),
        _ => None,
    })?
}

#[test]
fn plaintext_stream_requires_starttls() {
    let mut h = Harness::new(true, false);
    let out = h.feed(HEADER);
    assert_eq!(
        sent(&out),
        format!(
            "{RESP_HEADER_PREFIX}1' from='localhost' version='1.0' xml:lang='en'><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>"
        )
    );
    // SASL before TLS is refused with the SASL condition meant for it.
    let out = h.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'/>");
    assert_eq!(
        sent(&out),
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><encryption-required/></failure>"
    );
    let out = h.feed("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    assert_eq!(
        out,
        vec![
            Action::Send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".into()),
            Action::StartTls
        ]
    );
    assert!(h.stream.is_secure());
    // After the upgrade a new header gets mechanisms including PLAIN.
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms></stream:features>"));
}

#[test]
fn optional_tls_offers_scram_but_not_plain_in_the_clear() {
    let mut h = Harness::new(false, false);
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms></stream:features>"));
    let out = h.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABwZW5jaWw=</auth>");
    assert_eq!(
        sent(&out),
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-mechanism/></failure>"
    );
}

#[test]
fn starttls_injection_is_refused() {
    let mut h = Harness::new(true, false);
    h.feed(HEADER);
    // The attacker's bytes arrive in the same read as <starttls/>.
    let out = h.feed(&format!(
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>{HEADER}"
    ));
    assert_eq!(
        closed_with(&out),
        Some(StreamErrorCondition::PolicyViolation)
    );
    assert!(!out.contains(&Action::StartTls));
    assert!(!sent(&out).contains("proceed"));
}

#[test]
fn scram_sha256_full_negotiation() {
    let mut h = Harness::new(true, true);
    h.feed(HEADER);
    let mut client = ScramClient::new(ScramHash::Sha256, "juliet", "pencil", "cnonce".into());
    let first = B64.encode(client.client_first());
    let out = h.feed(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{first}</auth>"
    ));
    assert!(
        matches!(&out[..], [Action::LookupCredentials { user }] if user.as_str() == "juliet@localhost")
    );
    let out = h.creds(Some(&creds()));
    let challenge = sent(&out);
    let b64 = challenge
        .strip_prefix("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        .and_then(|s| s.strip_suffix("</challenge>"))
        .unwrap();
    let final_msg = client.handle_challenge(&B64.decode(b64).unwrap()).unwrap();
    let out = h.feed(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        B64.encode(final_msg)
    ));
    let success = sent(&out);
    let v = success
        .strip_prefix("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
        .and_then(|s| s.strip_suffix("</success>"))
        .unwrap();
    client.verify_success(&B64.decode(v).unwrap()).unwrap();
    assert!(out.contains(&Action::Authenticated {
        user: BareJid::new("juliet@localhost").unwrap(),
        mechanism: Mechanism::ScramSha256
    }));
}

#[test]
fn sasl_failures_have_rfc_conditions() {
    let mut h = Harness::new(true, true);
    h.feed(HEADER);
    let fail =
        |c: &str| format!("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{c}/></failure>");
    // Unknown mechanism.
    let out = h.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>");
    assert_eq!(sent(&out), fail("invalid-mechanism"));
    // Bad base64.
    let out = h.feed(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!notbase64</auth>",
    );
    assert_eq!(sent(&out), fail("incorrect-encoding"));
    assert!(out.contains(&Action::AuthFailed {
        mechanism: Some(Mechanism::Plain),
        condition: SaslFailure::IncorrectEncoding
    }));
    // Third failure closes the stream.
    let out = h.feed(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        B64.encode(b"no-nul-separators")
    ));
    assert!(sent(&out).starts_with(&fail("malformed-request")));
    assert_eq!(
        closed_with(&out),
        Some(StreamErrorCondition::PolicyViolation)
    );
}

#[test]
fn wrong_password_is_not_authorized() {
    let mut h = Harness::new(true, true);
    h.feed(HEADER);
    let auth = B64.encode(plain_initial_response("juliet", "wrong"));
    h.feed(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
    ));
    let out = h.creds(Some(&creds()));
    assert_eq!(
        sent(&out),
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
    );
    // Unknown account: the same answer.
    let auth = B64.encode(plain_initial_response("nobody", "pencil"));
    h.feed(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
    ));
    let out = h.creds(None);
    assert_eq!(
        sent(&out),
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
    );
}

#[test]
fn abort_is_answered() {
    let mut h = Harness::new(true, true);
    h.feed(HEADER);
    h.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'/>");
    let out = h.feed("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    assert_eq!(
        sent(&out),
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><aborted/></failure>"
    );
}

#[test]
fn stanzas_before_auth_are_not_authorized() {
    let mut h = Harness::new(true, true);
    h.feed(HEADER);
    let out = h.feed("<message to='romeo@localhost'><body>hi</body></message>");
    assert_eq!(closed_with(&out), Some(StreamErrorCondition::NotAuthorized));
    assert!(sent(&out).ends_with("<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>stanzas are not allowed before authentication and resource binding</text></stream:error></stream:stream>"));
}

#[test]
fn bad_headers_get_our_header_then_the_error() {
    use StreamErrorCondition::*;
    for (header, want) in [
        (
            HEADER.replace("jabber:client", "jabber:server"),
            InvalidNamespace,
        ),
        (
            HEADER.replace("to='localhost'", "to='example.org'"),
            HostUnknown,
        ),
        (
            HEADER.replace("version='1.0'", "version='0.9'"),
            UnsupportedVersion,
        ),
    ] {
        let mut h = Harness::new(true, false);
        let out = h.feed(&header);
        assert_eq!(closed_with(&out), Some(want), "{header}");
        let text = sent(&out);
        assert!(text.starts_with(RESP_HEADER_PREFIX), "{text}");
        assert!(
            text.contains(&format!("<stream:error><{} ", want.as_str())),
            "{text}"
        );
        assert!(text.ends_with("</stream:error></stream:stream>"));
        // Nothing after the close is processed.
        assert!(h.feed("<presence/>").is_empty());
    }
}

#[test]
fn framer_faults_become_stream_errors() {
    use StreamErrorCondition::*;
    let big = format!("<message><body>{}</body></message>", "a".repeat(5000));
    let deep = format!("<message>{}{}</message>", "<a>".repeat(9), "</a>".repeat(9));
    for (input, want) in [
        ("<!-- c -->".to_string(), RestrictedXml),
        (
            "<message><body>&ent;</body></message>".to_string(),
            RestrictedXml,
        ),
        ("<message><a></b></message>".to_string(), NotWellFormed),
        ("junk".to_string(), NotWellFormed),
        (big, PolicyViolation),
        (deep, PolicyViolation),
        ("<message><x:y/></message>".to_string(), BadNamespacePrefix),
    ] {
        let mut h = Harness::new(true, false);
        h.feed(HEADER);
        let out = h.feed(&input);
        assert_eq!(closed_with(&out), Some(want), "{input}");
    }
    // Invalid UTF-8, which a &str fixture cannot hold.
    let mut h = Harness::new(true, false);
    h.feed(HEADER);
    h.buf
        .extend_from_slice(b"<message><body>\xff\xfe</body></message>");
    let out = h.stream.receive(&mut h.buf, &mut || "x".into());
    assert_eq!(closed_with(&out), Some(NotWellFormed));
}

#[test]
fn bind_session_and_from_stamping() {
    let mut h = Harness::new(true, true);
    h.authenticate_plain();
    // Stanzas other than bind before binding.
    let out = h.feed("<iq type='get' id='q'><query xmlns='jabber:iq:roster'/></iq>");
    assert_eq!(
        sent(&out),
        "<iq id='q' type='error'><error type='auth'><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    );
    // An invalid resource is a bad request.
    let out = h.feed("<iq type='set' id='b0'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>a\u{7}b</resource></bind></iq>");
    assert_eq!(
        sent(&out),
        "<iq id='b0' type='error'><error type='modify'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    );
    h.bind("balcony");
    assert_eq!(h.stream.jid().unwrap().as_str(), "juliet@localhost/balcony");

    // Legacy session establishment is answered directly.
    let out = h
        .feed("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
    assert_eq!(
        sent(&out),
        "<iq to='juliet@localhost/balcony' id='s1' type='result'/>"
    );

    // The server stamps 'from'.
    let out = h.feed("<message to='romeo@localhost'><body>hi</body></message>");
    match &out[..] {
        [Action::Stanza(st)] => {
            assert_eq!(
                st.from.as_ref().unwrap().as_str(),
                "juliet@localhost/balcony"
            );
            assert_eq!(
                st.to_xml(),
                "<message to='romeo@localhost' from='juliet@localhost/balcony'><body>hi</body></message>"
            );
        }
        other => panic!("{other:?}"),
    }
    // Its own bare JID as 'from' is fine (and becomes the full JID).
    let out = h.feed("<presence from='juliet@localhost'/>");
    assert!(
        matches!(&out[..], [Action::Stanza(st)] if st.from.as_ref().unwrap().as_str() == "juliet@localhost/balcony")
    );

    // A bad 'to' gets a stanza error, the stream survives.
    let out = h.feed("<message to='a@b@c' id='m1'/>");
    assert!(sent(&out).contains("<jid-malformed "));
    assert_eq!(closed_with(&out), None);

    // A spoofed 'from' ends the stream.
    let out = h.feed("<message from='romeo@localhost/orchard' to='x@localhost'/>");
    assert_eq!(closed_with(&out), Some(StreamErrorCondition::InvalidFrom));
}

/// RFC 6120 §4.4: after our close of a bound stream, what the client sent before it
/// read the close is still routed (stamped, nothing answered), until its own close.
#[test]
fn closing_a_bound_stream_still_routes_until_the_clients_close() {
    let mut h = Harness::new(true, true);
    h.authenticate_plain();
    h.bind("balcony");
    let out = h
        .stream
        .close_with(StreamError::new(StreamErrorCondition::SystemShutdown));
    assert_eq!(
        sent(&out),
        "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>"
    );
    assert_eq!(
        closed_with(&out),
        Some(StreamErrorCondition::SystemShutdown)
    );
    assert!(h.stream.is_closing() && !h.stream.is_closed());
    // A second close (the idle timer, say) sends nothing.
    assert!(
        h.stream
            .close_with(StreamError::new(StreamErrorCondition::ConnectionTimeout))
            .is_empty()
    );
    let out = h.feed(
        "<message to='romeo@localhost' id='m1'><body>last</body></message> \
         <iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>\
         <message from='romeo@localhost/orchard' to='x@localhost'/><a xmlns='b'/>",
    );
    match &out[..] {
        [Action::Stanza(st)] => assert_eq!(
            st.to_xml(),
            "<message to='romeo@localhost' from='juliet@localhost/balcony' id='m1'><body>last</body></message>"
        ),
        other => panic!("{other:?}"),
    }
    let out = h.feed("</stream:stream>");
    assert_eq!(out, vec![Action::Close { error: None }]);
    assert!(h.stream.is_closed());
    assert!(h.feed("<message to='romeo@localhost'/>").is_empty());
}

/// A stream closed before binding has no client stanzas to wait for.
#[test]
fn closing_before_binding_is_final() {
    let mut h = Harness::new(true, true);
    h.authenticate_plain();
    let out = h
        .stream
        .close_with(StreamError::new(StreamErrorCondition::SystemShutdown));
    assert_eq!(
        closed_with(&out),
        Some(StreamErrorCondition::SystemShutdown)
    );
    assert!(h.stream.is_closed());
}

#[test]
fn bind_conflict_keeps_waiting_for_bind() {
    let mut h = Harness::new(true, true);
    h.authenticate_plain();
    h.feed("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    let out = h.stream.bind_result(Err(StanzaError::new(
        StanzaErrorCondition::ResourceConstraint,
    )));
    assert_eq!(
        sent(&out),
        "<iq id='b1' type='error'><error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    );
    h.bind("again");
}

#[test]
fn stream_close_is_mirrored() {
    let mut h = Harness::new(true, true);
    h.authenticate_plain();
    h.bind("r");
    let out = h.feed(" </stream:stream>");
    assert_eq!(
        out,
        vec![
            Action::Send("</stream:stream>".into()),
            Action::Close { error: None }
        ]
    );
}

#[test]
fn every_split_point_negotiates_the_same() {
    // A whole session in one string, fed in two pieces cut at every byte.
    let auth = B64.encode(plain_initial_response("juliet", "pencil"));
    let part1 = format!(
        "{HEADER}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
    );
    for cut in 0..=part1.len() {
        let mut h = Harness::new(true, true);
        let mut out = h.feed(&part1[..cut]);
        out.extend(h.feed(&part1[cut..]));
        assert_eq!(
            out.last(),
            Some(&Action::LookupCredentials {
                user: BareJid::new("juliet@localhost").unwrap()
            }),
            "cut at {cut}"
        );
    }
}

// ---------------------------------------------------------------------------------
// XEP-0077 in-band registration
// ---------------------------------------------------------------------------------

const MECHANISMS_UNDER_TLS: &str = "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms>";
const REGISTER_FEATURE: &str = "<register xmlns='http://jabber.org/features/iq-register'/>";

fn register_set(id: &str, inner: &str) -> String {
    format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:register'>{inner}</query></iq>")
}

fn stanza_error(id: &str, kind: &str, condition: &str, text: Option<&str>) -> String {
    let text = text
        .map(|t| format!("<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{t}</text>"))
        .unwrap_or_default();
    format!(
        "<iq id='{id}' type='error'><error type='{kind}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>{text}</error></iq>"
    )
}

/// A registration-enabled stream over direct TLS, header exchanged.
fn registering() -> Harness {
    let mut h = Harness::with_registration(true, true, true);
    h.feed(HEADER);
    h
}

#[test]
fn register_feature_only_under_tls_and_when_enabled() {
    // Plaintext with optional TLS: mechanisms (no PLAIN) but never registration.
    let mut h = Harness::with_registration(false, false, true);
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms></stream:features>"));

    // Required TLS: STARTTLS only, then registration after the upgrade.
    let mut h = Harness::with_registration(true, false, true);
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>"));
    h.feed("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with(&format!(
        "<stream:features>{MECHANISMS_UNDER_TLS}{REGISTER_FEATURE}</stream:features>"
    )));

    // Direct TLS: offered at once.
    let mut h = Harness::with_registration(true, true, true);
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with(&format!(
        "<stream:features>{MECHANISMS_UNDER_TLS}{REGISTER_FEATURE}</stream:features>"
    )));

    // Disabled: not offered even under TLS.
    let mut h = Harness::with_registration(true, true, false);
    let out = h.feed(HEADER);
    assert!(sent(&out).ends_with(&format!(
        "<stream:features>{MECHANISMS_UNDER_TLS}</stream:features>"
    )));
}

#[test]
fn register_form() {
    let mut h = registering();
    let out = h.feed("<iq type='get' id='reg1'><query xmlns='jabber:iq:register'/></iq>");
    assert_eq!(
        out,
        vec![Action::Send("<iq id='reg1' type='result'><query xmlns='jabber:iq:register'><instructions>Choose a username and password for use with this service.</instructions><username/><password/></query></iq>".into())]
    );
    // Addressed to the server: the reply comes from it. A 'from' the unauthenticated
    // client made up is not echoed back as 'to'.
    let out = h.feed("<iq type='get' id='reg2' to='localhost' from='mallory@evil.example'><query xmlns='jabber:iq:register'/></iq>");
    assert_eq!(
        sent(&out),
        "<iq from='localhost' id='reg2' type='result'><query xmlns='jabber:iq:register'><instructions>Choose a username and password for use with this service.</instructions><username/><password/></query></iq>"
    );
}

#[test]
fn register_set_then_login_on_the_same_stream() {
    let mut h = registering();
    let out = h.feed(&register_set(
        "reg2",
        "<username>Juliet</username><password>pen\u{AD}cil</password>",
    ));
    // The username is prepared like a SASL name (case-folded by nodeprep) and the
    // password SASLprep'ed (the soft hyphen maps to nothing), so login finds the keys.
    assert_eq!(
        out,
        vec![Action::Register {
            user: BareJid::new("juliet@localhost").unwrap(),
            password: "pencil".into(),
        }]
    );
    // Pipelined input waits until the driver answers.
    let auth = B64.encode(plain_initial_response("juliet", "pencil"));
    let pipelined =
        format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>");
    assert!(h.feed(&pipelined).is_empty());
    assert_eq!(
        h.stream.register_result(Ok(())),
        vec![Action::Send("<iq id='reg2' type='result'/>".into())]
    );
    assert_eq!(
        h.feed(""),
        vec![Action::LookupCredentials {
            user: BareJid::new("juliet@localhost").unwrap()
        }]
    );
    let out = h.creds(Some(&creds()));
    assert_eq!(
        sent(&out),
        "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    );
}

#[test]
fn register_submission_errors() {
    const MISSING: &str = "both &lt;username/&gt; and &lt;password/&gt; are required";
    const BAD_NAME: &str = "the username is not a valid localpart";
    let too_long = format!(
        "<username>juliet</username><password>{}</password>",
        "p".repeat(MAX_PASSWORD_BYTES + 1)
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "<username>juliet</username>",
            stanza_error("r", "modify", "not-acceptable", Some(MISSING)),
        ),
        (
            "<username>juliet</username><password/>",
            stanza_error("r", "modify", "not-acceptable", Some(MISSING)),
        ),
        (
            "<username></username><password>pencil</password>",
            stanza_error("r", "modify", "not-acceptable", Some(MISSING)),
        ),
        (
            "<x xmlns='jabber:x:data' type='submit'/>",
            stanza_error("r", "modify", "not-acceptable", Some(MISSING)),
        ),
        (
            "<username>juliet@capulet.example</username><password>pencil</password>",
            stanza_error("r", "modify", "jid-malformed", Some(BAD_NAME)),
        ),
        (
            "<username>ro/meo</username><password>pencil</password>",
            stanza_error("r", "modify", "jid-malformed", Some(BAD_NAME)),
        ),
        (
            "<username>a\"b</username><password>pencil</password>",
            stanza_error("r", "modify", "jid-malformed", Some(BAD_NAME)),
        ),
        (
            &too_long,
            stanza_error(
                "r",
                "modify",
                "not-acceptable",
                Some("the password is longer than 1023 bytes"),
            ),
        ),
        (
            // U+E000 is private use, which SASLprep prohibits (RFC 4013 §2.3).
            "<username>juliet</username><password>pen\u{E000}cil</password>",
            stanza_error(
                "r",
                "modify",
                "not-acceptable",
                Some("the password contains characters SASLprep prohibits"),
            ),
        ),
        (
            "<remove/>",
            stanza_error(
                "r",
                "cancel",
                "unexpected-request",
                Some("authenticate before cancelling a registration"),
            ),
        ),
    ];
    let mut h = registering();
    for (inner, want) in cases {
        // Each refusal is a stanza error; the stream stays usable for the next try.
        let out = h.feed(&register_set("r", inner));
        assert_eq!(out, vec![Action::Send(want)], "{inner}");
    }
    // The longest password allowed is accepted.
    let longest = "p".repeat(MAX_PASSWORD_BYTES);
    let out = h.feed(&register_set(
        "r",
        &format!("<username>juliet</username><password>{longest}</password>"),
    ));
    assert!(
        matches!(&out[..], [Action::Register { password, .. }] if *password == longest),
        "{out:?}"
    );
}

#[test]
fn register_results_from_the_driver() {
    use StanzaErrorCondition::*;
    for (error, want) in [
        (
            StanzaError::new(Conflict),
            stanza_error("reg2", "cancel", "conflict", None),
        ),
        (
            StanzaError::new(NotAllowed),
            stanza_error("reg2", "cancel", "not-allowed", None),
        ),
        (
            StanzaError::new(ResourceConstraint),
            stanza_error("reg2", "wait", "resource-constraint", None),
        ),
    ] {
        let mut h = registering();
        let out = h.feed(&register_set(
            "reg2",
            "<username>juliet</username><password>pencil</password>",
        ));
        assert!(matches!(&out[..], [Action::Register { .. }]));
        assert_eq!(
            h.stream.register_result(Err(error)),
            vec![Action::Send(want)]
        );
        // A refused registration leaves the stream waiting for SASL (or another try).
        let out = h.feed(&register_set(
            "reg3",
            "<username>juliet2</username><password>pencil</password>",
        ));
        assert!(matches!(&out[..], [Action::Register { .. }]), "{out:?}");
    }
}

#[test]
fn one_registration_per_stream() {
    let mut h = registering();
    h.feed(&register_set(
        "a",
        "<username>juliet</username><password>pencil</password>",
    ));
    h.stream.register_result(Ok(()));
    let out = h.feed(&register_set(
        "b",
        "<username>romeo</username><password>pencil</password>",
    ));
    assert_eq!(
        sent(&out),
        stanza_error(
            "b",
            "modify",
            "not-acceptable",
            Some("an account was already registered on this stream; authenticate first")
        )
    );
}

#[test]
fn registration_disabled_is_service_unavailable() {
    let mut h = Harness::with_registration(true, true, false);
    h.feed(HEADER);
    let out = h.feed("<iq type='get' id='g'><query xmlns='jabber:iq:register'/></iq>");
    assert_eq!(
        out,
        vec![Action::Send(stanza_error(
            "g",
            "cancel",
            "service-unavailable",
            None
        ))]
    );
    let out = h.feed(&register_set(
        "s",
        "<username>juliet</username><password>pencil</password>",
    ));
    assert_eq!(
        out,
        vec![Action::Send(stanza_error(
            "s",
            "cancel",
            "service-unavailable",
            None
        ))]
    );
}

#[test]
fn registration_is_refused_without_tls() {
    // TLS optional and skipped: the password would travel in the clear.
    let mut h = Harness::with_registration(false, false, true);
    h.feed(HEADER);
    for (id, req) in [
        (
            "g",
            "<iq type='get' id='g'><query xmlns='jabber:iq:register'/></iq>".to_string(),
        ),
        (
            "s",
            register_set(
                "s",
                "<username>juliet</username><password>pencil</password>",
            ),
        ),
    ] {
        let out = h.feed(&req);
        assert_eq!(
            out,
            vec![Action::Send(stanza_error(
                id,
                "auth",
                "not-authorized",
                Some("in-band registration requires TLS")
            ))]
        );
    }
}

#[test]
fn other_iqs_before_auth_still_end_the_stream() {
    for iq in [
        "<iq type='get' id='q'><query xmlns='jabber:iq:roster'/></iq>",
        // Registration with some other entity is not ours to answer before auth.
        "<iq type='get' id='q' to='conference.localhost'><query xmlns='jabber:iq:register'/></iq>",
        // A result is not a request.
        "<iq type='result' id='q'><query xmlns='jabber:iq:register'/></iq>",
    ] {
        let mut h = registering();
        let out = h.feed(iq);
        assert_eq!(
            closed_with(&out),
            Some(StreamErrorCondition::NotAuthorized),
            "{iq}"
        );
    }
}

#[test]
fn register_action_debug_hides_the_password() {
    let action = Action::Register {
        user: BareJid::new("juliet@localhost").unwrap(),
        password: "s3cret-pencil".into(),
    };
    let debug = format!("{action:?}");
    assert!(!debug.contains("s3cret-pencil"), "{debug}");
    assert!(debug.contains("juliet@localhost"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
    // The machine holding a pending registration does not reveal it either.
    let mut h = registering();
    h.feed(&register_set(
        "r",
        "<username>juliet</username><password>s3cret-pencil</password>",
    ));
    let debug = format!("{:?}", h.stream);
    assert!(!debug.contains("s3cret-pencil"), "{debug}");
    // Other actions keep their derived-style output.
    assert_eq!(
        format!(
            "{:?}",
            Action::Bind {
                resource: Some("r".into())
            }
        ),
        "Bind { resource: Some(\"r\") }"
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Pieces of plausible and implausible client input, so random sequences reach deep
    /// into negotiation instead of failing at the first byte.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(HEADER.to_string()),
            Just("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".to_string()),
            Just(format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
                B64.encode(plain_initial_response("juliet", "pencil"))
            )),
            Just("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biwsbj1qdWxpZXQscj1hYmM=</auth>".to_string()),
            Just("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>Yz1iaXdzLHI9YWJj</response>".to_string()),
            Just("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>".to_string()),
            Just("<iq type='get' id='g'><query xmlns='jabber:iq:register'/></iq>".to_string()),
            Just(register_set("r", "<username>juliet</username><password>pencil</password>")),
            Just(register_set("r", "<username>a@b</username>")),
            Just("<message to='a@localhost'><body>x</body></message>".to_string()),
            Just("<presence><priority>3</priority></presence>".to_string()),
            Just("</stream:stream>".to_string()),
            Just(" ".to_string()),
            "[ -~]{0,20}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Whatever a client sends, in whatever pieces, the machine never panics, and once
        /// it says Close it emits nothing more.
        #[test]
        fn arbitrary_client_input_never_panics(pieces in proptest::collection::vec(piece(), 0..12), secure in any::<bool>(), with_creds in any::<bool>(), registration in any::<bool>()) {
            let mut h = Harness::with_registration(true, secure, registration);
            let mut closed = false;
            for p in pieces {
                let mut out = h.feed(&p);
                if out.iter().any(|a| matches!(a, Action::LookupCredentials { .. })) {
                    let c = creds();
                    out.extend(h.creds(with_creds.then_some(&c)));
                }
                if out.iter().any(|a| matches!(a, Action::Register { .. })) {
                    let result = if with_creds { Ok(()) } else { Err(StanzaError::new(StanzaErrorCondition::Conflict)) };
                    out.extend(h.stream.register_result(result));
                    out.extend(h.feed(""));
                }
                if out.iter().any(|a| matches!(a, Action::Bind { .. })) {
                    let jid = BareJid::new("juliet@localhost").unwrap().with_resource_str("r").unwrap();
                    out.extend(h.stream.bind_result(Ok(jid)));
                }
                prop_assert!(!closed || out.is_empty(), "output after close: {out:?}");
                closed |= out.iter().any(|a| matches!(a, Action::Close { .. }));
            }
        }
    }
}

/// With the deployment secret set, an unknown account shows the same (fake) salt on
/// every attempt, as a real account does, so repeated probing reveals nothing.
#[test]
fn unknown_accounts_get_a_stable_fake_salt() {
    let salt_for = |user: &str| {
        let mut h = Harness::new(true, true);
        h.feed(HEADER);
        let client = ScramClient::new(ScramHash::Sha256, user, "x", format!("n{}", h.next_id));
        h.feed(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
            B64.encode(client.client_first())
        ));
        let out = h.creds(None);
        let challenge = sent(&out);
        let b64 = challenge
            .strip_prefix("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
            .and_then(|s| s.strip_suffix("</challenge>"))
            .unwrap();
        let first = String::from_utf8(B64.decode(b64).unwrap()).unwrap();
        first
            .split(',')
            .find_map(|p| p.strip_prefix("s=").map(str::to_owned))
            .unwrap()
    };
    assert_eq!(salt_for("nobody"), salt_for("nobody"));
    assert_ne!(salt_for("nobody"), salt_for("someone-else"));
}
