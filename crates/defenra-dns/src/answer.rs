//! The query handler: one packet in, one response (or nothing) out, written into a reused
//! buffer. No allocation, no lock, no I/O (a rate-limit log line, at most a few a second,
//! is the one exception).

use std::fmt;
use std::net::IpAddr;

use defenra_geo::GeoLookup;
use tracing::info;

use crate::rrl::{Class, Limit, Rrl};
use crate::stats::DnsStats;
use crate::wire::{
    self, CLASS_ANY, CLASS_IN, ParseError, Query, Rcode, ResponseFlags, TYPE_A, TYPE_AAAA,
    TYPE_ANY, TYPE_AXFR, TYPE_CNAME, TYPE_IXFR, TYPE_MAILA, TYPE_MAILB, TYPE_OPT,
};
use crate::zone::{Node, ZoneIndex, push_address_tail};

/// "No node" / "no zone" in [`Answer`].
const NONE: u32 = u32::MAX;

/// Longest CNAME chain followed inside served zones.
const MAX_CHAIN: usize = 8;
/// Smallest UDP payload every client accepts (RFC 1035 §4.2.1).
const MIN_UDP_PAYLOAD: u16 = 512;
/// ECS scope of GeoDNS answers: the granularity of the GeoIP cache.
const GEO_SCOPE_V4: u8 = 24;
const GEO_SCOPE_V6: u8 = 56;

/// How the query arrived; UDP responses are limited in size, TCP ones are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What a handler needs besides the packet.
pub(crate) struct Context<'a> {
    pub(crate) index: &'a ZoneIndex,
    pub(crate) geo: Option<&'a dyn GeoLookup>,
    pub(crate) stats: &'a DnsStats,
    /// The largest UDP payload we send, whatever the client offers (EDNS clamp).
    pub(crate) udp_payload_limit: u16,
    /// Response rate limiting of UDP answers, when on.
    pub(crate) rrl: Option<&'a Rrl>,
    /// The rate limiter's time, in microseconds.
    pub(crate) now_us: u64,
}

/// Answers `packet` from `source` into `out` (cleared first). Returns false when nothing
/// is to be sent.
pub(crate) fn handle(
    ctx: &Context<'_>,
    packet: &[u8],
    source: IpAddr,
    transport: Transport,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    ctx.stats.count_query(transport);
    let query = match Query::parse(packet) {
        Ok(query) => query,
        Err(ParseError::Drop) => {
            ctx.stats.count_dropped();
            return false;
        }
        Err(ParseError::Reply(rcode)) => {
            let limit = rate_limit(ctx, source, transport, Class::Error);
            if limit == Limit::Drop {
                return false;
            }
            // Parse guarantees a 12-byte header when it asks for a reply.
            let flags = u16::from_be_bytes([packet[2], packet[3]]);
            out.resize(12, 0);
            wire::write_header(
                out,
                u16::from_be_bytes([packet[0], packet[1]]),
                &ResponseFlags {
                    opcode: ((flags >> 11) & 0xf) as u8,
                    authoritative: false,
                    truncated: limit == Limit::Slip,
                    recursion_desired: flags & 0x0100 != 0,
                    checking_disabled: flags & 0x0010 != 0,
                    rcode,
                },
                [0; 4],
            );
            if rcode == Rcode::FormErr {
                ctx.stats.count_malformed();
            }
            ctx.stats.count_rcode(rcode);
            return true;
        }
    };

    out.extend_from_slice(&packet[..query.question_end]);
    let size_limit = match (transport, &query.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => usize::from(MIN_UDP_PAYLOAD),
        (Transport::Udp, Some(edns)) => usize::from(
            edns.udp_size
                .min(ctx.udp_payload_limit)
                .max(MIN_UDP_PAYLOAD),
        ),
    };
    let subnet = query.edns.and_then(|edns| edns.client_subnet);
    if subnet.is_some() {
        ctx.stats.count_ecs();
    }

    let answer = if query.edns.is_some_and(|edns| edns.version > 0) {
        // RFC 6891 §6.1.3: BADVERS, answered with an OPT of the version we speak.
        Answer::bare(Rcode::BadVers)
    } else if query.qclass != CLASS_IN && query.qclass != CLASS_ANY {
        Answer::bare(Rcode::Refused)
    } else {
        match query.qtype {
            TYPE_OPT => Answer::bare(Rcode::FormErr),
            // No zone transfers; old mail meta-types are not implemented.
            TYPE_AXFR | TYPE_IXFR => Answer::bare(Rcode::Refused),
            TYPE_MAILA | TYPE_MAILB => Answer::bare(Rcode::NotImp),
            _ => {
                let client = match subnet {
                    // RFC 7871 §7.1.2: a /0 source asks us not to use the address.
                    Some(subnet) if subnet.source_prefix > 0 => subnet.address,
                    _ => source,
                };
                resolve(ctx, &query, client, transport, out)
            }
        }
    };

    // Response rate limiting (UDP only: a TCP client cannot spoof its address).
    let limit = rate_limit(ctx, source, transport, answer.class(query.qtype));
    if limit == Limit::Drop {
        return false;
    }

    let scope = match (answer.geo && limit == Limit::Send, &subnet) {
        (true, Some(subnet)) if subnet.family == 1 => GEO_SCOPE_V4,
        (true, Some(_)) => GEO_SCOPE_V6,
        _ => 0,
    };
    let mut counts = [1, answer.n_answers, answer.n_authority, 0];
    let mut truncated = false;
    if limit == Limit::Slip {
        // Slipped: the question alone with TC=1 (OPT kept), so that a real resolver in
        // the limited prefix retries over TCP and gets its answer there.
        out.truncate(query.question_end);
        counts[1] = 0;
        counts[2] = 0;
        truncated = true;
    } else if out.len() + query.edns.map_or(0, |_| wire::opt_len(subnet.as_ref())) > size_limit {
        // RFC 2181 §9: set TC and send what fits; we send the question alone, and the
        // client retries over TCP.
        out.truncate(query.question_end);
        counts[1] = 0;
        counts[2] = 0;
        truncated = true;
        ctx.stats.count_truncated();
    }
    if let Some(edns) = query.edns {
        counts[3] = 1;
        wire::write_opt(
            out,
            ctx.udp_payload_limit.max(MIN_UDP_PAYLOAD),
            answer.rcode,
            edns.dnssec_ok,
            subnet.as_ref().map(|subnet| (subnet, scope)),
        );
    }
    wire::write_header(
        out,
        query.id,
        &ResponseFlags {
            opcode: query.opcode,
            authoritative: answer.authoritative,
            truncated,
            recursion_desired: query.recursion_desired,
            checking_disabled: query.checking_disabled,
            rcode: answer.rcode,
        },
        counts,
    );
    ctx.stats.count_rcode(answer.rcode);
    if answer.geo {
        ctx.stats.count_geo();
    }
    if answer.rcode == Rcode::NoError && answer.n_answers == 0 && answer.authoritative {
        ctx.stats.count_nodata();
    }
    true
}

