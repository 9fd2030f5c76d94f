//! The live stream through Pushpin (GRIP): Pushpin holds the browsers' connections, and every
//! engine node publishes the global stream to it.
//!
//! * A request for the unfiltered stream that comes through Pushpin (it carries `Grip-Sig`), or
//!   any such request with `--grip`, is answered with the stored events after the client's
//!   position and the instructions to hold it: `Grip-Hold: stream` on the channel `fleetwatch`,
//!   whose `prev-id` is the last position sent, and a `Grip-Link` (`rel=next`) to the events
//!   after it.
//! * A stream filtered on devices only (`devices=a,b`, at most [`MAX_HELD_DEVICES`]) is held on a
//!   channel per stream, `fleetwatch.stream.<device>` and `fleetwatch.system.rules` (a devices
//!   filter lets zone and range changes through), whose ids are the stream's versions: contiguous
//!   per stream and the same on every node. Other filters (`zones`, `types`) do not map onto
//!   channels whose ids every node agrees on, and are served as plain SSE, which Pushpin passes
//!   through.
//! * Each node publishes every committed event of the global stream, in position order, to
//!   `--grip-publish-url`, one item per delivery: `id` is the position of its last event and
//!   `prev-id` the position of the one before its first. The same delivery goes out per stream
//!   too, with versions as ids. All nodes publish the same chain of
//!   positions, so Pushpin takes the first copy of each item and drops the others (their
//!   `prev-id` no longer matches); a node that dies leaves the others publishing. When an item
//!   does not follow what a connection last had (a publish was lost, Pushpin restarted), Pushpin
//!   fetches the `Grip-Link` and the store fills the gap.
//! * Positions are the SSE `id`s as without Pushpin, so `Last-Event-ID` resumes the same way.

use std::collections::{HashMap, HashSet};
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
/// Most devices a held filtered stream may name (its channels go in one header); a stream naming
/// more is served as plain SSE.
pub const MAX_HELD_DEVICES: usize = 100;
/// Stored events a filtered stream's first answer reads through before it is held; a longer
/// backlog is served as plain SSE, whose catch-up has no such bound.
const CATCH_UP_BUDGET: usize = 10 * PAGE;

/// The channel of one stream's events, whose ids are the stream's versions: `fleetwatch.stream.<id>`
/// for a device, `fleetwatch.system.rules` for `$rules` (device ids have no `$`).
fn stream_channel(stream: &str) -> String {
    match stream.strip_prefix('$') {
        Some(system) => format!("{CHANNEL}.system.{system}"),
        None => format!("{CHANNEL}.stream.{stream}"),
    }
}

/// Whether a stream request should be answered with GRIP instructions.
pub fn wanted(req: &HttpRequest, always: bool) -> bool {
    always || req.headers().contains_key("Grip-Sig")
}

/// The id Pushpin last had on each channel (`Grip-Last: fleetwatch; last-id=N`), when it follows
/// the next link: one header per channel, or several channels in one, comma-separated.
fn grip_last(req: &HttpRequest) -> HashMap<String, u64> {
    req.headers()
        .get_all("Grip-Last")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| {
            let mut params = entry.split(';').map(str::trim);
            let channel = params.next()?;
            let id = params.find_map(|param| param.strip_prefix("last-id="))?;
            Some((channel.to_owned(), id.trim().parse().ok()?))
        })
        .collect()
}

/// A held stream's answer: `events`, then the instructions to hold it on `channels` (each with
/// its `prev-id`) and the link to follow for what comes after `link_since`.
fn held(
    events: &[RecordedEvent],
    channels: &[(String, u64)],
    link: String,
    first: bool,
) -> HttpResponse {
    let mut body = BytesMut::new();
    if first {
        body.put_slice(b"retry: 2000\n\n");
    }
    for event in events {
        body.put_slice(&frame(event));
    }
    let channels: Vec<String> = channels
        .iter()
        .map(|(channel, prev)| format!("{channel}; prev-id={prev}"))
        .collect();
    metrics::counter!("fleetwatch_sse_connections_total").increment(1);
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("Grip-Hold", "stream"))
        .insert_header(("Grip-Channel", channels.join(", ")))
        .insert_header(("Grip-Link", format!("<{link}>; rel=next")))
        .insert_header((
            "Grip-Keep-Alive",
            ": keep-alive\\n\\n; format=cstring; timeout=15",
        ))
        .body(body.freeze())
}

