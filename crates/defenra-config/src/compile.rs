//! Validation and compilation: a Core document in, a [`Snapshot`] plus a list of issues out.
//!
//! Only a document that is not JSON, not an object, or says `success: false` is rejected.
//! Anything smaller (a record, a domain, a certificate, a proxy) that is wrong becomes an
//! [`Issue`] naming its JSON path and is left out; the rest loads.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::model::{
    AcmeChallenge, Agent, Caa, Domain, EncryptionMode, GeoLocation, GeoSettings, HttpProxy,
    L4Protocol, L4Proxy, PoolAgent, ProxyListeners, Record, RecordData, RecordType, Snapshot, Soa,
    Tls, is_in_zone, normalize_name,
};
use crate::wire::{self, Item};
use crate::{Issue, Rejected};

/// TTL used when a record has none.
pub const DEFAULT_TTL: u32 = 300;
/// RFC 2181 §8: TTLs are 31-bit.
const MAX_TTL: u32 = i32::MAX as u32;
/// Range of a GeoDNS pool member's weight (0 drains it). Ratios up to a billion are more
/// than any pool needs; weights beyond are clamped, so that extreme values cannot defeat
/// the weighted choice.
pub const MIN_POOL_WEIGHT: f64 = 0.001;
/// See [`MIN_POOL_WEIGHT`].
pub const MAX_POOL_WEIGHT: f64 = 1_000_000.0;

/// The result of compiling a document that was not rejected.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The snapshot, with `version` 0; [`crate::SnapshotCell::publish`] assigns the real one.
    pub snapshot: Snapshot,
    /// Everything that was left out, with its JSON path.
    pub issues: Vec<Issue>,
    /// Core's `nextPollInterval`, when it sent a usable one.
    pub next_poll_interval: Option<Duration>,
    /// A hash of the served content (domains, proxies, agents), so a poll that returns the
    /// same configuration with a new timestamp is not republished.
    pub fingerprint: u64,
}

/// Validates and compiles one Core document.
///
/// # Errors
///
/// [`Rejected`] when the body is not a JSON object or Core said `success: false`. Every
/// smaller problem is an [`Issue`] in the returned [`Compiled`].
pub fn compile(doc: &[u8]) -> Result<Compiled, Rejected> {
    // Decoded straight into the wire types (no intermediate `Value` tree of the whole
    // document): a 10,000-domain document otherwise costs several times its size at peak.
    let response: wire::PollResponse =
        serde_json::from_slice(doc).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => {
                let first = doc.iter().find(|byte| !byte.is_ascii_whitespace());
                if first == Some(&b'{') {
                    Rejected::Schema(error.to_string())
                } else {
                    Rejected::NotObject
                }
            }
            _ => Rejected::NotJson(error.to_string()),
        })?;
    if response.success == Some(false) {
        return Err(Rejected::Refused(response.message.unwrap_or_default()));
    }
    Ok(compile_response(&response))
}

/// Compiles an already-decoded document; `success` is not looked at.
pub fn compile_response(response: &wire::PollResponse) -> Compiled {
    let mut issues = Vec::new();
    let mut domains: Vec<Arc<Domain>> = Vec::new();
    let mut seen_domains = HashSet::new();
    for (index, item) in response.domains.iter().enumerate() {
        let path = format!("domains[{index}]");
        let raw = match item {
            Item::Valid(raw) => raw,
            Item::Invalid { error } => {
                issues.push(Issue::new(path, format!("domain skipped: {error}")));
                continue;
            }
        };
        let Some(domain) = compile_domain(raw, &path, &mut issues) else {
            continue;
        };
        if !seen_domains.insert(domain.name.clone()) {
            issues.push(Issue::new(
                format!("{path}.domain"),
                format!(
                    "{:?} is listed twice; the later entry is skipped",
                    domain.name
                ),
            ));
            continue;
        }
        domains.push(Arc::new(domain));
    }

    let agents = compile_agents(&response.agents, &mut issues);
    let proxies = compile_proxies(&response.proxies, &agents, &mut issues);

    let next_poll_interval = response
        .next_poll_interval
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .map(|seconds| Duration::from_secs_f64(seconds.clamp(1.0, 3600.0)));

    // Serialising the wire types is deterministic (struct order, BTreeMaps); it is streamed
    // into the hasher rather than into a string the size of the document.
    let mut hasher = HashWriter(DefaultHasher::new());
    let _ = serde_json::to_writer(
        &mut hasher,
        &(&response.domains, &response.proxies, &response.agents),
    );

    Compiled {
        snapshot: Snapshot {
            version: 0,
            created_at: SystemTime::now(),
            domains,
            proxies,
            agents,
        },
        issues,
        next_poll_interval,
        fingerprint: hasher.0.finish(),
    }
}

