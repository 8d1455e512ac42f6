//! The nodes' log lines, captured for tests that check what an operator reads.
//!
//! [`LogCapture::start`] records every line the nodes of this process log at debug
//! level or above from then on, formatted as the binary prints them (with the fields
//! of their spans, such as a connection's `peer`), until the capture is dropped.
//! Nothing is recorded while no capture is alive, so the other tests pay nothing.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tracing::Level;
use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Filter;

/// Captured lines, in order (all captures share them; each reads from its start).
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Live captures: lines are recorded while this is above zero.
static CAPTURES: AtomicUsize = AtomicUsize::new(0);

/// Records the nodes' log lines while it lives.
pub struct LogCapture {
    start: usize,
}

impl LogCapture {
    /// Starts recording (installing the process's log subscriber if need be).
    pub fn start() -> LogCapture {
        crate::init_logging();
        CAPTURES.fetch_add(1, Ordering::SeqCst);
        LogCapture {
            start: lines().len(),
        }
    }

    /// The lines logged since this capture started.
    pub fn lines(&self) -> Vec<String> {
        lines().get(self.start..).unwrap_or_default().to_vec()
    }

    /// Waits (bounded) for a line containing every one of `parts`, and returns it.
    pub async fn line_with(&self, parts: &[&str], timeout: Duration) -> String {
        let mut found = None;
        crate::eventually(timeout, &format!("a log line with {parts:?}"), || {
            found = self
                .lines()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)));
            found.is_some()
        })
        .await;
        found.expect("found")
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURES.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lines() -> MutexGuard<'static, Vec<String>> {
    LINES.lock()
}

/// What a capture records: the node's lines at debug level and above, while a capture
/// lives. The target and level part is decided once per call site.
pub(crate) fn filter<S>() -> impl Filter<S> {
    Targets::new()
        .with_target("shoal_node", Level::DEBUG)
        .and(filter_fn(|_| CAPTURES.load(Ordering::Relaxed) > 0).with_max_level_hint(Level::DEBUG))
}

/// Where the capturing formatter writes: one line per event.
#[derive(Clone, Copy)]
pub(crate) struct CaptureWriter;

impl<'a> MakeWriter<'a> for CaptureWriter {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One formatted event, stored when the formatter is done with it.
pub(crate) struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.0).trim_end().to_owned();
        if !line.is_empty() {
            lines().push(line);
        }
    }
}
