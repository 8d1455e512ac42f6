//! Interop for in-band registration with a real third-party client: two slixmpp
//! clients (from PyPI, installed into `.venv` by `scripts/test-deps.sh`) create their
//! accounts with XEP-0077 on a node that has none, then log in with SCRAM over
//! STARTTLS, bind and exchange messages.

use shoal_tests::TestNode;
use shoal_tests::interop::run_script;

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_clients_register_in_band_then_chat() {
    // No pre-provisioned users: the accounts exist only if registration worked.
    let node = TestNode::builder().start();
    let summary = run_script(
        &node,
        "chat_pair.py",
        &[
            "--user1",
            "benvolio",
            "--pass1",
            "b3nv0l!o",
            "--user2",
            "mercutio",
            "--pass2",
            "Queen Mab",
            "--register",
            "--timeout",
            "30",
        ],
    )
    .await;
    // Both clients registered, negotiated TLS and SCRAM and exchanged both messages.
    assert!(summary.contains("\"ok\": true"), "{summary}");
    assert!(summary.contains("\"messages\": 2"), "{summary}");
    assert_eq!(summary.matches("\"tls\": true").count(), 2, "{summary}");
    assert_eq!(
        summary.matches("\"mechanism\": \"SCRAM-SHA-256\"").count(),
        2,
        "{summary}"
    );
    // The accounts were created in-band by this run (the script tolerates a conflict,
    // which on a fresh node would mean something else registered them).
    assert!(node.metric("shoal_registrations_total{result=\"created\"}") >= 2.0);
}
