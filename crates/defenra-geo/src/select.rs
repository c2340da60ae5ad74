//! [`GeoPlan`]: one domain's GeoDNS selection chain, compiled at reload time.
//!
//! The chain, first match wins: weighted pool for the client's country → `geoDnsMap`
//! (including `locationCode` records) → `geoDnsFallbackMap` → the continent's key → the
//! nearest configured location by great-circle distance between country centroids →
//! `default` → the agent's own `--agent-ip`. Each address family has its own chain, so an
//! AAAA query only ever sees entries that hold IPv6 addresses.

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
    /// Running sum of the weights; the last one is the total.
    cumulative: Box<[f64]>,
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

    /// Picks the answer for a client at `place` (`None` when there is no GeoIP database or
    /// it does not know the address). `want_v4` selects A (true) or AAAA (false) answers.
    /// `random` spreads weighted pool choices; any value is fine. `None` when no rule has
    /// an address of that family.
    pub fn choose(
        &self,
        want_v4: bool,
        place: Option<Place>,
        random: u64,
    ) -> Option<Selection<'_>> {
        let plan = if want_v4 { &self.v4 } else { &self.v6 };
        plan.choose(place.unwrap_or_default(), random)
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
            let mut cumulative = Vec::new();
            let mut total = 0.0;
            for member in members {
                let overloaded = member.load_score.is_some_and(|load| load > LOAD_THRESHOLD);
                if member.ip.is_ipv4() != want_v4 || overloaded || member.weight <= 0.0 {
                    continue;
                }
                total += member.weight;
                ips.push(member.ip);
                cumulative.push(total);
            }
            (!ips.is_empty()).then(|| Pool {
                members: ips.into_boxed_slice(),
                cumulative: cumulative.into_boxed_slice(),
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

    fn choose(&self, place: Place, random: u64) -> Option<Selection<'_>> {
        if let Some(country) = place.country
            && let Some((rule, choice)) = self.by_country.get(&country)
        {
            return Some(choice.pick(*rule, random));
        }
        if let Some(continent) = place.continent
            && let Some(choice) = &self.by_continent[continent.index()]
        {
            return Some(choice.pick(Rule::Continent, random));
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
                return Some(choice.pick(Rule::Nearest, random));
            }
        }
        if let Some(choice) = &self.default {
            return Some(choice.pick(Rule::Default, random));
        }
        self.agent_ip.as_ref().map(|ip| Selection {
            rule: Rule::AgentIp,
            addresses: ip,
        })
    }
}

impl Choice {
    fn pick(&self, rule: Rule, random: u64) -> Selection<'_> {
        let addresses = match self {
            Choice::Fixed(ips) => ips,
            Choice::Pool(pool) => pool.pick(random),
        };
        Selection { rule, addresses }
    }
}

impl Pool {
    /// One member, with probability proportional to its weight.
    fn pick(&self, random: u64) -> &[IpAddr] {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        // 53 random bits make a uniform float in [0, 1).
        let point = (random >> 11) as f64 / (1u64 << 53) as f64 * total;
        let index = self
            .cumulative
            .partition_point(|&sum| sum <= point)
            .min(self.members.len() - 1);
        std::slice::from_ref(&self.members[index])
    }
}

#[cfg(test)]
mod tests;
