//! DNS attacks: random, truncated and self-referencing packets, bogus EDNS and Client
//! Subnet options, TCP length-prefix tricks, and idle or half-sent TCP connections held in
//! numbers.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use super::harness::{LEGIT_HOST, Setup};
use super::net::{self, Rng, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "dns-random-packets",
            fast: true,
            setup: Setup::File,
            expected: "no crash; garbage with a readable header gets FORMERR (or NOTIMP for other opcodes), shorter packets and responses (QR=1) are dropped; every reply is a response",
            peers: "knot answers FORMERR to what it can parse a header of and drops the rest; NSD and knot fuzz this parser continuously",
            limits: Limits::DEFAULT,
            run: random_packets,
        },
        Attack {
            name: "dns-truncated",
            fast: true,
            setup: Setup::File,
            expected: "every prefix of a valid query (EDNS + ECS) of 12 bytes or more gets FORMERR over UDP and TCP; shorter ones are dropped",
            peers: "knot: FORMERR (KNOT_EMALF) for a message its parser cannot read to the end",
            limits: Limits::DEFAULT,
            run: truncated,
        },
        Attack {
            name: "dns-compression-loop",
            fast: true,
            setup: Setup::File,
            expected: "FORMERR at once for self- and mutually-referencing pointers, pointers past the end, names over 255 bytes and reserved label types (RFC 1035 §2.3.4, §4.1.4); cost per packet stays flat",
            peers: "knot and NSD refuse pointer loops (a pointer must point backwards) with FORMERR",
            limits: Limits::DEFAULT,
            run: compression_loops,
        },
        Attack {
            name: "dns-bogus-edns",
            fast: false,
            setup: Setup::File,
            expected: "two OPT records, OPT not at the root, option lengths past the RDATA, and bad ECS (family 3, /33, extra address bytes, bits past the prefix, scope ≠ 0, two ECS) get FORMERR (RFC 6891 §6.1.1, RFC 7871 §6, §7.1.2); EDNS version 1 gets BADVERS (RFC 6891 §6.1.3); payload size 0 is read as 512 (§6.2.5)",
            peers: "knot: FORMERR for a malformed OPT, BADVERS for version > 0, FORMERR for malformed ECS",
            limits: Limits::DEFAULT,
            run: bogus_edns,
        },
        Attack {
            name: "dns-tcp-length-tricks",
            fast: true,
            setup: Setup::File,
            expected: "a prefix split over reads still frames the query; a short length frames a truncated query (FORMERR); 200 pipelined queries get 200 answers in order (RFC 7766 §6.2.1.1); after --dns-tcp-max-queries (1000) the connection closes; a response (QR=1) is ignored; a half-closed client still gets its answer",
            peers: "knot: tcp-max-clients, tcp-idle-timeout 10 s, tcp-io-timeout 500 ms per message",
            limits: Limits::DEFAULT,
            run: tcp_length_tricks,
        },
        Attack {
            name: "dns-tcp-idle-hold",
            fast: true,
            setup: Setup::File,
            expected: "at most --dns-tcp-max-conns-per-ip (10) per address (more closed at once) and --dns-tcp-max-conns (1000) in total, the idlest evicted to make room for new clients; every idle connection closed within --dns-tcp-idle-timeout (10 s)",
            peers: "knot: tcp-max-clients (default: a share of the descriptor limit) and tcp-idle-timeout 10 s; NSD tcp-count 100, tcp-timeout 120 s",
            limits: Limits {
                settle: Duration::from_secs(3),
                ..Limits::DEFAULT
            },
            run: tcp_idle_hold,
        },
        Attack {
            name: "dns-tcp-half-open",
            fast: false,
            setup: Setup::File,
            expected: "connections stalled in the middle of a message are closed at the per-message deadline (10 s), however the bytes trickle; a client that half-closes mid-message is closed at once",
            peers: "knot: tcp-io-timeout (500 ms) for an incomplete message; NSD tcp-timeout",
            limits: Limits::DEFAULT,
            run: tcp_half_open,
        },
    ]
}

