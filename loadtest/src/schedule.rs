//! The open-loop message schedule and the receiver's bookkeeping, sans-IO: times are
//! `Duration`s since an epoch the caller picks, so tests drive them with synthetic
//! clocks.
//!
//! Open loop means a message's send time is fixed by the schedule before the run starts,
//! never by when a reply or the previous send completed. A sender that falls behind
//! sends everything already due at once, and latency is measured from the *scheduled*
//! time, so a stall in the server (or the generator) shows up in the latency of every
//! message it delayed instead of silently lowering the offered rate: this is what keeps
//! the percentiles free of coordinated omission.

use std::ops::Range;
use std::time::Duration;

/// When one sender's messages are due: message `seq` at `offset + seq * interval` after
/// the phase start, for every `seq` in `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    offset_ns: u64,
    interval_ns: u64,
    count: u64,
}

impl Schedule {
    /// The schedule of sender `i` of `senders` sharing `total_rate` messages per second
    /// for `duration`. Senders are phase-shifted by `interval / senders` so the total
    /// offered load is smooth rather than `senders` messages in one burst per interval.
    pub fn for_sender(i: usize, senders: usize, total_rate: f64, duration: Duration) -> Self {
        assert!(i < senders && total_rate > 0.0, "bad schedule parameters");
        let interval_ns = (senders as f64 * 1e9 / total_rate).round().max(1.0) as u64;
        let offset_ns = interval_ns * i as u64 / senders as u64;
        let duration_ns = duration.as_nanos() as u64;
        let count = if offset_ns >= duration_ns {
            0
        } else {
            (duration_ns - offset_ns).div_ceil(interval_ns)
        };
        Self {
            offset_ns,
            interval_ns,
            count,
        }
    }

    /// How many messages the schedule holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// When message `seq` is due, relative to the phase start.
    pub fn due_at(&self, seq: u64) -> Duration {
        Duration::from_nanos(self.offset_ns + self.interval_ns * seq)
    }

    /// When the first message from `next` on is due; `None` when the schedule is done.
    pub fn next_due(&self, next: u64) -> Option<Duration> {
        (next < self.count).then(|| self.due_at(next))
    }

    /// The messages from `next` on that are due at `now` (relative to the phase start):
    /// everything whose scheduled time has passed, however late the sender is.
    pub fn due(&self, next: u64, now: Duration) -> Range<u64> {
        let now_ns = now.as_nanos() as u64;
        if now_ns < self.offset_ns || next >= self.count {
            return next..next;
        }
        // The last message due at or before `now`.
        let last = (now_ns - self.offset_ns) / self.interval_ns;
        next..(last + 1).min(self.count).max(next)
    }
}

/// End-to-end latency of a message: from its *scheduled* send time to its arrival, both
/// relative to the same epoch. A message that arrives "before" it was scheduled (only
/// possible with clock misuse) counts as zero.
pub fn latency(scheduled: Duration, arrived: Duration) -> Duration {
    arrived.saturating_sub(scheduled)
}

/// What a chat message's body carries so the receiver can account for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The measurement phase (a step of `step`; always 0 for `chat`).
    pub phase: u32,
    /// The sending client's index.
    pub sender: u32,
    pub seq: u64,
    /// Scheduled send time in microseconds since the run's epoch.
    pub scheduled_us: u64,
}

const PROBE_TAG: &str = "shoal-load";

impl Probe {
    /// Appends the body text, padded with `x` to at least `size` bytes.
    pub fn encode(&self, size: usize, out: &mut String) {
        use std::fmt::Write as _;
        let start = out.len();
        let _ = write!(
            out,
            "{PROBE_TAG} {} {} {} {}",
            self.phase, self.sender, self.seq, self.scheduled_us
        );
        let written = out.len() - start;
        if written < size {
            out.push(' ');
            out.extend(std::iter::repeat_n('x', size - written - 1));
        }
    }

    /// Reads a body written by [`Probe::encode`]; `None` for anything else.
    pub fn decode(body: &[u8]) -> Option<Probe> {
        let text = std::str::from_utf8(body).ok()?;
        let mut parts = text.split(' ');
        if parts.next()? != PROBE_TAG {
            return None;
        }
        Some(Probe {
            phase: parts.next()?.parse().ok()?,
            sender: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            scheduled_us: parts.next()?.parse().ok()?,
        })
    }
}

/// How a message fitted the flow it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First copy, in order.
    InOrder,
    /// First copy, but a later sequence number arrived before it.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// A sequence number no sender can have produced in this phase (ignored).
    Bogus,
}

/// Per-flow (one sender to one receiver) accounting of sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct FlowTracker {
    seen: Vec<u64>,
    highest: Option<u64>,
    unique: u64,
    duplicated: u64,
    out_of_order: u64,
}

