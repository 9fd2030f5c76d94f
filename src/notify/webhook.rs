//! One webhook's delivery task: follows the store from its checkpoint and POSTs each matching
//! alarm change, in order, until it is answered 2xx.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::change::AlarmChange;
use super::state::{webhook_subscriber, WebhookRecord};
use super::{backoff, Inner, PAGE};
use crate::store::StoreError;
use crate::subscription::Subscription;
use crate::telemetry::error_chain;

/// Longest one delivery may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry waits up to this long; each further one up to twice as long as the one
/// before, up to the `--webhook-retry-max` cap.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// A checkpoint past events that matched nothing is written at most this often.
pub(super) const SAVE_EVERY: Duration = Duration::from_secs(1);

pub const SIGNATURE_HEADER: &str = "X-Fleetwatch-Signature";
pub const ALARM_ID_HEADER: &str = "X-Fleetwatch-Alarm-Id";
pub const SEQUENCE_HEADER: &str = "X-Fleetwatch-Sequence";

/// The HTTP client of every webhook. The system's CA certificates verify `https` receivers; a
/// machine whose certificate store cannot be read still delivers over `http` (and `https`
/// deliveries fail, saying why, in the webhook's status).
pub(super) fn client() -> reqwest::Result<reqwest::Client> {
    builder().build().or_else(|e| {
        tracing::error!(error = %error_chain(&e), "the system's CA certificates cannot be loaded; https webhooks will fail");
        builder().tls_built_in_root_certs(false).build()
    })
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        // A redirect is an answer that is not 2xx: a failure, not a new destination.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fleetwatch/", env!("CARGO_PKG_VERSION")))
}

/// `sha256=<hex HMAC-SHA256 of body keyed with secret>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut text = String::with_capacity(7 + digest.len() * 2);
    text.push_str("sha256=");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

pub(super) async fn run(inner: Arc<Inner>, hook: WebhookRecord, cancel: CancellationToken) {
    let name = webhook_subscriber(&hook.id);
    let mut runner = Runner {
        inner,
        hook,
        name,
        cancel,
    };
    runner.follow().await;
    metrics::gauge!("fleetwatch_notify_backlog_positions", "subscriber" => runner.name.clone())
        .set(0.0);
}

struct Runner {
    inner: Arc<Inner>,
    hook: WebhookRecord,
    name: String,
    cancel: CancellationToken,
}

impl Runner {
    async fn follow(&mut self) {
        let Some(mut saved) = self.checkpoint().await else {
            return;
        };
        let mut position = saved;
        let mut last_save = Instant::now();
        let mut subscription = Subscription::new(self.inner.store.clone(), position, PAGE);
        loop {
            let delivery = tokio::select! {
                next = subscription.next() => next,
                _ = self.cancel.cancelled() => break,
                // Quiet now: save how far it got, so that its backlog reads 0.
                _ = tokio::time::sleep(SAVE_EVERY), if position != saved => {
                    saved = self.save(position, saved).await;
                    last_save = Instant::now();
                    continue;
                }
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(StoreError::Closed) => break,
                Err(e) => {
                    tracing::warn!(webhook = %self.hook.id, error = %e, "reading the events for a webhook failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = self.cancel.cancelled() => break,
                    }
                }
            };
            for event in delivery.events() {
                if let Some(change) = AlarmChange::from_recorded(event) {
                    if self.hook.filter.matches(&change) {
                        if !self.deliver(&change, saved).await {
                            // Stopped: the checkpoint stays before this change.
                            self.save(position, saved).await;
                            return;
                        }
                        saved = event.position;
                        last_save = Instant::now();
                    }
                }
                position = event.position;
            }
            if position != saved && last_save.elapsed() >= SAVE_EVERY {
                saved = self.save(position, saved).await;
                last_save = Instant::now();
            }
            if !subscription.is_catching_up() {
                metrics::gauge!("fleetwatch_notify_backlog_positions", "subscriber" => self.name.clone())
                    .set(0.0);
            }
        }
        self.save(position, saved).await;
    }

