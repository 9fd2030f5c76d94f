//! Access control: bearer tokens with scopes, the `Origin` check, CORS for listed origins, JSON
//! content types, and short-lived tickets that authorise the live stream (browsers' `EventSource`
//! cannot send an `Authorization` header).
//!
//! Which request needs which scope is one table, [`requirement`]. A scope with no tokens
//! configured is open. An `admin` token also grants `read`; `ingest` is separate; a token listed
//! under several scopes has all of them.
//!
//! Middleware order (outermost first): [`check_origin`], CORS ([`Access::cors`]), [`authorize`].
//! So a foreign origin is refused before anything else, a listed one gets CORS headers on every
//! answer (its errors included), and a preflight is answered without a token.

use std::str::FromStr;

use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderName};
use actix_web::http::uri::{Authority, Uri};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

mod tickets;

use self::tickets::Tickets;
use super::{ApiError, AppState};
use crate::config::{Config, Secret};

/// The path that issues live-stream tickets, and the stream they open.
const TICKETS_PATH: &str = "/api/stream/tickets";
const STREAM_PATH: &str = "/api/stream";
const WEBHOOKS_PATH: &str = "/api/webhooks";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Post readings.
    Ingest,
    /// Zones, ranges: anything that changes configuration. Also grants `Read`.
    Admin,
    /// Everything else, the live stream included.
    Read,
}

/// What a request needs to get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Requirement {
    /// `None`: open to anyone.
    scope: Option<Scope>,
    /// The body must be `application/json` (415 otherwise).
    json_body: bool,
}

/// The scope table. Anything not listed needs `read` (GET) or `admin` (any other method), so a
/// new route is closed until it is placed here.
fn requirement(method: &Method, path: &str) -> Requirement {
    let need = |scope, json_body| Requirement {
        scope: Some(scope),
        json_body,
    };
    let is_rules = ["/api/zones", "/api/temperature-ranges"]
        .iter()
        .any(|base| {
            path.strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        });
    // URLs and secrets are configuration: reading them needs `admin` too.
    let is_webhooks = path == WEBHOOKS_PATH || path.starts_with("/api/webhooks/");
    match *method {
        Method::GET | Method::HEAD if is_webhooks => need(Scope::Admin, false),
        Method::POST if path == WEBHOOKS_PATH => need(Scope::Admin, true),
        Method::GET | Method::HEAD => {
            // Load balancers probe health; the page needs its settings (and its own files) to
            // learn that it must ask for a token.
            // The API's description and its explorer are open too, so the explorer loads
            // without a token (it then sends one, from its Authorize button).
            if path == "/api/health"
                || path == "/api/config"
                || path == super::openapi::DOCUMENT_PATH
                || path == super::openapi::EXPLORER_PATH
                || super::assets::is_asset(path)
            {
                Requirement {
                    scope: None,
                    json_body: false,
                }
            } else {
                need(Scope::Read, false)
            }
        }
        Method::POST if path == "/api/readings" => need(Scope::Ingest, true),
        Method::POST if path == TICKETS_PATH => need(Scope::Read, false),
        Method::POST | Method::PUT if is_rules => need(Scope::Admin, true),
        Method::PUT if path.ends_with("/offline-after") => need(Scope::Admin, true),
        _ => need(Scope::Admin, false),
    }
}

/// What the OpenAPI document says about a route, from the same table the middleware enforces:
/// the scope its token needs (`None`: open) and whether its body must be JSON.
pub(super) fn documented_requirement(method: &Method, path: &str) -> (Option<&'static str>, bool) {
    let need = requirement(method, path);
    (need.scope.map(scope_name), need.json_body)
}

/// Invalid access settings.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("--allowed-origins: {origin:?} is not an origin like https://host[:port] ({reason})")]
    InvalidOrigin { origin: String, reason: String },
    #[error("--grip-key: {0}")]
    InvalidGripKey(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denied {
    /// No token where one is required: 401.
    Missing,
    /// A token that is not configured (or an unknown or expired ticket): 401.
    Unknown,
    /// A valid token without the scope: 403.
    Lacking(Scope),
}

impl Denied {
    /// The `reason` label of `fleetwatch_http_refused_total`.
    fn reason(self) -> &'static str {
        match self {
            Denied::Missing => "missing_token",
            Denied::Unknown => "unknown_token",
            Denied::Lacking(_) => "scope",
        }
    }
}

/// The scopes one token has.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Grants {
    ingest: bool,
    admin: bool,
    read: bool,
}

