//! L4 target (`l4_proxy_header`). The forwarders parse no bytes: TCP payloads and UDP
//! datagrams pass through untouched, and sessions are keyed by the peer address the
//! kernel reports. The one byte format the crate makes is the PROXY protocol v2 header a
//! destination receives, which that destination parses; this target writes it for any
//! pair of addresses and reads it back with a strict reader written from HAProxy's
//! proxy-protocol.txt (section 2.2), independent of the crate's writer.
//!
//! Checks: the header has the v2 signature, version 2 and command PROXY, TCP over the
//! right family, a length that matches the address block exactly, and carries the
//! client's and the listener's addresses and ports (IPv4-mapped addresses as IPv4; both
//! as IPv6 when the families differ).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Input;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Target `l4_proxy_header`: `data` chooses two socket addresses.
pub fn proxy_header(data: &[u8]) {
    let mut input = Input::new(data);
    let source = socket_addr(&mut input);
    let destination = socket_addr(&mut input);
    let header = defenra_l4::fuzzing::proxy_header_v2(source, destination);
    let (read_source, read_destination) = read_v2(&header);
    let (want_source, want_destination) =
        match (source.ip().to_canonical(), destination.ip().to_canonical()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
            (s, d) => (IpAddr::V6(as_v6(s)), IpAddr::V6(as_v6(d))),
        };
    assert_eq!(read_source, SocketAddr::new(want_source, source.port()));
    assert_eq!(
        read_destination,
        SocketAddr::new(want_destination, destination.port())
    );
}

fn socket_addr(input: &mut Input<'_>) -> SocketAddr {
    let kind = input.u8();
    let ip = match kind % 3 {
        0 => {
            let bytes = input.take(4);
            let mut octets = [0; 4];
            octets[..bytes.len()].copy_from_slice(bytes);
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        1 => {
            let bytes = input.take(16);
            let mut octets = [0; 16];
            octets[..bytes.len()].copy_from_slice(bytes);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => {
            let bytes = input.take(4);
            let mut octets = [0; 4];
            octets[..bytes.len()].copy_from_slice(bytes);
            IpAddr::V6(Ipv4Addr::from(octets).to_ipv6_mapped())
        }
    };
    SocketAddr::new(ip, input.u16())
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Reads a whole v2 header of a TCP connection: (source, destination).
fn read_v2(header: &[u8]) -> (SocketAddr, SocketAddr) {
    assert!(header.len() >= 16, "shorter than the fixed part");
    assert_eq!(&header[..12], SIGNATURE, "signature");
    assert_eq!(header[12], 0x21, "version 2, command PROXY");
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    assert_eq!(header.len(), 16 + len, "length field");
    let block = &header[16..];
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match header[13] {
        0x11 => {
            assert_eq!(len, 12, "TCP over IPv4 address block");
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[at],
                    block[at + 1],
                    block[at + 2],
                    block[at + 3],
                ))
            };
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 => {
            assert_eq!(len, 36, "TCP over IPv6 address block");
            let ip = |at: usize| {
                let mut octets = [0; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        other => panic!("family and protocol byte {other:#04x}"),
    }
}
