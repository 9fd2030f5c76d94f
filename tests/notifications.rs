//! Alarm notifications through the real engine: webhooks to a receiver running in the test (one
//! that fails for a while, one that hangs while the engine is SIGKILLed, one that always fails
//! beside healthy ones), the webhook API's validation and access, and a real RabbitMQ consumer
//! bound to the alarms exchange.
//!
//! Readings carry the current time: alarms open and clear at once (no dwell), so each device
//! below makes five alarm changes: outside-zone and temperature alarms opened, the outside-zone
//! one acknowledged, both cleared.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::amqp::{eventually, Names};
use common::relay::Relay;
use common::*;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "webhook-test-secret";
const CHANGES_PER_DEVICE: usize = 5;

// ---------------------------------------------------------------------------------------------
// A webhook receiver

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers 500.
    Fail,
    /// Takes the delivery and answers 200.
    Accept,
    /// Takes the delivery and never answers (the engine is killed meanwhile).
    Hang,
}

/// One request the receiver took (answered 200, or held without an answer).
#[derive(Debug, Clone)]
struct Got {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn key(&self) -> (String, u64) {
        let body = self.json();
        (
            body["alarm_id"].as_str().unwrap().to_owned(),
            body["sequence"].as_u64().unwrap(),
        )
    }
}

#[derive(Clone)]
struct Receiver {
    url: String,
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Vec<Got>>>,
    failed: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let receiver = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            mode: Arc::new(Mutex::new(mode)),
            got: Arc::default(),
            failed: Arc::default(),
        };
        let serving = receiver.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serving.clone().handle(socket));
            }
        });
        receiver
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn failed(&self) -> usize {
        *self.failed.lock().unwrap()
    }

    /// One request per connection (answered with `Connection: close`).
    async fn handle(self, mut socket: TcpStream) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        assert!(
            request_line.starts_with("POST /hook "),
            "unexpected request: {request_line}"
        );
        let got = Got {
            headers,
            body: buffer[head_end..head_end + length].to_vec(),
        };
        let mode = *self.mode.lock().unwrap();
        let status = match mode {
            Mode::Fail => {
                *self.failed.lock().unwrap() += 1;
                "500 Internal Server Error"
            }
            Mode::Accept => {
                self.got.lock().unwrap().push(got);
                "200 OK"
            }
            Mode::Hang => {
                self.got.lock().unwrap().push(got);
                // Until the engine goes away.
                let _ = socket.read(&mut chunk).await;
                return;
            }
        };
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = socket.write_all(answer.as_bytes()).await;
        let _ = socket.shutdown().await;
    }
}

/// The deliveries without repeats, by `(alarm_id, sequence)`, in the order first received.
fn deduplicated(got: &[Got]) -> Vec<Got> {
    let mut seen = HashSet::new();
    got.iter()
        .filter(|g| seen.insert(g.key()))
        .cloned()
        .collect()
}

fn check_signature(got: &Got, secret: &str) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&got.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        got.headers
            .get("x-fleetwatch-signature")
            .map(String::as_str),
        Some(format!("sha256={expected}").as_str()),
        "signature of {}",
        String::from_utf8_lossy(&got.body)
    );
}

