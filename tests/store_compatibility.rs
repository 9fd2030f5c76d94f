//! A store written by an older build opens, and its devices and rules read as they did then.

mod common;

use common::Engine;
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v1");

fn expected(file: &str) -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURE}/{file}")).expect("fixture file");
    serde_json::from_str(&text).expect("fixture JSON")
}

#[tokio::test]
async fn a_store_written_by_the_first_schema_opens_and_answers_as_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        format!("{FIXTURE}/events.sqlite3"),
        data.join("events.sqlite3"),
    )
    .unwrap();
    let engine = Engine::start(&data).await;
    assert_eq!(
        engine.get("/api/devices?limit=1000").await,
        expected("devices.json")
    );
    assert_eq!(engine.get("/api/zones").await, expected("zones.json"));
    assert_eq!(
        engine.get("/api/temperature-ranges").await,
        expected("ranges.json")
    );
    // Devices restored from the old store go on: a new reading of one in alarm keeps it there.
    let (status, body) = engine
        .post(
            "/api/readings",
            &serde_json::json!({"device_id": "van-9", "timestamp": "2026-11-23T14:00:01Z",
                "lat": 52.37, "lon": 4.89, "temperature": 31.0}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let van = engine.get("/api/devices/van-9").await;
    assert_eq!(van["status"], "temperature_alarm", "{van}");
    // An old reading sent again is recognised as a repeat, not stored as late.
    let (_, body) = engine
        .post(
            "/api/readings",
            &serde_json::json!({"device_id": "van-9", "timestamp": "2026-11-23T14:00:01Z",
                "lat": 52.37, "lon": 4.89, "temperature": 31.0}),
        )
        .await;
    assert_eq!(body["duplicates"], 1, "{body}");
}
