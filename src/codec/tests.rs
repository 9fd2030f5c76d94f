use chrono::TimeZone;
use fleetwatch_domain::TemperatureDirection;

use super::*;

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 18, 0, 0).unwrap() + chrono::Duration::microseconds(123_456)
}

fn id() -> DeviceId {
    DeviceId::parse("truck-7").unwrap()
}

/// As the store gives it back.
fn stored(event: &NewEvent, stream: &str) -> RecordedEvent {
    RecordedEvent {
        position: 12,
        stream: stream.into(),
        version: 3,
        event_type: event.event_type.into(),
        schema_version: event.schema_version,
        recorded_at: at(),
        at: event.at,
        payload: event.payload.clone(),
    }
}

fn reading(lat: f64, lon: f64, celsius: f64, rules: u64, late: bool) -> DeviceEvent {
    DeviceEvent::ReadingRecorded {
        device_id: id(),
        at: at(),
        location: Location::new(lat, lon).unwrap(),
        temperature: Temperature::new(celsius).unwrap(),
        rules_version: rules,
        moved: true,
        temperature_changed: false,
        late,
    }
}

fn round_trip(event: &DeviceEvent) -> (DeviceEvent, usize) {
    let new = encode_device_event(event);
    assert_eq!(new.schema_version, DEVICE_EVENT_SCHEMA);
    let decoded = decode_device_event(&stored(&new, "truck-7")).unwrap();
    (decoded, new.payload.len())
}

#[test]
fn a_typical_recorded_reading_takes_twelve_bytes_and_reads_back_exactly() {
    let event = reading(52.370_716_3, 4.895_168_1, 5.1, 12, false);
    let (decoded, size) = round_trip(&event);
    assert_eq!(decoded, event);
    assert_eq!(size, 1 + 4 + 4 + 2 + 1);
}

#[test]
fn values_the_scaled_form_cannot_hold_are_kept_in_full() {
    for event in [
        reading(52.370_716_31, 4.895_168_1, 5.1, 300, true),
        reading(52.370_716_3, 4.895_168_1, 5.123, u64::MAX, false),
        // The longest payload: everything in full and a ten-byte rules version.
        reading(52.370_716_31, 4.895_168_11, 5.123, u64::MAX, true),
        reading(-90.0, 180.0, 199.99, 0, false),
        reading(0.1 + 0.2, -0.0, -100.0, 1, false),
    ] {
        let (decoded, _) = round_trip(&event);
        assert_eq!(decoded, event, "bit for bit");
        let (
            DeviceEvent::ReadingRecorded {
                location: a,
                temperature: t,
                ..
            },
            DeviceEvent::ReadingRecorded {
                location: b,
                temperature: u,
                ..
            },
        ) = (&event, &decoded)
        else {
            unreachable!()
        };
        assert_eq!(a.lat().to_bits(), b.lat().to_bits());
        assert_eq!(a.lon().to_bits(), b.lon().to_bits());
        assert_eq!(t.celsius().to_bits(), u.celsius().to_bits());
    }
}

#[test]
fn every_device_event_round_trips_through_schema_2() {
    let location = Location::new(52.37, 4.89).unwrap();
    let warm = Temperature::new(9.5).unwrap();
    let events = [
        DeviceEvent::DeviceRegistered {
            device_id: id(),
            at: at(),
            location,
            temperature: warm,
        },
        DeviceEvent::LeftZone {
            device_id: id(),
            at: at(),
            zone_id: RuleId::parse("depot").unwrap(),
            zone_revision: 4,
            location,
            found_outside: true,
        },
        DeviceEvent::EnteredZone {
            device_id: id(),
            at: at(),
            zone_id: RuleId::parse("depot").unwrap(),
            location,
        },
        DeviceEvent::TemperatureOutOfRange {
            device_id: id(),
            at: at(),
            range_id: RuleId::parse("cold-chain").unwrap(),
            range_revision: 2,
            bound: Bound::Above,
            temperature: warm,
            limit: Temperature::new(8.0).unwrap(),
            found_out_of_range: false,
        },
        DeviceEvent::TemperatureBackInRange {
            device_id: id(),
            at: at(),
            range_id: RuleId::parse("cold-chain").unwrap(),
            temperature: warm,
        },
        DeviceEvent::DeviceWentOffline {
            device_id: id(),
            at: at(),
            last_seen: at() - chrono::Duration::minutes(10),
        },
        DeviceEvent::DeviceBackOnline {
            device_id: id(),
            at: at(),
            offline_since: at() - chrono::Duration::minutes(3),
        },
        DeviceEvent::OfflineAfterSet {
            device_id: id(),
            at: at(),
            offline_after_s: Some(90),
        },
        DeviceEvent::OfflineAfterSet {
            device_id: id(),
            at: at(),
            offline_after_s: None,
        },
        DeviceEvent::AlarmOpened {
            device_id: id(),
            at: at(),
            alarm_id: AlarmId::new(id(), 12),
            kind: AlarmKind::OutsideZone,
            rule_id: Some(RuleId::parse("depot").unwrap()),
            severity: Severity::Critical,
            cause_version: 1_234_567,
        },
        DeviceEvent::AlarmOpened {
            device_id: id(),
            at: at(),
            alarm_id: AlarmId::new(id(), 13),
            kind: AlarmKind::Offline,
            rule_id: None,
            severity: Severity::Warning,
            cause_version: 9,
        },
        DeviceEvent::AlarmAcknowledged {
            device_id: id(),
            at: at(),
            alarm_id: AlarmId::new(id(), 12),
            kind: AlarmKind::OutsideZone,
            rule_id: Some(RuleId::parse("depot").unwrap()),
            severity: Severity::Critical,
            sequence: 2,
            by: "night-shift".into(),
            comment: Some("driver called: detour".into()),
        },
        DeviceEvent::AlarmCleared {
            device_id: id(),
            at: at(),
            alarm_id: AlarmId::new(id(), 12),
            kind: AlarmKind::OutsideZone,
            rule_id: Some(RuleId::parse("depot").unwrap()),
            severity: Severity::Critical,
            sequence: 3,
        },
    ];
    for event in events {
        let (decoded, size) = round_trip(&event);
        assert_eq!(decoded, event);
        assert!(size < 64, "{} takes {size} bytes", event.event_type());
    }
}

