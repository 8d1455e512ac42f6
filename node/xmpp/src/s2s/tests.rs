use super::*;

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' from='remote.example' to='localhost' version='1.0'>";
const SECRET: &[u8] = b"shared by every node";

fn config() -> S2sInConfig {
    S2sInConfig {
        domains: vec![
            BareJid::new("localhost").unwrap(),
            BareJid::new("conference.localhost").unwrap(),
        ],
        limits: FramerLimits::default(),
        tls_available: true,
        tls_required: true,
        dialback_secret: SECRET.to_vec(),
    }
}

/// Feeds `xml` to `s` with stream ids `id1`, `id2`, …
fn feed(s: &mut S2sIn, xml: &str, ids: &mut u32) -> Vec<Action> {
    let mut buf = BytesMut::from(xml.as_bytes());
    s.receive(&mut buf, &mut || {
        *ids += 1;
        format!("id{ids}")
    })
}

fn sent(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some(s.as_str()),
            _ => None,
        })
        .collect()
}

fn error_condition(actions: &[Action]) -> Option<StreamErrorCondition> {
    actions.iter().find_map(|a| match a {
        Action::Close { error: Some(e) } => Some(e.condition),
        _ => None,
    })
}

/// Header, STARTTLS (the peer presents a certificate), header again: the stream is
/// secure and offers EXTERNAL and dialback.
fn secured(ids: &mut u32) -> S2sIn {
    let mut s = S2sIn::new(config(), false);
    let id = *ids + 1;
    let out = feed(&mut s, HEADER, ids);
    assert_eq!(
        sent(&out),
        [
            format!("<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' from='localhost' to='remote.example' id='id{id}' version='1.0'>").as_str(),
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
        ]
    );
    let out = feed(
        &mut s,
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        ids,
    );
    assert_eq!(
        out,
        [
            Action::Send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>".into()),
            Action::StartTls
        ]
    );
    s.peer_certificate(true);
    let out = feed(&mut s, HEADER, ids);
    assert_eq!(
        sent(&out)[1],
        "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"
    );
    s
}

#[test]
fn without_a_peer_certificate_only_dialback_is_offered() {
    let mut ids = 0;
    let mut s = S2sIn::new(config(), true);
    s.peer_certificate(false);
    let out = feed(&mut s, HEADER, &mut ids);
    assert_eq!(
        sent(&out)[1],
        "<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"
    );
}

#[test]
fn dialback_authorizes_a_domain_then_stanzas_flow() {
    let mut ids = 0;
    let mut s = secured(&mut ids);
    let out = feed(
        &mut s,
        "<db:result from='remote.example' to='localhost'>f00d</db:result>",
        &mut ids,
    );
    let remote = BareJid::new("remote.example").unwrap();
    let local = BareJid::new("localhost").unwrap();
    assert_eq!(
        out,
        [Action::VerifyDialback {
            originating: remote.clone(),
            receiving: local.clone(),
            key: "f00d".into(),
            stream_id: "id2".into(),
        }]
    );
    // A stanza before the answer: that domain is not authorized yet.
    let mut early = S2sIn::new(config(), true);
    feed(&mut early, HEADER, &mut ids);
    let out = feed(
        &mut early,
        "<message from='a@remote.example/x' to='b@localhost'/>",
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::InvalidFrom)
    );

    let out = s.dialback_result(&remote, &local, true);
    assert_eq!(
        out,
        [
            Action::Send("<db:result from='localhost' to='remote.example' type='valid'/>".into()),
            Action::Authorized {
                domain: remote.clone()
            }
        ]
    );
    let out = feed(
        &mut s,
        "<message from='a@remote.example/x' to='b@localhost' type='chat' id='m1'><body>Hi</body></message>",
        &mut ids,
    );
    match out.as_slice() {
        [Action::Stanza(st)] => assert_eq!(
            st.to_xml(),
            "<message to='b@localhost' from='a@remote.example/x' id='m1' type='chat'><body>Hi</body></message>"
        ),
        other => panic!("{other:?}"),
    }
    // Another domain of ours may be addressed; a domain we do not serve may not.
    let out = feed(
        &mut s,
        "<presence from='a@remote.example/x' to='room@conference.localhost/a'/>",
        &mut ids,
    );
    assert!(matches!(out.as_slice(), [Action::Stanza(_)]), "{out:?}");
    let out = feed(
        &mut s,
        "<message from='a@remote.example/x' to='b@elsewhere.example'/>",
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::HostUnknown)
    );
}

