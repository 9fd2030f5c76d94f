//! Several engine nodes (run with `cargo bench --bench cluster`; RabbitMQ with the
//! `rabbitmq_consistent_hash_exchange` plugin and PostgreSQL on this machine, as for the tests).
//!
//! For each configuration (`FW_CLUSTER`, default `sqlite:1,postgres:1,postgres:2,postgres:3`:
//! store and number of nodes), on a fresh database and fresh RabbitMQ names:
//!
//! 1. the nodes start with `--amqp-partitions 12` and readings from `DEVICES` devices are published
//!    until the partitions are spread over the nodes (each owns at most its share);
//! 2. every node is paused (SIGSTOP, connections kept), a backlog of N readings is published with
//!    confirms, the nodes are resumed, and the time until they have processed all N (the sum of
//!    `fleetwatch_amqp_processed_total`) gives the throughput; each node's part of the backlog
//!    gives the spread;
//! 3. with two nodes or more, one is SIGKILLed and the time until its partitions have another
//!    active consumer is measured (`rabbitmqctl list_consumers`, which itself takes a few hundred
//!    milliseconds a call: the figure is an upper bound).
//!
//! `FW_BENCH_N` sets N (default 60,000). On a 2-core machine the broker, PostgreSQL and every node
//! share the same two cores: more nodes show the cost of coordination, not scaling.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::amqp::{active_partition_consumers, Names, Publisher, URL};
use common::{reading, Engine};
use lapin::{Connection, ConnectionProperties};

const PARTITIONS: u16 = 12;
const DEVICES: usize = 2_000;

/// `DEVICES` readings, one per device, the `round`th of each.
fn round_of_readings(round: usize) -> Vec<(String, Vec<u8>)> {
    (0..DEVICES)
        .map(|d| {
            let device = format!("dev-{d}");
            let lat = 52.0 + (d % 100) as f64 * 0.01 + round as f64 * 1e-4;
            let body = reading(&device, round as i64, lat, 4.9, 5.0 + (round % 5) as f64);
            (device, serde_json::to_vec(&body).expect("JSON"))
        })
        .collect()
}

struct Outcome {
    rate: f64,
    spread: Vec<f64>,
    spread_after: Duration,
    takeover: Option<Duration>,
}

/// Each node's `fleetwatch_amqp_processed_total`.
async fn processed(nodes: &[Engine]) -> Vec<f64> {
    let mut counts = Vec::with_capacity(nodes.len());
    for node in nodes {
        counts.push(node.metric("fleetwatch_amqp_processed_total").await);
    }
    counts
}

async fn run(store: &str, n: usize, backlog: usize) -> Outcome {
    let names = Names::new("cluster-bench");
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.create_channel().await.expect("channel");
        fleetwatch::ingest::amqp::declare_topology(
            &channel,
            &names.exchange,
            &names.queue,
            PARTITIONS,
        )
        .await
        .expect("declare the partitioned topology (is rabbitmq_consistent_hash_exchange enabled?)");
        let _ = connection.close(200, "declared".into()).await;
    }
    let mut options = Engine::options()
        .args(names.engine_args())
        .args(["--amqp-partitions", &PARTITIONS.to_string()])
        .log_level("warn");
    if store == "postgres" {
        let url = common::postgres::fresh_database().await;
        options = options.args(["--store", "postgres", "--store-url", url.as_str()]);
    }
    let mut nodes = options.start_nodes(dir.path(), n).await;
    let publisher = Publisher::must_connect(&names.exchange).await;

    // Readings until the partitions are spread, as they are under load.
    let share = (PARTITIONS as usize).div_ceil(n);
    let mut round = 0;
    let spreading = Instant::now();
    loop {
        publisher
            .publish_all(&round_of_readings(round))
            .await
            .expect("publish");
        round += 1;
        let active = active_partition_consumers(&names.queue);
        let mut per_node: BTreeMap<&String, usize> = BTreeMap::new();
        for tag in active.values() {
            *per_node.entry(tag).or_default() += 1;
        }
        if active.len() == PARTITIONS as usize
            && per_node.len() == n
            && per_node.values().all(|c| *c <= share)
        {
            break;
        }
        assert!(
            spreading.elapsed() < Duration::from_secs(180),
            "partitions not spread: {per_node:?}"
        );
    }
    let spread_after = spreading.elapsed();
    let warm = round * DEVICES;
    let settled = Instant::now();
    while processed(&nodes).await.iter().sum::<f64>() < warm as f64 {
        assert!(
            settled.elapsed() < Duration::from_secs(300),
            "warm-up not processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The backlog, queued behind paused nodes.
    let before = processed(&nodes).await;
    nodes.iter().for_each(Engine::pause);
    let rounds = backlog.div_ceil(DEVICES);
    for _ in 0..rounds {
        publisher
            .publish_all(&round_of_readings(round))
            .await
            .expect("publish");
        round += 1;
    }
    let total = (rounds * DEVICES) as f64;
    nodes.iter_mut().for_each(Engine::resume);
    let started = Instant::now();
    let after = loop {
        let now = processed(&nodes).await;
        let done: f64 = now.iter().zip(&before).map(|(a, b)| a - b).sum();
        if done >= total {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "backlog not processed: {done} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = started.elapsed();
    let spread = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b) / total)
        .collect();

    let takeover = if n > 1 {
        let victim_tag = format!("fleetwatch-{}", nodes[0].pid());
        nodes[0].kill();
        let killed = Instant::now();
        loop {
            let active = active_partition_consumers(&names.queue);
            if active.len() == PARTITIONS as usize && active.values().all(|t| *t != victim_tag) {
                break Some(killed.elapsed());
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no takeover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        None
    };
    Outcome {
        rate: total / elapsed.as_secs_f64(),
        spread,
        spread_after,
        takeover,
    }
}

fn main() {
    let backlog: usize = std::env::var("FW_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60_000);
    let plan = std::env::var("FW_CLUSTER")
        .unwrap_or_else(|_| "sqlite:1,postgres:1,postgres:2,postgres:3".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{backlog} readings from {DEVICES} devices over {PARTITIONS} partitions, {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| store | nodes | readings/s | each node's part of the backlog | spread after | takeover of a killed node |");
    println!("|---|---:|---:|---|---:|---:|");
    for config in plan.split(',') {
        let (store, n) = config
            .split_once(':')
            .and_then(|(s, n)| Some((s.to_owned(), n.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("FW_CLUSTER entry {config:?}: store:nodes"));
        let outcome = runtime.block_on(run(&store, n, backlog));
        let spread: Vec<String> = outcome
            .spread
            .iter()
            .map(|s| format!("{:.0} %", s * 100.0))
            .collect();
        println!(
            "| {store} | {n} | {:.0} | {} | {:.1} s | {} |",
            outcome.rate,
            spread.join(" / "),
            outcome.spread_after.as_secs_f64(),
            outcome
                .takeover
                .map_or("—".into(), |t| format!("{} ms", t.as_millis()))
        );
    }
}
