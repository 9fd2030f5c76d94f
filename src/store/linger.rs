//! When a store writer waits for more appends before it commits a small batch.
//!
//! Every commit costs an fsync (or a database round trip), its written pages and the wake-ups of
//! everyone waiting on it. At a steady high rate a short wait lets one commit carry many appends;
//! at a low rate it would only add latency, so the writer waits only when the recent arrival rate
//! promises enough more appends within the linger.

use std::time::{Duration, Instant};

/// A batch smaller than this may wait for more commands.
const LINGER_BELOW: usize = 64;
/// A small batch waits only when the recent arrival rate promises at least this many more
/// commands within the linger.
const LINGER_WORTH: f64 = 8.0;
/// The time over which the arrival rate is smoothed.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// A writer's linger policy: the longest wait, and the rate commands have been arriving at.
#[derive(Debug)]
pub(crate) struct Linger {
    max: Duration,
    /// Commands a second, smoothed over the last batches.
    per_second: f64,
    last_batch: Instant,
}

impl Linger {
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            max,
            per_second: 0.0,
            last_batch: Instant::now(),
        }
    }

    /// How long a batch of `len` commands should wait for more; `None`: commit at once. The
    /// writer sleeps that long, rather than waking for every command that arrives: at the
    /// current rate the batch fills up in that time, and never waits longer than the linger.
    pub(crate) fn wait(&self, len: usize) -> Option<Duration> {
        let worth = self.per_second * self.max.as_secs_f64() >= LINGER_WORTH;
        if len >= LINGER_BELOW || !worth {
            return None;
        }
        let to_fill = (LINGER_BELOW - len) as f64 / self.per_second;
        Some(self.max.min(Duration::from_secs_f64(to_fill)))
    }

    /// A batch of `commands` was gathered at `now`: they arrived since the previous batch.
    pub(crate) fn record(&mut self, commands: usize, now: Instant) {
        let elapsed = now.duration_since(self.last_batch).as_secs_f64().max(1e-6);
        self.last_batch = now;
        // Weighted by the time each sample covers: bursts gathered while a commit ran count for
        // their short time, not as a rate of their own.
        let weight = 1.0 - (-elapsed / RATE_WINDOW.as_secs_f64()).exp();
        self.per_second += weight * (commands as f64 / elapsed - self.per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(5);

    /// The policy after `batches` batches of `size` commands, `every` apart.
    fn after(max: Duration, size: usize, every: Duration, batches: u32) -> Linger {
        let mut linger = Linger::new(max);
        let start = linger.last_batch;
        for i in 1..=batches {
            linger.record(size, start + every * i);
        }
        linger
    }

    #[test]
    fn a_steady_high_rate_waits_for_bigger_commits() {
        // 10,000 appends a second, committed 20 at a time, for a second.
        let high = after(MAX, 20, Duration::from_millis(2), 500);
        assert!((high.per_second - 10_000.0).abs() < 100.0, "{high:?}");
        // 44 more fill a batch of 64: 4.4 ms at this rate.
        let wait = high.wait(20).expect("a wait").as_secs_f64();
        assert!((wait - 0.0044).abs() < 0.0001, "{wait}");
        assert_eq!(
            high.wait(LINGER_BELOW),
            None,
            "a full batch commits at once"
        );
    }

    #[test]
    fn a_faster_rate_waits_only_until_the_batch_fills() {
        let fast = after(MAX, 50, Duration::from_millis(1), 1_000);
        let wait = fast.wait(14).expect("a wait").as_secs_f64();
        assert!((wait - 0.001).abs() < 0.0001, "{wait}");
        let slower = after(MAX, 8, Duration::from_millis(1), 1_000);
        assert_eq!(
            slower.wait(1),
            Some(MAX),
            "8,000/s brings 63 more in over 5 ms"
        );
    }

    #[test]
    fn a_low_rate_commits_at_once() {
        // 500 appends a second: a 5 ms wait would gather two or three more.
        assert_eq!(after(MAX, 1, Duration::from_millis(2), 50).wait(1), None);
        assert_eq!(after(MAX, 1, Duration::from_secs(1), 5).wait(1), None);
    }

    #[test]
    fn bursts_count_at_their_average_rate() {
        // 1,000 appends a second in bursts of 10 every 10 ms: one starts a batch, the other nine
        // queue during its commit and make the next batch, half a millisecond later.
        let mut linger = Linger::new(MAX);
        let mut now = linger.last_batch;
        for _ in 0..100 {
            now += Duration::from_micros(9_500);
            linger.record(1, now);
            now += Duration::from_micros(500);
            linger.record(9, now);
        }
        assert!((linger.per_second - 1_000.0).abs() < 150.0, "{linger:?}");
        assert_eq!(linger.wait(9), None);
    }

    #[test]
    fn the_rate_follows_a_drop_within_a_few_batches() {
        let mut linger = after(MAX, 20, Duration::from_millis(2), 500);
        let mut now = linger.last_batch;
        for _ in 0..15 {
            now += Duration::from_millis(100);
            linger.record(1, now);
        }
        assert_eq!(linger.wait(1), None, "{linger:?}");
    }

    #[test]
    fn no_linger_configured_never_waits() {
        assert_eq!(
            after(Duration::ZERO, 50, Duration::from_millis(1), 500).wait(1),
            None
        );
    }
}
