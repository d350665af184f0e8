//! Fuzz target: `tower_fuzz::checks::join_token` on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_fuzz::checks::join_token(data));
