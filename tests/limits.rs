//! Limits through the real binary: each one answers its own clear error while the engine keeps
//! answering its health check, and a live stream's place is given back however the stream ends.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::amqp::eventually;
use common::sse::{Next, SseReader};
use common::*;
use serde_json::{json, Value};

async fn send(engine: &Engine, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .request(method, engine.url(path))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn health(engine: &Engine) -> u16 {
    client()
        .get(engine.url("/api/health"))
        .send()
        .await
        .expect("GET /api/health")
        .status()
        .as_u16()
}

/// A convex polygon of `n` distinct vertices (a circle), given open or closed.
fn polygon_zone(id: &str, n: usize, closed: bool) -> Value {
    let mut points: Vec<Value> = (0..n)
        .map(|k| {
            let angle = std::f64::consts::TAU * k as f64 / n as f64;
            json!({"lat": DEPOT.0 + 0.1 * angle.sin(), "lon": DEPOT.1 + 0.1 * angle.cos()})
        })
        .collect();
    if closed {
        points.push(points[0].clone());
    }
    json!({"id": id, "shape": {"type": "polygon", "points": points}})
}

fn watching(mut rule: Value, devices: usize) -> Value {
    let listed: Vec<String> = (0..devices).map(|i| format!("dev-{i}")).collect();
    rule["devices"] = json!(listed);
    rule
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_and_range_limits_answer_400_naming_the_limit_while_health_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--max-zone-vertices",
            "1000",
            "--max-rules",
            "3",
            "--max-rule-devices",
            "5",
        ],
    )
    .await;

    // Far over the vertex limit: refused by counting, while the health check answers.
    let huge = polygon_zone("huge", 20_000, false);
    let ((status, body), health_during) =
        tokio::join!(engine.post("/api/zones", &huge), health(&engine));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "shape.points");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("1000") && error.contains("--max-zone-vertices") && error.contains("20000"),
        "{error}"
    );
    assert_eq!(health_during, 200);
    let (status, body) = engine
        .post("/api/zones", &polygon_zone("over", 1001, true))
        .await;
    assert_eq!(
        (status, body["field"].clone()),
        (400, json!("shape.points"))
    );

    // At the limit, given closed: the closing vertex does not count, so what GET returns can be
    // PUT back.
    let (status, body) = engine
        .post("/api/zones", &polygon_zone("ring", 1000, true))
        .await;
    assert_eq!(status, 201, "{body}");
    let stored = engine.get("/api/zones/ring").await;
    assert_eq!(stored["shape"]["points"].as_array().unwrap().len(), 1001);
    let (status, body) = send(&engine, reqwest::Method::PUT, "/api/zones/ring", &stored).await;
    assert_eq!(status, 200, "{body}");

    // Devices listed in one zone or range.
    let (status, body) = engine.post("/api/zones", &watching(depot_zone(), 6)).await;
    assert_eq!(
        (status, body["field"].clone()),
        (400, json!("devices")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-rule-devices"),
        "{body}"
    );
    let (status, body) = engine
        .post("/api/temperature-ranges", &watching(cold_chain(), 6))
        .await;
    assert_eq!(
        (status, body["field"].clone()),
        (400, json!("devices")),
        "{body}"
    );
    let (status, body) = engine.post("/api/zones", &watching(depot_zone(), 5)).await;
    assert_eq!(status, 201, "{body}");

    // Zones and ranges in total: ring, depot, cold-chain make three.
    let (status, body) = engine.post("/api/temperature-ranges", &cold_chain()).await;
    assert_eq!(status, 201, "{body}");
    let mut another = cold_chain();
    another["id"] = json!("frozen");
    let (status, body) = engine.post("/api/temperature-ranges", &another).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["field"].is_null(),
        "the limit is on no one field: {body}"
    );
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains('3') && error.contains("--max-rules"),
        "{error}"
    );
    let (status, _) = send(
        &engine,
        reqwest::Method::PUT,
        "/api/temperature-ranges/cold-chain",
        &cold_chain(),
    )
    .await;
    assert_eq!(status, 200, "replacing a rule is not adding one");
    let removed = client()
        .delete(engine.url("/api/zones/depot"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    let (status, body) = engine.post("/api/temperature-ranges", &another).await;
    assert_eq!(status, 201, "room again after a removal: {body}");

    assert_eq!(health(&engine).await, 200);
}

/// A client whose connections come from `address` (any 127.0.0.0/8 address is local on Linux).
fn client_from(address: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(address))
        .build()
        .expect("client")
}

