//! HTTP/2 attacks, with frames written by hand (RFC 9113) over prior-knowledge cleartext
//! HTTP/2 on the plain listener: rapid reset (CVE-2023-44487), CONTINUATION floods
//! (CVE-2024-27316 class), HPACK bombs, SETTINGS/PING/WINDOW_UPDATE and empty-frame floods,
//! zero-window stalls and stream-count exhaustion.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::harness::{LEGIT_HOST, Setup};
use super::net::{self, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "h2-rapid-reset",
            fast: true,
            setup: Setup::File,
            expected: "streams opened and cancelled at once (HEADERS + RST_STREAM) are bounded: GOAWAY ENHANCE_YOUR_CALM (or close) after a small number, and only a small fraction reaches the origin",
            peers: "nginx: keepalive_requests (1000) and http2_max_concurrent_streams (128) bound it, and 1.25.3 \"improved detection of misbehaving clients when using HTTP/2\"; HAProxy: not affected (streams count toward tune.h2.fe.max-total-streams; glitches are counted)",
            limits: Limits::DEFAULT,
            run: rapid_reset,
        },
        Attack {
            name: "h2-continuation-flood",
            fast: true,
            setup: Setup::File,
            expected: "a header block continued without end (16 KiB CONTINUATION frames, or empty ones) is cut once it passes the header list limit (32 KiB): the connection closes with an error, memory does not follow the flood",
            peers: "nginx: large_client_header_buffers bounds the block, fixed for CVE-2024-27316's class; HAProxy: tune.bufsize (16 KiB) bounds the block; Apache httpd 2.4.59 fixed CVE-2024-27316",
            limits: Limits::DEFAULT,
            run: continuation_flood,
        },
        Attack {
            name: "h2-hpack-bomb",
            fast: true,
            setup: Setup::File,
            expected: "a 4 KB dynamic-table entry referenced 10,000 times (10 KB on the wire, 40 MB decoded) is refused once the decoded list passes 32 KiB (431, RST_STREAM or GOAWAY); a table size update above SETTINGS_HEADER_TABLE_SIZE is a connection error (COMPRESSION_ERROR by RFC 7541 §6.3 and RFC 9113 §4.3)",
            peers: "nginx: http2 header size bounded by large_client_header_buffers; HAProxy: tune.bufsize; both answer a decoded list over the limit with an error, not memory",
            limits: Limits::DEFAULT,
            run: hpack_bomb,
        },
        Attack {
            name: "h2-control-floods",
            fast: true,
            setup: Setup::File,
            expected: "a client that reads nothing and floods SETTINGS or PING (each owed an acknowledgement) meets backpressure or a close, so replies do not queue without bound; WINDOW_UPDATE, PRIORITY and empty DATA floods cost only their reading; a window pushed past 2^31-1 is FLOW_CONTROL_ERROR (RFC 9113 §6.9.1); memory stays flat",
            peers: "nginx fixed CVE-2019-9512/9515/9516/9518 (ping, settings, 0-length headers, empty frames) by limiting queued control frames; HAProxy counts them as glitches (tune.h2.fe.glitches-threshold)",
            limits: Limits::DEFAULT,
            run: control_floods,
        },
        Attack {
            name: "h2-zero-window",
            fast: false,
            setup: Setup::File,
            expected: "100 streams of a 1 MiB response to a client that advertises a zero window hold at most the flow-control window and the origin buffer each; memory stays bounded; other clients are served",
            peers: "nginx: send_timeout 60s closes a client that reads nothing; HAProxy: timeout client",
            limits: Limits {
                settle: Duration::from_secs(5),
                ..Limits::DEFAULT
            },
            run: zero_window,
        },
        Attack {
            name: "h2-stream-exhaustion",
            fast: false,
            setup: Setup::File,
            expected: "one connection opening 300 POST streams that never send their bodies gets REFUSED_STREAM past the concurrent stream limit (256) and does not take the origin's connection slots from other clients (issue 17 finding 2)",
            peers: "nginx: http2_max_concurrent_streams 128 and buffers request bodies before the upstream connection; HAProxy: tune.h2.fe.max-concurrent-streams 100, option http-buffer-request",
            limits: Limits {
                settle: Duration::from_secs(5),
                ..Limits::DEFAULT
            },
            run: stream_exhaustion,
        },
    ]
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

