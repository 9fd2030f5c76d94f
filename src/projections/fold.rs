//! What the read models make of events, in memory, before a commit writes it: pure folding,
//! tested without a database.

use chrono::{DateTime, Utc};
use fleetwatch_domain::{
    AlarmChangeDetail, AlarmId, DeviceEvent, Location, RuleId, RulesEvent, Severity,
};
use serde::{Deserialize, Serialize};

/// The width of a temperature bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub fn seconds(self) -> i64 {
        match self {
            Bucket::Minute => 60,
            Bucket::Hour => 3_600,
            Bucket::Day => 86_400,
        }
    }

    /// The start (Unix seconds, UTC) of the bucket holding `at`.
    pub fn start_of(self, at: DateTime<Utc>) -> i64 {
        at.timestamp().div_euclid(self.seconds()) * self.seconds()
    }

    /// The stored rows it is made of: minute and hour buckets are stored, a day is 24 hours.
    pub fn stored(self) -> StoredBucket {
        match self {
            Bucket::Minute => StoredBucket::Minute,
            Bucket::Hour | Bucket::Day => StoredBucket::Hour,
        }
    }
}

/// The bucket widths kept as rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoredBucket {
    Minute = 0,
    Hour = 1,
}

impl StoredBucket {
    pub const ALL: [StoredBucket; 2] = [StoredBucket::Minute, StoredBucket::Hour];

    pub fn width(self) -> Bucket {
        match self {
            StoredBucket::Minute => Bucket::Minute,
            StoredBucket::Hour => Bucket::Hour,
        }
    }
}

/// One bucket's aggregate: readings, their temperature, where the device was last, how far it
/// went and the alarms it raised.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Aggregate {
    pub count: u64,
    pub sum: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// The reading time (microseconds) of the latest reading in the bucket, and where it was.
    pub last: Option<(i64, Location)>,
    pub distance_m: f64,
    pub alarms: u64,
}

impl Aggregate {
    pub fn add_reading(&mut self, at: i64, location: Location, celsius: f64) {
        self.count += 1;
        self.sum += celsius;
        self.min = Some(self.min.map_or(celsius, |m| m.min(celsius)));
        self.max = Some(self.max.map_or(celsius, |m| m.max(celsius)));
        if self.last.is_none_or(|(last_at, _)| at >= last_at) {
            self.last = Some((at, location));
        }
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some((at, location)) = other.last {
            if self.last.is_none_or(|(last_at, _)| at >= last_at) {
                self.last = Some((at, location));
            }
        }
        self.distance_m += other.distance_m;
        self.alarms += other.alarms;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// One device's bucket rows changed since the last commit: a few (the current minute and hour,
/// and older ones only for late readings), so a list beats a map.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollups {
    /// (stored bucket, bucket start) → what to add to the row.
    pub rows: Vec<((StoredBucket, i64), Aggregate)>,
}

impl Rollups {
    fn bucket(&mut self, stored: StoredBucket, at: DateTime<Utc>) -> &mut Aggregate {
        let key = (stored, stored.width().start_of(at));
        let index = match self.rows.iter().rposition(|(k, _)| *k == key) {
            Some(index) => index,
            None => {
                self.rows.push((key, Aggregate::default()));
                self.rows.len() - 1
            }
        };
        &mut self.rows[index].1
    }

    fn get(&self, stored: StoredBucket, start: i64) -> Option<&Aggregate> {
        self.rows
            .iter()
            .find(|(k, _)| *k == (stored, start))
            .map(|(_, a)| a)
    }
}

/// The fleet's rows use this device name (not a valid device id, so it cannot collide).
pub const FLEET: &str = "*";

/// A zone crossing, as the zone report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    pub zone: String,
    pub device: String,
    pub at: i64,
    pub position: u64,
    pub entered: bool,
}

