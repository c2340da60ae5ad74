//! Fuzz target `config_compile`: a Core document through `defenra_config::compile` and the services' reloads.
//! The body and its checks are in `defenra_fuzz::config`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| defenra_fuzz::config::compile(data));
