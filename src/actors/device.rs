//! The actor that owns one device's state.
//!
//! Readings are decided strictly in arrival order. An actor does not wait for an append to be
//! durable before deciding the next reading: appends are pipelined. `in_flight` keeps every
//! decided reading, appended or found to be a repeat, in decision order, and each is answered only
//! once it and everything before it are settled: a duplicate is never acknowledged ahead of the
//! original it repeats.
//!
//! When an append fails, the in-memory state can no longer be trusted. The actor stops deciding
//! and lets everything in flight settle (every append after a failed one fails too: its expected
//! version is gone). Then, by the cause:
//! * the store cannot write: it waits until the store says it can again, however long that takes
//!   (ingest is paused meanwhile; nothing is answered, so nothing is acknowledged or dead-lettered);
//! * the rules changed under the decision (a conflict on `$rules`): it waits for the rule book to
//!   have the new version;
//! * another writer appended to its stream: it tries again, at most [`MAX_CONFLICT_RECOVERIES`]
//!   times in a row, then gives up.
//!
//! It then reloads the device from the store and decides the failed readings again, in order,
//! before anything newer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use fleetwatch_domain::{Decision, Device, DeviceEvent, DeviceId};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::{load_device, lock, Command, EngineError, IngestOutcome, ShardMap, Shared};
use crate::codec;
use crate::rules::{RuleBook, RULES_STREAM};
use crate::store::{
    Appended, EventStore, NewEvent, Snapshot, StoreError, StoreResult, StreamAt, Wake,
};

/// A command for the device (a reading, most of the time) and where its answer goes.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Ingest {
    pub command: Command,
    pub reply: oneshot::Sender<Result<IngestOutcome, EngineError>>,
    /// Released once the reading is settled (dropped with this message): this is what bounds
    /// the mailboxes.
    #[expect(dead_code, reason = "held, never read")]
    pub permit: OwnedSemaphorePermit,
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct GetState {
    pub reply: oneshot::Sender<Device>,
}

/// The engine's clock at the store's precision (microseconds): times that go into events and
/// state read back the same from the store.
fn stored_now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_default()
}

/// Conflicting writers to its own stream in a row before an actor gives up.
const MAX_CONFLICT_RECOVERIES: u32 = 3;
/// Pause before reloading after a failure; doubled per failed recovery in a row, up to the max.
const RECOVERY_BACKOFF: Duration = Duration::from_millis(50);
const MAX_RECOVERY_BACKOFF: Duration = Duration::from_secs(2);

/// A decided command, settled in decision order.
struct InFlight {
    ingest: Ingest,
    kind: Settling,
}

enum Settling {
    /// Its append is on the way to the store; `result` is set when the store answered.
    Append {
        seq: u64,
        result: Option<StoreResult<Appended>>,
        outcome: IngestOutcome,
        /// The snapshot to save once this append is durable, if one is due.
        snapshot: Option<Snapshot>,
        /// The device's next deadline once this append is durable (written with it).
        wake: Option<DateTime<Utc>>,
    },
    /// Decided with nothing to write (a repeat of a reading, a refused command): answered once
    /// everything before it is durable.
    Answered(IngestOutcome),
}

/// Why the actor stopped deciding, and what it waits for before it reloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Until the store can write again.
    StoreUnavailable,
    /// Until the rule book has (at least) this version.
    RulesChanged { version: u64 },
    /// Another writer appended to this device's stream.
    Conflict,
}

impl Recovery {
    /// How to recover from a failed append; `None` when the actor cannot (it fails instead).
    fn after(error: &StoreError) -> Option<Self> {
        match error {
            StoreError::Unavailable(_) => Some(Recovery::StoreUnavailable),
            StoreError::Conflict { stream, actual, .. } if stream == RULES_STREAM => {
                Some(Recovery::RulesChanged { version: *actual })
            }
            StoreError::Conflict { .. } => Some(Recovery::Conflict),
            StoreError::Refused(_) | StoreError::Closed => None,
        }
    }

    /// When several appends failed for different reasons, the one that waits longest wins.
    fn merge(self, other: Recovery) -> Recovery {
        use Recovery::*;
        match (self, other) {
            (StoreUnavailable, _) | (_, StoreUnavailable) => StoreUnavailable,
            (RulesChanged { version: a }, RulesChanged { version: b }) => {
                RulesChanged { version: a.max(b) }
            }
            (r @ RulesChanged { .. }, Conflict) | (Conflict, r @ RulesChanged { .. }) => r,
            (Conflict, Conflict) => Conflict,
        }
    }
}

