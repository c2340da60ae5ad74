//! [`ZoneIndex`]: every served name with its answers precompiled to wire bytes, built from
//! a snapshot at reload time.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;

use defenra_config::compile::DEFAULT_TTL;
use defenra_config::{Domain, GeoSettings, Issue, Record, RecordData, Snapshot};
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
/// Longest name in text form (RFC 1035 §2.3.4); node names are stored with a `u8` length.
const MAX_NAME_LEN: usize = 253;

/// All served names of one snapshot. Immutable; replaced whole on reload.
///
/// Laid out for a small footprint (a 10,000-domain config must fit the agent in 30 MiB):
/// names and wire bytes live in one arena, nodes are fixed-size structs of `u32` offsets,
/// and the name lookup is an open-addressing table of node ids (4 bytes a slot) rather
/// than a hash map owning a boxed key per name.
#[derive(Debug, Default)]
pub struct ZoneIndex {
    /// Node ids by name hash, linear probing; [`NONE`] marks an empty slot. The length is
    /// a power of two at least twice the number of nodes (or zero).
    slots: Box<[u32]>,
    /// Seeds the name hash, so nobody can choose names that collide.
    hasher: RandomState,
    nodes: Vec<Node>,
    zones: Vec<Zone>,
    cnames: Vec<Cname>,
    /// Every node's record sets, each node's contiguous.
    rrsets: Vec<RrSet>,
    /// One arena for all bytes: node names, record sets, wire-form names.
    bytes: Vec<u8>,
    n_records: usize,
    /// Set by the service at reload: tells indexes apart in the rate limiter, whose
    /// classes hold node and zone ids of one index.
    pub(crate) generation: u64,
}

/// "None" for the `u32` links of [`Node`] and the slots of the name table.
const NONE: u32 = u32::MAX;

/// A range of [`ZoneIndex`]'s byte arena.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }

    pub(crate) fn len(self) -> usize {
        self.len as usize
    }
}

/// One name that exists in a zone: it owns records, or names below it do (an empty
/// non-terminal, RFC 8020). 28 bytes: one per name of every served zone.
#[derive(Debug)]
pub(crate) struct Node {
    /// The lower-case dotted name in the arena (at most 253 bytes).
    name_start: u32,
    pub(crate) zone: u32,
    /// Record sets other than CNAME, sorted by type (see [`ZoneIndex::rrsets`]).
    rrsets_start: u32,
    /// Index into [`ZoneIndex::cnames`], or [`NONE`].
    cname: u32,
    /// The `*` child of this name (RFC 4592 source of synthesis), or [`NONE`].
    wildcard: u32,
    /// TTL of GeoDNS answers, valid when `geo`.
    geo_ttl: u32,
    name_len: u8,
    rrsets_len: u8,
    /// A and AAAA come from the zone's GeoDNS plan (proxied names, and the apex of a
    /// domain with GeoDNS data).
    geo: bool,
}

impl Node {
    fn new(zone: u32, name: Span) -> Node {
        Node {
            name_start: name.start,
            zone,
            rrsets_start: 0,
            cname: NONE,
            wildcard: NONE,
            geo_ttl: 0,
            name_len: name.len as u8,
            rrsets_len: 0,
            geo: false,
        }
    }

    fn name(&self) -> Span {
        Span {
            start: self.name_start,
            len: u32::from(self.name_len),
        }
    }

    /// `Some(ttl)` when A and AAAA are answered from the zone's GeoDNS plan.
    pub(crate) fn geo_ttl(&self) -> Option<u32> {
        self.geo.then_some(self.geo_ttl)
    }

    /// The `*` child of this name, if any.
    pub(crate) fn wildcard(&self) -> Option<u32> {
        (self.wildcard != NONE).then_some(self.wildcard)
    }

    pub(crate) fn has_cname(&self) -> bool {
        self.cname != NONE
    }
}

#[derive(Debug)]
pub(crate) struct Cname {
    pub(crate) rrset: Span,
    /// The target, lower-case dotted, for chasing.
    pub(crate) target: Span,
    /// The target in wire form: the owner of the records found by chasing.
    pub(crate) target_wire: Span,
}

