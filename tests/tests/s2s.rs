//! Federation (RFC 6120 server-to-server streams, XEP-0220 dialback over STARTTLS)
//! between two Shoal nodes serving different domains, `a.test` and `b.test`, which find
//! each other through a DNS server the test runs (`_xmpp-server._tcp` SRV records).

use std::net::SocketAddr;

use shoal_node::testing::dns::{TestDns, xmpp_server};
use shoal_tests::haproxy::{HaProxy, ProxyHeader};
use shoal_tests::im::*;
use shoal_tests::{TestNode, free_port};

/// Held by each test for its whole run: the nodes of all tests in this process share
/// one metrics registry, which the tests read.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A node serving `domain`, federating on `port`, resolving through `dns`.
fn node_for(domain: &str, port: u16, dns: &TestDns, user: &str) -> TestNode {
    TestNode::builder()
        .set("domain", domain)
        .set("s2s.bind", format!("127.0.0.1:{port}"))
        .set("s2s.nameservers", dns.addr)
        .set("s2s.insecure_domains", "a.test,b.test")
        .set("s2s.deny_domains", "denied.test")
        .user(user, PW)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_chat_both_ways_and_unknown_domains_bounce() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (port_a, port_b, port_down) = (free_port(), free_port(), free_port());
    let dns = TestDns::start(
        "test.",
        [
            xmpp_server("a.test", port_a, false),
            xmpp_server("b.test", port_b, false),
            // A server that is down: nothing listens there.
            xmpp_server("down.test", port_down, false),
        ]
        .concat(),
    )
    .await;
    let a = node_for("a.test", port_a, &dns, "juliet");
    let b = node_for("b.test", port_b, &dns, "romeo");
    let metrics = [
        ("shoal_s2s_streams{direction=\"out\"}", 2.0),
        ("shoal_s2s_dialback_total{result=\"valid\"}", 2.0),
        ("shoal_s2s_dialback_total{result=\"invalid\"}", 0.0),
        (
            "shoal_s2s_bounces_total{condition=\"remote_server_not_found\"}",
            2.0,
        ),
        (
            "shoal_s2s_bounces_total{condition=\"remote_server_timeout\"}",
            1.0,
        ),
        ("shoal_s2s_queued", 0.0),
    ];
    let before: Vec<f64> = metrics.iter().map(|(sample, _)| a.metric(sample)).collect();
    let mut j = online(&a, "juliet", "balcony").await;
    let mut r = online(&b, "romeo", "orchard").await;

    // a.test opens a stream to b.test; b.test checks the dialback key with a.test.
    j.send(
        "<message to='romeo@b.test' id='m1' type='chat'><body>Wherefore art thou?</body></message>",
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@b.test' from='juliet@a.test/balcony' id='m1' type='chat'><body>Wherefore art thou?</body></message>"
    );
    // And the other way, on a stream of its own.
    r.send("<message to='juliet@a.test/balcony' id='m2' type='chat'><body>Here</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@a.test/balcony' from='romeo@b.test/orchard' id='m2' type='chat'><body>Here</body></message>"
    );
    // An iq crosses and its answer comes back: a ping to the other server.
    assert_eq!(
        ask(
            &mut j,
            "<iq to='b.test' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
        )
        .await,
        "<iq to='juliet@a.test/balcony' from='b.test' id='p1' type='result'/>"
    );

    // A domain DNS does not know: the sender gets <remote-server-not-found/>.
    let bounce = ask(
        &mut j,
        "<message to='nobody@nowhere.test' id='m3' type='chat'><body>Hello?</body></message>",
    )
    .await;
    assert!(
        bounce.starts_with(
            "<message to='juliet@a.test/balcony' from='nobody@nowhere.test' id='m3' type='error'>"
        ) && bounce
            .contains("<remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"),
        "{bounce}"
    );

    // A domain whose server is down: <remote-server-timeout/>.
    let bounce = ask(
        &mut j,
        "<message to='nurse@down.test' id='m4' type='chat'><body>Anyone?</body></message>",
    )
    .await;
    assert!(
        bounce.starts_with(
            "<message to='juliet@a.test/balcony' from='nurse@down.test' id='m4' type='error'>"
        ) && bounce
            .contains("<remote-server-timeout xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"),
        "{bounce}"
    );
    // A domain the deny list names is not even looked up.
    let bounce = ask(
        &mut j,
        "<message to='tybalt@denied.test' id='m5' type='chat'><body>Truce?</body></message>",
    )
    .await;
    assert!(
        bounce.contains("<remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
            && bounce.contains("federation with denied.test is not allowed here"),
        "{bounce}"
    );

    // Both nodes run in this process and share one metrics registry (with any other
    // test's nodes, hence the differences): two outbound streams (one each way), two
    // keys confirmed by the authoritative servers, three bounces.
    for ((sample, want), before) in metrics.iter().zip(before) {
        assert_eq!(a.metric(sample) - before, *want, "{sample}");
    }
}

/// Two clusters of two nodes each federate. Each domain's SRV record names one node,
/// and the users are on the other one: streams leave from one node and arrive at the
/// other, and the node a key is checked with is not the node that issued it (the
/// cluster's nodes share the dialback secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_federate_across_their_nodes() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let dns = TestDns::start(
        "test.",
        // a.test's second node, b.test's first.
        [
            xmpp_server("a.test", ports[1], false),
            xmpp_server("b.test", ports[2], false),
        ]
        .concat(),
    )
    .await;
    let cluster = |domain: &str, user: &str, secret: &str, ports: &[u16]| {
        let settings = vec![
            ("s2s.nameservers".to_owned(), dns.addr.to_string()),
            (
                "s2s.insecure_domains".to_owned(),
                "a.test,b.test".to_owned(),
            ),
            ("s2s.dialback_secret".to_owned(), secret.to_owned()),
        ];
        let per_node = ports
            .iter()
            .map(|p| vec![("s2s.bind".to_owned(), format!("127.0.0.1:{p}"))])
            .collect();
        shoal_tests::TestCluster::start_with(2, &[(user, PW)], domain, settings, per_node)
    };
    let a = cluster("a.test", "juliet", "a's secret", &ports[..2]);
    let b = cluster("b.test", "romeo", "b's secret", &ports[2..]);
    a.settled().await;
    b.settled().await;
    let mut j = online(a.node(0), "juliet", "balcony").await;
    let mut r = online(b.node(1), "romeo", "orchard").await;

    j.send("<message to='romeo@b.test' id='c1' type='chat'><body>From cluster a</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@b.test' from='juliet@a.test/balcony' id='c1' type='chat'><body>From cluster a</body></message>"
    );
    r.send("<message to='juliet@a.test' id='c2' type='chat'><body>From cluster b</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@a.test' from='romeo@b.test/orchard' id='c2' type='chat'><body>From cluster b</body></message>"
    );
}

