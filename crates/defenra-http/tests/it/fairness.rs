//! Origin slots and clients that do not progress (issue 17 finding 2): a slow upload, a
//! body that never comes, a client that stops reading or an idle tunnel costs its own
//! client, not every client of the origin.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use hyper::body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    Origin, Proxy, collect, config, connect_from, http2_over, options, proxied_domain, read_head,
};

/// A proxy whose origin takes `slots` exchanges at once, with short timeouts.
async fn proxy_with_slots(origin: &Origin, slots: usize) -> Proxy {
    let mut options = options(origin.addr.port());
    options.origin_max_connections = slots;
    options.origin_timeout = Duration::from_secs(3);
    Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await
}

/// A GET from another client address (127.0.0.2) must be answered within a second.
async fn another_client_is_served_at_once(proxy: &Proxy) {
    let started = Instant::now();
    let mut stream = connect_from("127.0.0.2", proxy.http).await.unwrap();
    stream
        .write_all(b"GET /other HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream))
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "another client waited {:?} for an origin slot",
        started.elapsed()
    );
}

#[tokio::test]
async fn slow_uploads_take_no_origin_slot() {
    let origin = Origin::start().await;
    let proxy = proxy_with_slots(&origin, 2).await;
    // Five uploads that sent one byte of their body, from five connections.
    let mut uploads = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(proxy.http).await.unwrap();
        stream
            .write_all(
                b"POST /drain HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100000\r\n\r\nx",
            )
            .await
            .unwrap();
        uploads.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    another_client_is_served_at_once(&proxy).await;
}

#[tokio::test]
async fn one_client_address_cannot_take_every_origin_slot() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.origin_max_connections = 4;
    options.origin_max_connections_per_client = 2;
    options.origin_timeout = Duration::from_secs(3);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    // One address asks for four slow answers: two run, two wait for that address's slots.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from("127.0.0.1", proxy.http).await.unwrap();
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: example.com\r\n\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        origin
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one address held more than its share"
    );
    another_client_is_served_at_once(&proxy).await;
}

#[tokio::test]
async fn clients_that_stop_reading_hold_only_their_own_slots() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.origin_max_connections = 4;
    options.origin_max_connections_per_client = 2;
    options.origin_timeout = Duration::from_secs(3);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    // Four downloads of 64 MiB that are never read.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from("127.0.0.1", proxy.http).await.unwrap();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: example.com\r\n\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    another_client_is_served_at_once(&proxy).await;
}

/// A request body that never sends a byte.
struct NeverBody;

impl Body for NeverBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn http2_streams_whose_bodies_never_come_take_no_origin_slot() {
    let origin = Origin::start().await;
    let proxy = proxy_with_slots(&origin, 2).await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let mut sender = http2_over::<_, NeverBody>(stream).await;
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let request = Request::builder()
            .method("POST")
            .uri("http://example.com/drain")
            .body(NeverBody)
            .unwrap();
        sender.ready().await.unwrap();
        waiting.push(tokio::spawn(sender.send_request(request)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    another_client_is_served_at_once(&proxy).await;
    // Each of them ends with 408 once nothing came for the origin timeout.
    let reply = tokio::time::timeout(Duration::from_secs(10), waiting.remove(0))
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(collect(reply).await.status, 408);
}

#[tokio::test]
async fn idle_websocket_tunnels_hold_no_origin_slot_and_time_out() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.origin_max_connections = 1;
    options.origin_timeout = Duration::from_secs(3);
    options.tunnel_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let mut tunnel = TcpStream::connect(proxy.http).await.unwrap();
    tunnel
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut tunnel).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A tunnel in use stays open past the idle timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tunnel.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tunnel.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
    }
    // The tunnel holds no origin slot: the origin's only slot serves another client.
    another_client_is_served_at_once(&proxy).await;
    // Idle, it is closed.
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut byte))
        .await
        .expect("the idle tunnel is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
}
