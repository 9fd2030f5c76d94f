//! The read models' embedded storage: `readmodels.sqlite3` beside the event store, so its writes
//! never queue behind the event writer's. Every commit writes the changes and the checkpoint in
//! one transaction: after a crash the read models resume from the checkpoint and never count an
//! event twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetwatch_domain::Location;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::fold::{
    AlarmChange, Bucket, Changes, ConditionChange, ConditionKind, StoredBucket, FLEET,
};
use super::{
    AlarmFilter, AlarmRow, BucketRow, Crossing, DeviceCounts, ReadModelError, TopBy, TopEntry,
};

const FILE: &str = "readmodels.sqlite3";
/// Bump when the tables change: the read models are then rebuilt from the events.
const FORMAT: i64 = 3;

const TABLES: &str = "
CREATE TABLE checkpoint (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL
);
INSERT INTO checkpoint (id, position) VALUES (1, 0);
CREATE TABLE devices (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    registered_at INTEGER,
    last_at       INTEGER,
    last_lat      REAL,
    last_lon      REAL
);
-- Per device (and for the fleet, device named '*') and per minute / hour (bucket 0 / 1): the
-- readings' count, temperature sum, min and max, the latest position, distance and alarms.
CREATE TABLE buckets (
    device   INTEGER NOT NULL,
    bucket   INTEGER NOT NULL,
    start    INTEGER NOT NULL,
    count    INTEGER NOT NULL,
    sum      REAL    NOT NULL,
    min      REAL,
    max      REAL,
    last_at  INTEGER,
    last_lat REAL,
    last_lon REAL,
    distance REAL    NOT NULL,
    alarms   INTEGER NOT NULL,
    PRIMARY KEY (device, bucket, start)
) WITHOUT ROWID;
-- Top lists read every device's hour buckets of a window: these cover them, in time order.
CREATE INDEX buckets_hourly ON buckets (start, device, count, distance) WHERE bucket = 1;
CREATE INDEX buckets_hourly_alarms ON buckets (start, device, alarms) WHERE bucket = 1 AND alarms > 0;
CREATE TABLE crossings (
    zone     TEXT    NOT NULL,
    device   INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    position INTEGER NOT NULL,
    entered  INTEGER NOT NULL,
    PRIMARY KEY (zone, device, at, position)
) WITHOUT ROWID;
-- Conditions that hold now: outside a zone (kind 0), out of a range (1), offline (2, rule '').
CREATE TABLE conditions (
    device INTEGER NOT NULL,
    kind   INTEGER NOT NULL,
    rule   TEXT    NOT NULL,
    PRIMARY KEY (device, kind, rule)
) WITHOUT ROWID;
CREATE INDEX conditions_by_rule ON conditions (kind, rule);
-- Every alarm, by the position of the event that opened it (newest first: descending).
CREATE TABLE alarms (
    position        INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    device          INTEGER NOT NULL,
    kind            TEXT    NOT NULL,
    rule            TEXT,
    severity        TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    opened_at       INTEGER NOT NULL,
    cause_version   INTEGER NOT NULL,
    sequence        INTEGER NOT NULL,
    acknowledged_at INTEGER,
    acknowledged_by TEXT,
    comment         TEXT,
    cleared_at      INTEGER
);
CREATE INDEX alarms_by_state ON alarms (state, position);
CREATE INDEX alarms_by_device ON alarms (device, position);
";

/// Alarms matching the filter ?1 state, ?2 device, ?3 kind, ?4 severity, ?5 zone, ?8 range
/// (each NULL: any), ?7 not cleared (when 1), before position ?6, newest first.
const ALARMS: &str = "
    SELECT a.position, a.id, d.name, a.kind, a.rule, a.severity, a.state, a.opened_at,
           a.cause_version, a.sequence, a.acknowledged_at, a.acknowledged_by, a.comment,
           a.cleared_at
     FROM alarms a JOIN devices d ON d.id = a.device
     WHERE (?1 IS NULL OR a.state = ?1) AND (?2 IS NULL OR d.name = ?2)
       AND (?3 IS NULL OR a.kind = ?3) AND (?4 IS NULL OR a.severity = ?4)
       AND (?5 IS NULL OR (a.kind = 'outside_zone' AND a.rule = ?5))
       AND (?8 IS NULL OR (a.kind = 'temperature_out_of_range' AND a.rule = ?8))
       AND a.position < ?6 AND (?7 = 0 OR a.state <> 'cleared')
     ORDER BY a.position DESC";

