//! Operations: health, the page's settings, failed messages, Prometheus metrics.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::access::AuthRequired;
use super::{ApiError, AppState};
use crate::ingest::failed::FailedMessage;
use crate::store::StoreHealth;

/// The engine's health.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"status": "ok", "store": "ok", "broker": "connected", "devices_active": 12}))]
struct Health {
    /// `ok`, or `degraded` when the store cannot write or be read.
    #[schema(value_type = String, pattern = "^(ok|degraded)$")]
    status: &'static str,
    /// `ok`, `failing: <cause>` (it cannot write; ingest pauses) or `error: <cause>` (it cannot
    /// be read).
    store: String,
    /// Since when the store cannot write.
    #[serde(skip_serializing_if = "Option::is_none")]
    store_failing_since: Option<chrono::DateTime<chrono::Utc>>,
    /// `connected`, `connecting` or `disabled`.
    #[schema(value_type = String, pattern = "^(connected|connecting|disabled)$")]
    broker: &'static str,
    /// Device actors in memory.
    devices_active: usize,
}

/// The engine's health (open to anyone, for load balancers).
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "operations",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 503, description = "Degraded: the store cannot write (ingest is paused) or cannot be read", body = Health,
            example = json!({"status": "degraded", "store": "failing: database or disk is full", "store_failing_since": "2026-11-30T11:02:19Z", "broker": "connected", "devices_active": 12})),
    )
)]
pub(super) async fn health(state: web::Data<AppState>) -> HttpResponse {
    let failing = match &*state.engine.store_health().borrow() {
        StoreHealth::Available => None,
        StoreHealth::Failing { cause, since } => Some((format!("failing: {cause}"), *since)),
    };
    let (store, since) = match failing {
        Some((cause, since)) => (cause, Some(since)),
        // The writer says it can write; a read tells whether the readers answer too.
        None => match state.engine.store().head_position().await {
            Ok(_) => ("ok".to_owned(), None),
            Err(e) => (format!("error: {e}"), None),
        },
    };
    let healthy = store == "ok";
    let body = Health {
        status: if healthy { "ok" } else { "degraded" },
        store,
        store_failing_since: since,
        broker: state.broker.get().as_str(),
        devices_active: state.engine.active_devices(),
    };
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// What the map page needs to know before anything else.
#[derive(Serialize, ToSchema)]
struct PageConfig<'a> {
    /// The map tile URL template (`--tile-url`); `null`: the offline world outline.
    tile_url: Option<&'a str>,
    /// Which scopes need a token, so the page knows to ask for one.
    auth: AuthRequired,
}

/// The map page's settings, and which scopes need a token (open to anyone).
#[utoipa::path(
    get,
    path = "/api/config",
    tag = "operations",
    responses((status = 200, description = "The settings", body = PageConfig)),
)]
pub(super) async fn page_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(PageConfig {
        tile_url: state.tile_url.as_deref(),
        auth: state.access.required(),
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailedQuery {
    /// At most this many (default 100; the engine keeps the last 1,000).
    #[param(minimum = 0)]
    limit: Option<usize>,
}

/// Messages from RabbitMQ that were dead-lettered, newest first.
///
/// A quick view kept in memory (the last 1,000, empty after a restart); the dead-letter queue
/// `<queue>.dead` keeps the messages themselves, with the reason in the `x-fleetwatch-reason`
/// header.
#[utoipa::path(
    get,
    path = "/api/failed-messages",
    tag = "operations",
    params(FailedQuery),
    responses(
        (status = 200, description = "Newest first", body = [FailedMessage]),
        (status = 400, description = "An invalid query parameter", body = ApiError),
    )
)]
pub(super) async fn failed_messages(
    state: web::Data<AppState>,
    query: web::Query<FailedQuery>,
) -> HttpResponse {
    HttpResponse::Ok().json(state.failed.newest(query.limit.unwrap_or(100)))
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain", body = String),
        (status = 404, description = "Metrics are not enabled in this process", body = ApiError),
    )
)]
pub(super) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match &state.metrics {
        Some(handle) => {
            // Read from the engine's in-flight semaphore at the scrape: nothing to update per
            // reading.
            metrics::gauge!("fleetwatch_readings_in_flight")
                .set(state.engine.readings_in_flight() as f64);
            HttpResponse::Ok()
                .content_type("text/plain; version=0.0.4")
                .body(handle.render())
        }
        // JSON like every other error.
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process",
        )
        .error_response(),
    }
}
