//! Notifications of alarm changes: webhooks (`/api/webhooks`) and a RabbitMQ topic exchange.
//!
//! Every subscriber (each webhook, and the exchange) follows the store's global stream with a
//! [`Subscription`](crate::subscription::Subscription) from its own checkpoint in
//! `notifications.sqlite3`, picks the alarm changes (`AlarmOpened`, `AlarmAcknowledged`,
//! `AlarmCleared`) it wants, and delivers them one after another, in store order. Its checkpoint
//! moves only after a delivery succeeded (a 2xx answer; the broker's confirm), so delivery is at
//! least once: after a crash the changes since the checkpoint are delivered again, and receivers
//! drop repeats by `(alarm_id, sequence)`. A change that fails is retried with exponential backoff
//! and full jitter, and holds back only its own subscriber: each runs in a task of its own, on a
//! thread of its own, apart from ingest and the read models.
//!
//! A new webhook starts at the store's head when it is created: it gets the changes from then
//! on. The exchange starts at the head the first time the engine runs with it.

mod amqp;
mod change;
mod state;
mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{EventStore, StoreError};
pub use change::{AlarmChange, ChangeKind, Filter};
pub use state::Progress;
use state::{State, WebhookRecord};

/// Events read back at a time while a subscriber catches up.
const PAGE: usize = 2_000;
/// Most webhook subscriptions.
pub const MAX_WEBHOOKS: usize = 100;
/// Longest webhook URL, in bytes.
const MAX_URL_BYTES: usize = 2_048;
/// Longest secret, in bytes.
const MAX_SECRET_BYTES: usize = 256;
/// Most entries in one filter list.
const MAX_FILTER_ENTRIES: usize = 100;
/// How long shutdown waits for deliveries in flight; one cut off is delivered again later.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification storage: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("notification storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("notification storage: a stored filter cannot be read: {0}")]
    Json(#[from] serde_json::Error),
    #[error("reading the events: {0}")]
    Store(#[from] StoreError),
    /// A webhook that cannot be created as asked; `field` names what is wrong.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("at most {MAX_WEBHOOKS} webhooks; delete one first")]
    TooMany,
}

/// Settings of the notifications.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// Longest wait between two attempts at a failing webhook delivery (the backoff's cap).
    pub retry_max: Duration,
    /// Hosts webhooks may point at; empty: any.
    pub allowed_hosts: Vec<String>,
    /// The alarms exchange, when AMQP ingest is enabled.
    pub amqp: Option<ExchangeSettings>,
}

impl NotifySettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            retry_max: config.webhook_retry_max.max(Duration::from_millis(1)),
            allowed_hosts: config
                .webhook_hosts
                .iter()
                .map(|h| {
                    h.trim()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned()
                })
                .filter(|h| !h.is_empty())
                .collect(),
            amqp: (!config.amqp_disabled).then(|| ExchangeSettings {
                url: config.amqp_url.clone(),
                exchange: config.amqp_alarms_exchange.clone(),
            }),
        }
    }
}

/// Where alarm changes are published.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    pub url: String,
    pub exchange: String,
}

/// A webhook to create.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub filter: Filter,
    pub secret: Option<String>,
}

/// A webhook as the API shows it: never its secret.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub filter: Filter,
    pub has_secret: bool,
    pub created_at: DateTime<Utc>,
}

impl From<&WebhookRecord> for Webhook {
    fn from(record: &WebhookRecord) -> Self {
        Webhook {
            id: record.id.clone(),
            url: record.url.clone(),
            filter: record.filter.clone(),
            has_secret: record.secret.is_some(),
            created_at: record.created_at,
        }
    }
}

/// How a subscriber's deliveries go.
#[derive(Debug, Clone)]
pub struct DeliveryStatus {
    pub progress: Progress,
    /// Store positions after the checkpoint: an upper bound of the changes not yet delivered
    /// (most of those positions are readings, which no webhook gets).
    pub backlog_positions: u64,
}

