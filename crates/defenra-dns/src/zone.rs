//! [`ZoneIndex`]: every served name with its answers precompiled to wire bytes, built from
//! a snapshot at reload time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use defenra_config::compile::DEFAULT_TTL;
use defenra_config::{Domain, Issue, Record, RecordData, Snapshot};
use defenra_geo::GeoPlan;

use crate::wire::{
    CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CAA, TYPE_CNAME, TYPE_MX, TYPE_NS, TYPE_SOA, TYPE_SRV,
    TYPE_TXT, push_name,
};

/// TTL of GeoDNS answers whose record does not set one.
pub const GEO_TTL: u32 = 60;

/// Timers of a synthesised SOA: refresh, retry, expire, minimum (negative-caching TTL).
const SOA_TIMERS: [u32; 4] = [3600, 600, 604_800, 60];
/// TTL of a synthesised SOA and NS set.
const SOA_TTL: u32 = 3600;

/// All served names of one snapshot. Immutable; replaced whole on reload.
#[derive(Debug, Default)]
pub struct ZoneIndex {
    /// Lower-case dotted name (`www.example.com`) → index into `nodes`.
    names: HashMap<Box<[u8]>, u32>,
    nodes: Vec<Node>,
    zones: Vec<Zone>,
    /// Every node's record sets, each node's contiguous.
    rrsets: Vec<RrSet>,
    /// One arena for all wire bytes (record sets, names), so a zone costs a few small
    /// structs instead of an allocation per record set.
    bytes: Vec<u8>,
    n_records: usize,
}

/// A range of [`ZoneIndex`]'s byte arena (or of its record-set list).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One name that exists in a zone: it owns records, or names below it do (an empty
/// non-terminal, RFC 8020).
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) zone: u32,
    /// Record sets other than CNAME, sorted by type (see [`ZoneIndex::rrsets`]).
    pub(crate) rrsets: Span,
    pub(crate) cname: Option<Cname>,
    /// `Some(ttl)` when A and AAAA come from the zone's GeoDNS plan (proxied names, and the
    /// apex of a domain with GeoDNS data).
    pub(crate) geo_ttl: Option<u32>,
    /// The `*` child of this name (RFC 4592 source of synthesis), if any.
    pub(crate) wildcard: Option<u32>,
}

#[derive(Debug)]
pub(crate) struct Cname {
    pub(crate) rrset: RrSet,
    /// The target, lower-case dotted, for chasing.
    pub(crate) target: Span,
    /// The target in wire form: the owner of the records found by chasing.
    pub(crate) target_wire: Span,
}

/// Records of one type at one name, as wire bytes after the owner name: for each record
/// type, class, TTL, RDLENGTH and RDATA. Writing one is the owner plus a copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RrSet {
    pub(crate) rtype: u16,
    pub(crate) bytes: Span,
}

#[derive(Debug)]
pub(crate) struct Zone {
    pub(crate) apex_wire: Span,
    /// SOA with the negative-caching TTL, for the authority section (RFC 2308 §3).
    pub(crate) negative_soa: RrSet,
    /// Boxed: most zones have none, and a plan is several hundred bytes.
    pub(crate) plan: Option<Box<GeoPlan>>,
}

impl ZoneIndex {
    /// Compiles `snapshot`. Records that cannot be served (a CNAME beside other data, a
    /// name that belongs to another served zone) are left out and reported in `issues`.
    pub fn build(snapshot: &Snapshot, agent_ip: Option<IpAddr>, issues: &mut Vec<Issue>) -> Self {
        let mut builder = Builder {
            index: ZoneIndex::default(),
            zone_names: snapshot
                .domains
                .iter()
                .map(|domain| domain.name.clone())
                .collect(),
        };
        for (zone_id, (position, domain)) in snapshot.domains.iter().enumerate().enumerate() {
            builder.add_domain(zone_id as u32, position, domain, snapshot, agent_ip, issues);
        }
        // The index lives until the next reload: give back what the growing vectors
        // over-reserved.
        let mut index = builder.index;
        index.names.shrink_to_fit();
        index.nodes.shrink_to_fit();
        index.zones.shrink_to_fit();
        index.rrsets.shrink_to_fit();
        index.bytes.shrink_to_fit();
        index
    }

    /// Number of served zones.
    pub fn n_zones(&self) -> usize {
        self.zones.len()
    }

    /// Number of records served (synthesised SOA and NS included).
    pub fn n_records(&self) -> usize {
        self.n_records
    }

    pub(crate) fn node_by_name(&self, name: &[u8]) -> Option<(u32, &Node)> {
        let id = *self.names.get(name)?;
        Some((id, &self.nodes[id as usize]))
    }

