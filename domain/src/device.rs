//! The Device aggregate, as a decider: [`Device::handle`] decides which events a reading causes,
//! [`Device::apply`] folds an event into the state. The state is nothing but a fold of the events.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::alarm::{AckRefused, ActiveAlarm, AlarmId, AlarmKey, AlarmKind, Condition, Severity};
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
    /// Silent for its offline period.
    Offline,
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
    /// Conditions that hold now (outside a zone, out of a range, offline).
    #[serde(default)]
    conditions: BTreeMap<AlarmKey, Condition>,
    /// When the conditions of alarms still active ended: they clear after the rule's dwell.
    #[serde(default)]
    ended: BTreeMap<AlarmKey, DateTime<Utc>>,
    /// Alarms not cleared, one per condition at most.
    #[serde(default)]
    alarms: BTreeMap<AlarmKey, ActiveAlarm>,
    /// Alarms ever opened: the number of the next one's id follows it.
    #[serde(default)]
    alarms_opened: u64,
    #[serde(default)]
    offline_since: Option<DateTime<Utc>>,
    /// When the engine last heard from the device, by its own clock (see [`Device::heard`]).
    #[serde(default)]
    last_heard: Option<DateTime<Utc>>,
    /// The device's own offline period (seconds), instead of the rules' default.
    #[serde(default)]
    offline_after_s: Option<u64>,
}

/// What a rule says about its alarms, for the condition an alarm key names.
#[derive(Debug, Clone, Copy)]
struct AlarmTerms {
    revision: u64,
    severity: Severity,
    dwell: TimeDelta,
}

/// When the alarm of a condition that holds opens: after the rule's dwell, on the device's
/// timeline. Offline is decided on the engine's clock already (its own dwell is the offline
/// period), so its alarm opens with it.
fn opening_due(key: &AlarmKey, condition: &Condition, terms: &AlarmTerms) -> DateTime<Utc> {
    match key.kind {
        AlarmKind::Offline => DateTime::<Utc>::MIN_UTC,
        _ => condition.since + terms.dwell,
    }
}

