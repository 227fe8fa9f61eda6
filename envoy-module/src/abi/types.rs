//! The plain-C types of Envoy's dynamic-module ABI (1.40, ABI "v0.2.0").
//!
//! Only the handful of types this module uses are declared: buffers are a
//! pointer and a length (never NUL-terminated), opaque Envoy objects are
//! `void*`, and enums are C ints carried as `u32`.

use std::ffi::{c_char, c_void};

/// ABI version string Envoy 1.40 expects from `on_program_init`.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// An opaque pointer to an Envoy-side object (filter, config).
pub type EnvoyPtr = *mut c_void;

/// An opaque pointer to a module-side object, allocated by this module.
pub type ModulePtr = *const c_void;

/// A buffer owned by Envoy (`envoy_dynamic_module_type_envoy_buffer`): only
/// valid for the duration of the hook or callback that produced it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    /// Start of the bytes (may be null when `length` is 0).
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

impl EnvoyBuffer {
    /// An empty buffer for Envoy to fill in.
    pub const fn empty() -> Self {
        Self {
            ptr: std::ptr::null(),
            length: 0,
        }
    }
}

/// A buffer owned by this module (`envoy_dynamic_module_type_module_buffer`):
/// it only has to live for the callback it is passed to (Envoy copies it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleBuffer {
    /// Start of the bytes.
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

impl ModuleBuffer {
    /// Borrows `bytes` for one callback.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
pub const METRICS_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_network_connection_close_type_FlushWrite`.
pub const CLOSE_FLUSH_WRITE: u32 = 0;
