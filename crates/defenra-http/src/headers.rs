//! Header rules between client and origin: hop-by-hop removal and the forwarding headers.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the non-standard `Keep-Alive`; any header
/// whose name starts with `proxy-` is removed too.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the fixed list, `Keep-Alive`, every `Proxy-*` header and
/// every header named in `Connection` (RFC 9110 §7.6.1). Used in both directions.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them: one pass over the names instead of a removal
    // (a hash and probe) per listed name.
    let any = headers.keys().any(|name| {
        HOP_BY_HOP.contains(name)
            || name.as_str() == "keep-alive"
            || name.as_str().starts_with("proxy-")
    });
    if !any {
        return;
    }
    // Names listed in Connection are per-hop too; collect them before Connection goes.
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',') {
            let token = token.trim();
            // `close` names no header and `keep-alive` goes below anyway; skipping them
            // keeps the usual `Connection: keep-alive` free of allocations.
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    if headers
        .keys()
        .any(|name| name.as_str().starts_with("proxy-"))
    {
        let proxy_names: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy_names {
            headers.remove(name);
        }
    }
}

/// The client IP as a header value, made once per connection; cloning it for each
/// request only bumps a reference count.
pub(crate) fn ip_value(ip: IpAddr) -> HeaderValue {
    // An IP's text is always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds the forwarding headers: appends the client (`client_ip`, from [`ip_value`]) to
/// `X-Forwarded-For` (keeping the chain the client sent, every value in order), and sets
/// `X-Real-IP`, `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub(crate) fn add_forwarding(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    scheme: &'static str,
    host: Option<&HeaderValue>,
) {
    let mut chain: Vec<u8> = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        let value = value.as_bytes().trim_ascii();
        if value.is_empty() {
            continue;
        }
        chain.extend_from_slice(value);
        chain.extend_from_slice(b", ");
    }
    if chain.is_empty() {
        headers.insert(&X_FORWARDED_FOR, client_ip.clone());
    } else {
        chain.extend_from_slice(client_ip.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&chain) {
            headers.insert(&X_FORWARDED_FOR, value);
        }
    }
    headers.insert(&X_REAL_IP, client_ip.clone());
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    match host {
        Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// Joins the `cookie` fields an HTTP/2 client may send separately into one field for an
/// HTTP/1.1 origin (RFC 9113 §8.2.3).
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, close, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "basic"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "a"),
            ("x-kept", "b"),
        ]);
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        let kept: Vec<&[u8]> = headers
            .get_all("x-kept")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(kept, [b"a".as_slice(), b"b"]);
    }

    #[test]
    fn forwarded_for_keeps_the_chain_and_appends_the_client() {
        let mut headers = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        add_forwarding(
            &mut headers,
            &ip_value("10.0.0.9".parse().unwrap()),
            "https",
            Some(&HeaderValue::from_static("www.example.com")),
        );
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(headers["x-real-ip"], "10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "www.example.com");
    }

    #[test]
    fn http2_cookie_fields_are_joined() {
        let mut headers = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut headers);
        assert_eq!(headers["cookie"], "a=1; b=2");
    }
}
