//! Federation interop with a real Prosody (Debian's package): a slixmpp user on Shoal
//! (`shoal.example`) and one on Prosody (`prosody.example`) subscribe to each other, see each
//! other's presence and chat both ways, once with Shoal opening the first
//! server-to-server stream and once with Prosody; a message from Shoal's user to a
//! domain that does not exist comes back with `<remote-server-not-found/>`
//! (`tests/interop/s2s_flow.py`). The servers find each other through a DNS server the
//! test runs (`_xmpp-server._tcp` SRV records), and each checks the other's dialback
//! keys with it over STARTTLS. The domains are under `example.`, as Prosody's resolver
//! (libunbound) answers every name under `test.` itself, with NXDOMAIN.

use shoal_node::testing::dns::{TestDns, xmpp_server};
use shoal_tests::interop::run_python;
use shoal_tests::prosody::Prosody;
use shoal_tests::{TestNode, free_port};

/// Held by each test for its whole run: both read the metrics registry their nodes
/// share.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the flow with the user of `first` ("shoal" or "peer") moving first.
async fn federate_with_prosody(first: &str) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (shoal_port, prosody_port) = (free_port(), free_port());
    let dns = TestDns::start(
        "example.",
        [
            xmpp_server("shoal.example", shoal_port, false),
            xmpp_server("prosody.example", prosody_port, false),
        ]
        .concat(),
    )
    .await;
    let prosody = Prosody::start("prosody.example", prosody_port, dns.addr);
    let shoal = TestNode::builder()
        .set("domain", "shoal.example")
        .set("s2s.bind", format!("127.0.0.1:{shoal_port}"))
        .set("s2s.nameservers", dns.addr)
        .set("s2s.insecure_domains", "prosody.example")
        .start();
    let valid = "shoal_s2s_dialback_total{result=\"valid\"}";
    let valid_before = shoal.metric(valid);

    let (peer_port, peer_cert) = (prosody.c2s.port().to_string(), prosody.cert_path());
    let summary = run_python(
        "s2s_flow.py",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &shoal.c2s.port().to_string(),
            "--domain",
            &shoal.domain,
            "--cafile",
            &shoal.cert_path().display().to_string(),
            "--peer-port",
            &peer_port,
            "--peer-domain",
            &prosody.domain,
            "--peer-cafile",
            &peer_cert.display().to_string(),
            "--first",
            first,
            "--missing-domain",
            "nowhere.example",
            "--timeout",
            "60",
        ],
    )
    .await;
    for want in [
        "\"ok\": true".to_owned(),
        format!("\"first\": \"{first}\""),
        "\"subscriptions\": {\"alice\": \"both\", \"bob\": \"both\"}".to_owned(),
        "\"messages\": 2".to_owned(),
        "\"bounce\": \"remote-server-not-found\"".to_owned(),
    ] {
        assert!(summary.contains(&want), "{want} not in {summary}");
    }
    // One stream each way between the two servers, and Prosody's key confirmed by
    // Prosody itself over a verify stream.
    assert_eq!(shoal.metric("shoal_s2s_streams{direction=\"out\"}"), 1.0);
    assert_eq!(shoal.metric("shoal_s2s_streams{direction=\"in\"}"), 1.0);
    assert_eq!(shoal.metric(valid) - valid_before, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_opens_the_first_stream_to_prosody() {
    federate_with_prosody("shoal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_opens_the_first_stream_to_shoal() {
    federate_with_prosody("peer").await;
}
