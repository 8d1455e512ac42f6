//! The harness itself works: a node boots, two clients log in and exchange a message.

use shoal_tests::{Client, TestNode};

#[tokio::test]
async fn two_clients_chat() {
    let node = TestNode::builder()
        .user("juliet", "pencil")
        .user("romeo", "pencil")
        .start();
    let mut j = Client::login(
        node.c2s,
        "localhost",
        node.cert_path(),
        "juliet",
        "pencil",
        Some("balcony"),
    )
    .await
    .unwrap();
    let mut r = Client::login(
        node.c2s,
        "localhost",
        node.cert_path(),
        "romeo",
        "pencil",
        Some("orchard"),
    )
    .await
    .unwrap();
    j.send("<message to='romeo@localhost/orchard' id='m1' type='chat'><body>Wherefore art thou?</body></message>")
        .await
        .unwrap();
    let got = r.recv_stanza().await.unwrap();
    assert_eq!(
        got.to_xml(),
        "<message to='romeo@localhost/orchard' from='juliet@localhost/balcony' id='m1' type='chat'><body>Wherefore art thou?</body></message>"
    );
}
