//! End-to-end instant messaging over real TCP and TLS: rosters and subscriptions
//! (RFC 6121 §2, §3), presence (§4), offline storage (XEP-0160, XEP-0203, XEP-0334),
//! blocking (XEP-0191), carbons (XEP-0280), vCard (XEP-0054), private XML storage
//! (XEP-0049), last activity (XEP-0012), version (XEP-0092), time (XEP-0202), account
//! disco (XEP-0030), in-band password change and account removal (XEP-0077), and what
//! of it survives a restart, on the embedded store and on Redis.
//!
//! Stanzas are compared as whole XML strings. Where the server sends several stanzas to
//! one client whose relative order no specification fixes (a roster push and the iq
//! result of the set that caused it, a presence routed through another shard), they
//! are compared as a set; where the order is specified (offline messages) it is
//! asserted. The short "nothing arrives" window is used only where silence is the
//! assertion itself, after a stanza that proves the route was taken.

use std::time::Duration;

use shoal_node::testing::RedisServer;
use shoal_tests::im::*;
use shoal_tests::{Client, Received, TestNode, TestNodeBuilder};

const STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// The SASL failure condition of a login that must fail.
async fn login_error(node: &TestNode, user: &str, password: &str) -> String {
    match login_with(node, user, password, "x").await {
        Ok(_) => panic!("{user} logged in with {password:?}"),
        Err(e) => e.to_string(),
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

fn result(to: &str, id: &str) -> String {
    format!("<iq to='{to}' id='{id}' type='result'/>")
}

/// Whether `s` is a XEP-0082 UTC date-time with milliseconds,
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_stamp(s: &str) -> bool {
    const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd.dddZ";
    s.len() == SHAPE.len()
        && s.bytes().zip(SHAPE).all(|(c, &want)| match want {
            b'd' => c.is_ascii_digit(),
            other => c == other,
        })
}

/// Checks the `stamp` attribute of a XEP-0203 delay in `xml` and replaces its value
/// with `*`, so the rest can be compared exactly.
fn redact_stamp(xml: &str) -> String {
    let start = xml.find("stamp='").expect("a stamp") + "stamp='".len();
    let len = xml[start..].find('\'').expect("stamp closed");
    let stamp = &xml[start..start + len];
    assert!(is_stamp(stamp), "bad delay stamp {stamp:?} in {xml}");
    format!("{}*{}", &xml[..start], &xml[start + len..])
}

/// The delay element the server adds to stored messages, with the stamp redacted.
const DELAY: &str = "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='*'/>";

// ---------------------------------------------------------------------------------
// Roster management (RFC 6121 §2)
// ---------------------------------------------------------------------------------

/// §2.2 get, §2.3 add, §2.4 update, §2.5 delete, with pushes to interested resources
/// only and §2.6 versioning.
#[tokio::test]
async fn roster_get_set_update_remove_with_versions() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    // Never asks for the roster: not interested, so no pushes (§2.1.6).
    let mut other = login(&node, "juliet", "garden").await;
    let me = jid(&j);

    assert_eq!(
        get_roster(&mut j, "r1").await,
        format!(
            "<iq to='{me}' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='0'/></iq>"
        )
    );

    // §2.3: add an item with a name and a group.
    j.send("<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost' name='Nurse'><group>Servants</group></item></query></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                &me,
                1,
                "<item jid='nurse@localhost' name='Nurse' subscription='none'><group>Servants</group></item>",
            ),
            result(&me, "s1"),
        ],
    )
    .await;

    // §2.6.3: the client's version is current, so the result is empty.
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='r2'><query xmlns='jabber:iq:roster' ver='1'/></iq>"
        )
        .await,
        result(&me, "r2")
    );
    // An outdated or empty version gets the whole roster (§2.6.3, §2.6.2).
    let full = format!(
        "<iq to='{me}' id='r3' type='result'><query xmlns='jabber:iq:roster' ver='1'><item jid='nurse@localhost' name='Nurse' subscription='none'><group>Servants</group></item></query></iq>"
    );
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='r3'><query xmlns='jabber:iq:roster' ver='0'/></iq>"
        )
        .await,
        full
    );
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='r3'><query xmlns='jabber:iq:roster' ver=''/></iq>"
        )
        .await,
        full
    );
    // Addressed to the account's own bare JID, the same request is answered the same.
    assert_eq!(
        ask(
            &mut j,
            "<iq to='juliet@localhost' type='get' id='r3'><query xmlns='jabber:iq:roster'/></iq>"
        )
        .await,
        full.replace(
            &format!("to='{me}'"),
            &format!("to='{me}' from='juliet@localhost'")
        )
    );

    // §2.4: update the name and the groups.
    j.send("<iq type='set' id='s2'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost' name='Angelica'><group>Servants</group><group>Family</group></item></query></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                &me,
                2,
                "<item jid='nurse@localhost' name='Angelica' subscription='none'><group>Servants</group><group>Family</group></item>",
            ),
            result(&me, "s2"),
        ],
    )
    .await;

    // §2.5: remove it.
    j.send("<iq type='set' id='s3'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost' subscription='remove'/></query></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                &me,
                3,
                "<item jid='nurse@localhost' subscription='remove'/>",
            ),
            result(&me, "s3"),
        ],
    )
    .await;
    assert_eq!(
        get_roster(&mut j, "r4").await,
        format!(
            "<iq to='{me}' id='r4' type='result'><query xmlns='jabber:iq:roster' ver='3'/></iq>"
        )
    );
    // §2.5.3: removing an item that is not there.
    assert_eq!(
        ask(&mut j, "<iq type='set' id='s4'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost' subscription='remove'/></query></iq>").await,
        format!("<iq to='{me}' id='s4' type='error'>{}</iq>", error("cancel", "item-not-found"))
    );

    expect_nothing(&mut other).await;
}

