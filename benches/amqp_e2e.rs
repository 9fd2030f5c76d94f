//! End-to-end benchmark: RabbitMQ → fleetwatch → event store → SSE, against a real broker.
//!
//! Run with `cargo bench --bench amqp_e2e` (RabbitMQ on 127.0.0.1:5672, guest/guest; the bench
//! fails loudly without it). It prints a Markdown table for `docs/benchmarks.md`.
//!
//! What it measures, and why:
//!
//! 1. **Bare consumer**: N persistent readings are published (with confirms) into a fresh queue,
//!    then a lapin consumer that does nothing but ack (prefetch as the engine's default, a `multiple` ack every 100
//!    deliveries, as the engine does) drains it. That is the broker's own delivery limit on this
//!    machine, the ceiling for any consumer.
//! 2. **fleetwatch end to end**: the same N readings are queued before the engine starts; then the
//!    release engine is started and timed until every reading is durable in its event store and
//!    acked (`fleetwatch_amqp_processed_total` = N and the queue is empty). Like the bare
//!    consumer's, its clock starts once it is connected to the broker (the last health check
//!    before `/api/health` said so); the time from starting the process is reported beside it.
//!    Its ratio to (1) says how much of the broker's limit the engine uses. (1) and (2) alternate
//!    twice (A B A B) on fresh queues and data directories because the machine is noisy.
//! 3. **Latency**: on a fresh engine, a warm-up round publishes one reading from each of 10,000
//!    devices (registering them), then readings are published at a steady 10,000/s (one per device
//!    per second) for 20 s, stamped with their publish time. Each `ReadingRecorded` received on
//!    `GET /api/stream` gives two latencies: to its commit stamp (`recorded_at`, taken as the store
//!    writer stages the commit) and to its receipt on SSE (after the commit's fsync). The moment
//!    it became durable lies between the two.
//!
//! `FW_ENGINE_ARGS` adds flags to every engine the bench starts (space-separated).
//! `FW_ENGINE_BIN=/path/to/fleetwatch` measures that binary instead of this build's (e.g. one
//! built without the test-only `failpoints` feature, or an older build's latency).
//! `FW_BASELINE_BIN=/path/to/another/fleetwatch` adds a drain by that binary (an older build, say)
//! to every round, right after this build's: before and after in one run (A B C A B C).
//!
//! Every run uses exchange and queue names of its own (`bench.<uuid8>`), deleted at the end.
//! `FW_BARE_PREFETCH` sets the bare consumer's prefetch (default: the engine's default).
//! `FW_BENCH_N` overrides N (default 100,000), `FW_BENCH_RATE` the latency test's readings/s
//! (default 10,000), `FW_BENCH_SECONDS` its length (default 20); `FW_PHASES` picks the phases
//! (default `drain,latency`; `latency` alone runs on a fresh engine). The latency test also reports
//! the CPU each process used per reading while it ran: the broker, the engine, and the bench itself
//! (publisher and SSE reader), which share the machine's cores.

#[path = "../tests/common/mod.rs"]
mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use common::amqp::{queue_depth, Names, URL};
use common::Engine;
use fleetwatch::publish::{Publisher, PublisherOptions};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};

const DEFAULT_N: usize = 100_000;
const DEVICES: usize = 10_000;
/// The engine's default `--amqp-prefetch`.
const PREFETCH: u16 = 10_000;
/// The bare consumer acks with `multiple` this often, like the engine's batched acks.
const ACK_EVERY: u64 = 100;
/// Published readings awaiting their confirm; publishing waits beyond this.
const CONFIRM_WINDOW: usize = 4_096;
const ROUNDS: usize = 2;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(20);
/// Finer, so that little of the engine's drain falls before its clock starts.
const CONNECT_POLL: Duration = Duration::from_millis(2);
const DEFAULT_RATE: usize = 10_000;
const DEFAULT_LATENCY_SECONDS: usize = 20;
const TICK: Duration = Duration::from_millis(10);
/// Publishing channels of the latency test; must divide `DEVICES`.
const PUBLISH_LANES: usize = 2;
/// How long the warm-up round may take to come back on SSE.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the SSE reader waits for the last events after publishing has ended.
const LATENCY_GRACE: Duration = Duration::from_secs(15);