mod kind {
    pub(super) const DATA: u8 = 0;
    pub(super) const HEADERS: u8 = 1;
    pub(super) const PRIORITY: u8 = 2;
    pub(super) const RST_STREAM: u8 = 3;
    pub(super) const SETTINGS: u8 = 4;
    pub(super) const PING: u8 = 6;
    pub(super) const GOAWAY: u8 = 7;
    pub(super) const WINDOW_UPDATE: u8 = 8;
    pub(super) const CONTINUATION: u8 = 9;
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// RFC 9113 §4.1: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in pairs {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(kind::SETTINGS, 0, 0, &payload)
}

/// RFC 7541 §5.1: an integer with an N-bit prefix, `flags` in the prefix byte's high bits.
fn hpack_int(out: &mut Vec<u8>, value: usize, prefix_bits: u8, flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// RFC 7541 §6.2.2: literal field without indexing, new name, no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_int(out, name.len(), 7, 0);
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// A request's header block: `method` and `path` for the legitimate host over `http`.
fn request_block(method: &str, path: &str) -> Vec<u8> {
    request_block_for(LEGIT_HOST, method, path)
}

fn request_block_for(host: &str, method: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", method.as_bytes());
    // Static index 6 is `:scheme: http` (RFC 7541 Appendix A).
    block.push(0x86);
    hpack_literal(&mut block, ":path", path.as_bytes());
    hpack_literal(&mut block, ":authority", host.as_bytes());
    block
}

/// What the server sent on one connection, tallied by a reader thread.
#[derive(Debug, Default)]
struct Seen {
    frames: BTreeMap<u8, u64>,
    /// Responses by `:status`, when it could be read from the block's first field.
    statuses: BTreeMap<String, u64>,
    rst_codes: BTreeMap<u32, u64>,
    /// The first answer on each stream: a status, or `RST_STREAM <code>`.
    streams: BTreeMap<u32, String>,
    goaway: Option<(u32, u32)>,
    data_bytes: u64,
    closed: bool,
}

impl Seen {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        let responses: u64 = self.statuses.values().sum();
        if responses > 0 {
            parts.push(format!("{responses} responses {:?}", self.statuses));
        }
        let resets: u64 = self.rst_codes.values().sum();
        if resets > 0 {
            let codes: Vec<String> = self
                .rst_codes
                .iter()
                .map(|(code, n)| format!("{} {n}", error_name(*code)))
                .collect();
            parts.push(format!("RST_STREAM {}", codes.join(", ")));
        }
        if let Some((last, code)) = self.goaway {
            parts.push(format!("GOAWAY {} (last stream {last})", error_name(code)));
        }
        if self.closed {
            parts.push("closed".to_owned());
        }
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// RFC 9113 §7 error codes.
fn error_name(code: u32) -> String {
    match code {
        0x0 => "NO_ERROR".into(),
        0x1 => "PROTOCOL_ERROR".into(),
        0x2 => "INTERNAL_ERROR".into(),
        0x3 => "FLOW_CONTROL_ERROR".into(),
        0x5 => "STREAM_CLOSED".into(),
        0x6 => "FRAME_SIZE_ERROR".into(),
        0x7 => "REFUSED_STREAM".into(),
        0x8 => "CANCEL".into(),
        0x9 => "COMPRESSION_ERROR".into(),
        0xb => "ENHANCE_YOUR_CALM".into(),
        other => format!("error {other:#x}"),
    }
}

/// A client connection: the writer half, and a thread reading and tallying frames.
struct H2 {
    stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
    reader: Option<JoinHandle<()>>,
}

impl H2 {
    /// Connects from attack source `source`, sends the preface and `settings`, and, when
    /// `read`, starts a thread that reads everything the server sends.
    fn connect(
        server: SocketAddr,
        source: usize,
        settings_pairs: &[(u16, u32)],
        read: bool,
    ) -> io::Result<H2> {
        let mut stream = net::connect_from(attack_source(source), server, Duration::from_secs(5))?;
        stream.write_all(PREFACE)?;
        stream.write_all(&settings(settings_pairs))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        // The server's preface is a SETTINGS frame; acknowledge it here, before any other
        // thread writes, so frames of two writers never interleave.
        loop {
            let (kind, flags, _, payload) = read_frame(&mut stream)?;
            if kind == kind::SETTINGS && flags & 1 == 0 {
                stream.write_all(&frame(kind::SETTINGS, 1, 0, &[]))?;
                break;
            }
            tally(&mut seen.lock().expect("seen lock"), kind, 0, &payload);
        }
        let reader = if read {
            let mut reading = stream.try_clone()?;
            reading.set_read_timeout(None)?;
            let seen = Arc::clone(&seen);
            Some(thread::spawn(move || {
                loop {
                    let Ok((kind, _, stream_id, payload)) = read_frame(&mut reading) else {
                        seen.lock().expect("seen lock").closed = true;
                        return;
                    };
                    tally(
                        &mut seen.lock().expect("seen lock"),
                        kind,
                        stream_id,
                        &payload,
                    );
                }
            }))
        } else {
            None
        };
        Ok(H2 {
            stream,
            seen,
            reader,
        })
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn closed_or_goaway(&self) -> bool {
        let seen = self.seen.lock().expect("seen lock");
        seen.closed || seen.goaway.is_some()
    }

    /// Waits up to `wait` for the server to close, then closes and returns what was seen.
    fn finish(mut self, wait: Duration) -> Seen {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.seen.lock().expect("seen lock").closed {
            thread::sleep(Duration::from_millis(20));
        }
        // Whether the server closed, before our own shutdown ends the reader too.
        let closed_by_server = self.seen.lock().expect("seen lock").closed;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut seen = std::mem::take(&mut *self.seen.lock().expect("seen lock"));
        seen.closed = closed_by_server;
        seen
    }
}

fn tally(seen: &mut Seen, kind: u8, stream_id: u32, payload: &[u8]) {
    *seen.frames.entry(kind).or_default() += 1;
    match kind {
        kind::HEADERS => {
            let status = status_of(payload);
            seen.streams
                .entry(stream_id)
                .or_insert_with(|| status.clone());
            *seen.statuses.entry(status).or_default() += 1;
        }
        kind::DATA => seen.data_bytes += payload.len() as u64,
        kind::RST_STREAM if payload.len() >= 4 => {
            let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            seen.streams
                .entry(stream_id)
                .or_insert_with(|| format!("RST_STREAM {}", error_name(code)));
            *seen.rst_codes.entry(code).or_default() += 1;
        }
        kind::GOAWAY if payload.len() >= 8 => {
            let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            seen.goaway = Some((last & 0x7fff_ffff, code));
        }
        _ => {}
    }
}

/// The `:status` of a response header block, when its first field carries it in a way a
/// few lines can read: a static-table index (RFC 7541 Appendix A, 8-14) or a literal with
/// name index 8 (plain or Huffman-coded digits). "other" otherwise.
fn status_of(block: &[u8]) -> String {
    // A PADDED or PRIORITY flag would shift the block; the agent's server sends neither.
    match block.first() {
        Some(0x88) => "200".into(),
        Some(0x89) => "204".into(),
        Some(0x8a) => "206".into(),
        Some(0x8b) => "304".into(),
        Some(0x8c) => "400".into(),
        Some(0x8d) => "404".into(),
        Some(0x8e) => "500".into(),
        Some(0x48 | 0x08 | 0x18) => {
            let Some(&length) = block.get(1) else {
                return "other".into();
            };
            let bytes = block.get(2..2 + usize::from(length & 0x7f)).unwrap_or(&[]);
            if length & 0x80 == 0 {
                String::from_utf8_lossy(bytes).into_owned()
            } else {
                huffman_digits(bytes).unwrap_or_else(|| "other".into())
            }
        }
        _ => "other".into(),
    }
}

/// Decodes a Huffman-coded string of decimal digits (RFC 7541 Appendix B: `0`-`2` are the
/// 5-bit codes 0-2, `3`-`9` the 6-bit codes 0x19-0x1f).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let mut bits = 0u64;
    let mut n_bits = 0u32;
    let mut out = String::new();
    for &byte in bytes {
        bits = (bits << 8) | u64::from(byte);
        n_bits += 8;
        loop {
            if n_bits >= 5 {
                let five = (bits >> (n_bits - 5)) & 0x1f;
                if five <= 2 {
                    out.push((b'0' + five as u8) as char);
                    n_bits -= 5;
                    continue;
                }
            }
            if n_bits >= 6 {
                let six = (bits >> (n_bits - 6)) & 0x3f;
                if (0x19..=0x1f).contains(&six) {
                    out.push((b'3' + (six - 0x19) as u8) as char);
                    n_bits -= 6;
                    continue;
                }
            }
            break;
        }
        bits &= (1u64 << n_bits) - 1;
    }
    // What is left must be EOS padding: all ones, fewer than 8 bits.
    (n_bits < 8 && bits == (1u64 << n_bits) - 1 && !out.is_empty()).then_some(out)
}

fn read_frame(stream: &mut TcpStream) -> io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header)?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload)?;
    let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    Ok((header[3], header[4], stream_id, payload))
}

