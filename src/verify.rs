//! `fleetwatch verify`: checks a stopped engine's store, read-only, with the decoders the engine
//! itself uses ([`crate::codec`]), and lists every event and snapshot it would fail to read.

use std::fmt;
use std::path::Path;

use fleetwatch_domain::DeviceId;

use crate::codec::{self, DamagedEvent};
use crate::rules::RULES_STREAM;
use crate::store::{ReadOnlyStore, RecordedEvent, Snapshot, StoreError, UnreadableRow};

/// Rows read at once; keeps memory flat on stores of any size.
const PAGE: usize = 10_000;

/// A snapshot the engine would ignore (and replay the device's whole history instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableSnapshot {
    pub stream: String,
    pub version: u64,
    pub reason: String,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub events_checked: u64,
    pub snapshots_checked: u64,
    pub damaged_events: Vec<DamagedEvent>,
    pub unreadable_snapshots: Vec<UnreadableSnapshot>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.damaged_events.is_empty() && self.unreadable_snapshots.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.damaged_events {
            writeln!(
                f,
                "damaged event: stream {}, version {}, position {}, type {}: {}",
                e.stream, e.version, e.position, e.event_type, e.reason
            )?;
        }
        for s in &self.unreadable_snapshots {
            writeln!(
                f,
                "unreadable snapshot: stream {}, version {}: {}",
                s.stream, s.version, s.reason
            )?;
        }
        write!(
            f,
            "checked {} events and {} snapshots: ",
            self.events_checked, self.snapshots_checked
        )?;
        if self.is_clean() {
            writeln!(f, "clean")
        } else {
            writeln!(
                f,
                "{} damaged events, {} unreadable snapshots",
                self.damaged_events.len(),
                self.unreadable_snapshots.len()
            )
        }
    }
}

