//! The event store's contract (`fleetwatch::store::EventStore`), run against every backend:
//! the embedded SQLite store, and PostgreSQL on the server at `FLEETWATCH_TEST_POSTGRES_URL`
//! (a fresh database per test). Each test below runs once per backend (`sqlite::…`, `postgres::…`).
//! Built with the `kurrentdb` feature, each also runs against the KurrentDB server at
//! `FLEETWATCH_KURRENTDB_URL` (`kurrentdb::…`, a fresh namespace per test), and fails without one.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use fleetwatch::store::{
    Appended, EventStore, NewEvent, PostgresStore, PostgresStoreOptions, Snapshot, SnapshotAndTail,
    SqliteStore, SqliteStoreOptions, StoreError, StreamAt, StreamInfo, Wake,
};

/// Where a backend keeps its data between the handles a test opens.
enum Fixture {
    Sqlite(tempfile::TempDir),
    Postgres(String),
    /// The server, the test's namespace on it, and where the nodes keep their replicas.
    #[cfg(feature = "kurrentdb")]
    Kurrentdb(String, String, tempfile::TempDir),
}

impl Fixture {
    fn sqlite() -> Self {
        Fixture::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    async fn postgres() -> Self {
        Fixture::Postgres(common::postgres::fresh_database().await)
    }

    #[cfg(feature = "kurrentdb")]
    fn kurrentdb() -> Self {
        let url = std::env::var("FLEETWATCH_KURRENTDB_URL").expect(
            "FLEETWATCH_KURRENTDB_URL must point at a KurrentDB server (e.g. kurrentdb://127.0.0.1:2113?tls=false)",
        );
        let namespace = format!("fwtest{}", uuid::Uuid::new_v4().simple());
        Fixture::Kurrentdb(url, namespace, tempfile::tempdir().expect("temp dir"))
    }

    #[cfg(feature = "kurrentdb")]
    async fn kurrentdb_node(&self, node: &str) -> Arc<dyn EventStore> {
        let Fixture::Kurrentdb(url, namespace, dir) = self else {
            unreachable!("only for the KurrentDB fixture")
        };
        let options = fleetwatch::store::KurrentDbStoreOptions {
            namespace: namespace.clone(),
            ..Default::default()
        };
        Arc::new(
            fleetwatch::store::KurrentDbStore::open(url, &dir.path().join(node), options)
                .await
                .expect("open KurrentDB"),
        )
    }

    /// A new handle on the store, as a (re)started engine opens it.
    async fn open(&self) -> Arc<dyn EventStore> {
        match self {
            Fixture::Sqlite(dir) => Arc::new(
                SqliteStore::open(dir.path(), SqliteStoreOptions::default()).expect("open SQLite"),
            ),
            Fixture::Postgres(url) => Arc::new(
                PostgresStore::open(url, PostgresStoreOptions::default())
                    .await
                    .expect("open PostgreSQL"),
            ),
            #[cfg(feature = "kurrentdb")]
            Fixture::Kurrentdb(..) => self.kurrentdb_node("a").await,
        }
    }

    /// The handle a second engine node would have: its own for a shared backend; the same one
    /// for the embedded store, which belongs to one process.
    async fn another_node(&self, first: &Arc<dyn EventStore>) -> Arc<dyn EventStore> {
        match self {
            Fixture::Sqlite(_) => first.clone(),
            Fixture::Postgres(_) => self.open().await,
            // Another node has a replica of its own.
            #[cfg(feature = "kurrentdb")]
            Fixture::Kurrentdb(..) => self.kurrentdb_node("b").await,
        }
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Fixture::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Fixture::postgres().await).await
                }
            )*
        }
        #[cfg(feature = "kurrentdb")]
        mod kurrentdb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Fixture::kurrentdb()).await
                }
            )*
        }
    };
}

