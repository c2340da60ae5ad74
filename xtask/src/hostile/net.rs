//! Client-side building blocks the attacks and the legitimate clients share: a seeded random
//! generator, sockets bound to a chosen loopback source, a TLS client, a small HTTP/1
//! response reader and DNS message helpers.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

/// xorshift64*: reproducible garbage without a dependency. Not for anything secret.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// The `n`-th attack source address: 127.0.1.1, 127.0.1.2, ... (never 127.0.0.1, which
/// the legitimate clients use, so per-address caps the agent applies to an attacker do
/// not count the legitimate client).
pub(crate) fn attack_source(n: usize) -> Ipv4Addr {
    let n = n % (250 * 250);
    Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, 1 + (n % 250) as u8)
}

/// A TCP connection from `source` to `address`, with `timeout` for the connect and for
/// every read and write after it.
pub(crate) fn connect_from(
    source: Ipv4Addr,
    address: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&address.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// A UDP socket bound to `source` on an ephemeral port, `connect`ed to `address`.
pub(crate) fn udp_from(source: Ipv4Addr, address: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((source, 0))?;
    socket.connect(address)?;
    Ok(socket)
}

/// A rustls client trusting only `root`, offering `alpn`.
pub(crate) fn tls_client(
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    // Every legitimate request pays a full handshake, as a new visitor does.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A TLS session over `stream` for `host`, handshake completed.
pub(crate) fn tls_connect(
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    stream: TcpStream,
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let connection = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|error| io::Error::other(error.to_string()))?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// The first TLS flight of a fresh client for `host`: the bytes of its ClientHello record.
pub(crate) fn client_hello(config: &Arc<rustls::ClientConfig>, host: &str) -> Vec<u8> {
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return Vec::new();
    };
    let Ok(mut connection) = rustls::ClientConnection::new(Arc::clone(config), name) else {
        return Vec::new();
    };
    let mut hello = Vec::new();
    while connection.wants_write() {
        if connection.write_tls(&mut hello).is_err() {
            break;
        }
    }
    hello
}

/// One HTTP/1.1 response as read off a connection.
#[derive(Debug, Default)]
pub(crate) struct Response {
    pub(crate) status: u16,
    /// The head as received, status line included, up to the blank line.
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Reads one response (after `buffered`, bytes already read past the previous one) and
/// returns it with whatever followed it. Understands `Content-Length`, chunked bodies and
/// bodies that end at close; `head_only` for answers to HEAD.
pub(crate) fn read_response(
    stream: &mut impl Read,
    buffered: &mut Vec<u8>,
    head_only: bool,
) -> io::Result<Response> {
    let head_end = loop {
        if let Some(end) = find(buffered, b"\r\n\r\n") {
            break end + 4;
        }
        check_size(buffered)?;
        if fill(stream, buffered)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of response head", buffered.len()),
            ));
        }
    };
    let head = String::from_utf8_lossy(&buffered[..head_end]).into_owned();
    buffered.drain(..head_end);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let mut response = Response {
        status,
        head,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response);
    }
    if let Some(length) = response
        .header("content-length")
        .and_then(|value| value.parse::<usize>().ok())
    {
        while buffered.len() < length {
            if fill(stream, buffered)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside the body",
                ));
            }
        }
        response.body = buffered.drain(..length).collect();
    } else if response
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let line_end = loop {
                if let Some(end) = find(buffered, b"\r\n") {
                    break end;
                }
                if fill(stream, buffered)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed inside a chunk",
                    ));
                }
            };
            let size_text = String::from_utf8_lossy(&buffered[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            while buffered.len() < line_end + 2 + size + 2 {
                if fill(stream, buffered)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed inside a chunk",
                    ));
                }
            }
            response
                .body
                .extend_from_slice(&buffered[line_end + 2..line_end + 2 + size]);
            buffered.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else {
        while fill(stream, buffered)? > 0 {
            check_size(buffered)?;
        }
        response.body = std::mem::take(buffered);
    }
    Ok(response)
}

