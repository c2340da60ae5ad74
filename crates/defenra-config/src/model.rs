//! The compiled, validated and immutable configuration every service reads.
//!
//! Names are normalised once here: lower case, fully qualified, without the trailing dot
//! (`www.example.com`). IPs are parsed, certificates are rustls `CertifiedKey`s, and
//! nothing in this module refers to Core's JSON names.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;

use crate::Cidr;

/// One complete, validated configuration. Services never see a half-applied update:
/// the whole snapshot is swapped through one pointer.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every published snapshot, also across restarts (it is at least the
    /// publish time in Unix seconds), so it can serve as the SOA serial.
    pub version: u64,
    /// When this snapshot was compiled.
    pub created_at: SystemTime,
    /// Served zones, in document order.
    pub domains: Vec<Arc<Domain>>,
    /// Enabled TCP/UDP forwards; disabled entries are left out.
    pub proxies: Vec<L4Proxy>,
    /// Edge agents of the network, the candidates for nearest-agent GeoDNS answers.
    pub agents: Vec<Agent>,
}

impl Snapshot {
    /// An empty snapshot (no domains, no proxies) with version 0.
    pub fn empty() -> Self {
        Snapshot {
            version: 0,
            created_at: SystemTime::now(),
            domains: Vec::new(),
            proxies: Vec::new(),
            agents: Vec::new(),
        }
    }

    /// Number of DNS records over all domains (GeoDNS entries not included).
    pub fn n_records(&self) -> usize {
        self.domains.iter().map(|domain| domain.records.len()).sum()
    }

    /// The served domain whose name is `name` exactly (normalised form).
    pub fn domain(&self, name: &str) -> Option<&Arc<Domain>> {
        self.domains.iter().find(|domain| domain.name == name)
    }
}

/// A customer domain: one DNS zone and its HTTP proxy settings.
#[derive(Debug, Clone)]
pub struct Domain {
    /// Core's id, for logs.
    pub id: Option<String>,
    /// The zone apex, normalised (`example.com`).
    pub name: String,
    /// Host records (GeoDNS entries are in `geo`). Names are fully qualified and
    /// normalised; a wildcard record is named `*.example.com`.
    pub records: Vec<Record>,
    /// GeoDNS data; `None` when the domain has none (most do not: a 10,000-domain
    /// snapshot should not carry 10,000 allocations of four empty collections).
    pub geo: Option<Box<GeoSettings>>,
    pub http_proxy: HttpProxy,
    /// The domain's certificate and key, when `ssl.enabled` and both parsed.
    pub tls: Option<Tls>,
    pub encryption_mode: EncryptionMode,
    /// `ssl.httpRedirectToHttps`: plain HTTP requests get a 301 to https.
    pub redirect_to_https: bool,
    pub acme_challenge: Option<Box<AcmeChallenge>>,
    /// The WAF script, untouched. `defenra-waf` compiles it.
    pub lua_code: Option<Arc<str>>,
    /// `httpProxy.antiDDoS` when Core sent one (enabled or not); `None` when it is absent or
    /// `null`, which is how most domains arrive.
    pub anti_ddos: Option<Arc<AntiDdos>>,
}

impl Domain {
    /// True when this domain has any GeoDNS data (map, fallback map, pools or location
    /// records), which makes its apex answer with an edge agent's address.
    pub fn has_geo(&self) -> bool {
        self.geo.as_ref().is_some_and(|geo| !geo.is_empty())
    }

    /// Whether `name` (normalised) is this zone's apex or below it.
    pub fn contains(&self, name: &str) -> bool {
        is_in_zone(name, &self.name)
    }
}

/// One DNS resource record. 48 bytes: a 10,000-domain config holds tens of thousands.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Fully qualified, lower case, no trailing dot. Records of one domain with the same
    /// owner share one allocation.
    pub name: Arc<str>,
    pub ttl: u32,
    pub data: RecordData,
    /// The record's `httpProxyEnabled`: DNS answers with an edge agent, HTTP proxies to
    /// this record's value.
    pub http_proxy: bool,
}

impl Record {
    pub fn record_type(&self) -> RecordType {
        self.data.record_type()
    }
}

/// The typed value of a record. Target names are normalised like record names. Strings
/// are `Box<str>` and the rare large variants are boxed, to keep this at 24 bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(Box<str>),
    Mx {
        preference: u16,
        exchange: Box<str>,
    },
    /// The full text; the DNS server splits it into 255-byte strings.
    Txt(Box<str>),
    Ns(Box<str>),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Box<str>,
    },
    Caa(Box<Caa>),
    Soa(Box<Soa>),
}