/// What to run, from the environment.
struct Plan {
    n: usize,
    drain: bool,
    latency: bool,
    latency_rate: usize,
    latency_seconds: usize,
    /// The bare consumer's prefetch.
    bare_prefetch: u16,
}

fn main() -> Result<()> {
    let phases = std::env::var("FW_PHASES").unwrap_or_else(|_| "drain,latency".into());
    let (mut drain, mut latency) = (false, false);
    for phase in phases.split(',') {
        match phase.trim() {
            "drain" => drain = true,
            "latency" => latency = true,
            other => bail!("unknown phase {other:?} in FW_PHASES (drain, latency)"),
        }
    }
    let plan = Plan {
        n: env_or("FW_BENCH_N", DEFAULT_N)?,
        drain,
        latency,
        latency_rate: env_or("FW_BENCH_RATE", DEFAULT_RATE)?,
        latency_seconds: env_or("FW_BENCH_SECONDS", DEFAULT_LATENCY_SECONDS)?,
        bare_prefetch: env_or("FW_BARE_PREFETCH", PREFETCH.into())?
            .try_into()
            .context("FW_BARE_PREFETCH must fit in 16 bits")?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(plan))
}

fn env_or(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name} must be a number")),
        Err(_) => Ok(default),
    }
}

async fn run(plan: Plan) -> Result<()> {
    let broker = Broker::connect().await.context(
        "RabbitMQ must run on 127.0.0.1:5672 (guest/guest) for this bench; scripts/test-deps.sh starts it",
    )?;
    let backlog = backlog(plan.n, Utc::now() - TimeDelta::hours(1));
    // Every name used, deleted from the broker when dropped here at the end.
    let mut used = Vec::new();
    let outcome = measure(&broker, &backlog, &plan, &mut used).await;
    drop(used);
    print_report(&plan, &backlog, &outcome?);
    Ok(())
}

/// Runs bare and engine drains alternately, then the latency test on a fresh engine (each if
/// asked to).
async fn measure(
    broker: &Broker,
    backlog: &[Message],
    plan: &Plan,
    used: &mut Vec<Names>,
) -> Result<Report> {
    let mut rounds = Vec::new();
    for round in (1..=ROUNDS).filter(|_| plan.drain) {
        eprintln!("round {round}: bare consumer");
        let bare = Names::with_prefix("bench");
        broker.declare(&bare).await?;
        let bare_publish = broker.publish_backlog(&bare, backlog).await?;
        let (bare_drain, bare_broker_cpu, bare_consumer_cpu) = with_cpu(bare_consume(
            &bare,
            backlog.len() as u64,
            plan.bare_prefetch,
        ))
        .await?;
        used.push(bare);

        eprintln!("round {round}: fleetwatch");
        let topology = Names::with_prefix("bench");
        let run = engine_run(broker, &topology, backlog, &this_build()).await?;
        stop(run.engine)?;
        let left = broker.depth(&topology).await?;
        used.push(topology);
        ensure!(
            left == 0,
            "{left} readings were left unacked after the engine stopped"
        );
        let baseline = match std::env::var_os("FW_BASELINE_BIN") {
            None => None,
            Some(bin) => {
                eprintln!("round {round}: baseline {}", bin.to_string_lossy());
                let topology = Names::with_prefix("bench");
                let run = engine_run(broker, &topology, backlog, &PathBuf::from(bin)).await?;
                stop(run.engine)?;
                used.push(topology);
                Some(Baseline {
                    drain: rate(backlog.len(), run.drain),
                    drain_with_start: rate(backlog.len(), run.drain_with_start),
                    engine_us: per_reading_us(run.engine_cpu, backlog.len()),
                    broker_us: per_reading_us(run.broker_cpu, backlog.len()),
                })
            }
        };
        rounds.push(Round {
            baseline,
            bare_publish: rate(backlog.len(), bare_publish),
            engine_publish: rate(backlog.len(), run.publish),
            bare: rate(backlog.len(), bare_drain),
            engine: rate(backlog.len(), run.drain),
            engine_with_start: rate(backlog.len(), run.drain_with_start),
            bare_broker_us: per_reading_us(bare_broker_cpu, backlog.len()),
            bare_consumer_us: per_reading_us(bare_consumer_cpu, backlog.len()),
            engine_broker_us: per_reading_us(run.broker_cpu, backlog.len()),
            engine_us: per_reading_us(run.engine_cpu, backlog.len()),
        });
    }
    if !plan.latency {
        return Ok(Report {
            rounds,
            latency: None,
        });
    }
    let topology = Names::with_prefix("bench");
    broker.declare(&topology).await?;
    let engine = start_engine(&topology, &this_build()).await;
    engine.wait_broker_connected().await;
    let latency = measure_latency(broker, &topology, &engine, plan).await?;
    stop(engine)?;
    used.push(topology);
    Ok(Report {
        rounds,
        latency: Some(latency),
    })
}

