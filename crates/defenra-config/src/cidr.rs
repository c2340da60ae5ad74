//! IP prefixes (`198.51.100.0/24`, `2001:db8::/32`, or a bare address), as whitelists,
//! trusted-proxy lists and bans use them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 prefix. The address is stored masked to the prefix, so two spellings of
/// one network (`10.1.2.3/8`, `10.0.0.0/8`) compare equal. IPv4-mapped IPv6 addresses
/// (`::ffff:192.0.2.1`) are stored as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR prefix")]
pub struct CidrError(pub String);

impl Cidr {
    /// The prefix of `addr` with `prefix` bits; `prefix` is clamped to the family's width.
    pub fn new(addr: IpAddr, prefix: u8) -> Cidr {
        let addr = addr.to_canonical();
        let prefix = prefix.min(max_prefix(addr));
        Cidr {
            addr: mask(addr, prefix),
            prefix,
        }
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        let addr = addr.to_canonical();
        Cidr::new(addr, max_prefix(addr))
    }

    /// The network address (the address with host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this prefix is one address.
    pub fn is_host(&self) -> bool {
        self.prefix == max_prefix(self.addr)
    }

    /// Whether `ip` lies in this prefix. IPv4-mapped IPv6 addresses match IPv4 prefixes.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDRESS` or `ADDRESS/PREFIX`; surrounding spaces are ignored.
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let error = || CidrError(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| error())?;
        let width = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => width,
            Some(prefix) => {
                let prefix = prefix.trim();
                // `u8::from_str` accepts `+8`; a prefix is digits only.
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(error());
                }
                let prefix: u8 = prefix.parse().map_err(|_| error())?;
                if prefix > width {
                    return Err(error());
                }
                prefix
            }
        };
        // `::ffff:a.b.c.d/120` is the IPv4 prefix /24.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Ok(Cidr::new(IpAddr::V4(v4), prefix.saturating_sub(96)));
        }
        Ok(Cidr::new(addr, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a list of prefixes given as one string: entries separated by commas, spaces or
/// newlines (`"203.0.113.7, 198.51.100.0/24"`). Returns the good ones and the bad texts.
pub fn parse_cidr_list(text: &str) -> (Vec<Cidr>, Vec<CidrError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for entry in text
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|entry| !entry.is_empty())
    {
        match entry.parse() {
            Ok(cidr) => good.push(cidr),
            Err(error) => bad.push(error),
        }
    }
    (good, bad)
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn parses_addresses_and_prefixes_of_both_families() {
        assert_eq!(cidr("203.0.113.7").to_string(), "203.0.113.7/32");
        assert_eq!(cidr(" 198.51.100.9/24 ").to_string(), "198.51.100.0/24");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::ffff:192.0.2.1").to_string(), "192.0.2.1/32");
        assert_eq!(cidr("::ffff:192.0.2.1/120").to_string(), "192.0.2.0/24");
        assert!(cidr("2001:db8::1").is_host());
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4/33",
            "1.2.3.4/",
            "1.2.3.4/+8",
            "x/8",
            "::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn containment_respects_family_and_mapped_addresses() {
        let net = cidr("198.51.100.0/24");
        assert!(net.contains("198.51.100.200".parse().unwrap()));
        assert!(!net.contains("198.51.101.1".parse().unwrap()));
        assert!(net.contains("::ffff:198.51.100.1".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(cidr("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
    }

    #[test]
    fn lists_split_on_commas_and_newlines_and_report_bad_entries() {
        let (good, bad) = parse_cidr_list("203.0.113.7, 198.51.100.0/24\n2001:db8::/48;nope");
        assert_eq!(good.len(), 3);
        assert_eq!(bad, vec![CidrError("nope".into())]);
    }
}
