//! Fuzz target: `tower_fuzz::checks::hello` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_fuzz::checks::hello(data));
