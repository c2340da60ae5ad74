//! L4 attacks: a UDP flood from many source ports against a UDP forward (beside a steady
//! client of the same forward), a TCP connection flood against a forward whose destination
//! is down, and a forward pointed at its own listener.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{Setup, Usage};
use super::net::{self, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "l4-udp-flood",
            fast: true,
            setup: Setup::File,
            expected: "datagrams from thousands of source ports make at most 4096 sessions (one socket each); when the table is full a new source takes the idlest session idle over 1 s or is dropped, so a steady client keeps its session and its echoes (≥ 99 %; one datagram may be lost in the fast run's 50)",
            peers: "HAProxy has no UDP forwarding (dgram only for logs); nginx stream: proxy_timeout 10m, udp sessions bounded by worker_connections; proxy_responses",
            limits: Limits {
                // Sessions idle out after 60 s: until then each holds a socket.
                fd_growth: 4200,
                rss_growth_mib: 64,
                settle: Duration::from_secs(2),
            },
            run: udp_flood,
        },
        Attack {
            name: "l4-tcp-flood-dead-destination",
            fast: true,
            setup: Setup::File,
            expected: "connections to a forward whose destination refuses are closed at once, nothing accumulates, and the log stays bounded (issue 17 finding 10: one warning per client connection, unthrottled)",
            peers: "HAProxy: retries 3, then closes; logs one line per connection (option dontlognull), rate-limited by the syslog side; nginx stream: proxy_connect_timeout 60s, one error line per connection",
            limits: Limits::DEFAULT,
            run: tcp_flood_dead_destination,
        },
        Attack {
            name: "l4-self-loop",
            fast: false,
            setup: Setup::File,
            expected: "a forward whose destination is its own listener is refused in config (an issue) or bounded at run time; one client connection must not fan out (issue 17 finding 11: 10,000 connections in 2 s)",
            peers: "HAProxy and nginx accept such a config and loop until maxconn / worker_connections",
            limits: Limits::DEFAULT,
            run: self_loop,
        },
    ]
}