/// A condition that holds now (outside a zone, out of a range, offline), kept to count devices
/// by condition whether or not an alarm has opened on it yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holding {
    pub device: String,
    pub kind: ConditionKind,
    /// The zone or range; empty for offline.
    pub rule: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConditionKind {
    Zone = 0,
    Range = 1,
    Offline = 2,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConditionChange {
    Began(Holding),
    Ended(Holding),
    RuleRemoved(ConditionKind, String),
}

/// A change of an alarm's lifecycle, as the alarms list keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmChange {
    Opened {
        /// The opening event's position: the alarms list's order.
        position: u64,
        id: AlarmId,
        kind: fleetwatch_domain::AlarmKind,
        rule: Option<RuleId>,
        severity: Severity,
        at: i64,
        cause_version: u64,
    },
    Acknowledged {
        id: AlarmId,
        sequence: u32,
        at: i64,
        by: String,
        comment: Option<String>,
    },
    Cleared {
        id: AlarmId,
        sequence: u32,
        at: i64,
    },
}

/// What changed since the last commit.
#[derive(Debug, Default)]
pub struct Changes {
    /// Per device (and [`FLEET`]): what to add to its bucket rows.
    pub rollups: foldhash::HashMap<String, Rollups>,
    /// Each device's latest reading (time in microseconds, position), for the distance of the
    /// next one; kept across commits.
    pub last_seen: foldhash::HashMap<String, (i64, Location)>,
    /// Devices first registered, with when.
    pub registered: foldhash::HashMap<String, i64>,
    pub crossings: Vec<Crossing>,
    /// Conditions begun and ended, and rules removed (ending their conditions), in event order.
    pub conditions: Vec<ConditionChange>,
    /// Alarm lifecycle changes, in event order.
    pub alarms: Vec<AlarmChange>,
    /// Events folded since the last commit.
    pub events: u64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// A device's rollups; its name is copied only the first time since the last commit.
    fn rollups(&mut self, device: &str) -> &mut Rollups {
        if !self.rollups.contains_key(device) {
            self.rollups.insert(device.to_owned(), Rollups::default());
        }
        self.rollups.get_mut(device).expect("inserted above")
    }

    /// Bucket rows to write.
    pub fn rows(&self) -> usize {
        self.rollups.values().map(|r| r.rows.len()).sum()
    }

    /// Whether an alarm or a condition changed: what people watch, shown without delay.
    pub fn has_alarm_changes(&self) -> bool {
        !(self.alarms.is_empty() && self.conditions.is_empty())
    }

    /// What to add to one bucket row, if anything.
    pub fn bucket(&self, device: &str, stored: StoredBucket, start: i64) -> Option<&Aggregate> {
        self.rollups.get(device)?.get(stored, start)
    }

