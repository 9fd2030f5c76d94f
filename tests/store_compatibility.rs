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
    // What the old build answered: each device's last reading and conditions. (Newer builds add
    // alarms and offline detection: these devices, silent since the fixture was written, go
    // offline, and their conditions open alarms, as the next assertions check.)
    let as_before = |devices: &Value| -> Vec<Value> {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                serde_json::json!({
                    "device_id": d["device_id"],
                    "last_reading": d["last_reading"],
                    "outside_zones": d["outside_zones"],
                    "temperature_alarms": d["temperature_alarms"],
                })
            })
            .collect()
    };
    let devices = engine.get("/api/devices?limit=1000").await;
    assert_eq!(as_before(&devices), as_before(&expected("devices.json")));
    // Every condition the old store held opens its alarm, and every device goes offline.
    let conditions: usize = expected("devices.json")["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["outside_zones"].as_array().unwrap().len()
                + d["temperature_alarms"].as_array().unwrap().len()
        })
        .sum();
    let known = devices["devices"].as_array().unwrap().len();
    common::amqp::eventually(
        std::time::Duration::from_secs(20),
        "the old store's conditions to open alarms",
        || async {
            let open = engine.get("/api/alarms?state=open&limit=1000").await;
            let open = open["alarms"].as_array().unwrap();
            let offline = open.iter().filter(|a| a["kind"] == "offline").count();
            (open.len() == conditions + known && offline == known).then_some(())
        },
    )
    .await;
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
