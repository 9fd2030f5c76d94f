//! Domain events and their stable JSON shape.
//!
//! Each event serialises as one JSON object tagged with `"type"`. The store keeps the type and
//! [`SCHEMA_VERSION`] beside the payload; [`DeviceEvent::decode`] is where older schema versions
//! will be upcast once the shape changes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::range::{Bound, TemperatureRange};
use crate::values::{DeviceId, Location, RuleId, Temperature};
use crate::zone::Zone;

/// The schema version written with every new event.
pub const SCHEMA_VERSION: u16 = 1;

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
    /// A `late` reading is older than the device's last one (a store-and-forward tracker
    /// uploading its backlog): it is history only, and moves neither the live state nor alarms.
    ReadingRecorded {
        device_id: DeviceId,
        at: DateTime<Utc>,
        location: Location,
        temperature: Temperature,
        rules_version: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        late: bool,
    },
    LocationChanged {
        device_id: DeviceId,
        at: DateTime<Utc>,
        from: Location,
        to: Location,
        distance_m: f64,
    },
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
}

/// Why a stored event could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("unknown schema version {0} (this build reads up to {SCHEMA_VERSION})")]
    UnknownSchemaVersion(u16),
    #[error("malformed event: {0}")]
    Malformed(#[from] serde_json::Error),
}

fn decode<T: serde::de::DeserializeOwned>(
    schema_version: u16,
    json: &str,
) -> Result<T, EventDecodeError> {
    match schema_version {
        1 => Ok(serde_json::from_str(json)?),
        other => Err(EventDecodeError::UnknownSchemaVersion(other)),
    }
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
        }
    }

    /// Alarm types: raised (`LeftZone`, `TemperatureOutOfRange`) and cleared.
    pub const ALARM_TYPES: [&'static str; 4] = [
        "LeftZone",
        "EnteredZone",
        "TemperatureOutOfRange",
        "TemperatureBackInRange",
    ];

    /// Whether this event raises an alarm (the device left a zone or a temperature range).
    pub fn raises_alarm(&self) -> bool {
        matches!(
            self,
            DeviceEvent::LeftZone { .. } | DeviceEvent::TemperatureOutOfRange { .. }
        )
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
            | DeviceEvent::TemperatureBackInRange { device_id, .. } => device_id,
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
            | DeviceEvent::TemperatureBackInRange { at, .. } => *at,
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

    pub fn decode(schema_version: u16, json: &str) -> Result<Self, EventDecodeError> {
        decode(schema_version, json)
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

    pub fn decode(schema_version: u16, json: &str) -> Result<Self, EventDecodeError> {
        decode(schema_version, json)
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
        assert_eq!(DeviceEvent::decode(SCHEMA_VERSION, &json).unwrap(), event);
    }

    #[test]
    fn unknown_schema_versions_are_refused_not_misread() {
        let err = DeviceEvent::decode(99, "{}").unwrap_err();
        assert!(matches!(err, EventDecodeError::UnknownSchemaVersion(99)));
    }

    #[test]
    fn rules_events_round_trip() {
        let json = r#"{"type":"ZoneDefined","zone":{"id":"z","name":"Z","shape":{"type":"circle","center":{"lat":1.0,"lon":2.0},"radius_m":10.0},"devices":null,"revision":1}}"#;
        let event = RulesEvent::decode(1, json).unwrap();
        assert_eq!(event.event_type(), "ZoneDefined");
        assert_eq!(event.to_json(), json);
    }
}
