//! The actor that owns one device's state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use fleetwatch_domain::{Decision, Device, DeviceEvent, DeviceId, Reading};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::{
    load_device, lock, ActorSettings, EngineError, IngestOutcome, ShardMap, DEVICE_SNAPSHOT_VERSION,
};
use crate::rules::RuleBook;
use crate::store::{EventStore, NewEvent, Snapshot};

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Ingest {
    pub reading: Reading,
    pub reply: oneshot::Sender<Result<IngestOutcome, EngineError>>,
    /// Released once the reading's events are durable: this is what bounds the mailboxes.
    pub permit: OwnedSemaphorePermit,
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct GetState {
    pub reply: oneshot::Sender<Device>,
}

type Reply = oneshot::Sender<Result<IngestOutcome, EngineError>>;

/// A duplicate's reply, held until the appends issued before it (`.0` of them) are durable.
type WaitingDuplicate = (u64, Reply, OwnedSemaphorePermit);

pub(super) struct DeviceActor {
    device: Device,
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    settings: ActorSettings,
    queued: Arc<AtomicUsize>,
    shard: ShardMap,
    pending_appends: usize,
    /// Appends issued and completed so far; they complete in the order they were issued.
    appends_issued: u64,
    appends_done: u64,
    /// Duplicates waiting for the appends issued before them (`.0`) to be durable, so a duplicate
    /// is never acknowledged ahead of the original it duplicates.
    waiting_duplicates: VecDeque<WaitingDuplicate>,
    events_since_snapshot: u64,
    last_active: Instant,
    /// Set when the in-memory state can no longer be trusted; the actor is stopping.
    broken: bool,
}

impl DeviceActor {
    pub(super) fn new(
        id: DeviceId,
        store: Arc<dyn EventStore>,
        rules: RuleBook,
        settings: ActorSettings,
        queued: Arc<AtomicUsize>,
        shard: ShardMap,
    ) -> Self {
        Self {
            device: Device::new(id),
            store,
            rules,
            settings,
            queued,
            shard,
            pending_appends: 0,
            appends_issued: 0,
            appends_done: 0,
            waiting_duplicates: VecDeque::new(),
            events_since_snapshot: 0,
            last_active: Instant::now(),
            broken: false,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stream: self.device.id().to_string(),
            version: self.device.version(),
            schema_version: DEVICE_SNAPSHOT_VERSION,
            data: serde_json::to_string(&self.device).expect("device state always serialises"),
        }
    }

    fn save_snapshot(&mut self, snapshot: Snapshot, ctx: &mut Context<Self>) {
        self.events_since_snapshot = 0;
        let device = self.device.id().clone();
        let saving = self.store.save_snapshot(snapshot);
        ctx.spawn(actix::fut::wrap_future(async move {
            if let Err(e) = saving.await {
                tracing::warn!(%device, error = %e, "snapshot not saved; the next one will cover it");
            }
        }));
    }

    /// Answers the duplicates whose earlier appends are all durable now.
    fn answer_duplicates(&mut self) {
        while let Some((after, ..)) = self.waiting_duplicates.front() {
            if *after > self.appends_done {
                return;
            }
            if let Some((_, reply, _permit)) = self.waiting_duplicates.pop_front() {
                let _ = reply.send(Ok(IngestOutcome::Duplicate));
            }
        }
    }

    /// Leaves the router's map and stops: the next message for this device starts a fresh actor
    /// that restores from the store.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: &EngineError) {
        if self.broken {
            return;
        }
        tracing::error!(device = %self.device.id(), error = %reason, "device actor failed; it will be restored from the store");
        self.broken = true;
        for (_, reply, _permit) in self.waiting_duplicates.drain(..) {
            let _ = reply.send(Err(reason.clone()));
        }
        if lock(&self.shard).remove(self.device.id()).is_some() {
            metrics::gauge!("fleetwatch_active_devices").decrement(1.0);
        }
        ctx.stop();
    }

    fn passivate_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.broken
            || self.pending_appends > 0
            || self.last_active.elapsed() < self.settings.idle_timeout
        {
            return;
        }
        {
            // Under the shard lock nothing can be routed to us, so an empty mailbox stays empty.
            let mut devices = lock(&self.shard);
            if self.queued.load(Ordering::SeqCst) > 0 {
                return;
            }
            devices.remove(self.device.id());
        }
        metrics::gauge!("fleetwatch_active_devices").decrement(1.0);
        if self.events_since_snapshot > 0 {
            let snapshot = self.snapshot();
            // Enqueued before we stop; it does not need us to complete.
            drop(self.store.save_snapshot(snapshot));
        }
        tracing::debug!(device = %self.device.id(), "passivated");
        ctx.stop();
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let store = self.store.clone();
        let id = self.device.id().clone();
        // `wait` holds back every message until the device is restored.
        ctx.wait(
            actix::fut::wrap_future(async move { load_device(store.as_ref(), id).await }).map(
                |restored, act: &mut Self, ctx| match restored {
                    Ok(device) => act.device = device,
                    Err(e) => act.fail(ctx, &e),
                },
            ),
        );
        let check_every = (self.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        ctx.run_interval(check_every, Self::passivate_if_idle);
    }
}

impl Handler<Ingest> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: Ingest, ctx: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.last_active = Instant::now();
        let Ingest {
            reading,
            reply,
            permit,
        } = msg;
        if self.broken {
            let _ = reply.send(Err(EngineError::ActorGone));
            return;
        }
        let rules = self.rules.current();
        let events = match self.device.handle(&reading, &rules) {
            Decision::Stale { .. } => {
                metrics::counter!("fleetwatch_readings_duplicate_total").increment(1);
                if self.pending_appends == 0 {
                    let _ = reply.send(Ok(IngestOutcome::Duplicate));
                } else {
                    self.waiting_duplicates
                        .push_back((self.appends_issued, reply, permit));
                }
                return;
            }
            Decision::Events(events) => events,
        };
        let expected = self.device.version();
        let new_events: Vec<NewEvent> = events.iter().map(super::encode).collect();
        for event in &events {
            self.device.apply(event);
        }
        let outcome = IngestOutcome::Applied {
            events: events.len(),
            alarms: events
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        DeviceEvent::LeftZone { .. } | DeviceEvent::TemperatureOutOfRange { .. }
                    )
                })
                .count(),
        };
        // Queued now, in handling order; durable when the future resolves.
        let append = self
            .store
            .append(self.device.id().as_str(), expected, new_events);
        self.pending_appends += 1;
        self.appends_issued += 1;
        self.events_since_snapshot += events.len() as u64;
        let snapshot = (self.events_since_snapshot >= self.settings.snapshot_every).then(|| {
            self.events_since_snapshot = 0;
            self.snapshot()
        });
        ctx.spawn(
            actix::fut::wrap_future(append).map(move |result, act: &mut Self, ctx| {
                act.pending_appends -= 1;
                match result {
                    Ok(_) => {
                        metrics::counter!("fleetwatch_readings_applied_total").increment(1);
                        if let Some(snapshot) = snapshot {
                            act.save_snapshot(snapshot, ctx);
                        }
                        let _ = reply.send(Ok(outcome));
                        act.appends_done += 1;
                        act.answer_duplicates();
                    }
                    Err(e) => {
                        let e = EngineError::from(e);
                        act.fail(ctx, &e);
                        let _ = reply.send(Err(e));
                    }
                }
                drop(permit);
            }),
        );
    }
}

impl Handler<GetState> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: GetState, _: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        if !self.broken {
            let _ = msg.reply.send(self.device.clone());
        }
    }
}
