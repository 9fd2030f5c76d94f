//! The SQLite store opened read-only, for offline tools (`fleetwatch verify`): it never creates,
//! migrates or writes anything, so checking a store cannot change it.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags};

use super::sqlite::{row_to_event, store_format, EVENT_COLUMNS, STORE_FORMAT};
use super::{RecordedEvent, Snapshot, StoreError, StoreResult};

/// The file the SQLite backend keeps its events in, inside the data directory.
const FILE_NAME: &str = "events.sqlite3";

/// An event row whose columns do not have the types an event needs (damaged below the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableRow {
    pub position: u64,
    pub stream: Option<String>,
    pub version: Option<u64>,
    pub reason: String,
}

pub struct ReadOnlyStore {
    conn: Connection,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The URI to open `path` read-only with. Even a read-only connection creates the `-wal` and
/// `-shm` files of a WAL database when they are missing (after a clean stop), so then it is opened
/// `immutable`, which touches nothing. If a WAL file is there (a crash left it), it holds committed
/// events and must be read: the connection is an ordinary read-only one.
fn uri(path: &Path) -> String {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let immutable = !Path::new(&wal).exists();
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            // The characters that would end or escape the path part of a URI.
            '%' | '?' | '#' => uri.push_str(&format!("%{:02X}", c as u32)),
            c => uri.push(c),
        }
    }
    uri.push_str(if immutable {
        "?immutable=1"
    } else {
        "?mode=ro"
    });
    uri
}

impl ReadOnlyStore {
    /// Opens `dir/events.sqlite3`; fails if it does not exist or is not an event store.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let path = dir.join(FILE_NAME);
        if !path.is_file() {
            return Err(backend(format!("no event store at {}", path.display())));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(uri(&path), flags)
            .map_err(|e| backend(format!("opening {}: {e}", path.display())))?;
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master
                 WHERE type = 'table' AND name IN ('events', 'streams', 'snapshots')",
                [],
                |row| row.get(0),
            )
            .map_err(|e| backend(format!("reading {}: {e}", path.display())))?;
        if tables != 3 {
            return Err(backend(format!(
                "{} is not a fleetwatch event store",
                path.display()
            )));
        }
        // Reading never migrates: an older store is checked by starting the engine once first.
        let format = store_format(&conn).map_err(backend)?;
        if format != STORE_FORMAT {
            return Err(backend(format!(
                "{} is in store format {format}; this build reads format {STORE_FORMAT} \
                 (start fleetwatch on it once to migrate it)",
                path.display()
            )));
        }
        Ok(Self { conn })
    }

    /// Events of all streams with position > `after_position`, in order, at most `limit`. A row
    /// whose columns cannot be read as an event is returned as an [`UnreadableRow`], in its place.
    pub fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> StoreResult<Vec<Result<RecordedEvent, UnreadableRow>>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e
                 LEFT JOIN streams s ON s.id = e.stream LEFT JOIN event_types t ON t.id = e.type
                 WHERE e.position > ?1 ORDER BY e.position"
            ))
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![after_position as i64], |row| {
                Ok(row_to_event(row).map_err(|e| UnreadableRow {
                    position: row.get::<_, i64>(0).unwrap_or_default() as u64,
                    stream: row.get(1).ok(),
                    version: row.get::<_, i64>(2).ok().map(|v| v as u64),
                    reason: e.to_string(),
                }))
            })
            .map_err(backend)?;
        rows.take(limit)
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)
    }

    /// Snapshots of streams after `after_stream` in stream order, at most `limit`.
    pub fn snapshots(&self, after_stream: &str, limit: usize) -> StoreResult<Vec<Snapshot>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT s.name, n.version, n.schema, n.payload FROM snapshots n
                 JOIN streams s ON s.id = n.stream
                 WHERE s.name > ?1 ORDER BY s.name",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![after_stream], |row| {
                Ok(Snapshot {
                    stream: row.get(0)?,
                    version: row.get::<_, i64>(1)? as u64,
                    schema_version: row.get(2)?,
                    payload: bytes::Bytes::from(row.get::<_, Vec<u8>>(3)?),
                })
            })
            .map_err(backend)?;
        rows.take(limit)
            .collect::<rusqlite::Result<_>>()
            .map_err(backend)
    }
}
