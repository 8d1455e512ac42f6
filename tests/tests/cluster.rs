//! Several real nodes sharing a real `redis-server`, clients on different nodes: the
//! cluster acts as one server (RFC 6120 routing, RFC 6121 presence and subscriptions),
//! also while nodes leave, die and join.
//!
//! Accounts hash onto shards spread over the nodes, so with a handful of users on
//! different nodes every path is taken: session and owner on one node, owner on the
//! sender's node, on the recipient's, on a third.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shoal_tests::cluster::account_owned_by;
use shoal_tests::im::*;
use shoal_tests::{Client, ClientReader, ClientWriter, Received, TestCluster, eventually};
use tokio::task::JoinHandle;

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

/// Starts sending [`COUNT`] numbered chats from `writer` to `to`, one every 50 ms (open
/// loop: the pacing is the load, not a wait for anything), and returns once the first
/// ten are out, so that what the test does next happens under traffic. The task hands
/// the writer back.
async fn start_traffic(mut writer: ClientWriter, to: String) -> JoinHandle<ClientWriter> {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let task = tokio::spawn(async move {
        for i in 0..COUNT {
            writer.send_raw(chat(&to, &format!("m{i}"))).await.unwrap();
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writer
    });
    eventually(Duration::from_secs(10), "traffic under way", || {
        sent.load(Ordering::Relaxed) >= 10
    })
    .await;
    task
}

/// Reads until `count` numbered chats arrived; returns their numbers in arrival order
/// and every other stanza received meanwhile.
async fn receive_numbered(reader: &mut ClientReader, count: usize) -> (Vec<usize>, Vec<String>) {
    let (mut numbers, mut others) = (Vec::new(), Vec::new());
    while numbers.len() < count {
        let got = reader
            .recv_within(Duration::from_secs(20))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("only {numbers:?} arrived; also got {others:?}"));
        let Received::Stanza(st) = got else {
            panic!("not a stanza: {got:?}");
        };
        let xml = st.to_xml();
        match xml
            .split_once("<body>m")
            .and_then(|(_, rest)| rest.split_once("</body>"))
        {
            Some((n, _)) => numbers.push(n.parse().unwrap()),
            None => others.push(xml),
        }
    }
    (numbers, others)
}

/// Chats sent in the departure scenarios.
const COUNT: usize = 60;

/// The setting of the departure scenarios: three nodes; `to`, an account node2 owns,
/// online on node0 (split for reading) and befriended with nurse, online on node2;
/// romeo, on node1, sends [`COUNT`] numbered chats to `to` ([`start_traffic`]).
struct Departure {
    cluster: TestCluster,
    reader: ClientReader,
    writer: ClientWriter,
    nurse: Client,
    nurse_full: String,
    to: String,
    traffic: JoinHandle<ClientWriter>,
    _romeo: ClientReader,
}

async fn departure_under_traffic() -> Departure {
    let owned = account_owned_by(2, 3, "owned", "localhost");
    let mut users: Vec<(&str, &str)> = USERS.to_vec();
    users.push((&owned, PW));
    let cluster = TestCluster::start(3, &users);
    cluster.settled().await;
    let mut receiver = online(cluster.node(0), &owned, "desk").await;
    let mut nurse = online(cluster.node(2), "nurse", "ward").await;
    befriend(&mut receiver, &mut nurse).await;
    let nurse_full = jid(&nurse);
    let sender = online(cluster.node(1), "romeo", "r").await;
    let (reader, writer) = receiver.split().unwrap();
    let (romeo, sender_writer) = sender.split().unwrap();
    let to = format!("{owned}@localhost");
    let traffic = start_traffic(sender_writer, to.clone()).await;
    Departure {
        cluster,
        reader,
        writer,
        nurse,
        nurse_full,
        to,
        traffic,
        _romeo: romeo,
    }
}

