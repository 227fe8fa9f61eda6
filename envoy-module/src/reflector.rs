//! `dns_reflector`: a UDP listener filter that answers every datagram with
//! itself, the DNS QR bit set, without parsing it. It exists for the
//! benchmark: the query rate of an Envoy UDP listener filter that does no
//! work, the ceiling `dns_gateway` is measured against.

use crate::api::{UdpFilterHandle, UdpListenerFilter, UdpListenerFilterConfig, UdpStatus};

/// Name of the filter.
pub const DNS_REFLECTOR: &str = gateway_common::contract::DNS_REFLECTOR_FILTER;

/// The (empty) config of `dns_reflector`.
pub struct ReflectorConfig;

impl UdpListenerFilterConfig for ReflectorConfig {
    fn new_filter(&self) -> Box<dyn UdpListenerFilter> {
        Box::new(Reflector)
    }
}

/// The filter of one worker.
pub struct Reflector;

impl UdpListenerFilter for Reflector {
    fn on_data(&mut self, handle: &mut dyn UdpFilterHandle) -> UdpStatus {
        let mut datagram = handle.datagram();
        if let (Some(flags), Some(peer)) = (datagram.get_mut(2), handle.peer_address()) {
            *flags |= 0x80;
            handle.send_datagram(&datagram, peer);
        }
        UdpStatus::StopIteration
    }
}
