//! Interop for in-band registration with a real third-party client: two slixmpp
//! clients (from PyPI, installed into `.venv` by `scripts/test-deps.sh`) create their
//! accounts with XEP-0077 on a node that has none, then log in with SCRAM over
//! STARTTLS, bind and exchange messages.

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
async fn slixmpp_clients_register_in_band_then_chat() {
    // No pre-provisioned users: the accounts exist only if registration worked.
    let node = TestNode::builder().start();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/chat_pair.py");
    let port = node.c2s.port().to_string();
    let cafile = node.cert_path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(&script)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--domain",
                "localhost",
            ])
            .args(["--user1", "benvolio", "--pass1", "b3nv0l!o"])
            .args(["--user2", "mercutio", "--pass2", "Queen Mab"])
            .arg("--register")
            .arg("--cafile")
            .arg(&cafile)
            .args(["--timeout", "30"])
            .output()
            .expect("run slixmpp script")
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