/// The answer to a held stream: the stored events after the client's position (the one Pushpin
/// reports, else `resume`, else the head: from now), then hold it on [`CHANNEL`].
pub async fn hold(
    req: &HttpRequest,
    store: &dyn EventStore,
    resume: Option<u64>,
) -> Result<HttpResponse, ApiError> {
    let next_link = grip_last(req).get(CHANNEL).copied();
    let after = match next_link.or(resume) {
        Some(position) => position,
        None => store.head_position().await?,
    };
    let events = store.read_all(after, PAGE).await?;
    let last = events.last().map_or(after, |e| e.position);
    Ok(held(
        &events,
        &[(CHANNEL.to_owned(), last)],
        format!("/api/stream?since={last}"),
        next_link.is_none(),
    ))
}

/// A stream filtered on `devices`, held on their streams' channels and `$rules`'s: the events
/// after the client's position, or after what Pushpin reports it has on each channel. `None`
/// when the backlog is longer than [`CATCH_UP_BUDGET`]: then it is served as plain SSE.
pub async fn hold_devices(
    req: &HttpRequest,
    store: &dyn EventStore,
    resume: Option<u64>,
    devices: &HashSet<String>,
) -> Result<Option<HttpResponse>, ApiError> {
    let mut streams: Vec<String> = devices.iter().cloned().collect();
    streams.push(crate::rules::RULES_STREAM.to_owned());
    streams.sort();
    streams.dedup();
    let last_ids = grip_last(req);
    let recovering = streams
        .iter()
        .any(|s| last_ids.contains_key(&stream_channel(s)));
    tracing::debug!(
        ?last_ids,
        recovering,
        ?resume,
        "held stream filtered on devices"
    );
    let caught_up = if recovering {
        after_versions(store, &streams, &last_ids).await?
    } else {
        match after_position(store, &streams, resume).await? {
            Some(caught_up) => caught_up,
            None => return Ok(None),
        }
    };
    let last = caught_up.until.max(resume.unwrap_or(0));
    let mut list: Vec<&str> = devices.iter().map(String::as_str).collect();
    list.sort_unstable();
    let channels: Vec<(String, u64)> = streams
        .iter()
        .map(|s| (stream_channel(s), caught_up.versions[s]))
        .collect();
    tracing::debug!(?channels, sent = caught_up.events.len(), "held on");
    Ok(Some(held(
        &caught_up.events,
        &channels,
        // `%2C`: a comma would end the link in Pushpin's reading of the header.
        format!("/api/stream?devices={}&since={last}", list.join("%2C")),
        !recovering,
    )))
}

/// Events to send, each stream's version once the client has them, and the global position
/// they bring the client to.
struct CaughtUp {
    events: Vec<RecordedEvent>,
    versions: HashMap<String, u64>,
    until: u64,
}

/// The streams' events after the global position `resume` (none: from now), read through the
/// global stream until it is caught up. A stream none of whose events are read is at the version
/// it had before the read began: any event of it committed since would have been read.
async fn after_position(
    store: &dyn EventStore,
    streams: &[String],
    resume: Option<u64>,
) -> Result<Option<CaughtUp>, ApiError> {
    let mut versions = HashMap::new();
    for stream in streams {
        versions.insert(
            stream.clone(),
            store.stream_version(stream).await?.unwrap_or(0),
        );
    }
    let mut after = match resume {
        Some(position) => position,
        None => store.head_position().await?,
    };
    let mut events = Vec::new();
    let mut read = 0;
    loop {
        let page = store.read_all(after, PAGE).await?;
        let full = page.len() == PAGE;
        read += page.len();
        for event in page {
            after = event.position;
            if let Some(version) = versions.get_mut(&event.stream) {
                *version = event.version;
                events.push(event);
            }
        }
        if !full {
            return Ok(Some(CaughtUp {
                events,
                versions,
                until: after,
            }));
        }
        if read >= CATCH_UP_BUDGET {
            return Ok(None);
        }
    }
}

/// Each stream's events after the version Pushpin reports it has on the stream's channel, in
/// global order, up to where every stream's read is complete.
async fn after_versions(
    store: &dyn EventStore,
    streams: &[String],
    last_ids: &HashMap<String, u64>,
) -> Result<CaughtUp, ApiError> {
    let mut versions = HashMap::new();
    let mut events = Vec::new();
    // Past the last event of a stream whose read was cut at PAGE, other streams' events could
    // overtake events of it not read yet: the answer stops there.
    let mut complete_until = u64::MAX;
    for stream in streams {
        let from = match last_ids.get(&stream_channel(stream)) {
            Some(version) => *version,
            None => store.stream_version(stream).await?.unwrap_or(0),
        };
        versions.insert(stream.clone(), from);
        let read = store.read_stream(stream, from + 1, PAGE).await?;
        if read.len() == PAGE {
            if let Some(last) = read.last() {
                complete_until = complete_until.min(last.position);
            }
        }
        events.extend(read);
    }
    events.retain(|e| e.position <= complete_until);
    events.sort_by_key(|e| e.position);
    for event in &events {
        versions.insert(event.stream.clone(), event.version);
    }
    let until = events.last().map_or(0, |e| e.position);
    Ok(CaughtUp {
        events,
        versions,
        until,
    })
}

