//! Anti-DDoS through the real proxy: clients from several 127.x addresses against domains
//! with `httpProxy.antiDDoS`, the shield on a manual clock.

use std::sync::Arc;
use std::time::Duration;

use defenra_shield::{Clock, ManualClock, Shield, ShieldOptions};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    Origin, Proxy, TLS_ALL, TestCert, TrickleBody, config, connect_from, http1_over, http2_over,
    options, request, send_from, tls_connect,
};

/// `shop.test` proxied to the origin, with `anti_ddos` as its settings.
fn protected(anti_ddos: Value) -> Value {
    let cert = TestCert::new(&["shop.test"]);
    config(vec![json!({
        "domain": "shop.test",
        "httpProxy": { "enabled": true, "type": "both", "antiDDoS": anti_ddos },
        "ssl": cert.ssl(),
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
        ],
    })])
}

fn limit(max_requests: u32) -> Value {
    json!({ "enabled": true, "rateLimit": { "windowSeconds": 10, "maxRequests": max_requests },
            "blockDurationSeconds": 60 })
}

async fn start(anti_ddos: Value, shield_options: ShieldOptions) -> (Proxy, Origin, ManualClock) {
    let origin = Origin::start().await;
    let (clock, manual) = Clock::manual();
    let shield = Arc::new(Shield::new(ShieldOptions {
        clock,
        ..shield_options
    }));
    let proxy =
        Proxy::start_shielded(&protected(anti_ddos), options(origin.addr.port()), shield).await;
    (proxy, origin, manual)
}

/// The status of one GET of `shop.test/` from `source`; 0 when the connection was closed.
async fn status_from(proxy: &Proxy, source: &str) -> u16 {
    send_from(source, proxy.http, request("shop.test", "/"))
        .await
        .map_or(0, |reply| reply.status.as_u16())
}

#[tokio::test]
async fn request_over_the_limit_is_refused_during_the_block_and_allowed_after_it() {
    let (proxy, _origin, clock) = start(limit(3), ShieldOptions::default()).await;
    for _ in 0..3 {
        let reply = send_from("127.0.0.2", proxy.http, request("shop.test", "/"))
            .await
            .expect("answered");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.echoed("x-real-ip"), ["127.0.0.2"]);
    }
    let refused = send_from("127.0.0.2", proxy.http, request("shop.test", "/"))
        .await
        .expect("answered");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("retry-after"), "60");
    assert!(
        refused.echoed("x-real-ip").is_empty(),
        "the origin answered"
    );
    clock.advance(Duration::from_secs(30));
    let refused = send_from("127.0.0.2", proxy.http, request("shop.test", "/"))
        .await
        .expect("answered");
    assert_eq!(
        refused.header("retry-after"),
        "30",
        "refusals do not restart it"
    );
    // Another address is counted apart.
    assert_eq!(status_from(&proxy, "127.0.0.3").await, 200);
    clock.advance(Duration::from_secs(31));
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 200, "block over");
    let stats = proxy.service.shield().stats();
    assert_eq!((stats.blocks, stats.requests_limited), (1, 2));
}

