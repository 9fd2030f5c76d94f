//! Watch zones: the areas devices must stay within.

use std::collections::BTreeSet;

use geo::{Intersects, LineString, Polygon, Validation};
use serde::{Deserialize, Serialize};

use crate::alarm::Severity;
use crate::values::{DeviceId, Location, RuleId, ValidationError};

/// Longest accepted zone or range name, in characters.
pub const MAX_NAME_LEN: usize = 200;

/// Which devices a zone or a temperature range applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    from = "Option<BTreeSet<DeviceId>>",
    into = "Option<BTreeSet<DeviceId>>"
)]
pub enum Watched {
    #[default]
    All,
    Devices(BTreeSet<DeviceId>),
}

impl Watched {
    pub fn includes(&self, device: &DeviceId) -> bool {
        match self {
            Watched::All => true,
            Watched::Devices(set) => set.contains(device),
        }
    }
}

impl From<Option<BTreeSet<DeviceId>>> for Watched {
    fn from(devices: Option<BTreeSet<DeviceId>>) -> Self {
        devices.map_or(Watched::All, Watched::Devices)
    }
}

impl From<Watched> for Option<BTreeSet<DeviceId>> {
    fn from(watched: Watched) -> Self {
        match watched {
            Watched::All => None,
            Watched::Devices(set) => Some(set),
        }
    }
}

/// The wire form of a shape, before validation: [`ZoneShape::try_from`] validates it and names
/// the offending field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ShapeSpec {
    Polygon {
        points: Vec<Location>,
    },
    Circle {
        center: Location,
        radius_m: f64,
    },
    Rectangle {
        south_west: Location,
        north_east: Location,
    },
}

/// A validated zone geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ShapeSpec", into = "ShapeSpec")]
pub enum ZoneShape {
    /// A simple polygon in lon/lat, closed ring, not self-intersecting. Points on its edge are inside.
    Polygon(Polygon<f64>),
    /// Every point within `radius_m` metres (geodesic) of `center`.
    Circle { center: Location, radius_m: f64 },
    /// A lat/lon box; it may not cross the antimeridian.
    Rectangle {
        south_west: Location,
        north_east: Location,
    },
}

/// Largest circle radius: half the Earth's circumference.
const MAX_RADIUS_M: f64 = 20_037_508.0;

impl ZoneShape {
    pub fn polygon(points: &[Location]) -> Result<Self, ValidationError> {
        let mut ring: Vec<geo::Coord<f64>> = Vec::with_capacity(points.len() + 1);
        for p in points {
            let c = geo::coord! { x: p.lon(), y: p.lat() };
            if ring.last() != Some(&c) {
                ring.push(c);
            }
        }
        // An explicitly closed ring repeats its first vertex; geo closes open rings itself.
        if ring.len() > 1 && ring.first() == ring.last() {
            ring.pop();
        }
        let distinct: BTreeSet<(u64, u64)> = ring
            .iter()
            .map(|c| (c.x.to_bits(), c.y.to_bits()))
            .collect();
        if distinct.len() < 3 {
            return Err(ValidationError::new(
                "shape.points",
                format!(
                    "a polygon needs at least 3 distinct vertices, got {}",
                    distinct.len()
                ),
            ));
        }
        let polygon = Polygon::new(LineString::new(ring), vec![]);
        polygon
            .check_validation()
            .map_err(|e| ValidationError::new("shape.points", format!("invalid polygon: {e}")))?;
        Ok(ZoneShape::Polygon(polygon))
    }

    pub fn circle(center: Location, radius_m: f64) -> Result<Self, ValidationError> {
        if !radius_m.is_finite() || radius_m <= 0.0 || radius_m > MAX_RADIUS_M {
            return Err(ValidationError::new(
                "shape.radius_m",
                format!("must be a finite number of metres in (0, {MAX_RADIUS_M}], got {radius_m}"),
            ));
        }
        Ok(ZoneShape::Circle { center, radius_m })
    }