/// Sends `request` on a new connection from `source` and reads one response.
pub(crate) fn http_once(
    source: Ipv4Addr,
    address: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = connect_from(source, address, timeout)?;
    stream.write_all(request)?;
    read_response(&mut stream, &mut Vec::new(), request.starts_with(b"HEAD"))
}

/// What became of a connection after a request the server should refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fate {
    /// A response with this status, then the connection closed within the wait.
    AnsweredThenClosed(u16),
    /// A response with this status, and the connection stayed open.
    AnsweredKeptOpen(u16),
    /// Closed (or reset) without a response.
    ClosedSilently,
    /// Nothing within the wait.
    Hung,
}

impl std::fmt::Display for Fate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fate::AnsweredThenClosed(status) => write!(f, "{status}+close"),
            Fate::AnsweredKeptOpen(status) => write!(f, "{status}+open"),
            Fate::ClosedSilently => write!(f, "closed"),
            Fate::Hung => write!(f, "hung"),
        }
    }
}

/// Writes `request` (ignoring write errors: the server may close early) and watches the
/// connection for `wait`: the first response's status, and whether the server closed.
pub(crate) fn fate_of(stream: &mut TcpStream, request: &[u8], wait: Duration) -> Fate {
    let _ = stream.write_all(request);
    let deadline = Instant::now() + wait;
    let _ = stream.set_read_timeout(Some(wait));
    let mut buffered = Vec::new();
    let response = read_response(stream, &mut buffered, false);
    let status = match response {
        Ok(response) => response.status,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Fate::Hung;
        }
        Err(_) => return Fate::ClosedSilently,
    };
    // A server that closes after an error response does so at once.
    let close_wait = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_millis(500));
    if closes_within(stream, close_wait) {
        Fate::AnsweredThenClosed(status)
    } else {
        Fate::AnsweredKeptOpen(status)
    }
}

/// Whether the peer closes (EOF or reset) within `wait`; bytes it sends are discarded.
pub(crate) fn closes_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut scratch = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match stream.read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn fill(stream: &mut impl Read, buffered: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk)?;
    buffered.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// The clients never expect more than a few MiB; a server that sends more is broken.
fn check_size(buffered: &[u8]) -> io::Result<()> {
    if buffered.len() > 64 * 1024 * 1024 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "response larger than 64 MiB",
        ));
    }
    Ok(())
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// DNS: a query for `name` and `qtype` with id `id`, with an EDNS OPT record (1232 bytes)
/// when `edns`.
pub(crate) fn dns_query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut packet = id.to_be_bytes().to_vec();
    // RD=0 (an authoritative server is asked directly); one question; one OPT if EDNS.
    packet.extend_from_slice(&[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    push_name(&mut packet, name);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    if edns {
        // RFC 6891 §6.1.2: root owner, type OPT (41), class = UDP size, TTL = ext-rcode,
        // version, flags; no options.
        packet.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    packet
}

pub(crate) fn push_name(packet: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() {
            continue;
        }
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
}

/// The header fields of a DNS message the checks look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DnsHeader {
    pub(crate) id: u16,
    pub(crate) is_response: bool,
    pub(crate) truncated: bool,
    /// The header's 4-bit RCODE (an OPT record may extend it).
    pub(crate) rcode: u8,
    pub(crate) answers: u16,
}

pub(crate) fn dns_header(message: &[u8]) -> Option<DnsHeader> {
    if message.len() < 12 {
        return None;
    }
    Some(DnsHeader {
        id: u16::from_be_bytes([message[0], message[1]]),
        is_response: message[2] & 0x80 != 0,
        truncated: message[2] & 0x02 != 0,
        rcode: message[3] & 0x0f,
        answers: u16::from_be_bytes([message[6], message[7]]),
    })
}

/// The extended RCODE of a response: the OPT record's upper 8 bits joined to the header's
/// 4 (RFC 6891 §6.1.3), when the response's last record is an OPT record with a root owner.
pub(crate) fn dns_extended_rcode(message: &[u8]) -> Option<u16> {
    let header = dns_header(message)?;
    // An OPT record ends with TTL(4) RDLEN(2) RDATA; find the last "00 00 29" owner+type
    // whose RDLEN reaches exactly the end of the message.
    let mut position = message.len().checked_sub(11)?;
    if position < 12 {
        return None;
    }
    loop {
        if message[position] == 0 && message[position + 1] == 0 && message[position + 2] == 41 {
            let rdlen =
                u16::from_be_bytes([message[position + 9], message[position + 10]]) as usize;
            if position + 11 + rdlen == message.len() {
                let upper = u16::from(message[position + 5]);
                return Some((upper << 4) | u16::from(header.rcode));
            }
        }
        if position == 12 {
            return None;
        }
        position -= 1;
    }
}

/// Name of a DNS RCODE (RFC 1035 §4.1.1, RFC 6891 §9).
pub(crate) fn rcode_name(rcode: u16) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        16 => "BADVERS".into(),
        other => format!("RCODE{other}"),
    }
}

