//! Per-source-address rate limiting and traffic shaping.
//!
//! [`TokenBucket`] is the sans-clock primitive: every method takes `now`, so tests drive
//! it with synthetic instants and the caller decides where time comes from.
//! [`IpLimiter`] applies one bucket per source address to connection attempts (or any
//! other per-IP event).
//!
//! This module owns only counters. It must never sleep, spawn or do I/O; the drivers
//! turn "refused" into a rejected connection and a delay into a paused read. Its memory
//! is bounded: see [`IpLimiter`] for the policy when the table is full.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A token bucket: holds up to `burst` tokens and refills at `rate_per_sec`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    /// May go negative through [`TokenBucket::delay_for`], which records debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate_per_sec` should be positive: a bucket with rate zero never
    /// refills, so once empty it refuses forever and [`delay_for`](Self::delay_for)
    /// reports [`Duration::MAX`].
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        // NaN or negative parameters would poison every later comparison; clamp them
        // to "no refill, no capacity" rather than panicking on bad configuration.
        let rate_per_sec = if rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        let burst = if burst > 0.0 { burst } else { 0.0 };
        Self {
            rate_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens if they are all available; takes nothing otherwise.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens unconditionally and returns how long the caller should wait
    /// before the balance is back to zero, i.e. until those tokens have been paid for.
    ///
    /// This is the shaping form: a reader that has just received `n` bytes calls it and
    /// pauses reading for the returned time. The work is already done, so the tokens
    /// are taken even when the bucket goes into debt; later calls queue behind it, which
    /// keeps the long-run rate at `rate_per_sec` however large each read is.
    pub fn delay_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        // Division by a zero rate gives infinity, which the fallible conversion maps to
        // the longest possible delay.
        Duration::try_from_secs_f64(-self.tokens / self.rate_per_sec).unwrap_or(Duration::MAX)
    }

    /// Whether the bucket has refilled to capacity by `now`. A full bucket behaves
    /// exactly like a freshly created one, so it can be forgotten without changing any
    /// future decision.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        // Instants that go backwards (callers racing to pass `now`) add nothing rather
        // than subtracting.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        if elapsed > 0.0 {
            self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
            self.last = now;
        }
    }
}

/// Default cap on tracked addresses. At well under 100 bytes per entry this bounds the
/// table to a few megabytes, far above what legitimate traffic needs within one refill
/// period.
pub const DEFAULT_MAX_TRACKED: usize = 100_000;

/// When the table is full, prune at most this often, so a flood of new addresses cannot
/// turn every check into a scan of the whole table.
const PRUNE_INTERVAL_WHEN_FULL: Duration = Duration::from_secs(1);

/// Limits events (typically connection attempts) per source address.
///
/// Each address gets a [`TokenBucket`] holding one period's budget (`per_minute`, or
/// `per_hour` with [`IpLimiter::per_hour`]) that refills evenly over the period, so a
/// client within its budget is never refused even if it spends it at once. IPv6 addresses are grouped by /64, because a single host
/// usually controls a whole /64 and could otherwise rotate through it freely;
/// IPv4-mapped IPv6 addresses count as their IPv4 address.
///
/// Memory policy: at most `max_tracked` addresses are tracked. When the table is full
/// and a new address arrives, full buckets are pruned (throttled); if it is still full,
/// the new address is **allowed but not tracked**. Failing closed instead would let an
/// attacker with many addresses lock out every newcomer; failing open degrades only to
/// "no per-IP limit for unseen addresses" while the node's global connection cap still
/// bounds total load. Addresses already tracked keep being limited.
#[derive(Debug)]
pub struct IpLimiter {
    /// `None` means unlimited (configured with 0 per minute).
    rate_per_sec: Option<f64>,
    burst: f64,
    max_tracked: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_prune: Option<Instant>,
}

impl IpLimiter {
    /// `per_minute == 0` disables limiting.
    pub fn new(per_minute: u32) -> Self {
        Self::with_max_tracked(per_minute, DEFAULT_MAX_TRACKED)
    }

    pub fn with_max_tracked(per_minute: u32, max_tracked: usize) -> Self {
        Self::with_budget(per_minute, Duration::from_secs(60), max_tracked)
    }

    /// A budget per hour, for rare events such as account registration; `per_hour == 0`
    /// disables limiting. A refused address regains one event every `3600 / per_hour`
    /// seconds.
    pub fn per_hour(per_hour: u32) -> Self {
        Self::with_budget(per_hour, Duration::from_secs(3600), DEFAULT_MAX_TRACKED)
    }

