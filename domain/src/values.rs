//! Value objects: each refuses bad input with a [`ValidationError`] naming the offending field.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

/// Why a value was refused. `field` names the input field, so callers can point at it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Longest accepted identifier, in characters.
pub const MAX_ID_LEN: usize = 128;

fn validate_id(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "must be at most {MAX_ID_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(ValidationError::new(
            field,
            format!("may only contain [A-Za-z0-9._:-], found {bad:?}"),
        ));
    }
    Ok(())
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        ///
        /// Shared, not copied: an id goes into every event, map key and message about its
        /// device, and a clone is a reference count, not an allocation.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(value: impl AsRef<str>) -> Result<Self, ValidationError> {
                let value = value.as_ref();
                validate_id($field, value)?;
                Ok(Self(value.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.as_ref().to_owned()
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

identifier!(
    /// A device's identity: 1..=128 characters of `[A-Za-z0-9._:-]`.
    DeviceId,
    "device_id"
);
identifier!(
    /// The identity of a watch zone or a temperature range; same alphabet as [`DeviceId`].
    RuleId,
    "id"
);

/// A WGS84 position in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLocation")]
pub struct Location {
    lat: f64,
    lon: f64,
}

#[derive(Deserialize)]
struct RawLocation {
    lat: f64,
    lon: f64,
}

impl TryFrom<RawLocation> for Location {
    type Error = ValidationError;
    fn try_from(raw: RawLocation) -> Result<Self, Self::Error> {
        Location::new(raw.lat, raw.lon)
    }
}

impl Location {
    pub fn new(lat: f64, lon: f64) -> Result<Self, ValidationError> {
        if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(ValidationError::new(
                "lat",
                format!("must be a finite number within [-90, 90], got {lat}"),
            ));
        }
        if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
            return Err(ValidationError::new(
                "lon",
                format!("must be a finite number within [-180, 180], got {lon}"),
            ));
        }
        Ok(Self { lat, lon })
    }

    pub fn lat(&self) -> f64 {
        self.lat
    }

    pub fn lon(&self) -> f64 {
        self.lon
    }

    /// As a `geo` point (x = longitude, y = latitude).
    pub fn point(&self) -> geo::Point<f64> {
        geo::Point::new(self.lon, self.lat)
    }

    /// Geodesic distance in metres (Karney's algorithm on the WGS84 ellipsoid).
    pub fn distance_m(&self, other: &Location) -> f64 {
        use geo::{Distance, Geodesic};
        Geodesic.distance(self.point(), other.point())
    }

    /// Whether `other` is at least `metres` away (geodesic), decided by the cheap spherical
    /// distance when it is clearly on one side: the sphere is within 0.6 % of the ellipsoid, so
    /// outside a 1 % band the answer is the same, and only inside it is Karney's algorithm run.
    /// Per reading, the geodesic was the domain's largest cost.
    pub fn is_at_least_m(&self, other: &Location, metres: f64) -> bool {
        use geo::{Distance, Haversine};
        let approx = Haversine.distance(self.point(), other.point());
        if approx < metres * 0.99 {
            false
        } else if approx > metres * 1.01 {
            true
        } else {
            self.distance_m(other) >= metres
        }
    }

    /// The heading from here to `other`, in degrees clockwise from north, within [0, 360).
    pub fn bearing_deg(&self, other: &Location) -> f64 {
        use geo::{Bearing, Geodesic};
        Geodesic
            .bearing(self.point(), other.point())
            .rem_euclid(360.0)
    }
}

/// A temperature in °C.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Temperature(f64);

impl Temperature {
    /// The physically plausible band for the sensors fleetwatch watches.
    pub const MIN: f64 = -100.0;
    pub const MAX: f64 = 200.0;

    pub fn new(celsius: f64) -> Result<Self, ValidationError> {
        Self::checked("temperature", celsius)
    }

    /// Like [`Temperature::new`] but reports errors against another field name (e.g. a range's `min`).
    pub fn checked(field: &'static str, celsius: f64) -> Result<Self, ValidationError> {
        if !celsius.is_finite() || !(Self::MIN..=Self::MAX).contains(&celsius) {
            return Err(ValidationError::new(
                field,
                format!(
                    "must be a finite temperature within [{}, {}] °C, got {celsius}",
                    Self::MIN,
                    Self::MAX
                ),
            ));
        }
        Ok(Self(celsius))
    }

    pub fn celsius(&self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Temperature {
    type Error = ValidationError;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Temperature::new(value)
    }
}

impl From<Temperature> for f64 {
    fn from(t: Temperature) -> f64 {
        t.0
    }
}

/// One validated reading from a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device_id: DeviceId,
    pub timestamp: DateTime<Utc>,
    pub location: Location,
    pub temperature: Temperature,
}