/// One publish on `channel` of `events`, as `id` following `previous`.
fn item<'a>(
    channel: &str,
    events: impl Iterator<Item = &'a RecordedEvent>,
    id: u64,
    previous: u64,
) -> serde_json::Value {
    let mut content = BytesMut::new();
    for event in events {
        content.put_slice(&frame(event));
    }
    json!({
        "channel": channel,
        "id": id.to_string(),
        "prev-id": previous.to_string(),
        "formats": {"http-stream": {"content": String::from_utf8_lossy(&content)}},
    })
}

/// What one delivery is published as: one item on [`CHANNEL`] following `previous` (the
/// position before it), and one per run of consecutive events of one stream on that stream's
/// channel, following the version before it. Items go out in position order, so a client held
/// on several streams' channels gets their events in global order too, and its `Last-Event-ID`
/// never passes an event it has not had.
fn items(events: &[RecordedEvent], previous: u64) -> Vec<serde_json::Value> {
    let last = events.last().map_or(previous, |e| e.position);
    let mut items = vec![item(CHANNEL, events.iter(), last, previous)];
    for run in events.chunk_by(|a, b| a.stream == b.stream) {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            continue;
        };
        items.push(item(
            &stream_channel(&first.stream),
            run.iter(),
            last.version,
            first.version.saturating_sub(1),
        ));
    }
    items
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
            let body = json!({"items": items(events, previous)});
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
    fn grip_last_reads_one_header_per_channel() {
        let req = TestRequest::default()
            .append_header(("Grip-Last", "fleetwatch.stream.d-1; last-id=7"))
            .append_header(("Grip-Last", "fleetwatch.system.rules; last-id=2"))
            .to_http_request();
        let last = grip_last(&req);
        assert_eq!(last.get("fleetwatch.stream.d-1"), Some(&7));
        assert_eq!(last.get("fleetwatch.system.rules"), Some(&2));
    }

    #[test]
    fn grip_last_reads_every_channels_id() {
        let req = TestRequest::default()
            .insert_header((
                "Grip-Last",
                "other; last-id=3, fleetwatch; last-id=42, fleetwatch.stream.d-1; last-id=7",
            ))
            .to_http_request();
        let last = grip_last(&req);
        assert_eq!(last.get(CHANNEL), Some(&42));
        assert_eq!(last.get("fleetwatch.stream.d-1"), Some(&7));
        assert_eq!(last.get("fleetwatch.stream.d-2"), None);
        let other = TestRequest::default()
            .insert_header(("Grip-Last", "fleetwatchers; last-id=7"))
            .to_http_request();
        assert_eq!(grip_last(&other).get(CHANNEL), None);
    }

    #[test]
    fn a_delivery_is_published_on_the_global_channel_and_per_stream() {
        let event = |position: u64, stream: &str, version: u64| RecordedEvent {
            position,
            stream: stream.into(),
            version,
            event_type: "Test".into(),
            schema_version: 1,
            recorded_at: chrono::Utc::now(),
            at: None,
            payload: bytes::Bytes::from_static(b"{}"),
        };
        let events = [event(11, "a", 4), event(12, "b", 1), event(13, "a", 5)];
        let items = items(&events, 10);
        let summary: Vec<(String, String, String)> = items
            .iter()
            .map(|i| {
                (
                    i["channel"].as_str().unwrap().to_owned(),
                    i["id"].as_str().unwrap().to_owned(),
                    i["prev-id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected = [
            ("fleetwatch", "13", "10"),
            ("fleetwatch.stream.a", "4", "3"),
            ("fleetwatch.stream.b", "1", "0"),
            ("fleetwatch.stream.a", "5", "4"),
        ]
        .map(|(c, i, p)| (c.to_owned(), i.to_owned(), p.to_owned()));
        assert_eq!(summary, expected, "in position order");
        let content = |i: usize| {
            items[i]["formats"]["http-stream"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(content(0).starts_with("id: 11\n") && content(0).contains("id: 13\n"));
        assert!(content(1).starts_with("id: 11\n") && !content(1).contains("id: 13"));
        assert!(content(3).starts_with("id: 13\n"));
    }
}
