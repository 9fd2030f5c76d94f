//! The read side through the real engine: temperature buckets equal to a direct computation over
//! the same readings (also across a SIGKILL), readings by time, zone reports, fleet statistics
//! and top lists.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::amqp::eventually;
use common::*;
use serde_json::{json, Value};

/// Waits until the read models have folded every stored event.
async fn caught_up(engine: &Engine) -> Value {
    eventually(
        Duration::from_secs(30),
        "the read models to catch up",
        || async {
            let stats = engine.get("/api/stats").await;
            (stats["read_models_position"] == stats["store_position"]
                && stats["store_position"].as_u64() > Some(0))
            .then_some(stats)
        },
    )
    .await
}

async fn post_all(engine: &Engine, readings: &[Value]) {
    for batch in readings.chunks(500) {
        let (status, body) = engine.post("/api/readings", &json!(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// A deterministic pseudo-random temperature for reading `i` of device `d`.
fn temperature(d: usize, i: i64) -> f64 {
    let x = ((i as u64).wrapping_mul(2654435761) ^ (d as u64 * 40503)) % 1000;
    ((x as f64) / 10.0 - 20.0 + d as f64).round() / 1.0 + (x % 7) as f64 * 0.25
}

/// `hours` hours of readings every 20 s for `devices` devices, from `t0`.
fn readings(devices: usize, hours: i64) -> Vec<(usize, i64, Value)> {
    let mut out = Vec::new();
    for i in 0..hours * 180 {
        for d in 0..devices {
            let secs = i * 20 + d as i64;
            let lat = DEPOT.0 + (i % 40) as f64 * 1e-4;
            let r = reading(
                &format!("bucket-{d}"),
                secs,
                lat,
                DEPOT.1,
                temperature(d, i),
            );
            out.push((d, secs, r));
        }
    }
    out
}

#[derive(Debug, Default, PartialEq)]
struct Expected {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// count, mean, min, max per bucket start, computed directly from the readings.
fn expected(
    readings: &[(usize, i64, Value)],
    device: usize,
    width: i64,
) -> BTreeMap<i64, Expected> {
    let mut buckets: BTreeMap<i64, Expected> = BTreeMap::new();
    for (d, secs, r) in readings.iter().filter(|(d, ..)| *d == device) {
        let _ = d;
        let at = t0().timestamp() + secs;
        let start = at.div_euclid(width) * width;
        let t = r["temperature"].as_f64().unwrap();
        let b = buckets.entry(start).or_insert(Expected {
            count: 0,
            sum: 0.0,
            min: f64::MAX,
            max: f64::MIN,
        });
        b.count += 1;
        b.sum += t;
        b.min = b.min.min(t);
        b.max = b.max.max(t);
    }
    buckets
}

async fn assert_buckets_match(engine: &Engine, readings: &[(usize, i64, Value)], device: usize) {
    let from = t0().to_rfc3339();
    let to = (t0() + chrono::Duration::hours(4)).to_rfc3339();
    for (bucket, width) in [("minute", 60), ("hour", 3600), ("day", 86_400)] {
        let path = format!(
            "/api/devices/bucket-{device}/temperature?bucket={bucket}&from={}&to={}",
            urlencode(&from),
            urlencode(&to)
        );
        let page = engine.get(&path).await;
        let got: BTreeMap<i64, (u64, f64, f64, f64)> = page["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let start: DateTime<Utc> = b["start"].as_str().unwrap().parse().unwrap();
                (
                    start.timestamp(),
                    (
                        b["count"].as_u64().unwrap(),
                        b["mean"].as_f64().unwrap(),
                        b["min"].as_f64().unwrap(),
                        b["max"].as_f64().unwrap(),
                    ),
                )
            })
            .collect();
        let want = expected(readings, device, width);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{bucket} buckets of bucket-{device}"
        );
        for (start, e) in &want {
            let (count, mean, min, max) = got[start];
            assert_eq!(count, e.count, "{bucket} {start}: count");
            assert!(
                (mean - e.sum / e.count as f64).abs() < 1e-9,
                "{bucket} {start}: mean"
            );
            assert_eq!((min, max), (e.min, e.max), "{bucket} {start}: min, max");
        }
    }
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temperature_buckets_equal_a_direct_computation_also_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(&dir.path().join("data")).await;
    // Three simulated hours for three devices, posted out of order across devices.
    let all = readings(3, 3);
    let (first, second) = all.split_at(all.len() / 2);
    let firsts: Vec<Value> = first.iter().map(|(_, _, r)| r.clone()).collect();
    post_all(&engine, &firsts).await;
    caught_up(&engine).await;
    for d in 0..3 {
        assert_buckets_match(&engine, first, d).await;
    }
    // SIGKILL while readings stream in: whatever the read models folded but did not commit is
    // folded again from their checkpoint, and nothing is counted twice.
    let seconds: Vec<Value> = second.iter().map(|(_, _, r)| r.clone()).collect();
    let (during, after) = seconds.split_at(seconds.len() / 2);
    let posting = {
        let url = engine.url("/api/readings");
        let batch = during.to_vec();
        tokio::spawn(async move {
            for chunk in batch.chunks(100) {
                if client()
                    .post(&url)
                    .json(&json!(chunk))
                    .send()
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    engine.kill();
    let _ = posting.await;
    engine.restart().await;
    // What the killed engine did not acknowledge is sent again, as a client would.
    post_all(&engine, during).await;
    post_all(&engine, after).await;
    caught_up(&engine).await;
    for d in 0..3 {
        assert_buckets_match(&engine, &all, d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_by_time_include_late_ones_in_order_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    for secs in [0, 10, 20, 40] {
        engine
            .post(
                "/api/readings",
                &reading("h-1", secs, DEPOT.0, DEPOT.1, secs as f64 / 10.0),
            )
            .await;
    }
    // Late: arrives after 40 s, dated 30 s.
    engine
        .post("/api/readings", &reading("h-1", 30, DEPOT.0, DEPOT.1, 3.0))
        .await;
    let at = |s: i64| (t0() + chrono::Duration::seconds(s)).to_rfc3339();
    let path = |extra: &str| {
        format!(
            "/api/devices/h-1/readings?from={}&to={}{extra}",
            urlencode(&at(10)),
            urlencode(&at(40))
        )
    };
    let page = engine.get(&path("&limit=2")).await;
    let times = |page: &Value| -> Vec<f64> {
        page["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["temperature"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(times(&page), [1.0, 2.0], "from is inclusive");
    let next = page["next_after"].as_str().unwrap().to_owned();
    let page = engine.get(&path(&format!("&limit=2&after={next}"))).await;
    assert_eq!(
        times(&page),
        [3.0],
        "to is exclusive; the late one is in its place"
    );
    assert_eq!(page["readings"][0]["late"], true);
    assert!(page["next_after"].is_null());
    assert!(page["retention"]["readings_removed_before"].is_null());

    for (query, field) in [
        ("from=yesterday", "from"),
        ("to=2026-13-01T00:00:00Z", "to"),
        ("from=2026-11-24T00:00:00Z&to=2026-11-23T00:00:00Z", "from"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=nonsense", "after"),
    ] {
        let r = client()
            .get(engine.url(&format!("/api/devices/h-1/readings?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let r = client()
        .get(engine.url("/api/devices/h-1/temperature?bucket=minute&from=2026-01-01T00:00:00Z&to=2026-11-23T00:00:00Z"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "too many buckets");
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "from");
    let r = client()
        .get(engine.url("/api/devices/nobody/readings"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_report_equals_one_computed_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    let (status, body) = engine.post("/api/zones", &depot_zone()).await;
    assert_eq!(status, 201, "{body}");
    let out = DEPOT.0 + 0.05;
    // van-1: in at 0, out at 100, in at 160, out at 400, still out at 500.
    // van-2: in throughout. Both registered at 0 (their first reading).
    let track = [
        (0, DEPOT.0),
        (100, out),
        (160, DEPOT.0),
        (400, out),
        (500, out),
    ];
    for (secs, lat) in track {
        engine
            .post("/api/readings", &reading("van-1", secs, lat, DEPOT.1, 5.0))
            .await;
        engine
            .post(
                "/api/readings",
                &reading("van-2", secs, DEPOT.0, DEPOT.1, 5.0),
            )
            .await;
    }
    caught_up(&engine).await;
    let at = |s: i64| urlencode(&(t0() + chrono::Duration::seconds(s)).to_rfc3339());
    // Window 50..450 s: van-1 inside 50..100, outside 100..160, inside 160..400, outside 400..450.
    let report = engine
        .get(&format!(
            "/api/zones/depot/report?from={}&to={}",
            at(50),
            at(450)
        ))
        .await;
    let devices = report["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{report}");
    let by_id = |id: &str| {
        devices
            .iter()
            .find(|d| d["device_id"] == id)
            .unwrap()
            .clone()
    };
    let van1 = by_id("van-1");
    assert_eq!(
        (van1["entries"].as_u64(), van1["exits"].as_u64()),
        (Some(1), Some(2)),
        "{van1}"
    );
    assert_eq!(van1["seconds_inside"], 50.0 + 240.0);
    assert_eq!(van1["seconds_outside"], 60.0 + 50.0);
    let van2 = by_id("van-2");
    assert_eq!(
        (van2["entries"].as_u64(), van2["exits"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        (
            van2["seconds_inside"].as_f64(),
            van2["seconds_outside"].as_f64()
        ),
        (Some(400.0), Some(0.0))
    );
    let r = client()
        .get(engine.url("/api/zones/nowhere/report"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_top_lists_count_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    engine.create_depot_and_cold_chain().await;
    let now = Utc::now() - chrono::Duration::seconds(30);
    let at = |s: i64| (now + chrono::Duration::seconds(s)).to_rfc3339();
    let send = |device: &str, s: i64, lat: f64, temperature: f64| json!({"device_id": device, "timestamp": at(s), "lat": lat, "lon": DEPOT.1, "temperature": temperature});
    let out = DEPOT.0 + 0.05;
    let mut batch = Vec::new();
    // busy: 6 readings, far apart; hot: 3 readings, out of range then back; still: 1 reading.
    for s in 0..6 {
        batch.push(send("busy", s, DEPOT.0 + s as f64 * 0.001, 5.0));
    }
    batch.push(send("hot", 0, DEPOT.0, 5.0));
    batch.push(send("hot", 1, DEPOT.0, 9.5));
    batch.push(send("hot", 2, out, 9.6));
    batch.push(send("still", 0, DEPOT.0, 5.0));
    post_all(&engine, &batch).await;
    let stats = caught_up(&engine).await;
    assert_eq!(stats["devices"]["known"], 3, "{stats}");
    assert_eq!(stats["devices"]["outside_a_zone"], 1, "{stats}");
    assert_eq!(stats["devices"]["out_of_range"], 1, "{stats}");
    assert_eq!(stats["dead_lettered_messages"], 0);
    let readings = engine
        .get("/api/stats/top?by=readings&window=2h&limit=2")
        .await;
    assert_eq!(
        readings["devices"],
        json!([{"device_id": "busy", "value": 6.0}, {"device_id": "hot", "value": 3.0}])
    );
    let alarms = engine.get("/api/stats/top?by=alarms").await;
    assert_eq!(
        alarms["devices"],
        json!([{"device_id": "hot", "value": 2.0}])
    );
    let distance = engine.get("/api/stats/top?by=distance&limit=1").await;
    assert_eq!(distance["devices"][0]["device_id"], "hot");
    for query in ["by=speed", "window=forever", "window=60d", "limit=101"] {
        let r = client()
            .get(engine.url(&format!("/api/stats/top?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
    }
    // The summary of a device that moved: speed and heading from its previous position.
    let summary = engine.get("/api/devices/busy/summary").await;
    assert_eq!(summary["last_hour"]["count"], 6, "{summary}");
    let heading = summary["last"]["heading_deg"].as_f64().unwrap();
    assert!(!(1.0..=359.0).contains(&heading), "north: {summary}");
    assert!(
        summary["last"]["speed_m_per_s"].as_f64().unwrap() > 100.0,
        "111 m in 1 s: {summary}"
    );
    assert!(
        summary["distance_today_m"].as_f64().unwrap() > 500.0
            || now.date_naive() != Utc::now().date_naive()
    );
}

/// The starts of the `bucket` rollups of `path` (a device's or the fleet's) from `from` on.
async fn bucket_starts(engine: &Engine, path: &str, bucket: &str, from: DateTime<Utc>) -> Vec<i64> {
    let to = Utc::now() + chrono::Duration::hours(1);
    let page = engine
        .get(&format!(
            "{path}?bucket={bucket}&from={}&to={}",
            urlencode(&from.to_rfc3339()),
            urlencode(&to.to_rfc3339())
        ))
        .await;
    page["buckets"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|b| {
            b["start"]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap()
                .timestamp()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_past_their_retention_are_removed_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--minute-rollup-retention",
        "3m",
        "--hour-rollup-retention",
        "90m",
    ];
    let engine = Engine::start_with(&dir.path().join("data"), &args).await;
    let now = Utc::now() - chrono::Duration::seconds(1);
    let ago = |minutes: i64| now - chrono::Duration::minutes(minutes);
    let at = |t: DateTime<Utc>, temperature: f64| json!({"device_id": "aging", "timestamp": t.to_rfc3339(), "lat": DEPOT.0, "lon": DEPOT.1, "temperature": temperature});
    post_all(
        &engine,
        &[at(ago(180), 1.0), at(ago(30), 2.0), at(now, 3.0)],
    )
    .await;
    caught_up(&engine).await;
    let minute = |t: DateTime<Utc>| t.timestamp().div_euclid(60) * 60;
    let hour = |t: DateTime<Utc>| t.timestamp().div_euclid(3600) * 3600;
    let from = ago(240);
    // A pass every 18 s (a tenth of the shortest retention): minutes older than 3 min go, hours
    // older than 90 min go, for the device and for the fleet alike.
    let device = "/api/devices/aging/temperature";
    eventually(
        Duration::from_secs(60),
        "old minute rollups to go",
        || async {
            (bucket_starts(&engine, device, "minute", from).await == [minute(now)]).then_some(())
        },
    )
    .await;
    let mut kept_hours = vec![hour(ago(30)), hour(now)];
    kept_hours.dedup();
    eventually(
        Duration::from_secs(60),
        "old hour rollups to go",
        || async {
            (bucket_starts(&engine, device, "hour", from).await == kept_hours).then_some(())
        },
    )
    .await;
    let fleet = "/api/stats/temperature";
    assert_eq!(
        bucket_starts(&engine, fleet, "minute", from).await,
        [minute(now)]
    );
    assert_eq!(
        bucket_starts(&engine, fleet, "hour", from).await,
        kept_hours
    );
    // What is kept is whole: the newest minute still holds its reading.
    let page = engine
        .get(&format!(
            "{device}?bucket=minute&from={}&to={}",
            urlencode(&from.to_rfc3339()),
            urlencode(&(now + chrono::Duration::minutes(1)).to_rfc3339())
        ))
        .await;
    assert_eq!(page["buckets"][0]["count"], 1, "{page}");
    assert_eq!(page["buckets"][0]["max"], 3.0, "{page}");
    // Two minutes and one hour, each of the device and of the fleet.
    assert_eq!(engine.metric("fleetwatch_rollups_removed_total").await, 6.0);
}

/// The nice value of the engine's thread named `name`, and of its main thread.
fn thread_nice(pid: u32, name: &str) -> (i64, i64) {
    let nice = |task: &std::path::Path| -> i64 {
        let stat = std::fs::read_to_string(task.join("stat")).expect("stat");
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let rest = &stat[stat.rfind(')').expect("stat name") + 2..];
        rest.split(' ')
            .nth(16)
            .expect("nice")
            .parse()
            .expect("nice value")
    };
    let tasks = std::path::PathBuf::from(format!("/proc/{pid}/task"));
    let thread = std::fs::read_dir(&tasks)
        .expect("tasks")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name))
        .unwrap_or_else(|| panic!("no thread named {name}"));
    (nice(&thread), nice(&tasks.join(pid.to_string())))
}

/// The read models fold on a thread that gives way to ingest when the cores are saturated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_models_thread_runs_below_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    let (read_models, main) = thread_nice(engine.child.id(), "read-models");
    assert_eq!(read_models, (main + 10).min(19), "read-models thread nice");
}
