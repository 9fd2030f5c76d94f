//! Logging (`tracing`, filtered by `RUST_LOG`, default `info`) and the Prometheus recorder, with
//! the one list of every metric the engine records ([`METRICS`]): its kind, unit and `HELP` text.

use std::time::Duration;

use metrics::{Label, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How often recorded histogram samples are folded into their buckets. Until then they are kept
/// one by one, so without this they would pile up whenever nothing scrapes `/metrics`.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Durations, in seconds: 0.5 ms to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Events per store commit: 1 up to well past `--store-max-batch`'s default.
const COMMIT_EVENTS_BUCKETS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10_000.0,
    20_000.0,
];

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The recorder's settings: every histogram gets explicit buckets, so it is rendered as a
/// Prometheus histogram of fixed size (without buckets it would be a summary).
fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("fleetwatch_store_commit_events".into()),
            &COMMIT_EVENTS_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
}

/// Installs the process-wide metrics recorder and describes every metric; `None` if one is
/// installed already (or the buckets are refused, which they are only when empty).
pub fn init_metrics() -> Option<PrometheusHandle> {
    match builder() {
        Ok(builder) => {
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics disabled: invalid histogram buckets");
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric the engine records.
struct Metric {
    name: &'static str,
    kind: Kind,
    unit: Unit,
    /// The `HELP` line; it names the unit too, since the exporter prints units only as name
    /// suffixes, which would change the names.
    help: &'static str,
    /// Label sets registered at zero on startup, so the series exist (and `rate()` works) before
    /// anything happened: `&[&[]]` for a metric without labels, nothing for labels whose values
    /// are only known as they come (routes, refusal reasons).
    at_zero: &'static [&'static [(&'static str, &'static str)]],
}

const NO_LABELS: &[&[(&str, &str)]] = &[&[]];

/// Every metric the engine records, in one place: `describe` gives each its `HELP` text, and a
/// test checks that every name recorded anywhere under `src/` is listed here.
const METRICS: &[Metric] = &[
    // Ingest.
    Metric {
        name: "fleetwatch_ingest_durable_seconds",
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help: "Seconds from a reading's submission to the engine until its events are durable (acknowledged), by source (http, amqp); its _count is the readings ingested",
        at_zero: &[&[("source", "http")], &[("source", "amqp")]],
    },
    Metric {
        name: "fleetwatch_readings_in_flight",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Readings accepted but not yet durable (bounded by --max-in-flight), as of the scrape",
        at_zero: &[],
    },
    Metric {
        name: "fleetwatch_readings_applied_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Readings whose events were stored (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_readings_duplicate_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Readings that repeated a stored one (same device and timestamp) and changed nothing (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_readings_rejected_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Readings refused as invalid (bad field, clock ahead), by source (count; RabbitMQ's are in fleetwatch_amqp_dead_lettered_total)",
        at_zero: &[&[("source", "http")]],
    },
    Metric {
        name: "fleetwatch_active_devices",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Device actors running now (devices with recent readings)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_deadlines",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Devices with a deadline in the index (offline detection, dwell times)",
        at_zero: NO_LABELS,
    },
    // RabbitMQ.
    Metric {
        name: "fleetwatch_amqp_processed_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "RabbitMQ deliveries whose reading became durable and was acknowledged (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_amqp_dead_lettered_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "RabbitMQ messages published to the dead-letter queue, with their reason (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_amqp_retries_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "RabbitMQ deliveries requeued after the engine failed on their reading (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_amqp_reconnects_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Lost or refused RabbitMQ connections, each followed by a reconnect (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_amqp_partitions_released_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Partition queues this node gave back to spread them over the nodes (--amqp-partitions) (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_grip_published_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Events published to Pushpin for the streams it holds (--grip-publish-url) (count)",
        at_zero: NO_LABELS,
    },
    // Alarm notifications.
    Metric {
        name: "fleetwatch_notify_delivered_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Alarm changes delivered, by sink: webhook (answered 2xx; one per webhook) or amqp (confirmed by the broker); a change delivered again after a restart counts again",
        at_zero: &[&[("sink", "webhook")], &[("sink", "amqp")]],
    },
    Metric {
        name: "fleetwatch_notify_failures_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Failed alarm notification attempts, by sink: webhook (not answered 2xx, connection error, timeout; retried with backoff) or amqp (a lost connection or an unconfirmed publish; reconnected)",
        at_zero: &[&[("sink", "webhook")], &[("sink", "amqp")]],
    },
    Metric {
        name: "fleetwatch_notify_backlog_positions",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Store positions a webhook is behind while a delivery fails (0 once it is up to date), by subscriber (webhook:<id>): an upper bound of the alarm changes it has not got yet",
        at_zero: &[],
    },
    // The event store.
    Metric {
        name: "fleetwatch_store_commit_seconds",
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help: "Seconds one store transaction (a group commit, with its fsync) took",
        at_zero: &[],
    },
    Metric {
        name: "fleetwatch_store_commit_events",
        kind: Kind::Histogram,
        unit: Unit::Count,
        help: "Events written by one store transaction (count)",
        at_zero: &[],
    },
    Metric {
        name: "fleetwatch_store_events_appended_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Events committed to the store (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_store_available",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "1 while the store can write, 0 while it fails (ingest is paused meanwhile)",
        at_zero: &[],
    },
    Metric {
        name: "fleetwatch_store_failures_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Times the store started failing to write (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_store_writer_restarts_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Store writer threads that died and were replaced (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_subscription_lagged_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Times a subscriber to the store (a live stream, the read models) fell behind the commit feed and read back from the store instead (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_read_models_commit_seconds",
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help: "Time to write one commit of the read models (seconds)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_read_models_position",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "The store position up to which the read models have folded and committed the events",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_retention_removed_events_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Raw readings removed by retention once a snapshot covered them (count of events)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_rollups_removed_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Minute and hour rollup rows removed by --minute-rollup-retention and --hour-rollup-retention (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_retention_pass_seconds",
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help: "Seconds one retention pass over every device took",
        at_zero: &[],
    },
    // HTTP.
    Metric {
        name: "fleetwatch_http_request_duration_seconds",
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help: "Seconds from an HTTP request's arrival until its response head is ready (a live stream's body is not included), by method, route pattern and status class",
        at_zero: &[],
    },
    Metric {
        name: "fleetwatch_http_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "HTTP requests refused by access control, by reason (missing_token, unknown_token, scope, content_type, origin) (count)",
        at_zero: &[],
    },
    // Live streams.
    Metric {
        name: "fleetwatch_sse_open_streams",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Live streams (/api/stream, server-sent events) open now",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_sse_connections_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Live streams opened (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_sse_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Live streams refused at a limit, by limit (total, per_client) (count)",
        at_zero: &[&[("limit", "total")], &[("limit", "per_client")]],
    },
    Metric {
        name: "fleetwatch_sse_slow_clients_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Live streams ended because their client did not keep up (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_sse_catch_up_timeouts_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Live streams ended by --sse-catch-up-timeout while replaying stored events (count)",
        at_zero: NO_LABELS,
    },
    Metric {
        name: "fleetwatch_sse_catch_up_abandoned_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Clients that left while stored events were replayed for them (count)",
        at_zero: NO_LABELS,
    },
];

/// Gives every metric its `HELP` text and unit, and registers the label sets listed in
/// `at_zero`, on the current recorder.
fn describe() {
    for metric in METRICS {
        let (name, unit, help) = (metric.name, metric.unit, metric.help);
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
        for labels in metric.at_zero {
            let labels: Vec<Label> = labels
                .iter()
                .map(|&(key, value)| Label::from_static_parts(key, value))
                .collect();
            // Registering is enough: a counter or gauge starts at 0, a histogram empty.
            match metric.kind {
                Kind::Counter => metrics::counter!(name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
                Kind::Histogram => drop(metrics::histogram!(name, labels)),
            }
        }
    }
}

/// Runs the recorder's upkeep every few seconds, for as long as the process runs, so memory stays
/// bounded whether or not `/metrics` is scraped. Must be called inside a Tokio runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

/// An error with its causes, on one line: a failed TLS handshake or HTTP request says why.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let recorder = builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("fleetwatch_store_commit_seconds").record(0.003);
            metrics::histogram!("fleetwatch_store_commit_events").record(7.0);
        });
        handle.run_upkeep();
        let text = handle.render();
        assert!(
            text.contains(r#"fleetwatch_store_commit_seconds_bucket{le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fleetwatch_store_commit_events_bucket{le="10"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn every_metric_has_help_and_the_listed_series_start_at_zero() {
        let recorder = builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let text = handle.render();
        for metric in METRICS {
            if metric.at_zero.is_empty() {
                continue;
            }
            assert!(
                text.contains(&format!("# HELP {} ", metric.name)),
                "{}: {text}",
                metric.name
            );
        }
        assert!(
            text.contains("fleetwatch_amqp_dead_lettered_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"fleetwatch_ingest_durable_seconds_bucket{source="amqp",le="+Inf"} 0"#),
            "{text}"
        );
    }

    /// Every `counter!`, `gauge!` and `histogram!` under `src/` records a metric listed in
    /// [`METRICS`] (so it has its `HELP` line), with the matching kind.
    #[test]
    fn every_recorded_metric_is_described() {
        let mut files = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        let mut recorded = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("telemetry.rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for (kind, mac) in [
                (Kind::Counter, "counter!("),
                (Kind::Gauge, "gauge!("),
                (Kind::Histogram, "histogram!("),
            ] {
                for (at, _) in source.match_indices(mac) {
                    let rest = source[at + mac.len()..].trim_start();
                    let name = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split('"').next())
                        .unwrap_or_else(|| {
                            panic!("{}: a metric name that is not a literal", path.display())
                        });
                    recorded.push((name.to_owned(), kind, path.clone()));
                }
            }
        }
        assert!(recorded.len() > 20, "found only {recorded:?}");
        for (name, kind, path) in &recorded {
            let described = METRICS.iter().find(|m| m.name == name);
            assert!(
                described.is_some_and(|m| m.kind == *kind),
                "{name} ({kind:?}, {}) is not in telemetry::METRICS with that kind",
                path.display()
            );
        }
        for metric in METRICS {
            assert!(
                recorded.iter().any(|(name, ..)| name == metric.name),
                "{} is described but recorded nowhere",
                metric.name
            );
        }
    }
}
