//! RabbitMQ ingest: at-least-once, ordered per device, poison messages dead-lettered.
//!
//! * Topology, declared idempotently on every connection: a durable topic exchange devices publish
//!   to (routing key = device id), a durable queue bound to it with `#`, and a dead-letter exchange
//!   and queue named `<queue>.dead`.
//! * One consumer on one channel receives deliveries in queue order and hands each to one of
//!   `consumers` worker tasks chosen by a hash of its routing key, so one device's readings stay in
//!   order from queue to actor while the workers keep many readings in flight at once. All of it
//!   runs on the first actor thread: the per-reading work here is small, and handing a reading to
//!   an actor on the same thread, and hearing back, needs no cross-thread wake-up (7 % less CPU
//!   per reading at a steady 10,000/s than a thread of its own, which in turn measured about 15 %
//!   less than two).
//! * A delivery is acked only once every event it caused is durable. Workers report settled
//!   deliveries to one acker, which acks with `multiple` up to the highest tag below which
//!   everything is settled: acks are batched, never ahead of durability.
//! * Bad input (too large, not JSON, a missing field, an out-of-range value, a timestamp ahead of
//!   the clock) is published to the dead-letter exchange with the reason in the
//!   `x-fleetwatch-reason` header (publisher-confirmed) and only then acked; it is counted and
//!   listed at `/api/failed-messages`. A reading whose device history is damaged is requeued up
//!   to `max_retries` times, then dead-lettered.
//! * A store that cannot write is the engine's fault, never a message's: while it fails, deliveries
//!   are held unacked (the prefetch limit then stops the broker sending more) and nothing counts
//!   towards dead-lettering; they go on once the store writes again.
//! * A lost or refused connection is retried with capped exponential backoff; HTTP keeps serving
//!   meanwhile and `/api/health` reports the broker state. Unacked deliveries are redelivered by
//!   the broker and recognised as duplicates by the device actors.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineError, Source};
use crate::ingest::failed::FailedMessages;
use crate::ingest::partitions::Partitions;
use crate::ingest::wire::{check_clock, parse_reading};
use crate::store::StoreError;

/// Header carrying the reason a message was dead-lettered.
pub const REASON_HEADER: &str = "x-fleetwatch-reason";
/// Names this node in the broker's consumer list (`rabbitmqctl list_consumers`): which node a
/// partition's active consumer is.
fn consumer_tag() -> String {
    format!("fleetwatch-{}", std::process::id())
}
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A dead letter the broker has not confirmed by then is given up on and its message requeued.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// A node whose store has failed this long gives its partitions to the other nodes (whose store
/// may still write), and takes its share again once it writes: a blip does not move devices.
const STORE_FAILURE_HANDOVER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Disabled,
    Connecting,
    Connected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Disabled => "disabled",
            BrokerState::Connecting => "connecting",
            BrokerState::Connected => "connected",
        }
    }
}

/// The consumer's connection state, shared with `/api/health`.
#[derive(Clone)]
pub struct BrokerStatus(Arc<AtomicU8>);

impl BrokerStatus {
    pub fn new(state: BrokerState) -> Self {
        Self(Arc::new(AtomicU8::new(state as u8)))
    }

    pub fn set(&self, state: BrokerState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> BrokerState {
        match self.0.load(Ordering::Relaxed) {
            0 => BrokerState::Disabled,
            1 => BrokerState::Connecting,
            _ => BrokerState::Connected,
        }
    }
}

/// RabbitMQ consumer settings.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: String,
    pub exchange: String,
    pub queue: String,
    pub prefetch: u16,
    pub consumers: usize,
    pub max_retries: u32,
    pub max_message_bytes: usize,
    pub max_clock_skew: Duration,
    /// 0: one queue; N: N partition queues (see [`declare_topology`]).
    pub partitions: u16,
}

impl AmqpSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            url: config.amqp_url.clone(),
            exchange: config.amqp_exchange.clone(),
            queue: config.amqp_queue.clone(),
            prefetch: config.amqp_prefetch,
            consumers: config.amqp_consumers.max(1),
            max_retries: config.amqp_max_retries,
            max_message_bytes: config.amqp_max_message_bytes as usize,
            max_clock_skew: config.max_clock_skew,
            partitions: config.amqp_partitions,
        }
    }

    /// The queues this node consumes: the one queue, or every partition queue.
    pub fn queues(&self) -> Vec<String> {
        match self.partitions {
            0 => vec![self.queue.clone()],
            n => (0..n).map(|i| partition_queue(&self.queue, i)).collect(),
        }
    }

    /// The dead-letter exchange and queue.
    pub fn dead_letter_name(&self) -> String {
        dead_letter_name(&self.queue)
    }
}

