//! Fuzz target: see `quiver_node::fuzzing::client_request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_node::fuzzing::client_request(data));
