//! A damaged stored history is contained: one device's unreadable event makes that device answer
//! an error naming the event while the rest of the fleet keeps working; an unreadable `$rules`
//! event stops the start with a report; `fleetwatch verify` finds both offline.

mod common;

use std::path::Path;
use std::time::Duration;

use common::sse::{Next, SseReader};
use common::*;
use serde_json::Value;

/// Breaks the stored data of one event of a stopped engine's store; returns its position.
fn damage(data_dir: &Path, stream: &str, version: u64) -> u64 {
    damage_events(data_dir, stream, Some(version))
}

fn verify(data_dir: &Path) -> (Option<i32>, String) {
    let dir = data_dir.to_str().unwrap();
    let out = run_to_exit(&["verify", "--data-dir", dir], Duration::from_secs(60));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

async fn get(engine: &Engine, path: &str) -> (u16, Value) {
    let r = client().get(engine.url(path)).send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_device_event_is_reported_and_the_rest_of_the_fleet_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut engine = Engine::start(&data).await;
    assert_eq!(engine.post("/api/zones", &depot_zone()).await.0, 201);
    let mut stored = 1; // the zone
    let mut versions = Vec::new();
    for device in ["a-sound", "b-damaged", "c-sound"] {
        for secs in 0..2 {
            let r = reading(device, secs, DEPOT.0, DEPOT.1, 5.0 + secs as f64);
            assert_eq!(engine.post("/api/readings", &r).await.0, 202);
        }
        let events = engine.history(device).await.len();
        stored += events;
        versions.push(events as u64);
    }
    assert!(engine.terminate().success());
    let position = damage(&data, "b-damaged", 2);

    let (code, report) = verify(&data);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains(&format!(
            "damaged event: stream b-damaged, version 2, position {position}"
        )),
        "{report}"
    );
    assert_eq!(
        report.matches("damaged event:").count(),
        1,
        "only the damaged one: {report}"
    );

    engine.restart().await;
    let names_the_event =
        |text: &str| text.contains("b-damaged@2") && text.contains(&format!("position {position}"));

    // The damaged device answers an error naming its stream, version and position.
    let (status, body) = get(&engine, "/api/devices/b-damaged").await;
    assert_eq!(status, 500, "{body}");
    assert!(names_the_event(body["error"].as_str().unwrap()), "{body}");

    // The device list keeps the others, and lists the damaged one with its error.
    let (status, page) = get(&engine, "/api/devices").await;
    assert_eq!(status, 200, "{page}");
    let devices = page["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a-sound", "b-damaged", "c-sound"]);
    assert!(
        names_the_event(devices[1]["error"].as_str().unwrap()),
        "{page}"
    );
    assert!(
        devices[1].get("status").is_none(),
        "no state for it: {page}"
    );
    for sound in [&devices[0], &devices[2]] {
        assert_eq!(sound["status"], "normal", "{page}");
        let index = ids.iter().position(|id| *id == sound["device_id"]).unwrap();
        assert_eq!(sound["version"], versions[index], "{page}");
        assert!(sound.get("error").is_none(), "{page}");
    }
    // Paged one by one, the page holding the damaged device still answers.
    let (status, one) = get(&engine, "/api/devices?after=a-sound&limit=1").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["next_after"], "b-damaged", "{one}");

    // Its history is served, the damaged payload as the stored text.
    let (status, history) = get(&engine, "/api/devices/b-damaged/events").await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["events"][1]["data"], "{broken", "{history}");

    // The live stream replays past the damaged event and keeps streaming.
    let response = reqwest::Client::new()
        .get(engine.url("/api/stream?since=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = SseReader::new(response);
    let mut replayed = Vec::new();
    while replayed.len() < stored {
        match sse.next(Duration::from_secs(10)).await {
            Next::Block(block) => replayed.push(block),
            other => panic!("the stream stopped after {replayed:?}: {other:?}"),
        }
    }
    let broken = replayed
        .iter()
        .find(|b| b.id == Some(position))
        .expect("the damaged event is sent");
    let envelope: Value = serde_json::from_str(broken.data.as_deref().unwrap()).unwrap();
    assert_eq!(envelope["data"], "{broken", "{envelope}");
    assert_eq!(envelope["stream"], "b-damaged");

    // Ingest for the other devices works, and reaches the live stream.
    let r = reading("c-sound", 2, DEPOT.0, DEPOT.1, 9.0);
    let (status, body) = engine.post("/api/readings", &r).await;
    assert_eq!(status, 202, "{body}");
    let live = loop {
        match sse.next(Duration::from_secs(10)).await {
            Next::Block(block)
                if block.event.as_deref() == Some("ReadingRecorded")
                    && block.data.as_deref().is_some_and(|d| d.contains("c-sound")) =>
            {
                break block
            }
            Next::Block(_) => continue,
            other => panic!("no live event after the damaged one: {other:?}"),
        }
    };
    assert!(live.data.unwrap().contains("c-sound"));
    // A reading for the damaged device is refused with the same error, not applied.
    let r = reading("b-damaged", 2, DEPOT.0, DEPOT.1, 5.0);
    let (status, body) = engine.post("/api/readings", &r).await;
    assert_eq!(status, 500, "{body}");
    assert!(names_the_event(body["error"].as_str().unwrap()), "{body}");

    let (status, _) = get(&engine, "/api/health").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_rules_events_stop_the_start_with_a_report_of_each() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut engine = Engine::start(&data).await;
    let zone = |id: &str| {
        let mut zone = depot_zone();
        zone["id"] = id.into();
        zone
    };
    for id in ["z1", "z2", "z3"] {
        assert_eq!(engine.post("/api/zones", &zone(id)).await.0, 201);
    }
    let r = reading("d-1", 0, DEPOT.0, DEPOT.1, 5.0);
    assert_eq!(engine.post("/api/readings", &r).await.0, 202);
    let stored = 3 + engine.history("d-1").await.len();
    assert!(engine.terminate().success());

    let (code, report) = verify(&data);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains(&format!("checked {stored} events and 0 snapshots: clean")),
        "{report}"
    );

    let first = damage(&data, "$rules", 1);
    let third = damage(&data, "$rules", 3);
    let dir_str = data.to_str().unwrap();
    let started = run_to_exit(
        &[
            "--data-dir",
            dir_str,
            "--http-addr",
            "127.0.0.1:0",
            "--amqp-disabled",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(started.status.code(), Some(1), "refuses to start");
    let log = String::from_utf8_lossy(&started.stderr);
    for (version, position) in [(1, first), (3, third)] {
        assert!(
            log.contains(&format!("$rules@{version} (position {position}")),
            "the log names every damaged rules event: {log}"
        );
    }
    assert!(!log.contains("listening"), "it never served: {log}");

    let before = std::fs::read(data.join("events.sqlite3")).unwrap();
    let (code, report) = verify(&data);
    assert_eq!(code, Some(1), "{report}");
    for (version, position) in [(1, first), (3, third)] {
        assert!(
            report.contains(&format!(
                "damaged event: stream $rules, version {version}, position {position}, type ZoneDefined"
            )),
            "{report}"
        );
    }
    assert_eq!(
        std::fs::read(data.join("events.sqlite3")).unwrap(),
        before,
        "verify writes nothing"
    );

    let (code, report) = verify(&dir.path().join("no-store-here"));
    assert_eq!(code, Some(2), "{report}");
    assert!(report.contains("no event store"), "{report}");
    assert!(!dir.path().join("no-store-here").exists());
}
