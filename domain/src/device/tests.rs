//! Given / when / then: given a device's past, when a reading arrives, then these events.

use chrono::{Duration, TimeZone};
use proptest::prelude::*;

use super::*;
use crate::range::TemperatureRange;
use crate::rules::Thresholds;
use crate::zone::{Watched, Zone, ZoneShape};

const DEVICE: &str = "truck-7";
/// The depot: a 1 km circle around (52.37, 4.89).
const DEPOT: (f64, f64) = (52.37, 4.89);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn reading(secs: i64, lat: f64, lon: f64, temp: f64) -> Reading {
    Reading::new(DEVICE, t0() + Duration::seconds(secs), lat, lon, temp).unwrap()
}

fn inside(secs: i64, temp: f64) -> Reading {
    reading(secs, DEPOT.0, DEPOT.1, temp)
}

fn outside(secs: i64, temp: f64) -> Reading {
    reading(secs, DEPOT.0 + 0.1, DEPOT.1, temp)
}

fn rules_with_depot_and_cold_chain() -> Rules {
    let mut rules = Rules::new(Thresholds::default());
    let zone = Zone::new(
        RuleId::parse("depot").unwrap(),
        "Depot",
        ZoneShape::circle(Location::new(DEPOT.0, DEPOT.1).unwrap(), 1_000.0).unwrap(),
        Watched::All,
    )
    .unwrap();
    let event = rules.define_zone(zone);
    rules.apply(&event);
    let range = TemperatureRange::new(
        RuleId::parse("cold-chain").unwrap(),
        "Cold chain",
        Temperature::new(2.0).unwrap(),
        Temperature::new(8.0).unwrap(),
        Watched::All,
    )
    .unwrap();
    let event = rules.define_range(range);
    rules.apply(&event);
    rules
}

/// Handles and applies a reading, returning the events it caused.
fn feed(device: &mut Device, reading: &Reading, rules: &Rules) -> Vec<DeviceEvent> {
    match device.handle(reading, rules) {
        Decision::Events(events) => {
            for e in &events {
                device.apply(e);
            }
            events
        }
        Decision::Late(event) => {
            device.apply(&event);
            vec![event]
        }
        Decision::Duplicate => vec![],
    }
}

fn types(events: &[DeviceEvent]) -> Vec<&'static str> {
    events.iter().map(DeviceEvent::event_type).collect()
}

fn device() -> Device {
    Device::new(DeviceId::parse(DEVICE).unwrap())
}

#[test]
fn first_reading_registers_the_device_and_records_the_reading() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    let events = feed(&mut d, &inside(0, 5.0), &rules);
    assert_eq!(types(&events), ["DeviceRegistered", "ReadingRecorded"]);
    assert_eq!(d.version(), 2);
    assert_eq!(d.status(&rules), DeviceStatus::Normal);
    assert_eq!(d.last_reading().unwrap().temperature.celsius(), 5.0);
}

#[test]
fn leaving_a_zone_raises_one_alarm_however_long_the_device_stays_out() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(0, 5.0), &rules);
    let left = feed(&mut d, &outside(1, 5.0), &rules);
    assert!(
        left.iter().any(|e| matches!(
            e,
            DeviceEvent::LeftZone {
                found_outside: false,
                ..
            }
        )),
        "{left:?}"
    );
    for s in 2..3600 {
        let events = feed(&mut d, &outside(s, 5.0), &rules);
        assert!(
            !types(&events).contains(&"LeftZone"),
            "second alarm at {s}s"
        );
    }
    assert_eq!(d.status(&rules), DeviceStatus::OutOfZone);
    let back = feed(&mut d, &inside(3600, 5.0), &rules);
    assert!(types(&back).contains(&"EnteredZone"));
    assert_eq!(d.status(&rules), DeviceStatus::Normal);
}

#[test]
fn a_device_first_seen_outside_is_marked_found_outside() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    let events = feed(&mut d, &outside(0, 5.0), &rules);
    let left: Vec<_> = events
        .iter()
        .filter(|e| e.event_type() == "LeftZone")
        .collect();
    assert_eq!(left.len(), 1);
    assert!(matches!(
        left[0],
        DeviceEvent::LeftZone {
            found_outside: true,
            ..
        }
    ));
}

