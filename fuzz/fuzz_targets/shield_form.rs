//! Fuzz target `shield_form`: the challenge page's submitted form (`defenra_shield::challenge::parse_submission`).
//! The body and its checks are in `defenra_fuzz::shield`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::shield::form(data));
