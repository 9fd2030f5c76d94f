//! Monitoring the way users wire it: every metric the provisioned Grafana dashboard
//! (`deploy/grafana/dashboards/fleetwatch.json`) queries is exported on `/metrics` by the real
//! engine, with its `HELP` line, and the latency histograms have buckets.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::amqp::eventually;
use common::sse::{Next, SseReader};
use common::*;
use serde_json::{json, Value};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/dashboards/fleetwatch.json"
);

/// What the issue asks the dashboard to show, by the metric behind each.
const REQUIRED: &[&str] = &[
    "fleetwatch_ingest_durable_seconds",
    "fleetwatch_store_commit_seconds",
    "fleetwatch_http_request_duration_seconds",
    "fleetwatch_readings_in_flight",
    "fleetwatch_sse_open_streams",
    "fleetwatch_active_devices",
    "fleetwatch_amqp_dead_lettered_total",
    "fleetwatch_store_available",
];

/// The histograms whose buckets the dashboard's quantiles are computed from.
const HISTOGRAMS: &[&str] = &[
    "fleetwatch_ingest_durable_seconds",
    "fleetwatch_store_commit_seconds",
    "fleetwatch_http_request_duration_seconds",
];

/// Every PromQL expression (`expr`) anywhere in the dashboard: panels, rows' nested panels,
/// template variables.
fn expressions(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => expressions(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, found)),
        _ => {}
    }
}

/// PromQL words that are never metric names.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects: every identifier that is not a function or
/// aggregation (followed by `(`, or by `by (...)`/`without (...)`), a keyword, a label name in `by (...)`-like groupings, or inside
/// a label matcher `{...}`, a range `[...]`, a string, or a Grafana variable (`$__rate_interval`).
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // Set after `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`: the next `(...)`
    // holds label names.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                // Label values in matchers are strings, and may hold the closing bracket.
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_next => {
                labels_next = false;
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '{' | '}'))
                {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number, with any exponent or duration unit glued to it (`1e3`, `5m`).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let rest: String = chars[i..].iter().collect();
                let rest = rest.trim_start();
                let lower = word.to_ascii_lowercase();
                // `sum by (le) (...)`: an aggregation's grouping may come before its `(`.
                let grouping = ["by", "without"].iter().any(|g| {
                    rest.strip_prefix(g)
                        .is_some_and(|r| r.trim_start().starts_with('('))
                });
                if KEYWORDS.contains(&lower.as_str()) {
                    labels_next = matches!(
                        lower.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    ) && rest.starts_with('(');
                } else if !rest.starts_with('(') && !grouping {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The metric a series name belongs to on `/metrics`: a histogram's `_bucket`, `_sum` and
/// `_count` series are its own, and only a histogram's (a counter may end in `_count` too).
fn exported_metric(series: &str, text: &str) -> String {
    let is_histogram = |name: &str| {
        text.lines()
            .any(|l| l == format!("# TYPE {name} histogram"))
    };
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if is_histogram(base) {
                return base.to_owned();
            }
        }
    }
    series.to_owned()
}

