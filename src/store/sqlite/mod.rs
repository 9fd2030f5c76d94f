//! The embedded backend: SQLite in WAL mode, one writer thread that group-commits ([`writer`]),
//! a few reader threads with a connection each ([`readers`]). Its tables, and the migration of older stores, are in
//! [`schema`].

mod readers;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{broadcast, oneshot, watch};

use super::command::WriteCommand;
use super::health::HealthSignal;
use super::{
    Appended, CommittedBatch, EventStore, NewEvent, Pruned, RecordedEvent, Retention, Snapshot,
    SnapshotAndTail, StoreError, StoreHealth, StoreResult, StreamAt, StreamInfo, Wake, WakeTime,
};
use readers::Readers;
use schema::STREAM_VERSION;
pub use schema::{format as store_format, FORMAT as STORE_FORMAT};
use writer::{Writer, WriterConfig};

#[derive(Debug, Clone)]
pub struct SqliteStoreOptions {
    /// Most commands written in one transaction.
    pub max_batch: usize,
    /// Capacity of the writer's queue; callers block when it is full.
    pub queue_capacity: usize,
    /// Reader connections.
    pub readers: u32,
    /// Capacity of the live feed (in commits) before slow subscribers lag.
    pub live_capacity: usize,
    /// How long a small batch waits for more appends before it commits.
    pub linger: Duration,
}

impl Default for SqliteStoreOptions {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            queue_capacity: 65_536,
            readers: 4,
            live_capacity: 4096,
            linger: Duration::ZERO,
        }
    }
}

