//! The rule book: the zones and temperature ranges in force, stored as events on `$rules`.
//!
//! Readers get the current [`Rules`] lock-free; changes are serialised through one async mutex and
//! appended with optimistic concurrency before they take effect. Device appends are fenced on the
//! `$rules` version they were decided under (see `StreamAt`): an actor whose decision raced a
//! change waits here for the new version ([`RuleBook::wait_for_version`]) and decides again.

use std::sync::Arc;

use arc_swap::ArcSwap;
use fleetwatch_domain::{RuleId, Rules, RulesEvent, TemperatureRange, Thresholds, Zone};
use tokio::sync::{broadcast, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::codec::{self, DamagedEvents};
use crate::store::{EventStore, StoreError};

pub const RULES_STREAM: &str = "$rules";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Every unreadable event of `$rules`: the rules are not loaded at all rather than half.
    #[error("{0}\n(`fleetwatch verify` checks the whole store)")]
    Damaged(DamagedEvents),
    #[error("at most {max} zones and temperature ranges may be defined in total (--max-rules); remove one first")]
    TooMany { max: usize },
}

#[derive(Clone)]
pub struct RuleBook {
    current: Arc<ArcSwap<Rules>>,
    /// The version of `current`, announced after each change.
    version: Arc<watch::Sender<u64>>,
    store: Arc<dyn EventStore>,
    write: Arc<Mutex<()>>,
    /// Zones and ranges together; defining a new one beyond this is refused.
    max_rules: usize,
}

impl RuleBook {
    /// Loads the rules from the store. A damaged `$rules` event fails the load, after reading the
    /// whole stream so the error lists every damaged event, not only the first.
    pub async fn load(
        store: Arc<dyn EventStore>,
        thresholds: Thresholds,
    ) -> Result<Self, RulesError> {
        let mut rules = Rules::new(thresholds);
        let mut damaged = Vec::new();
        let mut next_version = 1;
        loop {
            let batch = store.read_stream(RULES_STREAM, next_version, 1000).await?;
            let Some(last) = batch.last() else { break };
            next_version = last.version + 1;
            for recorded in &batch {
                match codec::decode_rules_event(recorded) {
                    Ok(event) => rules.apply(&event),
                    Err(e) => damaged.push(e),
                }
            }
        }
        if !damaged.is_empty() {
            return Err(RulesError::Damaged(DamagedEvents(damaged)));
        }
        Ok(Self {
            version: Arc::new(watch::channel(rules.version).0),
            current: Arc::new(ArcSwap::from_pointee(rules)),
            store,
            write: Arc::new(Mutex::new(())),
            max_rules: usize::MAX,
        })
    }

    /// Refuses to define a new zone or range once `max` of them exist (replacing one is allowed).
    pub fn with_max_rules(mut self, max: usize) -> Self {
        self.max_rules = max;
        self
    }

