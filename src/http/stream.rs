//! `GET /api/stream`: every persisted event pushed to browsers as server-sent events.
//!
//! A client follows the store with a [`Subscription`]: the matching events after its resume
//! position read back from the store, then the live ones, with neither a gap nor a duplicate at
//! the seam. Each client has a bounded buffer; one that falls too far behind the live feed is
//! disconnected and resumes with `Last-Event-ID`, so a slow browser never slows the engine or
//! other clients.

mod limits;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};
use crate::store::RecordedEvent;
use crate::subscription::Subscription;

pub use limits::{Refusal, StreamLimits, StreamSlot};

/// Frames buffered per client before it counts as too slow.
const CLIENT_BUFFER: usize = 4096;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const CATCH_UP_PAGE: usize = 1000;
/// Seconds a refused stream is told to wait (`Retry-After`).
const RETRY_AFTER_SECS: &str = "5";
/// Events about a zone: its crossings, its definition, and its alarms' changes (whose `rule_id`
/// is the zone when their `kind` is `outside_zone`).
const ZONE_TYPES: [&str; 7] = [
    "LeftZone",
    "EnteredZone",
    "ZoneDefined",
    "ZoneRemoved",
    "AlarmOpened",
    "AlarmAcknowledged",
    "AlarmCleared",
];

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Comma-separated device ids: only these devices' events (rules events always pass).
    devices: Option<String>,
    /// Comma-separated zone ids: only zone events (`LeftZone`, `EnteredZone`, `ZoneDefined`,
    /// `ZoneRemoved`, and the changes of `outside_zone` alarms) of these zones.
    zones: Option<String>,
    /// Comma-separated event types; `alarms` stands for the alarm changes (`AlarmOpened`,
    /// `AlarmAcknowledged`, `AlarmCleared`) and the conditions they follow (`LeftZone`,
    /// `EnteredZone`, `TemperatureOutOfRange`, `TemperatureBackInRange`, `DeviceWentOffline`,
    /// `DeviceBackOnline`); `alarm_changes` for the alarm changes alone.
    types: Option<String>,
    /// Replay every matching event after this position, then go live (`Last-Event-ID` wins).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    since: Option<u64>,
    /// Close the stream after this many events.
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
    kind: Option<String>,
    rule_id: Option<String>,
}

impl ZoneRef {
    fn zone(self) -> Option<String> {
        match (self.kind.as_deref(), self.rule_id) {
            (Some("outside_zone"), Some(rule)) => Some(rule),
            _ => self.zone_id.or(self.zone.map(|z| z.id)),
        }
    }
}

#[derive(Deserialize)]
struct ZoneIdOnly {
    id: String,
}

impl Filter {
    /// Whether it lets every event through.
    pub fn is_everything(&self) -> bool {
        self.devices.is_none() && self.zones.is_none() && self.types.is_none()
    }

    /// The devices, when it filters on devices and nothing else.
    pub fn devices_only(&self) -> Option<&HashSet<String>> {
        match (&self.devices, &self.zones, &self.types) {
            (Some(devices), None, None) if !devices.is_empty() => Some(devices),
            _ => None,
        }
    }

    pub fn new(devices: &Option<String>, zones: &Option<String>, types: &Option<String>) -> Self {
        let types = list(types).map(|set| {
            set.into_iter()
                .flat_map(|t| {
                    use fleetwatch_domain::DeviceEvent;
                    match t.as_str() {
                        "alarms" => DeviceEvent::ALARM_TYPES
                            .iter()
                            .chain(&DeviceEvent::CONDITION_TYPES)
                            .map(|s| s.to_string())
                            .collect(),
                        "alarm_changes" => DeviceEvent::ALARM_TYPES
                            .iter()
                            .map(|s| s.to_string())
                            .collect(),
                        _ => vec![t],
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
            let zone = crate::codec::event_json(event)
                .and_then(|data| serde_json::from_value::<ZoneRef>(data).ok())
                .and_then(ZoneRef::zone);
            if !zone.is_some_and(|z| zones.contains(&z)) {
                return false;
            }
        }
        true
    }
}

/// One SSE frame for an event.
pub fn frame(event: &RecordedEvent) -> Bytes {
    let json = serde_json::to_string(&crate::codec::EventView::new(event))
        .unwrap_or_else(|_| "{}".to_owned());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.position, event.event_type, json
    ))
}

fn resume_position(req: &HttpRequest, since: Option<u64>) -> Result<Option<u64>, ApiError> {
    // Positions are SQLite integers (i64): a larger one would wrap around to the start.
    let position = |v: u64| (v <= i64::MAX as u64).then_some(v);
    match req.headers().get("Last-Event-ID") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .and_then(position)
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event position (a number)")
                    .with_field(Some("Last-Event-ID".into()), None)
            }),
        None => since
            .map(|v| {
                position(v).ok_or_else(|| {
                    ApiError::bad_request(format!("since must be at most {}, got {v}", i64::MAX))
                        .with_field(Some("since".into()), None)
                })
            })
            .transpose(),
    }
}

