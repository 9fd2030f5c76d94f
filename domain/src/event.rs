//! Domain events and their stable JSON shape.
//!
//! Each event serialises as one JSON object tagged with `"type"`: the shape the API shows, and the
//! shape stores of event schema 1 hold. How events are stored, and in which schema versions, is
//! the engine's codec's business, not the domain's.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::alarm::{AlarmId, AlarmKind, Severity};
use crate::range::{Bound, TemperatureRange};
use crate::values::{DeviceId, Location, RuleId, Temperature};
use crate::zone::Zone;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemperatureDirection {
    Increased,
    Decreased,
}

/// Everything a device's readings can cause. `at` is always the timestamp of the reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DeviceEvent {
    DeviceRegistered {
        device_id: DeviceId,
        at: DateTime<Utc>,
        location: Location,
        temperature: Temperature,
    },
    /// One per accepted reading: the device's last known reading survives restarts, and the
    /// history of readings is queryable. `rules_version` is the rules version it was judged by.
    /// `moved` / `temperature_changed`: the reading is at least the thresholds away from the last
    /// *reported* location / temperature, and becomes the reported one (what the map shows as
    /// a move, without a second event per reading). A `late` reading is older than the device's
    /// last one (a store-and-forward tracker uploading its backlog): it is history only, and
    /// moves neither the live state nor alarms.
    ReadingRecorded {
        device_id: DeviceId,
        at: DateTime<Utc>,
        location: Location,
        temperature: Temperature,
        rules_version: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        moved: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        temperature_changed: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        late: bool,
    },
    /// Written by stores of event schema 1 only (a meaningful move was a second event then);
    /// still read, never raised: a move is now `ReadingRecorded { moved: true }`.
    LocationChanged {
        device_id: DeviceId,
        at: DateTime<Utc>,
        from: Location,
        to: Location,
        distance_m: f64,
    },
    /// Written by stores of event schema 1 only; a change is now
    /// `ReadingRecorded { temperature_changed: true }`.
    TemperatureChanged {
        device_id: DeviceId,
        at: DateTime<Utc>,
        from: Temperature,
        to: Temperature,
        direction: TemperatureDirection,
    },
    LeftZone {
        device_id: DeviceId,
        at: DateTime<Utc>,
        zone_id: RuleId,
        zone_revision: u64,
        location: Location,
        /// True when the device was first seen outside (its first reading, or its first after the
        /// zone was created) rather than seen crossing the boundary.
        found_outside: bool,
    },
    EnteredZone {
        device_id: DeviceId,
        at: DateTime<Utc>,
        zone_id: RuleId,
        location: Location,
    },
    TemperatureOutOfRange {
        device_id: DeviceId,
        at: DateTime<Utc>,
        range_id: RuleId,
        range_revision: u64,
        bound: Bound,
        temperature: Temperature,
        limit: Temperature,
        /// True when the first temperature judged against this range was already out of it.
        found_out_of_range: bool,
    },
    TemperatureBackInRange {
        device_id: DeviceId,
        at: DateTime<Utc>,
        range_id: RuleId,
        temperature: Temperature,
    },
    /// The device sent nothing for its offline period. `at` is when the period ran out
    /// (`last_seen` plus the period), not when the engine noticed.
    DeviceWentOffline {
        device_id: DeviceId,
        at: DateTime<Utc>,
        last_seen: DateTime<Utc>,
    },
    /// The first reading after [`DeviceEvent::DeviceWentOffline`].
    DeviceBackOnline {
        device_id: DeviceId,
        at: DateTime<Utc>,
        offline_since: DateTime<Utc>,
    },
    /// The device's own offline period, instead of the engine's default (`None`: the default
    /// again). `at` is when it was set.
    OfflineAfterSet {
        device_id: DeviceId,
        at: DateTime<Utc>,
        offline_after_s: Option<u64>,
    },
    /// A condition held for its rule's dwell: the alarm opens. `at` is when the dwell ran out;
    /// `cause_version` is the version of the event that began the condition on this stream.
    AlarmOpened {
        device_id: DeviceId,
        at: DateTime<Utc>,
        alarm_id: AlarmId,
        kind: AlarmKind,
        /// The zone or range; none for `offline`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule_id: Option<RuleId>,
        severity: Severity,
        cause_version: u64,
    },
    /// Someone (a token's name) took the alarm on. It stays visible until it clears. Every
    /// change repeats the alarm's kind, rule and severity, so that it reads (and is notified)
    /// on its own.
    AlarmAcknowledged {
        device_id: DeviceId,
        at: DateTime<Utc>,
        alarm_id: AlarmId,
        kind: AlarmKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule_id: Option<RuleId>,
        severity: Severity,
        sequence: u32,
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
    },
    /// The condition has been gone for the rule's dwell, or its rule no longer applies.
    AlarmCleared {
        device_id: DeviceId,
        at: DateTime<Utc>,
        alarm_id: AlarmId,
        kind: AlarmKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule_id: Option<RuleId>,
        severity: Severity,
        sequence: u32,
    },
}