fn compile_domain(raw: &wire::Domain, path: &str, issues: &mut Vec<Issue>) -> Option<Domain> {
    let wire::Domain {
        id,
        domain,
        description: _,
        dns_records,
        geo_dns_locations,
        geo_dns_map,
        geo_dns_fallback_map,
        geo_dns_agent_pools,
        http_proxy,
        ssl,
        lua_code,
    } = raw;

    let Some(raw_name) = domain.as_deref().filter(|name| !name.trim().is_empty()) else {
        issues.push(Issue::new(
            format!("{path}.domain"),
            "domain name is missing; domain skipped",
        ));
        return None;
    };
    let name = normalize_name(raw_name);
    if let Err(reason) = check_name(&name, false) {
        issues.push(Issue::new(
            format!("{path}.domain"),
            format!("{raw_name:?} is not a valid domain name ({reason}); domain skipped"),
        ));
        return None;
    }

    let mut geo = GeoSettings::default();
    let mut records = Vec::new();
    // Records with the same owner share one name allocation.
    let mut owners: HashSet<Arc<str>> = HashSet::new();
    for (index, item) in dns_records.iter().enumerate() {
        let record_path = format!("{path}.dnsRecords[{index}]");
        match item {
            Item::Valid(raw) => compile_record(
                raw,
                &name,
                &record_path,
                &mut records,
                &mut owners,
                &mut geo,
                issues,
            ),
            Item::Invalid { error } => {
                issues.push(Issue::new(record_path, format!("record skipped: {error}")));
            }
        }
    }

    for (key, value) in geo_dns_map {
        let entry_path = format!("{path}.geoDnsMap.{key}");
        if let Some(ips) = parse_ip_list(value, &entry_path, issues) {
            geo.map
                .entry(key.trim().to_ascii_lowercase())
                .or_default()
                .extend(ips);
        }
    }
    for (key, value) in geo_dns_fallback_map {
        let entry_path = format!("{path}.geoDnsFallbackMap.{key}");
        if let Some(ips) = parse_ip_list(value, &entry_path, issues) {
            geo.fallback
                .entry(key.trim().to_ascii_lowercase())
                .or_default()
                .extend(ips);
        }
    }
    for (key, members) in geo_dns_agent_pools {
        let mut pool = Vec::new();
        for (index, member) in members.iter().enumerate() {
            let member_path = format!("{path}.geoDnsAgentPools.{key}[{index}]");
            let wire::PoolAgent {
                ip,
                weight,
                load_score,
                agent_id,
                agent_name: _,
            } = member;
            let Some(ip) = parse_ip(ip.as_deref(), &format!("{member_path}.ip"), issues) else {
                continue;
            };
            let weight = weight.unwrap_or(1.0);
            if !weight.is_finite() || weight < 0.0 {
                issues.push(Issue::new(
                    format!("{member_path}.weight"),
                    format!("{weight} is not a usable weight; agent skipped"),
                ));
                continue;
            }
            if weight == 0.0 {
                // A zero weight drains the agent: it is configured but gets no traffic.
                continue;
            }
            let clamped = weight.clamp(MIN_POOL_WEIGHT, MAX_POOL_WEIGHT);
            if clamped != weight {
                issues.push(Issue::new(
                    format!("{member_path}.weight"),
                    format!(
                        "{weight:e} is outside {MIN_POOL_WEIGHT}-{MAX_POOL_WEIGHT}; {clamped} used"
                    ),
                ));
            }
            let weight = clamped;
            pool.push(PoolAgent {
                ip,
                weight,
                load_score: load_score.filter(|score| score.is_finite()),
                agent_id: agent_id.clone(),
            });
        }
        if !pool.is_empty() {
            geo.pools.insert(key.trim().to_ascii_lowercase(), pool);
        }
    }
    geo.locations = geo_dns_locations
        .iter()
        .filter_map(|location| {
            let code = location.code.as_deref()?.trim().to_ascii_lowercase();
            (!code.is_empty()).then(|| GeoLocation {
                code,
                name: location.name.clone(),
                kind: location.kind.clone(),
                subdomain: location.subdomain.clone(),
            })
        })
        .collect();

    let http_proxy_settings = http_proxy.as_ref();
    let anti_ddos = anti_ddos::compile_anti_ddos(
        http_proxy_settings.and_then(|settings| settings.anti_d_do_s.as_ref()),
        &format!("{path}.httpProxy.antiDDoS"),
        issues,
    );
    let http_proxy = compile_http_proxy(http_proxy_settings, path, issues);
    let mut encryption_mode = EncryptionMode::Off;
    let mut tls = None;
    let mut redirect_to_https = false;
    let mut acme_challenge = None;
    if let Some(ssl) = ssl {
        let wire::Ssl {
            enabled,
            certificate,
            private_key,
            auto_renew: _,
            encryption_mode: mode,
            http_redirect_to_https,
            acme_http_challenge,
        } = ssl;
        let ssl_path = format!("{path}.ssl");
        encryption_mode = match mode.as_deref().map(|mode| mode.trim().to_ascii_lowercase()) {
            None => EncryptionMode::Off,
            Some(mode) => match mode.as_str() {
                "" | "off" => EncryptionMode::Off,
                "flexible" => EncryptionMode::Flexible,
                "full" => EncryptionMode::Full,
                "full_strict" | "full-strict" | "strict" => EncryptionMode::FullStrict,
                other => {
                    issues.push(Issue::new(
                        format!("{ssl_path}.encryptionMode"),
                        format!("{other:?} is not off, flexible, full or full_strict; using off"),
                    ));
                    EncryptionMode::Off
                }
            },
        };
        redirect_to_https = http_redirect_to_https.unwrap_or(false);
        let certificate = certificate.as_deref().filter(|pem| !pem.trim().is_empty());
        let private_key = private_key.as_deref().filter(|pem| !pem.trim().is_empty());
        match (certificate, private_key) {
            (Some(certificate), Some(private_key)) if enabled.unwrap_or(true) => {
                match parse_certified_key(certificate, private_key) {
                    Ok(key) => {
                        tls = Some(Tls {
                            certified_key: Arc::new(key),
                        })
                    }
                    Err((field, message)) => {
                        issues.push(Issue::new(format!("{ssl_path}.{field}"), message));
                    }
                }
            }
            (None, _) | (_, None) if enabled == &Some(true) => {
                issues.push(Issue::new(
                    ssl_path.clone(),
                    "ssl is enabled but the certificate or private key is missing; \
                     HTTPS for this domain is refused",
                ));
            }
            _ => {}
        }
        if let Some(challenge) = acme_http_challenge {
            let token = challenge.token.as_deref().unwrap_or("").trim();
            let key_authorization = challenge.key_authorization.as_deref().unwrap_or("").trim();
            if !token.is_empty() || !key_authorization.is_empty() {
                let valid_token = !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if valid_token && !key_authorization.is_empty() {
                    acme_challenge = Some(Box::new(AcmeChallenge {
                        token: token.to_owned(),
                        key_authorization: key_authorization.to_owned(),
                    }));
                } else {
                    issues.push(Issue::new(
                        format!("{ssl_path}.acmeHttpChallenge"),
                        "token must be non-empty base64url and keyAuthorization non-empty; \
                         challenge skipped",
                    ));
                }
            }
        }
    }

    records.shrink_to_fit();
    drop(owners);
    let geo = (!geo.is_empty() || !geo.locations.is_empty()).then(|| Box::new(geo));
    let lua_code = lua_code
        .as_deref()
        .filter(|code| !code.trim().is_empty())
        .map(Arc::<str>::from);

    Some(Domain {
        id: id.clone(),
        name,
        records,
        geo,
        http_proxy,
        tls,
        encryption_mode,
        redirect_to_https,
        acme_challenge,
        lua_code,
        anti_ddos,
    })
}

