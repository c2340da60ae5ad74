//! Slow and abusive clients: header timeout, header size, idle close, cancelled requests.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Origin, Proxy, config, eventually, options, proxied_domain, read_head};

/// Reads until the peer closes; returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    read.await.is_ok()
}

#[tokio::test]
async fn slowloris_head_is_cut_after_the_header_timeout() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: exa")
        .await
        .unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
}

#[tokio::test]
async fn silent_client_and_stalled_h2c_preface_are_cut_after_the_header_timeout() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut silent = TcpStream::connect(proxy.http).await.unwrap();
    let mut stalled = TcpStream::connect(proxy.http).await.unwrap();
    // The first bytes of the HTTP/2 preface, then nothing: still undecided, never served.
    stalled.write_all(b"PRI * HTTP/2").await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(closed_within(&mut stalled, Duration::from_secs(3)).await);
    // The listener still serves.
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET /after HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn oversized_head_is_431() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.max_header_bytes = 16 * 1024;
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    let big = "a".repeat(40 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: {big}\r\n\r\n");
    // The proxy may answer and close before it has read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.keepalive_timeout = Duration::from_millis(200);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
    eventually("no open connection", || async {
        proxy.service.stats().connections_active() == 0
    })
    .await;
}

#[tokio::test]
async fn client_that_disconnects_cancels_the_origin_request() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let open = &origin.open_connections;
    eventually("the origin request", || async {
        open.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(stream);
    eventually("the origin connection to close", || async {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn connection_limit_holds_extra_clients_until_one_leaves() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.max_connections = 1;
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut first = TcpStream::connect(proxy.http).await.unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut first).await.starts_with("HTTP/1.1 200"));

    let mut second = TcpStream::connect(proxy.http).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte)).await;
    assert!(
        waited.is_err(),
        "second client was served while the first was open"
    );
    drop(first);
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut second))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn origin_connection_cap_makes_extra_requests_wait() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.origin_max_connections = 1;
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.http).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: example.com\r\n\r\n")
            .await
            .unwrap();
        clients.push(stream);
    }
    let open = &origin.open_connections;
    eventually("the first origin request", || async {
        open.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        open.load(Ordering::SeqCst),
        1,
        "the cap let a second request through"
    );
}
