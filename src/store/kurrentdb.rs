//! KurrentDB as the event store (`--store kurrentdb`; cargo feature `kurrentdb`).
//!
//! KurrentDB holds the history and decides every write: each fleetwatch stream is the KurrentDB
//! stream `fleetwatch:<id>` (`fleetwatch` is the default namespace), appended with the expected stream revision, so two nodes appending to
//! one device cannot both win; a stream's snapshots go to `fleetwatch.snapshots:<id>`.
//!
//! What KurrentDB has no index for (events by time, streams in id order, wake-up times) and the
//! contract's contiguous global positions come from a replica each node keeps: the embedded store
//! in `<data-dir>/kurrentdb-replica`, fed by a catch-up subscription to `$all` filtered on those
//! streams. Every node numbers the events in their `$all` order, so a position means the same
//! event on every node; reading retention applies to the replica's copies. An append resolves
//! once KurrentDB has it *and* this node's replica has applied it, so a node reads its own
//! writes; a restore and a stream's version are checked against KurrentDB itself.
//!
//! Not atomic here, unlike the SQL backends: the condition on `$rules` is checked just before
//! the append, not in it (KurrentDB appends to one stream at a time). See docs/design.md.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};
use kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, CurrentRevision, EventData, Position,
    ReadAllOptions, ReadStreamOptions, StreamMetadata, StreamPosition, StreamState,
    SubscribeToAllOptions, SubscriptionEvent, SubscriptionFilter,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::health::HealthSignal;
use super::{
    Appended, CommittedBatch, EventStore, NewEvent, Pruned, RecordedEvent, Retention, Snapshot,
    SnapshotAndTail, SqliteStore, SqliteStoreOptions, StoreError, StoreHealth, StoreResult,
    StreamAt, StreamInfo, Wake, WakeTime,
};

/// The last `$all` position the replica has applied: where the subscription resumes.
const CHECKPOINT_FILE: &str = "kurrentdb-position";
/// Snapshots a snapshot stream keeps (only the newest is read).
const SNAPSHOTS_KEPT: u64 = 2;
/// Replica writes the follower may have queued before it reads on.
const FOLLOW_WINDOW: usize = 4096;
const RETRY_AFTER: Duration = Duration::from_millis(500);
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a restore waits for the replica to reach what KurrentDB holds.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct KurrentDbStoreOptions {
    /// The replica's own settings (it is the embedded store).
    pub replica: SqliteStoreOptions,
    /// What this engine's KurrentDB stream names start with (`<namespace>:<id>`), so that
    /// several fleets, or test runs, can share one server.
    pub namespace: String,
}

impl Default for KurrentDbStoreOptions {
    fn default() -> Self {
        Self {
            replica: SqliteStoreOptions::default(),
            namespace: "fleetwatch".into(),
        }
    }
}

/// The KurrentDB streams of one namespace: `<namespace>:<id>` holds a stream's events,
/// `<namespace>.snapshots:<id>` its snapshots.
struct Names {
    events: String,
    snapshots: String,
    /// What the `$all` subscription lets through (both of the above).
    filter: String,
}

impl Names {
    fn new(namespace: &str) -> Self {
        Self {
            events: format!("{namespace}:"),
            snapshots: format!("{namespace}.snapshots:"),
            filter: namespace.to_owned(),
        }
    }

    fn events(&self, stream: &str) -> String {
        format!("{}{stream}", self.events)
    }

    fn snapshots(&self, stream: &str) -> String {
        format!("{}{stream}", self.snapshots)
    }
}

pub struct KurrentDbStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    names: Names,
    replica: SqliteStore,
    health: HealthSignal,
    turns: Arc<Turns>,
    /// Appends and snapshots waiting for the replica: KurrentDB stream and version → replies.
    waiting: Mutex<HashMap<(String, u64), Vec<Replicated>>>,
    /// Counts replica writes the follower has finished, so waiters can wait for the next one.
    applied: watch::Sender<u64>,
    /// Whether the replica has caught up with what `$all` held when the store opened.
    ready: watch::Sender<bool>,
    stop: CancellationToken,
}

/// Told the replica's position of an event once the replica has applied it.
type Replicated = oneshot::Sender<u64>;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("KurrentDB: {e}"))
}

