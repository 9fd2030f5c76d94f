//! Per-device actors: one actix actor per active device, spread over a fixed set of arbiters
//! (threads) by a hash of the device id.
//!
//! The [`Router`] owns the map of running actors. Messages are enqueued in call order, so one
//! device's readings are handled in the order they were submitted; different devices run in
//! parallel on all arbiters. Mailboxes are bounded as a whole: every queued reading holds a permit
//! of the engine's in-flight semaphore until its events are durable, so an overloaded engine makes
//! ingest wait instead of growing memory.
//!
//! An actor restores its device from the store when it starts (latest snapshot, then the events
//! after it) and stops itself after `idle_timeout` without work; a device that is not active
//! costs nothing but its rows in the store.

mod device;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use fleetwatch_domain::{Device, DeviceEvent, DeviceId, Reading, SCHEMA_VERSION};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::rules::RuleBook;
use crate::store::{EventStore, NewEvent, Snapshot, StoreError};

use device::{DeviceActor, GetState, Ingest};

/// The version of the device snapshot format (the serde shape of [`Device`]).
pub const DEVICE_SNAPSHOT_VERSION: u16 = 1;

/// What became of one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Its events (`events` of them, `alarms` raising an alarm) are durable.
    Applied { events: usize, alarms: usize },
    /// Not newer than the device's last applied reading: nothing changed.
    Duplicate,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored event {stream}@{version} (position {position}) is unreadable: {reason}")]
    Corrupt {
        stream: String,
        version: u64,
        position: u64,
        reason: String,
    },
    #[error("the device actor stopped before answering; retry")]
    ActorGone,
    #[error("the engine is shutting down")]
    ShuttingDown,
}

#[derive(Clone)]
pub struct ActorSettings {
    pub snapshot_every: u64,
    pub idle_timeout: Duration,
}

struct Entry {
    addr: Addr<DeviceActor>,
    /// Messages sent to the actor and not yet handled; passivation waits for zero.
    queued: Arc<AtomicUsize>,
}

type ShardMap = Arc<Mutex<HashMap<DeviceId, Entry>>>;

struct Shard {
    arbiter: ArbiterHandle,
    devices: ShardMap,
}

#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    shards: Vec<Shard>,
    arbiters: Mutex<Vec<Arbiter>>,
    hasher: std::collections::hash_map::RandomState,
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    settings: ActorSettings,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave the map half-updated: recover it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Router {
    /// Starts `threads` arbiters. Must be called inside an actix system.
    pub fn new(
        threads: usize,
        store: Arc<dyn EventStore>,
        rules: RuleBook,
        settings: ActorSettings,
    ) -> Self {
        let mut arbiters = Vec::with_capacity(threads);
        let mut shards = Vec::with_capacity(threads);
        for _ in 0..threads.max(1) {
            let arbiter = Arbiter::new();
            shards.push(Shard {
                arbiter: arbiter.handle(),
                devices: Arc::default(),
            });
            arbiters.push(arbiter);
        }
        Self {
            inner: Arc::new(RouterInner {
                shards,
                arbiters: Mutex::new(arbiters),
                hasher: Default::default(),
                store,
                rules,
                settings,
            }),
        }
    }

    fn shard(&self, id: &DeviceId) -> &Shard {
        let hash = self.inner.hasher.hash_one(id) as usize;
        &self.inner.shards[hash % self.inner.shards.len()]
    }

    /// Runs `send` against the device's actor, starting it if needed, under the shard lock so the
    /// actor cannot passivate in between.
    fn with_actor(&self, id: &DeviceId, send: impl FnOnce(&Addr<DeviceActor>)) {
        let shard = self.shard(id);
        let mut devices = lock(&shard.devices);
        let entry = match devices.get(id) {
            Some(entry) if entry.addr.connected() => entry,
            _ => {
                let queued = Arc::new(AtomicUsize::new(0));
                let actor = DeviceActor::new(
                    id.clone(),
                    self.inner.store.clone(),
                    self.inner.rules.clone(),
                    self.inner.settings.clone(),
                    queued.clone(),
                    shard.devices.clone(),
                );
                let addr = DeviceActor::start_in_arbiter(&shard.arbiter, move |_| actor);
                // Replacing a stopped actor's entry leaves the count as it was.
                if devices.insert(id.clone(), Entry { addr, queued }).is_none() {
                    metrics::gauge!("fleetwatch_active_devices").increment(1.0);
                }
                &devices[id]
            }
        };
        entry.queued.fetch_add(1, Ordering::SeqCst);
        send(&entry.addr);
    }

    /// Hands `reading` to its device's actor. The reply arrives once its events are durable.
    pub fn route(
        &self,
        reading: Reading,
        permit: OwnedSemaphorePermit,
    ) -> oneshot::Receiver<Result<IngestOutcome, EngineError>> {
        let (reply, rx) = oneshot::channel();
        let id = reading.device_id.clone();
        self.with_actor(&id, |addr| {
            addr.do_send(Ingest {
                reading,
                reply,
                permit,
            })
        });
        rx
    }

    /// The device's current state: from its actor if it is active, else straight from the store
    /// (without starting an actor). `None` if the device is unknown.
    pub async fn device(&self, id: &DeviceId) -> Result<Option<Device>, EngineError> {
        let live = {
            let shard = self.shard(id);
            let devices = lock(&shard.devices);
            devices.get(id).filter(|e| e.addr.connected()).map(|entry| {
                let (reply, rx) = oneshot::channel();
                entry.queued.fetch_add(1, Ordering::SeqCst);
                entry.addr.do_send(GetState { reply });
                rx
            })
        };
        if let Some(rx) = live {
            if let Ok(device) = rx.await {
                return Ok(Some(device));
            }
        }
        if self
            .inner
            .store
            .stream_version(id.as_str())
            .await?
            .is_none()
        {
            return Ok(None);
        }
        load_device(self.inner.store.as_ref(), id.clone())
            .await
            .map(Some)
    }

    pub fn active_devices(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(&s.devices).len())
            .sum()
    }

    /// Stops the arbiters (and with them every actor).
    pub fn stop(&self) {
        for arbiter in lock(&self.inner.arbiters).drain(..) {
            arbiter.stop();
            let _ = arbiter.join();
        }
    }
}