/// Runs `drain` and returns its result with the CPU seconds the broker and this process used.
async fn with_cpu<T>(drain: impl std::future::Future<Output = Result<T>>) -> Result<(T, f64, f64)> {
    let broker = broker_pid()?;
    let (broker_before, own_before) = (cpu_seconds(&broker), cpu_seconds("self"));
    let value = drain.await?;
    Ok((
        value,
        cpu_seconds(&broker) - broker_before,
        cpu_seconds("self") - own_before,
    ))
}

/// Drains `n` deliveries with a consumer that only acks (every `ACK_EVERY`, `multiple`).
async fn bare_consume(topology: &Names, n: u64, prefetch: u16) -> Result<Duration> {
    let connection = Connection::connect(URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut deliveries = channel
        .basic_consume(
            topology.queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0u64;
    while received < n {
        let delivery = deliveries
            .next()
            .await
            .context("the broker cancelled the consumer")??;
        received += 1;
        if received.is_multiple_of(ACK_EVERY) || received == n {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let elapsed = started.elapsed();
    connection.close(200, "done".into()).await?;
    Ok(elapsed)
}

/// The engine under test: this build's, or `FW_ENGINE_BIN`.
fn this_build() -> PathBuf {
    std::env::var_os("FW_ENGINE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetwatch")))
}

/// `binary` on a temporary data directory and the run's names, with `FW_ENGINE_ARGS`.
async fn start_engine(names: &Names, binary: &Path) -> Engine {
    let extra = std::env::var("FW_ENGINE_ARGS").unwrap_or_default();
    Engine::options()
        .binary(binary)
        .args(["--amqp-url", URL])
        .args(names.engine_args())
        .args(extra.split_whitespace())
        .log_level("warn")
        .start_temp()
        .await
}

/// SIGTERM: the engine finishes and acks what it holds, then exits.
fn stop(mut engine: Engine) -> Result<()> {
    let status = engine.terminate();
    ensure!(
        status.success(),
        "the engine exited with {status}; {}",
        engine.log_tail()
    );
    Ok(())
}

/// What one engine's drain took.
struct EngineDrain {
    engine: Engine,
    publish: Duration,
    /// From its consumer's connection to the broker until all was durable and acked.
    drain: Duration,
    /// The same, from starting the process.
    drain_with_start: Duration,
    /// CPU seconds the engine (start-up included) and the broker used.
    engine_cpu: f64,
    broker_cpu: f64,
}

/// Queues the backlog while no engine runs, then starts one and times it until all is durable
/// and acked.
async fn engine_run(
    broker: &Broker,
    topology: &Names,
    backlog: &[Message],
    binary: &Path,
) -> Result<EngineDrain> {
    broker.declare(topology).await?;
    let publish = broker.publish_backlog(topology, backlog).await?;
    let broker_pid = broker_pid()?;
    let broker_before = cpu_seconds(&broker_pid);
    let spawned = Instant::now();
    let mut engine = start_engine(topology, binary).await;
    let connected = consumer_connected(&engine, spawned).await?;
    loop {
        // `fleetwatch_amqp_processed_total`: readings durable and settled. Asked only once the
        // broker has handed everything out: rendering the engine's metrics every poll took about
        // 2 % of its CPU, work the bare consumer is not asked to do.
        if broker.depth(topology).await? == 0
            && engine.metric("fleetwatch_amqp_processed_total").await >= backlog.len() as f64
        {
            let (drain, drain_with_start) = (connected.elapsed(), spawned.elapsed());
            let engine_cpu = cpu_seconds(&engine.pid().to_string());
            let broker_cpu = cpu_seconds(&broker_pid) - broker_before;
            return Ok(EngineDrain {
                engine,
                publish,
                drain,
                drain_with_start,
                engine_cpu,
                broker_cpu,
            });
        }
        engine.check_running();
        if spawned.elapsed() > DRAIN_TIMEOUT {
            bail!(
                "the engine did not drain the queue in {DRAIN_TIMEOUT:?}; {}",
                engine.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The latest moment known to come before the engine's consumer connected to the broker: the
/// last health check that said it was not connected, or the process's start if none did. The
/// bare consumer's clock starts once it is connected too.
async fn consumer_connected(engine: &Engine, spawned: Instant) -> Result<Instant> {
    let mut before = spawned;
    loop {
        let asked = Instant::now();
        if engine.broker_connected().await {
            return Ok(before);
        }
        before = asked;
        ensure!(
            spawned.elapsed() < DRAIN_TIMEOUT,
            "the engine did not connect to RabbitMQ; {}",
            engine.log_tail()
        );
        tokio::time::sleep(CONNECT_POLL).await;
    }
}

/// Publishes readings at a steady rate, stamped with their publish time, and reads them back
/// from the SSE stream; records the CPU each process used meanwhile.
///
/// First a warm-up round: one reading from each device, which on a fresh engine registers it (its
/// actor starts and looks it up in the store). Once all of them are back on SSE, the steady phase
/// publishes `rate × seconds` readings from the now active devices; its figures are the steady
/// state, and the warm-up's are what a fleet of new devices costs.
async fn measure_latency(
    broker: &Broker,
    topology: &Names,
    engine: &Engine,
    plan: &Plan,
) -> Result<Latency> {
    let (rate_per_s, seconds) = (plan.latency_rate, plan.latency_seconds);
    let planned = rate_per_s * seconds;
    let stream = reqwest::get(engine.url("/api/stream?types=ReadingRecorded"))
        .await?
        .error_for_status()?;
    // The response has started: the stream is subscribed to the commit feed before publishing.
    let received = Arc::new(AtomicUsize::new(0));
    let (published, published_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(read_latencies(
        stream,
        DEVICES + planned,
        published_rx,
        received.clone(),
    ));

    eprintln!("warm-up: one reading from each of {DEVICES} devices at {rate_per_s}/s");
    publish_paced(broker, topology, rate_per_s, 0..DEVICES).await?;
    let warm_up_started = Instant::now();
    while received.load(Ordering::Relaxed) < DEVICES {
        ensure!(
            warm_up_started.elapsed() < WARM_UP_TIMEOUT,
            "only {} of {DEVICES} warm-up readings arrived on SSE",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(POLL).await;
    }

    eprintln!("steady: {rate_per_s} readings/s for {seconds} s");
    let broker_pid = broker_pid()?;
    let engine_pid = engine.pid().to_string();
    let before = [&broker_pid, &engine_pid, "self"].map(cpu_seconds);
    let publish_time =
        publish_paced(broker, topology, rate_per_s, DEVICES..DEVICES + planned).await?;
    let _ = published.send(());
    let mut timings = reader.await??;
    // The reader returns once the last reading arrived, or `LATENCY_GRACE` after publishing
    // ended if some never did (the table then shows how many were missing).
    let after = [&broker_pid, &engine_pid, "self"].map(cpu_seconds);
    let steady = timings.split_off(DEVICES.min(timings.len()));
    if let Ok(path) = std::env::var("FW_BENCH_DUMP") {
        let lines: Vec<String> = timings
            .iter()
            .chain(&steady)
            .map(|t| {
                format!(
                    "{:.6} {:.3} {:.3}",
                    t.published_s, t.to_commit_ms, t.to_sse_ms
                )
            })
            .collect();
        std::fs::write(path, lines.join("\n"))?;
    }
    let cpu_us: [f64; 3] =
        std::array::from_fn(|i| per_reading_us(after[i] - before[i], steady.len().max(1)));
    Ok(Latency {
        planned_rate: rate_per_s,
        seconds,
        planned,
        publish_rate: rate(planned, publish_time),
        warm_up: timings,
        steady,
        cpu_us,
    })
}

/// Publishes the readings with indices `range` in ticks of `TICK`, round-robin over the devices,
/// on `PUBLISH_LANES` channels at once (so one channel's sequential publishes are not the bound);
/// a device always publishes on the same lane, so its readings stay in order.
async fn publish_paced(
    broker: &Broker,
    topology: &Names,
    rate_per_s: usize,
    range: Range<usize>,
) -> Result<Duration> {
    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..PUBLISH_LANES {
        let publisher = broker.publisher(topology).await?;
        lanes.spawn(publish_lane(publisher, lane, rate_per_s, range.clone()));
    }
    while let Some(lane) = lanes.join_next().await {
        lane??;
    }
    Ok(started.elapsed())
}

/// This lane's share of the paced readings: those with index ≡ `lane` (mod `PUBLISH_LANES`).
async fn publish_lane(
    mut publisher: Publisher,
    lane: usize,
    rate_per_s: usize,
    range: Range<usize>,
) -> Result<()> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(TICK);
    let mut next = range.start;
    while next < range.end {
        ticks.tick().await;
        // Every reading due by now, so any rate comes out exact over time.
        let due = range.start + (started.elapsed().as_secs_f64() * rate_per_s as f64) as usize;
        for i in (next..due.min(range.end)).filter(|i| i % PUBLISH_LANES == lane) {
            // Stamped once the confirm window has room: waiting for it is the publisher's
            // backpressure, not the path being measured.
            publisher.wait_for_room().await?;
            let step = (i / DEVICES) as u64;
            send(&mut publisher, &reading(i % DEVICES, step, Utc::now())).await?;
        }
        next = next.max(due.min(range.end));
    }
    Ok(publisher.flush().await?)
}

/// One reading's way through: ms from publish to the store's commit stamp (`recorded_at`, taken
/// as the writer stages the commit, just before its fsync), and ms from publish to receipt on SSE
/// (after the fsync). The moment it became durable lies between the two.
#[derive(Clone, Copy)]
struct Timing {
    published_s: f64,
    to_commit_ms: f64,
    to_sse_ms: f64,
}

/// Collects the timings of up to `planned` `ReadingRecorded` events, counting them in `received`;
/// gives up `LATENCY_GRACE` after `published` fires.
async fn read_latencies(
    stream: reqwest::Response,
    planned: usize,
    mut published: tokio::sync::oneshot::Receiver<()>,
    received_count: Arc<AtomicUsize>,
) -> Result<Vec<Timing>> {
    let mut chunks = stream.bytes_stream();
    let mut pending = Vec::new();
    let mut timings = Vec::with_capacity(planned);
    let mut deadline: Option<tokio::time::Instant> = None;
    while timings.len() < planned {
        let grace_over = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let chunk = tokio::select! {
            chunk = chunks.next() => match chunk {
                Some(chunk) => chunk?,
                None => bail!("the engine closed the SSE stream"),
            },
            _ = &mut published, if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + LATENCY_GRACE);
                continue;
            }
            _ = grace_over => break, // Report what arrived; the table shows how much was missing.
        };
        let received = Utc::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some((published, committed)) = reading_times(&line)? {
                let ms = |d: TimeDelta| d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
                timings.push(Timing {
                    published_s: published.timestamp_micros() as f64 / 1e6,
                    to_commit_ms: ms(committed - published),
                    to_sse_ms: ms(received - published),
                });
                received_count.store(timings.len(), Ordering::Relaxed);
            }
        }
    }
    Ok(timings)
}

/// The reading time (`data.at`, its publish time) and commit stamp (`recorded_at`) of an SSE
/// `data:` line; `None` for other lines.
fn reading_times(line: &[u8]) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    let Some(json) = line.strip_prefix(b"data:") else {
        return Ok(None);
    };
    let event: Value = serde_json::from_slice(json)?;
    let time = |value: &Value, name: &str| -> Result<DateTime<Utc>> {
        let text = value
            .as_str()
            .with_context(|| format!("a ReadingRecorded event without {name}"))?;
        Ok(DateTime::parse_from_rfc3339(text)?.to_utc())
    };
    Ok(Some((
        time(&event["data"]["at"], "data.at")?,
        time(&event["recorded_at"], "recorded_at")?,
    )))
}

/// One reading to publish: routing key (the device id) and JSON body.
struct Message {
    device: String,
    body: Vec<u8>,
}

/// `n` readings round-robin over the devices, one second apart per device from `start`.
fn backlog(n: usize, start: DateTime<Utc>) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let step = (i / DEVICES) as u64;
            reading(i % DEVICES, step, start + TimeDelta::seconds(step as i64))
        })
        .collect()
}