/// §2.3.3: malformed or over-limit roster sets are refused and change nothing.
#[tokio::test]
async fn roster_set_errors() {
    let node = users(TestNode::builder())
        .set("limits.max_roster_name_len", 8)
        .set("limits.max_roster_items", 2)
        .start();
    let mut j = login(&node, "juliet", "balcony").await;
    let me = jid(&j);
    get_roster(&mut j, "r1").await;

    // §2.3.3: exactly one item per set.
    assert_eq!(
        ask(&mut j, "<iq type='set' id='e1'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost'/><item jid='romeo@localhost'/></query></iq>").await,
        format!(
            "<iq to='{me}' id='e1' type='error'>{}</iq>",
            error_with_text("modify", "bad-request", "a roster set carries exactly one item")
        )
    );
    // §2.3.3: an empty group is not acceptable.
    assert_eq!(
        ask(&mut j, "<iq type='set' id='e2'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost'><group/></item></query></iq>").await,
        format!(
            "<iq to='{me}' id='e2' type='error'>{}</iq>",
            error_with_text("modify", "not-acceptable", "empty roster group")
        )
    );
    // Over the configured name length (8 bytes).
    assert_eq!(
        ask(&mut j, "<iq type='set' id='e3'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost' name='Angelica!'/></query></iq>").await,
        format!(
            "<iq to='{me}' id='e3' type='error'>{}</iq>",
            error_with_text("modify", "not-acceptable", "roster item name too long")
        )
    );
    assert_eq!(
        ask(&mut j, "<iq type='set' id='e4'><query xmlns='jabber:iq:roster'><item jid='nurse@localhost'><group>Household</group></item></query></iq>").await,
        format!(
            "<iq to='{me}' id='e4' type='error'>{}</iq>",
            error_with_text("modify", "not-acceptable", "roster group name too long")
        )
    );

    // Nothing above changed the roster.
    assert_eq!(
        get_roster(&mut j, "r2").await,
        format!(
            "<iq to='{me}' id='r2' type='result'><query xmlns='jabber:iq:roster' ver='0'/></iq>"
        )
    );

    // Over the configured roster size (2 items): a third contact is refused, an update
    // of an existing one is still fine.
    for (i, contact) in ["nurse", "romeo"].iter().enumerate() {
        j.send(&format!("<iq type='set' id='a{i}'><query xmlns='jabber:iq:roster'><item jid='{contact}@localhost' name='{contact}'/></query></iq>"))
            .await
            .unwrap();
        next_unordered(
            &mut j,
            &[
                push(
                    &me,
                    i as u64 + 1,
                    &format!(
                        "<item jid='{contact}@localhost' name='{contact}' subscription='none'/>"
                    ),
                ),
                result(&me, &format!("a{i}")),
            ],
        )
        .await;
    }
    assert_eq!(
        ask(&mut j, "<iq type='set' id='e5'><query xmlns='jabber:iq:roster'><item jid='tybalt@localhost'/></query></iq>").await,
        format!(
            "<iq to='{me}' id='e5' type='error'>{}</iq>",
            error_with_text("modify", "not-acceptable", "roster is full")
        )
    );
    j.send("<iq type='set' id='u1'><query xmlns='jabber:iq:roster'><item jid='romeo@localhost' name='Romeo'/></query></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                &me,
                3,
                "<item jid='romeo@localhost' name='Romeo' subscription='none'/>",
            ),
            result(&me, "u1"),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------------
// Subscriptions and presence (RFC 6121 §3, §4)
// ---------------------------------------------------------------------------------

/// §3.1 between two online users, then §4: presence follows the subscriptions, on
/// changes, logout (§4.5.2) and login (§4.2.2 broadcast and probes, §4.3.2 answers).
#[tokio::test]
async fn subscription_flow_and_presence() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    befriend(&mut r, &mut j).await;

    // Both rosters now show the mutual subscription.
    assert_eq!(
        get_roster(&mut r, "r1").await,
        "<iq to='romeo@localhost/orchard' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='3'><item jid='juliet@localhost' subscription='both'/></query></iq>"
    );
    assert_eq!(
        get_roster(&mut j, "r1").await,
        "<iq to='juliet@localhost/balcony' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='3'><item jid='romeo@localhost' subscription='both'/></query></iq>"
    );

    // §4.4: a presence change reaches the contact and the user's own resource.
    j.send("<presence><show>away</show><status>At the window</status></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<presence from='juliet@localhost/balcony'><show>away</show><status>At the window</status></presence>"
    );
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony'><show>away</show><status>At the window</status></presence>"
    );

    // §4.5.2: logging out makes her unavailable to him.
    j.close().await.unwrap();
    j.expect_eof().await.unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
    );

    // §4.2: logging in again broadcasts her initial presence to him, and her probe
    // (§4.3) brings his current presence to her.
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<presence/>").await.unwrap();
    next_unordered(
        &mut j,
        &[
            "<presence from='juliet@localhost/balcony'/>".into(),
            "<presence to='juliet@localhost' from='romeo@localhost/orchard'/>".into(),
        ],
    )
    .await;
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony'/>"
    );
    expect_nothing(&mut r).await;
    expect_nothing(&mut j).await;
}

/// §3.1.3 and §3.4 of RFC 6121 (and Appendix A.3.1): a request to a user who is offline
/// is kept, with its payload, and delivered when the user next sends initial presence.
#[tokio::test]
async fn subscription_request_to_offline_user_is_delivered_at_login() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    r.send("<presence to='nurse@localhost' type='subscribe'><status>May I?</status></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        push(
            "romeo@localhost/orchard",
            1,
            "<item ask='subscribe' jid='nurse@localhost' subscription='none'/>"
        )
    );

    let mut n = login(&node, "nurse", "kitchen").await;
    // A pending request is no roster item (Appendix A.1).
    assert_eq!(
        get_roster(&mut n, "r1").await,
        "<iq to='nurse@localhost/kitchen' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='0'/></iq>"
    );
    // Not delivered before initial presence...
    expect_nothing(&mut n).await;
    // ...but with it.
    n.send("<presence/>").await.unwrap();
    assert_eq!(
        next(&mut n).await,
        "<presence from='nurse@localhost/kitchen'/>"
    );
    assert_eq!(
        next(&mut n).await,
        "<presence to='nurse@localhost' from='romeo@localhost' type='subscribe'><status>May I?</status></presence>"
    );

    // The nurse approves now; Romeo's pending request becomes a subscription.
    n.send("<presence to='romeo@localhost' type='subscribed'/>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut n).await,
        push(
            "nurse@localhost/kitchen",
            1,
            "<item jid='romeo@localhost' subscription='from'/>"
        )
    );
    next_unordered(
        &mut r,
        &[
            push(
                "romeo@localhost/orchard",
                2,
                "<item jid='nurse@localhost' subscription='to'/>",
            ),
            "<presence to='romeo@localhost' from='nurse@localhost' type='subscribed'/>".into(),
            "<presence to='romeo@localhost' from='nurse@localhost/kitchen'/>".into(),
        ],
    )
    .await;

    // Once answered, the request is not delivered again at the next login.
    n.close().await.unwrap();
    n.expect_eof().await.unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='nurse@localhost/kitchen' type='unavailable'/>"
    );
    let mut n = login(&node, "nurse", "kitchen").await;
    n.send("<presence/>").await.unwrap();
    assert_eq!(
        next(&mut n).await,
        "<presence from='nurse@localhost/kitchen'/>"
    );
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='nurse@localhost/kitchen'/>"
    );
    expect_nothing(&mut n).await;
}