fn compile_http_proxy(
    raw: Option<&wire::HttpProxy>,
    path: &str,
    issues: &mut Vec<Issue>,
) -> HttpProxy {
    let Some(wire::HttpProxy {
        kind,
        enabled,
        // Compiled on its own by `anti_ddos::compile_anti_ddos`.
        anti_d_do_s: _,
    }) = raw
    else {
        return HttpProxy::default();
    };
    let listeners = match kind.as_deref().map(|kind| kind.trim().to_ascii_lowercase()) {
        None => ProxyListeners::Both,
        Some(kind) => match kind.as_str() {
            "" | "both" => ProxyListeners::Both,
            "http" => ProxyListeners::Http,
            "https" => ProxyListeners::Https,
            other => {
                issues.push(Issue::new(
                    format!("{path}.httpProxy.type"),
                    format!("{other:?} is not http, https or both; using both"),
                ));
                ProxyListeners::Both
            }
        },
    };
    HttpProxy {
        // The real Core never sends `enabled`: it always sends `httpProxy: {type, antiDDoS}`,
        // and the Go agent proxies such a domain as a whole (DNS answers its GeoDNS apex with
        // agent addresses). So an `httpProxy` object proxies the domain unless it opts out.
        enabled: enabled.unwrap_or(true),
        listeners,
    }
}