    pub fn rectangle(south_west: Location, north_east: Location) -> Result<Self, ValidationError> {
        if south_west.lat() >= north_east.lat() {
            return Err(ValidationError::new(
                "shape.north_east",
                "north_east.lat must be greater than south_west.lat",
            ));
        }
        if south_west.lon() >= north_east.lon() {
            return Err(ValidationError::new(
                "shape.north_east",
                "north_east.lon must be greater than south_west.lon (rectangles may not cross the antimeridian)",
            ));
        }
        Ok(ZoneShape::Rectangle {
            south_west,
            north_east,
        })
    }

    pub fn contains(&self, location: &Location) -> bool {
        match self {
            ZoneShape::Polygon(polygon) => polygon.intersects(&location.point()),
            ZoneShape::Circle { center, radius_m } => center.distance_m(location) <= *radius_m,
            ZoneShape::Rectangle {
                south_west,
                north_east,
            } => {
                (south_west.lat()..=north_east.lat()).contains(&location.lat())
                    && (south_west.lon()..=north_east.lon()).contains(&location.lon())
            }
        }
    }
}

impl TryFrom<ShapeSpec> for ZoneShape {
    type Error = ValidationError;
    fn try_from(spec: ShapeSpec) -> Result<Self, Self::Error> {
        match spec {
            ShapeSpec::Polygon { points } => ZoneShape::polygon(&points),
            ShapeSpec::Circle { center, radius_m } => ZoneShape::circle(center, radius_m),
            ShapeSpec::Rectangle {
                south_west,
                north_east,
            } => ZoneShape::rectangle(south_west, north_east),
        }
    }
}

impl From<ZoneShape> for ShapeSpec {
    fn from(shape: ZoneShape) -> Self {
        match shape {
            ZoneShape::Polygon(polygon) => ShapeSpec::Polygon {
                points: polygon
                    .exterior()
                    .coords()
                    // Coordinates were validated when the polygon was built.
                    .filter_map(|c| Location::new(c.y, c.x).ok())
                    .collect(),
            },
            ZoneShape::Circle { center, radius_m } => ShapeSpec::Circle { center, radius_m },
            ZoneShape::Rectangle {
                south_west,
                north_east,
            } => ShapeSpec::Rectangle {
                south_west,
                north_east,
            },
        }
    }
}

/// A watch zone: where its devices must stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Zone {
    pub id: RuleId,
    #[serde(default)]
    pub name: String,
    pub shape: ZoneShape,
    #[serde(default)]
    pub devices: Watched,
    /// The rules version at which this zone was created. A device first evaluated against this
    /// revision and found outside raises `LeftZone` marked `found_outside`.
    #[serde(default)]
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Severity::is_default")]
    pub severity: Severity,
    /// Seconds a device must be outside before the alarm opens, and back inside before it
    /// clears (0: at once), so that GPS jitter across the border raises nothing.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dwell: u64,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Zone {
    pub fn new(
        id: RuleId,
        name: impl Into<String>,
        shape: ZoneShape,
        devices: Watched,
    ) -> Result<Self, ValidationError> {
        let name = validate_name(name.into())?;
        Ok(Self {
            id,
            name,
            shape,
            devices,
            revision: 0,
            severity: Severity::default(),
            dwell: 0,
        })
    }

    /// The same zone with its alarms' severity and dwell.
    pub fn with_alarm(mut self, severity: Severity, dwell: u64) -> Self {
        self.severity = severity;
        self.dwell = dwell;
        self
    }

    pub fn watches(&self, device: &DeviceId) -> bool {
        self.devices.includes(device)
    }
}

