//! Alarms through the real engine: one open alarm per device, kind and rule; acknowledging and
//! clearing; the lifecycle across SIGKILL; offline detection for passivated devices and across a
//! restart, with its precision; dwell times that survive a restart; exits before entries.
//!
//! Readings here carry the current time: dwell times and offline periods run on real time.

mod common;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use common::amqp::eventually;
use common::*;
use serde_json::{json, Value};

/// How late the engine may decide a deadline: its check interval (0.5 s) plus time to decide
/// and commit on a busy test machine.
const PRECISION: chrono::TimeDelta = chrono::TimeDelta::milliseconds(1_500);

fn now_reading(device: &str, at: DateTime<Utc>, lat: f64, lon: f64, temperature: f64) -> Value {
    json!({
        "device_id": device,
        "timestamp": at.to_rfc3339(),
        "lat": lat,
        "lon": lon,
        "temperature": temperature,
    })
}

const OUTSIDE: (f64, f64) = (DEPOT.0 + 0.1, DEPOT.1);

async fn post_ok(engine: &Engine, body: &Value) {
    let (status, answer) = engine.post("/api/readings", body).await;
    assert_eq!(status, 202, "{answer}");
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {value}"))
}

async fn alarms(engine: &Engine, query: &str) -> Vec<Value> {
    engine.get(&format!("/api/alarms?{query}")).await["alarms"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `GET /api/alarms?{query}` lists exactly `n` alarms (the read models commit once
/// a second), and returns them.
async fn wait_for_alarms(engine: &Engine, query: &str, n: usize) -> Vec<Value> {
    eventually(
        Duration::from_secs(20),
        &format!("{n} alarms for {query}"),
        || async {
            let listed = alarms(engine, query).await;
            (listed.len() == n).then_some(listed)
        },
    )
    .await
}

/// The stored events of `device` of the given types.
async fn events_of(engine: &Engine, device: &str, of_types: &[&str]) -> Vec<Value> {
    engine
        .try_history(device)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| of_types.contains(&e["type"].as_str().unwrap_or_default()))
        .collect()
}

/// Waits until `device` has a stored event of `event_type` and returns the first.
async fn wait_for_event(
    engine: &Engine,
    device: &str,
    event_type: &str,
    within: Duration,
) -> Value {
    eventually(within, &format!("{device}'s {event_type}"), || async {
        events_of(engine, device, &[event_type])
            .await
            .into_iter()
            .next()
    })
    .await
}

const ALARM_CHANGES: [&str; 3] = ["AlarmOpened", "AlarmAcknowledged", "AlarmCleared"];

#[tokio::test]
async fn a_long_stream_outside_and_too_warm_keeps_exactly_one_open_alarm_per_kind_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    engine.create_depot_and_cold_chain().await;
    let start = Utc::now() - chrono::Duration::seconds(400);
    let device = "truck-1";
    post_ok(&engine, &now_reading(device, start, DEPOT.0, DEPOT.1, 5.0)).await;
    let batch: Vec<Value> = (1..=300)
        .map(|s| {
            let at = start + chrono::Duration::seconds(s);
            now_reading(device, at, OUTSIDE.0, OUTSIDE.1 + s as f64 * 1e-4, 12.0)
        })
        .collect();
    for chunk in batch.chunks(100) {
        post_ok(&engine, &Value::Array(chunk.to_vec())).await;
    }
    let open = wait_for_alarms(&engine, &format!("device={device}&state=open"), 2).await;
    let mut kinds: Vec<(String, String)> = open
        .iter()
        .map(|a| {
            let rule = a["zone_id"].as_str().or(a["range_id"].as_str()).unwrap();
            (a["kind"].as_str().unwrap().to_owned(), rule.to_owned())
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("outside_zone".to_owned(), "depot".to_owned()),
            (
                "temperature_out_of_range".to_owned(),
                "cold-chain".to_owned()
            )
        ]
    );
    assert!(open
        .iter()
        .all(|a| a["severity"] == "warning" && a["sequence"] == 1));
    let opened = events_of(&engine, device, &["AlarmOpened"]).await;
    assert_eq!(opened.len(), 2, "one alarm each, however long: {opened:?}");
    // The cause is the event that began the condition.
    for alarm in &open {
        let cause = alarm["cause_version"].as_u64().unwrap();
        let history = engine.history(device).await;
        let cause_event = history.iter().find(|e| e["version"] == cause).unwrap();
        let expected = if alarm["kind"] == "outside_zone" {
            "LeftZone"
        } else {
            "TemperatureOutOfRange"
        };
        assert_eq!(cause_event["type"], expected);
    }

    // Back inside and cool: both clear, and the filters find them.
    let back = start + chrono::Duration::seconds(301);
    post_ok(&engine, &now_reading(device, back, DEPOT.0, DEPOT.1, 5.0)).await;
    let cleared = wait_for_alarms(&engine, &format!("device={device}&state=cleared"), 2).await;
    assert!(cleared
        .iter()
        .all(|a| a["sequence"] == 2 && a["cleared_at"].is_string()));
    assert_eq!(
        alarms(&engine, &format!("device={device}&state=open"))
            .await
            .len(),
        0
    );
    assert_eq!(alarms(&engine, "zone=depot").await.len(), 1);
    assert_eq!(
        alarms(&engine, "kind=temperature_out_of_range").await.len(),
        1
    );
    assert_eq!(alarms(&engine, "severity=critical").await.len(), 0);
    let stats = engine.get("/api/stats").await;
    assert_eq!(stats["alarms"]["cleared"], 2, "{stats}");
    assert_eq!(stats["alarms"]["open"], 0, "{stats}");
    for bad in [
        "state=closed",
        "kind=smoke",
        "severity=high",
        "limit=0",
        "after=x",
    ] {
        let r = engine
            .request(reqwest::Method::GET, &format!("/api/alarms?{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        let field = bad.split('=').next().unwrap();
        assert_eq!(body["field"], field, "{bad}: {body}");
    }
}

#[tokio::test]
async fn an_alarm_is_acknowledged_under_the_token_s_name_and_then_clears_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--admin-tokens",
            "night-shift:admin-secret-1",
            "--read-tokens",
            "viewer-secret-2",
        ],
    )
    .await
    .with_token("admin-secret-1");
    let zone = json!({"id": "depot", "name": "Depot", "severity": "critical",
        "shape": {"type": "circle", "center": {"lat": DEPOT.0, "lon": DEPOT.1}, "radius_m": 1000}});
    let (status, stored) = engine.post("/api/zones", &zone).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored["severity"], "critical");
    let now = Utc::now();
    post_ok(
        &engine,
        &now_reading("van-3", now, OUTSIDE.0, OUTSIDE.1, 5.0),
    )
    .await;
    let open = wait_for_alarms(&engine, "device=van-3&state=open", 1).await;
    let id = open[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(id, "van-3.1");
    assert_eq!(open[0]["severity"], "critical");

    // A read token may list, not acknowledge.
    let viewer = reqwest::Client::new();
    let refused = viewer
        .post(engine.url(&format!("/api/alarms/{id}/ack")))
        .bearer_auth("viewer-secret-2")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    let (status, acked) = engine
        .post(
            &format!("/api/alarms/{id}/ack"),
            &json!({"comment": "driver called: detour"}),
        )
        .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["by"], "night-shift");
    let (status, again) = engine
        .post(&format!("/api/alarms/{id}/ack"), &json!({}))
        .await;
    assert_eq!(status, 409, "{again}");
    let acknowledged = wait_for_alarms(&engine, "state=acknowledged", 1).await;
    assert_eq!(acknowledged[0]["id"], id.as_str());
    assert_eq!(acknowledged[0]["acknowledged"]["by"], "night-shift");
    assert_eq!(
        acknowledged[0]["acknowledged"]["comment"],
        "driver called: detour"
    );
    assert_eq!(acknowledged[0]["sequence"], 2);
    // Acknowledged and still outside: it stays listed until it clears.
    post_ok(
        &engine,
        &now_reading(
            "van-3",
            now + chrono::Duration::seconds(1),
            OUTSIDE.0,
            OUTSIDE.1,
            5.0,
        ),
    )
    .await;
    assert_eq!(
        alarms(&engine, "device=van-3&state=acknowledged")
            .await
            .len(),
        1
    );

    post_ok(
        &engine,
        &now_reading(
            "van-3",
            now + chrono::Duration::seconds(2),
            DEPOT.0,
            DEPOT.1,
            5.0,
        ),
    )
    .await;
    let cleared = wait_for_alarms(&engine, "state=cleared", 1).await;
    assert_eq!(cleared[0]["id"], id.as_str());
    assert_eq!(cleared[0]["sequence"], 3);
    assert_eq!(
        cleared[0]["acknowledged"]["by"], "night-shift",
        "kept after clearing"
    );
    let changes = events_of(&engine, "van-3", &ALARM_CHANGES).await;
    let sequences: Vec<(String, u64)> = changes
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["sequence"].as_u64().unwrap_or(1),
            )
        })
        .collect();
    assert_eq!(
        sequences,
        [
            ("AlarmOpened".to_owned(), 1),
            ("AlarmAcknowledged".to_owned(), 2),
            ("AlarmCleared".to_owned(), 3)
        ]
    );

    let (status, _) = engine
        .post(&format!("/api/alarms/{id}/ack"), &json!({}))
        .await;
    assert_eq!(status, 404, "a cleared alarm cannot be acknowledged");
    let (status, body) = engine.post("/api/alarms/not-an-id/ack", &json!({})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = engine.post("/api/alarms/nobody.1/ack", &json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_lifecycle_after_a_sigkill_and_a_restart_is_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(&dir.path().join("data")).await;
    engine.create_depot_and_cold_chain().await;
    let start = Utc::now() - chrono::Duration::seconds(100);
    let device = "reefer-9";
    // Out and warm, back in, out again; an acknowledgement in between.
    let path = [
        (0, DEPOT, 5.0),
        (10, OUTSIDE, 12.0),
        (20, DEPOT, 12.0),
        (30, DEPOT, 5.0),
        (40, OUTSIDE, 5.0),
    ];
    for (s, (lat, lon), temp) in path.iter().take(2) {
        let at = start + chrono::Duration::seconds(*s);
        post_ok(&engine, &now_reading(device, at, *lat, *lon, *temp)).await;
    }
    let open = wait_for_alarms(&engine, &format!("device={device}&state=open"), 2).await;
    let zone_alarm = open.iter().find(|a| a["kind"] == "outside_zone").unwrap();
    let (status, _) = engine
        .post(
            &format!("/api/alarms/{}/ack", zone_alarm["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    for (s, (lat, lon), temp) in path.iter().skip(2) {
        let at = start + chrono::Duration::seconds(*s);
        post_ok(&engine, &now_reading(device, at, *lat, *lon, *temp)).await;
    }
    let before = events_of(&engine, device, &ALARM_CHANGES).await;
    assert_eq!(
        types(&before),
        [
            "AlarmOpened",
            "AlarmOpened",
            "AlarmAcknowledged",
            "AlarmCleared",
            "AlarmCleared",
            "AlarmOpened"
        ]
    );
    wait_for_alarms(&engine, &format!("device={device}"), 3).await;
    let listed_before = alarms(&engine, &format!("device={device}")).await;

    engine.kill();
    engine.restart().await;
    assert_eq!(events_of(&engine, device, &ALARM_CHANGES).await, before);
    assert_eq!(
        alarms(&engine, &format!("device={device}")).await,
        listed_before
    );
    // The device carries on where it was: the open alarm clears, the next one gets a new id.
    post_ok(
        &engine,
        &now_reading(
            device,
            start + chrono::Duration::seconds(50),
            DEPOT.0,
            DEPOT.1,
            5.0,
        ),
    )
    .await;
    post_ok(
        &engine,
        &now_reading(
            device,
            start + chrono::Duration::seconds(60),
            OUTSIDE.0,
            OUTSIDE.1,
            5.0,
        ),
    )
    .await;
    let after = events_of(&engine, device, &ALARM_CHANGES).await;
    assert_eq!(&after[..before.len()], &before[..]);
    let ids: Vec<&str> = after
        .iter()
        .filter(|e| e["type"] == "AlarmOpened")
        .map(|e| e["data"]["alarm_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            format!("{device}.1"),
            format!("{device}.2"),
            format!("{device}.3"),
            format!("{device}.4")
        ]
    );
}

/// Waits for `device`'s `DeviceWentOffline`; asserts it came `period` after the device was last
/// heard from, and was decided on time. Returns (last seen, the deadline).
async fn went_offline_on_time(
    engine: &Engine,
    device: &str,
    period: chrono::TimeDelta,
    within: Duration,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let offline = wait_for_event(engine, device, "DeviceWentOffline", within).await;
    let last_seen = time(&offline["data"]["last_seen"]);
    let deadline = time(&offline["data"]["at"]);
    assert_eq!(deadline - last_seen, period);
    let noticed = time(&offline["recorded_at"]) - deadline;
    assert!(
        noticed >= chrono::TimeDelta::zero() && noticed <= PRECISION,
        "decided {noticed} after the deadline"
    );
    (last_seen, deadline)
}

#[tokio::test]
async fn a_passivated_device_goes_offline_on_time_and_its_next_reading_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--offline-after",
            "3s",
            "--idle-timeout",
            "500ms",
        ],
    )
    .await;
    let device = "sensor-4";
    post_ok(
        &engine,
        &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the device to passivate",
        || async { (engine.metric("fleetwatch_active_devices").await == 0.0).then_some(()) },
    )
    .await;
    let (_, deadline) = went_offline_on_time(
        &engine,
        device,
        chrono::TimeDelta::seconds(3),
        Duration::from_secs(15),
    )
    .await;
    let open = wait_for_alarms(&engine, "kind=offline&state=open", 1).await;
    assert_eq!(open[0]["device_id"], device);
    let stats = engine.get("/api/stats").await;
    assert_eq!(stats["devices"]["offline"], 1, "{stats}");
    // Silent on: no second offline event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        events_of(&engine, device, &["DeviceWentOffline"])
            .await
            .len(),
        1
    );

    post_ok(
        &engine,
        &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
    )
    .await;
    let back = wait_for_event(&engine, device, "DeviceBackOnline", Duration::from_secs(5)).await;
    assert_eq!(time(&back["data"]["offline_since"]), deadline);
    wait_for_alarms(&engine, "kind=offline&state=cleared", 1).await;
}

