//! Zones (`/api/zones`) and temperature ranges (`/api/temperature-ranges`).

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

fn zone(id: RuleId, body: ZoneBody) -> Result<Zone, ApiError> {
    let shape = ZoneShape::try_from(body.shape)?;
    Ok(Zone::new(id, body.name, shape, body.devices)?)
}

fn range(id: RuleId, body: RangeBody) -> Result<TemperatureRange, ApiError> {
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
        .define_zone(zone(id, body)?, true)
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
        .define_zone(zone(id, body)?, false)
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
        .define_range(range(id, body)?, true)
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
        .define_range(range(id, body)?, false)
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
