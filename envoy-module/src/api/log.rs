//! Logging through Envoy's logger, so messages honour Envoy's `-l` level and
//! land in its log with everything else.

use crate::abi;

/// Envoy's log levels (`envoy_dynamic_module_type_log_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Trace.
    Trace = 0,
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Error.
    Error = 4,
    /// Critical.
    Critical = 5,
}

/// Logs `message` at `level` through Envoy; outside Envoy (unit tests) the
/// message goes to stderr.
pub fn log(level: LogLevel, message: &str) {
    if !abi::log(level as u32, message) {
        eprintln!("[{level:?}] {message}");
    }
}
