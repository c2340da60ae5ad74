//! Fuzz target `h1_request`: an HTTP/1 request head through the engine's parser and origin head writer.
//! The body and its checks are in `defenra_fuzz::http`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::http::request(data));
