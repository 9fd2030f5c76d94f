//! OpenAPI schemas of the domain's JSON shapes (readings, zones, ranges, events).
//!
//! The domain crate stays free of HTTP concerns, and its serde shapes are hand-made (validated
//! newtypes, `try_from`/`into` conversions), so a derived schema of its types would describe
//! their Rust fields rather than their JSON. These types describe the JSON instead; they are
//! never built. `tests/openapi.rs` runs schemathesis against the real engine, which checks that
//! every response matches them.
//!
//! The API's own request and response types derive their schemas where they are defined (the
//! handlers' modules) and refer to these for the domain's parts.

#![allow(dead_code)] // Schemas only: nothing constructs these types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One reading from a device.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"device_id": "truck-7", "timestamp": "2026-11-23T18:00:00Z", "lat": 52.37, "lon": 4.89, "temperature": 4.5}))]
pub struct Reading {
    /// The device: 1..=128 characters of `[A-Za-z0-9._:-]`.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    device_id: String,
    /// When the reading was taken (RFC 3339; stored as UTC). At most `--max-clock-skew`
    /// (default 5 minutes) ahead of the engine's clock.
    timestamp: DateTime<Utc>,
    /// Latitude in degrees.
    #[schema(minimum = -90.0, maximum = 90.0)]
    lat: f64,
    /// Longitude in degrees.
    #[schema(minimum = -180.0, maximum = 180.0)]
    lon: f64,
    /// Temperature in °C.
    #[schema(minimum = -100.0, maximum = 200.0)]
    temperature: f64,
}

/// A WGS84 position in degrees.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"lat": 52.37, "lon": 4.89}))]
pub struct Location {
    #[schema(minimum = -90.0, maximum = 90.0)]
    lat: f64,
    #[schema(minimum = -180.0, maximum = 180.0)]
    lon: f64,
}

/// A zone's geometry, tagged by `type`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Shape {
    /// At least 3 distinct vertices, not self-intersecting; the ring may be given open or closed
    /// (it is stored, and returned, closed).
    Polygon {
        #[schema(min_items = 3)]
        points: Vec<Location>,
    },
    /// A circle on the ellipsoid (geodesic distance).
    Circle {
        center: Location,
        /// Radius in metres, more than 0.
        #[schema(exclusive_minimum = 0.0)]
        radius_m: f64,
    },
    /// A latitude/longitude box.
    Rectangle {
        south_west: Location,
        north_east: Location,
    },
}

/// A stored watch zone.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "depot", "name": "Depot Amsterdam", "shape": {"type": "circle", "center": {"lat": 52.37, "lon": 4.89}, "radius_m": 500.0}, "devices": ["truck-7", "truck-8"], "revision": 3}))]
pub struct Zone {
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    id: String,
    /// Free text, up to 200 characters.
    name: String,
    shape: Shape,
    /// The devices it watches; `null`: every device.
    devices: Option<Vec<String>>,
    /// The version of the `$rules` stream that created the zone (kept when it is replaced).
    revision: u64,
    /// The severity of its alarms (default `warning`; omitted when default).
    severity: Option<Severity>,
    /// Seconds a device must be outside before the alarm opens, and back inside before it
    /// clears (default 0: at once; omitted when 0).
    #[schema(minimum = 0, maximum = 86400)]
    dwell: Option<u64>,
}

/// How urgent an alarm is.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// What an alarm is about.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    OutsideZone,
    TemperatureOutOfRange,
    Offline,
}

/// A stored temperature range.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "cold-chain", "name": "Cold chain", "min": 2.0, "max": 8.0, "devices": null, "revision": 4}))]
pub struct TemperatureRange {
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    id: String,
    name: String,
    /// °C; less than `max`.
    min: f64,
    /// °C.
    max: f64,
    /// The devices it watches; `null`: every device.
    devices: Option<Vec<String>>,
    revision: u64,
    /// The severity of its alarms (default `warning`; omitted when default).
    severity: Option<Severity>,
    /// Seconds out of range before the alarm opens, and back in before it clears (default 0).
    #[schema(minimum = 0, maximum = 86400)]
    dwell: Option<u64>,
}

/// A device's overall condition: `temperature_alarm` if any range alarm is active, else
/// `out_of_zone` if it is outside a zone that watches it, else `offline` if it is silent, else
/// `normal`. `alarms` lists every alarm; this is one word for a marker's colour.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Normal,
    OutOfZone,
    TemperatureAlarm,
    Offline,
}

/// Which side of a temperature range a temperature fell out on.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Below,
    Above,
}

/// Which way a temperature changed.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Increased,
    Decreased,
}

