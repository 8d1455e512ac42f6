//! Latency histograms (HDR, microseconds) and failure counters, and their summaries as
//! plain numbers for the report.
//!
//! Histograms are recorded by one task each and merged at the end, so recording never
//! takes a lock on a hot path.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// Highest recordable value: one hour in microseconds. Larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds with 3 significant digits.
///
/// A histogram covering this range takes about 150 KiB, and every session's reader
/// keeps some, most of which never record anything (idle and login runs): the histogram
/// is allocated on the first value.
#[derive(Debug, Clone, Default)]
pub struct Latency(Option<Box<Histogram<u64>>>);

impl Latency {
    fn histogram(&mut self) -> &mut Histogram<u64> {
        self.0.get_or_insert_with(|| {
            Box::new(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
        })
    }

    pub fn record(&mut self, d: Duration) {
        self.histogram()
            .saturating_record((d.as_micros() as u64).clamp(1, MAX_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        if let Some(other) = &other.0 {
            // Same bounds on both sides, so adding cannot fail.
            let _ = self.histogram().add(other.as_ref());
        }
    }

    pub fn count(&self) -> u64 {
        self.0.as_ref().map_or(0, |h| h.len())
    }

    pub fn summary(&self) -> Percentiles {
        let Some(h) = self.0.as_deref().filter(|h| !h.is_empty()) else {
            return Percentiles::default();
        };
        Percentiles {
            count: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// A histogram's summary, all in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Failures counted by reason (the `reason()` keys of the error types).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Failures(pub BTreeMap<String, u64>);

impl Failures {
    pub fn add(&mut self, reason: String) {
        *self.0.entry(reason).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn merge(&mut self, other: &Failures) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
}

/// Per-second latency histograms of a run, by arrival second since the run's epoch,
/// kept only when a plot is asked for. Readers hand samples over in batches, so the lock
/// is taken once per batch, never per message, and never held across an await.
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: Mutex<Vec<Latency>>,
}

/// The summary of one second of a [`Timeline`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SecondLatency {
    pub second: u64,
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Timeline {
    /// Seconds past this are folded into the last one: a day-long run still fits.
    pub const MAX_SECONDS: u64 = 24 * 3600;

    /// Records `(arrival second, latency)` samples.
    pub fn record(&self, samples: &[(u64, Duration)]) {
        if samples.is_empty() {
            return;
        }
        let mut seconds = self.seconds.lock();
        for &(second, took) in samples {
            let i = second.min(Self::MAX_SECONDS) as usize;
            if i >= seconds.len() {
                seconds.resize_with(i + 1, Latency::default);
            }
            seconds[i].record(took);
        }
    }

    /// One entry per second from 0 to the last second with a sample.
    pub fn summary(&self) -> Vec<SecondLatency> {
        self.seconds
            .lock()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = l.summary();
                SecondLatency {
                    second: i as u64,
                    count: p.count,
                    p50_us: p.p50_us,
                    p99_us: p.p99_us,
                }
            })
            .collect()
    }
}

/// Milliseconds with two decimals, for human tables.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut a = Latency::default();
        for i in 1..=1000 {
            a.record(Duration::from_micros(i));
        }
        let mut b = Latency::default();
        b.record(Duration::from_secs(7200)); // saturates at the bound
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 1001);
        assert_eq!(s.min_us, 1);
        assert!((499..=501).contains(&s.p50_us), "{s:?}");
        assert!((989..=991).contains(&s.p99_us), "{s:?}");
        assert!(s.max_us >= MAX_US - MAX_US / 1000, "{s:?}");
        assert_eq!(Latency::default().summary(), Percentiles::default());
    }

    #[test]
    fn timeline_buckets_by_second() {
        let t = Timeline::default();
        t.record(&[(0, Duration::from_millis(1)), (2, Duration::from_millis(5))]);
        t.record(&[(2, Duration::from_millis(7)), (2, Duration::from_millis(9))]);
        let s = t.summary();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].count, s[1].count, s[2].count), (1, 0, 3));
        assert!((6990..=7010).contains(&s[2].p50_us), "{s:?}");
        assert!((8990..=9010).contains(&s[2].p99_us), "{s:?}");
    }
}
