//! Read-side queries at scale, through the real engine's HTTP API.
//!
//! Seeds a data directory the way the engine would have written it, then starts the release
//! engine on it and times the queries from a client:
//!
//! 1. **Temperature buckets**: 10,000 devices with a day of minute buckets and 30 days of hour
//!    buckets each (what a day at one reading a second, and a month, leave in the read models),
//!    then for random devices a one-day per-minute query (1,440 buckets) and a one-month
//!    per-hour query (720 buckets).
//! 2. **Fleet statistics**: 100,000 known devices, each with readings and some with alarms in the
//!    last hours, then `GET /api/stats` and `GET /api/stats/top` (by readings and by distance,
//!    over 1 h and 24 h).
//!
//! The raw readings are not seeded (each device has one stored event): these queries never read
//! them, which is the point. `FW_QUERIES` sets the number of timed requests per query (default
//! 500).
//!
//! ```sh
//! cargo bench --bench read_models
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use common::Engine;
use fleetwatch::projections::fold::{Aggregate, Changes};
use fleetwatch::projections::{open_storage, StoredBucket};
use fleetwatch::store::{EventStore, SqliteStore, SqliteStoreOptions};
use fleetwatch_domain::{DeviceEvent, DeviceId, Location, Temperature};
use rand::Rng;

fn device(i: usize) -> String {
    format!("q-{i:06}")
}

/// One stored registration per device, so the engine knows it.
async fn seed_store(dir: &Path, devices: usize) -> Result<u64> {
    let store = SqliteStore::open(dir, SqliteStoreOptions::default())?;
    let mut appends = Vec::with_capacity(devices);
    for i in 0..devices {
        let event = DeviceEvent::DeviceRegistered {
            device_id: DeviceId::parse(device(i))?,
            at: Utc::now() - chrono::Duration::days(31),
            location: Location::new(52.37, 4.89)?,
            temperature: Temperature::new(5.0)?,
        };
        appends.push(store.append(
            &device(i),
            0,
            vec![fleetwatch::codec::encode_device_event(&event)],
            None,
        ));
        if appends.len() == 4096 {
            for a in appends.drain(..) {
                a.await?;
            }
        }
    }
    for a in appends {
        a.await?;
    }
    let head = store.head_position().await?;
    store.close();
    Ok(head)
}

fn aggregate(rng: &mut impl Rng, readings: u64, at: i64) -> Aggregate {
    let mut a = Aggregate::default();
    let location = Location::new(
        52.3 + rng.random::<f64>() * 0.1,
        4.8 + rng.random::<f64>() * 0.1,
    )
    .expect("a location");
    for _ in 0..readings.min(3) {
        a.add_reading(at, location, 2.0 + rng.random::<f64>() * 6.0);
    }
    a.count = readings;
    a.sum = readings as f64 * 5.0;
    a.distance_m = rng.random::<f64>() * 100.0;
    a.alarms = u64::from(rng.random::<f64>() < 0.05);
    a
}

/// Buckets as the read models keep them; `minutes` and `hours` back from now for each device.
fn seed_read_models(
    dir: &Path,
    devices: usize,
    minutes: i64,
    hours: i64,
    checkpoint: u64,
) -> Result<()> {
    let (mut storage, _) = open_storage(dir)?;
    let now = Utc::now().timestamp();
    let mut rng = rand::rng();
    let mut changes = Changes::default();
    for i in 0..devices {
        let rollups = changes.rollups.entry(device(i)).or_default();
        for m in 0..minutes {
            let start = (now - m * 60).div_euclid(60) * 60;
            let a = aggregate(&mut rng, 60, start * 1_000_000);
            rollups.rows.push(((StoredBucket::Minute, start), a));
        }
        for h in 0..hours {
            let start = (now - h * 3600).div_euclid(3600) * 3600;
            let a = aggregate(&mut rng, 3600, start * 1_000_000);
            rollups.rows.push(((StoredBucket::Hour, start), a));
        }
        changes
            .registered
            .insert(device(i), (now - 31 * 86_400) * 1_000_000);
        changes.events += 1;
        if changes.rows() > 200_000 {
            storage.commit(&changes, checkpoint)?;
            changes = Changes::default();
        }
    }
    storage.commit(&changes, checkpoint)?;
    storage.set_checkpoint(checkpoint)?;
    Ok(())
}

