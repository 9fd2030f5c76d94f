//! The event store: the one place durable state lives.
//!
//! The rest of the engine talks to [`EventStore`] only. A stream is a device's history (stream id =
//! device id) or `$rules` for zones and ranges; names starting with `$` are system streams.
//! Contract every backend keeps:
//! * appends are applied in the order they are *called* (not awaited), so an actor can issue its
//!   next append before the previous one is durable and per-stream order still holds;
//! * an append's future resolves only once its events are durable;
//! * an append with the wrong expected version fails with [`StoreError::Conflict`] and writes nothing;
//! * every committed event gets a global position, strictly increasing in commit order, and is
//!   published on [`EventStore::subscribe`] after it is durable;
//! * a store that cannot write (full disk, I/O error, read-only data directory, a writer that
//!   died) answers [`StoreError::Unavailable`] and says so on [`EventStore::health`] until it
//!   can write again, which it finds out by itself;
//! * payloads are opaque bytes: what they mean, in which schema version, is the codec's
//!   (`crate::codec`). The store indexes an event's time (`at`) for lookups by time.

mod command;
mod health;
#[cfg(feature = "kurrentdb")]
mod kurrentdb;
mod linger;
mod postgres;
mod read_only;
mod sqlite;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

#[cfg(feature = "kurrentdb")]
pub use kurrentdb::{KurrentDbStore, KurrentDbStoreOptions};
pub use postgres::{PostgresStore, PostgresStoreOptions};
pub use read_only::{ReadOnlyStore, UnreadableRow};
pub use sqlite::{SqliteStore, SqliteStoreOptions};

/// An event to append: its type name, schema version, encoded payload, and when what it records
/// happened (a device event's reading time), which the store indexes.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: &'static str,
    pub schema_version: u16,
    pub payload: Bytes,
    pub at: Option<DateTime<Utc>>,
}

/// An event as stored. `crate::codec` reads its payload, and shows it as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: u64,
    pub stream: String,
    pub version: u64,
    pub event_type: String,
    pub schema_version: u16,
    /// When the store committed it.
    pub recorded_at: DateTime<Utc>,
    pub at: Option<DateTime<Utc>>,
    pub payload: Bytes,
}

/// The result of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append.
    pub version: u64,
    /// Global position of the last appended event.
    pub last_position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub stream: String,
    /// The stream version the snapshot reflects.
    pub version: u64,
    pub schema_version: u16,
    pub payload: Bytes,
}

/// What one retention pass over some streams did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Streams looked at.
    pub streams: usize,
    /// Events removed.
    pub events: u64,
    /// Where the next pass continues (`None`: it went through the last stream).
    pub next: Option<u64>,
}

/// Where a stream's retained history begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Retention {
    /// Readings taken before this were removed (`None`: nothing was removed).
    pub readings_removed_before: Option<DateTime<Utc>>,
}

/// A stream's latest snapshot and the events after it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotAndTail {
    pub snapshot: Option<Snapshot>,
    /// Events after the snapshot's version (all from version 1 without one), in order.
    pub tail: Vec<RecordedEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub stream: String,
    pub version: u64,
}

/// What an append does to its stream's wake-up time: when the stream's aggregate next needs
/// time to pass (a device's offline or dwell deadline), kept with the stream and written in the
/// same transaction as the events, so that the engine finds every deadline again after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Leave it as it is.
    Keep,
    /// Set it (`None`: nothing is due).
    At(Option<DateTime<Utc>>),
}

/// A stream and its wake-up time ([`EventStore::wake_times`]).
pub type WakeTime = (String, DateTime<Utc>);

/// Committed events, published once per commit in position order.
pub type CommittedBatch = Arc<Vec<RecordedEvent>>;

/// A condition on another stream that an append needs: that stream must still be at `version`.
/// It fences a decision made under one version of the rules (`$rules`) against a rules change
/// committed before it: such an append is a [`StoreError::Conflict`] on that stream instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAt {
    pub stream: &'static str,
    pub version: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict on stream {stream}: expected version {expected}, found {actual}")]
    Conflict {
        stream: String,
        expected: u64,
        actual: u64,
    },
    /// The store cannot do its job now (full disk, I/O error, read-only data directory, a writer
    /// that died). A fault of the engine's storage, never of the data: it passes, and
    /// [`EventStore::health`] says when.
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    /// The store refused this write itself (never seen in practice: a safeguard, so that one bad
    /// append cannot fail everything batched with it).
    #[error("the event store refused the write: {0}")]
    Refused(String),
    #[error("the event store is shut down")]
    Closed,
}

