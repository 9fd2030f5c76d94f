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
use crate::store::{Appended, EventStore, NewEvent, Snapshot, StoreResult};

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

/// A reading whose append is on its way to the store.
struct InFlight {
    /// The append's place in issue order.
    seq: u64,
    /// Set when the store answered; settled only once everything before it is settled.
    result: Option<StoreResult<Appended>>,
    ingest: Ingest,
    outcome: IngestOutcome,
    /// The snapshot to save once this append is durable, if one is due.
    snapshot: Option<Snapshot>,
}

/// Recoveries (reload from the store, decide the held readings again) before the actor gives up
/// and answers them with the error.
const MAX_RECOVERIES: u32 = 3;
const RECOVERY_BACKOFF: Duration = Duration::from_millis(50);

/// A duplicate's reply, held until the appends issued before it (`.0` of them) are durable.
type WaitingDuplicate = (u64, Reply, OwnedSemaphorePermit);

pub(super) struct DeviceActor {
    device: Device,
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    settings: ActorSettings,
    queued: Arc<AtomicUsize>,
    shard: ShardMap,
    /// Readings whose appends are issued and not yet settled, in issue order (which is also the
    /// order the store settles them in).
    in_flight: VecDeque<InFlight>,
    /// After a failed append: the readings whose appends failed, in order, to decide again once
    /// the state is reloaded...
    held: VecDeque<Ingest>,
    /// ...and then the readings that arrived meanwhile.
    arrived: VecDeque<Ingest>,
    recovering: bool,
    /// Recoveries since the last successful append.
    recoveries: u32,
    /// Appends issued and completed so far; they complete in the order they were issued.
    appends_issued: u64,
    appends_done: u64,
    /// Duplicates waiting for the appends issued before them (`.0`) to be durable, so a duplicate
    /// is never acknowledged ahead of the original it duplicates.
    waiting_duplicates: VecDeque<WaitingDuplicate>,
    events_since_snapshot: u64,
    last_active: Instant,
    /// Set when the in-memory state can no longer be trusted: the actor has left the router,
    /// answers what is still in its mailbox with this error, and stops.
    failure: Option<EngineError>,
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
            in_flight: VecDeque::new(),
            held: VecDeque::new(),
            arrived: VecDeque::new(),
            recovering: false,
            recoveries: 0,
            appends_issued: 0,
            appends_done: 0,
            waiting_duplicates: VecDeque::new(),
            events_since_snapshot: 0,
            last_active: Instant::now(),
            failure: None,
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

    /// Leaves the router's map, answers everything it holds or still has queued with `reason`,
    /// and stops: the next message for this device starts a fresh actor that restores from the
    /// store.
    fn fail(&mut self, ctx: &mut Context<Self>, reason: &EngineError) {
        if self.failure.is_some() {
            return;
        }
        tracing::error!(device = %self.device.id(), error = %reason, "device actor failed; it will be restored from the store");
        self.failure = Some(reason.clone());
        for (_, reply, _permit) in self.waiting_duplicates.drain(..) {
            let _ = reply.send(Err(reason.clone()));
        }
        for held in self.held.drain(..).chain(self.arrived.drain(..)) {
            let _ = held.reply.send(Err(reason.clone()));
        }
        // Under the shard lock: once we are out of the map, nothing more is sent to us.
        if lock(&self.shard).remove(self.device.id()).is_some() {
            metrics::gauge!("fleetwatch_active_devices").decrement(1.0);
        }
        self.stop_if_drained(ctx);
    }

    /// A failed actor stops once it has answered every message sent to it.
    fn stop_if_drained(&self, ctx: &mut Context<Self>) {
        if self.queued.load(Ordering::SeqCst) == 0 {
            ctx.stop();
        }
    }

