//! The reader threads: each owns one read-only connection and takes reads from one shared queue.
//!
//! A read is a closure queued as it is asked for; the caller awaits its answer as a future. A
//! fleet appearing at once asks for thousands of device loads together: they wait in the queue,
//! not on threads, and a busy reader takes the next one without sleeping. (Handing each read to
//! tokio's blocking pool instead cost the actor thread a third of its time in the pool's lock and
//! wake-ups while 10,000 new devices loaded.)

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::store::{StoreError, StoreResult};

enum Job {
    Read(Box<dyn FnOnce(&Connection) + Send>),
    /// Ends the reader that takes it, after every read queued before it.
    Stop,
}

pub(super) struct Readers {
    jobs: Sender<Job>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Readers {
    /// Opens `count` read-only connections to `path`, each on a thread of its own (in parallel:
    /// a restart waits for them), until [`Readers::close`].
    pub(super) fn open(path: &Path, count: u32) -> StoreResult<Self> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let readers = Self {
            jobs,
            threads: Mutex::default(),
        };
        let (opened_tx, opened) = crossbeam_channel::unbounded();
        for i in 0..count.max(1) {
            let (path, queue, opened) = (path.to_owned(), queue.clone(), opened_tx.clone());
            let thread = thread::Builder::new()
                .name(format!("store-reader-{i}"))
                .spawn(move || match open_connection(&path) {
                    Ok(conn) => {
                        let _ = opened.send(Ok(()));
                        serve(&conn, &queue);
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                    }
                })
                .map_err(|e| StoreError::Unavailable(format!("starting a reader: {e}")))?;
            // On an error, dropping `readers` stops the threads already started.
            readers.threads().push(thread);
        }
        drop(opened_tx);
        for _ in 0..count.max(1) {
            match opened.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(StoreError::Unavailable(format!("opening a reader: {e}")))
                }
                Err(_) => return Err(StoreError::Unavailable("a reader died opening".into())),
            }
        }
        Ok(readers)
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<thread::JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers the reads already queued, then closes every connection; later reads fail with
    /// [`StoreError::Closed`].
    pub(super) fn close(&self) {
        let threads = std::mem::take(&mut *self.threads());
        for _ in &threads {
            let _ = self.jobs.send(Job::Stop);
        }
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// Runs `f` on the next free reader; resolves with its result.
    pub(super) fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> impl std::future::Future<Output = StoreResult<T>> + Send + 'static {
        let (answer, answered) = oneshot::channel();
        let queued = self
            .jobs
            .send(Job::Read(Box::new(move |conn: &Connection| {
                let _ = answer.send(f(conn).map_err(|e| StoreError::Unavailable(e.to_string())));
            })))
            .map_err(|_| StoreError::Closed);
        async move {
            queued?;
            // Dropped unanswered only if the read panicked (the reader goes on with the next),
            // or if it was queued while the readers were closing.
            answered.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "a store read failed unexpectedly".into(),
                ))
            })
        }
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

fn serve(conn: &Connection, queue: &Receiver<Job>) {
    while let Ok(Job::Read(read)) = queue.recv() {
        // A panicking read drops its answer (its caller gets an error); the connection is still
        // good for the next read.
        if catch_unwind(AssertUnwindSafe(|| read(conn))).is_err() {
            tracing::error!("a store read panicked");
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readers(dir: &Path, count: u32) -> Readers {
        let path = dir.join("db.sqlite3");
        Connection::open(&path)
            .and_then(|c| c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x);"))
            .expect("a database to read");
        Readers::open(&path, count).expect("readers open")
    }

    #[tokio::test]
    async fn close_answers_what_was_queued_and_refuses_what_comes_after() {
        let dir = tempfile::tempdir().unwrap();
        let readers = readers(dir.path(), 2);
        let queued: Vec<_> = (0..100)
            .map(|i| {
                readers.read(move |conn| {
                    std::thread::sleep(Duration::from_micros(100));
                    conn.query_row("SELECT ?1 + 1", [i], |row| row.get::<_, i64>(0))
                })
            })
            .collect();
        readers.close();
        for (i, read) in queued.into_iter().enumerate() {
            assert_eq!(read.await.unwrap(), i as i64 + 1);
        }
        let late = readers.read(|conn| conn.query_row("SELECT 1", [], |row| row.get::<_, i64>(0)));
        assert!(matches!(late.await, Err(StoreError::Closed)));
    }

    #[tokio::test]
    async fn a_read_that_panics_fails_alone_and_its_reader_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let readers = readers(dir.path(), 1);
        let panicking = readers.read(|_| -> rusqlite::Result<()> { panic!("a bug in a read") });
        assert!(matches!(panicking.await, Err(StoreError::Unavailable(_))));
        let next = readers.read(|conn| conn.query_row("SELECT 2", [], |row| row.get::<_, i64>(0)));
        assert_eq!(next.await.unwrap(), 2);
    }

    #[test]
    fn readers_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let readers = readers(dir.path(), 1);
        let write = readers.read(|conn| conn.execute("INSERT INTO t VALUES (1)", []));
        let result = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(write);
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
    }
}
