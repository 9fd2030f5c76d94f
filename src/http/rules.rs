//! Zones (`/api/zones`) and temperature ranges (`/api/temperature-ranges`).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use fleetwatch_domain::{
    AlarmKind, RuleId, Severity, ShapeSpec, Temperature, TemperatureRange, Watched, Zone, ZoneShape,
};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::schemas::{
    Severity as SeveritySchema, Shape, TemperatureRange as RangeSchema, Zone as ZoneSchema,
};
use super::{parse_json, read_body, ApiError, AppState};

/// A zone to create or replace.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "depot", "name": "Depot Amsterdam", "shape": {"type": "circle", "center": {"lat": 52.37, "lon": 4.89}, "radius_m": 500.0}, "devices": ["truck-7", "truck-8"]}))]
pub struct ZoneBody {
    /// Optional on `POST` (a UUID is generated); on `PUT`, if given, it must match the path.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    id: Option<String>,
    /// Free text, up to 200 characters.
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
    /// Validated by the domain, so errors name the exact field (`shape.radius_m`, ...).
    #[schema(value_type = Shape)]
    shape: ShapeSpec,
    /// The devices the zone watches (at most `--max-rule-devices`); `null` or absent: every
    /// device.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    devices: Watched,
    /// The severity of its alarms: `info`, `warning` (default) or `critical`.
    #[serde(default)]
    #[schema(value_type = Option<SeveritySchema>)]
    severity: Severity,
    /// Seconds the condition must hold before the alarm opens, and be gone before it clears
    /// (0..=86400, default 0: at once). Against GPS jitter across a border, a minute or so.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    dwell: u64,
    /// Accepted so a GET result can be PUT back unchanged; the server assigns it.
    #[serde(default, rename = "revision")]
    #[schema(maximum = 9223372036854775807_i64)]
    _revision: Option<u64>,
}

/// A temperature range to create or replace.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "cold-chain", "name": "Cold chain", "min": 2.0, "max": 8.0, "devices": null}))]
pub struct RangeBody {
    /// Optional on `POST` (a UUID is generated); on `PUT`, if given, it must match the path.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    id: Option<String>,
    /// Free text, up to 200 characters.
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
    /// °C, within [-100, 200]; less than `max`.
    #[schema(minimum = -100.0, maximum = 200.0)]
    min: f64,
    /// °C, within [-100, 200].
    #[schema(minimum = -100.0, maximum = 200.0)]
    max: f64,
    /// The devices the range watches (at most `--max-rule-devices`); `null` or absent: every
    /// device.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    devices: Watched,
    /// The severity of its alarms: `info`, `warning` (default) or `critical`.
    #[serde(default)]
    #[schema(value_type = Option<SeveritySchema>)]
    severity: Severity,
    /// Seconds the condition must hold before the alarm opens, and be gone before it clears
    /// (0..=86400, default 0: at once). Against GPS jitter across a border, a minute or so.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    dwell: u64,
    /// Accepted so a GET result can be PUT back unchanged; the server assigns it.
    #[serde(default, rename = "revision")]
    #[schema(maximum = 9223372036854775807_i64)]
    _revision: Option<u64>,
}

/// Longest dwell, in seconds: a day.
const MAX_DWELL_S: u64 = 86_400;

fn check_dwell(dwell: u64) -> Result<(), ApiError> {
    if dwell > MAX_DWELL_S {
        return Err(ApiError::bad_request(format!(
            "dwell: must be within 0..={MAX_DWELL_S} seconds, got {dwell}"
        ))
        .with_field(Some("dwell".into()), None));
    }
    Ok(())
}

/// Limits on what one zone or range may hold. They are checked before any costly validation: a
/// polygon's validation grows faster than its vertex count.
#[derive(Debug, Clone, Copy)]
pub struct RuleLimits {
    pub max_zone_vertices: usize,
    pub max_rule_devices: usize,
}

