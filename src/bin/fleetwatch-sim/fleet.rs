//! The simulated fleet: where each device drives and how warm its cargo is. No I/O here.
//!
//! Devices live on a flat local map in metres east and north of the fleet's centre (accurate to
//! well under 0.1 % over the few kilometres they cover). Every reading advances its device by one
//! step of `step_seconds`, the nominal time between two readings of the same device, so a given
//! seed and set of flags always produce the same paths, whatever the scheduling jitter.
//!
//! * Normal devices start within [`START_RADIUS_M`] of the centre, wander with a slowly changing
//!   heading and turn back before they reach the edge of the [`ZONE_RADIUS_M`] zone. Their
//!   temperature is a random walk around 5 °C that stays within 3..=7 °C.
//! * Rogue devices head out of the zone and warm up past 9 °C. Each has a breakout step, between
//!   20 % and 50 % of the run's expected steps per device, by which it is outside the zone and
//!   above the cold-chain maximum, so alarms fire even in a short run.

use std::f64::consts::{PI, TAU};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Serialize, Serializer};

/// Devices start within this distance of the centre.
pub const START_RADIUS_M: f64 = 3_000.0;
/// Radius of the demo zone: normal devices never leave it, rogues do.
pub const ZONE_RADIUS_M: f64 = 5_000.0;
/// Bounds of the demo temperature range, in °C.
pub const COLD_CHAIN_MIN_C: f64 = 2.0;
pub const COLD_CHAIN_MAX_C: f64 = 8.0;

/// Mean Earth radius × π / 180.
const METRES_PER_DEGREE: f64 = 111_194.93;
/// Beyond this distance a normal device steers back towards the centre...
const TURN_BACK_RADIUS_M: f64 = 0.8 * ZONE_RADIUS_M;
/// ...and it never goes beyond this one, however long its step.
const NORMAL_LIMIT_RADIUS_M: f64 = 0.9 * ZONE_RADIUS_M;
/// Rogues head outwards until this far out, then roam freely.
const ROGUE_ROAM_RADIUS_M: f64 = 1.5 * ZONE_RADIUS_M;

const MIN_SPEED_MPS: f64 = 5.0;
const MAX_SPEED_MPS: f64 = 20.0;
const SPEED_JITTER_MPS: f64 = 0.5;
/// Random heading change per step.
const MAX_WANDER_RAD: f64 = 10.0 * PI / 180.0;
/// Largest turn per step when steering towards a bearing.
const MAX_STEER_RAD: f64 = 45.0 * PI / 180.0;

const NORMAL_TEMPERATURE_C: f64 = 5.0;
const NORMAL_MIN_C: f64 = 3.0;
const NORMAL_MAX_C: f64 = 7.0;
/// Share of the distance to 5 °C a normal device's temperature recovers per step.
const TEMPERATURE_PULL: f64 = 0.05;
const TEMPERATURE_JITTER_C: f64 = 0.15;
/// A rogue's temperature climbs to this by its breakout step...
const ROGUE_PEAK_C: f64 = 10.5;
/// ...and then stays within these bounds.
const ROGUE_MIN_AFTER_BREAKOUT_C: f64 = 9.2;
const ROGUE_MAX_C: f64 = 12.0;
/// A rogue's breakout step, as a share of the expected steps per device.
const ROGUE_BREAKOUT_SHARE: std::ops::RangeInclusive<f64> = 0.2..=0.5;

/// A point in degrees (WGS84).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

/// A position on the local map, in metres from the fleet's centre.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Offset {
    east_m: f64,
    north_m: f64,
}

impl Offset {
    /// `distance_m` from the centre in the direction `bearing` (radians clockwise from north).
    fn polar(bearing: f64, distance_m: f64) -> Self {
        Offset {
            east_m: bearing.sin() * distance_m,
            north_m: bearing.cos() * distance_m,
        }
    }

    fn distance_from_centre(self) -> f64 {
        self.east_m.hypot(self.north_m)
    }

    /// Bearing from the centre to this point, radians clockwise from north.
    fn bearing_from_centre(self) -> f64 {
        self.east_m.atan2(self.north_m).rem_euclid(TAU)
    }