/// A change of an alarm's lifecycle, borrowed from its event ([`DeviceEvent::alarm_change`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmChange<'a> {
    pub device_id: &'a DeviceId,
    pub at: DateTime<Utc>,
    pub alarm_id: &'a AlarmId,
    pub kind: AlarmKind,
    pub rule_id: Option<&'a RuleId>,
    pub severity: Severity,
    /// The change's number within its alarm: 1 for the opening.
    pub sequence: u32,
    pub detail: AlarmChangeDetail<'a>,
}

impl AlarmChange<'_> {
    /// The zone, for an alarm about a zone.
    pub fn zone_id(&self) -> Option<&RuleId> {
        self.kind.zone(self.rule_id)
    }

    /// The range, for an alarm about a temperature range.
    pub fn range_id(&self) -> Option<&RuleId> {
        self.kind.range(self.rule_id)
    }
}

/// What one kind of alarm change carries beyond the common fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlarmChangeDetail<'a> {
    Opened {
        /// The device's version that opened it.
        cause_version: u64,
    },
    Acknowledged {
        by: &'a str,
        comment: Option<&'a str>,
    },
    Cleared,
}

impl DeviceEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            DeviceEvent::DeviceRegistered { .. } => "DeviceRegistered",
            DeviceEvent::ReadingRecorded { .. } => "ReadingRecorded",
            DeviceEvent::LocationChanged { .. } => "LocationChanged",
            DeviceEvent::TemperatureChanged { .. } => "TemperatureChanged",
            DeviceEvent::LeftZone { .. } => "LeftZone",
            DeviceEvent::EnteredZone { .. } => "EnteredZone",
            DeviceEvent::TemperatureOutOfRange { .. } => "TemperatureOutOfRange",
            DeviceEvent::TemperatureBackInRange { .. } => "TemperatureBackInRange",
            DeviceEvent::DeviceWentOffline { .. } => "DeviceWentOffline",
            DeviceEvent::DeviceBackOnline { .. } => "DeviceBackOnline",
            DeviceEvent::OfflineAfterSet { .. } => "OfflineAfterSet",
            DeviceEvent::AlarmOpened { .. } => "AlarmOpened",
            DeviceEvent::AlarmAcknowledged { .. } => "AlarmAcknowledged",
            DeviceEvent::AlarmCleared { .. } => "AlarmCleared",
        }
    }

    /// The changes of an alarm's lifecycle: what people act on and notifications carry.
    pub const ALARM_TYPES: [&'static str; 3] = ["AlarmOpened", "AlarmAcknowledged", "AlarmCleared"];

    /// Conditions beginning and ending: what alarms open on (after the rule's dwell) and clear
    /// on. A device crossing a border back and forth raises these, and no alarm, within a dwell.
    pub const CONDITION_TYPES: [&'static str; 6] = [
        "LeftZone",
        "EnteredZone",
        "TemperatureOutOfRange",
        "TemperatureBackInRange",
        "DeviceWentOffline",
        "DeviceBackOnline",
    ];

    /// Whether this event opens an alarm.
    pub fn raises_alarm(&self) -> bool {
        matches!(self, DeviceEvent::AlarmOpened { .. })
    }

    /// Whether this event is a change of an alarm's lifecycle ([`DeviceEvent::ALARM_TYPES`]).
    pub fn is_alarm_change(&self) -> bool {
        matches!(
            self,
            DeviceEvent::AlarmOpened { .. }
                | DeviceEvent::AlarmAcknowledged { .. }
                | DeviceEvent::AlarmCleared { .. }
        )
    }

    /// This event as a change of an alarm's lifecycle, if it is one: the fields every change
    /// repeats, and what is particular to its kind of change.
    pub fn alarm_change(&self) -> Option<AlarmChange<'_>> {
        let (device_id, at, alarm_id, kind, rule_id, severity, sequence, detail) = match self {
            DeviceEvent::AlarmOpened {
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                cause_version,
            } => (
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                1,
                AlarmChangeDetail::Opened {
                    cause_version: *cause_version,
                },
            ),
            DeviceEvent::AlarmAcknowledged {
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                sequence,
                by,
                comment,
            } => (
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                *sequence,
                AlarmChangeDetail::Acknowledged {
                    by,
                    comment: comment.as_deref(),
                },
            ),
            DeviceEvent::AlarmCleared {
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                sequence,
            } => (
                device_id,
                at,
                alarm_id,
                kind,
                rule_id,
                severity,
                *sequence,
                AlarmChangeDetail::Cleared,
            ),
            _ => return None,
        };
        Some(AlarmChange {
            device_id,
            at: *at,
            alarm_id,
            kind: *kind,
            rule_id: rule_id.as_ref(),
            severity: *severity,
            sequence,
            detail,
        })
    }

    /// The alarm this event changes, if it is an alarm change.
    pub fn alarm_id(&self) -> Option<&AlarmId> {
        match self {
            DeviceEvent::AlarmOpened { alarm_id, .. }
            | DeviceEvent::AlarmAcknowledged { alarm_id, .. }
            | DeviceEvent::AlarmCleared { alarm_id, .. } => Some(alarm_id),
            _ => None,
        }
    }

    pub fn device_id(&self) -> &DeviceId {
        match self {
            DeviceEvent::DeviceRegistered { device_id, .. }
            | DeviceEvent::ReadingRecorded { device_id, .. }
            | DeviceEvent::LocationChanged { device_id, .. }
            | DeviceEvent::TemperatureChanged { device_id, .. }
            | DeviceEvent::LeftZone { device_id, .. }
            | DeviceEvent::EnteredZone { device_id, .. }
            | DeviceEvent::TemperatureOutOfRange { device_id, .. }
            | DeviceEvent::TemperatureBackInRange { device_id, .. }
            | DeviceEvent::DeviceWentOffline { device_id, .. }
            | DeviceEvent::DeviceBackOnline { device_id, .. }
            | DeviceEvent::OfflineAfterSet { device_id, .. }
            | DeviceEvent::AlarmOpened { device_id, .. }
            | DeviceEvent::AlarmAcknowledged { device_id, .. }
            | DeviceEvent::AlarmCleared { device_id, .. } => device_id,
        }
    }

    pub fn at(&self) -> DateTime<Utc> {
        match self {
            DeviceEvent::DeviceRegistered { at, .. }
            | DeviceEvent::ReadingRecorded { at, .. }
            | DeviceEvent::LocationChanged { at, .. }
            | DeviceEvent::TemperatureChanged { at, .. }
            | DeviceEvent::LeftZone { at, .. }
            | DeviceEvent::EnteredZone { at, .. }
            | DeviceEvent::TemperatureOutOfRange { at, .. }
            | DeviceEvent::TemperatureBackInRange { at, .. }
            | DeviceEvent::DeviceWentOffline { at, .. }
            | DeviceEvent::DeviceBackOnline { at, .. }
            | DeviceEvent::OfflineAfterSet { at, .. }
            | DeviceEvent::AlarmOpened { at, .. }
            | DeviceEvent::AlarmAcknowledged { at, .. }
            | DeviceEvent::AlarmCleared { at, .. } => *at,
        }
    }

    /// The zone this event is about, if any.
    pub fn zone_id(&self) -> Option<&RuleId> {
        match self {
            DeviceEvent::LeftZone { zone_id, .. } | DeviceEvent::EnteredZone { zone_id, .. } => {
                Some(zone_id)
            }
            _ => None,
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).expect("device events always serialise")
    }
}

