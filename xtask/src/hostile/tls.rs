//! TLS attacks on the HTTPS listener: garbage instead of a ClientHello, handshake floods
//! (the server pays for key exchange and signature, the client for nothing), handshakes
//! held open half way, and odd but legal ClientHellos.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use super::dns::count_closed;
use super::harness::{LEGIT_HOST, Setup};
use super::net::{self, Rng, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "tls-garbage",
            fast: true,
            setup: Setup::File,
            expected: "random bytes, a plaintext HTTP request, an SSLv2 hello, an oversized record and application data before the handshake each end with an alert or a close within a second; nothing is left waiting",
            peers: "nginx: closes (\"SSL_do_handshake() failed\"), and answers a plain HTTP request on the TLS port with 400 \"The plain HTTP request was sent to HTTPS port\"; HAProxy: closes",
            limits: Limits::DEFAULT,
            run: garbage,
        },
        Attack {
            name: "tls-handshake-flood",
            fast: false,
            setup: Setup::File,
            expected: "clients that send a ClientHello, take the server's flight (key exchange and signature done) and hang up cost CPU only while they come: legitimate HTTPS keeps ≥ 99 %, nothing stays allocated",
            peers: "nginx: no built-in handshake rate limit (limit_conn per address helps); HAProxy: maxsslrate / rate-limit sessions",
            limits: Limits::DEFAULT,
            run: handshake_flood,
        },
        Attack {
            name: "tls-half-handshake",
            fast: true,
            setup: Setup::File,
            expected: "connections that send a ClientHello (or three bytes of one) and stop are closed 30 s (header_read_timeout, which covers the handshake) after accept",
            peers: "nginx: client_header_timeout 60s also bounds the handshake (stream module: ssl_handshake_timeout 60s); HAProxy: timeout client / timeout http-request",
            limits: Limits {
                settle: Duration::from_secs(8),
                ..Limits::DEFAULT
            },
            run: half_handshake,
        },
        Attack {
            name: "tls-odd-hellos",
            fast: false,
            setup: Setup::File,
            expected: "a ClientHello offering only an unknown ALPN protocol gets a handshake without ALPN and HTTP/1.1 (issue 17 finding 12); no SNI and an unknown SNI are refused with an alert; 1,000 of each cost nothing lasting",
            peers: "nginx: carries on without ALPN, serves the default server's certificate without SNI; HAProxy: the same with its default certificate",
            limits: Limits::DEFAULT,
            run: odd_hellos,
        },
    ]
}

/// Makes the bytes one garbage connection sends.
type Garbage = fn(&mut Rng) -> Vec<u8>;

