//! Fuzz target `shield_token`: challenge and clearance tokens: issued, edited and arbitrary bytes verified.
//! The body and its checks are in `defenra_fuzz::shield`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::shield::token(data));
