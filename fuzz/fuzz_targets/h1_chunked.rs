//! Fuzz target `h1_chunked`: a chunked body through the HTTP/1 engine's scanner, whole and in pieces.
//! The body and its checks are in `defenra_fuzz::http`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::http::chunked(data));
