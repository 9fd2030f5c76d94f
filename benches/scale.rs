//! Scale and recovery of the real engine binary (run with `cargo bench --bench scale`):
//!
//! 1. **Active devices**: resident memory per active device actor, with 100,000 devices active.
//! 2. **Passivation**: 1,000,000 known devices fed through an engine with a short idle timeout;
//!    the number of live actors and the resident memory stay bounded.
//! 3. **Recovery**: a store with 100,000 devices and 11,100,000 events (written through the
//!    store API with snapshots every 100 events, as the engine writes them; ten devices have
//!    100,000 events each); time until a restarted engine serves and ingests again, and time to
//!    the first event of cold devices, interleaved with new ones once the read models are current
//!    — with a snapshot it does not depend on the length of the device's history.
//!
//! 4. **Offline detection** (`offline`): 1,000,000 known devices, none active, each with a
//!    deadline in the store (their offline periods spread over 5 minutes): the engine's resident
//!    memory with the deadline index against the same store without deadlines, and, as every
//!    device goes offline, the time from each device's deadline to its stored `DeviceWentOffline`.
//!
//! Sizes can be reduced for a quick run: `FW_SCALE=0.1 cargo bench --bench scale`; phases can be
//! picked with `FW_PHASES=recovery` (default `active,passivation,recovery`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::Engine;
use fleetwatch::store::{EventStore, NewEvent, SqliteStore, SqliteStoreOptions, Wake};
use fleetwatch_domain::{Decision, Device, DeviceId, Reading, Rules, Thresholds};
use serde_json::{json, Value};

