//! The Device aggregate, as a decider: [`Device::handle`] decides which events a reading causes,
//! [`Device::apply`] folds an event into the state. The state is nothing but a fold of the events.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::DeviceEvent;
use crate::range::Bound;
use crate::rules::Rules;
use crate::values::{DeviceId, Location, Reading, RuleId, Temperature};

/// What a reading amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The reading is accepted; these events (never empty) are to be stored, in order.
    Events(Vec<DeviceEvent>),
    /// The reading repeats the last applied one (same timestamp): it changes nothing.
    Duplicate,
    /// The reading is older than the last applied one. Unless the history already holds a
    /// reading with this timestamp (a repeat, which only the store can tell), this event (a
    /// `ReadingRecorded` marked late) is to be stored: history only, no live state, no alarms.
    Late(DeviceEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LastReading {
    pub timestamp: DateTime<Utc>,
    pub location: Location,
    pub temperature: Temperature,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RangeAlarm {
    pub bound: Bound,
    pub revision: u64,
}

/// The device's overall condition, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Normal,
    OutOfZone,
    TemperatureAlarm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    id: DeviceId,
    /// Number of events applied: the version of the device's stream.
    version: u64,
    last_reading: Option<LastReading>,
    /// Where the device was when a reading last counted as a move (or at registration).
    reported_location: Option<Location>,
    reported_temperature: Option<Temperature>,
    /// The rules version the last reading was judged by.
    rules_version_seen: u64,
    /// Zones the device is outside of, with the zone revision the alarm belongs to.
    outside: BTreeMap<RuleId, u64>,
    range_alarms: BTreeMap<RuleId, RangeAlarm>,
}

impl Device {
    pub fn new(id: DeviceId) -> Self {
        Self {
            id,
            version: 0,
            last_reading: None,
            reported_location: None,
            reported_temperature: None,
            rules_version_seen: 0,
            outside: BTreeMap::new(),
            range_alarms: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn last_reading(&self) -> Option<&LastReading> {
        self.last_reading.as_ref()
    }

    /// Zones watching this device (under `rules`) that it is currently outside of.
    pub fn outside_zones<'a>(&'a self, rules: &'a Rules) -> impl Iterator<Item = &'a RuleId> + 'a {
        self.outside.iter().filter_map(move |(id, revision)| {
            rules
                .zones
                .get(id)
                .filter(|z| z.revision == *revision && z.watches(&self.id))
                .map(|_| id)
        })
    }

    /// Active temperature alarms of ranges (under `rules`) that watch this device.
    pub fn temperature_alarms<'a>(
        &'a self,
        rules: &'a Rules,
    ) -> impl Iterator<Item = (&'a RuleId, Bound)> + 'a {
        self.range_alarms.iter().filter_map(move |(id, alarm)| {
            rules
                .ranges
                .get(id)
                .filter(|r| r.revision == alarm.revision && r.watches(&self.id))
                .map(|_| (id, alarm.bound))
        })
    }

    pub fn status(&self, rules: &Rules) -> DeviceStatus {
        if self.temperature_alarms(rules).next().is_some() {
            DeviceStatus::TemperatureAlarm
        } else if self.outside_zones(rules).next().is_some() {
            DeviceStatus::OutOfZone
        } else {
            DeviceStatus::Normal
        }
    }

    /// Decides what `reading` means for this device under `rules`. Pure: the state is unchanged
    /// until the caller applies the returned events.
    pub fn handle(&self, reading: &Reading, rules: &Rules) -> Decision {
        debug_assert_eq!(
            reading.device_id, self.id,
            "reading routed to the wrong device"
        );
        if let Some(last) = &self.last_reading {
            if reading.timestamp == last.timestamp {
                return Decision::Duplicate;
            }
            if reading.timestamp < last.timestamp {
                return Decision::Late(self.recorded(reading, rules, true));
            }
        }
        let id = &self.id;
        let at = reading.timestamp;
        let location = reading.location;
        let temperature = reading.temperature;
        let mut events = Vec::with_capacity(2);

        match (self.reported_location, self.reported_temperature) {
            (Some(from), Some(previous)) => {
                let distance_m = from.distance_m(&location);
                let delta = temperature.celsius() - previous.celsius();
                events.push(DeviceEvent::ReadingRecorded {
                    device_id: id.clone(),
                    at,
                    location,
                    temperature,
                    rules_version: rules.version,
                    moved: distance_m > 0.0 && distance_m >= rules.thresholds.min_move_m,
                    temperature_changed: delta != 0.0
                        && delta.abs() >= rules.thresholds.min_temperature_delta,
                    late: false,
                });
            }
            _ => {
                events.push(DeviceEvent::DeviceRegistered {
                    device_id: id.clone(),
                    at,
                    location,
                    temperature,
                });
                events.push(self.recorded(reading, rules, false));
            }
        }

        for zone in rules.zones.values().filter(|z| z.watches(id)) {
            let was_outside = self.outside.get(&zone.id) == Some(&zone.revision);
            let is_inside = zone.shape.contains(&location);
            if was_outside && is_inside {
                events.push(DeviceEvent::EnteredZone {
                    device_id: id.clone(),
                    at,
                    zone_id: zone.id.clone(),
                    location,
                });
            } else if !was_outside && !is_inside {
                events.push(DeviceEvent::LeftZone {
                    device_id: id.clone(),
                    at,
                    zone_id: zone.id.clone(),
                    zone_revision: zone.revision,
                    location,
                    found_outside: self.first_judged_by(zone.revision),
                });
            }
        }

        for range in rules.ranges.values().filter(|r| r.watches(id)) {
            let active = self
                .range_alarms
                .get(&range.id)
                .filter(|a| a.revision == range.revision)
                .map(|a| a.bound);
            match (active, range.violation(temperature)) {
                (Some(_), None) => events.push(DeviceEvent::TemperatureBackInRange {
                    device_id: id.clone(),
                    at,
                    range_id: range.id.clone(),
                    temperature,
                }),
                (before, Some(bound)) if before != Some(bound) => {
                    events.push(DeviceEvent::TemperatureOutOfRange {
                        device_id: id.clone(),
                        at,
                        range_id: range.id.clone(),
                        range_revision: range.revision,
                        bound,
                        temperature,
                        limit: range.limit(bound),
                        found_out_of_range: before.is_none()
                            && self.first_judged_by(range.revision),
                    })
                }
                _ => {}
            }
        }
        Decision::Events(events)
    }

    /// Whether no earlier reading was judged by a rule set containing a rule of this revision.
    fn first_judged_by(&self, revision: u64) -> bool {
        self.last_reading.is_none() || self.rules_version_seen < revision
    }

    /// A recorded reading that is neither a move nor a temperature change.
    fn recorded(&self, reading: &Reading, rules: &Rules, late: bool) -> DeviceEvent {
        DeviceEvent::ReadingRecorded {
            device_id: self.id.clone(),
            at: reading.timestamp,
            location: reading.location,
            temperature: reading.temperature,
            rules_version: rules.version,
            moved: false,
            temperature_changed: false,
            late,
        }
    }

    pub fn apply(&mut self, event: &DeviceEvent) {
        self.version += 1;
        match event {
            DeviceEvent::DeviceRegistered {
                location,
                temperature,
                ..
            } => {
                self.reported_location = Some(*location);
                self.reported_temperature = Some(*temperature);
            }
            DeviceEvent::ReadingRecorded { late: true, .. } => {}
            DeviceEvent::ReadingRecorded {
                at,
                location,
                temperature,
                rules_version,
                moved,
                temperature_changed,
                ..
            } => {
                self.last_reading = Some(LastReading {
                    timestamp: *at,
                    location: *location,
                    temperature: *temperature,
                });
                self.rules_version_seen = *rules_version;
                if *moved {
                    self.reported_location = Some(*location);
                }
                if *temperature_changed {
                    self.reported_temperature = Some(*temperature);
                }
            }
            DeviceEvent::LocationChanged { to, .. } => self.reported_location = Some(*to),
            DeviceEvent::TemperatureChanged { to, .. } => self.reported_temperature = Some(*to),
            DeviceEvent::LeftZone {
                zone_id,
                zone_revision,
                ..
            } => {
                self.outside.insert(zone_id.clone(), *zone_revision);
            }
            DeviceEvent::EnteredZone { zone_id, .. } => {
                self.outside.remove(zone_id);
            }
            DeviceEvent::TemperatureOutOfRange {
                range_id,
                range_revision,
                bound,
                ..
            } => {
                self.range_alarms.insert(
                    range_id.clone(),
                    RangeAlarm {
                        bound: *bound,
                        revision: *range_revision,
                    },
                );
            }
            DeviceEvent::TemperatureBackInRange { range_id, .. } => {
                self.range_alarms.remove(range_id);
            }
        }
    }

    /// Applies an event read back from the device's stream at `version`. The same as
    /// [`Device::apply`], except that the version is the stored one: a stream whose older
    /// readings were removed (retention) has gaps in its versions.
    pub fn apply_at(&mut self, version: u64, event: &DeviceEvent) {
        self.apply(event);
        self.version = version;
    }

    /// Rebuilds a device from its history.
    pub fn from_events<'a>(
        id: DeviceId,
        events: impl IntoIterator<Item = &'a DeviceEvent>,
    ) -> Self {
        let mut device = Device::new(id);
        for event in events {
            device.apply(event);
        }
        device
    }
}

#[cfg(test)]
mod tests;
