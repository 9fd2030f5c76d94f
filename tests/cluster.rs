//! Three engine nodes on one machine sharing a real PostgreSQL store and a real RabbitMQ: devices
//! are spread over the nodes by a consistent-hash exchange over partition queues with a single
//! active consumer each (`--amqp-partitions`). One node is SIGKILLed while readings are being
//! published, and started again later: every reading ends up stored exactly once, in its order,
//! no alarm is raised twice, the dead node's partitions are taken over (the time is printed), and
//! every node shows the whole fleet.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::amqp::{active_partition_consumers, eventually, Names, Publisher};
use common::*;
use serde_json::Value;

const NODES: usize = 3;
const PARTITIONS: u16 = 6;
const DEVICES: usize = 30;

/// Reading `i` of device `d`: the temperature leaves the cold chain (2–8 °C) for 7 readings
/// every 14.
fn body(d: usize, i: usize) -> (String, Vec<u8>) {
    let device = format!("truck-{d}");
    let temperature = if (i / 7) % 2 == 1 { 10.0 } else { 5.0 };
    let lat = DEPOT.0 + 0.0001 * i as f64;
    let reading = reading(&device, i as i64, lat, DEPOT.1, temperature);
    (device, serde_json::to_vec(&reading).expect("JSON"))
}

/// A node of the cluster: the run's RabbitMQ names, PostgreSQL at `store_url`, partitioned.
fn node_options(names: &Names, store_url: &str) -> EngineOptions {
    Engine::options()
        .args(names.engine_args())
        .args(["--store", "postgres", "--store-url", store_url])
        .args(["--amqp-partitions", &PARTITIONS.to_string()])
}

/// Reading `i` of every device, published; then a pause, as a fleet reporting in rounds.
async fn publish_round(publisher: &Publisher, i: usize) {
    let batch: Vec<_> = (0..DEVICES).map(|d| body(d, i)).collect();
    publisher.publish_all(&batch).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A stored event: its type and reading time.
type Stored = (String, Option<chrono::DateTime<chrono::Utc>>);

/// Stored events per device, in version order.
async fn stored(url: &str) -> BTreeMap<String, Vec<Stored>> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT s.name, t.name, e.at FROM events e JOIN streams s ON s.id = e.stream
             JOIN event_types t ON t.id = e.type WHERE s.name NOT LIKE '$%'
             ORDER BY s.name, e.version",
            &[],
        )
        .await
        .expect("read the store");
    let mut devices: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for row in rows {
        devices
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    devices
}

/// Waits until every device has at least `readings` readings stored, and returns the store.
async fn all_stored(url: &str, readings: usize) -> BTreeMap<String, Vec<Stored>> {
    eventually(Duration::from_secs(120), "every reading stored", || async {
        let devices = stored(url).await;
        let complete = devices.len() == DEVICES
            && devices
                .values()
                .all(|events| reading_times(events).len() >= readings);
        complete.then_some(devices)
    })
    .await
}

/// The reading times of a device's stored readings, in version order.
fn reading_times(events: &[Stored]) -> Vec<chrono::DateTime<chrono::Utc>> {
    events
        .iter()
        .filter(|(t, _)| t == "ReadingRecorded")
        .map(|(_, at)| at.expect("a reading has a time"))
        .collect()
}