/// A CAA record (RFC 8659): `flags tag "value"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caa {
    pub flags: u8,
    /// Lower case.
    pub tag: Box<str>,
    pub value: Box<str>,
}

impl RecordData {
    pub fn record_type(&self) -> RecordType {
        match self {
            RecordData::A(_) => RecordType::A,
            RecordData::Aaaa(_) => RecordType::Aaaa,
            RecordData::Cname(_) => RecordType::Cname,
            RecordData::Mx { .. } => RecordType::Mx,
            RecordData::Txt(_) => RecordType::Txt,
            RecordData::Ns(_) => RecordType::Ns,
            RecordData::Srv { .. } => RecordType::Srv,
            RecordData::Caa(_) => RecordType::Caa,
            RecordData::Soa(_) => RecordType::Soa,
        }
    }
}

/// A configured SOA (`mname rname serial refresh retry expire minimum`). When a zone has
/// none, the DNS server synthesises one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Soa {
    pub mname: String,
    pub rname: String,
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    pub minimum: u32,
}

/// The record types the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    A,
    Aaaa,
    Cname,
    Mx,
    Txt,
    Ns,
    Srv,
    Caa,
    Soa,
}

impl RecordType {
    /// Parses Core's `type` field, case-insensitively.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_uppercase().as_str() {
            "A" => RecordType::A,
            "AAAA" => RecordType::Aaaa,
            "CNAME" => RecordType::Cname,
            "MX" => RecordType::Mx,
            "TXT" => RecordType::Txt,
            "NS" => RecordType::Ns,
            "SRV" => RecordType::Srv,
            "CAA" => RecordType::Caa,
            "SOA" => RecordType::Soa,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Cname => "CNAME",
            RecordType::Mx => "MX",
            RecordType::Txt => "TXT",
            RecordType::Ns => "NS",
            RecordType::Srv => "SRV",
            RecordType::Caa => "CAA",
            RecordType::Soa => "SOA",
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// GeoDNS data of one domain. Keys are lower case: ISO country codes (`us`), continent
/// names as Core spells them (`europe`, `north-america`), or `default`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeoSettings {
    /// `geoDnsMap` plus every record with a `locationCode` (several addresses, v4 and v6,
    /// may share a key).
    pub map: BTreeMap<String, Vec<IpAddr>>,
    /// `geoDnsFallbackMap`.
    pub fallback: BTreeMap<String, Vec<IpAddr>>,
    /// `geoDnsAgentPools`: weighted agents per location.
    pub pools: BTreeMap<String, Vec<PoolAgent>>,
    /// `geoDnsLocations`, for information and for location subdomains.
    pub locations: Vec<GeoLocation>,
}

impl GeoSettings {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.fallback.is_empty() && self.pools.is_empty()
    }
}

/// One weighted member of a GeoDNS pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolAgent {
    pub ip: IpAddr,
    /// Relative weight, > 0.
    pub weight: f64,
    /// Core's load score (0-100); agents above the selection threshold are skipped.
    pub load_score: Option<f64>,
    pub agent_id: Option<String>,
}

/// A named location from `geoDnsLocations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeoLocation {
    pub code: String,
    pub name: Option<String>,
    /// `continent`, `country`, ... as Core says.
    pub kind: Option<String>,
    pub subdomain: Option<String>,
}

/// Whether and where the domain is proxied over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpProxy {
    /// Every host of the domain is proxied (otherwise only records with
    /// `httpProxyEnabled`): true when Core sent an `httpProxy` object without
    /// `"enabled": false`, false when it sent none.
    pub enabled: bool,
    pub listeners: ProxyListeners,
}

impl Default for HttpProxy {
    fn default() -> Self {
        HttpProxy {
            enabled: false,
            listeners: ProxyListeners::Both,
        }
    }
}

/// `httpProxy.antiDDoS`, validated. Every value is in range; the defaults are Core's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AntiDdos {
    /// Nothing below applies unless this is set (bans are agent-wide and apply anyway).
    pub enabled: bool,
    pub rate_limit: RateLimit,
    /// How long an address that went over the rate limit stays blocked for this domain.
    pub block_duration: Duration,
    pub slowloris: Slowloris,
    pub js_challenge: JsChallenge,
    /// `logging.enabled`: log each block and ban decision (rate-limited).
    pub logging: bool,
    /// Addresses that bypass limits, challenges and blocks for this domain.
    pub ip_whitelist: Vec<Cidr>,
    /// Request headers that carry the client address when the agent sits behind another
    /// proxy, lower case, in order of preference (`cf-connecting-ip`).
    pub proxy_ip_headers: Vec<String>,
}

