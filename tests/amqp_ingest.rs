//! RabbitMQ ingest against a real broker on 127.0.0.1:5672, each test on exchange and queue names
//! of its own.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::amqp::{eventually, Names, Publisher};
use common::*;
use serde_json::{json, Value};

async fn start_engine(data: &std::path::Path, names: &Names, extra: &[&str]) -> Engine {
    let mut args: Vec<String> = names.engine_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(data, &args).await;
    engine.wait_broker_connected().await;
    engine
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_published_to_rabbitmq_raise_the_expected_events_and_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("events");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let engine = start_engine(&dir.path().join("data"), &names, &[]).await;
    engine.create_depot_and_cold_chain().await;

    let out = DEPOT.0 + 0.05;
    let path = [
        reading("van-1", 0, DEPOT.0, DEPOT.1, 5.0), // registered, inside, in range
        reading("van-1", 1, out, DEPOT.1, 5.0),     // leaves the depot
        reading("van-1", 2, out, DEPOT.1, 9.5),     // too warm
        reading("van-1", 3, out, DEPOT.1, 9.6),     // still out, still warm: nothing new
        reading("van-1", 4, DEPOT.0, DEPOT.1, 9.7), // back in the depot
        reading("van-1", 5, DEPOT.0, DEPOT.1, 5.0), // back in range
    ];
    for r in &path {
        publisher.publish("van-1", &body(r)).await.unwrap();
    }
    let state = engine.wait_until_stored("van-1", 5).await;
    assert_eq!(state["status"], "normal");

    let alarms: Vec<String> = types(&engine.history("van-1").await)
        .into_iter()
        .filter(|t| {
            !matches!(
                t.as_str(),
                "ReadingRecorded" | "LocationChanged" | "TemperatureChanged"
            )
        })
        .collect();
    assert_eq!(
        alarms,
        [
            "DeviceRegistered",
            "LeftZone",
            "AlarmOpened",
            "TemperatureOutOfRange",
            "AlarmOpened",
            "EnteredZone",
            "AlarmCleared",
            "TemperatureBackInRange",
            "AlarmCleared"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_reasons_and_valid_ones_interleaved_are_processed(
) {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("poison");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let engine = start_engine(&dir.path().join("data"), &names, &[]).await;

    const DEVICES: usize = 20;
    const PER_DEVICE: usize = 50;
    let malformed = |i: usize| -> (String, Vec<u8>) {
        let device = format!("dev-{}", i % DEVICES);
        let good = reading(&device, 10_000 + i as i64, 1.0, 1.0, 5.0);
        let with = |field: &str, value: Value| {
            let mut v = good.clone();
            v[field] = value;
            body(&v)
        };
        let without = |field: &str| {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove(field);
            body(&v)
        };
        let payload = match i % 10 {
            0 => b"not json at all".to_vec(),
            1 => Vec::new(),
            2 => without("lat"),
            3 => with("lat", json!(123.0)),
            4 => with("lon", json!("east")),
            5 => with("temperature", json!(1000.0)),
            6 => with("timestamp", json!("yesterday")),
            7 => with("device_id", json!("bad id with spaces")),
            8 => vec![0xff, 0xfe, 0x00],
            _ => body(&json!([good])),
        };
        (device, payload)
    };
    let mut messages = Vec::new();
    for i in 0..(DEVICES * PER_DEVICE) {
        let d = i % DEVICES;
        let secs = (i / DEVICES) as i64;
        let device = format!("dev-{d}");
        messages.push((
            device.clone(),
            body(&reading(&device, secs, 1.0, 1.0 + secs as f64 * 0.001, 5.0)),
        ));
        messages.push(malformed(i));
    }
    assert_eq!(messages.len(), 2000);
    publisher.publish_all(&messages).await.unwrap();

    for d in 0..DEVICES {
        engine
            .wait_until_stored(&format!("dev-{d}"), PER_DEVICE as i64 - 1)
            .await;
        let history = engine.history(&format!("dev-{d}")).await;
        let recorded = history
            .iter()
            .filter(|e| e["type"] == "ReadingRecorded")
            .count();
        assert_eq!(
            recorded,
            PER_DEVICE,
            "dev-{d}: every valid reading applied once; engine log:\n{}",
            engine.log_tail()
        );
    }

    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dead.len() < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} dead letters arrived",
            dead.len()
        );
        dead.extend(publisher.drain(&names.dead()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing more trickles in.
    tokio::time::sleep(Duration::from_millis(500)).await;
    dead.extend(publisher.drain(&names.dead()).await);
    assert_eq!(
        dead.len(),
        1000,
        "exactly the malformed messages are dead-lettered"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, r)| r.clone().expect("a reason header"))
        .collect();
    for needle in [
        "lat",
        "lon",
        "temperature",
        "timestamp",
        "device_id",
        "UTF-8",
        "not a reading",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "no reason mentions {needle}: {:?}",
            &reasons[..5]
        );
    }

    let failed = engine.get("/api/failed-messages?limit=5").await;
    let failed = failed.as_array().unwrap();
    assert_eq!(failed.len(), 5);
    assert!(failed
        .iter()
        .all(|m| !m["reason"].as_str().unwrap().is_empty()));
    assert_eq!(
        engine.metric("fleetwatch_amqp_dead_lettered_total").await,
        1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_10000_readings_loses_nothing_and_raises_no_alarm_twice() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("crash");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let data = dir.path().join("data");
    let mut engine = start_engine(&data, &names, &["--snapshot-every", "25"]).await;
    engine.create_depot_and_cold_chain().await;

    const DEVICES: usize = 100;
    const PER_DEVICE: usize = 100;
    let mut messages = Vec::with_capacity(DEVICES * PER_DEVICE);
    for i in 0..PER_DEVICE {
        for d in 0..DEVICES {
            let device = format!("unit-{d}");
            let outside = (i / 10) % 2 == 1;
            let lat = if outside { DEPOT.0 + 0.05 } else { DEPOT.0 };
            let temperature = if (i / 15) % 2 == 1 { 9.0 } else { 5.0 };
            messages.push((
                device.clone(),
                body(&reading(&device, i as i64, lat, DEPOT.1, temperature)),
            ));
        }
    }
    publisher.publish_all(&messages).await.unwrap();

    // Kill it once a part of the stream is through.
    eventually(
        Duration::from_secs(60),
        "some readings processed",
        || async {
            let state = engine.device("unit-0").await?;
            (state["version"].as_u64()? > 40).then_some(())
        },
    )
    .await;
    engine.kill();
    engine.restart().await;
    engine.wait_broker_connected().await;

    for d in 0..DEVICES {
        let device = format!("unit-{d}");
        engine
            .wait_until_stored(&device, PER_DEVICE as i64 - 1)
            .await;
        let history = engine.history(&device).await;
        let recorded: Vec<&str> = history
            .iter()
            .filter(|e| e["type"] == "ReadingRecorded")
            .map(|e| e["data"]["at"].as_str().unwrap())
            .collect();
        let unique: HashSet<&&str> = recorded.iter().collect();
        assert_eq!(
            recorded.len(),
            PER_DEVICE,
            "{device}: every reading applied exactly once"
        );
        assert_eq!(unique.len(), PER_DEVICE);
        assert_alarms_alternate(&device, &history);
        let left = history.iter().filter(|e| e["type"] == "LeftZone").count();
        assert_eq!(
            left,
            PER_DEVICE / 20,
            "{device}: one LeftZone per excursion"
        );
    }
}

/// Prometheus counter value, 0 when the counter has not been touched yet.
/// Readings of `devices` stored so far (their `ReadingRecorded` events).
async fn stored_readings(engine: &Engine, devices: &[String]) -> usize {
    let mut stored = 0;
    for device in devices {
        let history = engine.try_history(device).await.unwrap_or_default();
        stored += history
            .iter()
            .filter(|e| e["type"] == "ReadingRecorded")
            .count();
    }
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_acks_exactly_what_it_stored_and_the_rest_is_processed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("sigterm");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let data = dir.path().join("data");
    let mut engine = start_engine(&data, &names, &[]).await;

    const DEVICES: usize = 100;
    const PER_DEVICE: usize = 100;
    let devices: Vec<String> = (0..DEVICES).map(|d| format!("term-{d}")).collect();
    let mut messages = Vec::with_capacity(DEVICES * PER_DEVICE);
    for i in 0..PER_DEVICE {
        for device in &devices {
            let lat = DEPOT.0 + i as f64 * 0.001;
            messages.push((
                device.clone(),
                body(&reading(device, i as i64, lat, DEPOT.1, 5.0)),
            ));
        }
    }
    // Published in paced chunks, so the stream is still flowing when the engine is stopped.
    let exchange = names.exchange.clone();
    let stream = tokio::spawn(async move {
        let publisher = Publisher::must_connect(&exchange).await;
        for chunk in messages.chunks(200) {
            publisher.publish_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually(
        Duration::from_secs(60),
        "a part of the stream processed",
        || async {
            (engine.metric("fleetwatch_amqp_processed_total").await > 2_000.0).then_some(())
        },
    )
    .await;
    let status = engine.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    stream.await.expect("every reading published");

    // Stopped cleanly: every reading it stored was acked (so none is left on the queue to come
    // back as a duplicate) and every reading it did not store is back on the queue.
    let left = publisher.depth(&names.queue).await as usize;
    let mut offline = Engine::start(&data).await;
    let stored = stored_readings(&offline, &devices).await;
    assert!(
        stored > 0 && left > 0,
        "stopped mid-stream: {stored} stored, {left} queued"
    );
    assert_eq!(
        stored + left,
        DEVICES * PER_DEVICE,
        "stored ({stored}) and still queued ({left}) add up to what was published; engine log:\n{}",
        engine.log_tail()
    );
    offline.terminate();
    drop(offline);

    engine.restart().await;
    engine.wait_broker_connected().await;
    for device in &devices {
        engine
            .wait_until_stored(device, PER_DEVICE as i64 - 1)
            .await;
    }
    assert_eq!(
        stored_readings(&engine, &devices).await,
        DEVICES * PER_DEVICE
    );
    assert_eq!(
        engine.metric("fleetwatch_readings_duplicate_total").await,
        0.0,
        "nothing stored before the shutdown was delivered again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_the_engine_keeps_failing_on_is_retried_a_bounded_number_of_times_then_dead_lettered(
) {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("failing");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let data = dir.path().join("data");
    let retries = ["--amqp-max-retries", "2"];
    let mut engine = start_engine(&data, &names, &retries).await;
    for device in ["sound-1", "damaged-1"] {
        publisher
            .publish(device, &body(&reading(device, 0, DEPOT.0, DEPOT.1, 5.0)))
            .await
            .unwrap();
        engine.wait_until_stored(device, 0).await;
    }
    assert!(engine.terminate().success());

    // Damage one device's stored history, as a bad disk would.
    damage_events(&data, "damaged-1", None);

    engine.restart().await;
    engine.wait_broker_connected().await;
    for device in ["damaged-1", "sound-1"] {
        publisher
            .publish(device, &body(&reading(device, 1, DEPOT.0, DEPOT.1, 5.5)))
            .await
            .unwrap();
    }
    engine.wait_until_stored("sound-1", 1).await;

    let dead = eventually(
        Duration::from_secs(30),
        "the reading of the damaged device to be dead-lettered",
        || async {
            let dead = publisher.drain(&names.dead()).await;
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1, "only the damaged device's reading");
    let reason = dead[0].1.clone().expect("a reason header");
    assert!(
        reason.contains("engine failed 3 times") && reason.contains("damaged-1@"),
        "the reason names the attempts and the unreadable event: {reason}"
    );
    assert_eq!(
        engine.metric("fleetwatch_amqp_retries_total").await,
        2.0,
        "requeued twice (--amqp-max-retries 2), then dead-lettered"
    );
    // Recorded once the engine has the broker's confirm of the dead letter, which can be just
    // after the dead letter itself reached the queue.
    let failed = eventually(
        Duration::from_secs(10),
        "the dead-lettered reading to be listed as failed",
        || async {
            let failed = engine.get("/api/failed-messages").await;
            (failed.as_array().is_some_and(|f| !f.is_empty())).then_some(failed)
        },
    )
    .await;
    assert_eq!(failed[0]["routing_key"], "damaged-1", "{failed}");
    // Stopped, the engine hands back whatever it has not acked: nothing was left hanging.
    assert!(engine.terminate().success());
    assert_eq!(
        publisher.depth(&names.queue).await,
        0,
        "nothing blocks the queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_dead_lettered_unread() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("oversize");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let engine = start_engine(
        &dir.path().join("data"),
        &names,
        &["--amqp-max-message-bytes", "1024"],
    )
    .await;
    // A valid reading, padded past the limit with whitespace.
    let mut large = body(&reading("big-1", 0, DEPOT.0, DEPOT.1, 5.0));
    large.extend(std::iter::repeat_n(b' ', 2000));
    publisher.publish("big-1", &large).await.unwrap();
    publisher
        .publish("big-1", &body(&reading("big-1", 1, DEPOT.0, DEPOT.1, 5.0)))
        .await
        .unwrap();
    engine.wait_until_stored("big-1", 1).await;
    let dead = eventually(Duration::from_secs(30), "a dead letter", || async {
        let dead = publisher.drain(&names.dead()).await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, large, "the message itself is kept");
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(
        reason.contains("larger than 1024") && reason.contains("--amqp-max-message-bytes"),
        "{reason}"
    );
    assert_eq!(engine.stored_reading_times("big-1").await.len(), 1);
}
