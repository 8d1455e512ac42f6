//! End-to-end negotiation and routing over real TCP and TLS: the stanzas RFC 6120 and
//! RFC 6121 require, compared as whole XML strings where the server's output is fixed.
//!
//! Every test boots its own node, so tests run in parallel without seeing each other's
//! sessions. Waits are for concrete stanzas; the short "nothing arrives" window is used
//! only where silence is the assertion itself.

use std::time::Duration;

use shoal_tests::{Client, Received, TestNode};
use shoal_xmpp::ns;
use shoal_xmpp::sasl::ScramHash;

const PW: &str = "pencil";
const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// How long a client must stay silent where "nothing arrives" is what is asserted. The
/// stanza that proves routing happened has already arrived elsewhere by then, so this
/// only has to cover the last hop, not the whole route.
const QUIET: Duration = Duration::from_millis(300);

fn node() -> TestNode {
    TestNode::builder()
        .user("juliet", PW)
        .user("romeo", PW)
        .user("nurse", PW)
        .start()
}

/// STARTTLS, SCRAM-SHA-256, bind `resource`.
async fn login(node: &TestNode, user: &str, resource: &str) -> Client {
    Client::login(
        node.c2s,
        &node.domain,
        node.cert_path(),
        user,
        PW,
        Some(resource),
    )
    .await
    .unwrap_or_else(|e| panic!("login {user}/{resource}: {e:#}"))
}

/// A connection that has done STARTTLS and restarted the stream, ready for SASL.
async fn secured(node: &TestNode) -> (Client, String) {
    let mut c = Client::connect(node.c2s, &node.domain).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    let features = c.open().await.unwrap();
    (c, features.to_xml(ns::CLIENT))
}

/// After SASL success: restarts the stream and binds `resource`.
async fn restart_and_bind(c: &mut Client, resource: &str) -> String {
    c.open().await.unwrap();
    c.bind(Some(resource)).await.unwrap().to_string()
}

/// The next stanza, as XML.
async fn next(c: &mut Client) -> String {
    c.recv_stanza().await.unwrap().to_xml()
}

/// Asserts that nothing arrives within [`QUIET`].
async fn expect_nothing(c: &mut Client) {
    if let Some(r) = c.recv_within(QUIET).await.unwrap() {
        panic!("expected nothing, got {r:?}");
    }
}

/// Sends available presence with `priority` from `c` and waits for its broadcast to
/// reach `c` itself and each of the user's already-available `siblings` (RFC 6121
/// §4.2.2), so later assertions start from empty queues.
async fn set_priority(c: &mut Client, priority: i8, siblings: &mut [&mut Client]) {
    c.send(&format!(
        "<presence><priority>{priority}</priority></presence>"
    ))
    .await
    .unwrap();
    let jid = c.jid.clone().expect("bound");
    let broadcast = format!("<presence from='{jid}'><priority>{priority}</priority></presence>");
    assert_eq!(next(c).await, broadcast);
    // A resource's first available presence also brings it the current presence of
    // each sibling that is already available (RFC 6121 §4.2.2).
    let mut sibling_jids: Vec<String> = siblings
        .iter()
        .map(|s| s.jid.clone().expect("bound").to_string())
        .collect();
    for _ in 0..siblings.len() {
        let got = next(c).await;
        let from = sibling_jids
            .iter()
            .position(|sj| got.starts_with(&format!("<presence to='{jid}' from='{sj}'>")))
            .unwrap_or_else(|| panic!("expected a sibling's presence, got {got}"));
        sibling_jids.remove(from);
    }
    for s in siblings {
        assert_eq!(next(s).await, broadcast);
    }
}

fn error(kind: &str, condition: &str) -> String {
    format!("<error type='{kind}'><{condition} xmlns='{STANZA_ERRORS}'/></error>")
}

fn error_with_text(kind: &str, condition: &str, text: &str) -> String {
    format!(
        "<error type='{kind}'><{condition} xmlns='{STANZA_ERRORS}'/><text xmlns='{STANZA_ERRORS}'>{text}</text></error>"
    )
}

// ---------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------