/// The notifications: the webhooks' registry and the running subscribers. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    state: State,
    store: Arc<dyn EventStore>,
    settings: NotifySettings,
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The running webhooks, to stop one that is deleted.
    running: Mutex<HashMap<String, CancellationToken>>,
}

/// Opens `notifications.sqlite3` in `dir` and starts every subscriber on a thread of its own; it
/// stops when `shutdown` is cancelled.
pub async fn start(
    store: Arc<dyn EventStore>,
    dir: &std::path::Path,
    settings: NotifySettings,
    shutdown: CancellationToken,
) -> Result<(Notifier, std::thread::JoinHandle<()>), NotifyError> {
    let state = State::open(dir)?;
    if let Some(exchange) = &settings.amqp {
        // From the head the first time: before anything can be committed by this run.
        let head = store.head_position().await?;
        state.ensure_subscriber(&amqp::subscriber(&exchange.exchange), head)?;
    }
    let http = webhook::client().map_err(|e| std::io::Error::other(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let notifier = Notifier {
        inner: Arc::new(Inner {
            state,
            store,
            settings,
            http,
            runtime: runtime.handle().clone(),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            running: Mutex::default(),
        }),
    };
    for hook in notifier.inner.state.webhooks()? {
        notifier.run_webhook(hook);
    }
    if let Some(exchange) = notifier.inner.settings.amqp.clone() {
        let inner = notifier.inner.clone();
        notifier.inner.tracker.spawn_on(
            amqp::run(inner, exchange, shutdown.clone()),
            &notifier.inner.runtime,
        );
    }
    let tracker = notifier.inner.tracker.clone();
    let thread = std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            runtime.block_on(async {
                shutdown.cancelled().await;
                tracker.close();
                if tokio::time::timeout(STOP_TIMEOUT, tracker.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("notifications still in flight at shutdown; they are delivered again at the next start");
                }
            });
        })?;
    Ok((notifier, thread))
}

impl Notifier {
    fn run_webhook(&self, hook: WebhookRecord) {
        let cancel = self.inner.shutdown.child_token();
        self.running().insert(hook.id.clone(), cancel.clone());
        self.inner.tracker.spawn_on(
            webhook::run(self.inner.clone(), hook, cancel),
            &self.inner.runtime,
        );
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a webhook that gets the matching changes committed from now on (SQLite is
    /// written on the blocking pool).
    pub async fn create(&self, new: NewWebhook) -> Result<Webhook, NotifyError> {
        validate(&new, &self.inner.settings.allowed_hosts)?;
        let head = self.inner.store.head_position().await?;
        let record = WebhookRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            url: new.url,
            filter: new.filter,
            secret: new.secret,
            created_at: Utc::now(),
        };
        let inner = self.inner.clone();
        let stored = record.clone();
        blocking(move || inner.state.insert_webhook(&stored, head, MAX_WEBHOOKS)).await?;
        // Not the URL: for many services (chat webhooks) its path is the secret.
        tracing::info!(id = %record.id, host = %host_of(&record.url), after = head, "webhook created");
        let webhook = Webhook::from(&record);
        self.run_webhook(record);
        Ok(webhook)
    }

    /// Every webhook, oldest first.
    pub async fn list(&self) -> Result<Vec<Webhook>, NotifyError> {
        let inner = self.inner.clone();
        let records = blocking(move || inner.state.webhooks()).await?;
        Ok(records.iter().map(Webhook::from).collect())
    }

    /// A webhook and how its deliveries go; `None` if there is no such webhook.
    pub async fn get(&self, id: &str) -> Result<Option<(Webhook, DeliveryStatus)>, NotifyError> {
        let inner = self.inner.clone();
        let id = id.to_owned();
        let found = blocking(move || {
            let Some(record) = inner.state.webhook(&id)? else {
                return Ok(None);
            };
            let progress = inner
                .state
                .progress(&state::webhook_subscriber(&id))?
                .unwrap_or_default();
            Ok(Some((record, progress)))
        })
        .await?;
        let Some((record, progress)) = found else {
            return Ok(None);
        };
        let head = self.inner.store.head_position().await?;
        let backlog_positions = head.saturating_sub(progress.position);
        Ok(Some((
            Webhook::from(&record),
            DeliveryStatus {
                progress,
                backlog_positions,
            },
        )))
    }

    /// Deletes a webhook and stops its deliveries; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, NotifyError> {
        if let Some(cancel) = self.running().remove(id) {
            cancel.cancel();
        }
        let inner = self.inner.clone();
        let id = id.to_owned();
        let removed = blocking(move || inner.state.delete_webhook(&id)).await?;
        Ok(removed)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NotifyError> + Send + 'static,
) -> Result<T, NotifyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NotifyError::Io(std::io::Error::other(e.to_string())))?
}