    pub(crate) fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    pub(crate) fn zone(&self, id: u32) -> &Zone {
        &self.zones[id as usize]
    }

    /// The record sets of `node`.
    pub(crate) fn rrsets(&self, node: &Node) -> &[RrSet] {
        &self.rrsets[node.rrsets.range()]
    }

    /// Bytes of the arena.
    pub(crate) fn bytes(&self, span: Span) -> &[u8] {
        &self.bytes[span.range()]
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Span {
        let span = Span {
            start: self.bytes.len() as u32,
            len: bytes.len() as u32,
        };
        self.bytes.extend_from_slice(bytes);
        span
    }

    fn push_name(&mut self, name: &str) -> Span {
        let start = self.bytes.len();
        push_name(&mut self.bytes, name);
        Span {
            start: start as u32,
            len: (self.bytes.len() - start) as u32,
        }
    }

    /// Compiles records of one type into the arena. Duplicate data is written once
    /// (RFC 2181 §5), and all records get the lowest TTL (RFC 2181 §5.2).
    fn push_rrset(&mut self, rtype: u16, records: &[(&RecordData, u32)]) -> RrSet {
        let start = self.bytes.len();
        let ttl = records.iter().map(|(_, ttl)| *ttl).min().unwrap_or(0);
        let mut seen: Vec<&RecordData> = Vec::new();
        for (data, _) in records {
            if seen.contains(data) {
                continue;
            }
            seen.push(data);
            push_record_tail(&mut self.bytes, rtype, ttl, data);
        }
        RrSet {
            rtype,
            bytes: Span {
                start: start as u32,
                len: (self.bytes.len() - start) as u32,
            },
        }
    }
}

struct Builder {
    index: ZoneIndex,
    zone_names: HashSet<String>,
}

/// Records of one owner name, gathered before compiling.
#[derive(Default)]
struct Owner<'a> {
    records: Vec<(usize, &'a Record)>,
}

impl Builder {
    fn add_domain(
        &mut self,
        zone_id: u32,
        position: usize,
        domain: &Arc<Domain>,
        snapshot: &Snapshot,
        agent_ip: Option<IpAddr>,
        issues: &mut Vec<Issue>,
    ) {
        let apex = domain.name.as_str();
        let mut owners: BTreeMap<&str, Owner<'_>> = BTreeMap::new();
        owners.entry(apex).or_default();
        for (index, record) in domain.records.iter().enumerate() {
            let owning_zone = self.owning_zone(&record.name);
            if owning_zone != Some(apex) {
                issues.push(Issue::new(
                    format!("domains[{position}].dnsRecords[{index}].name"),
                    format!(
                        "{:?} lies inside the separately served zone {:?}; record skipped",
                        record.name,
                        owning_zone.unwrap_or("")
                    ),
                ));
                continue;
            }
            owners
                .entry(record.name.as_str())
                .or_default()
                .records
                .push((index, record));
        }

        // SOA: the configured one (first), or a synthesised one whose serial is the
        // snapshot version, so it increases with every published config.
        let configured_soa =
            owners[apex]
                .records
                .iter()
                .find_map(|(_, record)| match &record.data {
                    RecordData::Soa(soa) => Some(((**soa).clone(), record.ttl)),
                    _ => None,
                });
        let is_configured = configured_soa.is_some();
        let (soa, soa_ttl) = configured_soa.unwrap_or_else(|| {
            (
                defenra_config::Soa {
                    mname: format!("ns1.{apex}"),
                    rname: format!("hostmaster.{apex}"),
                    serial: snapshot.version as u32,
                    refresh: SOA_TIMERS[0],
                    retry: SOA_TIMERS[1],
                    expire: SOA_TIMERS[2],
                    minimum: SOA_TIMERS[3],
                },
                SOA_TTL,
            )
        });
        let soa_data = RecordData::Soa(Box::new(soa.clone()));
        let negative_soa = self
            .index
            .push_rrset(TYPE_SOA, &[(&soa_data, soa_ttl.min(soa.minimum))]);

        // Without configured NS records the apex names the SOA's primary, and when that
        // host is in the zone and has no address, it answers with this agent's address.
        let has_ns = owners[apex]
            .records
            .iter()
            .any(|(_, record)| matches!(record.data, RecordData::Ns(_)));
        let mut synthesized: Vec<(String, RecordData, u32)> = Vec::new();
        if !is_configured {
            synthesized.push((apex.to_owned(), soa_data, soa_ttl));
        }
        if !has_ns {
            synthesized.push((apex.to_owned(), RecordData::Ns(soa.mname.clone()), SOA_TTL));
            if let Some(ip) = agent_ip
                && defenra_config::is_in_zone(&soa.mname, apex)
                && self.owning_zone(&soa.mname) == Some(apex)
                && !owners.contains_key(soa.mname.as_str())
            {
                let data = match ip {
                    IpAddr::V4(v4) => RecordData::A(v4),
                    IpAddr::V6(v6) => RecordData::Aaaa(v6),
                };
                synthesized.push((soa.mname.clone(), data, SOA_TTL));
            }
        }
        let synthesized_records: Vec<Record> = synthesized
            .into_iter()
            .map(|(name, data, ttl)| Record {
                name,
                ttl,
                data,
                http_proxy: false,
            })
            .collect();
        for record in &synthesized_records {
            owners
                .entry(record.name.as_str())
                .or_default()
                .records
                .push((usize::MAX, record));
        }

        let needs_plan = domain.has_geo() || domain.records.iter().any(|record| record.http_proxy);
        let plan = needs_plan.then(|| {
            for key in GeoPlan::ignored_keys(&domain.geo) {
                issues.push(Issue::new(
                    format!("domains[{position}].geoDnsMap.{key}"),
                    format!(
                        "{key:?} is not a country code, continent or `default`; \
                         GeoDNS selection ignores it"
                    ),
                ));
            }
            Box::new(GeoPlan::compile(&domain.geo, &snapshot.agents, agent_ip))
        });
        let apex_wire = self.index.push_name(apex);
        self.index.zones.push(Zone {
            apex_wire,
            negative_soa,
            plan,
        });

        for (name, owner) in &owners {
            let node = self.compile_owner(zone_id, position, name, owner, domain, issues);
            let id = self.ensure_node(name, zone_id);
            let slot = &mut self.index.nodes[id as usize];
            slot.rrsets = node.rrsets;
            slot.cname = node.cname;
            slot.geo_ttl = node.geo_ttl;
            // Empty non-terminals between the name and the apex, and the wildcard link.
            let mut child = id;
            let mut rest = *name;
            while rest != apex {
                let Some((label, parent)) = rest.split_once('.') else {
                    break;
                };
                let parent_id = self.ensure_node(parent, zone_id);
                if label == "*" && rest == *name {
                    self.index.nodes[parent_id as usize].wildcard = Some(child);
                }
                child = parent_id;
                rest = parent;
            }
        }
    }

