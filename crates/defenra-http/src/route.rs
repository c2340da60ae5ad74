//! The host table built from each snapshot: which domain a host belongs to, whether it is
//! proxied and where its origin is.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use defenra_config::{Domain, EncryptionMode, Issue, Record, RecordData, Snapshot};
use defenra_shield::DomainPolicy;
use http::uri::Authority;
use tokio::sync::Semaphore;

use crate::HttpOptions;
use crate::traffic::{DomainTraffic, TrafficRegistry};

/// Longest host name accepted (RFC 1035 §2.3.4: 253 characters in text form).
const MAX_HOST_LEN: usize = 253;

/// How many CNAME records inside the served zones are followed to find an origin address.
const MAX_CNAME_CHAIN: usize = 8;

/// Every host the proxy answers for, compiled from one snapshot: the apex and every record
/// name of every domain, wildcard records included. Immutable; `reload` builds a new one.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Exact host names (lower case, no trailing dot).
    exact: HostMap,
    /// Wildcard records keyed by their parent: `*.example.com` is stored as `example.com`.
    wildcard: HostMap,
    /// CNAME origins outside the served zones and how long their resolved addresses may
    /// be cached (the record's TTL, capped by the options).
    cname_ttls: HashMap<Box<str>, Duration>,
}

/// One host (or wildcard) of one domain.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) domain: Arc<Domain>,
    /// The host has a record with `httpProxyEnabled`, or its domain has `httpProxy.enabled`.
    pub(crate) proxied: bool,
    /// Where requests go; `None` when no usable A, AAAA or CNAME record was found.
    pub(crate) origin: Option<Origin>,
    /// The domain's protection policy when it has Anti-DDoS enabled.
    pub(crate) shield: Option<Arc<DomainPolicy>>,
    /// The domain's traffic counters, the same across reloads.
    pub(crate) traffic: Arc<DomainTraffic>,
}

/// Gives the shield policy of a domain while a table is built.
pub(crate) type PolicyOf<'a> = dyn FnMut(&Domain) -> Option<Arc<DomainPolicy>> + 'a;

/// The origin of a route, fixed when the table is built.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) kind: OriginKind,
    /// `address:port` to dial: an IP literal or a name for the system resolver.
    pub(crate) address: Authority,
    /// For HTTPS origins of exact hosts: `host@address:port`, the client pool key that
    /// also carries the server name to send and verify. Wildcard hosts build it per request.
    pub(crate) tls_authority: Option<Authority>,
    /// Shared by every route to the same address: `origin_max_connections` permits.
    pub(crate) limit: Arc<Semaphore>,
}

/// Connection limits by origin address, carried from one table to the next.
pub(crate) type OriginLimits = HashMap<String, Arc<Semaphore>>;

/// How the agent talks to an origin, from the domain's `ssl.encryptionMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OriginKind {
    /// Plain HTTP (`off`, `flexible`).
    Http,
    /// HTTPS without certificate verification (`full`).
    HttpsUnverified,
    /// HTTPS verifying the certificate against the host name with the webpki roots
    /// (`full_strict`).
    HttpsVerified,
}

impl RouteTable {
    /// Compiles the routes of `snapshot`. A host that appears in two domains belongs to the
    /// more specific zone (`a.sub.example.com` to `sub.example.com`); the other is reported.
    pub fn build(snapshot: &Snapshot, options: &HttpOptions, issues: &mut Vec<Issue>) -> Self {
        RouteTable::build_with_limits(
            snapshot,
            options,
            issues,
            &mut OriginLimits::new(),
            &mut |_| None,
            &TrafficRegistry::default(),
        )
    }