impl RuleLimits {
    fn check_shape(&self, shape: &ShapeSpec) -> Result<(), ApiError> {
        let ShapeSpec::Polygon { points } = shape else {
            return Ok(());
        };
        // A closing vertex is not counted, so a stored polygon (returned closed) can be PUT back.
        let closed = points.len() > 1 && points.first() == points.last();
        let vertices = points.len() - usize::from(closed);
        if vertices > self.max_zone_vertices {
            return Err(ApiError::bad_request(format!(
                "shape.points: a polygon may have at most {} vertices (--max-zone-vertices), got {vertices}",
                self.max_zone_vertices
            ))
            .with_field(Some("shape.points".into()), None));
        }
        Ok(())
    }

    fn check_devices(&self, devices: &Watched) -> Result<(), ApiError> {
        let Watched::Devices(listed) = devices else {
            return Ok(());
        };
        if listed.len() > self.max_rule_devices {
            return Err(ApiError::bad_request(format!(
                "devices: at most {} devices may be listed (--max-rule-devices), got {}",
                self.max_rule_devices,
                listed.len()
            ))
            .with_field(Some("devices".into()), None));
        }
        Ok(())
    }
}

/// A `revision` in a body is ignored, but it must be one the store could have assigned (its
/// versions are SQLite integers), as the OpenAPI document says.
fn check_revision(revision: Option<u64>) -> Result<(), ApiError> {
    match revision {
        Some(r) if r > i64::MAX as u64 => Err(ApiError::bad_request(format!(
            "revision: must be at most {}, got {r}",
            i64::MAX
        ))
        .with_field(Some("revision".into()), None)),
        _ => Ok(()),
    }
}

fn rule_id(raw: &str) -> Result<RuleId, ApiError> {
    Ok(RuleId::parse(raw)?)
}

/// The zone a path names.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ZonePath {
    /// The zone's id: 1..=128 characters of `[A-Za-z0-9._:-]`
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", example = "depot")]
    id: String,
}

/// The temperature range a path names.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RangePath {
    /// The range's id: 1..=128 characters of `[A-Za-z0-9._:-]`
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", example = "cold-chain")]
    id: String,
}

/// The id from the path wins; a body id, if any, must match it.
fn id_for_put(path_id: &str, body_id: Option<String>) -> Result<RuleId, ApiError> {
    let id = rule_id(path_id)?;
    match body_id {
        Some(body_id) if body_id != path_id => Err(ApiError::bad_request(format!(
            "id in the body ({body_id}) does not match the path ({path_id})"
        ))
        .with_field(Some("id".into()), None)),
        _ => Ok(id),
    }
}

fn new_id(body_id: Option<String>) -> Result<RuleId, ApiError> {
    match body_id {
        Some(id) => rule_id(&id),
        None => rule_id(&uuid::Uuid::new_v4().to_string()),
    }
}

