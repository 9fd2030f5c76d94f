//! Reading stored events and snapshots back, with one set of functions for the engine, the rule
//! book and `fleetwatch verify`, so the offline check finds exactly what the engine would trip on.
//! A failure names the stored event (stream, version, position, type) rather than just the reason.

use fleetwatch_domain::{Device, DeviceEvent, DeviceId, RulesEvent};

use crate::actors::DEVICE_SNAPSHOT_VERSION;
use crate::store::{RecordedEvent, Snapshot};

/// A stored event this build cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored event {stream}@{version} (position {position}, type {event_type}) is unreadable: {reason}")]
pub struct DamagedEvent {
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub event_type: String,
    pub reason: String,
}

impl DamagedEvent {
    fn new(recorded: &RecordedEvent, reason: impl ToString) -> Self {
        Self {
            stream: recorded.stream.clone(),
            version: recorded.version,
            position: recorded.position,
            event_type: recorded.event_type.clone(),
            reason: reason.to_string(),
        }
    }
}

impl From<DamagedEvent> for crate::actors::EngineError {
    fn from(e: DamagedEvent) -> Self {
        Self::Corrupt {
            stream: e.stream,
            version: e.version,
            position: e.position,
            reason: format!("{} ({})", e.reason, e.event_type),
        }
    }
}

/// Several damaged events, one per line in their display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedEvents(pub Vec<DamagedEvent>);

impl std::fmt::Display for DamagedEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} damaged event(s):", self.0.len())?;
        for event in &self.0 {
            write!(f, "\n  {event}")?;
        }
        Ok(())
    }
}

pub fn device_event(recorded: &RecordedEvent) -> Result<DeviceEvent, DamagedEvent> {
    DeviceEvent::decode(recorded.schema_version, &recorded.data)
        .map_err(|e| DamagedEvent::new(recorded, e))
}

pub fn rules_event(recorded: &RecordedEvent) -> Result<RulesEvent, DamagedEvent> {
    RulesEvent::decode(recorded.schema_version, &recorded.data)
        .map_err(|e| DamagedEvent::new(recorded, e))
}

/// Why a stored snapshot cannot be used (the engine then replays the device's whole history).
#[derive(Debug, thiserror::Error)]
pub enum UnreadableSnapshot {
    #[error("snapshot format {found}; this build reads format {DEVICE_SNAPSHOT_VERSION}")]
    Format { found: u16 },
    #[error("malformed snapshot: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the snapshot holds another device ({found})")]
    OtherDevice { found: String },
}

/// The device a snapshot holds, if this build can read it and it is `id`'s.
pub fn device_snapshot(id: &DeviceId, snapshot: &Snapshot) -> Result<Device, UnreadableSnapshot> {
    if snapshot.schema_version != DEVICE_SNAPSHOT_VERSION {
        return Err(UnreadableSnapshot::Format {
            found: snapshot.schema_version,
        });
    }
    let device = serde_json::from_str::<Device>(&snapshot.data)?;
    if device.id() != id {
        return Err(UnreadableSnapshot::OtherDevice {
            found: device.id().to_string(),
        });
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(stream: &str, data: &str) -> RecordedEvent {
        RecordedEvent {
            position: 12,
            stream: stream.into(),
            version: 3,
            event_type: "ReadingRecorded".into(),
            schema_version: 1,
            recorded_at: chrono::Utc::now(),
            data: data.into(),
        }
    }

    #[test]
    fn a_damaged_event_is_named_by_stream_version_position_and_type() {
        let err = device_event(&recorded("truck-7", "{broken")).unwrap_err();
        assert_eq!(
            (err.stream.as_str(), err.version, err.position),
            ("truck-7", 3, 12)
        );
        let text = err.to_string();
        assert!(
            text.starts_with("stored event truck-7@3 (position 12, type ReadingRecorded)"),
            "{text}"
        );
    }

    #[test]
    fn damaged_events_are_listed_one_per_line() {
        let a = rules_event(&recorded("$rules", "{")).unwrap_err();
        let b = rules_event(&recorded("$rules", "[]")).unwrap_err();
        let text = DamagedEvents(vec![a, b]).to_string();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_snapshot_of_another_format_or_device_is_unreadable() {
        let id = DeviceId::parse("d-1").unwrap();
        let device = Device::new(id.clone());
        let data = serde_json::to_string(&device).unwrap();
        let snapshot = |schema_version, data: &str| Snapshot {
            stream: "d-1".into(),
            version: 0,
            schema_version,
            data: data.into(),
        };
        assert!(device_snapshot(&id, &snapshot(DEVICE_SNAPSHOT_VERSION, &data)).is_ok());
        assert!(matches!(
            device_snapshot(&id, &snapshot(99, &data)),
            Err(UnreadableSnapshot::Format { found: 99 })
        ));
        assert!(matches!(
            device_snapshot(&id, &snapshot(DEVICE_SNAPSHOT_VERSION, "{")),
            Err(UnreadableSnapshot::Malformed(_))
        ));
        let other = DeviceId::parse("d-2").unwrap();
        assert!(matches!(
            device_snapshot(&other, &snapshot(DEVICE_SNAPSHOT_VERSION, &data)),
            Err(UnreadableSnapshot::OtherDevice { .. })
        ));
    }
}