impl Departure {
    /// Every chat arrives once (and, when `ordered`, in order), and besides them only
    /// nurse's unavailable presence (her node is gone).
    async fn nothing_lost(&mut self, ordered: bool) {
        let (mut numbers, mut others) = receive_numbered(&mut self.reader, COUNT).await;
        if !ordered {
            numbers.sort();
        }
        assert_eq!(numbers, (0..COUNT).collect::<Vec<_>>(), "all, once");
        let unavailable = format!(
            "<presence to='{}' from='{}' type='unavailable'/>",
            self.to, self.nurse_full
        );
        while !others.contains(&unavailable) {
            match self.reader.recv().await.unwrap() {
                Received::Stanza(st) => others.push(st.to_xml()),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(others, [unavailable]);
    }
}

/// A killed node: the account owned by it moves to a survivor (lease expiry), messages
/// between users on the surviving nodes keep flowing without loss or duplicates, the
/// contacts of the session that lived on it see it go unavailable (the purge of its
/// sessions), and messages to that now offline user are stored and delivered at its
/// next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_loses_no_message_between_survivors() {
    let mut d = departure_under_traffic().await;
    let mut cluster = d.cluster;
    d.cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(2);
        cluster
    })
    .await
    .unwrap();
    // Order is guaranteed across a graceful leave (below); across a crash the tests
    // once saw a stanza overtake ones in flight at the time (one cause is fixed), so
    // here only loss and duplicates are asserted.
    d.nothing_lost(false).await;
    d.traffic.await.unwrap();
    d.cluster.settled().await;

    // nurse is offline now: a chat to her is stored, and delivered when she returns.
    let mut receiver = d.reader.unsplit(d.writer);
    receiver
        .send(&chat("nurse@localhost", "are you there"))
        .await
        .unwrap();
    expect_nothing(&mut receiver).await;
    let mut nurse = login(d.cluster.node(0), "nurse", "ward").await;
    nurse.send("<presence/>").await.unwrap();
    let mut got = Vec::new();
    while !got.iter().any(|x: &String| x.contains("are you there")) {
        got.push(next(&mut nurse).await);
    }
    let stored = got.last().unwrap();
    assert!(
        stored.starts_with(&format!(
            "<message to='nurse@localhost' from='{}' type='chat'><body>are you there</body><delay xmlns='urn:xmpp:delay' from='localhost' stamp='",
            jid(&receiver)
        )),
        "{stored}"
    );
}

/// A graceful leave loses nothing at all: the account the leaving node owned moves to a
/// survivor while chats to it flow, every chat arrives once and in order, and the
/// session on the leaving node is closed with `<system-shutdown/>` and seen going
/// unavailable by its contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_loses_nothing() {
    let mut d = departure_under_traffic().await;
    let mut cluster = d.cluster;
    let stopping = tokio::task::spawn_blocking(move || {
        cluster.stop(2);
        cluster
    });
    assert_eq!(
        d.nurse.expect_stream_error().await.unwrap(),
        "system-shutdown"
    );
    d.cluster = stopping.await.unwrap();
    d.nothing_lost(true).await;
    d.traffic.await.unwrap();
    d.cluster.settled().await;
    // The account is served by a survivor now.
    let mut receiver = d.reader.unsplit(d.writer);
    receiver.ping().await.unwrap();
}

/// A node joining while chats flow takes its share of the shards (the account it is the
/// target of moves to it by handoff) and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_node_takes_its_shards_while_traffic_flows() {
    let owned = account_owned_by(2, 3, "owned", "localhost");
    let mut users: Vec<(&str, &str)> = USERS.to_vec();
    users.push((&owned, PW));
    let mut cluster = TestCluster::start(2, &users);
    cluster.settled().await;

    let receiver = online(cluster.node(0), &owned, "desk").await;
    let sender = online(cluster.node(1), "romeo", "r").await;
    let (mut reader, _writer) = receiver.split().unwrap();
    let (_sender_reader, sender_writer) = sender.split().unwrap();
    let traffic = start_traffic(sender_writer, format!("{owned}@localhost")).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.add_node();
        cluster
    })
    .await
    .unwrap();
    let (numbers, others) = receive_numbered(&mut reader, COUNT).await;
    assert_eq!(
        numbers,
        (0..COUNT).collect::<Vec<_>>(),
        "all, once, in order"
    );
    assert_eq!(others, Vec::<String>::new());
    traffic.await.unwrap();
    cluster.settled().await;
    let shards = cluster
        .node(2)
        .metric(r#"shoal_cluster_shards_owned{node="node2"}"#);
    assert!(shards > 0.0, "the new node owns shards ({shards})");
}

