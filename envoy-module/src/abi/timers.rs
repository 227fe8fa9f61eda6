//! Timers for network filters.
//!
//! Envoy 1.40 gives dynamic modules no timer, only a per-connection
//! scheduler that runs `on_network_filter_scheduled` on the connection's
//! worker when committed from any thread. One module thread keeps the
//! deadlines in order and commits each connection's scheduler when its
//! deadline passes. A timer that is dropped first (its connection closed)
//! is removed, and its scheduler deleted, under the same lock as the
//! commits, so no commit ever reaches a deleted scheduler.

use std::{
    collections::BTreeMap,
    sync::{Condvar, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use super::{callbacks::callbacks, types::EnvoyPtr};
use crate::api::{log, LogLevel};

/// A connection's Envoy scheduler.
struct Scheduler(EnvoyPtr);

// SAFETY: Envoy's scheduler object may be committed from any thread (that
// is its purpose); deleting it is serialised with commits by `Wheel::due`.
unsafe impl Send for Scheduler {}

/// Pending deadlines: (when, sequence number) → (scheduler, event).
#[derive(Default)]
struct Wheel {
    pending: BTreeMap<(Instant, u64), (EnvoyPtr, u64)>,
    next_id: u64,
}

// SAFETY: the raw scheduler pointers are only used under the mutex, for
// commits, which Envoy allows from any thread.
unsafe impl Send for Wheel {}

struct Timers {
    wheel: Mutex<Wheel>,
    wake: Condvar,
}

fn timers() -> &'static Timers {
    static TIMERS: OnceLock<Timers> = OnceLock::new();
    TIMERS.get_or_init(|| Timers {
        wheel: Mutex::new(Wheel::default()),
        wake: Condvar::new(),
    })
}

fn lock(timers: &Timers) -> MutexGuard<'_, Wheel> {
    timers
        .wheel
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An armed timer; dropping it cancels it and frees the scheduler.
pub struct ArmedTimer {
    key: (Instant, u64),
    scheduler: Scheduler,
}

impl Drop for ArmedTimer {
    fn drop(&mut self) {
        // Removed under the lock the firing thread commits under: after
        // this, nothing can commit this scheduler any more.
        lock(timers()).pending.remove(&self.key);
        if let Some(delete) = callbacks().network_filter_scheduler_delete {
            // SAFETY: the scheduler came from scheduler_new, is deleted
            // once (here), and no commit can follow (see above).
            unsafe { delete(self.scheduler.0) };
        }
    }
}

/// Arms a timer that calls the filter's `on_scheduled(event)` after
/// `delay`; `None` when Envoy offers no scheduler (or no way to tell
/// whether the upstream is ready, which is what the timers are for), when
/// the timer thread cannot run, or for a delay beyond the clock.
///
/// # Safety
/// `filter_envoy` must be the network filter of the running hook.
pub unsafe fn arm(filter_envoy: EnvoyPtr, delay: Duration, event: u64) -> Option<ArmedTimer> {
    let table = callbacks();
    let (Some(new), Some(_), Some(_), Some(_)) = (
        table.network_filter_scheduler_new,
        table.network_filter_scheduler_commit,
        table.network_filter_scheduler_delete,
        table.network_filter_has_upstream_host,
    ) else {
        return None;
    };
    let deadline = Instant::now().checked_add(delay)?;
    let timers = timers();
    if !thread_running(timers) {
        return None;
    }
    // SAFETY: `filter_envoy` is the running hook's filter (caller).
    let scheduler = unsafe { new(filter_envoy) };
    if scheduler.is_null() {
        return None;
    }
    let mut wheel = lock(timers);
    wheel.next_id += 1;
    let key = (deadline, wheel.next_id);
    wheel.pending.insert(key, (scheduler, event));
    // The thread sleeps until the earliest deadline: wake it only when
    // this one is earlier.
    let earliest = wheel.pending.first_key_value().map(|(k, _)| *k) == Some(key);
    drop(wheel);
    if earliest {
        timers.wake.notify_one();
    }
    Some(ArmedTimer {
        key,
        scheduler: Scheduler(scheduler),
    })
}

/// Starts the timer thread once; false (logged once) if it cannot run.
fn thread_running(timers: &'static Timers) -> bool {
    static STARTED: OnceLock<bool> = OnceLock::new();
    *STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("gw-timers".into())
            .spawn(run);
        if let Err(e) = &spawned {
            log(
                LogLevel::Error,
                &format!("cannot start the timer thread ({e}): connection timeouts are off"),
            );
        }
        let _ = timers;
        spawned.is_ok()
    })
}

/// The timer thread: commits every scheduler whose deadline passed, then
/// sleeps until the next deadline (or a new, earlier one).
fn run() {
    let timers = timers();
    let Some(commit) = callbacks().network_filter_scheduler_commit else {
        return;
    };
    let mut wheel = lock(timers);
    loop {
        let now = Instant::now();
        while let Some(entry) = wheel.pending.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (scheduler, event) = entry.remove();
            // SAFETY: the timer is still pending, so its owner has not
            // deleted the scheduler, and cannot until this lock is
            // released. Commit only posts to the worker's dispatcher.
            unsafe { commit(scheduler, event) };
        }
        let wait = wheel
            .pending
            .first_key_value()
            .map(|((at, _), _)| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(3600));
        wheel = timers
            .wake
            .wait_timeout(wheel, wait)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}
