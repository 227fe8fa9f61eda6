//! The callbacks Envoy exports, resolved at run time.
//!
//! The callbacks are looked up with `dlsym(RTLD_DEFAULT, …)` the first time
//! they are needed instead of being linked as undefined symbols. That keeps
//! the rlib (unit tests, doc tests) linkable without Envoy, and a callback
//! missing from some Envoy build degrades to a logged failure of that one
//! call instead of a failed `dlopen`.

use std::{
    ffi::{c_void, CStr},
    sync::OnceLock,
};

use super::types::{EnvoyBuffer, EnvoyPtr, ModuleBuffer};

/// Looks `name` up among the symbols visible to the process and reinterprets
/// it as the function-pointer type `F`.
///
/// # Safety
/// `F` must be an `unsafe extern "C" fn` type whose signature matches the C
/// declaration of `name` in Envoy's `abi.h`.
unsafe fn lookup<F: Copy>(name: &CStr) -> Option<F> {
    if size_of::<F>() != size_of::<*mut c_void>() {
        return None;
    }
    // SAFETY: dlsym only reads the NUL-terminated name; RTLD_DEFAULT
    // searches the global scope, which includes Envoy's exported symbols.
    let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: sizes are equal (checked above) and the caller guarantees the
    // symbol is a function with the signature of `F`.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&symbol) })
}

macro_rules! callback_table {
    ($( $field:ident : fn($($arg:ty),*) $(-> $ret:ty)? ; )*) => {
        /// Every Envoy callback this module calls; `None` when this Envoy
        /// does not export it.
        pub struct Callbacks {
            $(
                #[doc = concat!("`envoy_dynamic_module_callback_", stringify!($field), "`.")]
                pub $field: Option<unsafe extern "C" fn($($arg),*) $(-> $ret)?>,
            )*
        }

        impl Callbacks {
            fn resolve() -> Self {
                Self {
                    $(
                        // SAFETY: the declared signature mirrors abi.h.
                        $field: unsafe {
                            lookup(
                                CStr::from_bytes_with_nul(
                                    concat!("envoy_dynamic_module_callback_", stringify!($field), "\0")
                                        .as_bytes(),
                                )
                                .unwrap_or(c"invalid"),
                            )
                        },
                    )*
                }
            }

            /// Names of the callbacks this Envoy does not export.
            pub fn missing(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if self.$field.is_none() {
                        out.push(stringify!($field));
                    }
                )*
                out
            }
        }
    };
}

callback_table! {
    log: fn(u32, ModuleBuffer);
    log_enabled: fn(u32) -> bool;
    udp_listener_filter_get_datagram_data_chunks_size: fn(EnvoyPtr) -> usize;
    udp_listener_filter_get_datagram_data_chunks: fn(EnvoyPtr, *mut EnvoyBuffer) -> bool;
    udp_listener_filter_get_peer_address: fn(EnvoyPtr, *mut EnvoyBuffer, *mut u32) -> bool;
    udp_listener_filter_get_local_address: fn(EnvoyPtr, *mut EnvoyBuffer, *mut u32) -> bool;
    udp_listener_filter_send_datagram: fn(EnvoyPtr, ModuleBuffer, ModuleBuffer, u32) -> bool;
    udp_listener_filter_config_define_counter: fn(EnvoyPtr, ModuleBuffer, *mut usize) -> u32;
    udp_listener_filter_increment_counter: fn(EnvoyPtr, usize, u64) -> u32;
    network_filter_get_local_address: fn(EnvoyPtr, *mut EnvoyBuffer, *mut u32) -> bool;
    network_filter_get_remote_address: fn(EnvoyPtr, *mut EnvoyBuffer, *mut u32) -> bool;
    network_set_filter_state_bytes: fn(EnvoyPtr, ModuleBuffer, ModuleBuffer) -> bool;
    network_set_filter_state_typed: fn(EnvoyPtr, ModuleBuffer, ModuleBuffer) -> bool;
    network_filter_close: fn(EnvoyPtr, u32);
    network_filter_config_define_counter: fn(EnvoyPtr, ModuleBuffer, *mut usize) -> u32;
    network_filter_increment_counter: fn(EnvoyPtr, usize, u64) -> u32;
    network_filter_get_read_buffer_chunks_size: fn(EnvoyPtr) -> usize;
    network_filter_get_read_buffer_chunks: fn(EnvoyPtr, *mut EnvoyBuffer);
    network_filter_drain_read_buffer: fn(EnvoyPtr, usize);
    network_filter_append_read_buffer: fn(EnvoyPtr, ModuleBuffer);
    network_filter_get_write_buffer_chunks_size: fn(EnvoyPtr) -> usize;
    network_filter_get_write_buffer_chunks: fn(EnvoyPtr, *mut EnvoyBuffer);
    network_filter_drain_write_buffer: fn(EnvoyPtr, usize);
    network_filter_append_write_buffer: fn(EnvoyPtr, ModuleBuffer);
    network_filter_write: fn(EnvoyPtr, ModuleBuffer, bool);
    network_filter_has_upstream_host: fn(EnvoyPtr) -> bool;
    network_filter_scheduler_new: fn(EnvoyPtr) -> EnvoyPtr;
    network_filter_scheduler_commit: fn(EnvoyPtr, u64);
    network_filter_scheduler_delete: fn(EnvoyPtr);
}

static CALLBACKS: OnceLock<Callbacks> = OnceLock::new();

/// The resolved callback table (resolved on first use).
pub fn callbacks() -> &'static Callbacks {
    CALLBACKS.get_or_init(Callbacks::resolve)
}

/// Copies an Envoy buffer into an owned byte vector.
///
/// # Safety
/// `buffer` must come from Envoy during the current hook, pointing at
/// `length` readable bytes (or be null/empty).
pub unsafe fn copy_envoy_buffer(buffer: EnvoyBuffer) -> Vec<u8> {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller: Envoy owns `length` valid bytes at
    // `ptr` for the duration of the hook.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }.to_vec()
}