/// RFC 6120 §5.3.1 and §6.4.1: before TLS only mandatory STARTTLS is offered; after TLS
/// the mechanisms (PLAIN included now the channel is encrypted) and in-band registration
/// (XEP-0077, on by default); after SASL, bind.
#[tokio::test]
async fn stream_features_at_each_stage() {
    let node = node();
    let mut c = Client::connect(node.c2s, &node.domain).await.unwrap();
    let before = c.open().await.unwrap();
    assert_eq!(
        before.to_xml(ns::CLIENT),
        "<features xmlns='http://etherx.jabber.org/streams'><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></features>"
    );
    assert!(before.get_child("mechanisms", ns::SASL).is_none());

    c.starttls(node.cert_path()).await.unwrap();
    let after_tls = c.open().await.unwrap();
    assert_eq!(
        after_tls.to_xml(ns::CLIENT),
        "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></features>"
    );

    c.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    let after_auth = c.open().await.unwrap();
    assert_eq!(
        after_auth.to_xml(ns::CLIENT),
        "<features xmlns='http://etherx.jabber.org/streams'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><ver xmlns='urn:xmpp:features:rosterver'/><sub xmlns='urn:xmpp:features:pre-approval'/></features>"
    );
}

/// RFC 6120 §5.3.1: with TLS mandatory, SASL before STARTTLS fails with
/// `<encryption-required/>`, and STARTTLS is still possible afterwards.
#[tokio::test]
async fn sasl_before_starttls_is_encryption_required() {
    let node = node();
    let mut c = Client::connect(node.c2s, &node.domain).await.unwrap();
    c.open().await.unwrap();
    let err = c.auth_plain("juliet", PW).await.unwrap_err();
    assert_eq!(err.to_string(), "encryption-required");
    c.starttls(node.cert_path()).await.unwrap();
    c.open().await.unwrap();
    c.auth_plain("juliet", PW).await.unwrap();
    restart_and_bind(&mut c, "r").await;
    c.ping().await.unwrap();
}

#[tokio::test]
async fn login_starttls_scram_sha1() {
    let node = node();
    let (mut c, _) = secured(&node).await;
    c.auth_scram(ScramHash::Sha1, "juliet", PW).await.unwrap();
    assert_eq!(
        restart_and_bind(&mut c, "sha1").await,
        "juliet@localhost/sha1"
    );
    c.ping().await.unwrap();
}

#[tokio::test]
async fn login_starttls_scram_sha256() {
    let node = node();
    let (mut c, _) = secured(&node).await;
    c.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    assert_eq!(
        restart_and_bind(&mut c, "sha256").await,
        "juliet@localhost/sha256"
    );
    c.ping().await.unwrap();
}

#[tokio::test]
async fn login_starttls_plain() {
    let node = node();
    let (mut c, _) = secured(&node).await;
    c.auth_plain("juliet", PW).await.unwrap();
    assert_eq!(
        restart_and_bind(&mut c, "plain").await,
        "juliet@localhost/plain"
    );
    c.ping().await.unwrap();
}

/// XEP-0368: TLS from the first byte; no STARTTLS offered, PLAIN allowed.
#[tokio::test]
async fn login_direct_tls() {
    let node = node();
    let addr = node.direct_tls.expect("direct TLS listener");
    let mut c = Client::connect_direct_tls(addr, &node.domain, node.cert_path())
        .await
        .unwrap();
    let features = c.open().await.unwrap();
    assert_eq!(
        features.to_xml(ns::CLIENT),
        "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></features>"
    );
    c.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    assert_eq!(
        restart_and_bind(&mut c, "direct").await,
        "juliet@localhost/direct"
    );
    c.ping().await.unwrap();
}

/// RFC 6120 §6.4.5: a failed attempt is `<not-authorized/>` and the client may retry on
/// the same stream. An unknown account fails the same way (no account enumeration).
#[tokio::test]
async fn wrong_password_then_correct_on_same_stream() {
    let node = node();
    let (mut c, _) = secured(&node).await;
    let err = c
        .auth_scram(ScramHash::Sha256, "juliet", "wrong")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "not-authorized");
    c.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    restart_and_bind(&mut c, "retry").await;
    c.ping().await.unwrap();

    let (mut c, _) = secured(&node).await;
    let err = c.auth_plain("juliet", "wrong").await.unwrap_err();
    assert_eq!(err.to_string(), "not-authorized");
    let err = c
        .auth_scram(ScramHash::Sha1, "nobody", PW)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "not-authorized");
    c.auth_plain("juliet", PW).await.unwrap();
    restart_and_bind(&mut c, "retry2").await;
    c.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Resource binding
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn bind_client_chosen_resource() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    assert_eq!(j.jid.as_ref().unwrap().as_str(), "juliet@localhost/balcony");
    j.ping().await.unwrap();
}

