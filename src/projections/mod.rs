//! Read models: answers about the past, built from the store's events and kept up to date as
//! events are committed.
//!
//! One thread follows the store with a [`Subscription`] from the read models' checkpoint, folds
//! the events in memory ([`fold`]) and commits what changed with the new checkpoint in one
//! transaction ([`sqlite`]), every [`COMMIT_EVERY`] or [`COMMIT_EVENTS`] events. A device's
//! readings within one commit land in the same minute and hour rows, so the rows written depend
//! on the devices reporting, not on the rate; a busy fleet's rollups (more than
//! [`ROLLUP_ROWS_AT_ONCE`] rows, no alarm or condition changed) wait up to
//! [`ROLLUPS_COMMIT_EVERY`]. After a SIGKILL the read models resume from the checkpoint and never
//! count an event twice. They answer up to a commit behind the events.
//!
//! Kept here:
//! * temperature buckets per device and for the fleet, per minute and per hour (a day is its 24
//!   hours): count, sum (mean), min, max, the latest position, distance travelled and alarms
//!   raised; never removed by retention, so they outlive the raw readings;
//! * zone crossings, for zone reports; devices' registration times;
//! * the conditions that hold now (outside a zone, out of a range, offline), to count devices;
//! * every alarm with its state (open, acknowledged, cleared), for `GET /api/alarms`;
//! * readings and events per second over the last minute, in memory ([`Rates`]).
//!
//! The storage is behind [`sqlite::Writer`] and [`sqlite::Readers`]; another backend (PostgreSQL)
//! would implement the same two.

pub mod fold;
mod rates;
mod retention;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetwatch_domain::Location;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::rules::RULES_STREAM;
use crate::store::{EventStore, RecordedEvent, StoreError};
use crate::subscription::Subscription;
pub use fold::{Bucket, StoredBucket, FLEET};
pub use rates::Rates;
pub use retention::RollupRetention;
pub use sqlite::{open as open_storage, Readers as Queries, Writer as Storage};

/// Devices known, and devices by the condition they are in now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceCounts {
    pub known: u64,
    pub outside_zone: u64,
    pub out_of_range: u64,
    pub offline: u64,
}

/// Which alarms to list; `None`: any.
#[derive(Debug, Clone, Default)]
pub struct AlarmFilter {
    pub state: Option<fleetwatch_domain::AlarmState>,
    /// Only alarms not cleared (open or acknowledged).
    pub active: bool,
    pub device: Option<String>,
    pub kind: Option<fleetwatch_domain::AlarmKind>,
    pub severity: Option<fleetwatch_domain::Severity>,
    /// Alarms of this zone (outside-zone alarms only).
    pub zone: Option<String>,
    /// Alarms of this temperature range (out-of-range alarms only).
    pub range: Option<String>,
}

/// An alarm as the alarms list keeps it. Times are microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRow {
    /// The position of the event that opened it: the list's order and paging cursor.
    pub position: u64,
    pub id: String,
    pub device_id: String,
    pub kind: String,
    pub rule: Option<String>,
    pub severity: String,
    pub state: String,
    pub opened_at: i64,
    pub cause_version: u64,
    pub sequence: u32,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub comment: Option<String>,
    pub cleared_at: Option<i64>,
}

/// How often the read models commit what they folded.
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Longest a busy fleet's rollups wait for a commit. Each device's current minute and hour rows
/// are rewritten at every commit that has a reading of it: with 10,000 devices reading once a
/// second, a commit a second is two row writes per reading, a commit every 5 s a fifth of that.
pub const ROLLUPS_COMMIT_EVERY: Duration = Duration::from_secs(5);
/// Rollup rows that are committed at once, however busy: a small fleet's rollups are as fresh as
/// its alarms.
const ROLLUP_ROWS_AT_ONCE: usize = 1_000;
/// Events folded before a commit, whatever the time.
pub const COMMIT_EVENTS: u64 = 100_000;
/// Events read back at a time while catching up.
const PAGE: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("read model storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("read model storage: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("read model storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("reading the events: {0}")]
    Store(#[from] StoreError),
}

/// One bucket of temperature readings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketRow {
    /// Unix seconds, UTC.
    #[serde(skip)]
    pub start: i64,
    pub count: u64,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last_location: Option<Location>,
    pub distance_m: f64,
    pub alarms: u64,
}

impl BucketRow {
    pub fn start(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.start, 0).unwrap_or_default()
    }
}

