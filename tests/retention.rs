//! Retention: raw readings older than `--reading-retention` are removed once a snapshot covers
//! them, and nothing else; a device restored afterwards equals one that never lost a reading; a
//! SIGKILL in the middle of a pass loses and breaks nothing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::amqp::eventually;
use common::*;
use serde_json::{json, Value};

/// Every stored event of a stopped engine's store: (stream, version) → type.
fn stored_events(data: &Path) -> BTreeMap<(String, u64), String> {
    let db = rusqlite::Connection::open(data.join("events.sqlite3")).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT s.name, e.version, t.name FROM events e
             JOIN streams s ON s.id = e.stream JOIN event_types t ON t.id = e.type",
        )
        .unwrap();
    stmt.query_map([], |row| {
        Ok(((row.get(0)?, row.get::<_, i64>(1)? as u64), row.get(2)?))
    })
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

/// The version each stream's snapshot covers, in a stopped engine's store.
fn snapshot_versions(data: &Path) -> BTreeMap<String, u64> {
    let db = rusqlite::Connection::open(data.join("events.sqlite3")).unwrap();
    let mut stmt = db
        .prepare("SELECT s.name, n.version FROM snapshots n JOIN streams s ON s.id = n.stream")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// `n` readings of `device` a week old (the tests' `t0`), leaving and re-entering the depot and
/// the cold-chain range so that alarms are raised and cleared among them.
fn old_readings(device: &str, n: i64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let outside = (i / 7) % 2 == 1;
            let lat = if outside { DEPOT.0 + 0.05 } else { DEPOT.0 } + i as f64 * 1e-5;
            let temperature = if (i / 5) % 3 == 2 { 9.5 } else { 5.0 };
            reading(device, i, lat, DEPOT.1, temperature)
        })
        .collect()
}

