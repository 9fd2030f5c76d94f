//! Publishing readings to RabbitMQ with publisher confirms, through [`fleetwatch::publish`].
//!
//! Messages are published `mandatory`, so readings no queue receives come back and count as
//! failures instead of vanishing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fleetwatch::publish::{ConfirmError, Publisher, PublisherOptions};

use crate::fleet::SimReading;
use crate::tally::Tally;

pub struct AmqpPublisher {
    publisher: Publisher,
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
        let options = PublisherOptions {
            window: max_unconfirmed,
            mandatory: true,
            connect_timeout,
        };
        let confirms = tally.clone();
        let publisher = Publisher::connect(url, exchange, options)
            .await?
            .on_confirm(Box::new(move |outcome| record(&confirms, outcome)));
        tracing::info!(exchange, "publishing to RabbitMQ");
        Ok(AmqpPublisher { publisher, tally })
    }

    /// Publishes one reading; waits first if `max_unconfirmed` confirms are outstanding.
    pub async fn publish(&mut self, reading: &SimReading) -> Result<()> {
        let payload = serde_json::to_vec(reading).context("cannot encode a reading")?;
        self.publisher
            .publish(reading.device_id.as_str(), &payload)
            .await?;
        self.tally.record_sent(1);
        Ok(())
    }

    /// Counts the confirms that have already arrived, without waiting.
    pub fn collect_confirms(&mut self) {
        // Cannot fail: the handler takes every outcome.
        if let Err(e) = self.publisher.collect_confirms() {
            tracing::debug!(error = %e, "collecting confirms failed");
        }
    }

    /// Waits for every outstanding confirm, then closes the connection.
    pub async fn finish(self) {
        if let Err(e) = self.publisher.close().await {
            tracing::debug!(error = %e, "closing the publisher failed");
        }
    }
}

fn record(tally: &Tally, outcome: Result<(), ConfirmError>) {
    match outcome {
        Ok(()) => tally.record_confirmed(1),
        Err(ConfirmError::Unroutable { exchange }) => tally.record_failed(
            1,
            format!(
                "returned unroutable: no queue is bound to the exchange {exchange}; is the engine running?"
            ),
        ),
        Err(ConfirmError::Nacked) => tally.record_failed(1, "the broker nacked a reading"),
        Err(ConfirmError::NotConfirmed) => {
            tally.record_failed(1, "the broker did not confirm a reading")
        }
        Err(ConfirmError::Lost(e)) => tally.record_failed(1, format!("no confirm: {e}")),
    }
}
