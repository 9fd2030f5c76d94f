//! The PostgreSQL backend, for several engine nodes sharing one store.
//!
//! * **One writer task per node** group-commits what the node's actors queue, as the embedded
//!   store's writer does: one transaction per batch, and every append in it answered only after
//!   the commit.
//! * **The global position** is assigned under the row lock of `global_position`, taken first by
//!   every writing transaction and held until it commits. Writers on all nodes therefore commit in
//!   the order of the positions they assign, and a reader never finds a gap that fills in later:
//!   whatever it reads is a prefix of the global stream. The price is that nodes' commits do not
//!   overlap; group commit makes each of them carry many appends.
//! * **Expected versions** are checked in that transaction too, so that two nodes appending to one
//!   stream (an old owner and a new one) cannot both win: the later one gets a conflict.
//! * **Live feed:** every commit sends `NOTIFY fleetwatch_events` with the new head. Each node's
//!   follower listens and publishes every node's events on [`EventStore::subscribe`] in position
//!   order, reading what it has not seen from the table; its own commits it publishes as they are.
//! * The tables are created, and later changed, by the migrations in `migrations/postgres`, run at
//!   start in one transaction under an advisory lock, so that nodes starting together do not race.
//!   (tokio-postgres and a small migration runner rather than sqlx: sqlx's optional SQLite driver
//!   links another libsqlite3 than the embedded store's, which Cargo refuses to build.)
//! * **TLS** with `sslmode=require` in `--store-url` ([`connection_settings`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::command::{append_conflict, Staged, WriteCommand as Command};
use super::health::HealthSignal;
use super::linger::Linger;
use super::{
    Appended, CommittedBatch, EventStore, NewEvent, Pruned, RecordedEvent, Retention, Snapshot,
    SnapshotAndTail, StoreError, StoreHealth, StoreResult, StreamAt, StreamInfo, Wake, WakeTime,
};

/// The connection settings and TLS of `--store-url`. With `sslmode=require` the connections are
/// encrypted and the server's certificate and name are verified, against the system's root
/// certificates or, with `sslrootcert=<PEM file>` in the URL, against that file's only (libpq's
/// `require` does not verify; fleetwatch always does). Any other mode connects over plain TCP,
/// as before TLS was supported.
pub(crate) fn connection_settings(
    url: &str,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let (url, root_file) = take_query_param(url, "sslrootcert")?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    // A database that vanishes without closing its connections (a network partition, a host
    // gone) must still fail the store within seconds, so that ingest pauses and the node hands
    // its partitions over, rather than waiting on a silent socket for TCP's hours.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(15));
    let mut roots = rustls::RootCertStore::empty();
    if config.get_ssl_mode() == SslMode::Require {
        match root_file {
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(&path)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("sslrootcert {path}: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        if roots.is_empty() {
            return Err("sslmode=require, but there is no root certificate to verify the server with (give sslrootcert)".into());
        }
    } else {
        // `prefer` (the default) would try TLS, and fail where the server's certificate does not
        // verify: plain TCP as before, unless TLS is asked for.
        config.ssl_mode(SslMode::Disable);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((config, MakeRustlsConnect::new(tls)))
}

/// `url` without its query parameter `name` (which tokio-postgres does not know), and the
/// parameter's value.
fn take_query_param(url: &str, name: &str) -> Result<(String, Option<String>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut value = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((key, raw)) if key == name => {
                let decoded = percent_encoding::percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|e| format!("{name}: {e}"))?;
                value = Some(decoded.into_owned());
            }
            _ => kept.push(pair),
        }
    }
    let url = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((url, value))
}

/// The channel every commit notifies, with the new head position as its payload.
const CHANNEL: &str = "fleetwatch_events";
/// How often a failing store tries the database to find out whether it works again.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the follower looks for commits whose notification it may have missed (while its
/// listening connection was being re-established).
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// Events the follower reads per query while catching up.
const CATCH_UP_PAGE: usize = 1000;

#[derive(Debug, Clone)]
pub struct PostgresStoreOptions {
    /// Most commands written in one transaction.
    pub max_batch: usize,
    /// Connections in the pool (the writer and the follower each hold one while they work).
    pub connections: u32,
    /// Capacity of the live feed (in commits) before slow subscribers lag.
    pub live_capacity: usize,
    /// How long a small batch waits for more appends before it commits.
    pub linger: Duration,
}

impl Default for PostgresStoreOptions {
    fn default() -> Self {
        Self {
            max_batch: 4096,
            connections: 8,
            live_capacity: 4096,
            linger: Duration::ZERO,
        }
    }
}

