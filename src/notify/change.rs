//! An alarm change as notifications carry it, and the filters a webhook picks changes with.

use chrono::{DateTime, Utc};
use fleetwatch_domain::{AlarmChangeDetail, AlarmKind, DeviceEvent, Severity};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::store::RecordedEvent;

/// What happened to the alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Opened,
    Acknowledged,
    Cleared,
}

/// One change of an alarm's lifecycle: the JSON body of a webhook delivery and of a message on
/// the alarms exchange. `(alarm_id, sequence)` identifies it: a receiver drops repeats by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmChange {
    pub alarm_id: String,
    /// 1 for the opening, then one more per change of this alarm.
    pub sequence: u32,
    pub change: ChangeKind,
    pub device_id: String,
    pub kind: AlarmKind,
    /// The zone of an `outside_zone` alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// The range of a `temperature_out_of_range` alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_id: Option<String>,
    pub severity: Severity,
    /// When the change happened (the event's time).
    pub at: DateTime<Utc>,
    /// The change's position in the store's global stream: strictly increasing.
    pub position: u64,
    /// Opened only: the version of the device event that began the condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause_version: Option<u64>,
    /// Acknowledged only: who.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Acknowledged only, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl AlarmChange {
    /// The alarm change a stored event is, if it is one. A damaged alarm event cannot be
    /// notified: it is logged and skipped (`fleetwatch verify` reports it too).
    pub fn from_recorded(recorded: &RecordedEvent) -> Option<AlarmChange> {
        if !DeviceEvent::ALARM_TYPES.contains(&recorded.event_type.as_str()) {
            return None;
        }
        let event = match codec::decode_device_event(recorded) {
            Ok(event) => event,
            Err(damaged) => {
                tracing::warn!(position = recorded.position, error = %damaged, "an alarm change cannot be read; not notified");
                return None;
            }
        };
        let change = event.alarm_change()?;
        let (kind, cause_version, by, comment) = match change.detail {
            AlarmChangeDetail::Opened { cause_version } => {
                (ChangeKind::Opened, Some(cause_version), None, None)
            }
            AlarmChangeDetail::Acknowledged { by, comment } => (
                ChangeKind::Acknowledged,
                None,
                Some(by.to_owned()),
                comment.map(str::to_owned),
            ),
            AlarmChangeDetail::Cleared => (ChangeKind::Cleared, None, None, None),
        };
        Some(AlarmChange {
            alarm_id: change.alarm_id.to_string(),
            sequence: change.sequence,
            change: kind,
            device_id: change.device_id.to_string(),
            kind: change.kind,
            zone_id: change.zone_id().map(ToString::to_string),
            range_id: change.range_id().map(ToString::to_string),
            severity: change.severity,
            at: change.at,
            position: recorded.position,
            cause_version,
            by,
            comment,
        })
    }

    /// The routing key on the alarms exchange: `<kind>.<severity>.<device>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}.{}", self.kind, self.severity, self.device_id)
    }
}

/// Which changes a webhook gets. An empty list does not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub kinds: Vec<AlarmKind>,
    #[serde(default)]
    pub severities: Vec<Severity>,
    /// Outside-zone alarms of these zones (and no other kind of alarm).
    #[serde(default)]
    pub zones: Vec<String>,
}

impl Filter {
    pub fn matches(&self, change: &AlarmChange) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&change.kind))
            && (self.severities.is_empty() || self.severities.contains(&change.severity))
            && (self.zones.is_empty()
                || change
                    .zone_id
                    .as_ref()
                    .is_some_and(|zone| self.zones.contains(zone)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: AlarmKind, severity: Severity, zone: Option<&str>) -> AlarmChange {
        AlarmChange {
            alarm_id: "truck-7.1".into(),
            sequence: 1,
            change: ChangeKind::Opened,
            device_id: "truck-7".into(),
            kind,
            zone_id: zone.map(str::to_owned),
            range_id: None,
            severity,
            at: DateTime::<Utc>::default(),
            position: 1,
            cause_version: Some(3),
            by: None,
            comment: None,
        }
    }

    #[test]
    fn filters_by_kind_severity_and_zone() {
        let any = Filter::default();
        let outside = change(AlarmKind::OutsideZone, Severity::Critical, Some("depot"));
        let offline = change(AlarmKind::Offline, Severity::Warning, None);
        assert!(any.matches(&outside) && any.matches(&offline));
        let zones = Filter {
            zones: vec!["depot".into()],
            ..Filter::default()
        };
        assert!(zones.matches(&outside));
        assert!(!zones.matches(&offline));
        assert!(!zones.matches(&change(
            AlarmKind::OutsideZone,
            Severity::Info,
            Some("yard")
        )));
        let critical_offline = Filter {
            kinds: vec![AlarmKind::Offline],
            severities: vec![Severity::Critical],
            zones: vec![],
        };
        assert!(!critical_offline.matches(&offline));
        assert!(!critical_offline.matches(&outside));
        assert!(critical_offline.matches(&change(AlarmKind::Offline, Severity::Critical, None)));
        assert_eq!(outside.routing_key(), "outside_zone.critical.truck-7");
    }

    #[test]
    fn the_body_carries_what_the_docs_say() {
        let json = serde_json::to_value(change(
            AlarmKind::OutsideZone,
            Severity::Warning,
            Some("depot"),
        ))
        .unwrap();
        assert_eq!(json["change"], "opened");
        assert_eq!(json["kind"], "outside_zone");
        assert_eq!(json["zone_id"], "depot");
        assert_eq!(json["cause_version"], 3);
        assert!(json.get("by").is_none() && json.get("range_id").is_none());
    }
}