/// The buckets of the devices named in the JSON array ?1, `?2 <= start < ?3`, of stored width
/// ?5, grouped by ?4 seconds. The bucket's latest position: SQLite takes bare columns from the
/// row of MAX(last_at). `CROSS JOIN` keeps the devices as the outer loop, so each device's
/// buckets are a range of the primary key: the planner cannot size `json_each` and otherwise
/// scans every device's buckets of the period by time (minutes a query with 10,000 devices).
const BUCKETS_OF: &str = "
    SELECT b.start - b.start % ?4 AS bstart, SUM(b.count), SUM(b.sum), MIN(b.min), MAX(b.max),
           b.last_lat, b.last_lon, SUM(b.distance), SUM(b.alarms), MAX(b.last_at)
     FROM devices d CROSS JOIN buckets b ON b.device = d.id
     WHERE d.name IN (SELECT value FROM json_each(?1)) AND b.bucket = ?5
       AND b.start >= ?2 AND b.start < ?3
     GROUP BY bstart ORDER BY bstart";

/// One row per device and hour of the window from ?1: the device and its value (covered by the
/// partial indexes `buckets_hourly` and `buckets_hourly_alarms`).
const TOP_READINGS: &str = "SELECT device, count FROM buckets WHERE bucket = 1 AND start >= ?1";
const TOP_DISTANCE: &str = "SELECT device, distance FROM buckets WHERE bucket = 1 AND start >= ?1";
const TOP_ALARMS: &str =
    "SELECT device, alarms FROM buckets WHERE bucket = 1 AND alarms > 0 AND start >= ?1";

/// Per-device sums. Device ids are the read models' dense row ids, so a vector indexed by id
/// holds them; an id far beyond the devices seen (never written by the read models) goes to a map.
#[derive(Default)]
struct Totals {
    dense: Vec<f64>,
    sparse: HashMap<i64, f64>,
}

impl Totals {
    const DENSE_MAX: i64 = 1 << 26;

    fn add(&mut self, device: i64, value: f64) {
        match usize::try_from(device) {
            Ok(i) if device < Self::DENSE_MAX => {
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, 0.0);
                }
                self.dense[i] += value;
            }
            _ => *self.sparse.entry(device).or_default() += value,
        }
    }

    /// The `limit` largest positive totals, largest first, equal ones by device id.
    fn top(self, limit: usize) -> Vec<(i64, f64)> {
        let mut all: Vec<(i64, f64)> = self
            .dense
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as i64, v))
            .chain(self.sparse)
            .filter(|(_, v)| *v > 0.0)
            .collect();
        let order = |a: &(i64, f64), b: &(i64, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if limit == 0 {
            return Vec::new();
        }
        if all.len() > limit {
            all.select_nth_unstable_by(limit - 1, order);
            all.truncate(limit);
        }
        all.sort_unstable_by(order);
        all
    }
}

/// The aggregate of device ?1's buckets of stored width ?4 with `?2 <= start < ?3`.
const TOTAL: &str = "
    SELECT ?2, COALESCE(SUM(b.count), 0), COALESCE(SUM(b.sum), 0), MIN(b.min), MAX(b.max),
           b.last_lat, b.last_lon, COALESCE(SUM(b.distance), 0), COALESCE(SUM(b.alarms), 0),
           MAX(b.last_at)
     FROM devices d CROSS JOIN buckets b ON b.device = d.id
     WHERE d.name = ?1 AND b.bucket = ?4 AND b.start >= ?2 AND b.start < ?3";

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // A read model is rebuilt from the events if it is lost, so it need not be fsynced at every
    // commit: NORMAL keeps it consistent after a crash, the checkpoint says where to resume.
    conn.pragma_update(None, "synchronous", "NORMAL")
}

/// The writer side: one connection, used by the projection thread only.
pub struct Writer {
    conn: Connection,
    device_ids: foldhash::HashMap<String, i64>,
}

