//! The safe face of the Envoy binding: what a filter sees of Envoy.
//!
//! Filters are plain Rust types implementing [`UdpListenerFilter`] or
//! [`NetworkFilter`]; they talk to Envoy only through the handle traits
//! ([`UdpFilterHandle`], [`NetworkFilterHandle`], [`CounterRegistry`]), so
//! unit tests drive them with fakes. The real handles live in
//! `crate::abi`, the only place with `unsafe` code.

mod log;

use std::{net::SocketAddr, time::Duration};

pub use log::{log, log_enabled, quiet_outside_envoy, LogLevel};

/// Runs one filter step, turning a panic into `None` so the filter can
/// fail closed (drop, close) and count it. The payload is leaked, not
/// dropped: its `Drop` could panic too.
pub fn catch_panic<T>(step: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(value) => Some(value),
        Err(payload) => {
            std::mem::forget(payload);
            None
        }
    }
}

/// Identifies a counter defined at config creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterId(pub usize);

/// A timer armed with [`NetworkFilterHandle::start_timer`]: cancelled when
/// dropped, so a filter that holds it never gets an event after it is gone.
pub struct Timer(#[allow(dead_code)] Box<dyn Send>);

impl Timer {
    /// Wraps whatever keeps the timer armed (dropping it cancels).
    pub fn new(inner: impl Send + 'static) -> Self {
        Self(Box::new(inner))
    }
}

/// What happens to a datagram after a UDP listener filter saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpStatus {
    /// Hand the datagram to the next UDP listener filter.
    Continue = 0,
    /// Stop: later filters do not see the datagram.
    StopIteration = 1,
}

/// What happens to a connection (or data) after a network filter saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkStatus {
    /// Go on with the next network filter.
    Continue = 0,
    /// Stop the filter chain here.
    StopIteration = 1,
}

/// Defines Envoy stats at config creation.
/// A [`CounterRegistry`] that puts `prefix` before every name (network
/// filter counters are not scoped by filter name, so a filter that reuses
/// another's counter set names its own).
pub struct PrefixedRegistry<'a> {
    inner: &'a mut dyn CounterRegistry,
    prefix: &'static str,
}

impl<'a> PrefixedRegistry<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn CounterRegistry, prefix: &'static str) -> Self {
        Self { inner, prefix }
    }
}

impl CounterRegistry for PrefixedRegistry<'_> {
    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        self.inner.define_counter(&format!("{}{name}", self.prefix))
    }
}

pub trait CounterRegistry {
    /// Defines (or finds) the counter `name`; `None` if Envoy refused.
    fn define_counter(&mut self, name: &str) -> Option<CounterId>;
}

/// The Envoy side of one UDP listener filter, during one `on_data`.
pub trait UdpFilterHandle {
    /// The current datagram's payload (all chunks, concatenated).
    fn datagram(&self) -> Vec<u8>;
    /// Who sent the current datagram.
    fn peer_address(&self) -> Option<SocketAddr>;
    /// The listener address the datagram arrived at.
    fn local_address(&self) -> Option<SocketAddr>;
    /// Sends `data` to `to` from the listener's socket; false on failure.
    fn send_datagram(&mut self, data: &[u8], to: SocketAddr) -> bool;
    /// Adds `value` to a counter defined at config creation.
    fn increment_counter(&mut self, id: CounterId, value: u64);
}

