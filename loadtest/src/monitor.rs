//! A once-a-second ticker: samples the server's RSS (for the peak) and this process's,
//! records the run's sent and received counters (the per-second rates of `--plot`), and
//! prints the live progress line on stderr when it is a terminal or `--progress` asks
//! for it (a new line per tick when stderr is not a terminal).

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
    task: JoinHandle<Observed>,
}

/// Highest RSS seen, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    pub server_rss_kib: u64,
    pub own_rss_kib: u64,
}

/// The run's counters at one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tick {
    /// Seconds since the run's epoch.
    pub secs: f64,
    /// Probe stanzas sent and distinct deliveries received so far.
    pub sent: u64,
    pub received: u64,
}

/// What the monitor saw over the run: one [`Tick`] a second (a day-long run keeps
/// 86,400 of them, 2 MiB).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub peaks: Peaks,
    pub ticks: Vec<Tick>,
}

impl Monitor {
    /// Starts ticking; tick times are measured from `epoch`.
    pub fn start(
        label: &'static str,
        epoch: Instant,
        counters: Arc<Counters>,
        server_pid: Option<u32>,
        force_progress: bool,
    ) -> Monitor {
        let tty = std::io::stderr().is_terminal();
        let show = tty || force_progress;
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut seen = Observed::default();
            let peaks = &mut seen.peaks;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // A late tick is taken late, not made up in a burst: per-second rates need
            // ticks about a second apart.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let (mut last_sent, mut last_recv) = (0, 0);
            loop {
                tokio::select! {
                    _ = &mut stopped => {
                        // The last, partial second, so the series reaches the end.
                        tick_now(&mut seen.ticks, epoch, &counters);
                        break;
                    }
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
                let c = &counters;
                let (sent, recv) = tick_now(&mut seen.ticks, epoch, c);
                if show {
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
            seen
        });
        Monitor { stop, task }
    }

    pub async fn finish(self) -> Observed {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Records the counters now; returns (sent, received).
fn tick_now(ticks: &mut Vec<Tick>, epoch: Instant, c: &Counters) -> (u64, u64) {
    let t = Tick {
        secs: epoch.elapsed().as_secs_f64(),
        sent: c.sent.load(Ordering::Relaxed),
        received: c.received.load(Ordering::Relaxed),
    };
    ticks.push(t);
    (t.sent, t.received)
}