/// GETs each of `paths` on `host` on its own stream of one prior-knowledge HTTP/2
/// connection; returns each path's first answer (a status or a reset), after up to 3 s.
pub(crate) fn probe_paths(server: SocketAddr, host: &str, paths: &[&str]) -> Vec<(String, String)> {
    let Ok(mut h2) = H2::connect(server, 1700, &[], true) else {
        return paths
            .iter()
            .map(|path| ((*path).to_owned(), "connect failed".to_owned()))
            .collect();
    };
    let mut bytes = Vec::new();
    for (n, path) in paths.iter().enumerate() {
        bytes.extend(frame(
            kind::HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * n as u32,
            &request_block_for(host, "GET", path),
        ));
    }
    let _ = h2.send(&bytes);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && h2.seen.lock().expect("seen lock").streams.len() < paths.len()
        && !h2.closed_or_goaway()
    {
        thread::sleep(Duration::from_millis(20));
    }
    let seen = h2.finish(Duration::ZERO);
    paths
        .iter()
        .enumerate()
        .map(|(n, path)| {
            let answer = seen
                .streams
                .get(&(1 + 2 * n as u32))
                .cloned()
                .unwrap_or_else(|| format!("no answer ({})", seen.describe()));
            ((*path).to_owned(), answer)
        })
        .collect()
}

