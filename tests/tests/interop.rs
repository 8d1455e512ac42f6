//! Interop with a real third-party client: two slixmpp clients (from PyPI, installed
//! into `.venv` by `scripts/test-deps.sh`) log in with SCRAM over STARTTLS, bind and
//! exchange messages through a real node.

use shoal_tests::interop::{PAIR, run_pair};
use shoal_tests::{TestCluster, TestNode};

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_clients_chat_over_starttls_with_scram() {
    let [(user1, pass1), (user2, pass2)] = PAIR;
    let node = TestNode::builder()
        .user(user1, pass1)
        .user(user2, pass2)
        .start();
    let summary = run_pair(&node, "chat_pair.py", &[]).await;
    // Both clients negotiated TLS and SCRAM with us and exchanged both messages.
    assert!(summary.contains("\"ok\": true"), "{summary}");
    assert!(summary.contains("\"messages\": 2"), "{summary}");
    assert_eq!(summary.matches("\"tls\": true").count(), 2, "{summary}");
    assert_eq!(
        summary.matches("\"mechanism\": \"SCRAM-SHA-256\"").count(),
        2,
        "{summary}"
    );
    // And the server counted the SCRAM logins.
    assert!(node.metric("shoal_auth_success_total{mechanism=\"scram_sha_256\"}") >= 2.0);
}

/// The same exchange with the two slixmpp clients on two nodes of a cluster.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_clients_on_two_cluster_nodes_chat() {
    let cluster = TestCluster::start(2, &PAIR);
    cluster.settled().await;
    let port2 = cluster.node(1).c2s.port().to_string();
    let summary = run_pair(cluster.node(0), "chat_pair.py", &["--port2", &port2]).await;
    assert!(summary.contains("\"ok\": true"), "{summary}");
    assert!(summary.contains("\"messages\": 2"), "{summary}");
}
