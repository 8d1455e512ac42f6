//! Interop for a whole instant-messaging flow with a real third-party client: two
//! slixmpp clients (from PyPI, installed into `.venv` by `scripts/test-deps.sh`) create
//! their accounts in-band (XEP-0077) on a node that has none, log in with SCRAM over
//! STARTTLS, subscribe to each other's presence (RFC 6121 §3), see each other's
//! presence, chat, and one of them gets messages sent while it was offline back with
//! XEP-0203 delay stamps when it logs in again. The scenario is
//! `tests/interop/im_flow.py`; set `SHOAL_INTEROP_DEBUG=1` to have it log the XML.

use shoal_tests::TestNode;
use shoal_tests::interop::run_script;

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_clients_register_subscribe_chat_and_get_offline_messages() {
    // No pre-provisioned users: the accounts exist only if registration worked.
    let node = TestNode::builder().start();
    let summary = run_script(
        &node,
        "im_flow.py",
        &[
            "--alice",
            "rosalind",
            "--alice-pass",
            "0rl@ndo",
            "--bob",
            "orlando",
            "--bob-pass",
            "Ardenne forest",
            "--timeout",
            "60",
        ],
    )
    .await;
    println!("im_flow summary: {summary}"); // shown with --nocapture
    assert!(summary.contains("\"ok\": true"), "{summary}");
    // Both roster items ended at subscription 'both' (via roster pushes).
    assert!(
        summary.contains("\"subscriptions\": {\"alice\": \"both\", \"bob\": \"both\"}"),
        "{summary}"
    );
    // Available both ways, bob's departure, his return, and the probe on his return.
    for seen in [
        "alice sees bob",
        "bob sees alice",
        "alice sees bob leave",
        "alice sees bob back",
        "bob (again) sees alice",
    ] {
        assert!(
            summary.contains(&format!("\"{seen}\"")),
            "{seen}: {summary}"
        );
    }
    assert!(summary.contains("\"messages\": 2"), "{summary}");
    // All three offline messages arrived, in order, each with a delay stamp.
    assert!(summary.contains("\"offline_messages\": 3"), "{summary}");
    assert!(summary.contains("\"offline_stamped\": 3"), "{summary}");
    // Three logins (alice, bob, bob again), all over TLS with SCRAM-SHA-256.
    assert_eq!(summary.matches("\"tls\": true").count(), 3, "{summary}");
    assert_eq!(
        summary.matches("\"mechanism\": \"SCRAM-SHA-256\"").count(),
        3,
        "{summary}"
    );
    // The accounts were created in-band by this run.
    assert!(node.metric("shoal_registrations_total{result=\"created\"}") >= 2.0);
}
