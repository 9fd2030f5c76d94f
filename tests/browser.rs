//! End-to-end in real headless Chromium (Debian's `chromium`, driven by playwright-core): readings
//! posted to the engine make a marker appear and move, a zone exit shows in the alarm feed, a zone
//! drawn through the page is saved and comes back after a reload. The scenario is
//! `tests/browser/map.mjs`; it saves a screenshot to `target/browser/map.png`.
//!
//! With read and admin tokens set, the page asks for a token before showing anything, and shows
//! devices and live events once given one (`tests/browser/auth.mjs`, `target/browser/auth.png`).
//!
//! The API explorer (`/api/docs`) loads without a token and from the engine alone, and its
//! Authorize button's token is sent with "Try it out" (`tests/browser/explorer.mjs`,
//! `target/browser/explorer.png`).

mod common;

use std::process::Command;

use common::*;

/// One browser at a time: two Chromiums on a small machine make both scenarios' waits flaky.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_map_works_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    run_scenario(&engine, "map", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_asks_for_a_token_when_the_engine_needs_one() {
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
    const READ: &str = "browser-explorer-read-7a3b";
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--read-tokens", READ],
    )
    .await;
    run_scenario(&engine, "explorer", &[READ]).await;
}

/// Runs `tests/browser/<name>.mjs <base> <screenshot> <args...>` and asserts that it passed.
async fn run_scenario(engine: &Engine, name: &str, args: &[&str]) {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(root)
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test-deps.sh (npm ci in tests/browser)"
    );
    let _one_at_a_time = BROWSER.lock().await;
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
    assert!(
        output.status.success(),
        "browser scenario failed ({}):\n{stdout}\n{stderr}\nengine log:\n{}",
        output.status,
        engine.log_tail()
    );
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000));
}
