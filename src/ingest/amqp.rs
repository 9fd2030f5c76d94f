//! RabbitMQ ingest.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    Disabled,
    Connecting,
    Connected,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Disabled => "disabled",
            BrokerState::Connecting => "connecting",
            BrokerState::Connected => "connected",
        }
    }
}

/// The consumer's connection state, shared with `/api/health`.
#[derive(Clone)]
pub struct BrokerStatus(Arc<AtomicU8>);

impl BrokerStatus {
    pub fn new(state: BrokerState) -> Self {
        Self(Arc::new(AtomicU8::new(state as u8)))
    }

    pub fn set(&self, state: BrokerState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> BrokerState {
        match self.0.load(Ordering::Relaxed) {
            0 => BrokerState::Disabled,
            1 => BrokerState::Connecting,
            _ => BrokerState::Connected,
        }
    }
}

/// RabbitMQ consumer settings.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    pub url: String,
    pub exchange: String,
    pub queue: String,
    pub prefetch: u16,
    pub consumers: usize,
    pub max_retries: u32,
}

impl AmqpSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            url: config.amqp_url.clone(),
            exchange: config.amqp_exchange.clone(),
            queue: config.amqp_queue.clone(),
            prefetch: config.amqp_prefetch,
            consumers: config.amqp_consumers.max(1),
            max_retries: config.amqp_max_retries,
        }
    }
}

pub fn spawn(
    _settings: AmqpSettings,
    _engine: crate::engine::Engine,
    _status: BrokerStatus,
    _failed: crate::ingest::failed::FailedMessages,
    _shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {})
}
