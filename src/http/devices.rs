//! `GET /api/devices`, `GET /api/devices/{id}`, `GET /api/devices/{id}/events`.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use fleetwatch_domain::{Bound, Device, DeviceId, DeviceStatus, Rules};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{schemas, ApiError, AppState};
use crate::codec::EventView;
use crate::engine::DeviceEntry;
use crate::store::Retention;

const MAX_PAGE: usize = 1000;

/// The device's last applied reading (late readings do not count).
#[derive(Serialize, ToSchema)]
#[schema(as = LastReading)]
struct LastReadingView {
    timestamp: DateTime<Utc>,
    lat: f64,
    lon: f64,
    temperature: f64,
}

/// An active temperature alarm.
#[derive(Serialize, ToSchema)]
#[schema(as = RangeAlarm)]
struct RangeAlarmView<'a> {
    range_id: &'a str,
    #[schema(value_type = schemas::Bound)]
    bound: Bound,
}

/// An alarm of the device that has not cleared.
#[derive(Serialize, ToSchema)]
#[schema(as = DeviceAlarm)]
struct DeviceAlarmView<'a> {
    id: String,
    #[schema(value_type = schemas::AlarmKind)]
    kind: fleetwatch_domain::AlarmKind,
    /// The zone or range; absent for `offline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    rule_id: Option<&'a str>,
    #[schema(value_type = schemas::Severity)]
    severity: fleetwatch_domain::Severity,
    opened_at: chrono::DateTime<chrono::Utc>,
    acknowledged: bool,
}

/// A device's live state: its actor's, so it may include a reading whose events are still being
/// committed (for a few milliseconds); the history (`/events`) holds only what is durable.
#[derive(Serialize, ToSchema)]
#[schema(as = Device, example = json!({"device_id": "truck-7", "version": 42, "last_reading": {"timestamp": "2026-11-23T18:00:00Z", "lat": 52.37, "lon": 4.89, "temperature": 4.5}, "outside_zones": ["depot"], "temperature_alarms": [{"range_id": "cold-chain", "bound": "above"}], "alarms": [{"id": "truck-7.3", "kind": "outside_zone", "rule_id": "depot", "severity": "warning", "opened_at": "2026-11-23T18:00:00Z", "acknowledged": false}], "status": "temperature_alarm"}))]
pub struct DeviceView<'a> {
    device_id: &'a str,
    /// Events applied: the version of the device's stream.
    version: u64,
    /// `null` before the first reading is applied.
    last_reading: Option<LastReadingView>,
    /// Zones that watch the device and that it is outside of.
    outside_zones: Vec<&'a str>,
    /// Active temperature alarms.
    temperature_alarms: Vec<RangeAlarmView<'a>>,
    /// Every alarm of the device that has not cleared (open or acknowledged), one per kind and
    /// zone or range. `outside_zones` and `temperature_alarms` are the conditions; an alarm opens
    /// on one once the rule's dwell has passed.
    alarms: Vec<DeviceAlarmView<'a>>,
    /// Since when the device is offline (silent for its offline period); absent when online.
    #[serde(skip_serializing_if = "Option::is_none")]
    offline_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The device's own offline period in seconds; absent: the engine's `--offline-after`.
    #[serde(skip_serializing_if = "Option::is_none")]
    offline_after_s: Option<u64>,
    #[schema(value_type = schemas::DeviceStatus)]
    status: DeviceStatus,
}

impl<'a> DeviceView<'a> {
    pub fn new(device: &'a Device, rules: &'a Rules) -> Self {
        Self {
            device_id: device.id().as_str(),
            version: device.version(),
            last_reading: device.last_reading().map(|r| LastReadingView {
                timestamp: r.timestamp,
                lat: r.location.lat(),
                lon: r.location.lon(),
                temperature: r.temperature.celsius(),
            }),
            outside_zones: device.outside_zones(rules).map(|z| z.as_str()).collect(),
            temperature_alarms: device
                .temperature_alarms(rules)
                .map(|(id, bound)| RangeAlarmView {
                    range_id: id.as_str(),
                    bound,
                })
                .collect(),
            alarms: device
                .alarms()
                .map(|(key, alarm)| DeviceAlarmView {
                    id: alarm.id.to_string(),
                    kind: key.kind,
                    rule_id: key.rule.as_ref().map(|r| r.as_str()),
                    severity: alarm.severity,
                    opened_at: alarm.opened_at,
                    acknowledged: alarm.acknowledged,
                })
                .collect(),
            offline_since: device.offline_since(),
            offline_after_s: device.own_offline_after(),
            status: device.status(rules),
        }
    }
}

/// A query parameter that does not hold a valid value: the error names the parameter.
fn query_error(param: &str, e: fleetwatch_domain::ValidationError) -> ApiError {
    ApiError::bad_request(format!("{param}: {}", e.reason)).with_field(Some(param.into()), None)
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit must be within 1..={MAX_PAGE}, got {n}"
        ))
        .with_field(Some("limit".into()), None)),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The last device id of the previous page (its `next_after`); absent or empty: the first
    /// page.
    #[param(pattern = "^[A-Za-z0-9._:-]{0,128}$", max_length = 128)]
    after: Option<String>,
    /// Devices per page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A device in a page: its state, or, if its stored history cannot be read, the error instead.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum ListedDevice<'a> {
    State(DeviceView<'a>),
    /// A device whose stored history cannot be read: the error names the unreadable event.
    Unreadable {
        device_id: &'a str,
        error: String,
    },
}

