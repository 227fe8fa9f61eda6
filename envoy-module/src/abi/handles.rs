//! Real handles: the safe traits of [`crate::api`] implemented with Envoy's
//! callbacks for the duration of one hook call.

use std::{
    cell::Cell,
    net::{IpAddr, SocketAddr},
};

use super::{
    callbacks::{callbacks, copy_envoy_buffer},
    types::{EnvoyBuffer, EnvoyPtr, ModuleBuffer, CLOSE_FLUSH_WRITE, METRICS_SUCCESS},
};
use crate::api::{CounterId, CounterRegistry, NetworkFilterHandle, Timer, UdpFilterHandle};

type AddressFn = unsafe extern "C" fn(EnvoyPtr, *mut EnvoyBuffer, *mut u32) -> bool;

/// Reads an address through one of Envoy's `get_*_address` callbacks.
///
/// # Safety
/// `ptr` must be the live Envoy object the callback expects.
unsafe fn read_address(callback: Option<AddressFn>, ptr: EnvoyPtr) -> Option<SocketAddr> {
    let callback = callback?;
    let mut ip = EnvoyBuffer::empty();
    let mut port = 0u32;
    // SAFETY: `ptr` is live (caller); the out-pointers are valid locals.
    if !unsafe { callback(ptr, &mut ip, &mut port) } {
        return None;
    }
    // SAFETY: Envoy filled `ip` with a buffer valid during this hook.
    let text = unsafe { copy_envoy_buffer(ip) };
    let text = std::str::from_utf8(&text).ok()?;
    let ip: IpAddr = text
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

type ChunksSizeFn = unsafe extern "C" fn(EnvoyPtr) -> usize;
type ChunksFn = unsafe extern "C" fn(EnvoyPtr, *mut EnvoyBuffer);

/// Copies the bytes of the read or write buffer of the running hook.
///
/// # Safety
/// `ptr` must be the network filter of the running hook.
unsafe fn read_chunks(
    size: Option<ChunksSizeFn>,
    chunks: Option<ChunksFn>,
    ptr: EnvoyPtr,
) -> Vec<u8> {
    let (Some(size), Some(chunks)) = (size, chunks) else {
        return Vec::new();
    };
    // SAFETY: `ptr` is the running hook's filter (caller).
    let count = unsafe { size(ptr) };
    if count == 0 {
        return Vec::new();
    }
    let mut buffers = vec![EnvoyBuffer::empty(); count];
    // SAFETY: `buffers` has room for the `count` chunks Envoy reported;
    // the return value differs across ABI revisions and is not used:
    // unfilled slots stay empty.
    unsafe { chunks(ptr, buffers.as_mut_ptr()) };
    let mut out = Vec::new();
    for buffer in buffers {
        // SAFETY: Envoy filled the slot with a chunk valid during the hook.
        out.extend_from_slice(&unsafe { copy_envoy_buffer(buffer) });
    }
    out
}

thread_local! {
    /// Set while the module writes to a connection itself: Envoy runs the
    /// connection's write filters (this module's among them) inside that
    /// call, and the module's own bytes must pass them untouched.
    static MODULE_WRITING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current write hook was triggered by the module's own write
/// (see [`NetworkHandle`]'s `write_to_client`): the filter must not be
/// entered again while it is already running.
pub fn module_write_in_progress() -> bool {
    MODULE_WRITING.with(Cell::get)
}

/// Which kind of filter config a [`ConfigRegistry`] defines counters on.
#[derive(Clone, Copy, Debug)]
pub enum ConfigKind {
    /// A UDP listener filter config.
    UdpListener,
    /// A network filter config.
    Network,
}

/// Defines counters on an Envoy filter config during `config_new`.
pub struct ConfigRegistry {
    ptr: EnvoyPtr,
    kind: ConfigKind,
}

impl ConfigRegistry {
    /// Wraps the Envoy config pointer handed to `config_new`.
    pub fn new(ptr: EnvoyPtr, kind: ConfigKind) -> Self {
        Self { ptr, kind }
    }
}

impl CounterRegistry for ConfigRegistry {
    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        let table = callbacks();
        let define = match self.kind {
            ConfigKind::UdpListener => table.udp_listener_filter_config_define_counter,
            ConfigKind::Network => table.network_filter_config_define_counter,
        }?;
        let mut id = 0usize;
        // SAFETY: `ptr` is the config object of the running `config_new`;
        // the name buffer outlives the call; `id` is a valid local.
        let result =
            unsafe { define(self.ptr, ModuleBuffer::from_bytes(name.as_bytes()), &mut id) };
        (result == METRICS_SUCCESS).then_some(CounterId(id))
    }
}

/// The Envoy UDP listener filter during one `on_data`.
pub struct UdpHandle {
    ptr: EnvoyPtr,
}

impl UdpHandle {
    /// Wraps the filter pointer handed to `on_data`.
    pub fn new(ptr: EnvoyPtr) -> Self {
        Self { ptr }
    }
}

impl UdpFilterHandle for UdpHandle {
    fn datagram(&self) -> Vec<u8> {
        let table = callbacks();
        let (Some(size), Some(chunks)) = (
            table.udp_listener_filter_get_datagram_data_chunks_size,
            table.udp_listener_filter_get_datagram_data_chunks,
        ) else {
            return Vec::new();
        };
        // SAFETY: `ptr` is the filter of the running `on_data`.
        let count = unsafe { size(self.ptr) };
        if count == 0 {
            return Vec::new();
        }
        let mut buffers = vec![EnvoyBuffer::empty(); count];
        // SAFETY: `buffers` has room for exactly `count` entries, the number
        // Envoy just reported for this datagram.
        if !unsafe { chunks(self.ptr, buffers.as_mut_ptr()) } {
            return Vec::new();
        }
        let mut data = Vec::new();
        for buffer in buffers {
            // SAFETY: each chunk is valid for the duration of `on_data`.
            data.extend_from_slice(&unsafe { copy_envoy_buffer(buffer) });
        }
        data
    }

    fn peer_address(&self) -> Option<SocketAddr> {
        // SAFETY: `ptr` is the filter of the running `on_data`.
        unsafe { read_address(callbacks().udp_listener_filter_get_peer_address, self.ptr) }
    }

    fn local_address(&self) -> Option<SocketAddr> {
        // SAFETY: `ptr` is the filter of the running `on_data`.
        unsafe { read_address(callbacks().udp_listener_filter_get_local_address, self.ptr) }
    }

    fn send_datagram(&mut self, data: &[u8], to: SocketAddr) -> bool {
        let Some(send) = callbacks().udp_listener_filter_send_datagram else {
            return false;
        };
        let ip = to.ip().to_string();
        // SAFETY: `ptr` is the filter of the running `on_data`; both module
        // buffers outlive the call and Envoy copies them.
        unsafe {
            send(
                self.ptr,
                ModuleBuffer::from_bytes(data),
                ModuleBuffer::from_bytes(ip.as_bytes()),
                u32::from(to.port()),
            )
        }
    }

    fn increment_counter(&mut self, id: CounterId, value: u64) {
        if let Some(increment) = callbacks().udp_listener_filter_increment_counter {
            // SAFETY: `ptr` is the filter of the running `on_data`; the id
            // came from this filter's config.
            unsafe { increment(self.ptr, id.0, value) };
        }
    }
}

/// The Envoy network filter (one connection) during one hook.
pub struct NetworkHandle {
    ptr: EnvoyPtr,
}

impl NetworkHandle {
    /// Wraps the filter pointer handed to a network filter hook.
    pub fn new(ptr: EnvoyPtr) -> Self {
        Self { ptr }
    }

    fn set_state(
        &mut self,
        setter: Option<unsafe extern "C" fn(EnvoyPtr, ModuleBuffer, ModuleBuffer) -> bool>,
        key: &str,
        value: &str,
    ) -> bool {
        let Some(set) = setter else {
            return false;
        };
        // SAFETY: `ptr` is the filter of the running hook; key and value
        // outlive the call and Envoy copies them.
        unsafe {
            set(
                self.ptr,
                ModuleBuffer::from_bytes(key.as_bytes()),
                ModuleBuffer::from_bytes(value.as_bytes()),
            )
        }
    }
}

impl NetworkFilterHandle for NetworkHandle {
    fn local_address(&self) -> Option<SocketAddr> {
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe { read_address(callbacks().network_filter_get_local_address, self.ptr) }
    }

    fn remote_address(&self) -> Option<SocketAddr> {
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe { read_address(callbacks().network_filter_get_remote_address, self.ptr) }
    }

    fn set_filter_state_bytes(&mut self, key: &str, value: &str) -> bool {
        self.set_state(callbacks().network_set_filter_state_bytes, key, value)
    }

    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool {
        self.set_state(callbacks().network_set_filter_state_typed, key, value)
    }

    fn close(&mut self) {
        if let Some(close) = callbacks().network_filter_close {
            // SAFETY: `ptr` is the filter of the running hook.
            unsafe { close(self.ptr, CLOSE_FLUSH_WRITE) };
        }
    }

    fn read_buffer(&self) -> Vec<u8> {
        let table = callbacks();
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe {
            read_chunks(
                table.network_filter_get_read_buffer_chunks_size,
                table.network_filter_get_read_buffer_chunks,
                self.ptr,
            )
        }
    }

    fn drain_read_buffer(&mut self, length: usize) {
        if let Some(drain) = callbacks().network_filter_drain_read_buffer {
            // SAFETY: `ptr` is the filter of the running hook.
            unsafe { drain(self.ptr, length) };
        }
    }

    fn append_read_buffer(&mut self, data: &[u8]) {
        if let Some(append) = callbacks().network_filter_append_read_buffer {
            // SAFETY: `ptr` is the filter of the running hook; Envoy copies
            // `data` during the call.
            unsafe { append(self.ptr, ModuleBuffer::from_bytes(data)) };
        }
    }

    fn write_buffer(&self) -> Vec<u8> {
        let table = callbacks();
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe {
            read_chunks(
                table.network_filter_get_write_buffer_chunks_size,
                table.network_filter_get_write_buffer_chunks,
                self.ptr,
            )
        }
    }

    fn drain_write_buffer(&mut self, length: usize) {
        if let Some(drain) = callbacks().network_filter_drain_write_buffer {
            // SAFETY: `ptr` is the filter of the running hook.
            unsafe { drain(self.ptr, length) };
        }
    }

    fn append_write_buffer(&mut self, data: &[u8]) {
        if let Some(append) = callbacks().network_filter_append_write_buffer {
            // SAFETY: `ptr` is the filter of the running hook; Envoy copies
            // `data` during the call.
            unsafe { append(self.ptr, ModuleBuffer::from_bytes(data)) };
        }
    }

    fn write_to_client(&mut self, data: &[u8]) -> bool {
        let Some(write) = callbacks().network_filter_write else {
            return false;
        };
        MODULE_WRITING.with(|w| w.set(true));
        // SAFETY: `ptr` is the filter of the running hook; Envoy copies
        // `data`. The write filters it runs meanwhile see MODULE_WRITING
        // and do not enter this filter again.
        unsafe { write(self.ptr, ModuleBuffer::from_bytes(data), false) };
        MODULE_WRITING.with(|w| w.set(false));
        true
    }

    fn increment_counter(&mut self, id: CounterId, value: u64) {
        if let Some(increment) = callbacks().network_filter_increment_counter {
            // SAFETY: `ptr` is the filter of the running hook; the id came
            // from this filter's config.
            unsafe { increment(self.ptr, id.0, value) };
        }
    }

    fn has_upstream_host(&self) -> bool {
        let Some(has) = callbacks().network_filter_has_upstream_host else {
            return false;
        };
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe { has(self.ptr) }
    }

    fn start_timer(&mut self, delay: std::time::Duration, event: u64) -> Option<Timer> {
        // SAFETY: `ptr` is the filter of the running hook.
        unsafe { super::timers::arm(self.ptr, delay, event) }.map(Timer::new)
    }
}