fn compile_record(
    raw: &wire::DnsRecord,
    zone: &str,
    path: &str,
    records: &mut Vec<Record>,
    owners: &mut HashSet<Arc<str>>,
    geo: &mut GeoSettings,
    issues: &mut Vec<Issue>,
) {
    let wire::DnsRecord {
        id: _,
        name,
        kind,
        value,
        ttl,
        priority,
        http_proxy_enabled,
        location_code,
        is_fallback: _,
        distance_km: _,
        is_last_resort: _,
        description: _,
    } = raw;

    let Some(kind_text) = kind.as_deref() else {
        issues.push(Issue::new(
            format!("{path}.type"),
            "record type is missing; record skipped",
        ));
        return;
    };
    let Some(record_type) = RecordType::parse(kind_text) else {
        issues.push(Issue::new(
            format!("{path}.type"),
            format!("{kind_text:?} is not a supported record type; record skipped"),
        ));
        return;
    };
    let value = value.as_deref().unwrap_or("").trim();

    // A record with a location code is a GeoDNS entry: location -> agent address.
    if let Some(code) = location_code
        .as_deref()
        .map(str::trim)
        .filter(|code| !code.is_empty())
    {
        let ip = match record_type {
            RecordType::A => value.parse::<Ipv4Addr>().map(IpAddr::V4).ok(),
            RecordType::Aaaa => value.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
            _ => {
                issues.push(Issue::new(
                    format!("{path}.type"),
                    format!("a GeoDNS entry must be A or AAAA, not {record_type}; entry skipped"),
                ));
                return;
            }
        };
        match ip {
            Some(ip) => geo
                .map
                .entry(code.to_ascii_lowercase())
                .or_default()
                .push(ip),
            None => issues.push(Issue::new(
                format!("{path}.value"),
                format!(
                    "{value:?} is not an {} address; entry skipped",
                    ip_family(record_type)
                ),
            )),
        }
        return;
    }

    let owner = match owner_name(name.as_deref().unwrap_or(""), zone) {
        Ok(owner) => owner,
        Err(message) => {
            issues.push(Issue::new(
                format!("{path}.name"),
                format!("{message}; record skipped"),
            ));
            return;
        }
    };

    let ttl = match ttl {
        None => DEFAULT_TTL,
        Some(ttl) if ttl.fract() == 0.0 && *ttl >= 0.0 && *ttl <= f64::from(MAX_TTL) => *ttl as u32,
        Some(ttl) => {
            issues.push(Issue::new(
                format!("{path}.ttl"),
                format!("{ttl} is not a TTL between 0 and {MAX_TTL}; record skipped"),
            ));
            return;
        }
    };

    let data = match parse_record_data(record_type, value, *priority) {
        Ok(data) => data,
        Err((field, message)) => {
            issues.push(Issue::new(
                format!("{path}.{field}"),
                format!("{message}; record skipped"),
            ));
            return;
        }
    };

    let mut http_proxy = http_proxy_enabled.unwrap_or(false);
    if http_proxy
        && !matches!(
            record_type,
            RecordType::A | RecordType::Aaaa | RecordType::Cname
        )
    {
        issues.push(Issue::new(
            format!("{path}.httpProxyEnabled"),
            format!(
                "only A, AAAA and CNAME records can be proxied, not {record_type}; flag ignored"
            ),
        ));
        http_proxy = false;
    }

    let name = match owners.get(owner.as_str()) {
        Some(shared) => Arc::clone(shared),
        None => {
            let name = Arc::<str>::from(owner);
            owners.insert(Arc::clone(&name));
            name
        }
    };
    records.push(Record {
        name,
        ttl,
        data,
        http_proxy,
    });
}