pub struct PostgresStore {
    pool: Pool,
    /// The runtime the pool's connections belong to: every query runs there, whichever runtime
    /// (an actor's arbiter, say) calls.
    runtime: tokio::runtime::Handle,
    // Unbounded: an append is queued when it is called, from any thread, without blocking; the
    // engine's in-flight limit bounds what can be queued.
    writer: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    live: broadcast::Sender<CommittedBatch>,
    health: watch::Receiver<StoreHealth>,
    /// Told by reads that cannot reach the database too: an engine whose actors only read (a
    /// restore, a lookup) must still find out, pause ingest and hand its partitions over.
    signal: HealthSignal,
}

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
enum PgError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Store(String),
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Whether an error is the store's fault (it passes: the connection, the server, the disk) rather
/// than the data's (a value the database refuses: SQLSTATE classes 22 and 23).
fn is_store_fault(error: &PgError) -> bool {
    match error {
        PgError::Db(e) => !e.code().is_some_and(|state| {
            let code = state.code();
            code.starts_with("22") || code.starts_with("23")
        }),
        PgError::Pool(_) => true,
        PgError::Store(_) => false,
    }
}

/// The schema, one step per migration, applied in order and recorded in `fleetwatch_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    include_str!("../../migrations/postgres/0001_event_store.sql"),
)];

/// The advisory lock under which a node migrates (any constant unlikely to be used by others).
const MIGRATION_LOCK: i64 = 0x666c_6565_7477_6174; // "fleetwat"

async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fleetwatch_migrations (
             version    INT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Option<i32> = tx
        .query_one("SELECT max(version) FROM fleetwatch_migrations", &[])
        .await?
        .try_get(0)?;
    let applied = applied.unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if applied > known {
        return Err(PgError::Store(format!(
            "the store is at migration {applied}, newer than this build knows ({known}): use a newer fleetwatch"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO fleetwatch_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "migrated the PostgreSQL event store");
    }
    tx.commit().await?;
    Ok(())
}

impl PostgresStore {
    /// Connects to the database at `url` and brings its tables to this build's migrations.
    pub async fn open(url: &str, options: PostgresStoreOptions) -> StoreResult<Self> {
        let (config, tls) =
            connection_settings(url).map_err(|e| unavailable(format!("--store-url: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.connections.max(2) as usize)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(unavailable)?;
        let mut client = pool.get().await.map_err(|e| {
            unavailable(format!(
                "connecting to PostgreSQL: {}",
                crate::telemetry::error_chain(&e)
            ))
        })?;
        migrate(&mut client)
            .await
            .map_err(|e| unavailable(format!("migrating the PostgreSQL store: {e}")))?;
        drop(client);
        let head = head_position(&pool).await.map_err(unavailable)?;
        let (live, _) = broadcast::channel(options.live_capacity.max(16));
        let health = HealthSignal::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let (own_tx, own_rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Handle::current();
        let writer = Writer {
            pool: pool.clone(),
            health: health.clone(),
            committed: own_tx,
            max_batch: options.max_batch.max(1),
            linger: Linger::new(options.linger),
            types: HashMap::new(),
        };
        let writer_task = runtime.spawn(writer.run(rx));
        runtime.spawn(follow(
            pool.clone(),
            (config, tls),
            live.clone(),
            own_rx,
            head,
        ));
        Ok(Self {
            pool,
            runtime,
            writer: Mutex::new(Some(tx)),
            writer_task: Mutex::new(Some(writer_task)),
            live,
            health: health.subscribe(),
            signal: health,
        })
    }

    fn send(&self, command: Command) -> StoreResult<()> {
        let sender = self
            .writer
            .lock()
            .map_err(|_| StoreError::Closed)?
            .as_ref()
            .cloned()
            .ok_or(StoreError::Closed)?;
        sender.send(command).map_err(|_| StoreError::Closed)
    }

    fn write<T: Send + 'static>(
        &self,
        command: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> Command,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(command(tx));
        async move {
            sent?;
            rx.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the store writer stopped before answering".into(),
                ))
            })
        }
        .boxed()
    }

    /// Runs `query` on a pooled connection, on the store's runtime.
    fn read<T, F>(
        &self,
        query: impl FnOnce(deadpool_postgres::Object) -> F + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, PgError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let signal = self.signal.clone();
        let task = self.runtime.spawn(async move {
            let read = async {
                let client = pool.get().await?;
                query(client).await
            };
            let result = read.await;
            if let Err(e) = &result {
                if is_store_fault(e) {
                    signal.failing(format!("reading: {e}"));
                }
            }
            result
        });
        async move { task.await.map_err(unavailable)?.map_err(unavailable) }.boxed()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The writer drains its queue and stops; the follower stops after it.
        if let Ok(mut sender) = self.writer.lock() {
            sender.take();
        }
    }
}

async fn head_position(pool: &Pool) -> Result<u64, PgError> {
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT head FROM global_position", &[])
        .await?;
    Ok(row.try_get::<_, i64>(0)? as u64)
}

/// Runs a read-only statement, prepared once per connection.
async fn query(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, PgError> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query(&statement, params).await?)
}

