//! Any bytes as a `dns_gateway` / `cache_lookup` filter configuration:
//! accepted or refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    connectivity_envoy_module::fuzzing::filter_configs(data);
});
