//! Spreading the partition queues evenly over the nodes that consume them.
//!
//! Every node consumes every partition queue, and the broker lets one consumer of each queue at
//! a time receive (single active consumer): the first to subscribe, then the next in line when it
//! goes. That gives each partition one owner and hands a dead node's partitions over, but it
//! never spreads them: the node that started first owns everything. So each node looks every few
//! seconds at how many nodes consume (a queue's consumer count) and how many partitions it owns
//! itself, and while it owns more than its share (partitions / nodes, rounded up) it gives one
//! back: it stops taking deliveries from that queue, finishes and acknowledges what it took, and
//! closes the queue's channel, which returns what it had been sent but not yet started to the
//! queue, in order, before the next consumer in line becomes active; then it subscribes again, at
//! the back of the line. No reading of a device is ever handled by two nodes at once.
//!
//! A node knows it owns a partition when it was the queue's first consumer, or when deliveries
//! from it arrived lately: a partition that is idle may go uncounted, which matters only while it
//! is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often a node compares what it owns with its share.
const BALANCE_EVERY: Duration = Duration::from_secs(3);
/// A partition that delivered within this is owned.
const OWNED_WITHIN: Duration = Duration::from_secs(10);

/// What this node knows about its ownership of each partition.
pub(super) struct Partitions {
    started: Instant,
    slots: Vec<Slot>,
}

struct Slot {
    /// Milliseconds since `started` when ownership was last seen; 0: not owned.
    owned_at: AtomicU64,
    release: Notify,
}

impl Partitions {
    pub(super) fn new(count: usize) -> Self {
        Self {
            started: Instant::now(),
            slots: (0..count)
                .map(|_| Slot {
                    owned_at: AtomicU64::new(0),
                    release: Notify::new(),
                })
                .collect(),
        }
    }

    /// Partition `i` delivered (or this node became its first consumer): it owns it now.
    pub(super) fn owned(&self, i: usize) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        if let Some(slot) = self.slots.get(i) {
            slot.owned_at.store(now, Ordering::Relaxed);
        }
    }

    /// This node no longer consumes partition `i` (it gave it back, or lost the connection).
    pub(super) fn lost(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            slot.owned_at.store(0, Ordering::Relaxed);
        }
    }

    /// Resolves when this node should give partition `i` back.
    pub(super) async fn release_requested(&self, i: usize) {
        match self.slots.get(i) {
            Some(slot) => slot.release.notified().await,
            None => std::future::pending().await,
        }
    }

    fn owned_now(&self) -> Vec<usize> {
        let now = self.started.elapsed().as_millis() as u64;
        let window = OWNED_WITHIN.as_millis() as u64;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let at = s.owned_at.load(Ordering::Relaxed);
                at != 0 && now.saturating_sub(at) <= window
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Gives back one partition while this node owns more than its share of `nodes`; runs until
    /// shutdown. `probe_queue` is any partition queue: its consumer count is the number of nodes.
    pub(super) async fn balance(&self, url: &str, probe_queue: &str, shutdown: CancellationToken) {
        let mut channel: Option<(Connection, Channel)> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(BALANCE_EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
            if channel
                .as_ref()
                .is_none_or(|(c, _)| !c.status().connected())
            {
                channel = connect(url).await;
            }
            let Some((_, ch)) = &channel else { continue };
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let nodes = match ch
                .queue_declare(probe_queue.into(), passive, FieldTable::default())
                .await
            {
                Ok(queue) => queue.consumer_count() as usize,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot count the nodes consuming the partitions");
                    channel = None;
                    continue;
                }
            };
            if nodes <= 1 {
                continue;
            }
            let share = self.slots.len().div_ceil(nodes);
            let owned = self.owned_now();
            if owned.len() > share {
                if let Some(&give) = owned.last() {
                    tracing::info!(
                        partition = give,
                        owned = owned.len(),
                        share,
                        nodes,
                        "giving a partition back to spread them over the nodes"
                    );
                    metrics::counter!("fleetwatch_amqp_partitions_released_total").increment(1);
                    self.slots[give].release.notify_waiters();
                }
            }
        }
        if let Some((connection, _)) = channel {
            let _ = connection.close(200, "shutdown".into()).await;
        }
    }
}

async fn connect(url: &str) -> Option<(Connection, Channel)> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .ok()?;
    let channel = connection.create_channel().await.ok()?;
    Some((connection, channel))
}
