//! HTTP/1 attacks: slowloris, oversized and numerous header fields, request smuggling
//! variants, pipelined garbage, huge chunk sizes, idle keep-alive hoarding, and slow
//! uploads that hold origin slots. (Clients that do not read are not here: on loopback the
//! socket buffers take a response of a few MiB whole, so such a client holds nothing.)

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::dns::count_closed;
use super::harness::{LEGIT_HOST, Setup};
use super::net::{self, Fate, Rng, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "h1-slowloris",
            fast: true,
            setup: Setup::File,
            expected: "thousands of connections trickling a request head a byte at a time cost a descriptor and a few KiB each and are closed when the head is not complete 30 s (header_read_timeout) after accept, however steadily bytes arrive",
            peers: "nginx: client_header_timeout 60s (408), large_client_header_buffers 4 8k; HAProxy: timeout http-request (whole head), maxconn",
            limits: Limits {
                settle: Duration::from_secs(8),
                ..Limits::DEFAULT
            },
            run: slowloris,
        },
        Attack {
            name: "h1-oversized-headers",
            fast: true,
            setup: Setup::File,
            expected: "a head over 32 KiB or with over 100 fields gets 431 and the connection closes; an endless head (16 MiB at most) is cut at the limit and the writer stopped (the agent reads at most 256 KiB more and drops them: the lingering close); a 30 KiB cookie (under the limit) is served",
            peers: "nginx: large_client_header_buffers 4 8k (400 \"Request Header Or Cookie Too Large\", 414 for the URI); HAProxy: tune.bufsize 16k, tune.http.maxhdr 101 (400)",
            limits: Limits::DEFAULT,
            run: oversized_headers,
        },
        Attack {
            name: "h1-smuggling",
            fast: true,
            setup: Setup::File,
            expected: "CL+TE, TE+CL, differing or listed Content-Length, a transfer coding on HTTP/1.0, space before the colon, bare CR, obs-fold, NUL and chunk-size overflow get 400 and close (RFC 9112 §6.1, §5.1, §5.2, §2.2); unknown codings 501; the request hidden in the body never reaches the origin",
            peers: "nginx ≥ 1.21.1: 400 for CL+TE and for spaces or control characters in the request line and header names, 501 for unknown codings; HAProxy: 400 for differing or invalid Content-Length, and for CL+TE lets TE win, drops CL and closes after the response (RFC 9112 §6.3)",
            limits: Limits::DEFAULT,
            run: smuggling,
        },
        Attack {
            name: "h1-pipelined-garbage",
            fast: true,
            setup: Setup::File,
            expected: "50 pipelined GETs followed by 64 KiB of binary garbage: 50 responses in order, then 400 and close",
            peers: "nginx and HAProxy answer the valid requests, then 400 and close",
            limits: Limits::DEFAULT,
            run: pipelined_garbage,
        },
        Attack {
            name: "h1-huge-chunk-size",
            fast: true,
            setup: Setup::File,
            expected: "an overflowing or negative chunk size, a 10,000-digit size or a 100 KiB chunk extension gets 400; a chunk larger than the body limit 413 (100 MiB); 100,000 one-byte chunks are served; nothing waits for data that never comes",
            peers: "nginx: 400 on chunk-size overflow, client_max_body_size 1m (413); HAProxy: 400 on overflow",
            limits: Limits::DEFAULT,
            run: huge_chunk_size,
        },
        Attack {
            name: "h1-keepalive-hoard",
            fast: false,
            setup: Setup::File,
            expected: "thousands of idle keep-alive connections after one request each cost a descriptor and a few KiB; new clients are served; they close after keepalive_timeout (75 s)",
            peers: "nginx: keepalive_timeout 75s, worker_connections; HAProxy: timeout http-keep-alive, maxconn",
            limits: Limits {
                settle: Duration::from_secs(5),
                ..Limits::DEFAULT
            },
            run: keepalive_hoard,
        },
        Attack {
            name: "h1-slow-upload",
            fast: false,
            setup: Setup::File,
            expected: "300 uploads trickling a byte every 2 s do not take the origin's connection slots from other clients (issue 17 finding 2); they end with 408 when the body stalls",
            peers: "nginx: buffers request bodies (client_body_buffer_size) before opening the upstream connection, client_body_timeout 60s (408); HAProxy: option http-buffer-request, timeout client",
            limits: Limits {
                settle: Duration::from_secs(5),
                ..Limits::DEFAULT
            },
            run: slow_upload,
        },
    ]
}

