//! [`StaticGeo`]: a fixed table of networks, the test fake for [`GeoLookup`].

use std::net::IpAddr;

use crate::{Continent, CountryCode, GeoLookup, Location, Place};

/// Answers from a table of `network/prefix → place`; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct StaticGeo {
    entries: Vec<(u128, u8, bool, Place)>,
}

impl StaticGeo {
    pub fn new() -> Self {
        StaticGeo::default()
    }

    /// Adds `network/prefix_len` → `country` (two letters, any case) and `continent`.
    #[must_use]
    pub fn with(
        mut self,
        network: IpAddr,
        prefix_len: u8,
        country: Option<&str>,
        continent: Option<Continent>,
    ) -> Self {
        let (bits, is_v4, max) = key(network);
        let prefix_len = prefix_len.min(max);
        self.entries.push((
            mask(bits, prefix_len, max),
            prefix_len,
            is_v4,
            Place {
                country: country.and_then(CountryCode::parse),
                continent,
            },
        ));
        self
    }
}

impl GeoLookup for StaticGeo {
    fn locate(&self, ip: IpAddr) -> Option<Location> {
        self.place(ip).map(Place::to_location)
    }

    fn place(&self, ip: IpAddr) -> Option<Place> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (bits, is_v4, max) = key(ip);
        self.entries
            .iter()
            .filter(|(network, prefix_len, v4, _)| {
                *v4 == is_v4 && mask(bits, *prefix_len, max) == *network
            })
            .max_by_key(|(_, prefix_len, _, _)| *prefix_len)
            .map(|(_, _, _, place)| *place)
    }
}

fn key(ip: IpAddr) -> (u128, bool, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), true, 32),
        IpAddr::V6(v6) => (u128::from(v6), false, 128),
    }
}

fn mask(bits: u128, prefix_len: u8, max: u8) -> u128 {
    let host_bits = u32::from(max - prefix_len);
    if host_bits >= 128 {
        0
    } else {
        (bits >> host_bits) << host_bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_unknown_is_none() {
        let geo = StaticGeo::new()
            .with(
                "10.0.0.0".parse().unwrap(),
                8,
                Some("de"),
                Some(Continent::Europe),
            )
            .with(
                "10.1.0.0".parse().unwrap(),
                16,
                Some("FR"),
                Some(Continent::Europe),
            )
            .with("::".parse().unwrap(), 0, Some("us"), None);
        let country = |ip: &str| geo.locate(ip.parse().unwrap()).and_then(|l| l.country);
        assert_eq!(country("10.2.0.1").as_deref(), Some("de"));
        assert_eq!(country("10.1.0.1").as_deref(), Some("fr"));
        assert_eq!(country("2001:db8::1").as_deref(), Some("us"));
        assert_eq!(country("11.0.0.1"), None);
    }
}
