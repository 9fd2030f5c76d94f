//! The writer thread: every append and snapshot is written here, in the order it was sent.
//!
//! The writer takes whatever has queued up (up to `max_batch` commands), writes it in one
//! transaction and commits with a full fsync; only then does it answer the callers and publish
//! the events. While one commit is syncing, the next batch queues, so durable throughput grows
//! with concurrency instead of being one fsync per event.
//!
//! When the store cannot write (a full disk, an I/O error, a read-only database), every command
//! of the failed batch is answered [`StoreError::Unavailable`] and the store's health turns to
//! failing, once: one log line and one metric change per episode, however many writes fail. While
//! failing, the writer probes with a one-row write every [`PROBE_INTERVAL`] and turns healthy
//! again by itself at the first commit that works. A writer that panics is replaced by a fresh
//! one on a new connection, after a backoff, with its queue intact: callers of the lost batch are
//! answered `Unavailable` (their sender was dropped), nothing else is lost.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt};
use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::broadcast;

use super::configure;
use super::schema::{self, SchemaError};
use crate::store::command::{append_conflict, Staged, WriteCommand};
use crate::store::health::HealthSignal;
use crate::store::linger::Linger;
use crate::store::{Appended, CommittedBatch, Pruned, RecordedEvent, StoreError, Wake};

/// How often a failing store tries a write to find out whether it works again.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Backoff before a writer that died is replaced: doubled per death in a row, up to the max.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);
/// A writer that ran this long before dying starts the backoff over.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Streams the writer keeps in memory (key and version) before it starts over.
const STREAM_CACHE_LIMIT: usize = 1_000_000;

/// What a writer needs to (re)open its connection.
#[derive(Clone)]
pub(super) struct WriterConfig {
    pub path: PathBuf,
    pub live: broadcast::Sender<CommittedBatch>,
    pub max_batch: usize,
    /// How long a small batch waits for more before it commits.
    pub linger: Duration,
    pub health: HealthSignal,
}

pub(super) struct Writer {
    conn: Connection,
    config: WriterConfig,
    /// Committed streams' keys and versions, so an append need not look its stream up in SQLite.
    /// Only the writer changes them, so the cache cannot go stale; it is dropped when it grows
    /// large.
    streams: HashMap<String, Option<StreamKey>>,
    /// Event type names' keys.
    types: HashMap<&'static str, i64>,
    linger: Linger,
}

/// How much later than the stored one a stream's new wake-up time may be before it is written.
/// A device's offline deadline moves later with every reading; writing each move would rewrite
/// the stream's row at every append. A stored time that is early is safe: it is only read at
/// start-up, and a device ticked before its deadline finds nothing due and files the real one.
/// So a restart costs a device at most one early tick, and the row is written about once a
/// minute per device instead of once per reading.
const WAKE_SLACK_MICROS: i64 = 60_000_000;

/// A stream's key in `streams`, its version, and its wake-up time as stored.
#[derive(Debug, Clone, Copy)]
struct StreamKey {
    id: i64,
    version: u64,
    wake_at: Option<i64>,
}

/// Whether a stream's wake-up time must be written, from `stored` to `wanted` (see
/// [`WAKE_SLACK_MICROS`]).
fn wake_needs_writing(stored: Option<i64>, wanted: Option<i64>) -> bool {
    match (stored, wanted) {
        (None, None) => false,
        (Some(stored), Some(wanted)) => {
            wanted < stored || wanted > stored.saturating_add(WAKE_SLACK_MICROS)
        }
        _ => true,
    }
}

/// Whether a failed write is the store's fault (it cannot write now) rather than something in
/// the batch itself.
fn is_store_fault(error: &rusqlite::Error) -> bool {
    match error {
        rusqlite::Error::SqliteFailure(e, _) => !matches!(
            e.code,
            ErrorCode::TooBig
                | ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::ParameterOutOfRange
        ),
        _ => false,
    }
}

/// Commits, unless a fault is injected (test builds with the `failpoints` feature only:
/// `FAILPOINTS=store-commit=N*off->M*return(readonly)`; see docs/reliability.md).
fn commit(tx: Transaction<'_>) -> rusqlite::Result<()> {
    fail::fail_point!("store-commit", |fault: Option<String>| {
        Err(injected_fault(fault.as_deref()))
    });
    tx.commit()
}