/// Parses a record's value (and `priority`) into typed data. The error names the field.
fn parse_record_data(
    record_type: RecordType,
    value: &str,
    priority: Option<f64>,
) -> Result<RecordData, (&'static str, String)> {
    let value_error = |message: String| ("value", message);
    if value.is_empty() {
        return Err(value_error("value is empty".to_owned()));
    }
    Ok(match record_type {
        RecordType::A => RecordData::A(
            value
                .parse()
                .map_err(|_| value_error(format!("{value:?} is not an IPv4 address")))?,
        ),
        RecordType::Aaaa => RecordData::Aaaa(
            value
                .parse()
                .map_err(|_| value_error(format!("{value:?} is not an IPv6 address")))?,
        ),
        RecordType::Cname => RecordData::Cname(target_name(value).map_err(value_error)?.into()),
        RecordType::Ns => RecordData::Ns(target_name(value).map_err(value_error)?.into()),
        RecordType::Mx => {
            // "mail.example.com" with `priority`, or "10 mail.example.com".
            let fields: Vec<&str> = value.split_whitespace().collect();
            let (preference, exchange) = match fields.as_slice() {
                [exchange] => (parse_u16_field(priority, "priority", 10)?, *exchange),
                [preference, exchange] => (
                    preference.parse().map_err(|_| {
                        value_error(format!("{preference:?} is not an MX preference"))
                    })?,
                    *exchange,
                ),
                _ => return Err(value_error(format!("{value:?} is not an MX target"))),
            };
            RecordData::Mx {
                preference,
                exchange: target_name(exchange).map_err(value_error)?.into(),
            }
        }
        RecordType::Txt => {
            let text = value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .filter(|_| value.len() >= 2)
                .unwrap_or(value);
            if text.len() > 4000 {
                return Err(value_error(format!(
                    "TXT value is {} bytes; the limit is 4000",
                    text.len()
                )));
            }
            RecordData::Txt(text.into())
        }
        RecordType::Srv => {
            let fields: Vec<&str> = value.split_whitespace().collect();
            let number = |text: &str, what: &str| {
                text.parse::<u16>()
                    .map_err(|_| value_error(format!("{text:?} is not an SRV {what}")))
            };
            let (priority, weight, port, target) = match fields.as_slice() {
                [weight, port, target] => (
                    parse_u16_field(priority, "priority", 0)?,
                    number(weight, "weight")?,
                    number(port, "port")?,
                    *target,
                ),
                [priority, weight, port, target] => (
                    number(priority, "priority")?,
                    number(weight, "weight")?,
                    number(port, "port")?,
                    *target,
                ),
                _ => {
                    return Err(value_error(format!(
                        "{value:?} is not \"weight port target\" or \"priority weight port target\""
                    )));
                }
            };
            RecordData::Srv {
                priority,
                weight,
                port,
                target: target_name(target).map_err(value_error)?.into(),
            }
        }
        RecordType::Caa => {
            // RFC 8659: flags tag "value".
            let mut parts = value.splitn(3, char::is_whitespace);
            let (Some(flags), Some(tag), Some(rest)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(value_error(format!(
                    "{value:?} is not `flags tag \"value\"`"
                )));
            };
            let flags: u8 = flags
                .parse()
                .map_err(|_| value_error(format!("{flags:?} is not a CAA flags byte")))?;
            if tag.is_empty() || tag.len() > 15 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(value_error(format!("{tag:?} is not a CAA tag")));
            }
            let rest = rest.trim();
            let caa_value = rest
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .filter(|_| rest.len() >= 2)
                .unwrap_or(rest);
            RecordData::Caa(Box::new(Caa {
                flags,
                tag: tag.to_ascii_lowercase().into(),
                value: caa_value.into(),
            }))
        }
        RecordType::Soa => {
            let fields: Vec<&str> = value.split_whitespace().collect();
            let [mname, rname, numbers @ ..] = fields.as_slice() else {
                return Err(value_error(format!("{value:?} is not an SOA value")));
            };
            let numbers: Vec<u32> = numbers.iter().filter_map(|n| n.parse().ok()).collect();
            let [serial, refresh, retry, expire, minimum] = numbers.as_slice() else {
                return Err(value_error(format!(
                    "{value:?} is not \"mname rname serial refresh retry expire minimum\""
                )));
            };
            RecordData::Soa(Box::new(Soa {
                mname: target_name(mname).map_err(value_error)?,
                rname: target_name(rname).map_err(value_error)?,
                serial: *serial,
                refresh: *refresh,
                retry: *retry,
                expire: *expire,
                minimum: *minimum,
            }))
        }
    })
}