/// What fleetwatch keeps in a KurrentDB event's metadata (string values only, as KurrentDB's
/// clients expect).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Metadata {
    /// Schema version of the payload.
    v: String,
    /// The event's time (RFC 3339), which the replica indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    /// The stream's wake-up time after this append, on its last event: RFC 3339, or empty for
    /// none; absent leaves it as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wake: Option<String>,
    /// On a snapshot: the stream version it reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
}

impl Metadata {
    fn encode(&self) -> Bytes {
        // A struct of strings always serializes.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable metadata: {e}"))
    }

    fn schema_version(&self) -> Result<u16, String> {
        self.v
            .parse()
            .map_err(|_| format!("bad schema version {:?}", self.v))
    }

    fn at(&self) -> Result<Option<DateTime<Utc>>, String> {
        self.at.as_deref().map(parse_time).transpose()
    }

    fn wake(&self) -> Result<Wake, String> {
        Ok(match self.wake.as_deref() {
            None => Wake::Keep,
            Some("") => Wake::At(None),
            Some(at) => Wake::At(Some(parse_time(at)?)),
        })
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("bad time {text:?}: {e}"))
}

fn event_data(events: Vec<NewEvent>, wake: Wake) -> Vec<EventData> {
    let last = events.len().saturating_sub(1);
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let metadata = Metadata {
                v: event.schema_version.to_string(),
                at: event.at.map(|at| at.to_rfc3339()),
                wake: match wake {
                    Wake::At(at) if i == last => {
                        Some(at.map(|at| at.to_rfc3339()).unwrap_or_default())
                    }
                    _ => None,
                },
                version: None,
            };
            EventData::binary(event.event_type, event.payload)
                .id(uuid::Uuid::new_v4())
                .metadata(metadata.encode())
        })
        .collect()
}

/// The replica takes event types as `&'static str` (the engine's own are constants); the
/// follower reads them as text, so each distinct name is kept once.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// The version KurrentDB reports for a stream, in fleetwatch's numbering (0: no stream).
fn version_of(revision: CurrentRevision) -> u64 {
    match revision {
        CurrentRevision::Current(r) => r + 1,
        CurrentRevision::NoStream => 0,
    }
}

/// One operation's turn on a stream: operations on one stream run one after another in the order
/// they were called, operations on different streams at once, and `flush` waits for every
/// operation called before it.
#[derive(Default)]
struct Turns {
    state: Mutex<TurnsState>,
    finished: Notify,
}

#[derive(Default)]
struct TurnsState {
    next: u64,
    /// Per stream: the last operation called, and the signal that it finished.
    tails: HashMap<String, (u64, oneshot::Receiver<()>)>,
    running: BTreeSet<u64>,
}

struct Turn {
    turns: Arc<Turns>,
    stream: String,
    id: u64,
    _finished: oneshot::Sender<()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = self.turns.lock();
        state.running.remove(&self.id);
        if state.tails.get(&self.stream).map(|(id, _)| *id) == Some(self.id) {
            state.tails.remove(&self.stream);
        }
        drop(state);
        self.turns.finished.notify_waiters();
    }
}

impl Turns {
    fn lock(&self) -> std::sync::MutexGuard<'_, TurnsState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the next turn on `stream` (called in call order): the turn, and what to wait for
    /// before it starts.
    fn take(self: &Arc<Self>, stream: &str) -> (Turn, Option<oneshot::Receiver<()>>) {
        let (finished, on_finished) = oneshot::channel();
        let mut state = self.lock();
        let id = state.next;
        state.next += 1;
        state.running.insert(id);
        let previous = state
            .tails
            .insert(stream.to_owned(), (id, on_finished))
            .map(|(_, previous)| previous);
        let turn = Turn {
            turns: self.clone(),
            stream: stream.to_owned(),
            id,
            _finished: finished,
        };
        (turn, previous)
    }

    /// Waits until every turn taken before now has finished.
    async fn drained(&self) {
        let before = self.lock().next;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let oldest = self.lock().running.first().copied();
            if oldest.is_none_or(|oldest| oldest >= before) {
                return;
            }
            finished.await;
        }
    }
}