fn rapid_reset(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let streams_per_connection = ctx.scale(20_000, 100_000);
    let connections = ctx.scale(1, 4);
    let limit = Duration::from_secs(if ctx.fast { 4 } else { 10 });
    let origin_before = ctx.lab.origin.log.requests.load(Relaxed);
    let mut sent_total = 0u64;
    let mut outcomes = Vec::new();
    let mut bounded = true;
    for connection in 0..connections {
        let mut h2 = H2::connect(server, 1000 + connection, &[], true)?;
        let started = Instant::now();
        let mut sent = 0u64;
        let mut stream_id = 1u32;
        let block = request_block("GET", "/rapid-reset");
        'flood: while (sent as usize) < streams_per_connection && started.elapsed() < limit {
            let mut batch = Vec::new();
            for _ in 0..100 {
                batch.extend(frame(
                    kind::HEADERS,
                    END_STREAM | END_HEADERS,
                    stream_id,
                    &block,
                ));
                batch.extend(frame(kind::RST_STREAM, 0, stream_id, &8u32.to_be_bytes()));
                stream_id += 2;
            }
            if h2.send(&batch).is_err() || h2.closed_or_goaway() {
                sent += 100;
                break 'flood;
            }
            sent += 100;
        }
        let seen = h2.finish(Duration::from_secs(2));
        bounded &= seen.goaway.is_some() || seen.closed;
        outcomes.push(format!("{sent} streams sent: {}", seen.describe()));
        sent_total += sent;
    }
    // Let the origin finish what reached it.
    thread::sleep(Duration::from_millis(500));
    let reached = ctx.lab.origin.log.requests.load(Relaxed) - origin_before;
    let fraction = reached as f64 / sent_total.max(1) as f64;
    Ok(Check::new(
        bounded && fraction < 0.1,
        format!(
            "{}; {reached} requests reached the origin ({:.2} %)",
            outcomes.join("; "),
            fraction * 100.0
        ),
    ))
}