conformance!(
    appends_read_back_in_order_with_positions,
    a_wrong_expected_version_is_a_conflict_and_writes_nothing,
    a_conflict_does_not_fail_the_rest_of_its_batch,
    a_condition_on_another_stream_fences_the_append,
    snapshots_keep_the_newest_and_system_streams_are_not_listed,
    the_latest_snapshot_comes_with_the_events_after_it,
    a_fleet_of_loads_at_once_all_answer_correctly,
    concurrent_appends_answer_the_positions_they_were_stored_at,
    streams_are_listed_in_id_order_page_by_page,
    events_are_found_by_time_both_ways_page_by_page,
    wake_times_are_written_with_the_events,
    retention_removes_only_what_a_snapshot_covers,
    committed_events_are_published_and_survive_reopen,
    concurrent_appenders_on_one_stream_exactly_one_wins,
    readers_never_see_a_gap_fill_in_behind_them,
    every_nodes_commits_reach_every_subscriber_in_order,
);

fn event(n: u32) -> NewEvent {
    NewEvent {
        event_type: "Test",
        schema_version: 1,
        payload: Bytes::from(format!(r#"{{"n":{n}}}"#)),
        at: None,
    }
}

fn event_at(event_type: &'static str, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        event_type,
        schema_version: 2,
        payload: Bytes::from(at.to_rfc3339()),
        at: Some(at),
    }
}

fn snapshot(stream: &str, version: u64) -> Snapshot {
    Snapshot {
        stream: stream.into(),
        version,
        schema_version: 1,
        payload: Bytes::from(format!("{version}")),
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

async fn appends_read_back_in_order_with_positions(f: Fixture) {
    let s = f.open().await;
    let a = s
        .append("a", 0, vec![event(1), event(2)], None)
        .await
        .unwrap();
    assert_eq!(
        a,
        Appended {
            version: 2,
            last_position: 2
        }
    );
    let b = s.append("b", 0, vec![event(3)], None).await.unwrap();
    assert_eq!(b.last_position, 3);
    let stream = s.read_stream("a", 1, 100).await.unwrap();
    assert_eq!(stream.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(&stream[1].payload[..], br#"{"n":2}"#);
    assert_eq!(stream[1].event_type, "Test");
    assert_eq!(stream[1].schema_version, 1);
    assert_eq!(s.read_stream("a", 2, 100).await.unwrap().len(), 1);
    assert_eq!(s.read_stream("a", 1, 1).await.unwrap().len(), 1);
    let all = s.read_all(1, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.position).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(
        all.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(s.read_all(0, 2).await.unwrap().len(), 2);
    assert_eq!(s.head_position().await.unwrap(), 3);
    assert_eq!(s.stream_version("a").await.unwrap(), Some(2));
    assert_eq!(s.stream_version("zzz").await.unwrap(), None);
}

async fn a_wrong_expected_version_is_a_conflict_and_writes_nothing(f: Fixture) {
    let s = f.open().await;
    s.append("a", 0, vec![event(1)], None).await.unwrap();
    let err = s.append("a", 0, vec![event(2)], None).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(s.read_stream("a", 1, 10).await.unwrap().len(), 1);
    assert_eq!(s.head_position().await.unwrap(), 1);
    // A conflicting first append creates no stream.
    s.append("b", 0, vec![event(3)], None).await.unwrap();
    assert!(s.append("c", 5, vec![event(4)], None).await.is_err());
    assert_eq!(s.stream_version("c").await.unwrap(), None);
}

async fn a_conflict_does_not_fail_the_rest_of_its_batch(f: Fixture) {
    let s = f.open().await;
    // Issued without awaiting: they land in one batch, applied in call order.
    let ok1 = s.append("a", 0, vec![event(1)], None);
    let bad = s.append("a", 0, vec![event(2)], None);
    let ok2 = s.append("a", 1, vec![event(3)], None);
    assert!(ok1.await.is_ok());
    assert!(bad.await.is_err());
    assert_eq!(ok2.await.unwrap().version, 2);
    let payloads: Vec<Bytes> = s
        .read_stream("a", 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(payloads, [&br#"{"n":1}"#[..], &br#"{"n":3}"#[..]]);
}

async fn a_condition_on_another_stream_fences_the_append(f: Fixture) {
    let s = f.open().await;
    s.append("$rules", 0, vec![event(0)], None).await.unwrap();
    let at = |version| {
        Some(StreamAt {
            stream: "$rules",
            version,
        })
    };
    s.append("dev-1", 0, vec![event(1)], at(1)).await.unwrap();
    s.append("$rules", 1, vec![event(2)], None).await.unwrap();
    let err = s
        .append("dev-1", 1, vec![event(3)], at(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { stream, expected: 1, actual: 2 } if stream == "$rules"),
        "{err}"
    );
    assert_eq!(s.stream_version("dev-1").await.unwrap(), Some(1));
    s.append("dev-1", 1, vec![event(3)], at(2)).await.unwrap();
}

async fn snapshots_keep_the_newest_and_system_streams_are_not_listed(f: Fixture) {
    let s = f.open().await;
    s.append("$rules", 0, vec![event(0)], None).await.unwrap();
    s.append("dev-1", 0, (1..=5).map(event).collect(), None)
        .await
        .unwrap();
    s.save_snapshot(snapshot("dev-1", 5)).await.unwrap();
    s.save_snapshot(snapshot("dev-1", 3)).await.unwrap();
    // A stream with no events has nothing to snapshot.
    s.save_snapshot(snapshot("nobody", 1)).await.unwrap();
    let latest = s.read_latest("dev-1", 10).await.unwrap();
    assert_eq!(latest.snapshot, Some(snapshot("dev-1", 5)));
    assert_eq!(s.read_latest("nobody", 10).await.unwrap().snapshot, None);
    let streams = s.list_streams(None, 10).await.unwrap();
    assert_eq!(
        streams,
        vec![StreamInfo {
            stream: "dev-1".into(),
            version: 5
        }]
    );
}

async fn the_latest_snapshot_comes_with_the_events_after_it(f: Fixture) {
    let s = f.open().await;
    let versions =
        |latest: &SnapshotAndTail| -> Vec<u64> { latest.tail.iter().map(|e| e.version).collect() };
    assert_eq!(
        s.read_latest("dev-1", 10).await.unwrap(),
        SnapshotAndTail {
            snapshot: None,
            tail: vec![]
        }
    );
    s.append("dev-1", 0, (1..=4).map(event).collect(), None)
        .await
        .unwrap();
    let latest = s.read_latest("dev-1", 10).await.unwrap();
    assert_eq!(
        (latest.snapshot.is_none(), versions(&latest)),
        (true, vec![1, 2, 3, 4])
    );
    s.save_snapshot(snapshot("dev-1", 2)).await.unwrap();
    let latest = s.read_latest("dev-1", 10).await.unwrap();
    assert_eq!(latest.snapshot.as_ref().map(|s| s.version), Some(2));
    assert_eq!(versions(&latest), [3, 4]);
    let limited = s.read_latest("dev-1", 1).await.unwrap();
    assert_eq!(versions(&limited), [3]);
}

/// Appends sent at once share commits (hundreds of events in one batch, of one to three events
/// each, some refused as conflicts): each answers the position its last event was stored at, and
/// a stream's events sit at consecutive positions.
async fn concurrent_appends_answer_the_positions_they_were_stored_at(f: Fixture) {
    let s = f.open().await;
    let appends = (0..600u32).map(|n| {
        let s = s.clone();
        // Every tenth expects a version its stream does not have: a conflict inside the batch.
        let expected = u64::from(n % 10 == 9);
        let events = (0..n % 3 + 1).map(|i| event(n * 10 + i)).collect();
        async move {
            (
                n,
                s.append(&format!("dev-{n}"), expected, events, None).await,
            )
        }
    });
    let mut answered = Vec::new();
    for (n, result) in futures_util::future::join_all(appends).await {
        if n % 10 == 9 {
            assert!(
                matches!(result, Err(StoreError::Conflict { .. })),
                "append {n}: {result:?}"
            );
            continue;
        }
        let appended = result.unwrap_or_else(|e| panic!("append {n}: {e}"));
        assert_eq!(appended.version, u64::from(n % 3 + 1), "append {n}");
        answered.push((n, appended.last_position));
    }
    for (n, last_position) in answered {
        let stored = s.read_stream(&format!("dev-{n}"), 1, 10).await.unwrap();
        let positions: Vec<u64> = stored.iter().map(|e| e.position).collect();
        let first = last_position + 1 - stored.len() as u64;
        assert_eq!(
            positions,
            (first..=last_position).collect::<Vec<_>>(),
            "append {n}"
        );
        let payloads: Vec<&[u8]> = stored.iter().map(|e| &e.payload[..]).collect();
        let appended: Vec<NewEvent> = (0..n % 3 + 1).map(|i| event(n * 10 + i)).collect();
        let expected: Vec<&[u8]> = appended.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(payloads, expected, "append {n}");
    }
}

/// A fleet appearing at once asks for thousands of device loads together (the first reading of
/// each): they queue for the store's connections and every one gets its own stream.
async fn a_fleet_of_loads_at_once_all_answer_correctly(f: Fixture) {
    let s = f.open().await;
    for n in 0..50u32 {
        let stream = format!("dev-{n}");
        s.append(&stream, 0, (1..=n % 3 + 1).map(event).collect(), None)
            .await
            .unwrap();
    }
    let loads = (0..2_000u32).map(|n| {
        let s = s.clone();
        async move { (n, s.read_latest(&format!("dev-{}", n % 100), 10).await) }
    });
    for (n, latest) in futures_util::future::join_all(loads).await {
        let latest = latest.unwrap_or_else(|e| panic!("load {n}: {e}"));
        let expected: Vec<u64> = match n % 100 {
            known @ 0..50 => (1..=u64::from(known % 3 + 1)).collect(),
            _ => vec![],
        };
        let versions: Vec<u64> = latest.tail.iter().map(|e| e.version).collect();
        assert_eq!(versions, expected, "load {n}");
    }
}

async fn streams_are_listed_in_id_order_page_by_page(f: Fixture) {
    let s = f.open().await;
    // Byte order, whatever the database's locale: upper case before lower, '-' before digits.
    for name in ["b", "a-2", "B", "a10", "$rules", "a-1"] {
        s.append(name, 0, vec![event(1)], None).await.unwrap();
    }
    s.append("a10", 1, vec![event(2)], None).await.unwrap();
    let page1 = s.list_streams(None, 3).await.unwrap();
    let names: Vec<&str> = page1.iter().map(|i| i.stream.as_str()).collect();
    assert_eq!(names, ["B", "a-1", "a-2"]);
    let page2 = s.list_streams(Some("a-2"), 3).await.unwrap();
    assert_eq!(
        page2,
        vec![
            StreamInfo {
                stream: "a10".into(),
                version: 2
            },
            StreamInfo {
                stream: "b".into(),
                version: 1
            }
        ]
    );
}

async fn events_are_found_by_time_both_ways_page_by_page(f: Fixture) {
    let s = f.open().await;
    let events = vec![
        event_at("Reading", t(10)),
        event_at("Other", t(15)),
        event_at("Reading", t(20)),
        event_at("Reading", t(30)),
        event_at("Reading", t(40)),
    ];
    s.append("dev-1", 0, events, None).await.unwrap();
    s.append("dev-2", 0, vec![event_at("Reading", t(20))], None)
        .await
        .unwrap();
    assert!(s.has_event_at("dev-1", "Reading", t(20)).await.unwrap());
    assert!(!s.has_event_at("dev-1", "Reading", t(15)).await.unwrap());
    assert!(!s.has_event_at("dev-1", "Unknown", t(20)).await.unwrap());
    let ats = |events: &[fleetwatch::store::RecordedEvent]| -> Vec<i64> {
        events
            .iter()
            .map(|e| e.at.unwrap().timestamp() - 1_700_000_000)
            .collect()
    };
    let range = t(10)..t(40);
    let first = s
        .read_by_time("dev-1", "Reading", range.clone(), None, false, 2)
        .await
        .unwrap();
    assert_eq!(ats(&first), [10, 20]);
    let last = first.last().unwrap();
    let rest = s
        .read_by_time(
            "dev-1",
            "Reading",
            range.clone(),
            Some((last.at.unwrap(), last.position)),
            false,
            10,
        )
        .await
        .unwrap();
    assert_eq!(ats(&rest), [30]);
    let newest = s
        .read_by_time("dev-1", "Reading", range.clone(), None, true, 2)
        .await
        .unwrap();
    assert_eq!(ats(&newest), [30, 20]);
    let last = newest.last().unwrap();
    let older = s
        .read_by_time(
            "dev-1",
            "Reading",
            range,
            Some((last.at.unwrap(), last.position)),
            true,
            10,
        )
        .await
        .unwrap();
    assert_eq!(ats(&older), [10]);
    assert!(s
        .read_by_time("dev-1", "Unknown", t(0)..t(100), None, false, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn wake_times_are_written_with_the_events(f: Fixture) {
    let s = f.open().await;
    s.append_waking("dev-1", 0, vec![event(1)], None, Wake::At(Some(t(60))))
        .await
        .unwrap();
    s.append_waking("dev-2", 0, vec![event(1)], None, Wake::At(Some(t(90))))
        .await
        .unwrap();
    // Keep leaves it; an empty append changes nothing; `At(None)` clears it.
    s.append_waking("dev-1", 1, vec![event(2)], None, Wake::Keep)
        .await
        .unwrap();
    s.append_waking("dev-2", 1, vec![], None, Wake::At(None))
        .await
        .unwrap();
    let mut wakes = s.wake_times().await.unwrap();
    wakes.sort();
    assert_eq!(
        wakes,
        vec![("dev-1".into(), t(60)), ("dev-2".into(), t(90))]
    );
    s.append_waking("dev-2", 1, vec![event(2)], None, Wake::At(None))
        .await
        .unwrap();
    assert_eq!(s.wake_times().await.unwrap(), vec![("dev-1".into(), t(60))]);
    // Moved later by less than a minute: stored as it was or as it is now, never later; moved
    // later by more, or earlier, it is exact.
    s.append_waking("dev-1", 2, vec![event(3)], None, Wake::At(Some(t(90))))
        .await
        .unwrap();
    let wakes = s.wake_times().await.unwrap();
    assert!(
        matches!(wakes.as_slice(), [(d, at)] if d == "dev-1" && (t(60)..=t(90)).contains(at)),
        "{wakes:?}"
    );
    for (version, wake) in [(3, t(200)), (4, t(150))] {
        s.append_waking(
            "dev-1",
            version,
            vec![event(version as u32 + 1)],
            None,
            Wake::At(Some(wake)),
        )
        .await
        .unwrap();
        assert_eq!(s.wake_times().await.unwrap(), vec![("dev-1".into(), wake)]);
    }
    // A conflicting append sets nothing.
    assert!(s
        .append_waking("dev-1", 0, vec![event(6)], None, Wake::At(None))
        .await
        .is_err());
    assert_eq!(s.wake_times().await.unwrap().len(), 1);
}

async fn retention_removes_only_what_a_snapshot_covers(f: Fixture) {
    const READINGS: &[&str] = &["Reading"];
    let s = f.open().await;
    let history = |offset: i64| -> Vec<NewEvent> {
        (0..10)
            .map(|i| {
                let kind = if i == 5 { "Alarm" } else { "Reading" };
                event_at(kind, t(offset + i * 10))
            })
            .collect()
    };
    s.append("covered", 0, history(0), None).await.unwrap();
    s.append("uncovered", 0, history(0), None).await.unwrap();
    s.save_snapshot(snapshot("covered", 6)).await.unwrap();
    assert_eq!(
        s.retention("covered")
            .await
            .unwrap()
            .unwrap()
            .readings_removed_before,
        None
    );
    assert_eq!(s.retention("nobody").await.unwrap(), None);

    // Readings before t(45) that the snapshot (version 6) covers: versions 1–5; version 6 (the
    // alarm, t(50)) is not a reading, and everything after version 6 is not covered.
    let pruned = s.prune(READINGS, t(45), 0, 100).await.unwrap();
    assert_eq!((pruned.streams, pruned.events, pruned.next), (1, 5, None));
    let versions: Vec<u64> = s
        .read_stream("covered", 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, [6, 7, 8, 9, 10]);
    assert_eq!(s.read_stream("uncovered", 1, 100).await.unwrap().len(), 10);
    assert_eq!(
        s.retention("covered")
            .await
            .unwrap()
            .unwrap()
            .readings_removed_before,
        Some(t(45))
    );
    // Restoring after retention reads the snapshot and what follows it, as before.
    let latest = s.read_latest("covered", 100).await.unwrap();
    assert_eq!(latest.snapshot.map(|s| s.version), Some(6));
    assert_eq!(latest.tail.len(), 4);
    // Later covered readings go at a later pass; alarms stay for ever.
    s.save_snapshot(snapshot("covered", 10)).await.unwrap();
    let pruned = s.prune(READINGS, t(1000), 0, 100).await.unwrap();
    assert_eq!(pruned.events, 4);
    let left: Vec<String> = s
        .read_stream("covered", 1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(left, ["Alarm"]);
    // The stream's version is still its newest event's, though the snapshot now holds it.
    assert_eq!(s.stream_version("covered").await.unwrap(), Some(10));
    let listed = s.list_streams(None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|i| (i.stream.as_str(), i.version))
            .collect::<Vec<_>>(),
        [("covered", 10), ("uncovered", 10)]
    );
    // Streams are visited in pages.
    s.save_snapshot(snapshot("uncovered", 1)).await.unwrap();
    let page = s.prune(READINGS, t(0), 0, 1).await.unwrap();
    assert_eq!(page.streams, 1);
    assert!(page.next.is_some());
    let rest = s
        .prune(READINGS, t(0), page.next.unwrap(), 1)
        .await
        .unwrap();
    assert_eq!((rest.streams, rest.next.is_some()), (1, true));
    // Reopened, the store knows the version without the removed events: the next append goes
    // on from it, and an append from an older version is a conflict.
    s.shutdown().await;
    drop(s);
    let s = f.open().await;
    assert_eq!(s.stream_version("covered").await.unwrap(), Some(10));
    assert!(s.append("covered", 6, vec![event(11)], None).await.is_err());
    assert_eq!(
        s.append("covered", 10, vec![event(11)], None)
            .await
            .unwrap()
            .version,
        11
    );
}

async fn committed_events_are_published_and_survive_reopen(f: Fixture) {
    {
        let s = f.open().await;
        let mut live = s.subscribe();
        s.append("a", 0, vec![event(1)], None).await.unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(10), live.recv())
            .await
            .expect("published within 10 s")
            .unwrap();
        assert_eq!(batch[0].position, 1);
        assert_eq!(batch[0].stream, "a");
        s.save_snapshot(snapshot("a", 1)).await.unwrap();
        s.shutdown().await;
    }
    let s = f.open().await;
    let all = s.read_all(0, 10).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        s.read_latest("a", 10).await.unwrap().snapshot,
        Some(snapshot("a", 1))
    );
    assert_eq!(
        s.append("a", 1, vec![event(2)], None)
            .await
            .unwrap()
            .last_position,
        2
    );
}

async fn concurrent_appenders_on_one_stream_exactly_one_wins(f: Fixture) {
    let a = f.open().await;
    let b = f.another_node(&a).await;
    for round in 0..20u64 {
        let stream = format!("contested-{round}");
        let (x, y) = tokio::join!(
            a.append(&stream, 0, vec![event(1)], None),
            b.append(&stream, 0, vec![event(2)], None)
        );
        let wins = [x.is_ok(), y.is_ok()];
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: {x:?} {y:?}"
        );
        let loser = if x.is_ok() { y } else { x };
        assert!(
            matches!(loser, Err(StoreError::Conflict { .. })),
            "{loser:?}"
        );
        assert_eq!(a.read_stream(&stream, 1, 10).await.unwrap().len(), 1);
    }
}

async fn readers_never_see_a_gap_fill_in_behind_them(f: Fixture) {
    let a = f.open().await;
    let b = f.another_node(&a).await;
    let writers: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, store)| {
            tokio::spawn(async move {
                for i in 0..50u64 {
                    store
                        .append(&format!("w{w}"), 2 * i, vec![event(1), event(2)], None)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // A follower reading everything after what it has seen, as the read models do: every
    // position it sees must come after the last one it saw, with none skipped.
    let total = 4 * 50 * 2;
    let follow = async {
        let mut seen = 0u64;
        while seen < total {
            for event in a.read_all(seen, 37).await.unwrap() {
                assert_eq!(
                    event.position,
                    seen + 1,
                    "a gap before position {}",
                    event.position
                );
                seen = event.position;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .expect("the follower reads every event within 60 s");
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(b.head_position().await.unwrap(), total);
}

async fn every_nodes_commits_reach_every_subscriber_in_order(f: Fixture) {
    let a = f.open().await;
    let b = f.another_node(&a).await;
    let mut on_a = a.subscribe();
    let mut on_b = b.subscribe();
    for i in 0..10u64 {
        let (x, y) = tokio::join!(
            a.append("from-a", i, vec![event(1)], None),
            b.append("from-b", i, vec![event(2)], None)
        );
        x.unwrap();
        y.unwrap();
    }
    for live in [&mut on_a, &mut on_b] {
        let mut positions = Vec::new();
        let mut streams = BTreeSet::new();
        while positions.len() < 20 {
            let batch = tokio::time::timeout(Duration::from_secs(10), live.recv())
                .await
                .expect("every commit published within 10 s")
                .unwrap();
            for e in batch.iter() {
                positions.push(e.position);
                streams.insert(e.stream.clone());
            }
        }
        assert_eq!(positions, (1..=20).collect::<Vec<u64>>());
        assert_eq!(streams.len(), 2);
    }
}

/// The DNS name in a certificate's subject alternative names (`openssl x509`).
fn certificate_name(pem_file: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in", pem_file])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split([',', ' ', '\n'])
        .find_map(|part| part.trim().strip_prefix("DNS:"))
        .unwrap_or_else(|| panic!("no DNS name in {pem_file}: {text}"))
        .to_owned()
}

/// `sslmode=require` encrypts every connection of the PostgreSQL store and verifies the server:
/// against the certificate `sslrootcert` names it connects, and every connection of its database
/// is encrypted; against certificate authorities that did not sign the server's certificate it is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_encrypts_and_verifies_the_server() {
    let url = common::postgres::fresh_database().await;
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    let setting = |name: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .expect("SHOW")
                .get::<_, String>(0)
        }
    };
    assert_eq!(
        setting("ssl").await,
        "on",
        "the test PostgreSQL serves TLS (scripts/test-deps.sh turns it on)"
    );
    let certificate = setting("ssl_cert_file").await;
    let name = certificate_name(&certificate);
    let database = url.rsplit('/').next().expect("a database name").to_owned();
    // The server's name for the certificate, its loopback address to connect to.
    let tls_url = |extra: &str| {
        format!(
            "postgres://postgres@{name}:5432/{database}?hostaddr=127.0.0.1&sslmode=require{extra}"
        )
    };

    let store = PostgresStore::open(
        &tls_url(&format!("&sslrootcert={certificate}")),
        PostgresStoreOptions::default(),
    )
    .await
    .expect("open over TLS");
    store.append("tls", 0, vec![event(1)], None).await.unwrap();
    assert_eq!(store.read_stream("tls", 1, 10).await.unwrap().len(), 1);
    // The listener connects in the background after `open`: wait for it (up to 10 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let encrypted: Vec<bool> = loop {
        let sessions: Vec<bool> = admin
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .expect("pg_stat_ssl")
            .iter()
            .map(|row| row.get(0))
            .collect();
        if sessions.len() >= 2 || tokio::time::Instant::now() > deadline {
            break sessions;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        encrypted.len() >= 2,
        "the store's pool and its listener: {encrypted:?}"
    );
    assert!(encrypted.iter().all(|ssl| *ssl), "{encrypted:?}");

    // Public certificate authorities only: none of them signed the test server's certificate.
    let public_roots = "/etc/ssl/certs/ca-certificates.crt";
    let refused = PostgresStore::open(
        &tls_url(&format!("&sslrootcert={public_roots}")),
        PostgresStoreOptions::default(),
    )
    .await
    .err()
    .expect("a server whose certificate does not verify is refused");
    assert!(refused.to_string().contains("certificate"), "{refused}");
}
