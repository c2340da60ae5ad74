//! The shield in front of the forwards: bans and per-address caps at accept, bans per
//! datagram, clients from several 127.x source addresses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use defenra_config::L4Protocol;
use defenra_l4::L4Service;
use defenra_shield::{BanSource, Clock, Shield, ShieldOptions};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::{
    Agent, EchoServer, closed_by_peer, free_port, options, proxy, round_trip, udp_multi_echo,
    udp_receive,
};

async fn connect_from(source: &str, address: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source.parse().expect("source"), 0))
        .expect("bind source");
    socket.connect(address).await.expect("kernel accepts")
}

async fn start(
    shield: &Arc<Shield>,
    protocol: L4Protocol,
    destination: SocketAddr,
) -> (Agent, SocketAddr) {
    let forward = proxy(protocol, free_port(protocol), destination);
    let service = L4Service::new(options()).with_shield(Arc::clone(shield));
    let agent = Agent::start_with(service, None, std::slice::from_ref(&forward)).await;
    let address = agent.address(&forward);
    (agent, address)
}

/// Whether one byte written comes back within a second.
async fn echoes(stream: &mut TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut byte = [0u8; 1];
    stream.write_all(b"x").await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await,
            Ok(Ok(1))
        )
}

#[tokio::test]
async fn concurrent_connections_per_address_are_capped() {
    let echo = EchoServer::start(None).await;
    let shield = Arc::new(Shield::new(ShieldOptions {
        l4_max_conns_per_ip: 2,
        ..ShieldOptions::default()
    }));
    let (_agent, address) = start(&shield, L4Protocol::Tcp, echo.address).await;
    let mut first = connect_from("127.0.0.2", address).await;
    let mut second = connect_from("127.0.0.2", address).await;
    round_trip(&mut first, b"one").await;
    round_trip(&mut second, b"two").await;
    let mut third = connect_from("127.0.0.2", address).await;
    assert!(closed_by_peer(&mut third).await, "third connection served");
    let mut other = connect_from("127.0.0.3", address).await;
    round_trip(&mut other, b"other address").await;
    drop(first);
    // The slot frees once the proxy sees the close: try until a new connection echoes.
    let mut freed = false;
    for _ in 0..50 {
        let mut again = connect_from("127.0.0.2", address).await;
        if echoes(&mut again).await {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "a closed connection did not free its slot");
    assert!(shield.stats().l4_connections_refused_cap >= 1);
}

#[tokio::test]
async fn new_connections_per_minute_are_limited_per_address() {
    let echo = EchoServer::start(None).await;
    let (clock, manual) = Clock::manual();
    let shield = Arc::new(Shield::new(ShieldOptions {
        l4_new_conns_per_minute: 3,
        clock,
        ..ShieldOptions::default()
    }));
    let (_agent, address) = start(&shield, L4Protocol::Tcp, echo.address).await;
    for n in 0..3 {
        let mut stream = connect_from("127.0.0.4", address).await;
        round_trip(&mut stream, format!("connection {n}").as_bytes()).await;
    }
    let mut fourth = connect_from("127.0.0.4", address).await;
    assert!(
        closed_by_peer(&mut fourth).await,
        "fourth within the minute served"
    );
    let mut other = connect_from("127.0.0.5", address).await;
    round_trip(&mut other, b"other").await;
    manual.advance(Duration::from_secs(20));
    let mut later = connect_from("127.0.0.4", address).await;
    round_trip(&mut later, b"one more after 20 s").await;
    assert_eq!(shield.stats().l4_connections_refused_rate, 1);
}

#[tokio::test]
async fn banned_addresses_are_closed_at_accept_and_their_datagrams_dropped() {
    let echo = EchoServer::start(None).await;
    let shield = Arc::new(Shield::new(ShieldOptions::default()));
    shield
        .ban(
            "127.0.0.6".parse().unwrap(),
            None,
            "test",
            BanSource::Operator,
        )
        .unwrap();
    let (_tcp, tcp_address) = start(&shield, L4Protocol::Tcp, echo.address).await;
    let mut banned = connect_from("127.0.0.6", tcp_address).await;
    assert!(closed_by_peer(&mut banned).await);
    assert_eq!(echo.accepted(), 0, "the destination saw the banned client");
    let mut fine = connect_from("127.0.0.7", tcp_address).await;
    round_trip(&mut fine, b"hello").await;

    let udp_echo = udp_multi_echo(1).await;
    let (_udp, udp_address) = start(&shield, L4Protocol::Udp, udp_echo).await;
    let banned = UdpSocket::bind("127.0.0.6:0").await.unwrap();
    banned.send_to(b"ping", udp_address).await.unwrap();
    let mut buffer = [0u8; 64];
    let reply = tokio::time::timeout(Duration::from_millis(500), banned.recv(&mut buffer)).await;
    assert!(reply.is_err(), "a banned sender got an answer");
    let fine = UdpSocket::bind("127.0.0.7:0").await.unwrap();
    fine.connect(udp_address).await.unwrap();
    fine.send(b"ping").await.unwrap();
    assert!(udp_receive(&fine).await.starts_with("ping|1|"));
    let stats = shield.stats();
    assert_eq!(stats.l4_connections_refused_banned, 1);
    assert_eq!(stats.datagrams_dropped_banned, 1);
}
