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

mod deadlines;
mod device;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use fleetwatch_domain::{AckRefused, AlarmId, Device, DeviceId, Reading};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::codec;
use crate::rules::RuleBook;
use crate::store::{EventStore, Snapshot, StoreError};

pub use deadlines::Deadlines;
use device::{DeviceActor, GetState, Ingest};

/// What a device actor is asked to do. Each is decided in arrival order, like readings.
#[derive(Debug, Clone)]
pub enum Command {
    Reading(Reading),
    /// Time has passed to `now`: the device goes offline, or a dwell ends, if due.
    Tick(DateTime<Utc>),
    /// Someone (`by`, a token's name) acknowledges one of the device's alarms.
    Acknowledge {
        alarm: AlarmId,
        by: String,
        comment: Option<String>,
    },
    /// The device's own offline period in seconds (`None`: the engine's default).
    SetOfflineAfter(Option<u64>),
}

/// What became of one reading or command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Its events (`events` of them, `alarms` opening an alarm) are durable.
    Applied { events: usize, alarms: usize },
    /// Older than the device's last reading: stored in its history, marked late; the live state
    /// and alarms are unchanged.
    Late,
    /// A repeat of a stored reading (same device and timestamp): nothing changed.
    Duplicate,
    /// A tick with nothing due.
    Nothing,
    /// The device refused the command; nothing changed.
    Refused(AckRefused),
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

/// Device ids come from publishers and HTTP clients: a seeded hasher, and a fast one (SipHash
/// was about 3 % of the actor thread's time for the shard and map lookups of every reading).
type DeviceHasher = foldhash::fast::RandomState;

type ShardMap = Arc<Mutex<HashMap<DeviceId, Entry, DeviceHasher>>>;

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
    hasher: DeviceHasher,
    shared: Arc<Shared>,
}

/// What the router and every device actor share.
struct Shared {
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    settings: ActorSettings,
    deadlines: Arc<Deadlines>,
    /// Metric handles registered once: `counter!` looks its metric up on every call, which
    /// cost the actor thread about 5 % of its time at 40,000 readings/s.
    readings_applied: metrics::Counter,
    readings_duplicate: metrics::Counter,
    active_devices: metrics::Gauge,
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
        deadlines: Arc<Deadlines>,
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
                shared: Arc::new(Shared {
                    store,
                    rules,
                    settings,
                    deadlines,
                    readings_applied: metrics::counter!("fleetwatch_readings_applied_total"),
                    readings_duplicate: metrics::counter!("fleetwatch_readings_duplicate_total"),
                    active_devices: metrics::gauge!("fleetwatch_active_devices"),
                }),
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
                    self.inner.shared.clone(),
                    queued.clone(),
                    shard.devices.clone(),
                );
                let addr = DeviceActor::start_in_arbiter(&shard.arbiter, move |_| actor);
                // Replacing a stopped actor's entry leaves the count as it was.
                if devices.insert(id.clone(), Entry { addr, queued }).is_none() {
                    self.inner.shared.active_devices.increment(1.0);
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
        let id = reading.device_id.clone();
        self.command(&id, Command::Reading(reading), permit)
    }

    /// Hands `command` to `device`'s actor, starting it if needed. The reply arrives once what
    /// it decided is durable.
    pub fn command(
        &self,
        device: &DeviceId,
        command: Command,
        permit: OwnedSemaphorePermit,
    ) -> oneshot::Receiver<Result<IngestOutcome, EngineError>> {
        let (reply, rx) = oneshot::channel();
        self.with_actor(device, |addr| {
            addr.do_send(Ingest {
                command,
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
        let live = match live {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        // On a shared store another node may own the device now and have moved it on since
        // this actor last wrote: the store's version says whether the actor is behind.
        let stored = match &live {
            Some(_) if !self.inner.shared.store.is_shared() => None,
            _ => self.inner.shared.store.stream_version(id.as_str()).await?,
        };
        match (live, stored) {
            (Some(device), stored) if stored.is_none_or(|v| v <= device.version()) => {
                return Ok(Some(device))
            }
            (None, None) => return Ok(None),
            _ => {}
        }
        load_device(self.inner.shared.store.as_ref(), id.clone())
            .await
            .map(Some)
    }

    /// The first actor thread.
    pub fn ingest_arbiter(&self) -> ArbiterHandle {
        self.inner.shards[0].arbiter.clone()
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
        let mut next = None;
        for recorded in page {
            let event = codec::decode_device_event(&recorded)?;
            // At the stored version: retention may have removed readings before it.
            device.apply_at(recorded.version, &event);
            if matches!(
                event,
                fleetwatch_domain::DeviceEvent::ReadingRecorded { .. }
            ) {
                device.heard(recorded.recorded_at);
            }
            next = Some(recorded.version + 1);
        }
        match next {
            Some(from) if !done => page = store.read_stream(id.as_str(), from, PAGE).await?,
            _ => return Ok(device),
        }
    }
}

/// The device a snapshot holds, if this build can read it and it is this device's.
fn restore_snapshot(id: &DeviceId, snapshot: &Snapshot) -> Option<Device> {
    use codec::UnreadableSnapshot;
    match codec::decode_device_snapshot(id, snapshot) {
        Ok(device) => Some(device),
        Err(UnreadableSnapshot::Format { .. } | UnreadableSnapshot::OtherDevice { .. }) => None,
        Err(e) => {
            tracing::warn!(device = %id, error = %e, "unreadable snapshot; replaying the full history");
            None
        }
    }
}

#[cfg(test)]
mod tests;
