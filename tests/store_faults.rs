//! The event store failing while readings stream in over RabbitMQ: a full disk (a real,
//! size-limited tmpfs), a read-only database and a store writer that dies (both injected with
//! failpoints: the integration tests' binary is built with the `failpoints` feature). In every
//! case nothing is dead-lettered, `/api/health` answers 503 naming the cause while it lasts, every
//! published reading is stored exactly once, in order, once the store writes again, and the
//! engine logs a handful of lines, not one per reading.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::amqp::{eventually, Names, Publisher};
use common::relay::Relay;
use common::*;
use serde_json::Value;

const DEVICES: usize = 40;
/// Readings per second the publisher aims at (one round = one reading of every device).
const RATE: u64 = 2000;
/// The most WARN/ERROR lines a fault episode may cost.
const MAX_WARNINGS: usize = 20;

/// A size-limited tmpfs mounted for one test, unmounted when dropped. The test machines run as
/// root; where mounting is impossible the test fails, it never skips.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            path,
        );
        Self {
            path: path.to_owned(),
        }
    }

    fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], &self.path);
    }
}

fn mount(args: &[&str], path: &Path) {
    let output = Command::new("mount")
        .args(args)
        .arg(path)
        .output()
        .expect("running mount");
    assert!(
        output.status.success(),
        "mount {args:?} {} failed (these tests need root, as the test machines have): {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Publishes rounds of readings (round `n`: every device's reading at `t0 + n s`) at about
/// `RATE` readings a second, with publisher confirms, until stopped.
struct Simulator {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn device(i: usize) -> String {
    format!("fault-{i:02}")
}

impl Simulator {
    async fn start(exchange: &str) -> Self {
        let publisher = Publisher::must_connect(exchange).await;
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (rounds, stop) = (rounds.clone(), stop.clone());
            async move {
                let pace = Duration::from_micros(1_000_000 * DEVICES as u64 / RATE);
                let mut next = tokio::time::Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let round = rounds.load(Ordering::SeqCst) as i64;
                    let messages: Vec<(String, Vec<u8>)> = (0..DEVICES)
                        .map(|i| {
                            let lat = DEPOT.0 + (round % 50) as f64 * 0.0005;
                            let body = reading(&device(i), round, lat, DEPOT.1, 5.0);
                            (device(i), serde_json::to_vec(&body).unwrap())
                        })
                        .collect();
                    publisher
                        .publish_all(&messages)
                        .await
                        .expect("publishing to RabbitMQ");
                    rounds.fetch_add(1, Ordering::SeqCst);
                    next += pace;
                    tokio::time::sleep_until(next).await;
                }
            }
        });
        Self { rounds, stop, task }
    }

    /// Stops after the round being published; returns how many rounds were published.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("publisher task");
        self.rounds.load(Ordering::SeqCst)
    }
}