/// Redis restarts (an outage longer than the lease TTL, data kept by its append-only
/// file): the nodes stop serving while they cannot renew, then rejoin, claim the shards
/// again, reattach the sessions that stayed connected, and chat and presence work as
/// before with the rosters intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_recovers_after_redis_restart() {
    let mut cluster = TestCluster::start(2, USERS);
    cluster.settled().await;
    let mut juliet = online(cluster.node(0), "juliet", "balcony").await;
    let mut romeo = online(cluster.node(1), "romeo", "orchard").await;
    befriend(&mut juliet, &mut romeo).await;

    cluster.redis.kill();
    // The fault itself, not a wait for a condition: an outage longer than a lease, so
    // that every lease lapses.
    tokio::time::sleep(shoal_tests::cluster::LEASE_TTL * 2).await;
    cluster.redis.restart();
    cluster.settled().await;

    let (j, r) = (jid(&juliet), jid(&romeo));
    let (j_bare, r_bare) = (bare(&juliet), bare(&romeo));
    romeo.send(&chat(&j_bare, "still there?")).await.unwrap();
    assert_eq!(
        next(&mut juliet).await,
        format!(
            "<message to='{j_bare}' from='{r}' type='chat'><body>still there?</body></message>"
        )
    );
    juliet
        .send("<presence><status>back</status></presence>")
        .await
        .unwrap();
    let mut got = Vec::new();
    let want = format!("<presence to='{r_bare}' from='{j}'><status>back</status></presence>");
    while !got.contains(&want) {
        got.push(next(&mut romeo).await);
    }
    assert_eq!(got, [want], "nothing else reached romeo");
}

/// The same full JID bound on two nodes: the older session gets the `<conflict/>`
/// stream error (RFC 6120 §7.7.2.2), its contacts see it go, and the new one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_resource_on_two_nodes_conflicts() {
    let cluster = TestCluster::start(2, USERS);
    cluster.settled().await;
    let mut romeo = online(cluster.node(1), "romeo", "orchard").await;
    let mut old = online(cluster.node(0), "juliet", "balcony").await;
    befriend(&mut old, &mut romeo).await;
    let mut new = login(cluster.node(1), "juliet", "balcony").await;
    assert_eq!(old.expect_stream_error().await.unwrap(), "conflict");
    let (full, r_bare) = (jid(&new), bare(&romeo));
    assert_eq!(
        next(&mut romeo).await,
        format!("<presence to='{r_bare}' from='{full}' type='unavailable'/>")
    );
    new.ping().await.unwrap();
    romeo.send(&chat(&full, "which one?")).await.unwrap();
    assert_eq!(
        next(&mut new).await,
        format!(
            "<message to='{full}' from='{}' type='chat'><body>which one?</body></message>",
            jid(&romeo)
        )
    );
}

/// `a` and `b` subscribe to each other (RFC 6121 §3.1, checked in full by
/// [`befriend`]); returns once each has the other's available presence, with the
/// stanzas of the handshake read.
async fn mutual_subscription(a: &mut Client, b: &mut Client) {
    let (a_full, b_full) = (jid(a), jid(b));
    let (a_bare, b_bare) = (bare(a), bare(b));
    for (x, y_bare) in [(&mut *a, &b_bare), (&mut *b, &a_bare)] {
        x.send(&format!("<presence to='{y_bare}' type='subscribe'/>"))
            .await
            .unwrap();
    }
    for (x, y_bare) in [(&mut *a, &b_bare), (&mut *b, &a_bare)] {
        let mut seen = next(x).await;
        while !(seen.starts_with("<presence") && seen.contains("type='subscribe'")) {
            seen = next(x).await;
        }
        x.send(&format!("<presence to='{y_bare}' type='subscribed'/>"))
            .await
            .unwrap();
    }
    for (x, y_full) in [(a, &b_full), (b, &a_full)] {
        let want = format!("from='{y_full}'/>");
        while !next(x).await.ends_with(&want) {}
        // The roster pushes of the handshake, in no fixed order around the presence.
        while x.recv_within(QUIET).await.unwrap().is_some() {}
    }
}

/// A presence change of a user whose contacts' accounts live on another node reaches
/// each contact exactly once (the node gets the stanza once with the recipient list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_fans_out_to_contacts_owned_by_another_node() {
    // The hub's account lives on node0, its contacts' on node1.
    let hub = account_owned_by(0, 2, "hub", "localhost");
    let contacts: Vec<String> = (0..3)
        .map(|i| account_owned_by(1, 2, &format!("friend{i}x"), "localhost"))
        .collect();
    let mut users: Vec<(&str, &str)> = vec![(&hub, PW)];
    users.extend(contacts.iter().map(|c| (c.as_str(), PW)));
    let cluster = TestCluster::start(2, &users);
    cluster.settled().await;
    let mut juliet = online(cluster.node(0), &hub, "balcony").await;
    let mut friends = Vec::new();
    for c in &contacts {
        let mut f = online(cluster.node(0), c, "home").await;
        mutual_subscription(&mut juliet, &mut f).await;
        friends.push(f);
    }
    let full = jid(&juliet);
    juliet
        .send("<presence><show>dnd</show></presence>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut juliet).await,
        format!("<presence from='{full}'><show>dnd</show></presence>")
    );
    for f in &mut friends {
        let me = bare(f);
        assert_eq!(
            next(f).await,
            format!("<presence to='{me}' from='{full}'><show>dnd</show></presence>")
        );
        expect_nothing(f).await;
    }
}