/// Sends `query` over UDP from `socket` and waits for the response with the same id,
/// trying twice (a stub resolver's retry) within `timeout` in total.
pub(crate) fn dns_udp_exchange(
    socket: &UdpSocket,
    query: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let id = dns_header(query).map_or(0, |header| header.id);
    let mut buffer = vec![0u8; 4096];
    let deadline = Instant::now() + timeout;
    for attempt in 0..2 {
        socket.send(query)?;
        let attempt_deadline = if attempt == 0 {
            Instant::now() + timeout / 2
        } else {
            deadline
        };
        loop {
            let left = attempt_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buffer) {
                Ok(n) if dns_header(&buffer[..n]).is_some_and(|h| h.id == id) => {
                    return Ok(buffer[..n].to_vec());
                }
                Ok(_) => continue,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no DNS answer"))
}

/// Sends `query` over a new TCP connection from `source` with its 2-byte length prefix
/// (RFC 1035 §4.2.2) and reads one framed response.
pub(crate) fn dns_tcp_exchange(
    source: Ipv4Addr,
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let mut stream = connect_from(source, server, timeout)?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed)?;
    read_dns_tcp(&mut stream)
}

/// Reads one length-prefixed DNS message.
pub(crate) fn read_dns_tcp(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut length = [0u8; 2];
    stream.read_exact(&mut length)?;
    let mut message = vec![0u8; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut message)?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_by_length_chunks_and_close() {
        let mut buffered = Vec::new();
        let mut input: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\nHTTP/1.0 400 Bad\r\n\r\ntail";
        let first = read_response(&mut input, &mut buffered, false).unwrap();
        assert_eq!((first.status, first.body.as_slice()), (200, &b"abc"[..]));
        let second = read_response(&mut input, &mut buffered, false).unwrap();
        assert_eq!((second.status, second.body.as_slice()), (404, &b"xy"[..]));
        let third = read_response(&mut input, &mut buffered, false).unwrap();
        assert_eq!((third.status, third.body.as_slice()), (400, &b"tail"[..]));
        assert!(read_response(&mut input, &mut buffered, false).is_err());
    }

    #[test]
    fn dns_queries_parse_back_and_opt_extends_the_rcode() {
        let query = dns_query(0xbeef, "legit.test", 1, true);
        let header = dns_header(&query).unwrap();
        assert_eq!(
            (header.id, header.is_response, header.answers),
            (0xbeef, false, 0)
        );
        // The query's own OPT record has extended RCODE bits 0: NOERROR.
        assert_eq!(dns_extended_rcode(&query), Some(0));
        let mut badvers = query.clone();
        // Upper RCODE bits 1 with header RCODE 0 = 16, BADVERS.
        let opt = badvers.len() - 11;
        badvers[opt + 5] = 1;
        assert_eq!(rcode_name(dns_extended_rcode(&badvers).unwrap()), "BADVERS");
        assert_eq!(dns_extended_rcode(&dns_query(1, "a.test", 1, false)), None);
    }

    #[test]
    fn attack_sources_never_take_the_legitimate_address() {
        assert!((0..100_000).all(|n| attack_source(n) != Ipv4Addr::LOCALHOST));
        assert_eq!(attack_source(0), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(attack_source(250), Ipv4Addr::new(127, 0, 2, 1));
    }
}
