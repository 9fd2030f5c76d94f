//! Answers about the past: a device's readings by time, temperature buckets (per device, for the
//! fleet, for a zone's devices), a device's summary, zone reports, fleet statistics and top lists.
//! Readings by time come from the event store's time index; everything else from the read models
//! (`crate::projections`), which follow the events a second or so behind.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Duration, DurationRound, Utc};
use fleetwatch_domain::{DeviceEvent, DeviceId, Location, RuleId, Watched};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{schemas, ApiError, AppState};
use crate::codec;
use crate::projections::{Bucket, BucketRow, StoredBucket, TopBy, FLEET};
use crate::store::Retention;

/// The OpenAPI description of a device id in a path.
const DEVICE_ID: &str = "The device id: 1..=128 characters of `[A-Za-z0-9._:-]`";

/// Most readings in one page.
const MAX_READINGS_PAGE: usize = 1_000;
/// Most buckets one request may ask for (a day of minutes, a year of hours).
const MAX_BUCKETS: i64 = 10_000;
/// Most devices in one page of a zone report.
const MAX_REPORT_PAGE: usize = 1_000;
const MAX_TOP: usize = 100;
/// The longest window a top list may cover.
const MAX_TOP_WINDOW: Duration = Duration::days(31);

pub(super) fn bad(field: &str, error: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{field}: {error}")).with_field(Some(field.to_owned()), None)
}

fn timestamp(field: &str, raw: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.filter(|r| !r.is_empty())
        .map(|r| {
            DateTime::parse_from_rfc3339(r)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(field, format!("not an RFC 3339 time ({e}): {r:?}")))
        })
        .transpose()
}

/// `from` and `to` (RFC 3339; `to` defaults to now, `from` to `default_span` before `to`).
fn time_range(
    from: Option<&str>,
    to: Option<&str>,
    default_span: Duration,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = timestamp("to", to)?.unwrap_or_else(Utc::now);
    let from = timestamp("from", from)?.unwrap_or(to - default_span);
    if from >= to {
        return Err(bad(
            "from",
            format!(
                "must be before to ({} is not before {})",
                from.to_rfc3339(),
                to.to_rfc3339()
            ),
        ));
    }
    Ok((from, to))
}

pub(super) fn page_limit(
    limit: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(bad("limit", format!("must be within 1..={max}, got {n}"))),
    }
}

fn device_id(raw: String) -> Result<DeviceId, ApiError> {
    Ok(DeviceId::parse(raw)?)
}

/// The device's retention, or 404 if the engine does not know it.
pub(super) async fn known(state: &AppState, id: &DeviceId) -> Result<Retention, ApiError> {
    state
        .engine
        .store()
        .retention(id.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id}")))
}