/// With certificates from a CA both sides trust (`s2s.ca_file`), peers authenticate by
/// SASL EXTERNAL (XEP-0178) instead of dialback, also over direct TLS (XEP-0368: b.test
/// announces only an `_xmpps-server` record). A peer whose certificate the other side
/// does not trust is refused EXTERNAL and falls back to dialback on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_a_trusted_ca_authenticate_by_sasl_external() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ca = shoal_tests::pki::TestCa::new();
    let (port_a, port_b, port_b_direct, port_c) =
        (free_port(), free_port(), free_port(), free_port());
    let dns = TestDns::start(
        "test.",
        [
            xmpp_server("a.test", port_a, false),
            xmpp_server("b.test", port_b_direct, true),
            xmpp_server("c.test", port_c, false),
        ]
        .concat(),
    )
    .await;
    let with_ca_cert = |domain: &str, port: u16, user: &str| {
        let (cert, key) = ca.issue(domain);
        TestNode::builder()
            .set("domain", domain)
            .set("s2s.bind", format!("127.0.0.1:{port}"))
            .set("s2s.nameservers", dns.addr)
            .set("s2s.ca_file", ca.cert_path().display())
            .set("tls.cert", cert.display())
            .set("tls.key", key.display())
            .user(user, PW)
    };
    let a = with_ca_cert("a.test", port_a, "juliet")
        .set("s2s.insecure_domains", "c.test")
        .start();
    let b = with_ca_cert("b.test", port_b, "romeo")
        .set("s2s.direct_tls_bind", format!("127.0.0.1:{port_b_direct}"))
        .start();
    let counts = [
        "shoal_s2s_external_total{result=\"valid\"}",
        "shoal_s2s_external_total{result=\"invalid\"}",
        "shoal_s2s_dialback_total{result=\"valid\"}",
        "shoal_s2s_dialback_total{result=\"invalid\"}",
    ];
    let read = |node: &TestNode| counts.map(|sample| node.metric(sample));
    let before = read(&a);
    let mut j = online(&a, "juliet", "balcony").await;
    let mut r = online(&b, "romeo", "orchard").await;

    // a.test → b.test over direct TLS, b.test → a.test after STARTTLS: both by EXTERNAL.
    j.send("<message to='romeo@b.test' id='x1' type='chat'><body>Certified</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@b.test' from='juliet@a.test/balcony' id='x1' type='chat'><body>Certified</body></message>"
    );
    r.send("<message to='juliet@a.test' id='x2' type='chat'><body>Likewise</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@a.test' from='romeo@b.test/orchard' id='x2' type='chat'><body>Likewise</body></message>"
    );
    let after = read(&a);
    let deltas: Vec<f64> = after.iter().zip(before).map(|(x, y)| x - y).collect();
    assert_eq!(deltas, [2.0, 0.0, 0.0, 0.0], "{counts:?}");

    // c.test's certificate is self-signed. c.test trusts it (its own s2s.ca_file), so
    // it tries EXTERNAL; a.test does not, says <not-authorized/>, and checks c.test's
    // dialback key instead. a.test's answer goes back on a stream of its own, where c.test
    // refuses a.test's certificate (c.test trusts only itself) in turn.
    let c_dir = tempfile::TempDir::new().unwrap();
    let (c_cert, c_key) = (c_dir.path().join("c.pem"), c_dir.path().join("c.key"));
    shoal_node::tls::generate_self_signed("c.test", &c_cert, &c_key).unwrap();
    let c = TestNode::builder()
        .set("domain", "c.test")
        .set("s2s.bind", format!("127.0.0.1:{port_c}"))
        .set("s2s.nameservers", dns.addr)
        .set("s2s.ca_file", c_cert.display())
        .set("s2s.insecure_domains", "a.test")
        .set("tls.cert", c_cert.display())
        .set("tls.key", c_key.display())
        .user("mercutio", PW)
        .start();
    let mut m = online(&c, "mercutio", "street").await;
    m.send("<message to='juliet@a.test' id='x3' type='chat'><body>Uncertified</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@a.test' from='mercutio@c.test/street' id='x3' type='chat'><body>Uncertified</body></message>"
    );
    j.send("<message to='mercutio@c.test' id='x4' type='chat'><body>Noted</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut m).await,
        "<message to='mercutio@c.test' from='juliet@a.test/balcony' id='x4' type='chat'><body>Noted</body></message>"
    );
    let deltas: Vec<f64> = read(&a).iter().zip(after).map(|(x, y)| x - y).collect();
    assert_eq!(deltas, [0.0, 2.0, 2.0, 0.0], "{counts:?}");
}

