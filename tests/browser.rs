//! End-to-end in real headless Chromium (Debian's `chromium`, driven by playwright-core): readings
//! posted to the engine make a marker appear and move, a zone exit shows in the alarm feed, a zone
//! drawn through the page is saved and comes back after a reload. A device's panel charts the
//! temperature buckets of readings the scenario sent (count, mean, min, max per bucket, checked
//! against the readings and on the chart's canvas) and draws their track on the map; its range and
//! bucket selectors, the API's errors shown in it, closing it, and the fleet panel. The scenario is
//! `tests/browser/map.mjs`; it saves a screenshot to `target/browser/map.png`.
//!
//! With 10,000 devices whose readings keep arriving (`fleetwatch-sim` over HTTP, 3,000 readings/s
//! offered: about what this debug engine, sharing two cores with the simulator and Chromium, can
//! take, so that what the page is measured against is the engine's live state rather than a
//! growing backlog; the release figures at 10,000/s are in docs/benchmarks.md), the page knows
//! every device, draws them all on one canvas, keeps up with the engine and stays responsive: frames per second, long tasks, a zoom click, a click on a
//! device opening its panel, whose chart and track for a past range are what its readings give
//! (`tests/browser/scale.mjs`, `target/browser/scale.png`; it prints the figures, and
//! docs/benchmarks.md quotes them with a release engine).
//!
//! With read and admin tokens set, the page asks for a token before showing anything, and shows
//! devices and live events once given one; acknowledging an alarm with the read token asks for a
//! better one and, refused, shows the API's 403 at the alarm; with the admin token it works
//! (`tests/browser/auth.mjs`, `target/browser/auth.png`).
//!
//! Alarms (`tests/browser/alarms.mjs`, `target/browser/alarms.png`): alarms of every severity
//! opened by readings dated now, before the page opens, are listed on load exactly as
//! `GET /api/alarms?state=active` has them, newest first, in their severity colours; a device's
//! popup shows each of its alarms; the Acknowledge button turns one acknowledged (and the API
//! agrees), acknowledging it again shows the API's 409; a reading that ends the condition makes
//! it leave the list and a new one appears live; the header's counters equal the list, the fleet
//! panel and `GET /api/stats` throughout.
//!
//! The API explorer (`/api/docs`) loads without a token and from the engine alone, and its
//! Authorize button's token is sent with "Try it out" (`tests/browser/explorer.mjs`,
//! `target/browser/explorer.png`).

mod common;

use std::process::{Child, Command, Stdio};

use common::*;

/// One browser at a time: two Chromiums on a small machine make both scenarios' waits flaky (and
/// the scale scenario's simulator must not load the machine under another scenario). Each test
/// holds it from before its engine starts.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The fleet of the scale scenario, and the readings per second offered to the engine for it
/// (see the module docs: what a debug engine on two shared cores keeps up with).
const SCALE_DEVICES: u32 = 10_000;
const SCALE_RATE: u32 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_map_works_in_a_real_browser() {
    let _one_at_a_time = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    run_scenario(&engine, "map", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_stays_responsive_with_10000_moving_devices() {
    let _one_at_a_time = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    let sim_log = dir.path().join("sim.log");
    let _sim = Simulator::start(&engine, &sim_log);
    let devices = SCALE_DEVICES.to_string();
    let rate = SCALE_RATE.to_string();
    run_scenario_with_log(&engine, "scale", &[&devices, &rate], Some(&sim_log)).await;
}

/// `fleetwatch-sim` posting readings of the scale fleet to the engine over HTTP until dropped.
struct Simulator(Child);

impl Simulator {
    fn start(engine: &Engine, log: &std::path::Path) -> Simulator {
        let log = std::fs::File::create(log).expect("simulator log");
        let child = Command::new(env!("CARGO_BIN_EXE_fleetwatch-sim"))
            .args(["--target", "http", "--http-url", &engine.base])
            .args(["--devices", &SCALE_DEVICES.to_string()])
            .args(["--rate", &SCALE_RATE.to_string()])
            // Longer than the scenario: it is stopped when the test ends.
            .args(["--duration", "10m", "--batch", "200", "--concurrency", "4"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fleetwatch-sim");
        Simulator(child)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_lists_open_alarms_on_load_and_acknowledges_one() {
    let _one_at_a_time = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(&dir.path().join("data"), &["--amqp-disabled"]).await;
    run_scenario(&engine, "alarms", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_asks_for_a_token_when_the_engine_needs_one() {
    let _one_at_a_time = BROWSER.lock().await;
    const READ: &str = "browser-read-token-4f1c";
    const ADMIN: &str = "browser-admin-token-9d2e";
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--read-tokens",
            READ,
            "--admin-tokens",
            ADMIN,
        ],
    )
    .await;
    run_scenario(&engine, "auth", &[READ, ADMIN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_explorer_loads_from_the_engine_alone_and_sends_a_token() {
    let _one_at_a_time = BROWSER.lock().await;
    const READ: &str = "browser-explorer-read-7a3b";
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--read-tokens", READ],
    )
    .await;
    run_scenario(&engine, "explorer", &[READ]).await;
}

/// Runs `tests/browser/<name>.mjs <base> <screenshot> <args...>` and asserts that it passed. The
/// caller holds [`BROWSER`]. Fails, never skips, without node, playwright-core or Chromium.
async fn run_scenario(engine: &Engine, name: &str, args: &[&str]) {
    run_scenario_with_log(engine, name, args, None).await
}

/// [`run_scenario`], with the tail of another process's log in the failure message.
async fn run_scenario_with_log(
    engine: &Engine,
    name: &str,
    args: &[&str],
    log: Option<&std::path::Path>,
) {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(root)
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test-deps.sh (npm ci in tests/browser)"
    );
    let chromium =
        std::env::var("FLEETWATCH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "Chromium is not installed at {chromium} (set FLEETWATCH_CHROMIUM, or run \
         scripts/test-deps.sh: apt-get install chromium)"
    );
    let screenshot = format!("{root}/target/browser/{name}.png");
    let _ = std::fs::remove_file(&screenshot);
    let base = engine.base.clone();
    let script = format!("{root}/tests/browser/{name}.mjs");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shot = screenshot.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(base)
            .arg(&shot)
            .args(&args)
            .output()
            .expect("node must be installed (scripts/test-deps.sh)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown with --nocapture: the scale scenario's figures are there.
    println!("{stdout}");
    let other_log = log
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let tail = text.get(text.len().saturating_sub(2000)..).unwrap_or(&text);
            format!("\n{} (tail):\n{tail}", path.display())
        })
        .unwrap_or_default();
    assert!(
        output.status.success(),
        "browser scenario failed ({}):\n{stdout}\n{stderr}\nengine log:\n{}{other_log}",
        output.status,
        engine.log_tail()
    );
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000));
}
