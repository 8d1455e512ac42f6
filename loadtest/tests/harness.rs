//! Tests of the load generator itself: against a real in-process node it must see no
//! loss at a low rate, provision mutual rosters, count every presence delivery and fill
//! MUC rooms and count every groupchat delivery, and against a fake server that drops
//! and duplicates on purpose it must count exactly what the server did, for chat
//! messages, presence updates and groupchat messages alike.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Bytes, BytesMut};
use clap::Parser;
use shoal_loadtest::cli::Cli;
use shoal_loadtest::muc::NS_MUC_USER;
use shoal_loadtest::report::Report;
use shoal_loadtest::roster;
use shoal_loadtest::scenario::PhaseReport;
use shoal_tests::TestNode;
use shoal_tests::client::{Client, Received};
use shoal_xmpp::framer::{Frame, Framer, FramerLimits};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, MessageType, PresenceType, TopLevel, parse_top_level};
use shoal_xmpp::stream::response_header;
use shoal_xmpp::xml::NsContext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Mutex, mpsc};

async fn run(args: &[&str]) -> Report {
    let mut argv = vec!["shoal-load"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).expect("arguments parse");
    shoal_loadtest::run(cli.scenario).await.expect("run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_chat_against_a_real_node_lose_nothing() {
    let (node, common) = node_with_users(10);
    let cert = node.cert_path().display().to_string();

    let r = run_with(&["login", "--clients", "10", "--rate", "50"], &common).await;
    assert_eq!(r.login.succeeded, 10, "{}", r.human());
    assert_eq!(r.login.failed, 0);
    assert_eq!(r.login.auth.count, 10);
    assert_eq!(r.login.tls.expect("TLS timings").count, 10);
    assert!(r.login.total.p50_us >= r.login.auth.p50_us);

    let plot = std::env::temp_dir().join(format!("shoal-load-{}.svg", std::process::id()));
    let chat = [
        "chat",
        "--clients",
        "10",
        "--rate",
        "100",
        "--duration",
        "4",
        "--size",
        "100",
        "--mech",
        "scram-sha-1",
        "--plot",
        plot.to_str().unwrap(),
    ];
    let r = run_with(&chat, &common).await;
    let c = &r.chat[0];
    assert_eq!(c.scheduled, 400, "{}", r.human());
    assert_eq!(c.sent, 400, "{}", r.human());
    assert_eq!(c.received, 400, "{}", r.human());
    assert_eq!((c.lost, c.duplicated, c.out_of_order), (0, 0, 0));
    assert_eq!(c.latency.count, 400);
    assert_eq!(r.disconnected, 0);
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    let _ = std::fs::remove_file(&plot);
    assert_plot(&svg);

    // Direct TLS (XEP-0368) on the other port.
    let direct = node.direct_tls.expect("direct TLS listener").to_string();
    let r = run(&[
        "login",
        "--clients",
        "4",
        "--server",
        &direct,
        "--domain",
        &node.domain,
        "--tls",
        "direct",
        "--cafile",
        &cert,
        "--prefix",
        "load",
        "--password",
        "secret",
    ])
    .await;
    assert_eq!(r.login.succeeded, 4, "{}", r.human());

    // Failures are counted by reason.
    let wrong = ["login", "--clients", "3", "--password", "wrong"];
    let r = run_with(&wrong, &common[..10]).await;
    assert_eq!(r.login.failed, 3);
    assert_eq!(
        r.login.failures.0.get("sasl:not-authorized"),
        Some(&3),
        "{}",
        r.human()
    );

    // In-band registration, then a login with the new accounts.
    let reg = [
        "login",
        "--clients",
        "3",
        "--register",
        "--prefix",
        "fresh",
        "--password",
        "pw2",
    ];
    let r = run_with(&reg, &common[..8]).await;
    let created = r.registration.as_ref().expect("registration report");
    assert_eq!(
        (created.created, created.existing, created.failed),
        (3, 0, 0)
    );
    assert_eq!(r.login.succeeded, 3, "{}", r.human());
}

/// `svg` is well-formed XML rooted at `<svg>`, with the four series and their legends:
/// sent/s and received/s, p50 and p99, each a line of one point a second.
fn assert_plot(svg: &str) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(svg);
    let (mut root, mut depth) = (None, 0);
    let mut texts = Vec::new();
    // Points of each line drawn in a series colour (the plot's axes and ticks are black).
    let mut series = Vec::new();
    let colours = ["#1F77B4", "#2CA02C", "#D62728"];
    loop {
        match reader.read_event().expect("well-formed SVG") {
            Event::Start(e) => {
                root.get_or_insert_with(|| String::from_utf8_lossy(e.name().as_ref()).into_owned());
                depth += 1;
            }
            Event::End(_) => depth -= 1,
            Event::Empty(e) if e.name().as_ref() == b"polyline" => {
                let attr = |name: &str| {
                    e.try_get_attribute(name)
                        .unwrap()
                        .map(|a| a.unescape_value().unwrap().into_owned())
                        .unwrap_or_default()
                };
                if colours.contains(&attr("stroke").as_str()) {
                    series.push(attr("points").split_whitespace().count());
                }
            }
            Event::Text(t) => texts.push(t.unescape().unwrap().trim().to_owned()),
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(root.as_deref(), Some("svg"));
    assert_eq!(depth, 0, "every element closed");
    for label in ["sent/s", "received/s", "p50", "p99", "seconds", "ms"] {
        assert!(
            texts.iter().any(|t| t == label),
            "no {label:?} in {texts:?}"
        );
    }
    // Four data series of a point a second (4 s: at least 3 points each, whatever
    // the seconds' edges), and four 2-point legend samples.
    assert_eq!(series.len(), 8, "{series:?}");
    assert_eq!(series.iter().filter(|&&n| n >= 3).count(), 4, "{series:?}");
}

/// A TLS test node with users `load0..load{users-1}` (password `secret`), and the
/// shoal-load options that reach it.
fn node_with_users(users: usize) -> (TestNode, Vec<String>) {
    let mut builder = TestNode::builder();
    for i in 0..users {
        builder = builder.user(&format!("load{i}"), "secret");
    }
    let node = builder.start();
    let args = [
        "--server",
        &node.c2s.to_string(),
        "--domain",
        &node.domain,
        "--tls",
        "starttls",
        "--cafile",
        &node.cert_path().display().to_string(),
        "--prefix",
        "load",
        "--password",
        "secret",
    ]
    .map(String::from)
    .into();
    (node, args)
}

async fn run_with(args: &[&str], common: &[String]) -> Report {
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend(common.iter().map(String::as_str));
    run(&argv).await
}

/// `user`'s roster as a fresh session (never available, so it changes nothing) sees it.
async fn roster_of(node: &TestNode, user: &str) -> Vec<roster::RosterItem> {
    let mut c = Client::login(
        node.c2s,
        &node.domain,
        node.cert_path(),
        user,
        "secret",
        None,
    )
    .await
    .unwrap();
    c.send(&roster::roster_get("check")).await.unwrap();
    loop {
        if let Received::Stanza(s) = c.recv().await.unwrap()
            && s.id.as_deref() == Some("check")
        {
            return roster::parse_roster(&s).expect("a roster result");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rosters_then_presence_fan_out_counts_every_delivery() {
    let (node, common) = node_with_users(6);

    // Provisioning: 6 clients, 2 contacts each (i±1), all mutual.
    let r = run_with(&["rosters", "--clients", "6", "--contacts", "2"], &common).await;
    let p = r.rosters.as_ref().expect("rosters report");
    assert!(p.complete, "{}", r.human());
    assert_eq!((p.items_expected, p.items_missing), (12, 0));
    assert_eq!(p.items_present_before, 0);
    assert!(p.subscribe_sent >= 12, "{}", r.human());
    for (user, want) in [("load0", ["load1", "load5"]), ("load3", ["load2", "load4"])] {
        let mut items = roster_of(&node, user).await;
        items.sort_by(|a, b| a.jid.cmp(&b.jid));
        let jids: Vec<_> = items.iter().map(|i| i.jid.clone()).collect();
        let want: Vec<_> = want.map(|u| format!("{u}@{}", node.domain)).into();
        assert_eq!(jids, want, "{user}'s roster");
        assert!(items.iter().all(|i| i.both()), "{user}: {items:?}");
    }

    // Idempotent: a second run finds everything in place and sends nothing.
    let r = run_with(&["rosters", "--clients", "6", "--contacts", "2"], &common).await;
    let p = r.rosters.as_ref().unwrap();
    assert!(p.complete, "{}", r.human());
    assert_eq!(p.items_present_before, 12);
    assert_eq!((p.subscribe_sent, p.subscribed_sent), (0, 0));

    // 60 updates/s for 2 s from 6 clients: 120 updates, each to 2 contacts.
    let r = run_with(
        &[
            "presence",
            "--clients",
            "6",
            "--contacts",
            "2",
            "--rate",
            "60",
            "--duration",
            "2",
        ],
        &common,
    )
    .await;
    let settle = r.settle.as_ref().expect("settle report");
    assert!(settle.received >= settle.expected, "{}", r.human());
    assert_eq!(settle.expected, 12);
    let c = &r.presence[0];
    assert_eq!(
        (c.scheduled, c.sent, c.senders),
        (120, 120, 6),
        "{}",
        r.human()
    );
    assert_eq!((c.expected, c.received), (240, 240), "{}", r.human());
    assert_eq!(
        (c.lost, c.duplicated, c.out_of_order, c.unexpected),
        (0, 0, 0, 0)
    );
    assert_eq!(c.latency.count, 240);
    assert_eq!(r.disconnected, 0);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // A short day on the same rosters: 2 chat, 1 presence, 1 churn and 2 idle clients.
    let day = [
        "day",
        "--clients",
        "6",
        "--contacts",
        "2",
        "--duration",
        "3",
        "--ramp",
        "0.5",
        "--drain",
        "1",
        "--chat-rate",
        "4",
        "--presence-rate",
        "4",
        "--churn-every",
        "1",
    ];
    let r = run_with(&day, &common).await;
    let d = r.day.as_ref().expect("day report");
    let roles = (
        d.idle_clients,
        d.chat_clients,
        d.presence_clients,
        d.churn_clients,
    );
    assert_eq!(roles, (2, 2, 1, 1), "{}", r.human());
    assert!(d.churn.reconnects >= 2, "{}", r.human());
    assert_eq!(d.churn.failed, 0, "{}", r.human());
    assert_eq!(d.churn.reconnect.count, d.churn.reconnects);
    for (what, c) in [("chat", &r.chat[0]), ("presence", &r.presence[0])] {
        assert!(c.sent >= 10, "{what}: {}", r.human());
        assert!(c.received > 0, "{what}: {}", r.human());
        assert_eq!(
            (c.received, c.lost),
            (c.expected, 0),
            "{what}: {}",
            r.human()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muc_rooms_against_a_real_node_lose_nothing() {
    let (_node, common) = node_with_users(10);
    // 2 rooms of 5, 2 senders each: 60 messages/s for 2 s, each to 4 other occupants.
    let muc = [
        "muc",
        "--rooms",
        "2",
        "--occupants",
        "5",
        "--senders",
        "2",
        "--rate",
        "60",
        "--duration",
        "2",
        "--join-concurrency",
        "3",
    ];
    let r = run_with(&muc, &common).await;
    let m = r.muc.as_ref().expect("muc report");
    assert_eq!((m.joined, m.join_failed), (10, 0), "{}", r.human());
    assert_eq!((m.rooms_created, m.rooms_configured), (2, 2));
    assert_eq!(m.join_latency.count, 10);
    assert_eq!(m.senders, 2);
    // Every occupant told of every occupant, itself included.
    assert_eq!((m.presence.expected, m.presence.received), (50, 50));
    let (g, e) = (&r.groupchat[0], &r.echo[0]);
    assert_eq!(
        (g.scheduled, g.sent, g.senders),
        (120, 120, 4),
        "{}",
        r.human()
    );
    assert_eq!((g.expected, g.received), (480, 480), "{}", r.human());
    assert_eq!(
        (g.lost, g.duplicated, g.out_of_order, g.unexpected),
        (0, 0, 0, 0)
    );
    assert_eq!(g.latency.count, 480);
    assert_eq!(
        (e.expected, e.received, e.lost),
        (120, 120, 0),
        "{}",
        r.human()
    );
    assert_eq!(r.disconnected, 0);
    // This process also runs the node and the other tests, so its CPU is not the
    // generator's alone: the generator CPU warning says nothing here.
    let warnings: Vec<_> = r
        .warnings
        .iter()
        .filter(|w| !w.contains("the generator used"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// What the fake server did to the stanzas it routed.
#[derive(Default)]
struct FakeStats {
    /// Deliveries it had to make (one per message, one per contact of a presence
    /// update), numbered from 1 in order.
    seen: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
}

type Registry = Arc<Mutex<HashMap<String, mpsc::Sender<Bytes>>>>;

/// The fake's rosters: `Some((clients, contacts))` gives user `u{i}` the contacts
/// [`roster::contacts`] names, so presence updates fan out to them.
type Ring = Option<(usize, usize)>;

/// The fake's MUC rooms (on any domain), by bare JID: the occupants' bare JIDs, and
/// whether the room waits for its owner's configuration, refusing everyone else.
type Rooms = Arc<Mutex<HashMap<String, (Vec<String>, bool)>>>;

/// A minimal plaintext XMPP server: PLAIN accepts anyone, bind answers `user@localhost/
/// fake`, chat messages are routed by bare `to`, presence to the sender's ring contacts,
/// and groupchat messages to every occupant of the room they are sent to. Joining a room
/// (presence to `room/nick`) answers with the joiner's own presence only; a new room is
/// locked until its owner's configuration iq, as ejabberd and Prosody do. Of the probe
/// deliveries (messages, presence with a status; not a groupchat message's copy to its
/// sender), every 10th overall is dropped and every 7th (that is not dropped) is
/// delivered twice.
async fn start_fake_server(ring: Ring) -> (SocketAddr, Arc<FakeStats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(FakeStats::default());
    let registry: Registry = Default::default();
    let rooms: Rooms = Default::default();
    let s = stats.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = (registry.clone(), rooms.clone());
            tokio::spawn(fake_session(stream, shared, s.clone(), ring));
        }
    });
    (addr, stats)
}

struct Input {
    read: OwnedReadHalf,
    framer: Framer,
    buf: BytesMut,
}

impl Input {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            match self.framer.next_frame(&mut self.buf) {
                Ok(Some(Frame::Whitespace)) => continue,
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(_) => return None,
            }
            if self.read.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    async fn element(&mut self) -> Option<TopLevel> {
        match self.next().await? {
            Frame::Element(b) => parse_top_level(&b, NsContext::CLIENT).ok(),
            _ => None,
        }
    }
}

async fn fake_session(
    stream: tokio::net::TcpStream,
    (registry, rooms): (Registry, Rooms),
    stats: Arc<FakeStats>,
    ring: Ring,
) {
    let (read, mut write) = stream.into_split();
    let mut input = Input {
        read,
        framer: Framer::new(FramerLimits::default()),
        buf: BytesMut::new(),
    };
    let header = response_header(ns::CLIENT, "localhost", "fake", None);
    let sasl = format!(
        "<stream:features><mechanisms xmlns='{}'><mechanism>PLAIN</mechanism></mechanisms></stream:features>",
        ns::SASL
    );
    let Some(Frame::StreamOpen(_)) = input.next().await else {
        return;
    };
    write
        .write_all(format!("{header}{sasl}").as_bytes())
        .await
        .unwrap();
    let Some(TopLevel::Nonza(auth)) = input.element().await else {
        return;
    };
    let plain = B64.decode(auth.text_content().trim()).unwrap();
    let user = String::from_utf8(plain.split(|&b| b == 0).nth(1).unwrap().to_vec()).unwrap();
    write
        .write_all(format!("<success xmlns='{}'/>", ns::SASL).as_bytes())
        .await
        .unwrap();
    input.framer.reset();
    let Some(Frame::StreamOpen(_)) = input.next().await else {
        return;
    };
    write
        .write_all(
            format!(
                "{header}<stream:features><bind xmlns='{}'/></stream:features>",
                ns::BIND
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let Some(TopLevel::Stanza(bind)) = input.element().await else {
        return;
    };
    let bare = format!("{user}@localhost");
    write
        .write_all(
            format!(
                "<iq type='result' id='{}'><bind xmlns='{}'><jid>{bare}/fake</jid></bind></iq>",
                bind.id.as_deref().unwrap_or(""),
                ns::BIND
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Deliveries to this session go through one writer task.
    let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
    registry.lock().await.insert(bare.clone(), tx.clone());
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if write.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let contacts: Vec<String> = match ring {
        Some((n, k)) => {
            let i: usize = user.trim_start_matches('u').parse().unwrap();
            roster::contacts(i, n, k)
                .into_iter()
                .map(|j| format!("u{j}@localhost"))
                .collect()
        }
        None => Vec::new(),
    };
    while let Some(frame) = input.next().await {
        let Frame::Element(bytes) = frame else { break };
        let Ok(TopLevel::Stanza(st)) = parse_top_level(&bytes, NsContext::CLIENT) else {
            continue;
        };
        let to = st.to.as_ref().map(|j| j.to_bare().to_string());
        let targets = match (st.kind, &to) {
            (Kind::Message(MessageType::Groupchat), Some(room)) => {
                let occupants = rooms.lock().await.get(room).map(|r| r.0.clone());
                // The sender's own copy, faithfully.
                let _ = tx.send(bytes.clone()).await;
                let others = occupants.unwrap_or_default().into_iter();
                others.filter(|o| *o != bare).collect()
            }
            (Kind::Message(_), Some(to)) => vec![to.clone()],
            (Kind::Presence(PresenceType::Available), Some(room)) => {
                let answer = fake_join(&rooms, room, &bare).await;
                let _ = tx.send(Bytes::from(answer)).await;
                continue;
            }
            (Kind::Presence(PresenceType::Available), None) => contacts.clone(),
            (Kind::Iq(IqType::Set), Some(room)) => {
                // The owner's configuration unlocks the room.
                if let Some(r) = rooms.lock().await.get_mut(room) {
                    r.1 = false;
                }
                let id = st.id.as_deref().unwrap_or("");
                let result = format!("<iq type='result' id='{id}' from='{room}'/>");
                let _ = tx.send(Bytes::from(result)).await;
                continue;
            }
            _ => continue,
        };
        // Stamp the sender, as a server does; the generator only reads the payload.
        let delivered = match st.kind {
            Kind::Presence(_) => Bytes::from(format!(
                "<presence from='{user}@localhost/fake'>{}</presence>",
                std::str::from_utf8(&st.payload).unwrap()
            )),
            _ => bytes.clone(),
        };
        // Initial presence (no status) is routed faithfully; probes are not.
        let probe = !matches!(st.kind, Kind::Presence(_)) || !st.payload.is_empty();
        for to in targets {
            let mut copies = 1;
            if probe {
                let n = stats.seen.fetch_add(1, Ordering::SeqCst) + 1;
                if n.is_multiple_of(10) {
                    stats.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if n.is_multiple_of(7) {
                    stats.duplicated.fetch_add(1, Ordering::SeqCst);
                    copies = 2;
                }
            }
            let target = registry.lock().await.get(&to).cloned();
            if let Some(tx) = target {
                for _ in 0..copies {
                    let _ = tx.send(delivered.clone()).await;
                }
            }
        }
    }
}

/// `bare` joins `room` of the fake: the answer to send it, its own presence in the room
/// (110, and 201 when it created the room) or an error while the room is locked.
async fn fake_join(rooms: &Rooms, room: &str, bare: &str) -> String {
    let mut rooms = rooms.lock().await;
    let created = !rooms.contains_key(room);
    let (occupants, locked) = rooms.entry(room.to_owned()).or_insert((Vec::new(), true));
    if *locked && !created {
        return format!(
            "<presence type='error' from='{room}'><error type='cancel'><item-not-found xmlns='{}'/></error></presence>",
            ns::STANZA_ERRORS
        );
    }
    occupants.push(bare.to_owned());
    let new = if created { "<status code='201'/>" } else { "" };
    format!(
        "<presence from='{room}/{bare}'><x xmlns='{NS_MUC_USER}'><item affiliation='none' role='participant'/><status code='110'/>{new}</x></presence>"
    )
}

/// Runs `args` against a fake server with `ring`, 2 s of traffic; returns the report
/// and what the fake did.
async fn run_fake(ring: Ring, args: &[&str]) -> (Report, Arc<FakeStats>) {
    let (addr, stats) = start_fake_server(ring).await;
    let server = addr.to_string();
    let mut argv = args.to_vec();
    argv.extend_from_slice(&[
        "--server",
        &server,
        "--tls",
        "none",
        "--mech",
        "plain",
        "--duration",
        "2",
        "--drain",
        "1",
        "--prefix",
        "u",
    ]);
    (run(&argv).await, stats)
}

/// The fake server did exactly what it promises, and the generator counted exactly that.
fn assert_counted_what_the_fake_did(r: &Report, c: &PhaseReport, stats: &FakeStats) {
    let seen = stats.seen.load(Ordering::SeqCst);
    let dropped = stats.dropped.load(Ordering::SeqCst);
    let duplicated = stats.duplicated.load(Ordering::SeqCst);
    assert_eq!(seen, c.expected, "{}", r.human());
    assert_eq!(dropped, seen / 10);
    assert_eq!(duplicated, seen / 7 - seen / 70);
    assert_eq!(c.lost, dropped, "{}", r.human());
    assert_eq!(c.duplicated, duplicated, "{}", r.human());
    assert_eq!(c.received, seen - dropped);
    assert_eq!((c.out_of_order, c.unexpected), (0, 0));
    assert_eq!(c.latency.count, c.received);
    assert!((c.loss_fraction - 0.1).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_exactly_the_losses_and_duplicates_a_server_causes() {
    let (r, stats) = run_fake(None, &["chat", "--clients", "10", "--rate", "500"]).await;
    assert_eq!(r.login.succeeded, 10, "{}", r.human());
    let c = &r.chat[0];
    assert_eq!((c.sent, c.expected), (1000, 1000), "{}", r.human());
    assert_counted_what_the_fake_did(&r, c, &stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_exactly_the_presence_losses_and_duplicates_a_server_causes() {
    // 8 clients with 3 contacts each (i±1 and i+4): 200 updates/s for 2 s, each update
    // 3 deliveries.
    let args = [
        "presence",
        "--clients",
        "8",
        "--contacts",
        "3",
        "--rate",
        "200",
        "--settle",
        "2",
    ];
    let (r, stats) = run_fake(Some((8, 3)), &args).await;
    assert_eq!(r.login.succeeded, 8, "{}", r.human());
    let c = &r.presence[0];
    assert_eq!((c.sent, c.expected), (400, 1200), "{}", r.human());
    assert_counted_what_the_fake_did(&r, c, &stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_exactly_the_groupchat_losses_and_duplicates_a_server_causes() {
    // 2 rooms of 4, 2 senders each: 200 messages/s for 2 s, each to 3 other occupants,
    // and each back to its sender.
    let args = [
        "muc",
        "--rooms",
        "2",
        "--occupants",
        "4",
        "--senders",
        "2",
        "--rate",
        "200",
        "--timeout",
        "3",
    ];
    let (r, stats) = run_fake(None, &args).await;
    let m = r.muc.as_ref().expect("muc report");
    assert_eq!(
        (m.joined, m.rooms_created, m.rooms_configured),
        (8, 2, 2),
        "{}",
        r.human()
    );
    let c = &r.groupchat[0];
    assert_eq!((c.sent, c.expected), (400, 1200), "{}", r.human());
    assert_counted_what_the_fake_did(&r, c, &stats);
    let e = &r.echo[0];
    assert_eq!(
        (e.expected, e.received, e.lost, e.duplicated),
        (400, 400, 0, 0),
        "{}",
        r.human()
    );
}