fn invalid(field: &'static str, reason: impl Into<String>) -> NotifyError {
    NotifyError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks a new webhook: an absolute http(s) URL (on an allowed host, when hosts are listed),
/// bounded filters, a non-empty secret.
fn validate(new: &NewWebhook, allowed_hosts: &[String]) -> Result<(), NotifyError> {
    if new.url.len() > MAX_URL_BYTES {
        return Err(invalid("url", format!("at most {MAX_URL_BYTES} bytes")));
    }
    let url = reqwest::Url::parse(&new.url)
        .map_err(|e| invalid("url", format!("not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "url",
            format!("must be http or https, got {:?}", url.scheme()),
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(invalid("url", "has no host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !allowed_hosts.is_empty() && !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(invalid(
            "url",
            format!("host {host:?} is not among the allowed webhook hosts (--webhook-hosts)"),
        ));
    }
    let filter = &new.filter;
    for (field, len) in [
        ("kinds", filter.kinds.len()),
        ("severities", filter.severities.len()),
        ("zones", filter.zones.len()),
    ] {
        if len > MAX_FILTER_ENTRIES {
            return Err(invalid(
                field,
                format!("at most {MAX_FILTER_ENTRIES} entries"),
            ));
        }
    }
    if let Some(zone) = filter
        .zones
        .iter()
        .find(|z| fleetwatch_domain::RuleId::parse(z.as_str()).is_err())
    {
        return Err(invalid("zones", format!("not a zone id: {zone:?}")));
    }
    if let Some(secret) = &new.secret {
        if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
            return Err(invalid(
                "secret",
                format!("must be 1 to {MAX_SECRET_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

/// Full-jitter exponential backoff: a random wait up to `base * 2^(attempt-1)`, capped.
fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    use rand::Rng;
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)))
        .min(cap);
    let millis = ceiling.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

/// The host of a webhook URL, for logs (the rest of it may be a secret).
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(url: &str) -> NewWebhook {
        NewWebhook {
            url: url.into(),
            filter: Filter::default(),
            secret: None,
        }
    }

    fn field(result: Result<(), NotifyError>) -> &'static str {
        match result {
            Err(NotifyError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn webhook_urls_are_absolute_http_on_allowed_hosts() {
        assert!(validate(&new("https://hooks.example.com/x?y=1"), &[]).is_ok());
        assert!(validate(&new("http://127.0.0.1:9000/"), &[]).is_ok());
        assert_eq!(field(validate(&new("ftp://example.com/"), &[])), "url");
        assert_eq!(field(validate(&new("/relative"), &[])), "url");
        assert_eq!(field(validate(&new("not a url"), &[])), "url");
        let local = ["127.0.0.1".to_owned(), "::1".to_owned()];
        assert!(validate(&new("http://127.0.0.1:9000/"), &local).is_ok());
        assert!(validate(&new("http://[::1]:9000/"), &local).is_ok());
        assert_eq!(field(validate(&new("http://10.1.2.3/"), &local)), "url");
        let mut secret = new("http://127.0.0.1/");
        secret.secret = Some(String::new());
        assert_eq!(field(validate(&secret, &[])), "secret");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(300);
        for attempt in 1..100 {
            let wait = backoff(attempt, base, cap);
            assert!(wait <= cap);
            assert!(wait <= base * 2u32.saturating_pow(attempt - 1));
        }
        let waits: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, base, cap)).collect();
        assert!(waits.len() > 1, "jittered: {waits:?}");
    }
}
