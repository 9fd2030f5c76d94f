//! RabbitMQ is stopped and started (`rabbitmqctl stop_app` / `start_app`) while readings are being
//! published: the engine reconnects by itself, re-declares its topology and processes everything
//! the broker confirmed. This test restarts the shared local broker, so it is the only test in its
//! binary (cargo runs test binaries one after another; the tests of one binary run in parallel).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::amqp::{eventually, Names, Publisher};
use common::*;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl must be installed for this test (scripts/test-deps.sh)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Publishes `readings` one by one, each confirmed; on a broker outage it reconnects and resends
/// the unconfirmed one, as a real device gateway would.
async fn publish_through_outages(
    exchange: String,
    readings: Vec<(String, Vec<u8>)>,
    confirmed: Arc<AtomicUsize>,
) {
    let mut publisher = None;
    for (key, body) in readings {
        loop {
            if publisher.is_none() {
                publisher = Publisher::connect(&exchange).await.ok();
            }
            if let Some(p) = &publisher {
                if p.publish(&key, &body).await.is_ok() {
                    confirmed.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                publisher = None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_is_recovered_without_losing_readings() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("restart");
    let publisher = Publisher::must_connect(&names.exchange).await;
    let args = names.engine_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let engine = Engine::start_with(&dir.path().join("data"), &args).await;
    engine.wait_broker_connected().await;

    const DEVICES: usize = 10;
    const PER_DEVICE: usize = 300;
    let mut readings = Vec::new();
    for i in 0..PER_DEVICE {
        for d in 0..DEVICES {
            let device = format!("gw-{d}");
            let r = reading(&device, i as i64, DEPOT.0 + i as f64 * 1e-4, DEPOT.1, 5.0);
            readings.push((device, serde_json::to_vec(&r).unwrap()));
        }
    }
    let confirmed = Arc::new(AtomicUsize::new(0));
    let stream = tokio::spawn(publish_through_outages(
        names.exchange.clone(),
        readings,
        confirmed.clone(),
    ));

    eventually(
        Duration::from_secs(60),
        "a part of the stream confirmed",
        || async { (confirmed.load(Ordering::SeqCst) > 500).then_some(()) },
    )
    .await;
    rabbitmqctl(&["stop_app"]);
    eventually(
        Duration::from_secs(30),
        "the engine to notice the broker is gone",
        || async {
            let health = engine.get("/api/health").await;
            (health["broker"] != "connected").then_some(())
        },
    )
    .await;
    // HTTP keeps serving while the broker is away.
    assert_eq!(engine.get("/api/health").await["status"], "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    engine.wait_broker_connected().await;
    tokio::time::timeout(Duration::from_secs(120), stream)
        .await
        .expect("publishing finished")
        .unwrap();
    assert_eq!(confirmed.load(Ordering::SeqCst), DEVICES * PER_DEVICE);

    for d in 0..DEVICES {
        let device = format!("gw-{d}");
        engine
            .wait_until_stored(&device, PER_DEVICE as i64 - 1)
            .await;
        let history = engine.history(&device).await;
        let recorded = history
            .iter()
            .filter(|e| e["type"] == "ReadingRecorded")
            .count();
        assert_eq!(
            recorded, PER_DEVICE,
            "{device}: every confirmed reading processed exactly once"
        );
    }
    drop(publisher);
}
