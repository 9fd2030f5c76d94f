//! The HTTP API through the real binary: validation errors name the field (and the index in a
//! batch), oversize bodies get 413, zones and ranges have full CRUD with clear 400s, devices page.

mod common;

use common::*;
use serde_json::{json, Value};

async fn send(
    engine: &Engine,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = client().request(method, engine.url(path));
    if let Some(body) = body {
        request = request.json(body);
    }
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_validated_field_by_field_and_nothing_of_a_bad_batch_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;

    let good = reading("v-1", 0, 52.0, 4.0, 5.0);
    let mut bad_lat = reading("v-1", 1, 52.0, 4.0, 5.0);
    bad_lat["lat"] = json!(91.0);
    let (status, body) = engine.post("/api/readings", &json!([good, bad_lat])).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "lat");
    assert_eq!(body["index"], 1);
    assert!(
        body["error"].as_str().unwrap().contains("[-90, 90]"),
        "{body}"
    );
    assert_eq!(
        send(&engine, reqwest::Method::GET, "/api/devices/v-1", None)
            .await
            .0,
        404,
        "nothing applied"
    );

    let cases = [
        (
            json!({"device_id": "v-1", "timestamp": "2026-11-23T12:00:00Z", "lat": 1, "lon": 2}),
            "temperature",
        ),
        (
            json!({"device_id": "v 1", "timestamp": "2026-11-23T12:00:00Z", "lat": 1, "lon": 2, "temperature": 3}),
            "device_id",
        ),
        (
            json!({"device_id": "v-1", "timestamp": "noon", "lat": 1, "lon": 2, "temperature": 3}),
            "timestamp",
        ),
        (
            json!({"device_id": "v-1", "timestamp": "2026-11-23T12:00:00Z", "lat": 1, "lon": "east", "temperature": 3}),
            "lon",
        ),
        (
            json!({"device_id": "v-1", "timestamp": "2026-11-23T12:00:00Z", "lat": 1, "lon": 2, "temperature": 999}),
            "temperature",
        ),
    ];
    for (reading, field) in cases {
        let (status, body) = engine.post("/api/readings", &reading).await;
        assert_eq!(status, 400, "{reading}");
        assert_eq!(body["field"], field, "{body}");
    }
    let r = client()
        .post(engine.url("/api/readings"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let (status, body) = engine.post("/api/readings", &json!([good])).await;
    assert_eq!(
        (
            status,
            body["accepted"].as_u64(),
            body["duplicates"].as_u64()
        ),
        (202, Some(1), Some(0))
    );
    let (_, body) = engine.post("/api/readings", &good).await;
    assert_eq!(body["duplicates"], 1, "a resent reading is a duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_are_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--max-body-bytes", "1024"],
    )
    .await;
    let batch: Vec<Value> = (0..50).map(|i| reading("big", i, 1.0, 1.0, 1.0)).collect();
    let (status, body) = engine.post("/api/readings", &Value::Array(batch)).await;
    assert_eq!(status, 413);
    assert!(body["error"].as_str().unwrap().contains("1024"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_and_ranges_have_crud_and_refuse_invalid_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(&dir.path().join("data")).await;
    use reqwest::Method;

    // Create, conflict, read, list.
    let (status, zone) = engine.post("/api/zones", &depot_zone()).await;
    assert_eq!(status, 201);
    assert_eq!(zone["revision"], 1);
    assert_eq!(engine.post("/api/zones", &depot_zone()).await.0, 409);
    assert_eq!(
        engine.get("/api/zones/depot").await["shape"]["radius_m"],
        1000.0
    );
    let (status, generated) = engine
        .post("/api/zones", &json!({"shape": {"type": "rectangle", "south_west": {"lat": 1, "lon": 1}, "north_east": {"lat": 2, "lon": 2}}}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        generated["id"].as_str().unwrap().len(),
        36,
        "a UUID is generated"
    );
    assert_eq!(engine.get("/api/zones").await.as_array().unwrap().len(), 2);

    // Invalid shapes: 400 with the reason.
    let bow_tie = json!({"shape": {"type": "polygon", "points": [
        {"lat": 0, "lon": 0}, {"lat": 1, "lon": 1}, {"lat": 1, "lon": 0}, {"lat": 0, "lon": 1}]}});
    let (status, body) = engine.post("/api/zones", &bow_tie).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("intersect"),
        "{body}"
    );
    let two_points = json!({"shape": {"type": "polygon", "points": [{"lat": 0, "lon": 0}, {"lat": 1, "lon": 1}]}});
    assert_eq!(engine.post("/api/zones", &two_points).await.0, 400);
    let negative =
        json!({"shape": {"type": "circle", "center": {"lat": 0, "lon": 0}, "radius_m": -1}});
    let (status, body) = engine.post("/api/zones", &negative).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("shape.radius_m"))
    );
    let unknown = json!({"shape": {"type": "hexagon"}});
    assert_eq!(engine.post("/api/zones", &unknown).await.0, 400);

    // Replace keeps the revision; a mismatched id is refused; delete.
    let mut bigger = depot_zone();
    bigger["shape"]["radius_m"] = json!(2000);
    let (status, replaced) = send(&engine, Method::PUT, "/api/zones/depot", Some(&bigger)).await;
    assert_eq!((status, replaced["revision"].as_u64()), (200, Some(1)));
    assert_eq!(
        send(&engine, Method::PUT, "/api/zones/elsewhere", Some(&bigger))
            .await
            .0,
        400
    );
    assert_eq!(
        send(
            &engine,
            Method::DELETE,
            &format!("/api/zones/{}", generated["id"].as_str().unwrap()),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        send(&engine, Method::DELETE, "/api/zones/nope", None)
            .await
            .0,
        404
    );
    assert_eq!(
        send(&engine, Method::GET, "/api/zones/nope", None).await.0,
        404
    );

    // Temperature ranges.
    assert_eq!(
        engine
            .post("/api/temperature-ranges", &cold_chain())
            .await
            .0,
        201
    );
    let (status, body) = engine
        .post("/api/temperature-ranges", &json!({"min": 9, "max": 1}))
        .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("max")));
    let (status, body) = engine
        .post("/api/temperature-ranges", &json!({"min": -500, "max": 1}))
        .await;
    assert_eq!((status, body["field"].as_str()), (400, Some("min")));
    let mut warmer = cold_chain();
    warmer["max"] = json!(10.0);
    assert_eq!(
        send(
            &engine,
            Method::PUT,
            "/api/temperature-ranges/cold-chain",
            Some(&warmer)
        )
        .await
        .0,
        200
    );

    // Everything survives a restart.
    engine.kill();
    engine.restart().await;
    assert_eq!(
        engine.get("/api/zones/depot").await["shape"]["radius_m"],
        2000.0
    );
    assert_eq!(engine.get("/api/zones").await.as_array().unwrap().len(), 1);
    assert_eq!(
        engine.get("/api/temperature-ranges/cold-chain").await["max"],
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_page_in_id_order_and_report_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    assert_eq!(engine.post("/api/zones", &depot_zone()).await.0, 201);
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            reading(
                &format!("d-{i:02}"),
                0,
                if i % 5 == 0 { DEPOT.0 + 0.1 } else { DEPOT.0 },
                DEPOT.1,
                5.0,
            )
        })
        .collect();
    assert_eq!(
        engine.post("/api/readings", &Value::Array(batch)).await.0,
        202
    );

    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = engine
            .get(&format!("/api/devices?limit=10&after={after}"))
            .await;
        for d in page["devices"].as_array().unwrap() {
            seen.push(d["device_id"].as_str().unwrap().to_owned());
            let expected = if d["device_id"].as_str().unwrap().ends_with('0')
                || d["device_id"] == "d-05"
                || d["device_id"] == "d-15"
            {
                "out_of_zone"
            } else {
                "normal"
            };
            assert_eq!(d["status"], expected, "{d}");
        }
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("d-{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        send(
            &engine,
            reqwest::Method::GET,
            "/api/devices?limit=5000",
            None
        )
        .await
        .0,
        400
    );
    // A bad `after` is the query parameter's fault: the error names it, not `device_id`.
    let (status, body) = send(
        &engine,
        reqwest::Method::GET,
        "/api/devices?after=not%20an%20id",
        None,
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("after")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().starts_with("after: "),
        "{body}"
    );
    let (status, body) = send(
        &engine,
        reqwest::Method::GET,
        "/api/devices/d-00/events?from_version=18446744073709551615",
        None,
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("from_version")),
        "a version beyond the store's integers: {body}"
    );
    let (status, body) = send(
        &engine,
        reqwest::Method::GET,
        "/api/devices?limit=many",
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("query"),
        "JSON error for a bad query: {body}"
    );
    let (status, body) = send(&engine, reqwest::Method::GET, "/api/nothing-here", None).await;
    assert_eq!(status, 404);
    assert!(
        body["error"].is_string(),
        "JSON error for an unknown endpoint: {body}"
    );

    let events = engine.get("/api/devices/d-00/events?limit=2").await;
    assert_eq!(
        types(events["events"].as_array().unwrap()),
        ["DeviceRegistered", "ReadingRecorded"]
    );
    assert_eq!(events["next_from_version"], 3);
    assert_eq!(
        send(
            &engine,
            reqwest::Method::GET,
            "/api/devices/ghost/events",
            None
        )
        .await
        .0,
        404
    );
    let health = engine.get("/api/health").await;
    assert_eq!(
        (health["status"].as_str(), health["store"].as_str()),
        (Some("ok"), Some("ok"))
    );
}

