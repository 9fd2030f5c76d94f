//! Durable append throughput of `SqliteStore`: how group commit turns concurrency into throughput.
//!
//! Every append resolves only once it is fsynced (WAL, `synchronous=FULL`), so one appender
//! waiting for each append gets one fsync per append. The store's single writer commits whatever
//! has queued while the previous commit was syncing, so N appenders share each fsync. Cases:
//! * `concurrent`: N streams (1, 16, 256, 4096), each issuing its next append only once the
//!   previous one resolved, like a device actor with one reading in flight;
//! * `pipelined`: one stream issuing appends without awaiting them, as the actor does, with at
//!   most `PIPELINE_WINDOW` in flight (the engine bounds in-flight readings the same way).
//!
//! Each append is what a typical reading appends: one `ReadingRecorded` of a device that moved and
//! warmed (encoded once up front, so encoding is not measured). Throughput is
//! sampled over `ROUNDS` windows of `ROUND` after a warm-up, and the median window is reported.
//! The mean append latency follows from Little's law: appends in flight / appends per second.
//!
//! Run with `cargo bench --bench store`. Without `--bench` (e.g. `cargo test --benches`) every
//! case runs once, briefly, as a smoke test.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use fleetwatch::store::{EventStore, NewEvent, SqliteStore, SqliteStoreOptions};
use fleetwatch_domain::{DeviceEvent, DeviceId, Location, Temperature};

const APPENDERS: [usize; 4] = [1, 16, 256, 4096];
const PIPELINE_WINDOW: usize = 1024;
const WARM_UP: Duration = Duration::from_secs(1);
const ROUND: Duration = Duration::from_secs(1);
const ROUNDS: usize = 5;

/// How long to run a case: the full measurement, or a smoke test.
struct Plan {
    warm_up: Duration,
    round: Duration,
    rounds: usize,
}

/// The events a moving device with a changing temperature appends for one reading.
fn typical_batch() -> Vec<NewEvent> {
    let event = DeviceEvent::ReadingRecorded {
        device_id: DeviceId::parse("truck-0042").unwrap(),
        at: Utc.with_ymd_and_hms(2026, 11, 23, 18, 0, 0).unwrap(),
        location: Location::new(52.370_716, 4.895_168).unwrap(),
        temperature: Temperature::new(5.1).unwrap(),
        rules_version: 12,
        moved: true,
        temperature_changed: true,
        late: false,
    };
    vec![fleetwatch::codec::encode_device_event(&event)]
}

/// One stream appending `batch` over and over, each append awaited before the next.
async fn one_in_flight(
    store: Arc<SqliteStore>,
    stream: String,
    batch: Vec<NewEvent>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut version = 0;
    while !stop.load(Relaxed) {
        version = store
            .append(&stream, version, batch.clone(), None)
            .await
            .unwrap()
            .version;
        done.fetch_add(1, Relaxed);
    }
}

/// One stream appending `batch` without awaiting, up to `PIPELINE_WINDOW` appends in flight.
async fn pipelined(
    store: Arc<SqliteStore>,
    batch: Vec<NewEvent>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut in_flight = VecDeque::with_capacity(PIPELINE_WINDOW);
    let mut version = 0;
    while !stop.load(Relaxed) {
        // Queued in call order, so the expected versions hold without waiting.
        in_flight.push_back(store.append("pipelined", version, batch.clone(), None));
        version += batch.len() as u64;
        if in_flight.len() == PIPELINE_WINDOW {
            in_flight.pop_front().unwrap().await.unwrap();
            done.fetch_add(1, Relaxed);
        }
    }
    for append in in_flight {
        append.await.unwrap();
    }
}

/// Runs `spawn`'s appenders against a fresh store and returns the median appends per second.
async fn measure<F>(plan: &Plan, spawn: F) -> f64
where
    F: FnOnce(
        Arc<SqliteStore>,
        Arc<AtomicU64>,
        Arc<AtomicBool>,
    ) -> Vec<tokio::task::JoinHandle<()>>,
{
    // Under the target dir rather than /tmp, which may be a tmpfs where fsync costs nothing.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap());
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let appenders = spawn(store.clone(), done.clone(), stop.clone());

    tokio::time::sleep(plan.warm_up).await;
    let mut rates = Vec::with_capacity(plan.rounds);
    let (mut since, mut before) = (Instant::now(), done.load(Relaxed));
    for _ in 0..plan.rounds {
        tokio::time::sleep(plan.round).await;
        let (now, count) = (Instant::now(), done.load(Relaxed));
        rates.push((count - before) as f64 / (now - since).as_secs_f64());
        (since, before) = (now, count);
    }
    stop.store(true, Relaxed);
    for appender in appenders {
        appender.await.unwrap();
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn report(case: &str, in_flight: usize, events_per_append: usize, appends_per_s: f64) {
    println!(
        "{case:<12} {in_flight:>9} {appends_per_s:>12.0} {:>12.0} {:>12.2}",
        appends_per_s * events_per_append as f64,
        in_flight as f64 / appends_per_s * 1e3,
    );
}

fn main() {
    let plan = if std::env::args().any(|arg| arg == "--bench") {
        Plan {
            warm_up: WARM_UP,
            round: ROUND,
            rounds: ROUNDS,
        }
    } else {
        Plan {
            warm_up: Duration::ZERO,
            round: Duration::from_millis(50),
            rounds: 1,
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let batch = typical_batch();
    let sizes: Vec<usize> = batch.iter().map(|e| e.payload.len()).collect();
    println!("SqliteStore durable appends, {sizes:?}-byte events per append, median of {} x {:?} windows", plan.rounds, plan.round);
    println!(
        "{:<12} {:>9} {:>12} {:>12} {:>12}",
        "case", "in flight", "appends/s", "events/s", "latency ms"
    );

    for appenders in APPENDERS {
        let rate = runtime.block_on(measure(&plan, |store, done, stop| {
            (0..appenders)
                .map(|i| {
                    let appender = one_in_flight(
                        store.clone(),
                        format!("device-{i:05}"),
                        batch.clone(),
                        done.clone(),
                        stop.clone(),
                    );
                    tokio::spawn(appender)
                })
                .collect()
        }));
        report("concurrent", appenders, batch.len(), rate);
    }

    let rate = runtime.block_on(measure(&plan, |store, done, stop| {
        vec![tokio::spawn(pipelined(store, batch.clone(), done, stop))]
    }));
    report("pipelined", PIPELINE_WINDOW, batch.len(), rate);
}