#[test]
fn first_schema_events_read_as_they_were_written() {
    let json = r#"{"type":"LocationChanged","device_id":"truck-7","at":"2026-11-23T18:00:00Z","from":{"lat":52.0,"lon":4.0},"to":{"lat":52.1,"lon":4.0},"distance_m":11132.0}"#;
    let recorded = RecordedEvent {
        schema_version: JSON_SCHEMA,
        event_type: "LocationChanged".into(),
        payload: Bytes::from(json),
        at: None,
        ..stored(
            &encode_device_event(&reading(1.0, 1.0, 1.0, 1, false)),
            "truck-7",
        )
    };
    assert!(matches!(
        decode_device_event(&recorded).unwrap(),
        DeviceEvent::LocationChanged { distance_m, .. } if distance_m == 11132.0
    ));
    assert_eq!(event_json(&recorded).unwrap()["to"]["lat"], 52.1);
    // Never raised now, but still writable the old way.
    let legacy = DeviceEvent::TemperatureChanged {
        device_id: id(),
        at: at(),
        from: Temperature::new(1.0).unwrap(),
        to: Temperature::new(2.0).unwrap(),
        direction: TemperatureDirection::Increased,
    };
    let new = encode_device_event(&legacy);
    assert_eq!(new.schema_version, JSON_SCHEMA);
    assert_eq!(
        decode_device_event(&stored(&new, "truck-7")).unwrap(),
        legacy
    );
}

#[test]
fn the_api_sees_the_same_json_whatever_the_schema() {
    let event = reading(52.37, 4.89, 5.5, 7, true);
    let recorded = stored(&encode_device_event(&event), "truck-7");
    assert_eq!(
        event_json(&recorded).unwrap(),
        serde_json::to_value(&event).unwrap()
    );
    let view = serde_json::to_value(EventView::new(&recorded)).unwrap();
    assert_eq!(view["data"]["late"], true);
    assert_eq!(view["data"]["device_id"], "truck-7");
    assert_eq!(view["type"], "ReadingRecorded");
}

#[test]
fn damage_is_named_and_shown_as_a_string() {
    let good = stored(
        &encode_device_event(&reading(52.0, 4.0, 5.0, 1, false)),
        "truck-7",
    );
    let cut = RecordedEvent {
        payload: good.payload.slice(..5),
        ..good.clone()
    };
    let err = decode_device_event(&cut).unwrap_err();
    assert_eq!(
        (err.stream.as_str(), err.version, err.position),
        ("truck-7", 3, 12)
    );
    assert!(
        err.to_string()
            .starts_with("stored event truck-7@3 (position 12, type ReadingRecorded)"),
        "{err}"
    );
    let wrong_type = RecordedEvent {
        event_type: "EnteredZone".into(),
        ..good.clone()
    };
    assert!(decode_device_event(&wrong_type).is_err());
    let future = RecordedEvent {
        schema_version: 99,
        ..good.clone()
    };
    assert!(decode_device_event(&future)
        .unwrap_err()
        .reason
        .contains("unknown schema version 99"));
    let view = serde_json::to_value(EventView::new(&RecordedEvent {
        schema_version: JSON_SCHEMA,
        payload: Bytes::from_static(b"{broken"),
        ..good
    }))
    .unwrap();
    assert_eq!(view["data"], "{broken");
}

#[test]
fn damaged_events_are_listed_one_per_line() {
    let rules = |payload: &'static [u8]| RecordedEvent {
        stream: "$rules".into(),
        schema_version: JSON_SCHEMA,
        event_type: "ZoneRemoved".into(),
        payload: Bytes::from_static(payload),
        at: None,
        ..stored(
            &encode_device_event(&reading(1.0, 1.0, 1.0, 1, false)),
            "$rules",
        )
    };
    let a = decode_rules_event(&rules(b"{")).unwrap_err();
    let b = decode_rules_event(&rules(b"[]")).unwrap_err();
    let text = DamagedEvents(vec![a, b]).to_string();
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn a_snapshot_of_another_format_or_device_is_unreadable() {
    let device = Device::new(id());
    let good = encode_device_snapshot(&device);
    assert_eq!(decode_device_snapshot(&id(), &good).unwrap(), device);
    let other_format = Snapshot {
        schema_version: 99,
        ..good.clone()
    };
    assert!(matches!(
        decode_device_snapshot(&id(), &other_format),
        Err(UnreadableSnapshot::Format { found: 99 })
    ));
    let malformed = Snapshot {
        payload: Bytes::from_static(b"{"),
        ..good.clone()
    };
    assert!(matches!(
        decode_device_snapshot(&id(), &malformed),
        Err(UnreadableSnapshot::Malformed(_))
    ));
    let other = DeviceId::parse("d-2").unwrap();
    assert!(matches!(
        decode_device_snapshot(&other, &good),
        Err(UnreadableSnapshot::OtherDevice { .. })
    ));
    // Format 1 has no alarm state: the device replays its events instead.
    let before_alarms = Snapshot {
        schema_version: 1,
        ..good
    };
    assert!(matches!(
        decode_device_snapshot(&id(), &before_alarms),
        Err(UnreadableSnapshot::Format { found: 1 })
    ));
}
