//! The alarm lifecycle: open after the dwell, at most one per condition, acknowledge, clear after
//! the dwell (hysteresis), offline and back online, exits before entries.

use chrono::{Duration, TimeZone};

use super::*;
use crate::range::TemperatureRange;
use crate::rules::Thresholds;
use crate::values::{Location, Reading, Temperature};
use crate::zone::{Watched, Zone, ZoneShape};

const DEVICE: &str = "truck-7";
const DEPOT: (f64, f64) = (52.37, 4.89);

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap() + Duration::seconds(secs)
}

fn at(secs: i64, lat: f64, lon: f64, temp: f64) -> Reading {
    Reading::new(DEVICE, t(secs), lat, lon, temp).unwrap()
}

fn inside(secs: i64) -> Reading {
    at(secs, DEPOT.0, DEPOT.1, 5.0)
}

fn outside(secs: i64) -> Reading {
    at(secs, DEPOT.0 + 0.1, DEPOT.1, 5.0)
}

fn depot(severity: Severity, dwell: u64) -> Zone {
    Zone::new(
        RuleId::parse("depot").unwrap(),
        "Depot",
        ZoneShape::circle(Location::new(DEPOT.0, DEPOT.1).unwrap(), 1_000.0).unwrap(),
        Watched::All,
    )
    .unwrap()
    .with_alarm(severity, dwell)
}

fn rules_with(zones: Vec<Zone>, ranges: Vec<TemperatureRange>) -> Rules {
    let mut rules = Rules::new(Thresholds::default());
    for zone in zones {
        let event = rules.define_zone(zone);
        rules.apply(&event);
    }
    for range in ranges {
        let event = rules.define_range(range);
        rules.apply(&event);
    }
    rules
}

fn apply_all(device: &mut Device, events: &[DeviceEvent]) {
    for e in events {
        device.apply(e);
    }
}

fn feed(device: &mut Device, reading: &Reading, rules: &Rules) -> Vec<DeviceEvent> {
    let Decision::Events(events) = device.handle(reading, rules) else {
        panic!("not decided as a new reading: {reading:?}");
    };
    apply_all(device, &events);
    // In these tests the engine hears each reading at its own timestamp.
    device.heard(reading.timestamp);
    events
}

fn tick(device: &mut Device, secs: i64, rules: &Rules) -> Vec<DeviceEvent> {
    let events = device.handle_time(t(secs), rules);
    apply_all(device, &events);
    events
}

fn alarm_changes(events: &[DeviceEvent]) -> Vec<&'static str> {
    events
        .iter()
        .filter(|e| e.is_alarm_change())
        .map(DeviceEvent::event_type)
        .collect()
}

fn device() -> Device {
    Device::new(DeviceId::parse(DEVICE).unwrap())
}

#[test]
fn without_dwell_one_alarm_opens_when_the_device_leaves_and_clears_when_it_returns() {
    let rules = rules_with(vec![depot(Severity::Critical, 0)], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules);
    let left = feed(&mut d, &outside(10), &rules);
    let Some(DeviceEvent::AlarmOpened {
        alarm_id,
        kind,
        rule_id,
        severity,
        cause_version,
        at,
        ..
    }) = left.iter().find(|e| e.raises_alarm()).cloned()
    else {
        panic!("no alarm opened: {left:?}");
    };
    assert_eq!(alarm_id.to_string(), "truck-7.1");
    assert_eq!(kind, AlarmKind::OutsideZone);
    assert_eq!(rule_id.unwrap().as_str(), "depot");
    assert_eq!(severity, Severity::Critical);
    assert_eq!(at, t(10));
    // The cause is the LeftZone event of this decision, at its stream version.
    let left_zone_index = left
        .iter()
        .position(|e| e.event_type() == "LeftZone")
        .unwrap();
    let first_version_of_decision = d.version() - left.len() as u64 + 1;
    assert_eq!(
        cause_version,
        first_version_of_decision + left_zone_index as u64
    );

    for s in 11..500 {
        let events = feed(&mut d, &outside(s), &rules);
        assert!(alarm_changes(&events).is_empty(), "at {s}s: {events:?}");
    }
    assert_eq!(d.alarms().count(), 1);
    let back = feed(&mut d, &inside(500), &rules);
    assert_eq!(alarm_changes(&back), ["AlarmCleared"]);
    assert_eq!(d.alarms().count(), 0);

    let again = feed(&mut d, &outside(600), &rules);
    let opened: Vec<_> = again.iter().filter_map(DeviceEvent::alarm_id).collect();
    assert_eq!(opened.len(), 1);
    assert_eq!(
        opened[0].to_string(),
        "truck-7.2",
        "a new alarm, with the next id"
    );
}