fn continuation_flood(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let limit = Duration::from_secs(if ctx.fast { 3 } else { 10 });
    let max_bytes = ctx.scale(64, 512) * 1024 * 1024;
    let mut results = Vec::new();
    let mut ok = true;
    for (variant, source) in [("16 KiB fragments", 1100), ("empty frames", 1101)] {
        let mut h2 = H2::connect(server, source, &[], true)?;
        let block = request_block("GET", "/continuation");
        h2.send(&frame(kind::HEADERS, END_STREAM, 1, &block))?;
        // Valid HPACK literals, 16 KiB per frame, so only the list size can stop them.
        let mut fragment = Vec::new();
        while fragment.len() < 16_000 {
            hpack_literal(&mut fragment, "x-flood", &[b'a'; 1000]);
        }
        let payload: &[u8] = if variant == "empty frames" {
            &[]
        } else {
            &fragment
        };
        let one = frame(kind::CONTINUATION, 0, 1, payload);
        let batch: Vec<u8> = one.repeat(if payload.is_empty() { 1000 } else { 4 });
        let started = Instant::now();
        let mut written = 0usize;
        h2.stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        while written < max_bytes && started.elapsed() < limit {
            if h2.send(&batch).is_err() || h2.closed_or_goaway() {
                break;
            }
            written += batch.len();
        }
        let seen = h2.finish(Duration::from_secs(3));
        let stopped = seen.closed || seen.goaway.is_some();
        ok &= stopped;
        results.push(format!(
            "{variant}: {} KiB written in {:.1} s, then {}",
            written / 1024,
            started.elapsed().as_secs_f64(),
            seen.describe()
        ));
    }
    Ok(Check::new(ok, results.join("; ")))
}

