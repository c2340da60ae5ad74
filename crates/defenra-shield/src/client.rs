//! The client address of a request: the TCP peer, or the address a trusted proxy in front of
//! the agent put in one of the domain's `proxyIpHeaders`.

use std::net::IpAddr;

use crate::cidrset::CidrSet;
use crate::policy::DomainPolicy;

/// The address the shield, the WAF, the origin headers and the logs use for a request.
///
/// The peer, unless the domain lists `proxyIpHeaders` and the peer may be trusted (in
/// `trusted`, or any peer when `trusted` is empty): then the first listed header present,
/// and in a comma-separated list the last entry, the one the nearest proxy added (nginx's
/// `real_ip_header` without `real_ip_recursive`). A value that is not an address leaves the
/// peer. `header(name)` gives the last field of that (lower-case) name.
pub(crate) fn resolve<'h>(
    policy: &DomainPolicy,
    trusted: &CidrSet,
    peer: IpAddr,
    mut header: impl FnMut(&str) -> Option<&'h [u8]>,
) -> IpAddr {
    let peer = peer.to_canonical();
    let names = policy.proxy_ip_headers();
    if names.is_empty() || !(trusted.is_empty() || trusted.contains(peer)) {
        return peer;
    }
    for name in names {
        if let Some(value) = header(name) {
            return parse_last(value).unwrap_or(peer);
        }
    }
    peer
}

/// The last entry of a comma-separated list of addresses: `203.0.113.7`,
/// `198.51.100.1, 203.0.113.7`, `[2001:db8::1]:443` or `203.0.113.7:5000`.
pub(crate) fn parse_last(value: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(value).ok()?;
    let last = text
        .rsplit(',')
        .map(str::trim)
        .find(|entry| !entry.is_empty())?;
    if let Ok(ip) = last.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = last.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        return inside.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    }
    let (host, port) = last.rsplit_once(':')?;
    if port.bytes().all(|b| b.is_ascii_digit()) {
        return host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_entry_of_a_list_in_every_spelling() {
        let parse = |text: &str| parse_last(text.as_bytes()).map(|ip| ip.to_string());
        assert_eq!(parse("203.0.113.7"), Some("203.0.113.7".into()));
        assert_eq!(
            parse("198.51.100.1, 203.0.113.7"),
            Some("203.0.113.7".into())
        );
        assert_eq!(
            parse("198.51.100.1,203.0.113.7 , "),
            Some("203.0.113.7".into())
        );
        assert_eq!(parse("[2001:db8::1]:443"), Some("2001:db8::1".into()));
        assert_eq!(parse("2001:db8::1"), Some("2001:db8::1".into()));
        assert_eq!(parse("203.0.113.7:5000"), Some("203.0.113.7".into()));
        assert_eq!(parse("::ffff:203.0.113.7"), Some("203.0.113.7".into()));
        assert_eq!(parse("unknown"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("1.2.3.4:x"), None);
    }
}
