//! When devices next need time to pass: the index behind offline detection and dwell times.
//!
//! A device's deadline (the domain's `Device::next_deadline`: when it goes offline if nothing
//! arrives, when a pending condition's dwell ends, when an alarm's clearing dwell ends) is
//! written with its events (the store's wake-up time, so the index is rebuilt from the store at
//! start without loading any device) and kept here in memory, ordered by time. A ticker hands
//! each due device a tick; the device decides what the time means and reports its next deadline.
//!
//! The index may hold a deadline *earlier* than the device's real one, never a later one: a
//! reading only moves a device's offline deadline later, so the hot path leaves the entry alone
//! and the tick at the old deadline finds nothing due and re-files the device at its real
//! deadline. That keeps the index off the per-reading path: each actor remembers the deadline it
//! filed, so a reading that only moves it later takes no lock and makes no lookup here.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use fleetwatch_domain::DeviceId;

#[derive(Default)]
pub struct Deadlines {
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    by_time: BTreeSet<(i64, DeviceId)>,
    by_device: HashMap<DeviceId, i64>,
}

impl Index {
    fn remove(&mut self, device: &DeviceId) {
        if let Some(at) = self.by_device.remove(device) {
            self.by_time.remove(&(at, device.clone()));
        }
    }

    fn insert(&mut self, device: DeviceId, at: i64) {
        self.by_time.insert((at, device.clone()));
        self.by_device.insert(device, at);
    }
}

impl Deadlines {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // Every change leaves the two maps consistent before it can panic: recover a poisoned one.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files `device` at `at` unless it is already filed at that time or earlier.
    pub fn file_no_later(&self, device: &DeviceId, at: DateTime<Utc>) {
        let at = at.timestamp_micros();
        let mut index = self.index();
        match index.by_device.get(device) {
            Some(filed) if *filed <= at => {}
            _ => {
                index.remove(device);
                index.insert(device.clone(), at);
            }
        }
    }

    /// Files `device` at exactly `at` (`None`: nothing is due for it).
    pub fn file(&self, device: &DeviceId, at: Option<DateTime<Utc>>) {
        let mut index = self.index();
        let at = at.map(|at| at.timestamp_micros());
        if index.by_device.get(device).copied() == at {
            return;
        }
        index.remove(device);
        if let Some(at) = at {
            index.insert(device.clone(), at);
        }
    }

    /// Takes up to `max` devices due at `now` out of the index, earliest first. A device's tick
    /// files it again.
    pub fn take_due(&self, now: DateTime<Utc>, max: usize) -> Vec<DeviceId> {
        let now = now.timestamp_micros();
        let mut index = self.index();
        let mut due = Vec::new();
        while due.len() < max {
            let Some((at, _)) = index.by_time.first() else {
                break;
            };
            if *at > now {
                break;
            }
            if let Some((_, device)) = index.by_time.pop_first() {
                index.by_device.remove(&device);
                due.push(device);
            }
        }
        due
    }

    /// Devices with a deadline.
    pub fn len(&self) -> usize {
        self.index().by_device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<DateTime<Utc>> {
        let index = self.index();
        let (at, _) = index.by_time.first()?;
        DateTime::from_timestamp_micros(*at)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 30, 12, 0, 0).unwrap() + chrono::Duration::seconds(secs)
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn due_devices_come_out_earliest_first_and_once() {
        let d = Deadlines::default();
        d.file(&id("b"), Some(t(20)));
        d.file(&id("a"), Some(t(10)));
        d.file(&id("c"), Some(t(30)));
        assert_eq!(d.next(), Some(t(10)));
        assert_eq!(d.take_due(t(25), 10), [id("a"), id("b")]);
        assert!(d.take_due(t(25), 10).is_empty());
        assert_eq!(d.len(), 1);
        assert_eq!(d.take_due(t(99), 0), Vec::<DeviceId>::new());
        assert_eq!(d.take_due(t(99), 1), [id("c")]);
    }

    #[test]
    fn no_later_only_ever_moves_a_deadline_earlier() {
        let d = Deadlines::default();
        d.file_no_later(&id("a"), t(10));
        d.file_no_later(&id("a"), t(50));
        assert_eq!(d.next(), Some(t(10)));
        d.file_no_later(&id("a"), t(5));
        assert_eq!(d.next(), Some(t(5)));
        d.file(&id("a"), Some(t(50)));
        assert_eq!(d.next(), Some(t(50)));
        d.file(&id("a"), None);
        assert_eq!((d.len(), d.next()), (0, None));
    }
}