/// A device event, tagged by `type`. `at` is always the timestamp of the reading that caused it.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum DeviceEvent {
    /// The device's first reading.
    DeviceRegistered {
        device_id: String,
        at: DateTime<Utc>,
        location: Location,
        temperature: f64,
    },
    /// One per accepted reading.
    ReadingRecorded {
        device_id: String,
        at: DateTime<Utc>,
        location: Location,
        temperature: f64,
        /// The version of the `$rules` stream (zones and ranges) the reading was judged by.
        rules_version: u64,
        /// `true`: the device moved at least `--min-move-m` from its last reported location,
        /// and this becomes the reported one. Absent otherwise.
        #[serde(default)]
        moved: bool,
        /// `true`: the temperature changed by at least `--min-temperature-delta` from the last
        /// reported one, and this becomes the reported one. Absent otherwise.
        #[serde(default)]
        temperature_changed: bool,
        /// `true`: the reading is older than the device's last one; it is history only (no live
        /// state, no alarm). Absent otherwise.
        #[serde(default)]
        late: bool,
    },
    /// Stores written before one event per reading only; never raised now.
    LocationChanged {
        device_id: String,
        at: DateTime<Utc>,
        from: Location,
        to: Location,
        distance_m: f64,
    },
    /// Stores written before one event per reading only; never raised now.
    TemperatureChanged {
        device_id: String,
        at: DateTime<Utc>,
        from: f64,
        to: f64,
        direction: Direction,
    },
    /// Condition began: the device is outside a zone that watches it (the alarm opens after the
    /// zone's dwell).
    LeftZone {
        device_id: String,
        at: DateTime<Utc>,
        zone_id: String,
        zone_revision: u64,
        location: Location,
        /// `true`: first seen outside (its first reading, or its first after the zone was
        /// created), not seen crossing the boundary.
        found_outside: bool,
    },
    /// Condition ended: the device is back inside the zone.
    EnteredZone {
        device_id: String,
        at: DateTime<Utc>,
        zone_id: String,
        location: Location,
    },
    /// Condition began: the temperature left a range that watches the device.
    TemperatureOutOfRange {
        device_id: String,
        at: DateTime<Utc>,
        range_id: String,
        range_revision: u64,
        bound: Bound,
        temperature: f64,
        /// The range's bound that was crossed.
        limit: f64,
        /// `true`: first seen out of range rather than seen leaving it.
        found_out_of_range: bool,
    },
    /// Condition ended: the temperature is back in the range.
    TemperatureBackInRange {
        device_id: String,
        at: DateTime<Utc>,
        range_id: String,
        temperature: f64,
    },
    /// Condition began: the device sent nothing for its offline period. `at` is when the period
    /// ran out.
    DeviceWentOffline {
        device_id: String,
        at: DateTime<Utc>,
        last_seen: DateTime<Utc>,
    },
    /// Condition ended: the first reading after going offline.
    DeviceBackOnline {
        device_id: String,
        at: DateTime<Utc>,
        offline_since: DateTime<Utc>,
    },
    /// The device's own offline period in seconds (`null`: the engine's default again).
    OfflineAfterSet {
        device_id: String,
        at: DateTime<Utc>,
        offline_after_s: Option<u64>,
    },
    /// An alarm opened: its condition held for the rule's dwell. `cause_version` is the version
    /// of the event that began the condition.
    AlarmOpened {
        device_id: String,
        at: DateTime<Utc>,
        /// `<device>.<n>`.
        alarm_id: String,
        kind: AlarmKind,
        /// The zone or range; absent for `offline`.
        rule_id: Option<String>,
        severity: Severity,
        cause_version: u64,
    },
    /// Someone acknowledged the alarm (`by`: the token's name). `sequence` numbers the alarm's
    /// changes (opened is 1).
    AlarmAcknowledged {
        device_id: String,
        at: DateTime<Utc>,
        alarm_id: String,
        kind: AlarmKind,
        rule_id: Option<String>,
        severity: Severity,
        sequence: u32,
        by: String,
        comment: Option<String>,
    },
    /// The alarm cleared: its condition had been gone for the dwell, or its rule was removed.
    AlarmCleared {
        device_id: String,
        at: DateTime<Utc>,
        alarm_id: String,
        kind: AlarmKind,
        rule_id: Option<String>,
        severity: Severity,
        sequence: u32,
    },
}

/// A change to the zones and ranges, on the `$rules` stream, tagged by `type`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum RulesEvent {
    ZoneDefined { zone: Zone },
    ZoneRemoved { zone_id: String },
    TemperatureRangeDefined { range: TemperatureRange },
    TemperatureRangeRemoved { range_id: String },
}

/// An event's payload: a device event, a rules event, or, for a stored event whose payload is
/// damaged, the stored text as a string (`fleetwatch verify` lists such events).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EventData {
    Device(DeviceEvent),
    Rules(RulesEvent),
    Damaged(String),
}