/// What [`resolve`] wrote after the question.
struct Answer {
    rcode: Rcode,
    authoritative: bool,
    n_answers: u16,
    n_authority: u16,
    /// The answer came from the GeoDNS plan (its ECS scope is not 0).
    geo: bool,
    /// The node the question's name led to (the name, or the wildcard synthesising it),
    /// or [`NONE`].
    node: u32,
    /// The zone whose SOA went into the authority section, or [`NONE`].
    zone: u32,
}

impl Answer {
    fn bare(rcode: Rcode) -> Answer {
        Answer {
            rcode,
            authoritative: false,
            n_answers: 0,
            n_authority: 0,
            geo: false,
            node: NONE,
            zone: NONE,
        }
    }

    /// The rate-limit class of this answer: the name and type for answers with records,
    /// the zone for NXDOMAIN and NODATA (so random names of one zone are one class), and
    /// one class for every error.
    fn class(&self, qtype: u16) -> Class {
        match self.rcode {
            Rcode::NxDomain => Class::Negative { zone: self.zone },
            Rcode::NoError if self.n_answers == 0 => Class::Negative { zone: self.zone },
            Rcode::NoError => Class::Positive {
                node: self.node,
                qtype,
            },
            _ => Class::Error,
        }
    }
}

/// Charges the response to its class when rate limiting is on and it goes over UDP, and
/// writes a log line when a class starts being limited (a few lines a second at most).
fn rate_limit(ctx: &Context<'_>, source: IpAddr, transport: Transport, class: Class) -> Limit {
    let (Transport::Udp, Some(rrl)) = (transport, ctx.rrl) else {
        return Limit::Send;
    };
    let decision = rrl.check(source, class, ctx.index.generation, ctx.now_us, ctx.stats);
    if decision.started
        && let Some(suppressed) = rrl.log_allowed(ctx.now_us)
    {
        info!(
            prefix = %rrl.prefix_of(source),
            class = %ClassName { index: ctx.index, class },
            suppressed_lines = suppressed,
            "dns rrl: responses over the rate are dropped or truncated"
        );
    }
    decision.limit
}

/// A class for log lines: `www.example.com A`, `example.com NXDOMAIN/NODATA`, `errors`.
struct ClassName<'a> {
    index: &'a ZoneIndex,
    class: Class,
}

