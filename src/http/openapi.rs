//! The OpenAPI 3.1 document (`GET /api/openapi.json`) and its interactive explorer
//! (`GET /api/docs`, Swagger UI from the npm package `swagger-ui-dist`, embedded like the map
//! page's libraries: nothing is fetched at build or run time from anywhere but the npm registry).
//!
//! The document is generated from the code: each handler carries its `#[utoipa::path(...)]`, the
//! request and response types derive `ToSchema` where they are defined (the domain's JSON shapes
//! are in [`super::schemas`]), and this module lists the paths. Two things are added here for
//! every route, so that they cannot drift from what the engine does:
//! * the security requirement and the `401`/`403`/`415` answers, from the scope table in
//!   `access.rs` (the one the middleware enforces);
//! * the page's static files, from the assets table in `assets.rs`.
//!
//! ## Adding a route
//! 1. Write the handler with `#[utoipa::path(method, path = "/api/...", tag = "...",
//!    params(...), request_body(...), responses(...))]`: every status code it can answer but
//!    `401`/`403`/`415` (added here), each error with `body = ApiError`.
//! 2. Add it to the route table, `routes()` in `src/http/mod.rs`.
//! 3. List the handler in `paths(...)` below.
//! 4. If it is not a GET needing `read`, place it in `requirement()` in `access.rs`.
//!
//! `tests/openapi.rs` fails when a route is served but not documented, or documented but not
//! served, and runs schemathesis against the document.

use std::sync::LazyLock;

use actix_web::http::{header, Method, StatusCode};
use actix_web::HttpResponse;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use super::{access, alarms, assets, devices, history, ops, readings, rules, webhooks, ApiError};

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api/openapi.json";
/// Where the explorer is served.
pub const EXPLORER_PATH: &str = "/api/docs";

/// The name of the bearer-token security scheme in the document.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetwatch",
        description = "The HTTP API of fleetwatch: the live state of a fleet of devices, and the \
alarms it raises.\n\n\
The narrative (semantics, time rules, the live stream, limits) is docs/api.md.\n\n\
**Errors** are JSON: `{\"error\": \"...\", \"field\": \"...\", \"index\": n}`. `field` names the \
offending field or parameter when one is to blame; `index` is the place of the offending reading \
in a batch. A path or method the engine does not serve answers `404` with the same shape.\n\n\
**Access.** Each route needs a bearer token (`Authorization: Bearer <token>`) of a scope: \
`ingest` (posting readings), `admin` (changing zones and ranges, acknowledging alarms, a \
device's offline period, webhooks, reading them included; an admin token also reads) or `read` (everything else). A scope with no tokens configured is open. `GET /api/health`, \
`GET /api/config`, this document, the explorer and the map page are always open. A missing or \
unknown token gets `401`, a valid one without the scope `403`; a request from a foreign \
`Origin` gets `403`. Request bodies must be `Content-Type: application/json` (`415`)."
    ),
    paths(
        readings::post_readings,
        rules::list_zones,
        rules::create_zone,
        rules::get_zone,
        rules::put_zone,
        rules::delete_zone,
        rules::list_ranges,
        rules::create_range,
        rules::get_range,
        rules::put_range,
        rules::delete_range,
        devices::list_devices,
        devices::get_device,
        devices::device_events,
        history::readings,
        history::device_temperature,
        history::summary,
        history::zone_report,
        alarms::set_offline_after,
        alarms::list_alarms,
        alarms::acknowledge,
        webhooks::list_webhooks,
        webhooks::create_webhook,
        webhooks::get_webhook,
        webhooks::delete_webhook,
        history::stats,
        history::fleet_temperature,
        history::top,
        crate::http::stream::stream,
        access::issue_ticket,
        ops::health,
        ops::page_config,
        ops::failed_messages,
        ops::metrics,
        document,
        explorer,
    ),
    components(schemas(ApiError)),
    // In this order: the page's files get their access answers too.
    modifiers(&PageFiles, &AccessRules),
    tags(
        (name = "readings", description = "Devices' readings (also over RabbitMQ)"),
        (name = "zones", description = "Watch zones: leaving one raises `LeftZone`"),
        (name = "temperature ranges", description = "Leaving one raises `TemperatureOutOfRange`"),
        (name = "devices", description = "Devices' live state and stored history"),
        (name = "history", description = "Questions about the past: readings by time, temperature buckets, summaries, zone reports, fleet statistics (from the read models, a second or so behind the events)"),
        (name = "alarms", description = "Alarms with a lifecycle (open, acknowledged, cleared), and offline detection"),
        (name = "webhooks", description = "Alarm changes POSTed to your URL, signed, in order, at least once (admin scope: URLs and secrets are configuration)"),
        (name = "live stream", description = "Stored events as server-sent events"),
        (name = "operations", description = "Health, the page's settings, failed messages, metrics"),
        (name = "documentation", description = "This document and its explorer"),
        (name = "page", description = "The map page and the explorer's files"),
    )
)]
pub struct ApiDoc;

/// The document as served, generated once.
static DOCUMENT: LazyLock<Result<String, String>> =
    LazyLock::new(|| ApiDoc::openapi().to_json().map_err(|e| e.to_string()));

/// This document: the API in OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "documentation",
    responses(
        (status = 200, description = "The OpenAPI document", body = serde_json::Value),
        (status = 500, description = "The document could not be generated", body = ApiError),
    )
)]
pub(super) async fn document() -> Result<HttpResponse, ApiError> {
    let json = DOCUMENT.as_ref().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the OpenAPI document could not be generated: {e}"),
        )
    })?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(json.as_str()))
}

