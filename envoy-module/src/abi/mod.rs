//! The only `unsafe` code of the module: Envoy's C ABI.
//!
//! - [`types`]: the C types (buffers, opaque pointers, enum values).
//! - [`callbacks`]: Envoy's callbacks, resolved at run time with `dlsym`.
//! - [`handles`]: the real handles implementing the safe traits of
//!   [`crate::api`] on top of those callbacks.
//! - [`hooks`]: the `extern "C"` entry points Envoy calls; each one catches
//!   panics and maps them to a safe status.

pub mod callbacks;
pub mod handles;
pub mod hooks;
pub mod types;

use types::ModuleBuffer;

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
