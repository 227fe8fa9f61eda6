//! The `extern "C"` hooks Envoy calls. Each one catches panics: a panic
//! that crossed into Envoy would abort the whole proxy. A caught panic is
//! logged and fails closed: the datagram is dropped (`StopIteration`), the
//! connection is closed, a config is rejected (NULL). The filters catch
//! their own panics first, to count them; these guards are the last line.

use std::{
    ffi::c_char,
    panic::{catch_unwind, AssertUnwindSafe},
    ptr,
};

use super::{
    callbacks::{callbacks, copy_envoy_buffer},
    handles::{ConfigKind, ConfigRegistry, NetworkHandle, UdpHandle},
    types::{EnvoyBuffer, EnvoyPtr, ModulePtr, ABI_VERSION},
};
use crate::api::{
    log, LogLevel, NetworkFilter, NetworkFilterConfig, NetworkStatus, UdpListenerFilter,
    UdpListenerFilterConfig, UdpStatus,
};

/// Runs `body`, turning a panic into `fallback` (after logging it).
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            // Logging must not unwind either.
            let _ = catch_unwind(|| {
                log(
                    LogLevel::Error,
                    &format!("connectivity_envoy_module: panic caught in {hook}: {what}"),
                )
            });
            // A payload whose Drop panics would unwind out of the hook:
            // leak it instead (a panic is already the exceptional path).
            std::mem::forget(payload);
            fallback
        }
    }
}

/// Reads the filter name and config bytes of a `config_new` hook.
///
/// # Safety
/// Both buffers must come from Envoy for the running hook.
unsafe fn name_and_config(name: EnvoyBuffer, config: EnvoyBuffer) -> (String, Vec<u8>) {
    // SAFETY: forwarded from the caller.
    let name = unsafe { copy_envoy_buffer(name) };
    // SAFETY: forwarded from the caller.
    let config = unsafe { copy_envoy_buffer(config) };
    (String::from_utf8_lossy(&name).into_owned(), config)
}

/// Module initialisation: resolves the callbacks and returns the ABI version.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guarded("on_program_init", ptr::null(), || {
        let missing = callbacks().missing();
        if !missing.is_empty() {
            log(
                LogLevel::Warn,
                &format!(
                    "connectivity_envoy_module: this Envoy lacks callbacks {missing:?}; the features using them are off"
                ),
            );
        }
        ABI_VERSION.as_ptr().cast()
    })
}

// ---------------------------------------------------------------------------
// UDP listener filter
// ---------------------------------------------------------------------------

/// Creates a UDP listener filter config; NULL rejects the config.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_udp_listener_filter_config_new(
    config_envoy: EnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ModulePtr {
    guarded("on_udp_listener_filter_config_new", ptr::null(), || {
        // SAFETY: both buffers come from Envoy for this call.
        let (name, config) = unsafe { name_and_config(name, config) };
        let mut registry = ConfigRegistry::new(config_envoy, ConfigKind::UdpListener);
        match crate::new_udp_listener_filter_config(&name, &config, &mut registry) {
            Ok(config) => Box::into_raw(Box::new(config)) as ModulePtr,
            Err(error) => {
                log(
                    LogLevel::Error,
                    &format!(
                        "connectivity_envoy_module: rejecting UDP listener filter config: {error}"
                    ),
                );
                ptr::null()
            }
        }
    })
}

/// Frees a config made by `config_new`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_udp_listener_filter_config_destroy(config: ModulePtr) {
    guarded("on_udp_listener_filter_config_destroy", (), || {
        if !config.is_null() {
            // SAFETY: `config` came from Box::into_raw in config_new and
            // Envoy destroys it exactly once.
            drop(unsafe { Box::from_raw(config as *mut Box<dyn UdpListenerFilterConfig>) });
        }
    })
}

/// Creates the UDP listener filter of one worker.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_udp_listener_filter_new(
    config: ModulePtr,
    _filter_envoy: EnvoyPtr,
) -> ModulePtr {
    guarded("on_udp_listener_filter_new", ptr::null(), || {
        if config.is_null() {
            return ptr::null();
        }
        // SAFETY: `config` is a live config from config_new (Envoy destroys
        // configs only after their filters); it is only read here.
        let config = unsafe { &*(config as *const Box<dyn UdpListenerFilterConfig>) };
        Box::into_raw(Box::new(config.new_filter())) as ModulePtr
    })
}

/// Handles one datagram.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_udp_listener_filter_on_data(
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
) -> u32 {
    guarded(
        "on_udp_listener_filter_on_data",
        UdpStatus::StopIteration as u32,
        || {
            if filter.is_null() {
                // No filter instance (its creation failed): drop, never
                // pass a query on unexamined.
                return UdpStatus::StopIteration as u32;
            }
            // SAFETY: `filter` came from filter_new and is only used by the
            // worker thread that owns it, one hook at a time.
            let filter = unsafe { &mut *(filter as *mut Box<dyn UdpListenerFilter>) };
            let mut handle = UdpHandle::new(filter_envoy);
            filter.on_data(&mut handle) as u32
        },
    )
}

/// Frees a UDP listener filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_udp_listener_filter_destroy(filter: ModulePtr) {
    guarded("on_udp_listener_filter_destroy", (), || {
        if !filter.is_null() {
            // SAFETY: `filter` came from Box::into_raw in filter_new and
            // Envoy destroys it exactly once.
            drop(unsafe { Box::from_raw(filter as *mut Box<dyn UdpListenerFilter>) });
        }
    })
}