impl Reading {
    /// Validates raw fields; the first invalid field wins, in declaration order. The timestamp
    /// is kept to the microsecond, the precision events are stored and replayed at, so that a
    /// decision made live and one replayed from the store see the same times.
    pub fn new(
        device_id: impl AsRef<str>,
        timestamp: DateTime<Utc>,
        lat: f64,
        lon: f64,
        temperature: f64,
    ) -> Result<Self, ValidationError> {
        Ok(Self {
            device_id: DeviceId::parse(device_id)?,
            timestamp: timestamp.trunc_subsecs(6),
            location: Location::new(lat, lon)?,
            temperature: Temperature::new(temperature)?,
        })
    }

    /// Parses an RFC 3339 timestamp (any offset), normalised to UTC.
    pub fn parse_timestamp(value: &str) -> Result<DateTime<Utc>, ValidationError> {
        DateTime::parse_from_rfc3339(value)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| ValidationError::new("timestamp", format!("must be RFC 3339: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_accepts_the_documented_alphabet() {
        assert!(DeviceId::parse("truck-7.a_b:c").is_ok());
        assert!(DeviceId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn device_id_refuses_empty_long_and_odd_characters() {
        for bad in ["", "truck 7", "a/b", "émile", "$rules"] {
            let err = DeviceId::parse(bad).unwrap_err();
            assert_eq!(err.field, "device_id", "{bad:?}");
        }
        assert_eq!(
            DeviceId::parse("x".repeat(129)).unwrap_err().field,
            "device_id"
        );
    }

    #[test]
    fn location_refuses_out_of_range_and_non_finite() {
        assert_eq!(Location::new(90.1, 0.0).unwrap_err().field, "lat");
        assert_eq!(Location::new(f64::NAN, 0.0).unwrap_err().field, "lat");
        assert_eq!(Location::new(0.0, -180.5).unwrap_err().field, "lon");
        assert_eq!(Location::new(0.0, f64::INFINITY).unwrap_err().field, "lon");
        assert!(Location::new(-90.0, 180.0).is_ok());
    }

    #[test]
    fn temperature_refuses_implausible_values() {
        assert!(Temperature::new(-100.0).is_ok());
        assert!(Temperature::new(200.0).is_ok());
        assert_eq!(Temperature::new(200.1).unwrap_err().field, "temperature");
        assert_eq!(Temperature::new(f64::NAN).unwrap_err().field, "temperature");
    }

    #[test]
    fn bearings_point_clockwise_from_north() {
        let here = Location::new(52.0, 4.0).unwrap();
        let north = Location::new(52.1, 4.0).unwrap();
        let east = Location::new(52.0, 4.1).unwrap();
        let south = Location::new(51.9, 4.0).unwrap();
        assert!(
            here.bearing_deg(&north).abs() < 0.01
                || (here.bearing_deg(&north) - 360.0).abs() < 0.01
        );
        assert!((here.bearing_deg(&east) - 90.0).abs() < 0.1);
        assert!((here.bearing_deg(&south) - 180.0).abs() < 0.01);
    }

    #[test]
    fn the_cheap_threshold_test_agrees_with_the_geodesic() {
        let here = Location::new(52.37, 4.89).unwrap();
        // Around the threshold, in every direction, at several latitudes.
        for lat in [-80.0, -45.0, 0.0, 30.0, 52.37, 70.0, 89.0] {
            let from = Location::new(lat, 4.89).unwrap();
            for step in 0..72 {
                let bearing = f64::from(step) * 5.0_f64;
                for metres in [0.5, 10.0, 24.7, 24.9, 25.0, 25.1, 25.3, 100.0, 5_000.0] {
                    let (dlat, dlon) = (
                        metres * bearing.to_radians().cos() / 111_000.0,
                        metres * bearing.to_radians().sin() / 111_000.0,
                    );
                    let to = Location::new((lat + dlat).clamp(-90.0, 90.0), 4.89 + dlon).unwrap();
                    for threshold in [1.0, 25.0, 100.0] {
                        assert_eq!(
                            from.is_at_least_m(&to, threshold),
                            from.distance_m(&to) >= threshold,
                            "{from:?} -> {to:?}, {threshold} m"
                        );
                    }
                }
            }
        }
        assert!(!here.is_at_least_m(&here, 1.0));
    }

    #[test]
    fn geodesic_distance_matches_known_value() {
        let nyc = Location::new(40.7128, -74.006).unwrap();
        let london = Location::new(51.5074, -0.1278).unwrap();
        assert_eq!(nyc.distance_m(&london).round(), 5_585_234.0);
    }

    #[test]
    fn timestamps_are_normalised_to_utc() {
        let t = Reading::parse_timestamp("2026-11-23T19:00:00+01:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-23T18:00:00+00:00");
        assert_eq!(
            Reading::parse_timestamp("yesterday").unwrap_err().field,
            "timestamp"
        );
    }

    #[test]
    fn deserialising_a_location_validates_it() {
        let err = serde_json::from_str::<Location>(r#"{"lat": 95, "lon": 0}"#).unwrap_err();
        assert!(err.to_string().contains("lat"), "{err}");
    }
}
