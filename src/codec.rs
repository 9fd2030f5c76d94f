//! The one codec: how device events, rules events and device snapshots are stored, in every
//! schema version this build reads, and how a stored event reads as JSON for the API.
//!
//! Device events, schema 2 (written now): the device id is the stream and the event's time the
//! store's `at` column, so neither is repeated in the payload.
//! * `ReadingRecorded`, nearly every event, has a hand-made layout of 10–30 bytes: a flag byte,
//!   the position as two `i32` of 1e-7 degrees (1 cm) and the temperature as an `i16` of 0.01 °C
//!   when those represent the values exactly (a flag bit says so; otherwise full `f64`s), then the
//!   rules version as a LEB128 varint. Lossless: the scaled form is used only when it decodes to
//!   the identical `f64`.
//! * The other device events (registration and alarms, rare) are `postcard` encodings of their
//!   fields.
//!
//! Device events, schema 1 (stores written before schema 2, migrated as they were): one JSON
//! object per event, the domain's serde shape, including `LocationChanged` and
//! `TemperatureChanged`, which the domain still folds but no longer raises.
//!
//! Rules events are JSON (schema 1): few, and worth reading by eye. Snapshots are the device's
//! JSON (format 1): one per device, so their size does not matter.
//!
//! Every failure to read names the stored event: stream, version, position and type.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fleetwatch_domain::{
    AlarmId, AlarmKind, Bound, Device, DeviceEvent, DeviceId, Location, RuleId, RulesEvent,
    Severity, Temperature,
};
use serde::{Deserialize, Serialize};

use crate::store::{NewEvent, RecordedEvent, Snapshot};

/// The schema device events are written in.
pub const DEVICE_EVENT_SCHEMA: u16 = 2;
/// The schema of JSON events: device events before schema 2, and rules events.
pub const JSON_SCHEMA: u16 = 1;
/// The format of device snapshots (the device's JSON). Format 1 predates alarms: it lacks the
/// conditions and open alarms, so such a snapshot is not used and the device replays its events
/// (zone and range events are never removed, so its conditions come back whole).
pub const DEVICE_SNAPSHOT_VERSION: u16 = 2;
/// The event types that are raw readings, which retention may remove.
pub const READING_TYPES: [&str; 3] = ["ReadingRecorded", "LocationChanged", "TemperatureChanged"];
/// The type of a recorded reading, looked up by time.
pub const READING_RECORDED: &str = "ReadingRecorded";

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
            stream: recorded.stream.to_string(),
            version: recorded.version,
            position: recorded.position,
            event_type: recorded.event_type.to_string(),
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