#[test]
fn a_spoofed_domain_and_an_unconfirmed_key_end_the_stream() {
    let mut ids = 0;
    let mut s = secured(&mut ids);
    let remote = BareJid::new("remote.example").unwrap();
    let local = BareJid::new("localhost").unwrap();
    feed(
        &mut s,
        "<db:result from='remote.example' to='localhost'>f00d</db:result>",
        &mut ids,
    );
    let out = s.dialback_result(&remote, &local, true);
    assert_eq!(out.len(), 2);
    let out = feed(
        &mut s,
        "<message from='a@other.example/x' to='b@localhost'/>",
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::InvalidFrom)
    );
    assert!(s.is_closed());

    let mut s = secured(&mut ids);
    feed(
        &mut s,
        "<db:result from='remote.example' to='localhost'>bad</db:result>",
        &mut ids,
    );
    let out = s.dialback_result(&remote, &local, false);
    assert_eq!(
        sent(&out)[0],
        "<db:result from='localhost' to='remote.example' type='invalid'/>"
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::NotAuthorized)
    );
}

#[test]
fn db_verify_confirms_keys_our_nodes_issued() {
    let mut ids = 0;
    let mut s = secured(&mut ids);
    let key = dialback_key(SECRET, "remote.example", "localhost", "their-stream");
    let out = feed(
        &mut s,
        &format!(
            "<db:verify from='remote.example' to='localhost' id='their-stream'>{key}</db:verify>"
        ),
        &mut ids,
    );
    assert_eq!(
        sent(&out),
        ["<db:verify from='localhost' to='remote.example' id='their-stream' type='valid'/>"]
    );
    let out = feed(
        &mut s,
        &format!("<db:verify from='remote.example' to='localhost' id='another'>{key}</db:verify>"),
        &mut ids,
    );
    assert_eq!(
        sent(&out),
        ["<db:verify from='localhost' to='remote.example' id='another' type='invalid'/>"]
    );
}

#[test]
fn sasl_external_with_a_valid_certificate() {
    let mut ids = 0;
    let mut s = secured(&mut ids);
    let remote = BareJid::new("remote.example").unwrap();
    // "=": the authorization identity is the header's `from`.
    let out = feed(
        &mut s,
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
        &mut ids,
    );
    assert_eq!(
        out,
        [Action::CheckCertificate {
            domain: remote.clone()
        }]
    );
    let out = s.certificate_result(&remote, true);
    assert_eq!(
        out,
        [
            Action::Send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>".into()),
            Action::Authorized {
                domain: remote.clone()
            }
        ]
    );
    // The restarted stream offers nothing more to negotiate.
    let out = feed(&mut s, HEADER, &mut ids);
    assert_eq!(sent(&out)[1], "<stream:features></stream:features>");
    let out = feed(
        &mut s,
        "<message from='remote.example' to='localhost'/>",
        &mut ids,
    );
    assert!(matches!(out.as_slice(), [Action::Stanza(_)]), "{out:?}");

    // A certificate that does not cover the domain: a SASL failure, the stream stays.
    let mut s = secured(&mut ids);
    let b64 = B64.encode("remote.example");
    feed(
        &mut s,
        &format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{b64}</auth>"
        ),
        &mut ids,
    );
    let out = s.certificate_result(&remote, false);
    assert_eq!(
        sent(&out),
        ["<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"]
    );
    assert!(!s.is_closed());
}