fn scale() -> f64 {
    std::env::var("FW_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64) * scale()).max(1.0) as usize
}

/// The engine on `data` with HTTP ingest only; waits until it is healthy (at most 300 s: a large
/// store takes a while) and says how long that took in `Engine::healthy_after`.
async fn start_engine(data: &Path, extra: &[&str]) -> Engine {
    Engine::options()
        .args(["--amqp-disabled"])
        .args(extra.iter().copied())
        .log_level("warn")
        .health_timeout(Duration::from_secs(300))
        .start(data)
        .await
}

async fn active_now(engine: &Engine) -> u64 {
    engine.get("/api/health").await["devices_active"]
        .as_u64()
        .unwrap_or(0)
}

fn reading_json(device: &str, secs: i64, i: usize) -> Value {
    let t = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap() + chrono::Duration::seconds(secs);
    json!({
        "device_id": device,
        "timestamp": t.to_rfc3339(),
        "lat": 52.0 + (i % 1000) as f64 * 1e-3,
        "lon": 4.0 + (i / 1000 % 1000) as f64 * 1e-3,
        "temperature": 5.0,
    })
}

/// Posts one reading for each of `devices` devices (ids `prefix-N`), 1,000 per request, 8 requests
/// in flight. Returns readings per second.
async fn post_devices(
    http: &reqwest::Client,
    base: &str,
    prefix: &str,
    devices: usize,
    secs: i64,
) -> f64 {
    use futures_util::StreamExt;
    let started = Instant::now();
    let batches = (0..devices).step_by(1000).map(|start| {
        let batch: Vec<Value> = (start..(start + 1000).min(devices))
            .map(|i| reading_json(&format!("{prefix}-{i}"), secs, i))
            .collect();
        let request = http
            .post(format!("{base}/api/readings"))
            .json(&batch)
            .send();
        async move {
            let r = request.await.expect("POST readings");
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        }
    });
    futures_util::stream::iter(batches)
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    devices as f64 / started.elapsed().as_secs_f64()
}

async fn active_devices(http: &reqwest::Client) {
    let n = scaled(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = start_engine(&dir.path().join("data"), &["--idle-timeout", "1h"]).await;
    let base_rss = engine.rss_mib();
    let rate = post_devices(http, &engine.base, "active", n, 0).await;
    let active = active_now(&engine).await;
    let rss = engine.rss_mib();
    println!("| active device actors | {active} |");
    println!("| resident memory, idle engine | {base_rss:.1} MiB |");
    println!("| resident memory with {n} active devices | {rss:.1} MiB |");
    println!(
        "| resident memory per active device | {:.2} KiB |",
        (rss - base_rss) * 1024.0 / n as f64
    );
    println!("| first readings of {n} new devices, HTTP batches of 1,000 | {rate:.0} readings/s |");
}

async fn passivation(http: &reqwest::Client) {
    let n = scaled(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = start_engine(&dir.path().join("data"), &["--idle-timeout", "5s"]).await;
    let mut peak_active = 0;
    let mut peak_rss: f64 = 0.0;
    let started = Instant::now();
    for chunk in (0..n).step_by(100_000) {
        let count = 100_000.min(n - chunk);
        post_devices(http, &engine.base, &format!("known-{chunk}"), count, 0).await;
        peak_active = peak_active.max(active_now(&engine).await);
        peak_rss = peak_rss.max(engine.rss_mib());
    }
    let load_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = active_now(&engine).await;
    println!(
        "| known devices written | {n} in {load_secs:.0} s ({:.0} readings/s) |",
        n as f64 / load_secs
    );
    println!("| most live actors during the load (idle timeout 5 s) | {peak_active} |");
    println!("| peak resident memory during the load | {peak_rss:.1} MiB |");
    println!("| live actors 12 s after the load | {after} |");
    println!(
        "| resident memory 12 s after the load | {:.1} MiB |",
        engine.rss_mib()
    );
}

/// Writes one device's history of at least `events_wanted` events through the store, the way its
/// actor would: appends issued back to back, a snapshot every 100 events if `snapshots`.
async fn write_device(
    store: Arc<SqliteStore>,
    rules: Arc<Rules>,
    id: String,
    events_wanted: usize,
    snapshots: bool,
) -> usize {
    let mut device = Device::new(DeviceId::parse(id.as_str()).expect("id"));
    let mut appends = Vec::new();
    let mut snapshot_saves = Vec::new();
    let mut since_snapshot = 0;
    // One reading a second, ending about now: a history inside the retention period, so the
    // engine under test has nothing to prune.
    let start = Utc::now().timestamp() - events_wanted as i64 - 60;
    let mut secs = 0i64;
    while (device.version() as usize) < events_wanted {
        secs += 1;
        let at = Utc.timestamp_opt(start + secs, 0).unwrap();
        let reading =
            // A zigzag of ~111 m steps that stays near 52° N however long the history.
            Reading::new(id.as_str(), at, 52.0 + ((secs % 2000) - 1000).abs() as f64 * 1e-3, 4.0, 5.0)
                .expect("reading");
        let Decision::Events(events) = device.handle(&reading, &rules) else {
            continue;
        };
        let expected = device.version();
        let new: Vec<NewEvent> = events
            .iter()
            .map(fleetwatch::codec::encode_device_event)
            .collect();
        events.iter().for_each(|e| device.apply(e));
        appends.push(store.append(&id, expected, new, None));
        since_snapshot += events.len();
        if snapshots && since_snapshot >= 100 {
            since_snapshot = 0;
            snapshot_saves
                .push(store.save_snapshot(fleetwatch::codec::encode_device_snapshot(&device)));
        }
    }
    for append in appends {
        append.await.expect("append");
    }
    for save in snapshot_saves {
        save.await.expect("snapshot");
    }
    device.version() as usize
}

/// How many devices with a long history (with snapshots) the recovery phase seeds and times cold:
/// one request per device is one sample of a first reading, so several give a distribution.
const LONG_DEVICES: usize = 10;

/// Seeds a store with `devices` devices of `per_device` events each, plus `LONG_DEVICES` devices
/// `long-{k}` (with snapshots) and one `long-nosnap` (without) of `long_events` events each.
/// Returns the store's head position.
async fn seed_store(dir: &Path, devices: usize, per_device: usize, long_events: usize) -> u64 {
    use futures_util::StreamExt;
    let store =
        Arc::new(SqliteStore::open(dir, SqliteStoreOptions::default()).expect("open store"));
    let rules = Arc::new(Rules::new(Thresholds::default()));
    let started = Instant::now();
    let short = (0..devices).map(|d| (format!("dev-{d}"), per_device, true));
    let long = (0..LONG_DEVICES).map(|k| (format!("long-{k}"), long_events, true));
    let nosnap = std::iter::once(("long-nosnap".to_string(), long_events, false));
    let jobs = short
        .chain(long)
        .chain(nosnap)
        .map(|(id, events, snapshots)| {
            write_device(store.clone(), rules.clone(), id, events, snapshots)
        });
    let written: Vec<usize> = futures_util::stream::iter(jobs)
        .buffer_unordered(512)
        .collect()
        .await;
    let total: usize = written.iter().sum();
    let head = store.head_position().await.expect("head position");
    store.close();
    println!(
        "| events written to seed the store | {total} at {:.0} events/s (store API, snapshots every 100) |",
        total as f64 / started.elapsed().as_secs_f64()
    );
    head
}

async fn time_first_event(http: &reqwest::Client, base: &str, device: &str) -> f64 {
    let body = json!([{"device_id": device, "timestamp": Utc::now().to_rfc3339(), "lat": 52.5, "lon": 4.5, "temperature": 6.0}]);
    let started = Instant::now();
    let r = http
        .post(format!("{base}/api/readings"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 202);
    started.elapsed().as_secs_f64() * 1000.0
}

async fn recovery(http: &reqwest::Client) {
    let devices = scaled(100_000);
    let per_device = 100;
    let long_events = scaled(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let head = seed_store(&data, devices, per_device, long_events).await;
    let size: u64 = std::fs::read_dir(&data)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "| store size on disk | {:.0} MiB |",
        size as f64 / 1048576.0
    );

    let mut engine = start_engine(&data, &[]).await;
    println!(
        "| restart until `/api/health` answers | {:.0} ms |",
        engine.healthy_after.as_secs_f64() * 1000.0
    );
    let first = time_first_event(http, &engine.base, "brand-new-device").await;
    println!("| then first reading of a new device durable (HTTP 202) | {first:.1} ms |");
    let cold = time_first_event(http, &engine.base, "dev-42").await;
    println!("| cold device with {per_device} events (snapshot + tail) → 202 | {cold:.1} ms |");
    let long = time_first_event(http, &engine.base, "long-0").await;
    println!("| cold device with {long_events} events, with snapshots → 202 | {long:.1} ms |");
    let nosnap = time_first_event(http, &engine.base, "long-nosnap").await;
    println!("| cold device with {long_events} events, no snapshot (full replay) → 202 | {nosnap:.1} ms |");
    // The seeded store has no read models: the engine builds them from the whole history in the
    // background, as after an upgrade to a version that has them.
    let caught_up = read_models_caught_up(http, &engine.base, head).await;
    println!(
        "| read models built from {head} events in the background | {caught_up:.1} s ({:.0} events/s) |",
        head as f64 / caught_up
    );

    // SIGKILL and start again, on the read models it kept.
    let serve = engine.restart().await;
    println!(
        "| restart with current read models until `/api/health` answers | {:.0} ms |",
        serve.as_secs_f64() * 1000.0
    );
    cold_first_readings(http, &engine.base, per_device, long_events).await;
}

/// With nothing else running (the read models current), first readings interleaved over three
/// kinds of device — new, cold with a short history, cold with a long one — so that the commit's
/// cost on this disk at this moment is the same for all three, and what a cold device adds on top
/// of it is the restore.
async fn cold_first_readings(
    http: &reqwest::Client,
    base: &str,
    per_device: usize,
    long_events: usize,
) {
    let mut new = Vec::new();
    let mut short = Vec::new();
    let mut long = Vec::new();
    for k in 0..LONG_DEVICES {
        new.push(time_first_event(http, base, &format!("new-after-restart-{k}")).await);
        short.push(time_first_event(http, base, &format!("dev-{}", 1000 + k)).await);
        long.push(time_first_event(http, base, &format!("long-{k}")).await);
    }
    for (kind, samples) in [
        ("a new device (no history)".to_string(), &mut new),
        (
            format!("a cold device with {per_device} events"),
            &mut short,
        ),
        (
            format!("a cold device with {long_events} events, with snapshots"),
            &mut long,
        ),
    ] {
        samples.sort_by(f64::total_cmp);
        println!(
            "| after the restart, first reading of {kind} → 202, {} devices | median {:.1} ms, min {:.1}, max {:.1} |",
            samples.len(),
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1]
        );
    }
}

/// The offline phase (see the module docs).
async fn offline(http: &reqwest::Client) {
    use fleetwatch::codec::{decode_device_event, encode_device_event};
    use fleetwatch_domain::{DeviceEvent, Location, Temperature};
    use futures_util::StreamExt;
    let devices = scaled(1_000_000);
    // Each device's own period: 6 to 11 minutes, so deadlines start after the seeding and the
    // engine's start, and spread over 5 minutes (about 3,300 devices a second at full size).
    const FIRST_S: usize = 360;
    const SPREAD_S: usize = 300;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let store =
        Arc::new(SqliteStore::open(&data, SqliteStoreOptions::default()).expect("open store"));
    let started = Instant::now();
    let jobs = (0..devices).map(|i| {
        let store = store.clone();
        async move {
            let id = DeviceId::parse(format!("quiet-{i}")).expect("device id");
            let now = Utc::now();
            let location = Location::new(52.0 + (i % 1000) as f64 * 1e-3, 4.5).expect("location");
            let temperature = Temperature::new(5.0).expect("temperature");
            let period = (FIRST_S + i * SPREAD_S / devices.max(1)) as u64;
            let events = [
                DeviceEvent::DeviceRegistered {
                    device_id: id.clone(),
                    at: now,
                    location,
                    temperature,
                },
                DeviceEvent::ReadingRecorded {
                    device_id: id.clone(),
                    at: now,
                    location,
                    temperature,
                    rules_version: 0,
                    moved: false,
                    temperature_changed: false,
                    late: false,
                },
                DeviceEvent::OfflineAfterSet {
                    device_id: id.clone(),
                    at: now,
                    offline_after_s: Some(period),
                },
            ];
            let wake = now + chrono::Duration::seconds(period as i64);
            store
                .append_waking(
                    id.as_str(),
                    0,
                    events.iter().map(encode_device_event).collect(),
                    None,
                    Wake::At(Some(wake)),
                )
                .await
                .expect("seed append");
        }
    });
    futures_util::stream::iter(jobs)
        .buffer_unordered(1024)
        .collect::<Vec<()>>()
        .await;
    store.close();
    drop(store);
    println!(
        "| devices seeded, each with a deadline | {devices} in {:.0} s |",
        started.elapsed().as_secs_f64()
    );

    // The same store without deadlines: what the index costs is the difference.
    let copy = dir.path().join("no-deadlines");
    std::fs::create_dir_all(&copy).expect("copy dir");
    for file in ["events.sqlite3", "events.sqlite3-wal"] {
        let _ = std::fs::copy(data.join(file), copy.join(file));
    }
    {
        let conn = rusqlite::Connection::open(copy.join("events.sqlite3")).expect("copy store");
        conn.execute("UPDATE streams SET wake_at = NULL", [])
            .expect("clear deadlines");
    }
    let without = start_engine(&copy, &[]).await;
    let start_without = without.healthy_after.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_without = without.rss_mib();
    drop(without);

    let engine = start_engine(&data, &[]).await;
    let start_with = engine.healthy_after.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_with = engine.rss_mib();
    println!(
        "| start until `/api/health` answers, without / with {devices} deadlines | {:.0} ms / {:.0} ms |",
        start_without * 1000.0,
        start_with * 1000.0
    );
    println!(
        "| resident memory, without / with the deadline index | {rss_without:.0} MiB / {rss_with:.0} MiB ({:.0} bytes a device) |",
        (rss_with - rss_without) * 1048576.0 / devices as f64
    );
    let deadline_end = started + Duration::from_secs((FIRST_S + SPREAD_S + 30) as u64);
    let mut peak_rss = rss_with;
    loop {
        let metrics = http
            .get(format!("{}/metrics", engine.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        let filed = metrics
            .lines()
            .find_map(|l| l.strip_prefix("fleetwatch_deadlines "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        peak_rss = peak_rss.max(engine.rss_mib());
        if filed == 0.0 || Instant::now() > deadline_end + Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let active = engine.get("/api/health").await["devices_active"].clone();
    drop(engine);
    println!("| peak resident memory while they went offline | {peak_rss:.0} MiB (device actors active at the end: {active}) |");

    // Every DeviceWentOffline: its deadline (`at`) against when the store committed it.
    let store = SqliteStore::open(&data, SqliteStoreOptions::default()).expect("reopen store");
    let mut lags: Vec<f64> = Vec::with_capacity(devices);
    let mut after = 0;
    loop {
        let page = store.read_all(after, 10_000).await.expect("read back");
        let Some(last) = page.last() else { break };
        after = last.position;
        for recorded in &page {
            if recorded.event_type != "DeviceWentOffline" {
                continue;
            }
            if let Ok(DeviceEvent::DeviceWentOffline { at, .. }) = decode_device_event(recorded) {
                lags.push((recorded.recorded_at - at).num_microseconds().unwrap_or(0) as f64 / 1e3);
            }
        }
    }
    store.close();
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("| devices gone offline | {} of {devices} |", lags.len());
    println!(
        "| deadline → `DeviceWentOffline` committed, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Seconds until `/api/stats` says the read models have folded every event up to `head`.
async fn read_models_caught_up(http: &reqwest::Client, base: &str, head: u64) -> f64 {
    let started = Instant::now();
    loop {
        let stats: Value = http
            .get(format!("{base}/api/stats"))
            .send()
            .await
            .expect("GET /api/stats")
            .json()
            .await
            .expect("stats JSON");
        let position = stats["read_models_position"].as_u64().unwrap_or(0);
        if position >= head {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "read models stuck at {position} of {head}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        println!(
            "scale factor {} (FW_SCALE), {} cores",
            scale(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("\n| measure | value |\n|---|---|");
        let phases =
            std::env::var("FW_PHASES").unwrap_or_else(|_| "active,passivation,recovery".into());
        // `offline` runs only when asked for (FW_PHASES=offline): it takes about 15 minutes.
        for phase in phases.split(',') {
            match phase.trim() {
                "active" => active_devices(&http).await,
                "passivation" => passivation(&http).await,
                "recovery" => recovery(&http).await,
                "offline" => offline(&http).await,
                other => panic!(
                    "unknown phase {other:?} in FW_PHASES (active, passivation, recovery, offline)"
                ),
            }
        }
    });
}
