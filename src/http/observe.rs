//! `fleetwatch_http_request_duration_seconds`: how long each HTTP request took, by method, route
//! pattern and status class. Labels come from fixed sets only (a pattern such as
//! `/api/devices/{id}`, never the raw path), so a client cannot grow the number of series.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use metrics::SharedString;

/// Records the time until the response head is ready. Wrapped outermost, so requests refused by
/// the access checks (which answer with an error) are measured too.
pub async fn request_duration(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = method_label(req.method());
    // Looked up before the call: a refusal by the access checks comes back as an error, without
    // the request. `None` for paths no route matches (the JSON 404).
    let route = match req.match_pattern() {
        Some(pattern) => SharedString::from(pattern),
        None => SharedString::const_str("unmatched"),
    };
    let result = next.call(req).await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    metrics::histogram!(
        "fleetwatch_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => status_class(status),
    )
    .record(started.elapsed().as_secs_f64());
    result
}

/// The standard methods by name; anything else is `other` (a method is any token a client sends).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(status_class(StatusCode::ACCEPTED), "2xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }
}