    fn moved(self, heading: f64, distance_m: f64) -> Self {
        let step = Offset::polar(heading, distance_m);
        Offset {
            east_m: self.east_m + step.east_m,
            north_m: self.north_m + step.north_m,
        }
    }

    /// The nearest point no farther than `radius_m` from the centre.
    fn within(self, radius_m: f64) -> Self {
        let distance = self.distance_from_centre();
        if distance <= radius_m {
            self
        } else {
            Offset::polar(self.bearing_from_centre(), radius_m)
        }
    }

    fn to_geo(self, centre: GeoPoint) -> GeoPoint {
        let metres_per_degree_lon = METRES_PER_DEGREE * centre.lat.to_radians().cos();
        GeoPoint {
            lat: centre.lat + self.north_m / METRES_PER_DEGREE,
            lon: centre.lon + self.east_m / metres_per_degree_lon,
        }
    }
}

/// Turns `heading` towards `desired` by at most `max_turn`, the short way round.
fn steer(heading: f64, desired: f64, max_turn: f64) -> f64 {
    let difference = (desired - heading + PI).rem_euclid(TAU) - PI;
    (heading + difference.clamp(-max_turn, max_turn)).rem_euclid(TAU)
}

/// How a device behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Normal,
    /// Outside the zone and above the cold-chain maximum by `breakout_step`.
    Rogue {
        breakout_step: u64,
    },
}

/// Whether device `index` is a rogue: spreads `fraction` × devices rogues evenly over the fleet.
pub fn is_rogue(index: usize, fraction: f64) -> bool {
    ((index + 1) as f64 * fraction).floor() > (index as f64 * fraction).floor()
}

/// Hands out strictly increasing millisecond timestamps for one device, close to the wall clock.
#[derive(Debug, Default, Clone)]
pub struct DeviceClock {
    last: Option<DateTime<Utc>>,
}

impl DeviceClock {
    /// `now` truncated to the millisecond, or 1 ms after the previous timestamp if that is later.
    pub fn stamp(&mut self, now: DateTime<Utc>) -> DateTime<Utc> {
        let sub_millisecond = i64::from(now.timestamp_subsec_nanos() % 1_000_000);
        let now = now - TimeDelta::nanoseconds(sub_millisecond);
        let stamp = match self.last {
            Some(last) if last >= now => last + TimeDelta::milliseconds(1),
            _ => now,
        };
        self.last = Some(stamp);
        stamp
    }
}

/// One reading, serialised in the engine's wire format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReading {
    pub device_id: String,
    #[serde(serialize_with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
    pub lat: f64,
    pub lon: f64,
    pub temperature: f64,
}

fn rfc3339_millis<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// What shapes the fleet.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub devices: usize,
    pub device_prefix: String,
    pub centre: GeoPoint,
    pub rogue_fraction: f64,
    pub seed: u64,
    /// Nominal time between two readings of one device: devices / rate.
    pub step_seconds: f64,
    /// Readings per device the run is expected to send; rogues break out well before.
    pub expected_steps: u64,
}

/// One simulated device.
#[derive(Debug, Clone)]
struct SimDevice {
    id: String,
    role: Role,
    rng: StdRng,
    position: Offset,
    /// Radians clockwise from north.
    heading: f64,
    speed_mps: f64,
    temperature_c: f64,
    steps: u64,
    clock: DeviceClock,
}

impl SimDevice {
    fn new(index: usize, settings: &FleetSettings) -> Self {
        let mut rng = device_rng(settings.seed, index);
        let role = if is_rogue(index, settings.rogue_fraction) {
            let share = rng.random_range(ROGUE_BREAKOUT_SHARE);
            let breakout_step = ((settings.expected_steps as f64 * share).round() as u64).max(1);
            Role::Rogue { breakout_step }
        } else {
            Role::Normal
        };
        let speed_mps = rng.random_range(MIN_SPEED_MPS..=MAX_SPEED_MPS);
        let position = start_position(&mut rng, role, settings.step_seconds);
        let heading = match role {
            Role::Normal => rng.random_range(0.0..TAU),
            Role::Rogue { .. } => position.bearing_from_centre(),
        };
        let temperature_c = NORMAL_TEMPERATURE_C + rng.random_range(-1.0..=1.0);
        SimDevice {
            id: format!("{}{:05}", settings.device_prefix, index + 1),
            role,
            rng,
            position,
            heading,
            speed_mps,
            temperature_c,
            steps: 0,
            clock: DeviceClock::default(),
        }
    }

