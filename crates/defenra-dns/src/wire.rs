//! Query parsing and response header/OPT writing on raw bytes, without allocating.
//!
//! The server reads queries with this hand-written parser rather than hickory-proto's
//! `Message` because it runs once per packet and must neither allocate nor trust the input;
//! tests build and check messages with hickory-proto instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name in wire form (RFC 1035 §2.3.4).
const MAX_WIRE_NAME: usize = 255;

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_NS: u16 = 2;
pub(crate) const TYPE_CNAME: u16 = 5;
pub(crate) const TYPE_SOA: u16 = 6;
pub(crate) const TYPE_MX: u16 = 15;
pub(crate) const TYPE_TXT: u16 = 16;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_SRV: u16 = 33;
pub(crate) const TYPE_OPT: u16 = 41;
pub(crate) const TYPE_CAA: u16 = 257;
pub(crate) const TYPE_IXFR: u16 = 251;
pub(crate) const TYPE_AXFR: u16 = 252;
pub(crate) const TYPE_MAILB: u16 = 253;
pub(crate) const TYPE_MAILA: u16 = 254;
pub(crate) const TYPE_ANY: u16 = 255;

pub(crate) const CLASS_IN: u16 = 1;
pub(crate) const CLASS_ANY: u16 = 255;

/// EDNS option code of Client Subnet (RFC 7871 §6).
const OPTION_ECS: u16 = 8;

/// The mnemonic of a record type we know by name.
pub(crate) fn type_name(rtype: u16) -> Option<&'static str> {
    Some(match rtype {
        TYPE_A => "A",
        TYPE_NS => "NS",
        TYPE_CNAME => "CNAME",
        TYPE_SOA => "SOA",
        TYPE_MX => "MX",
        TYPE_TXT => "TXT",
        TYPE_AAAA => "AAAA",
        TYPE_SRV => "SRV",
        TYPE_OPT => "OPT",
        TYPE_CAA => "CAA",
        TYPE_IXFR => "IXFR",
        TYPE_AXFR => "AXFR",
        TYPE_ANY => "ANY",
        _ => return None,
    })
}

/// Response codes, including the extended BADVERS (RFC 6891 §6.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rcode {
    NoError,
    FormErr,
    NxDomain,
    NotImp,
    Refused,
    BadVers,
}

impl Rcode {
    /// The 12-bit value: the low 4 bits go in the header, the high 8 in the OPT TTL.
    fn value(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
        }
    }
}

/// A parsed query. Borrowed from nothing: the name is copied, lower-cased, into inline
/// storage so lookups need no allocation.
pub(crate) struct Query {
    pub(crate) id: u16,
    /// Opcode (bits 11-14), RD and CD from the query's flags, kept to echo them.
    pub(crate) opcode: u8,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    /// The question as sent (name in its original case, type, class): bytes 12..end.
    pub(crate) question_end: usize,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
    /// The name lower-cased in dotted form without the trailing dot (`www.example.com`);
    /// empty for the root. A `.` inside a label is stored as `\0` so it cannot match.
    name: [u8; MAX_WIRE_NAME],
    name_len: usize,
    pub(crate) edns: Option<Edns>,
}

/// The query's OPT record (RFC 6891).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edns {
    pub(crate) udp_size: u16,
    pub(crate) version: u8,
    pub(crate) dnssec_ok: bool,
    pub(crate) client_subnet: Option<ClientSubnet>,
}

/// An EDNS Client Subnet option (RFC 7871 §6), validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSubnet {
    pub(crate) family: u16,
    pub(crate) source_prefix: u8,
    /// The address with the bits beyond `source_prefix` zero.
    pub(crate) address: IpAddr,
}

/// Why a packet got no normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Not worth a reply: shorter than a header, or a response (QR=1) — RFC 1035 §4.1.1
    /// servers answer queries only, and answering responses invites reflection loops.
    Drop,
    /// Reply with this code and the header only (no question).
    Reply(Rcode),
}