pub(super) struct DeviceActor {
    device: Device,
    shared: Arc<Shared>,
    queued: Arc<AtomicUsize>,
    shard: ShardMap,
    /// Readings not decided yet, in arrival order.
    waiting: VecDeque<Ingest>,
    /// Decided readings not settled yet, in decision order (which is also the order the store
    /// answers appends in).
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    /// Set when an append failed: nothing is decided until the recovery is done.
    recovery: Option<Recovery>,
    /// The readings whose appends failed (and repeats settled behind them), in order, to decide
    /// again after the recovery.
    failed: Vec<Ingest>,
    /// Recoveries since the last successful append.
    recoveries: u32,
    /// The reload of a recovery is under way.
    reloading: bool,
    /// A late reading's repeat check is on its way to the store: nothing else is decided meanwhile.
    looking_up: bool,
    events_since_snapshot: u64,
    /// The deadline this actor last filed for its device in the index, which then holds the
    /// device at that time or earlier (or the ticker took it out, and its tick files it again):
    /// a reading that only moves the deadline later need not touch the index's lock and maps.
    filed_deadline: Option<DateTime<Utc>>,
    /// When it last took a command other than a tick; `None`: only ticks so far. An actor
    /// started for a tick (a passivated device whose deadline came) passivates again at the next
    /// check instead of staying for the idle timeout: a million devices going offline must not
    /// mean a million actors.
    last_active: Option<Instant>,
    /// Set when the in-memory state can no longer be trusted and cannot be recovered: the actor
    /// has left the router, answers what is still in its mailbox with this error, and stops.
    failure: Option<EngineError>,
}

impl DeviceActor {
    pub(super) fn new(
        id: DeviceId,
        shared: Arc<Shared>,
        queued: Arc<AtomicUsize>,
        shard: ShardMap,
    ) -> Self {
        Self {
            device: Device::new(id),
            shared,
            queued,
            shard,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            next_seq: 0,
            recovery: None,
            failed: Vec::new(),
            recoveries: 0,
            reloading: false,
            looking_up: false,
            events_since_snapshot: 0,
            filed_deadline: None,
            last_active: None,
            failure: None,
        }
    }

    fn snapshot(&self) -> Snapshot {
        codec::encode_device_snapshot(&self.device)
    }

    /// Saves a snapshot taken earlier (its events' count restarted then: appends issued since
    /// count towards the next one).
    fn save_snapshot(&mut self, snapshot: Snapshot, ctx: &mut Context<Self>) {
        let device = self.device.id().clone();
        let saving = self.shared.store.save_snapshot(snapshot);
        ctx.spawn(actix::fut::wrap_future(async move {
            // A failing store is reported once, by the store; the next snapshot covers this one.
            if let Err(e) = saving.await {
                tracing::debug!(%device, error = %e, "snapshot not saved");
            }
        }));
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
        // Out of the map first, under the shard lock: nothing more is sent to us, so whoever
        // hears of the failure and retries reaches a fresh actor.
        if lock(&self.shard).remove(self.device.id()).is_some() {
            self.shared.active_devices.decrement(1.0);
        }
        let held = self.failed.drain(..).chain(self.waiting.drain(..));
        let settling = self.in_flight.drain(..).map(|entry| entry.ingest);
        for ingest in held.chain(settling) {
            let _ = ingest.reply.send(Err(reason.clone()));
        }
        self.stop_if_drained(ctx);
    }

    /// A failed actor stops once it has answered every message sent to it.
    fn stop_if_drained(&self, ctx: &mut Context<Self>) {
        if self.queued.load(Ordering::SeqCst) == 0 {
            ctx.stop();
        }
    }

    fn busy(&self) -> bool {
        self.recovery.is_some()
            || self.looking_up
            || !self.in_flight.is_empty()
            || !self.waiting.is_empty()
    }

    fn passivate_if_idle(&mut self, ctx: &mut Context<Self>) {
        if self.failure.is_some()
            || self.busy()
            || self
                .last_active
                .is_some_and(|t| t.elapsed() < self.shared.settings.idle_timeout)
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
        self.shared.active_devices.decrement(1.0);
        if self.events_since_snapshot > 0 {
            let snapshot = self.snapshot();
            // Enqueued before we stop; it does not need us to complete.
            drop(self.shared.store.save_snapshot(snapshot));
        }
        tracing::debug!(device = %self.device.id(), "passivated");
        ctx.stop();
    }
}

