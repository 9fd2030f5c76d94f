//! `fleetwatch-sim`: a fleet of simulated devices sending readings to fleetwatch.
//!
//! Each of `--devices` devices drives around `--center-lat`/`--center-lon` at 5–20 m/s with a
//! slowly changing heading and a cargo temperature drifting around 5 °C. The simulator sends their
//! readings round-robin at `--rate` readings per second in total, until `--duration` has passed
//! or `--count` readings were sent, whichever comes first, then prints a summary and exits.
//!
//! * `--target amqp` (default) publishes each reading as a persistent JSON message to the engine's
//!   exchange (`--amqp-exchange`, routing key = device id) with publisher confirms, keeping up to
//!   `--max-unconfirmed` confirms outstanding. The exchange is declared (durable topic, like the
//!   engine does), so publishing works before the engine first started; the engine's queue is
//!   left to the engine. Messages are `mandatory`: while no queue is bound (the engine never ran
//!   against this broker), the broker returns them and they count as failed, not as sent.
//! * `--target http` posts `--batch` readings per request to `<--http-url>/api/readings`, with up
//!   to `--concurrency` requests in flight; anything but `202 Accepted` is a failure.
//! * `--zone-demo` (default; `--no-zone-demo` to skip) first defines, over HTTP whatever the
//!   target, the zone `sim-depot` (a 5 km circle around the centre) and the temperature range
//!   `sim-cold-chain` (2..8 °C), both watching only the simulated devices. A `--rogue-fraction`
//!   of the devices leaves the zone and warms past 9 °C during the run, so alarms fire.
//! * `--admin-token` (`FLEETWATCH_ADMIN_TOKEN`) and `--ingest-token` (`FLEETWATCH_INGEST_TOKEN`)
//!   are sent as bearer tokens when the engine needs them: the admin token for the zone demo, the
//!   ingest token for `--target http`.
//! * `--seed` makes paths and temperatures reproducible; timestamps are the wall clock, strictly
//!   increasing per device.
//!
//! Every flag is also a `FLEETWATCH_SIM_*` environment variable (the tokens: see above); `RUST_LOG` sets the log filter
//! (default `info,lapin=off`: connection errors are reported once, by the simulator).
//! Progress is logged to stderr every 5 s and the summary printed to stdout, e.g.
//! `sent 6000 readings (6000 confirmed, 0 failed) in 60.0 s = 100.0/s`. Ctrl-C stops early,
//! waits for outstanding confirmations (a second Ctrl-C stops waiting) and prints the summary.
//!
//! Exit status: 0 when every reading was confirmed, 1 when some failed or stayed unconfirmed,
//! 2 when the simulator could not start (bad flags, broker or engine unreachable).
//!
//! ```text
//! fleetwatch-sim --devices 50 --rate 200 --duration 10s
//! fleetwatch-sim --target http --batch 100 --concurrency 8 --rate 5000 --count 100000
//! ```

#[path = "fleetwatch-sim/amqp.rs"]
mod amqp;
#[path = "fleetwatch-sim/cli.rs"]
mod cli;
#[path = "fleetwatch-sim/fleet.rs"]
mod fleet;
#[path = "fleetwatch-sim/http.rs"]
mod http;
#[path = "fleetwatch-sim/pacing.rs"]
mod pacing;
#[path = "fleetwatch-sim/publisher.rs"]
mod publisher;
#[path = "fleetwatch-sim/tally.rs"]
mod tally;
#[path = "fleetwatch-sim/zone_demo.rs"]
mod zone_demo;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use clap::Parser;
use tokio::time::{Instant, MissedTickBehavior};
use tracing_subscriber::EnvFilter;

use crate::cli::Args;
use crate::fleet::{Fleet, FleetSettings, GeoPoint};
use crate::pacing::{Pacer, TICK};
use crate::publisher::Publisher;
use crate::tally::Tally;

/// Connecting to the broker, or the engine answering before the run, gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last reading, outstanding confirmations are awaited at most this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Exit status when the simulator could not start.
const EXIT_CANNOT_START: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    match run(args).await {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("fleetwatch-sim: {e:#}");
            ExitCode::from(EXIT_CANNOT_START)
        }
    }
}

fn init_tracing() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Why sending stopped.
enum Stop {
    /// The duration passed or the count was reached.
    Done,
    Interrupted,
    /// The broker or engine went away; nothing more could be sent.
    Failed(anyhow::Error),
}