    /// The longest served zone that contains `name`.
    fn owning_zone<'n>(&self, name: &'n str) -> Option<&'n str> {
        let mut rest = name;
        loop {
            if self.zone_names.contains(rest) {
                return Some(rest);
            }
            rest = rest.split_once('.')?.1;
        }
    }

    fn ensure_node(&mut self, name: &str, zone_id: u32) -> u32 {
        if let Some(id) = self.index.names.get(name.as_bytes()) {
            return *id;
        }
        let id = self.index.nodes.len() as u32;
        self.index.nodes.push(Node {
            zone: zone_id,
            rrsets: Span::default(),
            cname: None,
            geo_ttl: None,
            wildcard: None,
        });
        self.index
            .names
            .insert(name.as_bytes().to_vec().into_boxed_slice(), id);
        id
    }

    fn compile_owner(
        &mut self,
        zone_id: u32,
        position: usize,
        name: &str,
        owner: &Owner<'_>,
        domain: &Domain,
        issues: &mut Vec<Issue>,
    ) -> Node {
        let is_apex = name == domain.name;
        let proxied: Vec<&Record> = owner
            .records
            .iter()
            .map(|(_, record)| *record)
            .filter(|record| record.http_proxy)
            .collect();
        let geo_ttl = if !proxied.is_empty() {
            // GEO_TTL unless a record set its own TTL (the config's default means unset).
            let ttl = proxied
                .iter()
                .map(|record| record.ttl)
                .min()
                .unwrap_or(GEO_TTL);
            Some(if ttl == DEFAULT_TTL { GEO_TTL } else { ttl })
        } else if is_apex && domain.has_geo() {
            Some(GEO_TTL)
        } else {
            None
        };
        let path = |index: usize| format!("domains[{position}].dnsRecords[{index}]");

        let mut by_type: BTreeMap<u16, Vec<(&RecordData, u32)>> = BTreeMap::new();
        let mut cname: Option<(usize, &Record)> = None;
        for (index, record) in &owner.records {
            let rtype = record_type(&record.data);
            let geo_family = matches!(rtype, TYPE_A | TYPE_AAAA | TYPE_CNAME);
            if geo_ttl.is_some() && geo_family {
                // Answered from the GeoDNS plan: the origin never appears in DNS, and a
                // proxied CNAME is flattened into the agents' addresses.
                continue;
            }
            if rtype == TYPE_CNAME {
                if let Some((first, _)) = cname {
                    issues.push(Issue::new(
                        path(*index),
                        format!(
                            "{name:?} already has a CNAME (dnsRecords[{first}]); record skipped"
                        ),
                    ));
                } else {
                    cname = Some((*index, record));
                }
                continue;
            }
            by_type
                .entry(rtype)
                .or_default()
                .push((&record.data, record.ttl));
        }
        let has_other_data = !by_type.is_empty() || geo_ttl.is_some();
        let cname = match cname {
            // RFC 1034 §3.6.2: a CNAME cannot share its name with other data.
            Some((index, _)) if has_other_data || is_apex => {
                issues.push(Issue::new(
                    path(index),
                    format!(
                        "a CNAME cannot share {name:?} with other records{}; CNAME skipped",
                        if is_apex { " (the zone apex)" } else { "" }
                    ),
                ));
                None
            }
            Some((_, record)) => match &record.data {
                RecordData::Cname(target) => Some(Cname {
                    rrset: self
                        .index
                        .push_rrset(TYPE_CNAME, &[(&record.data, record.ttl)]),
                    target: self.index.push_bytes(target.as_bytes()),
                    target_wire: self.index.push_name(target),
                }),
                _ => None,
            },
            None => None,
        };
        self.index.n_records += by_type.values().map(Vec::len).sum::<usize>();
        self.index.n_records += usize::from(cname.is_some());
        let first = self.index.rrsets.len();
        for (rtype, records) in &by_type {
            let rrset = self.index.push_rrset(*rtype, records);
            self.index.rrsets.push(rrset);
        }
        Node {
            zone: zone_id,
            rrsets: Span {
                start: first as u32,
                len: (self.index.rrsets.len() - first) as u32,
            },
            cname,
            geo_ttl,
            wildcard: None,
        }
    }
}

