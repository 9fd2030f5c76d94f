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
//! A node knows it owns a partition when it was the queue's first consumer, or once a delivery
//! from it arrives; it keeps it until its subscription ends (the broker never moves a queue away
//! from a live active consumer). A partition taken over while idle goes uncounted until its
//! first delivery, which matters only while it is idle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often a node compares what it owns with its share.
const BALANCE_EVERY: Duration = Duration::from_secs(3);

/// What this node knows about its ownership of each partition.
pub(super) struct Partitions {
    slots: Vec<Slot>,
}

struct Slot {
    owned: AtomicBool,
    release: Notify,
}

impl Partitions {
    pub(super) fn new(count: usize) -> Self {
        Self {
            slots: (0..count)
                .map(|_| Slot {
                    owned: AtomicBool::new(false),
                    release: Notify::new(),
                })
                .collect(),
        }
    }

    /// Partition `i` delivered (or this node became its first consumer): it owns it now.
    pub(super) fn owned(&self, i: usize) {
        // Called for every delivery: written only when it changes.
        if let Some(slot) = self
            .slots
            .get(i)
            .filter(|s| !s.owned.load(Ordering::Relaxed))
        {
            slot.owned.store(true, Ordering::Relaxed);
        }
    }

    /// This node no longer consumes partition `i` (it gave it back, or lost the connection).
    pub(super) fn lost(&self, i: usize) {
        if let Some(slot) = self.slots.get(i) {
            slot.owned.store(false, Ordering::Relaxed);
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
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.owned.load(Ordering::Relaxed))
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