/// Opens `count` connections from `per_source` connections per attack source (starting at
/// `first_source`), writing `first` on each. Connections refused are counted.
fn open_writing(
    server: SocketAddr,
    count: usize,
    per_source: usize,
    first_source: usize,
    first: &[u8],
) -> (Vec<TcpStream>, usize) {
    let mut streams = Vec::with_capacity(count);
    let mut refused = 0;
    for n in 0..count {
        let source = attack_source(first_source + n / per_source);
        match net::connect_from(source, server, Duration::from_secs(2)) {
            Ok(mut stream) => {
                if stream.write_all(first).is_ok() {
                    let _ = stream.set_nonblocking(true);
                    streams.push(stream);
                } else {
                    refused += 1;
                }
            }
            Err(_) => refused += 1,
        }
    }
    (streams, refused)
}

fn slowloris(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let count = ctx.scale(1000, 3000);
    let hold = Duration::from_secs(if ctx.fast { 4 } else { 40 });
    let started = Instant::now();
    let head = format!("GET /slowloris HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n");
    let (mut streams, refused) = open_writing(server, count, 100, 0, head.as_bytes());
    let opened = streams.len();
    let trickle = b"X-Trickle: a\r\n";
    let mut round = 0;
    let mut all_closed_after = None;
    while started.elapsed() < hold {
        // One byte per connection per second: the head never completes.
        let byte = [trickle[round % trickle.len()]];
        for stream in &mut streams {
            let _ = stream.write(&byte);
        }
        round += 1;
        thread::sleep(Duration::from_secs(1));
        if count_closed(&mut streams) == opened {
            all_closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed = count_closed(&mut streams);
    let held_for = started.elapsed();
    drop(streams);
    let observed = format!(
        "{opened} opened ({refused} refused), trickled for {:.0} s: {closed} closed by the agent{}",
        held_for.as_secs_f64(),
        all_closed_after.map_or(String::new(), |after| format!(
            ", all within {:.1} s",
            after.as_secs_f64()
        ))
    );
    // The fast run holds them for 4 s, well inside the 30 s timeout: only the legitimate
    // clients and the resources are judged. The full run waits for the timeout.
    let ok = ctx.fast || all_closed_after.is_some_and(|after| after < Duration::from_secs(36));
    Ok(Check::new(ok, observed))
}

/// Most bytes the endless-head attack writes.
const ENDLESS_HEAD: usize = 16 << 20;

fn oversized_headers(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let wait = Duration::from_secs(3);
    let request = |extra: &str| {
        format!("GET /big-head HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n{extra}\r\n").into_bytes()
    };
    let many_fields: String = (0..150).map(|n| format!("X-F{n}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "one 64 KiB field",
            request(&format!("X-Big: {}\r\n", "a".repeat(64 * 1024))),
            &[431],
        ),
        ("150 fields", request(&many_fields), &[431]),
        (
            "100 KiB target",
            format!(
                "GET /{} HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n\r\n",
                "a".repeat(100 * 1024)
            )
            .into_bytes(),
            &[414, 431],
        ),
        (
            "30 KiB cookie",
            request(&format!("Cookie: c={}\r\n", "b".repeat(30 * 1024))),
            &[200],
        ),
    ];
    let mut results = Vec::new();
    let mut ok = true;
    let repeats = ctx.scale(5, 50);
    for (name, bytes, expected) in &cases {
        let mut fates = std::collections::BTreeMap::new();
        for n in 0..repeats {
            let fate = match net::connect_from(attack_source(100 + n), server, wait) {
                Ok(mut stream) => net::fate_of(&mut stream, bytes, wait),
                Err(_) => Fate::ClosedSilently,
            };
            let good = match fate {
                Fate::AnsweredThenClosed(status) => expected.contains(&status),
                Fate::AnsweredKeptOpen(status) => status == 200 && expected.contains(&200),
                _ => false,
            };
            ok &= good;
            *fates.entry(fate.to_string()).or_insert(0) += 1;
        }
        results.push(format!("{name}: {fates:?}"));
    }
    // An endless head: up to 16 MiB of header lines, streamed; the agent should answer and
    // close long before the end. (It reads at most 256 KiB more after its answer, the
    // lingering close; the kernel's socket buffers take up to a few MiB more before the
    // reset stops the writer.)
    let mut endless = net::connect_from(attack_source(99), server, wait)?;
    endless.write_all(request("").strip_suffix(b"\r\n").unwrap_or_default())?;
    let line = b"X-Endless: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut written = 0usize;
    while written < ENDLESS_HEAD {
        if endless.write_all(line).is_err() {
            break;
        }
        written += line.len();
    }
    let fate = net::fate_of(&mut endless, b"", wait);
    ok &= written < ENDLESS_HEAD
        && matches!(fate, Fate::AnsweredThenClosed(431) | Fate::ClosedSilently);
    results.push(format!(
        "endless head: the agent stopped it after {} KiB ({fate})",
        written / 1024
    ));
    Ok(Check::new(ok, results.join("; ")))
}

/// One smuggling variant: the bytes (with `{SMUGGLED}` replaced by a hidden request for
/// `/smuggled-TAG`) and the statuses that are right.
struct Variant {
    tag: &'static str,
    bytes: String,
    expected: &'static [u16],
}

fn smuggling(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let host = LEGIT_HOST;
    let hidden = |tag: &str| format!("GET /smuggled-{tag} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let chunked_hidden = |tag: &str| {
        let request = hidden(tag);
        format!("{:x}\r\n{request}\r\n0\r\n\r\n", request.len())
    };
    let post = |tag: &str, fields: &str, body: &str| Variant {
        tag: "",
        bytes: format!("POST /front-{tag} HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n{body}"),
        expected: &[400],
    };
    let with = |variant: Variant, tag: &'static str, expected: &'static [u16]| Variant {
        tag,
        expected,
        ..variant
    };
    let variants = vec![
        with(
            post(
                "clte",
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                &chunked_hidden("clte"),
            ),
            "clte",
            &[400],
        ),
        with(
            post(
                "tecl",
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                &chunked_hidden("tecl"),
            ),
            "tecl",
            &[400],
        ),
        with(
            post(
                "dupcl",
                &format!(
                    "Content-Length: 0\r\nContent-Length: {}\r\n",
                    hidden("dupcl").len()
                ),
                &hidden("dupcl"),
            ),
            "dupcl",
            &[400],
        ),
        with(
            post(
                "samecl",
                &format!(
                    "Content-Length: {0}\r\nContent-Length: {0}\r\n",
                    hidden("samecl").len()
                ),
                &hidden("samecl"),
            ),
            "samecl",
            // RFC 9110 §8.6 lets a recipient accept identical values as one.
            &[200, 400],
        ),
        with(
            post(
                "clist",
                &format!("Content-Length: 0, {}\r\n", hidden("clist").len()),
                &hidden("clist"),
            ),
            "clist",
            &[400],
        ),
        with(
            post("clplus", "Content-Length: +5\r\n", "hello"),
            "clplus",
            &[400],
        ),
        with(
            post(
                "xchunked",
                "Transfer-Encoding: xchunked\r\n",
                &chunked_hidden("xchunked"),
            ),
            "xchunked",
            &[400, 501],
        ),
        with(
            post(
                "chunkedid",
                "Transfer-Encoding: chunked, identity\r\n",
                &chunked_hidden("chunkedid"),
            ),
            "chunkedid",
            &[400, 501],
        ),
        with(
            post(
                "tespace",
                "Transfer-Encoding : chunked\r\nContent-Length: 4\r\n",
                &chunked_hidden("tespace"),
            ),
            "tespace",
            &[400],
        ),
        with(
            post(
                "tefold",
                "Content-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n",
                &chunked_hidden("tefold"),
            ),
            "tefold",
            &[400],
        ),
        with(
            post("obsfold", "X-Folded: a\r\n b\r\nContent-Length: 0\r\n", ""),
            "obsfold",
            &[400],
        ),
        with(
            post(
                "lfte",
                "Content-Length: 4\nTransfer-Encoding: chunked\r\n",
                &chunked_hidden("lfte"),
            ),
            "lfte",
            &[400],
        ),
        with(
            post(
                "crte",
                "Content-Length: 4\rTransfer-Encoding: chunked\r\n",
                &chunked_hidden("crte"),
            ),
            "crte",
            &[400],
        ),
        with(
            post("nul", "X-Nul: a\0b\r\nContent-Length: 0\r\n", ""),
            "nul",
            &[400],
        ),
        with(
            post(
                "namespace",
                &format!("Content Length: {}\r\n", hidden("namespace").len()),
                &hidden("namespace"),
            ),
            "namespace",
            &[400],
        ),
        Variant {
            tag: "http10te",
            bytes: format!(
                "POST /front-http10te HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                chunked_hidden("http10te")
            ),
            expected: &[400],
        },
        Variant {
            tag: "barelf",
            bytes: format!(
                "POST /front-barelf HTTP/1.1\nHost: {host}\nContent-Length: {}\n\n{}",
                hidden("barelf").len(),
                hidden("barelf")
            ),
            // RFC 9112 §2.2: a recipient MAY accept a bare LF as a line terminator.
            expected: &[200, 400],
        },
        with(
            post(
                "chunkoverflow",
                "Transfer-Encoding: chunked\r\n",
                &format!(
                    "10000000000000005\r\nhello\r\n0\r\n\r\n{}",
                    hidden("chunkoverflow")
                ),
            ),
            "chunkoverflow",
            &[400],
        ),
        Variant {
            tag: "lowerversion",
            bytes: format!("GET /front-lowerversion http/1.1\r\nHost: {host}\r\n\r\n"),
            expected: &[400],
        },
    ];
    let mut wrong = Vec::new();
    let mut smuggled = Vec::new();
    let mut summary = Vec::new();
    for (n, variant) in variants.iter().enumerate() {
        let mut stream = net::connect_from(attack_source(200 + n), server, Duration::from_secs(3))?;
        let fate = net::fate_of(
            &mut stream,
            variant.bytes.as_bytes(),
            Duration::from_secs(2),
        );
        let status = match fate {
            Fate::AnsweredThenClosed(status) | Fate::AnsweredKeptOpen(status) => Some(status),
            _ => None,
        };
        let right = status.is_some_and(|status| variant.expected.contains(&status))
            && (status == Some(200) || matches!(fate, Fate::AnsweredThenClosed(_)));
        if !right {
            wrong.push(format!("{}: {fate}", variant.tag));
        }
        summary.push(format!("{} {fate}", variant.tag));
    }
    // Give the origin a moment to log anything that got through.
    thread::sleep(Duration::from_millis(300));
    for variant in &variants {
        if ctx
            .lab
            .origin
            .log
            .saw(&format!("/smuggled-{}", variant.tag))
        {
            smuggled.push(variant.tag);
        }
    }
    let ok = wrong.is_empty() && smuggled.is_empty();
    Ok(Check::new(
        ok,
        format!(
            "{}{}{}",
            summary.join(", "),
            if wrong.is_empty() {
                String::new()
            } else {
                format!("; UNEXPECTED: {}", wrong.join(", "))
            },
            if smuggled.is_empty() {
                "; no hidden request reached the origin".to_owned()
            } else {
                format!("; SMUGGLED to the origin: {}", smuggled.join(", "))
            }
        ),
    ))
}

fn pipelined_garbage(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let connections = ctx.scale(10, 100);
    let mut rng = Rng::new(0x9a4b);
    let mut results = std::collections::BTreeMap::new();
    let mut ok = true;
    for n in 0..connections {
        let mut stream = net::connect_from(attack_source(300 + n), server, Duration::from_secs(5))?;
        let mut bytes = Vec::new();
        for i in 0..50 {
            bytes.extend_from_slice(
                format!("GET /pipelined-{i} HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n\r\n").as_bytes(),
            );
        }
        bytes.extend(rng.bytes(64 * 1024));
        let writer = {
            let mut stream = stream.try_clone()?;
            thread::spawn(move || {
                let _ = stream.write_all(&bytes);
            })
        };
        let mut buffered = Vec::new();
        let mut statuses = Vec::new();
        let ended = loop {
            match net::read_response(&mut stream, &mut buffered, false) {
                Ok(response) => {
                    statuses.push(response.status);
                    if statuses.len() > 60 {
                        break "more".to_owned();
                    }
                }
                Err(error) => break format!("{:?}", error.kind()),
            }
        };
        let _ = writer.join();
        let in_order = statuses.iter().take(50).filter(|s| **s == 200).count();
        let last = statuses.get(50).copied();
        ok &= in_order == 50 && matches!(last, Some(400) | None) && statuses.len() <= 51;
        *results
            .entry(format!("{in_order}×200 then {last:?} ({ended})"))
            .or_insert(0) += 1;
    }
    Ok(Check::new(
        ok,
        format!("{connections} connections: {results:?}"),
    ))
}

fn huge_chunk_size(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let head = format!(
        "POST /chunks HTTP/1.1\r\nHost: {LEGIT_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut tiny = String::new();
    for _ in 0..100_000 {
        tiny.push_str("1\r\na\r\n");
    }
    tiny.push_str("0\r\n\r\n");
    let cases: Vec<(&str, String, &[u16])> = vec![
        ("72-bit size", "ffffffffffffffffff\r\nabc".into(), &[400]),
        ("size 2^63-1", "7fffffffffffffff\r\nabc".into(), &[400, 413]),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n".into(), &[400]),
        (
            "10,000-digit size",
            format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(10_000)),
            &[400, 200],
        ),
        (
            "100 KiB extension",
            format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024)),
            &[400],
        ),
        ("100,000 one-byte chunks", tiny, &[200]),
    ];
    let mut results = Vec::new();
    let mut ok = true;
    for (n, (name, body, expected)) in cases.iter().enumerate() {
        let mut stream = net::connect_from(attack_source(400 + n), server, Duration::from_secs(5))?;
        let started = Instant::now();
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        let fate = net::fate_of(&mut stream, &bytes, Duration::from_secs(5));
        let status = match fate {
            Fate::AnsweredThenClosed(status) | Fate::AnsweredKeptOpen(status) => Some(status),
            _ => None,
        };
        let good = status.is_some_and(|status| expected.contains(&status));
        ok &= good;
        results.push(format!(
            "{name}: {fate} in {:.0} ms{}",
            started.elapsed().as_secs_f64() * 1000.0,
            if good { "" } else { " (UNEXPECTED)" }
        ));
    }
    Ok(Check::new(ok, results.join("; ")))
}