/// §3.4: the server announces pre-approval; a user pre-approves a contact, whose later
/// request is approved by the server without asking the user.
#[tokio::test]
async fn subscription_pre_approval() {
    let node = node();
    // §3.4.1: the stream feature, after authentication.
    let mut c = Client::connect(node.c2s, &node.domain).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    c.open().await.unwrap();
    c.auth_scram(shoal_xmpp::sasl::ScramHash::Sha256, "juliet", PW)
        .await
        .unwrap();
    let features = c.open().await.unwrap();
    assert!(
        features
            .get_child("sub", "urn:xmpp:features:pre-approval")
            .is_some(),
        "{features:?}"
    );

    let mut j = online(&node, "juliet", "balcony").await;
    let mut r = online(&node, "romeo", "orchard").await;
    // §3.4.2: nothing is sent to Romeo; Juliet's roster shows the approval.
    j.send("<presence to='romeo@localhost' type='subscribed'/>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        push(
            "juliet@localhost/balcony",
            1,
            "<item approved='true' jid='romeo@localhost' subscription='none'/>"
        )
    );
    expect_nothing(&mut r).await;

    // His request is approved at once, with her presence; she is not asked.
    r.send("<presence to='juliet@localhost' type='subscribe'/>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        push(
            "juliet@localhost/balcony",
            2,
            "<item jid='romeo@localhost' subscription='from'/>"
        )
    );
    next_unordered(
        &mut r,
        &[
            push(
                "romeo@localhost/orchard",
                1,
                "<item ask='subscribe' jid='juliet@localhost' subscription='none'/>",
            ),
            push(
                "romeo@localhost/orchard",
                2,
                "<item jid='juliet@localhost' subscription='to'/>",
            ),
            "<presence to='romeo@localhost' from='juliet@localhost' type='subscribed'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost/balcony'/>".into(),
        ],
    )
    .await;
    expect_nothing(&mut j).await;
}

/// §3.2 (cancelling a subscription with "unsubscribed") and §3.3 (unsubscribing): the
/// roster pushes on both sides and the unavailable presence the contact is owed.
#[tokio::test]
async fn unsubscribed_and_unsubscribe_side_effects() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    befriend(&mut r, &mut j).await;

    // §3.2: Juliet cancels Romeo's subscription to her presence. He learns she is
    // unavailable to him.
    j.send("<presence to='romeo@localhost' type='unsubscribed'/>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        push(
            "juliet@localhost/balcony",
            4,
            "<item jid='romeo@localhost' subscription='to'/>"
        )
    );
    next_unordered(
        &mut r,
        &[
            push(
                "romeo@localhost/orchard",
                4,
                "<item jid='juliet@localhost' subscription='from'/>",
            ),
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribed'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
                .into(),
        ],
    )
    .await;
    // Her presence no longer reaches him; his still reaches her.
    j.send("<presence><show>xa</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<presence from='juliet@localhost/balcony'><show>xa</show></presence>"
    );
    r.send("<presence><show>chat</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence from='romeo@localhost/orchard'><show>chat</show></presence>"
    );
    assert_eq!(
        next(&mut j).await,
        "<presence to='juliet@localhost' from='romeo@localhost/orchard'><show>chat</show></presence>"
    );
    expect_nothing(&mut r).await;

    // §3.3: Juliet unsubscribes from Romeo's presence. Her roster says "none", his
    // too, and his server tells her he is unavailable to her.
    j.send("<presence to='romeo@localhost' type='unsubscribe'/>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                "juliet@localhost/balcony",
                5,
                "<item jid='romeo@localhost' subscription='none'/>",
            ),
            "<presence to='juliet@localhost' from='romeo@localhost/orchard' type='unavailable'/>"
                .into(),
        ],
    )
    .await;
    next_unordered(
        &mut r,
        &[
            push(
                "romeo@localhost/orchard",
                5,
                "<item jid='juliet@localhost' subscription='none'/>",
            ),
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribe'/>".into(),
        ],
    )
    .await;
    r.send("<presence><show>away</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence from='romeo@localhost/orchard'><show>away</show></presence>"
    );
    expect_nothing(&mut j).await;
}

/// §2.5.2: removing a contact with a mutual subscription cancels both directions.
#[tokio::test]
async fn roster_remove_cancels_subscriptions() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    befriend(&mut r, &mut j).await;

    j.send("<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='romeo@localhost' subscription='remove'/></query></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            push(
                "juliet@localhost/balcony",
                4,
                "<item jid='romeo@localhost' subscription='remove'/>",
            ),
            result("juliet@localhost/balcony", "rm"),
            // His server, told she unsubscribed, says he is unavailable to her.
            "<presence to='juliet@localhost' from='romeo@localhost/orchard' type='unavailable'/>"
                .into(),
        ],
    )
    .await;
    next_unordered(
        &mut r,
        &[
            push(
                "romeo@localhost/orchard",
                4,
                "<item jid='juliet@localhost' subscription='to'/>",
            ),
            push(
                "romeo@localhost/orchard",
                5,
                "<item jid='juliet@localhost' subscription='none'/>",
            ),
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribe'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribed'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
                .into(),
        ],
    )
    .await;
}

/// §4.6: directed presence reaches its recipient, and when the session ends the
/// recipient learns it is unavailable (§4.6.3).
#[tokio::test]
async fn directed_presence_is_followed_by_unavailable_on_close() {
    let node = node();
    let mut n = login(&node, "nurse", "kitchen").await;
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<presence to='nurse@localhost/kitchen'><show>chat</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut n).await,
        "<presence to='nurse@localhost/kitchen' from='juliet@localhost/balcony'><show>chat</show></presence>"
    );
    j.close().await.unwrap();
    j.expect_eof().await.unwrap();
    assert_eq!(
        next(&mut n).await,
        "<presence to='nurse@localhost/kitchen' from='juliet@localhost/balcony' type='unavailable'/>"
    );
}

