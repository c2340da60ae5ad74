//! Sets and maps of IP prefixes with lookups that cost one hash probe per distinct prefix
//! length, for whitelists, trusted proxies and prefix bans.

use std::collections::HashMap;
use std::net::IpAddr;

use defenra_config::Cidr;

/// Prefixes with a value each. A lookup masks the address once per distinct prefix length
/// present (usually one to three), longest first, so the most specific entry wins.
#[derive(Debug, Clone)]
pub struct CidrMap<V> {
    v4: Vec<(u8, HashMap<u32, V>)>,
    v6: Vec<(u8, HashMap<u128, V>)>,
    len: usize,
}

impl<V> Default for CidrMap<V> {
    fn default() -> Self {
        CidrMap {
            v4: Vec::new(),
            v6: Vec::new(),
            len: 0,
        }
    }
}

impl<V> CidrMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces the value of `cidr`; returns the previous value.
    pub fn insert(&mut self, cidr: Cidr, value: V) -> Option<V> {
        let previous = match cidr.addr() {
            IpAddr::V4(addr) => level(&mut self.v4, cidr.prefix()).insert(u32::from(addr), value),
            IpAddr::V6(addr) => level(&mut self.v6, cidr.prefix()).insert(u128::from(addr), value),
        };
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes exactly `cidr` (not the prefixes inside or around it).
    pub fn remove(&mut self, cidr: &Cidr) -> Option<V> {
        let removed = match cidr.addr() {
            IpAddr::V4(addr) => remove_from(&mut self.v4, cidr.prefix(), u32::from(addr)),
            IpAddr::V6(addr) => remove_from(&mut self.v6, cidr.prefix(), u128::from(addr)),
        };
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// The value of the longest prefix holding `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<(Cidr, &V)> {
        match ip.to_canonical() {
            IpAddr::V4(addr) => {
                let bits = u32::from(addr);
                self.v4.iter().find_map(|(prefix, map)| {
                    let masked = bits & mask32(*prefix);
                    map.get(&masked)
                        .map(|value| (Cidr::new(IpAddr::V4(masked.into()), *prefix), value))
                })
            }
            IpAddr::V6(addr) => {
                let bits = u128::from(addr);
                self.v6.iter().find_map(|(prefix, map)| {
                    let masked = bits & mask128(*prefix);
                    map.get(&masked)
                        .map(|value| (Cidr::new(IpAddr::V6(masked.into()), *prefix), value))
                })
            }
        }
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Cidr, &V)> {
        let v4 = self.v4.iter().flat_map(|(prefix, map)| {
            map.iter()
                .map(|(bits, value)| (Cidr::new(IpAddr::V4((*bits).into()), *prefix), value))
        });
        let v6 = self.v6.iter().flat_map(|(prefix, map)| {
            map.iter()
                .map(|(bits, value)| (Cidr::new(IpAddr::V6((*bits).into()), *prefix), value))
        });
        v4.chain(v6)
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        for (_, map) in &mut self.v4 {
            map.retain(|_, value| keep(value));
        }
        for (_, map) in &mut self.v6 {
            map.retain(|_, value| keep(value));
        }
        self.v4.retain(|(_, map)| !map.is_empty());
        self.v6.retain(|(_, map)| !map.is_empty());
        self.len = self.v4.iter().map(|(_, map)| map.len()).sum::<usize>()
            + self.v6.iter().map(|(_, map)| map.len()).sum::<usize>();
    }
}

/// A set of prefixes: [`CidrMap`] without values.
#[derive(Debug, Clone, Default)]
pub struct CidrSet(CidrMap<()>);

impl CidrSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, cidr: Cidr) {
        self.0.insert(cidr, ());
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        !self.0.is_empty() && self.0.lookup(ip).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl FromIterator<Cidr> for CidrSet {
    fn from_iter<I: IntoIterator<Item = Cidr>>(iter: I) -> Self {
        let mut set = CidrSet::new();
        for cidr in iter {
            set.insert(cidr);
        }
        set
    }
}

/// The map for `prefix`, created in longest-first order.
fn level<K, V>(levels: &mut Vec<(u8, HashMap<K, V>)>, prefix: u8) -> &mut HashMap<K, V> {
    let index = match levels.iter().position(|(existing, _)| *existing <= prefix) {
        Some(index) if levels[index].0 == prefix => index,
        Some(index) => {
            levels.insert(index, (prefix, HashMap::new()));
            index
        }
        None => {
            levels.push((prefix, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[index].1
}

fn remove_from<K: std::hash::Hash + Eq, V>(
    levels: &mut Vec<(u8, HashMap<K, V>)>,
    prefix: u8,
    key: K,
) -> Option<V> {
    let index = levels
        .iter()
        .position(|(existing, _)| *existing == prefix)?;
    let removed = levels[index].1.remove(&key);
    if levels[index].1.is_empty() {
        levels.remove(index);
    }
    removed
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix.min(128)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("valid prefix")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid address")
    }

    #[test]
    fn longest_prefix_wins_and_families_stay_apart() {
        let mut map = CidrMap::new();
        map.insert(cidr("10.0.0.0/8"), "wide");
        map.insert(cidr("10.1.0.0/16"), "narrow");
        map.insert(cidr("2001:db8::/32"), "v6");
        assert_eq!(map.lookup(ip("10.1.2.3")).map(|(_, v)| *v), Some("narrow"));
        assert_eq!(map.lookup(ip("10.2.2.3")).map(|(_, v)| *v), Some("wide"));
        assert_eq!(
            map.lookup(ip("10.2.2.3")).map(|(c, _)| c.to_string()),
            Some("10.0.0.0/8".to_owned())
        );
        assert_eq!(map.lookup(ip("11.0.0.1")), None);
        assert_eq!(map.lookup(ip("2001:db8::5")).map(|(_, v)| *v), Some("v6"));
        assert_eq!(
            map.lookup(ip("::ffff:10.1.0.1")).map(|(_, v)| *v),
            Some("narrow")
        );
        assert_eq!(map.len(), 3);
        assert_eq!(map.remove(&cidr("10.1.0.0/16")), Some("narrow"));
        assert_eq!(map.lookup(ip("10.1.2.3")).map(|(_, v)| *v), Some("wide"));
        map.retain(|value| *value != "wide");
        assert_eq!(map.lookup(ip("10.1.2.3")), None);
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn sets_hold_hosts_and_networks() {
        let set: CidrSet = [
            cidr("203.0.113.7"),
            cidr("198.51.100.0/24"),
            cidr("0.0.0.0/0"),
        ]
        .into_iter()
        .take(2)
        .collect();
        assert!(set.contains(ip("203.0.113.7")));
        assert!(!set.contains(ip("203.0.113.8")));
        assert!(set.contains(ip("198.51.100.77")));
        let everything: CidrSet = [cidr("0.0.0.0/0")].into_iter().collect();
        assert!(everything.contains(ip("8.8.8.8")));
        assert!(!everything.contains(ip("::1")));
    }
}