impl Inner {
    /// Resolves with the replica's position once the follower has applied `version` of the
    /// KurrentDB stream `stream`. Registered before the write, so the follower cannot miss it.
    fn on_replicated(&self, stream: String, version: u64) -> oneshot::Receiver<u64> {
        let (reply, replicated) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry((stream, version))
            .or_default()
            .push(reply);
        replicated
    }

    fn forget(&self, stream: String, version: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&(stream, version));
    }

    fn replicated(&self, stream: String, version: u64, position: u64) {
        let replies = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&(stream, version));
        for reply in replies.into_iter().flatten() {
            let _ = reply.send(position);
        }
        self.applied.send_modify(|count| *count += 1);
    }

    /// A stream's version as KurrentDB has it now.
    async fn current_version(&self, stream: &str) -> StoreResult<Option<u64>> {
        let options = ReadStreamOptions::default()
            .backwards()
            .position(StreamPosition::End)
            .max_count(1);
        let read = async {
            let mut read = self
                .client
                .read_stream(self.names.events(stream), &options)
                .await?;
            read.next().await
        };
        match read.await {
            Ok(Some(event)) => Ok(Some(event.get_original_event().revision + 1)),
            Ok(None) | Err(kurrentdb::Error::ResourceNotFound) => Ok(None),
            Err(e) => Err(self.fault(e)),
        }
    }

    /// Waits until the replica holds `stream` up to what KurrentDB holds now: what a device
    /// restored on a new owner needs, since the old owner's last appends may still be on their
    /// way through the subscription.
    async fn caught_up(&self, stream: &str) -> StoreResult<()> {
        let Some(version) = self.current_version(stream).await? else {
            return Ok(());
        };
        let mut applied = self.applied.subscribe();
        let wait = async {
            loop {
                applied.borrow_and_update();
                if self.replica.stream_version(stream).await?.unwrap_or(0) >= version {
                    return Ok(());
                }
                if applied.changed().await.is_err() {
                    return Err(StoreError::Closed);
                }
            }
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, wait)
            .await
            .map_err(|_| {
                unavailable(format!(
                    "this node's replica has not caught up with {stream} within {CATCH_UP_TIMEOUT:?}"
                ))
            })?
    }

    /// A failed KurrentDB call: the store is failing until the probe reaches it again.
    fn fault(&self, error: kurrentdb::Error) -> StoreError {
        let error = unavailable(error);
        self.health.failing(error.to_string());
        error
    }

    async fn append(
        &self,
        stream: &str,
        expected: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
    ) -> StoreResult<Appended> {
        if let Some(condition) = condition {
            let actual = self.current_version(condition.stream).await?.unwrap_or(0);
            if let Some(conflict) = super::command::append_conflict(
                condition.stream,
                condition.version,
                actual,
                None,
                0,
            ) {
                return Err(conflict);
            }
        }
        if events.is_empty() {
            let actual = self.current_version(stream).await?.unwrap_or(0);
            return match super::command::append_conflict(stream, expected, actual, None, 0) {
                Some(conflict) => Err(conflict),
                None => Ok(Appended {
                    version: actual,
                    last_position: 0,
                }),
            };
        }
        let target = self.names.events(stream);
        let version = expected + events.len() as u64;
        let replicated = self.on_replicated(target.clone(), version);
        let state = match expected {
            0 => StreamState::NoStream,
            n => StreamState::StreamRevision(n - 1),
        };
        let written = self
            .client
            .append_to_stream(
                target.clone(),
                &AppendToStreamOptions::default().stream_state(state),
                event_data(events, wake),
            )
            .await;
        match written {
            Ok(_) => self.health.available(),
            Err(kurrentdb::Error::WrongExpectedVersion { current, .. }) => {
                self.forget(target, version);
                return Err(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: version_of(current),
                });
            }
            Err(e) => {
                self.forget(target, version);
                return Err(self.fault(e));
            }
        }
        let last_position = replicated.await.map_err(|_| StoreError::Closed)?;
        Ok(Appended {
            version,
            last_position,
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> StoreResult<()> {
        let target = self.names.snapshots(&snapshot.stream);
        let replicated = self.on_replicated(target.clone(), snapshot.version);
        let metadata = Metadata {
            v: snapshot.schema_version.to_string(),
            version: Some(snapshot.version.to_string()),
            ..Metadata::default()
        };
        let event = EventData::binary("Snapshot", snapshot.payload)
            .id(uuid::Uuid::new_v4())
            .metadata(metadata.encode());
        let written = self
            .client
            .append_to_stream(target.clone(), &AppendToStreamOptions::default(), event)
            .await;
        match written {
            // The first snapshot of a stream: older ones need not be kept.
            Ok(result) if result.next_expected_version == 0 => {
                let keep = StreamMetadata::builder().max_count(SNAPSHOTS_KEPT).build();
                if let Err(e) = self
                    .client
                    .set_stream_metadata(target.clone(), &AppendToStreamOptions::default(), &keep)
                    .await
                {
                    tracing::warn!(stream = %target, error = %e, "could not limit the snapshots kept");
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.forget(target, snapshot.version);
                return Err(self.fault(e));
            }
        }
        replicated.await.map_err(|_| StoreError::Closed)?;
        Ok(())
    }
}

impl KurrentDbStore {
    /// Connects to KurrentDB at `url` (a `kurrentdb://` or `esdb://` connection string) and
    /// opens this node's replica in `data_dir/kurrentdb-replica`.
    pub async fn open(
        url: &str,
        data_dir: &Path,
        options: KurrentDbStoreOptions,
    ) -> StoreResult<Self> {
        let settings: ClientSettings = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("--store-url: {e}")))?;
        let client = Client::new(settings).map_err(unavailable)?;
        // Fail at start, not at the first reading, when the server cannot be reached.
        let probe = ReadAllOptions::default()
            .backwards()
            .position(StreamPosition::End)
            .max_count(1);
        let mut read = client.read_all(&probe).await.map_err(unavailable)?;
        let head = read
            .next()
            .await
            .map_err(unavailable)?
            .map(|event| event.get_original_event().position);

        let dir = data_dir.join("kurrentdb-replica");
        let replica = SqliteStore::open(&dir, options.replica)?;
        let inner = Arc::new(Inner {
            client,
            names: Names::new(&options.namespace),
            replica,
            health: HealthSignal::new(),
            turns: Arc::default(),
            waiting: Mutex::default(),
            applied: watch::channel(0).0,
            ready: watch::channel(false).0,
            stop: CancellationToken::new(),
        });
        let from = read_checkpoint(&dir).await?;
        let mut ready = inner.ready.subscribe();
        tokio::spawn(follow(inner.clone(), dir, from, head));
        tokio::spawn(probe_while_failing(inner.clone()));
        // The engine starts on a replica that has what KurrentDB had (devices, wake-up times, the
        // read models' source): a new node's first start reads the whole history once.
        let caught_up = async { ready.wait_for(|ready| *ready).await.map(|_| ()) };
        tokio::pin!(caught_up);
        loop {
            tokio::select! {
                done = &mut caught_up => {
                    done.map_err(|_| StoreError::Closed)?;
                    break;
                }
                () = tokio::time::sleep(Duration::from_secs(10)) => tracing::info!(
                    applied = *inner.applied.borrow(),
                    "the KurrentDB replica is still catching up"
                ),
            }
        }
        Ok(Self { inner })
    }

    /// Runs `operation` in `stream`'s turn, whether or not the caller polls the result.
    fn in_turn<T, F>(
        &self,
        stream: &str,
        operation: impl FnOnce(Arc<Inner>) -> F,
    ) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = StoreResult<T>> + Send + 'static,
    {
        let (turn, previous) = self.inner.turns.take(stream);
        let work = operation(self.inner.clone());
        let done = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let result = work.await;
            drop(turn);
            result
        });
        Box::pin(async move { done.await.unwrap_or(Err(StoreError::Closed)) })
    }
}

