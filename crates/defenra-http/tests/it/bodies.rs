//! Streaming bodies in both directions, and the request body limit.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::{Origin, PatternBody, Proxy, checksum, config, options, proxied_domain, send};

const TEN_MIB: usize = 10 * 1024 * 1024;

#[tokio::test]
async fn ten_mib_body_streams_to_the_origin_and_back_intact() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method("POST")
        .uri("/body")
        .header("host", "example.com")
        .body(PatternBody::new(TEN_MIB))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = checksum(response.into_body()).await;
    assert_eq!(received, PatternBody::expected(TEN_MIB));
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_without_contacting_the_origin() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.max_request_body = 1024;
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let request = Request::builder()
        .method("POST")
        .uri("/drain")
        .header("host", "example.com")
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    let reply = send(proxy.http, request).await;
    assert_eq!(reply.status, 413);

    let small = Request::builder()
        .method("POST")
        .uri("/drain")
        .header("host", "example.com")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    let reply = send(proxy.http, small).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "1000"));
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.max_request_body = 256 * 1024;
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    // PatternBody has no length: it goes chunked, and the limit applies while streaming.
    let request = Request::builder()
        .method("POST")
        .uri("/drain")
        .header("host", "example.com")
        .body(PatternBody::new(1024 * 1024))
        .unwrap();
    let reply = send(proxy.http, request).await;
    assert_eq!(reply.status, 413);
}