/// The error SQLite gives for the named fault.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected_fault(fault: Option<&str>) -> rusqlite::Error {
    let (code, message) = match fault {
        Some("full") => (rusqlite::ffi::SQLITE_FULL, "database or disk is full"),
        Some("ioerr") => (rusqlite::ffi::SQLITE_IOERR, "disk I/O error"),
        _ => (
            rusqlite::ffi::SQLITE_READONLY,
            "attempt to write a readonly database",
        ),
    };
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(code),
        Some(format!("{message} (injected)")),
    )
}

/// Runs the writer until every sender is gone and the queue is drained; replaces a writer that
/// panics.
pub(super) fn run_supervised(
    first: Writer,
    config: WriterConfig,
    commands: mpsc::Receiver<WriteCommand>,
) {
    let mut writer = Some(first);
    let mut deaths = 0u32;
    loop {
        let mut current = match writer.take() {
            Some(w) => w,
            None => match Writer::open(config.clone()) {
                Ok(w) => w,
                Err(e) => {
                    config
                        .health
                        .failing(format!("cannot reopen the database: {e}"));
                    std::thread::sleep(restart_backoff(deaths));
                    deaths = deaths.saturating_add(1);
                    continue;
                }
            },
        };
        let started = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| current.run(&commands))) {
            Ok(()) => {
                tracing::debug!("store writer drained and stopped");
                return;
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                drop(current);
                if started.elapsed() > STABLE_RUN {
                    deaths = 0;
                }
                metrics::counter!("fleetwatch_store_writer_restarts_total").increment(1);
                config
                    .health
                    .failing(format!("the store writer died: {message}"));
                std::thread::sleep(restart_backoff(deaths));
                deaths = deaths.saturating_add(1);
            }
        }
    }
}

fn restart_backoff(deaths: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(2u32.saturating_pow(deaths.min(16)))
        .min(MAX_RESTART_BACKOFF)
}

/// Removes the events of `event_types` from before `before` that a snapshot of their stream
/// covers, in up to `max_streams` streams (with a snapshot) after the key `after`. Never the
/// store's newest event, so a position is never given out twice.
fn prune(
    tx: &Transaction<'_>,
    event_types: &[&str],
    before: DateTime<Utc>,
    after: u64,
    max_streams: usize,
) -> rusqlite::Result<Pruned> {
    let type_ids: Vec<i64> = event_types
        .iter()
        .filter_map(|name| schema::event_type_id(tx, name).transpose())
        .collect::<rusqlite::Result<_>>()?;
    let mut streams = tx.prepare_cached(
        "SELECT stream, version FROM snapshots WHERE stream > ?1 ORDER BY stream",
    )?;
    let covered: Vec<(i64, i64)> = streams
        .query_map(params![after as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
        .take(max_streams)
        .collect::<rusqlite::Result<_>>()?;
    let newest: i64 = tx.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
        r.get(0)
    })?;
    let mut delete = tx.prepare_cached(
        "DELETE FROM events WHERE stream = ?1 AND at < ?2 AND version <= ?3 AND position < ?4
           AND type IN (SELECT value FROM json_each(?5))",
    )?;
    let mut mark = tx.prepare_cached(
        "UPDATE streams SET readings_removed_before = MAX(COALESCE(readings_removed_before, 0), ?2)
         WHERE id = ?1",
    )?;
    let types = serde_json::to_string(&type_ids).unwrap_or_else(|_| "[]".into());
    let cutoff = before.timestamp_micros();
    let mut events = 0u64;
    for (stream, version) in &covered {
        let removed = delete.execute(params![stream, cutoff, version, newest, types])?;
        if removed > 0 {
            mark.execute(params![stream, cutoff])?;
            events += removed as u64;
        }
    }
    // Test builds only: `FAILPOINTS=store-prune=sleep(ms)` holds a pass's write open, uncommitted.
    fail::fail_point!("store-prune");
    Ok(Pruned {
        streams: covered.len(),
        events,
        next: (covered.len() == max_streams)
            .then(|| covered.last().map(|(id, _)| *id as u64))
            .flatten(),
    })
}