/// RFC 6120 §7.6: without `<resource/>` the server picks one, and it is routable.
#[tokio::test]
async fn bind_server_chosen_resource() {
    let node = node();
    let (mut j, _) = secured(&node).await;
    j.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    j.open().await.unwrap();
    let jid = j.bind(None).await.unwrap();
    assert_eq!(jid.to_bare().as_str(), "juliet@localhost");
    assert!(!jid.resource().as_str().is_empty());

    let mut r = login(&node, "romeo", "orchard").await;
    r.send(&format!(
        "<message to='{jid}' id='m1' type='chat'><body>hi</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<message to='{jid}' from='romeo@localhost/orchard' id='m1' type='chat'><body>hi</body></message>"
        )
    );
}

/// RFC 6120 §7.7.2.2: binding a full JID already in use replaces the old session, which
/// is closed with `<conflict/>`; the user's other resources see it go unavailable.
#[tokio::test]
async fn same_full_jid_replaces_old_session() {
    let node = node();
    let mut old = login(&node, "juliet", "balcony").await;
    let mut sibling = login(&node, "juliet", "garden").await;
    set_priority(&mut old, 0, &mut []).await;
    set_priority(&mut sibling, 0, &mut [&mut old]).await;

    let mut new = login(&node, "juliet", "balcony").await;
    assert_eq!(old.expect_stream_error().await.unwrap(), "conflict");
    assert_eq!(
        next(&mut sibling).await,
        "<presence from='juliet@localhost/balcony' type='unavailable'/>"
    );

    new.ping().await.unwrap();
    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost/balcony' id='m1'><body>new?</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut new).await,
        "<message to='juliet@localhost/balcony' from='romeo@localhost/orchard' id='m1'><body>new?</body></message>"
    );
}

/// A session that ends after sending available presence is announced as unavailable to
/// the user's other available resources (RFC 6121 §4.5.2).
#[tokio::test]
async fn closing_session_broadcasts_unavailable() {
    let node = node();
    let mut a = login(&node, "juliet", "a").await;
    let mut b = login(&node, "juliet", "b").await;
    set_priority(&mut a, 1, &mut []).await;
    set_priority(&mut b, 1, &mut [&mut a]).await;
    a.close().await.unwrap();
    assert_eq!(a.recv().await.unwrap(), Received::StreamClose);
    assert_eq!(
        next(&mut b).await,
        "<presence from='juliet@localhost/a' type='unavailable'/>"
    );
}

/// RFC 3921 session establishment is accepted as a no-op for old clients.
#[tokio::test]
async fn legacy_session_iq_gets_result() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<iq to='juliet@localhost/balcony' id='s' type='result'/>"
    );
}

// ---------------------------------------------------------------------------------
// Routing between accounts (RFC 6121 §8.5)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn message_to_full_jid() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    // No presence sent: a full JID reaches a bound resource regardless (§8.5.3.1).
    j.send("<message to='romeo@localhost/orchard' id='m1' type='chat'><body>Wherefore?</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m1' type='chat'><body>Wherefore?</body></message>"
    );
    expect_nothing(&mut j).await;
}

/// Addresses are compared in their canonical form (RFC 7622 §3.2, §3.3: localpart and
/// domainpart are case-insensitive), so differently-cased addresses reach the account.
#[tokio::test]
async fn addresses_are_case_insensitive() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<message to='ROMEO@LocalHost/orchard' id='m1'><body>hi</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m1'><body>hi</body></message>"
    );
    // The SASL username, too, names the account whatever its case.
    let (mut c, _) = secured(&node).await;
    c.auth_scram(ScramHash::Sha256, "JULIET", PW).await.unwrap();
    assert_eq!(
        restart_and_bind(&mut c, "upper").await,
        "juliet@localhost/upper"
    );
}