impl Query {
    /// Parses a whole query message.
    ///
    /// # Errors
    ///
    /// [`ParseError::Drop`] for packets to ignore, [`ParseError::Reply`] with FORMERR or
    /// NOTIMP for packets that get a bare error.
    pub(crate) fn parse(packet: &[u8]) -> Result<Query, ParseError> {
        if packet.len() < 12 {
            return Err(ParseError::Drop);
        }
        let flags = u16::from_be_bytes([packet[2], packet[3]]);
        if flags & 0x8000 != 0 {
            return Err(ParseError::Drop);
        }
        let opcode = ((flags >> 11) & 0xf) as u8;
        if opcode != 0 {
            // RFC 1035 §4.1.1: NOTIMP for kinds of query we do not support (NOTIFY, UPDATE).
            return Err(ParseError::Reply(Rcode::NotImp));
        }
        let count = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
        let (qdcount, ancount, nscount, arcount) = (count(4), count(6), count(8), count(10));
        if qdcount != 1 {
            return Err(ParseError::Reply(Rcode::FormErr));
        }
        let formerr = ParseError::Reply(Rcode::FormErr);

        let mut query = Query {
            id: u16::from_be_bytes([packet[0], packet[1]]),
            opcode,
            recursion_desired: flags & 0x0100 != 0,
            checking_disabled: flags & 0x0010 != 0,
            question_end: 0,
            qtype: 0,
            qclass: 0,
            name: [0; MAX_WIRE_NAME],
            name_len: 0,
            edns: None,
        };

        // Question name: plain labels only; a pointer here could only point into the
        // header, so it is malformed.
        let mut at = 12;
        let mut wire_len = 0usize;
        loop {
            let len = usize::from(*packet.get(at).ok_or(formerr)?);
            at += 1;
            wire_len += 1 + len;
            if wire_len > MAX_WIRE_NAME {
                return Err(formerr);
            }
            if len == 0 {
                break;
            }
            if len > 63 {
                return Err(formerr);
            }
            let label = packet.get(at..at + len).ok_or(formerr)?;
            if wire_len > 1 + len {
                // Not the first label.
                query.name[query.name_len] = b'.';
                query.name_len += 1;
            }
            for &byte in label {
                query.name[query.name_len] = match byte {
                    b'.' => 0,
                    other => other.to_ascii_lowercase(),
                };
                query.name_len += 1;
            }
            at += len;
        }
        let fixed = packet.get(at..at + 4).ok_or(formerr)?;
        query.qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        query.qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
        at += 4;
        query.question_end = at;

        // Answer and authority sections should be empty in a query; skip them if not.
        for _ in 0..(u32::from(ancount) + u32::from(nscount)) {
            at = skip_record(packet, at).ok_or(formerr)?;
        }
        for _ in 0..arcount {
            let owner_end = skip_name(packet, at).ok_or(formerr)?;
            let header = packet.get(owner_end..owner_end + 10).ok_or(formerr)?;
            let rtype = u16::from_be_bytes([header[0], header[1]]);
            let rdlen = usize::from(u16::from_be_bytes([header[8], header[9]]));
            let rdata = packet
                .get(owner_end + 10..owner_end + 10 + rdlen)
                .ok_or(formerr)?;
            if rtype == TYPE_OPT {
                // RFC 6891 §6.1.1: one OPT, owned by the root, or FORMERR.
                if query.edns.is_some() || owner_end != at + 1 || packet[at] != 0 {
                    return Err(formerr);
                }
                let ttl = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                query.edns = Some(Edns {
                    udp_size: u16::from_be_bytes([header[2], header[3]]),
                    version: (ttl >> 16) as u8,
                    dnssec_ok: ttl & 0x8000 != 0,
                    client_subnet: parse_options(rdata)?,
                });
            }
            at = owner_end + 10 + rdlen;
        }
        if at != packet.len() {
            return Err(formerr);
        }
        Ok(query)
    }

    /// The lower-cased dotted name (`www.example.com`, empty for the root).
    pub(crate) fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }
}

