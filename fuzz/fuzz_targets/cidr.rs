//! Fuzz target `cidr`: the CIDR parser (`defenra_config::Cidr`, `parse_cidr_list`).
//! The body and its checks are in `defenra_fuzz::shield`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::shield::cidr(data));
