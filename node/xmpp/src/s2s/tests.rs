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

/// Header, STARTTLS, header again: the stream is secure and offers EXTERNAL and
/// dialback.
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
    let out = feed(&mut s, HEADER, ids);
    assert_eq!(
        sent(&out)[1],
        "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"
    );
    s
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