// ---------------------------------------------------------------------------------
// Offline messages (XEP-0160, XEP-0203, XEP-0334)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn offline_messages_are_stored_bounded_and_delivered_in_order() {
    let node = users(TestNode::builder())
        .set("limits.max_offline_messages", 3)
        .start();
    let mut r = login(&node, "romeo", "orchard").await;

    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>one</body></message>")
        .await
        .unwrap();
    // XEP-0334: not to be stored, so it neither is nor counts against the bound.
    r.send("<message to='juliet@localhost' id='ns' type='chat'><body>ephemeral</body><no-store xmlns='urn:xmpp:hints'/></message>")
        .await
        .unwrap();
    r.send("<message to='juliet@localhost/gone' id='m2'><body>two</body></message>")
        .await
        .unwrap();
    r.send("<message to='juliet@localhost' id='m3' type='chat'><body>three</body></message>")
        .await
        .unwrap();
    // The queue holds three: the fourth is refused (RFC 6121 §8.5.2.2.1).
    r.send("<message to='juliet@localhost' id='m4' type='chat'><body>four</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='juliet@localhost' id='m4' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
    expect_nothing(&mut r).await;

    // Binding alone does not deliver them; initial presence does, in order.
    let mut j = login(&node, "juliet", "balcony").await;
    expect_nothing(&mut j).await;
    j.send("<presence/>").await.unwrap();
    assert_eq!(
        next(&mut j).await,
        "<presence from='juliet@localhost/balcony'/>"
    );
    let expected = [
        format!(
            "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m1' type='chat'><body>one</body>{DELAY}</message>"
        ),
        format!(
            "<message to='juliet@localhost/gone' from='romeo@localhost/orchard' id='m2'><body>two</body>{DELAY}</message>"
        ),
        format!(
            "<message to='juliet@localhost' from='romeo@localhost/orchard' id='m3' type='chat'><body>three</body>{DELAY}</message>"
        ),
    ];
    for want in &expected {
        assert_eq!(redact_stamp(&next(&mut j).await), *want);
    }
    expect_nothing(&mut j).await;

    // Delivered messages are gone from the store.
    j.close().await.unwrap();
    j.expect_eof().await.unwrap();
    let mut j = login(&node, "juliet", "balcony").await;
    j.send("<presence/>").await.unwrap();
    assert_eq!(
        next(&mut j).await,
        "<presence from='juliet@localhost/balcony'/>"
    );
    expect_nothing(&mut j).await;
}

/// RFC 6121 §8.5.1: no such account, whatever the stanza asks.
#[tokio::test]
async fn messages_to_nonexistent_account_are_service_unavailable() {
    let node = node();
    let mut r = login(&node, "romeo", "orchard").await;
    assert_eq!(
        ask(
            &mut r,
            "<message to='tybalt@localhost' id='m1' type='chat'><body>hi</body></message>"
        )
        .await,
        format!(
            "<message to='romeo@localhost/orchard' from='tybalt@localhost' id='m1' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
    assert_eq!(
        ask(
            &mut r,
            "<iq to='tybalt@localhost' id='v1' type='get'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!(
            "<iq to='romeo@localhost/orchard' from='tybalt@localhost' id='v1' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
}

// ---------------------------------------------------------------------------------
// Blocking (XEP-0191)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn blocking_command() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    let mut n = online(&node, "nurse", "kitchen").await;
    befriend(&mut r, &mut j).await;
    let me = "juliet@localhost/balcony";

    // §3.2: the empty list.
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='bl1'><blocklist xmlns='urn:xmpp:blocking'/></iq>"
        )
        .await,
        format!("<iq to='{me}' id='bl1' type='result'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
    );

    // §3.3: block Romeo (a subscriber, who is told she is unavailable) and the nurse
    // (no subscription: she learns nothing).
    j.send("<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='romeo@localhost'/><item jid='nurse@localhost'/></block></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{me}' id='block-push' type='set'><block xmlns='urn:xmpp:blocking'><item jid='romeo@localhost'/><item jid='nurse@localhost'/></block></iq>"),
            result(me, "b1"),
        ],
    )
    .await;
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
    );
    expect_nothing(&mut n).await;
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='bl2'><blocklist xmlns='urn:xmpp:blocking'/></iq>"
        )
        .await,
        format!(
            "<iq to='{me}' id='bl2' type='result'><blocklist xmlns='urn:xmpp:blocking'><item jid='nurse@localhost'/><item jid='romeo@localhost'/></blocklist></iq>"
        )
    );

    // Romeo's message and his iq are refused as if she were not there (XEP-0191 §3.4).
    r.send("<message to='juliet@localhost' id='m1' type='chat'><body>Hear me!</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='juliet@localhost' id='m1' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
    assert_eq!(
        ask(
            &mut r,
            "<iq to='juliet@localhost' id='v1' type='get'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!(
            "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='v1' type='error'>{}</iq>",
            error("cancel", "service-unavailable")
        )
    );
    expect_nothing(&mut j).await;

    // Her message to him is refused with XEP-0191's application condition.
    assert_eq!(
        ask(
            &mut j,
            "<message to='romeo@localhost' id='m2' type='chat'><body>Can you hear me?</body></message>"
        )
        .await,
        format!(
            "<message to='{me}' from='romeo@localhost' id='m2' type='error'><error type='cancel'><not-acceptable xmlns='{STANZA_ERRORS}'/><blocked xmlns='urn:xmpp:blocking:errors'/></error></message>"
        )
    );
    expect_nothing(&mut r).await;

    // Presence does not cross the block in either direction.
    j.send("<presence><show>dnd</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<presence from='juliet@localhost/balcony'><show>dnd</show></presence>"
    );
    r.send("<presence><show>away</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<presence from='romeo@localhost/orchard'><show>away</show></presence>"
    );
    expect_nothing(&mut r).await;
    expect_nothing(&mut j).await;

    // §3.4: unblocking Romeo sends him her current presence; the nurse stays blocked.
    j.send("<iq type='set' id='u1'><unblock xmlns='urn:xmpp:blocking'><item jid='romeo@localhost'/></unblock></iq>")
        .await
        .unwrap();
    next_unordered(
        &mut j,
        &[
            format!("<iq to='{me}' id='block-push' type='set'><unblock xmlns='urn:xmpp:blocking'><item jid='romeo@localhost'/></unblock></iq>"),
            result(me, "u1"),
        ],
    )
    .await;
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony'><show>dnd</show></presence>"
    );
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='bl3'><blocklist xmlns='urn:xmpp:blocking'/></iq>"
        )
        .await,
        format!(
            "<iq to='{me}' id='bl3' type='result'><blocklist xmlns='urn:xmpp:blocking'><item jid='nurse@localhost'/></blocklist></iq>"
        )
    );

    // Messages flow again.
    r.send(
        "<message to='juliet@localhost/balcony' id='m3' type='chat'><body>Again</body></message>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@localhost/balcony' from='romeo@localhost/orchard' id='m3' type='chat'><body>Again</body></message>"
    );
    j.send("<message to='romeo@localhost/orchard' id='m4' type='chat'><body>Yes</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m4' type='chat'><body>Yes</body></message>"
    );
    // The nurse's messages are still refused.
    n.send(
        "<message to='juliet@localhost/balcony' id='m5' type='chat'><body>Madam!</body></message>",
    )
    .await
    .unwrap();
    assert!(next(&mut n).await.contains("<service-unavailable"));
    expect_nothing(&mut j).await;
}