impl fmt::Display for ClassName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.class {
            Class::Positive { node, qtype } => {
                let name = self.index.node_name(node);
                let name = if name.is_empty() { "." } else { name };
                write!(f, "{name} ")?;
                match wire::type_name(qtype) {
                    Some(mnemonic) => f.write_str(mnemonic),
                    // RFC 3597 §5: unknown types as TYPEnnn.
                    None => write!(f, "TYPE{qtype}"),
                }
            }
            Class::Negative { zone } => {
                write!(f, "{} NXDOMAIN/NODATA", self.index.zone_name(zone))
            }
            Class::Error => f.write_str("errors"),
        }
    }
}

/// Where a name stands in the served zones.
enum Lookup {
    /// A node: the name itself, or the wildcard that synthesises it (RFC 4592).
    Found(u32),
    /// Inside zone `.0` but nonexistent.
    NxDomain(u32),
    /// In no served zone.
    NotServed,
}

/// Exact match, else the closest encloser and its `*` child; the closest encloser also
/// gives the zone, so the longest served zone always wins.
fn find(index: &ZoneIndex, name: &[u8]) -> Lookup {
    if let Some((id, _)) = index.node_by_name(name) {
        return Lookup::Found(id);
    }
    let mut rest = name;
    while let Some(dot) = rest.iter().position(|&byte| byte == b'.') {
        rest = &rest[dot + 1..];
        if let Some((_, encloser)) = index.node_by_name(rest) {
            return match encloser.wildcard() {
                Some(wildcard) => Lookup::Found(wildcard),
                None => Lookup::NxDomain(encloser.zone),
            };
        }
    }
    Lookup::NotServed
}

/// The owner name of records being written.
#[derive(Clone, Copy)]
enum Owner<'a> {
    /// The question's name, as a compression pointer to offset 12 (so it keeps the
    /// client's case).
    Question,
    /// A name in wire form (a CNAME target).
    Wire(&'a [u8]),
}

impl Owner<'_> {
    fn write(self, out: &mut Vec<u8>) {
        match self {
            Owner::Question => out.extend_from_slice(&[0xc0, 0x0c]),
            Owner::Wire(name) => out.extend_from_slice(name),
        }
    }
}

