//! Temperature ranges: the band a device's temperature must stay within.

use serde::{Deserialize, Serialize};

use crate::alarm::Severity;
use crate::values::{DeviceId, RuleId, Temperature, ValidationError};
use crate::zone::{is_zero, validate_name, Watched};

/// Which side of a range a temperature fell out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Below,
    Above,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RangeSpec")]
pub struct TemperatureRange {
    pub id: RuleId,
    pub name: String,
    pub min: Temperature,
    pub max: Temperature,
    pub devices: Watched,
    /// The rules version at which this range was created (see [`crate::Zone::revision`]).
    pub revision: u64,
    #[serde(skip_serializing_if = "Severity::is_default")]
    pub severity: Severity,
    /// Seconds out of range before the alarm opens, and back in before it clears (see
    /// [`crate::Zone::dwell`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub dwell: u64,
}

#[derive(Deserialize)]
struct RangeSpec {
    id: RuleId,
    #[serde(default)]
    name: String,
    min: Temperature,
    max: Temperature,
    #[serde(default)]
    devices: Watched,
    #[serde(default)]
    revision: u64,
    #[serde(default)]
    severity: Severity,
    #[serde(default)]
    dwell: u64,
}

impl TryFrom<RangeSpec> for TemperatureRange {
    type Error = ValidationError;
    fn try_from(spec: RangeSpec) -> Result<Self, Self::Error> {
        let mut range =
            TemperatureRange::new(spec.id, spec.name, spec.min, spec.max, spec.devices)?;
        range.revision = spec.revision;
        Ok(range.with_alarm(spec.severity, spec.dwell))
    }
}

impl TemperatureRange {
    pub fn new(
        id: RuleId,
        name: impl Into<String>,
        min: Temperature,
        max: Temperature,
        devices: Watched,
    ) -> Result<Self, ValidationError> {
        if min >= max {
            return Err(ValidationError::new(
                "max",
                format!(
                    "must be greater than min ({} >= {})",
                    min.celsius(),
                    max.celsius()
                ),
            ));
        }
        Ok(Self {
            id,
            name: validate_name(name.into())?,
            min,
            max,
            devices,
            revision: 0,
            severity: Severity::default(),
            dwell: 0,
        })
    }

    /// The same range with its alarms' severity and dwell.
    pub fn with_alarm(mut self, severity: Severity, dwell: u64) -> Self {
        self.severity = severity;
        self.dwell = dwell;
        self
    }

    pub fn watches(&self, device: &DeviceId) -> bool {
        self.devices.includes(device)
    }

    /// `None` when `t` is within `[min, max]` (bounds included).
    pub fn violation(&self, t: Temperature) -> Option<Bound> {
        if t < self.min {
            Some(Bound::Below)
        } else if t > self.max {
            Some(Bound::Above)
        } else {
            None
        }
    }

    pub fn limit(&self, bound: Bound) -> Temperature {
        match bound {
            Bound::Below => self.min,
            Bound::Above => self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(c: f64) -> Temperature {
        Temperature::new(c).unwrap()
    }

    #[test]
    fn violation_reports_the_bound_and_includes_the_limits() {
        let r = TemperatureRange::new(
            RuleId::parse("r").unwrap(),
            "",
            t(2.0),
            t(8.0),
            Watched::All,
        )
        .unwrap();
        assert_eq!(r.violation(t(1.9)), Some(Bound::Below));
        assert_eq!(r.violation(t(2.0)), None);
        assert_eq!(r.violation(t(8.0)), None);
        assert_eq!(r.violation(t(8.1)), Some(Bound::Above));
        assert_eq!(r.limit(Bound::Above), t(8.0));
    }

    #[test]
    fn min_must_be_below_max() {
        let err = TemperatureRange::new(
            RuleId::parse("r").unwrap(),
            "",
            t(8.0),
            t(8.0),
            Watched::All,
        )
        .unwrap_err();
        assert_eq!(err.field, "max");
        let json = r#"{"id":"r","min":5,"max":1}"#;
        assert!(serde_json::from_str::<TemperatureRange>(json).is_err());
    }
}