    /// As [`RouteTable::build`], reusing the connection limits of origins that stay and
    /// dropping those of origins that went, and the traffic counters of domains that stay.
    pub(crate) fn build_with_limits(
        snapshot: &Snapshot,
        options: &HttpOptions,
        issues: &mut Vec<Issue>,
        limits: &mut OriginLimits,
        policy_of: &mut PolicyOf<'_>,
        registry: &TrafficRegistry,
    ) -> Self {
        let traffic =
            registry.reconcile(snapshot.domains.iter().map(|domain| domain.name.as_str()));
        let traffic_of = |domain: &Domain| {
            traffic
                .get(domain.name.as_str())
                .cloned()
                .unwrap_or_default()
        };
        let mut used: OriginLimits = HashMap::new();
        // One policy per domain, shared by its routes.
        let mut policies: HashMap<*const Domain, Option<Arc<DomainPolicy>>> = HashMap::new();
        let mut policy = |domain: &Arc<Domain>| {
            policies
                .entry(Arc::as_ptr(domain))
                .or_insert_with(|| policy_of(domain))
                .clone()
        };
        let mut domains: Vec<(usize, &Arc<Domain>)> = snapshot.domains.iter().enumerate().collect();
        // Most specific zone first, so it claims its names before a parent zone does.
        domains.sort_by_key(|(_, domain)| std::cmp::Reverse(domain.name.len()));

        // First pass: each host's own origin target, before CNAMEs are followed.
        let mut hosts: HashMap<String, HostEntry> = HashMap::new();
        for (index, domain) in domains {
            // Records grouped by owner once, in document order: a domain with 100,000
            // records is built in linear time (a scan per name was quadratic: 53 s).
            let mut by_name: HashMap<&str, Vec<&Record>> = HashMap::new();
            let mut names: Vec<&str> = vec![domain.name.as_str()];
            by_name.insert(domain.name.as_str(), Vec::new());
            for record in &domain.records {
                by_name
                    .entry(&record.name)
                    .or_insert_with(|| {
                        names.push(&record.name);
                        Vec::new()
                    })
                    .push(record);
            }
            let apex = &by_name[domain.name.as_str()];
            for name in &names {
                if hosts.contains_key(*name) {
                    issues.push(Issue::new(
                        format!("domains[{index}]"),
                        format!("host {name} already belongs to a more specific domain; skipped"),
                    ));
                    continue;
                }
                let entry = HostEntry::new(domain, &by_name[name], apex);
                hosts.insert((*name).to_owned(), entry);
            }
        }

        let mut table = RouteTable::default();
        // Hosts without an origin (not proxied, or nothing to proxy to) share one route
        // per domain: with 10,000 DNS-only domains that is most of the table.
        let mut originless: HashMap<(*const Domain, bool), Arc<Route>> = HashMap::new();
        for (name, entry) in &hosts {
            let target = resolve_target(&hosts, entry.target.clone());
            let origin = target.and_then(|target| {
                let (address, kind) = origin_address(&entry.domain, &target, options)?;
                if let Target::Name { name, ttl } = &target {
                    let ttl = Duration::from_secs(u64::from(*ttl)).min(options.origin_dns_max_ttl);
                    table.cname_ttls.insert(name.as_str().into(), ttl);
                }
                let tls_authority = match kind {
                    OriginKind::Http => None,
                    _ if name.starts_with("*.") => None,
                    _ => Authority::try_from(format!("{name}@{address}")).ok(),
                };
                let limit = used
                    .entry(address.as_str().to_owned())
                    .or_insert_with(|| match limits.get(address.as_str()) {
                        Some(limit) => Arc::clone(limit),
                        None => Arc::new(Semaphore::new(options.origin_max_connections.max(1))),
                    })
                    .clone();
                Some(Origin {
                    kind,
                    address,
                    tls_authority,
                    limit,
                })
            });
            let route = match origin {
                None => Arc::clone(
                    originless
                        .entry((Arc::as_ptr(&entry.domain), entry.proxied))
                        .or_insert_with(|| {
                            Arc::new(Route {
                                domain: Arc::clone(&entry.domain),
                                proxied: entry.proxied,
                                origin: None,
                                shield: policy(&entry.domain),
                                traffic: traffic_of(&entry.domain),
                            })
                        }),
                ),
                Some(origin) => Arc::new(Route {
                    domain: Arc::clone(&entry.domain),
                    proxied: entry.proxied,
                    origin: Some(origin),
                    shield: policy(&entry.domain),
                    traffic: traffic_of(&entry.domain),
                }),
            };
            match name.strip_prefix("*.") {
                Some(parent) => table.wildcard.push(parent, route),
                None => table.exact.push(name, route),
            };
        }
        table.exact.finish();
        table.wildcard.finish();
        table.cname_ttls.shrink_to_fit();
        *limits = used;
        table
    }

    /// Number of hosts (wildcards included).
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `host` (any case, no port) has a route.
    pub fn contains(&self, host: &str) -> bool {
        with_lower_host(host, |host| self.find(host).is_some()).unwrap_or(false)
    }