/// Replies seen during a UDP flood, by RCODE.
#[derive(Default)]
struct Replies {
    sent: u64,
    rcodes: BTreeMap<String, u64>,
    not_responses: u64,
}

impl Replies {
    fn answered(&self) -> u64 {
        self.rcodes.values().sum::<u64>() + self.not_responses
    }

    fn describe(&self) -> String {
        let rcodes: Vec<String> = self
            .rcodes
            .iter()
            .map(|(rcode, n)| format!("{rcode} {n}"))
            .collect();
        format!(
            "{} sent, {} answered ({})",
            self.sent,
            self.answered(),
            if rcodes.is_empty() {
                "none".to_owned()
            } else {
                rcodes.join(", ")
            }
        )
    }
}

/// Sends `count` packets made by `packet` from 8 sockets (8 source ports of 127.0.1.x),
/// within `limit`, reading replies as they come.
fn udp_flood(
    server: SocketAddr,
    count: usize,
    limit: Duration,
    mut packet: impl FnMut(&mut Rng, usize) -> Vec<u8>,
) -> io::Result<Replies> {
    let sockets: Vec<UdpSocket> = (0..8)
        .map(|n| {
            let socket = net::udp_from(attack_source(n), server)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<io::Result<_>>()?;
    let mut rng = Rng::new(0x5eed_d115);
    let mut replies = Replies::default();
    let mut buffer = vec![0u8; 65536];
    let started = Instant::now();
    let mut drain = |replies: &mut Replies| {
        for socket in &sockets {
            while let Ok(n) = socket.recv(&mut buffer) {
                match net::dns_header(&buffer[..n]) {
                    Some(header) if header.is_response => {
                        let rcode = net::dns_extended_rcode(&buffer[..n])
                            .unwrap_or(u16::from(header.rcode));
                        *replies.rcodes.entry(net::rcode_name(rcode)).or_default() += 1;
                    }
                    _ => replies.not_responses += 1,
                }
            }
        }
    };
    for n in 0..count {
        if started.elapsed() > limit {
            break;
        }
        let bytes = packet(&mut rng, n);
        // A full socket buffer drops the packet, as a real flood would lose it.
        if sockets[n % sockets.len()].send(&bytes).is_ok() {
            replies.sent += 1;
        }
        if n % 64 == 63 {
            drain(&mut replies);
            // Keep the flood modest: the machine has two cores for everyone.
            thread::sleep(Duration::from_micros(500));
        }
    }
    let quiet = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet {
        drain(&mut replies);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(replies)
}

fn random_packets(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let malformed_before = ctx.agent().stat("dns", "malformed_total");
    let count = ctx.scale(20_000, 200_000);
    let valid = net::dns_query(7, LEGIT_HOST, 1, true);
    let replies = udp_flood(
        server,
        count,
        Duration::from_secs(if ctx.fast { 4 } else { 20 }),
        |rng, n| match n % 4 {
            // Pure noise of any length up to 600 bytes.
            0 => {
                let len = rng.below(600) as usize;
                rng.bytes(len)
            }
            // A valid query with one to four bytes changed.
            1 => {
                let mut packet = valid.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(packet.len() as u64) as usize;
                    packet[at] = rng.next_u64() as u8;
                }
                packet
            }
            // A header claiming huge section counts, then noise.
            2 => {
                let mut packet = vec![0x12, 0x34, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff];
                packet.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
                let len = rng.below(100) as usize;
                packet.extend(rng.bytes(len));
                packet
            }
            // A valid query with random bytes appended.
            _ => {
                let mut packet = valid.clone();
                let len = 1 + rng.below(64) as usize;
                packet.extend(rng.bytes(len));
                packet
            }
        },
    )?;
    let malformed = ctx.agent().stat("dns", "malformed_total") - malformed_before;
    let formerr = replies.rcodes.get("FORMERR").copied().unwrap_or(0);
    Ok(Check::new(
        replies.not_responses == 0 && formerr > 0,
        format!(
            "{}; {} replies were not DNS responses; malformed_total +{malformed}",
            replies.describe(),
            replies.not_responses
        ),
    ))
}

/// A query as resolvers send them: EDNS with a Client Subnet option.
fn query_with_ecs(id: u16) -> Vec<u8> {
    let mut packet = net::dns_query(id, &format!("www.{LEGIT_HOST}"), 1, false);
    packet[11] = 1;
    // OPT: root, type 41, size 1232, TTL 0, RDLEN 11, ECS: family 1, /24, scope 0, 3 bytes.
    packet.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11]);
    packet.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, 0, 198, 51, 100]);
    packet
}

