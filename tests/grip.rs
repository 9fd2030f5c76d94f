//! The live stream through a real Pushpin in front of two engine nodes on PostgreSQL and
//! RabbitMQ: one SSE client connected to Pushpin receives every node's events in global order,
//! and goes on without a gap or a repeat after the node it was first served by is SIGKILLed; a
//! client filtered on two devices gets exactly their events, held on their streams' channels.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::amqp::{active_partition_consumers, eventually, Names, Publisher};
use common::pushpin::Pushpin;
use common::*;
use futures_util::StreamExt;

const DEVICES: usize = 40;
const PARTITIONS: u16 = 4;
const READ_TOKEN: &str = "grip-read-token";

/// The positions (`id:` lines of events) an SSE client received, in order.
type Received = Arc<Mutex<Vec<u64>>>;

/// Follows `url` as an SSE client (resuming after `last_event_id`, if given), recording each
/// event's position.
fn follow(url: String, last_event_id: Option<u64>) -> Received {
    let received: Received = Arc::default();
    let out = received.clone();
    tokio::spawn(async move {
        let mut request = reqwest::Client::new().get(&url).bearer_auth(READ_TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request
            .send()
            .await
            .expect("GET the stream through Pushpin");
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let id = frame.lines().find_map(|l| l.strip_prefix("id: "));
                let is_event = frame.lines().any(|l| l.starts_with("data: "));
                if let (Some(id), true) = (id, is_event) {
                    out.lock()
                        .unwrap()
                        .push(id.trim().parse().expect("a position"));
                }
            }
        }
    });
    received
}

/// What a client has received once it has a position at or past `until`.
async fn received_until(received: &Received, until: u64, what: &str) -> Vec<u64> {
    eventually(Duration::from_secs(30), what, || async {
        let got = received.lock().unwrap().clone();
        (got.last().copied() >= Some(until)).then_some(got)
    })
    .await
}

/// A response header's value ("" when absent).
fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The positions (`id:` lines) of an SSE body.
fn event_ids(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect()
}