#[test]
fn a_border_crossing_shorter_than_the_dwell_raises_nothing() {
    let rules = rules_with(vec![depot(Severity::Warning, 60)], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules);
    let left = feed(&mut d, &outside(10), &rules);
    assert!(left.iter().any(|e| e.event_type() == "LeftZone"));
    assert!(alarm_changes(&left).is_empty());
    assert_eq!(d.next_deadline(&rules).unwrap().min(t(70)), t(70));
    assert!(alarm_changes(&tick(&mut d, 40, &rules)).is_empty());
    feed(&mut d, &inside(45), &rules);
    for s in [69, 70, 71, 600] {
        assert!(
            alarm_changes(&tick(&mut d, s, &rules)).is_empty(),
            "at {s}s"
        );
    }
    assert_eq!(d.alarms().count(), 0);
}

#[test]
fn a_condition_that_holds_for_the_dwell_opens_at_the_dwell_s_end() {
    let rules = rules_with(vec![depot(Severity::Info, 60)], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules);
    let before = d.version();
    let left = feed(&mut d, &outside(10), &rules);
    let left_version = before
        + 1
        + left
            .iter()
            .position(|e| e.event_type() == "LeftZone")
            .unwrap() as u64;
    let deadline = d.next_deadline(&rules).unwrap();
    assert_eq!(deadline, t(70));
    assert!(tick(&mut d, 69, &rules).is_empty());
    let opened = tick(&mut d, 75, &rules);
    assert_eq!(alarm_changes(&opened), ["AlarmOpened"]);
    let DeviceEvent::AlarmOpened {
        at, cause_version, ..
    } = &opened[0]
    else {
        unreachable!()
    };
    assert_eq!(
        *at,
        t(70),
        "opened when the dwell ran out, not when noticed"
    );
    assert_eq!(*cause_version, left_version);
    // A reading after the dwell opens it too, without a tick (readings carry time forward).
    let mut e = device();
    feed(&mut e, &inside(0), &rules);
    feed(&mut e, &outside(10), &rules);
    let later = feed(&mut e, &outside(80), &rules);
    assert_eq!(alarm_changes(&later), ["AlarmOpened"]);
}

#[test]
fn an_alarm_clears_only_once_the_condition_has_been_gone_for_the_dwell() {
    let rules = rules_with(vec![depot(Severity::Warning, 60)], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules);
    feed(&mut d, &outside(10), &rules);
    tick(&mut d, 70, &rules);
    assert_eq!(d.alarms().count(), 1);
    // Back in at 100, out again at 130 (jitter): the alarm stays, the same one.
    assert!(alarm_changes(&feed(&mut d, &inside(100), &rules)).is_empty());
    assert_eq!(d.next_deadline(&rules), Some(t(160)));
    assert!(alarm_changes(&feed(&mut d, &outside(130), &rules)).is_empty());
    assert!(alarm_changes(&tick(&mut d, 200, &rules)).is_empty());
    let (_, alarm) = d.alarms().next().unwrap();
    assert_eq!(alarm.id.to_string(), "truck-7.1");
    // Back in for good at 300: clears at 360.
    feed(&mut d, &inside(300), &rules);
    assert!(alarm_changes(&tick(&mut d, 359, &rules)).is_empty());
    let cleared = tick(&mut d, 400, &rules);
    assert_eq!(alarm_changes(&cleared), ["AlarmCleared"]);
    assert_eq!(cleared[0].at(), t(360));
    assert_eq!(d.alarms().count(), 0);
    assert_eq!(
        d.next_deadline(&rules),
        Some(t(300 + 600)),
        "only offline is left"
    );
}

#[test]
fn acknowledging_keeps_the_alarm_until_it_clears_and_numbers_each_change() {
    let rules = rules_with(vec![depot(Severity::Warning, 0)], vec![]);
    let mut d = device();
    feed(&mut d, &outside(0), &rules);
    let id = d.alarms().next().unwrap().1.id.clone();
    let ack = d
        .acknowledge(&id, "operator", Some("driver called".into()), t(5))
        .unwrap();
    let DeviceEvent::AlarmAcknowledged { sequence, by, .. } = &ack else {
        panic!("{ack:?}")
    };
    assert_eq!((*sequence, by.as_str()), (2, "operator"));
    d.apply(&ack);
    assert!(d.alarms().next().unwrap().1.acknowledged);
    assert_eq!(
        d.acknowledge(&id, "operator", None, t(6)),
        Err(AckRefused::AlreadyAcknowledged(id.to_string()))
    );
    let cleared = feed(&mut d, &inside(10), &rules);
    let Some(DeviceEvent::AlarmCleared { sequence, .. }) =
        cleared.iter().find(|e| e.is_alarm_change())
    else {
        panic!("{cleared:?}")
    };
    assert_eq!(*sequence, 3);
    assert_eq!(
        d.acknowledge(&id, "operator", None, t(11)),
        Err(AckRefused::NotActive(id.to_string()))
    );
    let unknown = AlarmId::parse("truck-7.99").unwrap();
    assert!(d.acknowledge(&unknown, "x", None, t(12)).is_err());
}