    /// Folds a device event. `previous` gives a device's latest reading before this batch when
    /// it is not in `last_seen` yet (looked up in the read model by the caller).
    pub fn device_event(
        &mut self,
        event: &DeviceEvent,
        position: u64,
        previous: impl FnOnce(&str) -> Option<(i64, Location)>,
    ) {
        self.events += 1;
        let device = event.device_id().as_str();
        match event {
            DeviceEvent::ReadingRecorded {
                at,
                location,
                temperature,
                late,
                ..
            } => {
                let micros = at.timestamp_micros();
                // Late readings count in their own buckets, but a device's path is its live one.
                let moved = if *late {
                    0.0
                } else {
                    let before = match self.last_seen.get_mut(device) {
                        Some(seen) => Some(std::mem::replace(seen, (micros, *location))),
                        None => {
                            self.last_seen
                                .insert(device.to_owned(), (micros, *location));
                            previous(device)
                        }
                    };
                    before.map_or(0.0, |(_, from)| from.distance_m(location))
                };
                for name in [device, FLEET] {
                    let rollups = self.rollups(name);
                    for stored in StoredBucket::ALL {
                        let aggregate = rollups.bucket(stored, *at);
                        aggregate.add_reading(micros, *location, temperature.celsius());
                        aggregate.distance_m += moved;
                    }
                }
            }
            DeviceEvent::DeviceRegistered { at, .. } => {
                self.registered
                    .entry(device.to_owned())
                    .or_insert(at.timestamp_micros());
            }
            DeviceEvent::LeftZone { at, zone_id, .. }
            | DeviceEvent::EnteredZone { at, zone_id, .. } => {
                let entered = matches!(event, DeviceEvent::EnteredZone { .. });
                let holding = Holding {
                    device: device.to_owned(),
                    kind: ConditionKind::Zone,
                    rule: zone_id.to_string(),
                };
                self.conditions.push(if entered {
                    ConditionChange::Ended(holding)
                } else {
                    ConditionChange::Began(holding)
                });
                self.crossings.push(Crossing {
                    zone: zone_id.to_string(),
                    device: device.to_owned(),
                    at: at.timestamp_micros(),
                    position,
                    entered,
                });
            }
            DeviceEvent::TemperatureOutOfRange { range_id, .. }
            | DeviceEvent::TemperatureBackInRange { range_id, .. } => {
                let holding = Holding {
                    device: device.to_owned(),
                    kind: ConditionKind::Range,
                    rule: range_id.to_string(),
                };
                self.conditions.push(
                    if matches!(event, DeviceEvent::TemperatureBackInRange { .. }) {
                        ConditionChange::Ended(holding)
                    } else {
                        ConditionChange::Began(holding)
                    },
                );
            }
            DeviceEvent::DeviceWentOffline { .. } | DeviceEvent::DeviceBackOnline { .. } => {
                let holding = Holding {
                    device: device.to_owned(),
                    kind: ConditionKind::Offline,
                    rule: String::new(),
                };
                self.conditions
                    .push(if matches!(event, DeviceEvent::DeviceBackOnline { .. }) {
                        ConditionChange::Ended(holding)
                    } else {
                        ConditionChange::Began(holding)
                    });
            }
            DeviceEvent::AlarmOpened { .. }
            | DeviceEvent::AlarmAcknowledged { .. }
            | DeviceEvent::AlarmCleared { .. } => {
                let Some(change) = event.alarm_change() else {
                    return;
                };
                let at = change.at.timestamp_micros();
                let id = change.alarm_id.clone();
                let sequence = change.sequence;
                let folded = match change.detail {
                    AlarmChangeDetail::Opened { cause_version } => {
                        for name in [device, FLEET] {
                            let rollups = self.rollups(name);
                            for stored in StoredBucket::ALL {
                                rollups.bucket(stored, change.at).alarms += 1;
                            }
                        }
                        AlarmChange::Opened {
                            position,
                            id,
                            kind: change.kind,
                            rule: change.rule_id.cloned(),
                            severity: change.severity,
                            at,
                            cause_version,
                        }
                    }
                    AlarmChangeDetail::Acknowledged { by, comment } => AlarmChange::Acknowledged {
                        id,
                        sequence,
                        at,
                        by: by.to_owned(),
                        comment: comment.map(str::to_owned),
                    },
                    AlarmChangeDetail::Cleared => AlarmChange::Cleared { id, sequence, at },
                };
                self.alarms.push(folded);
            }
            DeviceEvent::OfflineAfterSet { .. } => {}
            // Stores of event schema 1 only; the reading beside them was counted.
            DeviceEvent::LocationChanged { .. } | DeviceEvent::TemperatureChanged { .. } => {}
        }
    }

    pub fn rules_event(&mut self, event: &RulesEvent) {
        self.events += 1;
        match event {
            RulesEvent::ZoneRemoved { zone_id } => self.conditions.push(
                ConditionChange::RuleRemoved(ConditionKind::Zone, zone_id.to_string()),
            ),
            RulesEvent::TemperatureRangeRemoved { range_id } => self.conditions.push(
                ConditionChange::RuleRemoved(ConditionKind::Range, range_id.to_string()),
            ),
            RulesEvent::ZoneDefined { .. } | RulesEvent::TemperatureRangeDefined { .. } => {}
        }
    }