/// The columns every event read selects, in [`row_to_event`]'s order.
macro_rules! event_columns {
    () => {
        "e.position, s.name, e.version, t.name, e.schema, e.recorded_at, e.at, e.payload"
    };
}

fn row_to_event(row: &Row) -> Result<RecordedEvent, PgError> {
    Ok(RecordedEvent {
        position: row.try_get::<_, i64>(0)? as u64,
        stream: row.try_get(1)?,
        version: row.try_get::<_, i64>(2)? as u64,
        event_type: row.try_get(3)?,
        schema_version: row.try_get::<_, i32>(4)? as u16,
        recorded_at: row.try_get(5)?,
        at: row.try_get(6)?,
        payload: Bytes::from(row.try_get::<_, Vec<u8>>(7)?),
    })
}

fn rows_to_events(rows: Vec<Row>) -> Result<Vec<RecordedEvent>, PgError> {
    rows.iter().map(row_to_event).collect()
}

async fn read_stream_rows(
    client: &deadpool_postgres::Object,
    stream: &str,
    from_version: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, PgError> {
    let rows = query(
        client,
        concat!(
            "SELECT ",
            event_columns!(),
            " FROM streams s JOIN events e ON e.stream = s.id JOIN event_types t ON t.id = e.type
             WHERE s.name = $1 AND e.version >= $2 ORDER BY e.version LIMIT $3"
        ),
        &[&stream, &(from_version as i64), &(limit as i64)],
    )
    .await?;
    rows_to_events(rows)
}

async fn read_all_rows(
    client: &deadpool_postgres::Object,
    after_position: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, PgError> {
    let rows = query(
        client,
        concat!(
            "SELECT ",
            event_columns!(),
            " FROM events e JOIN streams s ON s.id = e.stream JOIN event_types t ON t.id = e.type
             WHERE e.position > $1 ORDER BY e.position LIMIT $2"
        ),
        &[&(after_position as i64), &(limit as i64)],
    )
    .await?;
    rows_to_events(rows)
}

impl EventStore for PostgresStore {
    fn append_waking(
        &self,
        stream: &str,
        expected_version: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
    ) -> BoxFuture<'static, StoreResult<Appended>> {
        let stream = stream.to_owned();
        self.write(move |reply| Command::Append {
            stream,
            expected: expected_version,
            events,
            condition,
            wake,
            reply,
        })
    }

    fn wake_times(&self) -> BoxFuture<'static, StoreResult<Vec<WakeTime>>> {
        self.read(|client| async move {
            let rows = query(
                &client,
                "SELECT name, wake_at FROM streams WHERE wake_at IS NOT NULL",
                &[],
            )
            .await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect()
        })
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        let stream = stream.to_owned();
        self.read(move |client| async move {
            read_stream_rows(&client, &stream, from_version, limit).await
        })
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        self.read(move |client| async move { read_all_rows(&client, after_position, limit).await })
    }

    fn save_snapshot(&self, snapshot: Snapshot) -> BoxFuture<'static, StoreResult<()>> {
        self.write(move |reply| Command::Snapshot { snapshot, reply })
    }

    fn read_latest(
        &self,
        stream: &str,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<SnapshotAndTail>> {
        let stream = stream.to_owned();
        self.read(move |client| async move {
            let rows = query(
                &client,
                "SELECT n.version, n.schema, n.payload FROM streams s
                 JOIN snapshots n ON n.stream = s.id WHERE s.name = $1",
                &[&stream],
            )
            .await?;
            let snapshot = rows
                .first()
                .map(|row| -> Result<Snapshot, PgError> {
                    Ok(Snapshot {
                        stream: stream.clone(),
                        version: row.try_get::<_, i64>(0)? as u64,
                        schema_version: row.try_get::<_, i32>(1)? as u16,
                        payload: Bytes::from(row.try_get::<_, Vec<u8>>(2)?),
                    })
                })
                .transpose()?;
            let from_version = snapshot.as_ref().map_or(1, |s| s.version + 1);
            let tail = read_stream_rows(&client, &stream, from_version, limit).await?;
            Ok(SnapshotAndTail { snapshot, tail })
        })
    }

    fn list_streams(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<StreamInfo>>> {
        let after = after.unwrap_or("").to_owned();
        self.read(move |client| async move {
            let rows = query(
                &client,
                "SELECT name, version FROM streams
                 WHERE name > $1 AND left(name, 1) <> '$' ORDER BY name LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(StreamInfo {
                        stream: row.try_get(0)?,
                        version: row.try_get::<_, i64>(1)? as u64,
                    })
                })
                .collect()
        })
    }

    fn stream_version(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<u64>>> {
        let stream = stream.to_owned();
        self.read(move |client| async move {
            let rows = query(
                &client,
                "SELECT version FROM streams WHERE name = $1",
                &[&stream],
            )
            .await?;
            rows.first()
                .map(|row| Ok(row.try_get::<_, i64>(0)? as u64))
                .transpose()
        })
    }

    fn has_event_at(
        &self,
        stream: &str,
        event_type: &'static str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        let stream = stream.to_owned();
        self.read(move |client| async move {
            let rows = query(
                &client,
                "SELECT EXISTS (SELECT 1 FROM streams s JOIN events e ON e.stream = s.id
                   JOIN event_types t ON t.id = e.type
                   WHERE s.name = $1 AND e.at = $2 AND t.name = $3)",
                &[&stream, &at, &event_type],
            )
            .await?;
            match rows.first() {
                Some(row) => Ok(row.try_get(0)?),
                None => Ok(false),
            }
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
        self.read(move |client| async move {
            // Without `after`, no bound in the query's direction.
            let (after_at, after_position) = match after {
                Some((at, position)) => (Some(at), position as i64),
                None => (None, 0),
            };
            let sql = if newest_first {
                concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM streams s JOIN events e ON e.stream = s.id
                     JOIN event_types t ON t.id = e.type
                     WHERE s.name = $1 AND t.name = $2 AND e.at >= $3 AND e.at < $4
                       AND ($5::timestamptz IS NULL OR (e.at, e.position) < ($5, $6))
                     ORDER BY e.at DESC, e.position DESC LIMIT $7"
                )
            } else {
                concat!(
                    "SELECT ",
                    event_columns!(),
                    " FROM streams s JOIN events e ON e.stream = s.id
                     JOIN event_types t ON t.id = e.type
                     WHERE s.name = $1 AND t.name = $2 AND e.at >= $3 AND e.at < $4
                       AND ($5::timestamptz IS NULL OR (e.at, e.position) > ($5, $6))
                     ORDER BY e.at, e.position LIMIT $7"
                )
            };
            let rows = query(
                &client,
                sql,
                &[
                    &stream,
                    &event_type,
                    &range.start,
                    &range.end,
                    &after_at,
                    &after_position,
                    &(limit as i64),
                ],
            )
            .await?;
            rows_to_events(rows)
        })
    }

    fn prune(
        &self,
        event_types: &'static [&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
    ) -> BoxFuture<'static, StoreResult<Pruned>> {
        self.write(move |reply| Command::Prune {
            event_types,
            before,
            after,
            max_streams,
            reply,
        })
    }

    fn retention(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<Retention>>> {
        let stream = stream.to_owned();
        self.read(move |client| async move {
            let rows = query(
                &client,
                "SELECT readings_removed_before FROM streams WHERE name = $1",
                &[&stream],
            )
            .await?;
            rows.first()
                .map(|row| {
                    Ok(Retention {
                        readings_removed_before: row.try_get(0)?,
                    })
                })
                .transpose()
        })
    }

    fn head_position(&self) -> BoxFuture<'static, StoreResult<u64>> {
        let pool = self.pool.clone();
        let task = self
            .runtime
            .spawn(async move { head_position(&pool).await });
        async move { task.await.map_err(unavailable)?.map_err(unavailable) }.boxed()
    }

    fn subscribe(&self) -> broadcast::Receiver<CommittedBatch> {
        self.live.subscribe()
    }

    fn flush(&self) -> BoxFuture<'static, StoreResult<()>> {
        self.write(|reply| Command::Flush { reply })
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.health.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        if let Ok(mut sender) = self.writer.lock() {
            sender.take();
        }
        let task = self.writer_task.lock().ok().and_then(|mut t| t.take());
        async move {
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        .boxed()
    }
}