impl Default for AntiDdos {
    fn default() -> Self {
        AntiDdos {
            enabled: false,
            rate_limit: RateLimit::default(),
            block_duration: Duration::from_secs(300),
            slowloris: Slowloris::default(),
            js_challenge: JsChallenge::default(),
            logging: true,
            ip_whitelist: Vec::new(),
            proxy_ip_headers: Vec::new(),
        }
    }
}

/// `antiDDoS.rateLimit`: at most `max_requests` in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub window: Duration,
    pub max_requests: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            window: Duration::from_secs(5),
            max_requests: 100,
        }
    }
}

/// `antiDDoS.slowloris`: guards against clients that hold connections open cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slowloris {
    /// A request body must bring at least this many bytes per `max_header_timeout`.
    pub min_content_length: u64,
    /// Time a client has to send a complete request head.
    pub max_header_timeout: Duration,
    /// Concurrent connections per client address.
    pub max_connections: u32,
}

impl Default for Slowloris {
    fn default() -> Self {
        Slowloris {
            min_content_length: 128,
            max_header_timeout: Duration::from_secs(20),
            max_connections: 1000,
        }
    }
}

/// `antiDDoS.jsChallenge`: the browser proof-of-work challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsChallenge {
    pub enabled: bool,
    /// Name of the clearance cookie; a valid cookie token (RFC 6265 §4.1.1).
    pub cookie_name: String,
    /// How long a clearance lasts.
    pub ttl: Duration,
}

impl Default for JsChallenge {
    fn default() -> Self {
        JsChallenge {
            enabled: false,
            cookie_name: "defenra_js_challenge".to_owned(),
            ttl: Duration::from_secs(900),
        }
    }
}

/// `httpProxy.type`: which listeners serve the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyListeners {
    Http,
    Https,
    Both,
}

impl ProxyListeners {
    pub fn serves_http(self) -> bool {
        matches!(self, ProxyListeners::Http | ProxyListeners::Both)
    }
    pub fn serves_https(self) -> bool {
        matches!(self, ProxyListeners::Https | ProxyListeners::Both)
    }
}

/// The domain's certificate, parsed and checked against its key at compile time.
#[derive(Clone)]
pub struct Tls {
    pub certified_key: Arc<CertifiedKey>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("chain_len", &self.certified_key.cert.len())
            .finish()
    }
}

/// `ssl.encryptionMode`: how the agent reaches the origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncryptionMode {
    /// Plain HTTP to the origin (`off`, or absent).
    #[default]
    Off,
    /// HTTPS to the client, plain HTTP to the origin.
    Flexible,
    /// HTTPS to the origin without certificate verification.
    Full,
    /// HTTPS to the origin, certificate verified against the host name.
    FullStrict,
}

/// An ACME HTTP-01 answer: `GET /.well-known/acme-challenge/{token}` → `key_authorization`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeChallenge {
    pub token: String,
    pub key_authorization: String,
}

/// One enabled TCP or UDP forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Proxy {
    pub id: Option<String>,
    pub name: Option<String>,
    pub protocol: L4Protocol,
    /// Port to listen on (on `--l4-bind`).
    pub listen_port: u16,
    /// Host name or IP literal of the destination.
    pub destination_host: String,
    pub destination_port: u16,
    /// Send a PROXY protocol v2 header to the destination (TCP only).
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

impl L4Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An edge agent of the network (`agents`).
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: Option<String>,
    pub name: Option<String>,
    pub ip: IpAddr,
    /// ISO 3166 alpha-2, lower case.
    pub country: Option<String>,
    pub load_score: Option<f64>,
}

/// Whether `name` equals `zone` or lies below it (both normalised).
pub fn is_in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || (name.len() > zone.len()
            && name.ends_with(zone)
            && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

/// Lower-cases `name` and strips one trailing dot. Does not validate.
pub fn normalize_name(name: &str) -> String {
    let trimmed = name.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    trimmed.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_membership_respects_label_boundaries() {
        assert!(is_in_zone("example.com", "example.com"));
        assert!(is_in_zone("www.example.com", "example.com"));
        assert!(!is_in_zone("badexample.com", "example.com"));
        assert!(!is_in_zone("com", "example.com"));
    }

    #[test]
    fn names_are_lower_cased_without_trailing_dot() {
        assert_eq!(normalize_name("WWW.Example.COM."), "www.example.com");
        assert_eq!(normalize_name("mail.example.com"), "mail.example.com");
    }
}