#[test]
fn one_reading_that_leaves_a_zone_and_enters_another_emits_the_exit_first() {
    // Two touching 1 km circles, 2 km apart east-west; the device steps from one into the other.
    let west = depot(Severity::Warning, 0);
    let mut east = Zone::new(
        RuleId::parse("yard").unwrap(),
        "Yard",
        ZoneShape::circle(Location::new(DEPOT.0, DEPOT.1 + 0.03).unwrap(), 1_000.0).unwrap(),
        Watched::All,
    )
    .unwrap();
    east.revision = 0;
    let rules = rules_with(vec![west, east], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules); // in the depot, found outside the yard
    let step = feed(&mut d, &at(10, DEPOT.0, DEPOT.1 + 0.03, 5.0), &rules);
    let zone_changes: Vec<_> = step
        .iter()
        .filter(|e| matches!(e.event_type(), "LeftZone" | "EnteredZone"))
        .map(DeviceEvent::event_type)
        .collect();
    assert_eq!(zone_changes, ["LeftZone", "EnteredZone"]);
    assert_eq!(alarm_changes(&step), ["AlarmOpened", "AlarmCleared"]);
}

#[test]
fn a_device_silent_for_its_offline_period_goes_offline_and_its_next_reading_brings_it_back() {
    let rules = rules_with(vec![], vec![]);
    let mut d = device();
    assert_eq!(
        d.next_deadline(&rules),
        None,
        "never heard from: never offline"
    );
    feed(&mut d, &inside(0), &rules);
    assert_eq!(d.next_deadline(&rules), Some(t(600)));
    assert!(tick(&mut d, 599, &rules).is_empty());
    let gone = tick(&mut d, 601, &rules);
    assert_eq!(
        gone.iter().map(DeviceEvent::event_type).collect::<Vec<_>>(),
        ["DeviceWentOffline", "AlarmOpened"]
    );
    assert_eq!(gone[0].at(), t(600));
    assert_eq!(d.offline_since(), Some(t(600)));
    assert_eq!(
        d.next_deadline(&rules),
        None,
        "offline: nothing more is due"
    );
    assert!(tick(&mut d, 5000, &rules).is_empty(), "no offline spam");
    let back = feed(&mut d, &inside(6000), &rules);
    let types: Vec<_> = back.iter().map(DeviceEvent::event_type).collect();
    assert!(types.contains(&"DeviceBackOnline"), "{types:?}");
    assert_eq!(alarm_changes(&back), ["AlarmCleared"]);
    assert_eq!(d.offline_since(), None);
}

#[test]
fn silence_is_measured_from_when_the_engine_heard_the_device_not_from_reading_times() {
    let rules = rules_with(vec![], vec![]);
    let mut d = device();
    // A week-old buffered reading, heard now (t(0)).
    let Decision::Events(events) = d.handle(&at(-7 * 86_400, DEPOT.0, DEPOT.1, 5.0), &rules) else {
        panic!()
    };
    apply_all(&mut d, &events);
    d.heard(t(0));
    assert_eq!(d.next_deadline(&rules), Some(t(600)));
    assert!(tick(&mut d, 599, &rules).is_empty());
}

#[test]
fn a_device_s_own_offline_period_overrides_the_default() {
    let rules = rules_with(vec![], vec![]);
    let mut d = device();
    feed(&mut d, &inside(0), &rules);
    let set = d.set_offline_after(Some(30), t(1));
    d.apply(&set);
    assert_eq!(d.next_deadline(&rules), Some(t(30)));
    assert_eq!(
        tick(&mut d, 31, &rules)[0].event_type(),
        "DeviceWentOffline"
    );
    let unset = d.set_offline_after(None, t(40));
    d.apply(&unset);
    assert_eq!(d.own_offline_after(), None);
}

