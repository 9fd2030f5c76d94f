//! The HTTP API (actix-web): readings, zones, temperature ranges, devices, the live stream, the
//! map page and operations endpoints. Routes are thin: they parse, call the engine, and map
//! errors to JSON responses in one place ([`ApiError`]).
//!
//! Every route is registered from one table, [`routes`]; the OpenAPI document ([`openapi`]) is
//! checked against that table by `tests/openapi.rs`.

pub mod access;
mod alarms;
mod assets;
mod devices;
pub mod grip;
mod history;
pub mod observe;
pub mod openapi;
mod ops;
mod readings;
mod rules;
pub mod schemas;
mod stream;
mod webhooks;

use actix_web::http::{Method, StatusCode};
use actix_web::{web, FromRequest, Handler, HttpResponse, Responder, ResponseError};
use serde::Serialize;

use crate::engine::{Engine, EngineError};
use crate::ingest::amqp::BrokerStatus;
use crate::ingest::failed::FailedMessages;
use crate::rules::RulesError;
use crate::store::StoreError;

pub use rules::RuleLimits;
pub use stream::StreamLimits;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub max_body_bytes: usize,
    pub max_clock_skew: std::time::Duration,
    pub http_ingest_timeout: std::time::Duration,
    pub tile_url: Option<String>,
    pub broker: BrokerStatus,
    pub failed: FailedMessages,
    pub read_models: crate::projections::ReadModels,
    /// Webhook subscriptions and the alarm notifications.
    pub notifier: crate::notify::Notifier,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub rule_limits: RuleLimits,
    /// The live streams' limits and their open connections (shared by every worker).
    pub streams: StreamLimits,
    /// Cancelled when the engine starts shutting down; long-lived responses (SSE) end then.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Tokens, origins and stream tickets (see [`access`]).
    pub access: std::sync::Arc<access::Access>,
    /// `--grip`: every unfiltered stream request is answered with GRIP instructions (Pushpin in
    /// front), not only those that carry `Grip-Sig`.
    pub grip: bool,
}

/// The error of a request to a path and method the engine does not serve.
pub const NO_SUCH_ENDPOINT: &str = "no such endpoint (see /api/docs or docs/api.md)";

/// Mounts every route of [`routes`]; errors from query strings and unknown routes are JSON like
/// all others. Register no route here directly: `tests/openapi.rs` compares the document with
/// the table, so a route added outside it would be served undocumented without failing a test.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default().error_handler(|e, _| {
            ApiError::bad_request(format!("invalid query string: {e}")).into()
        }),
    )
    // actix answers a path parameter it cannot extract with a plain-text 404 otherwise.
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::bad_request(format!("invalid path: {e}")).into()),
    )
    .default_service(web::to(|| async {
        ApiError::new(StatusCode::NOT_FOUND, NO_SUCH_ENDPOINT).error_response()
    }));
    routes(&mut Routes {
        cfg: Some(cfg),
        listed: Vec::new(),
    });
}

/// Every route the engine serves, as one table: [`configure`] registers it, [`served_routes`]
/// lists it, and `tests/openapi.rs` checks that the OpenAPI document has exactly these routes.
///
/// To add an endpoint: write its handler with `#[utoipa::path(...)]`, add one line here, and
/// list the handler in `paths(...)` of [`openapi::ApiDoc`]. Which token it needs comes from
/// `access::requirement` (the document takes it from there too).
fn routes(r: &mut Routes<'_>) {
    r.post("/api/readings", readings::post_readings)
        .get("/api/zones", rules::list_zones)
        .post("/api/zones", rules::create_zone)
        .get("/api/zones/{id}", rules::get_zone)
        .put("/api/zones/{id}", rules::put_zone)
        .delete("/api/zones/{id}", rules::delete_zone)
        .get("/api/temperature-ranges", rules::list_ranges)
        .post("/api/temperature-ranges", rules::create_range)
        .get("/api/temperature-ranges/{id}", rules::get_range)
        .put("/api/temperature-ranges/{id}", rules::put_range)
        .delete("/api/temperature-ranges/{id}", rules::delete_range)
        .get("/api/devices", devices::list_devices)
        .get("/api/devices/{id}", devices::get_device)
        .get("/api/devices/{id}/events", devices::device_events)
        .get("/api/devices/{id}/readings", history::readings)
        .get("/api/devices/{id}/temperature", history::device_temperature)
        .get("/api/devices/{id}/summary", history::summary)
        .get("/api/zones/{id}/report", history::zone_report)
        .put("/api/devices/{id}/offline-after", alarms::set_offline_after)
        .get("/api/alarms", alarms::list_alarms)
        .post("/api/alarms/{id}/ack", alarms::acknowledge)
        .get("/api/webhooks", webhooks::list_webhooks)
        .post("/api/webhooks", webhooks::create_webhook)
        .get("/api/webhooks/{id}", webhooks::get_webhook)
        .delete("/api/webhooks/{id}", webhooks::delete_webhook)
        .get("/api/stats", history::stats)
        .get("/api/stats/temperature", history::fleet_temperature)
        .get("/api/stats/top", history::top)
        .get("/api/stream", stream::stream)
        .post("/api/stream/tickets", access::issue_ticket)
        .get("/api/health", ops::health)
        .get("/api/config", ops::page_config)
        .get("/api/failed-messages", ops::failed_messages)
        .get("/metrics", ops::metrics)
        .get("/api/openapi.json", openapi::document)
        .get("/api/docs", openapi::explorer);
    // The page's own files (and the explorer's): documented from the same table.
    assets::routes(r);
}