// ---------------------------------------------------------------------------------
// Message carbons (XEP-0280)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn carbons_copy_received_and_sent_chats() {
    let node = node();
    let mut r = login(&node, "romeo", "orchard").await;
    let mut a = login(&node, "juliet", "a").await;
    let mut b = login(&node, "juliet", "b").await;
    assert_eq!(
        ask(&mut a, "<presence/>").await,
        "<presence from='juliet@localhost/a'/>"
    );
    b.send("<presence/>").await.unwrap();
    next_unordered(
        &mut b,
        &[
            "<presence from='juliet@localhost/b'/>".into(),
            "<presence to='juliet@localhost/b' from='juliet@localhost/a'/>".into(),
        ],
    )
    .await;
    assert_eq!(next(&mut a).await, "<presence from='juliet@localhost/b'/>");

    // §4: resource a enables carbons.
    assert_eq!(
        ask(
            &mut a,
            "<iq type='set' id='c1'><enable xmlns='urn:xmpp:carbons:2'/></iq>"
        )
        .await,
        result("juliet@localhost/a", "c1")
    );

    // §6: a chat to b's full JID is copied to a, wrapped in <received/>.
    r.send("<message to='juliet@localhost/b' id='m1' type='chat'><body>To b</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut b).await,
        "<message to='juliet@localhost/b' from='romeo@localhost/orchard' id='m1' type='chat'><body>To b</body></message>"
    );
    assert_eq!(
        next(&mut a).await,
        "<message to='juliet@localhost/a' from='juliet@localhost' type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='juliet@localhost/b' from='romeo@localhost/orchard' id='m1' type='chat'><body>To b</body></message></forwarded></received></message>"
    );

    // §7: a chat b sends is copied to a, wrapped in <sent/>.
    b.send(
        "<message to='romeo@localhost/orchard' id='m2' type='chat'><body>From b</body></message>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/b' id='m2' type='chat'><body>From b</body></message>"
    );
    assert_eq!(
        next(&mut a).await,
        "<message to='juliet@localhost/a' from='juliet@localhost' type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='romeo@localhost/orchard' from='juliet@localhost/b' id='m2' type='chat'><body>From b</body></message></forwarded></sent></message>"
    );

    // b did not enable carbons: what a sends and receives is not copied to b.
    a.send(
        "<message to='romeo@localhost/orchard' id='m3' type='chat'><body>From a</body></message>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/a' id='m3' type='chat'><body>From a</body></message>"
    );
    expect_nothing(&mut b).await;

    // §8: <private/> keeps a message out of carbons, both ways.
    b.send("<message to='romeo@localhost/orchard' id='p1' type='chat'><body>Secret</body><private xmlns='urn:xmpp:carbons:2'/></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@localhost/orchard' from='juliet@localhost/b' id='p1' type='chat'><body>Secret</body><private xmlns='urn:xmpp:carbons:2'/></message>"
    );
    r.send("<message to='juliet@localhost/b' id='p2' type='chat'><body>Secret too</body><private xmlns='urn:xmpp:carbons:2'/></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut b).await,
        "<message to='juliet@localhost/b' from='romeo@localhost/orchard' id='p2' type='chat'><body>Secret too</body><private xmlns='urn:xmpp:carbons:2'/></message>"
    );
    expect_nothing(&mut a).await;

    // Disabled again, a gets no more copies.
    assert_eq!(
        ask(
            &mut a,
            "<iq type='set' id='c2'><disable xmlns='urn:xmpp:carbons:2'/></iq>"
        )
        .await,
        result("juliet@localhost/a", "c2")
    );
    b.send(
        "<message to='romeo@localhost/orchard' id='m4' type='chat'><body>Plain</body></message>",
    )
    .await
    .unwrap();
    next(&mut r).await;
    expect_nothing(&mut a).await;
}

// ---------------------------------------------------------------------------------
// vCard, private storage, last activity, version, time, disco
// ---------------------------------------------------------------------------------

