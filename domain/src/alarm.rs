//! Alarms: conditions people act on. An alarm opens when a condition (outside a zone, out of a
//! temperature range, offline) has held for the rule's dwell, stays open (at most one per device,
//! kind and rule) until the condition has been gone for the dwell again, and can be acknowledged
//! in between. Every change is a device event, so the lifecycle replays exactly.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::values::{DeviceId, RuleId, ValidationError};

/// What an alarm is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    OutsideZone,
    TemperatureOutOfRange,
    Offline,
}

impl AlarmKind {
    pub const ALL: [AlarmKind; 3] = [
        AlarmKind::OutsideZone,
        AlarmKind::TemperatureOutOfRange,
        AlarmKind::Offline,
    ];

    /// An alarm's rule, when it is a zone (alarms of this kind name a zone as their rule).
    pub fn zone<R>(self, rule: Option<R>) -> Option<R> {
        rule.filter(|_| self == AlarmKind::OutsideZone)
    }

    /// An alarm's rule, when it is a temperature range.
    pub fn range<R>(self, rule: Option<R>) -> Option<R> {
        rule.filter(|_| self == AlarmKind::TemperatureOutOfRange)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::OutsideZone => "outside_zone",
            AlarmKind::TemperatureOutOfRange => "temperature_out_of_range",
            AlarmKind::Offline => "offline",
        }
    }
}

impl fmt::Display for AlarmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AlarmKind {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlarmKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "kind",
                    format!("must be outside_zone, temperature_out_of_range or offline, got {s:?}"),
                )
            })
    }
}

/// How urgent an alarm is; set per zone or range.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Severity::default()
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "severity",
                    format!("must be info, warning or critical, got {s:?}"),
                )
            })
    }
}

/// An alarm's id: the device and the device's count of alarms, `truck-7.12`. The device comes
/// first so that the id alone routes a command to the device's actor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AlarmId {
    device: DeviceId,
    number: u64,
}

impl AlarmId {
    pub fn new(device: DeviceId, number: u64) -> Self {
        Self { device, number }
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        let invalid = || ValidationError::new("id", format!("not an alarm id: {value:?}"));
        let (device, number) = value.rsplit_once('.').ok_or_else(invalid)?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let number = number.parse().map_err(|_| invalid())?;
        let device = DeviceId::parse(device).map_err(|_| invalid())?;
        Ok(Self { device, number })
    }
}

impl fmt::Display for AlarmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.device, self.number)
    }
}

impl TryFrom<String> for AlarmId {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        AlarmId::parse(&value)
    }
}

impl From<AlarmId> for String {
    fn from(id: AlarmId) -> Self {
        id.to_string()
    }
}

/// The lifecycle state of an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    Open,
    Acknowledged,
    Cleared,
}

impl AlarmState {
    pub const ALL: [AlarmState; 3] = [
        AlarmState::Open,
        AlarmState::Acknowledged,
        AlarmState::Cleared,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Open => "open",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Cleared => "cleared",
        }
    }
}

impl FromStr for AlarmState {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlarmState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "state",
                    format!("must be open, acknowledged, cleared or active, got {s:?}"),
                )
            })
    }
}

/// Which condition an alarm is about: its kind and, for zones and ranges, the rule. Written
/// `kind` or `kind/rule` (rule ids hold no `/`), so that maps keyed by it serialise as JSON.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AlarmKey {
    pub kind: AlarmKind,
    /// The zone or range; none for `offline`.
    pub rule: Option<RuleId>,
}

impl AlarmKey {
    pub fn zone(zone: &RuleId) -> Self {
        Self {
            kind: AlarmKind::OutsideZone,
            rule: Some(zone.clone()),
        }
    }

    pub fn range(range: &RuleId) -> Self {
        Self {
            kind: AlarmKind::TemperatureOutOfRange,
            rule: Some(range.clone()),
        }
    }

    pub fn offline() -> Self {
        Self {
            kind: AlarmKind::Offline,
            rule: None,
        }
    }
}

impl fmt::Display for AlarmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "{}/{rule}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl TryFrom<String> for AlarmKey {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        let (kind, rule) = match value.split_once('/') {
            Some((kind, rule)) => (kind, Some(RuleId::parse(rule)?)),
            None => (value.as_str(), None),
        };
        Ok(Self {
            kind: kind.parse()?,
            rule,
        })
    }
}

impl From<AlarmKey> for String {
    fn from(key: AlarmKey) -> Self {
        key.to_string()
    }
}

/// A condition that holds: since when, under which revision of its rule (0 for offline), and
/// the version of the event that began it on the device's stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub since: DateTime<Utc>,
    pub revision: u64,
    pub cause_version: u64,
}

/// An alarm that has not cleared, as the device keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlarm {
    pub id: AlarmId,
    pub severity: Severity,
    pub opened_at: DateTime<Utc>,
    /// Changes so far (opening is 1): what the next change's sequence number follows.
    pub sequence: u32,
    pub acknowledged: bool,
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckRefused {
    #[error("alarm {0} is not open (it has cleared, or never existed)")]
    NotActive(String),
    #[error("alarm {0} is already acknowledged")]
    AlreadyAcknowledged(String),
}
