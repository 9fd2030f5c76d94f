//! Counts of sent, confirmed and failed readings, shared by the senders and the progress log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Failures logged one by one before the rest are only counted.
const FAILURES_LOGGED: u64 = 5;

#[derive(Debug, Default)]
pub struct Tally {
    sent: AtomicU64,
    confirmed: AtomicU64,
    failed: AtomicU64,
    failure_reports: AtomicU64,
}

impl Tally {
    /// Handed to the broker, or to the HTTP client in a request.
    pub fn record_sent(&self, readings: u64) {
        self.sent.fetch_add(readings, Ordering::Relaxed);
    }

    /// Confirmed by the broker, or accepted by the engine (202).
    pub fn record_confirmed(&self, readings: u64) {
        self.confirmed.fetch_add(readings, Ordering::Relaxed);
    }

    /// Refused or lost; the first few reasons are logged.
    pub fn record_failed(&self, readings: u64, reason: impl fmt::Display) {
        self.failed.fetch_add(readings, Ordering::Relaxed);
        let reported = self.failure_reports.fetch_add(1, Ordering::Relaxed);
        if reported < FAILURES_LOGGED {
            tracing::warn!(readings, "failed: {reason}");
        } else if reported == FAILURES_LOGGED {
            tracing::warn!("more failures: counted, no longer logged");
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub confirmed: u64,
    pub failed: u64,
}

impl Counts {
    /// Sent but neither confirmed nor failed: still in flight, or abandoned.
    pub fn unconfirmed(&self) -> u64 {
        self.sent.saturating_sub(self.confirmed + self.failed)
    }

    /// Every sent reading was confirmed.
    pub fn all_confirmed(&self) -> bool {
        self.failed == 0 && self.unconfirmed() == 0
    }

    /// The final report, e.g. `sent 6000 readings (6000 confirmed, 0 failed) in 60.0 s = 100.0/s`.
    pub fn summary(&self, elapsed: Duration) -> String {
        let seconds = elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            self.sent as f64 / seconds
        } else {
            0.0
        };
        let unconfirmed = match self.unconfirmed() {
            0 => String::new(),
            n => format!(", {n} unconfirmed"),
        };
        format!(
            "sent {} readings ({} confirmed, {} failed{unconfirmed}) in {seconds:.1} s = {rate:.1}/s",
            self.sent, self.confirmed, self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reports_counts_and_rate() {
        let tally = Tally::default();
        tally.record_sent(6000);
        tally.record_confirmed(6000);
        let counts = tally.counts();
        assert!(counts.all_confirmed());
        assert_eq!(
            counts.summary(Duration::from_secs(60)),
            "sent 6000 readings (6000 confirmed, 0 failed) in 60.0 s = 100.0/s"
        );
    }

    #[test]
    fn unconfirmed_readings_are_reported_and_are_not_success() {
        let tally = Tally::default();
        tally.record_sent(10);
        tally.record_confirmed(7);
        tally.record_failed(1, "nack");
        let counts = tally.counts();
        assert_eq!(counts.unconfirmed(), 2);
        assert!(!counts.all_confirmed());
        assert_eq!(
            counts.summary(Duration::from_secs(2)),
            "sent 10 readings (7 confirmed, 1 failed, 2 unconfirmed) in 2.0 s = 5.0/s"
        );
    }
}
