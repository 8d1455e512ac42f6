//! In-band registration (XEP-0077) end to end over real STARTTLS: account creation
//! before authentication, login with the new account, and the server's refusals
//! (existing account, per-address rate limit, registration disabled), compared as whole
//! XML strings.
//!
//! Every test boots its own node, so the per-address budget and the account store are
//! its own. Metrics are shared by every node in the process, so they are compared as
//! "at least", never as exact deltas.

use shoal_tests::{Client, TestNode};
use shoal_xmpp::ns;
use shoal_xmpp::sasl::ScramHash;

const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

const FEATURES_WITH_REGISTER: &str = "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></features>";

/// A connection that has done STARTTLS and restarted the stream, ready for
/// registration or SASL; also returns the features offered after TLS.
async fn secured(node: &TestNode) -> (Client, String) {
    let mut c = Client::connect(node.c2s, &node.domain).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    let features = c.open().await.unwrap();
    (c, features.to_xml(ns::CLIENT))
}

/// Registers `user` on a fresh secured connection and returns the answer as XML.
async fn register(node: &TestNode, user: &str, password: &str) -> String {
    let (mut c, _) = secured(node).await;
    c.register("reg1", user, password)
        .await
        .unwrap_or_else(|e| panic!("register {user}: {e:#}"))
        .to_xml()
}

fn error(id: &str, kind: &str, condition: &str, text: Option<&str>) -> String {
    let text = text
        .map(|t| format!("<text xmlns='{STANZA_ERRORS}'>{t}</text>"))
        .unwrap_or_default();
    format!(
        "<iq id='{id}' type='error'><error type='{kind}'><{condition} xmlns='{STANZA_ERRORS}'/>{text}</error></iq>"
    )
}

fn registrations(node: &TestNode, result: &str) -> f64 {
    node.metric(&format!("shoal_registrations_total{{result=\"{result}\"}}"))
}

/// XEP-0077 §3.1.1: an unregistered client asks for the form, registers, then
/// authenticates as the new account on the same stream and binds; a later connection
/// logs in with the same credentials.
#[tokio::test]
async fn register_then_login() {
    let node = TestNode::builder().start();
    let created_before = registrations(&node, "created");
    let (mut c, features) = secured(&node).await;
    assert_eq!(features, FEATURES_WITH_REGISTER);

    c.send("<iq type='get' id='reg1'><query xmlns='jabber:iq:register'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        c.recv_stanza().await.unwrap().to_xml(),
        "<iq id='reg1' type='result'><query xmlns='jabber:iq:register'><instructions>Choose a username and password for use with this service.</instructions><username/><password/></query></iq>"
    );
    assert_eq!(
        c.register("reg2", "juliet", "pencil")
            .await
            .unwrap()
            .to_xml(),
        "<iq id='reg2' type='result'/>"
    );

    c.auth_scram(ScramHash::Sha256, "juliet", "pencil")
        .await
        .unwrap();
    c.open().await.unwrap();
    assert_eq!(
        c.bind(Some("balcony")).await.unwrap().to_string(),
        "juliet@localhost/balcony"
    );
    c.ping().await.unwrap();

    let mut again = Client::login(
        node.c2s,
        &node.domain,
        node.cert_path(),
        "juliet",
        "pencil",
        Some("orchard"),
    )
    .await
    .unwrap();
    again.ping().await.unwrap();
    assert!(registrations(&node, "created") >= created_before + 1.0);
}

/// An existing account cannot be registered again, and its password is unchanged.
#[tokio::test]
async fn duplicate_registration_is_a_conflict() {
    let node = TestNode::builder().user("romeo", "r0m30").start();
    let conflicts_before = registrations(&node, "conflict");
    assert_eq!(
        register(&node, "romeo", "stolen").await,
        error("reg1", "cancel", "conflict", None)
    );
    // A name that differs only in case is the same account after nodeprep.
    assert_eq!(
        register(&node, "Romeo", "stolen").await,
        error("reg1", "cancel", "conflict", None)
    );
    // One registered in-band conflicts the same way.
    assert_eq!(
        register(&node, "juliet", "pencil").await,
        "<iq id='reg1' type='result'/>"
    );
    assert_eq!(
        register(&node, "juliet", "other").await,
        error("reg1", "cancel", "conflict", None)
    );

    Client::login(
        node.c2s,
        &node.domain,
        node.cert_path(),
        "romeo",
        "r0m30",
        None,
    )
    .await
    .unwrap();
    let (mut c, _) = secured(&node).await;
    let refused = c.auth_scram(ScramHash::Sha256, "romeo", "stolen").await;
    assert_eq!(refused.unwrap_err().to_string(), "not-authorized");
    assert!(registrations(&node, "conflict") >= conflicts_before + 3.0);
}

/// `registration.per_ip_per_hour` bounds registrations from one address; another
/// address has its own budget.
#[tokio::test]
async fn registrations_per_address_are_rate_limited() {
    let node = TestNode::builder()
        .set("registration.per_ip_per_hour", 3)
        .start();
    let refused_before = registrations(&node, "refused");
    for user in ["a1", "a2", "a3"] {
        assert_eq!(
            register(&node, user, "pw").await,
            "<iq id='reg1' type='result'/>",
            "{user}"
        );
    }
    let limited = error(
        "reg1",
        "wait",
        "resource-constraint",
        Some("too many registrations from your address; try again later"),
    );
    assert_eq!(register(&node, "a4", "pw").await, limited);
    // The refused account was not created: logging in as it fails.
    let (mut c, _) = secured(&node).await;
    let refused = c.auth_scram(ScramHash::Sha256, "a4", "pw").await;
    assert_eq!(refused.unwrap_err().to_string(), "not-authorized");

    // Another source address (any 127.x works on Linux loopback) is not affected.
    let mut other = Client::connect_from(node.c2s, &node.domain, "127.0.0.2".parse().unwrap())
        .await
        .unwrap();
    other.open().await.unwrap();
    other.starttls(node.cert_path()).await.unwrap();
    other.open().await.unwrap();
    assert_eq!(
        other.register("reg1", "b1", "pw").await.unwrap().to_xml(),
        "<iq id='reg1' type='result'/>"
    );
    assert!(registrations(&node, "refused") > refused_before);
}

/// With `registration.enabled = false` the feature is not offered and both the form
/// and a submission are answered `<service-unavailable/>` (XEP-0077 §3.1).
#[tokio::test]
async fn disabled_registration_is_service_unavailable() {
    let node = TestNode::builder()
        .set("registration.enabled", false)
        .start();
    let (mut c, features) = secured(&node).await;
    assert_eq!(
        features,
        "<features xmlns='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms></features>"
    );
    c.send("<iq type='get' id='reg1'><query xmlns='jabber:iq:register'/></iq>")
        .await
        .unwrap();
    assert_eq!(
        c.recv_stanza().await.unwrap().to_xml(),
        error("reg1", "cancel", "service-unavailable", None)
    );
    assert_eq!(
        c.register("reg2", "juliet", "pencil")
            .await
            .unwrap()
            .to_xml(),
        error("reg2", "cancel", "service-unavailable", None)
    );
    // The stream is still good for SASL, and no account was created.
    let refused = c.auth_scram(ScramHash::Sha256, "juliet", "pencil").await;
    assert_eq!(refused.unwrap_err().to_string(), "not-authorized");
}
