//! fleetwatch's domain model: the rules that decide what a device reading means.
//!
//! This crate is pure: no I/O, no async, no framework types. The engine feeds it readings and
//! stores whatever events it returns; everything it decides can be tested with plain values.
//!
//! * [`values`]: validated value objects (device ids, locations, temperatures, readings).
//! * [`zone`] and [`range`]: the watch zones and temperature ranges devices must stay within.
//! * [`rules`]: the current set of zones and ranges plus the change thresholds.
//! * [`alarm`]: alarms, their kinds, severities and ids.
//! * [`device`]: the Device aggregate, a decider: `handle(reading, rules) -> events`, `apply(event)`.
//! * [`event`]: the events, with their stable, versioned JSON shape.

pub mod alarm;
pub mod device;
pub mod event;
pub mod range;
pub mod rules;
pub mod values;
pub mod zone;

pub use alarm::{
    AckRefused, ActiveAlarm, AlarmId, AlarmKey, AlarmKind, AlarmState, Condition, Severity,
};
pub use device::{Decision, Device, DeviceStatus, RangeAlarm};
pub use event::{AlarmChange, AlarmChangeDetail, DeviceEvent, RulesEvent, TemperatureDirection};
pub use range::{Bound, TemperatureRange};
pub use rules::{Rules, Thresholds};
pub use values::{DeviceId, Location, Reading, RuleId, Temperature, ValidationError};
pub use zone::{ShapeSpec, Watched, Zone, ZoneShape};