/// The events a committed batch appended, as stored. Only this writer inserts, so one append's
/// events have consecutive positions ending at its `last_position`.
fn committed_events(
    batch: &[WriteCommand],
    staged: &[Staged],
    recorded_at: DateTime<Utc>,
) -> Vec<RecordedEvent> {
    let mut committed = Vec::new();
    for (command, staged) in batch.iter().zip(staged) {
        let (WriteCommand::Append { stream, events, .. }, Staged::Appended(appended)) =
            (command, staged)
        else {
            continue;
        };
        let first_position = appended.last_position + 1 - events.len() as u64;
        let first_version = appended.version + 1 - events.len() as u64;
        for (i, event) in events.iter().enumerate() {
            committed.push(RecordedEvent {
                position: first_position + i as u64,
                stream: stream.clone(),
                version: first_version + i as u64,
                event_type: event.event_type.to_owned(),
                schema_version: event.schema_version,
                recorded_at,
                at: event.at,
                payload: event.payload.clone(),
            });
        }
    }
    committed
}

/// `stream`'s key and version as of the batch being staged: staged by it, cached, or stored.
/// `None` for a stream that does not exist yet, which is cached too: `$rules` is looked up for
/// every append, and may not exist.
fn stream_key(
    streams: &mut HashMap<String, Option<StreamKey>>,
    pending: &HashMap<&str, StreamKey>,
    tx: &Transaction<'_>,
    stream: &str,
) -> rusqlite::Result<Option<StreamKey>> {
    if let Some(key) = pending.get(stream) {
        return Ok(Some(*key));
    }
    if let Some(key) = streams.get(stream) {
        return Ok(*key);
    }
    let stored = tx
        .prepare_cached(&format!(
            "SELECT s.id, {}, s.wake_at FROM streams s WHERE s.name = ?1",
            schema::STREAM_VERSION
        ))?
        .query_row([stream], |row| {
            Ok(StreamKey {
                id: row.get(0)?,
                version: row.get::<_, i64>(1)? as u64,
                wake_at: row.get(2)?,
            })
        })
        .optional()?;
    // Only this writer creates or moves streams, and a stream this batch creates is in `pending`
    // first: what is stored stays true until a commit updates the cache.
    streams.insert(stream.to_owned(), stored);
    Ok(stored)
}

/// The key of an event type, adding it to `event_types` if it is new.
fn type_key(
    types: &mut HashMap<&'static str, i64>,
    tx: &Transaction<'_>,
    name: &'static str,
) -> rusqlite::Result<i64> {
    if let Some(id) = types.get(name) {
        return Ok(*id);
    }
    let id = match schema::event_type_id(tx, name)? {
        Some(id) => id,
        None => {
            tx.prepare_cached("INSERT INTO event_types (name) VALUES (?1)")?
                .execute([name])?;
            tx.last_insert_rowid()
        }
    };
    // Cached only once committed would be stricter; a rolled-back type is re-added next time,
    // and its key is then simply a new one: drop the cache when a batch fails (see `stage`).
    types.insert(name, id);
    Ok(id)
}

impl Writer {
    pub(super) fn open(config: WriterConfig) -> Result<Self, SchemaError> {
        let mut conn = Connection::open(&config.path)?;
        configure(&conn)?;
        schema::prepare(&mut conn)?;
        Ok(Self {
            conn,
            linger: Linger::new(config.linger),
            config,
            streams: HashMap::new(),
            types: HashMap::new(),
        })
    }

    /// Writes batches until every sender is gone and the queue is empty.
    fn run(&mut self, commands: &mpsc::Receiver<WriteCommand>) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        loop {
            let first = if self.config.health.is_available() {
                match commands.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                }
            } else {
                match commands.recv_timeout(PROBE_INTERVAL) {
                    Ok(command) => command,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            batch.push(first);
            self.gather(commands, &mut batch);
            self.write_batch(&mut batch);
        }
    }