fn parse_u16_field(
    value: Option<f64>,
    field: &'static str,
    default: u16,
) -> Result<u16, (&'static str, String)> {
    match value {
        None => Ok(default),
        Some(number) if number.fract() == 0.0 && (0.0..=65535.0).contains(&number) => {
            Ok(number as u16)
        }
        Some(number) => Err((field, format!("{number} is not between 0 and 65535"))),
    }
}

/// The fully qualified owner name of a record: `@`/empty is the apex, a name ending in the
/// zone is absolute, anything else is relative to the zone.
fn owner_name(raw: &str, zone: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed == "@" {
        return Ok(zone.to_owned());
    }
    let absolute = trimmed.ends_with('.');
    let name = normalize_name(trimmed);
    let owner = if is_in_zone(&name, zone) {
        name
    } else if absolute {
        return Err(format!("{raw:?} is outside the zone {zone:?}"));
    } else {
        format!("{name}.{zone}")
    };
    check_name(&owner, true).map_err(|reason| format!("{raw:?} is not a valid name ({reason})"))?;
    Ok(owner)
}

/// Normalises a target name (CNAME, MX, NS, SRV). Targets are absolute with or without the
/// trailing dot; `.` (the root, as in a null MX or SRV) is allowed.
fn target_name(raw: &str) -> Result<String, String> {
    if raw.trim() == "." {
        return Ok(String::new());
    }
    let name = normalize_name(raw);
    check_name(&name, false)
        .map_err(|reason| format!("{raw:?} is not a valid target name ({reason})"))?;
    Ok(name)
}

