//! Several real nodes sharing a real `redis-server`, clients on different nodes: the
//! cluster acts as one server (RFC 6120 routing, RFC 6121 presence and subscriptions),
//! also while nodes leave, die and join.
//!
//! Accounts hash onto shards spread over the nodes, so with a handful of users on
//! different nodes every path is taken: session and owner on one node, owner on the
//! sender's node, on the recipient's, on a third.

use shoal_tests::im::*;
use shoal_tests::{Client, TestCluster};

const USERS: &[(&str, &str)] = &[
    ("juliet", PW),
    ("romeo", PW),
    ("nurse", PW),
    ("benvolio", PW),
    ("mercutio", PW),
    ("tybalt", PW),
];

/// A chat message from `from` to the bare JID `to` with `body`.
fn chat(to: &str, body: &str) -> String {
    format!("<message to='{to}' type='chat'><body>{body}</body></message>")
}

fn bare(c: &Client) -> String {
    c.jid.as_ref().expect("bound").to_bare().to_string()
}

/// Every user online on node `i % nodes`, then each sends a chat to the next one: each
/// message arrives exactly once, from the right full JID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_chat() {
    let cluster = TestCluster::start(3, USERS);
    cluster.settled().await;
    let mut clients = Vec::new();
    for (i, (user, _)) in USERS.iter().enumerate() {
        clients.push(online(cluster.node(i % 3), user, "phone").await);
    }
    let n = clients.len();
    for i in 0..n {
        let to = bare(&clients[(i + 1) % n]);
        clients[i]
            .send(&chat(&to, &format!("hello {i}")))
            .await
            .unwrap();
    }
    for i in 0..n {
        let from = jid(&clients[(i + n - 1) % n]);
        let me = bare(&clients[i]);
        assert_eq!(
            next(&mut clients[i]).await,
            format!(
                "<message to='{me}' from='{from}' type='chat'><body>hello {}</body></message>",
                (i + n - 1) % n
            )
        );
    }
    for c in &mut clients {
        expect_nothing(c).await;
    }
}

/// RFC 6121 §3.1 between users on different nodes, then presence both ways, then the
/// unavailable presence when one logs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_and_presence_across_nodes() {
    let cluster = TestCluster::start(2, USERS);
    cluster.settled().await;
    for (a, b) in [
        ("juliet", "romeo"),
        ("nurse", "benvolio"),
        ("mercutio", "tybalt"),
    ] {
        let mut ca = online(cluster.node(0), a, "home").await;
        let mut cb = online(cluster.node(1), b, "work").await;
        befriend(&mut ca, &mut cb).await;
        let (a_full, b_bare) = (jid(&ca), bare(&cb));
        ca.send("<presence><show>away</show></presence>")
            .await
            .unwrap();
        next_unordered(
            &mut ca,
            &[format!(
                "<presence from='{a_full}'><show>away</show></presence>"
            )],
        )
        .await;
        assert_eq!(
            next(&mut cb).await,
            format!("<presence to='{b_bare}' from='{a_full}'><show>away</show></presence>")
        );
        ca.close().await.unwrap();
        assert_eq!(
            next(&mut cb).await,
            format!("<presence to='{b_bare}' from='{a_full}' type='unavailable'/>")
        );
    }
}

/// One user with resources on three nodes: a message to the bare JID goes to the
/// highest priority (RFC 6121 §8.5.2.1.1), a message to a full JID to that resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_jid_messages_follow_priority_across_nodes() {
    let cluster = TestCluster::start(3, USERS);
    cluster.settled().await;
    let mut sender = online(cluster.node(0), "romeo", "r").await;
    let mut res = Vec::new();
    for (i, prio) in [(0usize, 1i8), (1, 5), (2, 3)] {
        let mut c = login(cluster.node(i), "juliet", &format!("dev{i}")).await;
        c.send(&format!("<presence><priority>{prio}</priority></presence>"))
            .await
            .unwrap();
        res.push(c);
    }
    // Every resource hears the available presence of all three (RFC 6121 §4.2.2 and
    // §4.4.2: own resources get the broadcast), in whatever order the nodes interleave.
    let all: Vec<String> = res.iter().map(jid).collect();
    for c in &mut res {
        let mut heard: Vec<String> = Vec::new();
        while !all.iter().all(|j| heard.contains(j)) {
            let st = c.recv_stanza().await.unwrap();
            assert!(st.to_xml().starts_with("<presence"), "{}", st.to_xml());
            heard.push(st.from.expect("from").to_string());
        }
    }
    let juliet = "juliet@localhost";
    sender.send(&chat(juliet, "to the highest")).await.unwrap();
    assert_eq!(
        next(&mut res[1]).await,
        format!(
            "<message to='{juliet}' from='{}' type='chat'><body>to the highest</body></message>",
            jid(&sender)
        )
    );
    expect_nothing(&mut res[0]).await;
    expect_nothing(&mut res[2]).await;
    sender
        .send(&format!(
            "<message to='{}' type='chat'><body>direct</body></message>",
            jid(&res[2])
        ))
        .await
        .unwrap();
    assert_eq!(
        next(&mut res[2]).await,
        format!(
            "<message to='{}' from='{}' type='chat'><body>direct</body></message>",
            jid(&res[2]),
            jid(&sender)
        )
    );
}