/// `/api/health`'s status code and body.
async fn health(engine: &Engine) -> (u16, Value) {
    let response = client()
        .get(engine.url("/api/health"))
        .send()
        .await
        .expect("GET /api/health");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits for `/api/health` to answer 503 with a store cause containing `cause`.
async fn wait_failing(engine: &Engine, cause: &str) -> Value {
    eventually(
        Duration::from_secs(60),
        &format!("health to report the store failing ({cause})"),
        || async {
            let (status, body) = health(engine).await;
            let store = body["store"].as_str().unwrap_or_default();
            (status == 503 && store.contains(cause)).then_some(body)
        },
    )
    .await
}

async fn wait_ok(engine: &Engine) {
    eventually(
        Duration::from_secs(60),
        "health to report the store ok again",
        || async { (health(engine).await.0 == 200).then_some(()) },
    )
    .await
}

/// Every published reading of every device stored exactly once, in the order published.
async fn assert_all_stored_once(engine: &Engine, rounds: u64) {
    for i in 0..DEVICES {
        engine
            .wait_until_stored(&device(i), rounds as i64 - 1)
            .await;
    }
    for i in 0..DEVICES {
        let expected: Vec<String> = (0..rounds as i64)
            .map(|n| reading(&device(i), n, 0.0, 0.0, 0.0)["timestamp"].clone())
            .map(|t| {
                let at: chrono::DateTime<chrono::Utc> = t.as_str().unwrap().parse().unwrap();
                at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            })
            .collect();
        assert_eq!(
            engine.stored_reading_times(&device(i)).await,
            expected,
            "{}: every published reading stored once, in order",
            device(i)
        );
    }
}

async fn assert_nothing_dead_lettered(engine: &Engine, publisher: &Publisher, names: &Names) {
    assert_eq!(publisher.depth(&names.dead()).await, 0, "dead letters");
    assert_eq!(
        engine.metric("fleetwatch_amqp_dead_lettered_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_ingest_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("diskfull");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let disk = Tmpfs::mount(&dir.path().join("data"), "6m");
    let mut args = names.engine_args();
    args.extend(["--snapshot-every".into(), "50".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(&disk.path, &args).await;
    engine.wait_broker_connected().await;

    let simulator = Simulator::start(&names.exchange).await;
    let health = wait_failing(&engine, "full").await;
    assert_eq!(health["status"], "degraded", "{health}");
    // Readings keep arriving while the disk is full: none may be dead-lettered, and writes over
    // HTTP are refused with Retry-After rather than accepted and lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(wait_failing(&engine, "full").await["status"], "degraded");
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    let refused = client()
        .post(engine.url("/api/readings"))
        .json(&reading("http-1", 0, DEPOT.0, DEPOT.1, 5.0))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(engine.metric("fleetwatch_store_available").await, 0.0);

    disk.resize("400m");
    wait_ok(&engine).await;
    let rounds = simulator.stop().await;
    assert_all_stored_once(&engine, rounds).await;
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    assert_eq!(engine.metric("fleetwatch_store_available").await, 1.0);
    assert!(
        engine.warnings_logged() <= MAX_WARNINGS,
        "{} WARN/ERROR lines: {}",
        engine.warnings_logged(),
        engine.log_tail()
    );
}

/// Runs a publishing simulator against an engine with `failpoints` set, waits for the fault to
/// show on `/api/health` and to pass by itself, and checks that nothing was lost.
async fn injected_fault_loses_nothing(test: &str, failpoints: &str, cause: &str) {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new(test);
    let publisher = Publisher::must_connect(&names.exchange).await;
    let args = names.engine_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let data = dir.path().join("data");
    let engine = Engine::start_with_env(&data, &args, &[("FAILPOINTS", failpoints)]).await;
    engine.wait_broker_connected().await;

    let simulator = Simulator::start(&names.exchange).await;
    wait_failing(&engine, cause).await;
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    wait_ok(&engine).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rounds = simulator.stop().await;
    assert_all_stored_once(&engine, rounds).await;
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    assert!(engine.metric("fleetwatch_store_failures_total").await >= 1.0);
    assert!(
        engine.warnings_logged() <= MAX_WARNINGS,
        "{} WARN/ERROR lines: {}",
        engine.warnings_logged(),
        engine.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_pauses_ingest_and_loses_nothing() {
    // After 100 commits, SQLite's read-only error for the next 24 (about 6 s of probes).
    injected_fault_loses_nothing(
        "readonly",
        "store-commit=100*off->24*return(readonly)->off",
        "readonly",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_writer_that_dies_is_replaced_and_nothing_is_lost() {
    // After 100 batches the writer thread panics, three times in a row.
    injected_fault_loses_nothing(
        "writerdeath",
        "store-writer=100*off->3*panic(injected writer crash)->off",
        "died",
    )
    .await;
}

/// The engine's PostgreSQL store loses its database (every connection cut, through a relay, while
/// readings are being published): ingest pauses, nothing is acknowledged or dead-lettered, and
/// once the database is back every reading is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_cut_from_its_database_pauses_ingest_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("pgcut");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let database = common::postgres::fresh_database().await;
    let relay = Relay::start("127.0.0.1:5432").await;
    let through_relay = relay.postgres_url(&database);
    let mut args = names.engine_args();
    args.extend([
        "--store".into(),
        "postgres".into(),
        "--store-url".into(),
        through_relay,
    ]);
    let engine = Engine::options()
        .args(args)
        .start(&dir.path().join("data"))
        .await;
    engine.wait_broker_connected().await;

    let simulator = Simulator::start(&names.exchange).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.cut();
    let health = wait_failing(&engine, "").await;
    assert_eq!(health["status"], "degraded", "{health}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    let refused = client()
        .post(engine.url("/api/readings"))
        .json(&reading("http-1", 0, DEPOT.0, DEPOT.1, 5.0))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);

    relay.restore();
    wait_ok(&engine).await;
    let rounds = simulator.stop().await;
    assert_all_stored_once(&engine, rounds).await;
    assert_nothing_dead_lettered(&engine, &publisher, &names).await;
    assert!(engine.metric("fleetwatch_store_failures_total").await >= 1.0);
}
