//! Test harness: runs the real `fleetwatch` binary on a free port with its own data directory
//! ([`engine`]), with helpers for its HTTP API. Benchmarks include it too.
#![allow(dead_code)]

pub mod amqp;
pub mod postgres;
pub mod pushpin;
pub mod relay;
pub mod sse;

mod engine;

pub use engine::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};

impl Engine {
    /// The helpers send this bearer token from now on (for engines started with tokens).
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// A request to `path`, with the engine's token if it has one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> Value {
        let r = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("JSON")
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Every event of a device, following pagination.
    pub async fn history(&self, device: &str) -> Vec<Value> {
        self.try_history(device)
            .await
            .unwrap_or_else(|| panic!("{device} has no stored history"))
    }

    /// Every event of a device, following pagination; `None` while it has no stored event.
    pub async fn try_history(&self, device: &str) -> Option<Vec<Value>> {
        let mut events = Vec::new();
        let mut from = 1;
        loop {
            let path = format!("/api/devices/{device}/events?from_version={from}&limit=1000");
            let response = self
                .request(reqwest::Method::GET, &path)
                .send()
                .await
                .expect("GET");
            if response.status() == reqwest::StatusCode::NOT_FOUND && from == 1 {
                return None;
            }
            assert!(
                response.status().is_success(),
                "GET {path}: {}",
                response.status()
            );
            let page: Value = response.json().await.expect("JSON");
            events.extend(page["events"].as_array().cloned().unwrap_or_default());
            match page["next_from_version"].as_u64() {
                Some(next) => from = next,
                None => return Some(events),
            }
        }
    }
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

pub fn reading(device: &str, secs: i64, lat: f64, lon: f64, temperature: f64) -> Value {
    json!({
        "device_id": device,
        "timestamp": (t0() + chrono::Duration::seconds(secs)).to_rfc3339(),
        "lat": lat,
        "lon": lon,
        "temperature": temperature,
    })
}

/// The depot zone used across tests: a 1 km circle around (52.37, 4.89).
pub const DEPOT: (f64, f64) = (52.37, 4.89);

pub fn depot_zone() -> Value {
    json!({"id": "depot", "name": "Depot", "shape": {"type": "circle", "center": {"lat": DEPOT.0, "lon": DEPOT.1}, "radius_m": 1000}})
}

pub fn cold_chain() -> Value {
    json!({"id": "cold-chain", "name": "Cold chain", "min": 2.0, "max": 8.0})
}

pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts that conditions for one zone/range alternate (began, ended, began, ...), and that at
/// most one alarm is open per kind and rule, each cleared once, its changes numbered in order.
pub fn assert_alarms_alternate(device: &str, events: &[Value]) {
    let mut outside = std::collections::HashMap::<String, bool>::new();
    let mut range = std::collections::HashMap::<String, Option<String>>::new();
    // Alarm id → (kind/rule, last sequence), while not cleared.
    let mut open = std::collections::HashMap::<String, (String, u64)>::new();
    for e in events {
        let data = &e["data"];
        match e["type"].as_str() {
            Some("AlarmOpened") => {
                let key = format!("{}/{}", data["kind"], data["rule_id"]);
                assert!(
                    !open.values().any(|(k, _)| *k == key),
                    "{device}: a second open alarm for {key}"
                );
                let id = data["alarm_id"].as_str().unwrap().to_owned();
                assert!(
                    open.insert(id.clone(), (key, 1)).is_none(),
                    "{device}: {id} opened twice"
                );
            }
            Some(change @ ("AlarmAcknowledged" | "AlarmCleared")) => {
                let id = data["alarm_id"].as_str().unwrap();
                let sequence = data["sequence"].as_u64().unwrap();
                let (_, last) = open
                    .get_mut(id)
                    .unwrap_or_else(|| panic!("{device}: {change} of {id}, which is not open"));
                assert_eq!(
                    sequence,
                    *last + 1,
                    "{device}: {change} of {id} out of sequence"
                );
                *last = sequence;
                if change == "AlarmCleared" {
                    open.remove(id);
                }
            }
            Some("LeftZone") => {
                let zone = data["zone_id"].as_str().unwrap().to_owned();
                assert!(
                    !outside.insert(zone.clone(), true).unwrap_or(false),
                    "{device}: LeftZone {zone} raised twice"
                );
            }
            Some("EnteredZone") => {
                let zone = data["zone_id"].as_str().unwrap().to_owned();
                assert!(
                    outside.insert(zone.clone(), false).unwrap_or(false),
                    "{device}: EnteredZone {zone} without LeftZone"
                );
            }
            Some("TemperatureOutOfRange") => {
                let id = data["range_id"].as_str().unwrap().to_owned();
                let bound = data["bound"].as_str().map(str::to_owned);
                let before = range.insert(id.clone(), bound.clone()).flatten();
                assert_ne!(
                    before, bound,
                    "{device}: TemperatureOutOfRange {id} raised twice"
                );
            }
            Some("TemperatureBackInRange") => {
                let id = data["range_id"].as_str().unwrap().to_owned();
                assert!(
                    range.insert(id.clone(), None).flatten().is_some(),
                    "{device}: BackInRange {id} without alarm"
                );
            }
            _ => {}
        }
    }
}

impl Engine {
    /// The reading times (`data.at`) of a device's stored `ReadingRecorded` events, in stream
    /// order; empty while it has none.
    pub async fn stored_reading_times(&self, device: &str) -> Vec<String> {
        self.try_history(device)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|e| e["type"] == "ReadingRecorded")
            .filter_map(|e| e["data"]["at"].as_str().map(str::to_owned))
            .collect()
    }

