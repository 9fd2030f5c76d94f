//! How many live streams may be open, in total and per client address, and how long one may
//! replay stored events. A stream holds a [`StreamSlot`] for as long as its feeding task runs;
//! dropping it, however the stream ended, gives the place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Why a new stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-sse-connections` streams are open.
    Total { max: usize },
    /// This client address has `--max-sse-per-client` streams open.
    PerClient { max: usize },
}

/// The live streams' limits and the streams open now; cheap to clone, shared by every worker.
#[derive(Clone)]
pub struct StreamLimits {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_client: usize,
    catch_up_timeout: Duration,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Inner {
    fn open(&self) -> MutexGuard<'_, Open> {
        // The counts are updated in single statements; a panic elsewhere cannot leave them torn.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StreamLimits {
    pub fn new(max_total: usize, max_per_client: usize, catch_up_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_total,
                max_per_client,
                catch_up_timeout,
                open: Mutex::default(),
            }),
        }
    }

    pub fn catch_up_timeout(&self) -> Duration {
        self.inner.catch_up_timeout
    }

    /// Takes a place for a new stream of `client`, or says which limit is reached.
    pub fn acquire(&self, client: IpAddr) -> Result<StreamSlot, Refusal> {
        let mut open = self.inner.open();
        if open.total >= self.inner.max_total {
            return Err(Refusal::Total {
                max: self.inner.max_total,
            });
        }
        if open.per_client.get(&client).copied().unwrap_or(0) >= self.inner.max_per_client {
            return Err(Refusal::PerClient {
                max: self.inner.max_per_client,
            });
        }
        *open.per_client.entry(client).or_default() += 1;
        open.total += 1;
        metrics::gauge!("fleetwatch_sse_open_streams").set(open.total as f64);
        Ok(StreamSlot {
            limits: self.inner.clone(),
            client,
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.inner.open().total
    }
}

/// One open stream's place; given back when dropped.
pub struct StreamSlot {
    limits: Arc<Inner>,
    client: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open();
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_client.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Forget idle clients, so the map only holds addresses with open streams.
                open.per_client.remove(&self.client);
            }
        }
        metrics::gauge!("fleetwatch_sse_open_streams").set(open.total as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_client_gets_its_share_and_no_more() {
        let limits = StreamLimits::new(10, 2, Duration::from_secs(1));
        let a = limits.acquire(ip(1)).unwrap();
        let _b = limits.acquire(ip(1)).unwrap();
        assert_eq!(
            limits.acquire(ip(1)).err(),
            Some(Refusal::PerClient { max: 2 })
        );
        assert!(
            limits.acquire(ip(2)).is_ok(),
            "other clients are not affected"
        );
        drop(a);
        assert!(
            limits.acquire(ip(1)).is_ok(),
            "a closed stream gives its place back"
        );
    }

    #[test]
    fn the_total_is_shared_by_all_clients_and_released_on_drop() {
        let limits = StreamLimits::new(2, 5, Duration::from_secs(1));
        let a = limits.acquire(ip(1)).unwrap();
        let _b = limits.acquire(ip(2)).unwrap();
        assert_eq!(limits.acquire(ip(3)).err(), Some(Refusal::Total { max: 2 }));
        assert_eq!(limits.open_streams(), 2);
        drop(a);
        assert_eq!(limits.open_streams(), 1);
        assert!(limits.acquire(ip(3)).is_ok());
        assert!(
            !limits.inner.open().per_client.contains_key(&ip(1)),
            "a client without streams is forgotten"
        );
    }
}