    /// Moves the device and changes its temperature by one step of `step_seconds`.
    fn advance(&mut self, step_seconds: f64) {
        self.steps += 1;
        self.advance_position(step_seconds);
        self.temperature_c = self.next_temperature();
    }

    fn advance_position(&mut self, step_seconds: f64) {
        if let Some(desired) = self.desired_heading() {
            self.heading = steer(self.heading, desired, MAX_STEER_RAD);
        }
        let wander = self.rng.random_range(-MAX_WANDER_RAD..=MAX_WANDER_RAD);
        self.heading = (self.heading + wander).rem_euclid(TAU);
        let speed_change = self.rng.random_range(-SPEED_JITTER_MPS..=SPEED_JITTER_MPS);
        self.speed_mps = (self.speed_mps + speed_change).clamp(MIN_SPEED_MPS, MAX_SPEED_MPS);
        self.position = self
            .position
            .moved(self.heading, self.speed_mps * step_seconds);
        if self.role == Role::Normal {
            self.position = self.position.within(NORMAL_LIMIT_RADIUS_M);
        }
    }

    /// Where the device wants to go, if anywhere in particular.
    fn desired_heading(&self) -> Option<f64> {
        let distance = self.position.distance_from_centre();
        let outwards = self.position.bearing_from_centre();
        match self.role {
            Role::Normal if distance > TURN_BACK_RADIUS_M => Some((outwards + PI).rem_euclid(TAU)),
            Role::Rogue { .. } if distance < ROGUE_ROAM_RADIUS_M => Some(outwards),
            _ => None,
        }
    }

    fn next_temperature(&mut self) -> f64 {
        let jitter = self
            .rng
            .random_range(-TEMPERATURE_JITTER_C..=TEMPERATURE_JITTER_C);
        match self.role {
            Role::Normal => {
                let pull = TEMPERATURE_PULL * (NORMAL_TEMPERATURE_C - self.temperature_c);
                (self.temperature_c + pull + jitter).clamp(NORMAL_MIN_C, NORMAL_MAX_C)
            }
            Role::Rogue { breakout_step } if self.steps < breakout_step => {
                // Climb the rest of the way to the peak in equal parts over the remaining steps.
                let remaining = (breakout_step - self.steps + 1) as f64;
                let climb = (ROGUE_PEAK_C - self.temperature_c) / remaining;
                (self.temperature_c + climb + jitter).min(ROGUE_MAX_C)
            }
            Role::Rogue { .. } => {
                (self.temperature_c + jitter).clamp(ROGUE_MIN_AFTER_BREAKOUT_C, ROGUE_MAX_C)
            }
        }
    }

    fn reading(&mut self, centre: GeoPoint, now: DateTime<Utc>) -> SimReading {
        let location = self.position.to_geo(centre);
        SimReading {
            device_id: self.id.clone(),
            timestamp: self.clock.stamp(now),
            lat: location.lat,
            lon: location.lon,
            temperature: (self.temperature_c * 100.0).round() / 100.0,
        }
    }
}

/// Each device has its own generator, so its path does not depend on the others.
fn device_rng(seed: u64, index: usize) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(index as u64))
}

/// A random spot within [`START_RADIUS_M`]; a rogue starts far enough out to leave the zone by
/// its breakout step even at the lowest speed.
fn start_position(rng: &mut StdRng, role: Role, step_seconds: f64) -> Offset {
    let bearing = rng.random_range(0.0..TAU);
    // sqrt: uniform over the disc's area, not bunched up at the centre.
    let mut distance = START_RADIUS_M * rng.random::<f64>().sqrt();
    if let Role::Rogue { breakout_step } = role {
        // Heading within MAX_WANDER_RAD of straight out, a rogue gains at least this much distance.
        let slowest_progress_m =
            MIN_SPEED_MPS * MAX_WANDER_RAD.cos() * step_seconds * breakout_step as f64;
        let margin_m = 0.05 * slowest_progress_m;
        distance = distance.max(ZONE_RADIUS_M - slowest_progress_m + margin_m);
    }
    Offset::polar(bearing, distance)
}