/// A device event as the store keeps it: type name, schema version, JSON payload.
pub fn encode(event: &DeviceEvent) -> NewEvent {
    NewEvent {
        event_type: event.event_type(),
        schema_version: SCHEMA_VERSION,
        data: event.to_json(),
    }
}

/// Rebuilds a device from the store: its latest snapshot, then every event after it. A device
/// with a usable snapshot (or none at all) restores in one read when its tail is short.
pub async fn load_device(store: &dyn EventStore, id: DeviceId) -> Result<Device, EngineError> {
    const PAGE: usize = 512;
    let latest = store.read_latest(id.as_str(), PAGE).await?;
    let (mut device, mut page) = match latest.snapshot {
        None => (Device::new(id.clone()), latest.tail),
        Some(snapshot) => match restore_snapshot(&id, &snapshot) {
            Some(device) => (device, latest.tail),
            // The tail starts after the unusable snapshot: replay the whole history instead.
            None => (
                Device::new(id.clone()),
                store.read_stream(id.as_str(), 1, PAGE).await?,
            ),
        },
    };
    loop {
        let done = page.len() < PAGE;
        for recorded in page {
            let event = crate::decode::device_event(&recorded)?;
            device.apply(&event);
        }
        if done {
            return Ok(device);
        }
        page = store
            .read_stream(id.as_str(), device.version() + 1, PAGE)
            .await?;
    }
}