/// Why a payload could not be read (before it is tied to its stored event).
#[derive(Debug, thiserror::Error)]
enum PayloadError {
    #[error("unknown schema version {0}")]
    Schema(u16),
    #[error("unknown event type")]
    Type,
    #[error("malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("malformed: {0}")]
    Binary(#[from] postcard::Error),
    #[error("malformed: {0}")]
    Layout(&'static str),
    #[error("invalid value: {0}")]
    Value(#[from] fleetwatch_domain::ValidationError),
    #[error("the event has no time (`at`)")]
    NoTime,
    #[error("the stream is not a device id: {0}")]
    Stream(fleetwatch_domain::ValidationError),
}

// ---------------------------------------------------------------------------------------------
// Device events

/// A device event as the store keeps it.
pub fn encode_device_event(event: &DeviceEvent) -> NewEvent {
    let payload = match event {
        DeviceEvent::ReadingRecorded {
            location,
            temperature,
            rules_version,
            moved,
            temperature_changed,
            late,
            ..
        } => Some(reading::encode(
            *location,
            *temperature,
            *rules_version,
            reading::Flags {
                moved: *moved,
                temperature_changed: *temperature_changed,
                late: *late,
            },
        )),
        other => Compact::from_event(other).map(|compact| {
            // Plain data with string keys and numbers: postcard cannot fail on it.
            Bytes::from(postcard::to_allocvec(&compact).expect("event payloads always encode"))
        }),
    };
    match payload {
        Some(payload) => NewEvent {
            event_type: event.event_type(),
            schema_version: DEVICE_EVENT_SCHEMA,
            payload,
            at: Some(event.at()),
        },
        // Only the legacy types, never raised any more: kept readable by writing them as before.
        None => NewEvent {
            event_type: event.event_type(),
            schema_version: JSON_SCHEMA,
            payload: Bytes::from(event.to_json()),
            at: Some(event.at()),
        },
    }
}

/// Reads a stored device event, whatever schema it was written in.
pub fn decode_device_event(recorded: &RecordedEvent) -> Result<DeviceEvent, DamagedEvent> {
    decode_device_payload(recorded).map_err(|e| DamagedEvent::new(recorded, e))
}

fn decode_device_payload(recorded: &RecordedEvent) -> Result<DeviceEvent, PayloadError> {
    match recorded.schema_version {
        JSON_SCHEMA => Ok(serde_json::from_slice(&recorded.payload)?),
        DEVICE_EVENT_SCHEMA => {
            let device_id = DeviceId::parse(&*recorded.stream).map_err(PayloadError::Stream)?;
            let at = recorded.at.ok_or(PayloadError::NoTime)?;
            if &*recorded.event_type == READING_RECORDED {
                return reading::decode(&recorded.payload, device_id, at);
            }
            let compact: Compact = postcard::from_bytes(&recorded.payload)?;
            compact.into_event(&recorded.event_type, device_id, at)
        }
        other => Err(PayloadError::Schema(other)),
    }
}

/// The postcard payloads of schema 2's rarer device events: the event's fields but the device id
/// and time. One enum, so the type is checked against the stored one as well.
#[derive(Serialize, Deserialize)]
enum Compact {
    Registered {
        location: Location,
        temperature: Temperature,
    },
    LeftZone {
        zone_id: RuleId,
        zone_revision: u64,
        location: Location,
        found_outside: bool,
    },
    EnteredZone {
        zone_id: RuleId,
        location: Location,
    },
    OutOfRange {
        range_id: RuleId,
        range_revision: u64,
        bound: Bound,
        temperature: Temperature,
        limit: Temperature,
        found_out_of_range: bool,
    },
    BackInRange {
        range_id: RuleId,
        temperature: Temperature,
    },
    // Alarms. Variants and the enums in them are postcard indexes: only ever append.
    WentOffline {
        last_seen: DateTime<Utc>,
    },
    BackOnline {
        offline_since: DateTime<Utc>,
    },
    OfflineAfterSet {
        offline_after_s: Option<u64>,
    },
    /// Alarm ids are the device's (the stream) and a number: only the number is stored.
    AlarmOpened {
        alarm: u64,
        kind: AlarmKind,
        rule_id: Option<RuleId>,
        severity: Severity,
        cause_version: u64,
    },
    AlarmAcknowledged {
        alarm: u64,
        kind: AlarmKind,
        rule_id: Option<RuleId>,
        severity: Severity,
        sequence: u32,
        by: String,
        comment: Option<String>,
    },
    AlarmCleared {
        alarm: u64,
        kind: AlarmKind,
        rule_id: Option<RuleId>,
        severity: Severity,
        sequence: u32,
    },
}

impl Compact {
    fn from_event(event: &DeviceEvent) -> Option<Self> {
        Some(match event.clone() {
            DeviceEvent::DeviceRegistered {
                location,
                temperature,
                ..
            } => Compact::Registered {
                location,
                temperature,
            },
            DeviceEvent::LeftZone {
                zone_id,
                zone_revision,
                location,
                found_outside,
                ..
            } => Compact::LeftZone {
                zone_id,
                zone_revision,
                location,
                found_outside,
            },
            DeviceEvent::EnteredZone {
                zone_id, location, ..
            } => Compact::EnteredZone { zone_id, location },
            DeviceEvent::TemperatureOutOfRange {
                range_id,
                range_revision,
                bound,
                temperature,
                limit,
                found_out_of_range,
                ..
            } => Compact::OutOfRange {
                range_id,
                range_revision,
                bound,
                temperature,
                limit,
                found_out_of_range,
            },
            DeviceEvent::TemperatureBackInRange {
                range_id,
                temperature,
                ..
            } => Compact::BackInRange {
                range_id,
                temperature,
            },
            DeviceEvent::DeviceWentOffline { last_seen, .. } => Compact::WentOffline { last_seen },
            DeviceEvent::DeviceBackOnline { offline_since, .. } => {
                Compact::BackOnline { offline_since }
            }
            DeviceEvent::OfflineAfterSet {
                offline_after_s, ..
            } => Compact::OfflineAfterSet { offline_after_s },
            DeviceEvent::AlarmOpened {
                alarm_id,
                kind,
                rule_id,
                severity,
                cause_version,
                ..
            } => Compact::AlarmOpened {
                alarm: alarm_id.number(),
                kind,
                rule_id,
                severity,
                cause_version,
            },
            DeviceEvent::AlarmAcknowledged {
                alarm_id,
                kind,
                rule_id,
                severity,
                sequence,
                by,
                comment,
                ..
            } => Compact::AlarmAcknowledged {
                alarm: alarm_id.number(),
                kind,
                rule_id,
                severity,
                sequence,
                by,
                comment,
            },
            DeviceEvent::AlarmCleared {
                alarm_id,
                kind,
                rule_id,
                severity,
                sequence,
                ..
            } => Compact::AlarmCleared {
                alarm: alarm_id.number(),
                kind,
                rule_id,
                severity,
                sequence,
            },
            DeviceEvent::ReadingRecorded { .. }
            | DeviceEvent::LocationChanged { .. }
            | DeviceEvent::TemperatureChanged { .. } => return None,
        })
    }

    fn into_event(
        self,
        event_type: &str,
        device_id: DeviceId,
        at: DateTime<Utc>,
    ) -> Result<DeviceEvent, PayloadError> {
        let event = match self {
            Compact::Registered {
                location,
                temperature,
            } => DeviceEvent::DeviceRegistered {
                device_id,
                at,
                location,
                temperature,
            },
            Compact::LeftZone {
                zone_id,
                zone_revision,
                location,
                found_outside,
            } => DeviceEvent::LeftZone {
                device_id,
                at,
                zone_id,
                zone_revision,
                location,
                found_outside,
            },
            Compact::EnteredZone { zone_id, location } => DeviceEvent::EnteredZone {
                device_id,
                at,
                zone_id,
                location,
            },
            Compact::OutOfRange {
                range_id,
                range_revision,
                bound,
                temperature,
                limit,
                found_out_of_range,
            } => DeviceEvent::TemperatureOutOfRange {
                device_id,
                at,
                range_id,
                range_revision,
                bound,
                temperature,
                limit,
                found_out_of_range,
            },
            Compact::BackInRange {
                range_id,
                temperature,
            } => DeviceEvent::TemperatureBackInRange {
                device_id,
                at,
                range_id,
                temperature,
            },
            Compact::WentOffline { last_seen } => DeviceEvent::DeviceWentOffline {
                device_id,
                at,
                last_seen,
            },
            Compact::BackOnline { offline_since } => DeviceEvent::DeviceBackOnline {
                device_id,
                at,
                offline_since,
            },
            Compact::OfflineAfterSet { offline_after_s } => DeviceEvent::OfflineAfterSet {
                device_id,
                at,
                offline_after_s,
            },
            Compact::AlarmOpened {
                alarm,
                kind,
                rule_id,
                severity,
                cause_version,
            } => DeviceEvent::AlarmOpened {
                alarm_id: AlarmId::new(device_id.clone(), alarm),
                device_id,
                at,
                kind,
                rule_id,
                severity,
                cause_version,
            },
            Compact::AlarmAcknowledged {
                alarm,
                kind,
                rule_id,
                severity,
                sequence,
                by,
                comment,
            } => DeviceEvent::AlarmAcknowledged {
                alarm_id: AlarmId::new(device_id.clone(), alarm),
                device_id,
                at,
                kind,
                rule_id,
                severity,
                sequence,
                by,
                comment,
            },
            Compact::AlarmCleared {
                alarm,
                kind,
                rule_id,
                severity,
                sequence,
            } => DeviceEvent::AlarmCleared {
                alarm_id: AlarmId::new(device_id.clone(), alarm),
                device_id,
                at,
                kind,
                rule_id,
                severity,
                sequence,
            },
        };
        if event.event_type() == event_type {
            Ok(event)
        } else {
            Err(PayloadError::Type)
        }
    }
}

/// The layout of a recorded reading (see the module docs).
mod reading {
    use bytes::{BufMut, Bytes, BytesMut};
    use chrono::{DateTime, Utc};
    use fleetwatch_domain::{DeviceEvent, DeviceId, Location, Temperature};

    use super::PayloadError;

    const MOVED: u8 = 1;
    const TEMPERATURE_CHANGED: u8 = 1 << 1;
    const LATE: u8 = 1 << 2;
    /// The position is two `f64`s rather than two scaled `i32`s.
    const FULL_POSITION: u8 = 1 << 3;
    /// The temperature is an `f64` rather than a scaled `i16`.
    const FULL_TEMPERATURE: u8 = 1 << 4;
    const KNOWN: u8 = MOVED | TEMPERATURE_CHANGED | LATE | FULL_POSITION | FULL_TEMPERATURE;

    const DEGREE_SCALE: f64 = 1e7;
    const CELSIUS_SCALE: f64 = 100.0;

    pub struct Flags {
        pub moved: bool,
        pub temperature_changed: bool,
        pub late: bool,
    }

    /// `value * scale` as an integer, if dividing that integer by `scale` gives `value` back
    /// exactly.
    fn scaled<T: TryFrom<i64> + Into<f64> + Copy>(value: f64, scale: f64) -> Option<T> {
        let n = (value * scale).round();
        if !n.is_finite() || n.abs() > i64::MAX as f64 {
            return None;
        }
        let small = T::try_from(n as i64).ok()?;
        (small.into() / scale == value).then_some(small)
    }

    pub fn encode(location: Location, temperature: Temperature, rules: u64, f: Flags) -> Bytes {
        let mut flags = 0u8;
        flags |= if f.moved { MOVED } else { 0 };
        flags |= if f.temperature_changed {
            TEMPERATURE_CHANGED
        } else {
            0
        };
        flags |= if f.late { LATE } else { 0 };
        let position = scaled::<i32>(location.lat(), DEGREE_SCALE)
            .zip(scaled::<i32>(location.lon(), DEGREE_SCALE));
        let celsius = scaled::<i16>(temperature.celsius(), CELSIUS_SCALE);
        flags |= if position.is_none() { FULL_POSITION } else { 0 };
        flags |= if celsius.is_none() {
            FULL_TEMPERATURE
        } else {
            0
        };
        let mut out = BytesMut::with_capacity(30);
        out.put_u8(flags);
        match position {
            Some((lat, lon)) => {
                out.put_i32_le(lat);
                out.put_i32_le(lon);
            }
            None => {
                out.put_f64_le(location.lat());
                out.put_f64_le(location.lon());
            }
        }
        match celsius {
            Some(c) => out.put_i16_le(c),
            None => out.put_f64_le(temperature.celsius()),
        }
        let mut rules = rules;
        loop {
            let byte = (rules & 0x7f) as u8;
            rules >>= 7;
            if rules == 0 {
                out.put_u8(byte);
                break;
            }
            out.put_u8(byte | 0x80);
        }
        out.freeze()
    }

    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
            let (head, rest) = self
                .0
                .split_first_chunk::<N>()
                .ok_or(PayloadError::Layout("a recorded reading cut short"))?;
            self.0 = rest;
            Ok(*head)
        }

        fn varint(&mut self) -> Result<u64, PayloadError> {
            let mut value = 0u64;
            for shift in (0..64).step_by(7) {
                let [byte] = self.take::<1>()?;
                value |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Ok(value);
                }
            }
            Err(PayloadError::Layout("a rules version longer than 64 bits"))
        }
    }