    /// `budget` events per `period` (which must be non-zero); `budget == 0` disables
    /// limiting.
    fn with_budget(budget: u32, period: Duration, max_tracked: usize) -> Self {
        Self {
            rate_per_sec: (budget > 0).then(|| f64::from(budget) / period.as_secs_f64()),
            burst: f64::from(budget),
            max_tracked,
            state: Mutex::new(State {
                buckets: HashMap::new(),
                last_prune: None,
            }),
        }
    }

    /// Takes one token for `ip`; `false` means the event should be refused.
    pub fn check(&self, ip: IpAddr, now: Instant) -> bool {
        let Some(rate) = self.rate_per_sec else {
            return true;
        };
        let key = source_key(ip);
        // The lock is held for a hash lookup and a few float operations, never across
        // an await, so parking_lot's non-async mutex is the right tool.
        let mut state = self.state.lock();
        if let Some(bucket) = state.buckets.get_mut(&key) {
            return bucket.try_take(1.0, now);
        }
        if state.buckets.len() >= self.max_tracked {
            let due = state
                .last_prune
                .is_none_or(|last| now.saturating_duration_since(last) >= PRUNE_INTERVAL_WHEN_FULL);
            if due {
                state.prune(now);
            }
            if state.buckets.len() >= self.max_tracked {
                // Allowed but untracked: see the memory policy on the type.
                return true;
            }
        }
        let mut bucket = TokenBucket::new(rate, self.burst, now);
        let allowed = bucket.try_take(1.0, now);
        state.buckets.insert(key, bucket);
        allowed
    }

    /// Forgets every address whose bucket has refilled; call periodically (e.g. once
    /// per refill period) so the table tracks only recently active addresses.
    pub fn prune(&self, now: Instant) {
        self.state.lock().prune(now);
    }

    /// Number of addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.state.lock().buckets.len()
    }
}

impl State {
    fn prune(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
        self.last_prune = Some(now);
    }
}