fn seconds(s: u64) -> TimeDelta {
    TimeDelta::seconds(
        i64::try_from(s)
            .unwrap_or(i64::MAX)
            .min(i64::MAX / 1_000_000),
    )
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
            conditions: BTreeMap::new(),
            ended: BTreeMap::new(),
            alarms: BTreeMap::new(),
            alarms_opened: 0,
            offline_since: None,
            last_heard: None,
            offline_after_s: None,
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

    /// The device's alarms that have not cleared.
    pub fn alarms(&self) -> impl Iterator<Item = (&AlarmKey, &ActiveAlarm)> {
        self.alarms.iter()
    }

    /// The engine heard from the device at `at` (its clock): a reading was stored. Silence, and
    /// so going offline, is measured from this, not from readings' own timestamps: a device
    /// uploading readings it buffered, with old timestamps, is not silent.
    pub fn heard(&mut self, at: DateTime<Utc>) {
        if self.last_heard.is_none_or(|last| at > last) {
            self.last_heard = Some(at);
        }
    }

    /// When the engine last heard from the device.
    pub fn last_heard(&self) -> Option<DateTime<Utc>> {
        self.last_heard
    }

    /// Since when the device is offline, if it is.
    pub fn offline_since(&self) -> Option<DateTime<Utc>> {
        self.offline_since
    }

    /// The device's own offline period (seconds), if it has one.
    pub fn own_offline_after(&self) -> Option<u64> {
        self.offline_after_s
    }

    /// The offline period in force for this device under `rules`.
    pub fn offline_after(&self, rules: &Rules) -> TimeDelta {
        seconds(
            self.offline_after_s
                .unwrap_or(rules.thresholds.offline_after_s),
        )
    }

    pub fn status(&self, rules: &Rules) -> DeviceStatus {
        if self.temperature_alarms(rules).next().is_some() {
            DeviceStatus::TemperatureAlarm
        } else if self.outside_zones(rules).next().is_some() {
            DeviceStatus::OutOfZone
        } else if self.offline_since.is_some() {
            DeviceStatus::Offline
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
                let delta = temperature.celsius() - previous.celsius();
                events.push(DeviceEvent::ReadingRecorded {
                    device_id: id.clone(),
                    at,
                    location,
                    temperature,
                    rules_version: rules.version,
                    // Never moved in place, even with a threshold of 0.
                    moved: from.is_at_least_m(
                        &location,
                        rules.thresholds.min_move_m.max(f64::MIN_POSITIVE),
                    ),
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

        if let Some(offline_since) = self.offline_since {
            events.push(DeviceEvent::DeviceBackOnline {
                device_id: id.clone(),
                at,
                offline_since,
            });
        }

        // Every exit before any entry: a reading that leaves one zone for another says so in
        // that order.
        let mut entries = Vec::new();
        for zone in rules.zones.values().filter(|z| z.watches(id)) {
            let was_outside = self.outside.get(&zone.id) == Some(&zone.revision);
            let is_inside = zone.shape.contains(&location);
            if was_outside && is_inside {
                entries.push(DeviceEvent::EnteredZone {
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
        events.append(&mut entries);

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
        self.settle_alarms(at, rules, &mut events);
        Decision::Events(events)
    }

    /// Decides what the passing of time to `now` means: the device went offline, a condition
    /// held for its dwell (the alarm opens), or one has been gone for it (the alarm clears).
    /// Empty when nothing is due; [`Device::next_deadline`] says when something will be.
    pub fn handle_time(&self, now: DateTime<Utc>, rules: &Rules) -> Vec<DeviceEvent> {
        let mut events = Vec::new();
        if self.offline_since.is_none() {
            if let Some(last) = self.last_heard {
                let deadline = last + self.offline_after(rules);
                if deadline <= now {
                    events.push(DeviceEvent::DeviceWentOffline {
                        device_id: self.id.clone(),
                        at: deadline,
                        last_seen: last,
                    });
                }
            }
        }
        self.settle_alarms(self.device_time(now), rules, &mut events);
        events
    }

    /// `now` (the engine's clock) on the device's timeline: its last reading's time plus the time
    /// since the engine heard it. Dwell times run on the device's timeline, so a device uploading
    /// readings it buffered long ago is judged by when they were taken, not when they arrived.
    fn device_time(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match (&self.last_reading, self.last_heard) {
            (Some(last), Some(heard)) => last.timestamp + (now - heard),
            _ => now,
        }
    }

    /// A time on the device's timeline, on the engine's clock ([`Device::device_time`]'s inverse).
    fn engine_time(&self, device_time: DateTime<Utc>) -> DateTime<Utc> {
        match (&self.last_reading, self.last_heard) {
            (Some(last), Some(heard)) => device_time + (heard - last.timestamp),
            _ => device_time,
        }
    }

    /// The earliest time at which [`Device::handle_time`] will have something to decide, if
    /// no reading comes first.
    pub fn next_deadline(&self, rules: &Rules) -> Option<DateTime<Utc>> {
        let offline = match (self.offline_since, self.last_heard) {
            (None, Some(last)) => Some(last + self.offline_after(rules)),
            _ => None,
        };
        let opening = self.conditions.iter().filter_map(|(key, condition)| {
            let terms = self.terms(key, rules)?;
            (terms.revision == condition.revision && !self.alarms.contains_key(key))
                .then(|| self.engine_time(opening_due(key, condition, &terms)))
        });
        let clearing = self.alarms.keys().map(|key| match self.terms(key, rules) {
            Some(terms) if self.holds(key, &terms) => DateTime::<Utc>::MAX_UTC,
            Some(terms) => self
                .ended
                .get(key)
                .map_or(DateTime::<Utc>::MIN_UTC, |ended| {
                    self.engine_time(*ended + terms.dwell)
                }),
            // The rule is gone: the alarm clears at the next decision.
            None => DateTime::<Utc>::MIN_UTC,
        });
        offline
            .into_iter()
            .chain(opening)
            .chain(clearing)
            .filter(|t| *t != DateTime::<Utc>::MAX_UTC)
            .min()
    }

    /// Decides an acknowledgement of `alarm` by `by`, at `now`.
    pub fn acknowledge(
        &self,
        alarm: &AlarmId,
        by: &str,
        comment: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<DeviceEvent, AckRefused> {
        let (key, active) = self
            .alarms
            .iter()
            .find(|(_, a)| &a.id == alarm)
            .ok_or_else(|| AckRefused::NotActive(alarm.to_string()))?;
        if active.acknowledged {
            return Err(AckRefused::AlreadyAcknowledged(alarm.to_string()));
        }
        Ok(DeviceEvent::AlarmAcknowledged {
            device_id: self.id.clone(),
            at: now,
            alarm_id: alarm.clone(),
            kind: key.kind,
            rule_id: key.rule.clone(),
            severity: active.severity,
            sequence: active.sequence + 1,
            by: by.to_string(),
            comment,
        })
    }

    /// Decides giving the device its own offline period (`None`: the default again).
    pub fn set_offline_after(&self, seconds: Option<u64>, now: DateTime<Utc>) -> DeviceEvent {
        DeviceEvent::OfflineAfterSet {
            device_id: self.id.clone(),
            at: now,
            offline_after_s: seconds,
        }
    }

    /// What the rule behind `key` says, if it (still) applies to this device.
    fn terms(&self, key: &AlarmKey, rules: &Rules) -> Option<AlarmTerms> {
        let rule = key.rule.as_ref();
        match key.kind {
            AlarmKind::OutsideZone => {
                rules
                    .zones
                    .get(rule?)
                    .filter(|z| z.watches(&self.id))
                    .map(|z| AlarmTerms {
                        revision: z.revision,
                        severity: z.severity,
                        dwell: seconds(z.dwell),
                    })
            }
            AlarmKind::TemperatureOutOfRange => rules
                .ranges
                .get(rule?)
                .filter(|r| r.watches(&self.id))
                .map(|r| AlarmTerms {
                    revision: r.revision,
                    severity: r.severity,
                    dwell: seconds(r.dwell),
                }),
            // The offline period is the offline condition's own dwell.
            AlarmKind::Offline => Some(AlarmTerms {
                revision: 0,
                severity: Severity::default(),
                dwell: TimeDelta::zero(),
            }),
        }
    }

    /// Whether the condition `key` names holds under the rule's current revision.
    fn holds(&self, key: &AlarmKey, terms: &AlarmTerms) -> bool {
        self.conditions
            .get(key)
            .is_some_and(|c| c.revision == terms.revision)
    }

    /// Appends to `events` the alarm changes due at `now` once `events` are applied: alarms
    /// whose condition has held for the dwell open, alarms whose condition has been gone for
    /// it (or whose rule no longer applies) clear.
    fn settle_alarms(&self, now: DateTime<Utc>, rules: &Rules, events: &mut Vec<DeviceEvent>) {
        if self.conditions.is_empty()
            && self.alarms.is_empty()
            && !events.iter().any(|e| {
                matches!(
                    e,
                    DeviceEvent::LeftZone { .. }
                        | DeviceEvent::TemperatureOutOfRange { .. }
                        | DeviceEvent::DeviceWentOffline { .. }
                )
            })
        {
            return; // the common case: nothing is wrong, nothing began
        }
        let mut next = self.clone();
        for event in events.iter() {
            next.apply(event);
        }
        let mut changes = Vec::new();
        for (key, condition) in &next.conditions {
            let Some(terms) = next.terms(key, rules) else {
                continue;
            };
            let due = opening_due(key, condition, &terms);
            if terms.revision == condition.revision && !next.alarms.contains_key(key) && due <= now
            {
                changes.push(DeviceEvent::AlarmOpened {
                    device_id: self.id.clone(),
                    at: due.max(condition.since),
                    alarm_id: AlarmId::new(
                        self.id.clone(),
                        next.alarms_opened + 1 + changes.len() as u64,
                    ),
                    kind: key.kind,
                    rule_id: key.rule.clone(),
                    severity: terms.severity,
                    cause_version: condition.cause_version,
                });
            }
        }
        for (key, alarm) in &next.alarms {
            let cleared_at = match next.terms(key, rules) {
                Some(terms) if next.holds(key, &terms) => continue,
                Some(terms) => next
                    .ended
                    .get(key)
                    .map_or(now, |ended| *ended + terms.dwell),
                None => now,
            };
            if cleared_at <= now {
                changes.push(DeviceEvent::AlarmCleared {
                    device_id: self.id.clone(),
                    at: cleared_at,
                    alarm_id: alarm.id.clone(),
                    kind: key.kind,
                    rule_id: key.rule.clone(),
                    severity: alarm.severity,
                    sequence: alarm.sequence + 1,
                });
            }
        }
        events.append(&mut changes);
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
                at,
                ..
            } => {
                self.outside.insert(zone_id.clone(), *zone_revision);
                self.condition_began(AlarmKey::zone(zone_id), *at, *zone_revision);
            }
            DeviceEvent::EnteredZone { zone_id, at, .. } => {
                self.outside.remove(zone_id);
                self.condition_ended(AlarmKey::zone(zone_id), *at);
            }
            DeviceEvent::TemperatureOutOfRange {
                range_id,
                range_revision,
                bound,
                at,
                ..
            } => {
                self.range_alarms.insert(
                    range_id.clone(),
                    RangeAlarm {
                        bound: *bound,
                        revision: *range_revision,
                    },
                );
                self.condition_began(AlarmKey::range(range_id), *at, *range_revision);
            }
            DeviceEvent::TemperatureBackInRange { range_id, at, .. } => {
                self.range_alarms.remove(range_id);
                self.condition_ended(AlarmKey::range(range_id), *at);
            }
            DeviceEvent::DeviceWentOffline { at, .. } => {
                self.offline_since = Some(*at);
                self.condition_began(AlarmKey::offline(), *at, 0);
            }
            DeviceEvent::DeviceBackOnline { at, .. } => {
                self.offline_since = None;
                self.condition_ended(AlarmKey::offline(), *at);
            }
            DeviceEvent::OfflineAfterSet {
                offline_after_s, ..
            } => self.offline_after_s = *offline_after_s,
            DeviceEvent::AlarmOpened {
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                ..
            } => {
                let key = AlarmKey {
                    kind: *kind,
                    rule: rule_id.clone(),
                };
                self.ended.remove(&key);
                self.alarms.insert(
                    key,
                    ActiveAlarm {
                        id: alarm_id.clone(),
                        severity: *severity,
                        opened_at: *at,
                        sequence: 1,
                        acknowledged: false,
                    },
                );
                self.alarms_opened = self.alarms_opened.max(alarm_id.number());
            }
            DeviceEvent::AlarmAcknowledged {
                alarm_id, sequence, ..
            } => {
                if let Some(alarm) = self.alarms.values_mut().find(|a| &a.id == alarm_id) {
                    alarm.acknowledged = true;
                    alarm.sequence = *sequence;
                }
            }
            DeviceEvent::AlarmCleared { alarm_id, .. } => {
                let key = self
                    .alarms
                    .iter()
                    .find(|(_, a)| &a.id == alarm_id)
                    .map(|(key, _)| key.clone());
                if let Some(key) = key {
                    self.alarms.remove(&key);
                    self.ended.remove(&key);
                }
            }
        }
    }

    /// A condition began (or, for a range, changed bound while it held: it keeps its start).
    fn condition_began(&mut self, key: AlarmKey, since: DateTime<Utc>, revision: u64) {
        let version = self.version;
        self.ended.remove(&key);
        let condition = self.conditions.entry(key).or_insert(Condition {
            since,
            revision,
            cause_version: version,
        });
        if condition.revision != revision {
            *condition = Condition {
                since,
                revision,
                cause_version: version,
            };
        }
    }

    /// A condition ended; if its alarm is active, the alarm clears once the dwell has passed.
    fn condition_ended(&mut self, key: AlarmKey, at: DateTime<Utc>) {
        self.conditions.remove(&key);
        if self.alarms.contains_key(&key) {
            self.ended.insert(key, at);
        }
    }

    /// Applies an event read back from the device's stream at `version`. The same as
    /// [`Device::apply`], except that the version is the stored one: a stream whose older
    /// readings were removed (retention) has gaps in its versions.
    pub fn apply_at(&mut self, version: u64, event: &DeviceEvent) {
        self.version = version.saturating_sub(1);
        self.apply(event);
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

#[cfg(test)]
mod alarm_tests;