/// Records of one type at one name, as wire bytes after the owner name: for each record
/// type, class, TTL, RDLENGTH and RDATA. Writing one is the owner plus a copy. A set
/// never exceeds 65,535 bytes (no DNS message could carry more).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RrSet {
    start: u32,
    len: u16,
    pub(crate) rtype: u16,
}

impl RrSet {
    pub(crate) fn bytes(self) -> Span {
        Span {
            start: self.start,
            len: u32::from(self.len),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Zone {
    pub(crate) apex_wire: Span,
    /// The apex's SOA record (type to RDATA), shared with the apex's answer. In the
    /// authority section its TTL is replaced by `negative_ttl` (RFC 2308 §3).
    pub(crate) soa: Span,
    pub(crate) negative_ttl: u32,
    /// Boxed: most zones have none, and a plan is several hundred bytes.
    pub(crate) plan: Option<Box<GeoPlan>>,
}

impl ZoneIndex {
    /// Compiles `snapshot`. Records that cannot be served (a CNAME beside other data, a
    /// name that belongs to another served zone) are left out and reported in `issues`.
    pub fn build(snapshot: &Snapshot, agent_ip: Option<IpAddr>, issues: &mut Vec<Issue>) -> Self {
        let mut builder = Builder {
            index: ZoneIndex::default(),
            names: HashMap::new(),
            zone_names: snapshot
                .domains
                .iter()
                .map(|domain| domain.name.as_str())
                .collect(),
        };
        for (zone_id, (position, domain)) in snapshot.domains.iter().enumerate().enumerate() {
            builder.add_domain(zone_id as u32, position, domain, snapshot, agent_ip, issues);
        }
        drop(builder.names);
        // The index lives until the next reload: give back what the growing vectors
        // over-reserved.
        let mut index = builder.index;
        index.nodes.shrink_to_fit();
        index.zones.shrink_to_fit();
        index.cnames.shrink_to_fit();
        index.rrsets.shrink_to_fit();
        index.bytes.shrink_to_fit();
        index.fill_slots();
        index
    }

    /// Builds the name table over all nodes.
    fn fill_slots(&mut self) {
        if self.nodes.is_empty() {
            return;
        }
        let capacity = (self.nodes.len() * 2).next_power_of_two();
        let mut slots = vec![NONE; capacity].into_boxed_slice();
        let mask = capacity - 1;
        for (id, node) in self.nodes.iter().enumerate() {
            let mut slot = self.hasher.hash_one(&self.bytes[node.name().range()]) as usize & mask;
            while slots[slot] != NONE {
                slot = (slot + 1) & mask;
            }
            slots[slot] = id as u32;
        }
        self.slots = slots;
    }

    /// Number of served zones.
    pub fn n_zones(&self) -> usize {
        self.zones.len()
    }

    /// Number of records served (synthesised SOA and NS included).
    pub fn n_records(&self) -> usize {
        self.n_records
    }

    /// Heap bytes held by the index (capacity of its tables and arena), for memory checks.
    pub fn heap_bytes(&self) -> usize {
        self.slots.len() * size_of::<u32>()
            + self.nodes.capacity() * size_of::<Node>()
            + self.zones.capacity() * size_of::<Zone>()
            + self.cnames.capacity() * size_of::<Cname>()
            + self.rrsets.capacity() * size_of::<RrSet>()
            + self.bytes.capacity()
            + self.zones.iter().filter(|zone| zone.plan.is_some()).count() * size_of::<GeoPlan>()
    }

    /// The node named `name` (lower-case dotted). No allocation: one hash, then a probe
    /// along the table comparing names in the arena.
    pub(crate) fn node_by_name(&self, name: &[u8]) -> Option<(u32, &Node)> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut slot = self.hasher.hash_one(name) as usize & mask;
        loop {
            let id = self.slots[slot];
            if id == NONE {
                return None;
            }
            let node = &self.nodes[id as usize];
            if usize::from(node.name_len) == name.len() && self.bytes(node.name()) == name {
                return Some((id, node));
            }
            slot = (slot + 1) & mask;
        }
    }

    pub(crate) fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    /// The lower-case dotted name of node `id` (empty for the root or an unknown id), for
    /// log lines.
    pub(crate) fn node_name(&self, id: u32) -> &str {
        self.nodes
            .get(id as usize)
            .and_then(|node| std::str::from_utf8(self.bytes(node.name())).ok())
            .unwrap_or("")
    }

    /// The dotted apex name of zone `id` (empty for an unknown id), for log lines.
    pub(crate) fn zone_name(&self, id: u32) -> String {
        let mut name = String::new();
        let Some(zone) = self.zones.get(id as usize) else {
            return name;
        };
        let mut wire = self.bytes(zone.apex_wire);
        while let Some((&len, rest)) = wire.split_first() {
            let Some(label) = rest
                .get(..usize::from(len))
                .filter(|label| !label.is_empty())
            else {
                break;
            };
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(&String::from_utf8_lossy(label));
            wire = &rest[label.len()..];
        }
        name
    }

    pub(crate) fn zone(&self, id: u32) -> &Zone {
        &self.zones[id as usize]
    }

    /// The CNAME of `node`, if it has one.
    pub(crate) fn cname(&self, node: &Node) -> Option<&Cname> {
        self.cnames.get(node.cname as usize)
    }

    /// The record sets of `node`.
    pub(crate) fn rrsets(&self, node: &Node) -> &[RrSet] {
        let start = node.rrsets_start as usize;
        &self.rrsets[start..start + usize::from(node.rrsets_len)]
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
    /// (RFC 2181 §5), and all records get the lowest TTL (RFC 2181 §5.2). Records that
    /// would take the set past 65,535 bytes are left out; returns how many.
    fn push_rrset(&mut self, rtype: u16, records: &[(&RecordData, u32)]) -> (RrSet, usize) {
        let start = self.bytes.len();
        let ttl = records.iter().map(|(_, ttl)| *ttl).min().unwrap_or(0);
        let mut seen: Vec<&RecordData> = Vec::new();
        let mut dropped = 0;
        for (data, _) in records {
            if seen.contains(data) {
                continue;
            }
            seen.push(data);
            let before = self.bytes.len();
            push_record_tail(&mut self.bytes, rtype, ttl, data);
            if self.bytes.len() - start > usize::from(u16::MAX) {
                self.bytes.truncate(before);
                dropped += 1;
            }
        }
        let rrset = RrSet {
            start: start as u32,
            len: (self.bytes.len() - start) as u16,
            rtype,
        };
        (rrset, dropped)
    }
}

struct Builder<'s> {
    index: ZoneIndex,
    /// Node ids by name while building; the index's own table is filled at the end.
    names: HashMap<String, u32>,
    zone_names: HashSet<&'s str>,
}

/// Records of one owner name, gathered before compiling.
#[derive(Default)]
struct Owner<'a> {
    records: Vec<(usize, &'a Record)>,
}

impl<'s> Builder<'s> {
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
                .entry(&*record.name)
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
        let negative_ttl = soa_ttl.min(soa.minimum);

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
            synthesized.push((
                apex.to_owned(),
                RecordData::Ns(soa.mname.as_str().into()),
                SOA_TTL,
            ));
            if let Some(ip) = agent_ip
                && soa.mname.len() <= MAX_NAME_LEN
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
                name: name.into(),
                ttl,
                data,
                http_proxy: false,
            })
            .collect();
        for record in &synthesized_records {
            owners
                .entry(&*record.name)
                .or_default()
                .records
                .push((usize::MAX, record));
        }

