//! The rule book: the zones and temperature ranges in force, stored as events on `$rules`.
//!
//! Readers get the current [`Rules`] lock-free; changes are serialised through one async mutex and
//! appended with optimistic concurrency before they take effect. Device appends are fenced on the
//! `$rules` version they were decided under (see `StreamAt`): an actor whose decision raced a
//! change waits here for the new version ([`RuleBook::wait_for_version`]) and decides again.

use std::sync::Arc;

use arc_swap::ArcSwap;
use fleetwatch_domain::{
    RuleId, Rules, RulesEvent, TemperatureRange, Thresholds, Zone, SCHEMA_VERSION,
};
use tokio::sync::{watch, Mutex};

use crate::store::{EventStore, NewEvent, StoreError};

pub const RULES_STREAM: &str = "$rules";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored rules event at version {version} is unreadable: {reason}")]
    Corrupt { version: u64, reason: String },
}

#[derive(Clone)]
pub struct RuleBook {
    current: Arc<ArcSwap<Rules>>,
    /// The version of `current`, announced after each change.
    version: Arc<watch::Sender<u64>>,
    store: Arc<dyn EventStore>,
    write: Arc<Mutex<()>>,
}

impl RuleBook {
    /// Loads the rules from the store.
    pub async fn load(
        store: Arc<dyn EventStore>,
        thresholds: Thresholds,
    ) -> Result<Self, RulesError> {
        let mut rules = Rules::new(thresholds);
        loop {
            let batch = store
                .read_stream(RULES_STREAM, rules.version + 1, 1000)
                .await?;
            if batch.is_empty() {
                break;
            }
            for recorded in batch {
                let event =
                    RulesEvent::decode(recorded.schema_version, &recorded.data).map_err(|e| {
                        RulesError::Corrupt {
                            version: recorded.version,
                            reason: e.to_string(),
                        }
                    })?;
                rules.apply(&event);
            }
        }
        Ok(Self {
            version: Arc::new(watch::channel(rules.version).0),
            current: Arc::new(ArcSwap::from_pointee(rules)),
            store,
            write: Arc::new(Mutex::new(())),
        })
    }

    pub fn current(&self) -> Arc<Rules> {
        self.current.load_full()
    }

    /// Resolves once the rules in force are at `version` or later.
    pub async fn wait_for_version(&self, version: u64) {
        let mut current = self.version.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = current.wait_for(|v| *v >= version).await;
    }

    /// Stores `zone`; `must_be_new` refuses to replace an existing one.
    pub async fn define_zone(&self, zone: Zone, must_be_new: bool) -> Result<Zone, RulesError> {
        let id = zone.id.clone();
        let rules = self
            .change(|rules| {
                if must_be_new && rules.zones.contains_key(&zone.id) {
                    return Err(RulesError::AlreadyExists {
                        kind: "zone",
                        id: zone.id.to_string(),
                    });
                }
                Ok(rules.define_zone(zone))
            })
            .await?;
        Ok(rules.zones[&id].clone())
    }

    pub async fn remove_zone(&self, id: &RuleId) -> Result<(), RulesError> {
        self.change(|rules| {
            if !rules.zones.contains_key(id) {
                return Err(RulesError::NotFound {
                    kind: "zone",
                    id: id.to_string(),
                });
            }
            Ok(RulesEvent::ZoneRemoved {
                zone_id: id.clone(),
            })
        })
        .await
        .map(drop)
    }

    pub async fn define_range(
        &self,
        range: TemperatureRange,
        must_be_new: bool,
    ) -> Result<TemperatureRange, RulesError> {
        let id = range.id.clone();
        let rules = self
            .change(|rules| {
                if must_be_new && rules.ranges.contains_key(&range.id) {
                    return Err(RulesError::AlreadyExists {
                        kind: "temperature range",
                        id: range.id.to_string(),
                    });
                }
                Ok(rules.define_range(range))
            })
            .await?;
        Ok(rules.ranges[&id].clone())
    }

    pub async fn remove_range(&self, id: &RuleId) -> Result<(), RulesError> {
        self.change(|rules| {
            if !rules.ranges.contains_key(id) {
                return Err(RulesError::NotFound {
                    kind: "temperature range",
                    id: id.to_string(),
                });
            }
            Ok(RulesEvent::TemperatureRangeRemoved {
                range_id: id.clone(),
            })
        })
        .await
        .map(drop)
    }

    async fn change(
        &self,
        decide: impl FnOnce(&Rules) -> Result<RulesEvent, RulesError>,
    ) -> Result<Arc<Rules>, RulesError> {
        let _guard = self.write.lock().await;
        let rules = self.current();
        let event = decide(&rules)?;
        let new_event = NewEvent {
            event_type: event.event_type(),
            schema_version: SCHEMA_VERSION,
            data: event.to_json(),
            at: None,
        };
        self.store
            .append(RULES_STREAM, rules.version, vec![new_event], None)
            .await?;
        let mut next = (*rules).clone();
        next.apply(&event);
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.version.send_replace(next.version);
        Ok(next)
    }
}
