//! `dns_gateway_tcp`: DNS over TCP (RFC 7766) for the same names as the UDP
//! `dns_gateway`, as a network filter in front of a `tcp_proxy` to the
//! fallback resolvers.
//!
//! Each message from the client is framed by its two-byte length. A
//! matched name is answered here, written straight to the client; anything
//! else is handed, frame by frame, to the `tcp_proxy` behind this filter,
//! which relays it to a fallback resolver over TCP and its answers back.
//! Several queries per connection and pipelined queries work: answers may
//! come back in any order (clients match them by ID, RFC 7766 §7). So that
//! the module's answers never land inside a relayed answer, the bytes
//! coming back from the resolver are released to the client only in whole
//! frames.

use std::sync::Arc;

use crate::{
    api::{log, LogLevel, NetworkFilter, NetworkFilterConfig, NetworkFilterHandle, NetworkStatus},
    dns_gateway::{DnsCounter, DnsGatewayConfig, Outcome, Shared},
};

/// Queries one connection may send; one more closes it (RFC 7766 §6.2.3
/// lets a server close; clients reconnect). This
/// bounds what a client that never reads its answers can make Envoy hold:
/// answers are written to the connection whether or not it reads them.
pub const MAX_QUERIES_PER_CONNECTION: u32 = 100;

/// A loaded `dns_gateway_tcp` config.
pub struct DnsTcpConfig {
    shared: Arc<Shared>,
}

impl DnsTcpConfig {
    /// Builds the TCP filter config on a `dns_gateway` config of the same
    /// settings (same patterns, pool and shared VIP table).
    pub fn new(udp_config: DnsGatewayConfig) -> Self {
        Self {
            shared: udp_config.shared(),
        }
    }
}

impl NetworkFilterConfig for DnsTcpConfig {
    fn new_filter(&self) -> Box<dyn NetworkFilter> {
        Box::new(DnsTcpFilter {
            shared: self.shared.clone(),
            from_client: Vec::new(),
            from_resolver: Vec::new(),
            queries: 0,
        })
    }
}

/// The filter of one client connection.
pub struct DnsTcpFilter {
    shared: Arc<Shared>,
    /// Bytes from the client not yet forming a whole frame.
    from_client: Vec<u8>,
    /// Bytes from the resolver not yet forming a whole frame.
    from_resolver: Vec<u8>,
    /// Queries seen on this connection.
    queries: u32,
}

/// Splits the whole frames (length prefix included) off the front of
/// `buffer`, leaving a trailing partial frame in it.
pub fn take_frames(buffer: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buffer.len() - at >= 2 {
        let length = usize::from(u16::from_be_bytes([buffer[at], buffer[at + 1]]));
        if buffer.len() - at < 2 + length {
            break;
        }
        frames.push(buffer[at..at + 2 + length].to_vec());
        at += 2 + length;
    }
    buffer.drain(..at);
    frames
}

/// A message with its two-byte length prefix; `None` when it is too long
/// for one frame.
pub fn frame(message: &[u8]) -> Option<Vec<u8>> {
    let length = u16::try_from(message.len()).ok()?;
    let mut out = Vec::with_capacity(message.len() + 2);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(message);
    Some(out)
}

impl DnsTcpFilter {
    fn count(&self, handle: &mut dyn NetworkFilterHandle, counter: DnsCounter) {
        if let Some(id) = self.shared.counters.id(counter) {
            handle.increment_counter(id, 1);
        }
    }