/// Checks the limits, then validates the zone on the blocking pool: a polygon of many vertices
/// takes a while, and must not hold an HTTP worker (or the health check behind it).
async fn zone(id: RuleId, body: ZoneBody, limits: RuleLimits) -> Result<Zone, ApiError> {
    check_revision(body._revision)?;
    check_dwell(body.dwell)?;
    limits.check_shape(&body.shape)?;
    limits.check_devices(&body.devices)?;
    web::block(move || -> Result<Zone, ApiError> {
        let shape = ZoneShape::try_from(body.shape)?;
        Ok(Zone::new(id, body.name, shape, body.devices)?.with_alarm(body.severity, body.dwell))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
}

fn range(id: RuleId, body: RangeBody, limits: RuleLimits) -> Result<TemperatureRange, ApiError> {
    check_revision(body._revision)?;
    check_dwell(body.dwell)?;
    limits.check_devices(&body.devices)?;
    let min = Temperature::checked("min", body.min)?;
    let max = Temperature::checked("max", body.max)?;
    Ok(
        TemperatureRange::new(id, body.name, min, max, body.devices)?
            .with_alarm(body.severity, body.dwell),
    )
}

/// After a rule was removed or replaced, the devices with an alarm on it decide again now (an
/// alarm whose rule is gone, or no longer watches the device, clears) rather than at their next
/// reading or deadline. From the alarms list: an alarm opened within the last second may be
/// missed, and clears at its device's next reading or deadline instead.
async fn settle_alarms_of(state: &AppState, kind: AlarmKind, rule: &RuleId) {
    let queries = state.read_models.queries().clone();
    let filter = crate::projections::AlarmFilter {
        active: true,
        zone: kind.zone(Some(rule.to_string())),
        range: kind.range(Some(rule.to_string())),
        ..Default::default()
    };
    let alarms = web::block(move || queries.alarms(&filter, u64::MAX, usize::MAX)).await;
    let Ok(Ok(alarms)) = alarms else {
        return;
    };
    let now = chrono::Utc::now();
    for alarm in &alarms {
        if let Ok(device) = fleetwatch_domain::DeviceId::parse(alarm.device_id.as_str()) {
            state.engine.deadlines().file_no_later(&device, now);
        }
    }
}

/// Lists every zone.
#[utoipa::path(
    get,
    path = "/api/zones",
    tag = "zones",
    responses(
        (status = 200, description = "Every zone", body = [ZoneSchema]),
    )
)]
pub(super) async fn list_zones(state: web::Data<AppState>) -> HttpResponse {
    let rules = state.engine.rules().current();
    HttpResponse::Ok().json(rules.zones.values().collect::<Vec<_>>())
}

/// What every write of a zone or range may answer besides its own responses (documentation only:
/// the handlers answer with [`ApiError`]).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum RuleWriteFailures {
    #[response(
        status = 500,
        description = "The stored zones and ranges cannot be read"
    )]
    Unreadable(ApiError),
    #[response(
        status = 503,
        description = "The event store cannot write now; nothing was changed",
        headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))
    )]
    Unavailable(ApiError),
}

/// One zone.
#[utoipa::path(
    get,
    path = "/api/zones/{id}",
    tag = "zones",
    params(ZonePath),
    responses(
        (status = 200, description = "The zone", body = ZoneSchema),
        (status = 400, description = "The id is not valid", body = ApiError),
        (status = 404, description = "No such zone", body = ApiError),
    )
)]
pub(super) async fn get_zone(
    state: web::Data<AppState>,
    path: web::Path<ZonePath>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path.id)?;
    let rules = state.engine.rules().current();
    let zone = rules
        .zones
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("zone {id}")))?;
    Ok(HttpResponse::Ok().json(zone))
}

