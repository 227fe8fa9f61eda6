//! Any DNS-over-TCP byte stream: framing loses nothing, and every framed
//! message goes through the DNS path without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    connectivity_envoy_module::fuzzing::dns_tcp_stream(data);
});
