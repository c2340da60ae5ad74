//! TCP accepted on worker runtimes (one accept loop each on the proxy's socket): where
//! connections run, cap, retarget,
//! removal, shutdown and a port held by another server.

use super::*;

const WORKERS: usize = 2;

/// Writes `message` and reports whether it came back (false: the proxy closed the
/// connection instead).
async fn echoed(stream: &mut TcpStream, message: &[u8]) -> bool {
    if stream.write_all(message).await.is_err() {
        return false;
    }
    let mut echoed = vec![0u8; message.len()];
    let read = within("echo or close", stream.read_exact(&mut echoed)).await;
    read.is_ok() && echoed == message
}

#[tokio::test]
async fn connections_run_on_the_workers_that_accepted_them() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(std::slice::from_ref(&entry), options(), WORKERS).await;

    let mut streams = Vec::new();
    for n in 0..32 {
        let mut stream = TcpStream::connect(agent.address(&entry)).await.unwrap();
        round_trip(&mut stream, format!("hello {n}").as_bytes()).await;
        streams.push(stream);
    }
    assert_eq!(agent.counters(&entry).connections_active, 32);
    // Each worker runs its accept loop, the connections run on the workers that took
    // them, and none runs elsewhere.
    let alive = agent.workers().alive_tasks();
    assert!(alive.iter().all(|&tasks| tasks >= 1), "{alive:?}");
    assert_eq!(alive.iter().sum::<usize>(), 32 + WORKERS, "{alive:?}");

    drop(streams);
    eventually("connections closed", || {
        agent.counters(&entry).connections_active == 0
    })
    .await;
}

#[tokio::test]
async fn a_busy_worker_leaves_new_connections_to_the_others() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(std::slice::from_ref(&entry), options(), WORKERS).await;
    // Worker 0 is stuck (a long computation) for two seconds.
    agent.workers().handles[0].spawn(async { std::thread::sleep(Duration::from_secs(2)) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Every new connection is still answered at once: the free worker takes them all.
    // (With one socket per worker, the kernel would hand about half to the stuck one.)
    let started = std::time::Instant::now();
    for n in 0..16 {
        let mut stream = TcpStream::connect(agent.address(&entry)).await.unwrap();
        round_trip(&mut stream, format!("hello {n}").as_bytes()).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_cap_counts_connections_of_all_workers() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(
        std::slice::from_ref(&entry),
        L4Options {
            max_connections_per_proxy: 4,
            ..options()
        },
        WORKERS,
    )
    .await;

    let mut served = Vec::new();
    let mut n_refused = 0;
    for n in 0..12 {
        let mut stream = TcpStream::connect(agent.address(&entry)).await.unwrap();
        if echoed(&mut stream, format!("client {n}").as_bytes()).await {
            served.push(stream);
        } else {
            n_refused += 1;
        }
    }
    assert_eq!(served.len(), 4);
    assert_eq!(n_refused, 8);
    assert_eq!(agent.counters(&entry).connections_rejected_total, 8);
    for stream in &mut served {
        round_trip(stream, b"still served").await;
    }
}

#[tokio::test]
async fn a_target_change_moves_every_worker_and_drains_the_old_connections() {
    let one = EchoServer::start(Some("one")).await;
    let two = EchoServer::start(Some("two")).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), one.address);
    let agent = Agent::start_on_workers(
        std::slice::from_ref(&entry),
        L4Options {
            drain_grace: Duration::from_secs(2),
            ..options()
        },
        WORKERS,
    )
    .await;
    let mut old = Vec::new();
    for _ in 0..8 {
        let (stream, tag) = connect_tagged(agent.address(&entry)).await;
        assert_eq!(tag, "one");
        old.push(stream);
    }

    let mut retargeted = entry.clone();
    retargeted.destination_port = two.address.port();
    agent.reload(&[retargeted.clone()]);
    // Each worker switches on its own; once 16 new connections in a row (spread over both
    // sockets) reach server two, all have.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut all_two = true;
        for _ in 0..16 {
            let (_stream, tag) = connect_tagged(agent.address(&retargeted)).await;
            all_two &= tag == "two";
        }
        if all_two {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers kept the old target"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The old generation is still served during the grace, then closed.
    for stream in &mut old {
        round_trip(stream, b"old target").await;
    }
    for stream in &mut old {
        assert!(closed_by_peer(stream).await);
    }
    let (mut fresh, tag) = connect_tagged(agent.address(&retargeted)).await;
    assert_eq!(tag, "two");
    round_trip(&mut fresh, b"after the drain").await;
}

#[tokio::test]
async fn a_removed_proxy_frees_its_port_and_drains_on_every_worker() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(
        std::slice::from_ref(&entry),
        L4Options {
            drain_grace: Duration::from_millis(500),
            ..options()
        },
        WORKERS,
    )
    .await;
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(agent.address(&entry)).await.unwrap();
        round_trip(&mut stream, b"hello").await;
        streams.push(stream);
    }

    agent.reload(&[]);
    eventually("listener stopped", || {
        agent.state(entry.protocol, entry.listen_port).is_none()
    })
    .await;
    // Every socket of the group is closed (one left open would take about half of these).
    for _ in 0..8 {
        assert!(TcpStream::connect(agent.address(&entry)).await.is_err());
    }
    for stream in &mut streams {
        assert!(closed_by_peer(stream).await);
    }
    eventually("nothing left on the workers", || {
        agent.workers().alive_tasks() == vec![0; WORKERS]
    })
    .await;
}

#[tokio::test]
async fn shutdown_waits_for_the_connections_of_every_worker() {
    let echo = EchoServer::start(None).await;
    let entry = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(
        std::slice::from_ref(&entry),
        L4Options {
            drain_grace: Duration::from_millis(300),
            ..options()
        },
        WORKERS,
    )
    .await;
    let address = agent.address(&entry);
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        round_trip(&mut stream, b"hello").await;
        streams.push(stream);
    }

    let took = agent.stop().await;
    assert!(
        took >= Duration::from_millis(250),
        "serve returned before the grace: {took:?}"
    );
    for stream in &mut streams {
        assert!(closed_by_peer(stream).await);
    }
    assert!(TcpStream::connect(address).await.is_err());
}

#[tokio::test]
async fn a_port_held_by_another_server_is_a_bind_failure() {
    let echo = EchoServer::start(Some("echo")).await;
    // A plain listener, as another server would hold the port.
    let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let busy = proxy(
        L4Protocol::Tcp,
        blocker.local_addr().unwrap().port(),
        echo.address,
    );
    let healthy = proxy(L4Protocol::Tcp, free_port(L4Protocol::Tcp), echo.address);
    let agent = Agent::start_on_workers(std::slice::from_ref(&healthy), options(), WORKERS).await;
    agent.reload(&[healthy.clone(), busy.clone()]);

    eventually("bind failure reported", || {
        matches!(
            agent.state(busy.protocol, busy.listen_port),
            Some(ListenerState::BindFailed { attempts, .. }) if attempts >= 2
        )
    })
    .await;
    // Every connection still reaches the other server, none the agent.
    for _ in 0..4 {
        let client = std::net::TcpStream::connect(blocker.local_addr().unwrap()).unwrap();
        let (accepted, _) = blocker.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    }
    assert_eq!(agent.counters(&busy).connections_total, 0);

    drop(blocker);
    agent.wait_listening(&busy).await;
    let (mut stream, tag) = connect_tagged(agent.address(&busy)).await;
    assert_eq!(tag, "echo");
    round_trip(&mut stream, b"bound at last").await;
}