/// A zone crossing of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    pub device_id: String,
    /// Reading time, microseconds.
    pub at: i64,
    pub entered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopBy {
    Alarms,
    Readings,
    Distance,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopEntry {
    pub device_id: String,
    pub value: f64,
}

/// The query side, cheap to clone.
#[derive(Clone)]
pub struct ReadModels {
    readers: Queries,
    rates: Rates,
}

impl ReadModels {
    pub fn queries(&self) -> &Queries {
        &self.readers
    }

    pub fn rates(&self) -> &Rates {
        &self.rates
    }
}

/// Opens the read models in `dir` and starts following `store` on a thread of its own.
pub fn start(
    store: Arc<dyn EventStore>,
    dir: &std::path::Path,
    retention: RollupRetention,
    shutdown: CancellationToken,
) -> Result<(ReadModels, std::thread::JoinHandle<()>), ReadModelError> {
    let (writer, readers) = sqlite::open(dir)?;
    let rates = Rates::default();
    let runner = Runner {
        writer,
        rates: rates.clone(),
        seen: foldhash::HashMap::default(),
        pruner: retention::Pruner::new(retention),
    };
    let thread = std::thread::Builder::new()
        .name("read-models".into())
        .spawn(move || {
            crate::background::lower_this_threads_priority();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the read models' runtime");
                    return;
                }
            };
            runtime.block_on(runner.run(store, shutdown));
        })?;
    Ok((ReadModels { readers, rates }, thread))
}

