//! Alarms: the list (`GET /api/alarms`, from the alarms read model), acknowledging one (a
//! command to its device), and a device's own offline period.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use fleetwatch_domain::{AckRefused, AlarmId, AlarmKind, AlarmState, DeviceId, Severity};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::history::{bad, known, page_limit, read_model_error};
use super::{parse_json, read_body, ApiError, AppState};
use crate::engine::{Command, IngestOutcome};
use crate::projections::{AlarmFilter, AlarmRow};

const MAX_ALARMS_PAGE: usize = 1_000;
/// Longest acknowledgement comment, in characters.
const MAX_COMMENT_CHARS: usize = 1_000;
/// Longest own offline period a device may be given: 30 days.
const MAX_OFFLINE_AFTER_S: u64 = 30 * 86_400;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlarmsQuery {
    /// `open`, `acknowledged`, `cleared`, or `active` (open or acknowledged: not cleared).
    state: Option<String>,
    /// Only this device's alarms.
    device: Option<String>,
    /// `outside_zone`, `temperature_out_of_range` or `offline`.
    kind: Option<String>,
    /// `info`, `warning` or `critical`.
    severity: Option<String>,
    /// Only this zone's (outside-zone) alarms.
    zone: Option<String>,
    /// At most this many (1..=1000, default 100).
    limit: Option<usize>,
    /// The previous page's `next_after`: alarms opened before it.
    after: Option<String>,
}

/// Who acknowledged an alarm, when, and why.
#[derive(Serialize, ToSchema)]
struct AcknowledgementView {
    at: DateTime<Utc>,
    /// The name of the token used (`anonymous` when acknowledging needs no token).
    by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
}

/// An alarm: at most one is open per device, kind and zone or range at a time.
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"id": "truck-7.3", "device_id": "truck-7", "kind": "outside_zone", "zone_id": "depot", "severity": "critical", "state": "acknowledged", "opened_at": "2026-11-30T14:00:00Z", "cause_version": 812, "sequence": 2, "acknowledged": {"at": "2026-11-30T14:02:10Z", "by": "night-shift", "comment": "driver called"}}))]
pub struct AlarmView {
    /// `<device>.<n>`: the device's n-th alarm.
    id: String,
    device_id: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_id: Option<String>,
    severity: String,
    /// `open`, `acknowledged` (and still active) or `cleared`.
    state: String,
    /// When the condition had held for the rule's dwell.
    opened_at: DateTime<Utc>,
    /// The version, in the device's events, of the event that began the condition.
    cause_version: u64,
    /// Changes so far: 1 opened, then one per acknowledgement and clearing. Notifications carry
    /// it, so a receiver can drop repeats.
    sequence: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledged: Option<AcknowledgementView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cleared_at: Option<DateTime<Utc>>,
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

impl From<AlarmRow> for AlarmView {
    fn from(row: AlarmRow) -> Self {
        let kind = row.kind.parse::<AlarmKind>().ok();
        let zone_id = kind.and_then(|k| k.zone(row.rule.clone()));
        let range_id = kind.and_then(|k| k.range(row.rule));
        Self {
            id: row.id,
            device_id: row.device_id,
            kind: row.kind,
            zone_id,
            range_id,
            severity: row.severity,
            state: row.state,
            opened_at: time(row.opened_at),
            cause_version: row.cause_version,
            sequence: row.sequence,
            acknowledged: row.acknowledged_at.map(|at| AcknowledgementView {
                at: time(at),
                by: row.acknowledged_by.unwrap_or_default(),
                comment: row.comment,
            }),
            cleared_at: row.cleared_at.map(time),
        }
    }
}

/// A page of alarms, newest first.
#[derive(Serialize, ToSchema)]
struct AlarmsPage {
    alarms: Vec<AlarmView>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<String>,
}

fn parsed<T: std::str::FromStr<Err = fleetwatch_domain::ValidationError>>(
    raw: &Option<String>,
) -> Result<Option<T>, ApiError> {
    Ok(raw
        .as_deref()
        .filter(|r| !r.is_empty())
        .map(str::parse)
        .transpose()?)
}

/// Alarms, newest first, filtered by state, device, kind, severity and zone. Up to a second
/// behind the events (the read models commit once a second).
#[utoipa::path(
    get,
    path = "/api/alarms",
    tag = "alarms",
    params(AlarmsQuery),
    responses(
        (status = 200, description = "A page of alarms", body = AlarmsPage),
        (status = 400, description = "An invalid filter, limit or cursor (`field` names it)", body = ApiError),
        (status = 503, description = "The read models cannot be read now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn list_alarms(
    state: web::Data<AppState>,
    query: web::Query<AlarmsQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let active = query.state.as_deref() == Some("active");
    let wanted = if active { None } else { query.state };
    let filter = AlarmFilter {
        state: parsed::<AlarmState>(&wanted)?,
        active,
        device: query.device.filter(|d| !d.is_empty()),
        kind: parsed::<AlarmKind>(&query.kind)?,
        severity: parsed::<Severity>(&query.severity)?,
        zone: query.zone.filter(|z| !z.is_empty()),
        range: None,
    };
    let limit = page_limit(query.limit, 100, MAX_ALARMS_PAGE)?;
    let before = match query.after.as_deref().filter(|a| !a.is_empty()) {
        None => u64::MAX,
        Some(raw) => raw
            .parse::<u64>()
            .map_err(|_| bad("after", format!("not a cursor from next_after: {raw:?}")))?,
    };
    let queries = state.read_models.queries().clone();
    let rows = web::block(move || queries.alarms(&filter, before, limit))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(read_model_error)?;
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.position.to_string()))
        .flatten();
    Ok(HttpResponse::Ok().json(AlarmsPage {
        alarms: rows.into_iter().map(AlarmView::from).collect(),
        next_after,
    }))
}

