//! The engine handle: what the ingest adapters and the HTTP API talk to.
//!
//! It ties the store, the rule book and the actor router together and owns the in-flight bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fleetwatch_domain::{Device, DeviceId, Reading, Thresholds};
use futures_util::StreamExt;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::actors::{ActorSettings, Deadlines, Router};
pub use crate::actors::{Command, EngineError, IngestOutcome};
use crate::rules::{RuleBook, RulesError};
use crate::store::{EventStore, RecordedEvent, StoreError, StoreHealth, StreamInfo};

/// How long shutdown waits for accepted readings to become durable.
const SHUTDOWN_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Devices loaded at once for a page of `GET /api/devices`.
const PAGE_LOAD_CONCURRENCY: usize = 16;
/// How often due deadlines are looked for: an offline device or an ended dwell is decided at
/// most this long after its deadline, plus the time to decide it (docs/api.md).
pub const DEADLINE_CHECK_EVERY: Duration = Duration::from_millis(500);
/// Ticks in flight at once: after an upgrade every stored device is due, and each tick restores
/// its device.
const MAX_TICKS_IN_FLIGHT: usize = 256;
/// A tick that failed (the store could not write, say) is tried again this much later.
const TICK_RETRY: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

#[derive(Clone)]
pub struct EngineSettings {
    pub actor_threads: usize,
    pub max_in_flight: u32,
    pub thresholds: Thresholds,
    pub actors: ActorSettings,
    /// Zones and ranges that may be defined in total.
    pub max_rules: usize,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    router: Router,
    deadlines: Arc<Deadlines>,
    in_flight: Arc<Semaphore>,
    max_in_flight: u32,
    /// `fleetwatch_ingest_durable_seconds` by [`Source`], registered once: a ticket carries a
    /// clone (a reference count), so recording looks nothing up per reading.
    durable: [metrics::Histogram; 2],
}

/// Where a reading came from: the `source` label of `fleetwatch_ingest_durable_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Http,
    Amqp,
}

impl Source {
    fn index(self) -> usize {
        match self {
            Source::Http => 0,
            Source::Amqp => 1,
        }
    }
}

/// One device of a page of [`Engine::devices`].
pub enum DeviceEntry {
    Loaded(Device),
    /// Its stored history cannot be read (a damaged event); the rest of the page is unaffected.
    Unreadable {
        id: DeviceId,
        error: EngineError,
    },
}

impl DeviceEntry {
    pub fn id(&self) -> &DeviceId {
        match self {
            DeviceEntry::Loaded(device) => device.id(),
            DeviceEntry::Unreadable { id, .. } => id,
        }
    }
}

/// A submitted reading; resolves once its events are durable. Resolving successfully records the
/// time since its submission in `fleetwatch_ingest_durable_seconds` (a ticket dropped unresolved,
/// e.g. by an HTTP request that timed out, records nothing).
pub struct Ticket {
    rx: oneshot::Receiver<Result<IngestOutcome, EngineError>>,
    submitted: Instant,
    durable: metrics::Histogram,
}

impl Future for Ticket {
    type Output = Result<IngestOutcome, EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(Pin::new(&mut self.rx).poll(cx)).unwrap_or(Err(EngineError::ActorGone));
        // A duplicate is answered once the original is durable: it counts too.
        if result.is_ok() {
            self.durable.record(self.submitted.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}

impl Engine {
    /// Loads the rules and starts the actor threads. Must be called inside an actix system.
    pub async fn start(
        store: Arc<dyn EventStore>,
        settings: EngineSettings,
    ) -> Result<Self, RulesError> {
        let rules = RuleBook::load(store.clone(), settings.thresholds)
            .await?
            .with_max_rules(settings.max_rules);
        // Filled from the store by `spawn_deadlines`, in the background: with a million devices
        // that takes seconds, which the engine serves and ingests through.
        let deadlines = Arc::new(Deadlines::default());
        let router = Router::new(
            settings.actor_threads,
            store.clone(),
            rules.clone(),
            settings.actors,
            deadlines.clone(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                rules,
                router,
                deadlines,
                in_flight: Arc::new(Semaphore::new(settings.max_in_flight as usize)),
                max_in_flight: settings.max_in_flight,
                durable: [
                    metrics::histogram!("fleetwatch_ingest_durable_seconds", "source" => "http"),
                    metrics::histogram!("fleetwatch_ingest_durable_seconds", "source" => "amqp"),
                ],
            }),
        })
    }

    /// Routes `reading`, which came in over `source`, to its device. Waits only while the engine
    /// is at its in-flight bound; readings submitted one after another are handled in that order.
    pub async fn submit(&self, reading: Reading, source: Source) -> Result<Ticket, EngineError> {
        // From here, so the ingest-to-durable latency includes any wait for room in flight.
        let submitted = Instant::now();
        let permit = self
            .inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(Ticket {
            rx: self.inner.router.route(reading, permit),
            submitted,
            durable: self.inner.durable[source.index()].clone(),
        })
    }

    /// Submits and waits until durable.
    pub async fn ingest(
        &self,
        reading: Reading,
        source: Source,
    ) -> Result<IngestOutcome, EngineError> {
        self.submit(reading, source).await?.await
    }

    /// Hands `command` to `device` and waits until what it decided is durable. Like a reading,
    /// it waits while the engine is at its in-flight bound.
    pub async fn command(
        &self,
        device: &DeviceId,
        command: Command,
    ) -> Result<IngestOutcome, EngineError> {
        let permit = self
            .inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        self.inner
            .router
            .command(device, command, permit)
            .await
            .unwrap_or(Err(EngineError::ActorGone))
    }