fn hpack_bomb(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let streams = ctx.scale(20, 200);
    let mut results = Vec::new();
    let mut ok = true;

    // 1. The bomb: one 4000-byte value into the dynamic table, then 10,000 references.
    let mut h2 = H2::connect(server, 1200, &[], true)?;
    let mut refused = 0;
    for n in 0..streams {
        let stream_id = 1 + 2 * n as u32;
        let mut block = request_block("GET", "/hpack-bomb");
        if n == 0 {
            // Literal with incremental indexing, new name (RFC 7541 §6.2.1).
            block.push(0x40);
            hpack_int(&mut block, 6, 7, 0);
            block.extend_from_slice(b"x-bomb");
            hpack_int(&mut block, 4000, 7, 0);
            block.extend_from_slice(&[b'b'; 4000]);
        }
        // Index 62: the newest dynamic entry.
        block.extend(std::iter::repeat_n(0xbe, 10_000));
        let mut bytes = Vec::new();
        let mut chunks = block.chunks(16_000).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let flags = if last { END_HEADERS } else { 0 } | if first { END_STREAM } else { 0 };
            let kind = if first {
                kind::HEADERS
            } else {
                kind::CONTINUATION
            };
            bytes.extend(frame(kind, flags, stream_id, chunk));
            first = false;
        }
        if h2.send(&bytes).is_err() || h2.closed_or_goaway() {
            break;
        }
        refused += 1;
    }
    thread::sleep(Duration::from_millis(300));
    let seen = h2.finish(Duration::from_secs(2));
    let served = seen.statuses.get("200").copied().unwrap_or(0);
    ok &= served == 0;
    results.push(format!("{refused} bomb streams sent: {}", seen.describe()));

    // 2. A dynamic table size update far above the 4096 the server allows.
    let mut h2 = H2::connect(server, 1201, &[], true)?;
    let mut block = Vec::new();
    hpack_int(&mut block, 1 << 30, 5, 0x20);
    block.extend(request_block("GET", "/hpack-size"));
    h2.send(&frame(kind::HEADERS, END_STREAM | END_HEADERS, 1, &block))?;
    let seen = h2.finish(Duration::from_secs(3));
    // RFC 9113 §4.3 names COMPRESSION_ERROR; any connection error stops the attack.
    let refused = seen.goaway.is_some_and(|(_, code)| code != 0);
    ok &= refused;
    results.push(format!("table size update to 2^30: {}", seen.describe()));
    Ok(Check::new(ok, results.join("; ")))
}

fn control_floods(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let limit = Duration::from_secs(if ctx.fast { 1 } else { 5 });
    let mut results = Vec::new();
    let mut ok = true;
    // (name, the flood's frame, a frame opening the stream it needs)
    let floods = [
        ("SETTINGS", settings(&[(0x4, 65_535)]), None),
        ("PING", frame(kind::PING, 0, 0, &[7; 8]), None),
        (
            "WINDOW_UPDATE +1",
            frame(kind::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
            None,
        ),
        (
            "PRIORITY",
            frame(kind::PRIORITY, 0, 3, &[0, 0, 0, 1, 16]),
            None,
        ),
        (
            "empty DATA",
            frame(kind::DATA, 0, 1, &[]),
            Some(frame(
                kind::HEADERS,
                END_HEADERS,
                1,
                &request_block("POST", "/empty-data"),
            )),
        ),
    ];
    for (n, (name, one, opening)) in floods.iter().enumerate() {
        // The flooding client never reads: replies pile up on the server's side.
        let mut h2 = H2::connect(server, 1300 + n, &[], false)?;
        if let Some(opening) = opening {
            h2.send(opening)?;
        }
        h2.stream
            .set_write_timeout(Some(Duration::from_millis(500)))?;
        let batch = one.repeat(1000);
        let started = Instant::now();
        let mut written = 0usize;
        let mut outcome = "still reading at the end";
        // A flood owed acknowledgements runs until the server pushes back (about 11 MiB of
        // frames here), within 64 MiB and 10 s; the others for the time limit.
        let owed = matches!(*name, "SETTINGS" | "PING");
        let (time_limit, byte_limit) = if owed {
            (Duration::from_secs(10), 64 * 1024 * 1024)
        } else {
            (limit, usize::MAX)
        };
        while started.elapsed() < time_limit && written < byte_limit {
            match h2.stream.write(&batch) {
                Ok(n) => written += n,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    outcome = "stopped reading (backpressure)";
                    break;
                }
                Err(_) => {
                    outcome = "closed";
                    break;
                }
            }
        }
        let frames = written / one.len();
        results.push(format!(
            "{name}: {frames} frames ({} KiB) then {outcome}",
            written / 1024
        ));
        // Frames the server must answer (SETTINGS and PING acknowledgements) must meet
        // backpressure or a close: otherwise replies queue without bound (CVE-2019-9512,
        // CVE-2019-9515). The others cost the server no more than reading them.
        if owed {
            ok &= outcome != "still reading at the end";
        }
    }
    // A window pushed past 2^31-1: FLOW_CONTROL_ERROR (RFC 9113 §6.9.1).
    let mut h2 = H2::connect(server, 1350, &[], true)?;
    h2.send(&frame(
        kind::WINDOW_UPDATE,
        0,
        0,
        &0x7fff_ffffu32.to_be_bytes(),
    ))?;
    h2.send(&frame(
        kind::WINDOW_UPDATE,
        0,
        0,
        &0x7fff_ffffu32.to_be_bytes(),
    ))?;
    let seen = h2.finish(Duration::from_secs(3));
    let flow_error = seen.goaway.is_some_and(|(_, code)| code == 0x3);
    ok &= flow_error;
    results.push(format!("window past 2^31-1: {}", seen.describe()));
    Ok(Check::new(ok, results.join("; ")))
}