/// The read side: a pool of read-only connections.
#[derive(Clone)]
pub struct Readers {
    pool: r2d2::Pool<SqliteConnectionManager>,
}

pub fn open(dir: &Path) -> Result<(Writer, Readers), ReadModelError> {
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join(FILE);
    let mut conn = Connection::open(&path)?;
    configure(&conn)?;
    // The writer's page cache (negative: KiB): a commit's rows span many devices' pages.
    conn.pragma_update(None, "cache_size", -65_536)?;
    let format: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if format != FORMAT {
        // Older or newer tables: start over, from the first event.
        let tx = conn.transaction()?;
        let names: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for name in names {
            tx.execute_batch(&format!("DROP TABLE IF EXISTS \"{name}\""))?;
        }
        tx.execute_batch(TABLES)?;
        tx.pragma_update(None, "user_version", FORMAT)?;
        tx.commit()?;
    }
    let manager = SqliteConnectionManager::file(&path).with_init(|c| {
        c.busy_timeout(Duration::from_secs(10))?;
        c.pragma_update(None, "query_only", true)
    });
    let pool = r2d2::Pool::builder().max_size(4).build(manager)?;
    Ok((
        Writer {
            conn,
            device_ids: foldhash::HashMap::default(),
        },
        Readers { pool },
    ))
}

fn device_id(
    tx: &rusqlite::Transaction<'_>,
    cache: &mut foldhash::HashMap<String, i64>,
    name: &str,
) -> rusqlite::Result<i64> {
    if let Some(id) = cache.get(name) {
        return Ok(*id);
    }
    let id = match tx
        .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
        .optional()?
    {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO devices (name) VALUES (?1)")?
                .execute([name])?;
            tx.last_insert_rowid()
        }
    };
    cache.insert(name.to_owned(), id);
    Ok(id)
}

impl Writer {
    /// Moves the checkpoint without folding anything (seeding a benchmark's read models).
    pub fn set_checkpoint(&mut self, position: u64) -> Result<(), ReadModelError> {
        self.conn
            .execute("UPDATE checkpoint SET position = ?1", [position as i64])?;
        Ok(())
    }

    pub fn checkpoint(&self) -> Result<u64, ReadModelError> {
        Ok(self
            .conn
            .query_row("SELECT position FROM checkpoint", [], |row| {
                row.get::<_, i64>(0)
            })? as u64)
    }

    /// The latest live reading of `device` in the read model (for the distance to the next one).
    pub fn last_seen(&self, device: &str) -> Option<(i64, Location)> {
        self.conn
            .prepare_cached("SELECT last_at, last_lat, last_lon FROM devices WHERE name = ?1")
            .ok()?
            .query_row([device], |row| {
                Ok((
                    row.get::<_, Option<i64>>(0)?,
                    row.get::<_, Option<f64>>(1)?,
                    row.get::<_, Option<f64>>(2)?,
                ))
            })
            .ok()
            .and_then(|(at, lat, lon)| Some((at?, Location::new(lat?, lon?).ok()?)))
    }

    /// Removes the `width` rollups that start before `before` (Unix seconds) of up to `devices`
    /// devices (the fleet's row counts as one) with a key above `after`, in one transaction.
    /// Returns the rows removed, and the last key looked at: `None` once every device was.
    pub fn remove_rollups(
        &mut self,
        width: StoredBucket,
        before: i64,
        after: i64,
        devices: usize,
    ) -> Result<(usize, Option<i64>), ReadModelError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids: Vec<i64> = tx
            .prepare_cached("SELECT id FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2")?
            .query_map(params![after, devices as i64], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut removed = 0;
        {
            // The width is part of the text, not a bound value: SQLite re-prepares a statement
            // whose bound values decide whether a partial index (the hourly ones) applies.
            let mut delete = tx.prepare_cached(&format!(
                "DELETE FROM buckets WHERE device = ?1 AND bucket = {} AND start < ?2",
                width as i64
            ))?;
            for id in &ids {
                removed += delete.execute(params![id, before])?;
            }
        }
        tx.commit()?;
        let next = (ids.len() == devices)
            .then(|| ids.last().copied())
            .flatten();
        Ok((removed, next))
    }

