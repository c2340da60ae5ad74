//! Fuzz target `h1_response`: an origin's HTTP/1 response head through the engine's parser and client head writer.
//! The body and its checks are in `defenra_fuzz::http`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::http::response(data));