    /// The route of `host` given in any case, without port: the exact name first, then the
    /// nearest wildcard (`*.b.example.com`, then `*.example.com` for `a.b.example.com`).
    pub(crate) fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        with_lower_host(host, |host| self.find(host)).flatten()
    }

    /// The CNAME targets resolved by the system resolver and their cache time.
    pub(crate) fn cname_ttl(&self, name: &str) -> Option<Duration> {
        self.cname_ttls.get(name).copied()
    }

    /// Heap bytes held by the table's own structures (routes shared with other hosts
    /// counted once per host), for memory checks.
    pub fn heap_bytes(&self) -> usize {
        self.exact.heap_bytes() + self.wildcard.heap_bytes()
    }

    fn find(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(route) = self.exact.get(host) {
            return Some(route);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(route) = self.wildcard.get(parent) {
                return Some(route);
            }
            rest = parent;
        }
        None
    }
}

/// Host names to routes, compact: one string holds every name, and the lookup table is
/// an open-addressing array of `u32` entry indexes (a `HashMap<Box<str>, _>` costs a boxed
/// key and a 24-byte bucket per host).
#[derive(Debug, Default)]
struct HostMap {
    /// Entry indexes by name hash, linear probing; `u32::MAX` is empty. A power of two at
    /// least twice the number of entries (or empty).
    slots: Box<[u32]>,
    entries: Vec<HostSlot>,
    names: String,
    hasher: RandomState,
}

#[derive(Debug)]
struct HostSlot {
    name_start: u32,
    name_len: u32,
    route: Arc<Route>,
}

impl HostMap {
    const EMPTY: u32 = u32::MAX;

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `name` (unique: the caller's host map has each name once). [`HostMap::finish`]
    /// must run before lookups.
    fn push(&mut self, name: &str, route: Arc<Route>) {
        self.entries.push(HostSlot {
            name_start: self.names.len() as u32,
            name_len: name.len() as u32,
            route,
        });
        self.names.push_str(name);
    }

    fn name(&self, entry: &HostSlot) -> &str {
        let start = entry.name_start as usize;
        self.names
            .get(start..start + entry.name_len as usize)
            .unwrap_or("")
    }

    fn finish(&mut self) {
        self.entries.shrink_to_fit();
        self.names.shrink_to_fit();
        if self.entries.is_empty() {
            return;
        }
        let capacity = (self.entries.len() * 2).next_power_of_two();
        let mask = capacity - 1;
        let mut slots = vec![Self::EMPTY; capacity].into_boxed_slice();
        for (index, entry) in self.entries.iter().enumerate() {
            let mut slot = self.hasher.hash_one(self.name(entry)) as usize & mask;
            while slots[slot] != Self::EMPTY {
                slot = (slot + 1) & mask;
            }
            slots[slot] = index as u32;
        }
        self.slots = slots;
    }

    fn get(&self, name: &str) -> Option<&Arc<Route>> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut slot = self.hasher.hash_one(name) as usize & mask;
        loop {
            let index = self.slots[slot];
            let entry = self.entries.get(index as usize)?;
            if self.name(entry) == name {
                return Some(&entry.route);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.len() * size_of::<u32>()
            + self.entries.capacity() * size_of::<HostSlot>()
            + self.names.capacity()
    }
}

/// Calls `f` with `host` lower-cased and without a trailing dot, using a stack buffer so
/// that a lookup never allocates. `None` when the name is too long or not UTF-8.
pub(crate) fn with_lower_host<T>(host: &str, f: impl FnOnce(&str) -> T) -> Option<T> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() > MAX_HOST_LEN || host.is_empty() {
        return None;
    }
    if !host.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return Some(f(host));
    }
    let mut buffer = [0u8; MAX_HOST_LEN];
    let lower = &mut buffer[..host.len()];
    lower.copy_from_slice(host.as_bytes());
    lower.make_ascii_lowercase();
    std::str::from_utf8(lower).ok().map(f)
}

/// Splits the port off a Host header or `:authority` value (`example.com:8080`,
/// `[2001:db8::1]:443`).
pub(crate) fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest
            .split_once(']')
            .map_or(authority, |(literal, _)| literal);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// A host during table building.
struct HostEntry {
    domain: Arc<Domain>,
    proxied: bool,
    target: Option<Target>,
}

/// An origin before ports and schemes are applied.
#[derive(Debug, Clone)]
enum Target {
    Ip(IpAddr),
    /// A CNAME target; `ttl` is the CNAME record's.
    Name {
        name: String,
        ttl: u32,
    },
}