impl Drop for KurrentDbStore {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

/// Where the replica's subscription resumes (`None`: the beginning of `$all`).
async fn read_checkpoint(dir: &Path) -> StoreResult<Option<Position>> {
    let path = dir.join(CHECKPOINT_FILE);
    let text = match tokio::fs::read_to_string(&path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(commit)), Some(Ok(prepare))) => Ok(Some(Position { commit, prepare })),
        _ => Err(StoreError::Unavailable(format!(
            "{}: not a KurrentDB position ({text:?}); delete it to rebuild the replica",
            path.display()
        ))),
    }
}

/// Written after the replica has applied everything up to `position`. A checkpoint behind the
/// replica is harmless (the follower skips what the replica already holds); one ahead of it
/// never happens, because it is written only after the replica's commit.
async fn write_checkpoint(dir: &Path, position: Position) -> std::io::Result<()> {
    let path = dir.join(CHECKPOINT_FILE);
    let temporary = dir.join(format!("{CHECKPOINT_FILE}.new"));
    tokio::fs::write(
        &temporary,
        format!("{} {}\n", position.commit, position.prepare),
    )
    .await?;
    tokio::fs::rename(&temporary, &path).await
}

/// One replica write the follower queued, and what it answers when done.
type Applying = BoxFuture<'static, (Position, (String, u64), StoreResult<u64>)>;

