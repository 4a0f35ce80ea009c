//! Fuzz target: see `quiver_node::fuzzing::context_token`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_node::fuzzing::context_token(data));