    fn read(&mut self, handle: &mut dyn NetworkFilterHandle, end_stream: bool) -> NetworkStatus {
        let incoming = handle.read_buffer();
        handle.drain_read_buffer(incoming.len());
        self.from_client.extend_from_slice(&incoming);
        let mut relay = Vec::new();
        let mut at_limit = false;
        let shared = self.shared.clone();
        for whole in take_frames(&mut self.from_client) {
            if self.queries >= MAX_QUERIES_PER_CONNECTION {
                at_limit = true;
                break;
            }
            self.queries += 1;
            self.count(handle, DnsCounter::Queries);
            let outcome = shared.decide(&whole[2..], false, &mut |c| {
                if let Some(id) = shared.counters.id(c) {
                    handle.increment_counter(id, 1);
                }
            });
            match outcome {
                Outcome::PassOn => relay.extend_from_slice(&whole),
                Outcome::Drop => {}
                Outcome::Reply(answer) => {
                    let written = frame(&answer).is_some_and(|f| handle.write_to_client(&f));
                    if !written {
                        self.count(handle, DnsCounter::SendErrors);
                        log(
                            LogLevel::Warn,
                            "dns_gateway_tcp: could not write an answer; closing the connection",
                        );
                        handle.close();
                        return NetworkStatus::StopIteration;
                    }
                }
            }
        }
        if at_limit {
            // Answers already written are flushed; relayed queries still
            // pending may go unanswered, and the client asks again on a
            // new connection.
            self.from_client.clear();
            self.count(handle, DnsCounter::TcpQueryLimit);
            log(
                LogLevel::Debug,
                "dns_gateway_tcp: connection reached its query limit; closing it",
            );
            if !relay.is_empty() {
                handle.append_read_buffer(&relay);
            }
            handle.close();
            NetworkStatus::StopIteration
        } else if !relay.is_empty() {
            handle.append_read_buffer(&relay);
            NetworkStatus::Continue
        } else if end_stream {
            // Let tcp_proxy see the half-close.
            NetworkStatus::Continue
        } else {
            NetworkStatus::StopIteration
        }
    }

    fn write(&mut self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        let outgoing = handle.write_buffer();
        handle.drain_write_buffer(outgoing.len());
        self.from_resolver.extend_from_slice(&outgoing);
        let whole: Vec<u8> = take_frames(&mut self.from_resolver).concat();
        if !whole.is_empty() {
            handle.append_write_buffer(&whole);
        }
        NetworkStatus::Continue
    }

    fn fail_closed(&self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        self.count(handle, DnsCounter::Panics);
        log(
            LogLevel::Error,
            "dns_gateway_tcp: handling a connection panicked; closing it",
        );
        handle.close();
        NetworkStatus::StopIteration
    }
}

impl NetworkFilter for DnsTcpFilter {
    fn on_new_connection(&mut self, _handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        NetworkStatus::Continue
    }

    fn on_read(&mut self, handle: &mut dyn NetworkFilterHandle, end_stream: bool) -> NetworkStatus {
        crate::api::catch_panic(|| self.read(&mut *handle, end_stream))
            .unwrap_or_else(|| self.fail_closed(handle))
    }

    fn on_write(
        &mut self,
        handle: &mut dyn NetworkFilterHandle,
        _end_stream: bool,
    ) -> NetworkStatus {
        crate::api::catch_panic(|| self.write(&mut *handle))
            .unwrap_or_else(|| self.fail_closed(handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_whole_and_partial_ones_kept() {
        // (bytes in, frames out, bytes left)
        let cases: [(&[u8], usize, usize); 5] = [
            (&[], 0, 0),
            (&[0], 0, 1),
            (&[0, 2, 1], 0, 3),
            (&[0, 2, 1, 2], 1, 0),
            (&[0, 1, 9, 0, 0, 0, 3, 1], 2, 3),
        ];
        for (input, frames, left) in cases {
            let mut buffer = input.to_vec();
            let out = take_frames(&mut buffer);
            assert_eq!(out.len(), frames, "{input:?}");
            assert_eq!(buffer.len(), left, "{input:?}");
            let rebuilt: Vec<u8> = out.concat().into_iter().chain(buffer).collect();
            assert_eq!(rebuilt, input, "nothing lost or reordered");
        }
    }

    #[test]
    fn a_frame_carries_the_length() {
        assert_eq!(frame(&[7, 8, 9]), Some(vec![0, 3, 7, 8, 9]));
        assert_eq!(frame(&vec![0; 65_536]), None);
    }
}