/// Headers and body agree, and the body has what docs/api.md promises.
fn check_delivery(got: &Got) {
    let body = got.json();
    let (alarm, sequence) = got.key();
    assert_eq!(got.headers.get("x-fleetwatch-alarm-id"), Some(&alarm));
    assert_eq!(
        got.headers.get("x-fleetwatch-sequence"),
        Some(&sequence.to_string())
    );
    assert_eq!(
        got.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let device = body["device_id"].as_str().unwrap();
    assert!(alarm.starts_with(&format!("{device}.")), "{body}");
    assert!(body["position"].as_u64().is_some(), "{body}");
    assert!(body["at"].as_str().is_some(), "{body}");
    assert_eq!(body["severity"], "warning", "{body}");
    match body["kind"].as_str().unwrap() {
        "outside_zone" => assert_eq!(body["zone_id"], "depot", "{body}"),
        "temperature_out_of_range" => assert_eq!(body["range_id"], "cold-chain", "{body}"),
        other => panic!("unexpected kind {other}: {body}"),
    }
    match body["change"].as_str().unwrap() {
        "opened" => {
            assert_eq!(sequence, 1);
            assert!(body["cause_version"].as_u64().is_some(), "{body}");
        }
        "acknowledged" => {
            assert_eq!(body["by"], "anonymous", "{body}");
            assert_eq!(body["comment"], "on it", "{body}");
        }
        "cleared" => assert!(body.get("by").is_none(), "{body}"),
        other => panic!("unexpected change {other}: {body}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Making alarm changes

fn now_reading(device: &str, lat: f64, lon: f64, temperature: f64) -> Value {
    json!({
        "device_id": device,
        "timestamp": Utc::now().to_rfc3339(),
        "lat": lat,
        "lon": lon,
        "temperature": temperature,
    })
}

async fn post_reading(engine: &Engine, reading: Value) {
    let (status, answer) = engine.post("/api/readings", &reading).await;
    assert_eq!(status, 202, "{answer}");
}

async fn alarm_events(engine: &Engine, device: &str) -> Vec<Value> {
    engine
        .try_history(device)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            ["AlarmOpened", "AlarmAcknowledged", "AlarmCleared"]
                .contains(&e["type"].as_str().unwrap_or_default())
        })
        .collect()
}

/// Opens an outside-zone and a temperature alarm on `device`, acknowledges the first, then
/// clears both: five changes, all durable when this returns.
async fn make_alarm_changes(engine: &Engine, device: &str) {
    post_reading(engine, now_reading(device, DEPOT.0, DEPOT.1, 5.0)).await;
    post_reading(engine, now_reading(device, DEPOT.0 + 0.1, DEPOT.1, 12.0)).await;
    let opened = eventually(Duration::from_secs(20), "two opened alarms", || async {
        let events = alarm_events(engine, device).await;
        (events.len() == 2).then_some(events)
    })
    .await;
    let outside = opened
        .iter()
        .find(|e| e["data"]["kind"] == "outside_zone")
        .expect("an outside-zone alarm");
    let id = outside["data"]["alarm_id"].as_str().unwrap();
    let (status, answer) = engine
        .post(
            &format!("/api/alarms/{id}/ack"),
            &json!({"comment": "on it"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    post_reading(engine, now_reading(device, DEPOT.0, DEPOT.1, 5.0)).await;
    eventually(Duration::from_secs(20), "five alarm changes", || async {
        (alarm_events(engine, device).await.len() == CHANGES_PER_DEVICE).then_some(())
    })
    .await;
}

/// Every alarm change of these devices as `(alarm_id, sequence)`, in store order.
async fn expected_changes(engine: &Engine, devices: &[String]) -> Vec<(String, u64)> {
    let mut all = Vec::new();
    for device in devices {
        for event in alarm_events(engine, device).await {
            let data = &event["data"];
            let sequence = data["sequence"].as_u64().unwrap_or(1);
            all.push((
                event["position"].as_u64().unwrap(),
                data["alarm_id"].as_str().unwrap().to_owned(),
                sequence,
            ));
        }
    }
    all.sort();
    all.into_iter().map(|(_, id, seq)| (id, seq)).collect()
}

async fn create_webhook(engine: &Engine, body: Value) -> String {
    let (status, created) = engine.post("/api/webhooks", &body).await;
    assert_eq!(status, 201, "{created}");
    assert!(
        created.get("secret").is_none(),
        "the secret is never shown: {created}"
    );
    assert_eq!(
        created["has_secret"],
        body.get("secret").is_some(),
        "{created}"
    );
    created["id"].as_str().unwrap().to_owned()
}

async fn webhook_status(engine: &Engine, id: &str) -> Value {
    engine.get(&format!("/api/webhooks/{id}")).await
}

/// Waits until `receiver` holds `n` distinct changes (after de-duplication).
async fn wait_for_distinct(receiver: &Receiver, n: usize, within: Duration) -> Vec<Got> {
    eventually(within, &format!("{n} distinct deliveries"), || async {
        let distinct = deduplicated(&receiver.got());
        assert!(
            distinct.len() <= n,
            "more changes than made: {}",
            distinct.len()
        );
        (distinct.len() == n).then_some(distinct)
    })
    .await
}

fn keys(got: &[Got]) -> Vec<(String, u64)> {
    got.iter().map(Got::key).collect()
}

/// In store order: positions strictly increase.
fn assert_in_order(got: &[Got]) {
    let positions: Vec<u64> = got
        .iter()
        .map(|g| g.json()["position"].as_u64().unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "out of order: {positions:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_webhook_that_fails_for_a_while_gets_every_change_in_order_once_each_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--webhook-retry-max", "1s"],
    )
    .await;
    engine.create_depot_and_cold_chain().await;
    let receiver = Receiver::start(Mode::Fail).await;
    let id = create_webhook(&engine, json!({"url": receiver.url, "secret": SECRET})).await;
    let listed = engine.get("/api/webhooks").await;
    assert_eq!(listed["webhooks"][0]["id"], id.as_str(), "{listed}");

    // Failing: the changes wait, and the webhook shows why.
    let mut devices: Vec<String> = (1..=3).map(|n| format!("hook-truck-{n}")).collect();
    for device in &devices {
        make_alarm_changes(&engine, device).await;
    }
    let failing = eventually(Duration::from_secs(20), "failed attempts", || async {
        let status = webhook_status(&engine, &id).await;
        (status["delivery"]["attempts"].as_u64() >= Some(3)).then_some(status)
    })
    .await;
    let delivery = &failing["delivery"];
    assert!(
        delivery["last_error"].as_str().unwrap().contains("500"),
        "{failing}"
    );
    assert!(delivery["last_error_at"].is_string(), "{failing}");
    assert!(
        delivery["backlog_positions"].as_u64() > Some(0),
        "{failing}"
    );
    assert_eq!(delivery["delivered"], 0, "{failing}");
    assert!(receiver.failed() >= 3);
    assert!(receiver.got().is_empty());

    // Healthy again: everything arrives, in order.
    receiver.set(Mode::Accept);
    let expected = expected_changes(&engine, &devices).await;
    assert_eq!(expected.len(), devices.len() * CHANGES_PER_DEVICE);
    let distinct = wait_for_distinct(&receiver, expected.len(), Duration::from_secs(30)).await;
    assert_eq!(keys(&distinct), expected);
    let caught_up = eventually(
        Duration::from_secs(10),
        "the webhook up to date",
        || async {
            let status = webhook_status(&engine, &id).await;
            (status["delivery"]["attempts"] == 0 && status["delivery"]["delivered"] == 15)
                .then_some(status)
        },
    )
    .await;
    assert!(
        caught_up["delivery"]["last_delivered_at"].is_string(),
        "{caught_up}"
    );
    assert_eq!(
        caught_up["delivery"]["last_delivered"]["alarm_id"],
        expected.last().unwrap().0.as_str(),
        "{caught_up}"
    );

    // Killed while a delivery is in flight: taken by the receiver, never answered.
    receiver.set(Mode::Hang);
    let before = receiver.got().len();
    let late = "hook-truck-4".to_owned();
    make_alarm_changes(&engine, &late).await;
    devices.push(late);
    eventually(Duration::from_secs(20), "a delivery in flight", || async {
        (receiver.got().len() > before).then_some(())
    })
    .await;
    engine.kill();
    receiver.set(Mode::Accept);
    engine.restart().await;
    let expected = expected_changes(&engine, &devices).await;
    assert_eq!(expected.len(), devices.len() * CHANGES_PER_DEVICE);
    let distinct = wait_for_distinct(&receiver, expected.len(), Duration::from_secs(30)).await;
    assert_eq!(keys(&distinct), expected, "every change, in order, once");
    assert_in_order(&distinct);
    let all = receiver.got();
    assert_eq!(
        all.len(),
        distinct.len() + 1,
        "only the change in flight at the kill is delivered again: {:?}",
        keys(&all)
    );
    for got in &all {
        check_signature(got, SECRET);
        check_delivery(got);
    }
    // Per alarm, its changes in sequence.
    let mut last: HashMap<String, u64> = HashMap::new();
    for (alarm, sequence) in keys(&distinct) {
        let previous = last.insert(alarm.clone(), sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "{alarm}");
    }

    // Deleted: nothing more.
    let deleted = engine
        .request(reqwest::Method::DELETE, &format!("/api/webhooks/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = engine
        .request(reqwest::Method::GET, &format!("/api/webhooks/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let total = receiver.got().len();
    make_alarm_changes(&engine, "hook-truck-5").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.got().len(),
        total,
        "a deleted webhook gets nothing"
    );
}

#[tokio::test]
async fn a_failing_webhook_does_not_delay_healthy_ones_and_filters_pick_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(&dir.path().join("data")).await;
    engine.create_depot_and_cold_chain().await;
    let failing = Receiver::start(Mode::Fail).await;
    // Takes a delivery and never answers: the engine gives up on it after 10 s.
    let hanging = Receiver::start(Mode::Hang).await;
    let healthy = Receiver::start(Mode::Accept).await;
    let zones = Receiver::start(Mode::Accept).await;
    let failing_id = create_webhook(&engine, json!({"url": failing.url})).await;
    create_webhook(&engine, json!({"url": hanging.url})).await;
    create_webhook(&engine, json!({"url": healthy.url, "secret": SECRET})).await;
    create_webhook(
        &engine,
        json!({"url": zones.url, "kinds": ["outside_zone"], "severities": ["warning", "critical"], "zones": ["depot"]}),
    )
    .await;
    let devices: Vec<String> = (1..=2).map(|n| format!("mixed-truck-{n}")).collect();
    for device in &devices {
        make_alarm_changes(&engine, device).await;
    }
    let expected = expected_changes(&engine, &devices).await;
    // Delivered as they are made, while the failing one keeps failing.
    let got = wait_for_distinct(&healthy, expected.len(), Duration::from_secs(10)).await;
    assert_eq!(keys(&got), expected);
    for delivery in &healthy.got() {
        check_signature(delivery, SECRET);
        check_delivery(delivery);
    }
    let outside = wait_for_distinct(&zones, 2 * 3, Duration::from_secs(10)).await;
    assert!(outside.iter().all(|g| g.json()["kind"] == "outside_zone"));
    assert!(outside
        .iter()
        .all(|g| !g.headers.contains_key("x-fleetwatch-signature")));
    let status = webhook_status(&engine, &failing_id).await;
    assert!(failing.failed() >= 1, "{status}");
    assert_eq!(status["delivery"]["delivered"], 0, "{status}");
    assert!(
        status["delivery"]["attempts"].as_u64() >= Some(1),
        "{status}"
    );
    assert!(
        status["delivery"]["backlog_positions"].as_u64() > Some(0),
        "{status}"
    );
    assert!(failing.got().is_empty());
    // One change at a time: only the first, however often it is tried (every 10 s).
    let held = hanging.got();
    assert!(!held.is_empty());
    assert!(
        held.iter().all(|g| g.key() == expected[0]),
        "{:?}",
        keys(&held)
    );
    // Readings go on being taken.
    post_reading(&engine, now_reading("mixed-truck-3", DEPOT.0, DEPOT.1, 5.0)).await;
    assert!(
        engine
            .metric("fleetwatch_notify_failures_total{sink=\"webhook\"}")
            .await
            >= 1.0
    );
    // Webhooks waiting out their backoff, or an answer, do not hold up a shutdown.
    let started = std::time::Instant::now();
    assert!(engine.terminate().success(), "{}", engine.log_tail());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_webhook_api_validates_and_needs_the_admin_scope() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--admin-tokens",
            "admin-token",
            "--read-tokens",
            "read-token",
            "--webhook-hosts",
            "127.0.0.1,hooks.example.com",
        ],
    )
    .await
    .with_token("admin-token");
    for (body, field) in [
        (json!({"url": "not a url"}), "url"),
        (json!({"url": "ftp://127.0.0.1/hook"}), "url"),
        (json!({"url": "http://10.9.8.7/hook"}), "url"),
        (json!({}), ""),
        (
            json!({"url": "http://127.0.0.1:9/hook", "kinds": ["smoke"]}),
            "kinds[0]",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "severities": ["high"]}),
            "severities[0]",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "zones": ["no spaces"]}),
            "zones",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "secret": ""}),
            "secret",
        ),
        (
            json!({"url": "http://127.0.0.1:9/hook", "colour": "red"}),
            "",
        ),
    ] {
        let (status, answer) = engine.post("/api/webhooks", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        if !field.is_empty() {
            assert_eq!(answer["field"], field, "{body}: {answer}");
        }
    }
    let id = create_webhook(
        &engine,
        json!({"url": "https://hooks.example.com/fleet", "kinds": ["offline"], "secret": "x"}),
    )
    .await;
    let shown = webhook_status(&engine, &id).await;
    assert_eq!(shown["kinds"], json!(["offline"]), "{shown}");
    assert_eq!(shown["delivery"]["delivered"], 0, "{shown}");
    assert!(shown.get("secret").is_none());

    // URLs and secrets are configuration: a read token sees none of it.
    let reader = client();
    for (method, path) in [
        (reqwest::Method::GET, "/api/webhooks".to_owned()),
        (reqwest::Method::GET, format!("/api/webhooks/{id}")),
        (reqwest::Method::DELETE, format!("/api/webhooks/{id}")),
    ] {
        let r = reader
            .request(method.clone(), engine.url(&path))
            .bearer_auth("read-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    let r = reader
        .post(engine.url("/api/webhooks"))
        .bearer_auth("read-token")
        .json(&json!({"url": "http://127.0.0.1:9/hook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let missing = engine
        .request(reqwest::Method::DELETE, "/api/webhooks/nope")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// A consumer bound with `#` to an alarms exchange of the test's own, on the real broker.
struct AlarmsConsumer {
    exchange: String,
    connection: lapin::Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    /// Every message so far: routing key, body, properties.
    received: Vec<(String, Value, lapin::BasicProperties)>,
}

impl AlarmsConsumer {
    async fn bind(exchange: &str) -> AlarmsConsumer {
        let connection = match lapin::Connection::connect(
            common::amqp::URL,
            lapin::ConnectionProperties::default(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => panic!("RabbitMQ must run on 127.0.0.1:5672 for this test (scripts/test-deps.sh starts it): {e}"),
        };
        let channel = connection.create_channel().await.unwrap();
        fleetwatch::ingest::amqp::declare_exchange(&channel, exchange)
            .await
            .unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.into(),
                "#".into(),
                lapin::options::QueueBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "test".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        AlarmsConsumer {
            exchange: exchange.to_owned(),
            connection,
            channel,
            consumer,
            received: Vec::new(),
        }
    }

    fn distinct(&self) -> Vec<(String, u64)> {
        let mut seen = HashSet::new();
        self.received
            .iter()
            .map(|(_, body, _)| {
                (
                    body["alarm_id"].as_str().unwrap().to_owned(),
                    body["sequence"].as_u64().unwrap(),
                )
            })
            .filter(|key| seen.insert(key.clone()))
            .collect()
    }

    /// Receives until `n` distinct changes have arrived in all.
    async fn receive(&mut self, n: usize, engine: &Engine) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.distinct().len() < n {
            let next = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out: {:?} of {n} changes\n{}",
                        self.distinct(),
                        engine.log_tail()
                    )
                })
                .expect("the consumer ended")
                .expect("a delivery");
            let body: Value = serde_json::from_slice(&next.data).unwrap();
            self.received
                .push((next.routing_key.to_string(), body, next.properties.clone()));
        }
    }

    /// Every message: its routing key, persistent, a change.
    fn check(&self) {
        for (routing_key, body, properties) in &self.received {
            assert_eq!(
                routing_key,
                &format!(
                    "{}.{}.{}",
                    body["kind"].as_str().unwrap(),
                    body["severity"].as_str().unwrap(),
                    body["device_id"].as_str().unwrap()
                )
            );
            assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
            assert!(
                ["opened", "acknowledged", "cleared"].contains(&body["change"].as_str().unwrap())
            );
        }
    }

    async fn close(self) {
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

async fn start_amqp_engine(
    dir: &std::path::Path,
    names: &Names,
    alarms: &str,
    url: Option<&str>,
) -> Engine {
    let mut args = names.engine_args();
    args.extend(["--amqp-alarms-exchange".to_owned(), alarms.to_owned()]);
    if let Some(url) = url {
        args.extend(["--amqp-url".to_owned(), url.to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(&dir.join("data"), &args).await;
    engine.wait_broker_connected().await;
    engine
}

#[tokio::test]
async fn every_alarm_change_is_published_to_the_alarms_exchange() {
    let names = Names::new("alarms");
    let alarms_exchange = format!("{}.alarms", names.exchange);
    let mut consumer = AlarmsConsumer::bind(&alarms_exchange).await;
    let dir = tempfile::tempdir().unwrap();
    let mut engine = start_amqp_engine(dir.path(), &names, &alarms_exchange, None).await;
    engine.create_depot_and_cold_chain().await;
    let mut devices: Vec<String> = (1..=2).map(|n| format!("rabbit-truck-{n}")).collect();
    for device in &devices {
        make_alarm_changes(&engine, device).await;
    }
    // Killed: what was not confirmed is published after the restart, and nothing is lost.
    engine.kill();
    engine.restart().await;
    let late = "rabbit-truck-3".to_owned();
    make_alarm_changes(&engine, &late).await;
    devices.push(late);
    let expected = expected_changes(&engine, &devices).await;
    consumer.receive(expected.len(), &engine).await;
    assert_eq!(consumer.distinct(), expected, "every change, in order");
    consumer.check();
    // Counted once the broker confirms, which may come after the consumer has the message.
    eventually(
        Duration::from_secs(10),
        "the deliveries counted",
        || async {
            (engine
                .metric("fleetwatch_notify_delivered_total{sink=\"amqp\"}")
                .await
                >= 5.0)
                .then_some(())
        },
    )
    .await;
    consumer.close().await;
}

#[tokio::test]
async fn the_alarm_publisher_reconnects_and_loses_nothing_while_the_broker_is_unreachable() {
    let names = Names::new("alarms-relay");
    let alarms_exchange = format!("{}.alarms", names.exchange);
    let mut consumer = AlarmsConsumer::bind(&alarms_exchange).await;
    let relay = Relay::start("127.0.0.1:5672").await;
    let dir = tempfile::tempdir().unwrap();
    let engine = start_amqp_engine(
        dir.path(),
        &names,
        &alarms_exchange,
        Some(&relay.amqp_url()),
    )
    .await;
    engine.create_depot_and_cold_chain().await;
    let first = vec!["relay-truck-1".to_owned()];
    make_alarm_changes(&engine, &first[0]).await;
    let expected = expected_changes(&engine, &first).await;
    consumer.receive(expected.len(), &engine).await;

    // The broker out of reach: changes made now wait for it (HTTP ingest goes on).
    relay.cut();
    let devices = vec!["relay-truck-1".to_owned(), "relay-truck-2".to_owned()];
    make_alarm_changes(&engine, &devices[1]).await;
    eventually(
        Duration::from_secs(20),
        "the publisher to notice",
        || async {
            (engine
                .metric("fleetwatch_notify_failures_total{sink=\"amqp\"}")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    relay.restore();
    let expected = expected_changes(&engine, &devices).await;
    consumer.receive(expected.len(), &engine).await;
    assert_eq!(consumer.distinct(), expected, "every change, in order");
    consumer.check();
    consumer.close().await;
}
