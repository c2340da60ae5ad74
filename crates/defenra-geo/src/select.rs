//! [`GeoPlan`]: one domain's GeoDNS selection chain, compiled at reload time.
//!
//! The chain, first match wins: weighted pool for the client's country → `geoDnsMap`
//! (including `locationCode` records) → `geoDnsFallbackMap` → the continent's key → the
//! nearest configured location by great-circle distance between country centroids →
//! `default` → the agent's own `--agent-ip`. Each address family has its own chain, so an
//! AAAA query only ever sees entries that hold IPv6 addresses.
//!
//! A weighted pool picks one member per client subnet (/24 for IPv4, /56 for IPv6) by
//! rendezvous hashing (highest random weight, Thaler and Ravishankar 1998, with the weighted
//! score of Schindelhauer and Schomaker): a client keeps its agent across queries, restarts
//! and agents, and adding or removing one member only moves the clients that member wins or
//! held.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use defenra_config::{Agent, GeoSettings, PoolAgent};

use crate::{Continent, CountryCode, Place, centroid, distance_km};

/// Pool members and agents whose load score is above this are skipped.
pub const LOAD_THRESHOLD: f64 = 80.0;

/// Which rule of the chain produced an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Pool,
    Map,
    Fallback,
    Continent,
    Nearest,
    Default,
    AgentIp,
}

impl Rule {
    /// lower_snake name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Pool => "pool",
            Rule::Map => "map",
            Rule::Fallback => "fallback",
            Rule::Continent => "continent",
            Rule::Nearest => "nearest",
            Rule::Default => "default",
            Rule::AgentIp => "agent_ip",
        }
    }
}

/// The addresses to answer with, and the rule that chose them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection<'a> {
    pub rule: Rule,
    /// Never empty; all of the family that was asked for.
    pub addresses: &'a [IpAddr],
}

/// One domain's compiled selection chain for both address families.
#[derive(Debug, Clone)]
pub struct GeoPlan {
    v4: FamilyPlan,
    v6: FamilyPlan,
}

#[derive(Debug, Clone, Default)]
struct FamilyPlan {
    by_country: HashMap<CountryCode, (Rule, Choice)>,
    by_continent: [Option<Choice>; 7],
    /// Candidates for the nearest-location rule: a centroid and what to answer.
    nearest: Vec<((f64, f64), Choice)>,
    default: Option<Choice>,
    agent_ip: Option<[IpAddr; 1]>,
}

#[derive(Debug, Clone)]
enum Choice {
    Fixed(Box<[IpAddr]>),
    Pool(Pool),
}

#[derive(Debug, Clone)]
struct Pool {
    members: Box<[IpAddr]>,
    weights: Box<[f64]>,
    /// Each member's identity in the hash (from its address), fixed at compile time.
    keys: Box<[u64]>,
}

impl GeoPlan {
    /// Compiles `geo` (one domain's GeoDNS data) with the network's `agents` as extra
    /// nearest-location candidates and `agent_ip` as the last resort.
    pub fn compile(geo: &GeoSettings, agents: &[Agent], agent_ip: Option<IpAddr>) -> GeoPlan {
        GeoPlan {
            v4: FamilyPlan::compile(geo, agents, agent_ip, true),
            v6: FamilyPlan::compile(geo, agents, agent_ip, false),
        }
    }