/// The fleet, producing readings round-robin over its devices.
#[derive(Debug, Clone)]
pub struct Fleet {
    devices: Vec<SimDevice>,
    next: usize,
    centre: GeoPoint,
    step_seconds: f64,
}

impl Fleet {
    pub fn new(settings: &FleetSettings) -> Self {
        Fleet {
            devices: (0..settings.devices.max(1))
                .map(|index| SimDevice::new(index, settings))
                .collect(),
            next: 0,
            centre: settings.centre,
            step_seconds: settings.step_seconds,
        }
    }

    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|device| device.id.as_str())
    }

    pub fn rogue_count(&self) -> usize {
        self.devices
            .iter()
            .filter(|device| matches!(device.role, Role::Rogue { .. }))
            .count()
    }

    /// The next device's next reading, stamped at `now` (or just after its previous one).
    pub fn next_reading(&mut self, now: DateTime<Utc>) -> SimReading {
        let index = self.next;
        self.next = (index + 1) % self.devices.len();
        let device = &mut self.devices[index];
        device.advance(self.step_seconds);
        device.reading(self.centre, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMSTERDAM: GeoPoint = GeoPoint {
        lat: 52.37,
        lon: 4.89,
    };

    fn settings(devices: usize, expected_steps: u64) -> FleetSettings {
        FleetSettings {
            devices,
            device_prefix: "sim-".to_owned(),
            centre: AMSTERDAM,
            rogue_fraction: 0.1,
            seed: 42,
            step_seconds: 0.25,
            expected_steps,
        }
    }

    /// Great-circle distance, independent of the flat map the simulator uses.
    fn haversine_m(a: GeoPoint, b: GeoPoint) -> f64 {
        let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
        let dlat = lat2 - lat1;
        let dlon = (b.lon - a.lon).to_radians();
        let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * 6_371_000.0 * h.sqrt().asin()
    }

    /// Runs the fleet for `steps` readings per device; the last reading of each device.
    fn run(settings: &FleetSettings, steps: u64) -> Vec<(SimDevice, SimReading)> {
        let mut fleet = Fleet::new(settings);
        let now = Utc::now();
        let mut last = Vec::new();
        for _ in 0..steps * settings.devices as u64 {
            last.push(fleet.next_reading(now));
        }
        let readings = last.split_off(last.len() - settings.devices);
        fleet.devices.into_iter().zip(readings).collect()
    }

    #[test]
    fn rogues_are_spread_evenly_and_counted_exactly() {
        let fleet = Fleet::new(&settings(50, 40));
        assert_eq!(fleet.rogue_count(), 5);
        assert!(!is_rogue(0, 0.1) && is_rogue(9, 0.1) && is_rogue(19, 0.1));
        assert!((0..100).all(|i| !is_rogue(i, 0.0)));
        assert!((0..100).all(|i| is_rogue(i, 1.0)));
    }

    #[test]
    fn device_ids_are_numbered_from_one() {
        let fleet = Fleet::new(&settings(3, 10));
        let ids: Vec<_> = fleet.device_ids().collect();
        assert_eq!(ids, ["sim-00001", "sim-00002", "sim-00003"]);
    }

    #[test]
    fn rogues_leave_the_zone_and_overheat_by_the_expected_end_of_a_short_run() {
        // 50 devices at 200/s for 10 s: 40 readings each, a quarter of a second apart.
        for (device, reading) in run(&settings(50, 40), 40) {
            let distance = haversine_m(
                AMSTERDAM,
                GeoPoint {
                    lat: reading.lat,
                    lon: reading.lon,
                },
            );
            if matches!(device.role, Role::Rogue { .. }) {
                assert!(
                    distance > ZONE_RADIUS_M,
                    "{} only {distance} m out",
                    device.id
                );
                assert!(
                    reading.temperature > 9.0,
                    "{} at {}",
                    device.id,
                    reading.temperature
                );
            } else {
                assert!(distance < ZONE_RADIUS_M, "{} left the zone", device.id);
                assert!((NORMAL_MIN_C..=NORMAL_MAX_C).contains(&reading.temperature));
            }
        }
    }

    #[test]
    fn normal_devices_stay_in_the_zone_and_in_range_for_a_long_time() {
        let mut long_steps = settings(20, 100);
        long_steps.step_seconds = 30.0;
        let mut fleet = Fleet::new(&long_steps);
        for _ in 0..20 * 2_000 {
            let reading = fleet.next_reading(Utc::now());
            let device = fleet.devices.iter().find(|d| d.id == reading.device_id);
            if device.is_some_and(|d| d.role == Role::Normal) {
                let distance = haversine_m(
                    AMSTERDAM,
                    GeoPoint {
                        lat: reading.lat,
                        lon: reading.lon,
                    },
                );
                assert!(
                    distance < ZONE_RADIUS_M,
                    "{} at {distance} m",
                    reading.device_id
                );
                assert!((COLD_CHAIN_MIN_C..=COLD_CHAIN_MAX_C).contains(&reading.temperature));
            }
        }
    }

    #[test]
    fn devices_move_at_plausible_speeds() {
        let settings = settings(10, 100);
        let mut fleet = Fleet::new(&settings);
        let now = Utc::now();
        let first: Vec<_> = (0..10).map(|_| fleet.next_reading(now)).collect();
        let second: Vec<_> = (0..10).map(|_| fleet.next_reading(now)).collect();
        for (a, b) in first.iter().zip(&second) {
            let metres = haversine_m(
                GeoPoint {
                    lat: a.lat,
                    lon: a.lon,
                },
                GeoPoint {
                    lat: b.lat,
                    lon: b.lon,
                },
            );
            let speed = metres / settings.step_seconds;
            assert!(
                (4.9..=20.1).contains(&speed),
                "{} at {speed} m/s",
                a.device_id
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_paths() {
        let now = Utc::now();
        let mut a = Fleet::new(&settings(5, 50));
        let mut b = Fleet::new(&settings(5, 50));
        for _ in 0..100 {
            assert_eq!(a.next_reading(now), b.next_reading(now));
        }
    }

    #[test]
    fn timestamps_strictly_increase_even_when_the_clock_does_not() {
        let mut clock = DeviceClock::default();
        let now = Utc::now();
        let first = clock.stamp(now);
        let second = clock.stamp(now);
        let third = clock.stamp(now - TimeDelta::seconds(5));
        assert!(first < second && second < third);
        assert_eq!(second - first, TimeDelta::milliseconds(1));
        assert_eq!(first.timestamp_subsec_nanos() % 1_000_000, 0);
        let later = now + TimeDelta::seconds(1);
        assert!(clock.stamp(later) > third);
    }

    #[test]
    fn steering_takes_the_short_way_round() {
        let degrees = |d: f64| d.to_radians();
        let turned = steer(degrees(350.0), degrees(10.0), degrees(45.0));
        assert!((turned - degrees(10.0)).abs() < 1e-9);
        let turned = steer(degrees(0.0), degrees(180.0 - 1.0), degrees(45.0));
        assert!((turned - degrees(45.0)).abs() < 1e-9);
    }

    #[test]
    fn readings_serialise_in_the_wire_format() {
        let reading = SimReading {
            device_id: "sim-00001".to_owned(),
            timestamp: DateTime::from_timestamp_millis(1_795_456_800_123).expect("valid"),
            lat: 52.37,
            lon: 4.89,
            temperature: 4.5,
        };
        let json = serde_json::to_string(&reading).expect("serialisable");
        assert_eq!(
            json,
            r#"{"device_id":"sim-00001","timestamp":"2026-11-23T18:00:00.123Z","lat":52.37,"lon":4.89,"temperature":4.5}"#
        );
    }
}
