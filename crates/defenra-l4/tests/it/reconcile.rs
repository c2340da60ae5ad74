//! Reconciling snapshots: add, remove and change entries without disturbing the others.

use super::*;

#[tokio::test]
async fn add_remove_and_change_leave_other_connections_alone() {
    let one = EchoServer::start(Some("one")).await;
    let two = EchoServer::start(Some("two")).await;
    let steady = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), one.address);
    let removed = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), one.address);
    let changed = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), one.address);
    let agent = Agent::start(
        &[steady.clone(), removed.clone(), changed.clone()],
        options(),
    )
    .await;

    let (mut held, tag) = connect_tagged(agent.address(&steady)).await;
    assert_eq!(tag, "one");
    let (mut on_changed, tag) = connect_tagged(agent.address(&changed)).await;
    assert_eq!(tag, "one");
    round_trip(&mut held, b"before").await;

    // Remove one entry, point another at server two, add a TCP and a UDP entry.
    let added = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), two.address);
    let udp_destination = udp_multi_echo(1).await;
    let added_udp = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), udp_destination);
    let mut retargeted = changed.clone();
    retargeted.destination_port = two.address.port();
    agent.reload(&[
        steady.clone(),
        retargeted.clone(),
        added.clone(),
        added_udp.clone(),
    ]);
    agent.wait_listening(&added).await;
    agent.wait_listening(&added_udp).await;
    eventually("removed proxy gone", || {
        agent.state(removed.protocol, removed.listen_port).is_none()
    })
    .await;

    // The untouched proxy's connection never noticed.
    round_trip(&mut held, b"after").await;
    // The removed port refuses new clients.
    assert!(TcpStream::connect(agent.address(&removed)).await.is_err());
    // The new entries forward.
    let (mut fresh, tag) = connect_tagged(agent.address(&added)).await;
    assert_eq!(tag, "two");
    round_trip(&mut fresh, b"new").await;
    let udp = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    udp.connect(agent.address(&added_udp)).await.unwrap();
    udp.send(b"datagram").await.unwrap();
    assert!(udp_receive(&udp).await.starts_with("datagram|1|"));
    // The changed entry sends new clients to server two; its old connection drains on
    // server one (grace 10 s), undisturbed.
    let (mut after_change, tag) = connect_tagged(agent.address(&retargeted)).await;
    assert_eq!(tag, "two");
    round_trip(&mut after_change, b"retargeted").await;
    round_trip(&mut on_changed, b"old target still served").await;
    // The untouched proxy kept its counters: one connection, still open.
    let counters = agent.counters(&steady);
    assert_eq!(counters.connections_total, 1);
    assert_eq!(counters.connections_active, 1);
    assert_eq!(one.accepted(), 2);
}

#[tokio::test]
async fn removed_proxy_connections_are_closed_after_the_grace() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start(
        std::slice::from_ref(&entry),
        L4Options {
            drain_grace: Duration::from_millis(300),
            ..options()
        },
    )
    .await;

    let mut stream = TcpStream::connect(agent.address(&entry)).await.unwrap();
    round_trip(&mut stream, b"hello").await;
    agent.reload(&[]);
    eventually("listener stopped", || {
        agent.state(entry.protocol, entry.listen_port).is_none()
    })
    .await;
    // Still served during the grace period...
    round_trip(&mut stream, b"draining").await;
    // ...and closed once it is over.
    assert!(closed_by_peer(&mut stream).await);
}

#[tokio::test]
async fn port_in_use_is_reported_and_retried() {
    let echo = EchoServer::start(Some("echo")).await;
    let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let busy = proxy(
        L4Protocol::Tcp,
        blocker.local_addr().unwrap().port(),
        echo.address,
    );
    let healthy = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start(std::slice::from_ref(&healthy), options()).await;
    agent.reload(&[healthy.clone(), busy.clone()]);

    eventually("bind failure reported", || {
        matches!(
            agent.state(busy.protocol, busy.listen_port),
            Some(ListenerState::BindFailed { attempts, .. }) if attempts >= 2
        )
    })
    .await;
    let details = defenra_config::stats::StatsSource::details(&*agent.service.stats());
    let entry = details["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["listen_port"] == busy.listen_port)
        .unwrap()
        .clone();
    assert_eq!(entry["state"], "bind_failed");
    assert!(
        entry["bind_error"].as_str().unwrap().contains("in use"),
        "{entry}"
    );
    // The other proxy runs meanwhile.
    let (_stream, tag) = connect_tagged(agent.address(&healthy)).await;
    assert_eq!(tag, "echo");

    drop(blocker);
    agent.wait_listening(&busy).await;
    let (mut stream, tag) = connect_tagged(agent.address(&busy)).await;
    assert_eq!(tag, "echo");
    round_trip(&mut stream, b"bound at last").await;
}

#[tokio::test]
async fn udp_target_change_moves_new_datagrams() {
    let first = udp_multi_echo(1).await;
    let second = udp_multi_echo(2).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), first);
    let agent = Agent::start(std::slice::from_ref(&entry), options()).await;

    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    socket.connect(agent.address(&entry)).await.unwrap();
    socket.send(b"a").await.unwrap();
    assert!(udp_receive(&socket).await.starts_with("a|1|"));

    let mut retargeted = entry.clone();
    retargeted.destination_port = second.port();
    agent.reload(&[retargeted]);
    // The second server answers twice; once both arrive, the switch has happened.
    let mut seen_second = false;
    for _ in 0..100 {
        socket.send(b"b").await.unwrap();
        let reply = udp_receive(&socket).await;
        if reply.starts_with("b|2|") {
            seen_second = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_second, "datagrams never reached the new destination");
}

#[tokio::test]
async fn shutdown_stops_listeners_and_waits_for_connections() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start(
        std::slice::from_ref(&entry),
        L4Options {
            drain_grace: Duration::from_millis(300),
            ..options()
        },
    )
    .await;
    let address = agent.address(&entry);
    let mut stream = TcpStream::connect(address).await.unwrap();
    round_trip(&mut stream, b"hello").await;

    let took = agent.stop().await;
    assert!(
        took >= Duration::from_millis(250),
        "serve returned before the grace: {took:?}"
    );
    assert!(closed_by_peer(&mut stream).await);
    assert!(TcpStream::connect(address).await.is_err());
}

#[tokio::test]
async fn a_second_serve_call_is_refused() {
    // Waiting for a listener proves the first `serve` is running.
    let destination = udp_multi_echo(1).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), destination);
    let agent = Agent::start(std::slice::from_ref(&entry), options()).await;
    let again = within(
        "second serve",
        Arc::clone(&agent.service).serve(CancellationToken::new()),
    )
    .await;
    assert!(matches!(again, Err(defenra_l4::L4Error::AlreadyServing)));
}