#[test]
fn policy_and_addressing_errors() {
    let mut ids = 0;
    // A domain we do not serve.
    let mut s = S2sIn::new(config(), false);
    let out = feed(
        &mut s,
        &HEADER.replace("to='localhost'", "to='other.example'"),
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::HostUnknown)
    );
    // Dialback before the required TLS.
    let mut s = S2sIn::new(config(), false);
    feed(&mut s, HEADER, &mut ids);
    let out = feed(
        &mut s,
        "<db:result from='remote.example' to='localhost'>k</db:result>",
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::PolicyViolation)
    );
    // A client stream is not a server stream.
    let mut s = S2sIn::new(config(), false);
    let out = feed(
        &mut s,
        &HEADER.replace("xmlns='jabber:server'", "xmlns='jabber:client'"),
        &mut ids,
    );
    assert_eq!(
        error_condition(&out),
        Some(StreamErrorCondition::InvalidNamespace)
    );
    // A db:result for a domain we do not serve is an error in the result; the stream
    // lives on.
    let mut s = secured(&mut ids);
    let out = feed(
        &mut s,
        "<db:result from='remote.example' to='other.example'>k</db:result>",
        &mut ids,
    );
    assert_eq!(
        sent(&out),
        [
            "<db:result from='other.example' to='remote.example' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>"
        ]
    );
    assert!(!s.is_closed());
}

/// The two sides of a stream talking in memory: TLS upgrades are instant, the
/// receiving side's dialback checks go to `authoritative` over a verify stream of
/// their own, and certificate checks answer `certificate_ok`.
struct Wire {
    out: S2sOut,
    inn: S2sIn,
    authoritative: S2sInConfig,
    certificate_ok: bool,
    /// What each side reported besides bytes, in order.
    out_events: Vec<OutAction>,
    in_events: Vec<Action>,
}

impl Wire {
    fn new(out: S2sOutConfig, inn: S2sInConfig, authoritative: S2sInConfig) -> Self {
        Self {
            out: S2sOut::new(out, false),
            inn: S2sIn::new(inn, false),
            authoritative,
            certificate_ok: false,
            out_events: Vec::new(),
            in_events: Vec::new(),
        }
    }

    /// Runs the conversation, starting with `first` from the outbound side, until
    /// neither side has anything more to say.
    fn run(&mut self, first: Vec<OutAction>) {
        let mut ids = 0;
        let (mut to_in, mut to_out) = (BytesMut::new(), BytesMut::new());
        let mut out_actions = first;
        loop {
            for a in std::mem::take(&mut out_actions) {
                match a {
                    OutAction::Send(s) => to_in.extend_from_slice(s.as_bytes()),
                    OutAction::StartTls => out_actions.extend(self.out.tls_established()),
                    other => self.out_events.push(other),
                }
            }
            let mut in_actions = feed_buf(&mut self.inn, &mut to_in, &mut ids);
            let mut i = 0;
            while i < in_actions.len() {
                match in_actions[i].clone() {
                    Action::Send(s) => to_out.extend_from_slice(s.as_bytes()),
                    Action::VerifyDialback {
                        originating,
                        receiving,
                        key,
                        stream_id,
                    } => {
                        let valid = verify_with(
                            &self.authoritative,
                            &originating,
                            &receiving,
                            &key,
                            &stream_id,
                        );
                        in_actions.extend(self.inn.dialback_result(
                            &originating,
                            &receiving,
                            valid,
                        ));
                    }
                    Action::CheckCertificate { domain } => {
                        in_actions
                            .extend(self.inn.certificate_result(&domain, self.certificate_ok));
                        in_actions.extend(feed_buf(&mut self.inn, &mut to_in, &mut ids));
                    }
                    Action::StartTls => self.inn.peer_certificate(true),
                    other => self.in_events.push(other),
                }
                i += 1;
            }
            out_actions.extend(self.out.receive(&mut to_out));
            // A closed side reads nothing more: what is left for it stays unread.
            if out_actions.is_empty() && (to_in.is_empty() || self.inn.is_closed()) {
                return;
            }
        }
    }
}

fn feed_buf(s: &mut S2sIn, buf: &mut BytesMut, ids: &mut u32) -> Vec<Action> {
    s.receive(buf, &mut || {
        *ids += 1;
        format!("stream{ids}")
    })
}

