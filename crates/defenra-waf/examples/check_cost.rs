//! Prints the median cost of one `WafEngine::check` call for a representative rule script.
//!
//! `cargo run --release -p defenra-waf --example check_cost [SCRIPT_FILE]`; used by
//! `cargo xtask bench waf`. Without a file it uses the bench's rule script.

use std::sync::Arc;
use std::time::Instant;

use defenra_config::Reload;
use defenra_waf::{RequestHeaders, RequestInfo, Verdict, WafEngine, WafOptions};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// The bench's rule script (one file, shared with `cargo xtask bench waf`).
const DEFAULT_SCRIPT: &str = include_str!("bench_rules.lua");

fn main() {
    let script = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(&path).unwrap_or_else(|error| {
            eprintln!("cannot read {path}: {error}");
            std::process::exit(2)
        }),
        None => DEFAULT_SCRIPT.to_owned(),
    };
    let doc = format!(
        r#"{{"domains":[{{"domain":"example.com","luaCode":{}}}]}}"#,
        serde_json::to_string(&script).unwrap_or_default()
    );
    let compiled = defenra_config::compile(doc.as_bytes()).expect("bench config compiles");
    let mut options = WafOptions::default();
    // `CHECK_COST_MEMORY_LIMIT=0` measures without the per-state memory cap.
    if let Some(limit) = std::env::var("CHECK_COST_MEMORY_LIMIT")
        .ok()
        .and_then(|value| value.parse().ok())
    {
        options.memory_limit = limit;
    }
    let engine = WafEngine::new(options);
    let mut issues = Vec::new();
    engine.reload(&Arc::new(compiled.snapshot), &mut issues);
    assert!(issues.is_empty(), "{issues:?}");

    // As an HTTP/1 parser hands them over; `CHECK_COST_HEADERS=map` passes a `HeaderMap`
    // instead, as the HTTP/2 path does.
    let pairs: [(&str, &[u8]); 3] = [
        ("Host", b"example.com"),
        ("User-Agent", b"wrk/4.2 (bench)"),
        ("Accept", b"*/*"),
    ];
    let map: HeaderMap = pairs
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_bytes(value).expect("valid value"),
            )
        })
        .collect();
    let headers = match std::env::var("CHECK_COST_HEADERS").as_deref() {
        Ok("map") => RequestHeaders::Map(&map),
        _ => RequestHeaders::Pairs(&pairs),
    };
    let request = RequestInfo {
        domain: "example.com",
        host: "example.com",
        method: &Method::GET,
        target: "/index.html?page=1",
        headers,
        remote_addr: "127.0.0.1".parse().unwrap(),
        scheme: "http",
        server_port: 80,
    };
    // Warm up: builds the thread's Lua state and loads the chunk.
    for _ in 0..10_000 {
        assert!(matches!(engine.check(&request), Verdict::Allow { .. }));
    }
    // `CHECK_COST_SAMPLES=5` keeps a run under callgrind short (each sample is 1000 calls).
    let n_samples = std::env::var("CHECK_COST_SAMPLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200_usize)
        .max(1);
    // `CHECK_COST_EVICT_KIB=N` writes N KiB of other memory before every call, as a proxy's
    // socket and HTTP work does between two requests, and times each call on its own: the
    // cost of a call whose Lua state is no longer in the CPU caches.
    let evict_kib: usize = std::env::var("CHECK_COST_EVICT_KIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut samples = Vec::with_capacity(n_samples);
    if evict_kib > 0 {
        let mut other = vec![0u8; evict_kib << 10];
        for round in 0..n_samples * 10 {
            for line in other.chunks_mut(64) {
                line[0] = line[0].wrapping_add(round as u8);
            }
            std::hint::black_box(&other);
            let started = Instant::now();
            std::hint::black_box(engine.check(std::hint::black_box(&request)));
            samples.push(started.elapsed().as_nanos() as f64);
        }
    }
    for _ in 0..n_samples * usize::from(evict_kib == 0) {
        let started = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(engine.check(std::hint::black_box(&request)));
        }
        samples.push(started.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let median = samples[samples.len() / 2];
    let p90 = samples[samples.len() * 9 / 10];
    println!("waf_check_median_ns {median:.0}");
    println!("waf_check_p90_ns {p90:.0}");
}