/// Payload, escaped attribute values and extra attributes such as `xml:lang` are
/// forwarded as sent.
#[tokio::test]
async fn stanza_content_is_forwarded_unchanged() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    let payload = "<body>1 &lt; 2 &amp; &quot;x&quot;</body><thread>t1</thread><x xmlns='urn:example:ext' a='&apos;'><y/>text</x>";
    j.send(&format!(
        "<message to='romeo@localhost/orchard' id='a&amp;b&apos;' type='chat' xml:lang='en'>{payload}</message>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='a&amp;b&apos;' type='chat' xml:lang='en'>{payload}</message>"
        )
    );
}

/// §8.5.2.1.1: a chat message to the bare JID goes to the highest-priority available
/// resource only.
#[tokio::test]
async fn bare_jid_message_goes_to_highest_priority_only() {
    let node = node();
    let mut low = login(&node, "juliet", "low").await;
    let mut high = login(&node, "juliet", "high").await;
    set_priority(&mut low, 1, &mut []).await;
    set_priority(&mut high, 5, &mut [&mut low]).await;

    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>hi</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut high).await,
        "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m1' type='chat'><body>hi</body></message>"
    );
    expect_nothing(&mut low).await;

    // A message of type normal (no type) follows the same rule.
    r.send("<message to='juliet@localhost' id='m2'><body>again</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut high).await,
        "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m2'><body>again</body></message>"
    );
    expect_nothing(&mut low).await;
}

#[tokio::test]
async fn equal_priorities_both_receive() {
    let node = node();
    let mut a = login(&node, "juliet", "a").await;
    let mut b = login(&node, "juliet", "b").await;
    // Bound but never available: not a candidate for bare-JID messages.
    let mut silent = login(&node, "juliet", "silent").await;
    set_priority(&mut a, 3, &mut []).await;
    set_priority(&mut b, 3, &mut [&mut a]).await;

    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>both</body></message>")
        .await
        .unwrap();
    let expected = "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m1' type='chat'><body>both</body></message>";
    assert_eq!(next(&mut a).await, expected);
    assert_eq!(next(&mut b).await, expected);
    expect_nothing(&mut silent).await;
}

/// RFC 6121 §4.7.2.3: a negative priority excludes a resource from bare-JID messages,
/// not from messages to its full JID.
#[tokio::test]
async fn negative_priority_gets_only_full_jid_messages() {
    let node = node();
    let mut neg = login(&node, "juliet", "neg").await;
    let mut zero = login(&node, "juliet", "zero").await;
    set_priority(&mut neg, -1, &mut []).await;
    set_priority(&mut zero, 0, &mut [&mut neg]).await;

    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>bare</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut zero).await,
        "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m1' type='chat'><body>bare</body></message>"
    );
    expect_nothing(&mut neg).await;

    r.send("<message to='juliet@localhost/neg' id='m2' type='chat'><body>full</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut neg).await,
        "<message to='juliet@localhost/neg' from='romeo@localhost/orchard' id='m2' type='chat'><body>full</body></message>"
    );
    expect_nothing(&mut zero).await;
}

/// §8.5.2.2 with XEP-0160: an account with no available non-negative resource (one
/// bound without presence, one with negative priority) gets bare-JID chat stored, and
/// the next resource that becomes available with a non-negative priority receives it
/// with a XEP-0203 delay stamp; nothing bounces.
#[tokio::test]
async fn message_to_user_without_available_resource_is_stored_offline() {
    let node = node();
    let _silent = login(&node, "juliet", "silent").await;
    let mut neg = login(&node, "juliet", "neg").await;
    set_priority(&mut neg, -5, &mut []).await;

    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>anyone?</body></message>")
        .await
        .unwrap();
    expect_nothing(&mut r).await;
    expect_nothing(&mut neg).await;

    let mut later = login(&node, "juliet", "later").await;
    later.send("<presence/>").await.unwrap();
    let mut got = None;
    for _ in 0..3 {
        let s = next(&mut later).await;
        if s.starts_with("<message") {
            got = Some(s);
            break;
        }
    }
    let got = got.expect("the stored message");
    assert!(
        got.starts_with("<message to='juliet@localhost' from='romeo@localhost/orchard' id='m1' type='chat'><body>anyone?</body><delay xmlns='urn:xmpp:delay' from='localhost' stamp='"),
        "{got}"
    );
}

