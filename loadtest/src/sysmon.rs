//! CPU and memory of this process and of a server on the same machine, from `/proc`,
//! and single values from a Prometheus `/metrics` page.
//!
//! Read-only: it never signals or otherwise touches the processes it watches.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Clock ticks per second in `/proc/*/stat`. The kernel reports these fields in
/// USER_HZ, which is 100 on every Linux architecture Rust targets.
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// utime + stime, in ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub at: Instant,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` "self" for this process).
pub fn sample(pid: &str) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu_ticks: parse_cpu_ticks(&stat).context("malformed stat")?,
        rss_kib: parse_rss_kib(&status).context("no VmRSS in status")?,
        at: Instant::now(),
    })
}

/// utime + stime: fields 14 and 15, counted after the parenthesised command name
/// (which may itself contain spaces and parentheses).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(before: &ProcSample, after: &ProcSample) -> f64 {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (after.cpu_ticks.saturating_sub(before.cpu_ticks)) as f64 / TICKS_PER_SEC / wall * 100.0
}

/// CPU and memory of a process over a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcReport {
    pub cpu_percent_of_core: f64,
    pub cpu_seconds: f64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
    pub rss_kib_peak: u64,
}

impl ProcReport {
    pub fn between(before: &ProcSample, after: &ProcSample, peak_kib: u64) -> Self {
        Self {
            cpu_percent_of_core: cpu_percent(before, after),
            cpu_seconds: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SEC,
            rss_kib_start: before.rss_kib,
            rss_kib_end: after.rss_kib,
            rss_kib_peak: peak_kib.max(before.rss_kib).max(after.rss_kib),
        }
    }
}

/// Fetches `url` (plain `http://host:port/path`, loopback or any address) and returns
/// the sum of all samples of metric `name` (every label set), `None` if absent.
pub async fn scrape(url: &str, name: &str) -> anyhow::Result<Option<f64>> {
    let rest = url
        .strip_prefix("http://")
        .context("metrics URL must start with http://")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/metrics" } else { path };
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("metrics URL host {host:?} must be an IP:port"))?;
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    })
    .await
    .context("metrics scrape timed out")??;
    if !body.starts_with("HTTP/1.") || body.split_whitespace().nth(1) != Some("200") {
        bail!(
            "metrics scrape failed: {}",
            body.lines().next().unwrap_or("")
        );
    }
    Ok(sum_metric(&body, name))
}

fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // a longer name sharing the prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let status = "Name:\tshoal\nVmPeak:\t  9999 kB\nVmRSS:\t   51234 kB\n";
        assert_eq!(parse_rss_kib(status), Some(51234));
        let me = sample("self").unwrap();
        assert!(me.rss_kib > 0);
    }

    #[test]
    fn sums_metric_samples() {
        let text = "# TYPE shoal_sessions gauge\nshoal_sessions 42\nshoal_sessions_total 7\nshoal_c2s_connections{listener=\"starttls\"} 3\nshoal_c2s_connections{listener=\"direct_tls\"} 2\n";
        assert_eq!(sum_metric(text, "shoal_sessions"), Some(42.0));
        assert_eq!(sum_metric(text, "shoal_c2s_connections"), Some(5.0));
        assert_eq!(sum_metric(text, "nope"), None);
    }
}