struct Writer {
    pool: Pool,
    health: HealthSignal,
    /// Each commit's events, to the follower, which publishes them in position order.
    committed: mpsc::UnboundedSender<CommittedBatch>,
    max_batch: usize,
    linger: Linger,
    /// Event type ids; types are only ever added.
    types: HashMap<&'static str, i32>,
}

/// A stream as a batch sees it: its key (`None` until the batch creates it) and version.
#[derive(Clone, Copy)]
struct StreamState {
    id: Option<i64>,
    version: u64,
    /// The wake-up time the batch sets, if it sets one.
    wake: Option<Option<DateTime<Utc>>>,
    changed: bool,
}

impl Writer {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // A read can find the database gone first: the writer then probes until it answers.
        let mut health_changes = self.health.subscribe();
        loop {
            let first = if self.health.is_available() {
                tokio::select! {
                    command = commands.recv() => match command {
                        Some(command) => command,
                        None => return,
                    },
                    changed = health_changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                match tokio::time::timeout(PROBE_INTERVAL, commands.recv()).await {
                    Ok(Some(command)) => command,
                    Ok(None) => return,
                    Err(_) => {
                        self.probe().await;
                        continue;
                    }
                }
            };
            batch.push(first);
            self.gather(&mut commands, &mut batch).await;
            self.write_batch(&mut batch).await;
        }
    }

