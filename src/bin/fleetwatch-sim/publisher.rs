//! The chosen way of sending readings: RabbitMQ or HTTP.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use reqwest::Client;

use crate::amqp::AmqpPublisher;
use crate::cli::{Args, Target};
use crate::fleet::SimReading;
use crate::http::HttpPublisher;
use crate::tally::Tally;

pub enum Publisher {
    /// Boxed: the connection state dwarfs the HTTP publisher.
    Amqp(Box<AmqpPublisher>),
    Http(HttpPublisher),
}

impl Publisher {
    /// Connects to the broker or checks the engine; fails if it cannot be reached in time.
    pub async fn connect(
        args: &Args,
        client: Client,
        connect_timeout: Duration,
        tally: Arc<Tally>,
    ) -> Result<Self> {
        Ok(match args.target {
            Target::Amqp => Publisher::Amqp(Box::new(
                AmqpPublisher::connect(
                    &args.amqp_url,
                    &args.amqp_exchange,
                    args.max_unconfirmed as usize,
                    connect_timeout,
                    tally,
                )
                .await?,
            )),
            Target::Http => Publisher::Http(
                HttpPublisher::connect(
                    client,
                    &args.http_url,
                    args.ingest_token.as_deref(),
                    args.batch as usize,
                    args.concurrency as usize,
                    connect_timeout,
                    tally,
                )
                .await?,
            ),
        })
    }

    /// Sends one reading; waits while too many are unconfirmed. An error means no more can be sent.
    pub async fn publish(&mut self, reading: SimReading) -> Result<()> {
        match self {
            Publisher::Amqp(amqp) => amqp.publish(&reading).await,
            Publisher::Http(http) => {
                http.publish(reading).await;
                Ok(())
            }
        }
    }

    /// Counts confirmations and responses that have arrived, without waiting.
    pub fn collect_completed(&mut self) {
        match self {
            Publisher::Amqp(amqp) => amqp.collect_confirms(),
            Publisher::Http(http) => http.collect_responses(),
        }
    }

    /// Sends what is still buffered and waits until everything sent is confirmed or failed.
    pub async fn finish(self) {
        match self {
            Publisher::Amqp(amqp) => amqp.finish().await,
            Publisher::Http(http) => http.finish().await,
        }
    }
}
