//! Messages the engine could not process, newest first, bounded: what `GET /api/failed-messages`
//! shows. The dead-letter queue keeps the messages themselves; this is the operator's quick view.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A message that was dead-lettered, and why.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FailedMessage {
    pub received_at: DateTime<Utc>,
    pub reason: String,
    pub routing_key: String,
    /// The body as text (lossy for non-UTF-8), cut to 4 KiB.
    pub body: String,
}

#[derive(Clone)]
pub struct FailedMessages {
    inner: Arc<Mutex<VecDeque<FailedMessage>>>,
    capacity: usize,
    /// Dead-lettered since the engine started.
    total: Arc<std::sync::atomic::AtomicU64>,
}

const MAX_BODY_CHARS: usize = 4096;

impl FailedMessages {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
            total: Arc::default(),
        }
    }

    /// Messages dead-lettered since the engine started.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn record(&self, reason: &str, routing_key: &str, body: &[u8]) {
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body: String = String::from_utf8_lossy(body)
            .chars()
            .take(MAX_BODY_CHARS)
            .collect();
        let mut list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() == self.capacity {
            list.pop_back();
        }
        list.push_front(FailedMessage {
            received_at: Utc::now(),
            reason: reason.to_owned(),
            routing_key: routing_key.to_owned(),
            body,
        });
    }

    pub fn newest(&self, limit: usize) -> Vec<FailedMessage> {
        let list = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_first_within_capacity() {
        let failed = FailedMessages::new(2);
        for i in 0..3 {
            failed.record(&format!("r{i}"), "k", b"x");
        }
        let reasons: Vec<_> = failed.newest(10).into_iter().map(|m| m.reason).collect();
        assert_eq!(reasons, ["r2", "r1"]);
    }
}
