//! How a draining node says goodbye to its clients: `<see-other-host/>` naming the
//! configured server (RFC 6120 §4.9.3.19), for bound and negotiating streams alike.
//! (`<system-shutdown/>`, the default, is checked in `defences.rs`.)

use shoal_tests::client::WAIT;
use shoal_tests::{Client, TestNode};
use shoal_xmpp::ns;

#[tokio::test]
async fn draining_node_sends_clients_to_the_other_host() {
    let node = TestNode::builder()
        .user("alice", "secret")
        .set("shutdown.see_other_host", "[2001:db8::7]:5222")
        .start();
    let mut bound = Client::login(
        node.c2s,
        "localhost",
        node.cert_path(),
        "alice",
        "secret",
        None,
    )
    .await
    .unwrap();
    let mut negotiating = Client::connect(node.c2s, "localhost").await.unwrap();
    negotiating.open().await.unwrap();
    // `stop` joins the node's thread, so it runs off this runtime while we read.
    let stopping = tokio::task::spawn_blocking(move || node.stop());
    let expected = "<error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>\
                    [2001:db8::7]:5222</see-other-host></error>";
    for c in [&mut bound, &mut negotiating] {
        let error = c.expect_stream_error_element().await.unwrap();
        assert_eq!(error.to_xml(ns::STREAM), expected);
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the node stopped in time")
        .expect("the node stopped cleanly");
}