impl HostEntry {
    /// The host whose records are `own`, in `domain` whose apex records are `apex`.
    fn new(domain: &Arc<Domain>, own: &[&Record], apex: &[&Record]) -> Self {
        let enabled = domain.http_proxy.enabled;
        let proxied = enabled || own.iter().any(|record| record.http_proxy);
        // The host's flagged record, then (for a domain proxied as a whole) any of its
        // address records, then the same at the apex.
        let target = pick(own, true)
            .or_else(|| enabled.then(|| pick(own, false)).flatten())
            .or_else(|| pick(apex, true))
            .or_else(|| enabled.then(|| pick(apex, false)).flatten());
        HostEntry {
            domain: Arc::clone(domain),
            proxied,
            target,
        }
    }
}

fn pick(records: &[&Record], flagged_only: bool) -> Option<Target> {
    records
        .iter()
        .filter(|record| record.http_proxy || !flagged_only)
        .find_map(|record| match &record.data {
            RecordData::A(ip) => Some(Target::Ip(IpAddr::V4(*ip))),
            RecordData::Aaaa(ip) => Some(Target::Ip(IpAddr::V6(*ip))),
            RecordData::Cname(name) => Some(Target::Name {
                name: name.to_string(),
                ttl: record.ttl,
            }),
            _ => None,
        })
}

/// Follows CNAMEs that point at hosts of the served zones (the system resolver would answer
/// with this agent's own address for a proxied host, and the request would loop).
fn resolve_target(hosts: &HashMap<String, HostEntry>, target: Option<Target>) -> Option<Target> {
    let mut target = target?;
    for _ in 0..MAX_CNAME_CHAIN {
        let Target::Name { name, .. } = &target else {
            return Some(target);
        };
        match hosts.get(name) {
            Some(entry) => target = entry.target.clone()?,
            None => return Some(target),
        }
    }
    // A loop of CNAMEs inside the served zones has no origin.
    None
}

