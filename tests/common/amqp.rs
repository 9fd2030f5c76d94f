//! A real RabbitMQ publisher for tests and benchmarks, on names of their own.

use std::time::Duration;

use fleetwatch::publish::{PublishError, PublisherOptions};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Exchange and queue names unique to one test run. Dropping them deletes the queues and
/// exchanges from the broker, also when the test panics, so a failed run leaves nothing behind.
pub struct Names {
    pub exchange: String,
    pub queue: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        Self::with_prefix(&format!("test.{test}"))
    }

    /// `<prefix>.<uuid8>` for both the exchange and the queue.
    pub fn with_prefix(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{prefix}.{}", &id[..8]);
        Self {
            exchange: name.clone(),
            queue: name,
        }
    }

    pub fn dead(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Engine arguments that point it at these names.
    pub fn engine_args(&self) -> Vec<String> {
        vec![
            "--amqp-exchange".into(),
            self.exchange.clone(),
            "--amqp-queue".into(),
            self.queue.clone(),
        ]
    }
}

/// The library's confirmed publisher, on a connection of its own, for the tests' `&self` calls.
pub struct Publisher(Mutex<fleetwatch::publish::Publisher>);

impl Publisher {
    /// Connects with publisher confirms.
    pub async fn connect(exchange: &str) -> Result<Self, PublishError> {
        let options = PublisherOptions::default();
        let publisher = fleetwatch::publish::Publisher::connect(URL, exchange, options).await?;
        Ok(Self(Mutex::new(publisher)))
    }

    /// Fails loudly when no broker answers: these tests need one.
    pub async fn must_connect(exchange: &str) -> Self {
        match Self::connect(exchange).await {
            Ok(p) => p,
            Err(e) => panic!("RabbitMQ must run on 127.0.0.1:5672 for this test (scripts/test-deps.sh starts it): {e}"),
        }
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8]) -> Result<(), PublishError> {
        let mut publisher = self.0.lock().await;
        publisher.publish(routing_key, body).await?;
        publisher.flush().await
    }

    /// Publishes many without waiting for each confirm in turn (but waits for all).
    pub async fn publish_all(&self, messages: &[(String, Vec<u8>)]) -> Result<(), PublishError> {
        let mut publisher = self.0.lock().await;
        for (key, body) in messages {
            publisher.publish(key, body).await?;
        }
        publisher.flush().await
    }

    /// Messages ready on a queue (not counting those delivered and not yet acknowledged).
    pub async fn depth(&self, queue: &str) -> u32 {
        let publisher = self.0.lock().await;
        queue_depth(publisher.channel(), queue)
            .await
            .expect("passive queue.declare")
    }

    /// Takes every message off a queue, returning (body, reason header).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let publisher = self.0.lock().await;
        let mut out = Vec::new();
        while let Some(message) = publisher
            .channel()
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-fleetwatch-reason").cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                });
            out.push((message.delivery.data.clone(), reason));
        }
        out
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        // With the partition queues and their exchange, should the test have used them
        // (`--amqp-partitions`, up to 16 here); deleting what does not exist is harmless.
        let partitions = (0..16).map(|i| fleetwatch::ingest::amqp::partition_queue(&self.queue, i));
        let queues: Vec<String> = [self.queue.clone(), self.dead()]
            .into_iter()
            .chain(partitions)
            .collect();
        let exchanges = [
            self.exchange.clone(),
            self.dead(),
            fleetwatch::ingest::amqp::partition_exchange(&self.exchange),
        ];
        // `drop` cannot await, and may run while a runtime unwinds: clean up on a thread and
        // runtime of its own. Best effort: the names are unique, so a leftover harms no other run.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let cleanup = async {
                let connection = Connection::connect(URL, ConnectionProperties::default())
                    .await
                    .ok()?;
                let channel = connection.create_channel().await.ok()?;
                for queue in &queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in &exchanges {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                connection.close(200, "test done".into()).await.ok()
            };
            // A broker that half answers must not hang the test run.
            runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), cleanup).await })
                .ok()
                .flatten()
        });
        let _ = cleanup.join();
    }
}

/// Messages ready on a queue (not counting those delivered and not yet acknowledged).
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Partition queue → consumer tag of its active consumer, for the partition queues of `queue`
/// (`rabbitmqctl list_consumers`; the engine's tag is `fleetwatch-<pid>`).
pub fn active_partition_consumers(queue: &str) -> std::collections::BTreeMap<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_consumers",
            "-q",
            "queue_name",
            "consumer_tag",
            "active",
        ])
        .output()
        .expect("rabbitmqctl (RabbitMQ runs on this machine for these tests)");
    let prefix = format!("{queue}.p");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (queue, tag, active) = (fields.next()?, fields.next()?, fields.next()?);
            (queue.starts_with(&prefix) && active == "true")
                .then(|| (queue.to_owned(), tag.to_owned()))
        })
        .collect()
}