async fn open_stream(engine: &Engine, from: [u8; 4]) -> reqwest::Response {
    client_from(from)
        .get(engine.url("/api/stream"))
        .send()
        .await
        .expect("GET /api/stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_are_limited_in_total_and_per_client_and_a_closed_one_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--max-sse-connections",
            "3",
            "--max-sse-per-client",
            "2",
        ],
    )
    .await;
    let (a, b, c) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);

    let first = open_stream(&engine, a).await;
    let second = open_stream(&engine, a).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let refused = open_stream(&engine, a).await;
    assert_eq!(refused.status(), 429, "a third stream of one client");
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-sse-per-client"),
        "{body}"
    );

    let third = open_stream(&engine, b).await;
    assert_eq!(third.status(), 200, "another client has its own share");
    let refused = open_stream(&engine, c).await;
    assert_eq!(refused.status(), 503, "over the total");
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--max-sse-connections"),
        "{body}"
    );
    assert_eq!(engine.metric("fleetwatch_sse_open_streams").await, 3.0);
    assert_eq!(health(&engine).await, 200);

    // A client that goes frees its place at once: a new stream is accepted.
    drop(first);
    eventually(
        Duration::from_secs(10),
        "the closed stream's place",
        || async { (engine.metric("fleetwatch_sse_open_streams").await == 2.0).then_some(()) },
    )
    .await;
    let again = open_stream(&engine, a).await;
    assert_eq!(again.status(), 200);
    assert_eq!(open_stream(&engine, c).await.status(), 503);

    drop((second, third, again));
    eventually(Duration::from_secs(10), "every stream's place", || async {
        (engine.metric("fleetwatch_sse_open_streams").await == 0.0).then_some(())
    })
    .await;
}

/// Connects to `path`, optionally resuming after `last_event_id`.
async fn stream_from(engine: &Engine, path: &str, last_event_id: Option<u64>) -> SseReader {
    let mut request = reqwest::Client::new().get(engine.url(path));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().await.expect("GET stream");
    assert_eq!(response.status(), 200);
    SseReader::new(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_that_runs_out_of_time_ends_at_the_position_it_reached_and_resumes_from_there() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--sse-catch-up-timeout", "1ms"],
    )
    .await;
    // 3,000 devices: 6,000 events (registered + reading), then the one device the client wants.
    for batch in 0..3 {
        let readings: Vec<Value> = (0..1000)
            .map(|i| reading(&format!("bulk-{batch}-{i}"), 0, 52.0, 4.0, 5.0))
            .collect();
        assert_eq!(engine.post("/api/readings", &json!(readings)).await.0, 202);
    }
    assert_eq!(
        engine
            .post("/api/readings", &reading("target", 0, 52.0, 4.0, 5.0))
            .await
            .0,
        202
    );
    let wanted: Vec<u64> = engine
        .history("target")
        .await
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();

    // Each connection scans at least a page, then ends with an `id:` line and no data; resuming
    // from it continues the scan until the wanted events arrive.
    let path = "/api/stream?since=0&devices=target";
    let mut resume = None;
    let mut timeouts = 0;
    let mut received = Vec::new();
    loop {
        let mut sse = stream_from(&engine, path, resume).await;
        let ended_at = loop {
            match sse.next(Duration::from_secs(10)).await {
                Next::Block(block) if block.data.is_some() => {
                    received.push(block);
                    if received.len() == wanted.len() {
                        break None;
                    }
                }
                Next::Block(block) => break block.id,
                Next::Ended => panic!("the stream ended without the position it reached"),
                Next::Quiet => panic!("the stream went quiet after {received:?}"),
            }
        };
        let Some(position) = ended_at else {
            // Caught up: the wanted events, and the stream stays open for live ones.
            assert_eq!(sse.next(Duration::from_millis(500)).await, Next::Quiet);
            break;
        };
        assert!(
            resume.is_none_or(|r| position > r),
            "every connection gets further: {position} after {resume:?}"
        );
        assert!(
            received.iter().all(|b| b.id <= Some(position)),
            "the position covers what was sent"
        );
        assert_eq!(
            sse.next(Duration::from_secs(10)).await,
            Next::Ended,
            "the id line is the last"
        );
        resume = Some(position);
        timeouts += 1;
    }
    assert!(timeouts >= 1, "the 1 ms catch-up timeout was reached");
    assert_eq!(
        received.iter().map(|b| b.id.unwrap()).collect::<Vec<_>>(),
        wanted,
        "exactly the wanted events, once each"
    );
    assert!(
        engine
            .metric("fleetwatch_sse_catch_up_timeouts_total")
            .await
            >= 1.0
    );
}