#[test]
fn a_zone_created_while_the_device_is_outside_raises_found_outside_once() {
    let mut rules = Rules::new(Thresholds::default());
    let mut d = device();
    feed(&mut d, &outside(0, 5.0), &rules);
    let full = rules_with_depot_and_cold_chain();
    rules.apply(&rules.define_zone(full.zones.values().next().unwrap().clone()));
    let events = feed(&mut d, &outside(1, 5.0), &rules);
    assert!(
        events.iter().any(|e| matches!(
            e,
            DeviceEvent::LeftZone {
                found_outside: true,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(!types(&feed(&mut d, &outside(2, 5.0), &rules)).contains(&"LeftZone"));
}

#[test]
fn editing_a_zone_keeps_its_revision_and_does_not_re_raise() {
    let mut rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &outside(0, 5.0), &rules);
    let mut zone = rules.zones.values().next().unwrap().clone();
    zone.shape = ZoneShape::circle(Location::new(DEPOT.0, DEPOT.1).unwrap(), 2_000.0).unwrap();
    rules.apply(&rules.define_zone(zone));
    assert!(!types(&feed(&mut d, &outside(1, 5.0), &rules)).contains(&"LeftZone"));
}

#[test]
fn zones_only_judge_the_devices_they_watch() {
    let mut rules = rules_with_depot_and_cold_chain();
    let mut zone = rules.zones.values().next().unwrap().clone();
    zone.devices = Watched::Devices([DeviceId::parse("someone-else").unwrap()].into());
    rules.apply(&rules.define_zone(zone));
    let mut d = device();
    assert!(!types(&feed(&mut d, &outside(0, 5.0), &rules)).contains(&"LeftZone"));
}

#[test]
fn temperature_alarm_fires_once_names_the_bound_and_clears() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(0, 5.0), &rules);
    let hot = feed(&mut d, &inside(1, 9.0), &rules);
    assert!(hot.iter().any(|e| matches!(
        e,
        DeviceEvent::TemperatureOutOfRange { bound: Bound::Above, found_out_of_range: false, limit, .. } if limit.celsius() == 8.0
    )), "{hot:?}");
    assert!(!types(&feed(&mut d, &inside(2, 9.5), &rules)).contains(&"TemperatureOutOfRange"));
    assert_eq!(d.status(&rules), DeviceStatus::TemperatureAlarm);
    let back = feed(&mut d, &inside(3, 7.0), &rules);
    assert!(types(&back).contains(&"TemperatureBackInRange"));
    assert_eq!(d.status(&rules), DeviceStatus::Normal);
}

#[test]
fn jumping_from_below_to_above_raises_the_new_bound() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(0, 1.0), &rules);
    let events = feed(&mut d, &inside(1, 9.0), &rules);
    assert!(events.iter().any(|e| matches!(
        e,
        DeviceEvent::TemperatureOutOfRange {
            bound: Bound::Above,
            ..
        }
    )));
}

#[test]
fn a_first_temperature_out_of_range_raises_once_marked_found() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    let events = feed(&mut d, &inside(0, 20.0), &rules);
    let alarms: Vec<_> = events
        .iter()
        .filter(|e| e.event_type() == "TemperatureOutOfRange")
        .collect();
    assert_eq!(alarms.len(), 1);
    assert!(matches!(
        alarms[0],
        DeviceEvent::TemperatureOutOfRange {
            found_out_of_range: true,
            ..
        }
    ));
}

#[test]
fn small_moves_and_small_temperature_changes_raise_nothing_but_accumulate() {
    let rules = Rules::new(Thresholds::new(100.0, 1.0).unwrap());
    let mut d = device();
    feed(&mut d, &reading(0, 52.0, 4.0, 5.0), &rules);
    let flags = |events: &[DeviceEvent]| match events {
        [DeviceEvent::ReadingRecorded {
            moved,
            temperature_changed,
            ..
        }] => (*moved, *temperature_changed),
        other => panic!("one ReadingRecorded, got {other:?}"),
    };
    // ~55 m north and +0.6 °C: below both thresholds.
    assert_eq!(
        flags(&feed(&mut d, &reading(1, 52.0005, 4.0, 5.6), &rules)),
        (false, false)
    );
    // ~111 m from the last *reported* location and +1.1 °C from the last reported temperature:
    // still one event per reading, marked as a move and a change.
    let events = feed(&mut d, &reading(2, 52.001, 4.0, 6.1), &rules);
    assert_eq!(flags(&events), (true, true));
    // Measured from the new reported values now: 0 m moved, -2.1 °C.
    let cooler = feed(&mut d, &reading(3, 52.001, 4.0, 4.0), &rules);
    assert_eq!(flags(&cooler), (false, true));
}

#[test]
fn events_of_the_first_schema_still_fold_into_the_state() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(0, 5.0), &rules);
    let moved_to = Location::new(52.375, 4.89).unwrap();
    d.apply(&DeviceEvent::LocationChanged {
        device_id: d.id().clone(),
        at: t0(),
        from: Location::new(DEPOT.0, DEPOT.1).unwrap(),
        to: moved_to,
        distance_m: 556.0,
    });
    d.apply(&DeviceEvent::TemperatureChanged {
        device_id: d.id().clone(),
        at: t0(),
        from: Temperature::new(5.0).unwrap(),
        to: Temperature::new(7.0).unwrap(),
        direction: crate::event::TemperatureDirection::Increased,
    });
    // A reading at the legacy reported location and temperature is neither a move nor a change.
    let events = feed(&mut d, &reading(1, 52.375, 4.89, 7.0), &rules);
    assert!(matches!(
        events.as_slice(),
        [DeviceEvent::ReadingRecorded {
            moved: false,
            temperature_changed: false,
            ..
        }]
    ));
}