/// Reads the OPT record's options; only Client Subnet is interpreted.
fn parse_options(mut rdata: &[u8]) -> Result<Option<ClientSubnet>, ParseError> {
    let formerr = ParseError::Reply(Rcode::FormErr);
    let mut subnet = None;
    while !rdata.is_empty() {
        let header = rdata.get(..4).ok_or(formerr)?;
        let code = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let data = rdata.get(4..4 + len).ok_or(formerr)?;
        if code == OPTION_ECS {
            if subnet.is_some() {
                return Err(formerr);
            }
            subnet = Some(parse_client_subnet(data).ok_or(formerr)?);
        }
        rdata = &rdata[4 + len..];
    }
    Ok(subnet)
}

/// RFC 7871 §6 and §7.1.2: family 1 or 2, SOURCE PREFIX-LENGTH within the family, SCOPE 0
/// in queries, exactly ceil(source/8) address bytes, and no bits set past the prefix.
fn parse_client_subnet(data: &[u8]) -> Option<ClientSubnet> {
    let [
        family_hi,
        family_lo,
        source_prefix,
        scope_prefix,
        address @ ..,
    ] = data
    else {
        return None;
    };
    let family = u16::from_be_bytes([*family_hi, *family_lo]);
    let width = match family {
        1 => 32,
        2 => 128,
        _ => return None,
    };
    if *source_prefix > width || *scope_prefix != 0 {
        return None;
    }
    if address.len() != usize::from(source_prefix.div_ceil(8)) {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..address.len()].copy_from_slice(address);
    let bits = u128::from_be_bytes(bytes);
    let prefix_mask = if *source_prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(*source_prefix))
    };
    if bits & !prefix_mask != 0 {
        return None;
    }
    let address = if family == 1 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    Some(ClientSubnet {
        family,
        source_prefix: *source_prefix,
        address,
    })
}

/// Skips a possibly compressed name; returns the offset after it.
fn skip_name(packet: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *packet.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => {
                at += 1 + usize::from(len);
                if at > packet.len() {
                    return None;
                }
            }
            // A pointer ends the name; where it points does not matter for skipping.
            0xc0 => return packet.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
}

fn skip_record(packet: &[u8], at: usize) -> Option<usize> {
    let owner_end = skip_name(packet, at)?;
    let header = packet.get(owner_end..owner_end + 10)?;
    let rdlen = usize::from(u16::from_be_bytes([header[8], header[9]]));
    let end = owner_end + 10 + rdlen;
    (end <= packet.len()).then_some(end)
}

/// Header flags for a response.
pub(crate) struct ResponseFlags {
    pub(crate) opcode: u8,
    pub(crate) authoritative: bool,
    pub(crate) truncated: bool,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    pub(crate) rcode: Rcode,
}

/// Writes a 12-byte header at the start of `out` (which must hold at least 12 bytes).
pub(crate) fn write_header(out: &mut [u8], id: u16, flags: &ResponseFlags, counts: [u16; 4]) {
    let mut bits: u16 = 0x8000 | (u16::from(flags.opcode & 0xf) << 11);
    if flags.authoritative {
        bits |= 0x0400;
    }
    if flags.truncated {
        bits |= 0x0200;
    }
    if flags.recursion_desired {
        bits |= 0x0100;
    }
    if flags.checking_disabled {
        bits |= 0x0010;
    }
    bits |= flags.rcode.value() & 0xf;
    out[0..2].copy_from_slice(&id.to_be_bytes());
    out[2..4].copy_from_slice(&bits.to_be_bytes());
    for (index, count) in counts.iter().enumerate() {
        let at = 4 + index * 2;
        out[at..at + 2].copy_from_slice(&count.to_be_bytes());
    }
}

