//! UDP forwarding: sessions per client, several replies, expiry and the table cap.

use super::*;

/// Sends `payload` and collects `count` replies.
async fn exchange(socket: &UdpSocket, payload: &str, count: usize) -> Vec<String> {
    socket.send(payload.as_bytes()).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..count {
        replies.push(udp_receive(socket).await);
    }
    replies.sort();
    replies
}

/// The destination's view of the session's source port, from a `{payload}|{n}|{port}` reply.
fn upstream_port(reply: &str) -> u16 {
    reply
        .rsplit('|')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("malformed reply {reply:?}"))
}

async fn client(agent: &Agent, entry: &L4Proxy) -> UdpSocket {
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    socket.connect(agent.address(entry)).await.unwrap();
    socket
}

#[tokio::test]
async fn every_reply_reaches_its_own_client() {
    let destination = udp_multi_echo(3).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), destination);
    let agent = Agent::start(std::slice::from_ref(&entry), options()).await;

    let alice = client(&agent, &entry).await;
    let bob = client(&agent, &entry).await;
    let alice_replies = exchange(&alice, "alice", 3).await;
    let bob_replies = exchange(&bob, "bob", 3).await;
    for (n, reply) in alice_replies.iter().enumerate() {
        assert!(reply.starts_with(&format!("alice|{}|", n + 1)), "{reply}");
    }
    for (n, reply) in bob_replies.iter().enumerate() {
        assert!(reply.starts_with(&format!("bob|{}|", n + 1)), "{reply}");
    }
    // Each client has its own upstream socket, kept for the whole session.
    assert_ne!(
        upstream_port(&alice_replies[0]),
        upstream_port(&bob_replies[0])
    );
    let again = exchange(&alice, "alice-again", 3).await;
    assert_eq!(upstream_port(&again[0]), upstream_port(&alice_replies[0]));

    let counters = agent.counters(&entry);
    assert_eq!(counters.udp_sessions_total, 2);
    assert_eq!(counters.udp_sessions_active, 2);
    assert_eq!(counters.datagrams_from_client_total, 3);
    assert_eq!(counters.datagrams_to_client_total, 9);
}

#[tokio::test]
async fn idle_session_expires_and_a_new_one_starts() {
    let destination = udp_multi_echo(1).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), destination);
    let agent = Agent::start(
        std::slice::from_ref(&entry),
        L4Options {
            udp_session_idle: Duration::from_millis(300),
            ..options()
        },
    )
    .await;

    let socket = client(&agent, &entry).await;
    let first = exchange(&socket, "one", 1).await;
    eventually("session expired", || {
        let counters = agent.counters(&entry);
        counters.udp_sessions_active == 0 && counters.udp_sessions_expired_total == 1
    })
    .await;
    let second = exchange(&socket, "two", 1).await;
    assert!(second[0].starts_with("two|1|"));
    assert_eq!(agent.counters(&entry).udp_sessions_total, 2);
    // FIXME: the kernel could in theory hand the new session the same ephemeral port;
    // with random port selection that is about 1 in 28,000.
    assert_ne!(upstream_port(&first[0]), upstream_port(&second[0]));
}

#[tokio::test]
async fn clients_beyond_the_session_cap_are_dropped() {
    let destination = udp_multi_echo(1).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), destination);
    let agent = Agent::start(
        std::slice::from_ref(&entry),
        L4Options {
            max_udp_sessions_per_proxy: 1,
            ..options()
        },
    )
    .await;

    let first = client(&agent, &entry).await;
    let second = client(&agent, &entry).await;
    exchange(&first, "first", 1).await;
    second.send(b"second").await.unwrap();
    eventually("second client refused", || {
        agent.counters(&entry).udp_sessions_rejected_total == 1
    })
    .await;
    // The admitted client keeps working.
    let replies = exchange(&first, "first-again", 1).await;
    assert!(replies[0].starts_with("first-again|1|"));
}

#[tokio::test]
async fn a_full_table_ends_the_idlest_session_for_a_new_client() {
    let destination = udp_multi_echo(1).await;
    let entry = proxy(L4Protocol::Udp, free_port(L4Protocol::Udp), destination);
    let agent = Agent::start(
        std::slice::from_ref(&entry),
        L4Options {
            max_udp_sessions_per_proxy: 2,
            udp_evictable_after: Duration::from_millis(400),
            ..options()
        },
    )
    .await;

    let idle = client(&agent, &entry).await;
    let busy = client(&agent, &entry).await;
    exchange(&idle, "idle", 1).await;
    let busy_port = upstream_port(&exchange(&busy, "busy", 1).await[0]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    exchange(&busy, "busy-again", 1).await;

    // The table is full; the session idle for 600 ms makes room, the busy one stays.
    let newcomer = client(&agent, &entry).await;
    let replies = exchange(&newcomer, "new", 1).await;
    assert!(replies[0].starts_with("new|1|"), "{replies:?}");
    let counters = agent.counters(&entry);
    assert_eq!(counters.udp_sessions_evicted_total, 1);
    assert_eq!(counters.udp_sessions_rejected_total, 0);
    let again = exchange(&busy, "busy-still", 1).await;
    assert_eq!(upstream_port(&again[0]), busy_port);

    // Now both sessions are fresh: the evicted client is refused, not let in by evicting.
    idle.send(b"idle-again").await.unwrap();
    eventually("evicted client refused", || {
        agent.counters(&entry).udp_sessions_rejected_total == 1
    })
    .await;
    assert_eq!(agent.counters(&entry).udp_sessions_evicted_total, 1);
}