impl Grants {
    fn any(self) -> bool {
        self.ingest || self.admin || self.read
    }

    fn has(self, scope: Scope) -> bool {
        match scope {
            Scope::Ingest => self.ingest,
            Scope::Admin => self.admin,
            Scope::Read => self.read || self.admin,
        }
    }
}

/// Configured tokens as SHA-256 hashes: comparing fixed-size hashes, against every entry, leaks
/// neither a token's content nor its length through timing.
#[derive(Default)]
struct TokenTable {
    entries: Vec<([u8; 32], Scope, String)>,
}

/// A configured token's name and secret: `night-shift:s3cret` is the token `s3cret` named
/// `night-shift` (a name is 1..=64 characters of `[A-Za-z0-9._-]`); a token without a name is
/// named by its scope and the start of its hash, which names it without revealing it.
fn token_name(token: &str, scope: Scope) -> (String, &str) {
    if let Some((name, secret)) = token.split_once(':') {
        let is_name = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if is_name && !secret.is_empty() {
            return (name.to_owned(), secret);
        }
    }
    let hash = sha256(token);
    let short: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    (format!("{}-{short}", scope_name(scope)), token)
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl TokenTable {
    fn add(&mut self, tokens: &[Secret], scope: Scope) {
        for token in tokens.iter().map(Secret::expose).filter(|t| !t.is_empty()) {
            let (name, token) = token_name(token, scope);
            self.entries.push((sha256(token), scope, name));
        }
    }

    fn requires(&self, scope: Scope) -> bool {
        self.entries.iter().any(|(_, s, _)| *s == scope)
    }

    /// The name of `token`, if it is one of the table's.
    fn name(&self, token: &str) -> Option<&str> {
        let hash = sha256(token);
        self.entries
            .iter()
            .find(|(entry, _, _)| bool::from(entry.ct_eq(&hash)))
            .map(|(_, _, name)| name.as_str())
    }

    /// Every entry is compared, whatever matched before.
    fn grants(&self, token: &str) -> Grants {
        let hash = sha256(token);
        let (mut ingest, mut admin, mut read) = (Choice::from(0), Choice::from(0), Choice::from(0));
        for (entry, scope, _) in &self.entries {
            let equal = entry.ct_eq(&hash);
            match scope {
                Scope::Ingest => ingest |= equal,
                Scope::Admin => admin |= equal,
                Scope::Read => read |= equal,
            }
        }
        Grants {
            ingest: ingest.into(),
            admin: admin.into(),
            read: read.into(),
        }
    }
}

/// Whether each scope needs a token: what `GET /api/config` tells the page.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct AuthRequired {
    pub read: bool,
    pub ingest: bool,
    pub admin: bool,
}

/// The access settings in force, shared by the middleware and the ticket endpoint.
pub struct Access {
    tokens: TokenTable,
    /// Pushpin's signing key (`--grip-key`), to recognise its next-link requests.
    grip_key: Option<jsonwebtoken::DecodingKey>,
    /// Normalised (`scheme://host[:port]`, default port left out).
    allowed_origins: Vec<String>,
    tickets: Tickets,
}

