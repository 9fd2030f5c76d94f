//! The tables of the embedded store, and the migration of stores written in an older format.
//!
//! Format 2 (`PRAGMA user_version = 2`) keeps each event in one narrow row: the stream and the
//! event type are small integer keys into `streams` and `event_types` rather than text repeated
//! in every row and index, the payload is the codec's bytes, and `at` (the time of what the event
//! records, in microseconds) is indexed per stream for lookups by time. About 80 bytes a reading,
//! indexes included (docs/benchmarks.md).
//!
//! Format 3 adds `streams.wake_at`: when a device next needs time to pass (its offline or dwell
//! deadline), written with its events. A format-2 store gains the column in place, and every
//! device stream is due at once, so that each device is judged once against the offline rule.
//!
//! Format 4 drops `streams.version`, which every append used to rewrite. A stream's version is
//! the larger of its newest event's and its snapshot's: retention removes only events a snapshot
//! covers, so that is exact, and it is two index seeks on the rare paths that need it
//! ([`STREAM_VERSION`]). Without the per-append update of the stream's row the engine spends
//! 5–7 % less CPU per reading (docs/benchmarks.md). `wake_at` is written only when it moves enough
//! to matter (see the writer). A format-2 or format-3 store is brought to format 4 in place.
//!
//! Format 1 (no `user_version`; written by fleetwatch before 2026-11-30) had text keys and JSON
//! in every row. It is migrated in place, in one transaction, the first time a newer build opens
//! it: positions, versions and payloads are kept as they were (the codec reads JSON payloads as
//! event schema 1), so every device replays to the same state and resumed live streams continue.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

/// The store format this build writes.
pub const FORMAT: i64 = 4;

const TABLES: &str = "
CREATE TABLE streams (
    id      INTEGER PRIMARY KEY,
    name    TEXT    NOT NULL UNIQUE,
    -- Readings taken before this (microseconds) were removed by retention; NULL: none were.
    readings_removed_before INTEGER,
    -- When the stream's aggregate next needs time to pass (microseconds); NULL: nothing is due.
    wake_at INTEGER
);
CREATE TABLE event_types (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
);
CREATE TABLE events (
    position    INTEGER PRIMARY KEY,
    stream      INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    type        INTEGER NOT NULL,
    schema      INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    at          INTEGER,
    payload     BLOB    NOT NULL
);
CREATE UNIQUE INDEX events_by_stream ON events (stream, version);
-- Not a partial index (`WHERE at IS NOT NULL`): SQLite re-prepares a statement that might use a
-- partial index each time a bound value changes, which cost more than the few rules events the
-- condition would leave out.
CREATE INDEX events_by_time ON events (stream, at);
CREATE TABLE snapshots (
    stream  INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    schema  INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
-- The one row a failing store writes to find out whether it can write again.
CREATE TABLE probe (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
";

/// Why a store cannot be brought to this build's format.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store is in format {0}, newer than this build reads ({FORMAT}): use a newer fleetwatch")]
    Newer(i64),
}

pub fn format(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |row| row.get(0),
    )
}

/// Creates the tables of a new store, or migrates an older one; a no-op on a current store.
pub fn prepare(conn: &mut Connection) -> Result<(), SchemaError> {
    match format(conn)? {
        FORMAT => Ok(()),
        0 if has_table(conn, "events")? => {
            migrate_from_1(conn)?;
            Ok(())
        }
        older @ (2 | 3) => {
            let tx = conn.transaction()?;
            if older == 2 {
                tx.execute_batch("ALTER TABLE streams ADD COLUMN wake_at INTEGER")?;
                wake_every_device(&tx)?;
            }
            tx.execute_batch("ALTER TABLE streams DROP COLUMN version")?;
            tx.pragma_update(None, "user_version", FORMAT)?;
            tx.commit()?;
            tracing::info!("migrated the event store from format {older} to format {FORMAT}");
            Ok(())
        }
        0 => {
            let tx = conn.transaction()?;
            tx.execute_batch(TABLES)?;
            tx.pragma_update(None, "user_version", FORMAT)?;
            tx.commit()?;
            Ok(())
        }
        newer => Err(SchemaError::Newer(newer)),
    }
}

/// Devices of a store written before wake-up times existed are all due now: each is judged once
/// (did it go offline meanwhile?) and then keeps its own deadline.
fn wake_every_device(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE streams SET wake_at = ?1 WHERE name NOT LIKE '$%'",
        [Utc::now().timestamp_micros()],
    )?;
    Ok(())
}

