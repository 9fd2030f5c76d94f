//! The cost of the pure decision: `Device::handle` (and `handle` + `apply`) for one reading.
//!
//! Every reading the engine ingests goes through `handle` on its device's actor, so this is the
//! CPU floor per reading, before any I/O. The device is in steady state (registered, its alarms
//! already raised), and the reading is a typical one: 1 s after the last, ~55 m away (over the
//! 25 m threshold, so it also raises `LocationChanged`), temperature +0.1 °C (under the 0.5 °C
//! threshold). The rule sets grow from none to 10 polygon zones and 5 ranges, which shows what
//! each watched rule costs (a geodesic distance per circle, a point-in-polygon test per polygon).
//!
//! Run with `cargo bench -p fleetwatch-domain --bench handle`.

use std::f64::consts::TAU;
use std::hint::black_box;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fleetwatch_domain::{
    Decision, Device, DeviceId, Location, Reading, RuleId, Rules, Temperature, TemperatureRange,
    Thresholds, Watched, Zone, ZoneShape,
};

const DEVICE: &str = "truck-7";
/// Where the device was last seen: central Amsterdam.
const HOME: (f64, f64) = (52.37, 4.89);

fn location(lat: f64, lon: f64) -> Location {
    Location::new(lat, lon).unwrap()
}

fn reading(secs: i64, lat: f64, lon: f64, celsius: f64) -> Reading {
    let at =
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap() + chrono::Duration::seconds(secs);
    Reading::new(DEVICE, at, lat, lon, celsius).unwrap()
}

fn add_zone(rules: &mut Rules, id: &str, shape: ZoneShape) {
    let zone = Zone::new(RuleId::parse(id).unwrap(), id, shape, Watched::All).unwrap();
    let event = rules.define_zone(zone);
    rules.apply(&event);
}

fn add_range(rules: &mut Rules, id: &str, min: f64, max: f64) {
    let range = TemperatureRange::new(
        RuleId::parse(id).unwrap(),
        id,
        Temperature::new(min).unwrap(),
        Temperature::new(max).unwrap(),
        Watched::All,
    )
    .unwrap();
    let event = rules.define_range(range);
    rules.apply(&event);
}

/// A 1 km depot circle around the device and a 2–8 °C cold-chain range.
fn depot_rules() -> Rules {
    let mut rules = Rules::new(Thresholds::default());
    add_zone(
        &mut rules,
        "depot",
        ZoneShape::circle(location(HOME.0, HOME.1), 1_000.0).unwrap(),
    );
    add_range(&mut rules, "cold-chain", 2.0, 8.0);
    rules
}

/// 10 star-shaped polygons of 8 to 20 vertices, spread so the device is inside some and outside
/// others, and 5 ranges of which the device's temperature violates two.
fn city_rules() -> Rules {
    let mut rules = Rules::new(Thresholds::default());
    for i in 0..10 {
        let vertices = 8 + i * 12 / 9;
        let center = (HOME.0 + 0.004 * i as f64, HOME.1 - 0.003 * i as f64);
        let radius = 0.01 + 0.003 * i as f64;
        let points: Vec<Location> = (0..vertices)
            .map(|k| {
                let angle = TAU * k as f64 / vertices as f64;
                // Alternating radii: a star, still a simple polygon since the angles increase.
                let r = if k % 2 == 0 { radius } else { radius * 0.7 };
                location(center.0 + r * angle.sin(), center.1 + r * angle.cos())
            })
            .collect();
        add_zone(
            &mut rules,
            &format!("zone-{i}"),
            ZoneShape::polygon(&points).unwrap(),
        );
    }
    for (i, (min, max)) in [
        (-25.0, -15.0),
        (0.0, 8.0),
        (2.0, 6.0),
        (-5.0, 30.0),
        (10.0, 20.0),
    ]
    .into_iter()
    .enumerate()
    {
        add_range(&mut rules, &format!("range-{i}"), min, max);
    }
    rules
}

/// A device that has seen one reading under `rules`: registered, with its alarms raised.
fn steady_device(rules: &Rules) -> Device {
    let mut device = Device::new(DeviceId::parse(DEVICE).unwrap());
    apply_all(&mut device, &reading(0, HOME.0, HOME.1, 4.5), rules);
    device
}

fn apply_all(device: &mut Device, reading: &Reading, rules: &Rules) {
    match device.handle(reading, rules) {
        Decision::Events(events) => events.iter().for_each(|e| device.apply(e)),
        Decision::Duplicate | Decision::Late(_) => {
            unreachable!("benchmark readings are always newer")
        }
    }
}

/// The reading every case handles: 1 s later, ~55 m north, +0.1 °C.
fn typical_reading() -> Reading {
    reading(1, HOME.0 + 0.0005, HOME.1, 4.6)
}

fn bench_handle(c: &mut Criterion) {
    let mut group = c.benchmark_group("device");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let reading = typical_reading();
    let cases = [
        ("handle/no_rules", Rules::new(Thresholds::default())),
        ("handle/1_circle_1_range", depot_rules()),
        ("handle/10_polygons_5_ranges", city_rules()),
    ];
    for (name, rules) in &cases {
        let device = steady_device(rules);
        // Steady state: no zone or range alarm changes, only ReadingRecorded + LocationChanged.
        assert!(
            matches!(device.handle(&reading, rules), Decision::Events(e) if e.len() == 2),
            "{name}: the typical reading must not change any alarm"
        );
        group.bench_function(*name, |b| {
            b.iter(|| device.handle(black_box(&reading), black_box(rules)))
        });
    }

    let rules = depot_rules();
    let device = steady_device(&rules);
    group.bench_function("handle_and_apply/1_circle_1_range", |b| {
        b.iter_batched(
            || device.clone(),
            |mut device| {
                apply_all(&mut device, black_box(&reading), &rules);
                device
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_handle);
criterion_main!(benches);