/// The engine on `data` with HTTP ingest only, once healthy.
async fn start_engine(data: &Path) -> Engine {
    Engine::options()
        .args(["--amqp-disabled"])
        .log_level("warn")
        .health_timeout(Duration::from_secs(60))
        .start(data)
        .await
}

/// Times `n` GETs of the paths `path(i)` yields; prints p50, p99 and max.
async fn time(
    name: &str,
    n: usize,
    mut path: impl FnMut(usize) -> String,
    base: &str,
) -> Result<()> {
    let http = reqwest::Client::new();
    let mut samples = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n + n / 10 {
        let url = format!("{base}{}", path(i));
        let started = Instant::now();
        let response = http.get(&url).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        let elapsed = started.elapsed();
        if !status.is_success() {
            bail!("{url}: {status}: {}", String::from_utf8_lossy(&body));
        }
        // The first tenth warms the caches.
        if i >= n / 10 {
            samples.push(elapsed);
            bytes = body.len();
        }
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    println!(
        "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {} B |",
        at(0.5),
        at(0.99),
        at(1.0),
        bytes
    );
    Ok(())
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("FW_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut rng = rand::rng();
    println!("| query | p50 | p99 | max | response |\n|---|---:|---:|---:|---:|");

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("buckets");
    let seeding = Instant::now();
    let head = seed_store(&data, 10_000).await?;
    seed_read_models(&data, 10_000, 1_440, 720, head)?;
    eprintln!(
        "seeded 10,000 devices x (1,440 minutes + 720 hours) in {:?}",
        seeding.elapsed()
    );
    {
        let engine = start_engine(&data).await;
        let now = Utc::now();
        let day = format!(
            "from={}&to={}",
            iso(now - chrono::Duration::days(1)),
            iso(now)
        );
        let month = format!(
            "from={}&to={}",
            iso(now - chrono::Duration::days(30)),
            iso(now)
        );
        let devices: Vec<usize> = (0..n * 2).map(|_| rng.random_range(0..10_000)).collect();
        time(
            "one device, one day per minute (1,440 buckets), 10,000 devices",
            n,
            |i| {
                format!(
                    "/api/devices/{}/temperature?bucket=minute&{day}",
                    device(devices[i % devices.len()])
                )
            },
            &engine.base,
        )
        .await?;
        time(
            "one device, one month per hour (720 buckets), 10,000 devices",
            n,
            |i| {
                format!(
                    "/api/devices/{}/temperature?bucket=hour&{month}",
                    device(devices[i % devices.len()])
                )
            },
            &engine.base,
        )
        .await?;
    }

    let data = dir.path().join("fleet");
    let seeding = Instant::now();
    let head = seed_store(&data, 100_000).await?;
    seed_read_models(&data, 100_000, 0, 24, head)?;
    eprintln!(
        "seeded 100,000 devices x 24 hours in {:?}",
        seeding.elapsed()
    );
    let engine = start_engine(&data).await;
    time(
        "GET /api/stats, 100,000 known devices",
        n,
        |_| "/api/stats".into(),
        &engine.base,
    )
    .await?;
    for (by, window) in [("readings", "1h"), ("distance", "1h"), ("alarms", "24h")] {
        time(
            &format!("GET /api/stats/top?by={by}&window={window}, 100,000 devices"),
            n / 5,
            |_| format!("/api/stats/top?by={by}&window={window}"),
            &engine.base,
        )
        .await?;
    }
    Ok(())
}
