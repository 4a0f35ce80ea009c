//! Fuzz target: see `quiver_node::fuzzing::sstable`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_node::fuzzing::sstable(data));
