//! The live stream through Pushpin (GRIP): Pushpin holds the browsers' connections, and every
//! engine node publishes the global stream to it.
//!
//! * A request for the unfiltered stream that comes through Pushpin (it carries `Grip-Sig`), or
//!   any such request with `--grip`, is answered with the stored events after the client's
//!   position and the instructions to hold it: `Grip-Hold: stream` on the channel `fleetwatch`,
//!   whose `prev-id` is the last position sent, and a `Grip-Link` (`rel=next`) to the events
//!   after it. Filtered streams are served as plain SSE, which Pushpin passes through.
//! * Each node publishes every committed event of the global stream, in position order, to
//!   `--grip-publish-url`, one item per delivery: `id` is the position of its last event and
//!   `prev-id` the position of the one before its first. All nodes publish the same chain of
//!   positions, so Pushpin takes the first copy of each item and drops the others (their
//!   `prev-id` no longer matches); a node that dies leaves the others publishing. When an item
//!   does not follow what a connection last had (a publish was lost, Pushpin restarted), Pushpin
//!   fetches the `Grip-Link` and the store fills the gap.
//! * Positions are the SSE `id`s as without Pushpin, so `Last-Event-ID` resumes the same way.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use bytes::{BufMut, BytesMut};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::stream::frame;
use super::ApiError;
use crate::store::{EventStore, RecordedEvent};
use crate::subscription::Subscription;

/// The one channel of the unfiltered stream.
pub const CHANNEL: &str = "fleetwatch";
/// Events sent in one answer to Pushpin; it follows the next link for the rest.
const PAGE: usize = 1000;

/// Whether a stream request should be answered with GRIP instructions.
pub fn wanted(req: &HttpRequest, always: bool) -> bool {
    always || req.headers().contains_key("Grip-Sig")
}

/// The position Pushpin last had on the channel (`Grip-Last: fleetwatch; last-id=N`), when it
/// follows the next link.
fn grip_last(req: &HttpRequest) -> Option<u64> {
    let value = req.headers().get("Grip-Last")?.to_str().ok()?;
    value
        .split(',')
        .map(str::trim)
        .find(|entry| entry.starts_with(CHANNEL) && entry[CHANNEL.len()..].starts_with(';'))?
        .split(';')
        .find_map(|param| param.trim().strip_prefix("last-id="))?
        .trim()
        .parse()
        .ok()
}

/// The answer to a held stream: the stored events after the client's position (the one Pushpin
/// reports, else `resume`, else the head: from now), then hold it on [`CHANNEL`].
pub async fn hold(
    req: &HttpRequest,
    store: &dyn EventStore,
    resume: Option<u64>,
) -> Result<HttpResponse, ApiError> {
    let next_link = grip_last(req);
    let after = match next_link.or(resume) {
        Some(position) => position,
        None => store.head_position().await?,
    };
    let events = store.read_all(after, PAGE).await?;
    let last = events.last().map_or(after, |e| e.position);
    let mut body = BytesMut::new();
    if next_link.is_none() {
        body.put_slice(b"retry: 2000\n\n");
    }
    for event in &events {
        body.put_slice(&frame(event));
    }
    metrics::counter!("fleetwatch_sse_connections_total").increment(1);
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("Grip-Hold", "stream"))
        .insert_header(("Grip-Channel", format!("{CHANNEL}; prev-id={last}")))
        .insert_header(("Grip-Link", format!("</api/stream?since={last}>; rel=next")))
        .insert_header((
            "Grip-Keep-Alive",
            ": keep-alive\\n\\n; format=cstring; timeout=15",
        ))
        .body(body.freeze()))
}

/// One publish of `events` on [`CHANNEL`], following `previous` (the position before them).
fn item(events: &[RecordedEvent], previous: u64) -> serde_json::Value {
    let mut content = BytesMut::new();
    for event in events {
        content.put_slice(&frame(event));
    }
    let last = events.last().map_or(previous, |e| e.position);
    json!({
        "channel": CHANNEL,
        "id": last.to_string(),
        "prev-id": previous.to_string(),
        "formats": {"http-stream": {"content": String::from_utf8_lossy(&content)}},
    })
}

/// Publishes the global stream to Pushpin at `url` from the current head on, until `shutdown`.
pub fn spawn_publisher(
    store: std::sync::Arc<dyn EventStore>,
    url: String,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
        {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot publish to Pushpin");
                return;
            }
        };
        let mut previous = loop {
            match store.head_position().await {
                Ok(head) => break head,
                Err(_) => tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                },
            }
        };
        let mut subscription = Subscription::new(store, previous, PAGE);
        let mut failing = false;
        loop {
            let delivery = tokio::select! {
                delivery = subscription.next() => delivery,
                _ = shutdown.cancelled() => return,
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow the store to publish to Pushpin; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let events = delivery.events();
            let Some(last) = events.last().map(|e| e.position) else {
                continue;
            };
            let body = json!({"items": [item(events, previous)]});
            // A lost publish is not retried: the next one does not follow what Pushpin's
            // connections have, and Pushpin fetches the gap from the store (the next link).
            let published = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .and_then(|r| r.error_for_status());
            match published {
                Ok(_) if failing => {
                    tracing::info!("publishing to Pushpin again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    tracing::warn!(error = %e, %url, "cannot publish to Pushpin; its clients catch up from the store when it is back");
                    failing = true;
                }
                Err(_) => {}
            }
            metrics::counter!("fleetwatch_grip_published_total").increment(events.len() as u64);
            previous = last;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn grip_last_reads_the_channel_position() {
        let req = TestRequest::default()
            .insert_header(("Grip-Last", "other; last-id=3, fleetwatch; last-id=42"))
            .to_http_request();
        assert_eq!(grip_last(&req), Some(42));
        let other = TestRequest::default()
            .insert_header(("Grip-Last", "fleetwatchers; last-id=7"))
            .to_http_request();
        assert_eq!(grip_last(&other), None);
    }
}
