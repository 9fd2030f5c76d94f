//! `POST /api/readings`.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::schemas::Reading;
use super::{read_body, ApiError, AppState};
use crate::engine::{IngestOutcome, Source};
use crate::ingest::wire::{check_clock, parse_readings, InvalidReading};
use crate::store::StoreHealth;

/// The body of `POST /api/readings`: one reading, or an array of readings (applied all or none).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // A schema only: `ingest::wire` parses the body (naming the failing index).
#[schema(example = json!([
    {"device_id": "truck-7", "timestamp": "2026-11-23T18:00:00Z", "lat": 52.37, "lon": 4.89, "temperature": 4.5},
    {"device_id": "truck-8", "timestamp": "2026-11-23T18:00:05Z", "lat": 52.38, "lon": 4.9, "temperature": 3.9}
]))]
#[serde(untagged)]
pub enum Readings {
    One(Reading),
    Many(Vec<Reading>),
}

/// What became of the readings of one request, once every event they caused is durable.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"accepted": 10, "duplicates": 1, "late": 1, "events": 14}))]
pub struct Accepted {
    /// Readings in the request.
    accepted: usize,
    /// Exact repeats (same device and timestamp as a stored reading): they change nothing.
    duplicates: usize,
    /// Readings older than their device's last one: stored as history only.
    late: usize,
    /// Events stored for the request.
    events: usize,
}

fn rejected(e: InvalidReading) -> ApiError {
    metrics::counter!("fleetwatch_readings_rejected_total", "source" => "http").increment(1);
    ApiError::bad_request(e.to_string()).with_field(e.field, e.index)
}

/// Posts one reading or an array of readings.
///
/// Answers once every event the readings caused is durable. A batch is validated whole first:
/// one invalid reading (its `index` in the error) and nothing of the batch is applied.
#[utoipa::path(
    post,
    path = "/api/readings",
    tag = "readings",
    request_body(content = Readings, content_type = "application/json"),
    responses(
        (status = 202, description = "Every event the readings caused is durable", body = Accepted),
        (status = 400, description = "The body is not JSON, or a reading is invalid (including a `timestamp` more than `--max-clock-skew` ahead of the engine's clock); `field` names it, `index` its place in a batch. Nothing was applied", body = ApiError,
            example = json!({"error": "reading 1: lat: must be a finite number within [-90, 90], got 91", "field": "lat", "index": 1})),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        (status = 500, description = "A device's stored history cannot be read (the error names the stored event); other devices work on", body = ApiError),
        (status = 503, description = "The event store cannot write now, or the readings were not all durable within `--http-ingest-timeout`. Nothing was acknowledged: send the request again (repeats are recognised)", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn post_readings(
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
                // Answers to other commands than readings.
                IngestOutcome::Nothing | IngestOutcome::Refused(_) => {}
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