async fn head(url: &str) -> u64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT head FROM global_position", &[])
        .await
        .expect("head");
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_through_pushpin_gets_every_nodes_events_in_order_across_a_node_death() {
    let url = common::postgres::fresh_database().await;
    let names = Names::new("grip");
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port()];
    let pushpin = Pushpin::start(&ports.map(|p| format!("127.0.0.1:{p}")));
    let mut nodes: Vec<Engine> = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let node = Engine::options()
            .port(*port)
            .args(names.engine_args())
            .args(["--store", "postgres", "--store-url", url.as_str()])
            .args(["--amqp-partitions", &PARTITIONS.to_string()])
            .args(["--grip-publish-url", pushpin.publish_url.as_str()])
            // Reads need a token: Pushpin forwards the client's with the first request only, and
            // signs its next-link requests with this key.
            .args([
                "--read-tokens",
                READ_TOKEN,
                "--grip-key",
                pushpin.sig_key.as_str(),
            ])
            .log_level("info,fleetwatch::http::grip=debug")
            .start(&dir.path().join(format!("node{n}")))
            .await
            .with_token(READ_TOKEN);
        node.wait_broker_connected().await;
        nodes.push(node);
    }
    let start = head(&url).await;
    let received = follow(format!("{}/api/stream?since={start}", pushpin.base), None);
    const WATCHED: [&str; 2] = ["grip-3", "grip-17"];
    let filtered = follow(
        format!(
            "{}/api/stream?devices={}&since={start}",
            pushpin.base,
            WATCHED.join(",")
        ),
        None,
    );

    let publisher = Publisher::must_connect(&names.exchange).await;
    let mut round = 0i64;
    let mut publish_round = || {
        let batch: Vec<_> = (0..DEVICES)
            .map(|d| {
                let device = format!("grip-{d}");
                let body = reading(&device, round, DEPOT.0 + round as f64 * 1e-4, DEPOT.1, 5.0);
                (device, serde_json::to_vec(&body).expect("JSON"))
            })
            .collect();
        round += 1;
        batch
    };
    // Until both nodes own partitions: the client then gets devices owned by each.
    let spreading = Instant::now();
    loop {
        publisher
            .publish_all(&publish_round())
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let owners = active_partition_consumers(&names.queue);
        let mut per_node: BTreeMap<&String, usize> = BTreeMap::new();
        for tag in owners.values() {
            *per_node.entry(tag).or_default() += 1;
        }
        if owners.len() == PARTITIONS as usize && per_node.len() == 2 {
            break;
        }
        assert!(
            spreading.elapsed() < Duration::from_secs(90),
            "not spread: {owners:?}"
        );
    }
    let before = received_until(
        &received,
        head(&url).await,
        "the client to have every event",
    )
    .await;
    assert!(!before.is_empty());

    // The node that answered the client's request dies: Pushpin holds the connection, and the
    // other node's publishes (and, for a gap, its answers to the next link) carry on.
    let mut answered = Vec::new();
    for node in &nodes {
        answered.push(node.metric("fleetwatch_sse_connections_total").await);
        assert!(
            node.metric("fleetwatch_grip_published_total").await > 0.0,
            "every node publishes"
        );
    }
    let victim = answered
        .iter()
        .position(|n| *n >= 1.0)
        .expect("a node answered the stream request");
    nodes[victim].kill();
    for _ in 0..20 {
        publisher
            .publish_all(&publish_round())
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = eventually(Duration::from_secs(60), "every reading stored", || async {
        let h = head(&url).await;
        // Each round adds at least one event per device.
        (h >= start + (round as u64) * DEVICES as u64).then_some(h)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = end.max(head(&url).await);
    let got: Vec<u64> = received_until(&received, end, "the client to have every event")
        .await
        .into_iter()
        .filter(|p| *p <= end)
        .collect();
    let expected: Vec<u64> = (start + 1..=end).collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "every position once: first {:?}, last {:?}",
        got.first(),
        got.last()
    );
    assert_eq!(got, expected, "in global order, without a gap or a repeat");
    // The filtered client: every event of its two devices, in order, once.
    let survivor = &nodes[1 - victim];
    let mut watched: Vec<u64> = Vec::new();
    for device in WATCHED {
        watched.extend(
            survivor
                .history(device)
                .await
                .iter()
                .filter_map(|e| e["position"].as_u64())
                .filter(|p| (start + 1..=end).contains(p)),
        );
    }
    watched.sort_unstable();
    assert!(watched.len() >= 2 * round as usize, "{watched:?}");
    let filtered = received_until(&filtered, *watched.last().unwrap(), "the filtered client")
        .await
        .into_iter()
        .filter(|p| *p <= end)
        .collect::<Vec<u64>>();
    if filtered != watched {
        for node in &nodes {
            for line in node.log_text().lines().filter(|l| l.contains("grip")) {
                eprintln!("{line}");
            }
        }
    }
    assert_eq!(
        filtered, watched,
        "the watched devices' events, in order, once"
    );
    // A client that lost its connection resumes through Pushpin with `Last-Event-ID`.
    let middle = before[before.len() / 2];
    let resumed = follow(format!("{}/api/stream", pushpin.base), Some(middle));
    let resumed: Vec<u64> = received_until(&resumed, end, "the resumed client")
        .await
        .into_iter()
        .filter(|p| *p <= end)
        .collect();
    assert_eq!(
        resumed,
        (middle + 1..=end).collect::<Vec<u64>>(),
        "resumed after {middle}"
    );
    println!(
        "{} events through Pushpin, positions {start}..={end}, {} of them before the node died",
        got.len(),
        before.len()
    );
}

/// What Pushpin is told, asked directly: the events after the position it reports, the channel
/// with that prev-id, and the next link; filtered streams stay plain SSE.
#[tokio::test]
async fn a_request_through_pushpin_is_answered_with_grip_instructions() {
    let engine = Engine::options()
        .args(["--amqp-disabled"])
        .start_temp()
        .await;
    let readings: Vec<_> = (0..3)
        .map(|i| reading("grip-direct", i, DEPOT.0, DEPOT.1, 5.0))
        .collect();
    let (status, body) = engine
        .post("/api/readings", &serde_json::json!(readings))
        .await;
    assert_eq!(status, 202, "{body}");
    let history = engine.history("grip-direct").await;
    let head = history.last().unwrap()["position"].as_u64().unwrap();
    let version = history.len() as u64;

    let held = reqwest::Client::new()
        .get(engine.url("/api/stream"))
        .header("Grip-Sig", "from-pushpin")
        .header("Grip-Last", "fleetwatch; last-id=1")
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(header(&held, "Grip-Hold"), "stream");
    assert_eq!(
        header(&held, "Grip-Channel"),
        format!("fleetwatch; prev-id={head}")
    );
    assert_eq!(
        header(&held, "Grip-Link"),
        format!("</api/stream?since={head}>; rel=next")
    );
    let text = held.text().await.unwrap();
    let ids = event_ids(&text);
    assert_eq!(ids, (2..=head).collect::<Vec<u64>>(), "{text}");

    // Filtered on devices only: held on each stream's channel (`$rules`'s too: a devices filter
    // lets zone and range changes through), with versions as ids.
    let filtered = reqwest::Client::new()
        .get(engine.url("/api/stream?devices=grip-direct,grip-other&since=1"))
        .header("Grip-Sig", "from-pushpin")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&filtered, "Grip-Hold"), "stream");
    assert_eq!(
        header(&filtered, "Grip-Channel"),
        format!(
            "fleetwatch.system.rules; prev-id=0, fleetwatch.stream.grip-direct; prev-id={version}, \
             fleetwatch.stream.grip-other; prev-id=0"
        )
    );
    assert_eq!(
        header(&filtered, "Grip-Link"),
        format!("</api/stream?devices=grip-direct%2Cgrip-other&since={head}>; rel=next")
    );
    let ids = event_ids(&filtered.text().await.unwrap());
    assert_eq!(ids, (2..=head).collect::<Vec<u64>>());
    // Pushpin following the next link: what each channel lacks after the version it reports.
    let next = reqwest::Client::new()
        .get(engine.url("/api/stream?devices=grip-direct&since=1"))
        .header("Grip-Sig", "from-pushpin")
        .header(
            "Grip-Last",
            format!(
                "fleetwatch.system.rules; last-id=0, fleetwatch.stream.grip-direct; last-id={}",
                version - 1
            ),
        )
        .send()
        .await
        .unwrap();
    assert!(next.headers()["Grip-Channel"]
        .to_str()
        .unwrap()
        .ends_with(&format!("fleetwatch.stream.grip-direct; prev-id={version}")));
    let text = next.text().await.unwrap();
    let ids = event_ids(&text);
    assert_eq!(ids, [head], "{text}");
    assert!(
        !text.contains("retry:"),
        "a next link goes on the same stream"
    );

    // Other filters, and a limit, are plain SSE, which Pushpin passes through.
    for query in [
        "types=ReadingRecorded&since=0&limit=1",
        "devices=grip-direct&since=0&limit=1",
    ] {
        let plain = reqwest::Client::new()
            .get(engine.url(&format!("/api/stream?{query}")))
            .header("Grip-Sig", "from-pushpin")
            .send()
            .await
            .unwrap();
        assert_eq!(plain.status(), 200, "{query}");
        assert!(plain.headers().get("Grip-Hold").is_none(), "{query}");
        assert!(plain.text().await.unwrap().contains("\ndata: "), "{query}");
    }
}

