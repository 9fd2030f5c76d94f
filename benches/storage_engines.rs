//! SQLite (WAL, via rusqlite) against redb, the raw engines doing the event store's job.
//!
//! This is the measurement behind the choice of embedded engine (see `docs/benchmarks.md`), so
//! both engines get the same data model and the same durability, and neither goes through
//! fleetwatch's store:
//! * an events table keyed by global position plus a unique (stream, version) index: in SQLite
//!   `INTEGER PRIMARY KEY` + `UNIQUE (stream_id, version)`, in redb two tables;
//! * every commit is durable: SQLite `journal_mode=WAL`, `synchronous=FULL`; redb's default
//!   `Durability::Immediate`. Each engine otherwise keeps its defaults (page cache included).
//!
//! `commit/<engine>/<K>` group-commits K events (K = 1, 64, 1024) per transaction, spread
//! round-robin over `STREAMS` streams as a writer serving many devices would; throughput is in
//! events. `read_last_100/<engine>` reads one stream's 100 newest events through the
//! (stream, version) index, out of `PRELOADED` events, and decodes them into owned values.
//!
//! Run with `cargo bench --bench storage_engines` (2–3 minutes: commits slow down as the
//! databases grow, so criterion runs past its time estimates).

use std::path::Path;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use redb::{ReadableDatabase, TableDefinition};
use rusqlite::{params, Connection, TransactionBehavior};
use tempfile::TempDir;

/// A typical `ReadingRecorded` payload (160 bytes).
const PAYLOAD: &str = r#"{"type":"ReadingRecorded","device_id":"truck-0042","at":"2026-11-23T18:00:00Z","location":{"lat":52.370716,"lon":4.895168},"temperature":5.1,"rules_version":12}"#;
const EVENT_TYPE: &str = "ReadingRecorded";
const STREAMS: usize = 1_000;
const BATCH_SIZES: [usize; 3] = [1, 64, 1024];
const PRELOADED: usize = 120 * STREAMS;
const READ_LAST: usize = 100;

/// An event to write, borrowing its stream name and payload.
struct Event<'a> {
    position: u64,
    stream: &'a str,
    version: u64,
    event_type: &'a str,
    data: &'a str,
}

/// An event read back.
#[derive(Debug, PartialEq)]
struct Stored {
    position: u64,
    version: u64,
    event_type: String,
    data: String,
}

/// Hands out events round-robin over `STREAMS` streams, with positions and versions in order.
struct Events {
    streams: Vec<String>,
    versions: Vec<u64>,
    next_position: u64,
}

impl Events {
    fn new() -> Self {
        Self {
            streams: (0..STREAMS).map(|i| format!("device-{i:05}")).collect(),
            versions: vec![0; STREAMS],
            next_position: 1,
        }
    }

    fn batch(&mut self, k: usize) -> Vec<Event<'_>> {
        let mut batch = Vec::with_capacity(k);
        for _ in 0..k {
            let s = self.next_position as usize % STREAMS;
            self.versions[s] += 1;
            batch.push(Event {
                position: self.next_position,
                stream: &self.streams[s],
                version: self.versions[s],
                event_type: EVENT_TYPE,
                data: PAYLOAD,
            });
            self.next_position += 1;
        }
        batch
    }
}