        let needs_plan = domain.has_geo() || domain.records.iter().any(|record| record.http_proxy);
        let plan = needs_plan.then(|| {
            let empty = GeoSettings::default();
            let geo = domain.geo.as_deref().unwrap_or(&empty);
            for key in GeoPlan::ignored_keys(geo) {
                issues.push(Issue::new(
                    format!("domains[{position}].geoDnsMap.{key}"),
                    format!(
                        "{key:?} is not a country code, continent or `default`; \
                         GeoDNS selection ignores it"
                    ),
                ));
            }
            Box::new(GeoPlan::compile(geo, &snapshot.agents, agent_ip))
        });
        let apex_wire = self.index.push_name(apex);
        self.index.zones.push(Zone {
            apex_wire,
            soa: Span::default(),
            negative_ttl,
            plan,
        });

        for (name, owner) in &owners {
            let id = self.ensure_node(name, zone_id);
            self.compile_owner(id, position, name, owner, domain, issues);
            // Empty non-terminals between the name and the apex, and the wildcard link.
            let mut child = id;
            let mut rest = *name;
            while rest != apex {
                let Some((label, parent)) = rest.split_once('.') else {
                    break;
                };
                let parent_id = self.ensure_node(parent, zone_id);
                if label == "*" && rest == *name {
                    self.index.nodes[parent_id as usize].wildcard = child;
                }
                child = parent_id;
                rest = parent;
            }
        }

