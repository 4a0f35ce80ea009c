//! Fuzz target: see `quiver_node::fuzzing::wal_segment`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_node::fuzzing::wal_segment(data));
