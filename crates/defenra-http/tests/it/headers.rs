//! Forwarding headers and hop-by-hop removal in both directions.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{Origin, Proxy, config, get, proxied_domain, send};

#[tokio::test]
async fn forwarding_headers_are_added_and_the_client_chain_kept() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let request = Request::builder()
        .uri("/")
        .header("host", "www.example.com:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "198.51.100.2, 192.0.2.1")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(proxy.http, request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.echoed("x-forwarded-for"),
        ["203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1"]
    );
    assert_eq!(reply.echoed("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(reply.echoed("x-forwarded-proto"), ["http"]);
    assert_eq!(reply.echoed("x-forwarded-host"), ["www.example.com:8080"]);
    assert_eq!(reply.echoed("host"), ["www.example.com:8080"]);
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped_and_repeated_ones_kept_in_order() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let request = Request::builder()
        .uri("/")
        .header("host", "example.com")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("x-multi", "three")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(proxy.http, request).await;
    assert_eq!(reply.status, 200);
    for name in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            reply.echoed(name).is_empty(),
            "{name} reached the origin: {}",
            reply.body
        );
    }
    assert_eq!(reply.echoed("x-multi"), ["one", "two", "three"]);
    // The origin connection is the proxy's own: HTTP/1.1 with keep-alive.
    assert_eq!(reply.header("x-echo-version"), "HTTP/1.1");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_stripped_and_repeated_ones_kept() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let reply = get(proxy.http, "example.com", "/hop").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.get("x-custom").is_none(),
        "{:?}",
        reply.headers
    );
    assert!(reply.headers.get("proxy-authenticate").is_none());
    assert!(reply.headers.get("keep-alive").is_none());
    let cookies: Vec<_> = reply.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(reply.body, "hop");
}
