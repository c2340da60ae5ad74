//! Fuzz target `dns_tcp`: a DNS-over-TCP byte stream through the connection loop (`defenra_dns::fuzzing::answer_tcp_stream`).
//! The body and its checks are in `defenra_fuzz::dns`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::dns::tcp(data));