/// A device that keeps reporting past the deadline first filed for it is not taken offline by
/// it (the tick finds nothing due and files the real deadline); once it falls silent it goes
/// offline on time after its last reading, once.
#[tokio::test]
async fn a_device_reporting_past_its_first_deadline_goes_offline_only_after_its_last_reading() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--offline-after", "2s"],
    )
    .await;
    let device = "sensor-9";
    // 5 s of readings, one every 250 ms: the first deadline (2 s after the first reading) and
    // the ones filed after it come due while the device is still reporting.
    for _ in 0..20 {
        post_ok(
            &engine,
            &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (last_seen, _) = went_offline_on_time(
        &engine,
        device,
        chrono::TimeDelta::seconds(2),
        Duration::from_secs(10),
    )
    .await;
    let readings = events_of(&engine, device, &["ReadingRecorded"]).await;
    assert_eq!(readings.len(), 20);
    // Heard when the engine decided it: after it was taken, before it was committed.
    let last = &readings[19];
    assert!(
        time(&last["data"]["at"]) <= last_seen && last_seen <= time(&last["recorded_at"]),
        "offline counted from the last reading: {last_seen} against {last}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        events_of(&engine, device, &["DeviceWentOffline"])
            .await
            .len(),
        1
    );
}

/// A device whose deadline wakes it from the store passivates once it has written what the
/// deadline meant, not after the idle timeout (here 10 minutes, checked every 30 s).
#[tokio::test]
async fn a_device_woken_only_by_its_deadline_passivates_once_it_has_decided() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--offline-after",
            "3s",
            "--idle-timeout",
            "10m",
        ],
    )
    .await;
    let device = "sensor-9";
    post_ok(
        &engine,
        &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
    )
    .await;
    // After the restart no actor runs: the stored deadline wakes the device.
    engine.kill();
    engine.restart().await;
    wait_for_event(
        &engine,
        device,
        "DeviceWentOffline",
        Duration::from_secs(15),
    )
    .await;
    wait_for_alarms(&engine, "kind=offline&state=open", 1).await;
    eventually(
        Duration::from_secs(5),
        "the woken device to passivate",
        || async { (engine.metric("fleetwatch_active_devices").await == 0.0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_device_silent_across_a_restart_goes_offline_after_it_with_its_own_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--offline-after", "1h"],
    )
    .await;
    let device = "tracker-8";
    post_ok(
        &engine,
        &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
    )
    .await;
    // Its own period, instead of the default hour.
    let r = engine
        .request(
            reqwest::Method::PUT,
            &format!("/api/devices/{device}/offline-after"),
        )
        .json(&json!({"seconds": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (body, field) in [
        (json!({"seconds": 0}), "seconds"),
        (json!({"minutes": 4}), "minutes"),
    ] {
        let r = engine
            .request(
                reqwest::Method::PUT,
                &format!("/api/devices/{device}/offline-after"),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer["error"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    let unknown = engine
        .request(reqwest::Method::PUT, "/api/devices/nobody/offline-after")
        .json(&json!({"seconds": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    post_ok(
        &engine,
        &now_reading(device, Utc::now(), DEPOT.0, DEPOT.1, 5.0),
    )
    .await;
    let heard = Utc::now();
    engine.kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    engine.restart().await;
    let restarted = Utc::now();
    let offline = wait_for_event(
        &engine,
        device,
        "DeviceWentOffline",
        Duration::from_secs(10),
    )
    .await;
    let deadline = time(&offline["data"]["at"]);
    assert!(
        deadline <= heard + chrono::TimeDelta::seconds(4) && deadline < restarted,
        "dated at its deadline ({deadline}), during the downtime"
    );
    let noticed = time(&offline["recorded_at"]) - restarted;
    assert!(noticed <= PRECISION, "decided {noticed} after the restart");
}

#[tokio::test]
async fn a_pending_dwell_opens_its_alarm_on_time_after_a_restart_unless_the_device_came_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(&dir.path().join("data")).await;
    let zone = json!({"id": "yard", "name": "Yard", "dwell": 8,
        "shape": {"type": "circle", "center": {"lat": DEPOT.0, "lon": DEPOT.1}, "radius_m": 1000}});
    let (status, stored) = engine.post("/api/zones", &zone).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored["dwell"], 8);
    let start = Utc::now() - chrono::Duration::seconds(1);
    let devices = ["stays-out", "comes-back"];
    let inside: Vec<Value> = devices
        .iter()
        .map(|d| now_reading(d, start, DEPOT.0, DEPOT.1, 5.0))
        .collect();
    post_ok(&engine, &Value::Array(inside)).await;
    // Taken now: the dwell runs on the device's clock, which here is the engine's.
    let left = Utc::now().trunc_subsecs(6); // the engine keeps microseconds
    let outside: Vec<Value> = devices
        .iter()
        .map(|d| now_reading(d, left, OUTSIDE.0, OUTSIDE.1, 5.0))
        .collect();
    post_ok(&engine, &Value::Array(outside)).await;
    // Killed with the dwell half run; the crossing shorter than the dwell raises nothing.
    engine.kill();
    engine.restart().await;
    let back = left + chrono::Duration::seconds(4);
    post_ok(
        &engine,
        &now_reading("comes-back", back, DEPOT.0, DEPOT.1, 5.0),
    )
    .await;

    let opened = wait_for_event(&engine, "stays-out", "AlarmOpened", Duration::from_secs(20)).await;
    let due = left + chrono::Duration::seconds(8);
    assert_eq!(time(&opened["data"]["at"]), due);
    let noticed = time(&opened["recorded_at"]) - due;
    assert!(
        noticed >= chrono::TimeDelta::zero() && noticed <= PRECISION,
        "opened {noticed} after its dwell ended"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        events_of(&engine, "comes-back", &ALARM_CHANGES)
            .await
            .is_empty(),
        "back within the dwell: no alarm"
    );
    assert_eq!(
        events_of(&engine, "comes-back", &["EnteredZone"])
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_reading_that_leaves_one_zone_for_another_stores_the_exit_first() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    // Two 1 km circles whose centres are 2.2 km apart, east-west.
    for (id, lon) in [("west", DEPOT.1), ("east", DEPOT.1 + 0.032)] {
        let zone = json!({"id": id, "name": id,
            "shape": {"type": "circle", "center": {"lat": DEPOT.0, "lon": lon}, "radius_m": 1000}});
        let (status, body) = engine.post("/api/zones", &zone).await;
        assert_eq!(status, 201, "{body}");
    }
    let start = Utc::now();
    post_ok(&engine, &now_reading("bus-2", start, DEPOT.0, DEPOT.1, 5.0)).await;
    post_ok(
        &engine,
        &now_reading(
            "bus-2",
            start + chrono::Duration::seconds(5),
            DEPOT.0,
            DEPOT.1 + 0.032,
            5.0,
        ),
    )
    .await;
    let history = engine.history("bus-2").await;
    let crossings: Vec<(String, String)> = history
        .iter()
        .filter(|e| matches!(e["type"].as_str(), Some("LeftZone" | "EnteredZone")))
        .filter(|e| e["data"]["found_outside"] != true)
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["zone_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        crossings,
        [
            ("LeftZone".to_owned(), "west".to_owned()),
            ("EnteredZone".to_owned(), "east".to_owned())
        ]
    );
}