/// Readings 0..`readings` of `device` stored once each, in reading order.
fn assert_once_in_order(device: &str, events: &[Stored], readings: usize) {
    let expected: Vec<_> = (0..readings as i64)
        .map(|i| t0() + chrono::Duration::seconds(i))
        .collect();
    assert_eq!(
        reading_times(events),
        expected,
        "{device}: readings stored once each, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_stream_hands_its_devices_over_and_nothing_is_lost_or_doubled() {
    let url = common::postgres::fresh_database().await;
    let names = Names::new("cluster");
    let dir = tempfile::tempdir().expect("temp dir");
    let options = node_options(&names, &url);
    let mut nodes = options.start_nodes(dir.path(), NODES).await;
    // Defined on one node; the others follow the shared store's `$rules`.
    nodes[0].create_depot_and_cold_chain().await;
    for node in &nodes {
        eventually(
            Duration::from_secs(10),
            "every node to have the cold chain",
            || async {
                let ranges = node.get("/api/temperature-ranges").await;
                (ranges.to_string().contains("cold-chain")).then_some(())
            },
        )
        .await;
    }
    let publisher = Publisher::must_connect(&names.exchange).await;
    let mut round = 0usize;

    // The first node to subscribe owns every partition; under load the nodes spread them.
    let spread_from = Instant::now();
    let owners = loop {
        publish_round(&publisher, round).await;
        round += 1;
        let active = active_partition_consumers(&names.queue);
        let mut per_node: BTreeMap<&String, usize> = BTreeMap::new();
        for tag in active.values() {
            *per_node.entry(tag).or_default() += 1;
        }
        let share = (PARTITIONS as usize).div_ceil(NODES);
        if active.len() == PARTITIONS as usize
            && per_node.len() == NODES
            && per_node.values().all(|n| *n <= share)
        {
            break active;
        }
        assert!(
            spread_from.elapsed() < Duration::from_secs(90),
            "partitions not spread over the nodes: {per_node:?}"
        );
    };
    println!(
        "{PARTITIONS} partitions spread over {NODES} nodes after {:?}: {owners:?}",
        spread_from.elapsed()
    );

    // The victim: a node that owns a partition.
    let victim = (0..NODES)
        .find(|&n| {
            let tag = format!("fleetwatch-{}", nodes[n].pid());
            owners.values().any(|t| *t == tag)
        })
        .expect("a node owning a partition");
    let victim_tag = format!("fleetwatch-{}", nodes[victim].pid());
    nodes[victim].kill();
    let killed = Instant::now();
    let takeover = loop {
        publish_round(&publisher, round).await;
        round += 1;
        let active = active_partition_consumers(&names.queue);
        if active.len() == PARTITIONS as usize && active.values().all(|t| *t != victim_tag) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "partitions not taken over: {active:?}"
        );
    };
    println!("partitions of the killed node taken over after {takeover:?}");
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    for _ in 0..10 {
        publish_round(&publisher, round).await;
        round += 1;
    }

    nodes[victim].restart().await;
    nodes[victim].wait_broker_connected().await;
    for _ in 0..20 {
        publish_round(&publisher, round).await;
        round += 1;
    }
    let readings_per_device = round;

    // Everything stored: every device has all its readings.
    let devices = all_stored(&url, readings_per_device).await;
    let hot = |i: usize| (i / 7) % 2 == 1;
    let excursions = (1..readings_per_device)
        .filter(|&i| hot(i) && !hot(i - 1))
        .count();
    let back_in_range = (1..readings_per_device)
        .filter(|&i| !hot(i) && hot(i - 1))
        .count();
    for (device, events) in &devices {
        assert_once_in_order(device, events, readings_per_device);
        // One alarm per excursion above the range.
        let count = |kind: &str| events.iter().filter(|(t, _)| t == kind).count();
        assert_eq!(count("TemperatureOutOfRange"), excursions, "{device}");
        assert_eq!(count("TemperatureBackInRange"), back_in_range, "{device}");
        assert_eq!(count("AlarmOpened"), excursions, "{device}");
        let history = nodes[0].history(device).await;
        assert_alarms_alternate(device, &history);
    }

    // One fleet view: every node lists every device, at the same version.
    let versions: BTreeMap<String, u64> = devices
        .iter()
        .map(|(device, events)| (device.clone(), events.len() as u64))
        .collect();
    for (n, node) in nodes.iter().enumerate() {
        for (device, version) in &versions {
            let state: Value = node.get(&format!("/api/devices/{device}")).await;
            assert_eq!(
                state["version"].as_u64(),
                Some(*version),
                "node {n}, {device}: {state}"
            );
        }
        eventually(
            Duration::from_secs(30),
            "every node's read models to list every alarm",
            || async {
                let alarms = node.get("/api/alarms?limit=1000").await;
                let listed = alarms["alarms"].as_array().map_or(0, Vec::len);
                (listed == DEVICES * excursions).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        publisher.depth(&names.dead()).await,
        0,
        "nothing dead-lettered"
    );
}

/// The same cluster fed by the real simulator (`fleetwatch-sim`, with its zone and range demo
/// defined on one node): a node that owns partitions is SIGKILLed while it publishes and started
/// again; every reading the broker confirmed is stored once, in order, and no alarm is raised
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_simulator_publishes_through_a_node_kill_and_every_confirmed_reading_is_stored_once() {
    const COUNT: usize = 6000;
    let url = common::postgres::fresh_database().await;
    let names = Names::new("cluster-sim");
    let dir = tempfile::tempdir().expect("temp dir");
    let options = node_options(&names, &url);
    let mut nodes = options.start_nodes(dir.path(), NODES).await;
    let simulator = std::process::Command::new(env!("CARGO_BIN_EXE_fleetwatch-sim"))
        .args(["--target", "amqp", "--amqp-url", common::amqp::URL])
        .args(["--amqp-exchange", names.exchange.as_str()])
        .args(["--http-url", nodes[0].base.as_str()])
        .args(["--devices", "40", "--rate", "400", "--duration", "120s"])
        .args(["--count", &COUNT.to_string(), "--rogue-fraction", "0.5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleetwatch-sim");

    tokio::time::sleep(Duration::from_secs(4)).await;
    let owners = active_partition_consumers(&names.queue);
    let victim = (0..NODES)
        .find(|&n| {
            let tag = format!("fleetwatch-{}", nodes[n].pid());
            owners.values().any(|t| *t == tag)
        })
        .expect("a node owning a partition");
    nodes[victim].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    nodes[victim].restart().await;

    let finished = tokio::task::spawn_blocking(move || simulator.wait_with_output())
        .await
        .expect("join")
        .expect("the simulator ran");
    let summary = String::from_utf8_lossy(&finished.stdout);
    assert!(
        finished.status.success(),
        "the simulator: {summary} {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(
        summary.contains(&format!("({COUNT} confirmed, 0 failed)")),
        "{summary}"
    );

    let devices = eventually(
        Duration::from_secs(120),
        "every confirmed reading stored",
        || async {
            let devices = stored(&url).await;
            let readings: usize = devices
                .values()
                .map(|events| reading_times(events).len())
                .sum();
            (readings >= COUNT).then_some(devices)
        },
    )
    .await;
    let mut readings = 0;
    for (device, events) in &devices {
        let times = reading_times(events);
        assert!(
            times.windows(2).all(|w| w[0] < w[1]),
            "{device}: stored once each, in reading order"
        );
        readings += times.len();
        assert_alarms_alternate(device, &nodes[0].history(device).await);
    }
    assert_eq!(
        readings, COUNT,
        "every confirmed reading stored exactly once"
    );
    let alarms: usize = devices
        .values()
        .map(|events| events.iter().filter(|(t, _)| t == "AlarmOpened").count())
        .sum();
    assert!(alarms > 0, "the rogue devices raised alarms");
    assert_eq!(
        publisher_depth_dead(&names).await,
        0,
        "nothing dead-lettered"
    );
}

async fn publisher_depth_dead(names: &Names) -> u32 {
    Publisher::must_connect(&names.exchange)
        .await
        .depth(&names.dead())
        .await
}

/// A node cut from the shared database (through a relay) while the broker still reaches it gives
/// its partitions to the other node after `STORE_FAILURE_HANDOVER` (10 s), which goes on storing
/// every reading; once the database is back the node takes its share again, and every reading is
/// stored exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_from_the_database_hands_its_partitions_over_and_takes_them_back() {
    let url = common::postgres::fresh_database().await;
    let relay = common::relay::Relay::start("127.0.0.1:5432").await;
    let through_relay = relay.postgres_url(&url);
    let names = Names::new("dbcut");
    let dir = tempfile::tempdir().expect("temp dir");
    let cut_node = node_options(&names, &through_relay)
        .start(&dir.path().join("cut"))
        .await;
    let other = node_options(&names, &url)
        .start(&dir.path().join("other"))
        .await;
    cut_node.wait_broker_connected().await;
    other.wait_broker_connected().await;
    let cut_tag = format!("fleetwatch-{}", cut_node.pid());
    let other_tag = format!("fleetwatch-{}", other.pid());

    let publisher = Publisher::must_connect(&names.exchange).await;
    let mut round = 0usize;
    let owned_by = |tag: &str| {
        active_partition_consumers(&names.queue)
            .values()
            .filter(|t| *t == tag)
            .count()
    };
    let spread_from = Instant::now();
    while owned_by(&cut_tag) == 0 || owned_by(&other_tag) == 0 {
        publish_round(&publisher, round).await;
        round += 1;
        assert!(
            spread_from.elapsed() < Duration::from_secs(90),
            "partitions not spread: {:?}",
            active_partition_consumers(&names.queue)
        );
    }

    relay.cut();
    let cut_at = Instant::now();
    let handover = loop {
        publish_round(&publisher, round).await;
        round += 1;
        if owned_by(&other_tag) == PARTITIONS as usize {
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(60),
            "partitions not handed over: {:?}\nthe cut node's log: {}",
            active_partition_consumers(&names.queue),
            {
                let kept = std::env::temp_dir().join(format!("dbcut-{}.log", cut_node.pid()));
                let _ = std::fs::write(&kept, cut_node.log_text());
                kept.display().to_string()
            }
        );
    };
    println!("partitions of the node cut from the database handed over after {handover:?}");
    assert!(
        handover >= Duration::from_secs(9),
        "not before the grace period: {handover:?}"
    );
    // Meanwhile the other node stores everything published, the cut node's devices included.
    for _ in 0..20 {
        publish_round(&publisher, round).await;
        round += 1;
    }
    all_stored(&url, round).await;

    relay.restore();
    let restored = Instant::now();
    while owned_by(&cut_tag) == 0 {
        publish_round(&publisher, round).await;
        round += 1;
        assert!(
            restored.elapsed() < Duration::from_secs(90),
            "the node did not take its share again: {:?}",
            active_partition_consumers(&names.queue)
        );
    }
    for _ in 0..10 {
        publish_round(&publisher, round).await;
        round += 1;
    }
    for (device, events) in &all_stored(&url, round).await {
        assert_once_in_order(device, events, round);
    }
    assert_eq!(
        publisher.depth(&names.dead()).await,
        0,
        "nothing dead-lettered"
    );
}