/// XEP-0054: set and get one's own vCard, read another user's by bare JID; a user
/// without one has an empty vCard.
#[tokio::test]
async fn vcard_set_and_get() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let mut r = login(&node, "romeo", "orchard").await;
    let me = "juliet@localhost/balcony";

    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='v0'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!("<iq to='{me}' id='v0' type='result'><vCard xmlns='vcard-temp'/></iq>")
    );
    let card = "<vCard xmlns='vcard-temp'><FN>Juliet Capulet</FN><N><FAMILY>Capulet</FAMILY><GIVEN>Juliet</GIVEN></N><NICKNAME>J &amp; R</NICKNAME></vCard>";
    assert_eq!(
        ask(&mut j, &format!("<iq type='set' id='v1'>{card}</iq>")).await,
        result(me, "v1")
    );
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='v2'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!("<iq to='{me}' id='v2' type='result'>{card}</iq>")
    );
    assert_eq!(
        ask(
            &mut r,
            "<iq to='juliet@localhost' type='get' id='v3'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!(
            "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='v3' type='result'>{card}</iq>"
        )
    );
    // Nobody has set the nurse's.
    assert_eq!(
        ask(
            &mut r,
            "<iq to='nurse@localhost' type='get' id='v4'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        "<iq to='romeo@localhost/orchard' from='nurse@localhost' id='v4' type='result'><vCard xmlns='vcard-temp'/></iq>"
    );
    // A set replaces the whole vCard.
    assert_eq!(
        ask(
            &mut j,
            "<iq type='set' id='v5'><vCard xmlns='vcard-temp'><FN>J.</FN></vCard></iq>"
        )
        .await,
        result(me, "v5")
    );
    assert_eq!(
        ask(
            &mut r,
            "<iq to='juliet@localhost' type='get' id='v6'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='v6' type='result'><vCard xmlns='vcard-temp'><FN>J.</FN></vCard></iq>"
    );
}

/// XEP-0049: private XML storage, keyed by element and namespace.
#[tokio::test]
async fn private_xml_storage() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    let me = "juliet@localhost/balcony";

    // Nothing stored yet: the empty element comes back.
    assert_eq!(
        ask(&mut j, "<iq type='get' id='p1'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>").await,
        format!("<iq to='{me}' id='p1' type='result'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>")
    );
    assert_eq!(
        ask(&mut j, "<iq type='set' id='p2'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><nick>Jules</nick></prefs></query></iq>").await,
        result(me, "p2")
    );
    assert_eq!(
        ask(&mut j, "<iq type='set' id='p3'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:other'><colour>red</colour></prefs></query></iq>").await,
        result(me, "p3")
    );
    assert_eq!(
        ask(&mut j, "<iq type='get' id='p4'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>").await,
        format!("<iq to='{me}' id='p4' type='result'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><nick>Jules</nick></prefs></query></iq>")
    );
    assert_eq!(
        ask(&mut j, "<iq type='get' id='p5'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:other'/></query></iq>").await,
        format!("<iq to='{me}' id='p5' type='result'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:other'><colour>red</colour></prefs></query></iq>")
    );
    // §3: the jabber:* namespaces are reserved.
    assert_eq!(
        ask(&mut j, "<iq type='set' id='p6'><query xmlns='jabber:iq:private'><query xmlns='jabber:iq:roster'/></query></iq>").await,
        format!("<iq to='{me}' id='p6' type='error'>{}</iq>", error("modify", "not-acceptable"))
    );
    assert_eq!(
        ask(&mut j, "<iq type='get' id='p7'><query xmlns='jabber:iq:private'><x xmlns='jabber:x:data'/></query></iq>").await,
        format!("<iq to='{me}' id='p7' type='error'>{}</iq>", error("modify", "not-acceptable"))
    );
}

/// The `seconds` attribute of a XEP-0012 result, which must otherwise be exactly
/// `<iq to='{to}' from='{from}' id='{id}' type='result'><query xmlns='jabber:iq:last' seconds='N'/></iq>`.
fn last_seconds(xml: &str, to: &str, from: &str, id: &str) -> u64 {
    let prefix = format!(
        "<iq to='{to}' from='{from}' id='{id}' type='result'><query xmlns='jabber:iq:last' seconds='"
    );
    let rest = xml
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix("'/></iq>"))
        .unwrap_or_else(|| panic!("unexpected last activity answer {xml}"));
    rest.parse()
        .unwrap_or_else(|_| panic!("seconds not a number in {xml}"))
}

/// XEP-0012: asked of the server it is uptime; of a contact the requester is
/// subscribed to, 0 while online and the time since logout when offline; of anyone
/// else, forbidden.
#[tokio::test]
async fn last_activity() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    let mut n = login(&node, "nurse", "kitchen").await;
    befriend(&mut r, &mut j).await;

    let up = last_seconds(
        &ask(
            &mut r,
            "<iq to='localhost' type='get' id='l1'><query xmlns='jabber:iq:last'/></iq>",
        )
        .await,
        "romeo@localhost/orchard",
        "localhost",
        "l1",
    );
    assert!(up < 60, "uptime {up}");

    let query = "<iq to='juliet@localhost' type='get' id='l2'><query xmlns='jabber:iq:last'/></iq>";
    assert_eq!(
        last_seconds(
            &ask(&mut r, query).await,
            "romeo@localhost/orchard",
            "juliet@localhost",
            "l2"
        ),
        0
    );

    j.close().await.unwrap();
    j.expect_eof().await.unwrap();
    let logged_out = std::time::Instant::now();
    assert_eq!(
        next(&mut r).await,
        "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
    );
    // Let a measurable time pass, so the answer has to count from the logout.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let seconds = last_seconds(
        &ask(&mut r, query).await,
        "romeo@localhost/orchard",
        "juliet@localhost",
        "l2",
    );
    let bound = logged_out.elapsed().as_secs() + 1;
    assert!(
        (1..=bound).contains(&seconds),
        "{seconds} s since logout, at most {bound} expected"
    );

    // §4: without a subscription to her presence, the nurse may not know.
    assert_eq!(
        ask(&mut n, &query.replace("l2", "l3")).await,
        format!(
            "<iq to='nurse@localhost/kitchen' from='juliet@localhost' id='l3' type='error'>{}</iq>",
            error("auth", "forbidden")
        )
    );
}

/// XEP-0092 and XEP-0202 on the server.
#[tokio::test]
async fn version_and_time_of_server() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    assert_eq!(
        ask(
            &mut j,
            "<iq to='localhost' type='get' id='ver'><query xmlns='jabber:iq:version'/></iq>"
        )
        .await,
        format!(
            "<iq to='juliet@localhost/balcony' from='localhost' id='ver' type='result'><query xmlns='jabber:iq:version'><name>Shoal</name><version>{}</version></query></iq>",
            env!("CARGO_PKG_VERSION")
        )
    );

    let time = ask(
        &mut j,
        "<iq to='localhost' type='get' id='t'><time xmlns='urn:xmpp:time'/></iq>",
    )
    .await;
    let utc = time
        .strip_prefix("<iq to='juliet@localhost/balcony' from='localhost' id='t' type='result'><time xmlns='urn:xmpp:time'><tzo>+00:00</tzo><utc>")
        .and_then(|r| r.strip_suffix("</utc></time></iq>"))
        .unwrap_or_else(|| panic!("unexpected time answer {time}"));
    assert!(is_stamp(utc), "utc {utc:?} is not a XEP-0082 date-time");
}

