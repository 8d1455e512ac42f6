//! The node's defences against slow, silent, hostile and greedy clients, each checked
//! against a real node over real TCP (and TLS where the flow needs it).
//!
//! Every test that feeds a node bad input finishes by logging in a fresh client and
//! pinging, so a defence that "works" by wedging the node is caught.
//!
//! Tests in this file run in parallel threads of one process. Metrics are process-wide,
//! so a test only asserts on a metric no other test moves. The two tests that measure
//! the process itself (file descriptors, resident memory) hold [`PROCESS`] exclusively;
//! every other test holds it shared.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::bail;
use shoal_tests::client::WAIT;
use shoal_tests::{Client, ClientReader, Received, TestNode, TestNodeBuilder, eventually};
use shoal_xmpp::ns;
use shoal_xmpp::sasl::ScramHash;
use shoal_xmpp::stream::initial_header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::RwLock;

const DOMAIN: &str = "localhost";
const USER: &str = "alice";
const PASSWORD: &str = "secret";

/// Shared by ordinary tests, held alone by tests that measure the whole process.
static PROCESS: RwLock<()> = RwLock::const_new(());

/// A second loopback address, for "another client" in per-address limit tests.
const OTHER_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn node() -> TestNodeBuilder {
    TestNode::builder().user(USER, PASSWORD)
}

async fn login(node: &TestNode) -> Client {
    Client::login(node.c2s, DOMAIN, node.cert_path(), USER, PASSWORD, None)
        .await
        .expect("login")
}

/// A fresh client can still log in and get an answer: the node survived.
async fn assert_serving(node: &TestNode) {
    let mut c = login(node).await;
    c.ping().await.expect("a fresh client's ping");
}

/// Our stream header, as a raw string.
fn header() -> String {
    initial_header(ns::CLIENT, DOMAIN)
}

/// Sends `bytes` on a new plain connection and returns the stream error it earns.
async fn stream_error_for(node: &TestNode, bytes: &[u8]) -> String {
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    c.send_raw(bytes).await.unwrap();
    c.expect_stream_error().await.unwrap()
}

/// Sends `bytes` on a new plain connection right behind a valid stream header (one
/// write), and returns the stream error that follows the server's header and features.
async fn stream_error_after_header(node: &TestNode, bytes: &[u8]) -> String {
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    let mut all = header().into_bytes();
    all.extend_from_slice(bytes);
    c.send_raw(all).await.unwrap();
    let r = c.recv().await.unwrap();
    assert!(matches!(r, Received::Header(_)), "got {r:?}");
    match c.recv().await.unwrap() {
        Received::Element(e) if e.is("features", ns::STREAM) => {}
        other => panic!("expected the stream features, got {other:?}"),
    }
    c.expect_stream_error().await.unwrap()
}

/// The open file descriptors of this process.
fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    kib * 1024
}

/// Resets the peak resident set size (`VmHWM`) to the current one; false if the kernel
/// refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------
// Timeouts

#[tokio::test]
async fn silent_socket_is_closed_after_the_negotiation_timeout() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.negotiation_timeout_secs", 1).start();
    let start = Instant::now();
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    // The server opens its side of the stream so that it can send the error.
    assert!(
        matches!(c.recv().await.unwrap(), Received::Header(_)),
        "the server's header comes first"
    );
    assert_eq!(c.expect_stream_error().await.unwrap(), "connection-timeout");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn client_that_never_authenticates_is_closed_after_the_negotiation_timeout() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.negotiation_timeout_secs", 1).start();
    let start = Instant::now();
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    let features = c.open().await.unwrap();
    assert!(features.get_child("mechanisms", ns::SASL).is_some());
    // Now say nothing more: the timeout runs from the TCP accept, over TLS too.
    assert_eq!(c.expect_stream_error().await.unwrap(), "connection-timeout");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn stalled_tls_handshakes_are_closed_after_the_negotiation_timeout() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.negotiation_timeout_secs", 1).start();
    // STARTTLS accepted, then no ClientHello: there is no stream to send an error on,
    // so the socket just closes.
    let start = Instant::now();
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    c.open().await.unwrap();
    c.send_raw(format!("<starttls xmlns='{}'/>", ns::TLS))
        .await
        .unwrap();
    match c.recv().await.unwrap() {
        Received::Element(e) if e.is("proceed", ns::TLS) => {}
        other => panic!("expected <proceed/>, got {other:?}"),
    }
    assert_eq!(c.recv().await.unwrap(), Received::Eof);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    // A silent socket on the direct TLS listener.
    let start = Instant::now();
    let mut tcp = TcpStream::connect(node.direct_tls.expect("direct TLS listener"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(n, 0, "nothing but the close");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn idle_bound_session_is_closed_after_the_idle_timeout() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.idle_timeout_secs", 1).start();
    let mut c = login(&node).await;
    let bound = Instant::now();
    assert_eq!(c.expect_stream_error().await.unwrap(), "connection-timeout");
    let elapsed = bound.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}, expected about 1 s"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn traffic_keeps_a_session_past_the_idle_timeout() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.idle_timeout_secs", 1).start();
    let mut c = login(&node).await;
    // Whitespace keepalives (RFC 6120 §4.6.1) every 300 ms for 2.5 s: well past the
    // timeout, never idle for a second.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        c.send_raw(" ").await.unwrap();
        let r = c.recv_within(Duration::from_millis(300)).await.unwrap();
        assert!(r.is_none(), "the session was closed: {r:?}");
    }
    c.ping().await.expect("an active session stays open");
}

