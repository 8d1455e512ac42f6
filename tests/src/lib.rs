//! Test harness for Shoal: boots real nodes in-process on port 0 and drives them over
//! real TCP and TLS with a small client built on `shoal-xmpp`.
//!
//! Nodes run on their own thread with their own actix system, exactly as the binary
//! runs them; tests talk to them only through sockets. Nothing here may reach into a
//! node's internals.

pub mod client;
pub mod cluster;
pub mod haproxy;
pub mod im;
pub mod interop;
pub mod logs;
pub mod node;
pub mod pki;
pub mod program;
pub mod prosody;

pub use client::{Client, ClientReader, ClientWriter, Received};
pub use cluster::TestCluster;
pub use logs::LogCapture;
pub use node::{TestNode, TestNodeBuilder};

use std::time::Duration;

/// Waits until `f` returns true, checking every 20 ms, failing after `timeout`.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A loopback port nobody listens on right now (for servers that must be told their
/// port before they start: federation peers named in a test's DNS records).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// How often [`eventually`] and its kind look at their condition again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Installs a log subscriber once (SHOAL_LOG), so failing tests show the node's log
/// lines, and the recorder of [`LogCapture`].
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter =
            EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
        let shown = fmt::layer().with_test_writer().with_filter(filter);
        let captured = fmt::layer()
            .with_ansi(false)
            .with_writer(logs::CaptureWriter)
            .with_filter(logs::filter());
        let _ = tracing_subscriber::registry()
            .with(shown)
            .with(captured)
            .try_init();
    });
}