/// Creates a zone.
///
/// The answer adds `revision`: the version of the `$rules` stream that created the zone.
#[utoipa::path(
    post,
    path = "/api/zones",
    tag = "zones",
    request_body(content = ZoneBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The zone as stored", body = ZoneSchema),
        (status = 400, description = "The body is not a valid zone: `field` names the offending field (`shape.points` beyond `--max-zone-vertices`, `devices` beyond `--max-rule-devices`); without `field` when `--max-rules` zones and ranges exist", body = ApiError),
        (status = 409, description = "A zone with this id exists", body = ApiError),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn create_zone(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: ZoneBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = new_id(body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_zone(zone(id, body, state.rule_limits).await?, true)
        .await?;
    Ok(HttpResponse::Created().json(stored))
}

/// Creates or replaces a zone.
///
/// Replacing a zone keeps its revision, so editing a shape does not raise active alarms again.
#[utoipa::path(
    put,
    path = "/api/zones/{id}",
    tag = "zones",
    params(ZonePath),
    request_body(content = ZoneBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The zone as stored", body = ZoneSchema),
        (status = 400, description = "The body is not a valid zone: `field` names the offending field (`shape.points` beyond `--max-zone-vertices`, `devices` beyond `--max-rule-devices`); without `field` when `--max-rules` zones and ranges exist", body = ApiError),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn put_zone(
    state: web::Data<AppState>,
    path: web::Path<ZonePath>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: ZoneBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = id_for_put(&path.id, body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_zone(zone(id.clone(), body, state.rule_limits).await?, false)
        .await?;
    settle_alarms_of(&state, AlarmKind::OutsideZone, &id).await;
    Ok(HttpResponse::Ok().json(stored))
}

/// Deletes a zone.
#[utoipa::path(
    delete,
    path = "/api/zones/{id}",
    tag = "zones",
    params(ZonePath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not valid", body = ApiError),
        (status = 404, description = "No such zone", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn delete_zone(
    state: web::Data<AppState>,
    path: web::Path<ZonePath>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path.id)?;
    state.engine.rules().remove_zone(&id).await?;
    settle_alarms_of(&state, AlarmKind::OutsideZone, &id).await;
    Ok(HttpResponse::NoContent().finish())
}

/// Lists every temperature range.
#[utoipa::path(
    get,
    path = "/api/temperature-ranges",
    tag = "temperature ranges",
    responses(
        (status = 200, description = "Every range", body = [RangeSchema]),
    )
)]
pub(super) async fn list_ranges(state: web::Data<AppState>) -> HttpResponse {
    let rules = state.engine.rules().current();
    HttpResponse::Ok().json(rules.ranges.values().collect::<Vec<_>>())
}

/// One temperature range.
#[utoipa::path(
    get,
    path = "/api/temperature-ranges/{id}",
    tag = "temperature ranges",
    params(RangePath),
    responses(
        (status = 200, description = "The range", body = RangeSchema),
        (status = 400, description = "The id is not valid", body = ApiError),
        (status = 404, description = "No such range", body = ApiError),
    )
)]
pub(super) async fn get_range(
    state: web::Data<AppState>,
    path: web::Path<RangePath>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path.id)?;
    let rules = state.engine.rules().current();
    let range = rules
        .ranges
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("temperature range {id}")))?;
    Ok(HttpResponse::Ok().json(range))
}

/// Creates a temperature range.
#[utoipa::path(
    post,
    path = "/api/temperature-ranges",
    tag = "temperature ranges",
    request_body(content = RangeBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The range as stored", body = RangeSchema),
        (status = 400, description = "The body is not a valid range (`min` must be less than `max`): `field` names the offending field (`devices` beyond `--max-rule-devices`); without `field` when `--max-rules` zones and ranges exist", body = ApiError),
        (status = 409, description = "A range with this id exists", body = ApiError),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn create_range(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: RangeBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = new_id(body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_range(range(id, body, state.rule_limits)?, true)
        .await?;
    Ok(HttpResponse::Created().json(stored))
}

/// Creates or replaces a temperature range.
#[utoipa::path(
    put,
    path = "/api/temperature-ranges/{id}",
    tag = "temperature ranges",
    params(RangePath),
    request_body(content = RangeBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The range as stored", body = RangeSchema),
        (status = 400, description = "The body is not a valid range (`min` must be less than `max`): `field` names the offending field (`devices` beyond `--max-rule-devices`); without `field` when `--max-rules` zones and ranges exist", body = ApiError),
        (status = 413, description = "The body is larger than `--max-body-bytes`", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn put_range(
    state: web::Data<AppState>,
    path: web::Path<RangePath>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: RangeBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = id_for_put(&path.id, body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_range(range(id.clone(), body, state.rule_limits)?, false)
        .await?;
    settle_alarms_of(&state, AlarmKind::TemperatureOutOfRange, &id).await;
    Ok(HttpResponse::Ok().json(stored))
}

/// Deletes a temperature range.
#[utoipa::path(
    delete,
    path = "/api/temperature-ranges/{id}",
    tag = "temperature ranges",
    params(RangePath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not valid", body = ApiError),
        (status = 404, description = "No such range", body = ApiError),
        RuleWriteFailures,
    )
)]
pub(super) async fn delete_range(
    state: web::Data<AppState>,
    path: web::Path<RangePath>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path.id)?;
    state.engine.rules().remove_range(&id).await?;
    settle_alarms_of(&state, AlarmKind::TemperatureOutOfRange, &id).await;
    Ok(HttpResponse::NoContent().finish())
}