/// Several stanzas that reach an offline account while its data is still loading are
/// all handled, in order: the three messages are stored and the ping after them is
/// answered (a user with no session used to be unloaded after the first queued stanza,
/// silently dropping the rest of the queue).
#[tokio::test]
async fn burst_to_offline_user_is_handled_in_full() {
    let node = node();
    let mut r = login(&node, "romeo", "orchard").await;
    // One write, so all four arrive while juliet's data loads.
    r.send(
        "<message to='juliet@localhost' id='m1' type='chat'><body>one</body></message>\
         <message to='juliet@localhost' id='m2' type='chat'><body>two</body></message>\
         <message to='juliet@localhost' id='m3' type='chat'><body>three</body></message>\
         <iq to='juliet@localhost' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='p1' type='result'/>"
    );

    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<presence/>").await.unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        let s = next(&mut j).await;
        if s.starts_with("<message") {
            let body = s
                .split("<body>")
                .nth(1)
                .and_then(|b| b.split("</body>").next())
                .unwrap_or_default()
                .to_string();
            assert!(s.contains("<delay xmlns='urn:xmpp:delay'"), "{s}");
            bodies.push(body);
        }
    }
    assert_eq!(bodies, ["one", "two", "three"]);
}

/// §8.5.1: no such account.
#[tokio::test]
async fn message_to_nonexistent_user_bounces() {
    let node = node();
    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='nobody@localhost' id='m1' type='chat'><body>hello?</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='nobody@localhost' id='m1' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
    r.send("<message to='nobody@localhost/res' id='m2' type='chat'><body>hello?</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='nobody@localhost/res' id='m2' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
}

/// §8.5.3.2.1: a chat message to a resource that is not bound is handled as if sent to
/// the bare JID; the stanza is delivered unchanged.
#[tokio::test]
async fn chat_to_unknown_resource_falls_back_to_bare_jid() {
    let node = node();
    let mut low = login(&node, "juliet", "low").await;
    let mut high = login(&node, "juliet", "high").await;
    set_priority(&mut low, 1, &mut []).await;
    set_priority(&mut high, 2, &mut [&mut low]).await;

    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<message to='juliet@localhost/gone' id='m1' type='chat'><body>there?</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut high).await,
        "<message to='juliet@localhost/gone' from='romeo@localhost/orchard' id='m1' type='chat'><body>there?</body></message>"
    );
    expect_nothing(&mut low).await;
    expect_nothing(&mut r).await;
}

/// §8.5.3.2.3 and §8.5.2.1.3: an iq to a resource that is not bound, or to another
/// account's bare JID with a namespace the server does not serve, is answered with
/// `<service-unavailable/>`.
#[tokio::test]
async fn iq_to_unknown_resource_is_service_unavailable() {
    let node = node();
    let _j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    r.send("<iq to='juliet@localhost/nope' id='i1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<iq to='romeo@localhost/orchard' from='juliet@localhost/nope' id='i1' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
    r.send(
        "<iq to='juliet@localhost' id='i2' type='get'><query xmlns='urn:example:unknown'/></iq>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='i2' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
}

/// An iq between two full JIDs is routed untouched apart from the `from` stamp, and the
/// answer finds its way back.
#[tokio::test]
async fn iq_between_full_jids_passes_through() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<iq to='romeo@localhost/orchard' id='j1' type='set'><jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='x'><content/></jingle></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<iq to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='j1' type='set'><jingle xmlns='urn:xmpp:jingle:1' action='session-initiate' sid='x'><content/></jingle></iq>"
    );
    r.send("<iq to='juliet@localhost/balcony' id='j1' type='result'/>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<iq to='juliet@localhost/balcony' from='romeo@localhost/orchard' id='j1' type='result'/>"
    );
}

/// Directed presence (RFC 6121 §4.6) to a bound full JID is delivered.
#[tokio::test]
async fn directed_presence_to_full_jid() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<presence to='romeo@localhost/orchard'><show>away</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost/orchard' from='juliet@localhost/balcony'><show>away</show></presence>"
    );
    // Directed presence is not a broadcast: the sender gets no copy.
    expect_nothing(&mut j).await;
}

