//! Interop for a whole instant-messaging flow with a real third-party client: two
//! slixmpp clients (from PyPI, installed into `.venv` by `scripts/test-deps.sh`) create
//! their accounts in-band (XEP-0077) on a node that has none, log in with SCRAM over
//! STARTTLS, subscribe to each other's presence (RFC 6121 §3), see each other's
//! presence, chat, and one of them gets messages sent while it was offline back with
//! XEP-0203 delay stamps when it logs in again. The scenario is
//! `tests/interop/im_flow.py`; set `SHOAL_INTEROP_DEBUG=1` to have it log the XML.

use std::path::PathBuf;
use std::process::Command;

use shoal_tests::TestNode;

/// The interpreter with slixmpp: `SHOAL_TEST_PYTHON`, else the repo's `.venv`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `bash scripts/test-deps.sh` (the README's test command does)",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_clients_register_subscribe_chat_and_get_offline_messages() {
    // No pre-provisioned users: the accounts exist only if registration worked.
    let node = TestNode::builder().start();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/im_flow.py");
    let port = node.c2s.port().to_string();
    let cafile = node.cert_path().to_path_buf();
    let debug = std::env::var_os("SHOAL_INTEROP_DEBUG").is_some_and(|v| !v.is_empty());
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--domain",
                "localhost",
            ])
            .args(["--alice", "rosalind", "--alice-pass", "0rl@ndo"])
            .args(["--bob", "orlando", "--bob-pass", "Ardenne forest"])
            .arg("--cafile")
            .arg(&cafile)
            .args(["--timeout", "60"]);
        if debug {
            cmd.arg("--debug");
        }
        cmd.output().expect("run slixmpp script")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "slixmpp run failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    println!("im_flow summary: {summary}"); // shown with --nocapture
    if debug {
        println!("{stderr}");
    }
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
