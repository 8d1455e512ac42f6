//! Instant-messaging steps shared by the end-to-end tests: log in, read the next
//! stanza, compare sets of stanzas, the RFC 6121 subscription handshake. Stanzas are
//! compared as whole XML strings.

use std::time::Duration;

use crate::{Client, TestNode, TestNodeBuilder};

/// The password of every test account.
pub const PW: &str = "pencil";

/// The three accounts most tests use: juliet, romeo and nurse, password [`PW`].
pub fn users(b: TestNodeBuilder) -> TestNodeBuilder {
    b.user("juliet", PW).user("romeo", PW).user("nurse", PW)
}

/// A node with the [`users`] accounts.
pub fn node() -> TestNode {
    users(TestNode::builder()).start()
}

/// How long a client must stay silent where "nothing arrives" is what is asserted.
pub const QUIET: Duration = Duration::from_millis(300);

/// STARTTLS, SCRAM-SHA-256, bind `resource`.
pub async fn login(node: &TestNode, user: &str, resource: &str) -> Client {
    login_with(node, user, PW, resource)
        .await
        .unwrap_or_else(|e| panic!("login {user}/{resource}: {e:#}"))
}

pub async fn login_with(
    node: &TestNode,
    user: &str,
    password: &str,
    resource: &str,
) -> anyhow::Result<Client> {
    Client::login(
        node.c2s,
        &node.domain,
        node.cert_path(),
        user,
        password,
        Some(resource),
    )
    .await
}

/// The next stanza, as XML.
pub async fn next(c: &mut Client) -> String {
    c.recv_stanza().await.unwrap().to_xml()
}

/// Sends `xml` and returns the next stanza.
pub async fn ask(c: &mut Client, xml: &str) -> String {
    c.send(xml).await.unwrap();
    next(c).await
}

/// Sends `xml` until the answer is `want` (state the server updates in the
/// background, such as the room directory), within `timeout`.
pub async fn ask_until(c: &mut Client, xml: &str, want: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = ask(c, xml).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {got}, not {want}"
        );
        tokio::time::sleep(crate::POLL).await;
    }
}

/// The next `expected.len()` stanzas, compared with `expected` regardless of order.
pub async fn next_unordered(c: &mut Client, expected: &[String]) {
    let mut got = Vec::with_capacity(expected.len());
    for _ in 0..expected.len() {
        got.push(next(c).await);
    }
    let mut want = expected.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// Asserts that nothing arrives within [`QUIET`].
pub async fn expect_nothing(c: &mut Client) {
    if let Some(r) = c.recv_within(QUIET).await.unwrap() {
        panic!("expected nothing, got {r:?}");
    }
}

pub fn jid(c: &Client) -> String {
    c.jid.as_ref().expect("bound").to_string()
}

/// A roster push (RFC 6121 §2.1.6) of `item` at version `ver` to `to`.
pub fn push(to: &str, ver: u64, item: &str) -> String {
    format!(
        "<iq to='{to}' id='push{ver}' type='set'><query xmlns='jabber:iq:roster' ver='{ver}'>{item}</query></iq>"
    )
}

/// Requests the roster, which also makes the session "interested" in roster pushes
/// (RFC 6121 §2.1.6); returns the answer.
pub async fn get_roster(c: &mut Client, id: &str) -> String {
    ask(
        c,
        &format!("<iq type='get' id='{id}'><query xmlns='jabber:iq:roster'/></iq>"),
    )
    .await
}

/// Logs in a user who has no contacts, no stored messages and no other available
/// resource, fetches the (empty) roster and sends initial presence; returns once the
/// presence has come back to the session itself.
pub async fn online(node: &TestNode, user: &str, resource: &str) -> Client {
    let mut c = login(node, user, resource).await;
    let me = jid(&c);
    assert_eq!(
        get_roster(&mut c, "roster").await,
        format!(
            "<iq to='{me}' id='roster' type='result'><query xmlns='jabber:iq:roster' ver='0'/></iq>"
        )
    );
    assert_eq!(
        ask(&mut c, "<presence/>").await,
        format!("<presence from='{me}'/>")
    );
    c
}

/// Sets up a mutual ("both") subscription between `a` and `b`, two online sessions
/// (see [`online`]) of users who have no roster items yet, asserting every stanza of
/// RFC 6121 §3.1 on both sides. Both rosters end at version 3.
pub async fn befriend(a: &mut Client, b: &mut Client) {
    let (a_full, b_full) = (jid(a), jid(b));
    let a_bare = a.jid.as_ref().unwrap().to_bare().to_string();
    let b_bare = b.jid.as_ref().unwrap().to_bare().to_string();

    // §3.1.2: a asks; its roster shows the pending request.
    a.send(&format!("<presence to='{b_bare}' type='subscribe'/>"))
        .await
        .unwrap();
    assert_eq!(
        next(a).await,
        push(
            &a_full,
            1,
            &format!("<item ask='subscribe' jid='{b_bare}' subscription='none'/>")
        )
    );
    // §3.1.3: b's server delivers the request with the bare JID of a; b has no item for
    // a yet (Appendix A.1: a request alone creates none).
    assert_eq!(
        next(b).await,
        format!("<presence to='{b_bare}' from='{a_bare}' type='subscribe'/>")
    );

    // §3.1.5: b approves; a becomes a "from" contact of b and gets b's presence.
    b.send(&format!("<presence to='{a_bare}' type='subscribed'/>"))
        .await
        .unwrap();
    assert_eq!(
        next(b).await,
        push(
            &b_full,
            1,
            &format!("<item jid='{a_bare}' subscription='from'/>")
        )
    );
    next_unordered(
        a,
        &[
            push(
                &a_full,
                2,
                &format!("<item jid='{b_bare}' subscription='to'/>"),
            ),
            format!("<presence to='{a_bare}' from='{b_bare}' type='subscribed'/>"),
            format!("<presence to='{a_bare}' from='{b_full}'/>"),
        ],
    )
    .await;

    // And the other way round.
    b.send(&format!("<presence to='{a_bare}' type='subscribe'/>"))
        .await
        .unwrap();
    assert_eq!(
        next(b).await,
        push(
            &b_full,
            2,
            &format!("<item ask='subscribe' jid='{a_bare}' subscription='from'/>")
        )
    );
    assert_eq!(
        next(a).await,
        format!("<presence to='{a_bare}' from='{b_bare}' type='subscribe'/>")
    );
    a.send(&format!("<presence to='{b_bare}' type='subscribed'/>"))
        .await
        .unwrap();
    assert_eq!(
        next(a).await,
        push(
            &a_full,
            3,
            &format!("<item jid='{b_bare}' subscription='both'/>")
        )
    );
    next_unordered(
        b,
        &[
            push(
                &b_full,
                3,
                &format!("<item jid='{a_bare}' subscription='both'/>"),
            ),
            format!("<presence to='{b_bare}' from='{a_bare}' type='subscribed'/>"),
            format!("<presence to='{b_bare}' from='{a_full}'/>"),
        ],
    )
    .await;
}