/// Appends `n` events of one stream into a stopped engine's store, as a long history.
async fn append_history(data_dir: &std::path::Path, stream: &str, n: u64) {
    use fleetwatch::store::{EventStore, NewEvent, SqliteStore, SqliteStoreOptions};
    let store = SqliteStore::open(data_dir, SqliteStoreOptions::default()).unwrap();
    let version = store.stream_version(stream).await.unwrap().unwrap_or(0);
    let filler = NewEvent {
        event_type: "Filler",
        schema_version: 1,
        payload: bytes::Bytes::from_static(b"{}"),
        at: None,
    };
    for chunk in (version..version + n).collect::<Vec<_>>().chunks(1000) {
        store
            .append(stream, chunk[0], vec![filler.clone(); chunk.len()], None)
            .await
            .unwrap();
    }
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_stops_as_soon_as_its_client_goes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut engine = Engine::start(&data).await;
    assert!(engine.terminate().success());
    // Long enough that scanning it for a filter that matches nothing takes a while.
    append_history(&data, "filler", 300_000).await;
    engine.restart().await;

    let response = reqwest::Client::new()
        .get(engine.url("/api/stream?since=0&devices=nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(engine.metric("fleetwatch_sse_open_streams").await, 1.0);
    drop(response);

    eventually(
        Duration::from_secs(10),
        "the stream to be released",
        || async { (engine.metric("fleetwatch_sse_open_streams").await == 0.0).then_some(()) },
    )
    .await;
    assert_eq!(
        engine
            .metric("fleetwatch_sse_catch_up_abandoned_total")
            .await,
        1.0,
        "it stopped during the catch-up, not after finishing it"
    );
    assert_eq!(health(&engine).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_histograms_have_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    assert_eq!(
        engine
            .post("/api/readings", &reading("h-1", 0, 52.0, 4.0, 5.0))
            .await
            .0,
        202
    );
    // The store records a commit's histograms just after it answers the append: poll.
    let text = eventually(
        Duration::from_secs(10),
        "the first commit's samples",
        || async {
            let text = client()
                .get(engine.url("/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("fleetwatch_store_commit_events_bucket")
                .then_some(text)
        },
    )
    .await;
    for histogram in [
        "fleetwatch_store_commit_seconds",
        "fleetwatch_store_commit_events",
    ] {
        let buckets = text
            .lines()
            .filter(|l| l.starts_with(&format!("{histogram}_bucket{{le=")))
            .count();
        assert!(buckets > 5, "{histogram} has buckets: {text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{histogram}_bucket{{le=\"+Inf\"}}"))),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_at_the_in_flight_limit_answers_503_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Every commit takes 3 s, and one reading may be in flight: a second request must wait.
    let engine = Engine::start_with_env(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--max-in-flight",
            "1",
            "--http-ingest-timeout",
            "300ms",
        ],
        &[("FAILPOINTS", "store-commit=sleep(3000)")],
    )
    .await;
    let first = tokio::spawn({
        let url = engine.url("/api/readings");
        async move {
            client()
                .post(url)
                .json(&reading("slow-1", 0, DEPOT.0, DEPOT.1, 5.0))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = std::time::Instant::now();
    let second = client()
        .post(engine.url("/api/readings"))
        .json(&reading("slow-2", 0, DEPOT.0, DEPOT.1, 5.0))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
    assert!(
        waited.elapsed() < Duration::from_millis(2500),
        "answered after its own timeout, not after the slow commit"
    );
    let body: Value = second.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--http-ingest-timeout"),
        "{body}"
    );
    assert_eq!(health(&engine).await, 200, "the engine itself is healthy");
    // The first request got its answer: it was only slow.
    assert_eq!(
        first.await.unwrap(),
        503,
        "300 ms is shorter than its 3 s commit too"
    );
}

#[test]
fn a_prefetch_of_zero_is_refused_at_start() {
    let out = run_to_exit(
        &[
            "--amqp-prefetch",
            "0",
            "--data-dir",
            "/nonexistent/never-created",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--amqp-prefetch"), "{stderr}");
    assert!(!std::path::Path::new("/nonexistent/never-created").exists());
}

#[test]
fn a_store_this_binary_cannot_open_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let out = run_to_exit(
        &[
            "--store",
            "postgres",
            "--data-dir",
            data_dir,
            "--amqp-disabled",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--store-url"), "{stderr}");

    // Nothing answers on port 1: a KurrentDB build fails to reach it, any other build names the
    // feature it lacks.
    let out = run_to_exit(
        &[
            "--store",
            "kurrentdb",
            "--store-url",
            "kurrentdb://127.0.0.1:1?tls=false",
            "--data-dir",
            data_dir,
            "--amqp-disabled",
        ],
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = if cfg!(feature = "kurrentdb") {
        "KurrentDB"
    } else {
        "--features kurrentdb"
    };
    assert!(stderr.contains(expected), "{stderr}");
}
