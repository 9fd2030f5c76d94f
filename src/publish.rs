//! Publishing readings to the engine's RabbitMQ exchange with publisher confirms: persistent JSON
//! messages routed by device id, with a bounded window of outstanding confirms. Used by
//! `fleetwatch-sim`, the integration tests and the benchmarks, so they all publish the same way.
//!
//! The exchange is declared with [`declare_exchange`], as the engine declares it, so publishing
//! works before the engine ever ran; the engine's queue is left to the engine.

use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};

use crate::ingest::amqp::declare_exchange;

/// AMQP delivery mode of messages the broker writes to disk.
const PERSISTENT: u8 = 2;

/// Why the publisher could not start or send.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to RabbitMQ at {url}")]
    Connect {
        /// With its password, if any, redacted.
        url: String,
        #[source]
        cause: ConnectError,
    },
    #[error("cannot open a RabbitMQ channel")]
    Channel(#[source] lapin::Error),
    #[error("cannot enable publisher confirms")]
    EnableConfirms(#[source] lapin::Error),
    #[error("cannot declare the exchange {exchange:?}")]
    DeclareExchange {
        exchange: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot publish to RabbitMQ")]
    Publish(#[source] lapin::Error),
    /// A message was not confirmed (only without a confirm handler; see [`Publisher::on_confirm`]).
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Not a `#[source]`: lapin's message already includes its cause, chaining would repeat it.
    #[error("{0}")]
    Broker(lapin::Error),
}

/// Why one published message did not count as delivered.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    /// Published `mandatory` while no queue was bound: the broker returned it.
    #[error("returned unroutable: no queue is bound to the exchange {exchange}")]
    Unroutable { exchange: String },
    #[error("the broker nacked a message")]
    Nacked,
    #[error("the broker did not confirm a message")]
    NotConfirmed,
    #[error("no confirm")]
    Lost(#[source] lapin::Error),
}

#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Messages awaiting their confirm; publishing waits beyond this.
    pub window: usize,
    /// Have the broker return messages no queue receives, so they fail instead of vanishing.
    pub mandatory: bool,
    pub connect_timeout: Duration,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self {
            window: 4_096,
            mandatory: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Receives the outcome of every confirm, in the order they arrive.
pub type ConfirmHandler = Box<dyn FnMut(Result<(), ConfirmError>) + Send>;

pub struct Publisher {
    /// `None` when publishing on a channel of a connection someone else owns.
    connection: Option<Connection>,
    channel: Channel,
    exchange: ShortString,
    properties: BasicProperties,
    publish_options: BasicPublishOptions,
    window: usize,
    unconfirmed: FuturesUnordered<PublisherConfirm>,
    on_confirm: Option<ConfirmHandler>,
}

impl Publisher {
    /// Connects (within `options.connect_timeout`) and opens a publisher on a connection of its own.
    pub async fn connect(
        url: &str,
        exchange: &str,
        options: PublisherOptions,
    ) -> Result<Self, PublishError> {
        let connect = Connection::connect(url, ConnectionProperties::default());
        let connection = match tokio::time::timeout(options.connect_timeout, connect).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(connect_error(url, ConnectError::Broker(e))),
            Err(_) => {
                let cause = ConnectError::Timeout(options.connect_timeout);
                return Err(connect_error(url, cause));
            }
        };
        let mut publisher = Self::open(&connection, exchange, options).await?;
        publisher.connection = Some(connection);
        Ok(publisher)
    }

    /// A publisher on a new channel of `connection`: enables confirms, declares the exchange.
    pub async fn open(
        connection: &Connection,
        exchange: &str,
        options: PublisherOptions,
    ) -> Result<Self, PublishError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(PublishError::Channel)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(PublishError::EnableConfirms)?;
        declare_exchange(&channel, exchange)
            .await
            .map_err(|source| PublishError::DeclareExchange {
                exchange: exchange.to_owned(),
                source,
            })?;
        Ok(Self {
            connection: None,
            channel,
            exchange: exchange.into(),
            properties: BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_content_type("application/json".into()),
            publish_options: BasicPublishOptions {
                mandatory: options.mandatory,
                ..BasicPublishOptions::default()
            },
            window: options.window.max(1),
            unconfirmed: FuturesUnordered::new(),
            on_confirm: None,
        })
    }

    /// Hands every confirm's outcome to `handler` instead of failing on the first one that is not
    /// an ack (for a caller that counts failures and goes on).
    pub fn on_confirm(mut self, handler: ConfirmHandler) -> Self {
        self.on_confirm = Some(handler);
        self
    }

    /// The publisher's channel, for other requests to the broker.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes one persistent message; waits first while the window of confirms is full.
    pub async fn publish(&mut self, routing_key: &str, body: &[u8]) -> Result<(), PublishError> {
        self.wait_for_room().await?;
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                routing_key.into(),
                self.publish_options,
                body,
                self.properties.clone(),
            )
            .await
            .map_err(PublishError::Publish)?;
        self.unconfirmed.push(confirm);
        Ok(())
    }

    /// Waits until fewer than the window's confirms are outstanding.
    pub async fn wait_for_room(&mut self) -> Result<(), PublishError> {
        while self.unconfirmed.len() >= self.window {
            self.await_confirm().await?;
        }
        Ok(())
    }

    /// Takes the confirms that have already arrived, without waiting.
    pub fn collect_confirms(&mut self) -> Result<(), PublishError> {
        while let Some(Some(outcome)) = self.unconfirmed.next().now_or_never() {
            self.settle(outcome)?;
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    pub async fn flush(&mut self) -> Result<(), PublishError> {
        while !self.unconfirmed.is_empty() {
            self.await_confirm().await?;
        }
        Ok(())
    }

    /// Waits for every outstanding confirm, then closes the channel and the connection if it owns
    /// one. Failing to close is only logged: everything was confirmed by then.
    pub async fn close(mut self) -> Result<(), PublishError> {
        self.flush().await?;
        if let Err(e) = self.channel.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the channel failed");
        }
        if let Some(connection) = &self.connection {
            if let Err(e) = connection.close(200, "done".into()).await {
                tracing::debug!(error = %e, "closing the connection failed");
            }
        }
        Ok(())
    }

    async fn await_confirm(&mut self) -> Result<(), PublishError> {
        match self.unconfirmed.next().await {
            Some(outcome) => self.settle(outcome),
            None => Ok(()),
        }
    }

    fn settle(&mut self, outcome: lapin::Result<Confirmation>) -> Result<(), PublishError> {
        let outcome = match outcome {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(ConfirmError::Unroutable {
                exchange: self.exchange.to_string(),
            }),
            Ok(Confirmation::Nack(_)) => Err(ConfirmError::Nacked),
            Ok(Confirmation::NotRequested) => Err(ConfirmError::NotConfirmed),
            Err(e) => Err(ConfirmError::Lost(e)),
        };
        match &mut self.on_confirm {
            Some(handler) => {
                handler(outcome);
                Ok(())
            }
            None => Ok(outcome?),
        }
    }
}

fn connect_error(url: &str, cause: ConnectError) -> PublishError {
    PublishError::Connect {
        url: redact_password(url),
        cause,
    }
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