fn garbage(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().https;
    let failures_before = ctx.agent().stat("http", "tls_handshake_failures_total");
    let mut rng = Rng::new(0x71_5a);
    let rounds = ctx.scale(40, 400);
    let variants: [(&str, Garbage); 5] = [
        ("random", |rng| {
            let len = 1 + rng.below(2000) as usize;
            rng.bytes(len)
        }),
        ("plain HTTP", |_| {
            format!("GET / HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n\r\n").into_bytes()
        }),
        ("SSLv2 hello", |_| {
            vec![
                0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10, 0x07, 0x00, 0xc0,
                0x03, 0x00, 0x80, 0x01, 0x00, 0x80, 0x06, 0x00, 0x40, 0x04, 0x00, 0x80, 0x02, 0x00,
                0x80, 0x1f, 0x17, 0x0c, 0xa6, 0x2f, 0x00, 0x78, 0xfc, 0x46, 0x55, 0x2e, 0xb1, 0x83,
                0x39, 0xf1, 0xea,
            ]
        }),
        ("65535-byte record", |_| {
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00]
        }),
        ("application data first", |rng| {
            let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
            record.extend(rng.bytes(64));
            record
        }),
    ];
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut slow = Vec::new();
    for round in 0..rounds {
        for (index, (name, make)) in variants.iter().enumerate() {
            let source = attack_source(1600 + (round * variants.len() + index) % 200);
            let Ok(mut stream) = net::connect_from(source, server, Duration::from_secs(3)) else {
                *outcomes
                    .entry(format!("{name}: connect failed"))
                    .or_default() += 1;
                continue;
            };
            let started = Instant::now();
            let _ = stream.write_all(&make(&mut rng));
            let mut reply = Vec::new();
            let closed = {
                let mut scratch = [0u8; 4096];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                loop {
                    match stream.read(&mut scratch) {
                        Ok(0) => break true,
                        Ok(n) => reply.extend_from_slice(&scratch[..n]),
                        Err(error)
                            if matches!(
                                error.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            break false;
                        }
                        Err(_) => break true,
                    }
                }
            };
            let what = match (closed, reply.first()) {
                (true, Some(0x15)) => "alert+close",
                (true, Some(b'H')) => "HTTP answer+close",
                (true, Some(_)) => "other bytes+close",
                (true, None) => "close",
                (false, _) => "left open",
            };
            if !closed || started.elapsed() > Duration::from_secs(1) {
                slow.push(format!(
                    "{name}: {what} after {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
            }
            *outcomes.entry(format!("{name}: {what}")).or_default() += 1;
        }
    }
    let failures = ctx.agent().stat("http", "tls_handshake_failures_total") - failures_before;
    let summary: Vec<String> = outcomes
        .iter()
        .map(|(what, n)| format!("{what} ×{n}"))
        .collect();
    Ok(Check::new(
        slow.is_empty(),
        format!(
            "{}; tls_handshake_failures_total +{failures}{}",
            summary.join(", "),
            if slow.is_empty() {
                String::new()
            } else {
                format!(
                    "; SLOW: {}",
                    slow.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                )
            }
        ),
    ))
}

fn handshake_flood(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().https;
    let threads = ctx.scale(2, 4);
    let limit = Duration::from_secs(if ctx.fast { 3 } else { 10 });
    let stop = Arc::new(AtomicBool::new(false));
    let flights = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|thread_index| {
            let (stop, flights, failed) = (stop.clone(), flights.clone(), failed.clone());
            let config = ctx.lab.tls_h1.clone();
            thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Relaxed) {
                    n += 1;
                    let source = attack_source(1800 + thread_index * 50 + n % 50);
                    let hello = net::client_hello(&config, LEGIT_HOST);
                    let Ok(socket) =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    else {
                        failed.fetch_add(1, Relaxed);
                        continue;
                    };
                    // Hang up with a reset, without finishing the handshake.
                    let _ = socket.set_linger(Some(Duration::ZERO));
                    let _ = socket.bind(&std::net::SocketAddr::from((source, 0)).into());
                    if socket
                        .connect_timeout(&server.into(), Duration::from_secs(3))
                        .is_err()
                    {
                        failed.fetch_add(1, Relaxed);
                        continue;
                    }
                    let mut stream: std::net::TcpStream = socket.into();
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                    let mut flight = [0u8; 16 * 1024];
                    // The server's answer holds its key share and, in TLS 1.3, the
                    // certificate and signature: the expensive part is done once it comes.
                    let answered = stream.write_all(&hello).is_ok()
                        && stream.read(&mut flight).is_ok_and(|n| n > 100);
                    if answered {
                        flights.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    thread::sleep(limit);
    stop.store(true, Relaxed);
    for handle in handles {
        let _ = handle.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    let flights = flights.load(Relaxed);
    Ok(Check::new(
        flights > 0,
        format!(
            "{threads} threads: {flights} server flights in {seconds:.1} s ({:.0}/s), {} attempts failed",
            flights as f64 / seconds,
            failed.load(Relaxed)
        ),
    ))
}

fn half_handshake(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().https;
    let count = ctx.scale(500, 2000);
    let hold = Duration::from_secs(if ctx.fast { 3 } else { 40 });
    let config = ctx.lab.tls_h1.clone();
    let hello = net::client_hello(&config, LEGIT_HOST);
    let started = Instant::now();
    let mut streams = Vec::new();
    let mut refused = 0;
    for n in 0..count {
        let source = attack_source(2000 + n / 100);
        match net::connect_from(source, server, Duration::from_secs(3)) {
            Ok(mut stream) => {
                // Half of them send the whole ClientHello, half three bytes of the record
                // header.
                let part = if n % 2 == 0 { &hello[..] } else { &hello[..3] };
                if stream.write_all(part).is_ok() {
                    streams.push(stream);
                } else {
                    refused += 1;
                }
            }
            Err(_) => refused += 1,
        }
    }
    let opened = streams.len();
    let mut all_closed_after = None;
    while started.elapsed() < hold {
        thread::sleep(Duration::from_secs(1));
        if count_closed(&mut streams) == opened {
            all_closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed = count_closed(&mut streams);
    let ok = ctx.fast || all_closed_after.is_some_and(|after| after < Duration::from_secs(36));
    Ok(Check::new(
        ok,
        format!(
            "{opened} half handshakes ({refused} refused) held {:.0} s: {closed} closed by the agent{}",
            started.elapsed().as_secs_f64(),
            all_closed_after.map_or(String::new(), |after| format!(
                ", all within {:.1} s",
                after.as_secs_f64()
            ))
        ),
    ))
}

fn odd_hellos(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().https;
    let root = ctx.lab.cert_der.clone();
    let unknown_alpn = net::tls_client(&root, &[b"foo/1"])?;
    let plain = ctx.lab.tls_h1.clone();
    let mut results = Vec::new();
    let mut ok = true;

    // Unknown ALPN only: the handshake should go on without ALPN, then HTTP/1.1.
    let outcome = net::connect_from(attack_source(2300), server, Duration::from_secs(3))
        .and_then(|stream| net::tls_connect(&unknown_alpn, LEGIT_HOST, stream))
        .and_then(|mut tls| {
            tls.write_all(
                format!("GET /alpn HTTP/1.1\r\nHost: {LEGIT_HOST}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            net::read_response(&mut tls, &mut Vec::new(), false)
        });
    let alpn_ok = outcome
        .as_ref()
        .is_ok_and(|response| response.status == 200);
    ok &= alpn_ok;
    results.push(format!(
        "only ALPN foo/1: {}",
        match &outcome {
            Ok(response) => format!("handshake, HTTP {}", response.status),
            Err(error) => format!("refused ({error})"),
        }
    ));

    // Unknown SNI and no SNI (an IP address as the name sends none), many times.
    let repeats = ctx.scale(100, 1000);
    for (label, name) in [("unknown SNI", "unknown.example"), ("no SNI", "127.0.0.1")] {
        let mut refused = 0;
        for n in 0..repeats {
            let attempt =
                net::connect_from(attack_source(2310 + n % 50), server, Duration::from_secs(3))
                    .and_then(|stream| net::tls_connect(&plain, name, stream));
            // The agent's refusal is an alert; a certificate it did serve fails the
            // client's own verification instead, which is not a refusal.
            if attempt.is_err_and(|error| error.to_string().contains("alert")) {
                refused += 1;
            }
        }
        ok &= refused == repeats;
        results.push(format!("{label}: {refused}/{repeats} refused"));
    }
    Ok(Check::new(ok, results.join("; ")))
}
