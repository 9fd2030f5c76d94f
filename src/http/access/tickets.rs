//! Short-lived random tickets that open the live stream, kept in a bounded in-memory map.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Live tickets kept at most; beyond this (after sweeping expired ones) issuing fails.
const MAX_TICKETS: usize = 10_000;

/// A ticket may be used again until it expires, because `EventSource` reconnects by itself with
/// the same URL.
pub(super) struct Tickets {
    ttl: Duration,
    live: Mutex<HashMap<String, Instant>>,
}

impl Tickets {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    fn live(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        // A panic while holding the lock cannot leave the map inconsistent: keep using it.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new ticket, or `None` when too many are live. Expired ones are swept first.
    pub(super) fn issue(&self) -> Option<String> {
        let now = Instant::now();
        let mut live = self.live();
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_TICKETS {
            return None;
        }
        // 128 bits from the thread's CSPRNG.
        let ticket = format!("{:032x}", rand::random::<u128>());
        live.insert(ticket.clone(), now + self.ttl);
        Some(ticket)
    }

    pub(super) fn is_valid(&self, ticket: &str) -> bool {
        let now = Instant::now();
        let mut live = self.live();
        match live.get(ticket) {
            Some(expires) if *expires > now => true,
            Some(_) => {
                live.remove(ticket);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_random_reusable_and_expire() {
        let tickets = Tickets::new(Duration::from_millis(50));
        let t1 = tickets.issue().unwrap();
        let t2 = tickets.issue().unwrap();
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 32);
        assert!(tickets.is_valid(&t1));
        assert!(tickets.is_valid(&t1), "reusable until it expires");
        assert!(!tickets.is_valid("rd"), "anything else is no ticket");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!tickets.is_valid(&t1));
        tickets.issue().unwrap();
        assert_eq!(tickets.live().len(), 1, "expired tickets are swept");
    }

    #[test]
    fn the_map_is_bounded() {
        let tickets = Tickets::new(Duration::from_secs(60));
        for _ in 0..MAX_TICKETS {
            assert!(tickets.issue().is_some());
        }
        assert_eq!(tickets.issue(), None);
    }
}
