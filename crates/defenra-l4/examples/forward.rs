//! Runs one TCP forward with `L4Service`, for measuring the copy path by hand:
//! `cargo run --release -p defenra-l4 --example forward -- LISTEN_PORT DEST_HOST DEST_PORT [splice|userspace] [BUFFER]`.

use std::sync::Arc;

use defenra_config::{L4Protocol, L4Proxy, Reload, Snapshot};
use defenra_l4::{L4Options, L4Service};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: forward LISTEN_PORT DEST_HOST DEST_PORT [splice|userspace] [BUFFER]";
    let (Some(listen), Some(host), Some(port)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        return;
    };
    let (Ok(listen_port), Ok(destination_port)) = (listen.parse(), port.parse()) else {
        eprintln!("{usage}");
        return;
    };
    let options = L4Options {
        bind_ip: "127.0.0.1".parse().expect("literal address"),
        splice: args.get(3).map(String::as_str) != Some("userspace"),
        tcp_buffer_size: args
            .get(4)
            .and_then(|size| size.parse().ok())
            .unwrap_or(L4Options::default().tcp_buffer_size),
        ..L4Options::default()
    };
    let service = Arc::new(L4Service::new(options));
    let mut snapshot = Snapshot::empty();
    snapshot.proxies.push(L4Proxy {
        id: None,
        name: None,
        protocol: L4Protocol::Tcp,
        listen_port,
        destination_host: host.clone(),
        destination_port,
        proxy_protocol: false,
    });
    service.reload(&Arc::new(snapshot), &mut Vec::new());
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(Arc::clone(&service).serve(shutdown.clone()));
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
    let _ = serving.await;
}