/// Checks the store in `data_dir` without writing to it. An error means it could not be read at
/// all; damage is in the report.
pub fn verify_store(data_dir: &Path) -> Result<Report, StoreError> {
    let store = ReadOnlyStore::open(data_dir)?;
    let mut report = Report::default();
    let mut after = 0;
    loop {
        let page = store.read_all(after, PAGE)?;
        for row in &page {
            report.events_checked += 1;
            let checked = match row {
                Ok(event) => {
                    after = event.position;
                    check_event(event)
                }
                Err(row) => {
                    after = row.position;
                    Err(damaged_row(row))
                }
            };
            if let Err(damaged) = checked {
                report.damaged_events.push(damaged);
            }
        }
        if page.len() < PAGE {
            break;
        }
    }
    let mut after = String::new();
    loop {
        let page = store.snapshots(&after, PAGE)?;
        for snapshot in &page {
            report.snapshots_checked += 1;
            if let Err(reason) = check_snapshot(snapshot) {
                report.unreadable_snapshots.push(UnreadableSnapshot {
                    stream: snapshot.stream.clone(),
                    version: snapshot.version,
                    reason,
                });
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.stream.clone(),
            _ => break,
        }
    }
    Ok(report)
}

/// Decodes an event the way the engine would when it loads it.
fn check_event(event: &RecordedEvent) -> Result<(), DamagedEvent> {
    if event.stream == RULES_STREAM {
        codec::decode_rules_event(event).map(drop)
    } else if event.stream.starts_with('$') {
        // No other system stream exists yet; nothing in this build reads one.
        Ok(())
    } else {
        codec::decode_device_event(event).map(drop)
    }
}

fn damaged_row(row: &UnreadableRow) -> DamagedEvent {
    DamagedEvent {
        stream: row.stream.clone().unwrap_or_else(|| "?".into()),
        version: row.version.unwrap_or_default(),
        position: row.position,
        event_type: "?".into(),
        reason: format!("unreadable row: {}", row.reason),
    }
}

fn check_snapshot(snapshot: &Snapshot) -> Result<(), String> {
    let id = DeviceId::parse(snapshot.stream.as_str())
        .map_err(|e| format!("not a device's snapshot: {e}"))?;
    codec::decode_device_snapshot(&id, snapshot)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleetwatch_domain::{DeviceEvent, Location, RuleId, RulesEvent, Temperature};

    use super::*;
    use crate::store::{EventStore, NewEvent, SqliteStore, SqliteStoreOptions};

    fn registered(device: &str) -> NewEvent {
        codec::encode_device_event(&DeviceEvent::DeviceRegistered {
            device_id: DeviceId::parse(device).unwrap(),
            at: chrono::Utc::now(),
            location: Location::new(52.0, 4.0).unwrap(),
            temperature: Temperature::checked("temperature", 5.0).unwrap(),
        })
    }

    /// Every file of the directory with its size and a hash of its contents.
    fn files(dir: &Path) -> BTreeMap<String, (usize, u64)> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = std::fs::read(e.path()).unwrap();
                let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(&bytes);
                (
                    e.file_name().to_string_lossy().into_owned(),
                    (bytes.len(), hash),
                )
            })
            .collect()
    }

    async fn store_with(dir: &Path, events: &[(&str, NewEvent)]) {
        let store = SqliteStore::open(dir, SqliteStoreOptions::default()).unwrap();
        for (stream, event) in events {
            let version = store.stream_version(stream).await.unwrap().unwrap_or(0);
            store
                .append(stream, version, vec![event.clone()], None)
                .await
                .unwrap();
        }
        store.close();
    }

    fn damage(dir: &Path, sql: &str) {
        let db = rusqlite::Connection::open(dir.join("events.sqlite3")).unwrap();
        assert!(db.execute(sql, []).unwrap() > 0, "{sql}");
    }

    #[tokio::test]
    async fn a_clean_store_is_clean_and_is_not_written_to() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), &[("d-1", registered("d-1"))]).await;
        let before = files(dir.path());
        let report = verify_store(dir.path()).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.events_checked, 1);
        assert_eq!(files(dir.path()), before, "nothing created or changed");
    }

    #[tokio::test]
    async fn every_damaged_event_and_snapshot_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let rule = codec::encode_rules_event(&RulesEvent::ZoneRemoved {
            zone_id: RuleId::parse("z").unwrap(),
        });
        store_with(
            dir.path(),
            &[
                ("d-1", registered("d-1")),
                ("$rules", rule),
                ("d-2", registered("d-2")),
                ("d-3", registered("d-3")),
            ],
        )
        .await;
        damage(
            dir.path(),
            "UPDATE events SET payload = CAST('{broken' AS BLOB)
             WHERE stream IN (SELECT id FROM streams WHERE name IN ('d-1', '$rules'))",
        );
        damage(
            dir.path(),
            "UPDATE events SET payload = x'00ff'
             WHERE stream = (SELECT id FROM streams WHERE name = 'd-3')",
        );
        damage(
            dir.path(),
            "INSERT INTO snapshots VALUES
             ((SELECT id FROM streams WHERE name = 'd-2'), 1, 1, CAST('{not a device' AS BLOB))",
        );
        let report = verify_store(dir.path()).unwrap();
        let named: Vec<(&str, u64, u64)> = report
            .damaged_events
            .iter()
            .map(|e| (e.stream.as_str(), e.version, e.position))
            .collect();
        assert_eq!(named, [("d-1", 1, 1), ("$rules", 1, 2), ("d-3", 1, 4)]);
        assert_eq!(report.unreadable_snapshots.len(), 1);
        assert_eq!(report.unreadable_snapshots[0].stream, "d-2");
        assert!(!report.is_clean());
        let text = report.to_string();
        assert!(
            text.contains(
                "damaged event: stream d-1, version 1, position 1, type DeviceRegistered"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn events_still_in_the_write_ahead_log_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        // Left open, as by a killed engine: the event is committed to the WAL file only.
        let store = SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap();
        store
            .append("d-1", 0, vec![registered("d-1")], None)
            .await
            .unwrap();
        assert!(dir.path().join("events.sqlite3-wal").exists());
        let report = verify_store(dir.path()).unwrap();
        assert_eq!(report.events_checked, 1, "{report}");
        assert!(report.is_clean(), "{report}");
        store.close();
    }

    #[test]
    fn a_missing_store_is_an_error_and_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nothing-here");
        assert!(verify_store(&missing).is_err());
        assert!(!missing.exists());
    }
}