pub struct SqliteStore {
    writer: Mutex<Option<mpsc::SyncSender<WriteCommand>>>,
    writer_thread: Mutex<Option<thread::JoinHandle<()>>>,
    readers: Readers,
    live: broadcast::Sender<CommittedBatch>,
    health: watch::Receiver<StoreHealth>,
    path: PathBuf,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsynced at every commit, so an acknowledged append survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir/events.sqlite3`.
    pub fn open(dir: &Path, options: SqliteStoreOptions) -> StoreResult<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("events.sqlite3");
        let (live, _) = broadcast::channel(options.live_capacity.max(16));
        let health = HealthSignal::new();
        let config = WriterConfig {
            path: path.clone(),
            live: live.clone(),
            max_batch: options.max_batch.max(1),
            linger: options.linger,
            health: health.clone(),
        };
        let writer = Writer::open(config.clone())
            .map_err(|e| unavailable(format!("opening {}: {e}", path.display())))?;

        let readers = Readers::open(&path, options.readers)?;

        let (tx, rx) = mpsc::sync_channel(options.queue_capacity.max(1));
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run_supervised(writer, config, rx))
            .map_err(unavailable)?;
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            readers,
            live,
            health: health.subscribe(),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, command: WriteCommand) -> StoreResult<()> {
        let sender = self
            .writer
            .lock()
            .map_err(|_| StoreError::Closed)?
            .as_ref()
            .cloned()
            .ok_or(StoreError::Closed)?;
        sender.send(command).map_err(|_| StoreError::Closed)
    }

    /// Stops accepting writes, lets the writer drain its queue and waits for it to finish; then
    /// closes the readers.
    pub fn close(&self) {
        if let Ok(mut sender) = self.writer.lock() {
            sender.take();
        }
        if let Some(handle) = self.writer_thread.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
        self.readers.close();
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        self.readers.read(f).boxed()
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

async fn reply<T>(rx: oneshot::Receiver<StoreResult<T>>) -> StoreResult<T> {
    // The writer answers everything it takes, unless it died with the command in hand.
    rx.await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(
            "the store writer stopped before answering".into(),
        ))
    })
}

fn micros(value: Option<i64>) -> Option<DateTime<Utc>> {
    value.and_then(DateTime::from_timestamp_micros)
}

/// The columns every event read selects, in [`row_to_event`]'s order (`e`: events, `t`:
/// event_types, `s`: streams).
pub(super) const EVENT_COLUMNS: &str =
    "e.position, s.name, e.version, t.name, e.schema, e.recorded_at, e.at, e.payload";

pub(super) fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordedEvent> {
    Ok(RecordedEvent {
        position: row.get::<_, i64>(0)? as u64,
        stream: row.get(1)?,
        version: row.get::<_, i64>(2)? as u64,
        event_type: row.get(3)?,
        schema_version: row.get(4)?,
        recorded_at: micros(row.get(5)?).unwrap_or_default(),
        at: micros(row.get(6)?),
        payload: bytes::Bytes::from(row.get::<_, Vec<u8>>(7)?),
    })
}

// Reads take `limit` rows by stepping no further rather than with `LIMIT ?`: SQLite prepares a
// statement with a bound LIMIT again at every execution (about a fifth of the engine's CPU while
// it restored new devices, measured with callgrind).

/// Events of `stream` with version >= `from_version`, in order, at most `limit`.
fn read_stream_rows(
    conn: &Connection,
    stream: &str,
    from_version: u64,
    limit: usize,
) -> rusqlite::Result<Vec<RecordedEvent>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM streams s
         JOIN events e ON e.stream = s.id JOIN event_types t ON t.id = e.type
         WHERE s.name = ?1 AND e.version >= ?2 ORDER BY e.version"
    ))?;
    let rows = stmt.query_map(params![stream, from_version as i64], row_to_event)?;
    rows.take(limit).collect()
}

impl EventStore for SqliteStore {
    fn append_waking(
        &self,
        stream: &str,
        expected_version: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
    ) -> BoxFuture<'static, StoreResult<Appended>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(WriteCommand::Append {
            stream: stream.to_owned(),
            expected: expected_version,
            events,
            condition,
            wake,
            reply: tx,
        });
        async move {
            sent?;
            reply(rx).await
        }
        .boxed()
    }

    fn wake_times(&self) -> BoxFuture<'static, StoreResult<Vec<WakeTime>>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT name, wake_at FROM streams WHERE wake_at IS NOT NULL")?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    micros(row.get(1)?).unwrap_or_default(),
                ))
            })?;
            rows.collect()
        })
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        let stream = stream.to_owned();
        self.read(move |conn| read_stream_rows(conn, &stream, from_version, limit))
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e
                 JOIN streams s ON s.id = e.stream JOIN event_types t ON t.id = e.type
                 WHERE e.position > ?1 ORDER BY e.position"
            ))?;
            let rows = stmt.query_map(params![after_position as i64], row_to_event)?;
            rows.take(limit).collect()
        })
    }

    fn save_snapshot(&self, snapshot: Snapshot) -> BoxFuture<'static, StoreResult<()>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(WriteCommand::Snapshot {
            snapshot,
            reply: tx,
        });
        async move {
            sent?;
            reply(rx).await
        }
        .boxed()
    }

    fn read_latest(
        &self,
        stream: &str,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<SnapshotAndTail>> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            let snapshot = conn
                .prepare_cached(
                    "SELECT n.version, n.schema, n.payload FROM streams s
                     JOIN snapshots n ON n.stream = s.id WHERE s.name = ?1",
                )?
                .query_row([&stream], |row| {
                    Ok(Snapshot {
                        stream: stream.clone(),
                        version: row.get::<_, i64>(0)? as u64,
                        schema_version: row.get(1)?,
                        payload: bytes::Bytes::from(row.get::<_, Vec<u8>>(2)?),
                    })
                })
                .optional()?;
            let from_version = snapshot.as_ref().map_or(1, |s| s.version + 1);
            let tail = read_stream_rows(conn, &stream, from_version, limit)?;
            Ok(SnapshotAndTail { snapshot, tail })
        })
    }

    fn list_streams(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<StreamInfo>>> {
        let after = after.unwrap_or("").to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT s.name, {STREAM_VERSION} FROM streams s
                 WHERE s.name > ?1 AND substr(s.name, 1, 1) <> '$'
                 ORDER BY s.name"
            ))?;
            let rows = stmt.query_map(params![after], |row| {
                Ok(StreamInfo {
                    stream: row.get(0)?,
                    version: row.get::<_, i64>(1)? as u64,
                })
            })?;
            rows.take(limit).collect()
        })
    }

    fn stream_version(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<u64>>> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {STREAM_VERSION} FROM streams s WHERE s.name = ?1"
            ))?
            .query_row([&stream], |row| row.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(|v| v as u64))
        })
    }

    fn has_event_at(
        &self,
        stream: &str,
        event_type: &'static str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            let Some(type_id) = schema::event_type_id(conn, event_type)? else {
                return Ok(false);
            };
            conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM streams s JOIN events e ON e.stream = s.id
                   WHERE s.name = ?1 AND e.at = ?2 AND e.type = ?3)",
            )?
            .query_row(params![stream, at.timestamp_micros(), type_id], |row| {
                row.get::<_, bool>(0)
            })
        })
    }

    fn read_by_time(
        &self,
        stream: &str,
        event_type: &'static str,
        range: std::ops::Range<DateTime<Utc>>,
        after: Option<(DateTime<Utc>, u64)>,
        newest_first: bool,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            let Some(type_id) = schema::event_type_id(conn, event_type)? else {
                return Ok(Vec::new());
            };
            let (after_at, after_position) = match (after, newest_first) {
                (Some((at, p)), _) => (at.timestamp_micros(), p as i64),
                (None, false) => (i64::MIN, 0),
                (None, true) => (i64::MAX, i64::MAX),
            };
            let (after_op, order) = if newest_first {
                ("<", "DESC")
            } else {
                (">", "ASC")
            };
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM streams s
                 JOIN events e ON e.stream = s.id JOIN event_types t ON t.id = e.type
                 WHERE s.name = ?1 AND e.type = ?2 AND e.at >= ?3 AND e.at < ?4
                   AND (e.at, e.position) {after_op} (?5, ?6)
                 ORDER BY e.at {order}, e.position {order}"
            ))?;
            let rows = stmt.query_map(
                params![
                    stream,
                    type_id,
                    range.start.timestamp_micros(),
                    range.end.timestamp_micros(),
                    after_at,
                    after_position
                ],
                row_to_event,
            )?;
            rows.take(limit).collect()
        })
    }

    fn prune(
        &self,
        event_types: &'static [&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
    ) -> BoxFuture<'static, StoreResult<Pruned>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(WriteCommand::Prune {
            event_types,
            before,
            after,
            max_streams,
            reply: tx,
        });
        async move {
            sent?;
            reply(rx).await
        }
        .boxed()
    }

    fn retention(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<Retention>>> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT readings_removed_before FROM streams WHERE name = ?1")?
                .query_row([&stream], |row| {
                    Ok(Retention {
                        readings_removed_before: micros(row.get(0)?),
                    })
                })
                .optional()
        })
    }

    fn head_position(&self) -> BoxFuture<'static, StoreResult<u64>> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(|p| p as u64)
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<CommittedBatch> {
        self.live.subscribe()
    }

    fn flush(&self) -> BoxFuture<'static, StoreResult<()>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(WriteCommand::Flush { reply: tx });
        async move {
            sent?;
            reply(rx).await
        }
        .boxed()
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.health.clone()
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        // Closing joins the writer thread: off the async threads.
        let sender = self.writer.lock().ok().and_then(|mut s| s.take());
        let thread = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        async move {
            drop(sender);
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
        .boxed()
    }
}
