//! The clearance cookie on the wire: the `Set-Cookie` value that hands it out, and a scanner
//! that finds it in the request's `Cookie` fields without allocating.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use super::{ClearanceToken, KeyRing, Rejection};

/// Cookies of one name looked at per request: a stale copy set for another path may come
/// first, but a request carrying dozens is not worth more HMACs.
const MAX_TRIED: usize = 4;

/// The scheme of the request a cookie is set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// The cookie gets `Secure`, so the browser never sends it over plain HTTP.
    Https,
}

/// What the clearance cookies of a request say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clearance {
    /// A valid clearance: let the request through.
    Valid,
    /// No cookie of that name.
    Missing,
    /// Cookies of that name, none valid; the reason is the first one's.
    Rejected(Rejection),
}

/// The `Set-Cookie` value that stores `token` as cookie `name` for `ttl`:
/// `name=token; Path=/; Max-Age=ttl; HttpOnly; SameSite=Lax` and `; Secure` on HTTPS
/// (RFC 6265 §4.1). `Lax` keeps the cookie on top-level navigations from other sites (a
/// link to the site), and `HttpOnly` keeps it from the site's own scripts. `name` comes
/// from the compiled config, which checked it is a cookie token.
pub fn set_cookie(name: &str, token: &ClearanceToken, ttl: Duration, scheme: Scheme) -> String {
    let mut value = String::with_capacity(name.len() + 128);
    value.push_str(name);
    value.push('=');
    value.push_str(token.as_str());
    let _ = write!(
        value,
        "; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
        ttl.as_secs()
    );
    if scheme == Scheme::Https {
        value.push_str("; Secure");
    }
    value
}

/// The values of every cookie named `name` in the `Cookie` fields `fields` (HTTP/2 may
/// split one list over several fields, RFC 9113 §8.2.3), in order. Pairs are separated by
/// `;` and optional whitespace (RFC 6265 §5.4, leniently: tabs, missing spaces); names
/// compare exactly; a value in double quotes loses them; pairs without `=` are skipped.
pub fn cookie_values<'a, 'n, I>(fields: I, name: &'n str) -> CookieValues<'a, 'n, I::IntoIter>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    CookieValues {
        fields: fields.into_iter(),
        rest: &[],
        name: name.as_bytes(),
    }
}

/// The iterator of [`cookie_values`].
#[derive(Debug, Clone)]
pub struct CookieValues<'a, 'n, I> {
    fields: I,
    rest: &'a [u8],
    name: &'n [u8],
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for CookieValues<'a, '_, I> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            if self.rest.is_empty() {
                self.rest = self.fields.next()?;
                continue;
            }
            let (pair, rest) = match self.rest.iter().position(|&byte| byte == b';') {
                Some(at) => (&self.rest[..at], &self.rest[at + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            let Some(equals) = pair.iter().position(|&byte| byte == b'=') else {
                continue;
            };
            if pair[..equals].trim_ascii() != self.name {
                continue;
            }
            let value = pair[equals + 1..].trim_ascii();
            return Some(match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            });
        }
    }
}

impl KeyRing {
    /// Looks for a valid clearance among the cookies named `name` in `fields` (the request's
    /// `Cookie` field values), trying at most the first four of that name.
    pub fn check_cookies<'a>(
        &self,
        fields: impl IntoIterator<Item = &'a [u8]>,
        name: &str,
        client: IpAddr,
        host: &str,
        now: u64,
    ) -> Clearance {
        let mut first = None;
        for value in cookie_values(fields, name).take(MAX_TRIED) {
            match self.verify_clearance(value, client, host, now) {
                Ok(()) => return Clearance::Valid,
                Err(rejection) => {
                    first.get_or_insert(rejection);
                }
            }
        }
        first.map_or(Clearance::Missing, Clearance::Rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(fields: &[&'a str], name: &'a str) -> Vec<&'a str> {
        cookie_values(fields.iter().map(|field| field.as_bytes()), name)
            .map(|value| std::str::from_utf8(value).expect("utf-8"))
            .collect()
    }

    #[test]
    fn finds_a_cookie_by_exact_name_in_one_or_several_fields() {
        assert_eq!(values(&["a=1; pass=xyz; b=2"], "pass"), vec!["xyz"]);
        assert_eq!(values(&["pass=xyz"], "pass"), vec!["xyz"]);
        assert_eq!(
            values(&["a=1;pass=xyz;b=2"], "pass"),
            vec!["xyz"],
            "no spaces"
        );
        assert_eq!(values(&["a=1;\tpass = xyz ;b=2"], "pass"), vec!["xyz"]);
        assert_eq!(values(&["pass=\"xyz\""], "pass"), vec!["xyz"], "quoted");
        assert_eq!(values(&["a=1", "b=2; pass=xyz"], "pass"), vec!["xyz"]);
        assert_eq!(
            values(&["pass=old; a=1", "pass=new"], "pass"),
            vec!["old", "new"],
            "every copy, in order"
        );
        assert_eq!(values(&["pass=a=b"], "pass"), vec!["a=b"], "'=' in a value");
        assert_eq!(values(&["pass="], "pass"), vec![""]);
    }

    #[test]
    fn other_names_and_junk_are_not_the_cookie() {
        assert!(values(&["xpass=1; passx=2; Pass=3; pas=4"], "pass").is_empty());
        assert!(values(&["pass; ;;=pass; pass"], "pass").is_empty());
        assert!(values(&[""], "pass").is_empty());
        assert!(values(&[], "pass").is_empty());
        assert!(
            values(&["a=pass"], "pass").is_empty(),
            "a value is not a name"
        );
    }

    #[test]
    fn the_set_cookie_value_has_every_attribute_and_secure_on_https_only() {
        let token = crate::KeyRing::new(&crate::ShieldKey::from_bytes([1; 32])).issue_clearance(
            "192.0.2.1".parse().expect("ip"),
            "example.com",
            Duration::from_secs(900),
            1_000,
        );
        let http = set_cookie("pass", &token, Duration::from_secs(900), Scheme::Http);
        assert_eq!(
            http,
            format!("pass={token}; Path=/; Max-Age=900; HttpOnly; SameSite=Lax")
        );
        let https = set_cookie("pass", &token, Duration::from_secs(60), Scheme::Https);
        assert_eq!(
            https,
            format!("pass={token}; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure")
        );
    }
}
