//! A node behind a real HAProxy speaking the PROXY protocol (v1 and v2) to it: the
//! node must key everything on the client's address, not the proxy's. HAProxy connects
//! to the node from 127.0.0.1, the only trusted proxy address; the clients connect to
//! HAProxy from 127.0.0.2, 127.0.0.3 and 127.0.0.4.
//!
//! The tests of this file assert on process-wide metrics and logs, so they run one at
//! a time ([`SERIAL`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use shoal_tests::client::WAIT;
use shoal_tests::haproxy::{HaProxy, ProxyHeader};
use shoal_tests::{Client, LogCapture, Received, TestNode, TestNodeBuilder};
use shoal_xmpp::ns;
use shoal_xmpp::sasl::ScramHash;
use tokio::sync::Mutex;

const DOMAIN: &str = "localhost";
const USER: &str = "alice";
const PASSWORD: &str = "secret";

/// Where HAProxy (and the tests' own "proxy" connections) come from.
const PROXY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const CLIENT_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const CLIENT_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const CLIENT_C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
/// Not a trusted proxy.
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));

static SERIAL: Mutex<()> = Mutex::const_new(());

fn proxied_node() -> TestNodeBuilder {
    TestNode::builder()
        .user(USER, PASSWORD)
        .set("c2s.proxy_protocol", true)
        .set("c2s.proxy_trusted", "127.0.0.1")
        .set("c2s.proxy_header_timeout_secs", 1)
}

/// The sample of `shoal_proxy_headers_total` for the client listeners and `result`.
fn headers(result: &str) -> String {
    format!(r#"shoal_proxy_headers_total{{service="c2s",result="{result}"}}"#)
}

/// A wrong-password SCRAM attempt on a new connection to `addr` from `from`.
async fn wrong_password(node: &TestNode, addr: SocketAddr, from: IpAddr) -> Client {
    Client::wrong_password_from(addr, DOMAIN, node.cert_path(), USER, from)
        .await
        .unwrap()
}

/// The node closed the connection without sending a byte. A reset counts: the node
/// closes without reading what the client had sent.
async fn assert_closed_silently(c: &mut Client) {
    match c.recv().await {
        Ok(Received::Eof) => {}
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset) => {}
        other => panic!("expected the connection closed without a byte, got {other:?}"),
    }
}