/// The `i`th partition queue of `queue`.
pub fn partition_queue(queue: &str, i: u16) -> String {
    format!("{queue}.p{i}")
}

/// The consistent-hash exchange that spreads `exchange`'s readings over the partition queues.
pub fn partition_exchange(exchange: &str) -> String {
    format!("{exchange}.partitions")
}

/// The dead-letter exchange and queue of `queue`.
pub fn dead_letter_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Declares the durable topic exchange devices publish to (routing key = device id). Publishers
/// declare it with this too, so whoever comes first, the arguments match.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
}

/// Declares the engine's topology, idempotently: the durable topic exchange devices publish to,
/// the dead-letter exchange and queue, and what the readings are consumed from:
///
/// * `partitions == 0`: the durable queue `queue`, bound to the exchange with `#`;
/// * `partitions == N`: a consistent-hash exchange (`<exchange>.partitions`, plugin
///   `rabbitmq_consistent_hash_exchange`) bound to the exchange with `#`, which sends each device
///   (by routing key) always to the same one of N durable queues `<queue>.p0` … `<queue>.p{N-1}`,
///   each with a single active consumer. Every node consumes every partition, so the broker gives
///   each partition to one node at a time, and a dead node's partitions to the others.
///
/// Anyone else declaring these names must use exactly these arguments, or the broker refuses the
/// declare.
pub async fn declare_topology(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    partitions: u16,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let dead = dead_letter_name(queue);
    declare_exchange(channel, exchange).await?;
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(dead.as_str().into(), durable_queue, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    // A safety net for messages the broker itself rejects; ours are dead-lettered with a reason.
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    if partitions == 0 {
        channel
            .queue_declare(queue.into(), durable_queue, args)
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        return Ok(());
    }
    let hash = partition_exchange(exchange);
    channel
        .exchange_declare(
            hash.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_bind(
            hash.as_str().into(),
            exchange.into(),
            "#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    for i in 0..partitions {
        let partition = partition_queue(queue, i);
        channel
            .queue_declare(partition.as_str().into(), durable_queue, args.clone())
            .await?;
        // The binding key of a consistent-hash exchange is the queue's weight.
        channel
            .queue_bind(
                partition.as_str().into(),
                hash.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

/// The running consumer.
pub struct ConsumerHandle {
    finished: tokio::sync::oneshot::Receiver<()>,
}

impl ConsumerHandle {
    /// Resolves once the consumer has stopped: after `shutdown` was cancelled it has finished and
    /// acked its in-flight messages and closed its connections (or its actor thread stopped).
    pub async fn stopped(self) {
        let _ = self.finished.await;
    }
}

/// Starts the consumer on the first actor thread; it runs until `shutdown` is cancelled and
/// it has finished its in-flight messages.
pub fn spawn(
    settings: AmqpSettings,
    engine: Engine,
    status: BrokerStatus,
    failed: FailedMessages,
    shutdown: CancellationToken,
) -> std::io::Result<ConsumerHandle> {
    status.set(BrokerState::Connecting);
    let settings_partitions = settings.partitions as usize;
    let engine_arbiter = engine.ingest_arbiter();
    let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
    let consume = move || async move {
        // Dropped when the consumer ends, however it ends: that is what `stopped` waits for.
        let _finished = finished;
        let consumer = Arc::new(Consumer {
            settings,
            engine,
            status,
            failed,
            failures: Mutex::default(),
            shutdown: shutdown.clone(),
            partitions: Partitions::new(settings_partitions),
            processed: metrics::counter!("fleetwatch_amqp_processed_total"),
        });
        let queues = consumer.settings.queues();
        let partitioned = consumer.settings.partitions > 0;
        let sessions =
            futures_util::future::join_all(queues.iter().enumerate().map(|(i, queue)| {
                let index = partitioned.then_some(i);
                consumer.clone().run(index, queue.clone(), shutdown.clone())
            }));
        let balance = async {
            if let (true, Some(probe)) = (partitioned, queues.first()) {
                consumer
                    .partitions
                    .balance(&consumer.settings.url, probe, shutdown.clone())
                    .await;
            }
        };
        tokio::join!(sessions, balance);
    };
    if !engine_arbiter.spawn_fn(move || {
        actix::spawn(consume());
    }) {
        return Err(std::io::Error::other(
            "the actor thread the consumer runs on has stopped",
        ));
    }
    Ok(ConsumerHandle {
        finished: finished_rx,
    })
}

struct Consumer {
    settings: AmqpSettings,
    engine: Engine,
    status: BrokerStatus,
    failed: FailedMessages,
    /// Engine failures per message (by content; forgotten once it succeeds or is dead-lettered),
    /// so a failing reading is retried a bounded number of times in place (requeued: its order
    /// is kept) before it is dead-lettered.
    failures: Mutex<HashMap<u64, u32>>,
    shutdown: CancellationToken,
    /// Which partitions this node owns (with `--amqp-partitions`).
    partitions: Partitions,
    /// Registered once, not looked up by name for every reading.
    processed: metrics::Counter,
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
    /// It gave its partition back (see `partitions`): subscribe again at once.
    Released,
    /// Its store has failed for [`STORE_FAILURE_HANDOVER`]: it gave its partition to the other
    /// nodes, and subscribes again once the store writes.
    StoreFailing,
}

/// How a delivery was settled.
enum Settle {
    /// Done with: processed, a duplicate, or safely dead-lettered.
    Ack(u64),
    /// Put back on the queue to be tried again.
    Requeue(u64),
}

impl Consumer {
    /// Consumes `queue` (partition `partition`, if partitioned) until shutdown, reconnecting as
    /// long as it takes.
    async fn run(
        self: Arc<Self>,
        partition: Option<usize>,
        queue: String,
        shutdown: CancellationToken,
    ) {
        let mut backoff = MIN_BACKOFF;
        loop {
            self.status.set(BrokerState::Connecting);
            let mut connected = false;
            let ended = self
                .clone()
                .session(partition, &queue, &shutdown, &mut connected)
                .await;
            if let Some(i) = partition {
                self.partitions.lost(i);
            }
            match ended {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Released) => continue,
                Ok(SessionEnd::StoreFailing) => {
                    tracing::warn!(%queue, failing_for = ?STORE_FAILURE_HANDOVER, "the event store cannot write: this partition goes to the other nodes until it can");
                    metrics::counter!("fleetwatch_amqp_partitions_released_total").increment(1);
                    if !self.store_writes().await {
                        break;
                    }
                    tracing::info!(%queue, "the event store writes again: consuming the partition");
                    continue;
                }
                Err(e) => {
                    if connected {
                        backoff = MIN_BACKOFF;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "RabbitMQ unavailable; reconnecting");
                    metrics::counter!("fleetwatch_amqp_reconnects_total").increment(1);
                }
            }
            self.status.set(BrokerState::Connecting);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.status.set(BrokerState::Disabled);
        tracing::info!(%queue, "RabbitMQ consumer stopped");
    }

    /// One connection's life: declare, consume, dispatch; returns `Ok` only on shutdown or when
    /// it gave its partition back.
    async fn session(
        self: Arc<Self>,
        partition: Option<usize>,
        queue: &str,
        shutdown: &CancellationToken,
        connected: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        // Setting up waits on the network: a shutdown must not wait for it.
        let setup = async {
            let connection =
                Connection::connect(&self.settings.url, ConnectionProperties::default()).await?;
            // Dead letters go out on a connection of their own: under a memory or disk alarm the
            // broker blocks publishing connections, and this one must keep delivering and acking.
            let publishing =
                Connection::connect(&self.settings.url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            let publisher = publishing.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            declare_topology(
                &channel,
                &self.settings.exchange,
                &self.settings.queue,
                self.settings.partitions,
            )
            .await?;
            channel
                .basic_qos(self.settings.prefetch, BasicQosOptions::default())
                .await?;
            if let Some(i) = partition {
                // Nobody else consumes it: this node is its active consumer from now on.
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let declared = channel
                    .queue_declare(queue.into(), passive, FieldTable::default())
                    .await?;
                if declared.consumer_count() == 0 {
                    self.partitions.owned(i);
                }
            }
            let deliveries = channel
                .basic_consume(
                    queue.into(),
                    consumer_tag().as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((connection, publishing, channel, publisher, deliveries))
        };
        let (connection, publishing, channel, publisher, mut deliveries) = tokio::select! {
            setup = setup => setup?,
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        *connected = true;
        self.status.set(BrokerState::Connected);
        tracing::info!(%queue, exchange = %self.settings.exchange, "consuming from RabbitMQ");

        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(acker(channel.clone(), settle_rx));
        let hasher = foldhash::fast::RandomState::default();
        let mut workers = Vec::with_capacity(self.settings.consumers);
        let mut worker_tasks = JoinSet::new();
        for _ in 0..self.settings.consumers {
            let (tx, rx) = mpsc::channel::<Delivery>(self.settings.prefetch.max(1) as usize);
            workers.push(tx);
            worker_tasks.spawn(
                self.clone()
                    .worker(rx, publisher.clone(), settle_tx.clone()),
            );
        }
        drop(settle_tx);

        // Armed once per session: a long store failure hands a partition over even while the
        // workers, waiting for the store, have stopped taking deliveries.
        let store_failing = self.store_failing_for(STORE_FAILURE_HANDOVER);
        tokio::pin!(store_failing);
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Stop new deliveries; what we hold is finished below and acked. A partition
                    // is not cancelled: the next node in line would take it over while this one
                    // still finishes readings of the same devices. Closing the channel below,
                    // once they are done, hands it over and requeues what was not started.
                    if partition.is_none() {
                        let _ = channel.basic_cancel(consumer_tag().as_str().into(), BasicCancelOptions::default()).await;
                    }
                    break Ok(SessionEnd::Shutdown);
                }
                _ = release_requested(&self.partitions, partition) => break Ok(SessionEnd::Released),
                () = &mut store_failing, if partition.is_some() => break Ok(SessionEnd::StoreFailing),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        if let Some(i) = partition {
                            self.partitions.owned(i);
                        }
                        let worker = hasher.hash_one(delivery.routing_key.as_str()) as usize % workers.len();
                        let sent = tokio::select! {
                            sent = workers[worker].send(delivery) => sent.is_ok(),
                            () = &mut store_failing, if partition.is_some() => break Ok(SessionEnd::StoreFailing),
                        };
                        if !sent {
                            break Err(SessionError::Cancelled);
                        }
                    }
                    Some(Err(e)) => break Err(e.into()),
                    None => break Err(SessionError::Cancelled),
                },
            }
        };
        let outcome = match outcome {
            Ok(SessionEnd::StoreFailing) => outcome,
            outcome => {
                // Workers finish their in-flight readings, then the acker sends the last acks;
                // unless the store fails meanwhile for the handover period.
                drop(workers);
                let finished = async { while worker_tasks.join_next().await.is_some() {} };
                tokio::select! {
                    () = finished => outcome,
                    () = &mut store_failing, if partition.is_some() => Ok(SessionEnd::StoreFailing),
                }
            }
        };
        if matches!(outcome, Ok(SessionEnd::StoreFailing)) {
            // What the workers hold cannot become durable now: nothing more is acknowledged,
            // and closing the channel returns every unacknowledged delivery to the queue, for
            // the next node in line. A reading this node's store still commits later is fenced
            // by the expected-version check and then found to be a repeat.
            worker_tasks.abort_all();
            acker.abort();
        } else {
            let _ = acker.await;
        }
        if outcome.is_ok() {
            // Deliveries received but not started go back to the queue, in order.
            let _ = channel.close(200, "shutdown".into()).await;
            let _ = connection.close(200, "shutdown".into()).await;
            let _ = publishing.close(200, "shutdown".into()).await;
        }
        outcome
    }

    async fn worker(
        self: Arc<Self>,
        mut deliveries: mpsc::Receiver<Delivery>,
        publisher: Channel,
        settle: mpsc::UnboundedSender<Settle>,
    ) {
        // Readings on their way to durability, polled here rather than spawned: one task per
        // worker, no allocation or scheduling per message.
        let mut in_flight = FuturesUnordered::new();
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                delivery = deliveries.recv(), if open => match delivery {
                    Some(delivery) => {
                        if let Some(pending) = self.accept(delivery, &publisher).await {
                            in_flight.push(pending);
                        }
                    }
                    None => open = false,
                },
                Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                    let _ = settle.send(settled);
                }
            }
        }
    }

    /// Resolves once the store has been unable to write for `period` without a break.
    async fn store_failing_for(&self, period: Duration) {
        let mut health = self.engine.store_health();
        loop {
            if health.wait_for(|h| !h.is_available()).await.is_err() {
                return std::future::pending().await;
            }
            tokio::select! {
                () = tokio::time::sleep(period) => return,
                recovered = health.wait_for(|h| h.is_available()) => {
                    if recovered.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }

    /// Waits until the store can write (or shutdown begins: `false`).
    async fn store_writes(&self) -> bool {
        let mut health = self.engine.store_health();
        if health.borrow().is_available() {
            return true;
        }
        tokio::select! {
            available = health.wait_for(|h| h.is_available()) => available.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Validates a delivery and submits its reading; the returned future settles it. `None`
    /// leaves it unsettled: shutdown came first, and the broker delivers it again.
    async fn accept<'a>(
        &'a self,
        delivery: Delivery,
        publisher: &'a Channel,
    ) -> Option<futures_util::future::BoxFuture<'a, Settle>> {
        let reading = self.validate(&delivery);
        let reading = match reading {
            Ok(reading) => reading,
            Err(reason) => {
                return Some(Box::pin(async move {
                    self.dead_letter(publisher, &delivery, &reason).await
                }));
            }
        };
        // Held, unacked, while the store cannot write: the prefetch limit stops the broker.
        if !self.store_writes().await {
            return None;
        }
        // `submit` fails only when shutting down: the delivery stays unacked and the broker
        // redelivers it.
        let ticket = self.engine.submit(reading, Source::Amqp).await.ok()?;
        Some(Box::pin(async move {
            match ticket.await {
                Ok(_) => {
                    self.processed.increment(1);
                    // Only a redelivered message can have failed before.
                    if delivery.redelivered {
                        self.forget_failures(&delivery);
                    }
                    Settle::Ack(delivery.delivery_tag)
                }
                // Boxed apart: the failure path (a dead-letter publish) is far larger than the
                // rest, and this future is allocated for every reading.
                Err(e) => Box::pin(self.after_failure(publisher, &delivery, e)).await,
            }
        }))
    }

    /// The reading in a delivery, or why it is not one.
    fn validate(&self, delivery: &Delivery) -> Result<fleetwatch_domain::Reading, String> {
        let limit = self.settings.max_message_bytes;
        if delivery.data.len() > limit {
            return Err(format!(
                "message is {} bytes, larger than {limit} (--amqp-max-message-bytes)",
                delivery.data.len()
            ));
        }
        let reading = parse_reading_bytes(&delivery.data)?;
        if reading.device_id.as_str() != delivery.routing_key.as_str() {
            return Err(format!(
                "routing key {:?} is not the reading's device_id {:?}",
                delivery.routing_key.as_str(),
                reading.device_id.as_str()
            ));
        }
        check_clock(&reading, chrono::Utc::now(), self.settings.max_clock_skew)
            .map_err(|e| e.to_string())?;
        Ok(reading)
    }

    /// The engine failed on a reading. A fault of the engine (its store cannot write, it is
    /// shutting down) is not the message's: it is requeued once the store writes again, and not
    /// counted. A fault the message's device carries (a damaged history, a write the store
    /// refuses) is retried in place a few times, then dead-lettered.
    async fn after_failure(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        error: EngineError,
    ) -> Settle {
        let counts = matches!(
            error,
            EngineError::Corrupt { .. } | EngineError::Store(StoreError::Refused(_))
        );
        if !counts {
            tracing::debug!(error = %error, "engine fault on a reading; requeueing it, not counted");
            self.store_writes().await;
            return Settle::Requeue(delivery.delivery_tag);
        }
        let attempts = {
            let mut retries = self.failures();
            // A bound for the pathological case of many readings failing at once; losing the
            // counts only means a few more retries.
            if retries.len() > 100_000 {
                retries.clear();
            }
            let n = retries.entry(failure_key(delivery)).or_insert(0);
            *n += 1;
            *n
        };
        if attempts <= self.settings.max_retries {
            tracing::warn!(error = %error, attempts, "engine failed on a reading; requeueing it");
            metrics::counter!("fleetwatch_amqp_retries_total").increment(1);
            return Settle::Requeue(delivery.delivery_tag);
        }
        let reason = format!("engine failed {attempts} times: {error}");
        let settled = self.dead_letter(publisher, delivery, &reason).await;
        // An unconfirmed dead letter is requeued: its count must hold for the next attempt.
        if matches!(settled, Settle::Ack(_)) {
            self.forget_failures(delivery);
        }
        settled
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_failures(&self, delivery: &Delivery) {
        self.failures().remove(&failure_key(delivery));
    }

    /// Publishes the message to the dead-letter exchange with its reason; acked only once the
    /// broker confirmed the dead letter, requeued if it did not.
    async fn dead_letter(&self, publisher: &Channel, delivery: &Delivery, reason: &str) -> Settle {
        let mut headers = FieldTable::default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-fleetwatch-routing-key".into(),
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let dead = self.settings.dead_letter_name();
        let confirmed = tokio::time::timeout(DEAD_LETTER_CONFIRM_TIMEOUT, async {
            publisher
                .basic_publish(
                    ShortString::from(dead.as_str()),
                    delivery.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match confirmed {
            Ok(Ok(Confirmation::Ack(_))) => {
                metrics::counter!("fleetwatch_amqp_dead_lettered_total").increment(1);
                self.failed
                    .record(reason, delivery.routing_key.as_str(), &delivery.data);
                tracing::debug!(reason, routing_key = %delivery.routing_key, "dead-lettered");
                Settle::Ack(delivery.delivery_tag)
            }
            other => {
                tracing::warn!(outcome = ?other.map(|c| format!("{c:?}")), "dead letter not confirmed; requeueing the message");
                Settle::Requeue(delivery.delivery_tag)
            }
        }
    }
}

/// A requeued message comes back with a new delivery tag: it is recognised by its content.
fn failure_key(delivery: &Delivery) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    delivery.routing_key.as_str().hash(&mut h);
    delivery.data.hash(&mut h);
    h.finish()
}

fn parse_reading_bytes(body: &[u8]) -> Result<fleetwatch_domain::Reading, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    parse_reading(text).map_err(|e| e.to_string())
}

/// Acks sent as soon as this many more deliveries are settled in order...
const ACK_EVERY: u64 = 256;
/// ...or at the latest after this long.
const ACK_INTERVAL: Duration = Duration::from_millis(10);

/// Resolves when the partition this session consumes should be given back; never without one.
async fn release_requested(partitions: &Partitions, partition: Option<usize>) {
    match partition {
        Some(i) => partitions.release_requested(i).await,
        None => std::future::pending().await,
    }
}

/// Acks every delivery once it and all before it are settled, with one `multiple` ack per batch.
/// Batching matters: every ack is work for the broker, which shares the machine.
async fn acker(channel: Channel, mut settled: mpsc::UnboundedReceiver<Settle>) {
    // Settled tags above the watermark; `true` if acked, `false` if nacked (requeued).
    let mut done: BTreeMap<u64, bool> = BTreeMap::new();
    let mut watermark = 0u64;
    // The highest acked tag at or below the watermark: a `multiple` ack must name a tag the broker
    // still knows, never one already nacked.
    let mut ack_target = 0u64;
    let mut acked = 0u64;
    let mut batch = Vec::new();
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (open, ticked) = tokio::select! {
            n = settled.recv_many(&mut batch, 4096) => (n > 0, false),
            _ = tick.tick() => (true, true),
        };
        for settle in batch.drain(..) {
            match settle {
                Settle::Ack(tag) => {
                    done.insert(tag, true);
                }
                Settle::Requeue(tag) => {
                    let requeue = BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    };
                    if let Err(e) = channel.basic_nack(tag, requeue).await {
                        tracing::warn!(error = %e, "nack failed; the broker redelivers the message anyway");
                    }
                    done.insert(tag, false);
                }
            }
        }
        while let Some(was_acked) = done.remove(&(watermark + 1)) {
            watermark += 1;
            if was_acked {
                ack_target = watermark;
            }
        }
        let due = ack_target - acked >= ACK_EVERY || ticked || !open;
        if ack_target > acked && due {
            match channel
                .basic_ack(ack_target, BasicAckOptions { multiple: true })
                .await
            {
                Ok(()) => acked = ack_target,
                // The channel is gone: its unacked deliveries come back after reconnecting.
                Err(e) => tracing::warn!(error = %e, "ack failed; the broker will redeliver"),
            }
        }
        if !open {
            return;
        }
    }
}