#[tokio::test]
async fn http_https_and_http2_requests_are_counted_together() {
    let (proxy, _origin, _clock) = start(limit(3), ShieldOptions::default()).await;
    // One over HTTP/1.1, one over HTTPS, one over h2c: the fourth anywhere is refused.
    assert_eq!(status_from(&proxy, "127.0.0.1").await, 200);
    let tls = tls_connect(proxy.https, "shop.test", &[b"http/1.1"], TLS_ALL)
        .await
        .expect("handshake");
    let mut https = http1_over(tls).await;
    let reply = https.send_request(request("shop.test", "/")).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let stream = connect_from("127.0.0.1", proxy.http).await.unwrap();
    let mut h2 = http2_over::<_, Full<bytes::Bytes>>(stream).await;
    let h2_request = || {
        Request::builder()
            .uri("http://shop.test/")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let reply = h2.send_request(h2_request()).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let reply = https.send_request(request("shop.test", "/")).await.unwrap();
    assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
    let reply = h2.send_request(h2_request()).await.unwrap();
    assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(reply.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn a_second_block_bans_the_address_and_its_connections_are_closed_at_accept() {
    let (proxy, _origin, clock) = start(limit(1), ShieldOptions::default()).await;
    for round in 0..2 {
        assert_eq!(status_from(&proxy, "127.0.0.7").await, 200, "round {round}");
        assert_eq!(status_from(&proxy, "127.0.0.7").await, 429, "round {round}");
        clock.advance(Duration::from_secs(61));
    }
    let shield = proxy.service.shield();
    assert!(shield.is_banned("127.0.0.7".parse().unwrap()));
    // Accepted by the kernel, closed by the agent before a byte is read or written.
    let mut stream = connect_from("127.0.0.7", proxy.http).await.unwrap();
    let _ = stream
        .write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        tls_connect(proxy.https, "shop.test", &[b"http/1.1"], TLS_ALL)
            .await
            .is_ok(),
        "127.0.0.1 is not banned"
    );
    assert_eq!(shield.stats().connections_refused_banned, 1);
    // The first ban lasts ten minutes.
    clock.advance(Duration::from_secs(601));
    assert_eq!(status_from(&proxy, "127.0.0.7").await, 200);
}

#[tokio::test]
async fn whitelisted_addresses_and_prefixes_are_never_limited() {
    let mut settings = limit(1);
    settings["ipWhitelist"] = json!(["127.0.0.4", "127.0.5.0/24"]);
    let (proxy, _origin, _clock) = start(settings, ShieldOptions::default()).await;
    for source in ["127.0.0.4", "127.0.5.9"] {
        for _ in 0..5 {
            assert_eq!(status_from(&proxy, source).await, 200, "{source}");
        }
    }
    assert_eq!(status_from(&proxy, "127.0.6.9").await, 200);
    assert_eq!(status_from(&proxy, "127.0.6.9").await, 429);
}

#[tokio::test]
async fn proxy_ip_headers_name_the_client_for_limits_and_the_origin() {
    let mut settings = limit(2);
    settings["proxyIpHeaders"] = json!(["CF-Connecting-IP"]);
    let (proxy, _origin, _clock) = start(settings.clone(), ShieldOptions::default()).await;
    let from = |client: &str| {
        Request::builder()
            .uri("/")
            .header("host", "shop.test")
            .header("cf-connecting-ip", client)
            .header("x-forwarded-for", "10.9.9.9")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let reply = send_from("127.0.0.2", proxy.http, from("203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.echoed("x-real-ip"), ["203.0.113.7"]);
    assert_eq!(reply.echoed("x-forwarded-for"), ["10.9.9.9, 203.0.113.7"]);
    send_from("127.0.0.2", proxy.http, from("203.0.113.7"))
        .await
        .unwrap();
    let reply = send_from("127.0.0.2", proxy.http, from("203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "limited by the header"
    );
    let reply = send_from("127.0.0.2", proxy.http, from("203.0.113.8"))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "same peer, another client");
    // A header the domain does not list is never believed.
    let unlisted = Request::builder()
        .uri("/")
        .header("host", "shop.test")
        .header("x-real-ip", "198.51.100.1")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = send_from("127.0.0.3", proxy.http, unlisted).await.unwrap();
    assert_eq!(reply.echoed("x-real-ip"), ["127.0.0.3"]);

    // With --trusted-proxies, only those peers' headers count.
    let (proxy, _origin, _clock) = start(
        settings,
        ShieldOptions {
            trusted_proxies: vec!["127.0.0.10/32".parse().unwrap()],
            ..ShieldOptions::default()
        },
    )
    .await;
    let reply = send_from("127.0.0.2", proxy.http, from("203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(reply.echoed("x-real-ip"), ["127.0.0.2"], "untrusted peer");
    let reply = send_from("127.0.0.10", proxy.http, from("203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(reply.echoed("x-real-ip"), ["203.0.113.7"], "trusted peer");
}

#[tokio::test]
async fn the_connection_cap_closes_the_next_connection_before_tls() {
    let settings = json!({ "enabled": true, "slowloris": { "maxConnections": 2 } });
    let (proxy, _origin, _clock) = start(settings, ShieldOptions::default()).await;
    let first = tls_connect(proxy.https, "shop.test", &[b"http/1.1"], TLS_ALL)
        .await
        .expect("first");
    let _second = connect_from("127.0.0.1", proxy.http).await.unwrap();
    let shield = Arc::clone(proxy.service.shield());
    let ip = "127.0.0.1".parse().unwrap();
    crate::support::eventually("two connections counted", || {
        let shield = Arc::clone(&shield);
        async move { shield.connections_of(ip) == 2 }
    })
    .await;
    assert!(
        tls_connect(proxy.https, "shop.test", &[b"http/1.1"], TLS_ALL)
            .await
            .is_err(),
        "third connection served"
    );
    assert_eq!(shield.stats().connections_refused_cap, 1);
    let handshake_failures = proxy.service.stats().tls_handshake_failures();
    assert_eq!(handshake_failures, 0, "closed before any TLS work");
    // Another address is not affected, and a closed connection frees a slot.
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 200);
    drop(first);
    crate::support::eventually("a slot freed", || {
        let shield = Arc::clone(&shield);
        async move { shield.connections_of(ip) == 1 }
    })
    .await;
    assert!(
        tls_connect(proxy.https, "shop.test", &[b"http/1.1"], TLS_ALL)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_header_timeout_comes_from_the_config() {
    let settings = json!({ "enabled": true, "slowloris": { "maxHeaderTimeoutSeconds": 1 } });
    let (proxy, _origin, _clock) = start(settings, ShieldOptions::default()).await;
    let mut stream = connect_from("127.0.0.2", proxy.http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("closed within 10 s");
    let waited = started.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}, the options say 30 s and the config 1 s"
    );
}

#[tokio::test]
async fn a_reload_keeps_blocks_and_applies_a_new_policy_to_the_next_request() {
    let (proxy, _origin, _clock) = start(limit(1), ShieldOptions::default()).await;
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 200);
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 429);
    proxy.reload(&protected(limit(1)));
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 429, "block kept");
    assert_eq!(status_from(&proxy, "127.0.0.3").await, 200);
    // Anti-DDoS switched off: the next request goes through.
    proxy.reload(&protected(json!({ "enabled": false })));
    assert_eq!(status_from(&proxy, "127.0.0.2").await, 200);
    assert_eq!(status_from(&proxy, "127.0.0.3").await, 200);
}

/// A POST of `total` bytes to `/drain` sent `piece` bytes every `gap`, over HTTP/1.1 from
/// 127.0.0.2; returns the status line's code (0 when closed without an answer) and how
/// long it took.
async fn trickle(proxy: &Proxy, total: usize, piece: usize, gap: Duration) -> (u16, Duration) {
    let started = std::time::Instant::now();
    let mut stream = connect_from("127.0.0.2", proxy.http).await.unwrap();
    let head =
        format!("POST /drain HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {total}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let n = piece.min(total - sent);
            if write.write_all(&vec![b'x'; n]).await.is_err() {
                return;
            }
            sent += n;
            tokio::time::sleep(gap).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), read.read_to_end(&mut answer)).await;
    writer.abort();
    let status = std::str::from_utf8(&answer)
        .ok()
        .and_then(|text| text.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, started.elapsed())
}

#[tokio::test]
async fn a_body_slower_than_min_content_length_per_header_timeout_gets_408() {
    let settings = json!({ "enabled": true,
        "slowloris": { "minContentLength": 100, "maxHeaderTimeoutSeconds": 1 } });
    let (proxy, _origin, _clock) = start(settings, ShieldOptions::default()).await;
    // 20 bytes every 300 ms: about 67 bytes a second, under 100.
    let (status, took) = trickle(&proxy, 1000, 20, Duration::from_millis(300)).await;
    assert_eq!(status, 408, "after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(proxy.service.shield().stats().slow_bodies, 1);
    // 100 bytes every 300 ms passes, though the whole body takes 3 s.
    let (status, took) = trickle(&proxy, 1000, 100, Duration::from_millis(300)).await;
    assert_eq!(status, 200, "after {took:?}");
}

fn settings_off() -> Value {
    json!({ "enabled": false, "slowloris": { "minContentLength": 100, "maxHeaderTimeoutSeconds": 1 } })
}

#[tokio::test]
async fn the_slow_body_rule_applies_to_http2_streams_and_only_to_protected_domains() {
    let settings = json!({ "enabled": true,
        "slowloris": { "minContentLength": 100, "maxHeaderTimeoutSeconds": 1 } });
    let (proxy, _origin, _clock) = start(settings, ShieldOptions::default()).await;
    let stream = connect_from("127.0.0.1", proxy.http).await.unwrap();
    let mut h2 = http2_over::<_, TrickleBody>(stream).await;
    // 20 bytes every 300 ms.
    let request = Request::builder()
        .method("POST")
        .uri("http://shop.test/drain")
        .body(TrickleBody::new(50, 20, Duration::from_millis(300)))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), h2.send_request(request))
        .await
        .expect("answered in time")
        .expect("a response");
    assert_eq!(reply.status(), StatusCode::REQUEST_TIMEOUT);
    let request = Request::builder()
        .method("POST")
        .uri("http://shop.test/drain")
        .body(TrickleBody::new(10, 100, Duration::from_millis(300)))
        .unwrap();
    let reply = h2.send_request(request).await.expect("a response");
    assert_eq!(reply.status(), StatusCode::OK, "fast enough");

    // Unprotected: the same slow body is passed on.
    let (proxy, _origin, _clock) = start(settings_off(), ShieldOptions::default()).await;
    let (status, took) = trickle(&proxy, 200, 20, Duration::from_millis(300)).await;
    assert_eq!(status, 200, "after {took:?}");
}

#[tokio::test]
async fn the_waf_and_the_access_log_see_the_resolved_client_address() {
    let origin = Origin::start().await;
    let document = config(vec![json!({
        "domain": "shop.test",
        "httpProxy": { "enabled": true, "type": "both", "antiDDoS": {
            "enabled": true, "proxyIpHeaders": ["X-Client-IP"] } },
        "luaCode": "ngx.header['X-Seen-As'] = ngx.var.remote_addr",
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
        ],
    })]);
    let (captured, _guard) = crate::access::capture();
    let proxy = Proxy::start_with(
        &document,
        defenra_http::HttpOptions {
            access_log: true,
            ..options(origin.addr.port())
        },
    )
    .await;
    let request = Request::builder()
        .uri("/")
        .header("host", "shop.test")
        .header("x-client-ip", "198.51.100.23")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = send_from("127.0.0.2", proxy.http, request).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-seen-as"), "198.51.100.23");
    let reply = send_from("127.0.0.2", proxy.http, request_plain())
        .await
        .unwrap();
    assert_eq!(
        reply.header("x-seen-as"),
        "127.0.0.2",
        "no header: the peer"
    );
    crate::support::eventually("two access lines", || {
        let count = captured.lines().len();
        async move { count == 2 }
    })
    .await;
    let lines = captured.lines();
    assert!(lines[0].contains("client=198.51.100.23"), "{}", lines[0]);
    assert!(lines[1].contains("client=127.0.0.2"), "{}", lines[1]);
}

fn request_plain() -> Request<Full<bytes::Bytes>> {
    request("shop.test", "/")
}