/// XEP-0030 on an account's bare JID: the server answers for the account.
#[tokio::test]
async fn disco_info_on_account() {
    let node = node();
    let mut r = login(&node, "romeo", "orchard").await;
    assert_eq!(
        ask(
            &mut r,
            "<iq to='juliet@localhost' type='get' id='d1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )
        .await,
        "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='d1' type='result'><query xmlns='http://jabber.org/protocol/disco#info'><identity category='account' type='registered'/><feature var='http://jabber.org/protocol/disco#info'/><feature var='vcard-temp'/><feature var='jabber:iq:last'/></query></iq>"
    );
}

// ---------------------------------------------------------------------------------
// In-band account management (XEP-0077 §3.2, §3.3)
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn password_change() {
    let node = node();
    let mut j = login(&node, "juliet", "balcony").await;
    // §3.3, as in the XEP's example: addressed to the server.
    assert_eq!(
        ask(&mut j, "<iq type='set' to='localhost' id='change1'><query xmlns='jabber:iq:register'><username>juliet</username><password>newpass</password></query></iq>").await,
        "<iq to='juliet@localhost/balcony' from='localhost' id='change1' type='result'/>"
    );
    assert_eq!(login_error(&node, "juliet", PW).await, "not-authorized");
    let mut j2 = login_with(&node, "juliet", "newpass", "new").await.unwrap();
    j2.ping().await.unwrap();

    // Without 'to' (handled by the server for the account, too).
    assert_eq!(
        ask(&mut j2, "<iq type='set' id='change2'><query xmlns='jabber:iq:register'><username>juliet</username><password>newer</password></query></iq>").await,
        result("juliet@localhost/new", "change2")
    );
    assert_eq!(
        login_error(&node, "juliet", "newpass").await,
        "not-authorized"
    );
    login_with(&node, "juliet", "newer", "x").await.unwrap();

    // Someone else's username, or no password, changes nothing.
    for (id, query) in [
        (
            "bad1",
            "<username>romeo</username><password>stolen</password>",
        ),
        ("bad2", "<username>juliet</username><password/>"),
    ] {
        assert_eq!(
            ask(
                &mut j2,
                &format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:register'>{query}</query></iq>"),
            )
            .await,
            format!(
                "<iq to='juliet@localhost/new' id='{id}' type='error'>{}</iq>",
                error("modify", "not-acceptable")
            )
        );
    }
    login_with(&node, "juliet", "newer", "y").await.unwrap();
    login(&node, "romeo", "still").await;
}

/// §3.2: removal answers, closes every session of the account with `<not-authorized/>`,
/// cancels its subscriptions (RFC 6121 §3) and the account can no longer log in.
#[tokio::test]
async fn account_removal() {
    let node = node();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    befriend(&mut r, &mut j).await;
    let mut other = login(&node, "juliet", "garden").await;

    j.send("<iq type='set' id='unreg1'><query xmlns='jabber:iq:register'><remove/></query></iq>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        result("juliet@localhost/balcony", "unreg1")
    );
    assert_eq!(j.expect_stream_error().await.unwrap(), "not-authorized");
    assert_eq!(other.expect_stream_error().await.unwrap(), "not-authorized");

    next_unordered(
        &mut r,
        &[
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribe'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost' type='unsubscribed'/>".into(),
            "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
                .into(),
            push(
                "romeo@localhost/orchard",
                4,
                "<item jid='juliet@localhost' subscription='to'/>",
            ),
            push(
                "romeo@localhost/orchard",
                5,
                "<item jid='juliet@localhost' subscription='none'/>",
            ),
        ],
    )
    .await;
    expect_nothing(&mut r).await;

    assert_eq!(login_error(&node, "juliet", PW).await, "not-authorized");
    // The account is gone for others too.
    assert_eq!(
        ask(
            &mut r,
            "<message to='juliet@localhost' id='m1' type='chat'><body>Juliet?</body></message>"
        )
        .await,
        format!(
            "<message to='romeo@localhost/orchard' from='juliet@localhost' id='m1' type='error'>{}</message>",
            error("cancel", "service-unavailable")
        )
    );
}

// ---------------------------------------------------------------------------------
// Persistence
// ---------------------------------------------------------------------------------

/// Everything a user stored survives a restart of the node: the roster with its
/// subscription states and version, pending subscription requests, offline messages,
/// the vCard, the blocklist and private XML.
#[tokio::test]
async fn user_data_survives_restart() {
    let first = node();
    let dir = first.data_dir();
    user_data_survives(first, || TestNode::builder().data_dir(dir).start()).await;
}

/// The same with the Redis backend. The second node gets a fresh data directory, so
/// all it serves comes from Redis, and Redis itself is killed and restarted in
/// between (its append-only file is what keeps the data).
#[tokio::test]
async fn user_data_survives_restart_on_redis() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let on_redis = |b: TestNodeBuilder| {
        b.set("storage.backend", "redis")
            .set("storage.redis_url", &url)
    };
    let first = users(on_redis(TestNode::builder())).start();
    user_data_survives(first, || {
        redis.restart();
        on_redis(TestNode::builder()).start()
    })
    .await;
}

