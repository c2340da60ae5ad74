//! DNS over TCP under abuse: answers flushed while a next query is partial, one deadline per
//! message, eviction of the oldest idle connection, per-address and per-connection caps.

use std::net::SocketAddr;
use std::time::Duration;

use defenra_dns::DnsOptions;
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{TestServer, ZONE, eventually, query, read_tcp_message};

/// A length-prefixed query for `name A` with `id`.
fn framed(name: &str, id: u16) -> Vec<u8> {
    let mut message = query(name, RecordType::A);
    message.metadata.id = id;
    let bytes = message.to_vec().unwrap();
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&bytes);
    out
}

/// A TCP connection to `server` from the source address `source` (any 127.x).
pub(crate) async fn connect_from(server: SocketAddr, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(server).await.unwrap()
}

/// Whether the server closed `stream` (EOF or reset) within 3 s without sending anything.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
        Err(_) | Ok(Ok(1..)) => false,
        Ok(Ok(0) | Err(_)) => true,
    }
}

/// One query and its answer on an open connection.
async fn ask(stream: &mut TcpStream, id: u16) {
    stream
        .write_all(&framed("www.example.com.", id))
        .await
        .unwrap();
    let response = read_tcp_message(stream).await;
    assert_eq!(response.metadata.id, id);
    assert_eq!(response.answers.len(), 2);
}

#[tokio::test]
async fn an_answer_is_sent_while_the_next_query_is_still_partial() {
    // RFC 7766 §6.2.1.1: a response goes out as soon as it is ready; before the fix it
    // waited in the write buffer until the next query completed or the idle timeout.
    let server = TestServer::start(ZONE).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = framed("www.example.com.", 1);
    let second = framed("mail.example.com.", 2);
    bytes.extend_from_slice(&second[..5]);
    stream.write_all(&bytes).await.unwrap();
    let first = read_tcp_message(&mut stream).await;
    assert_eq!(first.metadata.id, 1);
    // The rest of the second query completes it.
    stream.write_all(&second[5..]).await.unwrap();
    assert_eq!(read_tcp_message(&mut stream).await.metadata.id, 2);
}

