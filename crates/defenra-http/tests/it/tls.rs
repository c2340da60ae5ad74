//! SNI certificate choice, protocol versions and certificate swaps by reload.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Origin, Proxy, TLS_ALL, TestCert, collect, config, eventually, http1_over, proxied_domain,
    served_cert, tls_connect,
};

fn tls_domain(name: &str, cert: &TestCert) -> serde_json::Value {
    let mut domain = proxied_domain(name);
    domain["dnsRecords"].as_array_mut().unwrap().push(
        json!({ "name": "*.apps", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true }),
    );
    domain["ssl"] = cert.ssl();
    domain
}

fn get_request(host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn sni_picks_the_domain_certificate_by_exact_then_wildcard_name() {
    let origin = Origin::start().await;
    let first = TestCert::new(&["example.com"]);
    let second = TestCert::new(&["example.net"]);
    let proxy = Proxy::start(
        &config(vec![
            tls_domain("example.com", &first),
            tls_domain("example.net", &second),
        ]),
        origin.addr.port(),
    )
    .await;

    let stream = tls_connect(proxy.https, "www.example.com", &[b"http/1.1"], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(served_cert(&stream), first.der);
    let stream = tls_connect(proxy.https, "example.net", &[], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(served_cert(&stream), second.der);
    let stream = tls_connect(proxy.https, "x.apps.example.net", &[], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(
        served_cert(&stream),
        second.der,
        "wildcard *.apps.example.net"
    );

    let mut sender = http1_over(stream).await;
    let reply = collect(
        sender
            .send_request(get_request("x.apps.example.net"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.echoed("x-forwarded-proto"), ["https"]);
}

#[tokio::test]
async fn unknown_sni_and_domains_without_certificate_are_refused() {
    let origin = Origin::start().await;
    let cert = TestCert::new(&["example.com"]);
    let proxy = Proxy::start(
        &config(vec![
            tls_domain("example.com", &cert),
            proxied_domain("plain.org"),
        ]),
        origin.addr.port(),
    )
    .await;
    assert!(
        tls_connect(proxy.https, "unknown.org", &[], TLS_ALL)
            .await
            .is_err()
    );
    assert!(
        tls_connect(proxy.https, "plain.org", &[], TLS_ALL)
            .await
            .is_err()
    );
    assert!(proxy.service.stats().tls_handshake_failures() >= 2);
}

#[tokio::test]
async fn tls12_is_accepted_and_tls11_refused() {
    let origin = Origin::start().await;
    let cert = TestCert::new(&["example.com"]);
    let proxy = Proxy::start(
        &config(vec![tls_domain("example.com", &cert)]),
        origin.addr.port(),
    )
    .await;

    let stream = tls_connect(proxy.https, "example.com", &[], &[&rustls::version::TLS12])
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    // rustls cannot speak TLS 1.1, so send a TLS 1.1 ClientHello by hand.
    let mut stream = TcpStream::connect(proxy.https).await.unwrap();
    stream
        .write_all(&tls11_client_hello("example.com"))
        .await
        .unwrap();
    let mut reply = [0u8; 5];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut reply))
        .await
        .unwrap()
        .unwrap_or(0);
    // Either an alert record (21) or a closed connection, never a ServerHello (22).
    assert!(read == 0 || reply[0] == 21, "got {:?}", &reply[..read]);
}

#[tokio::test]
async fn certificate_swap_by_reload_keeps_open_connections() {
    let origin = Origin::start().await;
    let old = TestCert::new(&["example.com"]);
    let new = TestCert::new(&["example.com"]);
    let proxy = Proxy::start(
        &config(vec![tls_domain("example.com", &old)]),
        origin.addr.port(),
    )
    .await;

    let stream = tls_connect(proxy.https, "example.com", &[b"http/1.1"], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(served_cert(&stream), old.der);
    let mut sender = http1_over(stream).await;
    let reply = collect(
        sender
            .send_request(get_request("example.com"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);

    proxy.reload(&config(vec![tls_domain("example.com", &new)]));

    // The open connection goes on with its session...
    let reply = collect(
        sender
            .send_request(get_request("example.com"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    // ...and new handshakes get the new certificate.
    let https = proxy.https;
    let expected = new.der.clone();
    eventually("the new certificate", || {
        let expected = expected.clone();
        async move {
            let stream = tls_connect(https, "example.com", &[], TLS_ALL)
                .await
                .unwrap();
            served_cert(&stream) == expected
        }
    })
    .await;
}

#[tokio::test]
async fn https_origins_full_skips_verification_and_full_strict_verifies() {
    let origin = Origin::start_tls().await;
    let mut full = proxied_domain("example.com");
    full["ssl"] = json!({ "encryptionMode": "full" });
    let mut strict = proxied_domain("example.org");
    strict["ssl"] = json!({ "encryptionMode": "full_strict" });
    let proxy = Proxy::start(&config(vec![full, strict]), origin.addr.port()).await;

    let reply = crate::support::get(proxy.http, "www.example.com", "/tls").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echoed("host"), ["www.example.com"]);
    // The origin's self-signed certificate is not trusted for example.org.
    let reply = crate::support::get(proxy.http, "example.org", "/tls").await;
    assert_eq!(reply.status, 502);
}

/// A minimal TLS 1.1 ClientHello (RFC 4346 §7.4.1.2) with SNI and two CBC suites.
fn tls11_client_hello(server_name: &str) -> Vec<u8> {
    let name = server_name.as_bytes();
    let mut server_name_list = Vec::new();
    server_name_list.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    server_name_list.push(0); // host_name
    server_name_list.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name_list.extend_from_slice(name);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend_from_slice(&(server_name_list.len() as u16).to_be_bytes());
    extensions.extend_from_slice(&server_name_list);

    let mut hello = vec![3, 2]; // TLS 1.1
    hello.extend_from_slice(&[7; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0, 4, 0xc0, 0x13, 0x00, 0x2f]);
    hello.extend_from_slice(&[1, 0]); // null compression
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(&extensions);

    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![22, 3, 2];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_client_offering_only_unknown_alpn_protocols_gets_http11() {
    // Issue 17 finding 12: rustls answered with a fatal no_application_protocol alert;
    // nginx carries on without ALPN and speaks HTTP/1.1.
    let origin = Origin::start().await;
    let cert = TestCert::new(&["example.com"]);
    let proxy = Proxy::start(
        &config(vec![tls_domain("example.com", &cert)]),
        origin.addr.port(),
    )
    .await;
    let stream = tls_connect(
        proxy.https,
        "example.com",
        &[b"spdy/3", b"acme-tls/1"],
        TLS_ALL,
    )
    .await
    .expect("handshake without a common ALPN protocol");
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let mut sender = http1_over(stream).await;
    let reply = collect(
        sender
            .send_request(get_request("example.com"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    // Clients that offer ours still get them.
    let stream = tls_connect(proxy.https, "example.com", &[b"spdy/3", b"h2"], TLS_ALL)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
}