    /// Writes `changes` and moves the checkpoint to `position`, in one transaction. On failure
    /// nothing is written and the caller folds the same events again.
    pub fn commit(&mut self, changes: &Changes, position: u64) -> Result<(), ReadModelError> {
        let result = self.write(changes, position);
        if result.is_err() {
            // Ids handed out in the rolled-back transaction are gone with it.
            self.device_ids.clear();
        }
        result
    }

    fn write(&mut self, changes: &Changes, position: u64) -> Result<(), ReadModelError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let ids = &mut self.device_ids;
            let mut upsert = tx.prepare_cached(
                "INSERT INTO buckets (device, bucket, start, count, sum, min, max, last_at,
                                      last_lat, last_lon, distance, alarms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (device, bucket, start) DO UPDATE SET
                    count = count + excluded.count,
                    sum = sum + excluded.sum,
                    min = MIN(COALESCE(min, excluded.min), COALESCE(excluded.min, min)),
                    max = MAX(COALESCE(max, excluded.max), COALESCE(excluded.max, max)),
                    last_lat = CASE WHEN excluded.last_at >= COALESCE(last_at, excluded.last_at)
                                    THEN excluded.last_lat ELSE last_lat END,
                    last_lon = CASE WHEN excluded.last_at >= COALESCE(last_at, excluded.last_at)
                                    THEN excluded.last_lon ELSE last_lon END,
                    last_at = MAX(COALESCE(last_at, excluded.last_at), COALESCE(excluded.last_at, last_at)),
                    distance = distance + excluded.distance,
                    alarms = alarms + excluded.alarms",
            )?;
            // In key order: rows of one device and bucket width sit together, so the writes
            // touch pages in order instead of all over the table.
            let mut rows: Vec<_> = changes
                .rollups
                .iter()
                .flat_map(|(device, rollups)| {
                    rollups
                        .rows
                        .iter()
                        .map(move |((stored, start), a)| (device.as_str(), *stored, *start, a))
                })
                .collect();
            rows.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
            for (device, stored, start, a) in rows {
                let id = device_id(&tx, ids, device)?;
                let (last_at, last_lat, last_lon) = match (device, a.last) {
                    (FLEET, _) | (_, None) => (None, None, None),
                    (_, Some((at, l))) => (Some(at), Some(l.lat()), Some(l.lon())),
                };
                upsert.execute(params![
                    id,
                    stored as i64,
                    start,
                    a.count as i64,
                    a.sum,
                    a.min,
                    a.max,
                    last_at,
                    last_lat,
                    last_lon,
                    a.distance_m,
                    a.alarms as i64,
                ])?;
            }
            let mut seen = tx.prepare_cached(
                "UPDATE devices SET last_at = ?2, last_lat = ?3, last_lon = ?4 WHERE id = ?1",
            )?;
            for (device, (at, location)) in &changes.last_seen {
                let id = device_id(&tx, ids, device)?;
                seen.execute(params![id, at, location.lat(), location.lon()])?;
            }
            let mut registered = tx.prepare_cached(
                "UPDATE devices SET registered_at = COALESCE(registered_at, ?2) WHERE id = ?1",
            )?;
            for (device, at) in &changes.registered {
                let id = device_id(&tx, ids, device)?;
                registered.execute(params![id, at])?;
            }
            let mut crossing = tx.prepare_cached(
                "INSERT OR IGNORE INTO crossings (zone, device, at, position, entered)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for c in &changes.crossings {
                let id = device_id(&tx, ids, &c.device)?;
                crossing.execute(params![c.zone, id, c.at, c.position as i64, c.entered])?;
            }
            // In event order: a condition ended and begun again in one batch holds.
            let mut began = tx.prepare_cached(
                "INSERT OR IGNORE INTO conditions (device, kind, rule) VALUES (?1, ?2, ?3)",
            )?;
            let mut ended = tx.prepare_cached(
                "DELETE FROM conditions WHERE device = ?1 AND kind = ?2 AND rule = ?3",
            )?;
            let mut removed =
                tx.prepare_cached("DELETE FROM conditions WHERE kind = ?1 AND rule = ?2")?;
            for change in &changes.conditions {
                match change {
                    ConditionChange::Began(c) => {
                        let id = device_id(&tx, ids, &c.device)?;
                        began.execute(params![id, c.kind as i64, c.rule])?;
                    }
                    ConditionChange::Ended(c) => {
                        let id = device_id(&tx, ids, &c.device)?;
                        ended.execute(params![id, c.kind as i64, c.rule])?;
                    }
                    ConditionChange::RuleRemoved(kind, rule) => {
                        removed.execute(params![*kind as i64, rule])?;
                    }
                }
            }
            let mut opened = tx.prepare_cached(
                "INSERT OR IGNORE INTO alarms (position, id, device, kind, rule, severity, state,
                                               opened_at, cause_version, sequence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'open', ?7, ?8, 1)",
            )?;
            let mut acknowledged = tx.prepare_cached(
                "UPDATE alarms SET state = 'acknowledged', sequence = ?2, acknowledged_at = ?3,
                                   acknowledged_by = ?4, comment = ?5
                 WHERE id = ?1 AND state = 'open'",
            )?;
            let mut cleared = tx.prepare_cached(
                "UPDATE alarms SET state = 'cleared', sequence = ?2, cleared_at = ?3 WHERE id = ?1",
            )?;
            for change in &changes.alarms {
                match change {
                    AlarmChange::Opened {
                        position,
                        id,
                        kind,
                        rule,
                        severity,
                        at,
                        cause_version,
                    } => {
                        let device = device_id(&tx, ids, id.device().as_str())?;
                        opened.execute(params![
                            *position as i64,
                            id.to_string(),
                            device,
                            kind.as_str(),
                            rule.as_ref().map(|r| r.as_str()),
                            severity.as_str(),
                            at,
                            *cause_version as i64,
                        ])?;
                    }
                    AlarmChange::Acknowledged {
                        id,
                        sequence,
                        at,
                        by,
                        comment,
                    } => {
                        acknowledged.execute(params![id.to_string(), sequence, at, by, comment])?;
                    }
                    AlarmChange::Cleared { id, sequence, at } => {
                        cleared.execute(params![id.to_string(), sequence, at])?;
                    }
                }
            }
            tx.prepare_cached("UPDATE checkpoint SET position = ?1")?
                .execute([position as i64])?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn bucket_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BucketRow> {
    let count: i64 = row.get(1)?;
    let sum: f64 = row.get(2)?;
    let location = match (row.get::<_, Option<f64>>(5)?, row.get::<_, Option<f64>>(6)?) {
        (Some(lat), Some(lon)) => Location::new(lat, lon).ok(),
        _ => None,
    };
    Ok(BucketRow {
        start: row.get(0)?,
        count: count as u64,
        mean: (count > 0).then(|| sum / count as f64),
        min: row.get(3)?,
        max: row.get(4)?,
        last_location: location,
        distance_m: row.get(7)?,
        alarms: row.get::<_, i64>(8)? as u64,
    })
}

