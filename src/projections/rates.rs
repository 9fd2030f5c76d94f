//! Readings and events per second, over the last second and the last minute, counted by the
//! second their events were committed in. In memory: after a restart they count from zero.

use std::sync::{Arc, Mutex};

use chrono::Utc;
use serde::Serialize;

use crate::codec::READING_RECORDED;
use crate::store::RecordedEvent;

/// Seconds kept: the last minute and the second in progress.
const SECONDS: usize = 61;

#[derive(Clone)]
pub struct Rates {
    slots: Arc<Mutex<[Slot; SECONDS]>>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            slots: Arc::new(Mutex::new([Slot::default(); SECONDS])),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    second: i64,
    readings: u64,
    events: u64,
}

/// Per second, over the last complete second and the last complete minute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RateSnapshot {
    pub readings_per_second_last_second: f64,
    pub readings_per_second_last_minute: f64,
    pub events_per_second_last_second: f64,
    pub events_per_second_last_minute: f64,
}

impl Rates {
    pub fn record(&self, events: &[RecordedEvent]) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for event in events {
            let second = event.recorded_at.timestamp();
            let slot = &mut slots[second.rem_euclid(SECONDS as i64) as usize];
            if slot.second != second {
                *slot = Slot {
                    second,
                    readings: 0,
                    events: 0,
                };
            }
            slot.events += 1;
            if event.event_type == READING_RECORDED {
                slot.readings += 1;
            }
        }
    }

    pub fn snapshot(&self) -> RateSnapshot {
        self.snapshot_at(Utc::now().timestamp())
    }

    fn snapshot_at(&self, now: i64) -> RateSnapshot {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut minute = (0u64, 0u64);
        let mut second = (0u64, 0u64);
        for slot in slots.iter() {
            // Complete seconds only: the one in progress would read low.
            if slot.second >= now - 60 && slot.second < now {
                minute.0 += slot.readings;
                minute.1 += slot.events;
                if slot.second == now - 1 {
                    second = (slot.readings, slot.events);
                }
            }
        }
        RateSnapshot {
            readings_per_second_last_second: second.0 as f64,
            readings_per_second_last_minute: minute.0 as f64 / 60.0,
            events_per_second_last_second: second.1 as f64,
            events_per_second_last_minute: minute.1 as f64 / 60.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(second: i64, event_type: &str) -> RecordedEvent {
        RecordedEvent {
            position: 1,
            stream: "d".into(),
            version: 1,
            event_type: event_type.into(),
            schema_version: 2,
            recorded_at: chrono::DateTime::from_timestamp(second, 500).unwrap(),
            at: None,
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn counts_complete_seconds_of_the_last_minute() {
        let rates = Rates::default();
        let now = 1_000_000;
        let mut events = Vec::new();
        for s in [now - 70, now - 30, now - 30, now - 1, now - 1, now - 1, now] {
            events.push(event(s, READING_RECORDED));
        }
        events.push(event(now - 1, "LeftZone"));
        rates.record(&events);
        let r = rates.snapshot_at(now);
        assert_eq!(r.readings_per_second_last_second, 3.0);
        assert_eq!(r.events_per_second_last_second, 4.0);
        assert_eq!(r.readings_per_second_last_minute, 5.0 / 60.0);
        assert_eq!(r.events_per_second_last_minute, 6.0 / 60.0);
    }
}