/// A realistic reading: each device circles Amsterdam on its own ring; its cargo is 3–7 °C.
fn reading(device: usize, step: u64, at: DateTime<Utc>) -> Message {
    let id = format!("bench-{device:06}");
    let ring = 0.005 + 0.04 * (device as f64 / DEVICES as f64);
    let angle = device as f64 + step as f64 * 0.001;
    let body = json!({
        "device_id": id,
        "timestamp": at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "lat": 52.3676 + ring * angle.sin(),
        "lon": 4.9041 + ring * 1.6 * angle.cos(),
        "temperature": 5.0 + 2.0 * (angle * 0.7).sin(),
    });
    Message {
        device: id,
        body: serde_json::to_vec(&body).expect("a reading serializes"),
    }
}

/// The bench's broker connection: one channel for topology and queue depth; publishers get their
/// own (with confirms).
struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    async fn connect() -> Result<Self> {
        let connection = Connection::connect(URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// The engine's own topology declaration, so the two cannot drift apart.
    async fn declare(&self, t: &Names) -> Result<()> {
        fleetwatch::ingest::amqp::declare_topology(&self.channel, &t.exchange, &t.queue, 0).await?;
        Ok(())
    }

    async fn depth(&self, t: &Names) -> Result<u32> {
        Ok(queue_depth(&self.channel, &t.queue).await?)
    }

    /// A publisher on a channel of its own, with at most `CONFIRM_WINDOW` confirms outstanding.
    async fn publisher(&self, t: &Names) -> Result<Publisher> {
        let options = PublisherOptions {
            window: CONFIRM_WINDOW,
            ..PublisherOptions::default()
        };
        Ok(Publisher::open(&self.connection, &t.exchange, options).await?)
    }

    /// Publishes every message and waits for all confirms; returns how long that took.
    async fn publish_backlog(&self, t: &Names, backlog: &[Message]) -> Result<Duration> {
        let started = Instant::now();
        let mut publisher = self.publisher(t).await?;
        for message in backlog {
            send(&mut publisher, message).await?;
        }
        publisher.flush().await?;
        Ok(started.elapsed())
    }
}

/// Publishes one reading, routed by its device id.
async fn send(publisher: &mut Publisher, message: &Message) -> Result<()> {
    Ok(publisher.publish(&message.device, &message.body).await?)
}

/// Readings per second of one round.
/// A drain by `FW_BASELINE_BIN`.
struct Baseline {
    drain: f64,
    drain_with_start: f64,
    engine_us: f64,
    broker_us: f64,
}

struct Round {
    baseline: Option<Baseline>,
    bare_publish: f64,
    engine_publish: f64,
    bare: f64,
    /// From the engine's connection to the broker, like the bare consumer's.
    engine: f64,
    /// From starting the engine's process.
    engine_with_start: f64,
    /// CPU µs per reading while draining: the broker and the consumer, in each run.
    bare_broker_us: f64,
    bare_consumer_us: f64,
    engine_broker_us: f64,
    engine_us: f64,
}

struct Latency {
    planned_rate: usize,
    seconds: usize,
    planned: usize,
    /// Of the steady phase.
    publish_rate: f64,
    /// The first reading of each device.
    warm_up: Vec<Timing>,
    steady: Vec<Timing>,
    /// CPU µs per received reading while the test ran: broker, engine, this bench.
    cpu_us: [f64; 3],
}

struct Report {
    rounds: Vec<Round>,
    latency: Option<Latency>,
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |t| {
        t.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    ticks / per_second as f64
}

/// The RabbitMQ server process (the Erlang VM).
fn broker_pid() -> Result<String> {
    let out = Command::new("pgrep").args(["-o", "beam.smp"]).output()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        !pid.is_empty(),
        "cannot find the RabbitMQ process (beam.smp)"
    );
    Ok(pid)
}

/// CPU microseconds per reading.
fn per_reading_us(cpu_seconds: f64, n: usize) -> f64 {
    cpu_seconds * 1e6 / n as f64
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// The value below which a share `q` of the sorted `values` lie (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_report(plan: &Plan, backlog: &[Message], report: &Report) {
    println!("\n{}\n", machine());
    if !report.rounds.is_empty() {
        print_drains(plan, backlog, &report.rounds);
    }
    if let Some(latency) = &report.latency {
        print_latency(latency);
    }
}

fn print_drains(plan: &Plan, backlog: &[Message], rounds: &[Round]) {
    let body_bytes = backlog.iter().map(|m| m.body.len()).sum::<usize>() / backlog.len().max(1);
    println!(
        "N = {} persistent readings (mean body {body_bytes} B), {DEVICES} devices, prefetch: bare \
         consumer {}, engine its own (default {PREFETCH})\n",
        plan.n, plan.bare_prefetch
    );
    let header: Vec<String> = (1..=rounds.len()).map(|i| format!("run {i}")).collect();
    println!("| readings/s | {} | median |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(header.len()));
    let row = |name: &str, value: &dyn Fn(&Round) -> f64, unit: &dyn Fn(f64) -> String| {
        let values: Vec<f64> = rounds.iter().map(value).collect();
        let cells: Vec<String> = values.iter().map(|&v| unit(v)).collect();
        println!(
            "| {name} | {} | {} |",
            cells.join(" | "),
            unit(median(values))
        );
    };
    let per_second = |v: f64| format!("{v:.0}");
    row(
        "publish, persistent + confirms (bare queue)",
        &|r| r.bare_publish,
        &per_second,
    );
    row(
        "publish, persistent + confirms (engine queue)",
        &|r| r.engine_publish,
        &per_second,
    );
    row("bare lapin consumer, ack only", &|r| r.bare, &per_second);
    row("fleetwatch: durable + acked", &|r| r.engine, &per_second);
    row(
        "fleetwatch, timed from starting its process",
        &|r| r.engine_with_start,
        &per_second,
    );
    row("fleetwatch / bare consumer", &|r| r.engine / r.bare, &|v| {
        format!("{:.0} %", v * 100.0)
    });
    let micros = |v: f64| format!("{v:.1} µs");
    row(
        "CPU per reading: broker, bare run",
        &|r| r.bare_broker_us,
        &micros,
    );
    row(
        "CPU per reading: bare consumer",
        &|r| r.bare_consumer_us,
        &micros,
    );
    row(
        "CPU per reading: broker, fleetwatch run",
        &|r| r.engine_broker_us,
        &micros,
    );
    row("CPU per reading: fleetwatch", &|r| r.engine_us, &micros);
    if rounds.iter().all(|r| r.baseline.is_some()) {
        let baseline = |r: &Round| r.baseline.as_ref().map_or(0.0, |b| b.drain);
        row(
            "baseline (FW_BASELINE_BIN): durable + acked",
            &baseline,
            &per_second,
        );
        row(
            "baseline, timed from starting its process",
            &|r| r.baseline.as_ref().map_or(0.0, |b| b.drain_with_start),
            &per_second,
        );
        row(
            "baseline / bare consumer",
            &|r| baseline(r) / r.bare,
            &|v| format!("{:.0} %", v * 100.0),
        );
        row(
            "CPU per reading: broker, baseline run",
            &|r| r.baseline.as_ref().map_or(0.0, |b| b.broker_us),
            &micros,
        );
        row(
            "CPU per reading: baseline",
            &|r| r.baseline.as_ref().map_or(0.0, |b| b.engine_us),
            &micros,
        );
    }
}

fn print_latency(latency: &Latency) {
    println!(
        "\nLatency: {DEVICES} devices; a warm-up round of one reading each, then {} readings/s for {} s (achieved {:.0}/s; {} of {} received on SSE):\n",
        latency.planned_rate,
        latency.seconds,
        latency.publish_rate,
        latency.steady.len(),
        latency.planned
    );
    println!("| readings | from publish to | p50 | p90 | p99 | p99.9 | max |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    type Row<'a> = (&'a str, &'a str, &'a [Timing], fn(&Timing) -> f64);
    let rows: [Row; 3] = [
        (
            "steady",
            "commit stamp (`recorded_at`)",
            &latency.steady,
            |t| t.to_commit_ms,
        ),
        ("steady", "durable, received on SSE", &latency.steady, |t| {
            t.to_sse_ms
        }),
        (
            "warm-up: first reading of each new device",
            "durable, received on SSE",
            &latency.warm_up,
            |t| t.to_sse_ms,
        ),
    ];
    for (readings, to, timings, value) in rows {
        let mut values: Vec<f64> = timings.iter().map(value).collect();
        values.sort_by(f64::total_cmp);
        if values.is_empty() {
            println!("| {readings} | {to} | – | – | – | – | – |");
            continue;
        }
        let ms = |q: f64| format!("{:.1} ms", percentile(&values, q));
        println!(
            "| {readings} | {to} | {} | {} | {} | {} | {} |",
            ms(0.50),
            ms(0.90),
            ms(0.99),
            ms(0.999),
            ms(1.0)
        );
    }
    let [broker, engine, bench] = latency.cpu_us;
    let cores = |us: f64| us * latency.publish_rate / 1e6;
    println!("\n| CPU per reading, steady phase | µs | cores at the achieved rate |");
    println!("|---|---:|---:|");
    for (name, us) in [
        ("broker (beam.smp)", broker),
        ("fleetwatch", engine),
        ("bench: publisher + SSE reader", bench),
        ("all three", broker + engine + bench),
    ] {
        println!("| {name} | {us:.1} | {:.2} |", cores(us));
    }
}

/// Date, cores, CPU model and RabbitMQ version, for the record.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let rabbitmq = Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown (rabbitmqctl failed)".into());
    format!(
        "{}, {cores} cores ({cpu}), RabbitMQ {rabbitmq}",
        Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}
