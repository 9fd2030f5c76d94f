//! Background work gives way to ingest when the CPU is short.
//!
//! The read models fold every committed event on a thread of their own. When readings arrive
//! faster than the cores can take them, that thread competes with the actors, the store writer
//! and the broker on the same cores, and every microsecond it takes is throughput lost. It can
//! wait: it resumes from its checkpoint and catches up when the load drops. Such a thread
//! therefore runs at a lower scheduling priority (a higher nice value) than the rest of the
//! engine. The priority only counts when the cores are saturated; otherwise the thread gets all
//! the CPU it asks for.

/// How many steps of niceness background threads run below the engine (Linux weights: one tenth
/// of a competing normal thread's share of a saturated core, never none).
pub const NICENESS: i32 = 10;

/// Lowers the calling thread's priority by [`NICENESS`] (Linux: per thread). A failure is
/// logged and ignored: the thread then runs at the engine's priority, as before.
pub fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; get/setpriority take plain integers and touch
        // only the scheduling attributes of this thread.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let lowered = (current + NICENESS).min(19);
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, lowered) } != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot lower a background thread's priority; it runs at the engine's"
            );
        }
    }
}