    pub fn decode(
        payload: &[u8],
        device_id: DeviceId,
        at: DateTime<Utc>,
    ) -> Result<DeviceEvent, PayloadError> {
        let mut r = Reader(payload);
        let [flags] = r.take::<1>()?;
        if flags & !KNOWN != 0 {
            return Err(PayloadError::Layout("unknown flags in a recorded reading"));
        }
        let (lat, lon) = if flags & FULL_POSITION != 0 {
            (f64::from_le_bytes(r.take()?), f64::from_le_bytes(r.take()?))
        } else {
            (
                f64::from(i32::from_le_bytes(r.take()?)) / DEGREE_SCALE,
                f64::from(i32::from_le_bytes(r.take()?)) / DEGREE_SCALE,
            )
        };
        let celsius = if flags & FULL_TEMPERATURE != 0 {
            f64::from_le_bytes(r.take()?)
        } else {
            f64::from(i16::from_le_bytes(r.take()?)) / CELSIUS_SCALE
        };
        let rules_version = r.varint()?;
        if !r.0.is_empty() {
            return Err(PayloadError::Layout("bytes after a recorded reading"));
        }
        Ok(DeviceEvent::ReadingRecorded {
            device_id,
            at,
            location: Location::new(lat, lon)?,
            temperature: Temperature::new(celsius)?,
            rules_version,
            moved: flags & MOVED != 0,
            temperature_changed: flags & TEMPERATURE_CHANGED != 0,
            late: flags & LATE != 0,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rules events

pub fn encode_rules_event(event: &RulesEvent) -> NewEvent {
    NewEvent {
        event_type: event.event_type(),
        schema_version: JSON_SCHEMA,
        payload: Bytes::from(event.to_json()),
        at: None,
    }
}

pub fn decode_rules_event(recorded: &RecordedEvent) -> Result<RulesEvent, DamagedEvent> {
    match recorded.schema_version {
        JSON_SCHEMA => serde_json::from_slice(&recorded.payload)
            .map_err(|e| DamagedEvent::new(recorded, PayloadError::Json(e))),
        other => Err(DamagedEvent::new(recorded, PayloadError::Schema(other))),
    }
}

// ---------------------------------------------------------------------------------------------
// Any stored event, as JSON

/// A stored event's payload as JSON, the shape the API shows: the domain's serde form of the
/// event whatever schema stored it. `None` if it cannot be read.
pub fn event_json(recorded: &RecordedEvent) -> Option<serde_json::Value> {
    if recorded.stream.starts_with('$') || recorded.schema_version == JSON_SCHEMA {
        return serde_json::from_slice(&recorded.payload).ok();
    }
    let event = decode_device_event(recorded).ok()?;
    serde_json::to_value(event).ok()
}

/// The envelope the API shows for a stored event. A payload this build cannot read is shown as a
/// string (its bytes, lossily as text) so that one damaged event neither fails a page nor ends a
/// live stream.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Event, example = json!({"position": 1234, "stream": "truck-7", "version": 42, "type": "LeftZone", "schema_version": 2, "recorded_at": "2026-11-23T18:00:00.123456Z", "data": {"type": "LeftZone", "device_id": "truck-7", "at": "2026-11-23T18:00:00Z", "zone_id": "depot", "zone_revision": 3, "location": {"lat": 52.4, "lon": 4.95}, "found_outside": false}}))]
pub struct EventView<'a> {
    /// Global position in the store: strictly increasing.
    pub position: u64,
    /// The device id, or `$rules` for zone and range changes.
    pub stream: &'a str,
    /// 1-based version within its stream.
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// How the event is stored (see docs/design.md); its JSON here is the same in every schema.
    pub schema_version: u16,
    /// When the store committed it.
    pub recorded_at: DateTime<Utc>,
    /// The event itself (it repeats `type`).
    #[schema(value_type = crate::http::schemas::EventData)]
    pub data: EventData,
}

/// An event's payload as the API shows it, serialised straight from what was read (no
/// intermediate JSON tree: the live stream does this for every event it sends).
pub enum EventData {
    Device(DeviceEvent),
    /// A JSON payload (rules events, device events of schema 1), passed through as stored.
    Json(Box<serde_json::value::RawValue>),
    Damaged(String),
}

impl Serialize for EventData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventData::Device(event) => event.serialize(s),
            EventData::Json(raw) => raw.serialize(s),
            EventData::Damaged(text) => s.serialize_str(text),
        }
    }
}

