//! Time rules, the same on both ingest paths: a reading dated too far ahead of the engine's clock
//! is refused (HTTP 400 naming `timestamp`, dead-lettered over RabbitMQ); a reading older than the
//! device's last is kept in its history, marked late, without moving its live state or raising
//! alarms; only an exact repeat (same device and timestamp) is a duplicate.

mod common;

use std::time::Duration;

use common::amqp::{eventually, Names, Publisher};
use common::*;
use serde_json::{json, Value};

fn at(secs: i64) -> String {
    (t0() + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn future_reading(device: &str) -> Value {
    json!({"device_id": device, "timestamp": "9999-12-31T23:59:59Z",
           "lat": DEPOT.0, "lon": DEPOT.1, "temperature": 5.0})
}

/// The device's alarm events, by type.
fn alarms(history: &[Value]) -> Vec<String> {
    types(history)
        .into_iter()
        .filter(|t| {
            matches!(
                t.as_str(),
                "LeftZone" | "EnteredZone" | "TemperatureOutOfRange" | "TemperatureBackInRange"
            )
        })
        .collect()
}

#[tokio::test]
async fn over_http_a_future_reading_is_refused_and_a_late_one_is_history_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    engine.create_depot_and_cold_chain().await;

    // A device clock in the year 9999 is refused, and does not hide the device's real readings.
    let (status, body) = engine.post("/api/readings", &future_reading("van-1")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "timestamp", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("ahead of the engine's clock"),
        "{body}"
    );
    let batch = json!([
        reading("van-1", 0, DEPOT.0, DEPOT.1, 5.0),
        future_reading("van-1")
    ]);
    let (status, body) = engine.post("/api/readings", &batch).await;
    assert_eq!(
        (status, &body["field"], &body["index"]),
        (400, &json!("timestamp"), &json!(1))
    );
    assert!(
        engine.device("van-1").await.is_none(),
        "nothing of the batch applied"
    );

    for secs in [10, 20] {
        let (status, body) = engine
            .post(
                "/api/readings",
                &reading("van-1", secs, DEPOT.0, DEPOT.1, 5.0),
            )
            .await;
        assert_eq!((status, &body["duplicates"]), (202, &json!(0)), "{body}");
    }
    // Late: outside the depot and far too warm, but older than the last reading.
    let late = reading("van-1", 15, DEPOT.0 + 0.1, DEPOT.1, 30.0);
    let (status, body) = engine.post("/api/readings", &late).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (&body["late"], &body["duplicates"]),
        (&json!(1), &json!(0)),
        "{body}"
    );

    let state = engine.device("van-1").await.unwrap();
    assert_eq!(
        state["last_reading"]["timestamp"],
        at(20),
        "live state unmoved"
    );
    assert_eq!(state["status"], "normal", "no alarm: {state}");
    let history = engine.history("van-1").await;
    assert!(alarms(&history).is_empty(), "{:?}", types(&history));
    let recorded = history.last().unwrap();
    assert_eq!(
        (
            &recorded["type"],
            &recorded["data"]["at"],
            &recorded["data"]["late"]
        ),
        (&json!("ReadingRecorded"), &json!(at(15)), &json!(true))
    );

    // Exact repeats of the late one, of an older one and of the last one are duplicates.
    for secs in [15, 10, 20] {
        let repeat = reading("van-1", secs, DEPOT.0, DEPOT.1, 5.0);
        let (_, body) = engine.post("/api/readings", &repeat).await;
        assert_eq!(body["duplicates"], 1, "reading {secs} again: {body}");
    }
    assert_eq!(
        engine.stored_reading_times("van-1").await,
        [at(10), at(20), at(15)]
    );
    // The next real reading is judged against the last live one.
    let (_, body) = engine
        .post(
            "/api/readings",
            &reading("van-1", 21, DEPOT.0 + 0.1, DEPOT.1, 5.0),
        )
        .await;
    assert_eq!(body["late"], 0, "{body}");
    assert_eq!(
        engine.device("van-1").await.unwrap()["status"],
        "out_of_zone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rabbitmq_a_future_reading_is_dead_lettered_and_a_late_one_is_history_only() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("time");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let args = names.engine_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(&dir.path().join("data"), &args).await;
    engine.wait_broker_connected().await;
    engine.create_depot_and_cold_chain().await;

    let body = |v: &Value| serde_json::to_vec(v).unwrap();
    publisher
        .publish("truck-1", &body(&future_reading("truck-1")))
        .await
        .unwrap();
    for secs in [10, 20] {
        publisher
            .publish(
                "truck-1",
                &body(&reading("truck-1", secs, DEPOT.0, DEPOT.1, 5.0)),
            )
            .await
            .unwrap();
    }
    publisher
        .publish(
            "truck-1",
            &body(&reading("truck-1", 15, DEPOT.0 + 0.1, DEPOT.1, 30.0)),
        )
        .await
        .unwrap();
    // And an exact repeat of a stored reading, as a redelivery would be.
    publisher
        .publish(
            "truck-1",
            &body(&reading("truck-1", 10, DEPOT.0, DEPOT.1, 5.0)),
        )
        .await
        .unwrap();

    let dead = eventually(
        Duration::from_secs(30),
        "the future reading to be dead-lettered",
        || async {
            let dead = publisher.drain(&names.dead()).await;
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(
        reason.starts_with("timestamp:") && reason.contains("ahead of the engine's clock"),
        "{reason}"
    );
    eventually(
        Duration::from_secs(30),
        "the late reading and the repeat to be handled",
        || async { (engine.metric("fleetwatch_amqp_processed_total").await >= 4.0).then_some(()) },
    )
    .await;
    assert_eq!(
        engine.stored_reading_times("truck-1").await,
        [at(10), at(20), at(15)],
        "the late one stored once, after the others; the repeat not at all"
    );
    let state = engine.device("truck-1").await.unwrap();
    assert_eq!(state["last_reading"]["timestamp"], at(20));
    assert_eq!(state["status"], "normal");
    assert!(alarms(&engine.history("truck-1").await).is_empty());
    assert_eq!(
        engine.metric("fleetwatch_readings_duplicate_total").await,
        1.0
    );
}