#[test]
fn a_repeat_of_the_last_reading_is_a_duplicate_and_changes_nothing() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(10, 5.0), &rules);
    assert_eq!(d.handle(&inside(10, 5.0), &rules), Decision::Duplicate);
    // Only the timestamp makes a repeat: a device sends one reading per instant.
    assert_eq!(d.handle(&outside(10, 30.0), &rules), Decision::Duplicate);
}

#[test]
fn a_late_reading_is_history_only_without_live_state_or_alarms() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &inside(10, 5.0), &rules);
    let before = d.clone();
    // Outside the depot and far too warm, but older than the last reading.
    let Decision::Late(event) = d.handle(&outside(5, 30.0), &rules) else {
        panic!("an older reading is late");
    };
    assert!(matches!(
        &event,
        DeviceEvent::ReadingRecorded { late: true, at, .. } if *at == t0() + Duration::seconds(5)
    ));
    d.apply(&event);
    assert_eq!(
        d.version(),
        before.version() + 1,
        "it is part of the history"
    );
    assert_eq!(
        d.last_reading(),
        before.last_reading(),
        "the live state stays"
    );
    assert_eq!(d.status(&rules), DeviceStatus::Normal, "no alarm");
    // The next real reading is judged against the last live one, as if the late one never came.
    let events = feed(&mut d, &inside(11, 5.2), &rules);
    assert_eq!(types(&events), ["ReadingRecorded"]);
}

#[test]
fn late_events_keep_the_stored_shape_of_earlier_readings() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    let events = feed(&mut d, &inside(10, 5.0), &rules);
    let json = events[1].to_json();
    assert!(!json.contains("late"), "{json}");
    let Decision::Late(late) = d.handle(&inside(5, 5.0), &rules) else {
        panic!("late");
    };
    assert!(late.to_json().contains(r#""late":true"#));
}

#[test]
fn removed_zones_no_longer_count_as_alarms() {
    let mut rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &outside(0, 5.0), &rules);
    assert_eq!(d.outside_zones(&rules).count(), 1);
    rules.apply(&crate::RulesEvent::ZoneRemoved {
        zone_id: RuleId::parse("depot").unwrap(),
    });
    assert_eq!(d.outside_zones(&rules).count(), 0);
}

#[test]
fn snapshots_round_trip_through_json() {
    let rules = rules_with_depot_and_cold_chain();
    let mut d = device();
    feed(&mut d, &outside(0, 20.0), &rules);
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<Device>(&json).unwrap(), d);
}

/// A path of readings wandering in and out of the depot with random temperatures.
fn readings() -> impl Strategy<Value = Vec<Reading>> {
    prop::collection::vec(
        (1i64..120, -0.03f64..0.03, -0.03f64..0.03, -5.0f64..15.0),
        1..80,
    )
    .prop_map(|steps| {
        let mut secs = 0;
        steps
            .into_iter()
            .map(|(dt, dlat, dlon, temp)| {
                // Occasionally go back in time to exercise stale readings.
                secs += if dt % 17 == 0 { -dt } else { dt };
                reading(secs, DEPOT.0 + dlat, DEPOT.1 + dlon, temp)
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn folding_the_events_reproduces_the_state(path in readings()) {
        let rules = rules_with_depot_and_cold_chain();
        let mut live = device();
        let mut history = Vec::new();
        for r in &path {
            history.extend(feed(&mut live, r, &rules));
        }
        let replayed = Device::from_events(DeviceId::parse(DEVICE).unwrap(), &history);
        prop_assert_eq!(replayed, live);
    }

    #[test]
    fn left_and_entered_strictly_alternate_per_zone(path in readings()) {
        let rules = rules_with_depot_and_cold_chain();
        let mut d = device();
        let mut zone_events = Vec::new();
        for r in &path {
            zone_events.extend(feed(&mut d, r, &rules).into_iter().filter(|e| e.zone_id().is_some()).map(|e| e.event_type()));
        }
        for pair in zone_events.windows(2) {
            prop_assert_ne!(pair[0], pair[1], "{:?}", zone_events);
        }
        if let Some(first) = zone_events.first() {
            prop_assert_eq!(*first, "LeftZone");
        }
    }

    #[test]
    fn range_alarms_clear_only_after_being_raised(path in readings()) {
        let rules = rules_with_depot_and_cold_chain();
        let mut d = device();
        let mut active = false;
        for r in &path {
            for e in feed(&mut d, r, &rules) {
                match e.event_type() {
                    "TemperatureOutOfRange" => active = true,
                    "TemperatureBackInRange" => { prop_assert!(active); active = false; }
                    _ => {}
                }
            }
        }
    }
}