/// The address a stream counts against for `--max-sse-per-client`: the TCP peer (a forwarded-for
/// header is not trusted, so it cannot be used to dodge the limit).
fn client_address(req: &HttpRequest) -> IpAddr {
    req.peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip().to_canonical())
}

/// The answer to a stream over a limit: the usual JSON error, and when to try again.
fn refused(refusal: Refusal) -> HttpResponse {
    let (status, error, limit) = match refusal {
        Refusal::Total { max } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine serves at most {max} live streams at once (--max-sse-connections); retry later"),
            "total",
        ),
        Refusal::PerClient { max } => (
            StatusCode::TOO_MANY_REQUESTS,
            format!("at most {max} live streams per client address (--max-sse-per-client); close one or retry later"),
            "per_client",
        ),
    };
    metrics::counter!("fleetwatch_sse_refused_total", "limit" => limit).increment(1);
    let mut response = ApiError::new(status, error).error_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

/// The live stream of stored events, as server-sent events.
///
/// Each matching event as `id: <position>`, `event: <type>`, `data: <event as JSON>` (the same
/// envelope as the history); a `: keep-alive` comment every 15 s. A stream that starts from a
/// past position (`since` or `Last-Event-ID`) first replays stored events, for at most
/// `--sse-catch-up-timeout`; then it sends the position reached as an `id:` line without data and
/// ends, and the client resumes from there. When reads need a token, send it as a bearer token,
/// or (browsers' `EventSource` cannot send headers) a ticket from `POST /api/stream/tickets` in
/// `ticket`.
#[utoipa::path(
    get,
    path = "/api/stream",
    tag = "live stream",
    params(
        StreamQuery,
        ("ticket" = Option<String>, Query, description = "A ticket from `POST /api/stream/tickets`, instead of a bearer token"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this position (wins over `since`); sent by `EventSource` when it reconnects"),
    ),
    responses(
        (status = 200, description = "The stream (it stays open)", content_type = "text/event-stream", body = String,
            example = json!("retry: 2000\n\nid: 1234\nevent: LeftZone\ndata: {\"position\":1234,\"stream\":\"truck-7\",\"version\":42,\"type\":\"LeftZone\",...}\n\n")),
        (status = 400, description = "An invalid query parameter or `Last-Event-ID`", body = ApiError),
        (status = 401, description = "No token, an unknown token, or an unknown or expired ticket", body = ApiError,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 429, description = "This client address has `--max-sse-per-client` streams open", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 503, description = "`--max-sse-connections` streams are open, or the store cannot be read", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub async fn stream(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = Filter::new(&query.devices, &query.zones, &query.types);
    let resume = resume_position(&req, query.since)?;
    // Held by Pushpin: it keeps the connection, not this engine (so no slot is taken).
    if query.limit.is_none() && super::grip::wanted(&req, state.grip) {
        let store = state.engine.store().as_ref();
        if filter.is_everything() {
            return super::grip::hold(&req, store, resume).await;
        }
        if let Some(devices) = filter
            .devices_only()
            .filter(|d| d.len() <= super::grip::MAX_HELD_DEVICES)
        {
            if let Some(held) = super::grip::hold_devices(&req, store, resume, devices).await? {
                return Ok(held);
            }
        }
    }
    let slot = match state.streams.acquire(client_address(&req)) {
        Ok(slot) => slot,
        Err(refusal) => return Ok(refused(refusal)),
    };
    let store = state.engine.store().clone();
    let after = match resume {
        Some(position) => position,
        // From now: the subscription starts following the feed before it reads the head, so
        // what is committed in between is not missed.
        None => store.head_position().await?,
    };
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let feed = Feed {
        subscription: Subscription::new(store, after, CATCH_UP_PAGE),
        filter,
        limit: query.limit.unwrap_or(u64::MAX),
        sent: 0,
        tx,
        shutdown: state.shutdown.clone(),
        catch_up_timeout: state.streams.catch_up_timeout(),
        _slot: slot,
    };
    actix_web::rt::spawn(feed.run());
    metrics::counter!("fleetwatch_sse_connections_total").increment(1);
    let body = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// One client's stream: fed until the client disconnects, falls behind, has had `limit` events,
/// its catch-up runs out of time, or the engine shuts down (the client resumes with
/// `Last-Event-ID`, from this or another engine).
struct Feed {
    subscription: Subscription,
    filter: Filter,
    limit: u64,
    sent: u64,
    tx: mpsc::Sender<Bytes>,
    shutdown: CancellationToken,
    catch_up_timeout: Duration,
    /// This stream's place among the open ones, given back when the task ends, however it ends.
    _slot: StreamSlot,
}

impl Feed {
    async fn run(mut self) {
        if !self.send(Bytes::from_static(b"retry: 2000\n\n")).await {
            return;
        }
        let deadline = Instant::now() + self.catch_up_timeout;
        let mut keep_alive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            let delivery = tokio::select! {
                delivery = self.subscription.next() => delivery,
                // A filter that matches little sends nothing for a long scan: the client's
                // departure has to be noticed here, not only when a send fails.
                _ = self.tx.closed() => {
                    self.abandoned();
                    return;
                }
                _ = keep_alive.tick(), if !self.subscription.is_catching_up() => {
                    if self.tx.try_send(Bytes::from_static(b": keep-alive\n\n")).is_err() {
                        return;
                    }
                    continue;
                }
                _ = self.shutdown.cancelled() => return,
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => {
                    tracing::warn!(error = %e, "SSE stream failed; closing it");
                    return;
                }
            };
            let live = delivery.is_live();
            for event in delivery.events().iter().filter(|e| self.filter.matches(e)) {
                let sent = if live {
                    // Live, a client that cannot keep up is let go; it resumes from the store.
                    let sent = self.tx.try_send(frame(event)).is_ok();
                    if !sent {
                        metrics::counter!("fleetwatch_sse_slow_clients_total").increment(1);
                    }
                    sent
                } else {
                    // Catching up, a slow client only slows its own reads.
                    self.send(frame(event)).await
                };
                if !sent {
                    self.abandoned();
                    return;
                }
                self.sent += 1;
                if self.sent >= self.limit {
                    return;
                }
            }
            // Checked after a whole page, so every connection makes progress however small the
            // timeout; once the head is reached the live feed takes over.
            if !live && self.subscription.is_catching_up() && Instant::now() >= deadline {
                metrics::counter!("fleetwatch_sse_catch_up_timeouts_total").increment(1);
                // An `id:` field without `data:` sets the client's Last-Event-ID without
                // dispatching an event (SSE spec), so its reconnect resumes from here.
                let id = format!("id: {}\n\n", self.subscription.position());
                let _ = self.send(Bytes::from(id)).await;
                return;
            }
        }
    }

    /// Waits for room in the client's buffer, but not past the start of a shutdown.
    async fn send(&self, frame: Bytes) -> bool {
        tokio::select! {
            sent = self.tx.send(frame) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Records that the client left while stored events were being replayed for it.
    fn abandoned(&self) {
        if self.tx.is_closed() && self.subscription.is_catching_up() {
            metrics::counter!("fleetwatch_sse_catch_up_abandoned_total").increment(1);
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
            at: None,
            payload: bytes::Bytes::from(data.to_owned()),
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

        let opened = event(
            "d1",
            "AlarmOpened",
            r#"{"type":"AlarmOpened","device_id":"d1","at":"2026-11-30T12:00:00Z","alarm_id":"d1.1","kind":"outside_zone","rule_id":"z1","severity":"warning","cause_version":3}"#,
        );
        let offline = event(
            "d1",
            "AlarmOpened",
            r#"{"type":"AlarmOpened","device_id":"d1","at":"2026-11-30T12:00:00Z","alarm_id":"d1.2","kind":"offline","severity":"warning","cause_version":5}"#,
        );
        assert!(Filter::new(&None, &None, &s("alarm_changes")).matches(&opened));
        assert!(!Filter::new(&None, &None, &s("alarm_changes")).matches(&left));
        assert!(Filter::new(&None, &None, &s("alarms")).matches(&opened));
        assert!(Filter::new(&None, &s("z1"), &None).matches(&opened));
        assert!(!Filter::new(&None, &s("z2"), &None).matches(&opened));
        assert!(!Filter::new(&None, &s("z1"), &None).matches(&offline));
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

    #[test]
    fn a_damaged_payload_is_sent_as_a_json_string() {
        let text =
            String::from_utf8(frame(&event("d1", "LeftZone", "{broken\n")).to_vec()).unwrap();
        let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        let envelope: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(envelope["data"], "{broken\n", "{text}");
        assert_eq!(envelope["position"], 7);
        assert!(text.ends_with("\n\n"));
    }
}