    /// An event the read models do not use (still moves the checkpoint).
    pub fn skip(&mut self) {
        self.events += 1;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fleetwatch_domain::{DeviceId, Temperature};

    use super::*;

    fn reading(device: &str, secs: i64, lat: f64, celsius: f64, late: bool) -> DeviceEvent {
        DeviceEvent::ReadingRecorded {
            device_id: DeviceId::parse(device).unwrap(),
            at: Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
                + chrono::Duration::seconds(secs),
            location: Location::new(lat, 4.0).unwrap(),
            temperature: Temperature::new(celsius).unwrap(),
            rules_version: 0,
            moved: false,
            temperature_changed: false,
            late,
        }
    }

    #[test]
    fn readings_aggregate_per_minute_and_hour_for_the_device_and_the_fleet() {
        let mut changes = Changes::default();
        for (secs, celsius) in [(0, 4.0), (30, 6.0), (65, 9.0)] {
            changes.device_event(&reading("d", secs, 52.0, celsius, false), 1, |_| None);
        }
        changes.device_event(&reading("e", 10, 52.0, 1.0, false), 1, |_| None);
        let minute = |device: &str, start: i64| {
            *changes
                .bucket(device, StoredBucket::Minute, start)
                .expect("a minute row")
        };
        let t = Utc
            .with_ymd_and_hms(2026, 11, 23, 12, 0, 0)
            .unwrap()
            .timestamp();
        let first = minute("d", t);
        assert_eq!(
            (first.count, first.min, first.max, first.mean()),
            (2, Some(4.0), Some(6.0), Some(5.0))
        );
        assert_eq!(minute("d", t + 60).count, 1);
        let fleet = minute(FLEET, t);
        assert_eq!((fleet.count, fleet.min), (3, Some(1.0)));
        let hour = *changes
            .bucket("d", StoredBucket::Hour, t)
            .expect("an hour row");
        assert_eq!((hour.count, hour.max), (3, Some(9.0)));
    }

    #[test]
    fn distance_follows_the_live_path_and_late_readings_only_count() {
        let mut changes = Changes::default();
        let before = Location::new(51.99, 4.0).unwrap();
        changes.device_event(&reading("d", 10, 52.0, 5.0, false), 1, |_| {
            Some((0, before))
        });
        changes.device_event(&reading("d", 20, 52.01, 5.0, false), 2, |_| None);
        changes.device_event(&reading("d", 5, 53.0, 5.0, true), 3, |_| None);
        let t = Utc
            .with_ymd_and_hms(2026, 11, 23, 12, 0, 0)
            .unwrap()
            .timestamp();
        let hour = *changes
            .bucket("d", StoredBucket::Hour, t)
            .expect("an hour row");
        assert_eq!(hour.count, 3);
        assert!(
            (hour.distance_m - 2.0 * 1112.0).abs() < 5.0,
            "{}",
            hour.distance_m
        );
        assert_eq!(
            hour.last.unwrap().0 % 1_000_000_000,
            (t * 1_000_000 + 20_000_000) % 1_000_000_000
        );
    }

    #[test]
    fn aggregates_merge_like_their_readings() {
        let l = Location::new(1.0, 1.0).unwrap();
        let mut a = Aggregate::default();
        a.add_reading(10, l, 3.0);
        let mut b = Aggregate::default();
        b.add_reading(5, l, 7.0);
        b.alarms = 1;
        a.merge(&b);
        assert_eq!(
            (a.count, a.min, a.max, a.alarms, a.last.unwrap().0),
            (2, Some(3.0), Some(7.0), 1, 10)
        );
        let mut empty = Aggregate::default();
        empty.merge(&a);
        assert_eq!(empty, a);
    }
}