fn alarm_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AlarmRow> {
    Ok(AlarmRow {
        position: row.get::<_, i64>(0)? as u64,
        id: row.get(1)?,
        device_id: row.get(2)?,
        kind: row.get(3)?,
        rule: row.get(4)?,
        severity: row.get(5)?,
        state: row.get(6)?,
        opened_at: row.get(7)?,
        cause_version: row.get::<_, i64>(8)? as u64,
        sequence: row.get::<_, i64>(9)? as u32,
        acknowledged_at: row.get(10)?,
        acknowledged_by: row.get(11)?,
        comment: row.get(12)?,
        cleared_at: row.get(13)?,
    })
}

impl Readers {
    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, ReadModelError> {
        Ok(self.pool.get()?)
    }

    /// Buckets of `device` (or the fleet, [`FLEET`]) with `from <= start < to` (Unix seconds).
    pub fn buckets(
        &self,
        device: &str,
        width: Bucket,
        from: i64,
        to: i64,
    ) -> Result<Vec<BucketRow>, ReadModelError> {
        self.buckets_of(&[device], width, from, to)
    }

    /// The buckets of several devices together (a zone's), each bucket over all of them.
    pub fn buckets_of(
        &self,
        devices: &[&str],
        width: Bucket,
        from: i64,
        to: i64,
    ) -> Result<Vec<BucketRow>, ReadModelError> {
        let conn = self.conn()?;
        let seconds = width.seconds();
        let stored = width.stored() as i64;
        let mut stmt = conn.prepare_cached(BUCKETS_OF)?;
        let names = serde_json::to_string(devices).unwrap_or_else(|_| "[]".into());
        let rows = stmt.query_map(params![names, from, to, seconds, stored], bucket_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The aggregate of `device`'s buckets of `width` with `from <= start < to`.
    pub fn total(
        &self,
        device: &str,
        width: StoredBucket,
        from: i64,
        to: i64,
    ) -> Result<BucketRow, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(TOTAL)?;
        Ok(stmt.query_row(params![device, from, to, width as i64], bucket_row)?)
    }

    /// The devices with the most of `by` in the hours from `since` (Unix seconds), most first;
    /// equal totals in the order the read models first saw the devices.
    ///
    /// Sums in memory over a covering index of the window's hour buckets: at 100,000 devices the
    /// SQL `GROUP BY ... ORDER BY` sorted every device twice and joined every name (~300 ms).
    pub fn top(
        &self,
        by: TopBy,
        since: i64,
        limit: usize,
    ) -> Result<Vec<TopEntry>, ReadModelError> {
        let conn = self.conn()?;
        let sql = match by {
            TopBy::Readings => TOP_READINGS,
            TopBy::Distance => TOP_DISTANCE,
            TopBy::Alarms => TOP_ALARMS,
        };
        let fleet: Option<i64> = conn
            .query_row("SELECT id FROM devices WHERE name = ?1", [FLEET], |row| {
                row.get(0)
            })
            .optional()?;
        let mut totals = Totals::default();
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query([since])?;
        while let Some(row) = rows.next()? {
            let device: i64 = row.get(0)?;
            if Some(device) != fleet {
                totals.add(device, row.get(1)?);
            }
        }
        let top = totals.top(limit);
        let mut names = conn.prepare_cached(
            "SELECT id, name FROM devices WHERE id IN (SELECT value FROM json_each(?1))",
        )?;
        let ids = serde_json::to_string(&top.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".into());
        let names: HashMap<i64, String> = names
            .query_map([ids], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(top
            .into_iter()
            .filter_map(|(id, value)| {
                names.get(&id).map(|name| TopEntry {
                    device_id: name.clone(),
                    value,
                })
            })
            .collect())
    }

    /// Known devices (any event folded), and devices outside a zone, out of a range and
    /// offline now.
    pub fn device_counts(&self) -> Result<DeviceCounts, ReadModelError> {
        let conn = self.conn()?;
        let known: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM devices WHERE name <> '{FLEET}'"),
            [],
            |row| row.get(0),
        )?;
        let mut holding =
            conn.prepare_cached("SELECT COUNT(DISTINCT device) FROM conditions WHERE kind = ?1")?;
        let mut count = |kind: ConditionKind| -> rusqlite::Result<u64> {
            holding
                .query_row([kind as i64], |row| row.get::<_, i64>(0))
                .map(|n| n as u64)
        };
        Ok(DeviceCounts {
            known: known as u64,
            outside_zone: count(ConditionKind::Zone)?,
            out_of_range: count(ConditionKind::Range)?,
            offline: count(ConditionKind::Offline)?,
        })
    }

    /// Alarms matching `filter`, newest first, opened before position `before`, at most `limit`.
    pub fn alarms(
        &self,
        filter: &AlarmFilter,
        before: u64,
        limit: usize,
    ) -> Result<Vec<AlarmRow>, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(ALARMS)?;
        let rows = stmt.query_map(
            params![
                filter.state.map(|s| s.as_str()),
                filter.device,
                filter.kind.map(|k| k.as_str()),
                filter.severity.map(|s| s.as_str()),
                filter.zone,
                before.min(i64::MAX as u64) as i64,
                filter.active,
                filter.range,
            ],
            alarm_row,
        )?;
        Ok(rows.take(limit).collect::<rusqlite::Result<_>>()?)
    }

    /// Alarms by state (open, acknowledged, cleared).
    pub fn alarm_counts(&self) -> Result<HashMap<String, u64>, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached("SELECT state, COUNT(*) FROM alarms GROUP BY state")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn checkpoint(&self) -> Result<u64, ReadModelError> {
        let conn = self.conn()?;
        Ok(
            conn.query_row("SELECT position FROM checkpoint", [], |row| {
                row.get::<_, i64>(0)
            })? as u64,
        )
    }

    /// When each of `devices` registered (microseconds), if it did.
    pub fn registered(&self, devices: &[String]) -> Result<HashMap<String, i64>, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT name, registered_at FROM devices
             WHERE name IN (SELECT value FROM json_each(?1)) AND registered_at IS NOT NULL",
        )?;
        let names = serde_json::to_string(devices).unwrap_or_else(|_| "[]".into());
        let rows = stmt.query_map([names], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Registered devices after `after`, in id order, at most `limit`.
    pub fn registered_devices(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT name FROM devices WHERE name > ?1 AND registered_at IS NOT NULL ORDER BY name",
        )?;
        let rows = stmt.query_map([after], |row| row.get(0))?;
        Ok(rows.take(limit).collect::<rusqlite::Result<_>>()?)
    }

