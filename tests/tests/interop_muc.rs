//! Interop for multi-user chat (XEP-0045) with a real third-party client: two slixmpp
//! clients use slixmpp's own MUC plugin to create a room and configure it with its
//! data form, join it, grant and list membership, exchange a groupchat message,
//! change a nick and kick (`tests/interop/muc_flow.py`).

use shoal_tests::TestNode;
use shoal_tests::interop::{PAIR, run_pair};

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_muc_plugin_joins_talks_renames_and_kicks() {
    let [(user1, pass1), (user2, pass2)] = PAIR;
    let node = TestNode::builder()
        .user(user1, pass1)
        .user(user2, pass2)
        .start();
    let summary = run_pair(&node, "muc_flow.py", &[]).await;
    assert!(summary.contains("\"ok\": true"), "{summary}");
    assert!(
        summary.contains("\"steps\": [\"created\", \"configured\", \"joined\", \"member\", \"message\", \"nick\", \"kicked\"]"),
        "{summary}"
    );
}