impl EventData {
    pub fn of(recorded: &RecordedEvent) -> Self {
        let damaged =
            || EventData::Damaged(String::from_utf8_lossy(&recorded.payload).into_owned());
        if recorded.stream.starts_with('$') || recorded.schema_version == JSON_SCHEMA {
            return std::str::from_utf8(&recorded.payload)
                .ok()
                .and_then(|text| serde_json::value::RawValue::from_string(text.to_owned()).ok())
                .map_or_else(damaged, EventData::Json);
        }
        decode_device_event(recorded).map_or_else(|_| damaged(), EventData::Device)
    }
}

impl<'a> EventView<'a> {
    pub fn new(recorded: &'a RecordedEvent) -> Self {
        Self {
            position: recorded.position,
            stream: &recorded.stream,
            version: recorded.version,
            event_type: &recorded.event_type,
            schema_version: recorded.schema_version,
            recorded_at: recorded.recorded_at,
            data: EventData::of(recorded),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots

pub fn encode_device_snapshot(device: &Device) -> Snapshot {
    Snapshot {
        stream: device.id().to_string(),
        version: device.version(),
        schema_version: DEVICE_SNAPSHOT_VERSION,
        // Plain data: serialising it cannot fail.
        payload: Bytes::from(serde_json::to_vec(device).expect("device state always serialises")),
    }
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
pub fn decode_device_snapshot(
    id: &DeviceId,
    snapshot: &Snapshot,
) -> Result<Device, UnreadableSnapshot> {
    if snapshot.schema_version != DEVICE_SNAPSHOT_VERSION {
        return Err(UnreadableSnapshot::Format {
            found: snapshot.schema_version,
        });
    }
    let device = serde_json::from_slice::<Device>(&snapshot.payload)?;
    if device.id() != id {
        return Err(UnreadableSnapshot::OtherDevice {
            found: device.id().to_string(),
        });
    }
    Ok(device)
}

#[cfg(test)]
mod tests;
