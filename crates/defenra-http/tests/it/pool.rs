//! The origin connection pool: reuse, idle timeout, origins that close idle connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{
    Origin, Proxy, config, eventually, get, options, proxied_domain, request, send,
};

#[tokio::test]
async fn sequential_requests_share_one_origin_connection() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    for path in ["/1", "/2", "/3"] {
        let reply = get(proxy.http, "example.com", path).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-echo-path"), path);
    }
    // A HEAD response has no body to read: its connection goes back to the pool anyway.
    let mut head = request("example.com", "/head");
    *head.method_mut() = Method::HEAD;
    assert_eq!(send(proxy.http, head).await.status, 200);
    assert_eq!(get(proxy.http, "example.com", "/4").await.status, 200);
    assert_eq!(origin.accepted_connections.load(Ordering::SeqCst), 1);
    assert_eq!(origin.open_connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_origin_connections_close_after_the_idle_timeout() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.pool_idle_timeout = Duration::from_millis(200);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
    let open = &origin.open_connections;
    eventually("the idle origin connection to close", || async {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
    // The next request opens a new one.
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
    assert_eq!(origin.accepted_connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_origin_closed_is_not_used() {
    // An origin that answers one request per connection, keeps it alive in words, then
    // closes it shortly after.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let proxy = Proxy::start(&config(vec![proxied_domain("example.com")]), port).await;
    for _ in 0..3 {
        let reply = get(proxy.http, "example.com", "/").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "ok");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(proxy.service.stats().responses("http", 5), 0);
    server.abort();
}