/// The Envoy side of one network filter (one connection).
pub trait NetworkFilterHandle {
    /// The connection's local address (the listener side).
    fn local_address(&self) -> Option<SocketAddr>;
    /// The connection's remote (peer, client) address.
    fn remote_address(&self) -> Option<SocketAddr>;
    /// Sets a plain string filter state, readable as
    /// `%FILTER_STATE(key:PLAIN)%`; false on failure.
    fn set_filter_state_bytes(&mut self, key: &str, value: &str) -> bool;
    /// Sets a filter state through the object factory registered for `key`
    /// (e.g. `envoy.tcp_proxy.cluster`); false on failure.
    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool;
    /// Closes the connection.
    fn close(&mut self);
    /// Adds `value` to a counter defined at config creation.
    fn increment_counter(&mut self, id: CounterId, value: u64);
    /// The bytes in the read buffer (from the client) during `on_read`.
    fn read_buffer(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Removes the first `length` bytes of the read buffer.
    fn drain_read_buffer(&mut self, _length: usize) {}
    /// Appends bytes to the read buffer, for the filters after this one.
    fn append_read_buffer(&mut self, _data: &[u8]) {}
    /// The bytes in the write buffer (to the client) during `on_write`.
    fn write_buffer(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Removes the first `length` bytes of the write buffer.
    fn drain_write_buffer(&mut self, _length: usize) {}
    /// Appends bytes to the write buffer.
    fn append_write_buffer(&mut self, _data: &[u8]) {}
    /// Writes bytes to the client (they pass this filter's `on_write`
    /// untouched); false when Envoy offers no way to.
    fn write_to_client(&mut self, _data: &[u8]) -> bool {
        false
    }
    /// Whether the connection's upstream is ready: tcp_proxy sets its host
    /// once the upstream is connected, which for a CONNECT tunnel means
    /// once the proxy answered 200 (or once it failed).
    fn has_upstream_host(&self) -> bool {
        false
    }
    /// Calls the filter's `on_scheduled(event)` on its worker after
    /// `delay`, unless the returned timer is dropped first; `None` when
    /// Envoy offers no scheduler.
    fn start_timer(&mut self, _delay: Duration, _event: u64) -> Option<Timer> {
        None
    }
}

/// A UDP listener filter: one instance per worker, shared by all datagrams
/// that worker receives.
pub trait UdpListenerFilter: Send {
    /// Called for each datagram.
    fn on_data(&mut self, handle: &mut dyn UdpFilterHandle) -> UdpStatus;
}

/// A filter config that creates UDP listener filters; shared by workers.
pub trait UdpListenerFilterConfig: Send + Sync {
    /// Creates the filter of one worker.
    fn new_filter(&self) -> Box<dyn UdpListenerFilter>;
}

/// A network filter: one instance per connection.
pub trait NetworkFilter: Send {
    /// Called once when the connection is accepted.
    fn on_new_connection(&mut self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus;
    /// Called when data arrives from the client (`end_stream`: the client
    /// half-closed).
    fn on_read(
        &mut self,
        _handle: &mut dyn NetworkFilterHandle,
        _end_stream: bool,
    ) -> NetworkStatus {
        NetworkStatus::Continue
    }
    /// Called when data goes to the client, except bytes this filter wrote
    /// itself with `write_to_client`.
    fn on_write(
        &mut self,
        _handle: &mut dyn NetworkFilterHandle,
        _end_stream: bool,
    ) -> NetworkStatus {
        NetworkStatus::Continue
    }
    /// Called on the connection's worker when a timer of
    /// [`NetworkFilterHandle::start_timer`] fires.
    fn on_scheduled(&mut self, _handle: &mut dyn NetworkFilterHandle, _event: u64) {}
}

/// A filter config that creates network filters; shared by workers.
pub trait NetworkFilterConfig: Send + Sync {
    /// Creates the filter of one connection.
    fn new_filter(&self) -> Box<dyn NetworkFilter>;
}

/// Counters of one filter kind, defined together at config creation.
pub trait CounterKind: Copy + 'static {
    /// Every counter of the kind, in index order.
    const ALL: &'static [Self];
    /// The stat name.
    fn name(self) -> &'static str;
    /// Position in [`CounterKind::ALL`].
    fn index(self) -> usize;
}

/// The ids Envoy gave the counters of kind `K`.
#[derive(Clone, Debug)]
pub struct Counters<K: CounterKind> {
    ids: Vec<Option<CounterId>>,
    _kind: std::marker::PhantomData<K>,
}

impl<K: CounterKind> Counters<K> {
    /// Defines every counter of `K`; a counter Envoy refuses is logged and
    /// then silently not counted.
    pub fn define(registry: &mut dyn CounterRegistry) -> Self {
        let ids = K::ALL
            .iter()
            .map(|k| {
                let id = registry.define_counter(k.name());
                if id.is_none() {
                    log(
                        LogLevel::Warn,
                        &format!("could not define counter {}", k.name()),
                    );
                }
                id
            })
            .collect();
        Self {
            ids,
            _kind: std::marker::PhantomData,
        }
    }

    /// Counters that count nothing (no Envoy).
    pub fn none() -> Self {
        Self {
            ids: vec![None; K::ALL.len()],
            _kind: std::marker::PhantomData,
        }
    }

    /// The id of `kind`, if defined.
    pub fn id(&self, kind: K) -> Option<CounterId> {
        self.ids.get(kind.index()).copied().flatten()
    }
}