fn truncated(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let full = query_with_ecs(0x4242);
    let socket = net::udp_from(attack_source(0), server)?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut wrong = Vec::new();
    let mut buffer = vec![0u8; 4096];
    // UDP: every prefix, each with its own id where it has one.
    for len in 0..full.len() {
        let mut packet = full[..len].to_vec();
        if len >= 2 {
            packet[..2].copy_from_slice(&(0x1000 + len as u16).to_be_bytes());
        }
        // A prefix too short for a header gets no answer: do not wait long for it.
        socket.set_read_timeout(Some(Duration::from_millis(if len < 12 { 50 } else { 300 })))?;
        socket.send(&packet)?;
        let reply = loop {
            match socket.recv(&mut buffer) {
                Ok(n) if len >= 2 && buffer[..2] == packet[..2] => {
                    break Some(buffer[..n].to_vec());
                }
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let rcode = reply.as_deref().and_then(net::dns_header).map(|h| h.rcode);
        let good = if len < 12 {
            reply.is_none()
        } else {
            rcode == Some(1)
        };
        if !good {
            wrong.push(format!(
                "udp {len} bytes: {}",
                rcode.map_or("no reply".into(), |rcode| net::rcode_name(rcode.into()))
            ));
        }
    }
    // TCP: the same prefixes of 12 bytes and more, framed with their own length.
    let mut stream = net::connect_from(attack_source(1), server, Duration::from_secs(3))?;
    for len in 12..full.len() {
        let mut packet = full[..len].to_vec();
        packet[..2].copy_from_slice(&(0x2000 + len as u16).to_be_bytes());
        let mut framed = (len as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&packet);
        let answer = stream
            .write_all(&framed)
            .and_then(|()| net::read_dns_tcp(&mut stream));
        match answer {
            Ok(message) if net::dns_header(&message).is_some_and(|h| h.rcode == 1) => {}
            Ok(message) => wrong.push(format!(
                "tcp {len} bytes: {:?}",
                net::dns_header(&message).map(|h| h.rcode)
            )),
            Err(error) => {
                wrong.push(format!("tcp {len} bytes: {error}"));
                stream = net::connect_from(attack_source(1), server, Duration::from_secs(3))?;
            }
        }
    }
    Ok(Check::new(
        wrong.is_empty(),
        if wrong.is_empty() {
            format!(
                "all {} UDP prefixes and {} TCP prefixes answered as expected",
                full.len(),
                full.len() - 12
            )
        } else {
            format!("unexpected: {}", wrong.join(", "))
        },
    ))
}

/// A query header (id, flags 0, one question, `arcount` additional) followed by `rest`.
fn with_header(id: u16, arcount: u8, rest: &[u8]) -> Vec<u8> {
    let mut packet = id.to_be_bytes().to_vec();
    packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, arcount]);
    packet.extend_from_slice(rest);
    packet
}