impl FlowTracker {
    /// Sequence numbers beyond this are refused rather than grow the bitmap (a 1 M
    /// messages per flow per phase is far beyond any bounded run).
    pub const MAX_SEQ: u64 = 1 << 24;

    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq >= Self::MAX_SEQ {
            return Arrival::Bogus;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= 1 << bit;
        self.unique += 1;
        match self.highest {
            Some(h) if seq < h => {
                self.out_of_order += 1;
                Arrival::OutOfOrder
            }
            _ => {
                self.highest = Some(seq);
                Arrival::InOrder
            }
        }
    }

    /// Distinct messages received.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    pub fn duplicated(&self) -> u64 {
        self.duplicated
    }

    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// Messages among `0..sent` never received.
    pub fn lost(&self, sent: u64) -> u64 {
        let received = (0..sent.min(Self::MAX_SEQ))
            .filter(|&s| {
                self.seen
                    .get((s / 64) as usize)
                    .is_some_and(|w| w & (1 << (s % 64)) != 0)
            })
            .count() as u64;
        sent - received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn schedule_spreads_senders_and_counts() {
        // 1000 msg/s over 10 senders: each sends every 10 ms, shifted by 1 ms each.
        let s0 = Schedule::for_sender(0, 10, 1000.0, Duration::from_secs(1));
        let s3 = Schedule::for_sender(3, 10, 1000.0, Duration::from_secs(1));
        assert_eq!(s0.due_at(0), Duration::ZERO);
        assert_eq!(s0.due_at(5), 50 * MS);
        assert_eq!(s3.due_at(0), 3 * MS);
        assert_eq!(s3.due_at(2), 23 * MS);
        assert_eq!(s0.count(), 100);
        assert_eq!(s3.count(), 100);
        let total: u64 = (0..10)
            .map(|i| Schedule::for_sender(i, 10, 1000.0, Duration::from_secs(1)).count())
            .sum();
        assert_eq!(total, 1000);
        assert_eq!(s3.next_due(99), Some(993 * MS));
        assert_eq!(s3.next_due(100), None);
    }

    #[test]
    fn late_sender_catches_up_without_moving_the_schedule() {
        let s = Schedule::for_sender(1, 4, 400.0, Duration::from_secs(1)); // every 10 ms from 2.5 ms
        // Synthetic clock: before the first message nothing is due.
        assert_eq!(s.due(0, MS), 0..0);
        // On time: exactly message 0.
        assert_eq!(s.due(0, 3 * MS), 0..1);
        // The sender stalls for 50 ms: everything scheduled meanwhile is due at once,
        // and each keeps its own scheduled time.
        let burst = s.due(1, 55 * MS);
        assert_eq!(burst, 1..6);
        let times: Vec<_> = burst.map(|q| s.due_at(q)).collect();
        assert_eq!(
            times,
            [12_500, 22_500, 32_500, 42_500, 52_500].map(Duration::from_micros)
        );
        // Past the end, only what remains.
        assert_eq!(s.due(98, Duration::from_secs(5)), 98..100);
        assert_eq!(s.due(100, Duration::from_secs(5)), 100..100);
    }

    #[test]
    fn latency_counts_from_the_scheduled_time() {
        // A message scheduled at 12.5 ms, actually sent at 55 ms after a stall, and
        // received at 56 ms: its latency is 43.5 ms, not the 1 ms the wire took.
        let s = Schedule::for_sender(1, 4, 400.0, Duration::from_secs(1));
        let scheduled = s.due_at(1);
        let sent = 55 * MS;
        let arrived = 56 * MS;
        assert_eq!(latency(scheduled, arrived), Duration::from_micros(43_500));
        assert!(latency(scheduled, arrived) > arrived - sent);
        assert_eq!(latency(10 * MS, 5 * MS), Duration::ZERO);
    }

    #[test]
    fn probe_round_trip_and_padding() {
        let p = Probe {
            phase: 2,
            sender: 17,
            seq: 12345,
            scheduled_us: 987_654_321,
        };
        let mut s = String::new();
        p.encode(100, &mut s);
        assert_eq!(s.len(), 100);
        assert!(s.starts_with("shoal-load 2 17 12345 987654321 xxx"));
        assert_eq!(Probe::decode(s.as_bytes()), Some(p));
        let mut short = String::new();
        p.encode(0, &mut short);
        assert_eq!(short, "shoal-load 2 17 12345 987654321");
        assert_eq!(Probe::decode(short.as_bytes()), Some(p));
        assert_eq!(Probe::decode(b"hello"), None);
        assert_eq!(Probe::decode(b"shoal-load 1 2 x 4"), None);
    }

    #[test]
    fn tracker_counts_loss_duplicates_and_reordering() {
        let mut t = FlowTracker::default();
        for seq in [0, 1, 3, 2, 3, 5, 5, 5, 70] {
            t.record(seq);
        }
        assert_eq!(t.unique(), 6); // 0 1 2 3 5 70
        assert_eq!(t.duplicated(), 3); // 3, 5, 5
        assert_eq!(t.out_of_order(), 1); // 2 after 3
        assert_eq!(t.lost(71), 71 - 6);
        assert_eq!(t.lost(6), 1); // 4
        assert_eq!(t.record(FlowTracker::MAX_SEQ), Arrival::Bogus);
    }
}