/// Stores one of everything through `first`, stops it, and checks that the node
/// `restart` starts serves all of it.
async fn user_data_survives(first: TestNode, restart: impl FnOnce() -> TestNode) {
    {
        let mut r = online(&first, "romeo", "orchard").await;
        let mut j = online(&first, "juliet", "balcony").await;
        befriend(&mut r, &mut j).await;
        let me = "juliet@localhost/balcony";

        let set = "<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='tybalt@localhost' name='Tybalt'><group>Cousins</group></item></query></iq>";
        let item = "<item jid='tybalt@localhost' name='Tybalt' subscription='none'><group>Cousins</group></item>";
        j.send(set).await.unwrap();
        next_unordered(&mut j, &[push(me, 4, item), result(me, "s1")]).await;
        // Setting the same item again changes nothing, so there is no new version and
        // nothing to push (RFC 6121 §2.6: a version names one roster content).
        j.send(set).await.unwrap();
        assert_eq!(next(&mut j).await, result(me, "s1"));
        assert_eq!(
            get_roster(&mut j, "r1").await,
            format!(
                "<iq to='{me}' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='4'><item jid='romeo@localhost' subscription='both'/>{item}</query></iq>"
            )
        );

        assert_eq!(
            ask(
                &mut j,
                "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard></iq>"
            )
            .await,
            result(me, "v1")
        );
        assert_eq!(
            ask(&mut j, "<iq type='set' id='p1'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><nick>Jules</nick></prefs></query></iq>").await,
            result(me, "p1")
        );
        // This session never asked for the blocklist, so it gets no push (XEP-0191 §3.3).
        assert_eq!(
            ask(&mut j, "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'><item jid='tybalt@localhost'/></block></iq>").await,
            result(me, "b1")
        );

        j.close().await.unwrap();
        j.expect_eof().await.unwrap();
        assert_eq!(
            next(&mut r).await,
            "<presence to='romeo@localhost' from='juliet@localhost/balcony' type='unavailable'/>"
        );
        // Stored while she is offline; the vCard get that follows it through her
        // account's storage queue proves it was written before the node stops.
        r.send("<message to='juliet@localhost' id='off1' type='chat'><body>Sleep well</body></message>")
            .await
            .unwrap();
        // A subscription request to the nurse, who never logged in.
        r.send("<presence to='nurse@localhost' type='subscribe'/>")
            .await
            .unwrap();
        assert_eq!(
            next(&mut r).await,
            push(
                "romeo@localhost/orchard",
                4,
                "<item ask='subscribe' jid='nurse@localhost' subscription='none'/>"
            )
        );
        assert_eq!(
            ask(
                &mut r,
                "<iq to='juliet@localhost' type='get' id='vj'><vCard xmlns='vcard-temp'/></iq>"
            )
            .await,
            "<iq to='romeo@localhost/orchard' from='juliet@localhost' id='vj' type='result'><vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard></iq>"
        );
        assert_eq!(
            ask(
                &mut r,
                "<iq to='nurse@localhost' type='get' id='vn'><vCard xmlns='vcard-temp'/></iq>"
            )
            .await,
            "<iq to='romeo@localhost/orchard' from='nurse@localhost' id='vn' type='result'><vCard xmlns='vcard-temp'/></iq>"
        );
    }
    first.stop();

    let second = restart();
    let mut j = login(&second, "juliet", "balcony").await;
    let me = "juliet@localhost/balcony";
    // The cached version is still current...
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='r2'><query xmlns='jabber:iq:roster' ver='4'/></iq>"
        )
        .await,
        result(me, "r2")
    );
    // ...and the roster is what it was.
    assert_eq!(
        get_roster(&mut j, "r3").await,
        format!(
            "<iq to='{me}' id='r3' type='result'><query xmlns='jabber:iq:roster' ver='4'><item jid='romeo@localhost' subscription='both'/><item jid='tybalt@localhost' name='Tybalt' subscription='none'><group>Cousins</group></item></query></iq>"
        )
    );
    // Initial presence: her own broadcast, Romeo's server answering her probe for him
    // (he is offline), and the stored message.
    j.send("<presence/>").await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let s = next(&mut j).await;
        got.push(if s.starts_with("<message") {
            redact_stamp(&s)
        } else {
            s
        });
    }
    got.sort();
    let mut want = vec![
        "<presence from='juliet@localhost/balcony'/>".to_string(),
        "<presence to='juliet@localhost' from='romeo@localhost' type='unavailable'/>".into(),
        format!(
            "<message to='juliet@localhost' from='romeo@localhost/orchard' id='off1' type='chat'><body>Sleep well</body>{DELAY}</message>"
        ),
    ];
    want.sort();
    assert_eq!(got, want);

    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='v2'><vCard xmlns='vcard-temp'/></iq>"
        )
        .await,
        format!(
            "<iq to='{me}' id='v2' type='result'><vCard xmlns='vcard-temp'><FN>Juliet</FN></vCard></iq>"
        )
    );
    assert_eq!(
        ask(&mut j, "<iq type='get' id='p2'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>").await,
        format!("<iq to='{me}' id='p2' type='result'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><nick>Jules</nick></prefs></query></iq>")
    );
    assert_eq!(
        ask(
            &mut j,
            "<iq type='get' id='bl'><blocklist xmlns='urn:xmpp:blocking'/></iq>"
        )
        .await,
        format!(
            "<iq to='{me}' id='bl' type='result'><blocklist xmlns='urn:xmpp:blocking'><item jid='tybalt@localhost'/></blocklist></iq>"
        )
    );

    // Romeo's roster, with the pending request, and the request itself at the nurse's
    // first login.
    let mut r = login(&second, "romeo", "orchard").await;
    assert_eq!(
        get_roster(&mut r, "r4").await,
        "<iq to='romeo@localhost/orchard' id='r4' type='result'><query xmlns='jabber:iq:roster' ver='4'><item jid='juliet@localhost' subscription='both'/><item ask='subscribe' jid='nurse@localhost' subscription='none'/></query></iq>"
    );
    let mut n = login(&second, "nurse", "kitchen").await;
    n.send("<presence/>").await.unwrap();
    assert_eq!(
        next(&mut n).await,
        "<presence from='nurse@localhost/kitchen'/>"
    );
    assert_eq!(
        next(&mut n).await,
        "<presence to='nurse@localhost' from='romeo@localhost' type='subscribe'/>"
    );
}

/// An account removal the store refuses (Redis is down) is answered with
/// `<internal-server-error/>` and undone: once the store is back the account, its
/// roster and its session are as they were.
#[tokio::test]
async fn failed_account_removal_keeps_the_account() {
    let mut redis = RedisServer::start();
    let node = users(
        TestNode::builder()
            .set("storage.backend", "redis")
            .set("storage.redis_url", redis.url()),
    )
    .start();
    let mut r = online(&node, "romeo", "orchard").await;
    let mut j = online(&node, "juliet", "balcony").await;
    befriend(&mut r, &mut j).await;
    // A vCard set is answered after it is stored, and juliet's writes are stored in
    // order: once it is answered, the handshake's roster writes have landed too.
    assert_eq!(
        ask(
            &mut j,
            "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>J</FN></vCard></iq>"
        )
        .await,
        result("juliet@localhost/balcony", "v1")
    );
    let roster = "<iq to='juliet@localhost/balcony' id='r1' type='result'><query xmlns='jabber:iq:roster' ver='3'><item jid='romeo@localhost' subscription='both'/></query></iq>";

    redis.kill();
    assert_eq!(
        ask(
            &mut j,
            "<iq type='set' id='unreg1'><query xmlns='jabber:iq:register'><remove/></query></iq>"
        )
        .await,
        format!(
            "<iq to='juliet@localhost/balcony' id='unreg1' type='error'>{}</iq>",
            error("cancel", "internal-server-error")
        )
    );
    redis.restart();
    // The account is served as stored again: same roster, same session.
    // Until the account is read again, a roster request finds nothing to answer from.
    let mut answer = None;
    for _ in 0..50 {
        j.send("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
            .await
            .unwrap();
        answer = j.recv_within(QUIET).await.unwrap();
        if answer.is_some() {
            break;
        }
    }
    match answer {
        Some(Received::Stanza(st)) => assert_eq!(st.to_xml(), roster),
        other => panic!("no roster: {other:?}"),
    }
    login(&node, "juliet", "phone").await;
}