/// A verify stream from the receiving server to `originating`'s authoritative server.
fn verify_with(
    authoritative: &S2sInConfig,
    originating: &BareJid,
    receiving: &BareJid,
    key: &str,
    stream_id: &str,
) -> bool {
    let config = S2sOutConfig {
        local: receiving.clone(),
        remote: originating.clone(),
        limits: FramerLimits::default(),
        tls_required: true,
        sasl_external: false,
        dialback_secret: b"the receiving side's own".to_vec(),
        purpose: Purpose::Verify {
            receiving: receiving.clone(),
            stream_id: stream_id.to_owned(),
            key: key.to_owned(),
        },
    };
    let mut wire = Wire::new(config, authoritative.clone(), authoritative.clone());
    let first = wire.out.start();
    wire.run(first);
    match wire.out_events.as_slice() {
        [
            OutAction::Verified { valid },
            OutAction::Close { error: None },
        ] => *valid,
        other => panic!("verify stream: {other:?}"),
    }
}

fn remote_config(secret: &[u8], sasl_external: bool) -> S2sOutConfig {
    S2sOutConfig {
        local: BareJid::new("remote.example").unwrap(),
        remote: BareJid::new("localhost").unwrap(),
        limits: FramerLimits::default(),
        tls_required: true,
        sasl_external,
        dialback_secret: secret.to_vec(),
        purpose: Purpose::Send,
    }
}

/// remote.example's own servers, which answer db:verify with its secret.
fn remote_authoritative(secret: &[u8]) -> S2sInConfig {
    S2sInConfig {
        domains: vec![BareJid::new("remote.example").unwrap()],
        dialback_secret: secret.to_vec(),
        ..config()
    }
}

#[test]
fn outbound_dialback_end_to_end() {
    let secret = b"remote.example's secret";
    let mut wire = Wire::new(
        remote_config(secret, false),
        config(),
        remote_authoritative(secret),
    );
    let first = wire.out.start();
    wire.run(first);
    assert_eq!(wire.out_events, [OutAction::Ready]);
    let remote = BareJid::new("remote.example").unwrap();
    assert_eq!(wire.in_events, [Action::Authorized { domain: remote }]);
    // A stanza written by the outbound side arrives, checked, on the inbound side.
    let mut st = Stanza::new(crate::stanza::Kind::Message(
        crate::stanza::MessageType::Chat,
    ));
    st.from = Some("romeo@remote.example/x".parse().unwrap());
    st.to = Some("juliet@localhost".parse().unwrap());
    let mut ids = 100;
    let out = feed(&mut wire.inn, &wire.out.stanza(&st), &mut ids);
    assert_eq!(out, [Action::Stanza(st)]);
}

#[test]
fn outbound_dialback_refused_with_a_key_the_authoritative_server_disowns() {
    let wrong = remote_authoritative(b"not the secret the key was made with");
    let mut wire = Wire::new(
        remote_config(b"remote.example's secret", false),
        config(),
        wrong,
    );
    let first = wire.out.start();
    wire.run(first);
    assert!(
        matches!(wire.out_events.as_slice(), [OutAction::Close { error: Some(e) }] if e.condition == StreamErrorCondition::NotAuthorized),
        "{:?}",
        wire.out_events
    );
    assert!(wire.inn.is_closed());
}

#[test]
fn outbound_sasl_external_and_its_fallback_to_dialback() {
    let secret = b"remote.example's secret";
    let remote = BareJid::new("remote.example").unwrap();
    for certificate_ok in [true, false] {
        let mut wire = Wire::new(
            remote_config(secret, true),
            config(),
            remote_authoritative(secret),
        );
        wire.certificate_ok = certificate_ok;
        let first = wire.out.start();
        wire.run(first);
        assert_eq!(
            wire.out_events,
            [OutAction::Ready],
            "certificate ok: {certificate_ok}"
        );
        assert_eq!(
            wire.in_events,
            [Action::Authorized {
                domain: remote.clone()
            }]
        );
    }
}

#[test]
fn outbound_refuses_a_peer_without_tls() {
    let plain = S2sInConfig {
        tls_available: false,
        tls_required: false,
        ..config()
    };
    let secret = b"s";
    let mut wire = Wire::new(
        remote_config(secret, false),
        plain,
        remote_authoritative(secret),
    );
    let first = wire.out.start();
    wire.run(first);
    assert!(
        matches!(wire.out_events.as_slice(), [OutAction::Close { error: Some(e) }] if e.condition == StreamErrorCondition::PolicyViolation),
        "{:?}",
        wire.out_events
    );
}
