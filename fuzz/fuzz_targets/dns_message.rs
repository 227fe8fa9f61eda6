//! Any datagram through the module's DNS path, over UDP and as one TCP
//! message: no panic, every reply a DNS message with the query's ID.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    connectivity_envoy_module::fuzzing::dns_message(true, data);
    connectivity_envoy_module::fuzzing::dns_message(false, data);
});