    async fn gather(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        batch: &mut Vec<Command>,
    ) {
        self.take_queued(commands, batch);
        if let Some(wait) = self.linger.wait(batch.len()) {
            tokio::time::sleep(wait).await;
            self.take_queued(commands, batch);
        }
        self.linger.record(batch.len(), Instant::now());
    }

    fn take_queued(
        &self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        batch: &mut Vec<Command>,
    ) {
        while batch.len() < self.max_batch {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
    }

    async fn probe(&self) {
        let answered = async {
            let client = self.pool.get().await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, PgError>(())
        };
        match answered.await {
            Ok(()) => self.health.available(),
            Err(e) => tracing::debug!(error = %e, "store probe failed; still failing"),
        }
    }

    /// Writes a batch in one transaction and answers each command; a batch the database refuses
    /// is written again one command at a time, so that one bad append fails alone.
    fn write_batch<'a>(&'a mut self, batch: &'a mut Vec<Command>) -> BoxFuture<'a, ()> {
        async move {
            let started = Instant::now();
            let event_count: usize = batch.iter().map(Command::event_count).sum();
            let staged = self.stage(batch).await;
            if staged.is_err() {
                // A failed transaction may have rolled back types it added.
                self.types.clear();
            }
            match staged {
                Ok((staged, committed)) => {
                    self.health.available();
                    if !committed.is_empty() {
                        let _ = self.committed.send(Arc::new(committed));
                    }
                    for (command, staged) in batch.drain(..).zip(staged) {
                        command.answer(staged);
                    }
                    metrics::counter!("fleetwatch_store_events_appended_total")
                        .increment(event_count as u64);
                }
                Err(e) if is_store_fault(&e) => {
                    let cause = e.to_string();
                    self.health.failing(cause.clone());
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
                    tracing::warn!(error = %e, commands = batch.len(), "a store batch was refused; writing its commands one by one");
                    for command in std::mem::take(batch) {
                        self.write_batch(&mut vec![command]).await;
                    }
                }
            }
            metrics::histogram!("fleetwatch_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("fleetwatch_store_commit_events").record(event_count as f64);
        }
        .boxed()
    }

    /// Makes sure every type in `names` has an id, adding those the database has not seen yet.
    async fn type_ids(
        &mut self,
        tx: &Transaction<'_>,
        names: &[&'static str],
    ) -> Result<(), PgError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| !self.types.contains_key(name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO event_types (name) SELECT * FROM UNNEST($1::text[])
             ON CONFLICT (name) DO NOTHING",
            &[&missing],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT name, id FROM event_types WHERE name = ANY($1)",
                &[&missing],
            )
            .await?;
        for row in rows {
            let name: String = row.try_get(0)?;
            if let Some(known) = names.iter().find(|n| **n == name) {
                self.types.insert(*known, row.try_get(1)?);
            }
        }
        Ok(())
    }

    async fn stage(
        &mut self,
        batch: &[Command],
    ) -> Result<(Vec<Staged>, Vec<RecordedEvent>), PgError> {
        let now =
            DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_default();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // First, so that this transaction's positions, and its version checks, come after every
        // commit before it and before every commit after it.
        let lock = tx
            .prepare_cached("SELECT head FROM global_position FOR UPDATE")
            .await?;
        let head = tx.query_one(&lock, &[]).await?.try_get::<_, i64>(0)? as u64;

        let mut names: Vec<&str> = Vec::new();
        let mut types: Vec<&'static str> = Vec::new();
        for command in batch {
            match command {
                Command::Append {
                    stream,
                    events,
                    condition,
                    ..
                } => {
                    names.push(stream);
                    if let Some(condition) = condition {
                        names.push(condition.stream);
                    }
                    types.extend(events.iter().map(|e| e.event_type));
                }
                Command::Snapshot { snapshot, .. } => names.push(&snapshot.stream),
                Command::Prune { event_types, .. } => types.extend(event_types.iter()),
                Command::Flush { .. } => {}
            }
        }
        names.sort_unstable();
        names.dedup();
        types.sort_unstable();
        types.dedup();
        self.type_ids(&tx, &types).await?;
        let mut streams: HashMap<String, StreamState> = HashMap::with_capacity(names.len());
        let select_streams = tx
            .prepare_cached("SELECT name, id, version FROM streams WHERE name = ANY($1)")
            .await?;
        for row in tx.query(&select_streams, &[&names]).await? {
            streams.insert(
                row.try_get(0)?,
                StreamState {
                    id: Some(row.try_get(1)?),
                    version: row.try_get::<_, i64>(2)? as u64,
                    wake: None,
                    changed: false,
                },
            );
        }

        let mut staged = Vec::with_capacity(batch.len());
        let mut committed: Vec<RecordedEvent> = Vec::new();
        let mut position = head;
        let mut snapshots: Vec<&Snapshot> = Vec::new();
        for command in batch {
            match command {
                Command::Append {
                    stream,
                    expected,
                    events,
                    condition,
                    wake,
                    ..
                } => {
                    let version_of = |name: &str| streams.get(name).map_or(0, |s| s.version);
                    let actual = version_of(stream);
                    let condition_actual = condition.map_or(0, |c| version_of(c.stream));
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
                    let state = streams.entry(stream.clone()).or_insert(StreamState {
                        id: None,
                        version: 0,
                        wake: None,
                        changed: false,
                    });
                    for event in events {
                        state.version += 1;
                        position += 1;
                        committed.push(RecordedEvent {
                            position,
                            stream: stream.clone(),
                            version: state.version,
                            event_type: event.event_type.to_owned(),
                            schema_version: event.schema_version,
                            recorded_at: now,
                            at: event.at,
                            payload: event.payload.clone(),
                        });
                    }
                    state.changed = true;
                    if let Wake::At(at) = wake {
                        state.wake = Some(*at);
                    }
                    staged.push(Staged::Appended(Appended {
                        version: state.version,
                        last_position: position,
                    }));
                }
                Command::Snapshot { snapshot, .. } => {
                    // As in the embedded store: a snapshot of a stream with no events is dropped.
                    if streams.contains_key(&snapshot.stream) {
                        snapshots.push(snapshot);
                    }
                    staged.push(Staged::Done);
                }
                Command::Flush { .. } => staged.push(Staged::Done),
                Command::Prune {
                    event_types,
                    before,
                    after,
                    max_streams,
                    ..
                } => {
                    let pruned = self
                        .prune(&tx, event_types, *before, *after, *max_streams, head)
                        .await?;
                    staged.push(Staged::Pruned(pruned));
                }
            }
        }

        // Streams this batch creates get their keys first.
        let created: Vec<&str> = streams
            .iter()
            .filter(|(_, s)| s.id.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        if !created.is_empty() {
            let rows = tx
                .query(
                    "INSERT INTO streams (name, version)
                     SELECT name, 0 FROM UNNEST($1::text[]) AS n(name) RETURNING name, id",
                    &[&created],
                )
                .await?;
            for row in rows {
                let name: String = row.try_get(0)?;
                if let Some(state) = streams.get_mut(&name) {
                    state.id = Some(row.try_get(1)?);
                }
            }
        }
        let key = |name: &str| streams.get(name).and_then(|s| s.id).unwrap_or_default();

        if !committed.is_empty() {
            let mut event_types = Vec::with_capacity(committed.len());
            for event in &committed {
                let id = self.types.get(event.event_type.as_str()).copied();
                event_types.push(id.ok_or_else(|| {
                    PgError::Store(format!("no id for event type {}", event.event_type))
                })?);
            }
            let positions: Vec<i64> = committed.iter().map(|e| e.position as i64).collect();
            let stream_keys: Vec<i64> = committed.iter().map(|e| key(&e.stream)).collect();
            let versions: Vec<i64> = committed.iter().map(|e| e.version as i64).collect();
            let schemas: Vec<i32> = committed
                .iter()
                .map(|e| i32::from(e.schema_version))
                .collect();
            let ats: Vec<Option<DateTime<Utc>>> = committed.iter().map(|e| e.at).collect();
            let payloads: Vec<&[u8]> = committed.iter().map(|e| e.payload.as_ref()).collect();
            let insert = tx
                .prepare_cached(
                    "INSERT INTO events (position, stream, version, type, schema, recorded_at, at, payload)
                     SELECT p, s, v, t, sc, $6, a, pl
                     FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::int[], $5::int[],
                                 $7::timestamptz[], $8::bytea[]) AS u(p, s, v, t, sc, a, pl)",
                )
                .await?;
            tx.execute(
                &insert,
                &[
                    &positions,
                    &stream_keys,
                    &versions,
                    &event_types,
                    &schemas,
                    &now,
                    &ats,
                    &payloads,
                ],
            )
            .await?;
            let changed: Vec<&StreamState> = streams.values().filter(|s| s.changed).collect();
            let ids: Vec<i64> = changed.iter().map(|s| s.id.unwrap_or_default()).collect();
            let stream_versions: Vec<i64> = changed.iter().map(|s| s.version as i64).collect();
            let sets_wake: Vec<bool> = changed.iter().map(|s| s.wake.is_some()).collect();
            let wakes: Vec<Option<DateTime<Utc>>> =
                changed.iter().map(|s| s.wake.flatten()).collect();
            let update = tx
                .prepare_cached(
                    "UPDATE streams s SET version = u.version,
                         wake_at = CASE WHEN u.sets_wake THEN u.wake_at ELSE s.wake_at END
                     FROM UNNEST($1::bigint[], $2::bigint[], $3::bool[], $4::timestamptz[])
                         AS u(id, version, sets_wake, wake_at)
                     WHERE s.id = u.id",
                )
                .await?;
            tx.execute(&update, &[&ids, &stream_versions, &sets_wake, &wakes])
                .await?;
            let new_head = position as i64;
            let advance = tx
                .prepare_cached("UPDATE global_position SET head = $1")
                .await?;
            tx.execute(&advance, &[&new_head]).await?;
            // Delivered to every listener when the transaction commits, never before.
            let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
            tx.execute(&notify, &[&CHANNEL, &new_head.to_string()])
                .await?;
        }
        for snapshot in snapshots {
            let upsert = tx
                .prepare_cached(
                    "INSERT INTO snapshots (stream, version, schema, payload) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (stream) DO UPDATE SET version = excluded.version,
                         schema = excluded.schema, payload = excluded.payload
                     WHERE excluded.version >= snapshots.version",
                )
                .await?;
            tx.execute(
                &upsert,
                &[
                    &key(&snapshot.stream),
                    &(snapshot.version as i64),
                    &i32::from(snapshot.schema_version),
                    &snapshot.payload.as_ref(),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok((staged, committed))
    }

    /// Removes covered events of `event_types` older than `before`, as the embedded store does:
    /// only up to a stream's snapshot, and never the newest event in the store (`newest`).
    async fn prune(
        &self,
        tx: &Transaction<'_>,
        event_types: &[&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
        newest: u64,
    ) -> Result<Pruned, PgError> {
        let type_ids: Vec<i32> = event_types
            .iter()
            .filter_map(|name| self.types.get(name).copied())
            .collect();
        let covered = tx
            .query(
                "SELECT stream, version FROM snapshots WHERE stream > $1 ORDER BY stream LIMIT $2",
                &[&(after as i64), &(max_streams as i64)],
            )
            .await?;
        let mut streams = Vec::with_capacity(covered.len());
        let mut versions = Vec::with_capacity(covered.len());
        for row in &covered {
            streams.push(row.try_get::<_, i64>(0)?);
            versions.push(row.try_get::<_, i64>(1)?);
        }
        let removed = tx
            .query_one(
                "WITH removed AS (
                     DELETE FROM events e
                     USING UNNEST($1::bigint[], $2::bigint[]) AS c(stream, version)
                     WHERE e.stream = c.stream AND e.version <= c.version AND e.at < $3
                       AND e.position < $4 AND e.type = ANY($5)
                     RETURNING e.stream
                 ), marked AS (
                     UPDATE streams SET readings_removed_before =
                         GREATEST(COALESCE(readings_removed_before, '-infinity'), $3)
                     WHERE id IN (SELECT stream FROM removed)
                 )
                 SELECT count(*) FROM removed",
                &[&streams, &versions, &before, &(newest as i64), &type_ids],
            )
            .await?;
        let events: i64 = removed.try_get(0)?;
        Ok(Pruned {
            streams: streams.len(),
            events: events as u64,
            next: (streams.len() == max_streams)
                .then(|| streams.last().map(|id| *id as u64))
                .flatten(),
        })
    }
}

/// Publishes every node's commits on the live feed, in position order and without gaps: this
/// node's own as the writer hands them over, the others' read from the table when their
/// notification arrives (or the periodic look finds them). Stops when the writer does.
async fn follow(
    pool: Pool,
    config: (tokio_postgres::Config, MakeRustlsConnect),
    live: broadcast::Sender<CommittedBatch>,
    mut own: mpsc::UnboundedReceiver<CommittedBatch>,
    mut last: u64,
) {
    let mut notifications: Option<mpsc::UnboundedReceiver<u64>> = None;
    let mut poll = tokio::time::interval(FOLLOW_POLL);
    let mut listening = true;
    loop {
        if notifications.is_none() {
            notifications = listen(&config, listening).await;
            if notifications.is_some() && !listening {
                tracing::info!("listening for other nodes' commits again");
            }
            listening = notifications.is_some();
        }
        tokio::select! {
            batch = own.recv() => {
                let Some(batch) = batch else { return };
                let (Some(first), Some(end)) = (batch.first(), batch.last()) else { continue };
                let (first, end) = (first.position, end.position);
                if end <= last {
                    continue;
                }
                if first > last + 1 {
                    catch_up(&pool, &live, &mut last, first - 1).await;
                }
                if first == last + 1 {
                    if live.receiver_count() > 0 {
                        let _ = live.send(batch);
                    }
                    last = end;
                } else {
                    catch_up(&pool, &live, &mut last, end).await;
                }
            }
            head = next_notification(&mut notifications) => {
                match head {
                    Some(head) => catch_up(&pool, &live, &mut last, head).await,
                    // The listening connection was lost: notifications may have been missed.
                    None => notifications = None,
                }
            }
            _ = poll.tick() => {
                if let Ok(head) = head_position(&pool).await {
                    catch_up(&pool, &live, &mut last, head).await;
                }
            }
        }
    }
}

/// A connection of its own that listens on [`CHANNEL`]; the heads it is notified of arrive on the
/// receiver, which closes when the connection does.
/// `warn`: whether a failure is news (it was listening until now) or logged already.
async fn listen(
    (config, tls): &(tokio_postgres::Config, MakeRustlsConnect),
    warn: bool,
) -> Option<mpsc::UnboundedReceiver<u64>> {
    let listening = async {
        let (client, mut connection) = config.connect(tls.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        // The connection must be driven for the client to work, and it carries the notifications.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().parse().unwrap_or(u64::MAX)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the connection listening for commits; listening again");
                        return;
                    }
                }
            }
        });
        client.batch_execute("LISTEN fleetwatch_events").await?;
        // The client lives as long as its connection listens.
        tokio::spawn(async move {
            let _client = client;
            let _ = driver.await;
        });
        Ok::<_, tokio_postgres::Error>(rx)
    };
    match listening.await {
        Ok(rx) => Some(rx),
        Err(e) => {
            if warn {
                tracing::warn!(error = %e, "cannot listen for other nodes' commits; looking for them every second meanwhile");
            } else {
                tracing::debug!(error = %e, "still cannot listen for other nodes' commits");
            }
            None
        }
    }
}

/// The head position of the next notification; `None` when nobody listens or the listening
/// connection closed.
async fn next_notification(
    notifications: &mut Option<mpsc::UnboundedReceiver<u64>>,
) -> Option<u64> {
    let Some(active) = notifications else {
        // Never ready: the periodic look stands in until the next attempt to listen.
        tokio::time::sleep(FOLLOW_POLL).await;
        return None;
    };
    active.recv().await
}

/// Publishes what was committed after `last` up to `until`, reading it from the table.
async fn catch_up(
    pool: &Pool,
    live: &broadcast::Sender<CommittedBatch>,
    last: &mut u64,
    until: u64,
) {
    while *last < until {
        if live.receiver_count() == 0 {
            // Nobody listens: nothing to read, only where the feed stands.
            if let Ok(head) = head_position(pool).await {
                *last = head.max(*last);
            }
            return;
        }
        let read = async {
            let client = pool.get().await?;
            read_all_rows(&client, *last, CATCH_UP_PAGE).await
        };
        match read.await {
            Ok(events) if events.is_empty() => return,
            Ok(events) => {
                *last = events.last().map_or(*last, |e| e.position);
                let _ = live.send(Arc::new(events));
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading other nodes' commits failed; trying again shortly");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        let (url, root) = take_query_param(
            "postgres://u@db:5432/fw?sslmode=require&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
            "sslrootcert",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@db:5432/fw?sslmode=require&application_name=x"
        );
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (url, root) = take_query_param("postgres://u@db/fw", "sslrootcert").unwrap();
        assert_eq!((url.as_str(), root), ("postgres://u@db/fw", None));
    }

    #[test]
    fn only_require_turns_tls_on() {
        let (plain, _) = connection_settings("postgres://u@db/fw").unwrap();
        assert_eq!(plain.get_ssl_mode(), SslMode::Disable);
        let (tls, _) =
            connection_settings("postgres://u@db/fw?sslmode=require&sslrootcert=/nonexistent")
                .err()
                .map(|e| (e, ()))
                .expect("a missing sslrootcert is an error");
        assert!(tls.contains("/nonexistent"), "{tls}");
    }
}
