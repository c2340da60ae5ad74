//! HTTP/2 (ALPN and prior knowledge) and upgraded (WebSocket) tunnels.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Origin, Proxy, TLS_ALL, TestCert, TrickleBody, collect, config, http2_over, proxied_domain,
    read_head, tls_connect,
};

fn h2_request(uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn http2_over_tls_reaches_an_http1_origin_with_host_set() {
    let origin = Origin::start().await;
    let cert = TestCert::new(&["example.com", "www.example.com"]);
    let mut domain = proxied_domain("example.com");
    domain["ssl"] = cert.ssl();
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;

    let stream = tls_connect(proxy.https, "www.example.com", &[b"h2"], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = http2_over(stream).await;
    for path in ["/one", "/two"] {
        let uri = format!("https://www.example.com{path}");
        let reply = collect(sender.send_request(h2_request(&uri)).await.unwrap()).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-echo-path"), path);
        assert_eq!(reply.header("x-echo-version"), "HTTP/1.1");
        assert_eq!(reply.echoed("host"), ["www.example.com"]);
        assert_eq!(reply.echoed("x-forwarded-proto"), ["https"]);
        assert_eq!(reply.echoed("cookie"), ["a=1; b=2"]);
    }
}

#[tokio::test]
async fn http2_prior_knowledge_works_on_plain_http() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let mut sender = http2_over(stream).await;
    let reply = collect(
        sender
            .send_request(h2_request("http://example.com/h2c"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-echo-path"), "/h2c");
}

#[tokio::test]
async fn a_slow_steady_http2_upload_is_not_cut_off_by_the_origin_timeout() {
    let origin = Origin::start().await;
    let mut options = crate::support::options(origin.addr.port());
    options.origin_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let mut sender = http2_over(stream).await;
    // Ten 1 KiB pieces 200 ms apart: two seconds in all, never 500 ms without a byte.
    let request = Request::builder()
        .method("POST")
        .uri("http://example.com/drain")
        .body(TrickleBody::new(10, 1024, Duration::from_millis(200)))
        .unwrap();
    let reply = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "10240");
}

#[tokio::test]
async fn websocket_upgrade_is_tunneled_both_ways() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");

    // A masked text frame "hello" (RFC 6455 §5.2), echoed byte for byte by the origin.
    let frame = [
        0x81,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..3 {
        stream.write_all(&frame).await.unwrap();
        let mut echoed = [0u8; 11];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, frame);
    }
}

#[tokio::test]
async fn http2_refuses_an_encoded_nul_in_the_path() {
    // Issue 17 finding 7: the same rule as HTTP/1.1.
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let mut sender = http2_over(stream).await;
    let reply = collect(
        sender
            .send_request(h2_request("http://example.com/admin%00"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(origin.accepted_connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn http2_without_authority_and_with_two_hosts_is_400() {
    // Issue 17 finding 12: HTTP/1.1 answers 400 to two Host fields, so does HTTP/2.
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let mut sender = http2_over(stream).await;
    let two_hosts = Request::builder()
        .uri("/x")
        .header("host", "example.com")
        .header("host", "other.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = collect(sender.send_request(two_hosts).await.unwrap()).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    let one_host = Request::builder()
        .uri("/x")
        .header("host", "example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = collect(sender.send_request(one_host).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(origin.accepted_connections.load(Ordering::SeqCst), 1);
}
