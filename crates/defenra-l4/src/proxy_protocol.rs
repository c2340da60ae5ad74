//! PROXY protocol version 2 header (HAProxy's proxy-protocol.txt, section 2.2).

use std::net::{IpAddr, SocketAddr};

/// Section 2.2: the fixed 12-byte signature that starts every v2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 (high nibble), command PROXY (low nibble 1).
const VERSION_PROXY: u8 = 0x21;
/// AF_INET (0x1_) or AF_INET6 (0x2_) with STREAM (0x_1).
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

/// The header announcing a TCP connection from `source` (the client) to `destination`
/// (the address the client connected to). When the families differ, both are written as
/// IPv6, IPv4 addresses mapped (section 2.2 allows only one family per header).
pub(crate) fn header_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let source_ip = source.ip().to_canonical();
    let destination_ip = destination.ip().to_canonical();
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    match (source_ip, destination_ip) {
        (IpAddr::V4(source_ip), IpAddr::V4(destination_ip)) => {
            header.push(TCP_OVER_IPV4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&source_ip.octets());
            header.extend_from_slice(&destination_ip.octets());
        }
        (source_ip, destination_ip) => {
            let as_v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            header.push(TCP_OVER_IPV6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&as_v6(source_ip).octets());
            header.extend_from_slice(&as_v6(destination_ip).octets());
        }
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_spec_layout() {
        let header = header_v2(
            "192.0.2.1:56324".parse().unwrap(),
            "198.51.100.7:443".parse().unwrap(),
        );
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expected.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        expected.extend_from_slice(&56324u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(header, expected);
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let header = header_v2(
            "[2001:db8::1]:1000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(
            &header[32..48],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn mapped_ipv4_is_written_as_ipv4() {
        let header = header_v2(
            "[::ffff:10.0.0.1]:1000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(&header[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&header[16..20], &[10, 0, 0, 1]);
    }
}