trait Engine {
    const NAME: &'static str;
    fn open(dir: &Path) -> Self;
    /// Writes `events` in one durable transaction.
    fn commit(&mut self, events: &[Event<'_>]);
    /// The `n` newest events of `stream`, newest first.
    fn last_events(&self, stream: &str, n: usize) -> Vec<Stored>;
}

struct Sqlite(Connection);

impl Engine for Sqlite {
    const NAME: &'static str = "sqlite";

    fn open(dir: &Path) -> Self {
        let conn = Connection::open(dir.join("events.sqlite3")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE events (
                 position   INTEGER PRIMARY KEY,
                 stream_id  TEXT    NOT NULL,
                 version    INTEGER NOT NULL,
                 event_type TEXT    NOT NULL,
                 data       TEXT    NOT NULL,
                 UNIQUE (stream_id, version)
             );",
        )
        .unwrap();
        Self(conn)
    }

    fn commit(&mut self, events: &[Event<'_>]) {
        let tx = self
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (position, stream_id, version, event_type, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .unwrap();
            for e in events {
                insert
                    .execute(params![
                        e.position as i64,
                        e.stream,
                        e.version as i64,
                        e.event_type,
                        e.data
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn last_events(&self, stream: &str, n: usize) -> Vec<Stored> {
        let mut select = self
            .0
            .prepare_cached(
                "SELECT position, version, event_type, data FROM events
                 WHERE stream_id = ?1 ORDER BY version DESC LIMIT ?2",
            )
            .unwrap();
        select
            .query_map(params![stream, n as i64], |row| {
                Ok(Stored {
                    position: row.get::<_, i64>(0)? as u64,
                    version: row.get::<_, i64>(1)? as u64,
                    event_type: row.get(2)?,
                    data: row.get(3)?,
                })
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

/// position -> (stream, version, event type, data)
const EVENTS: TableDefinition<u64, (&str, u64, &str, &str)> = TableDefinition::new("events");
/// (stream, version) -> position
const STREAM_INDEX: TableDefinition<(&str, u64), u64> = TableDefinition::new("stream_index");

struct Redb(redb::Database);

impl Engine for Redb {
    const NAME: &'static str = "redb";

    fn open(dir: &Path) -> Self {
        Self(redb::Database::create(dir.join("events.redb")).unwrap())
    }

    fn commit(&mut self, events: &[Event<'_>]) {
        let tx = self.0.begin_write().unwrap();
        {
            let mut by_position = tx.open_table(EVENTS).unwrap();
            let mut by_stream = tx.open_table(STREAM_INDEX).unwrap();
            for e in events {
                let row = (e.stream, e.version, e.event_type, e.data);
                by_position.insert(e.position, row).unwrap();
                let clash = by_stream.insert((e.stream, e.version), e.position).unwrap();
                // What SQLite's UNIQUE constraint does; a real store would abort the transaction.
                assert!(clash.is_none(), "duplicate stream version");
            }
        }
        tx.commit().unwrap();
    }

    fn last_events(&self, stream: &str, n: usize) -> Vec<Stored> {
        let tx = self.0.begin_read().unwrap();
        let by_position = tx.open_table(EVENTS).unwrap();
        let by_stream = tx.open_table(STREAM_INDEX).unwrap();
        by_stream
            .range((stream, 0)..=(stream, u64::MAX))
            .unwrap()
            .rev()
            .take(n)
            .map(|entry| {
                let position = entry.unwrap().1.value();
                let row = by_position.get(position).unwrap().unwrap();
                let (_, version, event_type, data) = row.value();
                Stored {
                    position,
                    version,
                    event_type: event_type.to_owned(),
                    data: data.to_owned(),
                }
            })
            .collect()
    }
}

/// A fresh database of engine `E` in its own directory.
fn open<E: Engine>() -> (TempDir, E) {
    // Under the target dir rather than /tmp, which may be a tmpfs where fsync costs nothing.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let engine = E::open(dir.path());
    (dir, engine)
}

fn bench_commit<E: Engine>(c: &mut Criterion) {
    let mut group = c.benchmark_group("commit");
    // Short: the database grows with every iteration, and so does the cost of a commit.
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for k in BATCH_SIZES {
        let (_dir, mut engine) = open::<E>();
        let mut events = Events::new();
        group.throughput(Throughput::Elements(k as u64));
        group.bench_function(BenchmarkId::new(E::NAME, k), |b| {
            b.iter(|| engine.commit(&events.batch(k)))
        });
    }
    group.finish();
}

/// A database holding `PRELOADED` events, `PRELOADED / STREAMS` per stream.
fn preloaded<E: Engine>() -> (TempDir, E) {
    let (dir, mut engine) = open::<E>();
    let mut events = Events::new();
    for _ in 0..PRELOADED / 10_000 {
        engine.commit(&events.batch(10_000));
    }
    (dir, engine)
}

fn bench_read(c: &mut Criterion) {
    let (_sqlite_dir, sqlite) = preloaded::<Sqlite>();
    let (_redb_dir, redb) = preloaded::<Redb>();
    let streams = Events::new().streams;
    let newest = sqlite.last_events(&streams[7], READ_LAST);
    assert_eq!(newest.len(), READ_LAST);
    assert_eq!(newest, redb.last_events(&streams[7], READ_LAST));

    let mut group = c.benchmark_group("read_last_100");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    read_last::<Sqlite>(&mut group, &sqlite, &streams);
    read_last::<Redb>(&mut group, &redb, &streams);
    group.finish();
}

fn read_last<E: Engine>(group: &mut BenchmarkGroup<'_, WallTime>, engine: &E, streams: &[String]) {
    let mut next = streams.iter().cycle();
    group.bench_function(E::NAME, |b| {
        b.iter(|| engine.last_events(next.next().unwrap(), READ_LAST))
    });
}

criterion_group!(
    benches,
    bench_commit::<Sqlite>,
    bench_commit::<Redb>,
    bench_read
);
criterion_main!(benches);