/// Checks label syntax (RFC 1035 lengths; letters, digits, `-` and `_`), allowing a `*`
/// leftmost label when `allow_wildcard`.
fn check_name(name: &str, allow_wildcard: bool) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for (index, label) in name.split('.').enumerate() {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if label == "*" {
            if allow_wildcard && index == 0 {
                continue;
            }
            return Err("`*` is only allowed as the leftmost label of a record name");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("labels may hold only letters, digits, `-` and `_`");
        }
    }
    Ok(())
}

fn ip_family(record_type: RecordType) -> &'static str {
    if record_type == RecordType::Aaaa {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn parse_ip(raw: Option<&str>, path: &str, issues: &mut Vec<Issue>) -> Option<IpAddr> {
    let text = raw.unwrap_or("").trim();
    match text.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            issues.push(Issue::new(
                path.to_owned(),
                format!("{text:?} is not an IP address; skipped"),
            ));
            None
        }
    }
}

/// A map value: one address, or several separated by commas or spaces.
fn parse_ip_list(raw: &str, path: &str, issues: &mut Vec<Issue>) -> Option<Vec<IpAddr>> {
    let parts: Vec<&str> = raw
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|part| !part.is_empty())
        .collect();
    let mut ips = Vec::with_capacity(parts.len());
    for part in &parts {
        match part.parse() {
            Ok(ip) => ips.push(ip),
            Err(_) => {
                issues.push(Issue::new(
                    path.to_owned(),
                    format!("{part:?} is not an IP address; entry skipped"),
                ));
                return None;
            }
        }
    }
    if ips.is_empty() {
        issues.push(Issue::new(path.to_owned(), "no address; entry skipped"));
        return None;
    }
    Some(ips)
}

