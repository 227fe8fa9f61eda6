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

/// Whether messages go to stderr when Envoy is not there (unit tests).
static STDERR_FALLBACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the stderr fallback off (the fuzz targets: millions of inputs,
/// each logged, would measure the terminal instead of the module).
pub fn quiet_outside_envoy() {
    STDERR_FALLBACK.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a message at `level` would be logged: Envoy's `-l` level, or
/// the stderr fallback outside Envoy. Hot paths check it before they
/// format anything (see [`crate::log_fmt`]).
pub fn log_enabled(level: LogLevel) -> bool {
    abi::log_enabled(level as u32)
        .unwrap_or_else(|| STDERR_FALLBACK.load(std::sync::atomic::Ordering::Relaxed))
}

/// Logs a `format!` message at a level, formatting it only when that level
/// is logged: with logging off, a query or connection costs no string.
#[macro_export]
macro_rules! log_fmt {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::api::log_enabled(level) {
            $crate::api::log(level, &format!($($arg)+));
        }
    }};
}

/// Logs `message` at `level` through Envoy; outside Envoy (unit tests) the
/// message goes to stderr.
pub fn log(level: LogLevel, message: &str) {
    if !abi::log(level as u32, message)
        && STDERR_FALLBACK.load(std::sync::atomic::Ordering::Relaxed)
    {
        eprintln!("[{level:?}] {message}");
    }
}
