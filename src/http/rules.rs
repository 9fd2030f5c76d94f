//! Zones (`/api/zones`) and temperature ranges (`/api/temperature-ranges`).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use fleetwatch_domain::{
    RuleId, ShapeSpec, Temperature, TemperatureRange, Watched, Zone, ZoneShape,
};
use serde::Deserialize;

use super::{parse_json, read_body, ApiError, AppState};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/zones", web::get().to(list_zones))
        .route("/zones", web::post().to(create_zone))
        .route("/zones/{id}", web::get().to(get_zone))
        .route("/zones/{id}", web::put().to(put_zone))
        .route("/zones/{id}", web::delete().to(delete_zone))
        .route("/temperature-ranges", web::get().to(list_ranges))
        .route("/temperature-ranges", web::post().to(create_range))
        .route("/temperature-ranges/{id}", web::get().to(get_range))
        .route("/temperature-ranges/{id}", web::put().to(put_range))
        .route("/temperature-ranges/{id}", web::delete().to(delete_range));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneBody {
    id: Option<String>,
    #[serde(default)]
    name: String,
    /// Validated by the domain, so errors name the exact field (`shape.radius_m`, ...).
    shape: ShapeSpec,
    #[serde(default)]
    devices: Watched,
    /// Accepted so a GET result can be PUT back unchanged; the server assigns it.
    #[serde(default, rename = "revision")]
    _revision: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeBody {
    id: Option<String>,
    #[serde(default)]
    name: String,
    min: f64,
    max: f64,
    #[serde(default)]
    devices: Watched,
    #[serde(default, rename = "revision")]
    _revision: Option<u64>,
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

fn rule_id(raw: &str) -> Result<RuleId, ApiError> {
    Ok(RuleId::parse(raw)?)
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
    limits.check_shape(&body.shape)?;
    limits.check_devices(&body.devices)?;
    web::block(move || -> Result<Zone, ApiError> {
        let shape = ZoneShape::try_from(body.shape)?;
        Ok(Zone::new(id, body.name, shape, body.devices)?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
}

fn range(id: RuleId, body: RangeBody, limits: RuleLimits) -> Result<TemperatureRange, ApiError> {
    limits.check_devices(&body.devices)?;
    let min = Temperature::checked("min", body.min)?;
    let max = Temperature::checked("max", body.max)?;
    Ok(TemperatureRange::new(
        id,
        body.name,
        min,
        max,
        body.devices,
    )?)
}

async fn list_zones(state: web::Data<AppState>) -> HttpResponse {
    let rules = state.engine.rules().current();
    HttpResponse::Ok().json(rules.zones.values().collect::<Vec<_>>())
}

async fn get_zone(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path)?;
    let rules = state.engine.rules().current();
    let zone = rules
        .zones
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("zone {id}")))?;
    Ok(HttpResponse::Ok().json(zone))
}

async fn create_zone(
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

async fn put_zone(
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: ZoneBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = id_for_put(&path, body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_zone(zone(id, body, state.rule_limits).await?, false)
        .await?;
    Ok(HttpResponse::Ok().json(stored))
}

async fn delete_zone(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.engine.rules().remove_zone(&rule_id(&path)?).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn list_ranges(state: web::Data<AppState>) -> HttpResponse {
    let rules = state.engine.rules().current();
    HttpResponse::Ok().json(rules.ranges.values().collect::<Vec<_>>())
}

async fn get_range(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = rule_id(&path)?;
    let rules = state.engine.rules().current();
    let range = rules
        .ranges
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("temperature range {id}")))?;
    Ok(HttpResponse::Ok().json(range))
}

async fn create_range(
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

async fn put_range(
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: RangeBody = parse_json(&read_body(payload, state.max_body_bytes).await?)?;
    let id = id_for_put(&path, body.id.clone())?;
    let stored = state
        .engine
        .rules()
        .define_range(range(id, body, state.rule_limits)?, false)
        .await?;
    Ok(HttpResponse::Ok().json(stored))
}

async fn delete_range(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.engine.rules().remove_range(&rule_id(&path)?).await?;
    Ok(HttpResponse::NoContent().finish())
}
