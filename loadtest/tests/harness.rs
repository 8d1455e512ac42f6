//! Tests of the load generator itself: against a real in-process node it must see no
//! loss at a low rate, and against a fake server that drops and duplicates on purpose
//! it must count exactly what the server did.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Bytes, BytesMut};
use clap::Parser;
use shoal_loadtest::cli::Cli;
use shoal_loadtest::report::Report;
use shoal_tests::TestNode;
use shoal_xmpp::framer::{Frame, Framer, FramerLimits};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{Kind, TopLevel, parse_top_level};
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
    let mut builder = TestNode::builder();
    for i in 0..10 {
        builder = builder.user(&format!("load{i}"), "secret");
    }
    let node = builder.start();
    let server = node.c2s.to_string();
    let cert = node.cert_path().display().to_string();
    let common = [
        "--server",
        &server,
        "--domain",
        &node.domain,
        "--tls",
        "starttls",
        "--cafile",
        &cert,
        "--prefix",
        "load",
        "--password",
        "secret",
    ];

    let mut login = vec!["login", "--clients", "10", "--rate", "50"];
    login.extend_from_slice(&common);
    let r = run(&login).await;
    assert_eq!(r.login.succeeded, 10, "{}", r.human());
    assert_eq!(r.login.failed, 0);
    assert_eq!(r.login.auth.count, 10);
    assert_eq!(r.login.tls.expect("TLS timings").count, 10);
    assert!(r.login.total.p50_us >= r.login.auth.p50_us);

    let mut chat = vec![
        "chat",
        "--clients",
        "10",
        "--rate",
        "100",
        "--duration",
        "2",
        "--size",
        "100",
        "--mech",
        "scram-sha-1",
    ];
    chat.extend_from_slice(&common);
    let r = run(&chat).await;
    let c = &r.chat[0];
    assert_eq!(c.scheduled, 200, "{}", r.human());
    assert_eq!(c.sent, 200, "{}", r.human());
    assert_eq!(c.received, 200, "{}", r.human());
    assert_eq!((c.lost, c.duplicated, c.out_of_order), (0, 0, 0));
    assert_eq!(c.latency.count, 200);
    assert_eq!(r.disconnected, 0);

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
    let mut wrong = vec!["login", "--clients", "3"];
    wrong.extend_from_slice(&common[..10]);
    wrong.extend_from_slice(&["--password", "wrong"]);
    let r = run(&wrong).await;
    assert_eq!(r.login.failed, 3);
    assert_eq!(
        r.login.failures.0.get("sasl:not-authorized"),
        Some(&3),
        "{}",
        r.human()
    );

    // In-band registration, then a login with the new accounts.
    let mut reg = vec![
        "login",
        "--clients",
        "3",
        "--register",
        "--prefix",
        "fresh",
        "--password",
        "pw2",
    ];
    reg.extend_from_slice(&common[..8]);
    let r = run(&reg).await;
    let created = r.registration.as_ref().expect("registration report");
    assert_eq!(
        (created.created, created.existing, created.failed),
        (3, 0, 0)
    );
    assert_eq!(r.login.succeeded, 3, "{}", r.human());
}

/// What the fake server did to the messages it routed.
#[derive(Default)]
struct FakeStats {
    /// Messages received from senders, numbered from 1 in arrival order.
    seen: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
}

type Registry = Arc<Mutex<HashMap<String, mpsc::Sender<Bytes>>>>;

/// A minimal plaintext XMPP server: PLAIN accepts anyone, bind answers `user@localhost/
/// fake`, and messages are routed by bare `to`, except that every 10th message overall
/// is dropped and every 7th (that is not dropped) is delivered twice.
async fn start_fake_server() -> (SocketAddr, Arc<FakeStats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(FakeStats::default());
    let registry: Registry = Default::default();
    let s = stats.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(fake_session(stream, registry.clone(), s.clone()));
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

async fn fake_session(stream: tokio::net::TcpStream, registry: Registry, stats: Arc<FakeStats>) {
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
    registry.lock().await.insert(bare, tx);
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if write.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    while let Some(frame) = input.next().await {
        let Frame::Element(bytes) = frame else { break };
        let Ok(TopLevel::Stanza(st)) = parse_top_level(&bytes, NsContext::CLIENT) else {
            continue;
        };
        if !matches!(st.kind, Kind::Message(_)) {
            continue;
        }
        let n = stats.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(10) {
            stats.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let copies = if n.is_multiple_of(7) {
            stats.duplicated.fetch_add(1, Ordering::SeqCst);
            2
        } else {
            1
        };
        let to = st
            .to
            .as_ref()
            .map(|j| j.to_bare().to_string())
            .unwrap_or_default();
        let target = registry.lock().await.get(&to).cloned();
        if let Some(tx) = target {
            for _ in 0..copies {
                let _ = tx.send(bytes.clone()).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_exactly_the_losses_and_duplicates_a_server_causes() {
    let (addr, stats) = start_fake_server().await;
    let server = addr.to_string();
    let r = run(&[
        "chat",
        "--server",
        &server,
        "--tls",
        "none",
        "--mech",
        "plain",
        "--clients",
        "10",
        "--rate",
        "500",
        "--duration",
        "2",
        "--drain",
        "1",
        "--prefix",
        "u",
    ])
    .await;
    assert_eq!(r.login.succeeded, 10, "{}", r.human());
    let c = &r.chat[0];
    let seen = stats.seen.load(Ordering::SeqCst);
    let dropped = stats.dropped.load(Ordering::SeqCst);
    let duplicated = stats.duplicated.load(Ordering::SeqCst);
    assert_eq!(c.sent, 1000, "{}", r.human());
    assert_eq!(seen, c.sent);
    // The fake server did exactly what it promises...
    assert_eq!(dropped, seen / 10);
    assert_eq!(duplicated, seen / 7 - seen / 70);
    // ...and the generator counted exactly that.
    assert_eq!(c.lost, dropped, "{}", r.human());
    assert_eq!(c.duplicated, duplicated, "{}", r.human());
    assert_eq!(c.received, seen - dropped);
    assert_eq!(c.out_of_order, 0);
    assert_eq!(c.latency.count, c.received);
    assert!((c.loss_fraction - 0.1).abs() < 1e-9);
}