fn resolve(
    ctx: &Context<'_>,
    query: &Query,
    client: IpAddr,
    transport: Transport,
    out: &mut Vec<u8>,
) -> Answer {
    let index = ctx.index;
    let mut answer = Answer {
        rcode: Rcode::NoError,
        authoritative: true,
        n_answers: 0,
        n_authority: 0,
        geo: false,
        node: NONE,
        zone: NONE,
    };
    let mut node_id = match find(index, query.name()) {
        Lookup::Found(id) => id,
        Lookup::NxDomain(zone) => {
            answer.rcode = Rcode::NxDomain;
            push_soa(index, zone, out, &mut answer);
            return answer;
        }
        Lookup::NotServed => {
            // RFC 1035 §4.1.1 REFUSED: not our zone, and we do not recurse.
            return Answer::bare(Rcode::Refused);
        }
    };
    answer.node = node_id;
    let qtype = query.qtype;
    // RFC 8482 §4.1 minimises ANY over UDP, where the source can be spoofed; over TCP
    // the client is who it says it is and gets every RRset of the name.
    let full_any = qtype == TYPE_ANY && transport == Transport::Tcp;
    let mut owner = Owner::Question;
    let mut visited = [u32::MAX; MAX_CHAIN];
    for depth in 0..=MAX_CHAIN {
        let node = index.node(node_id);

        if let Some(ttl) = node.geo_ttl()
            && matches!(qtype, TYPE_A | TYPE_AAAA | TYPE_ANY)
        {
            let plan = index.zone(node.zone).plan.as_ref();
            let place = ctx.geo.and_then(|geo| geo.place(client));
            if full_any {
                // Both address families from the plan, then the name's other RRsets.
                for ipv4 in [true, false] {
                    if let Some(selection) = plan.and_then(|plan| plan.choose(ipv4, place, client))
                    {
                        for ip in selection.addresses {
                            owner.write(out);
                            push_address_tail(out, *ip, ttl);
                        }
                        answer.n_answers += selection.addresses.len() as u16;
                        answer.geo = true;
                    }
                }
                answer.n_answers += push_all_rrsets(index, node, owner, out);
                if answer.n_answers == 0 {
                    push_soa(index, node.zone, out, &mut answer);
                }
                return answer;
            }
            // Pools pick by the client's /24 or /56 (the ECS scope we echo).
            match plan.and_then(|plan| plan.choose(qtype != TYPE_AAAA, place, client)) {
                Some(selection) => {
                    for ip in selection.addresses {
                        owner.write(out);
                        push_address_tail(out, *ip, ttl);
                    }
                    answer.n_answers += selection.addresses.len() as u16;
                    answer.geo = true;
                }
                None => push_soa(index, node.zone, out, &mut answer),
            }
            return answer;
        }

        if let Some(cname) = index.cname(node)
            && qtype != TYPE_CNAME
        {
            push_rrset(out, owner, index.bytes(cname.rrset));
            answer.n_answers += 1;
            // RFC 1034 §4.3.2 step 3a: ANY matches the CNAME itself, which is not chased.
            if depth == MAX_CHAIN || qtype == TYPE_ANY {
                return answer;
            }
            visited[depth] = node_id;
            // RFC 1034 §4.3.2 step 3a: restart at the target when it is ours.
            match find(index, index.bytes(cname.target)) {
                Lookup::Found(next) if !visited.contains(&next) => {
                    node_id = next;
                    owner = Owner::Wire(index.bytes(cname.target_wire));
                    continue;
                }
                // A loop: stop with what we have.
                Lookup::Found(_) | Lookup::NotServed => return answer,
                Lookup::NxDomain(zone) => {
                    // RFC 6604 §3: the rcode describes the last name in the chain.
                    answer.rcode = Rcode::NxDomain;
                    push_soa(index, zone, out, &mut answer);
                    return answer;
                }
            }
        }

        if full_any && !index.rrsets(node).is_empty() {
            answer.n_answers += push_all_rrsets(index, node, owner, out);
            return answer;
        }
        let rrset = if qtype == TYPE_ANY {
            // RFC 8482 §4.1: answer ANY over UDP with one RRset, the smallest, so that
            // ANY amplifies no more than any single type.
            index
                .rrsets(node)
                .iter()
                .min_by_key(|rrset| rrset.bytes().len())
        } else {
            index.rrsets(node).iter().find(|rrset| rrset.rtype == qtype)
        };
        match rrset {
            Some(rrset) => {
                answer.n_answers += push_rrset(out, owner, index.bytes(rrset.bytes()));
            }
            None if qtype == TYPE_CNAME && node.has_cname() => {
                if let Some(cname) = index.cname(node) {
                    answer.n_answers += push_rrset(out, owner, index.bytes(cname.rrset));
                }
            }
            // NODATA (RFC 2308 §2.2): the name exists, the type does not.
            None => push_soa(index, node.zone, out, &mut answer),
        }
        return answer;
    }
    answer
}

/// Appends the zone's SOA to the authority section, with the negative-caching TTL
/// (RFC 2308 §3) in place of the record's own.
fn push_soa(index: &ZoneIndex, zone_id: u32, out: &mut Vec<u8>, answer: &mut Answer) {
    answer.zone = zone_id;
    let zone = index.zone(zone_id);
    let at = out.len() + index.bytes(zone.apex_wire).len();
    let added = push_rrset(
        out,
        Owner::Wire(index.bytes(zone.apex_wire)),
        index.bytes(zone.soa),
    );
    // The TTL sits after TYPE and CLASS.
    if let Some(ttl) = out.get_mut(at + 4..at + 8) {
        ttl.copy_from_slice(&zone.negative_ttl.to_be_bytes());
    }
    answer.n_authority += added;
}

/// Appends every RRset of `node` (ANY over TCP) that fits in one TCP message, keeping room
/// for the OPT record; returns how many records.
fn push_all_rrsets(index: &ZoneIndex, node: &Node, owner: Owner<'_>, out: &mut Vec<u8>) -> u16 {
    /// A TCP message is at most 65,535 bytes (RFC 1035 §4.2.2); leave room for the OPT.
    const ROOM: usize = u16::MAX as usize - 512;
    let mut n_records = 0;
    for rrset in index.rrsets(node) {
        let before = out.len();
        let added = push_rrset(out, owner, index.bytes(rrset.bytes()));
        if out.len() > ROOM {
            out.truncate(before);
            break;
        }
        n_records += added;
    }
    n_records
}

/// Appends every record of a compiled record set (`tails`: type, class, TTL, RDLENGTH and
/// RDATA per record) under `owner`; returns how many.
fn push_rrset(out: &mut Vec<u8>, owner: Owner<'_>, tails: &[u8]) -> u16 {
    let mut rest = tails;
    let mut count = 0;
    while rest.len() >= 10 {
        let rdlength = usize::from(u16::from_be_bytes([rest[8], rest[9]]));
        let end = (10 + rdlength).min(rest.len());
        owner.write(out);
        out.extend_from_slice(&rest[..end]);
        rest = &rest[end..];
        count += 1;
    }
    count
}
