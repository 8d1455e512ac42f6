//! Interop for multi-user chat (XEP-0045) with a real third-party client: two slixmpp
//! clients use slixmpp's own MUC plugin to create and join a room, exchange a groupchat
//! message, change a nick and kick (`tests/interop/muc_flow.py`).

use shoal_tests::TestNode;
use shoal_tests::interop::run_script;

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_muc_plugin_joins_talks_renames_and_kicks() {
    let node = TestNode::builder()
        .user("juliet", "pencil")
        .user("romeo", "r0m30!")
        .start();
    let summary = run_script(
        &node,
        "muc_flow.py",
        &[
            "--user1",
            "juliet",
            "--pass1",
            "pencil",
            "--user2",
            "romeo",
            "--pass2",
            "r0m30!",
            "--timeout",
            "30",
        ],
    )
    .await;
    assert!(summary.contains("\"ok\": true"), "{summary}");
    assert!(
        summary.contains("\"steps\": [\"created\", \"joined\", \"message\", \"nick\", \"kicked\"]"),
        "{summary}"
    );
}