/// What a KurrentDB event becomes in the replica, queued in `$all` order.
fn apply(inner: &Arc<Inner>, event: &kurrentdb::RecordedEvent) -> Result<Option<Applying>, String> {
    let kurrent_stream = event.stream_id().to_owned();
    let position = event.position;
    let metadata = Metadata::decode(&event.custom_metadata)?;
    let schema_version = metadata.schema_version()?;
    if let Some(stream) = kurrent_stream.strip_prefix(inner.names.events.as_str()) {
        let new = NewEvent {
            event_type: intern(&event.event_type),
            schema_version,
            payload: event.data.clone(),
            at: metadata.at()?,
        };
        let version = event.revision + 1;
        let appended =
            inner
                .replica
                .append_waking(stream, event.revision, vec![new], None, metadata.wake()?);
        let replica_stream = stream.to_owned();
        let inner = inner.clone();
        let key = (kurrent_stream, version);
        return Ok(Some(Box::pin(async move {
            let result = match appended.await {
                Ok(appended) => Ok(appended.last_position),
                // Already applied (the checkpoint lags the replica, or the subscription was
                // resumed behind writes it had queued): where the replica has it.
                Err(StoreError::Conflict {
                    expected, actual, ..
                }) if actual > expected => inner
                    .replica
                    .read_stream(&replica_stream, version, 1)
                    .await
                    .map(|read| read.first().map_or(0, |e| e.position)),
                Err(e) => Err(e),
            };
            (position, key, result)
        })));
    }
    if let Some(stream) = kurrent_stream.strip_prefix(inner.names.snapshots.as_str()) {
        let version: u64 = metadata
            .version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or("a snapshot without its stream version")?;
        let saved = inner.replica.save_snapshot(Snapshot {
            stream: stream.to_owned(),
            version,
            schema_version,
            payload: event.data.clone(),
        });
        let key = (kurrent_stream, version);
        return Ok(Some(Box::pin(async move {
            (position, key, saved.await.map(|()| 0))
        })));
    }
    Ok(None)
}