fn compression_loops(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let type_a = [0, 1, 0, 1];
    let mut long_name = Vec::new();
    for _ in 0..128 {
        long_name.extend_from_slice(&[1, b'a']);
    }
    long_name.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("pointer to itself", [&[0xc0, 12][..], &type_a].concat()),
        (
            "two pointers to each other",
            [&[0xc0, 14, 0xc0, 12][..], &type_a].concat(),
        ),
        (
            "label then pointer back",
            [&[1, b'a', 0xc0, 12][..], &type_a].concat(),
        ),
        (
            "pointer past the end",
            [&[0xc0, 0xff][..], &type_a].concat(),
        ),
        ("name of 256 bytes", [&long_name[..], &type_a].concat()),
        (
            "reserved label type 0x40",
            [&[0x41, b'a', 0][..], &type_a].concat(),
        ),
        ("label past the end", [&[63, b'a', b'b'][..]].concat()),
    ];
    let mut opt_loop = net::dns_query(0, LEGIT_HOST, 1, false);
    opt_loop[11] = 1;
    // The OPT record's owner is a pointer to itself.
    let at = opt_loop.len() as u8;
    opt_loop.extend_from_slice(&[0xc0, at, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    let mut cases = cases
        .into_iter()
        .map(|(name, rest)| (name, with_header(0, 0, &rest)))
        .collect::<Vec<_>>();
    cases.push(("OPT owner pointing at itself", opt_loop));

    let socket = net::udp_from(attack_source(2), server)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut results = Vec::new();
    let mut all_formerr = true;
    let repeats = ctx.scale(200, 2000);
    for (index, (name, packet)) in cases.iter().enumerate() {
        let mut packet = packet.clone();
        let mut formerr = 0;
        let started = Instant::now();
        for round in 0..repeats {
            let id = (index * 10_000 + round) as u16;
            packet[..2].copy_from_slice(&id.to_be_bytes());
            match net::dns_udp_exchange(&socket, &packet, Duration::from_millis(600)) {
                Ok(reply) if net::dns_header(&reply).is_some_and(|h| h.rcode == 1) => formerr += 1,
                _ => {}
            }
        }
        let per_query_us = started.elapsed().as_secs_f64() * 1e6 / repeats as f64;
        if formerr != repeats {
            all_formerr = false;
        }
        results.push(format!(
            "{name}: {formerr}/{repeats} FORMERR ({per_query_us:.0} µs each)"
        ));
    }
    Ok(Check::new(all_formerr, results.join("; ")))
}

fn bogus_edns(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let base = {
        let mut packet = net::dns_query(0, LEGIT_HOST, 1, false);
        packet[11] = 1;
        packet
    };
    let opt = |size: u16, version: u8, options: &[u8]| {
        let mut record = vec![0, 0, 41];
        record.extend_from_slice(&size.to_be_bytes());
        record.extend_from_slice(&[0, version, 0, 0]);
        record.extend_from_slice(&(options.len() as u16).to_be_bytes());
        record.extend_from_slice(options);
        record
    };
    let ecs = |family: u16, source: u8, scope: u8, address: &[u8]| {
        let mut option = vec![0, 8];
        option.extend_from_slice(&((4 + address.len()) as u16).to_be_bytes());
        option.extend_from_slice(&family.to_be_bytes());
        option.extend_from_slice(&[source, scope]);
        option.extend_from_slice(address);
        option
    };
    let with = |arcount: u8, records: &[Vec<u8>]| {
        let mut packet = base.clone();
        packet[11] = arcount;
        for record in records {
            packet.extend_from_slice(record);
        }
        packet
    };
    let mut non_root = base.clone();
    non_root.extend_from_slice(&[1, b'x', 0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    let mut unknown_options = Vec::new();
    for code in 0..100u16 {
        unknown_options.extend_from_slice(&(65001 + code % 500).to_be_bytes());
        unknown_options.extend_from_slice(&[0, 2, 0xab, 0xcd]);
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "two OPT",
            with(2, &[opt(1232, 0, &[]), opt(1232, 0, &[])]),
            "FORMERR",
        ),
        ("OPT owner not root", non_root, "FORMERR"),
        ("EDNS version 1", with(1, &[opt(1232, 1, &[])]), "BADVERS"),
        (
            "RDLEN past the end",
            {
                let mut packet = with(1, &[opt(1232, 0, &[])]);
                let len = packet.len();
                packet[len - 2..].copy_from_slice(&500u16.to_be_bytes());
                packet
            },
            "FORMERR",
        ),
        (
            "option length past the RDATA",
            with(1, &[opt(1232, 0, &[0, 8, 0, 200, 0, 1, 24, 0])]),
            "FORMERR",
        ),
        (
            "ECS family 3",
            with(1, &[opt(1232, 0, &ecs(3, 24, 0, &[1, 2, 3]))]),
            "FORMERR",
        ),
        (
            "ECS IPv4 /33",
            with(1, &[opt(1232, 0, &ecs(1, 33, 0, &[1, 2, 3, 4, 5]))]),
            "FORMERR",
        ),
        (
            "ECS extra address bytes",
            with(1, &[opt(1232, 0, &ecs(1, 8, 0, &[1, 2, 3, 4]))]),
            "FORMERR",
        ),
        (
            "ECS bits past the prefix",
            with(1, &[opt(1232, 0, &ecs(1, 20, 0, &[10, 20, 0xff]))]),
            "FORMERR",
        ),
        (
            "ECS scope 24 in a query",
            with(1, &[opt(1232, 0, &ecs(1, 24, 24, &[1, 2, 3]))]),
            "FORMERR",
        ),
        (
            "two ECS options",
            with(
                1,
                &[opt(
                    1232,
                    0,
                    &[ecs(1, 24, 0, &[1, 2, 3]), ecs(1, 24, 0, &[1, 2, 3])].concat(),
                )],
            ),
            "FORMERR",
        ),
        ("payload size 0", with(1, &[opt(0, 0, &[])]), "NOERROR"),
        (
            "100 unknown options",
            with(1, &[opt(1232, 0, &unknown_options)]),
            "NOERROR",
        ),
    ];
    let socket = net::udp_from(attack_source(3), server)?;
    let mut wrong = Vec::new();
    let repeats = ctx.scale(20, 500);
    for (index, (name, packet, expected)) in cases.iter().enumerate() {
        let mut packet = packet.clone();
        for round in 0..repeats {
            packet[..2].copy_from_slice(&((index * 1000 + round) as u16).to_be_bytes());
            let got = match net::dns_udp_exchange(&socket, &packet, Duration::from_millis(600)) {
                Ok(reply) => {
                    let rcode = net::dns_extended_rcode(&reply)
                        .or_else(|| net::dns_header(&reply).map(|h| u16::from(h.rcode)))
                        .unwrap_or(999);
                    if *name == "payload size 0" && reply.len() > 512 {
                        format!("{} bytes over UDP with size 0", reply.len())
                    } else {
                        net::rcode_name(rcode)
                    }
                }
                Err(_) => "no reply".to_owned(),
            };
            if got != *expected {
                wrong.push(format!("{name}: {got}, expected {expected}"));
                break;
            }
        }
    }
    Ok(Check::new(
        wrong.is_empty(),
        if wrong.is_empty() {
            format!(
                "all {} cases answered as RFC 6891/7871 say, {repeats} times each",
                cases.len()
            )
        } else {
            wrong.join("; ")
        },
    ))
}

fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = (message.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(message);
    out
}

fn tcp_length_tricks(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let timeout = Duration::from_secs(3);
    let mut results = Vec::new();
    let mut ok = true;
    let mut source = 10;
    let mut connect = || {
        source += 1;
        net::connect_from(attack_source(source), server, timeout)
    };

    // 1. The prefix and the message trickled a byte at a time.
    {
        let mut stream = connect()?;
        let query = framed(&net::dns_query(1, LEGIT_HOST, 1, true));
        for byte in &query {
            stream.write_all(std::slice::from_ref(byte))?;
            thread::sleep(Duration::from_millis(5));
        }
        let answer = net::read_dns_tcp(&mut stream);
        let good = answer
            .as_ref()
            .ok()
            .and_then(|m| net::dns_header(m))
            .is_some_and(|h| h.id == 1 && h.rcode == 0);
        ok &= good;
        results.push(format!(
            "byte-by-byte: {}",
            if good { "answered" } else { "NOT answered" }
        ));
    }
    // 2. A length shorter than the message: the first part is a truncated query.
    {
        let mut stream = connect()?;
        let query = net::dns_query(2, LEGIT_HOST, 1, true);
        let mut bytes = 20u16.to_be_bytes().to_vec();
        bytes.extend_from_slice(&query);
        stream.write_all(&bytes)?;
        let first = net::read_dns_tcp(&mut stream);
        let good = first
            .as_ref()
            .ok()
            .and_then(|m| net::dns_header(m))
            .is_some_and(|h| h.rcode == 1);
        ok &= good;
        results.push(format!(
            "short length: {}",
            if good { "FORMERR" } else { "no FORMERR" }
        ));
    }
    // 3. Length 0.
    {
        let mut stream = connect()?;
        stream.write_all(&[0, 0])?;
        stream.write_all(&framed(&net::dns_query(3, LEGIT_HOST, 1, false)))?;
        let after = net::read_dns_tcp(&mut stream);
        let outcome = match after {
            Ok(message) => format!(
                "then answered {}",
                net::dns_header(&message).map_or("?".into(), |h| net::rcode_name(h.rcode.into()))
            ),
            Err(_) => "closed".to_owned(),
        };
        results.push(format!("zero length: {outcome}"));
    }
    // 4. 200 pipelined queries in one write: 200 answers, in order.
    {
        let mut stream = connect()?;
        let mut batch = Vec::new();
        for id in 0..200u16 {
            batch.extend(framed(&net::dns_query(1000 + id, LEGIT_HOST, 1, false)));
        }
        stream.write_all(&batch)?;
        let mut in_order = 0;
        for id in 0..200u16 {
            match net::read_dns_tcp(&mut stream) {
                Ok(message) if net::dns_header(&message).is_some_and(|h| h.id == 1000 + id) => {
                    in_order += 1;
                }
                _ => break,
            }
        }
        ok &= in_order == 200;
        results.push(format!("200 pipelined: {in_order} answered in order"));
    }
    // 5. 1100 pipelined: the query budget (1000) ends the connection.
    {
        let mut stream = connect()?;
        let mut batch = Vec::new();
        for id in 0..1100u16 {
            batch.extend(framed(&net::dns_query(id, LEGIT_HOST, 1, false)));
        }
        // The server may close while we write; that is the point.
        let _ = stream.write_all(&batch);
        let mut answered = 0;
        while net::read_dns_tcp(&mut stream).is_ok() {
            answered += 1;
        }
        ok &= answered == 1000;
        results.push(format!("1100 pipelined: {answered} answered, then closed"));
    }
    // 6. A response (QR=1) is ignored; the next query is answered.
    {
        let mut stream = connect()?;
        let mut response = net::dns_query(6, LEGIT_HOST, 1, false);
        response[2] |= 0x80;
        stream.write_all(&framed(&response))?;
        stream.write_all(&framed(&net::dns_query(7, LEGIT_HOST, 1, false)))?;
        let next = net::read_dns_tcp(&mut stream);
        let good = next
            .as_ref()
            .ok()
            .and_then(|m| net::dns_header(m))
            .is_some_and(|h| h.id == 7);
        ok &= good;
        results.push(format!(
            "response sent as query: {}",
            if good {
                "ignored, next answered"
            } else {
                "next query NOT answered"
            }
        ));
    }
    // 7. Query, then half-close: the answer still comes (RFC 7766 §6.2.4 lets a client
    // close its side once it sent its queries).
    {
        let mut stream = connect()?;
        stream.write_all(&framed(&net::dns_query(8, LEGIT_HOST, 1, false)))?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let answer = net::read_dns_tcp(&mut stream);
        let good = answer
            .as_ref()
            .ok()
            .and_then(|m| net::dns_header(m))
            .is_some_and(|h| h.id == 8);
        ok &= good;
        results.push(format!(
            "half-closed after query: {}",
            if good { "answered" } else { "NOT answered" }
        ));
    }
    Ok(Check::new(ok, results.join("; ")))
}

/// Opens `count` TCP connections to `server`, `per_source` from each attack source starting
/// at `first_source`, as fast as the server accepts them; connections the server refuses
/// or resets are counted, not returned.
fn open_many(
    server: SocketAddr,
    count: usize,
    per_source: usize,
    first_source: usize,
) -> (Vec<TcpStream>, usize) {
    let mut streams = Vec::with_capacity(count);
    let mut refused = 0;
    for n in 0..count {
        let source = attack_source(first_source + n / per_source.max(1));
        match net::connect_from(source, server, Duration::from_secs(2)) {
            Ok(stream) => {
                let _ = stream.set_nonblocking(true);
                streams.push(stream);
            }
            Err(_) => refused += 1,
        }
    }
    (streams, refused)
}

/// How many of `streams` the peer has closed (EOF or reset). Data is read and discarded.
pub(crate) fn count_closed(streams: &mut [TcpStream]) -> usize {
    let mut scratch = [0u8; 1024];
    streams
        .iter()
        .filter(|stream| {
            let _ = stream.set_nonblocking(true);
            let mut reader: &TcpStream = stream;
            loop {
                match reader.read(&mut scratch) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            }
        })
        .count()
}

fn tcp_idle_hold(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    // One address that wants 15: the per-address cap closes 5 at once.
    let (mut greedy, _) = open_many(server, 15, 15, 500);
    thread::sleep(Duration::from_millis(300));
    let greedy_closed = count_closed(&mut greedy);
    // Then many addresses, 10 each, more than the table holds.
    let count = ctx.scale(1200, 3000);
    let started = Instant::now();
    let (mut held, refused) = open_many(server, count, 10, 600);
    let mut max_active = 0f64;
    let mut all_closed_after = None;
    // The fast run checks the caps for 3 s; the full run waits for the idle timeout.
    let hold = Duration::from_secs(if ctx.fast { 3 } else { 14 });
    while started.elapsed() < hold {
        max_active = max_active.max(ctx.agent().stat("dns", "tcp_active"));
        let closed = count_closed(&mut held);
        if closed == held.len() {
            all_closed_after = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let evicted = ctx.agent().stat("dns", "tcp_evicted_total");
    let closed = count_closed(&mut held);
    let ok = greedy_closed == 5 && max_active <= 1000.0 && (ctx.fast || all_closed_after.is_some());
    Ok(Check::new(
        ok,
        format!(
            "one address opening 15: {greedy_closed} closed at once; {count} from {} addresses: \
             {refused} refused at connect, at most {max_active} active, {evicted} evicted in all, \
             {closed}/{} closed {}",
            count.div_ceil(10),
            held.len(),
            all_closed_after.map_or(
                format!("(not all within {:.0} s)", hold.as_secs_f64()),
                |after| format!("within {:.1} s", after.as_secs_f64())
            )
        ),
    ))
}

fn tcp_half_open(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().dns;
    let count = ctx.scale(400, 900);
    let started = Instant::now();
    let (mut held, refused) = open_many(server, count, 10, 2000);
    let query = framed(&net::dns_query(9, LEGIT_HOST, 1, true));
    // Every connection sends the length and part of the message, then trickles one byte a
    // second (never finishing within the deadline).
    for stream in &mut held {
        let _ = stream.write_all(&query[..5]);
    }
    // A few half-close in the middle of a message: EOF there ends the connection.
    let mut half_closed: Vec<TcpStream> = (0..10)
        .filter_map(|n| {
            let mut stream =
                net::connect_from(attack_source(3000 + n), server, Duration::from_secs(2)).ok()?;
            stream.write_all(&query[..5]).ok()?;
            stream.shutdown(std::net::Shutdown::Write).ok()?;
            Some(stream)
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    let half_closed_gone = count_closed(&mut half_closed);
    let mut sent = 5;
    let mut all_closed_after = None;
    while started.elapsed() < Duration::from_secs(14) {
        if sent < query.len() - 1 {
            for stream in &mut held {
                let _ = stream.write_all(&query[sent..sent + 1]);
            }
            sent += 1;
        }
        if count_closed(&mut held) == held.len() {
            all_closed_after = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    let closed = count_closed(&mut held);
    Ok(Check::new(
        all_closed_after.is_some() && half_closed_gone == half_closed.len(),
        format!(
            "{count} connections trickling a query ({refused} refused at connect): {closed}/{} \
             closed {}; {half_closed_gone}/{} half-closed mid-message closed within 1 s",
            held.len(),
            all_closed_after.map_or("(not all within 14 s)".into(), |after| format!(
                "within {:.1} s",
                after.as_secs_f64()
            )),
            half_closed.len()
        ),
    ))
}