/// Sets up, sends, drains and reports; an error means the run could not start.
async fn run(args: Args) -> Result<ExitCode> {
    let tally = Arc::new(Tally::default());
    let mut fleet = Fleet::new(&fleet_settings(&args));
    let client = http::engine_client(CONNECT_TIMEOUT)?;
    if args.zone_demo() {
        define_demo_rules(&client, &args, &fleet).await;
    }
    let mut publisher = Publisher::connect(&args, client, CONNECT_TIMEOUT, tally.clone()).await?;
    tracing::info!(
        devices = args.devices,
        rogues = fleet.rogue_count(),
        rate = args.rate,
        duration = %humantime::format_duration(args.duration),
        count = ?args.count,
        target = ?args.target,
        "simulating"
    );

    let started = Instant::now();
    let progress = tokio::spawn(report_progress(tally.clone()));
    let pacer = Pacer::new(args.rate, args.reading_limit());
    let stop = tokio::select! {
        sent = send_readings(&mut fleet, &mut publisher, pacer, args.duration) => match sent {
            Ok(()) => Stop::Done,
            Err(e) => Stop::Failed(e),
        },
        () = interrupted() => Stop::Interrupted,
    };
    match &stop {
        Stop::Done => {}
        Stop::Interrupted => tracing::warn!("interrupted; waiting for outstanding confirmations"),
        Stop::Failed(e) => tracing::error!("stopped sending: {e:#}"),
    }
    drain(publisher).await;
    progress.abort();

    let counts = tally.counts();
    println!("{}", counts.summary(started.elapsed()));
    let success = counts.all_confirmed() && !matches!(stop, Stop::Failed(_));
    Ok(if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn fleet_settings(args: &Args) -> FleetSettings {
    let devices = args.devices as usize;
    FleetSettings {
        devices,
        device_prefix: args.device_prefix.clone(),
        centre: GeoPoint {
            lat: args.center_lat,
            lon: args.center_lon,
        },
        rogue_fraction: args.rogue_fraction,
        seed: args.seed,
        step_seconds: devices as f64 / args.rate,
        expected_steps: args.expected_readings().div_ceil(devices as u64).max(1),
    }
}

/// Best effort: without the engine the readings still go to the broker.
async fn define_demo_rules(client: &reqwest::Client, args: &Args, fleet: &Fleet) {
    let centre = GeoPoint {
        lat: args.center_lat,
        lon: args.center_lon,
    };
    let devices: Vec<&str> = fleet.device_ids().collect();
    let defined = zone_demo::define_rules(
        client,
        &args.http_url,
        args.admin_token.as_deref(),
        centre,
        &devices,
        CONNECT_TIMEOUT,
    )
    .await;
    match defined {
        Ok(()) => tracing::info!(
            zone = zone_demo::ZONE_ID,
            range = zone_demo::RANGE_ID,
            "defined the demo zone and temperature range"
        ),
        Err(e) => tracing::warn!("{e:#}; continuing without the demo rules"),
    }
}

/// Sends readings at the pacer's rate until the count or the duration is reached.
async fn send_readings(
    fleet: &mut Fleet,
    publisher: &mut Publisher,
    pacer: Pacer,
    duration: Duration,
) -> Result<()> {
    let started = Instant::now();
    // A publisher that cannot keep up still gets the last tick's readings out, then stops.
    let hard_stop = duration + TICK;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = 0;
    loop {
        ticker.tick().await;
        let due = pacer.due_by(started.elapsed().min(duration));
        while sent < due && started.elapsed() < hard_stop {
            publisher.publish(fleet.next_reading(Utc::now())).await?;
            sent += 1;
        }
        publisher.collect_completed();
        if sent >= pacer.limit() || started.elapsed() >= duration {
            return Ok(());
        }
    }
}

/// Waits for outstanding confirmations, unless that takes too long or Ctrl-C is pressed again.
async fn drain(publisher: Publisher) {
    tokio::select! {
        () = publisher.finish() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("gave up waiting for confirmations after {}", humantime::format_duration(DRAIN_TIMEOUT));
        }
        () = interrupted() => tracing::warn!("interrupted again; not waiting for confirmations"),
    }
}

/// Resolves on Ctrl-C; never, if the handler cannot be installed.
async fn interrupted() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}

/// Logs the counts and the rate over the last interval, every [`PROGRESS_INTERVAL`].
async fn report_progress(tally: Arc<Tally>) {
    let mut ticker =
        tokio::time::interval_at(Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    let mut previous = tally.counts();
    loop {
        ticker.tick().await;
        let counts = tally.counts();
        let rate = (counts.sent - previous.sent) as f64 / PROGRESS_INTERVAL.as_secs_f64();
        tracing::info!(
            sent = counts.sent,
            confirmed = counts.confirmed,
            failed = counts.failed,
            "{rate:.1} readings/s"
        );
        previous = counts;
    }
}