/// Whether `/metrics` has at least one sample line of `series`.
fn has_series(text: &str, series: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(series)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

async fn scrape(engine: &Engine) -> String {
    let response = engine
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    response.text().await.expect("metrics text")
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = |expr| metric_names(expr).into_iter().collect::<BTreeSet<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (source, le) (rate(fleetwatch_ingest_durable_seconds_bucket{source!="x}",le=~"0.1|+Inf"}[$__rate_interval])))"#
        ),
        BTreeSet::from(["fleetwatch_ingest_durable_seconds_bucket".to_owned()])
    );
    assert_eq!(
        names(
            "sum without (instance) (a_total) / on(job) group_left(route) b offset 5m > bool 1e3"
        ),
        BTreeSet::from(["a_total".to_owned(), "b".to_owned()])
    );
    assert_eq!(
        names("increase(c_total[1h]) or vector(0) and min(d) unless e{x='y'}"),
        BTreeSet::from(["c_total".to_owned(), "d".to_owned(), "e".to_owned()])
    );
    let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 0\n# TYPE calls_count counter\n";
    assert_eq!(exported_metric("h_bucket", text), "h");
    assert_eq!(exported_metric("h_count", text), "h");
    assert_eq!(exported_metric("calls_count", text), "calls_count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_on_the_dashboard_is_exported_with_help() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("reading the dashboard"))
            .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard's expressions: {exprs:?}");
    let series: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(&dir.path().join("data")).await;

    // Traffic: a live stream (held open while scraping), readings over HTTP, HTTP errors.
    let stream = client()
        .get(engine.url("/api/stream"))
        .send()
        .await
        .expect("GET /api/stream");
    assert_eq!(stream.status(), 200);
    let mut stream = SseReader::new(stream);
    let batch: Vec<Value> = (0..20)
        .map(|i| reading(&format!("mon-{}", i % 4), i, 52.37, 4.89, 5.0))
        .collect();
    let (status, body) = engine.post("/api/readings", &json!(batch)).await;
    assert_eq!(status, 202, "{body}");
    assert!(matches!(
        stream.next(Duration::from_secs(10)).await,
        Next::Block(_)
    ));
    let (status, _) = engine
        .post("/api/readings", &json!({"device_id": "mon-0"}))
        .await;
    assert_eq!(status, 400, "an invalid reading");
    engine.device("mon-1").await.expect("a known device");
    let missing = client()
        .get(engine.url("/no/such/page"))
        .send()
        .await
        .expect("GET");
    assert_eq!(missing.status(), 404);

    // The store records a commit's histograms just after it answers the append: poll.
    let text = eventually(
        Duration::from_secs(10),
        "the first commit's samples",
        || async {
            let text = scrape(&engine).await;
            has_series(&text, "fleetwatch_store_commit_seconds_bucket").then_some(text)
        },
    )
    .await;

    let metrics: BTreeSet<String> = series
        .iter()
        .map(|series| exported_metric(series, &text))
        .collect();
    for required in REQUIRED {
        assert!(
            metrics.contains(*required),
            "the dashboard does not show {required}; it uses {metrics:?}"
        );
    }
    for (series, metric) in series.iter().map(|s| (s, exported_metric(s, &text))) {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {metric} "))),
            "{metric} (the dashboard's {series}) has no HELP line on /metrics:\n{text}"
        );
        assert!(
            has_series(&text, series),
            "the dashboard's {series} is not on /metrics:\n{text}"
        );
    }

    for histogram in HISTOGRAMS {
        assert!(
            text.lines()
                .any(|l| l == format!("# TYPE {histogram} histogram")),
            "{histogram} is a histogram:\n{text}"
        );
        let buckets = text
            .lines()
            .filter(|l| l.starts_with(&format!("{histogram}_bucket{{")))
            .count();
        assert!(buckets > 5, "{histogram} has buckets:\n{text}");
    }
    // Each reading is counted once it is durable, by its source; both sources are there at 0.
    let sample = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {series}:\n{text}"))
    };
    assert_eq!(
        sample(r#"fleetwatch_ingest_durable_seconds_count{source="http"}"#),
        20.0
    );
    assert_eq!(
        sample(r#"fleetwatch_ingest_durable_seconds_count{source="amqp"}"#),
        0.0
    );
    assert_eq!(sample("fleetwatch_sse_open_streams"), 1.0);
    assert_eq!(sample("fleetwatch_readings_in_flight"), 0.0);
    // Routes by pattern, never by raw path; unmatched paths share one label value.
    for labels in [
        r#"method="POST",route="/api/readings",status="2xx""#,
        r#"method="POST",route="/api/readings",status="4xx""#,
        r#"method="GET",route="/api/devices/{id}",status="2xx""#,
        r#"method="GET",route="/api/stream",status="2xx""#,
        r#"method="GET",route="unmatched",status="4xx""#,
    ] {
        let count = format!("fleetwatch_http_request_duration_seconds_count{{{labels}}}");
        assert!(sample(&count) >= 1.0, "{count}");
    }
    assert!(
        !text.contains("mon-1") && !text.contains("/no/such/page"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_timed_and_metrics_need_the_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start_with(
        &dir.path().join("data"),
        &["--amqp-disabled", "--read-tokens", "mon-read-token"],
    )
    .await;
    let refused = client()
        .get(engine.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(refused.status(), 401, "Prometheus must send the read token");
    let engine = engine.with_token("mon-read-token");
    let text = scrape(&engine).await;
    // The refusal was answered by the access check, before any handler: timed all the same.
    assert!(
        text.lines().any(|l| l.starts_with(
            r#"fleetwatch_http_request_duration_seconds_count{method="GET",route="/metrics",status="4xx"} "#
        )),
        "{text}"
    );
}
