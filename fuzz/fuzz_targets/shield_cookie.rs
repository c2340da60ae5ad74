//! Fuzz target `shield_cookie`: the clearance cookie scanner (`defenra_shield::challenge::cookie_values`).
//! The body and its checks are in `defenra_fuzz::shield`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::shield::cookie(data));
