//! A catch-up-then-live subscription to the store's global stream: every event after a position,
//! in order, once, first read back from the store and then as it is committed.
//!
//! It subscribes to the store's commit feed *before* it reads anything, and skips committed
//! events at or below the position it has delivered up to, so there is neither a gap nor a
//! duplicate where the catch-up meets the live feed. A subscriber that falls so far behind that
//! the feed drops batches for it goes back to reading from the store, from where it was: it is
//! slower for a while, and loses nothing. The live stream (SSE) and the read models
//! (`crate::projections`) both follow the store this way.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::store::{CommittedBatch, EventStore, RecordedEvent, StoreError};

pub struct Subscription {
    store: Arc<dyn EventStore>,
    live: broadcast::Receiver<CommittedBatch>,
    /// Every event up to this position has been delivered.
    cursor: u64,
    page: usize,
    catching_up: bool,
}

/// Events after the subscription's previous position, oldest first.
pub struct Delivery {
    batch: CommittedBatch,
    skip: usize,
    live: bool,
}

impl Delivery {
    pub fn events(&self) -> &[RecordedEvent] {
        &self.batch[self.skip..]
    }

    /// From the commit feed (else read back from the store).
    pub fn is_live(&self) -> bool {
        self.live
    }
}

impl Subscription {
    /// Follows every event after `after`, reading back `page` events at a time while catching up.
    pub fn new(store: Arc<dyn EventStore>, after: u64, page: usize) -> Self {
        // First: everything committed from now on is in the feed.
        let live = store.subscribe();
        Self {
            store,
            live,
            cursor: after,
            page: page.max(1),
            catching_up: true,
        }
    }

    /// Every event up to this position has been delivered.
    pub fn position(&self) -> u64 {
        self.cursor
    }

    /// Whether it is still reading back stored events (the last page read was full).
    pub fn is_catching_up(&self) -> bool {
        self.catching_up
    }

    /// The next events, as soon as there are any. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Delivery, StoreError> {
        loop {
            if self.catching_up {
                let page = self.store.read_all(self.cursor, self.page).await?;
                // A short page reached the head: from here on the feed has everything.
                self.catching_up = page.len() == self.page;
                let Some(last) = page.last() else {
                    continue;
                };
                self.cursor = last.position;
                return Ok(Delivery {
                    batch: Arc::new(page),
                    skip: 0,
                    live: false,
                });
            }
            match self.live.recv().await {
                Ok(batch) => {
                    let skip = batch
                        .iter()
                        .take_while(|e| e.position <= self.cursor)
                        .count();
                    let Some(last) = batch.last().filter(|_| skip < batch.len()) else {
                        continue;
                    };
                    self.cursor = last.position;
                    return Ok(Delivery {
                        batch,
                        skip,
                        live: true,
                    });
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("fleetwatch_subscription_lagged_total").increment(1);
                    self.catching_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEvent, SqliteStore, SqliteStoreOptions};

    fn event(n: u8) -> NewEvent {
        NewEvent {
            event_type: "Test",
            schema_version: 1,
            payload: bytes::Bytes::from(vec![n]),
            at: None,
        }
    }

    async fn positions(sub: &mut Subscription, until: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        while seen.last().is_none_or(|p| *p < until) {
            let delivery = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
                .await
                .expect("events in time")
                .unwrap();
            seen.extend(delivery.events().iter().map(|e| e.position));
        }
        seen
    }

    #[tokio::test]
    async fn stored_then_live_events_arrive_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> =
            Arc::new(SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap());
        for n in 0..25 {
            store
                .append("a", n, vec![event(n as u8)], None)
                .await
                .unwrap();
        }
        let mut sub = Subscription::new(store.clone(), 3, 10);
        // Committed while the subscription is still catching up: read back or live, once.
        for n in 25..30 {
            store
                .append("a", n, vec![event(n as u8)], None)
                .await
                .unwrap();
        }
        let first = positions(&mut sub, 30).await;
        assert_eq!(first, (4..=30).collect::<Vec<_>>());
        assert!(!sub.is_catching_up());
        store.append("a", 30, vec![event(30)], None).await.unwrap();
        assert_eq!(positions(&mut sub, 31).await, [31]);
    }

    #[tokio::test]
    async fn a_subscriber_that_lags_reads_back_what_the_feed_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteStoreOptions {
            live_capacity: 16,
            ..SqliteStoreOptions::default()
        };
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path(), options).unwrap());
        let mut sub = Subscription::new(store.clone(), 0, 100);
        assert!(positions_until_idle(&mut sub).await.is_empty());
        // 100 commits, far more than the feed keeps for a subscriber that does not read.
        for n in 0..100 {
            store
                .append("a", n, vec![event(n as u8)], None)
                .await
                .unwrap();
        }
        assert_eq!(
            positions(&mut sub, 100).await,
            (1..=100).collect::<Vec<_>>()
        );
    }

    async fn positions_until_idle(sub: &mut Subscription) -> Vec<u64> {
        let mut seen = Vec::new();
        while let Ok(Ok(delivery)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), sub.next()).await
        {
            seen.extend(delivery.events().iter().map(|e| e.position));
        }
        seen
    }
}