/// The interactive explorer of this document (Swagger UI). Its "Authorize" button takes a token.
#[utoipa::path(
    get,
    path = "/api/docs",
    tag = "documentation",
    responses((status = 200, description = "The explorer's page", content_type = "text/html", body = String))
)]
pub(super) async fn explorer() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(EXPLORER_PAGE)
}

static EXPLORER_PAGE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/web/static/api-docs.html"
));

/// Documents the page's static files (`assets.rs`), so the document covers every served route.
struct PageFiles;

impl Modify for PageFiles {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for asset in assets::assets() {
            let media_type = asset
                .content_type
                .split(';')
                .next()
                .unwrap_or(asset.content_type)
                .trim();
            let schema = match media_type {
                "application/json" => ObjectBuilder::new().schema_type(SchemaType::AnyValue),
                "image/png" => ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type(media_type),
                _ => ObjectBuilder::new().schema_type(Type::String),
            };
            let operation = OperationBuilder::new()
                .tag("page")
                .summary(Some(format!("The page file {}", asset.path)))
                .operation_id(Some(format!(
                    "page_file{}",
                    asset.path.replace(['/', '.', '-'], "_")
                )))
                .response(
                    "200",
                    ResponseBuilder::new()
                        .description("The file (embedded in the engine)")
                        .content(
                            media_type,
                            ContentBuilder::new().schema(Some(schema)).build(),
                        ),
                )
                .build();
            openapi
                .paths
                .add_path_operation(asset.path, vec![HttpMethod::Get], operation);
        }
    }
}

/// Declares the bearer scheme and, for every operation, what `access.rs` requires of it: the
/// scope (as the security requirement's role, which OpenAPI 3.1 allows for any scheme), the
/// `401`/`403` answers and, for JSON bodies, `415`.
struct AccessRules;

const UNAUTHORIZED: &str = "Unauthorized";
const FORBIDDEN: &str = "Forbidden";
const NOT_JSON: &str = "UnsupportedMediaType";

fn error_response(description: &str, example: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ApiError")))
            .example(Some(serde_json::json!({ "error": example })))
            .build(),
    )
}

fn scope_note(scope: Option<&str>) -> String {
    match scope {
        None => "**Access:** open to anyone.".to_owned(),
        Some("read") => "**Access:** a token of the `read` scope (or `admin`), when read tokens \
                         are configured."
            .to_owned(),
        Some(scope) => format!(
            "**Access:** a token of the `{scope}` scope, when {scope} tokens are configured."
        ),
    }
}

impl Modify for AccessRules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token of the scope the operation names (`ingest`, `admin` or \
                         `read`), from `--ingest-tokens`, `--admin-tokens` or `--read-tokens`. \
                         An admin token also reads; a token listed under several scopes has all \
                         of them. A scope without tokens is open.",
                    ))
                    .build(),
            ),
        );
        let responses: [(&str, Response); 3] = [
            (
                UNAUTHORIZED,
                error_response(
                    "No token, or an unknown one (the scope has tokens configured)",
                    "this endpoint needs a token: send Authorization: Bearer <token>",
                )
                .header(
                    "WWW-Authenticate",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::String))
                        .description(Some("`Bearer`"))
                        .build(),
                )
                .build(),
            ),
            (
                FORBIDDEN,
                error_response(
                    "A valid token without the scope, or a request from an `Origin` that is \
                     neither the engine's own nor listed in `--allowed-origins`",
                    "this token lacks the admin scope",
                )
                .build(),
            ),
            (
                NOT_JSON,
                error_response(
                    "The body is not declared `Content-Type: application/json`",
                    "the body must be JSON: send Content-Type: application/json",
                )
                .build(),
            ),
        ];
        for (name, response) in responses {
            components
                .responses
                .insert(name.to_owned(), response.into());
        }

        for (path, item) in openapi.paths.paths.iter_mut() {
            // The scope table matches concrete paths: any value stands for a `{param}`.
            let concrete = path
                .split('/')
                .map(|s| if s.starts_with('{') { "x" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let operations = [
                (Method::GET, &mut item.get),
                (Method::POST, &mut item.post),
                (Method::PUT, &mut item.put),
                (Method::DELETE, &mut item.delete),
                (Method::PATCH, &mut item.patch),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    document_access(
                        operation,
                        access::documented_requirement(&method, &concrete),
                    );
                }
            }
        }
    }
}

fn document_access(operation: &mut Operation, (scope, json_body): (Option<&str>, bool)) {
    let reference = |name: &str| RefOr::Ref(Ref::from_response_name(name));
    let responses = &mut operation.responses.responses;
    match scope {
        Some(scope) => {
            operation.security = Some(vec![SecurityRequirement::new(BEARER, [scope])]);
            responses
                .entry("401".to_owned())
                .or_insert_with(|| reference(UNAUTHORIZED));
        }
        // An empty requirement: no credentials needed.
        None => operation.security = Some(vec![SecurityRequirement::default()]),
    }
    responses
        .entry("403".to_owned())
        .or_insert_with(|| reference(FORBIDDEN));
    if json_body {
        responses
            .entry("415".to_owned())
            .or_insert_with(|| reference(NOT_JSON));
    }
    let note = scope_note(scope);
    operation.description = Some(match operation.description.take() {
        Some(text) if !text.is_empty() => format!("{text}\n\n{note}"),
        _ => note,
    });
}
