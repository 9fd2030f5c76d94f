//! `POST /api/readings`.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{read_body, ApiError, AppState};
use crate::engine::{IngestOutcome, Source};
use crate::ingest::wire::{check_clock, parse_readings, InvalidReading};
use crate::store::StoreHealth;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/readings", web::post().to(post_readings));
}

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    duplicates: usize,
    late: usize,
    events: usize,
}

fn rejected(e: InvalidReading) -> ApiError {
    metrics::counter!("fleetwatch_readings_rejected_total", "source" => "http").increment(1);
    ApiError::bad_request(e.to_string()).with_field(e.field, e.index)
}

async fn post_readings(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let readings = parse_readings(&body).map_err(rejected)?;
    let batch = body.trim_ascii_start().starts_with(b"[");
    let now = chrono::Utc::now();
    for (i, reading) in readings.iter().enumerate() {
        check_clock(reading, now, state.max_clock_skew).map_err(|mut e| {
            e.index = batch.then_some(i);
            rejected(e)
        })?;
    }
    if let StoreHealth::Failing { cause, .. } = &*state.engine.store_health().borrow() {
        return Err(ApiError::unavailable(format!(
            "the event store cannot write ({cause}); nothing was accepted, retry later"
        )));
    }
    let count = readings.len();
    let engine = &state.engine;
    let ingest = async {
        // Submitted in body order, so readings of one device keep their order.
        let mut tickets = Vec::with_capacity(count);
        for reading in readings {
            tickets.push(engine.submit(reading, Source::Http).await?);
        }
        let mut accepted = Accepted {
            accepted: count,
            duplicates: 0,
            late: 0,
            events: 0,
        };
        for outcome in futures_util::future::join_all(tickets).await {
            match outcome? {
                IngestOutcome::Applied { events, .. } => accepted.events += events,
                IngestOutcome::Late => {
                    accepted.late += 1;
                    accepted.events += 1;
                }
                IngestOutcome::Duplicate => accepted.duplicates += 1,
            }
        }
        Ok::<_, ApiError>(accepted)
    };
    match tokio::time::timeout(state.http_ingest_timeout, ingest).await {
        Ok(accepted) => Ok(HttpResponse::Accepted().json(accepted?)),
        // Some readings may still become durable: sent again, they are recognised as repeats.
        Err(_) => Err(ApiError::unavailable(format!(
            "the readings were not all durable within {} (--http-ingest-timeout); \
             nothing is acknowledged, retry later",
            humantime::format_duration(state.http_ingest_timeout)
        ))),
    }
}
