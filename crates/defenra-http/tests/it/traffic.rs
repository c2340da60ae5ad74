//! Per-domain traffic counters and the client log, as the reports to Core read them.

use std::net::SocketAddr;

use defenra_http::HttpOptions;
use http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{Origin, Proxy, config, eventually, get, options, proxied_domain};

/// Sends `requests` on one plain connection from `source` (closing after the last) and
/// returns the bytes written and read, as the client counts them.
async fn raw_exchange(proxy: SocketAddr, source: &str, requests: &[String]) -> (u64, u64) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream: TcpStream = socket.connect(proxy).await.unwrap();
    let mut written = 0;
    for request in requests {
        stream.write_all(request.as_bytes()).await.unwrap();
        written += request.len() as u64;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    (written, response.len() as u64)
}

fn totals(proxy: &Proxy, domain: &str) -> defenra_http::TrafficTotals {
    proxy
        .service
        .traffic()
        .into_iter()
        .find(|(name, _)| name == domain)
        .map(|(_, totals)| totals)
        .unwrap_or_default()
}

#[tokio::test]
async fn each_domain_counts_its_requests_bytes_errors_and_origin_time() {
    let origin = Origin::start().await;
    let document = config(vec![
        proxied_domain("a.test"),
        proxied_domain("b.test"),
        json!({"domain": "dead.test", "httpProxy": {"type": "both"},
               "dnsRecords": [{"name": "@", "type": "A", "value": "127.0.0.1"}]}),
    ]);
    // dead.test's origin port is closed: every request is a 502.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy = Proxy::start(&document, origin.addr.port()).await;
    let dead = Proxy::start(&document, closed_port).await;

    let request = |host: &str, close: bool| {
        format!(
            "GET /x HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test/1{}\r\n\r\n",
            if close { "\r\nConnection: close" } else { "" }
        )
    };
    // Keep-alive across two domains on one connection: each gets its own exchange's bytes.
    let (a_written, a_read) = raw_exchange(
        proxy.http,
        "127.0.0.1",
        &[request("a.test", false), request("a.test", true)],
    )
    .await;
    let (b_written, b_read) =
        raw_exchange(proxy.http, "127.0.0.1", &[request("b.test", true)]).await;
    // Unknown hosts count for no domain.
    let unknown = get(proxy.http, "nope.test", "/").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let a = totals(&proxy, "a.test");
    let b = totals(&proxy, "b.test");
    assert_eq!((a.requests, b.requests), (2, 1));
    assert_eq!((a.received_bytes, a.sent_bytes), (a_written, a_read));
    assert_eq!((b.received_bytes, b.sent_bytes), (b_written, b_read));
    assert_eq!((a.errors, a.timed_responses), (0, 2));
    assert_eq!(
        proxy.service.traffic().len(),
        3,
        "one entry per configured domain"
    );

    let (_, _) = raw_exchange(dead.http, "127.0.0.1", &[request("dead.test", true)]).await;
    let dead_totals = totals(&dead, "dead.test");
    assert_eq!((dead_totals.requests, dead_totals.errors), (1, 1));

    // A reload keeps the counters of a domain that stays and drops those of one that went.
    proxy.reload(&config(vec![proxied_domain("a.test")]));
    assert_eq!(totals(&proxy, "a.test").requests, 2);
    assert!(
        proxy
            .service
            .traffic()
            .iter()
            .all(|(name, _)| name == "a.test")
    );
}

#[tokio::test]
async fn clients_are_queued_once_with_their_user_agent_when_recording() {
    let origin = Origin::start().await;
    let document = config(vec![proxied_domain("a.test")]);
    let proxy = Proxy::start_with(
        &document,
        HttpOptions {
            record_clients: true,
            ..options(origin.addr.port())
        },
    )
    .await;
    let request = |agent: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\nUser-Agent: {agent}\r\nConnection: close\r\n\r\n"
        )
    };
    raw_exchange(proxy.http, "127.0.0.2", &[request("first/1")]).await;
    raw_exchange(proxy.http, "127.0.0.2", &[request("second/2")]).await;
    raw_exchange(proxy.http, "127.0.0.3", &[request("other/3")]).await;
    // Requests for hosts without a route are no client of a served domain.
    raw_exchange(
        proxy.http,
        "127.0.0.4",
        &["GET / HTTP/1.1\r\nHost: nope.test\r\nConnection: close\r\n\r\n".to_owned()],
    )
    .await;
    eventually("three requests counted", || async {
        totals(&proxy, "a.test").requests == 3
    })
    .await;
    let clients = proxy.service.clients().drain(10);
    let seen: Vec<(String, Option<&str>)> = clients
        .iter()
        .map(|client| (client.ip.to_string(), client.user_agent.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("127.0.0.2".to_owned(), Some("first/1")),
            ("127.0.0.3".to_owned(), Some("other/3"))
        ]
    );

    // Off by default.
    let quiet = Proxy::start(&document, origin.addr.port()).await;
    raw_exchange(quiet.http, "127.0.0.2", &[request("first/1")]).await;
    assert!(quiet.service.clients().is_empty());
}