fn zero_window(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let connections = ctx.scale(1, 2);
    let streams = 100;
    let hold = Duration::from_secs(if ctx.fast { 3 } else { 20 });
    let mut clients = Vec::new();
    for connection in 0..connections {
        // SETTINGS_INITIAL_WINDOW_SIZE = 0: no stream may send a byte of DATA.
        let mut h2 = H2::connect(server, 1400 + connection, &[(0x4, 0)], true)?;
        let mut bytes = Vec::new();
        for n in 0..streams {
            bytes.extend(frame(
                kind::HEADERS,
                END_STREAM | END_HEADERS,
                1 + 2 * n,
                &request_block("GET", "/big-zero-window"),
            ));
        }
        h2.send(&bytes)?;
        clients.push(h2);
    }
    thread::sleep(hold);
    let results: Vec<String> = clients
        .into_iter()
        .map(|h2| {
            let data = h2.seen.lock().expect("seen lock").data_bytes;
            let seen = h2.finish(Duration::ZERO);
            format!("{} DATA bytes received; {}", data, seen.describe())
        })
        .collect();
    Ok(Check::new(
        true,
        format!(
            "{connections}×{streams} streams of 1 MiB with a zero window held {:.0} s: {}",
            hold.as_secs_f64(),
            results.join("; ")
        ),
    ))
}

fn stream_exhaustion(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let server = ctx.agent().http;
    let streams = 300u32;
    let hold = Duration::from_secs(if ctx.fast { 5 } else { 15 });
    let mut h2 = H2::connect(server, 1500, &[], true)?;
    let mut bytes = Vec::new();
    for n in 0..streams {
        let mut block = request_block("POST", "/never-sent-body");
        hpack_literal(&mut block, "content-length", b"1000");
        bytes.extend(frame(kind::HEADERS, END_HEADERS, 1 + 2 * n, &block));
    }
    h2.send(&bytes)?;
    thread::sleep(hold);
    let seen = h2.finish(Duration::ZERO);
    let refused = seen.rst_codes.get(&0x7).copied().unwrap_or(0);
    Ok(Check::new(
        refused > 0,
        format!(
            "{streams} POST streams without bodies held {:.0} s: {}",
            hold.as_secs_f64(),
            seen.describe()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_c_1() {
        let mut out = Vec::new();
        hpack_int(&mut out, 10, 5, 0);
        assert_eq!(out, [10]);
        out.clear();
        hpack_int(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10]);
    }

    #[test]
    fn statuses_are_read_from_static_literal_and_huffman_forms() {
        assert_eq!(status_of(&[0x88]), "200");
        assert_eq!(status_of(&[0x48, 0x03, b'4', b'3', b'1']), "431");
        // "302" Huffman-coded (RFC 7541 C.6.1): 0x64 0x02.
        assert_eq!(status_of(&[0x48, 0x82, 0x64, 0x02]), "302");
        assert_eq!(status_of(&[0xbe]), "other");
    }
}