pub(super) fn read_model_error(e: crate::projections::ReadModelError) -> ApiError {
    tracing::debug!(error = %e, "read model query failed");
    ApiError::unavailable(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Readings by time

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadingsQuery {
    /// RFC 3339, inclusive; default 24 hours before `to`.
    #[param(example = "2026-11-23T00:00:00Z")]
    from: Option<String>,
    /// RFC 3339, exclusive; default now.
    #[param(example = "2026-11-24T00:00:00Z")]
    to: Option<String>,
    /// Readings per page, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The previous page's `next_after`.
    after: Option<String>,
}

/// One recorded reading.
#[derive(Serialize, ToSchema)]
struct ReadingView {
    timestamp: DateTime<Utc>,
    lat: f64,
    lon: f64,
    temperature: f64,
    /// Older than the device's last reading when it arrived: history only.
    late: bool,
    moved: bool,
    temperature_changed: bool,
}

/// A page of a device's readings, in time order.
#[derive(Serialize, ToSchema)]
struct ReadingsPage {
    device_id: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    readings: Vec<ReadingView>,
    /// Pass as `after` for the next page; `null` on the last.
    next_after: Option<String>,
    retention: Retention,
}

/// A page cursor: the last reading's time (microseconds) and store position.
fn cursor(raw: &str) -> Result<(DateTime<Utc>, u64), ApiError> {
    let parsed = raw.split_once('-').and_then(|(at, position)| {
        Some((
            DateTime::from_timestamp_micros(at.parse().ok()?)?,
            position.parse().ok()?,
        ))
    });
    parsed.ok_or_else(|| bad("after", format!("not a cursor from next_after: {raw:?}")))
}

/// A device's readings by time, late ones included, a page at a time.
#[utoipa::path(
    get,
    path = "/api/devices/{id}/readings",
    tag = "history",
    params(("id" = String, Path, description = DEVICE_ID, example = "truck-7"), ReadingsQuery),
    responses(
        (status = 200, description = "A page of readings", body = ReadingsPage),
        (status = 400, description = "An invalid id, time, range, limit or cursor (`field` names it)", body = ApiError),
        (status = 404, description = "No such device", body = ApiError),
        (status = 500, description = "A stored reading cannot be read", body = ApiError),
        (status = 503, description = "The event store cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn readings(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ReadingsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(path.into_inner())?;
    let (from, to) = time_range(
        query.from.as_deref(),
        query.to.as_deref(),
        Duration::hours(24),
    )?;
    let limit = page_limit(query.limit, 100, MAX_READINGS_PAGE)?;
    let after = query
        .after
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(cursor)
        .transpose()?;
    let retention = known(&state, &id).await?;
    let events = state
        .engine
        .store()
        .read_by_time(
            id.as_str(),
            codec::READING_RECORDED,
            from..to,
            after,
            false,
            limit,
        )
        .await?;
    let next_after = (events.len() == limit)
        .then(|| {
            events
                .last()
                .and_then(|e| Some(format!("{}-{}", e.at?.timestamp_micros(), e.position)))
        })
        .flatten();
    let mut readings = Vec::with_capacity(events.len());
    for event in &events {
        if let DeviceEvent::ReadingRecorded {
            at,
            location,
            temperature,
            moved,
            temperature_changed,
            late,
            ..
        } = codec::decode_device_event(event).map_err(crate::engine::EngineError::from)?
        {
            readings.push(ReadingView {
                timestamp: at,
                lat: location.lat(),
                lon: location.lon(),
                temperature: temperature.celsius(),
                late,
                moved,
                temperature_changed,
            });
        }
    }
    Ok(HttpResponse::Ok().json(ReadingsPage {
        device_id: id.to_string(),
        from,
        to,
        readings,
        next_after,
        retention,
    }))
}

// ---------------------------------------------------------------------------------------------
// Temperature buckets

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BucketsQuery {
    /// RFC 3339; moved back to the start of its bucket. Default: 1 hour (minute), 24 hours
    /// (hour) or 30 days (day) before `to`.
    from: Option<String>,
    /// RFC 3339, exclusive; default now.
    to: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    #[param(example = "hour")]
    bucket: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetBucketsQuery {
    /// RFC 3339; moved back to the start of its bucket.
    from: Option<String>,
    /// RFC 3339, exclusive; default now.
    to: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    #[param(example = "hour")]
    bucket: Option<String>,
    /// Only the devices this zone watches (all devices for a zone watching every device).
    zone: Option<String>,
}

/// One bucket of readings.
#[derive(Serialize, ToSchema)]
struct BucketView {
    /// The bucket's start, UTC.
    start: DateTime<Utc>,
    count: u64,
    mean: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    /// Where the bucket's latest reading was (`null` for the fleet and zones).
    #[schema(value_type = Option<schemas::Location>)]
    last_location: Option<Location>,
    /// Between consecutive live readings ending in the bucket.
    distance_m: f64,
    /// Alarms raised, dated in the bucket.
    alarms: u64,
}

/// Temperature buckets over a range.
#[derive(Serialize, ToSchema)]
struct BucketsPage {
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone_id: Option<String>,
    /// `minute`, `hour` or `day`.
    #[schema(value_type = String)]
    bucket: Bucket,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    buckets: Vec<BucketView>,
}

/// The bucket width and its aligned range, refusing a range with too many buckets.
fn bucket_range(
    from: Option<&str>,
    to: Option<&str>,
    bucket: Option<&str>,
) -> Result<(Bucket, DateTime<Utc>, DateTime<Utc>), ApiError> {
    let bucket = match bucket.unwrap_or("hour") {
        "minute" => Bucket::Minute,
        "hour" => Bucket::Hour,
        "day" => Bucket::Day,
        other => {
            return Err(bad(
                "bucket",
                format!("must be minute, hour or day, got {other:?}"),
            ))
        }
    };
    let span = match bucket {
        Bucket::Minute => Duration::hours(1),
        Bucket::Hour => Duration::hours(24),
        Bucket::Day => Duration::days(30),
    };
    let (from, to) = time_range(from, to, span)?;
    let width = Duration::seconds(bucket.seconds());
    // Whole buckets: the one holding `from` through the one holding the instant before `to`.
    let from = from.duration_trunc(width).unwrap_or(from);
    let seconds = (to - from).num_seconds();
    let buckets = (seconds + bucket.seconds() - 1) / bucket.seconds();
    if buckets > MAX_BUCKETS {
        return Err(bad(
            "from",
            format!("the range holds {buckets} {bucket:?} buckets, more than {MAX_BUCKETS}: narrow it or use a wider bucket"),
        ));
    }
    Ok((bucket, from, to))
}

fn views(rows: Vec<BucketRow>) -> Vec<BucketView> {
    rows.into_iter()
        .map(|row| BucketView {
            start: row.start(),
            count: row.count,
            mean: row.mean,
            min: row.min,
            max: row.max,
            last_location: row.last_location,
            distance_m: row.distance_m,
            alarms: row.alarms,
        })
        .collect()
}

/// A device's temperature per minute, hour or day: count, mean, min, max and its last position.
#[utoipa::path(
    get,
    path = "/api/devices/{id}/temperature",
    tag = "history",
    params(("id" = String, Path, description = DEVICE_ID, example = "truck-7"), BucketsQuery),
    responses(
        (status = 200, description = "The device's buckets with data", body = BucketsPage),
        (status = 400, description = "An invalid id, bucket, time or range (`field` names it; more than 10,000 buckets names `from`)", body = ApiError),
        (status = 404, description = "No such device", body = ApiError),
        (status = 503, description = "The read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn device_temperature(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<BucketsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(path.into_inner())?;
    let (bucket, from, to) = bucket_range(
        query.from.as_deref(),
        query.to.as_deref(),
        query.bucket.as_deref(),
    )?;
    known(&state, &id).await?;
    let queries = state.read_models.queries().clone();
    let name = id.to_string();
    let rows = web::block(move || queries.buckets(&name, bucket, from.timestamp(), to.timestamp()))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(BucketsPage {
        device_id: Some(id.to_string()),
        zone_id: None,
        bucket,
        from,
        to,
        buckets: views(rows),
    }))
}

/// The fleet's temperature per minute, hour or day, or that of the devices a zone watches.
#[utoipa::path(
    get,
    path = "/api/stats/temperature",
    tag = "history",
    params(FleetBucketsQuery),
    responses(
        (status = 200, description = "The buckets with data", body = BucketsPage),
        (status = 400, description = "An invalid bucket, time, range or zone id (`field` names it)", body = ApiError),
        (status = 404, description = "No such zone", body = ApiError),
        (status = 503, description = "The read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn fleet_temperature(
    state: web::Data<AppState>,
    query: web::Query<FleetBucketsQuery>,
) -> Result<HttpResponse, ApiError> {
    let (bucket, from, to) = bucket_range(
        query.from.as_deref(),
        query.to.as_deref(),
        query.bucket.as_deref(),
    )?;
    // A zone's devices: the fleet's rows when it watches every device, else its listed ones.
    let devices: Vec<String> = match query.zone.as_deref().filter(|z| !z.is_empty()) {
        None => vec![FLEET.to_owned()],
        Some(zone) => {
            let zone_id = RuleId::parse(zone).map_err(|e| bad("zone", e.reason))?;
            let rules = state.engine.rules().current();
            let zone = rules
                .zones
                .get(&zone_id)
                .ok_or_else(|| ApiError::not_found(format!("zone {zone_id}")))?;
            match &zone.devices {
                Watched::All => vec![FLEET.to_owned()],
                Watched::Devices(list) => list.iter().map(|d| d.to_string()).collect(),
            }
        }
    };
    let queries = state.read_models.queries().clone();
    let rows = web::block(move || {
        let names: Vec<&str> = devices.iter().map(String::as_str).collect();
        queries.buckets_of(&names, bucket, from.timestamp(), to.timestamp())
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(BucketsPage {
        device_id: None,
        zone_id: query.zone.clone().filter(|z| !z.is_empty()),
        bucket,
        from,
        to,
        buckets: views(rows),
    }))
}

// ---------------------------------------------------------------------------------------------
// A device's summary

/// Temperature over a period.
#[derive(Serialize, ToSchema)]
struct TemperatureSummary {
    count: u64,
    mean: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

impl From<BucketRow> for TemperatureSummary {
    fn from(row: BucketRow) -> Self {
        Self {
            count: row.count,
            mean: row.mean,
            min: row.min,
            max: row.max,
        }
    }
}

/// The last reading's position and how the device was moving.
#[derive(Serialize, ToSchema)]
struct Motion {
    timestamp: DateTime<Utc>,
    #[schema(value_type = schemas::Location)]
    location: Location,
    /// From the previous reading; `null` without one, or when both have the same time.
    speed_m_per_s: Option<f64>,
    /// Degrees clockwise from north, from the previous position; `null` when it did not move.
    heading_deg: Option<f64>,
}

/// A device at a glance.
#[derive(Serialize, ToSchema)]
struct Summary {
    device_id: String,
    last_hour: TemperatureSummary,
    last_day: TemperatureSummary,
    last: Option<Motion>,
    /// Since midnight UTC.
    distance_today_m: f64,
}

/// A device's last hour and day of temperature, speed and heading, and distance today.
#[utoipa::path(
    get,
    path = "/api/devices/{id}/summary",
    tag = "history",
    params(("id" = String, Path, description = DEVICE_ID, example = "truck-7")),
    responses(
        (status = 200, description = "The device's summary", body = Summary),
        (status = 400, description = "An invalid device id", body = ApiError),
        (status = 404, description = "No such device", body = ApiError),
        (status = 500, description = "The device's stored history cannot be read", body = ApiError),
        (status = 503, description = "The store or the read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn summary(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(path.into_inner())?;
    let device = state
        .engine
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id}")))?;
    let now = Utc::now();
    let last = match device.last_reading() {
        None => None,
        Some(last) => {
            // The reading before the last one, for speed and heading.
            let previous = state
                .engine
                .store()
                .read_by_time(
                    id.as_str(),
                    codec::READING_RECORDED,
                    last.timestamp - Duration::days(1)..last.timestamp,
                    None,
                    true,
                    8,
                )
                .await?
                .iter()
                .filter_map(|e| match codec::decode_device_event(e) {
                    Ok(DeviceEvent::ReadingRecorded {
                        at,
                        location,
                        late: false,
                        ..
                    }) => Some((at, location)),
                    _ => None,
                })
                .next();
            let (speed, heading) = match previous {
                Some((at, from)) if at < last.timestamp => {
                    let seconds =
                        (last.timestamp - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
                    let metres = from.distance_m(&last.location);
                    (
                        Some(metres / seconds),
                        (metres > 0.0).then(|| from.bearing_deg(&last.location)),
                    )
                }
                _ => (None, None),
            };
            Some(Motion {
                timestamp: last.timestamp,
                location: last.location,
                speed_m_per_s: speed,
                heading_deg: heading,
            })
        }
    };
    let queries = state.read_models.queries().clone();
    let name = id.to_string();
    let (hour, day, today) = web::block(move || {
        let t = now.timestamp();
        let midnight = Bucket::Day.start_of(now);
        Ok::<_, crate::projections::ReadModelError>((
            queries.total(&name, StoredBucket::Minute, t - 3_600 + 60, t + 60)?,
            queries.total(&name, StoredBucket::Hour, t - 86_400 + 3_600, t + 3_600)?,
            queries.total(&name, StoredBucket::Hour, midnight, t + 3_600)?,
        ))
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(Summary {
        device_id: id.to_string(),
        last_hour: hour.into(),
        last_day: day.into(),
        last,
        distance_today_m: today.distance_m,
    }))
}

// ---------------------------------------------------------------------------------------------
// Zone reports

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// RFC 3339; default 24 hours before `to`.
    from: Option<String>,
    /// RFC 3339, exclusive; default now.
    to: Option<String>,
    /// The previous page's `next_after` (a device id).
    after: Option<String>,
    /// Devices per page, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// One device's time in and out of a zone.
#[derive(Debug, Serialize, PartialEq, ToSchema)]
pub struct DeviceInZone {
    pub device_id: String,
    pub entries: u64,
    pub exits: u64,
    pub seconds_inside: f64,
    pub seconds_outside: f64,
}

/// A zone's report over a range, a page of devices at a time.
#[derive(Serialize, ToSchema)]
struct ZoneReport {
    zone_id: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    devices: Vec<DeviceInZone>,
    next_after: Option<String>,
}

/// One device's time in and out of a zone over `[start, end)` (microseconds), from its crossings
/// (in time order, all before `end`): before its first crossing in the window it is where its
/// last crossing before `start` left it, inside if none.
pub fn in_zone(device: &str, crossings: &[(i64, bool)], start: i64, end: i64) -> DeviceInZone {
    let mut report = DeviceInZone {
        device_id: device.to_owned(),
        entries: 0,
        exits: 0,
        seconds_inside: 0.0,
        seconds_outside: 0.0,
    };
    if start >= end {
        return report;
    }
    let mut inside = crossings
        .iter()
        .take_while(|(at, _)| *at <= start)
        .last()
        .is_none_or(|(_, entered)| *entered);
    let mut since = start;
    for &(at, entered) in crossings.iter().filter(|(at, _)| *at > start && *at < end) {
        let span = (at - since) as f64 / 1e6;
        if inside {
            report.seconds_inside += span;
        } else {
            report.seconds_outside += span;
        }
        if entered {
            report.entries += 1;
        } else {
            report.exits += 1;
        }
        inside = entered;
        since = at;
    }
    let span = (end - since) as f64 / 1e6;
    if inside {
        report.seconds_inside += span;
    } else {
        report.seconds_outside += span;
    }
    report
}

/// Per device the zone watches: entries, exits, and time inside and outside over a range.
#[utoipa::path(
    get,
    path = "/api/zones/{id}/report",
    tag = "history",
    params(("id" = String, Path, description = "The zone id", example = "depot"), ReportQuery),
    responses(
        (status = 200, description = "A page of the report", body = ZoneReport),
        (status = 400, description = "An invalid zone id, time, range or limit (`field` names it)", body = ApiError),
        (status = 404, description = "No such zone", body = ApiError),
        (status = 503, description = "The read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn zone_report(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    let zone_id = RuleId::parse(path.into_inner())?;
    let (from, to) = time_range(
        query.from.as_deref(),
        query.to.as_deref(),
        Duration::hours(24),
    )?;
    let limit = page_limit(query.limit, 100, MAX_REPORT_PAGE)?;
    let after = query.after.clone().unwrap_or_default();
    let watched = {
        let rules = state.engine.rules().current();
        rules
            .zones
            .get(&zone_id)
            .ok_or_else(|| ApiError::not_found(format!("zone {zone_id}")))?
            .devices
            .clone()
    };
    let queries = state.read_models.queries().clone();
    let zone = zone_id.to_string();
    let now = Utc::now();
    let (devices, next_after) = web::block(move || {
        let page: Vec<String> = match watched {
            Watched::All => queries.registered_devices(&after, limit)?,
            Watched::Devices(list) => {
                let mut names: Vec<String> = list.iter().map(|d| d.to_string()).collect();
                names.sort();
                names.retain(|n| n.as_str() > after.as_str());
                names.truncate(limit);
                names
            }
        };
        let registered = queries.registered(&page)?;
        let end = to.min(now).timestamp_micros();
        let crossings = queries.crossings(&zone, &page, end)?;
        let mut devices = Vec::with_capacity(page.len());
        for name in &page {
            let Some(registered) = registered.get(name) else {
                continue;
            };
            let own: Vec<(i64, bool)> = crossings
                .iter()
                .filter(|c| &c.device_id == name)
                .map(|c| (c.at, c.entered))
                .collect();
            // From the device's first reading: device clocks, not the engine's, date crossings.
            let start = from.timestamp_micros().max(*registered);
            devices.push(in_zone(name, &own, start, end));
        }
        let next = (page.len() == limit)
            .then(|| page.last().cloned())
            .flatten();
        Ok::<_, crate::projections::ReadModelError>((devices, next))
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(ZoneReport {
        zone_id: zone_id.to_string(),
        from,
        to,
        devices,
        next_after,
    }))
}

// ---------------------------------------------------------------------------------------------
// Fleet statistics

/// A rate over the last complete second and minute.
#[derive(Serialize, ToSchema)]
struct PerSecond {
    last_second: f64,
    last_minute: f64,
}

/// Devices by state: the conditions that hold now, whether or not an alarm has opened on them
/// yet (a zone or range with a dwell opens it later).
#[derive(Serialize, ToSchema)]
struct DeviceCounts {
    active: usize,
    known: u64,
    outside_a_zone: u64,
    out_of_range: u64,
    offline: u64,
}

/// Alarms by state.
#[derive(Serialize, ToSchema)]
struct AlarmCounts {
    open: u64,
    acknowledged: u64,
    cleared: u64,
}

/// The fleet now.
#[derive(Serialize, ToSchema)]
struct Stats {
    readings_per_second: PerSecond,
    events_per_second: PerSecond,
    devices: DeviceCounts,
    alarms: AlarmCounts,
    dead_lettered_messages: u64,
    /// The last event the read models have folded, and the last one stored.
    read_models_position: u64,
    store_position: u64,
}

/// Readings and events per second, devices by state, dead letters.
#[utoipa::path(
    get,
    path = "/api/stats",
    tag = "history",
    responses(
        (status = 200, description = "The statistics", body = Stats),
        (status = 503, description = "The store or the read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn stats(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let rates = state.read_models.rates().snapshot();
    let queries = state.read_models.queries().clone();
    let (counts, alarms, read_models_position) = web::block(move || {
        Ok::<_, crate::projections::ReadModelError>((
            queries.device_counts()?,
            queries.alarm_counts()?,
            queries.checkpoint()?,
        ))
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(Stats {
        readings_per_second: PerSecond {
            last_second: rates.readings_per_second_last_second,
            last_minute: rates.readings_per_second_last_minute,
        },
        events_per_second: PerSecond {
            last_second: rates.events_per_second_last_second,
            last_minute: rates.events_per_second_last_minute,
        },
        devices: DeviceCounts {
            active: state.engine.active_devices(),
            known: counts.known,
            outside_a_zone: counts.outside_zone,
            out_of_range: counts.out_of_range,
            offline: counts.offline,
        },
        alarms: AlarmCounts {
            open: alarms.get("open").copied().unwrap_or(0),
            acknowledged: alarms.get("acknowledged").copied().unwrap_or(0),
            cleared: alarms.get("cleared").copied().unwrap_or(0),
        },
        dead_lettered_messages: state.failed.total(),
        read_models_position,
        store_position: state.engine.store().head_position().await?,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TopQuery {
    /// `alarms`, `readings` (default) or `distance`.
    #[param(example = "readings")]
    by: Option<String>,
    /// A duration such as `1h` (default), `24h` or `7d`, at most `31d`; whole hours.
    #[param(example = "24h")]
    window: Option<String>,
    /// Devices, 1..=100 (default 10).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
}

/// A device and its total.
#[derive(Serialize, ToSchema)]
struct TopDevice {
    device_id: String,
    /// Alarms, readings or metres.
    value: f64,
}

/// The top devices over a window, most first.
#[derive(Serialize, ToSchema)]
struct TopPage {
    /// `alarms`, `readings` or `distance`.
    #[schema(value_type = String)]
    by: TopBy,
    window: String,
    /// The start of the hour the window begins in.
    since: DateTime<Utc>,
    devices: Vec<TopDevice>,
}

/// The devices with the most alarms, readings or distance over a window.
#[utoipa::path(
    get,
    path = "/api/stats/top",
    tag = "history",
    params(TopQuery),
    responses(
        (status = 200, description = "The top devices", body = TopPage),
        (status = 400, description = "An invalid `by`, `window` or `limit` (`field` names it)", body = ApiError),
        (status = 503, description = "The read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn top(
    state: web::Data<AppState>,
    query: web::Query<TopQuery>,
) -> Result<HttpResponse, ApiError> {
    let by = match query.by.as_deref().unwrap_or("readings") {
        "alarms" => TopBy::Alarms,
        "readings" => TopBy::Readings,
        "distance" => TopBy::Distance,
        other => {
            return Err(bad(
                "by",
                format!("must be alarms, readings or distance, got {other:?}"),
            ))
        }
    };
    let window_text = query.window.clone().unwrap_or_else(|| "1h".into());
    let window = humantime::parse_duration(&window_text)
        .ok()
        .and_then(|w| Duration::from_std(w).ok())
        .filter(|w| *w > Duration::zero() && *w <= MAX_TOP_WINDOW)
        .ok_or_else(|| {
            bad(
                "window",
                format!("must be a duration like 1h or 7d, at most 31d, got {window_text:?}"),
            )
        })?;
    let limit = page_limit(query.limit, 10, MAX_TOP)?;
    // Whole hours: the window reaches back to the start of the hour it begins in.
    let since = (Utc::now() - window)
        .duration_trunc(Duration::hours(1))
        .unwrap_or_else(|_| Utc::now() - window);
    let queries = state.read_models.queries().clone();
    let devices = web::block(move || queries.top(by, since.timestamp(), limit))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(read_model_error)?;
    Ok(HttpResponse::Ok().json(TopPage {
        by,
        window: window_text,
        since,
        devices: devices
            .into_iter()
            .map(|d| TopDevice {
                device_id: d.device_id,
                value: d.value,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn time_in_a_zone_follows_the_crossings() {
        // Out at 10 s, back at 30 s, out at 50 s; the window is 0..100 s.
        let crossings = [(10 * S, false), (30 * S, true), (50 * S, false)];
        let r = in_zone("d", &crossings, 0, 100 * S);
        assert_eq!((r.entries, r.exits), (1, 2));
        assert_eq!((r.seconds_inside, r.seconds_outside), (30.0, 70.0));
        // A window starting while it is out, before it comes back.
        let r = in_zone("d", &crossings, 20 * S, 40 * S);
        assert_eq!(
            (r.entries, r.exits, r.seconds_inside, r.seconds_outside),
            (1, 0, 10.0, 10.0)
        );
        // No crossings: inside throughout; an empty window: nothing.
        assert_eq!(in_zone("d", &[], 0, 5 * S).seconds_inside, 5.0);
        assert_eq!(in_zone("d", &crossings, 5 * S, 5 * S).seconds_inside, 0.0);
    }

    #[test]
    fn cursors_round_trip_and_garbage_names_after() {
        assert_eq!(cursor("1700000000000000-42").unwrap().1, 42);
        let err = cursor("yesterday").unwrap_err();
        assert!(err.to_string().starts_with("after:"), "{err}");
    }
}
