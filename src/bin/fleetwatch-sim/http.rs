//! Talking to the engine's HTTP API: posting readings, and the client both senders share.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::{Client, StatusCode};
use tokio::task::JoinSet;

use crate::fleet::SimReading;
use crate::tally::Tally;

/// A request, including reading its response, that takes longer than this fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Response bodies are quoted in errors up to this many characters.
const MAX_QUOTED_BODY: usize = 500;

/// The HTTP client for the engine, with the connect timeout applied.
pub fn engine_client(connect_timeout: Duration) -> Result<Client> {
    Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot create the HTTP client")
}

/// `<base>/<path>` for a base URL given with or without a trailing slash.
pub fn api_url(base_url: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base_url.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Adds `Authorization: Bearer <token>` when there is a token.
pub fn with_token(
    request: reqwest::RequestBuilder,
    token: Option<&str>,
) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// Fails unless the engine answers `/api/health` within `timeout`.
pub async fn check_engine(client: &Client, base_url: &str, timeout: Duration) -> Result<()> {
    let url = api_url(base_url, "/api/health");
    let response = client
        .get(&url)
        .timeout(timeout)
        .send()
        .await
        .with_context(|| format!("cannot reach the engine at {base_url}"))?;
    if !response.status().is_success() {
        bail!(
            "the engine at {base_url} is unhealthy: {}",
            describe_response(response).await
        );
    }
    Ok(())
}

/// `"<status>: <body>"`, the body shortened, for error messages.
pub async fn describe_response(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| format!("(unreadable body: {e})"));
    let body: String = body.chars().take(MAX_QUOTED_BODY).collect();
    format!("{status}: {}", body.trim())
}

/// Posts readings to `/api/readings` in batches, with a bounded number of requests in flight.
pub struct HttpPublisher {
    client: Client,
    readings_url: String,
    /// Sent as `Authorization: Bearer` when set.
    token: Option<String>,
    batch_size: usize,
    batch: Vec<SimReading>,
    max_in_flight: usize,
    in_flight: JoinSet<()>,
    tally: Arc<Tally>,
}

impl HttpPublisher {
    /// Checks that the engine answers within `connect_timeout` before anything is sent.
    pub async fn connect(
        client: Client,
        base_url: &str,
        token: Option<&str>,
        batch_size: usize,
        max_in_flight: usize,
        connect_timeout: Duration,
        tally: Arc<Tally>,
    ) -> Result<Self> {
        check_engine(&client, base_url, connect_timeout).await?;
        let readings_url = api_url(base_url, "/api/readings");
        tracing::info!(url = %readings_url, batch_size, max_in_flight, "posting readings over HTTP");
        Ok(HttpPublisher {
            client,
            readings_url,
            token: token.map(str::to_owned),
            batch_size: batch_size.max(1),
            batch: Vec::with_capacity(batch_size),
            max_in_flight: max_in_flight.max(1),
            in_flight: JoinSet::new(),
            tally,
        })
    }

    /// Adds a reading to the current batch, posting the batch once it is full. Failed requests
    /// are counted, not returned: the next one may well succeed.
    pub async fn publish(&mut self, reading: SimReading) {
        self.batch.push(reading);
        if self.batch.len() >= self.batch_size {
            self.post_batch().await;
        }
    }

    /// Counts the requests that have already completed, without waiting.
    pub fn collect_responses(&mut self) {
        while self.in_flight.try_join_next().is_some() {}
    }

    /// Posts the last, partial batch and waits for every request to complete.
    pub async fn finish(mut self) {
        if !self.batch.is_empty() {
            self.post_batch().await;
        }
        while self.in_flight.join_next().await.is_some() {}
    }

    async fn post_batch(&mut self) {
        while self.in_flight.len() >= self.max_in_flight {
            self.in_flight.join_next().await;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
        let request = with_token(self.client.post(&self.readings_url), self.token.as_deref());
        let request = if let [reading] = batch.as_slice() {
            request.json(reading)
        } else {
            request.json(&batch)
        };
        let readings = batch.len() as u64;
        let tally = self.tally.clone();
        self.tally.record_sent(readings);
        self.in_flight.spawn(async move {
            match request.send().await {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    tally.record_confirmed(readings);
                }
                Ok(response) => tally.record_failed(readings, describe_response(response).await),
                Err(e) => tally.record_failed(readings, format!("request failed: {e}")),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_join_with_exactly_one_slash() {
        assert_eq!(
            api_url("http://127.0.0.1:8080", "/api/readings"),
            "http://127.0.0.1:8080/api/readings"
        );
        assert_eq!(
            api_url("http://127.0.0.1:8080/", "/api/readings"),
            "http://127.0.0.1:8080/api/readings"
        );
    }
}
