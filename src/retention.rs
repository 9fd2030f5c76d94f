//! Retention: raw reading events older than `--reading-retention` are removed in the background,
//! so that an engine left running for months stops growing.
//!
//! Only readings go (`ReadingRecorded`, and the `LocationChanged` / `TemperatureChanged` of older
//! stores); registrations, zone, range and alarm events are kept for ever. A reading is removed
//! only once a snapshot of its device covers it (its version is at or below the snapshot's), so a
//! device restores from its snapshot plus the events after it exactly as before. Age is the
//! reading's own time (`at`).
//!
//! A pass walks every device with a snapshot, a few hundred per store write, with a pause between
//! writes so that appends are never held up for long. Each write is one transaction: a crash
//! during a pass loses or breaks nothing. SQLite reuses the freed pages, so at a constant load the
//! database levels off at about a retention period of readings.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::codec::READING_TYPES;
use crate::store::EventStore;

/// Devices one store write of a pass looks at.
const STREAMS_PER_WRITE: usize = 256;
/// The pause between two writes of a pass.
const PAUSE: Duration = Duration::from_millis(20);

/// How often a pass starts: a tenth of the retention, between 1 s and 1 min.
pub fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs passes until `shutdown`; `retention` zero keeps everything (nothing runs).
pub fn spawn(
    store: Arc<dyn EventStore>,
    retention: Duration,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if retention.is_zero() {
        return None;
    }
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let every = interval(retention.to_std().unwrap_or(Duration::MAX));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(before) = chrono::Utc::now().checked_sub_signed(retention) else {
                continue;
            };
            tokio::select! {
                _ = pass(store.as_ref(), before) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }))
}

/// One pass over every device with a snapshot.
async fn pass(store: &dyn EventStore, before: chrono::DateTime<chrono::Utc>) {
    let started = std::time::Instant::now();
    let mut after = 0;
    let mut removed = 0;
    loop {
        match store
            .prune(&READING_TYPES, before, after, STREAMS_PER_WRITE)
            .await
        {
            Ok(pruned) => {
                removed += pruned.events;
                metrics::counter!("fleetwatch_retention_removed_events_total")
                    .increment(pruned.events);
                match pruned.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
            // A failing store reports itself; the next pass tries again.
            Err(e) => {
                tracing::debug!(error = %e, "retention pass stopped");
                return;
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
    metrics::histogram!("fleetwatch_retention_pass_seconds")
        .record(started.elapsed().as_secs_f64());
    if removed > 0 {
        tracing::info!(
            removed,
            before = %before.to_rfc3339(),
            seconds = started.elapsed().as_secs_f64(),
            "retention removed readings covered by snapshots"
        );
    }
}
