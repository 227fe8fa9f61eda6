//! The only `unsafe` code of the module: Envoy's C ABI (and one clock read
//! that std does not offer).
//!
//! - [`types`]: the C types (buffers, opaque pointers, enum values).
//! - [`callbacks`]: Envoy's callbacks, resolved at run time with `dlsym`.
//! - [`handles`]: the real handles implementing the safe traits of
//!   [`crate::api`] on top of those callbacks.
//! - [`hooks`]: the `extern "C"` entry points Envoy calls; each one catches
//!   panics and maps them to a safe status.
//! - [`timers`]: one thread that fires network filter timers through
//!   Envoy's per-connection schedulers.

pub mod callbacks;
pub mod handles;
pub mod hooks;
pub mod timers;
pub mod types;

use types::ModuleBuffer;

/// CLOCK_MONOTONIC in nanoseconds, the clock of the kernel's
/// `bpf_ktime_get_ns` stamps (std's `Instant` runs on it but does not show
/// its value); 0 if the clock cannot be read.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid local.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether Envoy logs `level`; `None` when Envoy is not there.
pub fn log_enabled(level: u32) -> Option<bool> {
    let enabled = callbacks::callbacks().log_enabled?;
    // SAFETY: the callback takes a plain value.
    Some(unsafe { enabled(level) })
}

/// Logs through Envoy's `log` callback; false when Envoy is not there (or
/// the level is disabled and the message was dropped on purpose: true).
pub fn log(level: u32, message: &str) -> bool {
    let table = callbacks::callbacks();
    let (Some(enabled), Some(log)) = (table.log_enabled, table.log) else {
        return false;
    };
    // SAFETY: both callbacks take plain values; the message buffer points at
    // `message`, which outlives the call, and Envoy copies it.
    unsafe {
        if enabled(level) {
            log(level, ModuleBuffer::from_bytes(message.as_bytes()));
        }
    }
    true
}