/// Loads the device from the store once `recovery`'s condition holds, retrying for as long as the
/// store is unavailable. Fails only for what waiting cannot mend (a damaged history).
async fn reload(
    store: Arc<dyn EventStore>,
    rules: RuleBook,
    id: DeviceId,
    mut recovery: Option<Recovery>,
    mut attempt: u32,
) -> Result<Device, EngineError> {
    let mut health = store.health();
    loop {
        match recovery {
            None => {}
            Some(Recovery::StoreUnavailable) => {
                // Ok or not, the backoff below keeps a store that says it is fine but is not from
                // being hammered.
                let _ = health.wait_for(|h| h.is_available()).await;
                tokio::time::sleep(backoff(attempt)).await;
            }
            Some(Recovery::RulesChanged { version }) => rules.wait_for_version(version).await,
            Some(Recovery::Conflict) => tokio::time::sleep(backoff(attempt)).await,
        }
        match load_device(store.as_ref(), id.clone()).await {
            Err(EngineError::Store(StoreError::Unavailable(_))) => {
                recovery = Some(Recovery::StoreUnavailable);
                attempt = attempt.saturating_add(1);
            }
            loaded => return loaded,
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    RECOVERY_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_RECOVERY_BACKOFF)
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let restoring = reload(
            self.shared.store.clone(),
            self.shared.rules.clone(),
            self.device.id().clone(),
            None,
            0,
        );
        // `wait` holds back every message until the device is restored.
        ctx.wait(
            actix::fut::wrap_future(restoring).map(
                |restored, act: &mut Self, ctx| match restored {
                    Ok(device) => act.device = device,
                    Err(e) => act.fail(ctx, &e),
                },
            ),
        );
        let check_every = (self.shared.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        ctx.run_interval(check_every, Self::passivate_if_idle);
    }
}

impl DeviceActor {
    /// Decides waiting readings in order, until one has to wait for the store.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.recovery.is_none() && !self.looking_up && self.failure.is_none() {
            let Some(ingest) = self.waiting.pop_front() else {
                return;
            };
            self.decide(ingest, ctx);
        }
    }

    fn decide(&mut self, ingest: Ingest, ctx: &mut Context<Self>) {
        let rules = self.shared.rules.current();
        let events = match &ingest.command {
            Command::Reading(reading) => match self.device.handle(reading, &rules) {
                Decision::Duplicate => return self.duplicate(ingest),
                Decision::Events(events) => events,
                Decision::Late(event) => return self.late(ingest, event, rules.version, ctx),
            },
            Command::Tick(now) => {
                let events = self.device.handle_time(*now, &rules);
                if events.is_empty() {
                    // Filed early (a reading moved the deadline on since): file it where it is.
                    let next = self.device.next_deadline(&rules);
                    self.file_deadline(next);
                    self.answer(ingest, IngestOutcome::Nothing);
                    return self.passivate_if_only_ticked(ctx);
                }
                events
            }
            Command::Acknowledge { alarm, by, comment } => {
                match self
                    .device
                    .acknowledge(alarm, by, comment.clone(), stored_now())
                {
                    Ok(event) => vec![event],
                    Err(refused) => return self.answer(ingest, IngestOutcome::Refused(refused)),
                }
            }
            Command::SetOfflineAfter(seconds) => {
                vec![self.device.set_offline_after(*seconds, stored_now())]
            }
        };
        self.append(ingest, events, rules.version, ctx)
    }

    fn duplicate(&mut self, ingest: Ingest) {
        self.shared.readings_duplicate.increment(1);
        self.answer(ingest, IngestOutcome::Duplicate)
    }

    /// Answers a command that writes nothing, in decision order.
    fn answer(&mut self, ingest: Ingest, outcome: IngestOutcome) {
        if self.in_flight.is_empty() {
            let _ = ingest.reply.send(Ok(outcome));
        } else {
            self.in_flight.push_back(InFlight {
                ingest,
                kind: Settling::Answered(outcome),
            });
        }
    }

    /// An older reading: a repeat if the history (or what is on its way there) holds its
    /// timestamp, else stored as late.
    fn late(
        &mut self,
        ingest: Ingest,
        event: DeviceEvent,
        rules_version: u64,
        ctx: &mut Context<Self>,
    ) {
        let Command::Reading(reading) = &ingest.command else {
            return;
        };
        let at = reading.timestamp;
        if self
            .in_flight
            .iter()
            .any(|entry| matches!(&entry.ingest.command, Command::Reading(r) if r.timestamp == at))
        {
            return self.duplicate(ingest);
        }
        self.looking_up = true;
        let lookup =
            self.shared
                .store
                .has_event_at(self.device.id().as_str(), codec::READING_RECORDED, at);
        ctx.wait(
            actix::fut::wrap_future(lookup).map(move |found, act: &mut Self, ctx| {
                act.looking_up = false;
                match found {
                    Ok(true) => act.duplicate(ingest),
                    Ok(false) => act.append(ingest, vec![event], rules_version, ctx),
                    Err(e) => {
                        // Decided again after the recovery, behind everything in flight.
                        act.waiting.push_front(ingest);
                        act.start_recovery(&e, ctx);
                        act.recover_once_settled(ctx);
                    }
                }
                act.pump(ctx);
            }),
        );
    }

    /// Applies the events and issues their append, fenced on the rules they were decided under.
    fn append(
        &mut self,
        ingest: Ingest,
        events: Vec<DeviceEvent>,
        rules_version: u64,
        ctx: &mut Context<Self>,
    ) {
        let expected = self.device.version();
        let new_events: Vec<NewEvent> = events.iter().map(codec::encode_device_event).collect();
        for event in &events {
            self.device.apply(event);
        }
        if matches!(ingest.command, Command::Reading(_)) {
            // As the store will record it (`recorded_at`), which a restore replays.
            self.device.heard(stored_now());
        }
        let late = matches!(
            events.as_slice(),
            [DeviceEvent::ReadingRecorded { late: true, .. }]
        );
        let outcome = if late {
            IngestOutcome::Late
        } else {
            IngestOutcome::Applied {
                events: events.len(),
                alarms: events.iter().filter(|e| e.raises_alarm()).count(),
            }
        };
        let wake = self.device.next_deadline(&self.shared.rules.current());
        // Queued now, in decision order; durable when the future resolves.
        let append = self.shared.store.append_waking(
            self.device.id().as_str(),
            expected,
            new_events,
            Some(StreamAt {
                stream: RULES_STREAM,
                version: rules_version,
            }),
            Wake::At(wake),
        );
        self.events_since_snapshot += events.len() as u64;
        let snapshot =
            (self.events_since_snapshot >= self.shared.settings.snapshot_every).then(|| {
                self.events_since_snapshot = 0;
                self.snapshot()
            });
        self.next_seq += 1;
        let seq = self.next_seq;
        self.in_flight.push_back(InFlight {
            ingest,
            kind: Settling::Append {
                seq,
                result: None,
                outcome,
                snapshot,
                wake,
            },
        });
        ctx.spawn(
            actix::fut::wrap_future(append)
                .map(move |result, act: &mut Self, ctx| act.answered(seq, result, ctx)),
        );
    }

    /// The store answered append `seq`. Answers are settled strictly in decision order, whatever
    /// order the actor happens to poll their futures in.
    fn answered(&mut self, seq: u64, result: StoreResult<Appended>, ctx: &mut Context<Self>) {
        let entry = self.in_flight.iter_mut().find_map(|e| match &mut e.kind {
            Settling::Append { seq: s, result, .. } if *s == seq => Some(result),
            _ => None,
        });
        if let Some(slot) = entry {
            *slot = Some(result);
        }
        while let Some(entry) = self.in_flight.pop_front() {
            match entry.kind {
                Settling::Append { result: None, .. } => {
                    self.in_flight.push_front(entry);
                    break;
                }
                Settling::Append {
                    result: Some(result),
                    outcome,
                    snapshot,
                    wake,
                    ..
                } => self.settle(entry.ingest, result, outcome, snapshot, wake, ctx),
                Settling::Answered(_) if self.recovery.is_some() => self.failed.push(entry.ingest),
                Settling::Answered(outcome) => {
                    let _ = entry.ingest.reply.send(Ok(outcome));
                }
            }
            if self.failure.is_some() {
                return;
            }
        }
        self.recover_once_settled(ctx);
        self.passivate_if_only_ticked(ctx);
    }

    /// An actor started only for ticks passivates as soon as it has decided and written, not at
    /// the next idle check: when a million devices go offline at thousands a second, waiting
    /// for the check kept ~100,000 woken actors alive at once (1.2 GiB in the scale bench).
    fn passivate_if_only_ticked(&mut self, ctx: &mut Context<Self>) {
        if self.last_active.is_none() {
            self.passivate_if_idle(ctx);
        }
    }

    /// Settles the oldest in-flight append.
    fn settle(
        &mut self,
        ingest: Ingest,
        result: StoreResult<Appended>,
        outcome: IngestOutcome,
        snapshot: Option<Snapshot>,
        wake: Option<DateTime<Utc>>,
        ctx: &mut Context<Self>,
    ) {
        match result {
            Ok(_) => {
                self.recoveries = 0;
                if matches!(ingest.command, Command::Reading(_)) {
                    self.shared.readings_applied.increment(1);
                }
                match (&ingest.command, wake) {
                    // A reading only moves the offline deadline later: the entry filed stays
                    // (see `deadlines`), unless something is due earlier.
                    (Command::Reading(_), Some(wake)) => self.file_deadline_no_later(wake),
                    (Command::Reading(_), None) => {}
                    (_, wake) => self.file_deadline(wake),
                }
                if let Some(snapshot) = snapshot {
                    self.save_snapshot(snapshot, ctx);
                }
                let _ = ingest.reply.send(Ok(outcome));
            }
            Err(e) => {
                self.failed.push(ingest);
                self.start_recovery(&e, ctx);
            }
        }
    }

    /// Files the device's deadline at `wake` unless it is filed at that time or earlier.
    fn file_deadline_no_later(&mut self, wake: DateTime<Utc>) {
        if self.filed_deadline.is_some_and(|filed| filed <= wake) {
            return;
        }
        self.shared.deadlines.file_no_later(self.device.id(), wake);
        self.filed_deadline = Some(wake);
    }

    /// Files the device's deadline at exactly `wake` (`None`: nothing is due).
    fn file_deadline(&mut self, wake: Option<DateTime<Utc>>) {
        self.shared.deadlines.file(self.device.id(), wake);
        self.filed_deadline = wake;
    }

    /// Stops deciding until everything in flight has settled and the cause of `error` has passed.
    fn start_recovery(&mut self, error: &StoreError, ctx: &mut Context<Self>) {
        let Some(recovery) = Recovery::after(error) else {
            return self.fail(ctx, &EngineError::from(error.clone()));
        };
        if self.recovery.is_none() {
            // The store reports its own failures once; this is per device and per append.
            tracing::debug!(device = %self.device.id(), error = %error, "append failed; deciding again after a reload");
        }
        self.recovery = Some(self.recovery.map_or(recovery, |r| r.merge(recovery)));
    }

    /// Once everything in flight has settled: reloads the device from the store, with the mailbox
    /// held, and decides the failed readings again, in order, before anything newer.
    fn recover_once_settled(&mut self, ctx: &mut Context<Self>) {
        let Some(recovery) = self.recovery else {
            return;
        };
        if self.reloading || !self.in_flight.is_empty() || self.failure.is_some() {
            return;
        }
        self.recoveries += 1;
        if recovery == Recovery::Conflict && self.recoveries > MAX_CONFLICT_RECOVERIES {
            let error = EngineError::Store(StoreError::Conflict {
                stream: self.device.id().to_string(),
                expected: self.device.version(),
                actual: self.device.version(),
            });
            return self.fail(ctx, &error);
        }
        let reloading = reload(
            self.shared.store.clone(),
            self.shared.rules.clone(),
            self.device.id().clone(),
            Some(recovery),
            self.recoveries - 1,
        );
        self.reloading = true;
        ctx.wait(
            actix::fut::wrap_future(reloading).map(
                |reloaded, act: &mut Self, ctx| match reloaded {
                    Ok(device) => {
                        act.reloading = false;
                        act.device = device;
                        act.recovery = None;
                        for ingest in act.failed.drain(..).rev() {
                            act.waiting.push_front(ingest);
                        }
                        act.pump(ctx);
                    }
                    Err(e) => act.fail(ctx, &e),
                },
            ),
        );
    }
}

impl Handler<Ingest> for DeviceActor {
    type Result = ();

    fn handle(&mut self, ingest: Ingest, ctx: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        if !matches!(ingest.command, Command::Tick(_)) {
            self.last_active = Some(Instant::now());
        }
        if let Some(failure) = &self.failure {
            let _ = ingest.reply.send(Err(failure.clone()));
            self.stop_if_drained(ctx);
            return;
        }
        self.waiting.push_back(ingest);
        self.pump(ctx);
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