    /// Every [`DEADLINE_CHECK_EVERY`] until `stop`, gives each device whose deadline has come a
    /// tick. Ticks never wait for room in flight: a busy engine ticks a round later.
    pub fn spawn_deadlines(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let ticks = Arc::new(Semaphore::new(MAX_TICKS_IN_FLIGHT));
            let inner = &engine.inner;
            // The stored deadlines. Readings decided meanwhile file theirs too; both are real
            // deadlines of the device, and filing "no later" keeps the earlier, which is safe (a
            // tick that finds nothing due files the device at its real deadline).
            loop {
                match inner.store.wake_times().await {
                    Ok(times) => {
                        for (stream, at) in times {
                            if let Ok(device) = DeviceId::parse(stream) {
                                inner.deadlines.file_no_later(&device, at);
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the devices' deadlines yet; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
            metrics::gauge!("fleetwatch_deadlines").set(inner.deadlines.len() as f64);
            let mut backlog = false;
            loop {
                // Due devices left over from the last round go on at once, as fast as ticks
                // finish (bounded by MAX_TICKS_IN_FLIGHT); otherwise look again after the check
                // interval. (A fixed round of 256 every 0.5 s capped offline detection at about
                // 500 devices a second: scale bench, offline phase.)
                if !backlog {
                    tokio::select! {
                        _ = tokio::time::sleep(DEADLINE_CHECK_EVERY) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros())
                    .unwrap_or_default();
                let due = inner.deadlines.take_due(now, MAX_TICKS_IN_FLIGHT);
                backlog = due.len() == MAX_TICKS_IN_FLIGHT;
                for device in due {
                    let tick = tokio::select! {
                        tick = ticks.clone().acquire_owned() => tick,
                        _ = stop.cancelled() => return,
                    };
                    let (Ok(tick), Ok(permit)) =
                        (tick, inner.in_flight.clone().try_acquire_owned())
                    else {
                        // The engine is at its in-flight bound: this device, and the rest, a
                        // round later.
                        inner.deadlines.file_no_later(&device, now);
                        backlog = false;
                        continue;
                    };
                    let reply = inner.router.command(&device, Command::Tick(now), permit);
                    let deadlines = inner.deadlines.clone();
                    tokio::spawn(async move {
                        let _tick = tick;
                        // On success the device filed its next deadline itself.
                        if !matches!(reply.await, Ok(Ok(_))) {
                            deadlines.file_no_later(&device, Utc::now() + TICK_RETRY);
                        }
                    });
                }
                metrics::gauge!("fleetwatch_deadlines").set(inner.deadlines.len() as f64);
            }
        })
    }

    /// Readings accepted and not yet durable (each holds an in-flight permit until it settles).
    pub fn readings_in_flight(&self) -> usize {
        (self.inner.max_in_flight as usize).saturating_sub(self.inner.in_flight.available_permits())
    }

    /// When devices next need time to pass (see `actors::Deadlines`).
    pub fn deadlines(&self) -> &Deadlines {
        &self.inner.deadlines
    }

    pub fn rules(&self) -> &RuleBook {
        &self.inner.rules
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The actor thread that consumers run on, so that handing a reading to its actor needs no
    /// cross-thread wake-up for the devices it holds.
    pub fn ingest_arbiter(&self) -> actix::prelude::ArbiterHandle {
        self.inner.router.ingest_arbiter()
    }

    /// Whether the store can write now; ingest pauses while it cannot.
    pub fn store_health(&self) -> tokio::sync::watch::Receiver<StoreHealth> {
        self.inner.store.health()
    }

    pub async fn device(&self, id: &DeviceId) -> Result<Option<Device>, EngineError> {
        self.inner.router.device(id).await
    }

    /// A page of devices in id order. A device whose stored history cannot be read is listed with
    /// its error instead of failing the page; any other error fails it.
    pub async fn devices(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceEntry>, EngineError> {
        let streams: Vec<StreamInfo> = self
            .inner
            .store
            .list_streams(after.map(DeviceId::as_str), limit)
            .await?;
        let ids = streams
            .into_iter()
            .filter_map(|s| DeviceId::parse(s.stream).ok());
        let loaded: Vec<Result<Option<DeviceEntry>, EngineError>> = futures_util::stream::iter(ids)
            .map(|id| async move {
                match self.device(&id).await {
                    Ok(device) => Ok(device.map(DeviceEntry::Loaded)),
                    Err(error @ EngineError::Corrupt { .. }) => {
                        Ok(Some(DeviceEntry::Unreadable { id, error }))
                    }
                    Err(e) => Err(e),
                }
            })
            .buffered(PAGE_LOAD_CONCURRENCY)
            .collect()
            .await;
        loaded.into_iter().filter_map(Result::transpose).collect()
    }

    pub async fn device_events(
        &self,
        id: &DeviceId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .store
            .read_stream(id.as_str(), from_version, limit)
            .await
    }

    pub fn active_devices(&self) -> usize {
        self.inner.router.active_devices()
    }

    /// Refuses new readings, waits for every accepted one to be durable, then stops the actors.
    pub async fn shutdown(&self) {
        // Holding every permit means nothing is in flight any more.
        let drained = tokio::time::timeout(
            SHUTDOWN_DRAIN_TIMEOUT,
            self.inner.in_flight.acquire_many(self.inner.max_in_flight),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(timeout = ?SHUTDOWN_DRAIN_TIMEOUT, "readings still in flight at shutdown were not acknowledged");
        }
        self.inner.in_flight.close();
        if let Err(e) = self.inner.store.flush().await {
            tracing::warn!(error = %e, "final store flush failed");
        }
        self.inner.router.stop();
    }
}