impl<'a> ListedDevice<'a> {
    fn new(entry: &'a DeviceEntry, rules: &'a Rules) -> Self {
        match entry {
            DeviceEntry::Loaded(device) => ListedDevice::State(DeviceView::new(device, rules)),
            DeviceEntry::Unreadable { id, error } => {
                tracing::warn!(device = %id, %error, "listing a device whose history is damaged");
                ListedDevice::Unreadable {
                    device_id: id.as_str(),
                    error: error.to_string(),
                }
            }
        }
    }
}

/// A page of devices, in device id order.
#[derive(Serialize, ToSchema)]
struct DevicePage<'a> {
    devices: Vec<ListedDevice<'a>>,
    /// The `after` of the next page; `null` on the last page.
    next_after: Option<&'a str>,
}

/// Lists devices, a page at a time, in device id order.
///
/// A device whose stored history cannot be read is listed with the error in its place; the rest
/// of the page is served.
#[utoipa::path(
    get,
    path = "/api/devices",
    tag = "devices",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of devices", body = DevicePage),
        (status = 400, description = "An invalid query parameter (`field`: `after` or `limit`)", body = ApiError),
        (status = 500, description = "The store refused to read", body = ApiError),
        (status = 503, description = "The event store cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn list_devices(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_limit(query.limit)?;
    // An empty `after` is the first page, like no `after` at all. An invalid one is the query
    // parameter's fault, not a device id's: the error names `after`.
    let after = query
        .after
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(|a| DeviceId::parse(a).map_err(|e| query_error("after", e)))
        .transpose()?;
    let devices = state.engine.devices(after.as_ref(), limit).await?;
    let rules = state.engine.rules().current();
    let page = DevicePage {
        next_after: (devices.len() == limit)
            .then(|| devices.last().map(|d| d.id().as_str()))
            .flatten(),
        devices: devices
            .iter()
            .map(|d| ListedDevice::new(d, &rules))
            .collect(),
    };
    Ok(HttpResponse::Ok().json(page))
}

/// One device's live state.
#[utoipa::path(
    get,
    path = "/api/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "The device id: 1..=128 characters of `[A-Za-z0-9._:-]`", pattern = "^[A-Za-z0-9._:-]{1,128}$", example = "truck-7")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 400, description = "The id is not a valid device id", body = ApiError),
        (status = 404, description = "No such device", body = ApiError),
        (status = 500, description = "The device's stored history cannot be read: the error names the unreadable event (`stream@version` and position). Other devices work on", body = ApiError),
        (status = 503, description = "The event store cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn get_device(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = DeviceId::parse(path.into_inner())?;
    let device = state
        .engine
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id}")))?;
    let rules = state.engine.rules().current();
    Ok(HttpResponse::Ok().json(DeviceView::new(&device, &rules)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The first version to return (default 1; 0 reads as 1): the `next_from_version` of the
    /// previous page.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    from_version: Option<u64>,
    /// Events per page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of a device's stored history, in version order.
#[derive(Serialize, ToSchema)]
struct EventPage<'a> {
    events: Vec<EventView<'a>>,
    /// The `from_version` of the next page; `null` on the last page.
    next_from_version: Option<u64>,
    /// Where the device's retained history begins.
    retention: Retention,
}

/// A device's stored history, a page at a time.
///
/// Only what is durable. Raw readings older than `--reading-retention` may have been removed:
/// `retention` says where the history begins.
#[utoipa::path(
    get,
    path = "/api/devices/{id}/events",
    tag = "devices",
    params(
        ("id" = String, Path, description = "The device id: 1..=128 characters of `[A-Za-z0-9._:-]`", pattern = "^[A-Za-z0-9._:-]{1,128}$", example = "truck-7"),
        EventsQuery,
    ),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "An invalid device id or query parameter (`field` names it)", body = ApiError),
        (status = 404, description = "No such device (it has no stored event)", body = ApiError),
        (status = 503, description = "The event store cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn device_events(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = DeviceId::parse(path.into_inner())?;
    let limit = page_limit(query.limit)?;
    // The store keeps versions as SQLite integers (i64): a larger one would wrap around.
    let from = match query.from_version {
        Some(v) if v > i64::MAX as u64 => {
            return Err(ApiError::bad_request(format!(
                "from_version must be at most {}, got {v}",
                i64::MAX
            ))
            .with_field(Some("from_version".into()), None))
        }
        v => v.unwrap_or(1).max(1),
    };
    let events = state.engine.device_events(&id, from, limit).await?;
    let Some(retention) = state.engine.store().retention(id.as_str()).await? else {
        return Err(ApiError::not_found(format!("device {id}")));
    };
    let next_from_version = (events.len() == limit)
        .then(|| events.last().map(|e| e.version + 1))
        .flatten();
    Ok(HttpResponse::Ok().json(EventPage {
        events: events.iter().map(EventView::new).collect(),
        next_from_version,
        retention,
    }))
}