#[test]
fn removing_a_zone_clears_its_alarm_at_the_next_decision() {
    let mut rules = rules_with(vec![depot(Severity::Warning, 0)], vec![]);
    let mut d = device();
    feed(&mut d, &outside(0), &rules);
    assert_eq!(d.alarms().count(), 1);
    rules.apply(&crate::RulesEvent::ZoneRemoved {
        zone_id: RuleId::parse("depot").unwrap(),
    });
    assert_eq!(d.next_deadline(&rules), Some(DateTime::<Utc>::MIN_UTC));
    assert_eq!(alarm_changes(&tick(&mut d, 1, &rules)), ["AlarmCleared"]);
}

#[test]
fn temperature_alarms_follow_the_range_s_severity_and_dwell() {
    let range = TemperatureRange::new(
        RuleId::parse("cold-chain").unwrap(),
        "Cold chain",
        Temperature::new(2.0).unwrap(),
        Temperature::new(8.0).unwrap(),
        Watched::All,
    )
    .unwrap()
    .with_alarm(Severity::Critical, 30);
    let rules = rules_with(vec![], vec![range]);
    let mut d = device();
    feed(&mut d, &at(0, DEPOT.0, DEPOT.1, 5.0), &rules);
    feed(&mut d, &at(10, DEPOT.0, DEPOT.1, 12.0), &rules);
    assert!(tick(&mut d, 39, &rules).is_empty());
    let opened = tick(&mut d, 40, &rules);
    let Some(DeviceEvent::AlarmOpened { kind, severity, .. }) = opened.first() else {
        panic!("{opened:?}")
    };
    assert_eq!(
        (*kind, *severity),
        (AlarmKind::TemperatureOutOfRange, Severity::Critical)
    );
    // Jumping to the other bound is the same condition: no second alarm.
    let jump = feed(&mut d, &at(50, DEPOT.0, DEPOT.1, -5.0), &rules);
    assert!(alarm_changes(&jump).is_empty(), "{jump:?}");
    assert_eq!(d.alarms().count(), 1);
}

#[test]
fn the_lifecycle_replays_to_the_same_state() {
    let rules = rules_with(vec![depot(Severity::Warning, 60)], vec![]);
    let mut d = device();
    let mut history = Vec::new();
    history.extend(feed(&mut d, &inside(0), &rules));
    history.extend(feed(&mut d, &outside(10), &rules));
    history.extend(tick(&mut d, 80, &rules));
    let id = d.alarms().next().unwrap().1.id.clone();
    let ack = d.acknowledge(&id, "op", None, t(90)).unwrap();
    d.apply(&ack);
    history.push(ack);
    history.extend(feed(&mut d, &inside(100), &rules));
    let mut replayed = Device::from_events(DeviceId::parse(DEVICE).unwrap(), history.iter());
    replayed.heard(t(100));
    assert_eq!(replayed, d);
    assert_eq!(replayed.next_deadline(&rules), Some(t(160)));
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<Device>(&json).unwrap(), d);
}

#[test]
fn dwell_runs_on_the_device_s_timeline_when_it_uploads_old_readings() {
    let rules = rules_with(vec![depot(Severity::Warning, 60)], vec![]);
    let mut d = device();
    // Readings taken a week ago, arriving now (t(0), t(1), ...) with ticks in between.
    let week = 7 * 86_400;
    let arrivals = [(-week, true), (-week + 10, false), (-week + 30, true)];
    for (heard, (taken, inside_zone)) in arrivals.into_iter().enumerate() {
        let heard = heard as i64;
        let reading = if inside_zone {
            inside(taken)
        } else {
            outside(taken)
        };
        let Decision::Events(events) = d.handle(&reading, &rules) else {
            panic!()
        };
        apply_all(&mut d, &events);
        d.heard(t(heard));
        let ticked = tick(&mut d, heard, &rules);
        assert!(alarm_changes(&ticked).is_empty(), "{ticked:?}");
    }
    assert!(alarm_changes(&tick(&mut d, 500, &rules)).is_empty());
    assert_eq!(d.alarms().count(), 0);
    // Out for good: the alarm opens 60 s later on the device's clock, i.e. 60 s after heard.
    let Decision::Events(events) = d.handle(&outside(-week + 40), &rules) else {
        panic!()
    };
    apply_all(&mut d, &events);
    d.heard(t(600));
    assert_eq!(d.next_deadline(&rules), Some(t(660)));
    assert!(tick(&mut d, 659, &rules).is_empty());
    let opened = tick(&mut d, 660, &rules);
    assert_eq!(alarm_changes(&opened), ["AlarmOpened"]);
    assert_eq!(
        opened[0].at(),
        t(-week + 100),
        "dated on the device's timeline"
    );
}
