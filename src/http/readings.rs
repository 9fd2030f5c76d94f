//! `POST /api/readings`.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{read_body, ApiError, AppState};
use crate::engine::IngestOutcome;
use crate::ingest::wire::parse_readings;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/readings", web::post().to(post_readings));
}

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    duplicates: usize,
    events: usize,
}

async fn post_readings(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let readings = parse_readings(&body).map_err(|e| {
        metrics::counter!("fleetwatch_readings_rejected_total", "source" => "http").increment(1);
        ApiError::bad_request(e.to_string()).with_field(e.field, e.index)
    })?;
    let count = readings.len();
    // Submitted in body order, so readings of one device keep their order.
    let mut tickets = Vec::with_capacity(count);
    for reading in readings {
        tickets.push(state.engine.submit(reading).await?);
    }
    let mut accepted = Accepted {
        accepted: count,
        duplicates: 0,
        events: 0,
    };
    for outcome in futures_util::future::join_all(tickets).await {
        match outcome? {
            IngestOutcome::Applied { events, .. } => accepted.events += events,
            IngestOutcome::Duplicate => accepted.duplicates += 1,
        }
    }
    Ok(HttpResponse::Accepted().json(accepted))
}
