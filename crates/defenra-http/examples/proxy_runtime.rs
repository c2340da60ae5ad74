//! The proxy alone on plain HTTP, for runtime experiments (not part of the agent):
//!
//! `proxy_runtime MODE LISTEN ORIGIN_PORT HOST`, MODE being `multi` (tokio's multi-thread
//! runtime, one worker per core, as the agent runs today) or `per-core` (one current-thread
//! runtime per core, each accepting on its own `SO_REUSEPORT` listener, as nginx's workers).
//! Every request for HOST goes to 127.0.0.1:ORIGIN_PORT. Runs until killed.

use std::net::SocketAddr;
use std::sync::Arc;

use defenra_config::{Reload, SnapshotCell};
use defenra_http::{HttpOptions, HttpService};
use defenra_waf::{WafEngine, WafOptions};
use tokio_util::sync::CancellationToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, origin_port, host] = args.as_slice() else {
        return Err("usage: proxy_runtime multi|per-core LISTEN ORIGIN_PORT HOST".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let options = HttpOptions {
        origin_http_port: origin_port.parse()?,
        ..HttpOptions::default()
    };
    let document = format!(
        r#"{{"success": true, "domains": [{{"domain": "{host}",
            "httpProxy": {{"enabled": true, "type": "both"}},
            "dnsRecords": [{{"name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300,
                             "httpProxyEnabled": true}}]}}]}}"#
    );
    let compiled = defenra_config::compile(document.as_bytes())?;
    let snapshot = SnapshotCell::new().publish(compiled.snapshot);
    let waf = Arc::new(WafEngine::new(WafOptions::default()));
    let service = Arc::new(HttpService::new(Arc::clone(&waf), options));
    let mut issues = Vec::new();
    waf.reload(&snapshot, &mut issues);
    service.reload(&snapshot, &mut issues);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let token = CancellationToken::new();
    match mode.as_str() {
        "multi" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                service.serve_http(listener, token).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            })?;
        }
        "per-core" => {
            let mut threads = Vec::new();
            for _ in 0..cores {
                let listener = reuseport_listener(listen)?;
                let service = Arc::clone(&service);
                let token = token.clone();
                threads.push(std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|error| error.to_string())?;
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .map_err(|error| error.to_string())?;
                        service
                            .serve_http(listener, token)
                            .await
                            .map_err(|error| error.to_string())
                    })
                }));
            }
            for thread in threads {
                thread.join().map_err(|_| "worker panicked")??;
            }
        }
        other => return Err(format!("unknown mode {other}").into()),
    }
    Ok(())
}

fn reuseport_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
