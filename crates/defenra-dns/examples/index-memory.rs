//! Prints resident memory while compiling a config and building the zone index, to see
//! what a large config costs: `cargo run --release -p defenra-dns --example index-memory -- FILE`.

use std::sync::Arc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: index-memory CONFIG.json");
    println!("start: {} KiB", rss_kib());
    let bytes = std::fs::read(&path).expect("readable config");
    println!("read {} bytes: {} KiB", bytes.len(), rss_kib());
    // Typed parse first (as `compile` would without its whole-document Value), to show
    // what the document costs without the transient tree.
    let typed = std::env::args().nth(2).as_deref() == Some("--typed");
    let compiled = if typed {
        let response: defenra_config::wire::PollResponse =
            serde_json::from_slice(&bytes).expect("config parses");
        println!("typed parse: {} KiB", rss_kib());
        let compiled = defenra_config::compile::compile_response(&response);
        drop(response);
        compiled
    } else {
        defenra_config::compile(&bytes).expect("config compiles")
    };
    drop(bytes);
    println!(
        "compiled {} domains, {} issues: {} KiB",
        compiled.snapshot.domains.len(),
        compiled.issues.len(),
        rss_kib()
    );
    let snapshot = Arc::new(compiled.snapshot);
    let mut issues = Vec::new();
    let index = defenra_dns::ZoneIndex::build(&snapshot, None, &mut issues);
    println!(
        "index of {} zones, {} records ({} KiB of tables and arena): {} KiB",
        index.n_zones(),
        index.n_records(),
        index.heap_bytes() / 1024,
        rss_kib()
    );
    // Keep both alive past `main`, so an allocator's exit statistics (jemalloc's
    // `MALLOC_CONF=stats_print:true`) count them as live.
    if std::env::args().any(|arg| arg == "--drop-index") {
        drop(index);
    } else {
        std::mem::forget(index);
    }
    std::mem::forget(snapshot);
}