fn origin_address(
    domain: &Domain,
    target: &Target,
    options: &HttpOptions,
) -> Option<(Authority, OriginKind)> {
    let (kind, port) = match domain.encryption_mode {
        EncryptionMode::Off | EncryptionMode::Flexible => {
            (OriginKind::Http, options.origin_http_port)
        }
        EncryptionMode::Full => (OriginKind::HttpsUnverified, options.origin_https_port),
        EncryptionMode::FullStrict => (OriginKind::HttpsVerified, options.origin_https_port),
    };
    let text = match target {
        Target::Ip(IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Target::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Target::Name { name, .. } => format!("{name}:{port}"),
    };
    Authority::try_from(text)
        .ok()
        .map(|address| (address, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(domains: serde_json::Value) -> (RouteTable, Vec<Issue>) {
        let document = serde_json::json!({ "success": true, "domains": domains });
        let compiled = defenra_config::compile(document.to_string().as_bytes()).unwrap();
        let mut issues = compiled.issues;
        let options = HttpOptions::default();
        (
            RouteTable::build(&compiled.snapshot, &options, &mut issues),
            issues,
        )
    }

    #[test]
    fn the_more_specific_zone_owns_a_shared_name() {
        let (routes, issues) = table(serde_json::json!([
            { "domain": "example.com", "dnsRecords": [
                { "name": "sub", "type": "A", "value": "192.0.2.1", "httpProxyEnabled": true } ] },
            { "domain": "sub.example.com", "dnsRecords": [
                { "name": "@", "type": "A", "value": "192.0.2.2", "httpProxyEnabled": true } ] },
        ]));
        let route = routes.lookup("SUB.example.com").unwrap();
        assert_eq!(route.domain.name, "sub.example.com");
        assert_eq!(
            route.origin.as_ref().unwrap().address.as_str(),
            "192.0.2.2:80"
        );
        assert_eq!(issues.len(), 1, "{issues:?}");
    }

    #[test]
    fn a_domain_with_a_hundred_thousand_records_builds_in_linear_time() {
        // Quadratic before: 53 s in a release build for this table. Linear, it takes well
        // under a second even unoptimised; 10 s leaves room for a loaded machine.
        let records: Vec<serde_json::Value> = (0..100_000)
            .map(|n| {
                serde_json::json!({ "name": format!("h{n}"), "type": "A",
                                    "value": "192.0.2.1", "httpProxyEnabled": true })
            })
            .collect();
        let document = serde_json::json!({ "success": true, "domains": [
            { "domain": "example.com", "dnsRecords": records } ] });
        let compiled = defenra_config::compile(document.to_string().as_bytes()).unwrap();
        let mut issues = compiled.issues;
        let started = std::time::Instant::now();
        let routes = RouteTable::build(&compiled.snapshot, &HttpOptions::default(), &mut issues);
        let took = started.elapsed();
        assert!(issues.is_empty());
        assert!(routes.lookup("h99999.example.com").unwrap().proxied);
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn cname_loops_inside_the_zones_have_no_origin() {
        let (routes, _) = table(serde_json::json!([
            { "domain": "example.com", "dnsRecords": [
                { "name": "a", "type": "CNAME", "value": "b.example.com", "httpProxyEnabled": true },
                { "name": "b", "type": "CNAME", "value": "a.example.com", "httpProxyEnabled": true } ] },
        ]));
        let route = routes.lookup("a.example.com").unwrap();
        assert!(route.proxied);
        assert!(route.origin.is_none());
    }

    #[test]
    fn https_origins_carry_the_server_name_in_the_pool_key() {
        let (routes, _) = table(serde_json::json!([
            { "domain": "example.com", "ssl": { "encryptionMode": "full_strict" }, "dnsRecords": [
                { "name": "www", "type": "AAAA", "value": "2001:db8::1", "httpProxyEnabled": true },
                { "name": "*", "type": "A", "value": "192.0.2.1", "httpProxyEnabled": true } ] },
        ]));
        let origin = routes
            .lookup("www.example.com")
            .unwrap()
            .origin
            .clone()
            .unwrap();
        assert_eq!(origin.kind, OriginKind::HttpsVerified);
        assert_eq!(origin.address.as_str(), "[2001:db8::1]:443");
        assert_eq!(
            origin.tls_authority.unwrap().as_str(),
            "www.example.com@[2001:db8::1]:443"
        );
        let wildcard = routes
            .lookup("x.example.com")
            .unwrap()
            .origin
            .clone()
            .unwrap();
        assert!(
            wildcard.tls_authority.is_none(),
            "built per request from the host"
        );
    }

    #[test]
    fn every_host_is_found_and_hosts_without_origin_share_a_route() {
        let domains: Vec<serde_json::Value> = (0..200)
            .map(|n| {
                serde_json::json!({ "domain": format!("d{n}.example"), "dnsRecords": [
                    { "name": "@", "type": "A", "value": "192.0.2.1" },
                    { "name": "www", "type": "A", "value": "192.0.2.2" },
                    { "name": "*.img", "type": "A", "value": "192.0.2.3" },
                    { "name": "app", "type": "A", "value": "192.0.2.4", "httpProxyEnabled": true } ] })
            })
            .collect();
        let (routes, issues) = table(serde_json::Value::Array(domains));
        assert_eq!(issues, vec![]);
        assert_eq!(routes.len(), 800);
        for n in 0..200 {
            let apex = routes.lookup(&format!("d{n}.example")).unwrap();
            let www = routes.lookup(&format!("WWW.d{n}.example")).unwrap();
            let image = routes.lookup(&format!("a.img.d{n}.example")).unwrap();
            assert_eq!(apex.domain.name, format!("d{n}.example"));
            assert!(!apex.proxied && apex.origin.is_none());
            assert!(
                Arc::ptr_eq(apex, www),
                "one route for the domain's plain hosts"
            );
            assert!(Arc::ptr_eq(apex, image));
            let app = routes.lookup(&format!("app.d{n}.example")).unwrap();
            assert!(app.proxied);
            assert_eq!(
                app.origin.as_ref().unwrap().address.as_str(),
                "192.0.2.4:80"
            );
            assert!(routes.lookup(&format!("nope.d{n}.example")).is_none());
            assert!(routes.lookup(&format!("img.d{n}.example")).is_none());
        }
        assert!(routes.lookup("example").is_none());
        assert!(RouteTable::default().lookup("d1.example").is_none());
    }

    #[test]
    fn ports_are_stripped_from_names_and_ipv6_literals() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(strip_port("[2001:db8::1]"), "2001:db8::1");
    }

    #[test]
    fn hosts_are_lower_cased_without_allocating_and_long_names_refused() {
        assert_eq!(
            with_lower_host("WWW.Example.COM.", str::to_owned).as_deref(),
            Some("www.example.com")
        );
        assert_eq!(with_lower_host(&"a".repeat(300), |_| ()), None);
        assert_eq!(with_lower_host("", |_| ()), None);
    }
}