fn record_type(data: &RecordData) -> u16 {
    match data {
        RecordData::A(_) => TYPE_A,
        RecordData::Aaaa(_) => TYPE_AAAA,
        RecordData::Cname(_) => TYPE_CNAME,
        RecordData::Mx { .. } => TYPE_MX,
        RecordData::Txt(_) => TYPE_TXT,
        RecordData::Ns(_) => TYPE_NS,
        RecordData::Srv { .. } => TYPE_SRV,
        RecordData::Caa { .. } => TYPE_CAA,
        RecordData::Soa(_) => TYPE_SOA,
    }
}

/// Appends an A or AAAA record tail for `ip` (GeoDNS answers are written per query).
pub(crate) fn push_address_tail(out: &mut Vec<u8>, ip: IpAddr, ttl: u32) {
    let rtype = if ip.is_ipv4() { TYPE_A } else { TYPE_AAAA };
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => {
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.extend_from_slice(&16u16.to_be_bytes());
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn push_record_tail(out: &mut Vec<u8>, rtype: u16, ttl: u32, data: &RecordData) {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let length_at = out.len();
    out.extend_from_slice(&[0, 0]);
    match data {
        RecordData::A(v4) => out.extend_from_slice(&v4.octets()),
        RecordData::Aaaa(v6) => out.extend_from_slice(&v6.octets()),
        RecordData::Cname(target) | RecordData::Ns(target) => push_name(out, target),
        RecordData::Mx {
            preference,
            exchange,
        } => {
            out.extend_from_slice(&preference.to_be_bytes());
            push_name(out, exchange);
        }
        RecordData::Txt(text) => {
            // RFC 1035 §3.3.14: character-strings of at most 255 bytes each.
            for chunk in text.as_bytes().chunks(255) {
                out.push(chunk.len() as u8);
                out.extend_from_slice(chunk);
            }
            if text.is_empty() {
                out.push(0);
            }
        }
        RecordData::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            out.extend_from_slice(&priority.to_be_bytes());
            out.extend_from_slice(&weight.to_be_bytes());
            out.extend_from_slice(&port.to_be_bytes());
            // RFC 2782: the target is never compressed (it is not here either).
            push_name(out, target);
        }
        RecordData::Caa { flags, tag, value } => {
            out.push(*flags);
            out.push(tag.len() as u8);
            out.extend_from_slice(tag.as_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        RecordData::Soa(soa) => {
            push_name(out, &soa.mname);
            push_name(out, &soa.rname);
            for value in [soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum] {
                out.extend_from_slice(&value.to_be_bytes());
            }
        }
    }
    let rdlength = (out.len() - length_at - 2) as u16;
    out[length_at..length_at + 2].copy_from_slice(&rdlength.to_be_bytes());
}
