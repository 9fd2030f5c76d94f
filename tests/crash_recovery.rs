//! The engine is killed with SIGKILL while readings are in flight and restarted on the same data
//! directory: every acknowledged event is back, histories and states are unchanged, and no alarm
//! is raised twice — not even when clients resend everything they were unsure about.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

const DEVICES: usize = 8;
const READINGS: usize = 400;
const PHASE_ONE: usize = 40;

/// Reading `i` of device `d`: in and out of the depot every 5 readings, temperature crossing
/// the cold chain's upper bound every 7.
fn path(d: usize, i: usize) -> Value {
    let outside = (i / 5) % 2 == 1;
    let lat = DEPOT.0
        + if outside {
            0.05
        } else {
            0.001 * (d as f64) / 10.0
        };
    let temperature = if (i / 7) % 2 == 1 { 10.0 } else { 5.0 };
    reading(&format!("truck-{d}"), i as i64, lat, DEPOT.1, temperature)
}

async fn snapshot(engine: &Engine) -> (Vec<Value>, Vec<Vec<Value>>) {
    let mut states = Vec::new();
    let mut histories = Vec::new();
    for d in 0..DEVICES {
        let id = format!("truck-{d}");
        states.push(engine.get(&format!("/api/devices/{id}")).await);
        histories.push(engine.history(&id).await);
    }
    (states, histories)
}

fn recorded_timestamps(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .filter(|e| e["type"] == "ReadingRecorded")
        .map(|e| e["data"]["at"].as_str().unwrap().to_owned())
        .collect()
}

fn timestamp_of(d: usize, i: usize) -> String {
    // The engine stores UTC and prints it as RFC 3339 with `Z`.
    let at = t0() + chrono::Duration::seconds(i as i64);
    let _ = d;
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The device state the API reports must be the fold of its history.
fn assert_state_matches_history(state: &Value, history: &[Value]) {
    let id = state["device_id"].as_str().unwrap();
    assert_eq!(
        state["version"].as_u64().unwrap() as usize,
        history.len(),
        "{id}: version vs history length"
    );
    let last = history
        .iter()
        .rev()
        .find(|e| e["type"] == "ReadingRecorded")
        .expect("a reading");
    assert_eq!(
        state["last_reading"]["timestamp"], last["data"]["at"],
        "{id}: last reading"
    );
    let mut outside = HashSet::new();
    let mut hot = HashSet::new();
    for e in history {
        match e["type"].as_str().unwrap() {
            "LeftZone" => {
                outside.insert(e["data"]["zone_id"].as_str().unwrap().to_owned());
            }
            "EnteredZone" => {
                outside.remove(e["data"]["zone_id"].as_str().unwrap());
            }
            "TemperatureOutOfRange" => {
                hot.insert(e["data"]["range_id"].as_str().unwrap().to_owned());
            }
            "TemperatureBackInRange" => {
                hot.remove(e["data"]["range_id"].as_str().unwrap());
            }
            _ => {}
        }
    }
    let reported: HashSet<String> = state["outside_zones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reported, outside, "{id}: outside zones");
    assert_eq!(
        state["temperature_alarms"].as_array().unwrap().len(),
        hot.len(),
        "{id}: temperature alarms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_loses_no_acknowledged_event_and_raises_no_alarm_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small snapshot interval: restore goes through snapshots and the events after them.
    let mut engine =
        Engine::start_with(&data, &["--amqp-disabled", "--snapshot-every", "16"]).await;
    engine.create_depot_and_cold_chain().await;

    // Phase 1: a quiet history, fully acknowledged.
    for d in 0..DEVICES {
        let batch: Vec<Value> = (0..PHASE_ONE).map(|i| path(d, i)).collect();
        let (status, body) = engine.post("/api/readings", &Value::Array(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    let (_, before_histories) = snapshot(&engine).await;

    // Phase 2: every device streams readings concurrently; SIGKILL lands mid-stream.
    let acked: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let url = engine.url("/api/readings");
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let http = client();
            for start in (PHASE_ONE..READINGS).step_by(4) {
                let batch: Vec<Value> = (start..(start + 4).min(READINGS))
                    .map(|i| path(d, i))
                    .collect();
                match http.post(&url).json(&batch).send().await {
                    Ok(r) if r.status() == 202 => {
                        acked.lock().unwrap().insert(d, start + batch.len());
                    }
                    _ => return,
                }
            }
        }));
    }
    // Let a good part of the stream through, then pull the plug.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let total: usize = acked.lock().unwrap().values().map(|n| n - PHASE_ONE).sum();
        if total >= DEVICES * 60 {
            break;
        }
    }
    engine.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let unfinished = (0..DEVICES)
        .filter(|d| acked.get(d).copied().unwrap_or(PHASE_ONE) < READINGS)
        .count();
    assert!(
        unfinished > 0,
        "the kill should land while readings are in flight"
    );

    engine.restart().await;
    let (states, histories) = snapshot(&engine).await;
    for d in 0..DEVICES {
        let history = &histories[d];
        // Same history: what was there before is there unchanged, positions included.
        assert_eq!(
            &history[..before_histories[d].len()],
            &before_histories[d][..],
            "truck-{d}: history changed"
        );
        // Nothing acknowledged lost.
        let recorded: HashSet<String> = recorded_timestamps(history).into_iter().collect();
        for i in 0..acked.get(&d).copied().unwrap_or(PHASE_ONE) {
            assert!(
                recorded.contains(&timestamp_of(d, i)),
                "truck-{d}: acknowledged reading {i} lost"
            );
        }
        assert_alarms_alternate(&format!("truck-{d}"), history);
        assert_state_matches_history(&states[d], history);
    }

    // Clients resend everything they are unsure of (here: all of it). Acknowledged readings are
    // recognised as duplicates; the rest are applied once.
    for d in 0..DEVICES {
        let batch: Vec<Value> = (0..READINGS).map(|i| path(d, i)).collect();
        let (status, body) = engine.post("/api/readings", &Value::Array(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    let (states, histories) = snapshot(&engine).await;
    for d in 0..DEVICES {
        let recorded = recorded_timestamps(&histories[d]);
        let unique: HashSet<&String> = recorded.iter().collect();
        assert_eq!(
            unique.len(),
            recorded.len(),
            "truck-{d}: a reading was applied twice"
        );
        assert_alarms_alternate(&format!("truck-{d}"), &histories[d]);
        assert_state_matches_history(&states[d], &histories[d]);
    }

    // A second SIGKILL while idle: the restarted engine reports exactly the same states and histories.
    engine.kill();
    engine.restart().await;
    let (states_after, histories_after) = snapshot(&engine).await;
    assert_eq!(histories_after, histories);
    assert_eq!(states_after, states);
}