pub(crate) fn validate_name(name: String) -> Result<String, ValidationError> {
    if name.chars().count() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            "name",
            format!("must be at most {MAX_NAME_LEN} characters"),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(lat: f64, lon: f64) -> Location {
        Location::new(lat, lon).unwrap()
    }

    fn square() -> Vec<Location> {
        vec![loc(0.0, 0.0), loc(0.0, 1.0), loc(1.0, 1.0), loc(1.0, 0.0)]
    }

    #[test]
    fn polygon_contains_inside_and_edge_points_only() {
        let shape = ZoneShape::polygon(&square()).unwrap();
        assert!(shape.contains(&loc(0.5, 0.5)));
        assert!(shape.contains(&loc(0.0, 0.5)), "edge counts as inside");
        assert!(!shape.contains(&loc(1.5, 0.5)));
    }

    #[test]
    fn polygon_accepts_open_or_closed_rings_and_stores_it_closed() {
        let mut closed = square();
        closed.push(loc(0.0, 0.0));
        let a = ZoneShape::polygon(&square()).unwrap();
        let b = ZoneShape::polygon(&closed).unwrap();
        assert_eq!(a, b);
        let json = serde_json::to_value(&a).unwrap();
        let points = json["points"].as_array().unwrap();
        assert_eq!(points.len(), 5);
        assert_eq!(points.first(), points.last());
    }

    #[test]
    fn polygon_refuses_too_few_distinct_vertices() {
        let err = ZoneShape::polygon(&[loc(0.0, 0.0), loc(1.0, 1.0), loc(0.0, 0.0)]).unwrap_err();
        assert_eq!(err.field, "shape.points");
        assert!(err.reason.contains("3 distinct"), "{err}");
    }

    #[test]
    fn polygon_refuses_self_intersection() {
        // A bow tie: edges (0,0)-(1,1) and (1,0)-(0,1) cross.
        let bow_tie = [loc(0.0, 0.0), loc(1.0, 1.0), loc(1.0, 0.0), loc(0.0, 1.0)];
        let err = ZoneShape::polygon(&bow_tie).unwrap_err();
        assert_eq!(err.field, "shape.points");
        assert!(err.reason.contains("intersect"), "{err}");
    }

    #[test]
    fn circle_uses_geodesic_distance() {
        let shape = ZoneShape::circle(loc(52.37, 4.89), 1_000.0).unwrap();
        // 0.0089° of latitude is about 990 m; 0.0091° about 1012 m.
        assert!(shape.contains(&loc(52.3789, 4.89)));
        assert!(!shape.contains(&loc(52.3791, 4.89)));
    }

    #[test]
    fn circle_refuses_bad_radius() {
        for r in [0.0, -5.0, f64::NAN, 3e7] {
            assert_eq!(
                ZoneShape::circle(loc(0.0, 0.0), r).unwrap_err().field,
                "shape.radius_m"
            );
        }
    }

    #[test]
    fn rectangle_contains_and_validates_corners() {
        let shape = ZoneShape::rectangle(loc(10.0, 20.0), loc(11.0, 21.0)).unwrap();
        assert!(shape.contains(&loc(10.5, 20.5)));
        assert!(shape.contains(&loc(11.0, 21.0)));
        assert!(!shape.contains(&loc(10.5, 21.5)));
        assert!(ZoneShape::rectangle(loc(11.0, 20.0), loc(10.0, 21.0)).is_err());
        assert!(ZoneShape::rectangle(loc(10.0, 21.0), loc(11.0, 20.0)).is_err());
    }

    #[test]
    fn shapes_round_trip_through_json_with_validation() {
        let json = r#"{"type":"circle","center":{"lat":1,"lon":2},"radius_m":10}"#;
        let shape: ZoneShape = serde_json::from_str(json).unwrap();
        assert_eq!(
            serde_json::from_value::<ZoneShape>(serde_json::to_value(&shape).unwrap()).unwrap(),
            shape
        );
        let bad = r#"{"type":"circle","center":{"lat":1,"lon":2},"radius_m":-1}"#;
        assert!(serde_json::from_str::<ZoneShape>(bad)
            .unwrap_err()
            .to_string()
            .contains("radius_m"));
        let unknown = r#"{"type":"hexagon"}"#;
        assert!(serde_json::from_str::<ZoneShape>(unknown).is_err());
    }

    #[test]
    fn watched_devices_serialise_as_null_or_list() {
        let all: Watched = serde_json::from_str("null").unwrap();
        assert!(all.includes(&DeviceId::parse("any").unwrap()));
        let some: Watched = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert!(some.includes(&DeviceId::parse("a").unwrap()));
        assert!(!some.includes(&DeviceId::parse("c").unwrap()));
        assert_eq!(serde_json::to_string(&some).unwrap(), r#"["a","b"]"#);
    }
}