/// Containers configure the engine with environment variables only (see docker-compose.yml):
/// the same settings, exercised without containers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log_path = dir.path().join("engine.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetwatch"))
        .env("FLEETWATCH_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("FLEETWATCH_DATA_DIR", dir.path().join("data"))
        .env("FLEETWATCH_AMQP_DISABLED", "true")
        .env("FLEETWATCH_LOG_FORMAT", "json")
        .env("FLEETWATCH_MAX_BODY_BYTES", "1024")
        .env(
            "FLEETWATCH_TILE_URL",
            "https://tiles.example/{z}/{x}/{y}.png",
        )
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = client();
    let health = common::amqp::eventually(
        std::time::Duration::from_secs(30),
        "the engine to answer",
        || async {
            http.get(format!("{base}/api/health"))
                .send()
                .await
                .ok()?
                .json::<Value>()
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(health["broker"], "disabled");
    let config: Value = http
        .get(format!("{base}/api/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["tile_url"], "https://tiles.example/{z}/{x}/{y}.png");
    let batch: Vec<Value> = (0..50).map(|i| reading("env", i, 1.0, 1.0, 1.0)).collect();
    let r = http
        .post(format!("{base}/api/readings"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "FLEETWATCH_MAX_BODY_BYTES applies");
    let _ = child.kill();
    let _ = child.wait();
    let first_line = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        serde_json::from_str::<Value>(&first_line).is_ok(),
        "JSON logs: {first_line}"
    );
    assert!(
        dir.path().join("data/events.sqlite3").exists(),
        "FLEETWATCH_DATA_DIR applies"
    );
}