    /// Adds what else has queued to `batch`. At a high rate a small batch lingers up to `linger`
    /// for more, so that a steady stream of appends shares commits (and their fsyncs, WAL pages
    /// and wake-ups) instead of paying one each; at a low rate it commits at once.
    fn gather(&mut self, commands: &mpsc::Receiver<WriteCommand>, batch: &mut Vec<WriteCommand>) {
        self.take_queued(commands, batch);
        if let Some(wait) = self.linger.wait(batch.len()) {
            std::thread::sleep(wait);
            self.take_queued(commands, batch);
        }
        self.linger.record(batch.len(), Instant::now());
    }

    fn take_queued(&self, commands: &mpsc::Receiver<WriteCommand>, batch: &mut Vec<WriteCommand>) {
        while batch.len() < self.config.max_batch {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
    }

    /// A failing store's one-row test write.
    fn probe(&mut self) {
        let written = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?1)",
                [Utc::now().timestamp_micros()],
            )?;
            commit(tx)
        })();
        match written {
            Ok(()) => self.config.health.available(),
            Err(e) => tracing::debug!(error = %e, "store probe failed; still failing"),
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<WriteCommand>) {
        // Test builds only: `FAILPOINTS=store-writer=N*off->M*panic` kills the writer here.
        fail::fail_point!("store-writer");
        let started = Instant::now();
        let event_count: usize = batch.iter().map(WriteCommand::event_count).sum();
        match self.stage(batch) {
            Ok((staged, recorded_at)) => {
                self.config.health.available();
                // Copies for the live feed are only worth making when someone listens. Checked
                // after the commit: a subscriber that arrives later reads this batch from the store.
                if self.config.live.receiver_count() > 0 {
                    let committed = committed_events(batch, &staged, recorded_at);
                    if !committed.is_empty() {
                        let _ = self.config.live.send(Arc::new(committed));
                    }
                }
                for (command, staged) in batch.drain(..).zip(staged) {
                    command.answer(staged);
                }
                metrics::counter!("fleetwatch_store_events_appended_total")
                    .increment(event_count as u64);
            }
            Err(e) if is_store_fault(&e) => {
                let cause = e.to_string();
                self.config.health.failing(cause.clone());
                for command in batch.drain(..) {
                    command.fail(StoreError::Unavailable(cause.clone()));
                }
            }
            Err(e) if batch.len() == 1 => {
                tracing::error!(error = %e, "the store refused a write");
                for command in batch.drain(..) {
                    command.fail(StoreError::Refused(e.to_string()));
                }
            }
            Err(e) => {
                // Something in the batch itself: write each command alone, so only it fails.
                tracing::warn!(error = %e, commands = batch.len(), "a store batch was refused; writing its commands one by one");
                for command in std::mem::take(batch) {
                    self.write_batch(&mut vec![command]);
                }
            }
        }
        metrics::histogram!("fleetwatch_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("fleetwatch_store_commit_events").record(event_count as f64);
    }

    /// Writes every command of the batch in one transaction and commits it.
    fn stage(&mut self, batch: &[WriteCommand]) -> rusqlite::Result<(Vec<Staged>, DateTime<Utc>)> {
        let staged = self.stage_uncached(batch);
        if staged.is_err() {
            // Keys handed out in the rolled-back transaction are gone with it.
            self.types.clear();
        }
        staged
    }

    fn stage_uncached(
        &mut self,
        batch: &[WriteCommand],
    ) -> rusqlite::Result<(Vec<Staged>, DateTime<Utc>)> {
        // Stored at microsecond precision; published events must read exactly as stored ones.
        let micros = Utc::now().timestamp_micros();
        let now = DateTime::from_timestamp_micros(micros).unwrap_or_default();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut staged = Vec::with_capacity(batch.len());
        // Streams this batch creates or moves; they count only once it has committed.
        let mut pending: HashMap<&str, StreamKey> = HashMap::new();
        {
            let mut insert_event = tx.prepare_cached(
                "INSERT INTO events (stream, version, type, schema, recorded_at, at, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut insert_stream =
                tx.prepare_cached("INSERT INTO streams (name, wake_at) VALUES (?1, ?2)")?;
            let mut update_wake =
                tx.prepare_cached("UPDATE streams SET wake_at = ?2 WHERE id = ?1")?;
            let mut upsert_snapshot = tx.prepare_cached(
                "INSERT INTO snapshots (stream, version, schema, payload) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (stream) DO UPDATE SET version = excluded.version,
                     schema = excluded.schema, payload = excluded.payload
                 WHERE excluded.version >= snapshots.version",
            )?;
            for command in batch {
                match command {
                    WriteCommand::Append {
                        stream,
                        expected,
                        events,
                        condition,
                        wake,
                        ..
                    } => {
                        let condition_actual = match condition {
                            Some(c) => stream_key(&mut self.streams, &pending, &tx, c.stream)?
                                .map_or(0, |k| k.version),
                            None => 0,
                        };
                        let key = stream_key(&mut self.streams, &pending, &tx, stream)?;
                        let actual = key.map_or(0, |k| k.version);
                        if let Some(conflict) = append_conflict(
                            stream,
                            *expected,
                            actual,
                            condition.as_ref(),
                            condition_actual,
                        ) {
                            staged.push(Staged::Conflict(conflict));
                            continue;
                        }
                        if events.is_empty() {
                            staged.push(Staged::Appended(Appended {
                                version: actual,
                                last_position: 0,
                            }));
                            continue;
                        }
                        let stored_wake = key.and_then(|k| k.wake_at);
                        let wanted_wake = match wake {
                            Wake::Keep => stored_wake,
                            Wake::At(at) => at.map(|at| at.timestamp_micros()),
                        };
                        let (id, wake_at) = match key {
                            Some(key) if wake_needs_writing(stored_wake, wanted_wake) => {
                                update_wake.execute(params![key.id, wanted_wake])?;
                                (key.id, wanted_wake)
                            }
                            Some(key) => (key.id, stored_wake),
                            None => {
                                insert_stream.execute(params![stream, wanted_wake])?;
                                (tx.last_insert_rowid(), wanted_wake)
                            }
                        };
                        let mut version = actual;
                        let mut position = 0;
                        for event in events {
                            version += 1;
                            let type_id = type_key(&mut self.types, &tx, event.event_type)?;
                            insert_event.execute(params![
                                id,
                                version as i64,
                                type_id,
                                event.schema_version,
                                micros,
                                event.at.map(|at| at.timestamp_micros()),
                                &event.payload[..],
                            ])?;
                            position = tx.last_insert_rowid() as u64;
                        }
                        pending.insert(
                            stream.as_str(),
                            StreamKey {
                                id,
                                version,
                                wake_at,
                            },
                        );
                        staged.push(Staged::Appended(Appended {
                            version,
                            last_position: position,
                        }));
                    }
                    WriteCommand::Snapshot { snapshot, .. } => {
                        match stream_key(&mut self.streams, &pending, &tx, &snapshot.stream)? {
                            Some(key) if snapshot.version <= key.version => {
                                upsert_snapshot.execute(params![
                                    key.id,
                                    snapshot.version as i64,
                                    snapshot.schema_version,
                                    &snapshot.payload[..],
                                ])?;
                            }
                            // A snapshot never claims more than its stream holds: the stream's
                            // version is derived from it once retention removed the events.
                            Some(key) => tracing::warn!(
                                stream = %snapshot.stream,
                                snapshot = snapshot.version,
                                version = key.version,
                                "a snapshot ahead of its stream was not saved"
                            ),
                            // A stream with no events has nothing to snapshot.
                            None => {}
                        }
                        staged.push(Staged::Done);
                    }
                    WriteCommand::Flush { .. } => staged.push(Staged::Done),
                    WriteCommand::Prune {
                        event_types,
                        before,
                        after,
                        max_streams,
                        ..
                    } => {
                        let pruned = prune(&tx, event_types, *before, *after, *max_streams)?;
                        staged.push(Staged::Pruned(pruned));
                    }
                }
            }
        }
        commit(tx)?;
        if self.streams.len() + pending.len() > STREAM_CACHE_LIMIT {
            self.streams.clear();
        }
        for (stream, key) in pending {
            match self.streams.get_mut(stream) {
                Some(cached) => *cached = Some(key),
                None => {
                    self.streams.insert(stream.to_owned(), Some(key));
                }
            }
        }
        Ok((staged, now))
    }
}