/// Carbons and blocking with an account's two resources on two nodes and its state on
/// a third: what one resource turns on (carbons, a block) takes effect on the other
/// node at once (XEP-0280 §6, §7; XEP-0191 §3.3, §3.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carbons_and_blocking_across_nodes() {
    let owned = account_owned_by(2, 3, "owned", "localhost");
    let mut users: Vec<(&str, &str)> = USERS.to_vec();
    users.push((&owned, PW));
    let cluster = TestCluster::start(3, &users);
    cluster.settled().await;
    let mut r = login(cluster.node(2), "romeo", "orchard").await;
    let mut a = login(cluster.node(0), &owned, "a").await;
    let mut b = login(cluster.node(1), &owned, "b").await;
    let (a_full, b_full, me) = (jid(&a), jid(&b), bare(&a));
    assert_eq!(
        ask(&mut a, "<presence/>").await,
        format!("<presence from='{a_full}'/>")
    );
    b.send("<presence/>").await.unwrap();
    next_unordered(
        &mut b,
        &[
            format!("<presence from='{b_full}'/>"),
            format!("<presence to='{b_full}' from='{a_full}'/>"),
        ],
    )
    .await;
    assert_eq!(next(&mut a).await, format!("<presence from='{b_full}'/>"));
    assert_eq!(
        ask(
            &mut a,
            "<iq type='set' id='c1'><enable xmlns='urn:xmpp:carbons:2'/></iq>"
        )
        .await,
        format!("<iq to='{a_full}' id='c1' type='result'/>")
    );

    // Received: a chat to b is copied to a.
    r.send(&format!(
        "<message to='{b_full}' id='m1' type='chat'><body>To b</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(
        next(&mut b).await,
        format!(
            "<message to='{b_full}' from='romeo@localhost/orchard' id='m1' type='chat'><body>To b</body></message>"
        )
    );
    assert_eq!(
        next(&mut a).await,
        format!(
            "<message to='{a_full}' from='{me}' type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='{b_full}' from='romeo@localhost/orchard' id='m1' type='chat'><body>To b</body></message></forwarded></received></message>"
        )
    );

    // Sent: b's node learned that a wants carbons, so what b sends is copied too.
    b.send(
        "<message to='romeo@localhost/orchard' id='m2' type='chat'><body>From b</body></message>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        format!(
            "<message to='romeo@localhost/orchard' from='{b_full}' id='m2' type='chat'><body>From b</body></message>"
        )
    );
    assert_eq!(
        next(&mut a).await,
        format!(
            "<message to='{a_full}' from='{me}' type='chat'><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' to='romeo@localhost/orchard' from='{b_full}' id='m2' type='chat'><body>From b</body></message></forwarded></sent></message>"
        )
    );

    // a blocks romeo; b, on another node, is refused at once when writing to him.
    assert_eq!(
        ask(
            &mut a,
            "<iq type='set' id='bl1'><block xmlns='urn:xmpp:blocking'><item jid='romeo@localhost'/></block></iq>"
        )
        .await,
        format!("<iq to='{a_full}' id='bl1' type='result'/>")
    );
    let mut refused = false;
    for i in 0..20 {
        b.send(&format!(
            "<message to='romeo@localhost' id='x{i}' type='chat'><body>hi</body></message>"
        ))
        .await
        .unwrap();
        match b.recv_within(QUIET).await.unwrap() {
            Some(Received::Stanza(got)) => {
                assert_eq!(
                    got.to_xml(),
                    format!(
                        "<message to='{b_full}' from='romeo@localhost' id='x{i}' type='error'><error type='cancel'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><blocked xmlns='urn:xmpp:blocking:errors'/></error></message>"
                    )
                );
                refused = true;
                break;
            }
            Some(other) => panic!("unexpected {other:?}"),
            // Either the block was still on its way to b's node and the chat went
            // out (with a's carbon), or the refusal is merely slow.
            // (A stanza can wait up to a lease TTL while a shard is handed over.)
            None => match r.recv_within(Duration::from_secs(8)).await.unwrap() {
                Some(Received::Stanza(st)) => {
                    assert!(st.to_xml().contains(&format!("id='x{i}'")));
                    assert!(next(&mut a).await.contains("<sent"));
                }
                other => {
                    assert_eq!(other, None, "romeo got something else");
                    assert!(next(&mut b).await.contains("<blocked"));
                    refused = true;
                    break;
                }
            },
        }
    }
    assert!(refused, "the block reached b's node");
}