    /// The checkpoint; `None` if the webhook was deleted meanwhile.
    async fn checkpoint(&self) -> Option<u64> {
        let inner = self.inner.clone();
        let name = self.name.clone();
        match super::blocking(move || inner.state.progress(&name)).await {
            Ok(progress) => progress.map(|p| p.position),
            Err(e) => {
                tracing::error!(webhook = %self.hook.id, error = %e, "cannot read the webhook's checkpoint; not delivering");
                None
            }
        }
    }

    /// Writes the checkpoint past events that matched nothing; returns what is saved.
    async fn save(&self, position: u64, saved: u64) -> u64 {
        if position == saved {
            return saved;
        }
        let inner = self.inner.clone();
        let name = self.name.clone();
        match super::blocking(move || inner.state.advance(&name, position)).await {
            Ok(()) => position,
            Err(e) => {
                tracing::warn!(webhook = %self.hook.id, error = %e, "cannot save the webhook's checkpoint");
                saved
            }
        }
    }

    /// Delivers `change` until it is answered 2xx; `false` if stopped first. `saved`: the
    /// checkpoint, for the backlog gauge.
    async fn deliver(&self, change: &AlarmChange, saved: u64) -> bool {
        let body = match serde_json::to_vec(change) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "an alarm change cannot be serialised; skipped");
                return true;
            }
        };
        let mut attempts = 0u32;
        loop {
            let sent = tokio::select! {
                sent = self.post(change, &body) => sent,
                _ = self.cancel.cancelled() => return false,
            };
            match sent {
                Ok(()) => {
                    metrics::counter!("fleetwatch_notify_delivered_total", "sink" => "webhook")
                        .increment(1);
                    if attempts > 0 {
                        tracing::info!(webhook = %self.hook.id, alarm = %change.alarm_id, sequence = change.sequence, attempts, "webhook delivers again");
                    }
                    let inner = self.inner.clone();
                    let name = self.name.clone();
                    let (position, alarm, sequence) =
                        (change.position, change.alarm_id.clone(), change.sequence);
                    if let Err(e) = super::blocking(move || {
                        inner
                            .state
                            .delivered(&name, position, 1, (&alarm, sequence))
                    })
                    .await
                    {
                        // Delivered, but the checkpoint did not move: it is delivered again
                        // after a restart, which receivers drop.
                        tracing::warn!(webhook = %self.hook.id, error = %e, "cannot save the webhook's checkpoint");
                    }
                    return true;
                }
                Err(error) => {
                    attempts = attempts.saturating_add(1);
                    metrics::counter!("fleetwatch_notify_failures_total", "sink" => "webhook")
                        .increment(1);
                    if let Ok(head) = self.inner.store.head_position().await {
                        // As `GET /api/webhooks/{id}` counts it.
                        let behind = head.saturating_sub(saved);
                        metrics::gauge!("fleetwatch_notify_backlog_positions", "subscriber" => self.name.clone())
                            .set(behind as f64);
                    }
                    let wait = backoff(attempts, RETRY_BASE, self.inner.settings.retry_max);
                    if attempts == 1 {
                        tracing::warn!(webhook = %self.hook.id, host = %super::host_of(&self.hook.url), alarm = %change.alarm_id, sequence = change.sequence, %error, "webhook delivery failed; retrying with backoff");
                    } else {
                        tracing::debug!(webhook = %self.hook.id, attempts, %error, retry_in = ?wait, "webhook delivery failed again");
                    }
                    let inner = self.inner.clone();
                    let name = self.name.clone();
                    let recorded = error.clone();
                    if let Err(e) =
                        super::blocking(move || inner.state.failed(&name, attempts, &recorded))
                            .await
                    {
                        tracing::warn!(webhook = %self.hook.id, error = %e, "cannot save the webhook's status");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => return false,
                    }
                }
            }
        }
    }

    async fn post(&self, change: &AlarmChange, body: &[u8]) -> Result<(), String> {
        let mut request = self
            .inner
            .http
            .post(&self.hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ALARM_ID_HEADER, &change.alarm_id)
            .header(SEQUENCE_HEADER, change.sequence.to_string())
            .body(body.to_vec());
        if let Some(secret) = &self.hook.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, body));
        }
        // Without the URL: it is logged and shown, and its path may be a secret.
        let response = request
            .send()
            .await
            .map_err(|e| error_chain(&e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered HTTP {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
