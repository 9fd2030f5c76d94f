//! Publishing readings to RabbitMQ with publisher confirms.
//!
//! Each reading is a persistent JSON message on the engine's topic exchange, routed by its device
//! id. The exchange is declared (durable topic, as the engine declares it) so publishing works
//! before the engine ever ran; the engine's queue is left to the engine. Messages are published
//! `mandatory`, so readings no queue receives come back and count as failures instead of
//! vanishing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};

use crate::fleet::SimReading;
use crate::tally::Tally;

/// AMQP delivery mode of messages the broker writes to disk.
const PERSISTENT: u8 = 2;

pub struct AmqpPublisher {
    connection: Connection,
    channel: Channel,
    exchange: ShortString,
    properties: BasicProperties,
    max_unconfirmed: usize,
    unconfirmed: FuturesUnordered<PublisherConfirm>,
    tally: Arc<Tally>,
}

impl AmqpPublisher {
    /// Connects, enables publisher confirms and declares the exchange.
    pub async fn connect(
        url: &str,
        exchange: &str,
        max_unconfirmed: usize,
        connect_timeout: Duration,
        tally: Arc<Tally>,
    ) -> Result<Self> {
        let connection = connect(url, connect_timeout)
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {}", redact_password(url)))?;
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a RabbitMQ channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        fleetwatch::ingest::amqp::declare_exchange(&channel, exchange)
            .await
            .with_context(|| format!("cannot declare the exchange {exchange:?}"))?;
        tracing::info!(exchange, "publishing to RabbitMQ");
        Ok(AmqpPublisher {
            connection,
            channel,
            exchange: exchange.into(),
            properties: BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_content_type("application/json".into()),
            max_unconfirmed: max_unconfirmed.max(1),
            unconfirmed: FuturesUnordered::new(),
            tally,
        })
    }

    /// Publishes one reading; waits first if `max_unconfirmed` confirms are outstanding.
    pub async fn publish(&mut self, reading: &SimReading) -> Result<()> {
        while self.unconfirmed.len() >= self.max_unconfirmed {
            self.await_confirm().await;
        }
        let payload = serde_json::to_vec(reading).context("cannot encode a reading")?;
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                reading.device_id.as_str().into(),
                mandatory,
                &payload,
                self.properties.clone(),
            )
            .await
            .context("cannot publish to RabbitMQ")?;
        self.tally.record_sent(1);
        self.unconfirmed.push(confirm);
        Ok(())
    }

    /// Counts the confirms that have already arrived, without waiting.
    pub fn collect_confirms(&mut self) {
        while let Some(Some(outcome)) = self.unconfirmed.next().now_or_never() {
            self.record(outcome);
        }
    }

    /// Waits for every outstanding confirm, then closes the connection.
    pub async fn finish(mut self) {
        while !self.unconfirmed.is_empty() {
            self.await_confirm().await;
        }
        if let Err(e) = self.channel.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the channel failed");
        }
        if let Err(e) = self.connection.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the connection failed");
        }
    }

    async fn await_confirm(&mut self) {
        if let Some(outcome) = self.unconfirmed.next().await {
            self.record(outcome);
        }
    }

    fn record(&self, outcome: lapin::Result<Confirmation>) {
        match outcome {
            Ok(Confirmation::Ack(None)) => self.tally.record_confirmed(1),
            Ok(Confirmation::Ack(Some(_))) => self.tally.record_failed(
                1,
                format!(
                    "returned unroutable: no queue is bound to the exchange {}; is the engine running?",
                    self.exchange
                ),
            ),
            Ok(Confirmation::Nack(_)) => self.tally.record_failed(1, "the broker nacked a reading"),
            Ok(Confirmation::NotRequested) => {
                self.tally.record_failed(1, "the broker did not confirm a reading")
            }
            Err(e) => self.tally.record_failed(1, format!("no confirm: {e}")),
        }
    }
}

async fn connect(url: &str, timeout: Duration) -> Result<Connection> {
    tokio::time::timeout(
        timeout,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("no answer within {}", humantime::format_duration(timeout)))?
    // lapin's message already includes its cause: chaining it would repeat it.
    .map_err(|e| anyhow!("{e}"))
}

/// The URL with its password, if any, replaced by `***`, for messages and logs.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_password("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_password("amqp://user@host"), "amqp://user@host");
    }
}