/// The unit an address is limited as: IPv4 as is, IPv6 by /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3.0, t0);
        assert!(bucket.try_take(1.0, t0));
        assert!(bucket.try_take(2.0, t0));
        assert!(!bucket.try_take(1.0, t0));
        // Half a second at 2/s refills exactly one token.
        assert!(bucket.try_take(1.0, t0 + secs(0.5)));
        assert!(!bucket.try_take(1.0, t0 + secs(0.5)));
        // A long idle period refills only up to the burst.
        let later = t0 + secs(100.0);
        assert!(bucket.is_full(later));
        assert!(bucket.try_take(3.0, later));
        assert!(!bucket.try_take(0.5, later));
    }

    #[test]
    fn failed_take_takes_nothing() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 2.0, t0);
        assert!(!bucket.try_take(5.0, t0));
        assert!(bucket.try_take(2.0, t0));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let t0 = Instant::now() + secs(10.0);
        let mut bucket = TokenBucket::new(1.0, 1.0, t0);
        assert!(bucket.try_take(1.0, t0));
        assert!(!bucket.try_take(1.0, t0 - secs(5.0)));
        assert!(bucket.try_take(1.0, t0 + secs(1.0)));
    }

    #[test]
    fn delay_for_shapes_to_the_rate() {
        let t0 = Instant::now();
        // 1000 bytes/s with a 1000-byte burst.
        let mut bucket = TokenBucket::new(1000.0, 1000.0, t0);
        assert_eq!(bucket.delay_for(600.0, t0), Duration::ZERO);
        assert_eq!(bucket.delay_for(400.0, t0), Duration::ZERO);
        // In debt by 500 bytes: wait half a second.
        assert_eq!(bucket.delay_for(500.0, t0), secs(0.5));
        // A read larger than the burst is still paid for in full.
        assert_eq!(bucket.delay_for(2000.0, t0 + secs(0.5)), secs(2.0));
        // After waiting that long the balance is back at zero, not positive.
        let t = t0 + secs(2.5);
        assert!(!bucket.try_take(1.0, t));
        assert_eq!(bucket.delay_for(0.0, t), Duration::ZERO);
    }

    #[test]
    fn zero_rate_never_refills() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.0, 1.0, t0);
        assert!(bucket.try_take(1.0, t0));
        assert!(!bucket.try_take(1.0, t0 + secs(1e6)));
        assert_eq!(bucket.delay_for(1.0, t0), Duration::MAX);
    }

    #[test]
    fn limiter_limits_each_address_separately() {
        let t0 = Instant::now();
        let limiter = IpLimiter::new(3);
        for _ in 0..3 {
            assert!(limiter.check(v4(1), t0));
        }
        assert!(!limiter.check(v4(1), t0));
        assert!(
            limiter.check(v4(2), t0),
            "another address has its own budget"
        );
        // 3 per minute: one event every 20 seconds.
        assert!(!limiter.check(v4(1), t0 + secs(19.0)));
        assert!(limiter.check(v4(1), t0 + secs(20.0)));
    }

    #[test]
    fn per_hour_budget_refills_over_the_hour() {
        let t0 = Instant::now();
        let limiter = IpLimiter::per_hour(2);
        assert!(limiter.check(v4(1), t0));
        assert!(limiter.check(v4(1), t0));
        assert!(!limiter.check(v4(1), t0));
        // Two per hour: one event every 30 minutes.
        assert!(!limiter.check(v4(1), t0 + secs(1799.0)));
        assert!(limiter.check(v4(1), t0 + secs(1800.0)));
        let unlimited = IpLimiter::per_hour(0);
        for _ in 0..100 {
            assert!(unlimited.check(v4(1), t0));
        }
    }

    #[test]
    fn zero_per_minute_is_unlimited_and_tracks_nothing() {
        let t0 = Instant::now();
        let limiter = IpLimiter::new(0);
        for _ in 0..10_000 {
            assert!(limiter.check(v4(1), t0));
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_v4_as_v4() {
        let t0 = Instant::now();
        let limiter = IpLimiter::new(1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(limiter.check(a, t0));
        assert!(!limiter.check(b, t0), "same /64 shares the budget");
        assert!(limiter.check(other_net, t0));

        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(limiter.check(v4(7), t0));
        assert!(!limiter.check(mapped, t0));
    }

    #[test]
    fn prune_drops_only_refilled_buckets() {
        let t0 = Instant::now();
        let limiter = IpLimiter::new(60); // one token per second, burst 60
        assert!(limiter.check(v4(1), t0));
        assert!(limiter.check(v4(2), t0 + secs(0.5)));
        assert_eq!(limiter.tracked(), 2);
        // At t0 + 1s the first bucket is full again; the second still owes half a token.
        limiter.prune(t0 + secs(1.0));
        assert_eq!(limiter.tracked(), 1);
        limiter.prune(t0 + secs(1.5));
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn full_table_prunes_then_allows_untracked() {
        let t0 = Instant::now();
        let limiter = IpLimiter::with_max_tracked(1, 2);
        assert!(limiter.check(v4(1), t0));
        assert!(limiter.check(v4(2), t0));
        assert_eq!(limiter.tracked(), 2);

        // Full and nothing to prune: a new address is allowed but not tracked, while
        // tracked addresses stay limited.
        for _ in 0..5 {
            assert!(limiter.check(v4(3), t0));
        }
        assert_eq!(limiter.tracked(), 2);
        assert!(!limiter.check(v4(1), t0));

        // Once the old buckets have refilled, the next newcomer's prune frees room and
        // it is tracked (and limited) normally.
        let later = t0 + secs(60.0);
        assert!(limiter.check(v4(4), later));
        assert_eq!(limiter.tracked(), 1);
        assert!(!limiter.check(v4(4), later));
    }

    #[test]
    fn prune_when_full_is_throttled() {
        let t0 = Instant::now();
        let limiter = IpLimiter::with_max_tracked(60, 1);
        assert!(limiter.check(v4(1), t0));
        // Full: this newcomer triggers a prune that finds nothing refilled yet.
        assert!(limiter.check(v4(2), t0 + secs(0.1)));
        // v4(1) has refilled by now, but the previous prune was under a second ago, so
        // the table is not scanned again and the newcomer goes untracked.
        assert!(limiter.check(v4(3), t0 + secs(1.05)));
        assert_eq!(limiter.tracked(), 1);
        assert!(limiter.check(v4(3), t0 + secs(1.2)));
        assert_eq!(limiter.tracked(), 1, "v4(1) pruned, v4(3) tracked");
        assert!(limiter.check(v4(3), t0 + secs(1.2)));
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<IpLimiter>();
    }
}