async fn post_all(engine: &Engine, readings: &[Value]) {
    for batch in readings.chunks(1000) {
        let (status, body) = engine.post("/api/readings", &json!(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
}

fn is_reading(event_type: &str) -> bool {
    event_type == "ReadingRecorded"
}

/// Every event missing from `after` was a reading that a snapshot covered; nothing was added.
fn assert_only_covered_readings_removed(
    before: &BTreeMap<(String, u64), String>,
    after: &BTreeMap<(String, u64), String>,
    snapshots: &BTreeMap<String, u64>,
) -> usize {
    let mut removed = 0;
    for ((stream, version), event_type) in before {
        if after.contains_key(&(stream.clone(), *version)) {
            continue;
        }
        removed += 1;
        assert!(
            is_reading(event_type),
            "{stream}@{version} ({event_type}) was removed"
        );
        assert!(
            snapshots.get(stream).is_some_and(|s| version <= s),
            "{stream}@{version} was removed without a snapshot covering it"
        );
    }
    assert!(
        after.keys().all(|k| before.contains_key(k)),
        "nothing is added"
    );
    removed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_covered_readings_and_the_device_restores_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("kept");
    let pruned = dir.path().join("pruned");
    // One engine keeps everything, the other removes week-old readings (a pass runs at start).
    let args = ["--amqp-disabled", "--snapshot-every", "20"];
    let mut control =
        Engine::start_with(&kept, &[&args[..], &["--reading-retention", "0"]].concat()).await;
    let mut engine = Engine::start_with(
        &pruned,
        &[&args[..], &["--reading-retention", "1d"]].concat(),
    )
    .await;
    for e in [&control, &engine] {
        e.create_depot_and_cold_chain().await;
        post_all(e, &old_readings("truck-1", 95)).await;
    }
    assert!(engine.terminate().success());
    let before = stored_events(&pruned);
    let snapshots = snapshot_versions(&pruned);
    assert!(snapshots["truck-1"] >= 80, "{snapshots:?}");

    engine.restart().await;
    eventually(
        Duration::from_secs(30),
        "a retention pass to remove readings",
        || async {
            (engine
                .metric("fleetwatch_retention_removed_events_total")
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
    let page = engine.get("/api/devices/truck-1/events?limit=1000").await;
    assert!(
        page["retention"]["readings_removed_before"].is_string(),
        "the history says where it begins: {}",
        page["retention"]
    );
    assert!(engine.terminate().success());
    let after = stored_events(&pruned);
    let removed = assert_only_covered_readings_removed(&before, &after, &snapshots);
    let covered_readings = before
        .iter()
        .filter(|((s, v), t)| s == "truck-1" && is_reading(t) && *v <= snapshots["truck-1"])
        .count();
    assert_eq!(removed, covered_readings, "every covered reading is gone");
    let alarms = |events: &BTreeMap<(String, u64), String>| {
        events
            .values()
            .filter(|t| t.contains("Zone") || t.contains("Range"))
            .count()
    };
    assert!(alarms(&after) >= 4, "alarms are kept: {after:?}");
    assert_eq!(alarms(&after), alarms(&before));

    // Restored from its snapshot and the events after it, the device is the one that kept all.
    engine.restart().await;
    assert_eq!(
        engine.get("/api/devices/truck-1").await,
        control.get("/api/devices/truck-1").await
    );
    // And it goes on the same: a new reading leaving the depot while too warm.
    let next = reading("truck-1", 95, DEPOT.0 + 0.05, DEPOT.1, 9.9);
    let (_, a) = engine.post("/api/readings", &next).await;
    let (_, b) = control.post("/api/readings", &next).await;
    assert_eq!(a, b);
    assert_eq!(
        engine.get("/api/devices/truck-1").await,
        control.get("/api/devices/truck-1").await
    );
    assert!(control.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_retention_pass_loses_and_breaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut engine = Engine::start_with(
        &data,
        &[
            "--amqp-disabled",
            "--snapshot-every",
            "10",
            "--reading-retention",
            "0",
        ],
    )
    .await;
    // 600 devices: a pass takes three writes of 256 devices.
    let readings: Vec<Value> = (0..600)
        .flat_map(|d| old_readings(&format!("dev-{d:03}"), 25))
        .collect();
    post_all(&engine, &readings).await;
    let states: Vec<Value> = {
        let mut states = Vec::new();
        for d in [0, 255, 256, 599] {
            states.push(engine.get(&format!("/api/devices/dev-{d:03}")).await);
        }
        states
    };
    assert!(engine.terminate().success());
    let before = stored_events(&data);
    let snapshots = snapshot_versions(&data);

    // The first write of the pass commits; the second holds its transaction open, and is killed.
    let mut pass = Engine::start_with_env(
        &data,
        &["--amqp-disabled", "--reading-retention", "1d"],
        &[("FAILPOINTS", "store-prune=1*off->sleep(20000)")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pass.kill();
    let after_kill = stored_events(&data);
    let removed = assert_only_covered_readings_removed(&before, &after_kill, &snapshots);
    assert!(removed > 0, "the first write was committed");
    assert!(
        removed < before.values().filter(|t| is_reading(t)).count() / 2,
        "the pass was cut short"
    );
    let check = run_to_exit(
        &["verify", "--data-dir", data.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The next engine finishes the job, and every device is as it was.
    let mut engine =
        Engine::start_with(&data, &["--amqp-disabled", "--reading-retention", "1d"]).await;
    eventually(Duration::from_secs(30), "the pass to finish", || async {
        let page = engine.get("/api/devices/dev-599/events?limit=1000").await;
        page["retention"]["readings_removed_before"]
            .is_string()
            .then_some(())
    })
    .await;
    for (d, state) in [0, 255, 256, 599].iter().zip(&states) {
        assert_eq!(
            &engine.get(&format!("/api/devices/dev-{d:03}")).await,
            state
        );
    }
    assert!(engine.terminate().success());
    assert_only_covered_readings_removed(&before, &stored_events(&data), &snapshots);
}