/// The device a snapshot holds, if this build can read it and it is this device's.
fn restore_snapshot(id: &DeviceId, snapshot: &Snapshot) -> Option<Device> {
    use crate::decode::UnreadableSnapshot;
    match crate::decode::device_snapshot(id, snapshot) {
        Ok(device) => Some(device),
        Err(UnreadableSnapshot::Format { .. } | UnreadableSnapshot::OtherDevice { .. }) => None,
        Err(e) => {
            tracing::warn!(device = %id, error = %e, "unreadable snapshot; replaying the full history");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use chrono::{TimeZone, Utc};
    use fleetwatch_domain::Thresholds;
    use futures_util::future::BoxFuture;
    use tokio::sync::{broadcast, Semaphore};

    use super::*;
    use crate::store::{
        Appended, CommittedBatch, RecordedEvent, Snapshot, SnapshotAndTail, SqliteStore,
        SqliteStoreOptions, StoreResult, StreamInfo,
    };

    /// A real store whose next `fail_appends` appends fail, as on a full disk.
    struct FlakyStore {
        inner: SqliteStore,
        fail_appends: AtomicUsize,
    }

    impl EventStore for FlakyStore {
        fn append(
            &self,
            stream: &str,
            expected: u64,
            events: Vec<NewEvent>,
        ) -> BoxFuture<'static, StoreResult<Appended>> {
            let fail = self
                .fail_appends
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Box::pin(async { Err(StoreError::Backend("injected: disk full".into())) });
            }
            self.inner.append(stream, expected, events)
        }
        fn read_stream(
            &self,
            s: &str,
            from: u64,
            limit: usize,
        ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
            self.inner.read_stream(s, from, limit)
        }
        fn read_all(
            &self,
            after: u64,
            limit: usize,
        ) -> BoxFuture<'static, StoreResult<Vec<RecordedEvent>>> {
            self.inner.read_all(after, limit)
        }
        fn save_snapshot(&self, snapshot: Snapshot) -> BoxFuture<'static, StoreResult<()>> {
            self.inner.save_snapshot(snapshot)
        }
        fn read_latest(
            &self,
            s: &str,
            limit: usize,
        ) -> BoxFuture<'static, StoreResult<SnapshotAndTail>> {
            self.inner.read_latest(s, limit)
        }
        fn list_streams(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> BoxFuture<'static, StoreResult<Vec<StreamInfo>>> {
            self.inner.list_streams(after, limit)
        }
        fn stream_version(&self, s: &str) -> BoxFuture<'static, StoreResult<Option<u64>>> {
            self.inner.stream_version(s)
        }
        fn head_position(&self) -> BoxFuture<'static, StoreResult<u64>> {
            self.inner.head_position()
        }
        fn subscribe(&self) -> broadcast::Receiver<CommittedBatch> {
            self.inner.subscribe()
        }
        fn flush(&self) -> BoxFuture<'static, StoreResult<()>> {
            self.inner.flush()
        }
    }

    async fn router_over(
        fail_appends: usize,
        dir: &tempfile::TempDir,
    ) -> (Router, Arc<dyn EventStore>) {
        let inner = SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap();
        let store: Arc<dyn EventStore> = Arc::new(FlakyStore {
            inner,
            fail_appends: AtomicUsize::new(fail_appends),
        });
        let rules = RuleBook::load(store.clone(), Thresholds::default())
            .await
            .unwrap();
        let settings = ActorSettings {
            snapshot_every: 100,
            idle_timeout: Duration::from_secs(60),
        };
        (Router::new(1, store.clone(), rules, settings), store)
    }

    /// Submits `n` readings of one device back to back and collects their outcomes.
    async fn submit(router: &Router, n: i64) -> Vec<Result<IngestOutcome, EngineError>> {
        let permits = Arc::new(Semaphore::new(1000));
        let t0 = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let mut replies = Vec::new();
        for i in 0..n {
            let at = t0 + chrono::Duration::seconds(i);
            let reading = Reading::new("d-1", at, 52.0 + i as f64 * 0.001, 4.0, 5.0).unwrap();
            replies.push(router.route(reading, permits.clone().acquire_owned().await.unwrap()));
        }
        let mut outcomes = Vec::new();
        for reply in replies {
            outcomes.push(reply.await.unwrap_or(Err(EngineError::ActorGone)));
        }
        outcomes
    }

    async fn recorded(store: &Arc<dyn EventStore>) -> Vec<String> {
        store
            .read_stream("d-1", 1, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "ReadingRecorded")
            .map(|e| serde_json::from_str::<serde_json::Value>(&e.data).unwrap()["at"].to_string())
            .collect()
    }

    #[actix_rt::test]
    async fn failed_appends_are_decided_again_in_order_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (router, store) = router_over(2, &dir).await;
        let outcomes = submit(&router, 10).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Ok(IngestOutcome::Applied { .. }))),
            "{outcomes:?}"
        );
        let at = recorded(&store).await;
        assert_eq!(at.len(), 10, "every reading stored once");
        let mut sorted = at.clone();
        sorted.sort();
        assert_eq!(at, sorted, "stored in submission order");
        router.stop();
    }

    #[actix_rt::test]
    async fn a_store_that_keeps_failing_answers_with_errors_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (router, store) = router_over(usize::MAX, &dir).await;
        let outcomes = submit(&router, 5).await;
        assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
        assert!(recorded(&store).await.is_empty());
        router.stop();
    }
}
