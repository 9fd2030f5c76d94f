//! Live: every persisted event pushed to browsers as server-sent events.
//!
//! A client first gets the matching events after its resume position from the store, then the
//! live ones from the store's commit feed. It subscribes to the feed *before* reading the store
//! and skips live events it has already sent, so there is neither a gap nor a duplicate at the
//! seam. Each client has a bounded buffer; one that falls too far behind is disconnected and
//! resumes with `Last-Event-ID`, so a slow browser never slows the engine or other clients.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::http::{ApiError, AppState};
use crate::store::{EventStore, RecordedEvent};

/// Frames buffered per client before it counts as too slow.
const CLIENT_BUFFER: usize = 4096;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const CATCH_UP_PAGE: usize = 1000;
const ALARM_TYPES: [&str; 4] = [
    "LeftZone",
    "EnteredZone",
    "TemperatureOutOfRange",
    "TemperatureBackInRange",
];
const ZONE_TYPES: [&str; 4] = ["LeftZone", "EnteredZone", "ZoneDefined", "ZoneRemoved"];

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    devices: Option<String>,
    zones: Option<String>,
    types: Option<String>,
    since: Option<u64>,
    limit: Option<u64>,
}

/// Which events a client wants.
#[derive(Debug, Default)]
pub struct Filter {
    devices: Option<HashSet<String>>,
    zones: Option<HashSet<String>>,
    types: Option<HashSet<String>>,
}

fn list(value: &Option<String>) -> Option<HashSet<String>> {
    value.as_ref().map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

#[derive(Deserialize)]
struct ZoneRef {
    zone_id: Option<String>,
    zone: Option<ZoneIdOnly>,
}

#[derive(Deserialize)]
struct ZoneIdOnly {
    id: String,
}

impl Filter {
    pub fn new(devices: &Option<String>, zones: &Option<String>, types: &Option<String>) -> Self {
        let types = list(types).map(|set| {
            set.into_iter()
                .flat_map(|t| {
                    if t == "alarms" {
                        ALARM_TYPES.iter().map(|s| s.to_string()).collect()
                    } else {
                        vec![t]
                    }
                })
                .collect()
        });
        Self {
            devices: list(devices),
            zones: list(zones),
            types,
        }
    }

    pub fn matches(&self, event: &RecordedEvent) -> bool {
        if let Some(types) = &self.types {
            if !types.contains(&event.event_type) {
                return false;
            }
        }
        if let Some(devices) = &self.devices {
            if !event.stream.starts_with('$') && !devices.contains(&event.stream) {
                return false;
            }
        }
        if let Some(zones) = &self.zones {
            if !ZONE_TYPES.contains(&event.event_type.as_str()) {
                return false;
            }
            let zone = serde_json::from_str::<ZoneRef>(&event.data)
                .ok()
                .and_then(|r| r.zone_id.or(r.zone.map(|z| z.id)));
            if !zone.is_some_and(|z| zones.contains(&z)) {
                return false;
            }
        }
        true
    }
}

/// One SSE frame for an event.
pub fn frame(event: &RecordedEvent) -> Bytes {
    let json = serde_json::to_string(event).unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.position, event.event_type, json
    ))
}

fn resume_position(req: &HttpRequest, since: Option<u64>) -> Result<Option<u64>, ApiError> {
    match req.headers().get("Last-Event-ID") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event position (a number)")
            }),
        None => Ok(since),
    }
}