/// Whether the store can write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Available,
    Failing { cause: String, since: DateTime<Utc> },
}

impl StoreHealth {
    pub fn is_available(&self) -> bool {
        matches!(self, StoreHealth::Available)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if its current version is `expected_version` (0: no stream
    /// yet) and `condition`, if any, holds. The append is queued when this is called; the future
    /// resolves once it is durable.
    fn append(
        &self,
        stream: &str,
        expected_version: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
    ) -> BoxFuture<'static, StoreResult<Appended>> {
        self.append_waking(stream, expected_version, events, condition, Wake::Keep)
    }

    /// [`EventStore::append`], and sets the stream's wake-up time in the same write (only when
    /// `events` is not empty).
    fn append_waking(
        &self,
        stream: &str,
        expected_version: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
    ) -> BoxFuture<'static, StoreResult<Appended>>;

    /// Every stream with a wake-up time, and the time. A backend may store a time that moved
    /// later by less than a minute as the earlier one it had (the embedded store does, to spare
    /// a write per reading): a time read here is never later than the one last set, never more
    /// than a minute earlier, and exact when it moved earlier, appeared or went.
    fn wake_times(&self) -> BoxFuture<'static, StoreResult<Vec<WakeTime>>>;

    /// Events of `stream` with version >= `from_version`, in order, at most `limit`.
    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>>;

    /// Events of all streams with position > `after_position`, in order, at most `limit`.
    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>>;

    /// Saves a snapshot; queued behind earlier appends like an append.
    fn save_snapshot(&self, snapshot: Snapshot) -> BoxFuture<'static, StoreResult<()>>;

    /// What restoring a stream's aggregate needs, in one read: its latest snapshot, and up to
    /// `limit` events after it (from version 1 when there is no snapshot).
    fn read_latest(
        &self,
        stream: &str,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<SnapshotAndTail>>;

    /// Non-system streams (not starting with `$`) in id order, after `after`.
    fn list_streams(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<StreamInfo>>>;

    /// The stream's current version, `None` if it does not exist.
    fn stream_version(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<u64>>>;

    /// Whether `stream` holds an event of `event_type` at `at`: how a late reading is told from
    /// a repeat of one already stored.
    fn has_event_at(
        &self,
        stream: &str,
        event_type: &'static str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'static, StoreResult<bool>>;

    /// Events of `stream` and `event_type` with `from <= at < to`, ordered by `at` then position
    /// (oldest or newest first), after `after` (an `(at, position)` already returned), at most
    /// `limit`.
    fn read_by_time(
        &self,
        stream: &str,
        event_type: &'static str,
        range: std::ops::Range<DateTime<Utc>>,
        after: Option<(DateTime<Utc>, u64)>,
        newest_first: bool,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>>;

    /// Removes events of `event_types` whose `at` is before `before`, but only those a snapshot of
    /// their stream covers, from up to `max_streams` streams after the stream key `after`
    /// (0: the first). One atomic write, queued like an append.
    fn prune(
        &self,
        event_types: &'static [&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
    ) -> BoxFuture<'static, StoreResult<Pruned>>;

    /// Where `stream`'s retained history begins; `None` if the stream does not exist.
    fn retention(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<Retention>>>;

    /// The position of the last committed event (0 when empty).
    fn head_position(&self) -> BoxFuture<'static, StoreResult<u64>>;

    /// Live feed of committed events. A receiver that lags is told so and must catch up with
    /// [`EventStore::read_all`].
    fn subscribe(&self) -> broadcast::Receiver<CommittedBatch>;

    /// Waits until everything queued so far is durable.
    fn flush(&self) -> BoxFuture<'static, StoreResult<()>>;

    /// Whether the store can write now; changes are announced on the receiver.
    fn health(&self) -> watch::Receiver<StoreHealth>;

    /// Whether other processes (engine nodes) write to this store too, so that what this
    /// process holds in memory may be behind it.
    fn is_shared(&self) -> bool {
        false
    }

    /// Stops taking writes and waits until everything queued before is written.
    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let flushed = self.flush();
        Box::pin(async move {
            let _ = flushed.await;
        })
    }
}