/// Follows `$all` into the replica, from `from`, for as long as the store is open, and says when
/// the replica has reached `target` (the head of `$all` when the store opened).
async fn follow(
    inner: Arc<Inner>,
    dir: PathBuf,
    mut from: Option<Position>,
    target: Option<Position>,
) {
    let mut checkpointed = from;
    let mut reached = target.is_none();
    loop {
        let start = from.map_or(StreamPosition::Start, StreamPosition::Position);
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(SubscriptionFilter::on_stream_name().add_prefix(&inner.names.filter));
        let mut subscription = inner.client.subscribe_to_all(&options).await;
        let mut applying: FuturesOrdered<Applying> = FuturesOrdered::new();
        let mut checkpoint = tokio::time::interval(Duration::from_secs(1));
        let failure = loop {
            if reached && applying.is_empty() && !*inner.ready.borrow() {
                inner.ready.send_replace(true);
            }
            tokio::select! {
                () = inner.stop.cancelled() => {
                    while let Some((position, (stream, version), result)) = applying.next().await {
                        let Ok(replica_position) = result else { break };
                        inner.replicated(stream, version, replica_position);
                        from = Some(position);
                    }
                    if let Some(position) = from.filter(|_| from != checkpointed) {
                        let _ = write_checkpoint(&dir, position).await;
                    }
                    return;
                }
                Some((position, (stream, version), result)) = applying.next(), if !applying.is_empty() => {
                    match result {
                        Ok(replica_position) => {
                            inner.replicated(stream, version, replica_position);
                            from = Some(position);
                        }
                        Err(e) => break format!("the replica could not apply {stream}@{version}: {e}"),
                    }
                }
                _ = checkpoint.tick() => {
                    if let Some(position) = from.filter(|_| from != checkpointed) {
                        match write_checkpoint(&dir, position).await {
                            Ok(()) => checkpointed = from,
                            Err(e) => tracing::warn!(error = %e, "could not write the replica's checkpoint"),
                        }
                    }
                }
                event = subscription.next_subscription_event(), if applying.len() < FOLLOW_WINDOW => {
                    match event {
                        Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                            let Some(event) = resolved.event.as_ref() else { continue };
                            reached |= target.is_some_and(|target| event.position >= target);
                            match apply(&inner, event) {
                                Ok(Some(write)) => applying.push_back(write),
                                Ok(None) => {}
                                Err(e) => break format!(
                                    "event {}@{} of KurrentDB: {e}", event.stream_id(), event.revision
                                ),
                            }
                        }
                        Ok(SubscriptionEvent::CaughtUp(_)) => reached = true,
                        Ok(SubscriptionEvent::Checkpoint(position)) => {
                            reached |= target.is_some_and(|target| position >= target);
                        }
                        Ok(_) => {}
                        Err(e) => break format!("the $all subscription failed: {e}"),
                    }
                }
            }
        };
        // Resume after the last event the replica applied; what was queued behind a failed write
        // is read again.
        inner.health.failing(failure);
        tokio::select! {
            () = inner.stop.cancelled() => return,
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

/// While the store is failing, checks every `PROBE_INTERVAL` whether KurrentDB answers and the
/// replica writes, and says so when both do.
async fn probe_while_failing(inner: Arc<Inner>) {
    let mut health = inner.health.subscribe();
    loop {
        if !inner.health.is_available() {
            let probe = ReadAllOptions::default()
                .backwards()
                .position(StreamPosition::End)
                .max_count(1);
            let reachable = match inner.client.read_all(&probe).await {
                Ok(mut read) => read.next().await.is_ok(),
                Err(_) => false,
            };
            if reachable && inner.replica.health().borrow().is_available() {
                inner.health.available();
            }
        }
        tokio::select! {
            () = inner.stop.cancelled() => return,
            _ = health.changed() => {}
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

impl EventStore for KurrentDbStore {
    fn append_waking(
        &self,
        stream: &str,
        expected_version: u64,
        events: Vec<NewEvent>,
        condition: Option<StreamAt>,
        wake: Wake,
    ) -> BoxFuture<'static, StoreResult<Appended>> {
        let stream_id = stream.to_owned();
        self.in_turn(stream, move |inner| async move {
            inner
                .append(&stream_id, expected_version, events, condition, wake)
                .await
        })
    }

    fn wake_times(&self) -> BoxFuture<'static, StoreResult<Vec<WakeTime>>> {
        self.inner.replica.wake_times()
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        self.inner.replica.read_stream(stream, from_version, limit)
    }

    fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
        self.inner.replica.read_all(after_position, limit)
    }

    fn save_snapshot(&self, snapshot: Snapshot) -> BoxFuture<'static, StoreResult<()>> {
        let stream = snapshot.stream.clone();
        self.in_turn(&stream, move |inner| async move {
            inner.save_snapshot(snapshot).await
        })
    }

    fn read_latest(
        &self,
        stream: &str,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<SnapshotAndTail>> {
        let inner = self.inner.clone();
        let stream = stream.to_owned();
        Box::pin(async move {
            inner.caught_up(&stream).await?;
            inner.replica.read_latest(&stream, limit).await
        })
    }

    fn list_streams(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<StreamInfo>>> {
        self.inner.replica.list_streams(after, limit)
    }

    fn stream_version(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<u64>>> {
        let inner = self.inner.clone();
        let stream = stream.to_owned();
        Box::pin(async move { inner.current_version(&stream).await })
    }

    fn has_event_at(
        &self,
        stream: &str,
        event_type: &'static str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        self.inner.replica.has_event_at(stream, event_type, at)
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
        self.inner
            .replica
            .read_by_time(stream, event_type, range, after, newest_first, limit)
    }

    /// Removes the replica's copies; KurrentDB keeps the whole history (see README).
    fn prune(
        &self,
        event_types: &'static [&'static str],
        before: DateTime<Utc>,
        after: u64,
        max_streams: usize,
    ) -> BoxFuture<'static, StoreResult<Pruned>> {
        self.inner
            .replica
            .prune(event_types, before, after, max_streams)
    }

    fn retention(&self, stream: &str) -> BoxFuture<'static, StoreResult<Option<Retention>>> {
        self.inner.replica.retention(stream)
    }

    fn head_position(&self) -> BoxFuture<'static, StoreResult<u64>> {
        self.inner.replica.head_position()
    }

    fn subscribe(&self) -> broadcast::Receiver<CommittedBatch> {
        self.inner.replica.subscribe()
    }

    fn flush(&self) -> BoxFuture<'static, StoreResult<()>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.turns.drained().await;
            inner.replica.flush().await
        })
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.inner.health.subscribe()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.turns.drained().await;
            inner.stop.cancel();
            inner.replica.shutdown().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_carries_time_version_and_wake() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let events = vec![
            NewEvent {
                event_type: "ReadingRecorded",
                schema_version: 3,
                payload: Bytes::from_static(b"x"),
                at: Some(at),
            },
            NewEvent {
                event_type: "LeftZone",
                schema_version: 1,
                payload: Bytes::from_static(b"y"),
                at: None,
            },
        ];
        let data = event_data(events, Wake::At(None));
        assert_eq!(data.len(), 2);
        let first = Metadata {
            v: "3".into(),
            at: Some(at.to_rfc3339()),
            ..Metadata::default()
        };
        let decoded = Metadata::decode(&first.encode()).unwrap();
        assert_eq!(decoded.schema_version(), Ok(3));
        assert_eq!(decoded.at(), Ok(Some(at)));
        assert_eq!(decoded.wake(), Ok(Wake::Keep));
        let last = Metadata {
            v: "1".into(),
            wake: Some(String::new()),
            ..Metadata::default()
        };
        assert_eq!(
            Metadata::decode(&last.encode()).unwrap().wake(),
            Ok(Wake::At(None))
        );
        assert!(Metadata::decode(b"not json").is_err());
    }

    /// Operations on one stream run in call order even when a later one is quicker; another
    /// stream does not wait; `drained` waits for everything taken before it.
    #[tokio::test]
    async fn turns_keep_call_order_per_stream() {
        let turns: Arc<Turns> = Arc::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let run = |stream: &'static str, name: &'static str, millis: u64| {
            let (turn, previous) = turns.take(stream);
            let log = log.clone();
            tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                tokio::time::sleep(Duration::from_millis(millis)).await;
                log.lock().unwrap().push(name);
                drop(turn);
            })
        };
        let slow = run("a", "a1", 60);
        let quick = run("a", "a2", 0);
        let other = run("b", "b1", 0);
        turns.drained().await;
        assert_eq!(*log.lock().unwrap(), ["b1", "a1", "a2"]);
        for task in [slow, quick, other] {
            task.await.unwrap();
        }
        assert!(turns.lock().tails.is_empty());
        assert!(turns.lock().running.is_empty());
    }

    #[test]
    fn names_are_interned_once() {
        let a = intern(&String::from("SomethingHappened"));
        let b = intern(&String::from("SomethingHappened"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn versions_follow_kurrentdb_revisions() {
        assert_eq!(version_of(CurrentRevision::NoStream), 0);
        assert_eq!(version_of(CurrentRevision::Current(0)), 1);
        let names = Names::new("fleetwatch");
        assert_eq!(names.events("$rules"), "fleetwatch:$rules");
        assert_eq!(names.snapshots("dev-1"), "fleetwatch.snapshots:dev-1");
    }
}