/// Changes to the rule set, stored on the `$rules` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum RulesEvent {
    ZoneDefined { zone: Zone },
    ZoneRemoved { zone_id: RuleId },
    TemperatureRangeDefined { range: TemperatureRange },
    TemperatureRangeRemoved { range_id: RuleId },
}

impl RulesEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            RulesEvent::ZoneDefined { .. } => "ZoneDefined",
            RulesEvent::ZoneRemoved { .. } => "ZoneRemoved",
            RulesEvent::TemperatureRangeDefined { .. } => "TemperatureRangeDefined",
            RulesEvent::TemperatureRangeRemoved { .. } => "TemperatureRangeRemoved",
        }
    }

    pub fn zone_id(&self) -> Option<&RuleId> {
        match self {
            RulesEvent::ZoneDefined { zone } => Some(&zone.id),
            RulesEvent::ZoneRemoved { zone_id } => Some(zone_id),
            _ => None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("rules events always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored shape is a contract with every event already on disk: this test pins it.
    #[test]
    fn left_zone_has_a_stable_json_shape() {
        let event = DeviceEvent::LeftZone {
            device_id: DeviceId::parse("truck-7").unwrap(),
            at: "2026-11-23T18:00:00Z".parse().unwrap(),
            zone_id: RuleId::parse("depot").unwrap(),
            zone_revision: 3,
            location: Location::new(52.5, 4.9).unwrap(),
            found_outside: false,
        };
        let json = event.to_json();
        assert_eq!(
            json,
            r#"{"type":"LeftZone","device_id":"truck-7","at":"2026-11-23T18:00:00Z","zone_id":"depot","zone_revision":3,"location":{"lat":52.5,"lon":4.9},"found_outside":false}"#
        );
        assert_eq!(serde_json::from_str::<DeviceEvent>(&json).unwrap(), event);
    }

    #[test]
    fn alarm_changes_read_alike_and_name_their_zone_or_range() {
        let device_id = DeviceId::parse("truck-7").unwrap();
        let alarm_id = AlarmId::new(device_id.clone(), 2);
        let at: DateTime<Utc> = "2026-11-30T18:00:00Z".parse().unwrap();
        let acknowledged = DeviceEvent::AlarmAcknowledged {
            device_id: device_id.clone(),
            at,
            alarm_id: alarm_id.clone(),
            kind: AlarmKind::OutsideZone,
            rule_id: Some(RuleId::parse("depot").unwrap()),
            severity: Severity::Critical,
            sequence: 2,
            by: "night-shift".into(),
            comment: None,
        };
        let change = acknowledged.alarm_change().unwrap();
        assert_eq!(
            (change.alarm_id, change.sequence, change.at),
            (&alarm_id, 2, at)
        );
        assert_eq!(change.zone_id().map(RuleId::as_str), Some("depot"));
        assert_eq!(change.range_id(), None);
        assert_eq!(
            change.detail,
            AlarmChangeDetail::Acknowledged {
                by: "night-shift",
                comment: None
            }
        );
        let cleared = DeviceEvent::AlarmCleared {
            device_id,
            at,
            alarm_id,
            kind: AlarmKind::TemperatureOutOfRange,
            rule_id: Some(RuleId::parse("cold").unwrap()),
            severity: Severity::Warning,
            sequence: 3,
        };
        let change = cleared.alarm_change().unwrap();
        assert_eq!(change.range_id().map(RuleId::as_str), Some("cold"));
        assert_eq!(change.zone_id(), None);
        assert_eq!(change.detail, AlarmChangeDetail::Cleared);
    }

    #[test]
    fn rules_events_round_trip() {
        let json = r#"{"type":"ZoneDefined","zone":{"id":"z","name":"Z","shape":{"type":"circle","center":{"lat":1.0,"lon":2.0},"radius_m":10.0},"devices":null,"revision":1}}"#;
        let event: RulesEvent = serde_json::from_str(json).unwrap();
        assert_eq!(event.event_type(), "ZoneDefined");
        assert_eq!(event.to_json(), json);
    }
}