// ---------------------------------------------------------------------------------------
// Slow consumers and resource use

/// What B's reader saw while B flooded A.
struct Drained {
    reader: ClientReader,
    /// Message bounces (`resource-constraint` while A's mailbox was full,
    /// `service-unavailable` once A was gone).
    bounces: usize,
}

/// Reads B's stream until the answer to the iq `done_id`; anything but message bounces
/// and that answer (a stream error, the stream closing) fails the test.
async fn drain_until(mut reader: ClientReader, done_id: &str) -> anyhow::Result<Drained> {
    let mut bounces = 0;
    loop {
        let Some(r) = reader.recv_within(Duration::from_secs(60)).await? else {
            bail!("B's stream went silent for 60 s");
        };
        match r {
            Received::Stanza(s) if s.id.as_deref() == Some(done_id) => {
                return Ok(Drained { reader, bounces });
            }
            Received::Stanza(s) if is_message_bounce(&s.to_xml()) => bounces += 1,
            other => bail!("B received something unexpected during the flood: {other:?}"),
        }
    }
}

fn is_message_bounce(xml: &str) -> bool {
    xml.starts_with("<message") && xml.contains("type='error'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_client_is_disconnected_and_memory_stays_bounded() {
    const MESSAGES: usize = 20_000;
    const BATCH: usize = 50;
    let _alone = PROCESS.write().await;
    let node = node()
        .user("bob", PASSWORD)
        .set("c2s.outbound_buffer_max", 262_144)
        .start();
    let slow = "shoal_slow_consumer_disconnects_total";
    let slow_before = node.metric(slow);
    // A logs in and then never reads.
    let mut a = login(&node).await;
    let a_jid = a.jid.clone().unwrap();
    let b = Client::login(node.c2s, DOMAIN, node.cert_path(), "bob", PASSWORD, None)
        .await
        .unwrap();
    let rss_before = proc_status_bytes("VmRSS");
    let peak_tracked = reset_peak_rss();

    let (reader, mut writer) = b.split().unwrap();
    let drain = tokio::spawn(drain_until(reader, "flood-done"));
    let body = "x".repeat(2000);
    let mut sent = 0usize;
    let mut chunk = String::with_capacity(BATCH * 2200);
    for batch in 0..MESSAGES / BATCH {
        chunk.clear();
        for i in 0..BATCH {
            write!(
                chunk,
                "<message to='{a_jid}' id='f{batch}-{i}' type='chat'><body>{body}</body></message>"
            )
            .unwrap();
        }
        sent += chunk.len();
        writer
            .send_raw(&chunk)
            .await
            .expect("B is never disconnected");
    }
    writer
        .send_raw(format!(
            "<iq to='{DOMAIN}' id='flood-done' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await
        .unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(120), drain)
        .await
        .expect("B's reader finished")
        .unwrap()
        .expect("B's stream stayed healthy during the flood");
    assert!(sent >= 40_000_000, "B sent only {sent} bytes");

    let growth = proc_status_bytes("VmRSS").saturating_sub(rss_before);
    assert!(
        growth < 64 << 20,
        "resident memory grew by {} MiB while B sent {} MB to a client that does not read",
        growth >> 20,
        sent / 1_000_000
    );
    // Not just at the end: at no point during the flood.
    let peak_growth = if peak_tracked {
        proc_status_bytes("VmHWM").saturating_sub(rss_before)
    } else {
        growth
    };
    assert!(
        peak_growth < 64 << 20,
        "resident memory peaked {} MiB above the start while B sent {} MB",
        peak_growth >> 20,
        sent / 1_000_000
    );

    eventually(WAIT, "A disconnected as a slow consumer", || {
        node.metric(slow) > slow_before
    })
    .await;

    // A finally reads: what was in flight, then the end of the connection.
    a.expect_closed()
        .await
        .expect("A's connection was closed by the server");

    // B was never disconnected and still works. Late bounces may still be queued ahead
    // of the ping's answer.
    let mut b = drained.reader.unsplit(writer);
    b.send(&format!(
        "<iq to='{DOMAIN}' id='after' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await
    .unwrap();
    let mut late_bounces = 0;
    loop {
        let st = b.recv_stanza().await.unwrap();
        if st.id.as_deref() == Some("after") {
            assert!(st.to_xml().contains("type='result'"), "{}", st.to_xml());
            break;
        }
        assert!(is_message_bounce(&st.to_xml()), "{}", st.to_xml());
        late_bounces += 1;
    }
    tracing::info!(
        bounces = drained.bounces + late_bounces,
        growth_mib = growth >> 20,
        peak_growth_mib = peak_growth >> 20,
        "flood done"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn connection_churn_leaves_no_descriptors_behind() {
    const CYCLES: usize = 1000;
    let _alone = PROCESS.write().await;
    let node = node().start();
    // Warm up whatever the node opens lazily.
    assert_serving(&node).await;
    // Nothing else runs now, so the process-wide gauges are this node's (a count left
    // by an earlier test's node can only go down meanwhile).
    let open_gauges = [
        r#"shoal_c2s_connections{listener="starttls"}"#,
        r#"shoal_c2s_connections{listener="direct_tls"}"#,
    ];
    let open_before = open_gauges.map(|g| node.metric(g));
    let baseline = fd_count();
    let direct_tls = node.direct_tls.expect("direct TLS listener");
    let header = header();
    let starttls = format!("{header}<starttls xmlns='{}'/>", ns::TLS);
    for i in 0..CYCLES {
        let addr = if i % 5 == 4 { direct_tls } else { node.c2s };
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        match i % 5 {
            // Connect and close at once (on both listeners).
            0 | 4 => {}
            1 => tcp.write_all(header.as_bytes()).await.unwrap(),
            2 => tcp.write_all(b"\x00\xff<<garbage&;>").await.unwrap(),
            // Ask for TLS, then vanish before the handshake.
            _ => tcp.write_all(starttls.as_bytes()).await.unwrap(),
        }
        drop(tcp);
    }
    let mut now = 0;
    let waited = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            now = fd_count();
            if now <= baseline + 5 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{now} descriptors open after {CYCLES} connections, {baseline} before"
    );
    eventually(WAIT, "every churned connection is counted closed", || {
        open_gauges
            .iter()
            .zip(open_before)
            .all(|(g, before)| node.metric(g) <= before)
    })
    .await;
    assert_serving(&node).await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.max_connections", 3).start();
    let rejected = r#"shoal_c2s_connections_rejected_total{reason="too_many_connections"}"#;
    let before = node.metric(rejected);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
        c.open().await.expect("below the cap");
        held.push(c);
    }
    let mut over = Client::connect(node.c2s, DOMAIN).await.unwrap();
    assert_eq!(over.recv().await.unwrap(), Received::Eof);
    assert_eq!(node.metric(rejected), before + 1.0);
    // Every slot given back is usable again: close them all, then log in.
    for c in &mut held {
        c.close().await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Received::StreamClose);
        assert_eq!(c.recv().await.unwrap(), Received::Eof);
    }
    // The server counts a connection closed once its task has finished, just after the
    // socket closes; until then a new connection may still be refused.
    let deadline = Instant::now() + WAIT;
    let mut c = loop {
        let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
        match c.negotiate(node.cert_path(), USER, PASSWORD, None).await {
            Ok(_) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "still at the cap");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no connection admitted after closing all: {e:#}"),
        }
    };
    c.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Bad input: each on a fresh connection, each with its exact RFC 6120 stream error.

#[tokio::test]
async fn oversized_stanza_is_a_policy_violation() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.max_stanza_size", 4096).start();
    let mut c = login(&node).await;
    let body = "y".repeat(10 * 1024);
    c.send(&format!(
        "<message to='bob@{DOMAIN}' type='chat'><body>{body}</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(c.expect_stream_error().await.unwrap(), "policy-violation");
    // The limit covers what is not yet a frame: a stream header that never ends.
    let endless = format!(
        "<stream:stream xmlns='{}' {}",
        ns::CLIENT,
        "a".repeat(10 * 1024)
    );
    assert_eq!(
        stream_error_for(&node, endless.as_bytes()).await,
        "policy-violation"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn stanza_just_under_the_size_limit_is_accepted() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.max_stanza_size", 4096).start();
    let mut c = login(&node).await;
    let jid = c.jid.clone().unwrap();
    let envelope = format!("<message to='{jid}' id='big' type='chat'><body></body></message>");
    let body = "z".repeat(4000 - envelope.len());
    c.send(&format!(
        "<message to='{jid}' id='big' type='chat'><body>{body}</body></message>"
    ))
    .await
    .unwrap();
    let echo = c.recv_stanza().await.unwrap();
    assert_eq!(echo.id.as_deref(), Some("big"));
    c.ping().await.unwrap();
}

#[tokio::test]
async fn deep_nesting_is_a_policy_violation() {
    let _shared = PROCESS.read().await;
    let node = node().set("c2s.max_depth", 5).start();
    let mut c = login(&node).await;
    let depth = 50;
    let open: String = (0..depth).map(|_| "<x>").collect();
    let close: String = (0..depth).map(|_| "</x>").collect();
    c.send(&format!(
        "<message to='bob@{DOMAIN}'><body>{open}{close}</body></message>"
    ))
    .await
    .unwrap();
    assert_eq!(c.expect_stream_error().await.unwrap(), "policy-violation");
    // Before authentication, too.
    let nested: String = (0..depth).map(|_| "<a>").collect();
    assert_eq!(
        stream_error_after_header(&node, nested.as_bytes()).await,
        "policy-violation"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn comment_is_restricted_xml() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    assert_eq!(
        stream_error_after_header(&node, b"<!-- hello -->").await,
        "restricted-xml"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn processing_instruction_is_restricted_xml() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    assert_eq!(
        stream_error_after_header(&node, b"<?evil data?>").await,
        "restricted-xml"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn doctype_is_restricted_xml() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let doc = format!(
        "<?xml version='1.0'?><!DOCTYPE lol [<!ENTITY lol 'lol'>]>{}",
        header().trim_start_matches("<?xml version='1.0'?>")
    );
    assert_eq!(
        stream_error_for(&node, doc.as_bytes()).await,
        "restricted-xml"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn entity_reference_is_restricted_xml() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    assert_eq!(
        stream_error_after_header(
            &node,
            format!("<message to='bob@{DOMAIN}'><body>&xxe;</body></message>").as_bytes()
        )
        .await,
        "restricted-xml"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn invalid_utf8_is_not_well_formed() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    assert_eq!(
        stream_error_after_header(
            &node,
            b"<message to='bob@localhost'><body>\xc3\x28\xff</body></message>"
        )
        .await,
        "not-well-formed"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn mismatched_tags_are_not_well_formed() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    assert_eq!(
        stream_error_after_header(
            &node,
            format!("<message to='bob@{DOMAIN}'><body>hi</message></body>").as_bytes()
        )
        .await,
        "not-well-formed"
    );
    // After login, on the session's own path.
    let mut c = login(&node).await;
    c.send(&format!(
        "<message to='bob@{DOMAIN}'><body>hi</message></body>"
    ))
    .await
    .unwrap();
    assert_eq!(c.expect_stream_error().await.unwrap(), "not-well-formed");
    assert_serving(&node).await;
}

#[tokio::test]
async fn wrong_stream_namespace_is_invalid_namespace() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let bad = format!(
        "<stream:stream xmlns='{}' xmlns:stream='http://example.com/not-streams' to='{DOMAIN}' version='1.0'>",
        ns::CLIENT
    );
    assert_eq!(
        stream_error_for(&node, bad.as_bytes()).await,
        "invalid-namespace"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn unknown_host_is_host_unknown() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let bad = initial_header(ns::CLIENT, "elsewhere.example");
    assert_eq!(
        stream_error_for(&node, bad.as_bytes()).await,
        "host-unknown"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn stanza_before_authentication_is_not_authorized() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let message = format!("<message to='bob@{DOMAIN}' type='chat'><body>hi</body></message>");
    // On the plaintext stream.
    assert_eq!(
        stream_error_after_header(&node, message.as_bytes()).await,
        "not-authorized"
    );
    // And after TLS, while SASL is offered.
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    c.open().await.unwrap();
    c.send(&message).await.unwrap();
    assert_eq!(c.expect_stream_error().await.unwrap(), "not-authorized");
    assert_serving(&node).await;
}

#[tokio::test]
async fn starttls_command_injection_is_a_policy_violation() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    let features = c.open().await.unwrap();
    assert!(features.get_child("starttls", ns::TLS).is_some());
    // <starttls/> with the next stream already pipelined behind it, in one write.
    c.send_raw(format!("<starttls xmlns='{}'/>{}", ns::TLS, header()))
        .await
        .unwrap();
    // No <proceed/>: the refusal comes in plaintext, and the stream ends.
    let r = c.recv().await.unwrap();
    assert_eq!(
        r.stream_error().as_deref(),
        Some("policy-violation"),
        "got {r:?}"
    );
    let end = c.recv().await.unwrap();
    assert!(
        matches!(end, Received::StreamClose | Received::Eof),
        "got {end:?}"
    );
    assert_serving(&node).await;
}

#[tokio::test]
async fn old_stream_version_is_unsupported_version() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let old = format!(
        "<stream:stream xmlns='{}' xmlns:stream='{}' to='{DOMAIN}' version='0.9'>",
        ns::CLIENT,
        ns::STREAM
    );
    assert_eq!(
        stream_error_for(&node, old.as_bytes()).await,
        "unsupported-version"
    );
    assert_serving(&node).await;
}

// ---------------------------------------------------------------------------------------
// Rate limits

#[tokio::test]
async fn connections_beyond_the_per_address_rate_are_refused() {
    let _shared = PROCESS.read().await;
    let node = node()
        .set("limits.connections_per_ip_per_minute", 5)
        .start();
    let rejected = r#"shoal_c2s_connections_rejected_total{reason="rate_limited"}"#;
    let before = node.metric(rejected);
    let mut admitted = Vec::new();
    for _ in 0..5 {
        let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
        c.open().await.expect("within the budget");
        admitted.push(c);
    }
    for n in 6..=8 {
        let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
        // Refused before any byte: no stream header, just the end of the socket.
        let r = c.recv().await.unwrap();
        assert_eq!(r, Received::Eof, "connection {n}");
    }
    assert_eq!(node.metric(rejected), before + 3.0);
    // The admitted connections are unaffected.
    for c in &mut admitted {
        c.close().await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Received::StreamClose);
    }
    // The limit is per address: another address logs in and pings.
    let mut other = Client::connect_from(node.c2s, DOMAIN, OTHER_ADDRESS)
        .await
        .unwrap();
    other
        .negotiate(node.cert_path(), USER, PASSWORD, None)
        .await
        .unwrap();
    other.ping().await.unwrap();
}

/// A wrong-password SCRAM attempt on a new connection from `from`.
async fn wrong_password(node: &TestNode, from: IpAddr) -> Client {
    Client::wrong_password_from(node.c2s, DOMAIN, node.cert_path(), USER, from)
        .await
        .unwrap()
}

#[tokio::test]
async fn repeated_auth_failures_from_one_address_are_a_policy_violation() {
    let _shared = PROCESS.read().await;
    let node = node()
        .set("limits.auth_failures_per_ip_per_minute", 2)
        .start();
    let here = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // One failure per connection, so the per-stream attempt limit never applies.
    for _ in 0..2 {
        let mut c = wrong_password(&node, here).await;
        // Within the budget the stream stays open for another try.
        c.close().await.unwrap();
        assert_eq!(c.recv().await.unwrap(), Received::StreamClose);
    }
    for _ in 0..2 {
        let mut c = wrong_password(&node, here).await;
        assert_eq!(c.expect_stream_error().await.unwrap(), "policy-violation");
    }
    // Another address has its own budget.
    let mut c = wrong_password(&node, OTHER_ADDRESS).await;
    c.close().await.unwrap();
    assert_eq!(c.recv().await.unwrap(), Received::StreamClose);
    // Only failures count: the right password still works from the limited address.
    assert_serving(&node).await;
}

#[tokio::test]
async fn repeated_auth_failures_on_one_stream_are_a_policy_violation() {
    let _shared = PROCESS.read().await;
    // No per-address limit: only the per-stream attempt limit applies.
    let node = node().start();
    let mut c = Client::connect(node.c2s, DOMAIN).await.unwrap();
    c.open().await.unwrap();
    c.starttls(node.cert_path()).await.unwrap();
    c.open().await.unwrap();
    for _ in 0..3 {
        let err = c
            .auth_scram(ScramHash::Sha256, USER, "wrong")
            .await
            .expect_err("a wrong password fails");
        assert_eq!(err.to_string(), "not-authorized");
    }
    assert_eq!(c.expect_stream_error().await.unwrap(), "policy-violation");
    assert_serving(&node).await;
}

// ---------------------------------------------------------------------------------------
// Traffic shaping

/// Sends about 64 KB of pings and messages to itself in one go after login and returns
/// how long the last answer took.
async fn time_to_answer_64k(node: &TestNode) -> Duration {
    const MESSAGES: usize = 40;
    const PINGS: usize = 300;
    let mut c = login(node).await;
    let jid = c.jid.clone().unwrap();
    let body = "m".repeat(1000);
    let mut load = String::new();
    for i in 0..PINGS {
        write!(
            load,
            "<iq to='{DOMAIN}' id='p{i}' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
        )
        .unwrap();
        if i % (PINGS / MESSAGES) == 0 {
            write!(
                load,
                "<message to='{jid}' id='m{i}' type='chat'><body>{body}</body></message>"
            )
            .unwrap();
        }
    }
    assert!(load.len() >= 60_000, "only {} bytes", load.len());
    let start = Instant::now();
    c.send_raw(&load).await.unwrap();
    let (mut pongs, mut echoes) = (0, 0);
    while pongs < PINGS || echoes < MESSAGES {
        let st = c.recv_stanza().await.unwrap();
        match st.id.as_deref() {
            Some(id) if id.starts_with('p') => pongs += 1,
            Some(id) if id.starts_with('m') => echoes += 1,
            _ => panic!("unexpected {}", st.to_xml()),
        }
    }
    start.elapsed()
}

#[tokio::test]
async fn read_shaping_slows_a_fast_sender() {
    let _shared = PROCESS.read().await;
    let unshaped = {
        let node = node().start();
        time_to_answer_64k(&node).await
    };
    let node = node()
        .set("c2s.read_rate_bytes_per_sec", 20_000)
        .set("c2s.read_burst_bytes", 4096)
        .start();
    let shaped = time_to_answer_64k(&node).await;
    tracing::info!(?shaped, ?unshaped, "shaping");
    // About (64 KB - burst - one read) / 20 KB/s ≈ 2.7 s at least.
    assert!(
        shaped >= Duration::from_secs(2),
        "shaped: {shaped:?} (unshaped: {unshaped:?})"
    );
    assert!(
        shaped > unshaped + Duration::from_millis(500),
        "shaped: {shaped:?}, unshaped: {unshaped:?}"
    );
    assert_serving(&node).await;
}

// ---------------------------------------------------------------------------------------
// Shutdown

#[tokio::test]
async fn graceful_shutdown_closes_streams_with_system_shutdown() {
    let _shared = PROCESS.read().await;
    let node = node().start();
    let mut bound = login(&node).await;
    let mut negotiating = Client::connect(node.c2s, DOMAIN).await.unwrap();
    negotiating.open().await.unwrap();
    // What `/readyz` answers from now until the node is gone, each change once.
    let admin = node.admin;
    let ready = (200, "ready".to_owned());
    assert_eq!(
        shoal_tests::node::http_get(admin, "/readyz").unwrap(),
        ready
    );
    let readiness = std::thread::spawn(move || {
        let mut seen: Vec<(u16, String)> = Vec::new();
        while let Ok(answer) = shoal_tests::node::http_get(admin, "/readyz") {
            if seen.last() != Some(&answer) {
                seen.push(answer);
            }
        }
        seen
    });
    // `stop` joins the node's thread, so it runs off this runtime while we read.
    let stopping = tokio::task::spawn_blocking(move || node.stop());
    assert_eq!(
        bound.expect_stream_error().await.unwrap(),
        "system-shutdown"
    );
    assert_eq!(
        negotiating.expect_stream_error().await.unwrap(),
        "system-shutdown"
    );
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the node stopped in time")
        .expect("the node stopped cleanly");
    // Draining, the node said it was not ready (a load balancer stops sending clients)
    // until it was gone.
    let seen = readiness.join().unwrap();
    let draining = (503, "not ready: listeners".to_owned());
    assert!(
        seen == [draining.clone()] || seen == [ready, draining],
        "{seen:?}"
    );
}