    /// Picks the answer for `client` (the ECS address or the query's source) at `place`
    /// (`None` when there is no GeoIP database or it does not know the address). `want_v4`
    /// selects A (true) or AAAA (false) answers. A weighted pool answers every client of one
    /// /24 (IPv4) or /56 (IPv6) with the same member. `None` when no rule has an address of
    /// that family.
    pub fn choose(
        &self,
        want_v4: bool,
        place: Option<Place>,
        client: IpAddr,
    ) -> Option<Selection<'_>> {
        let plan = if want_v4 { &self.v4 } else { &self.v6 };
        plan.choose(place.unwrap_or_default(), subnet_key(client))
    }

    /// Whether any rule can answer for the family.
    pub fn has_family(&self, want_v4: bool) -> bool {
        let plan = if want_v4 { &self.v4 } else { &self.v6 };
        !plan.by_country.is_empty()
            || plan.by_continent.iter().any(Option::is_some)
            || !plan.nearest.is_empty()
            || plan.default.is_some()
            || plan.agent_ip.is_some()
    }

    /// Keys of `geo` that are neither a country code, a continent nor `default`; the plan
    /// ignores them (they may name locations used only for information).
    pub fn ignored_keys(geo: &GeoSettings) -> Vec<String> {
        let mut keys: Vec<String> = geo
            .map
            .keys()
            .chain(geo.fallback.keys())
            .chain(geo.pools.keys())
            .filter(|key| classify(key).is_none())
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// What a GeoDNS map key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Country(CountryCode),
    Continent(Continent),
    Default,
}

fn classify(key: &str) -> Option<Key> {
    if key == "default" {
        return Some(Key::Default);
    }
    if let Some(continent) = Continent::from_key(key) {
        return Some(Key::Continent(continent));
    }
    CountryCode::parse(key).map(Key::Country)
}

impl FamilyPlan {
    fn compile(
        geo: &GeoSettings,
        agents: &[Agent],
        agent_ip: Option<IpAddr>,
        want_v4: bool,
    ) -> FamilyPlan {
        let family = |ips: &[IpAddr]| -> Option<Box<[IpAddr]>> {
            let kept: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv4() == want_v4)
                .collect();
            (!kept.is_empty()).then(|| kept.into_boxed_slice())
        };
        let pool = |members: &[PoolAgent]| -> Option<Pool> {
            let mut ips = Vec::new();
            let mut weights = Vec::new();
            for member in members {
                let overloaded = member.load_score.is_some_and(|load| load > LOAD_THRESHOLD);
                if member.ip.is_ipv4() != want_v4
                    || overloaded
                    || !(member.weight > 0.0 && member.weight.is_finite())
                {
                    continue;
                }
                ips.push(member.ip);
                weights.push(member.weight);
            }
            // Scores are weight / -ln(u), and -ln(u) can be as small as 5.6e-17: a weight
            // near f64::MAX would score infinity for most clients, and the first infinite
            // member would win them all. Dividing by the largest weight keeps every score
            // finite (at most 1.8e16) and changes no choice (the order of scores is kept).
            let largest = weights.iter().copied().fold(0.0_f64, f64::max);
            for weight in &mut weights {
                *weight /= largest;
            }
            (!ips.is_empty()).then(|| Pool {
                keys: ips.iter().map(|ip| mix(address_bits(*ip))).collect(),
                members: ips.into_boxed_slice(),
                weights: weights.into_boxed_slice(),
            })
        };
        // pools[key] → map[key] → fallback[key], with the rule that matched.
        let lookup = |key: &str| -> Option<(Rule, Choice)> {
            if let Some(pool) = geo.pools.get(key).and_then(|members| pool(members)) {
                return Some((Rule::Pool, Choice::Pool(pool)));
            }
            if let Some(ips) = geo.map.get(key).and_then(|ips| family(ips)) {
                return Some((Rule::Map, Choice::Fixed(ips)));
            }
            geo.fallback
                .get(key)
                .and_then(|ips| family(ips))
                .map(|ips| (Rule::Fallback, Choice::Fixed(ips)))
        };

        let mut plan = FamilyPlan::default();
        let keys: BTreeMap<&str, Key> = geo
            .pools
            .keys()
            .chain(geo.map.keys())
            .chain(geo.fallback.keys())
            .filter_map(|key| classify(key).map(|kind| (key.as_str(), kind)))
            .collect();
        for (key, kind) in &keys {
            match kind {
                Key::Country(code) => {
                    if let Some(found) = lookup(key) {
                        plan.by_country.insert(*code, found);
                    }
                }
                Key::Continent(continent) => {
                    // Core's name wins over an alias (`europe` over `eu`).
                    let slot = &mut plan.by_continent[continent.index()];
                    if (slot.is_none() || *key == continent.key())
                        && let Some((_, choice)) = lookup(key)
                    {
                        *slot = Some(choice);
                    }
                }
                Key::Default => plan.default = lookup(key).map(|(_, choice)| choice),
            }
        }

