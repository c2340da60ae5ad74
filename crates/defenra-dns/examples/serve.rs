//! Serves a config file on 127.0.0.1:PORT until killed, with a chosen UDP batch size, for
//! comparing socket-loop variants under dnsperf:
//! `cargo run --release -p defenra-dns --example serve -- CONFIG.json PORT [BATCH]`.

use std::sync::Arc;

use defenra_config::Reload;
use defenra_dns::{DnsOptions, DnsService, DnsSockets};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let config = args.next().expect("usage: serve CONFIG.json PORT [BATCH]");
    let port: u16 = args
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port");
    let udp_batch = args.next().and_then(|n| n.parse().ok()).unwrap_or(32);
    let compiled = defenra_config::compile(&std::fs::read(config).expect("readable config"))
        .expect("config compiles");
    let service = Arc::new(DnsService::new(
        None,
        DnsOptions {
            udp_batch,
            ..DnsOptions::default()
        },
    ));
    service.reload(&Arc::new(compiled.snapshot), &mut Vec::new());
    let sockets = DnsSockets::bind(([127, 0, 0, 1], port).into())
        .await
        .expect("bindable port");
    service
        .serve(sockets, CancellationToken::new())
        .await
        .expect("serve runs");
}