    /// The zone's crossings by `devices` before `before` (microseconds), per device in time order.
    pub fn crossings(
        &self,
        zone: &str,
        devices: &[String],
        before: i64,
    ) -> Result<Vec<Crossing>, ReadModelError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT d.name, c.at, c.entered FROM crossings c JOIN devices d ON d.id = c.device
             WHERE c.zone = ?1 AND d.name IN (SELECT value FROM json_each(?2)) AND c.at < ?3
             ORDER BY d.name, c.at, c.position",
        )?;
        let names = serde_json::to_string(devices).unwrap_or_else(|_| "[]".into());
        let rows = stmt.query_map(params![zone, names, before], |row| {
            Ok(Crossing {
                device_id: row.get(0)?,
                at: row.get(1)?,
                entered: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        let details: Vec<String> = stmt
            .query_map(params, |row| row.get(3))
            .expect("plan")
            .collect::<rusqlite::Result<_>>()
            .expect("plan rows");
        details.join("\n")
    }

    /// A device's buckets are read as a range of the primary key, never by scanning the period
    /// across all devices (what the planner chose before, at minutes a query at 10,000 devices).
    #[test]
    fn device_bucket_queries_use_the_primary_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (writer, _) = open(dir.path()).expect("open");
        for (sql, plan) in [
            (
                BUCKETS_OF,
                plan(&writer.conn, BUCKETS_OF, params!["[\"a\"]", 0, 1, 60, 0]),
            ),
            (TOTAL, plan(&writer.conn, TOTAL, params!["a", 0, 1, 0])),
        ] {
            assert!(
                plan.contains(
                    "SEARCH b USING PRIMARY KEY (device=? AND bucket=? AND start>? AND start<?)"
                ),
                "{sql}\n{plan}"
            );
            assert!(!plan.contains("buckets_hourly"), "{sql}\n{plan}");
        }
    }

    /// Top lists read only the covering index of the window's hour buckets.
    #[test]
    fn top_lists_read_the_covering_hourly_indexes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (writer, _) = open(dir.path()).expect("open");
        for (sql, index) in [
            (TOP_READINGS, "buckets_hourly"),
            (TOP_DISTANCE, "buckets_hourly"),
            (TOP_ALARMS, "buckets_hourly_alarms"),
        ] {
            let plan = plan(&writer.conn, sql, [0]);
            assert!(
                plan.contains(&format!(
                    "SEARCH buckets USING COVERING INDEX {index} (start>?)"
                )),
                "{sql}\n{plan}"
            );
        }
    }

    #[test]
    fn totals_keep_the_largest_and_order_equal_ones_by_device() {
        let mut totals = Totals::default();
        for (device, value) in [
            (3, 5.0),
            (1, 2.0),
            (2, 5.0),
            (1, 4.0),
            (9, 0.0),
            (1 << 40, 7.0),
        ] {
            totals.add(device, value);
        }
        assert_eq!(totals.top(3), [(1 << 40, 7.0), (1, 6.0), (2, 5.0)]);
        let mut totals = Totals::default();
        totals.add(4, 1.0);
        assert_eq!(totals.top(0), []);
        let mut totals = Totals::default();
        totals.add(4, 1.0);
        totals.add(5, -1.0);
        assert_eq!(totals.top(10), [(4, 1.0)]);
    }
}