// ---------------------------------------------------------------------------
// Network filter
// ---------------------------------------------------------------------------

/// Creates a network filter config; NULL rejects the config.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_config_new(
    config_envoy: EnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ModulePtr {
    guarded("on_network_filter_config_new", ptr::null(), || {
        // SAFETY: both buffers come from Envoy for this call.
        let (name, config) = unsafe { name_and_config(name, config) };
        let mut registry = ConfigRegistry::new(config_envoy, ConfigKind::Network);
        match crate::new_network_filter_config(&name, &config, &mut registry) {
            Ok(config) => Box::into_raw(Box::new(config)) as ModulePtr,
            Err(error) => {
                log(
                    LogLevel::Error,
                    &format!("connectivity_envoy_module: rejecting network filter config: {error}"),
                );
                ptr::null()
            }
        }
    })
}

/// Frees a config made by `config_new`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_config_destroy(config: ModulePtr) {
    guarded("on_network_filter_config_destroy", (), || {
        if !config.is_null() {
            // SAFETY: `config` came from Box::into_raw in config_new and
            // Envoy destroys it exactly once.
            drop(unsafe { Box::from_raw(config as *mut Box<dyn NetworkFilterConfig>) });
        }
    })
}

/// Creates the network filter of one connection.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_new(
    config: ModulePtr,
    _filter_envoy: EnvoyPtr,
) -> ModulePtr {
    guarded("on_network_filter_new", ptr::null(), || {
        if config.is_null() {
            return ptr::null();
        }
        // SAFETY: `config` is a live config from config_new; only read here.
        let config = unsafe { &*(config as *const Box<dyn NetworkFilterConfig>) };
        Box::into_raw(Box::new(config.new_filter())) as ModulePtr
    })
}

/// Runs `body` on the filter behind `filter`. Without a filter instance
/// (its creation failed) or after a panic, the connection is closed: it
/// must not reach tcp_proxy without its lookup.
fn with_network_filter(
    hook: &str,
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
    body: impl FnOnce(&mut dyn NetworkFilter, &mut NetworkHandle) -> NetworkStatus,
) -> u32 {
    let outcome = guarded(hook, None, || {
        if filter.is_null() {
            return None;
        }
        // SAFETY: `filter` came from filter_new; a connection's hooks run
        // on its worker thread one at a time.
        let filter = unsafe { &mut *(filter as *mut Box<dyn NetworkFilter>) };
        let mut handle = NetworkHandle::new(filter_envoy);
        Some(body(filter.as_mut(), &mut handle) as u32)
    });
    outcome.unwrap_or_else(|| {
        guarded(hook, (), || {
            use crate::api::NetworkFilterHandle as _;
            NetworkHandle::new(filter_envoy).close();
        });
        NetworkStatus::StopIteration as u32
    })
}

/// A new connection was accepted.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_new_connection(
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
) -> u32 {
    with_network_filter(
        "on_network_filter_new_connection",
        filter_envoy,
        filter,
        |f, h| f.on_new_connection(h),
    )
}

/// Data arrived from the client.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_read(
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
    _data_length: usize,
    end_stream: bool,
) -> u32 {
    with_network_filter("on_network_filter_read", filter_envoy, filter, |f, h| {
        f.on_read(h, end_stream)
    })
}

/// Data is going to the client.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_write(
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
    _data_length: usize,
    end_stream: bool,
) -> u32 {
    // The module's own write: its filter is running already (re-entry
    // would alias it) and the bytes are for the client as they are.
    if super::handles::module_write_in_progress() {
        return NetworkStatus::Continue as u32;
    }
    with_network_filter("on_network_filter_write", filter_envoy, filter, |f, h| {
        f.on_write(h, end_stream)
    })
}

/// A timer of the filter fired (see `abi::timers`).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_scheduled(
    filter_envoy: EnvoyPtr,
    filter: ModulePtr,
    event: u64,
) {
    with_network_filter(
        "on_network_filter_scheduled",
        filter_envoy,
        filter,
        |f, h| {
            f.on_scheduled(h, event);
            NetworkStatus::Continue
        },
    );
}

/// A connection event (close, connected); nothing to do.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_event(
    _filter_envoy: EnvoyPtr,
    _filter: ModulePtr,
    _event: u32,
) {
}

/// Frees a network filter.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_network_filter_destroy(filter: ModulePtr) {
    guarded("on_network_filter_destroy", (), || {
        if !filter.is_null() {
            // SAFETY: `filter` came from Box::into_raw in filter_new and
            // Envoy destroys it exactly once.
            drop(unsafe { Box::from_raw(filter as *mut Box<dyn NetworkFilter>) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_fallback() {
        assert_eq!(guarded("test", 7u32, || panic!("boom")), 7);
        assert_eq!(guarded("test", 7u32, || 3), 3);
        // Entry points with null pointers are safe and fail closed: a
        // datagram without a filter instance is dropped, not passed on.
        assert_eq!(
            envoy_dynamic_module_on_udp_listener_filter_on_data(ptr::null_mut(), ptr::null()),
            UdpStatus::StopIteration as u32
        );
        assert!(
            envoy_dynamic_module_on_udp_listener_filter_new(ptr::null(), ptr::null_mut()).is_null()
        );
        envoy_dynamic_module_on_network_filter_destroy(ptr::null());
    }
}