/// Format 1 → 4, in one transaction: a crash midway leaves format 1, migrated again at the next
/// start.
fn migrate_from_1(conn: &mut Connection) -> rusqlite::Result<()> {
    let started = std::time::Instant::now();
    let tx = conn.transaction()?;
    for table in ["events", "streams", "snapshots", "probe"] {
        if has_table(&tx, table)? {
            tx.execute_batch(&format!("ALTER TABLE {table} RENAME TO v1_{table}"))?;
        }
    }
    // Renamed tables keep their indexes under the old names; free those names.
    tx.execute_batch("DROP INDEX IF EXISTS events_reading_at")?;
    tx.execute_batch(TABLES)?;

    let mut stream_ids: HashMap<String, i64> = HashMap::new();
    {
        let mut insert = tx.prepare("INSERT INTO streams (name) VALUES (?1)")?;
        let mut rows = tx.prepare("SELECT stream_id FROM v1_streams ORDER BY stream_id")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            insert.execute([&name])?;
            stream_ids.insert(name, tx.last_insert_rowid());
        }
    }
    let mut type_ids: HashMap<String, i64> = HashMap::new();
    let mut migrated = 0u64;
    {
        let mut insert_type = tx.prepare("INSERT INTO event_types (name) VALUES (?1)")?;
        let mut insert = tx.prepare(
            "INSERT INTO events (position, stream, version, type, schema, recorded_at, at, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut rows = tx.prepare(
            "SELECT position, stream_id, version, event_type, schema_version, recorded_at, data
             FROM v1_events ORDER BY position",
        )?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let stream: String = row.get(1)?;
            let event_type: String = row.get(3)?;
            let Some(&stream_id) = stream_ids.get(&stream) else {
                // An event of a stream the stream table does not know: format 1 never wrote one.
                continue;
            };
            let type_id = match type_ids.get(&event_type) {
                Some(id) => *id,
                None => {
                    insert_type.execute([&event_type])?;
                    let id = tx.last_insert_rowid();
                    type_ids.insert(event_type, id);
                    id
                }
            };
            // Damaged data stays as it was: the codec reports it, as it did before.
            let data: Vec<u8> = match row.get_ref(6)? {
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    t.to_vec()
                }
                _ => Vec::new(),
            };
            let at = if stream.starts_with('$') {
                None
            } else {
                json_at(&data)
            };
            insert.execute(params![
                row.get::<_, i64>(0)?,
                stream_id,
                row.get::<_, i64>(2)?,
                type_id,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
                at,
                data,
            ])?;
            migrated += 1;
        }
    }
    {
        let mut insert = tx.prepare(
            "INSERT INTO snapshots (stream, version, schema, payload) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut rows =
            tx.prepare("SELECT stream_id, version, schema_version, data FROM v1_snapshots")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let stream: String = row.get(0)?;
            if let Some(&stream_id) = stream_ids.get(&stream) {
                let data: String = row.get(3)?;
                insert.execute(params![
                    stream_id,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    data.into_bytes()
                ])?;
            }
        }
    }
    for table in ["events", "streams", "snapshots", "probe"] {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS v1_{table}"))?;
    }
    wake_every_device(&tx)?;
    tx.pragma_update(None, "user_version", FORMAT)?;
    tx.commit()?;
    tracing::info!(
        events = migrated,
        seconds = started.elapsed().as_secs_f64(),
        "migrated the event store from format 1 to format {FORMAT}"
    );
    Ok(())
}

/// The `at` of a format-1 JSON event, in microseconds.
fn json_at(data: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct At {
        at: DateTime<Utc>,
    }
    serde_json::from_slice::<At>(data)
        .ok()
        .map(|a| a.at.timestamp_micros())
}

/// A stream's version, as an SQL expression over `streams s`: its newest event's, or its
/// snapshot's when retention removed the events up to it (never the other way round).
pub const STREAM_VERSION: &str = "MAX(
    COALESCE((SELECT MAX(version) FROM events WHERE stream = s.id), 0),
    COALESCE((SELECT version FROM snapshots WHERE stream = s.id), 0))";

/// The key of `name` in `event_types`, if it has one.
pub fn event_type_id(conn: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM event_types WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()
}