#[tokio::test]
async fn a_query_trickled_past_its_deadline_is_not_answered() {
    // One deadline for the whole message, counted from when the connection started
    // waiting for it; before the fix each read got a fresh idle timeout, so a client
    // could hold a connection for twice the timeout per message (or longer, byte by byte).
    let options = DnsOptions {
        tcp_idle_timeout: Duration::from_millis(1000),
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let bytes = framed("www.example.com.", 7);
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream.write_all(&bytes[..2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Past the deadline (1.3 s after the connection opened): the server has closed, and the
    // write may or may not fail depending on timing.
    let _ = stream.write_all(&bytes[2..]).await;
    let mut buf = [0u8; 2];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "answered a query that missed its deadline"
    );
    let stats = server.service.stats();
    assert!(eventually(|| stats.tcp_timeouts() == 1).await);
}

#[tokio::test]
async fn a_slow_but_timely_client_is_answered_on_every_query() {
    // The deadline restarts with each message: a client that sends each query well within
    // the timeout keeps its connection.
    let options = DnsOptions {
        tcp_idle_timeout: Duration::from_millis(800),
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for id in 1..=3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        ask(&mut stream, id).await;
    }
}

#[tokio::test]
async fn when_full_the_oldest_idle_connection_makes_room() {
    let options = DnsOptions {
        tcp_max_connections: 2,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    let mut oldest = TcpStream::connect(server.addr).await.unwrap();
    ask(&mut oldest, 1).await;
    let mut newer = TcpStream::connect(server.addr).await.unwrap();
    ask(&mut newer, 2).await;
    // Both are idle now; a third connection takes the oldest one's place.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    ask(&mut third, 3).await;
    assert!(
        closed_by_server(&mut oldest).await,
        "the oldest idle one is closed"
    );
    ask(&mut newer, 4).await;
    let stats = server.service.stats();
    assert_eq!(stats.tcp_evicted(), 1);
    assert_eq!(stats.tcp_rejected(), 0);
}

#[tokio::test]
async fn when_full_of_busy_connections_the_new_one_is_closed() {
    let options = DnsOptions {
        tcp_max_connections: 2,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    // Two connections in the middle of a message: neither is idle.
    let mut busy = Vec::new();
    for id in 1..=2 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(&framed("www.example.com.", id)[..3])
            .await
            .unwrap();
        busy.push(stream);
    }
    let stats = server.service.stats();
    assert!(eventually(|| stats.tcp_active() == 2 && stats.tcp_idle() == 0).await);
    let mut refused = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_server(&mut refused).await);
    assert_eq!(stats.tcp_rejected(), 1);
    // The busy ones finish their queries.
    for (index, stream) in busy.iter_mut().enumerate() {
        let id = index as u16 + 1;
        stream
            .write_all(&framed("www.example.com.", id)[3..])
            .await
            .unwrap();
        assert_eq!(read_tcp_message(stream).await.metadata.id, id);
    }
}

#[tokio::test]
async fn each_address_gets_at_most_its_share_of_connections() {
    let options = DnsOptions {
        tcp_max_connections_per_ip: 2,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    let mut kept = Vec::new();
    for id in 1..=2 {
        let mut stream = connect_from(server.addr, "127.0.0.3").await;
        ask(&mut stream, id).await;
        kept.push(stream);
    }
    let mut third = connect_from(server.addr, "127.0.0.3").await;
    assert!(closed_by_server(&mut third).await);
    let stats = server.service.stats();
    assert_eq!(stats.tcp_rejected_per_ip(), 1);
    // Another address is not affected, and the first two still work.
    let mut other = connect_from(server.addr, "127.0.0.4").await;
    ask(&mut other, 9).await;
    for stream in &mut kept {
        ask(stream, 10).await;
    }
    // A closed connection frees its place.
    drop(kept.pop());
    assert!(eventually(|| stats.tcp_active() == 2).await);
    let mut again = connect_from(server.addr, "127.0.0.3").await;
    ask(&mut again, 11).await;
}

#[tokio::test]
async fn a_connection_is_closed_after_its_query_budget() {
    let options = DnsOptions {
        tcp_max_queries: 3,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(ZONE, None, options).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut batch = Vec::new();
    for id in 1..=5 {
        batch.extend_from_slice(&framed("www.example.com.", id));
    }
    stream.write_all(&batch).await.unwrap();
    for id in 1..=3 {
        assert_eq!(read_tcp_message(&mut stream).await.metadata.id, id);
    }
    assert!(closed_by_server(&mut stream).await, "no fourth answer");
}

/// The fuzz targets' entry point runs the same connection loop: pipelined queries cut at
/// every byte are answered in order, one framed response each, and a zero length ends the
/// connection (what follows it is never answered).
#[tokio::test]
async fn the_fuzzing_stream_entry_answers_like_a_connection() {
    let service = defenra_dns::DnsService::new(None, DnsOptions::default());
    let compiled = defenra_config::compile(ZONE.as_bytes()).unwrap();
    defenra_config::Reload::reload(
        &service,
        &std::sync::Arc::new(compiled.snapshot),
        &mut Vec::new(),
    );
    let mut stream = framed("www.example.com.", 1);
    stream.extend(framed("mail.example.com.", 2));
    stream.extend([0, 0]);
    stream.extend(framed("example.com.", 3));
    let reads: Vec<Vec<u8>> = stream.iter().map(|&byte| vec![byte]).collect();
    let peer: SocketAddr = "192.0.2.1:5353".parse().unwrap();
    let written = defenra_dns::fuzzing::answer_tcp_stream(&service, peer, reads).await;

    let mut ids = Vec::new();
    let mut rest = &written[..];
    while let [hi, lo, body @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let message = hickory_proto::op::Message::from_vec(&body[..len]).unwrap();
        assert_eq!(message.answers.len(), if ids.is_empty() { 2 } else { 1 });
        ids.push(message.metadata.id);
        rest = &body[len..];
    }
    assert_eq!(ids, [1, 2]);
}