/// RFC 6120 §10.4: without federation, another domain cannot be reached.
#[tokio::test]
async fn message_to_remote_domain_is_remote_server_not_found() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<message to='someone@example.org' id='x1' type='chat'><body>hello</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<message to='juliet@localhost/balcony' from='someone@example.org' id='x1' type='error'>{}</message>",
            error("cancel", "remote-server-not-found")
        )
    );
    j.send("<iq to='example.org' id='x2' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<iq to='juliet@localhost/balcony' from='example.org' id='x2' type='error'>{}</iq>",
            error("cancel", "remote-server-not-found")
        )
    );
}

// ---------------------------------------------------------------------------------
// Requests the server answers itself (RFC 6120 §10.3)
// ---------------------------------------------------------------------------------

/// XEP-0199 ping to the server.
#[tokio::test]
async fn ping_server() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<iq to='localhost' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<iq to='juliet@localhost/balcony' from='localhost' id='p1' type='result'/>"
    );
}

/// XEP-0030 disco#info and disco#items on the server.
#[tokio::test]
async fn disco_on_server() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<iq to='localhost' id='d1' type='get'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<iq to='juliet@localhost/balcony' from='localhost' id='d1' type='result'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='server' type='im' name='Shoal'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='http://jabber.org/protocol/disco#items'/><feature var='jabber:iq:last'/><feature var='jabber:iq:private'/><feature var='jabber:iq:register'/><feature var='jabber:iq:roster'/><feature var='jabber:iq:version'/><feature var='msgoffline'/><feature var='urn:xmpp:blocking'/><feature var='urn:xmpp:carbons:2'/><feature var='urn:xmpp:ping'/><feature var='urn:xmpp:time'/><feature var='vcard-temp'/></query></iq>"
    );
    j.send("<iq to='localhost' id='d2' type='get'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<iq to='juliet@localhost/balcony' from='localhost' id='d2' type='result'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"
    );
}

/// RFC 6120 §8.4: an iq in a namespace the server does not serve, addressed to the
/// server or to no one (which means the server, on the account's behalf).
#[tokio::test]
async fn unknown_namespace_to_server_is_service_unavailable() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<iq to='localhost' id='u1' type='get'><query xmlns='urn:example:unknown'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<iq to='juliet@localhost/balcony' from='localhost' id='u1' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
    // Without 'to' the server processes the iq on the account's behalf (RFC 6120
    // §10.3.3), and the reply carries no 'from' (RFC 6120 §8.1.2.1).
    j.send("<iq id='u2' type='set'><query xmlns='urn:example:unknown'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<iq to='juliet@localhost/balcony' id='u2' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
    // A chat message to the server has no reader either.
    j.send("<message to='localhost' id='u3' type='chat'><body>hello server</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<message to='juliet@localhost/balcony' from='localhost' id='u3' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
}

/// RFC 6120 §8.1.3: an iq without `id` is refused with `<bad-request/>` as a stanza
/// error; the stream stays open.
#[tokio::test]
async fn iq_without_id_is_bad_request_and_stream_survives() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<iq to='localhost' type='get'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    // The answer cannot carry an id either, so it is not a valid stanza for the client's
    // strict parser; compare it as a plain element.
    let reply = match j.recv().await.unwrap() {
        Received::Element(e) => e.to_xml(ns::CLIENT),
        other => panic!("expected the id-less error iq, got {other:?}"),
    };
    assert_eq!(
        reply,
        format!(
            "<iq from='localhost' type='error'>{}</iq>",
            error_with_text("modify", "bad-request", "iq without &apos;id&apos;")
        )
    );
    // An unknown iq type is refused the same way.
    j.send("<iq to='localhost' id='t1' type='fetch'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<iq from='localhost' id='t1' type='error'>{}</iq>",
            error_with_text(
                "modify",
                "bad-request",
                "missing or unknown &apos;type&apos; attribute"
            )
        )
    );
    j.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Addresses (RFC 6120 §8.1)
// ---------------------------------------------------------------------------------

/// §8.1.2.1: the server stamps the sender's full JID, whether `from` was absent or
/// named the sender's own bare JID.
#[tokio::test]
async fn from_is_stamped_with_full_jid() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<message to='romeo@localhost/orchard' id='m1'><body>one</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m1'><body>one</body></message>"
    );
    j.send("<message from='juliet@localhost' to='romeo@localhost/orchard' id='m2'><body>two</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m2'><body>two</body></message>"
    );
    j.send("<message from='juliet@localhost/balcony' to='romeo@localhost/orchard' id='m3'><body>three</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m3'><body>three</body></message>"
    );
}