    /// Lines the engine logged at WARN or ERROR level so far.
    pub fn warnings_logged(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    }

    /// Waits until the engine reports the broker connected.
    pub async fn wait_broker_connected(&self) {
        amqp::eventually(
            Duration::from_secs(30),
            "the engine to connect to RabbitMQ",
            || async { self.broker_connected().await.then_some(()) },
        )
        .await
    }

    /// Whether `/api/health` says the engine is connected to RabbitMQ.
    pub async fn broker_connected(&self) -> bool {
        let health = async {
            self.http
                .get(self.url("/api/health"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        };
        health
            .await
            .is_some_and(|health| health["broker"] == "connected")
    }

    /// Creates the tests' depot zone and cold-chain range, both watching every device.
    pub async fn create_depot_and_cold_chain(&self) {
        let (status, body) = self.post("/api/zones", &depot_zone()).await;
        assert_eq!(status, 201, "creating the depot zone: {body}");
        let (status, body) = self.post("/api/temperature-ranges", &cold_chain()).await;
        assert_eq!(status, 201, "creating the cold-chain range: {body}");
    }

    /// Waits until the reading of `device` at `t0 + secs` is durable (its `ReadingRecorded` is in
    /// the stored history; appends are in order, so everything before it is too), and returns the
    /// device's state. The state alone is not enough: it includes readings whose appends are
    /// still being committed.
    pub async fn wait_until_stored(&self, device: &str, secs: i64) -> Value {
        let expected = (t0() + chrono::Duration::seconds(secs))
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        amqp::eventually(
            Duration::from_secs(60),
            &format!("{device}'s reading {secs} to be stored"),
            || async {
                // A 404 until its first reading is stored (the device's live state, on the other
                // hand, can show that reading while it is still being committed).
                let events = self.try_history(device).await?;
                let last = events
                    .iter()
                    .rev()
                    .find(|e| e["type"] == "ReadingRecorded")?;
                if last["data"]["at"] != expected.as_str() {
                    return None;
                }
                // Read after the history: an actor applies a reading to its state before it
                // issues the append, so this state includes the stored reading.
                self.device(device).await
            },
        )
        .await
    }

    /// The device's state, or `None` while it is unknown.
    pub async fn device(&self, id: &str) -> Option<Value> {
        let r = self
            .request(reqwest::Method::GET, &format!("/api/devices/{id}"))
            .send()
            .await
            .ok()?;
        if r.status().is_success() {
            r.json().await.ok()
        } else {
            None
        }
    }
}

impl Engine {
    /// The value of a metric without labels from `/metrics`; 0 when it has not been recorded yet.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Runs the `fleetwatch` binary with `args` until it exits (it is killed after `timeout`) and
/// returns its exit status, stdout and stderr.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetwatch"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetwatch");
    // Read both pipes while waiting, so a chatty process cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fleetwatch {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Damages the stored payload of `stream`'s event at `version` (every event of the stream when
/// `None`) in a stopped engine's store, as a bad disk would; returns the position of the last one
/// damaged.
pub fn damage_events(data_dir: &Path, stream: &str, version: Option<u64>) -> u64 {
    let db = rusqlite::Connection::open(data_dir.join("events.sqlite3")).expect("open the store");
    let positions: Vec<i64> = db
        .prepare(
            "SELECT e.position FROM events e JOIN streams s ON s.id = e.stream
             WHERE s.name = ?1 AND (?2 IS NULL OR e.version = ?2) ORDER BY e.position",
        )
        .and_then(|mut stmt| {
            stmt.query_map(
                rusqlite::params![stream, version.map(|v| v as i64)],
                |row| row.get(0),
            )?
            .collect()
        })
        .expect("find the events");
    assert!(!positions.is_empty(), "no event of {stream} to damage");
    for position in &positions {
        db.execute(
            "UPDATE events SET payload = CAST('{broken' AS BLOB) WHERE position = ?1",
            [position],
        )
        .expect("damage the event");
    }
    *positions.last().unwrap_or(&0) as u64
}
