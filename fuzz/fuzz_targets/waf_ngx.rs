//! Fuzz target `waf_ngx`: random `ngx` API calls with random arguments in the WAF's real sandbox.
//! The body and its checks are in `defenra_fuzz::waf`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::waf::ngx_calls(data));