/// An acknowledgement.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AckBody {
    /// Why, or what is being done (at most 1,000 characters).
    #[serde(default)]
    comment: Option<String>,
}

/// What an acknowledgement did.
#[derive(Serialize, ToSchema)]
struct Acknowledged {
    id: String,
    state: &'static str,
    by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
}

/// Acknowledges an open alarm: it stays listed, as acknowledged, until its condition clears.
/// The body (`{"comment": "..."}`) may be empty.
#[utoipa::path(
    post,
    path = "/api/alarms/{id}/ack",
    tag = "alarms",
    params(("id" = String, Path, description = "The alarm id, `<device>.<n>`", example = "truck-7.1")),
    request_body(content = AckBody, description = "An optional comment", content_type = "application/json"),
    responses(
        (status = 200, description = "Acknowledged (durable)", body = Acknowledged),
        (status = 400, description = "An invalid alarm id or body", body = ApiError),
        (status = 404, description = "No such alarm, or it has cleared", body = ApiError),
        (status = 409, description = "Already acknowledged", body = ApiError),
        (status = 503, description = "The store cannot write now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn acknowledge(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let alarm = AlarmId::parse(&path.into_inner())?;
    let body = read_body(payload, state.max_body_bytes).await?;
    let comment = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        parse_json::<AckBody>(&body)?.comment
    };
    if comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
    {
        return Err(bad(
            "comment",
            format!("at most {MAX_COMMENT_CHARS} characters"),
        ));
    }
    known(&state, alarm.device()).await?;
    let by = state.access.caller_name(request.headers());
    let outcome = state
        .engine
        .command(
            alarm.device(),
            Command::Acknowledge {
                alarm: alarm.clone(),
                by: by.clone(),
                comment: comment.clone(),
            },
        )
        .await?;
    match outcome {
        IngestOutcome::Refused(AckRefused::NotActive(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("alarm {alarm} is not open: it has cleared, or never existed"),
        )),
        IngestOutcome::Refused(refused @ AckRefused::AlreadyAcknowledged(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, refused.to_string()))
        }
        _ => Ok(HttpResponse::Ok().json(Acknowledged {
            id: alarm.to_string(),
            state: "acknowledged",
            by,
            comment,
        })),
    }
}

/// A device's own offline period.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OfflineAfterBody {
    /// Seconds of silence before the device goes offline (1..=2592000); `null`: the engine's
    /// default (`--offline-after`) again.
    seconds: Option<u64>,
}

/// Gives a device its own offline period instead of the engine's `--offline-after`, or (with
/// `null`) takes it away.
#[utoipa::path(
    put,
    path = "/api/devices/{id}/offline-after",
    tag = "alarms",
    params(("id" = String, Path, description = "The device id", example = "truck-7")),
    request_body(content = OfflineAfterBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Set (durable)", body = OfflineAfterBody),
        (status = 400, description = "An invalid device id or period", body = ApiError),
        (status = 404, description = "No such device", body = ApiError),
        (status = 503, description = "The store cannot write now", body = ApiError,
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
    )
)]
pub(super) async fn set_offline_after(
    state: web::Data<AppState>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let device = DeviceId::parse(path.into_inner())?;
    let body = read_body(payload, state.max_body_bytes).await?;
    let OfflineAfterBody { seconds } = parse_json(&body)?;
    if let Some(s) = seconds {
        if !(1..=MAX_OFFLINE_AFTER_S).contains(&s) {
            return Err(bad(
                "seconds",
                format!("must be within 1..={MAX_OFFLINE_AFTER_S}, got {s}"),
            ));
        }
    }
    known(&state, &device).await?;
    state
        .engine
        .command(&device, Command::SetOfflineAfter(seconds))
        .await?;
    Ok(HttpResponse::Ok().json(OfflineAfterBody { seconds }))
}
