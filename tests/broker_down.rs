//! No broker answers when the engine starts: it serves HTTP meanwhile, says so on `/api/health`,
//! and starts consuming once the broker appears. The broker "appears" as a TCP relay to the real
//! RabbitMQ on 127.0.0.1:5672, opened later on the address the engine was given, so the shared
//! broker itself is never stopped.

mod common;

use std::time::Duration;

use common::amqp::{Names, Publisher};
use common::*;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Relays every connection to `listener` to the real broker on 127.0.0.1:5672.
async fn relay_to_broker(listener: TcpListener) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_the_engine_serves_http_and_consumes_once_the_broker_appears() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("late");
    // Bound but not listening: the port stays ours, and connecting to it is refused, as when no
    // broker runs.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let mut args = names.engine_args();
    args.extend(["--amqp-url".to_owned(), url]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(&dir.path().join("data"), &args).await;

    let health = engine.get("/api/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["broker"], "connecting", "{health}");
    let (status, body) = engine
        .post(
            "/api/readings",
            &reading("by-http", 0, DEPOT.0, DEPOT.1, 5.0),
        )
        .await;
    assert_eq!(status, 202, "HTTP ingest works without a broker: {body}");
    // Several connection attempts fail while nothing listens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(engine.get("/api/health").await["broker"], "connecting");

    let relay = tokio::spawn(relay_to_broker(socket.listen(64).unwrap()));
    engine.wait_broker_connected().await;

    // It declared its topology on connecting: what is published now reaches it.
    let publisher = Publisher::must_connect(&names.exchange).await;
    for i in 0..5 {
        let r = reading("by-amqp", i, DEPOT.0, DEPOT.1, 5.0);
        publisher
            .publish("by-amqp", &serde_json::to_vec(&r).unwrap())
            .await
            .unwrap();
    }
    engine.wait_until_stored("by-amqp", 4).await;
    engine.wait_until_stored("by-http", 0).await;
    relay.abort();
}