fn keepalive_hoard(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let count = ctx.scale(2000, 10_000);
    let request = format!("GET /hoard HTTP/1.1\r\nHost: {LEGIT_HOST}\r\n\r\n");
    let mut streams = Vec::with_capacity(count);
    let mut failed = 0;
    for n in 0..count {
        let attempt = (|| -> io::Result<TcpStream> {
            let mut stream =
                net::connect_from(attack_source(500 + n / 200), server, Duration::from_secs(5))?;
            stream.write_all(request.as_bytes())?;
            let response = net::read_response(&mut stream, &mut Vec::new(), false)?;
            if response.status != 200 {
                return Err(io::Error::other(format!("status {}", response.status)));
            }
            Ok(stream)
        })();
        match attempt {
            Ok(stream) => streams.push(stream),
            Err(_) => failed += 1,
        }
    }
    let hold = Duration::from_secs(if ctx.fast { 3 } else { 80 });
    let started = Instant::now();
    let mut all_closed_after = None;
    while started.elapsed() < hold {
        thread::sleep(Duration::from_secs(1));
        if count_closed(&mut streams) == streams.len() {
            all_closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed = count_closed(&mut streams);
    let observed = format!(
        "{} kept alive ({failed} failed), held {:.0} s: {closed} closed by the agent{}",
        streams.len(),
        started.elapsed().as_secs_f64(),
        all_closed_after.map_or(String::new(), |after| format!(
            " (all within {:.0} s)",
            after.as_secs_f64()
        ))
    );
    let ok = failed == 0 && (ctx.fast || all_closed_after.is_some());
    Ok(Check::new(ok, observed))
}

fn slow_upload(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let count = ctx.scale(100, 300);
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: {LEGIT_HOST}\r\nContent-Length: 1000000\r\n\r\nx");
    let (mut streams, refused) = open_writing(server, count, 50, 700, head.as_bytes());
    let started = Instant::now();
    let hold = Duration::from_secs(if ctx.fast { 6 } else { 20 });
    while started.elapsed() < hold {
        for stream in &mut streams {
            let _ = stream.write(b"x");
        }
        thread::sleep(Duration::from_secs(2));
    }
    let closed = count_closed(&mut streams);
    Ok(Check::new(
        true,
        format!(
            "{} slow uploads ({refused} refused) for {:.0} s: {closed} ended by the agent",
            streams.len(),
            started.elapsed().as_secs_f64()
        ),
    ))
}
