//! Access control through the real binary: each scope's tokens allowed and refused over HTTP and
//! the live stream (bearer header and tickets), JSON-only bodies (415), foreign origins refused
//! (403) with CORS headers only for listed ones, and the refusal to listen beyond loopback
//! without admin tokens. Every refused write is checked to have stored nothing.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const INGEST: &str = "ingest-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";
/// Listed under both ingest and read.
const INGEST_AND_READ: &str = "ingest-read-token-0123456789";

async fn start_with_all_scopes(dir: &std::path::Path, extra: &[&str]) -> Engine {
    let ingest = format!("{INGEST},{INGEST_AND_READ}");
    let read = format!("{READ},{INGEST_AND_READ}");
    let mut args = vec![
        "--amqp-disabled",
        "--ingest-tokens",
        &ingest,
        "--admin-tokens",
        ADMIN,
        "--read-tokens",
        &read,
    ];
    args.extend_from_slice(extra);
    Engine::start_with(&dir.join("data"), &args).await
}

/// Sends a request with an optional bearer token and JSON body; returns status, the
/// `WWW-Authenticate` header and the JSON body.
async fn call(
    engine: &Engine,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = client().request(method, engine.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        challenge,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn status(
    engine: &Engine,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> StatusCode {
    call(engine, method, path, token, body).await.0
}

fn zone(id: &str) -> Value {
    let mut zone = depot_zone();
    zone["id"] = json!(id);
    zone
}

/// Zone ids stored, read with the admin token.
async fn zone_ids(engine: &Engine) -> Vec<String> {
    let (status, _, zones) = call(engine, Method::GET, "/api/zones", Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::OK);
    zones
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_is_allowed_and_refused_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_with_all_scopes(dir.path(), &[]).await;
    let ok = StatusCode::OK;

    // Open: health, the page's settings (which say tokens are needed), the page itself.
    assert_eq!(
        status(&engine, Method::GET, "/api/health", None, None).await,
        ok
    );
    let (_, _, config) = call(&engine, Method::GET, "/api/config", None, None).await;
    assert_eq!(
        config["auth"],
        json!({"read": true, "ingest": true, "admin": true})
    );
    assert_eq!(status(&engine, Method::GET, "/", None, None).await, ok);
    assert_eq!(
        status(&engine, Method::GET, "/static/app.js", None, None).await,
        ok
    );

    // No token, or an unknown one: 401 with a Bearer challenge and the JSON error shape.
    let first = reading("acc-1", 0, 52.0, 4.0, 5.0);
    let cases: [(Method, &str, Option<&Value>); 6] = [
        (Method::POST, "/api/readings", Some(&first)),
        (Method::POST, "/api/zones", Some(&zone("z-anon"))),
        (Method::GET, "/api/devices", None),
        (Method::GET, "/api/zones", None),
        (Method::GET, "/metrics", None),
        (Method::POST, "/api/stream/tickets", None),
    ];
    for (method, path, body) in &cases {
        for token in [None, Some("not-a-token"), Some("")] {
            let (status, challenge, error) =
                call(&engine, method.clone(), path, token, *body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{method} {path}");
            assert!(
                error["error"].as_str().is_some(),
                "{method} {path}: {error}"
            );
        }
    }
    // Another scheme is not a bearer token.
    let r = client()
        .get(engine.url("/api/devices"))
        .basic_auth("x", Some(READ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // ingest: posts readings; cannot configure, cannot read.
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/readings",
            Some(INGEST),
            Some(&first)
        )
        .await,
        StatusCode::ACCEPTED
    );
    for (method, path, body) in [
        (Method::POST, "/api/zones", Some(zone("z-ingest"))),
        (Method::PUT, "/api/zones/z-ingest", Some(zone("z-ingest"))),
        (Method::POST, "/api/temperature-ranges", Some(cold_chain())),
        (Method::GET, "/api/devices", None),
        (Method::GET, "/api/devices/acc-1", None),
        (Method::GET, "/metrics", None),
        (Method::POST, "/api/stream/tickets", None),
    ] {
        let (status, _, error) =
            call(&engine, method.clone(), path, Some(INGEST), body.as_ref()).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "ingest token: {method} {path}"
        );
        assert!(
            error["error"].as_str().unwrap().contains("scope"),
            "{error}"
        );
    }
    // The same route spelled with an escape is the same route.
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/zone%73",
            Some(INGEST),
            Some(&zone("z-esc"))
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // read: reads everything, cannot ingest or configure.
    for path in [
        "/api/devices",
        "/api/devices/acc-1",
        "/api/devices/acc-1/events",
        "/api/zones",
        "/api/temperature-ranges",
        "/api/failed-messages",
        "/metrics",
    ] {
        let r = client()
            .get(engine.url(path))
            .bearer_auth(READ)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), ok, "read token: GET {path}");
    }
    let later = reading("acc-1", 10, 52.0, 4.0, 5.0);
    for (method, path, body) in [
        (Method::POST, "/api/readings", Some(later.clone())),
        (Method::POST, "/api/zones", Some(zone("z-read"))),
        (
            Method::PUT,
            "/api/temperature-ranges/cold-chain",
            Some(cold_chain()),
        ),
        (Method::DELETE, "/api/zones/depot", None),
    ] {
        assert_eq!(
            status(&engine, method.clone(), path, Some(READ), body.as_ref()).await,
            StatusCode::FORBIDDEN,
            "read token: {method} {path}"
        );
    }

    // admin: configures and reads (admin grants read), cannot ingest.
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/zones",
            Some(ADMIN),
            Some(&zone("z-admin"))
        )
        .await,
        StatusCode::CREATED
    );
    assert_eq!(
        status(
            &engine,
            Method::PUT,
            "/api/temperature-ranges/cold-chain",
            Some(ADMIN),
            Some(&cold_chain())
        )
        .await,
        ok
    );
    assert_eq!(
        status(
            &engine,
            Method::GET,
            "/api/devices/acc-1",
            Some(ADMIN),
            None
        )
        .await,
        ok
    );
    assert_eq!(
        status(&engine, Method::GET, "/metrics", Some(ADMIN), None).await,
        ok
    );
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/readings",
            Some(ADMIN),
            Some(&later)
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // A token listed under ingest and read has both, and not admin.
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/readings",
            Some(INGEST_AND_READ),
            Some(&later)
        )
        .await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        status(
            &engine,
            Method::GET,
            "/api/devices",
            Some(INGEST_AND_READ),
            None
        )
        .await,
        ok
    );
    assert_eq!(
        status(
            &engine,
            Method::POST,
            "/api/zones",
            Some(INGEST_AND_READ),
            Some(&zone("z-both"))
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // Only the allowed writes were stored: one zone, one range, and acc-1's two readings.
    assert_eq!(zone_ids(&engine).await, vec!["z-admin".to_owned()]);
    let engine = engine.with_token(READ);
    let history = engine.history("acc-1").await;
    let readings: Vec<&Value> = history
        .iter()
        .filter(|e| e["type"] == "ReadingRecorded")
        .collect();
    assert_eq!(readings.len(), 2, "{history:?}");
    assert_eq!(
        engine
            .get("/api/temperature-ranges")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_without_tokens_is_open() {
    let dir = tempfile::tempdir().unwrap();
    // Only admin tokens, passed as the documented environment variables (two, comma-separated;
    // an empty variable sets none).
    let engine = Engine::options()
        .args(["--amqp-disabled"])
        .envs(&[
            ("FLEETWATCH_ADMIN_TOKENS", "first-admin, second-admin"),
            ("FLEETWATCH_READ_TOKENS", ""),
        ])
        .start(&dir.path().join("data"))
        .await;
    let base = &engine.base;
    let config: Value = client()
        .get(format!("{base}/api/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config["auth"],
        json!({"read": false, "ingest": false, "admin": true})
    );
    // Reads and ingest are open, even with a token that is not configured.
    let r = client()
        .post(format!("{base}/api/readings"))
        .json(&reading("open-1", 0, 52.0, 4.0, 5.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = client()
        .get(format!("{base}/api/devices/open-1"))
        .bearer_auth("whatever")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .get(format!("{base}/api/stream?since=0&limit=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("event: DeviceRegistered"));
    // Credentials of any kind are ignored by an open scope.
    let r = client()
        .get(format!("{base}/api/devices"))
        .basic_auth("someone", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Configuration is not.
    let zone_url = format!("{base}/api/zones");
    let r = client()
        .post(&zone_url)
        .json(&zone("z1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for token in ["first-admin", "second-admin"] {
        let r = client()
            .put(format!("{zone_url}/z-{token}"))
            .bearer_auth(token)
            .json(&zone(&format!("z-{token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{token}");
    }
    let zones: Value = client()
        .get(&zone_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(zones.as_array().unwrap().len(), 2, "{zones}");
}

/// The body of a stream request with `limit`, which the engine closes after that many events.
async fn stream_body(
    engine: &Engine,
    query: &str,
    token: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut request = client().get(engine.url(&format!("/api/stream?{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("stream");
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, challenge, response.text().await.unwrap_or_default())
}

async fn ticket(engine: &Engine, token: &str) -> (StatusCode, Value) {
    let r = client()
        .post(engine.url("/api/stream/tickets"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_needs_a_ticket_or_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_with_all_scopes(dir.path(), &["--stream-ticket-ttl", "2s"]).await;
    let (status, _, _) = call(
        &engine,
        Method::POST,
        "/api/readings",
        Some(INGEST),
        Some(&reading("sse-1", 0, 52.0, 4.0, 5.0)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let first_event = "id: 1\nevent: DeviceRegistered\n";

    // A bearer header (scripts, curl): read and admin tokens may, ingest may not.
    for token in [READ, ADMIN] {
        let (status, _, body) = stream_body(&engine, "since=0&limit=1", Some(token)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(first_event), "{body}");
    }
    let (status, _, _) = stream_body(&engine, "since=0&limit=1", Some(INGEST)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Nothing, a wrong ticket, or a long-lived token in the URL: 401.
    for query in [
        "since=0&limit=1".to_owned(),
        "since=0&limit=1&ticket=0123456789abcdef0123456789abcdef".to_owned(),
        format!("since=0&limit=1&ticket={READ}"),
        format!("since=0&limit=1&access_token={READ}"),
        format!("since=0&limit=1&token={READ}"),
    ] {
        let (status, challenge, body) = stream_body(&engine, &query, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{query}");
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        assert!(
            serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(),
            "{body}"
        );
    }

    // A ticket from a read token opens the stream, and again (EventSource reconnects by itself).
    let (status, issued) = ticket(&engine, READ).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(issued["expires_in"], 2);
    let t = issued["ticket"].as_str().unwrap().to_owned();
    assert_eq!(t.len(), 32, "128 random bits in hex: {t}");
    for _ in 0..2 {
        let (status, _, body) =
            stream_body(&engine, &format!("since=0&limit=1&ticket={t}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(first_event), "{body}");
    }
    // Live events arrive too: a stream opened with the ticket gets a reading posted after it.
    let live = client()
        .get(engine.url(&format!(
            "/api/stream?limit=1&types=DeviceRegistered&ticket={t}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let (status, _, _) = call(
        &engine,
        Method::POST,
        "/api/readings",
        Some(INGEST),
        Some(&reading("sse-2", 0, 52.0, 4.0, 5.0)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let body = tokio::time::timeout(Duration::from_secs(10), live.text())
        .await
        .expect("the live event")
        .unwrap();
    assert!(body.contains("\"stream\":\"sse-2\""), "{body}");

    // A ticket is for the stream only: it is no token elsewhere.
    let r = client()
        .get(engine.url(&format!("/api/devices?ticket={t}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&engine, Method::GET, "/api/devices", Some(&t), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // An admin token may get a ticket too; an expired ticket is refused.
    assert_eq!(ticket(&engine, ADMIN).await.0, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, _, body) =
        stream_body(&engine, &format!("since=0&limit=1&ticket={t}"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_endpoints_refuse_other_content_types_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;
    let reading = reading("ct-1", 0, 52.0, 4.0, 5.0).to_string();
    let zone_body = zone("ct-zone").to_string();
    for (method, path, body) in [
        (Method::POST, "/api/readings", &reading),
        (Method::POST, "/api/zones", &zone_body),
        (Method::PUT, "/api/zones/ct-zone", &zone_body),
        (
            Method::POST,
            "/api/temperature-ranges",
            &cold_chain().to_string(),
        ),
    ] {
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            let mut request = client()
                .request(method.clone(), engine.url(path))
                .body(body.clone());
            if let Some(content_type) = content_type {
                request = request.header("Content-Type", content_type);
            }
            let r = request.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{method} {path} {content_type:?}"
            );
            let error: Value = r.json().await.unwrap();
            assert!(
                error["error"]
                    .as_str()
                    .unwrap()
                    .contains("application/json"),
                "{error}"
            );
        }
    }
    assert_eq!(engine.device("ct-1").await, None, "no reading was stored");
    assert_eq!(engine.get("/api/zones").await, json!([]));
    assert_eq!(engine.get("/api/temperature-ranges").await, json!([]));

    // Parameters are fine.
    let r = client()
        .post(engine.url("/api/readings"))
        .header("Content-Type", "application/json; charset=utf-8")
        .body(reading)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_are_refused_and_only_listed_ones_get_cors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &[
            "--amqp-disabled",
            "--allowed-origins",
            "https://ops.example, http://localhost:3000",
        ],
    )
    .await;
    let evil = "http://evil.example";
    let own = engine.base.clone();

    // What a cross-site form or fetch would send: text/plain and a foreign Origin.
    let reading = reading("or-1", 0, 52.0, 4.0, 5.0).to_string();
    let zone_body = zone("or-zone").to_string();
    for (path, body) in [("/api/readings", &reading), ("/api/zones", &zone_body)] {
        for content_type in ["text/plain", "application/json"] {
            let r = client()
                .post(engine.url(path))
                .header("Origin", evil)
                .header("Content-Type", content_type)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path} {content_type}");
            assert!(r.headers().get("access-control-allow-origin").is_none());
            let error: Value = r.json().await.unwrap();
            assert!(error["error"].as_str().unwrap().contains(evil), "{error}");
        }
    }
    // Reads from a foreign origin too, and its preflight.
    let r = client()
        .get(engine.url("/api/devices"))
        .header("Origin", evil)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = client()
        .request(Method::OPTIONS, engine.url("/api/readings"))
        .header("Origin", evil)
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert_eq!(engine.device("or-1").await, None, "nothing was stored");
    assert_eq!(engine.get("/api/zones").await, json!([]));
    let metrics = client()
        .get(engine.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"fleetwatch_http_refused_total{reason="origin"} 6"#),
        "{metrics}"
    );

    // The engine's own origin (as its page sends it): allowed, and no CORS headers needed.
    let r = client()
        .post(engine.url("/api/readings"))
        .header("Origin", &own)
        .header("Content-Type", "application/json")
        .body(reading.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // A listed origin: preflight answered, and CORS headers on the answer.
    let listed = "https://ops.example";
    let r = client()
        .request(Method::OPTIONS, engine.url("/api/zones"))
        .header("Origin", listed)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["access-control-allow-origin"], listed);
    let allowed_headers = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let r = client()
        .post(engine.url("/api/zones"))
        .header("Origin", listed)
        .json(&zone("or-zone"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["access-control-allow-origin"], listed);
    let r = client()
        .get(engine.url("/api/zones"))
        .header("Origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_needs_admin_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let beyond_loopback = Engine::options().args(["--amqp-disabled"]).host("0.0.0.0");

    // Read and ingest tokens do not count: configuration would still be open.
    let mut refused = beyond_loopback
        .clone()
        .envs(&[
            ("FLEETWATCH_READ_TOKENS", "r"),
            ("FLEETWATCH_INGEST_TOKENS", "i"),
        ])
        .spawn(&dir.path().join("refused"));
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = refused.log_text();
    assert!(log.contains("refusing to listen on 0.0.0.0"), "{log}");
    assert!(log.contains("FLEETWATCH_ADMIN_TOKENS"), "{log}");
    assert!(log.contains("127.0.0.1"), "{log}");
    assert!(
        !dir.path().join("refused").exists(),
        "it refused before creating its store"
    );

    // With an admin token it starts, and asks for it. Every access setting from its variable.
    let started = beyond_loopback
        .envs(&[
            ("FLEETWATCH_ADMIN_TOKENS", ADMIN),
            ("FLEETWATCH_INGEST_TOKENS", INGEST),
            ("FLEETWATCH_READ_TOKENS", READ),
            ("FLEETWATCH_ALLOWED_ORIGINS", "https://ops.example"),
        ])
        .start(&dir.path().join("started"))
        .await;
    let base = &started.base;
    let zones = format!("{base}/api/zones");
    let r = client()
        .post(&zones)
        .json(&zone("b1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .post(&zones)
        .bearer_auth(ADMIN)
        .json(&zone("b1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let readings = format!("{base}/api/readings");
    let body = reading("b-1", 0, 52.0, 4.0, 5.0);
    let r = client().post(&readings).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .post(&readings)
        .bearer_auth(INGEST)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let devices = format!("{base}/api/devices/b-1");
    let r = client().get(&devices).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .get(&devices)
        .bearer_auth(READ)
        .header("Origin", "https://ops.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://ops.example"
    );
}
