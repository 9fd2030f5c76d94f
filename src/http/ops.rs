//! Operations: health, the page's settings, failed messages, Prometheus metrics.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::access::AuthRequired;
use super::AppState;
use crate::store::StoreHealth;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/config", web::get().to(page_config))
        .route("/failed-messages", web::get().to(failed_messages));
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    store: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_failing_since: Option<chrono::DateTime<chrono::Utc>>,
    broker: &'static str,
    devices_active: usize,
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
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

#[derive(Serialize)]
struct PageConfig<'a> {
    tile_url: Option<&'a str>,
    /// Which scopes need a token, so the page knows to ask for one.
    auth: AuthRequired,
}

async fn page_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(PageConfig {
        tile_url: state.tile_url.as_deref(),
        auth: state.access.required(),
    })
}

#[derive(Deserialize)]
struct FailedQuery {
    limit: Option<usize>,
}

async fn failed_messages(
    state: web::Data<AppState>,
    query: web::Query<FailedQuery>,
) -> HttpResponse {
    HttpResponse::Ok().json(state.failed.newest(query.limit.unwrap_or(100)))
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
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
        None => HttpResponse::NotFound().body("metrics are not enabled in this process"),
    }
}
