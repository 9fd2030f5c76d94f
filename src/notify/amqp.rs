//! Alarm changes published to a durable RabbitMQ topic exchange (`fleetwatch.alarms`), routing
//! key `<kind>.<severity>.<device>`, persistent, with publisher confirms. The checkpoint moves
//! only once the broker confirmed every change up to it; a lost connection is retried with
//! backoff, and what was not confirmed is published again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use super::change::AlarmChange;
use super::webhook::SAVE_EVERY;
use super::{ExchangeSettings, Inner, NotifyError, PAGE};
use crate::store::StoreError;
use crate::subscription::Subscription;

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Confirms not received by then count as a failure: the connection is dropped and the changes
/// since the checkpoint published again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) an alarm change")]
    Nacked,
    #[error("the broker did not confirm within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout,
    #[error("reading the events: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] NotifyError),
}

/// The subscriber name of the exchange.
pub(super) fn subscriber(exchange: &str) -> String {
    format!("amqp:{exchange}")
}

pub(super) async fn run(inner: Arc<Inner>, settings: ExchangeSettings, cancel: CancellationToken) {
    let name = subscriber(&settings.exchange);
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        let mut published = false;
        match session(&inner, &settings, &name, &cancel, &mut published).await {
            Ok(()) => break,
            Err(e) => {
                if published {
                    backoff = MIN_BACKOFF;
                }
                failures = failures.saturating_add(1);
                metrics::counter!("fleetwatch_notify_failures_total", "sink" => "amqp")
                    .increment(1);
                tracing::warn!(exchange = %settings.exchange, error = %e, retry_in = ?backoff, "publishing alarm changes to RabbitMQ failed; reconnecting");
                let state_inner = inner.clone();
                let (name, error) = (name.clone(), e.to_string());
                let _ = super::blocking(move || state_inner.state.failed(&name, failures, &error))
                    .await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => break,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    tracing::info!(exchange = %settings.exchange, "alarm publisher stopped");
}

/// One connection's life; `Ok` only when stopped.
async fn session(
    inner: &Arc<Inner>,
    settings: &ExchangeSettings,
    name: &str,
    cancel: &CancellationToken,
    published: &mut bool,
) -> Result<(), PublishError> {
    let setup = async {
        let connection =
            Connection::connect(&settings.url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        crate::ingest::amqp::declare_exchange(&channel, &settings.exchange).await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    let (connection, channel) = tokio::select! {
        setup = setup => setup?,
        _ = cancel.cancelled() => return Ok(()),
    };
    let start = inner.store.head_position().await?;
    let state = inner.clone();
    let owned = name.to_owned();
    let mut saved = super::blocking(move || state.state.ensure_subscriber(&owned, start)).await?;
    tracing::info!(exchange = %settings.exchange, after = saved, "publishing alarm changes to RabbitMQ");
    let mut position = saved;
    let mut last_save = Instant::now();
    let mut subscription = Subscription::new(inner.store.clone(), position, PAGE);
    let outcome = loop {
        let delivery = tokio::select! {
            next = subscription.next() => next,
            _ = cancel.cancelled() => break Ok(()),
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) => break Err(e.into()),
        };
        let mut confirms = Vec::new();
        let mut last = None;
        for event in delivery.events() {
            position = event.position;
            let Some(change) = AlarmChange::from_recorded(event) else {
                continue;
            };
            let body = match serde_json::to_vec(&change) {
                Ok(body) => body,
                Err(e) => {
                    tracing::error!(error = %e, "an alarm change cannot be serialised; skipped");
                    continue;
                }
            };
            let mut headers = FieldTable::default();
            headers.insert(
                "x-fleetwatch-alarm-id".into(),
                AMQPValue::LongString(LongString::from(change.alarm_id.as_str())),
            );
            headers.insert(
                "x-fleetwatch-sequence".into(),
                AMQPValue::LongUInt(change.sequence),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("{}/{}", change.alarm_id, change.sequence).into())
                .with_headers(headers);
            let routing_key = change.routing_key();
            let confirm = match channel
                .basic_publish(
                    settings.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
            {
                Ok(confirm) => confirm,
                Err(e) => return Err(e.into()),
            };
            confirms.push(confirm);
            last = Some((change.alarm_id, change.sequence));
        }
        if confirms.is_empty() {
            if position != saved && last_save.elapsed() >= SAVE_EVERY {
                let state = inner.clone();
                let owned = name.to_owned();
                super::blocking(move || state.state.advance(&owned, position)).await?;
                saved = position;
                last_save = Instant::now();
            }
            continue;
        }
        let count = confirms.len() as u64;
        let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, async {
            for confirm in confirms {
                match confirm.await? {
                    Confirmation::Ack(_) => {}
                    Confirmation::Nack(_) | Confirmation::NotRequested => {
                        return Err(PublishError::Nacked)
                    }
                }
            }
            Ok(())
        })
        .await;
        match confirmed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Err(e),
            Err(_) => break Err(PublishError::ConfirmTimeout),
        }
        *published = true;
        metrics::counter!("fleetwatch_notify_delivered_total", "sink" => "amqp").increment(count);
        let state = inner.clone();
        let owned = name.to_owned();
        let Some((alarm, sequence)) = last else {
            continue;
        };
        super::blocking(move || {
            state
                .state
                .delivered(&owned, position, count, (&alarm, sequence))
        })
        .await?;
        saved = position;
        last_save = Instant::now();
    };
    if outcome.is_ok() && position != saved {
        let state = inner.clone();
        let owned = name.to_owned();
        let _ = super::blocking(move || state.state.advance(&owned, position)).await;
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = connection.close(200, "shutdown".into()).await;
    outcome
}