/// A steady UDP client of `forward` from 127.0.0.1: one datagram every 50 ms, an echo
/// expected within a second. Returns (sent, echoed) when stopped.
fn steady_udp_client(forward: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64)> {
    thread::spawn(move || {
        let Ok(socket) = net::udp_from(Ipv4Addr::LOCALHOST, forward) else {
            return (0, 0);
        };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
        let (mut sent, mut echoed) = (0u64, 0u64);
        let mut buffer = [0u8; 256];
        while !stop.load(Relaxed) {
            let payload = format!("steady {sent}");
            sent += 1;
            if socket.send(payload.as_bytes()).is_ok() {
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    match socket.recv(&mut buffer) {
                        Ok(n) if &buffer[..n] == payload.as_bytes() => {
                            echoed += 1;
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        (sent, echoed)
    })
}

fn udp_flood(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let forward = ctx.lab.udp_forward;
    let sources = ctx.scale(3000, 8000);
    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_udp_client(forward, stop.clone());
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut max_sessions = 0f64;
    let mut sent = 0u64;
    // Batches of 500 sockets (500 source ports), each sending three datagrams, then closed
    // (the agent's sessions stay until they idle out).
    for batch in 0..sources.div_ceil(500) {
        let sockets: Vec<UdpSocket> = (0..500)
            .filter_map(|n| {
                net::udp_from(attack_source(3100 + (batch * 500 + n) / 100), forward).ok()
            })
            .collect();
        for round in 0..3 {
            for socket in &sockets {
                if socket.send(format!("flood {round}").as_bytes()).is_ok() {
                    sent += 1;
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        max_sessions = max_sessions.max(ctx.agent().stat("l4", "udp_sessions_active"));
    }
    // The full table: keep a few thousand sources busy for a while.
    while started.elapsed() < Duration::from_secs(if ctx.fast { 3 } else { 10 }) {
        thread::sleep(Duration::from_millis(200));
        max_sessions = max_sessions.max(ctx.agent().stat("l4", "udp_sessions_active"));
    }
    stop.store(true, Relaxed);
    let (steady_sent, echoed) = steady.join().unwrap_or((0, 0));
    let rejected = ctx.agent().stat("l4", "udp_sessions_rejected_total");
    let evicted = ctx.agent().stat("l4", "udp_sessions_evicted_total");
    let fds = Usage::of(ctx.agent().pid()).fds;
    let success = echoed as f64 * 100.0 / steady_sent.max(1) as f64;
    Ok(Check::new(
        // UDP may lose a datagram under a flood: 1 % of the steady client's, and at least
        // one in the fast run's 50.
        max_sessions <= 4096.0 && (success >= 99.0 || steady_sent.saturating_sub(echoed) <= 1),
        format!(
            "{sent} datagrams from {sources} source ports: at most {max_sessions} sessions, \
             {evicted} evicted, {rejected} datagrams of new sources dropped, {fds} descriptors \
             open; the steady client got {echoed}/{steady_sent} echoes ({success:.1} %)"
        ),
    ))
}

fn tcp_flood_dead_destination(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let forward = ctx.lab.dead_forward;
    let threads = 4;
    let limit = Duration::from_secs(if ctx.fast { 4 } else { 15 });
    let per_thread = ctx.scale(1000, 6000);
    let log = ctx.agent().log.clone();
    let (lines_before, bytes_before) = (log.lines.load(Relaxed), log.bytes.load(Relaxed));
    let errors_before = ctx.agent().stat("l4", "connect_errors_total");
    let closed = Arc::new(AtomicU64::new(0));
    let lingering = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread_index| {
            let (closed, lingering) = (closed.clone(), lingering.clone());
            thread::spawn(move || {
                for n in 0..per_thread {
                    if started.elapsed() > limit {
                        break;
                    }
                    let source = attack_source(3200 + thread_index * 100 + n % 100);
                    let Ok(mut stream) = net::connect_from(source, forward, Duration::from_secs(2))
                    else {
                        continue;
                    };
                    if net::closes_within(&mut stream, Duration::from_secs(2)) {
                        closed.fetch_add(1, Relaxed);
                    } else {
                        lingering.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    let lines = log.lines.load(Relaxed) - lines_before;
    let bytes = log.bytes.load(Relaxed) - bytes_before;
    let errors = ctx.agent().stat("l4", "connect_errors_total") - errors_before;
    let closed = closed.load(Relaxed);
    let lingering = lingering.load(Relaxed);
    // Bounded logging: a few lines a second, not one per connection.
    let log_bounded = (lines as f64) <= seconds * 20.0 + 20.0;
    Ok(Check::new(
        lingering == 0 && log_bounded,
        format!(
            "{closed} connections closed by the agent within 2 s, {lingering} left open, in \
             {seconds:.1} s; connect_errors_total +{errors:.0}; {lines} log lines ({} KiB)",
            bytes / 1024
        ),
    ))
}

fn self_loop(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let port = crate::bench::common::free_port()?;
    ctx.lab.extra_proxies = vec![json!({
        "id": "self-loop",
        "type": "tcp",
        "sourcePort": port,
        "destinationHost": "127.0.0.1",
        "destinationPort": port,
        "enabled": true
    })];
    ctx.lab.apply_config()?;
    let pid = ctx.agent().pid();
    let before = Usage::of(pid);
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let outcome = match net::connect_from(attack_source(3300), address, Duration::from_secs(2)) {
        Ok(mut stream) => {
            use std::io::Write;
            let _ = stream.write_all(b"loop\n");
            let mut peak = before;
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                peak = peak.max(Usage::of(pid));
                thread::sleep(Duration::from_millis(50));
            }
            let closed = net::closes_within(&mut stream, Duration::from_millis(100));
            format!(
                "listener accepted; descriptors {} → peak {} within 3 s; client connection {}",
                before.fds,
                peak.fds,
                if closed { "closed" } else { "still open" }
            )
        }
        Err(error) => format!("listener refused ({error}): not started"),
    };
    let issues = ctx
        .agent()
        .stats()
        .map(|stats| stats["config"]["rejected_items"].to_string())
        .unwrap_or_default();
    let flagged =
        issues.contains("self") || issues.contains("loop") || issues.contains(&port.to_string());
    ctx.lab.extra_proxies.clear();
    ctx.lab.apply_config()?;
    let peak_ok = !outcome.contains("peak") || {
        let peak: u64 = outcome
            .split("peak ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        peak < before.fds + 100
    };
    Ok(Check::new(
        peak_ok,
        format!(
            "{outcome}; {}",
            if flagged {
                format!(
                    "config issue: {}",
                    issues.chars().take(200).collect::<String>()
                )
            } else {
                "no config issue reported".to_owned()
            }
        ),
    ))
}
