//! Fuzz target `l4_proxy_header`: the PROXY protocol v2 header the L4 forwarder sends, read back strictly.
//! The body and its checks are in `defenra_fuzz::l4`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::l4::proxy_header(data));
