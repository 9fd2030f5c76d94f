//! A real RabbitMQ publisher for tests, on names of the test's own.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Exchange and queue names unique to one test run. Dropping them deletes the queues and
/// exchanges from the broker, also when the test panics, so a failed run leaves nothing behind.
pub struct Names {
    pub exchange: String,
    pub queue: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            exchange: format!("test.{test}.{}", &id[..8]),
            queue: format!("test.{test}.{}", &id[..8]),
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

pub struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    /// Connects with publisher confirms. Fails loudly when no broker answers: these tests need one.
    pub async fn connect(exchange: &str) -> lapin::Result<Self> {
        let connection = Connection::connect(URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        fleetwatch::ingest::amqp::declare_exchange(&channel, exchange).await?;
        Ok(Self {
            connection,
            channel,
            exchange: exchange.to_owned(),
        })
    }

    pub async fn must_connect(exchange: &str) -> Self {
        match Self::connect(exchange).await {
            Ok(p) => p,
            Err(e) => panic!("RabbitMQ must run on 127.0.0.1:5672 for this test (scripts/test-deps.sh starts it): {e}"),
        }
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8]) -> lapin::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        assert!(
            matches!(confirm, Confirmation::Ack(_)),
            "broker refused a message: {confirm:?}"
        );
        Ok(())
    }

    /// Publishes many without waiting for each confirm in turn (but waits for all).
    pub async fn publish_all(&self, messages: &[(String, Vec<u8>)]) -> lapin::Result<()> {
        let mut confirms = Vec::with_capacity(messages.len());
        for (key, body) in messages {
            confirms.push(
                self.channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            let confirm = confirm.await?;
            assert!(
                matches!(confirm, Confirmation::Ack(_)),
                "broker refused a message: {confirm:?}"
            );
        }
        Ok(())
    }

    /// Messages ready on a queue (not counting those delivered and not yet acknowledged).
    pub async fn depth(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("passive queue.declare")
            .message_count()
    }

    /// Takes every message off a queue, returning (body, reason header).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, Option<String>)> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
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
        let queues = [self.queue.clone(), self.dead()];
        let exchanges = [self.exchange.clone(), self.dead()];
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