impl Access {
    pub fn from_config(config: &Config) -> Result<Self, AccessError> {
        let mut tokens = TokenTable::default();
        tokens.add(&config.ingest_tokens, Scope::Ingest);
        tokens.add(&config.admin_tokens, Scope::Admin);
        tokens.add(&config.read_tokens, Scope::Read);
        let allowed_origins = config
            .allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .map(|o| {
                parse_origin(o).map(|p| p.to_string()).map_err(|reason| {
                    AccessError::InvalidOrigin {
                        origin: o.to_owned(),
                        reason,
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            tokens,
            grip_key: config
                .grip_key
                .as_deref()
                .map(|key| jsonwebtoken::DecodingKey::from_secret(key.as_bytes()))
                .transpose()
                .map_err(|e| AccessError::InvalidGripKey(e.to_string()))?,
            allowed_origins,
            tickets: Tickets::new(config.stream_ticket_ttl),
        })
    }

    pub fn required(&self) -> AuthRequired {
        AuthRequired {
            read: self.tokens.requires(Scope::Read),
            ingest: self.tokens.requires(Scope::Ingest),
            admin: self.tokens.requires(Scope::Admin),
        }
    }

    /// Who sent a request (which the middleware has let through): its token's name, or
    /// `anonymous` without one.
    pub fn caller_name(&self, headers: &HeaderMap) -> String {
        bearer_token(headers)
            .ok()
            .flatten()
            .and_then(|token| self.tokens.name(token))
            .unwrap_or("anonymous")
            .to_owned()
    }

    fn check(&self, scope: Scope, token: Option<&str>) -> Result<(), Denied> {
        if !self.tokens.requires(scope) {
            return Ok(());
        }
        let grants = self.tokens.grants(token.ok_or(Denied::Missing)?);
        if grants.has(scope) {
            Ok(())
        } else if grants.any() {
            Err(Denied::Lacking(scope))
        } else {
            Err(Denied::Unknown)
        }
    }

    /// Checks a request for `scope`: its bearer token or, on the stream (`stream_query` is its
    /// query string), a ticket. The error says whether a ticket was tried.
    fn authorize(
        &self,
        scope: Scope,
        headers: &HeaderMap,
        stream_query: Option<&str>,
    ) -> Result<(), (Denied, bool)> {
        let bearer = bearer_token(headers).map_err(|d| (d, false))?;
        let ticket = match (bearer, stream_query) {
            (None, Some(query)) => web::Query::<TicketQuery>::from_query(query)
                .ok()
                .and_then(|q| q.into_inner().ticket),
            _ => None,
        };
        match ticket {
            Some(ticket) if self.tickets.is_valid(&ticket) => Ok(()),
            Some(_) => Err((Denied::Unknown, true)),
            None => self.check(scope, bearer).map_err(|d| (d, false)),
        }
    }

    /// Whether a stream request is Pushpin following a held stream's next link: it carries
    /// `Grip-Last` and a `Grip-Sig` signed with `--grip-key` (HS256, issuer `pushpin`, not
    /// expired). Pushpin held that stream for a client whose token it forwarded the first time.
    fn is_pushpin_next_link(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.grip_key else {
            return false;
        };
        if !headers.contains_key("Grip-Last") {
            return false;
        }
        let Some(signature) = headers.get("Grip-Sig").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["pushpin"]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        jsonwebtoken::decode::<serde_json::Value>(signature, key, &validation).is_ok()
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Ok(parsed) = parse_origin(origin) else {
            return false;
        };
        host.is_some_and(|h| parsed.is_served_at(h))
            || self.allowed_origins.contains(&parsed.to_string())
    }

    /// CORS headers and preflight answers for the listed origins only; other origins get none
    /// (and [`check_origin`] has refused them already).
    pub fn cors(&self) -> Cors {
        let mut cors = Cors::default()
            .allowed_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allowed_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("last-event-id"),
            ])
            .max_age(3600)
            .block_on_origin_mismatch(false);
        for origin in &self.allowed_origins {
            cors = cors.allowed_origin(origin);
        }
        cors
    }
}

/// A browser origin: scheme, lower-case host, and port when it is not the scheme's default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        if self.port != default_port(&self.scheme) {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

impl Origin {
    /// Whether a page of this origin is served by the engine that saw this `Host` header. The
    /// scheme is not compared (TLS may end in a proxy in front of the engine); a `Host` without
    /// a port means the default port of the origin's scheme.
    fn is_served_at(&self, host_header: &str) -> bool {
        let Ok(host) = Authority::from_str(host_header.trim()) else {
            return false;
        };
        host.host().eq_ignore_ascii_case(&self.host)
            && host.port_u16().unwrap_or(default_port(&self.scheme)) == self.port
    }
}

fn parse_origin(text: &str) -> Result<Origin, String> {
    let uri = Uri::from_str(text).map_err(|e| e.to_string())?;
    let scheme = uri
        .scheme_str()
        .map(str::to_ascii_lowercase)
        .filter(|s| s == "http" || s == "https")
        .ok_or("the scheme must be http or https")?;
    let authority = uri.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("user info is not part of an origin".to_owned());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("an origin has no path or query".to_owned());
    }
    Ok(Origin {
        port: authority.port_u16().unwrap_or(default_port(&scheme)),
        host: authority.host().to_ascii_lowercase(),
        scheme,
    })
}

/// The bearer token of an `Authorization` header; another scheme, or a malformed header, is an
/// unknown token rather than none, so it is not mistaken for an anonymous request.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, Denied> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| Denied::Unknown)?;
    match value.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(Denied::Unknown),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn refusal(denied: Denied, ticket: bool) -> ApiError {
    match denied {
        Denied::Missing => ApiError::unauthorized(
            "this endpoint needs a token: send Authorization: Bearer <token>",
        ),
        Denied::Unknown if ticket => ApiError::unauthorized(
            "unknown or expired stream ticket: get a new one from POST /api/stream/tickets",
        ),
        Denied::Unknown => ApiError::unauthorized("unknown token"),
        Denied::Lacking(scope) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this token lacks the {} scope", scope_name(scope)),
        ),
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Ingest => "ingest",
        Scope::Admin => "admin",
        Scope::Read => "read",
    }
}

