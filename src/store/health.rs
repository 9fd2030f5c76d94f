//! Whether a store can write, as its writer sees it; shared by the backends.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::watch;

use super::StoreHealth;

/// The store's health as the writer sees it. Each change is logged and counted once.
#[derive(Clone)]
pub(crate) struct HealthSignal(Arc<watch::Sender<StoreHealth>>);

impl HealthSignal {
    pub(crate) fn new() -> Self {
        metrics::gauge!("fleetwatch_store_available").set(1.0);
        Self(Arc::new(watch::channel(StoreHealth::Available).0))
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<StoreHealth> {
        self.0.subscribe()
    }

    pub(crate) fn is_available(&self) -> bool {
        self.0.borrow().is_available()
    }

    pub(crate) fn failing(&self, cause: String) {
        self.0.send_if_modified(|health| {
            if !health.is_available() {
                return false;
            }
            tracing::error!(%cause, "the event store cannot write: ingest is paused until it can; nothing is acknowledged meanwhile");
            metrics::gauge!("fleetwatch_store_available").set(0.0);
            metrics::counter!("fleetwatch_store_failures_total").increment(1);
            *health = StoreHealth::Failing {
                cause,
                since: Utc::now(),
            };
            true
        });
    }

    pub(crate) fn available(&self) {
        self.0.send_if_modified(|health| {
            let StoreHealth::Failing { since, .. } = health else {
                return false;
            };
            let seconds = (Utc::now() - *since).num_milliseconds() as f64 / 1000.0;
            tracing::info!(
                failing_for_s = seconds,
                "the event store writes again: ingest resumes"
            );
            metrics::gauge!("fleetwatch_store_available").set(1.0);
            *health = StoreHealth::Available;
            true
        });
    }
}