#[tokio::test]
async fn clients_behind_haproxy_are_seen_with_their_own_addresses() {
    let _serial = SERIAL.lock().await;
    let logs = LogCapture::start();
    let node = proxied_node()
        .set("limits.connections_per_ip_per_minute", 2)
        .set("limits.auth_failures_per_ip_per_minute", 1)
        .start();
    let haproxy = HaProxy::start(&[
        (node.c2s, ProxyHeader::V2),
        (node.c2s, ProxyHeader::V1),
        (node.direct_tls.expect("direct TLS"), ProxyHeader::V2),
    ]);
    let [v2, v1, direct_tls] = haproxy.frontends[..] else {
        unreachable!("three routes")
    };
    let rate_limited = r#"shoal_c2s_connections_rejected_total{reason="rate_limited"}"#;
    let accepted_before = node.metric(&headers("accepted"));
    let rate_limited_before = node.metric(rate_limited);

    // A's first failed authentication is within its budget: the stream stays open.
    let mut a1 = wrong_password(&node, v2, CLIENT_A).await;
    let a1_addr = a1.local_addr().unwrap();
    a1.close().await.unwrap();
    assert_eq!(a1.recv().await.unwrap(), Received::StreamClose);
    // Its second, through the other frontend (a v1 header), is one too many from that
    // address. Were the node counting HAProxy's address, this would be the same.
    let mut a2 = wrong_password(&node, v1, CLIENT_A).await;
    let error = a2.expect_stream_error_element().await.unwrap();
    assert_eq!(
        error.to_xml(ns::STREAM),
        "<error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
         <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too many failed authentication \
         attempts from your address</text></error>"
    );
    // A third connection from A within the minute is refused before any byte; HAProxy
    // passes the close on.
    let mut a3 = Client::connect_from(v2, DOMAIN, CLIENT_A).await.unwrap();
    let a3_addr = a3.local_addr().unwrap();
    assert_eq!(a3.recv().await.unwrap(), Received::Eof);
    assert_eq!(node.metric(rate_limited), rate_limited_before + 1.0);

    // B arrives from the same proxy address with budgets of its own.
    let mut b = Client::connect_from(v1, DOMAIN, CLIENT_B).await.unwrap();
    b.negotiate(node.cert_path(), USER, PASSWORD, None)
        .await
        .unwrap();
    b.ping().await.unwrap();

    // Direct TLS passes through HAProxy untouched behind its header.
    let mut c = Client::connect_direct_tls_from(direct_tls, DOMAIN, node.cert_path(), CLIENT_C)
        .await
        .unwrap();
    let c_addr = c.local_addr().unwrap();
    c.open().await.unwrap();
    c.auth_scram(ScramHash::Sha256, USER, PASSWORD)
        .await
        .unwrap();
    c.open().await.unwrap();
    c.bind(None).await.unwrap();
    c.ping().await.unwrap();

    // Every connection came with a header: A's three, B's and C's.
    assert_eq!(node.metric(&headers("accepted")), accepted_before + 5.0);
    // The log lines of each connection name the client's own address and port.
    let line = logs
        .line_with(
            &[&format!("peer={a1_addr} "), "authentication failed"],
            WAIT,
        )
        .await;
    assert!(line.contains(r#"listener="starttls""#), "{line}");
    logs.line_with(
        &[&format!("peer={a3_addr}"), "connection rate limit exceeded"],
        WAIT,
    )
    .await;
    logs.line_with(
        &[&format!("source={c_addr} "), "PROXY header accepted"],
        WAIT,
    )
    .await;
    let line = logs
        .line_with(&[&format!("peer={c_addr} "), "authenticated"], WAIT)
        .await;
    assert!(line.contains(r#"listener="direct_tls""#), "{line}");
}

#[tokio::test]
async fn connections_that_bypass_the_proxy_are_closed() {
    let _serial = SERIAL.lock().await;
    let logs = LogCapture::start();
    let node = proxied_node().start();
    let invalid = node.metric(&headers("invalid"));
    let timeout = node.metric(&headers("timeout"));
    let rejected = node.metric(&headers("rejected"));

    // From the proxy's address, but XMPP where the header should be.
    let mut c = Client::connect_from(node.c2s, DOMAIN, PROXY).await.unwrap();
    let addr = c.local_addr().unwrap();
    c.send_raw("<?xml version='1.0'?><stream:stream to='localhost'")
        .await
        .unwrap();
    assert_closed_silently(&mut c).await;
    logs.line_with(
        &[
            &format!("peer={addr}"),
            "connection closed: no valid PROXY header",
            "the connection did not start with a PROXY header",
        ],
        WAIT,
    )
    .await;
    assert_eq!(node.metric(&headers("invalid")), invalid + 1.0);

    // A v1 header longer than the protocol allows.
    let mut c = Client::connect_from(node.c2s, DOMAIN, PROXY).await.unwrap();
    c.send_raw(format!("PROXY TCP4 {}", "1".repeat(200)))
        .await
        .unwrap();
    assert_closed_silently(&mut c).await;
    logs.line_with(&["the PROXY header is longer than 107 bytes"], WAIT)
        .await;
    assert_eq!(node.metric(&headers("invalid")), invalid + 2.0);

    // Nothing at all: closed after the header timeout (1 s).
    let mut c = Client::connect_from(node.c2s, DOMAIN, PROXY).await.unwrap();
    let addr = c.local_addr().unwrap();
    assert_closed_silently(&mut c).await;
    logs.line_with(
        &[
            &format!("peer={addr}"),
            "no PROXY header in time",
            "timeout=1s",
        ],
        WAIT,
    )
    .await;
    assert_eq!(node.metric(&headers("timeout")), timeout + 1.0);

    // A header from an address that is not a trusted proxy: nobody may claim to be
    // someone else.
    let mut c = Client::connect_from(node.c2s, DOMAIN, STRANGER)
        .await
        .unwrap();
    let addr = c.local_addr().unwrap();
    c.send_raw("PROXY TCP4 192.0.2.1 127.0.0.1 1234 5222\r\n")
        .await
        .unwrap();
    assert_closed_silently(&mut c).await;
    logs.line_with(
        &[
            &format!("peer={addr}"),
            "source is not a trusted proxy",
            r#"listener="c2s""#,
        ],
        WAIT,
    )
    .await;
    assert_eq!(node.metric(&headers("rejected")), rejected + 1.0);
    assert!(
        !logs.lines().iter().any(|l| l.contains("192.0.2.1")),
        "the spoofed address was never used"
    );

    // The proxy itself, checking health with a v2 LOCAL header: served as itself.
    let mut c = Client::connect_from(node.c2s, DOMAIN, PROXY).await.unwrap();
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    c.send_raw(local).await.unwrap();
    c.open().await.expect("a stream after a LOCAL header");

    // A v1 header naming a client, written by hand: the client's address is used.
    let mut c = Client::connect_from(node.c2s, DOMAIN, PROXY).await.unwrap();
    c.send_raw("PROXY TCP4 198.51.100.7 127.0.0.1 40000 5222\r\n")
        .await
        .unwrap();
    c.negotiate(node.cert_path(), USER, PASSWORD, None)
        .await
        .unwrap();
    c.ping().await.unwrap();
    logs.line_with(
        &["peer=198.51.100.7:40000 ", "authenticated"],
        Duration::from_secs(5),
    )
    .await;
}

/// The example in `deploy/haproxy/` stays a configuration HAProxy accepts.
#[test]
fn example_haproxy_config_is_valid() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy/haproxy.cfg");
    let out = std::process::Command::new("haproxy")
        .args(["-c", "-f", config])
        .output()
        .expect("run haproxy (scripts/test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "haproxy -c refused {config}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
