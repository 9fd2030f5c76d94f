//! The rule set a reading is judged against: zones, temperature ranges and change thresholds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::RulesEvent;
use crate::range::TemperatureRange;
use crate::values::{RuleId, ValidationError};
use crate::zone::Zone;

/// How much a device must change before it is worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// `LocationChanged` only once the device is at least this far (metres) from its last reported location.
    pub min_move_m: f64,
    /// `TemperatureChanged` only once the temperature differs by at least this much (°C) from the last reported one.
    pub min_temperature_delta: f64,
    /// A device silent for this long (seconds) goes offline, unless it has its own period.
    #[serde(default = "default_offline_after_s")]
    pub offline_after_s: u64,
}

fn default_offline_after_s() -> u64 {
    600
}

impl Thresholds {
    pub fn new(min_move_m: f64, min_temperature_delta: f64) -> Result<Self, ValidationError> {
        if !min_move_m.is_finite() || min_move_m < 0.0 {
            return Err(ValidationError::new(
                "min_move_m",
                "must be a finite number >= 0",
            ));
        }
        if !min_temperature_delta.is_finite() || min_temperature_delta < 0.0 {
            return Err(ValidationError::new(
                "min_temperature_delta",
                "must be a finite number >= 0",
            ));
        }
        Ok(Self {
            min_move_m,
            min_temperature_delta,
            offline_after_s: default_offline_after_s(),
        })
    }

    /// The same thresholds with another default offline period (seconds, at least 1).
    pub fn with_offline_after(mut self, seconds: u64) -> Result<Self, ValidationError> {
        if seconds == 0 {
            return Err(ValidationError::new(
                "offline_after",
                "must be at least 1 s",
            ));
        }
        self.offline_after_s = seconds;
        Ok(self)
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_move_m: 25.0,
            min_temperature_delta: 0.5,
            offline_after_s: default_offline_after_s(),
        }
    }
}

/// The zones and ranges in force, as a fold of [`RulesEvent`]s.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub zones: BTreeMap<RuleId, Zone>,
    pub ranges: BTreeMap<RuleId, TemperatureRange>,
    pub thresholds: Thresholds,
    /// Number of rules events applied: the version of the `$rules` stream.
    pub version: u64,
}

impl Rules {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            ..Self::default()
        }
    }

    pub fn apply(&mut self, event: &RulesEvent) {
        self.version += 1;
        match event {
            RulesEvent::ZoneDefined { zone } => {
                self.zones.insert(zone.id.clone(), zone.clone());
            }
            RulesEvent::ZoneRemoved { zone_id } => {
                self.zones.remove(zone_id);
            }
            RulesEvent::TemperatureRangeDefined { range } => {
                self.ranges.insert(range.id.clone(), range.clone());
            }
            RulesEvent::TemperatureRangeRemoved { range_id } => {
                self.ranges.remove(range_id);
            }
        }
    }

    /// The event that stores `zone`, created or replaced. A replaced zone keeps its revision, so
    /// editing a zone's shape does not re-raise alarms that are already active.
    pub fn define_zone(&self, mut zone: Zone) -> RulesEvent {
        zone.revision = match self.zones.get(&zone.id) {
            Some(existing) => existing.revision,
            None => self.version + 1,
        };
        RulesEvent::ZoneDefined { zone }
    }

    /// Like [`Rules::define_zone`], for temperature ranges.
    pub fn define_range(&self, mut range: TemperatureRange) -> RulesEvent {
        range.revision = match self.ranges.get(&range.id) {
            Some(existing) => existing.revision,
            None => self.version + 1,
        };
        RulesEvent::TemperatureRangeDefined { range }
    }
}