/// §4.9.3.9: a `from` naming anyone else is `<invalid-from/>`, and nothing is routed.
#[tokio::test]
async fn spoofed_from_is_invalid_from() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<message from='nurse@localhost/x' to='romeo@localhost/orchard' id='m1'><body>not me</body></message>")
        .await
        .unwrap();
    assert_eq!(j.expect_stream_error().await.unwrap(), "invalid-from");
    expect_nothing(&mut r).await;

    // Another resource of the same account is not the sender either.
    let mut j2 = login(&node, "juliet", "garden").await;
    j2.send("<message from='juliet@localhost/other' to='romeo@localhost/orchard' id='m2'/>")
        .await
        .unwrap();
    assert_eq!(j2.expect_stream_error().await.unwrap(), "invalid-from");
    expect_nothing(&mut r).await;
}

/// §8.3.3.8: a malformed `to` is a `<jid-malformed/>` stanza error; the stream stays.
#[tokio::test]
async fn malformed_to_is_jid_malformed_and_stream_survives() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<message to='a@b@c' id='bad' type='chat'><body>x</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        format!(
            "<message id='bad' type='error'>{}</message>",
            error_with_text(
                "modify",
                "jid-malformed",
                "malformed &apos;to&apos; address: second @ found before parsing the resource"
            )
        )
    );
    j.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Persistence and metrics
// ---------------------------------------------------------------------------------

/// Accounts live in the data directory, not in the node's memory.
#[tokio::test]
async fn accounts_persist_across_restart() {
    let first = TestNode::builder().user("juliet", PW).start();
    login(&first, "juliet", "before")
        .await
        .ping()
        .await
        .unwrap();
    let dir = first.data_dir();
    first.stop();

    let second = TestNode::builder().data_dir(dir).start();
    let mut j = login(&second, "juliet", "after").await;
    j.ping().await.unwrap();
    let (mut c, _) = secured(&second).await;
    let err = c
        .auth_scram(ScramHash::Sha256, "juliet", "wrong")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "not-authorized");
}

/// Successful logins and routed stanzas are counted. Nodes in one test process share a
/// metrics recorder and tests run in parallel, so only lower bounds can be asserted.
#[tokio::test]
async fn metrics_count_logins_and_stanzas() {
    const AUTH_OK: &str = "shoal_auth_success_total{mechanism=\"scram_sha_256\"}";
    const AUTH_FAILED: &str = "shoal_auth_failure_total{mechanism=\"scram_sha_256\"}";
    const MSG_IN: &str = "shoal_stanzas_in_total{kind=\"message\"}";
    const MSG_OUT: &str = "shoal_stanzas_out_total{kind=\"message\"}";
    let node = node();
    let before = |s: &str| node.metric(s);
    let (auth_ok, auth_failed, msg_in, msg_out) = (
        before(AUTH_OK),
        before(AUTH_FAILED),
        before(MSG_IN),
        before(MSG_OUT),
    );

    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    j.send("<message to='romeo@localhost/orchard' id='m1'><body>counted</body></message>")
        .await
        .unwrap();
    next(&mut r).await;
    let (mut c, _) = secured(&node).await;
    c.auth_scram(ScramHash::Sha256, "juliet", "wrong")
        .await
        .unwrap_err();
    // The failure is counted just after `<failure/>` is written; the next attempt on the
    // same connection is only answered after that, so once it succeeds both counts are
    // visible.
    c.auth_scram(ScramHash::Sha256, "juliet", PW).await.unwrap();
    restart_and_bind(&mut c, "third").await;

    // Routed stanzas are counted before they are written on.
    assert!(node.metric(AUTH_OK) >= auth_ok + 3.0, "{AUTH_OK}");
    assert!(
        node.metric(AUTH_FAILED) >= auth_failed + 1.0,
        "{AUTH_FAILED}"
    );
    assert!(node.metric(MSG_IN) >= msg_in + 1.0, "{MSG_IN}");
    assert!(node.metric(MSG_OUT) >= msg_out + 1.0, "{MSG_OUT}");
}