        // The authority section's SOA is the apex's first SOA record, written once.
        let apex_node = &self.index.nodes[self.names[apex] as usize];
        let soa_set = self
            .index
            .rrsets(apex_node)
            .iter()
            .find(|rrset| rrset.rtype == TYPE_SOA)
            .copied();
        let soa = match soa_set {
            Some(rrset) => {
                let span = rrset.bytes();
                let tail = self.index.bytes(span);
                let first_len = tail.get(8..10).map_or(0, |len| {
                    10 + usize::from(u16::from_be_bytes([len[0], len[1]]))
                });
                Span {
                    start: span.start,
                    len: first_len.min(tail.len()) as u32,
                }
            }
            // Unreachable: the apex always has a configured or synthesised SOA.
            None => {
                let data = RecordData::Soa(Box::new(soa.clone()));
                self.index
                    .push_rrset(TYPE_SOA, &[(&data, negative_ttl)])
                    .0
                    .bytes()
            }
        };
        if let Some(zone) = self.index.zones.last_mut() {
            zone.soa = soa;
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
        if let Some(id) = self.names.get(name) {
            return *id;
        }
        let id = self.index.nodes.len() as u32;
        let span = self.index.push_bytes(name.as_bytes());
        self.index.nodes.push(Node::new(zone_id, span));
        self.names.insert(name.to_owned(), id);
        id
    }

    /// Compiles the records of `name` into node `id`.
    fn compile_owner(
        &mut self,
        id: u32,
        position: usize,
        name: &str,
        owner: &Owner<'_>,
        domain: &Domain,
        issues: &mut Vec<Issue>,
    ) {
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
                        .push_rrset(TYPE_CNAME, &[(&record.data, record.ttl)])
                        .0
                        .bytes(),
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
            let (rrset, dropped) = self.index.push_rrset(*rtype, records);
            if dropped > 0 {
                self.index.n_records -= dropped;
                issues.push(Issue::new(
                    format!("domains[{position}].dnsRecords"),
                    format!(
                        "the {} records of {name:?} exceed 65,535 bytes; {dropped} left out",
                        rtype_name(*rtype)
                    ),
                ));
            }
            self.index.rrsets.push(rrset);
        }
        let cname = match cname {
            Some(cname) => {
                self.index.cnames.push(cname);
                (self.index.cnames.len() - 1) as u32
            }
            None => NONE,
        };
        let node = &mut self.index.nodes[id as usize];
        node.rrsets_start = first as u32;
        node.rrsets_len = (self.index.rrsets.len() - first) as u8;
        node.cname = cname;
        node.geo = geo_ttl.is_some();
        node.geo_ttl = geo_ttl.unwrap_or(0);
    }
}

fn rtype_name(rtype: u16) -> &'static str {
    match rtype {
        TYPE_A => "A",
        TYPE_AAAA => "AAAA",
        TYPE_CNAME => "CNAME",
        TYPE_MX => "MX",
        TYPE_TXT => "TXT",
        TYPE_NS => "NS",
        TYPE_SRV => "SRV",
        TYPE_CAA => "CAA",
        _ => "SOA",
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
        RecordData::Caa(_) => TYPE_CAA,
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
        RecordData::Caa(caa) => {
            out.push(caa.flags);
            out.push(caa.tag.len() as u8);
            out.extend_from_slice(caa.tag.as_bytes());
            out.extend_from_slice(caa.value.as_bytes());
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
