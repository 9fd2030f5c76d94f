//! End-to-end in real headless Chromium (Debian's `chromium`, driven by playwright-core): readings
//! posted to the engine make a marker appear and move, a zone exit shows in the alarm feed, a zone
//! drawn through the page is saved and comes back after a reload. The scenario is
//! `tests/browser/map.mjs`; it saves a screenshot to `target/browser/map.png`.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_map_works_in_a_real_browser() {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(root)
            .join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test-deps.sh (npm ci in tests/browser)"
    );
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    let screenshot = format!("{root}/target/browser/map.png");
    let base = engine.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{root}/tests/browser/map.mjs"))
            .arg(base)
            .arg(&screenshot)
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
    assert!(
        std::fs::metadata(format!("{root}/target/browser/map.png")).is_ok_and(|m| m.len() > 10_000)
    );
}