        // Nearest-location candidates: country keys of the map, then the agents list.
        for (key, ips) in &geo.map {
            let Some(Key::Country(code)) = classify(key) else {
                continue;
            };
            if let (Some(point), Some(ips)) = (centroid(code), family(ips)) {
                plan.nearest.push((point, Choice::Fixed(ips)));
            }
        }
        for agent in agents {
            let overloaded = agent.load_score.is_some_and(|load| load > LOAD_THRESHOLD);
            if agent.ip.is_ipv4() != want_v4 || overloaded {
                continue;
            }
            let point = agent
                .country
                .as_deref()
                .and_then(CountryCode::parse)
                .and_then(centroid);
            if let Some(point) = point {
                plan.nearest
                    .push((point, Choice::Fixed(Box::new([agent.ip]))));
            }
        }

        plan.agent_ip = agent_ip.filter(|ip| ip.is_ipv4() == want_v4).map(|ip| [ip]);
        plan
    }

    fn choose(&self, place: Place, client: u64) -> Option<Selection<'_>> {
        if let Some(country) = place.country
            && let Some((rule, choice)) = self.by_country.get(&country)
        {
            return Some(choice.pick(*rule, client));
        }
        if let Some(continent) = place.continent
            && let Some(choice) = &self.by_continent[continent.index()]
        {
            return Some(choice.pick(Rule::Continent, client));
        }
        if let Some(point) = place.country.and_then(centroid) {
            let mut best: Option<(f64, &Choice)> = None;
            for (candidate, choice) in &self.nearest {
                let distance = distance_km(point, *candidate);
                if best.is_none_or(|(shortest, _)| distance < shortest) {
                    best = Some((distance, choice));
                }
            }
            if let Some((_, choice)) = best {
                return Some(choice.pick(Rule::Nearest, client));
            }
        }
        if let Some(choice) = &self.default {
            return Some(choice.pick(Rule::Default, client));
        }
        self.agent_ip.as_ref().map(|ip| Selection {
            rule: Rule::AgentIp,
            addresses: ip,
        })
    }
}

impl Choice {
    fn pick(&self, rule: Rule, client: u64) -> Selection<'_> {
        let addresses = match self {
            Choice::Fixed(ips) => ips,
            Choice::Pool(pool) => pool.pick(client),
        };
        Selection { rule, addresses }
    }
}

impl Pool {
    /// The member with the highest weighted rendezvous score for `client` (a subnet key):
    /// `weight / -ln(u)` with `u` uniform in (0, 1) from the hash of client and member. Each
    /// member wins a share of clients proportional to its weight.
    fn pick(&self, client: u64) -> &[IpAddr] {
        let mut best = (0, f64::NEG_INFINITY);
        for (index, (key, weight)) in self.keys.iter().zip(self.weights.iter()).enumerate() {
            let hash = mix(client ^ key);
            // 53 bits make a float in (0, 1): never 0, so the logarithm is finite.
            let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = weight / -unit.ln();
            if score > best.1 {
                best = (index, score);
            }
        }
        std::slice::from_ref(&self.members[best.0])
    }
}

/// The client's subnet as a hash key: the /24 of an IPv4 address (IPv4-mapped IPv6 counts
/// as IPv4), the /56 of an IPv6 one.
fn subnet_key(client: IpAddr) -> u64 {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    let bits = match client {
        IpAddr::V4(v4) => u128::from(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => (u128::from(v6) >> 72 << 72) | 1,
    };
    mix(fold(bits))
}

/// An address as 64 bits for hashing.
fn address_bits(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => fold(u128::from(v6)) ^ 0x6_0000_0000,
    }
}

fn fold(bits: u128) -> u64 {
    (bits as u64) ^ mix((bits >> 64) as u64)
}

/// SplitMix64's finalizer: a fixed, seedless mix, so every agent and every restart picks the
/// same member for a client.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
