//! Webhook subscriptions (`/api/webhooks`): alarm changes POSTed to a URL (see `crate::notify`).
//! Every route needs the `admin` scope: URLs and secrets are configuration.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{parse_json, read_body, ApiError, AppState};
use crate::notify::{DeliveryStatus, Filter, NewWebhook, NotifyError, Webhook};

/// A webhook to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "https://hooks.example.com/fleet", "kinds": ["outside_zone"], "severities": ["critical"], "zones": ["depot"], "secret": "s3cr3t"}))]
struct WebhookBody {
    /// Where to POST: an absolute `http` or `https` URL (at most 2,048 bytes; on a host of
    /// `--webhook-hosts` when that is set).
    url: String,
    /// Only alarms of these kinds (absent or empty: any).
    #[serde(default)]
    #[schema(value_type = Option<Vec<crate::http::schemas::AlarmKind>>)]
    kinds: Option<Vec<fleetwatch_domain::AlarmKind>>,
    /// Only alarms of these severities (absent or empty: any).
    #[serde(default)]
    #[schema(value_type = Option<Vec<crate::http::schemas::Severity>>)]
    severities: Option<Vec<fleetwatch_domain::Severity>>,
    /// Only outside-zone alarms of these zones (absent or empty: any alarm).
    #[serde(default)]
    zones: Option<Vec<String>>,
    /// Signs each delivery: `X-Fleetwatch-Signature: sha256=<hex HMAC-SHA256 of the body>`
    /// (1 to 256 bytes). Never shown again.
    #[serde(default)]
    secret: Option<String>,
}

/// A webhook subscription (its secret is never shown).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"id": "5f0c2b1e9d7a4c36a1e0f3b2c4d5e6f7", "url": "https://hooks.example.com/fleet", "kinds": ["outside_zone"], "severities": ["critical"], "zones": ["depot"], "has_secret": true, "created_at": "2026-11-30T14:00:00Z"}))]
struct WebhookView {
    id: String,
    url: String,
    #[schema(value_type = Vec<crate::http::schemas::AlarmKind>)]
    kinds: Vec<fleetwatch_domain::AlarmKind>,
    #[schema(value_type = Vec<crate::http::schemas::Severity>)]
    severities: Vec<fleetwatch_domain::Severity>,
    zones: Vec<String>,
    /// Whether deliveries are signed.
    has_secret: bool,
    /// It gets the alarm changes committed from then on.
    created_at: DateTime<Utc>,
    /// `GET /api/webhooks/{id}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<DeliveryView>,
}

/// How a webhook's deliveries go.
#[derive(Serialize, ToSchema)]
struct DeliveryView {
    /// Every matching change up to this store position has been delivered (answered 2xx).
    checkpoint: u64,
    /// Store positions after the checkpoint: an upper bound of the changes still to deliver (most
    /// positions are readings, which no webhook gets); 0 when it is up to date.
    backlog_positions: u64,
    /// Changes delivered since it was created.
    delivered: u64,
    /// Failed attempts at the change it is on now; 0 when the last attempt succeeded.
    attempts: u32,
    /// The last failure (`answered HTTP 500 ...`, a connection error, a timeout), even when
    /// deliveries succeed again since.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_delivered_at: Option<DateTime<Utc>>,
    /// The last change delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_delivered: Option<DeliveredView>,
}

/// An alarm change, by its identity.
#[derive(Serialize, ToSchema)]
struct DeliveredView {
    alarm_id: String,
    sequence: u32,
}

/// The webhooks, oldest first.
#[derive(Serialize, ToSchema)]
struct WebhooksPage {
    webhooks: Vec<WebhookView>,
}

impl WebhookView {
    fn new(hook: Webhook, delivery: Option<DeliveryStatus>) -> Self {
        Self {
            id: hook.id,
            url: hook.url,
            kinds: hook.filter.kinds,
            severities: hook.filter.severities,
            zones: hook.filter.zones,
            has_secret: hook.has_secret,
            created_at: hook.created_at,
            delivery: delivery.map(|d| DeliveryView {
                checkpoint: d.progress.position,
                backlog_positions: d.backlog_positions,
                delivered: d.progress.delivered,
                attempts: d.progress.attempts,
                last_error: d.progress.last_error,
                last_error_at: d.progress.last_error_at,
                last_delivered_at: d.progress.last_delivered_at,
                last_delivered: d
                    .progress
                    .last_delivered
                    .map(|(alarm_id, sequence)| DeliveredView { alarm_id, sequence }),
            }),
        }
    }
}

impl From<NotifyError> for ApiError {
    fn from(e: NotifyError) -> Self {
        match e {
            NotifyError::Invalid { field, reason } => {
                ApiError::bad_request(format!("{field}: {reason}"))
                    .with_field(Some(field.to_owned()), None)
            }
            NotifyError::TooMany => ApiError::bad_request(e.to_string()),
            NotifyError::Store(e) => e.into(),
            other => {
                tracing::error!(error = %other, "webhook storage");
                ApiError::unavailable(other.to_string())
            }
        }
    }
}

/// Subscribes a URL to alarm changes.
///
/// Each matching alarm change committed from now on is POSTed to `url` as JSON, in order, at
/// least once, retried with exponential backoff and full jitter while the answer is not 2xx (see
/// docs/api.md for the body, the headers and the signature).
#[utoipa::path(
    post,
    path = "/api/webhooks",
    tag = "webhooks",
    request_body(content = WebhookBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Created: it gets the matching changes from now on", body = WebhookView),
        (status = 400, description = "An invalid URL, filter or secret (`field` names it), or 100 webhooks exist", body = ApiError),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        (status = 503, description = "The store or the notifications cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn create_webhook(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: WebhookBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let created = state
        .notifier
        .create(NewWebhook {
            url: body.url,
            filter: Filter {
                kinds: body.kinds.unwrap_or_default(),
                severities: body.severities.unwrap_or_default(),
                zones: body.zones.unwrap_or_default(),
            },
            secret: body.secret,
        })
        .await?;
    Ok(HttpResponse::Created().json(WebhookView::new(created, None)))
}

/// The webhook subscriptions, oldest first.
#[utoipa::path(
    get,
    path = "/api/webhooks",
    tag = "webhooks",
    responses(
        (status = 200, description = "Every webhook", body = WebhooksPage),
        (status = 503, description = "The notifications cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn list_webhooks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let hooks = state.notifier.list().await?;
    Ok(HttpResponse::Ok().json(WebhooksPage {
        webhooks: hooks
            .into_iter()
            .map(|h| WebhookView::new(h, None))
            .collect(),
    }))
}

/// A webhook and how its deliveries go: checkpoint, backlog, failures.
#[utoipa::path(
    get,
    path = "/api/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 200, description = "The webhook with `delivery`", body = WebhookView),
        (status = 404, description = "No such webhook", body = ApiError),
        (status = 503, description = "The store or the notifications cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn get_webhook(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    match state.notifier.get(&id).await? {
        Some((hook, delivery)) => {
            Ok(HttpResponse::Ok().json(WebhookView::new(hook, Some(delivery))))
        }
        None => Err(ApiError::not_found(format!("webhook {id:?}"))),
    }
}

/// Deletes a webhook: its deliveries stop (one in flight may still arrive).
#[utoipa::path(
    delete,
    path = "/api/webhooks/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such webhook", body = ApiError),
        (status = 503, description = "The notifications cannot be changed now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn delete_webhook(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    if state.notifier.delete(&id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::not_found(format!("webhook {id:?}")))
    }
}
