//! Runs the slixmpp scripts under `tests/interop/` against a [`TestNode`]: finds the
//! interpreter, passes the node's address and certificate, and returns the script's
//! one-line JSON summary after checking it exited successfully.

use std::path::PathBuf;
use std::process::Command;

use crate::TestNode;

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

/// Runs `tests/interop/<script>` against `node` with `args` after the connection
/// options, asserts it succeeded, and returns its last stdout line (the summary).
pub async fn run_script(node: &TestNode, script: &str, args: &[&str]) -> String {
    let port = node.c2s.port().to_string();
    let cert = node.cert_path().display().to_string();
    let mut all = vec![
        "--host",
        "127.0.0.1",
        "--domain",
        &node.domain,
        "--port",
        &port,
        "--cafile",
        &cert,
    ];
    all.extend(args);
    run_python(script, &all).await
}

/// Runs `tests/interop/<script>` with `args`, asserts it succeeded, and returns its
/// last stdout line (the summary). `SHOAL_INTEROP_DEBUG=1` adds `--debug` and prints
/// the script's log.
pub async fn run_python(script: &str, args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(script);
    let debug = std::env::var_os("SHOAL_INTEROP_DEBUG").is_some_and(|v| !v.is_empty());
    let mut cmd = Command::new(python());
    cmd.arg(&script).args(args);
    if debug {
        cmd.arg("--debug");
    }
    // The script blocks; run it off the test's runtime threads.
    let output = tokio::task::spawn_blocking(move || cmd.output().expect("run slixmpp script"))
        .await
        .expect("script runner");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "slixmpp run failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    if debug {
        println!("{stderr}");
    }
    stdout.lines().last().unwrap_or_default().to_string()
}

/// The two accounts the two-client scripts log in with.
pub const PAIR: [(&str, &str); 2] = [("juliet", "pencil"), ("romeo", "r0m30!")];

/// Runs a two-client script (`chat_pair.py`, `muc_flow.py`) with the [`PAIR`] accounts
/// and a 30 s timeout, after `extra` arguments; returns its summary.
pub async fn run_pair(node: &TestNode, script: &str, extra: &[&str]) -> String {
    let [(user1, pass1), (user2, pass2)] = PAIR;
    let mut args = extra.to_vec();
    args.extend([
        "--user1",
        user1,
        "--pass1",
        pass1,
        "--user2",
        user2,
        "--pass2",
        pass2,
        "--timeout",
        "30",
    ]);
    run_script(node, script, &args).await
}