    fn passivate_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.failure.is_some()
            || self.recovering
            || !self.in_flight.is_empty()
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

impl DeviceActor {
    /// Decides a reading against the current state and issues its append.
    fn decide(&mut self, ingest: Ingest, ctx: &mut Context<Self>) {
        let rules = self.rules.current();
        let events = match self.device.handle(&ingest.reading, &rules) {
            Decision::Stale { .. } => {
                metrics::counter!("fleetwatch_readings_duplicate_total").increment(1);
                if self.in_flight.is_empty() {
                    let _ = ingest.reply.send(Ok(IngestOutcome::Duplicate));
                } else {
                    self.waiting_duplicates.push_back((
                        self.appends_issued,
                        ingest.reply,
                        ingest.permit,
                    ));
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
        self.appends_issued += 1;
        self.events_since_snapshot += events.len() as u64;
        let snapshot = (self.events_since_snapshot >= self.settings.snapshot_every).then(|| {
            self.events_since_snapshot = 0;
            self.snapshot()
        });
        let seq = self.appends_issued;
        self.in_flight.push_back(InFlight {
            seq,
            result: None,
            ingest,
            outcome,
            snapshot,
        });
        ctx.spawn(
            actix::fut::wrap_future(append)
                .map(move |result, act: &mut Self, ctx| act.answered(seq, result, ctx)),
        );
    }

    /// The store answered append `seq`. Answers are settled strictly in issue order, whatever
    /// order the actor happens to poll their futures in.
    fn answered(&mut self, seq: u64, result: StoreResult<Appended>, ctx: &mut Context<Self>) {
        if let Some(entry) = self.in_flight.iter_mut().find(|e| e.seq == seq) {
            entry.result = Some(result);
        }
        while self.in_flight.front().is_some_and(|e| e.result.is_some()) {
            if let Some(mut done) = self.in_flight.pop_front() {
                if let Some(result) = done.result.take() {
                    self.settle(done, result, ctx);
                }
            }
        }
        if self.recovering && self.in_flight.is_empty() {
            self.recover(ctx);
        }
    }

    /// Settles the oldest in-flight append.
    fn settle(&mut self, done: InFlight, result: StoreResult<Appended>, ctx: &mut Context<Self>) {
        match result {
            Ok(_) => {
                self.recoveries = 0;
                metrics::counter!("fleetwatch_readings_applied_total").increment(1);
                if let Some(snapshot) = done.snapshot {
                    self.save_snapshot(snapshot, ctx);
                }
                let _ = done.ingest.reply.send(Ok(done.outcome));
                self.appends_done += 1;
                self.answer_duplicates();
            }
            Err(e) => {
                if !self.recovering {
                    tracing::warn!(device = %self.device.id(), error = %e, "append failed; reloading and deciding again in order");
                    self.recovering = true;
                    // Duplicates of readings that will be decided again: their senders retry them.
                    let error = EngineError::from(e);
                    for (_, reply, _permit) in self.waiting_duplicates.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                // Every append after a failed one fails too (its expected version is gone), so
                // the held readings stay in their original order.
                self.held.push_back(done.ingest);
            }
        }
    }

    /// Reloads the device from the store, with the mailbox held, and decides the held readings
    /// again, in order, before anything newer.
    fn recover(&mut self, ctx: &mut Context<Self>) {
        self.recoveries += 1;
        if self.recoveries > MAX_RECOVERIES {
            let error = EngineError::Store(crate::store::StoreError::Backend(format!(
                "appends kept failing after {MAX_RECOVERIES} reloads"
            )));
            self.fail(ctx, &error);
            return;
        }
        let backoff = RECOVERY_BACKOFF * 2u32.pow(self.recoveries - 1);
        let store = self.store.clone();
        let id = self.device.id().clone();
        ctx.wait(
            actix::fut::wrap_future(async move {
                tokio::time::sleep(backoff).await;
                load_device(store.as_ref(), id).await
            })
            .map(|reloaded, act: &mut Self, ctx| match reloaded {
                Ok(device) => {
                    act.device = device;
                    act.recovering = false;
                    let held = std::mem::take(&mut act.held);
                    let arrived = std::mem::take(&mut act.arrived);
                    for ingest in held.into_iter().chain(arrived) {
                        act.decide(ingest, ctx);
                    }
                }
                Err(e) => act.fail(ctx, &e),
            }),
        );
    }
}

impl Handler<Ingest> for DeviceActor {
    type Result = ();

    fn handle(&mut self, ingest: Ingest, ctx: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.last_active = Instant::now();
        if let Some(failure) = &self.failure {
            let _ = ingest.reply.send(Err(failure.clone()));
            self.stop_if_drained(ctx);
        } else if self.recovering {
            // Behind the readings whose appends failed, in arrival order.
            self.arrived.push_back(ingest);
        } else {
            self.decide(ingest, ctx);
        }
    }
}

impl Handler<GetState> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: GetState, ctx: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        if self.failure.is_some() {
            // Dropping the reply sends the caller to the store, which reports the failure itself.
            self.stop_if_drained(ctx);
        } else {
            let _ = msg.reply.send(self.device.clone());
        }
    }
}
