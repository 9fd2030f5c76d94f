//! Logging (`tracing`, filtered by `RUST_LOG`, default `info`) and the Prometheus recorder.

use std::time::Duration;

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

/// Installs the process-wide metrics recorder; `None` if one is installed already (or the
/// buckets are refused, which they are only when empty).
pub fn init_metrics() -> Option<PrometheusHandle> {
    match builder() {
        Ok(builder) => builder.install_recorder().ok(),
        Err(e) => {
            tracing::error!(error = %e, "metrics disabled: invalid histogram buckets");
            None
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
}