/// With read tokens, Pushpin's next-link requests (which carry no client token) are let in only
/// when `Grip-Sig` is signed with `--grip-key`.
#[tokio::test]
async fn next_link_requests_need_pushpins_signature_when_reads_need_a_token() {
    let engine = Engine::options()
        .args(["--amqp-disabled", "--read-tokens", READ_TOKEN])
        .args(["--grip-key", "pushpin-key"])
        .start_temp()
        .await;
    let sign = |key: &str| {
        let claims =
            serde_json::json!({"iss": "pushpin", "exp": chrono::Utc::now().timestamp() + 60});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).expect("key"),
        )
        .expect("sign")
    };
    let next_link = |signature: Option<String>| {
        let mut request = reqwest::Client::new()
            .get(engine.url("/api/stream?since=0"))
            .header("Grip-Last", "fleetwatch; last-id=0");
        if let Some(signature) = signature {
            request = request.header("Grip-Sig", signature);
        }
        request.send()
    };
    let signed = next_link(Some(sign("pushpin-key"))).await.unwrap();
    assert_eq!(signed.status(), 200);
    assert_eq!(signed.headers()["Grip-Hold"], "stream");
    assert_eq!(
        next_link(Some(sign("another-key"))).await.unwrap().status(),
        401
    );
    assert_eq!(next_link(None).await.unwrap().status(), 401);
    // A first request (no Grip-Last) needs the client's token even when signed.
    let first = reqwest::Client::new()
        .get(engine.url("/api/stream"))
        .header("Grip-Sig", sign("pushpin-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 401);
}
