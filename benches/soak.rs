//! Soak: the engine under a steady RabbitMQ load for a long time, watched for growth.
//!
//! Starts the release `fleetwatch` on a fresh data directory and `fleetwatch-sim` publishing
//! `FW_SOAK_RATE` readings/s (default 2,000) from `FW_SOAK_DEVICES` devices (default 2,000) for
//! `FW_SOAK_MINUTES` (default 30), with nothing scraping `/metrics` in between. Every
//! `FW_SOAK_SAMPLE_SECONDS` (default 30) it records the engine's resident memory, open file
//! descriptors, threads, the size of its data directory (database and write-ahead log) and the
//! readings processed so far, and prints them as a table (and as CSV to `FW_SOAK_CSV` if set).
//! At the end it checks that the queue drained and nothing was dead-lettered, and prints the
//! growth of memory, descriptors and data after the warm-up. `FW_SOAK_ENGINE_ARGS` adds engine
//! flags (space-separated), e.g. a short retention to watch the database level off.
//!
//! ```sh
//! cargo bench --bench soak                        # 30 min
//! FW_SOAK_ENGINE_ARGS="--reading-retention 5m" cargo bench --bench soak
//! FW_SOAK_MINUTES=2 cargo bench --bench soak      # a quick look
//! ```
//!
//! It needs RabbitMQ on 127.0.0.1:5672 and uses queue and exchange names of its own.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::Engine;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sample {
    at_s: u64,
    rss_kib: u64,
    fds: usize,
    threads: u64,
    data_bytes: u64,
    processed: u64,
}

/// The bytes of the files in `dir` (the database, its write-ahead log and shared memory).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn status_field(engine: &Engine, field: &str) -> Result<u64> {
    engine
        .proc_status(field)
        .with_context(|| format!("{field} in /proc/{}/status", engine.pid()))
}

async fn processed_now(engine: &Engine) -> u64 {
    engine.metric("fleetwatch_amqp_processed_total").await as u64
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[tokio::main]
async fn main() -> Result<()> {
    let minutes: u64 = env_or("FW_SOAK_MINUTES", 30);
    let rate: u64 = env_or("FW_SOAK_RATE", 2000);
    let devices: u64 = env_or("FW_SOAK_DEVICES", 2000);
    let every = Duration::from_secs(env_or("FW_SOAK_SAMPLE_SECONDS", 30));
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let names = format!("soak.{}", std::process::id());
    let extra = std::env::var("FW_SOAK_ENGINE_ARGS").unwrap_or_default();
    let mut engine = Engine::options()
        .args(["--amqp-exchange", &names, "--amqp-queue", &names])
        .args(extra.split_whitespace())
        .log_level("warn")
        .start(&data)
        .await;
    let base = engine.base.clone();
    let mut simulator = Command::new(env!("CARGO_BIN_EXE_fleetwatch-sim"))
        .args(["--devices", &devices.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--duration", &format!("{minutes}m")])
        .args(["--amqp-exchange", &names, "--http-url", &base])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("sim.log"))?)
        .spawn()
        .context("starting fleetwatch-sim")?;

    let pid = engine.pid();
    let mut samples = Vec::new();
    let run = Duration::from_secs(minutes * 60);
    println!("soak: {rate} readings/s from {devices} devices for {minutes} min over RabbitMQ");
    println!(
        "{:>7} {:>10} {:>5} {:>8} {:>10} {:>12}",
        "t (s)", "RSS (MiB)", "fds", "threads", "data (MiB)", "processed"
    );
    let begun = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let sample = Sample {
            at_s: begun.elapsed().as_secs(),
            rss_kib: status_field(&engine, "VmRSS:")?,
            fds: open_fds(pid)?,
            threads: status_field(&engine, "Threads:")?,
            data_bytes: dir_bytes(&data),
            processed: processed_now(&engine).await,
        };
        println!(
            "{:>7} {:>10.1} {:>5} {:>8} {:>10.1} {:>12}",
            sample.at_s,
            sample.rss_kib as f64 / 1024.0,
            sample.fds,
            sample.threads,
            sample.data_bytes as f64 / 1048576.0,
            sample.processed
        );
        samples.push(sample);
        if begun.elapsed() >= run {
            break;
        }
    }
    let sim_status = simulator.wait()?;
    // Let the engine drain what the simulator published last.
    let published = rate * minutes * 60;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut processed = 0;
    while Instant::now() < deadline {
        processed = processed_now(&engine).await;
        if processed >= published {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dead = engine.metric("fleetwatch_amqp_dead_lettered_total").await as u64;
    let data_bytes = dir_bytes(&data);
    engine.kill();
    for queue in [names.clone(), format!("{names}.dead")] {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_queue", &queue])
            .stdout(Stdio::null())
            .status();
    }
    if !sim_status.success() {
        bail!(
            "fleetwatch-sim failed ({sim_status}): {}",
            std::fs::read_to_string(dir.path().join("sim.log")).unwrap_or_default()
        );
    }

    if let Ok(path) = std::env::var("FW_SOAK_CSV") {
        let mut csv = std::fs::File::create(path)?;
        writeln!(csv, "t_s,rss_kib,fds,threads,data_bytes,processed")?;
        for s in &samples {
            writeln!(
                csv,
                "{},{},{},{},{},{}",
                s.at_s, s.rss_kib, s.fds, s.threads, s.data_bytes, s.processed
            )?;
        }
    }
    // After a warm-up of a sixth of the run (every device has an actor and the caches are full).
    let warm = samples.len() / 6;
    let after_warm = &samples[warm..];
    let (first, last) = (&after_warm[0], &after_warm[after_warm.len() - 1]);
    let max_rss = after_warm.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let (min_fds, max_fds) = after_warm
        .iter()
        .map(|s| s.fds)
        .fold((usize::MAX, 0), |(lo, hi), f| (lo.min(f), hi.max(f)));
    println!(
        "simulator: {sim_status}; processed {processed} of {published} published; dead-lettered {dead}"
    );
    println!(
        "after warm-up (t = {} s .. {} s): RSS {:.1} -> {:.1} MiB (max {:.1}), fds {}..{}, threads {} -> {}, data {:.1} -> {:.1} MiB",
        first.at_s,
        last.at_s,
        first.rss_kib as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        min_fds,
        max_fds,
        first.threads,
        last.threads,
        first.data_bytes as f64 / 1048576.0,
        last.data_bytes as f64 / 1048576.0,
    );
    println!(
        "data directory at the end: {:.0} MiB",
        data_bytes as f64 / 1048576.0
    );
    Ok(())
}
