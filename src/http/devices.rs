//! `GET /api/devices`, `GET /api/devices/{id}`, `GET /api/devices/{id}/events`.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use fleetwatch_domain::{Bound, Device, DeviceId, DeviceStatus, Rules};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::codec::EventView;
use crate::engine::DeviceEntry;
use crate::store::Retention;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/devices", web::get().to(list_devices))
        .route("/devices/{id}", web::get().to(get_device))
        .route("/devices/{id}/events", web::get().to(device_events));
}

const MAX_PAGE: usize = 1000;

#[derive(Serialize)]
struct LastReadingView {
    timestamp: DateTime<Utc>,
    lat: f64,
    lon: f64,
    temperature: f64,
}

#[derive(Serialize)]
struct RangeAlarmView<'a> {
    range_id: &'a str,
    bound: Bound,
}

#[derive(Serialize)]
pub struct DeviceView<'a> {
    device_id: &'a str,
    version: u64,
    last_reading: Option<LastReadingView>,
    outside_zones: Vec<&'a str>,
    temperature_alarms: Vec<RangeAlarmView<'a>>,
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
            status: device.status(rules),
        }
    }
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

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// A device in a page: its state, or, if its stored history cannot be read, the error instead.
#[derive(Serialize)]
#[serde(untagged)]
enum ListedDevice<'a> {
    State(DeviceView<'a>),
    Unreadable { device_id: &'a str, error: String },
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

#[derive(Serialize)]
struct DevicePage<'a> {
    devices: Vec<ListedDevice<'a>>,
    next_after: Option<&'a str>,
}

async fn list_devices(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_limit(query.limit)?;
    // An empty `after` is the first page, like no `after` at all.
    let after = query
        .after
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(DeviceId::parse)
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

async fn get_device(
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

#[derive(Deserialize)]
struct EventsQuery {
    from_version: Option<u64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct EventPage<'a> {
    events: Vec<EventView<'a>>,
    next_from_version: Option<u64>,
    /// Where the device's retained history begins.
    retention: Retention,
}

async fn device_events(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = DeviceId::parse(path.into_inner())?;
    let limit = page_limit(query.limit)?;
    let from = query.from_version.unwrap_or(1).max(1);
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