fn access_of(req: &ServiceRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the access settings are missing",
            )
        })
}

/// Refuses (403) a request whose `Origin` is neither the engine's own nor listed. Requests
/// without `Origin` (curl, devices, same-origin GETs) pass.
pub async fn check_origin(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let state = access_of(&req)?;
        // The Host header, not the proxy-settable X-Forwarded-Host; HTTP/2 sends :authority.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let origin = origin.to_str().unwrap_or("(not text)");
        if !state.access.origin_allowed(origin, host) {
            metrics::counter!("fleetwatch_http_refused_total", "reason" => "origin").increment(1);
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("requests from origin {origin} are not allowed (see --allowed-origins)"),
            )
            .into());
        }
    }
    next.call(req).await
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

/// Checks the token (or, on the stream, the ticket) against the scope table, then the body's
/// content type.
pub async fn authorize(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = access_of(&req)?;
    // The path routing uses (percent-decoded the same way), so the table sees what routes see.
    let path = req.match_info().as_str();
    let need = requirement(req.method(), path);
    // An open scope ignores whatever credentials come along.
    if let Some(scope) = need.scope.filter(|s| state.access.tokens.requires(*s)) {
        let is_stream = path == STREAM_PATH && req.method() == Method::GET;
        let pushpin = is_stream && state.access.is_pushpin_next_link(req.headers());
        let authorized = if pushpin {
            Ok(())
        } else {
            state
                .access
                .authorize(scope, req.headers(), is_stream.then(|| req.query_string()))
        };
        authorized.map_err(|(denied, ticket)| {
            metrics::counter!("fleetwatch_http_refused_total", "reason" => denied.reason())
                .increment(1);
            refusal(denied, ticket)
        })?;
    }
    if need.json_body && !is_json(req.headers()) {
        metrics::counter!("fleetwatch_http_refused_total", "reason" => "content_type").increment(1);
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON: send Content-Type: application/json",
        )
        .into());
    }
    next.call(req).await
}

/// A live-stream ticket.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"ticket": "9f0c2d7e4b1a8c3f6e5d0a9b8c7d6e5f", "expires_in": 60}))]
struct TicketView {
    /// Opens `GET /api/stream?ticket=...` until it expires, as often as needed; it grants
    /// nothing else.
    ticket: String,
    /// Seconds it stays valid (`--stream-ticket-ttl`).
    expires_in: u64,
}

