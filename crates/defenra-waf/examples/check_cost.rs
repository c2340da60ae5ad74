//! Prints the median cost of one `WafEngine::check` call for a representative rule script.
//!
//! `cargo run --release -p defenra-waf --example check_cost [SCRIPT_FILE]`; used by
//! `cargo xtask bench waf`. Without a file it uses the bench's rule script.

use std::sync::Arc;
use std::time::Instant;

use defenra_config::Reload;
use defenra_waf::{RequestInfo, Verdict, WafEngine, WafOptions};
use http::{HeaderMap, Method, Uri};

const DEFAULT_SCRIPT: &str = r#"
local ip = ngx.var.remote_addr
local blocked = { ["203.0.113.1"] = true, ["203.0.113.2"] = true, ["198.51.100.9"] = true }
if blocked[ip] then return ngx.exit(403) end
local key = "rl:" .. ip
local count = ngx.shared.cache:incr(key, 1, 0, 1)
if count and count > 1000000000 then return ngx.exit(429) end
local ua = string.lower(ngx.var.http_user_agent or "")
for _, bad in ipairs({ "sqlmap", "nikto", "masscan", "zgrab" }) do
  if string.find(ua, bad, 1, true) then return ngx.exit(403) end
end
local uri = string.lower(ngx.var.request_uri)
if string.find(uri, "union%s+select") or string.find(uri, "<script")
   or string.find(uri, "%.%./") or string.find(uri, "/wp%-admin") then
  return ngx.exit(403)
end
"#;

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

    let mut headers = HeaderMap::new();
    headers.insert("host", "example.com".parse().unwrap());
    headers.insert("user-agent", "wrk/4.2 (bench)".parse().unwrap());
    headers.insert("accept", "*/*".parse().unwrap());
    let uri: Uri = "/index.html?page=1".parse().unwrap();
    let request = RequestInfo {
        domain: "example.com",
        host: "example.com",
        method: &Method::GET,
        uri: &uri,
        headers: &headers,
        remote_addr: "127.0.0.1".parse().unwrap(),
        scheme: "http",
        server_port: 80,
    };
    // Warm up: builds the thread's Lua state and loads the chunk.
    for _ in 0..10_000 {
        assert!(matches!(engine.check(&request), Verdict::Allow { .. }));
    }
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
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
