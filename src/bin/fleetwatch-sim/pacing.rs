//! Rate control: how many readings should have been sent by a given moment of the run.
//!
//! The send loop wakes every [`TICK`] and sends whatever is due since the start, computed from the
//! elapsed time rather than counted per tick: late or skipped ticks are made up for, fractional
//! rates come out exact over time, and 20,000+ readings per second need only 100 wake-ups.

use std::time::Duration;

/// How often the send loop wakes up.
pub const TICK: Duration = Duration::from_millis(10);

/// Tolerance for floating-point error in `rate × elapsed` (e.g. 0.29 × 100 = 28.999…).
const EPSILON: f64 = 1e-9;

#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    readings_per_second: f64,
    limit: u64,
}

impl Pacer {
    /// `limit` caps the total, for runs bounded by a count.
    pub fn new(readings_per_second: f64, limit: u64) -> Self {
        Pacer {
            readings_per_second,
            limit,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Readings that should have been sent `elapsed` after the start.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let due = (self.readings_per_second * elapsed.as_secs_f64() + EPSILON).floor();
        // `as` saturates: an absurd rate × duration is capped, not wrapped.
        (due as u64).min(self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings sent in each of the first `ticks` ticks.
    fn per_tick(pacer: Pacer, ticks: u32) -> Vec<u64> {
        (1..=ticks)
            .map(|tick| pacer.due_by(TICK * tick) - pacer.due_by(TICK * (tick - 1)))
            .collect()
    }

    #[test]
    fn high_rates_send_the_same_number_every_tick() {
        assert!(per_tick(Pacer::new(20_000.0, u64::MAX), 100)
            .iter()
            .all(|&n| n == 200));
        assert_eq!(
            Pacer::new(20_000.0, u64::MAX).due_by(Duration::from_secs(10)),
            200_000
        );
    }

    #[test]
    fn low_and_fractional_rates_come_out_exact_over_time() {
        let ticks = per_tick(Pacer::new(150.0, u64::MAX), 100);
        assert!(ticks.iter().all(|&n| n <= 2));
        assert_eq!(ticks.iter().sum::<u64>(), 150);
        assert_eq!(Pacer::new(0.5, u64::MAX).due_by(Duration::from_secs(3)), 1);
        assert_eq!(
            Pacer::new(29.0, u64::MAX).due_by(Duration::from_millis(10_000)),
            290
        );
    }

    #[test]
    fn a_count_caps_the_total() {
        let pacer = Pacer::new(1_000.0, 1_500);
        assert_eq!(pacer.due_by(Duration::from_secs(1)), 1_000);
        assert_eq!(pacer.due_by(Duration::from_secs(60)), 1_500);
    }

    #[test]
    fn a_late_tick_catches_up() {
        let pacer = Pacer::new(100.0, u64::MAX);
        assert_eq!(pacer.due_by(Duration::from_millis(250)), 25);
    }
}
