//! A store written by an older build opens, and its devices and rules read as they did then.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Engine;
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v1");
const FIXTURE_V3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v3");

fn fixture_json(fixture: &str, file: &str) -> Value {
    let text = std::fs::read_to_string(format!("{fixture}/{file}")).expect("fixture file");
    serde_json::from_str(&text).expect("fixture JSON")
}

fn expected(file: &str) -> Value {
    fixture_json(FIXTURE, file)
}

/// A copy of `fixture`'s store in `data`, so that the test never changes the fixture.
fn copy_store(fixture: &str, data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::copy(
        format!("{fixture}/events.sqlite3"),
        data.join("events.sqlite3"),
    )
    .unwrap();
}

#[tokio::test]
async fn a_store_written_by_the_first_schema_opens_and_answers_as_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_store(FIXTURE, &data);
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

/// Format 3 kept each stream's version in its row; format 4 derives it from the newest event and
/// the snapshot. The fixture (tests/fixtures/store-v3/README.md) has devices whose newest events
/// retention removed, so only their snapshot still holds their version.
#[tokio::test]
async fn a_store_written_in_format_3_opens_and_its_devices_go_on_from_their_versions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_store(FIXTURE_V3, &data);
    // Everything kept, so that the histories compare whatever today's date.
    let engine = Engine::start_with(&data, &["--amqp-disabled", "--reading-retention", "0"]).await;
    let devices = fixture_json(FIXTURE_V3, "devices.json");
    let devices = devices["devices"].as_array().unwrap();
    let histories = fixture_json(FIXTURE_V3, "events.json");
    let version_before = |device: &str| -> u64 {
        devices.iter().find(|d| d["device_id"] == device).unwrap()["version"]
            .as_u64()
            .unwrap()
    };
    let last_event_before = |device: &str| -> u64 {
        histories[device]["events"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["version"]
            .as_u64()
            .unwrap()
    };
    assert!(
        devices
            .iter()
            .any(|d| last_event_before(d["device_id"].as_str().unwrap())
                < d["version"].as_u64().unwrap()),
        "the fixture has a device whose newest events retention removed"
    );

    // Each retained history reads as it did (events appended since come after it).
    for (device, before) in histories.as_object().unwrap() {
        let now = engine
            .get(&format!("/api/devices/{device}/events?limit=1000"))
            .await;
        assert_eq!(now["retention"], before["retention"], "{device}");
        let before = before["events"].as_array().unwrap();
        assert_eq!(
            now["events"].as_array().unwrap()[..before.len()],
            before[..],
            "{device}"
        );
    }
    // Silent since the fixture was written, every device goes offline: an append at the version
    // the store derives. A wrong version would be a conflict, and no offline alarm.
    common::amqp::eventually(
        Duration::from_secs(20),
        "every device of the old store to go offline",
        || async {
            let open = engine.get("/api/alarms?state=open&limit=1000").await;
            let offline = open["alarms"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["kind"] == "offline")
                .count();
            (offline == devices.len()).then_some(())
        },
    )
    .await;
    // The alarms the old store held are as they were.
    let alarms = engine.get("/api/alarms?limit=1000").await;
    let mut kept: Vec<Value> = alarms["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] != "offline")
        .cloned()
        .collect();
    let mut before = fixture_json(FIXTURE_V3, "alarms.json")["alarms"]
        .as_array()
        .unwrap()
        .clone();
    let by_id = |a: &Value, b: &Value| a["id"].as_str().cmp(&b["id"].as_str());
    kept.sort_by(by_id);
    before.sort_by(by_id);
    assert_eq!(kept, before);
    // A new reading of each device goes on from its version: the events appended since the
    // fixture are numbered on from the device's version then, without a gap.
    for device in devices {
        let id = device["device_id"].as_str().unwrap();
        let last = device["last_reading"].clone();
        let (status, body) = engine
            .post(
                "/api/readings",
                &serde_json::json!({"device_id": id, "timestamp": "2026-11-20T09:00:00Z",
                    "lat": last["lat"], "lon": last["lon"], "temperature": 5.0}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let page = engine
            .get(&format!("/api/devices/{id}/events?limit=1000"))
            .await;
        let since: Vec<u64> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .filter(|v| *v > last_event_before(id))
            .collect();
        let first = version_before(id) + 1;
        assert_eq!(
            since,
            (first..first + since.len() as u64).collect::<Vec<_>>(),
            "{id}: {page}"
        );
        assert!(since.len() >= 2, "an offline event and the reading: {page}");
        let now = engine.get(&format!("/api/devices/{id}")).await;
        assert_eq!(now["version"].as_u64(), since.last().copied(), "{now}");
    }
}
