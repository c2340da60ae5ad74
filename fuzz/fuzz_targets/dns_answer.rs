//! Fuzz target `dns_answer`: one DNS message through the answer path over UDP and TCP (`defenra_dns::DnsService::answer`).
//! The body and its checks are in `defenra_fuzz::dns`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::dns::answer(data));