/// Parses a PEM chain and key into a `CertifiedKey`, checking that they belong together.
/// The error names the field at fault.
fn parse_certified_key(
    certificate: &str,
    private_key: &str,
) -> Result<CertifiedKey, (&'static str, String)> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(certificate.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|error| {
                (
                    "certificate",
                    format!("certificate PEM does not parse: {error}"),
                )
            })?;
    if chain.is_empty() {
        return Err(("certificate", "no CERTIFICATE block in the PEM".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(private_key.as_bytes()).map_err(|error| {
        (
            "privateKey",
            format!("private key PEM does not parse: {error}"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| ("privateKey", format!("private key unusable: {error}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Some key types cannot report their public key; rustls treats that as unknown.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err((
            "privateKey",
            "the private key does not match the certificate".to_owned(),
        )),
        Err(other) => Err(("certificate", format!("certificate unusable: {other}"))),
    }
}

fn compile_proxies(
    raw: &[Item<wire::Proxy>],
    agents: &[Agent],
    issues: &mut Vec<Issue>,
) -> Vec<L4Proxy> {
    let mut proxies: Vec<(usize, L4Proxy)> = Vec::new();
    let mut seen = BTreeMap::new();
    for (index, item) in raw.iter().enumerate() {
        let path = format!("proxies[{index}]");
        let raw = match item {
            Item::Valid(raw) => raw,
            Item::Invalid { error } => {
                issues.push(Issue::new(path, format!("proxy skipped: {error}")));
                continue;
            }
        };
        let wire::Proxy {
            id,
            name,
            kind,
            source_port,
            destination_host,
            destination_port,
            enabled,
            proxy_protocol,
        } = raw;
        if *enabled == Some(false) {
            continue;
        }
        let protocol = match kind
            .as_deref()
            .map(|kind| kind.trim().to_ascii_lowercase())
            .as_deref()
        {
            Some("tcp") => L4Protocol::Tcp,
            Some("udp") => L4Protocol::Udp,
            other => {
                issues.push(Issue::new(
                    format!("{path}.type"),
                    format!("{:?} is not tcp or udp; proxy skipped", other.unwrap_or("")),
                ));
                continue;
            }
        };
        let port = |value: &Option<f64>, field: &str| -> Result<u16, Issue> {
            match value {
                Some(port) if port.fract() == 0.0 && (1.0..=65535.0).contains(port) => {
                    Ok(*port as u16)
                }
                Some(port) => Err(Issue::new(
                    format!("{path}.{field}"),
                    format!("{port} is not a port between 1 and 65535; proxy skipped"),
                )),
                None => Err(Issue::new(
                    format!("{path}.{field}"),
                    "port is missing; proxy skipped",
                )),
            }
        };
        let (listen_port, destination_port) = match (
            port(source_port, "sourcePort"),
            port(destination_port, "destinationPort"),
        ) {
            (Ok(listen), Ok(destination)) => (listen, destination),
            (Err(issue), _) | (_, Err(issue)) => {
                issues.push(issue);
                continue;
            }
        };
        let host = destination_host.as_deref().unwrap_or("").trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty()
            || (host.parse::<IpAddr>().is_err()
                && check_name(&normalize_name(host), false).is_err())
        {
            issues.push(Issue::new(
                format!("{path}.destinationHost"),
                format!("{host:?} is not an IP address or host name; proxy skipped"),
            ));
            continue;
        }
        if let Some(first) = seen.insert((protocol, listen_port), index) {
            issues.push(Issue::new(
                format!("{path}.sourcePort"),
                format!("{protocol} port {listen_port} is already used by proxies[{first}]; proxy skipped"),
            ));
            seen.insert((protocol, listen_port), first);
            continue;
        }
        proxies.push((
            index,
            L4Proxy {
                id: id.clone(),
                name: name.clone(),
                protocol,
                listen_port,
                destination_host: host.to_owned(),
                destination_port,
                proxy_protocol: proxy_protocol.unwrap_or(false),
            },
        ));
    }
    // A forward to a port this agent itself listens on (on loopback, any address, or an
    // agent's own address: every agent runs every forward) would connect to itself, and
    // each connection would open another until descriptors run out.
    let is_self = |host: &str| {
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| {
                let ip = ip.to_canonical();
                ip.is_loopback() || ip.is_unspecified() || agents.iter().any(|a| a.ip == ip)
            })
    };
    let listening: HashSet<(L4Protocol, u16)> = proxies
        .iter()
        .map(|(_, proxy)| (proxy.protocol, proxy.listen_port))
        .collect();
    proxies
        .into_iter()
        .filter_map(|(index, proxy)| {
            let target = (proxy.protocol, proxy.destination_port);
            if is_self(&proxy.destination_host) && listening.contains(&target) {
                issues.push(Issue::new(
                    format!("proxies[{index}].destinationHost"),
                    format!(
                        "{}:{} is a forward of this agent: the proxy would connect to itself \
                         without end; proxy skipped",
                        proxy.destination_host, proxy.destination_port
                    ),
                ));
                return None;
            }
            Some(proxy)
        })
        .collect()
}

fn compile_agents(raw: &[Item<wire::Agent>], issues: &mut Vec<Issue>) -> Vec<Agent> {
    let mut agents = Vec::new();
    for (index, item) in raw.iter().enumerate() {
        let path = format!("agents[{index}]");
        let raw = match item {
            Item::Valid(raw) => raw,
            Item::Invalid { error } => {
                issues.push(Issue::new(path, format!("agent skipped: {error}")));
                continue;
            }
        };
        let wire::Agent {
            agent_id,
            agent_name,
            agent_ip,
            country_code,
            city: _,
            load_score,
        } = raw;
        let Some(ip) = parse_ip(agent_ip.as_deref(), &format!("{path}.agentIp"), issues) else {
            continue;
        };
        agents.push(Agent {
            id: agent_id.clone(),
            name: agent_name.clone(),
            ip,
            country: country_code
                .as_deref()
                .map(|code| code.trim().to_ascii_lowercase())
                .filter(|code| !code.is_empty()),
            load_score: load_score.filter(|score| score.is_finite()),
        });
    }
    agents
}

/// Feeds serialised bytes into a hasher.
struct HashWriter(DefaultHasher);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

mod anti_ddos;
#[cfg(test)]
mod tests;
