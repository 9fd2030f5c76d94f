//! The wire format of a reading, and its validation into a domain [`Reading`].
//!
//! Errors name the offending field (and, in a batch, the index), whichever way the input is bad:
//! not JSON, a missing field, a wrong type, or a value the domain refuses.

use chrono::{DateTime, Utc};
use fleetwatch_domain::{Reading, ValidationError};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}{reason}", index.map(|i| format!("reading {i}: ")).unwrap_or_default(), field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct InvalidReading {
    pub field: Option<String>,
    pub index: Option<usize>,
    pub reason: String,
}

impl InvalidReading {
    fn body(reason: impl Into<String>) -> Self {
        Self {
            field: None,
            index: None,
            reason: reason.into(),
        }
    }
}

impl From<ValidationError> for InvalidReading {
    fn from(e: ValidationError) -> Self {
        Self {
            field: Some(e.field.to_owned()),
            index: None,
            reason: e.reason,
        }
    }
}

// Owned strings: borrowing them from the message (a custom visitor; serde borrows only a bare
// `Cow` field, not one inside an `Option`) saved 10 ns of a 280 ns parse, nothing measurable in a
// drain (docs/benchmarks.md, 2026-12-02), so the plain form stays.
#[derive(Deserialize)]
struct WireReading {
    device_id: Option<String>,
    timestamp: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    temperature: Option<f64>,
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, ValidationError> {
    value.ok_or_else(|| ValidationError::new(field, "is required"))
}

/// Parses one reading from JSON text.
pub fn parse_reading(json: &str) -> Result<Reading, InvalidReading> {
    // The path to a bad field is worked out only for a reading that fails: tracking it costs a
    // good reading a third of its parse.
    let wire = match WireReading::deserialize(&mut serde_json::Deserializer::from_str(json)) {
        Ok(wire) => wire,
        Err(_) => return Err(invalid_json(json)),
    };
    let device_id = required(wire.device_id, "device_id")?;
    let timestamp = Reading::parse_timestamp(&required(wire.timestamp, "timestamp")?)?;
    Ok(Reading::new(
        device_id,
        timestamp,
        required(wire.lat, "lat")?,
        required(wire.lon, "lon")?,
        required(wire.temperature, "temperature")?,
    )?)
}

/// Why `json` is not a reading, naming the field at fault when there is one.
fn invalid_json(json: &str) -> InvalidReading {
    let de = &mut serde_json::Deserializer::from_str(json);
    match serde_path_to_error::deserialize::<_, WireReading>(de) {
        // Not reached: the same deserializer failed just before.
        Ok(_) => InvalidReading::body("not a reading object"),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                InvalidReading::body(format!("not a reading object: {inner}"))
            } else {
                InvalidReading {
                    field: Some(path),
                    index: None,
                    reason: inner.to_string(),
                }
            }
        }
    }
}

/// Refuses a reading dated more than `max_skew` ahead of `now`. Both ingest paths apply it: a
/// device clock in the future would otherwise make every later real reading of the device look
/// older than its last one.
pub fn check_clock(
    reading: &Reading,
    now: DateTime<Utc>,
    max_skew: std::time::Duration,
) -> Result<(), InvalidReading> {
    let skew = chrono::Duration::from_std(max_skew).unwrap_or(chrono::Duration::MAX);
    match now.checked_add_signed(skew) {
        Some(limit) if reading.timestamp > limit => Err(InvalidReading {
            field: Some("timestamp".into()),
            index: None,
            reason: format!(
                "{} is more than {} ahead of the engine's clock ({}; --max-clock-skew)",
                reading.timestamp.to_rfc3339(),
                humantime::format_duration(max_skew),
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ),
        }),
        _ => Ok(()),
    }
}

/// Parses one reading or a JSON array of readings. Every element is validated; the first bad one
/// is reported with its index.
pub fn parse_readings(body: &[u8]) -> Result<Vec<Reading>, InvalidReading> {
    let text = std::str::from_utf8(body)
        .map_err(|e| InvalidReading::body(format!("body is not UTF-8: {e}")))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text)
            .map_err(|e| InvalidReading::body(format!("body is not a JSON array: {e}")))?;
        items
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                parse_reading(raw.get()).map_err(|mut e| {
                    e.index = Some(i);
                    e
                })
            })
            .collect()
    } else {
        parse_reading(text).map(|r| vec![r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        r#"{"device_id":"d1","timestamp":"2026-11-23T18:00:00Z","lat":1,"lon":2,"temperature":3}"#;

    #[test]
    fn parses_one_or_many() {
        assert_eq!(parse_readings(OK.as_bytes()).unwrap().len(), 1);
        let batch = format!("[{OK},{OK}]");
        assert_eq!(parse_readings(batch.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn escaped_strings_are_decoded_and_a_number_for_a_string_names_the_field() {
        let escaped = r#"{"device_id":"d\u002d1","timestamp":"2026-11-23T18:00:00Z","lat":1,"lon":2,"temperature":3}"#;
        assert_eq!(parse_reading(escaped).unwrap().device_id.as_str(), "d-1");
        let number =
            r#"{"device_id":5,"timestamp":"2026-11-23T18:00:00Z","lat":1,"lon":2,"temperature":3}"#;
        let err = parse_reading(number).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("device_id"));
        assert!(err.reason.contains("expected a string"), "{}", err.reason);
    }

    #[test]
    fn names_the_field_and_index() {
        let bad = r#"{"device_id":"d1","timestamp":"2026-11-23T18:00:00Z","lat":91,"lon":2,"temperature":3}"#;
        let err = parse_readings(format!("[{OK},{bad}]").as_bytes()).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("lat"));
        assert_eq!(err.index, Some(1));
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_field() {
        let wrong = r#"{"device_id":"d1","timestamp":"2026-11-23T18:00:00Z","lat":"north","lon":2,"temperature":3}"#;
        assert_eq!(
            parse_reading(wrong).unwrap_err().field.as_deref(),
            Some("lat")
        );
        let missing = r#"{"device_id":"d1","timestamp":"2026-11-23T18:00:00Z","lat":1,"lon":2}"#;
        assert_eq!(
            parse_reading(missing).unwrap_err().field.as_deref(),
            Some("temperature")
        );
        let bad_time = r#"{"device_id":"d1","timestamp":"noon","lat":1,"lon":2,"temperature":3}"#;
        assert_eq!(
            parse_reading(bad_time).unwrap_err().field.as_deref(),
            Some("timestamp")
        );
    }

    #[test]
    fn readings_from_the_future_are_refused_naming_the_timestamp() {
        let reading = parse_reading(OK).unwrap();
        let skew = std::time::Duration::from_secs(300);
        let at = reading.timestamp;
        assert!(check_clock(&reading, at - chrono::Duration::seconds(300), skew).is_ok());
        let err = check_clock(&reading, at - chrono::Duration::seconds(301), skew).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("timestamp"));
        assert!(
            err.to_string().contains("ahead of the engine's clock"),
            "{err}"
        );
        assert!(check_clock(&reading, at - chrono::Duration::days(3650), skew).is_err());
    }

    #[test]
    fn garbage_is_a_body_error() {
        let err = parse_readings(b"not json").unwrap_err();
        assert_eq!(err.field, None);
        assert!(parse_readings(b"[1,2]").unwrap_err().index == Some(0));
        assert!(parse_readings(&[0xff, 0xfe]).is_err());
    }
}