/// Appends our OPT record: our UDP size, the extended rcode, version 0, DO echoed
/// (RFC 3225 §3), and the client subnet echoed with `scope_prefix` (RFC 7871 §7.2.1).
pub(crate) fn write_opt(
    out: &mut Vec<u8>,
    udp_size: u16,
    rcode: Rcode,
    dnssec_ok: bool,
    subnet: Option<(&ClientSubnet, u8)>,
) {
    out.push(0); // root owner
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&udp_size.to_be_bytes());
    let ttl: u32 = (u32::from(rcode.value() >> 4) << 24) | if dnssec_ok { 0x8000 } else { 0 };
    out.extend_from_slice(&ttl.to_be_bytes());
    match subnet {
        None => out.extend_from_slice(&0u16.to_be_bytes()),
        Some((subnet, scope_prefix)) => {
            let n_bytes = usize::from(subnet.source_prefix.div_ceil(8));
            let option_len = 4 + n_bytes;
            out.extend_from_slice(&((4 + option_len) as u16).to_be_bytes());
            out.extend_from_slice(&OPTION_ECS.to_be_bytes());
            out.extend_from_slice(&(option_len as u16).to_be_bytes());
            out.extend_from_slice(&subnet.family.to_be_bytes());
            out.push(subnet.source_prefix);
            out.push(scope_prefix);
            match subnet.address {
                IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()[..n_bytes]),
                IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()[..n_bytes]),
            }
        }
    }
}

/// Size of the OPT record [`write_opt`] would write.
pub(crate) fn opt_len(subnet: Option<&ClientSubnet>) -> usize {
    11 + subnet.map_or(0, |subnet| {
        8 + usize::from(subnet.source_prefix.div_ceil(8))
    })
}

/// Appends `name` (dotted, lower case, no trailing dot; empty for the root) in wire form.
/// The caller guarantees labels of 1-63 bytes.
pub(crate) fn push_name(out: &mut Vec<u8>, name: &str) {
    if !name.is_empty() {
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_bytes(name: &[&[u8]], qtype: u16, additional: &[u8], arcount: u16) -> Vec<u8> {
        let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0];
        out.extend_from_slice(&arcount.to_be_bytes());
        for label in name {
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(additional);
        out
    }

    #[test]
    fn parses_name_lower_case_and_dotted() {
        let packet = query_bytes(&[b"WwW", b"Example", b"COM"], TYPE_A, &[], 0);
        let query = Query::parse(&packet).unwrap();
        assert_eq!(query.name(), b"www.example.com");
        assert_eq!(query.question_end, packet.len());
        assert!(query.recursion_desired);
        assert_eq!(query.id, 0x1234);
    }

    #[test]
    fn a_dot_inside_a_label_cannot_match_a_name() {
        let packet = query_bytes(&[b"a.b", b"example", b"com"], TYPE_A, &[], 0);
        let query = Query::parse(&packet).unwrap();
        assert_eq!(query.name(), b"a\0b.example.com");
    }

    #[test]
    fn ecs_is_validated() {
        let ecs = |data: &[u8]| {
            let mut opt = vec![0, 0, 41, 0x10, 0, 0, 0, 0, 0];
            opt.extend_from_slice(&((data.len() + 4) as u16).to_be_bytes());
            opt.extend_from_slice(&8u16.to_be_bytes());
            opt.extend_from_slice(&(data.len() as u16).to_be_bytes());
            opt.extend_from_slice(data);
            Query::parse(&query_bytes(&[b"example", b"com"], TYPE_A, &opt, 1))
        };
        let good = ecs(&[0, 1, 24, 0, 192, 0, 2]).unwrap();
        let subnet = good.edns.unwrap().client_subnet.unwrap();
        assert_eq!(subnet.address, "192.0.2.0".parse::<IpAddr>().unwrap());
        assert_eq!(subnet.source_prefix, 24);
        // Scope must be 0, the address exactly ceil(24/8) bytes, no bits past the prefix.
        for bad in [
            &[0, 1, 24, 8, 192, 0, 2][..],
            &[0, 1, 24, 0, 192, 0, 2, 0],
            &[0, 1, 23, 0, 192, 0, 3],
            &[0, 3, 8, 0, 10],
            &[0, 1, 33, 0, 1, 2, 3, 4, 5],
        ] {
            assert!(ecs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses_and_short_packets_are_dropped() {
        assert_eq!(Query::parse(&[0; 11]).err(), Some(ParseError::Drop));
        let mut packet = query_bytes(&[b"example", b"com"], TYPE_A, &[], 0);
        packet[2] |= 0x80;
        assert_eq!(Query::parse(&packet).err(), Some(ParseError::Drop));
    }
}