/// Issues a short-lived ticket that opens the live stream (read scope).
///
/// Browsers' `EventSource` cannot send an `Authorization` header: the page gets a ticket with its
/// token and opens `GET /api/stream?ticket=...` with it. A ticket in a URL shows in request logs,
/// which is why it is short-lived and grants reading the stream only.
#[utoipa::path(
    post,
    path = "/api/stream/tickets",
    tag = "live stream",
    responses(
        (status = 201, description = "A new ticket", body = TicketView,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 503, description = "Too many live tickets are valid; retry once some expire", body = ApiError),
    )
)]
pub(super) async fn issue_ticket(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let ticket = state.access.tickets.issue().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live stream tickets; retry in a minute",
        )
    })?;
    Ok(HttpResponse::Created()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(TicketView {
            ticket,
            expires_in: state.access.tickets.ttl().as_secs(),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(ingest: &[&str], admin: &[&str], read: &[&str], origins: &[&str]) -> Access {
        let secrets = |v: &[&str]| v.iter().map(|t| Secret::new(*t)).collect::<Vec<_>>();
        let mut tokens = TokenTable::default();
        tokens.add(&secrets(ingest), Scope::Ingest);
        tokens.add(&secrets(admin), Scope::Admin);
        tokens.add(&secrets(read), Scope::Read);
        Access {
            tokens,
            grip_key: None,
            allowed_origins: origins
                .iter()
                .map(|o| parse_origin(o).unwrap().to_string())
                .collect(),
            tickets: Tickets::new(std::time::Duration::from_secs(60)),
        }
    }

    #[test]
    fn the_scope_table_places_every_route() {
        let scope = |m: Method, p: &str| requirement(&m, p);
        let open = Requirement {
            scope: None,
            json_body: false,
        };
        let need = |s, json_body| Requirement {
            scope: Some(s),
            json_body,
        };
        assert_eq!(scope(Method::GET, "/api/health"), open);
        assert_eq!(scope(Method::GET, "/api/config"), open);
        assert_eq!(scope(Method::GET, "/api/openapi.json"), open);
        assert_eq!(scope(Method::GET, "/api/docs"), open);
        assert_eq!(scope(Method::GET, "/api/docs/swagger-ui-bundle.js"), open);
        assert_eq!(
            scope(Method::GET, "/api/docs/elsewhere"),
            need(Scope::Read, false),
            "only the explorer's own files are open"
        );
        assert_eq!(scope(Method::GET, "/"), open);
        assert_eq!(scope(Method::GET, "/static/app.js"), open);
        assert_eq!(
            scope(Method::POST, "/api/readings"),
            need(Scope::Ingest, true)
        );
        assert_eq!(scope(Method::POST, "/api/zones"), need(Scope::Admin, true));
        assert_eq!(
            scope(Method::PUT, "/api/zones/depot"),
            need(Scope::Admin, true)
        );
        assert_eq!(
            scope(Method::DELETE, "/api/zones/depot"),
            need(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::POST, "/api/temperature-ranges"),
            need(Scope::Admin, true)
        );
        assert_eq!(
            scope(Method::PUT, "/api/temperature-ranges/cold"),
            need(Scope::Admin, true)
        );
        assert_eq!(scope(Method::GET, "/api/zones"), need(Scope::Read, false));
        assert_eq!(
            scope(Method::GET, "/api/devices/x/events"),
            need(Scope::Read, false)
        );
        assert_eq!(scope(Method::GET, "/api/stream"), need(Scope::Read, false));
        assert_eq!(scope(Method::POST, TICKETS_PATH), need(Scope::Read, false));
        assert_eq!(scope(Method::GET, "/metrics"), need(Scope::Read, false));
        assert_eq!(
            scope(Method::GET, "/api/failed-messages"),
            need(Scope::Read, false)
        );
        // Webhooks hold URLs and secrets: configuration, even to read.
        assert_eq!(
            scope(Method::GET, "/api/webhooks"),
            need(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::GET, "/api/webhooks/abc"),
            need(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::POST, "/api/webhooks"),
            need(Scope::Admin, true)
        );
        assert_eq!(
            scope(Method::DELETE, "/api/webhooks/abc"),
            need(Scope::Admin, false)
        );
        // Closed by default: unknown reads need read, unknown writes admin.
        assert_eq!(scope(Method::GET, "/api/unknown"), need(Scope::Read, false));
        assert_eq!(
            scope(Method::GET, "//api/devices"),
            need(Scope::Read, false)
        );
        assert_eq!(
            scope(Method::POST, "/api/readings/"),
            need(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::POST, "/api/zonesx"),
            need(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::PATCH, "/api/readings"),
            need(Scope::Admin, false)
        );
    }

    #[test]
    fn scopes_follow_the_tokens() {
        let a = access(&["ing", "both"], &["adm"], &["rd", "both"], &[]);
        assert_eq!(a.check(Scope::Ingest, Some("ing")), Ok(()));
        assert_eq!(
            a.check(Scope::Ingest, Some("rd")),
            Err(Denied::Lacking(Scope::Ingest))
        );
        assert_eq!(
            a.check(Scope::Ingest, Some("adm")),
            Err(Denied::Lacking(Scope::Ingest))
        );
        assert_eq!(
            a.check(Scope::Read, Some("adm")),
            Ok(()),
            "admin grants read"
        );
        assert_eq!(
            a.check(Scope::Admin, Some("rd")),
            Err(Denied::Lacking(Scope::Admin))
        );
        assert_eq!(
            a.check(Scope::Read, Some("ing")),
            Err(Denied::Lacking(Scope::Read))
        );
        assert_eq!(a.check(Scope::Read, Some("both")), Ok(()));
        assert_eq!(a.check(Scope::Ingest, Some("both")), Ok(()));
        assert_eq!(a.check(Scope::Read, None), Err(Denied::Missing));
        assert_eq!(a.check(Scope::Read, Some("nope")), Err(Denied::Unknown));
        assert_eq!(a.check(Scope::Read, Some("")), Err(Denied::Unknown));
        assert_eq!(a.check(Scope::Read, Some("rd ")), Err(Denied::Unknown));
    }

    #[test]
    fn a_scope_without_tokens_is_open() {
        let a = access(&[], &["adm", ""], &[], &[]);
        assert_eq!(a.check(Scope::Read, None), Ok(()));
        assert_eq!(a.check(Scope::Ingest, Some("whatever")), Ok(()));
        assert_eq!(a.check(Scope::Admin, None), Err(Denied::Missing));
        assert_eq!(
            a.check(Scope::Admin, Some("")),
            Err(Denied::Unknown),
            "an empty entry is no token"
        );
        let required = a.required();
        assert!(required.admin && !required.read && !required.ingest);
    }

    #[test]
    fn origins_are_the_engines_own_or_listed() {
        let a = access(
            &[],
            &[],
            &[],
            &["https://ops.example.com", "http://localhost:3000/"],
        );
        let host = Some("127.0.0.1:8080");
        assert!(a.origin_allowed("http://127.0.0.1:8080", host));
        assert!(
            a.origin_allowed("https://127.0.0.1:8080", host),
            "scheme-insensitive"
        );
        assert!(!a.origin_allowed("http://127.0.0.1:8081", host));
        assert!(!a.origin_allowed("http://evil.example", host));
        assert!(!a.origin_allowed("null", host));
        assert!(!a.origin_allowed("http://127.0.0.1:8080", None));
        assert!(a.origin_allowed("https://ops.example.com", host));
        assert!(a.origin_allowed("https://OPS.example.com:443", host));
        assert!(
            !a.origin_allowed("http://ops.example.com", host),
            "another scheme"
        );
        assert!(a.origin_allowed("http://localhost:3000", host));
        assert!(!a.origin_allowed("http://localhost:3001", host));
        // Default ports: a Host without one means the origin scheme's default.
        assert!(a.origin_allowed("https://fleet.example", Some("fleet.example")));
        assert!(a.origin_allowed("http://fleet.example", Some("Fleet.Example:80")));
        assert!(!a.origin_allowed("http://fleet.example", Some("fleet.example:8080")));
        assert!(!a.origin_allowed("http://fleet.example.evil", Some("fleet.example")));
        assert!(a.origin_allowed("http://[::1]:8080", Some("[::1]:8080")));
    }

    #[test]
    fn listed_origins_must_be_origins() {
        for bad in [
            "*",
            "ops.example.com",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "null",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(
            parse_origin("HTTPS://Ops.Example.com:443")
                .unwrap()
                .to_string(),
            "https://ops.example.com"
        );
        assert_eq!(
            parse_origin("http://localhost:3000/").unwrap().to_string(),
            "http://localhost:3000"
        );
    }

    #[test]
    fn bearer_tokens_and_json_media_types_are_recognised() {
        let headers = |pairs: &[(HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(k.clone(), v.parse().unwrap());
            }
            map
        };
        let auth = |v: &str| headers(&[(header::AUTHORIZATION, v)]);
        assert_eq!(bearer_token(&auth("Bearer abc")), Ok(Some("abc")));
        assert_eq!(bearer_token(&auth("bearer  abc ")), Ok(Some("abc")));
        assert_eq!(bearer_token(&auth("Basic YTpi")), Err(Denied::Unknown));
        assert_eq!(bearer_token(&HeaderMap::new()), Ok(None));
        let ct = |v: &str| is_json(&headers(&[(header::CONTENT_TYPE, v)]));
        assert!(ct("application/json"));
        assert!(ct("Application/JSON; charset=utf-8"));
        assert!(!ct("text/plain"));
        assert!(!ct("application/jsonp"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn the_stream_takes_a_ticket_or_a_bearer_token() {
        let a = access(&["ing"], &[], &["rd"], &[]);
        let ticket = a.tickets.issue().unwrap();
        let none = HeaderMap::new();
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, "Bearer rd".parse().unwrap());
        let query = format!("since=3&ticket={ticket}");
        assert_eq!(a.authorize(Scope::Read, &none, Some(&query)), Ok(()));
        assert_eq!(a.authorize(Scope::Read, &bearer, Some("since=3")), Ok(()));
        assert_eq!(
            a.authorize(Scope::Read, &none, Some("ticket=rd")),
            Err((Denied::Unknown, true)),
            "the token is no ticket"
        );
        assert_eq!(
            a.authorize(Scope::Read, &none, Some("since=3")),
            Err((Denied::Missing, false))
        );
        assert_eq!(
            a.authorize(Scope::Read, &none, None),
            Err((Denied::Missing, false)),
            "tickets only where the caller allows them (the stream)"
        );
    }
}
