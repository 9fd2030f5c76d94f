//! Rollup retention: per-minute rollups older than `--minute-rollup-retention`, and per-hour
//! rollups older than `--hour-rollup-retention`, are removed in the background, so that the read
//! models stop growing at a constant load as the event store does.
//!
//! Without it, every device adds a minute row every minute it reports, for ever: at the reference
//! load of 10,000 devices that is 14 million rows a day. Age is the bucket's start (reading
//! time). A pass walks the devices (the fleet's row counts as one) a few hundred per transaction,
//! on the read models' own thread between their commits, so it never holds up a commit for long.
//! A crash during a pass leaves each transaction done or not: the next pass finishes the job.

use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use super::fold::StoredBucket;
use super::sqlite::Writer;
use super::ReadModelError;

/// How long each stored width of rollup is kept; zero keeps it for ever.
#[derive(Debug, Clone, Copy, Default)]
pub struct RollupRetention {
    pub minute: Duration,
    pub hour: Duration,
}

impl RollupRetention {
    fn of(&self, width: StoredBucket) -> Duration {
        match width {
            StoredBucket::Minute => self.minute,
            StoredBucket::Hour => self.hour,
        }
    }

    /// The widths with a retention: minutes, then hours.
    fn limited(&self) -> Vec<StoredBucket> {
        StoredBucket::ALL
            .into_iter()
            .filter(|w| !self.of(*w).is_zero())
            .collect()
    }
}

/// Devices one transaction of a pass looks at.
const DEVICES_PER_STEP: usize = 256;
/// The pause between two steps of a pass.
const PAUSE: Duration = Duration::from_millis(20);

/// Where a pass is: the width being trimmed, the rows older than `before` (Unix seconds) go, and
/// the last device key done.
#[derive(Debug, Clone, Copy)]
struct Pass {
    width: usize,
    before: i64,
    after: i64,
    removed: usize,
}

/// Runs passes a step at a time, when [`Pruner::due`] says so.
pub(super) struct Pruner {
    retention: RollupRetention,
    widths: Vec<StoredBucket>,
    every: Duration,
    pass: Option<Pass>,
    next: Instant,
}

impl Pruner {
    pub(super) fn new(retention: RollupRetention) -> Self {
        let widths = retention.limited();
        let shortest = widths
            .iter()
            .map(|w| retention.of(*w))
            .min()
            .unwrap_or(Duration::MAX);
        Self {
            retention,
            widths,
            every: crate::retention::interval(shortest),
            pass: None,
            // The first pass right away: an engine restarted after a long stop has the most to do.
            next: Instant::now(),
        }
    }

    /// When the next step is due; `None` when nothing is ever removed.
    pub(super) fn due(&self) -> Option<Instant> {
        (!self.widths.is_empty()).then_some(self.next)
    }

    /// Removes one step's rows and schedules the next step, or the next pass.
    pub(super) fn step(&mut self, writer: &mut Writer) -> Result<(), ReadModelError> {
        let mut pass = match self.pass {
            Some(pass) => pass,
            None => match self.start(0) {
                Some(pass) => pass,
                None => {
                    self.next = Instant::now() + self.every;
                    return Ok(());
                }
            },
        };
        let width = self.widths[pass.width];
        let (removed, next) =
            writer.remove_rollups(width, pass.before, pass.after, DEVICES_PER_STEP)?;
        pass.removed += removed;
        self.pass = match next {
            Some(after) => Some(Pass { after, ..pass }),
            None => {
                if pass.removed > 0 {
                    tracing::debug!(width = ?width, rows = pass.removed, "old rollups removed");
                }
                metrics::counter!("fleetwatch_rollups_removed_total")
                    .increment(pass.removed as u64);
                self.start(pass.width + 1)
            }
        };
        self.next = Instant::now()
            + if self.pass.is_some() {
                PAUSE
            } else {
                self.every
            };
        Ok(())
    }

    /// A pass over the first width from the `from`th on whose cut-off is a time (a retention of
    /// millennia has none: nothing is that old).
    fn start(&self, from: usize) -> Option<Pass> {
        (from..self.widths.len()).find_map(|index| {
            let retention =
                chrono::Duration::from_std(self.retention.of(self.widths[index])).ok()?;
            let before = Utc::now().checked_sub_signed(retention)?.timestamp();
            Some(Pass {
                width: index,
                before,
                after: 0,
                removed: 0,
            })
        })
    }
}