    /// Fails when defining a rule that does not exist yet would exceed the limit.
    fn check_room(&self, rules: &Rules, exists: bool) -> Result<(), RulesError> {
        if !exists && rules.zones.len() + rules.ranges.len() >= self.max_rules {
            return Err(RulesError::TooMany {
                max: self.max_rules,
            });
        }
        Ok(())
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
                let exists = rules.zones.contains_key(&zone.id);
                if must_be_new && exists {
                    return Err(RulesError::AlreadyExists {
                        kind: "zone",
                        id: zone.id.to_string(),
                    });
                }
                self.check_room(rules, exists)?;
                Ok(rules.define_zone(zone.clone()))
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
                let exists = rules.ranges.contains_key(&range.id);
                if must_be_new && exists {
                    return Err(RulesError::AlreadyExists {
                        kind: "temperature range",
                        id: range.id.to_string(),
                    });
                }
                self.check_room(rules, exists)?;
                Ok(rules.define_range(range.clone()))
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
        decide: impl Fn(&Rules) -> Result<RulesEvent, RulesError>,
    ) -> Result<Arc<Rules>, RulesError> {
        let _guard = self.write.lock().await;
        let mut attempts = 0;
        loop {
            let rules = self.current();
            let event = decide(&rules)?;
            let new_event = codec::encode_rules_event(&event);
            match self
                .store
                .append(RULES_STREAM, rules.version, vec![new_event], None)
                .await
            {
                Ok(_) => {
                    let mut next = (*rules).clone();
                    next.apply(&event);
                    let next = Arc::new(next);
                    self.publish(next.clone());
                    return Ok(next);
                }
                // Another node changed the rules first (a shared store): decide again on theirs.
                Err(StoreError::Conflict { .. }) if attempts < 3 => {
                    attempts += 1;
                    self.catch_up_locked().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn publish(&self, rules: Arc<Rules>) {
        let version = rules.version;
        self.current.store(rules);
        self.version.send_replace(version);
    }

    /// Applies the `$rules` events stored after the version in force (written by other nodes).
    async fn catch_up_locked(&self) -> Result<(), RulesError> {
        let mut rules = (*self.current()).clone();
        let before = rules.version;
        loop {
            let batch = self
                .store
                .read_stream(RULES_STREAM, rules.version + 1, 1000)
                .await?;
            if batch.is_empty() {
                break;
            }
            for recorded in &batch {
                let event = codec::decode_rules_event(recorded)
                    .map_err(|e| RulesError::Damaged(DamagedEvents(vec![e])))?;
                rules.apply(&event);
            }
        }
        if rules.version > before {
            tracing::info!(
                version = rules.version,
                "zones and ranges changed on another node"
            );
            self.publish(Arc::new(rules));
        }
        Ok(())
    }

    /// With a store other nodes write too: applies their zone and range changes as they commit,
    /// so every node decides under the same rules (a decision under older rules is fenced by its
    /// `$rules` condition and decided again once this has caught up).
    pub fn spawn_follower(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let book = self.clone();
        let mut live = self.store.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    batch = live.recv() => match batch {
                        Ok(batch) => {
                            let version = book.current().version;
                            let newer = batch
                                .iter()
                                .any(|e| e.stream == RULES_STREAM && e.version > version);
                            if !newer {
                                continue;
                            }
                        }
                        // Missed some commits: look for rules changes among them.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
                let _guard = book.write.lock().await;
                if let Err(e) = book.catch_up_locked().await {
                    tracing::warn!(error = %e, "cannot read the zone and range changes of other nodes");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use fleetwatch_domain::{Watched, ZoneShape};

    use super::*;
    use crate::store::{SqliteStore, SqliteStoreOptions};

    fn zone(id: &str) -> Zone {
        let center = fleetwatch_domain::Location::new(52.0, 4.0).unwrap();
        let shape = ZoneShape::circle(center, 100.0).unwrap();
        Zone::new(RuleId::parse(id).unwrap(), "", shape, Watched::All).unwrap()
    }

    fn range(id: &str) -> TemperatureRange {
        let t = |c| fleetwatch_domain::Temperature::checked("t", c).unwrap();
        TemperatureRange::new(RuleId::parse(id).unwrap(), "", t(2.0), t(8.0), Watched::All).unwrap()
    }

    async fn book(dir: &tempfile::TempDir) -> (RuleBook, Arc<SqliteStore>) {
        let store = Arc::new(SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap());
        let book = RuleBook::load(store.clone(), Thresholds::default())
            .await
            .unwrap();
        (book, store)
    }

    #[tokio::test]
    async fn a_new_rule_beyond_the_limit_is_refused_but_replacing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (book, _store) = book(&dir).await;
        let book = book.with_max_rules(2);
        book.define_zone(zone("z1"), true).await.unwrap();
        book.define_range(range("r1"), true).await.unwrap();
        let err = book.define_zone(zone("z2"), false).await.unwrap_err();
        assert!(matches!(err, RulesError::TooMany { max: 2 }), "{err}");
        assert!(err.to_string().contains("--max-rules"), "{err}");
        assert!(matches!(
            book.define_range(range("r2"), true).await,
            Err(RulesError::TooMany { .. })
        ));
        book.define_zone(zone("z1"), false).await.unwrap();
        book.remove_range(&RuleId::parse("r1").unwrap())
            .await
            .unwrap();
        book.define_zone(zone("z2"), true).await.unwrap();
    }

    #[tokio::test]
    async fn every_damaged_rules_event_is_reported_and_nothing_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (book, store) = book(&dir).await;
            for id in ["z1", "z2", "z3"] {
                book.define_zone(zone(id), true).await.unwrap();
            }
            store.close();
        }
        let db = rusqlite::Connection::open(dir.path().join("events.sqlite3")).unwrap();
        db.execute(
            "UPDATE events SET payload = CAST('{broken' AS BLOB)
             WHERE stream = (SELECT id FROM streams WHERE name = '$rules') AND version IN (1, 3)",
            [],
        )
        .unwrap();
        drop(db);
        let store = Arc::new(SqliteStore::open(dir.path(), SqliteStoreOptions::default()).unwrap());
        let Err(RulesError::Damaged(damaged)) = RuleBook::load(store, Thresholds::default()).await
        else {
            panic!("a damaged $rules stream must not load");
        };
        let versions: Vec<u64> = damaged.0.iter().map(|e| e.version).collect();
        assert_eq!(versions, [1, 3]);
        assert!(damaged.to_string().contains("$rules@3"), "{damaged}");
    }
}