/// The routes of [`routes`], as `(method, path)` with actix's `{param}` placeholders (the same
/// notation as OpenAPI's).
pub fn served_routes() -> Vec<(Method, &'static str)> {
    let mut r = Routes {
        cfg: None,
        listed: Vec::new(),
    };
    routes(&mut r);
    r.listed
}

/// Registers routes with actix (when it has a `ServiceConfig`) and lists them, so the list and
/// what is served cannot differ.
pub struct Routes<'a> {
    cfg: Option<&'a mut web::ServiceConfig>,
    listed: Vec<(Method, &'static str)>,
}

impl Routes<'_> {
    fn add<F, Args>(&mut self, method: Method, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        if let Some(cfg) = self.cfg.as_deref_mut() {
            cfg.route(path, web::method(method.clone()).to(handler));
        }
        self.listed.push((method, path));
        self
    }

    fn get<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(Method::GET, path, handler)
    }

    fn post<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(Method::POST, path, handler)
    }

    fn put<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(Method::PUT, path, handler)
    }

    fn delete<F, Args>(&mut self, path: &'static str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.add(Method::DELETE, path, handler)
    }
}

/// An error response: `{"error": "...", "field": "...", "index": n}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    /// Seconds, sent as `Retry-After`.
    #[serde(skip)]
    retry_after: Option<u32>,
    /// What went wrong, for a person to read.
    error: String,
    /// The offending field, when one is to blame: a body field (`lat`, `shape.points`), a query
    /// parameter (`limit`, `after`) or a path parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// In a batch of readings, the 0-based index of the offending reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    /// A 401 that asks for a bearer token (`WWW-Authenticate: Bearer`).
    #[serde(skip)]
    bearer_challenge: bool,
}

/// What a caller told to come back later is told to wait, in seconds.
const RETRY_AFTER_SECS: u32 = 5;

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            retry_after: None,
            error: error.into(),
            field: None,
            index: None,
            bearer_challenge: false,
        }
    }

    pub fn unauthorized(error: impl Into<String>) -> Self {
        Self {
            bearer_challenge: true,
            ..Self::new(StatusCode::UNAUTHORIZED, error)
        }
    }

    /// `503` with `Retry-After`: the engine cannot take this now, and nothing was acknowledged.
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_SECS),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, error)
        }
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }

    pub fn with_field(mut self, field: Option<String>, index: Option<usize>) -> Self {
        self.field = field;
        self.index = index;
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((actix_web::http::header::RETRY_AFTER, seconds.to_string()));
        }
        if self.bearer_challenge {
            response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(self)
    }
}

impl From<fleetwatch_domain::ValidationError> for ApiError {
    fn from(e: fleetwatch_domain::ValidationError) -> Self {
        ApiError::bad_request(format!("{}: {}", e.field, e.reason))
            .with_field(Some(e.field.to_owned()), None)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // A failing store reports itself once (and on /api/health); not once per request.
        tracing::debug!(error = %e, "store error");
        ApiError::unavailable(e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            // A stored event that cannot be read will not get better by retrying.
            EngineError::Corrupt { .. } | EngineError::Store(StoreError::Refused(_)) => {
                tracing::error!(error = %e, "engine error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            _ => {
                tracing::debug!(error = %e, "engine error");
                ApiError::unavailable(e.to_string())
            }
        }
    }
}

impl From<RulesError> for ApiError {
    fn from(e: RulesError) -> Self {
        let status = match &e {
            RulesError::AlreadyExists { .. } => StatusCode::CONFLICT,
            RulesError::NotFound { .. } => StatusCode::NOT_FOUND,
            // Not a conflict over an id, and retrying will not help until a rule is removed.
            RulesError::TooMany { .. } => StatusCode::BAD_REQUEST,
            RulesError::Store(e) => return e.clone().into(),
            RulesError::Damaged(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Reads a request body up to `limit` bytes; larger bodies are refused with 413.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
    };
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => too_large(),
            other => ApiError::bad_request(format!("reading the request body failed: {other}")),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Parses a JSON body into `T`, naming the offending field on error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = (!path.is_empty() && path != ".").then_some(path);
        let message = match &field {
            Some(f) => format!("{f}: {inner}"),
            None => format!("invalid JSON body: {inner}"),
        };
        ApiError::bad_request(message).with_field(field, None)
    })
}
