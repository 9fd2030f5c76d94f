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
            // Dropped unanswered only if the read panicked (the reader goes on with the next).
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