/// Sleeps until `at`; for ever when there is no such time.
async fn sleep_until_due(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the changes folded `since` the last commit should be committed at this tick.
fn commit_due(changes: &fold::Changes, since: Duration) -> bool {
    changes.has_alarm_changes()
        || changes.rows() <= ROLLUP_ROWS_AT_ONCE
        || since >= ROLLUPS_COMMIT_EVERY
}

struct Runner {
    writer: sqlite::Writer,
    rates: Rates,
    /// Devices' latest live readings already written, so that the next one's distance needs no
    /// read; dropped when it grows past [`SEEN_CACHE`].
    seen: foldhash::HashMap<String, (i64, Location)>,
    /// Removes rollups past their retention, a step at a time between commits.
    pruner: retention::Pruner,
}

const SEEN_CACHE: usize = 1_000_000;

impl Runner {
    async fn run(mut self, store: Arc<dyn EventStore>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow(store.clone(), &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    // The store or the read model storage failed: start again from the
                    // checkpoint, which only moves with what was written.
                    tracing::warn!(error = %e, retry_in = ?backoff, "read models stopped; resuming from their checkpoint");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Folds and commits until shutdown (`Ok`) or a failure.
    async fn follow(
        &mut self,
        store: Arc<dyn EventStore>,
        shutdown: &CancellationToken,
    ) -> Result<(), ReadModelError> {
        let mut subscription = Subscription::new(store, self.writer.checkpoint()?, PAGE);
        let mut changes = fold::Changes::default();
        let mut committed = tokio::time::Instant::now();
        let mut due = committed + COMMIT_EVERY;
        loop {
            tokio::select! {
                delivery = subscription.next() => {
                    let delivery = delivery?;
                    for event in delivery.events() {
                        self.fold(&mut changes, event);
                    }
                    if delivery.is_live() {
                        self.rates.record(delivery.events());
                    }
                    if changes.events >= COMMIT_EVENTS {
                        self.commit(&mut changes, subscription.position())?;
                        committed = tokio::time::Instant::now();
                        due = committed + COMMIT_EVERY;
                    }
                }
                _ = tokio::time::sleep_until(due) => {
                    // Alarms, conditions and a small fleet's rollups go at once; a busy fleet's
                    // rollups, crossings and registrations gather longer, which saves most of
                    // their writes.
                    if commit_due(&changes, committed.elapsed()) {
                        self.commit(&mut changes, subscription.position())?;
                        committed = tokio::time::Instant::now();
                    }
                    due = tokio::time::Instant::now() + COMMIT_EVERY;
                }
                _ = sleep_until_due(self.pruner.due()) => self.pruner.step(&mut self.writer)?,
                _ = shutdown.cancelled() => {
                    return self.commit(&mut changes, subscription.position());
                }
            }
        }
    }

    fn fold(&self, changes: &mut fold::Changes, event: &RecordedEvent) {
        if event.stream == RULES_STREAM {
            match codec::decode_rules_event(event) {
                Ok(rules) => changes.rules_event(&rules),
                Err(_) => changes.skip(),
            }
            return;
        }
        if event.stream.starts_with('$') {
            return changes.skip();
        }
        // A damaged event counts for nothing here; the device reports it when asked.
        match codec::decode_device_event(event) {
            Ok(device_event) => changes.device_event(&device_event, event.position, |device| {
                self.seen
                    .get(device)
                    .copied()
                    .or_else(|| self.writer.last_seen(device))
            }),
            Err(_) => changes.skip(),
        }
    }

    fn commit(&mut self, changes: &mut fold::Changes, position: u64) -> Result<(), ReadModelError> {
        if changes.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.writer.commit(changes, position)?;
        metrics::histogram!("fleetwatch_read_models_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("fleetwatch_read_models_position").set(position as f64);
        if self.seen.len() + changes.last_seen.len() > SEEN_CACHE {
            self.seen.clear();
        }
        self.seen.extend(std::mem::take(&mut changes.last_seen));
        *changes = fold::Changes::default();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fleetwatch_domain::{DeviceEvent, DeviceId, Temperature};

    use super::*;

    fn readings(devices: usize) -> fold::Changes {
        let mut changes = fold::Changes::default();
        let at = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        for i in 0..devices {
            let event = DeviceEvent::ReadingRecorded {
                device_id: DeviceId::parse(format!("d-{i}")).unwrap(),
                at,
                location: Location::new(52.0, 4.0).unwrap(),
                temperature: Temperature::new(5.0).unwrap(),
                rules_version: 0,
                moved: false,
                temperature_changed: false,
                late: false,
            };
            changes.device_event(&event, i as u64 + 1, |_| None);
        }
        changes
    }

    #[test]
    fn a_small_fleets_rollups_are_committed_at_every_tick() {
        let changes = readings(10);
        assert_eq!(changes.rows(), 2 * (10 + 1));
        assert!(commit_due(&changes, COMMIT_EVERY));
    }

    #[test]
    fn a_busy_fleets_rollups_gather_until_their_longest_wait() {
        let changes = readings(1_000);
        assert!(changes.rows() > ROLLUP_ROWS_AT_ONCE);
        assert!(!commit_due(&changes, COMMIT_EVERY));
        assert!(!commit_due(&changes, ROLLUPS_COMMIT_EVERY - COMMIT_EVERY));
        assert!(commit_due(&changes, ROLLUPS_COMMIT_EVERY));
    }

    #[test]
    fn an_alarm_change_is_committed_at_once_however_busy() {
        let mut changes = readings(1_000);
        changes
            .conditions
            .push(fold::ConditionChange::Began(fold::Holding {
                device: "d-1".into(),
                kind: fold::ConditionKind::Offline,
                rule: String::new(),
            }));
        assert!(commit_due(&changes, COMMIT_EVERY));
    }
}