/// b.test's servers sit behind a real HAProxy that announces each peer with a PROXY
/// protocol v2 header (`s2s.proxy_protocol`): a.test reaches b.test through it, and
/// b.test reads the header before the stream starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_through_haproxy_with_the_proxy_protocol() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (port_a, port_b) = (free_port(), free_port());
    let haproxy = HaProxy::start(&[(SocketAddr::from(([127, 0, 0, 1], port_b)), ProxyHeader::V2)]);
    let dns = TestDns::start(
        "test.",
        [
            xmpp_server("a.test", port_a, false),
            xmpp_server("b.test", haproxy.frontends[0].port(), false),
        ]
        .concat(),
    )
    .await;
    let a = node_for("a.test", port_a, &dns, "juliet");
    let b = TestNode::builder()
        .set("domain", "b.test")
        .set("s2s.bind", format!("127.0.0.1:{port_b}"))
        .set("s2s.nameservers", dns.addr)
        .set("s2s.insecure_domains", "a.test")
        .set("s2s.proxy_protocol", true)
        .set("s2s.proxy_trusted", "127.0.0.1")
        .user("romeo", PW)
        .start();
    let accepted = r#"shoal_proxy_headers_total{service="s2s",result="accepted"}"#;
    let before = b.metric(accepted);
    let mut j = online(&a, "juliet", "balcony").await;
    let mut r = online(&b, "romeo", "orchard").await;
    j.send("<message to='romeo@b.test' id='h1' type='chat'><body>Via the proxy</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut r).await,
        "<message to='romeo@b.test' from='juliet@a.test/balcony' id='h1' type='chat'><body>Via the proxy</body></message>"
    );
    r.send("<message to='juliet@a.test' id='h2' type='chat'><body>Directly</body></message>")
        .await
        .unwrap();
    assert_eq!(
        next(&mut j).await,
        "<message to='juliet@a.test' from='romeo@b.test/orchard' id='h2' type='chat'><body>Directly</body></message>"
    );
    // Two streams came through HAProxy: a.test's stream, and the verify stream on
    // which a.test asked b.test about the key of b.test's stream.
    assert_eq!(b.metric(accepted) - before, 2.0);
}
