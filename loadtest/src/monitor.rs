//! A once-a-second ticker: samples the server's RSS (for the peak) and this process's,
//! and prints the live progress line on stderr when it is a terminal or `--progress`
//! asks for it (a new line per tick when stderr is not a terminal).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::session::Counters;
use crate::sysmon;

pub struct Monitor {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Peaks>,
}

/// Highest RSS seen, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    pub server_rss_kib: u64,
    pub own_rss_kib: u64,
}

impl Monitor {
    pub fn start(
        label: &'static str,
        counters: Arc<Counters>,
        server_pid: Option<u32>,
        force_progress: bool,
    ) -> Monitor {
        let tty = std::io::stderr().is_terminal();
        let show = tty || force_progress;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut peaks = Peaks::default();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut last_sent, mut last_recv) = (0, 0);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                if let Some(pid) = server_pid
                    && let Ok(s) = sysmon::sample(&pid.to_string())
                {
                    peaks.server_rss_kib = peaks.server_rss_kib.max(s.rss_kib);
                }
                if let Ok(s) = sysmon::sample("self") {
                    peaks.own_rss_kib = peaks.own_rss_kib.max(s.rss_kib);
                }
                if show {
                    let c = &counters;
                    let sent = c.sent.load(Ordering::Relaxed);
                    let recv = c.received.load(Ordering::Relaxed);
                    let line = format!(
                        "[{label}] {:>4}s  logins {}/{} ({} failed)  open {}  sent {} ({}/s)  recv {} ({}/s)  dup {}",
                        start.elapsed().as_secs(),
                        c.logins_ok.load(Ordering::Relaxed),
                        c.logins_started.load(Ordering::Relaxed),
                        c.logins_failed.load(Ordering::Relaxed),
                        c.sessions_open.load(Ordering::Relaxed),
                        sent,
                        sent - last_sent,
                        recv,
                        recv - last_recv,
                        c.duplicated.load(Ordering::Relaxed),
                    );
                    (last_sent, last_recv) = (sent, recv);
                    let mut err = std::io::stderr().lock();
                    let _ = if tty {
                        write!(err, "\r\x1b[2K{line}")
                    } else {
                        writeln!(err, "{line}")
                    };
                    let _ = err.flush();
                }
            }
            if show && tty {
                let _ = writeln!(std::io::stderr());
            }
            peaks
        });
        Monitor { stop, task }
    }

    pub async fn finish(self) -> Peaks {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