pub async fn stream(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = Filter::new(&query.devices, &query.zones, &query.types);
    let store = state.engine.store().clone();
    // Subscribe before looking at the store: everything committed from here on is in the feed.
    let live = store.subscribe();
    let start = match resume_position(&req, query.since)? {
        Some(position) => position,
        None => store.head_position().await?,
    };
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let limit = query.limit.unwrap_or(u64::MAX);
    actix_web::rt::spawn(feed(
        store,
        live,
        filter,
        start,
        limit,
        tx,
        state.shutdown.clone(),
    ));
    metrics::counter!("fleetwatch_sse_connections_total").increment(1);
    let body = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// Feeds one client until it disconnects, falls behind, has had `limit` events, or the engine
/// shuts down (the client resumes with `Last-Event-ID`, from this or another engine).
async fn feed(
    store: Arc<dyn EventStore>,
    mut live: broadcast::Receiver<crate::store::CommittedBatch>,
    filter: Filter,
    mut cursor: u64,
    limit: u64,
    tx: mpsc::Sender<Bytes>,
    shutdown: CancellationToken,
) {
    let mut sent = 0u64;
    // Waits for room in the client's buffer, but not past the start of a shutdown.
    let send = |frame: Bytes| {
        let (tx, shutdown) = (&tx, &shutdown);
        async move {
            tokio::select! {
                sent = tx.send(frame) => sent.is_ok(),
                _ = shutdown.cancelled() => false,
            }
        }
    };
    if !send(Bytes::from_static(b"retry: 2000\n\n")).await {
        return;
    }
    // Catch up from the store; a slow client here only slows its own reads.
    loop {
        let page = match store.read_all(cursor, CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "SSE catch-up failed; closing the stream");
                return;
            }
        };
        let Some(last) = page.last() else { break };
        cursor = last.position;
        for event in page.iter().filter(|e| filter.matches(e)) {
            if !send(frame(event)).await {
                return;
            }
            sent += 1;
            if sent >= limit {
                return;
            }
        }
    }
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    loop {
        tokio::select! {
            batch = live.recv() => match batch {
                Ok(batch) => {
                    for event in batch.iter() {
                        if event.position <= cursor {
                            continue;
                        }
                        cursor = event.position;
                        if !filter.matches(event) {
                            continue;
                        }
                        if tx.try_send(frame(event)).is_err() {
                            metrics::counter!("fleetwatch_sse_slow_clients_total").increment(1);
                            return;
                        }
                        sent += 1;
                        if sent >= limit {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("fleetwatch_sse_slow_clients_total").increment(1);
                    let _ = tx.try_send(Bytes::from_static(b": too far behind; reconnect with Last-Event-ID\n\n"));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = keep_alive.tick() => {
                if tx.try_send(Bytes::from_static(b": keep-alive\n\n")).is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, event_type: &str, data: &str) -> RecordedEvent {
        RecordedEvent {
            position: 7,
            stream: stream.into(),
            version: 1,
            event_type: event_type.into(),
            schema_version: 1,
            recorded_at: chrono::Utc::now(),
            data: data.into(),
        }
    }

    #[test]
    fn filters_by_device_type_and_zone() {
        let s = |v: &str| Some(v.to_owned());
        let left = event("d1", "LeftZone", r#"{"zone_id":"z1"}"#);
        let moved = event("d1", "LocationChanged", "{}");
        let zone_def = event("$rules", "ZoneDefined", r#"{"zone":{"id":"z1"}}"#);

        assert!(Filter::new(&s("d1"), &None, &None).matches(&left));
        assert!(!Filter::new(&s("d2"), &None, &None).matches(&left));
        assert!(
            Filter::new(&s("d2"), &None, &None).matches(&zone_def),
            "rules events always pass a device filter"
        );
        assert!(Filter::new(&None, &None, &s("alarms")).matches(&left));
        assert!(!Filter::new(&None, &None, &s("alarms")).matches(&moved));
        assert!(Filter::new(&None, &s("z1"), &None).matches(&left));
        assert!(Filter::new(&None, &s("z1"), &None).matches(&zone_def));
        assert!(!Filter::new(&None, &s("z2"), &None).matches(&left));
        assert!(!Filter::new(&None, &s("z1"), &None).matches(&moved));
    }

    #[test]
    fn frames_carry_position_type_and_raw_json() {
        let text =
            String::from_utf8(frame(&event("d1", "LeftZone", r#"{"zone_id":"z1"}"#)).to_vec())
                .unwrap();
        assert!(
            text.starts_with("id: 7\nevent: LeftZone\ndata: {"),
            "{text}"
        );
        assert!(text.contains(r#""data":{"zone_id":"z1"}"#), "{text}");
        assert!(text.ends_with("\n\n"));
    }
}
