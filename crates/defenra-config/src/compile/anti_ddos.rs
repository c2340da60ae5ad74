//! `httpProxy.antiDDoS` → [`AntiDdos`]: every field checked on its own, defaults for what is
//! missing, an [`Issue`] for what is wrong.
//!
//! Core's form turns an empty number field into 0, so a zero or negative number means "use
//! the default" and is reported, as is a value out of range or of the wrong type.

use std::sync::Arc;
use std::time::Duration;

use crate::model::{AntiDdos, JsChallenge, RateLimit, Slowloris};
use crate::wire::{self, Item, StringList};
use crate::{Cidr, Issue, parse_cidr_list};

/// Longest block, rate-limit window, header timeout or clearance the agent accepts: a typo
/// of a few extra digits must not block an address for centuries.
const MAX_WINDOW_SECONDS: f64 = 86_400.0;
const MAX_BLOCK_SECONDS: f64 = 30.0 * 86_400.0;
const MAX_HEADER_TIMEOUT_SECONDS: f64 = 3_600.0;
const MAX_TTL_SECONDS: f64 = 30.0 * 86_400.0;
const MAX_REQUESTS: f64 = 1_000_000_000.0;
const MAX_CONNECTIONS: f64 = 1_000_000.0;
const MAX_MIN_CONTENT_LENGTH: f64 = 1_000_000_000.0;
/// Entries of `ipWhitelist` kept; more are reported and dropped.
const MAX_WHITELIST: usize = 10_000;
const MAX_PROXY_IP_HEADERS: usize = 16;

/// Compiles `httpProxy.antiDDoS` at `path` (`domains[0].httpProxy.antiDDoS`). `None` when
/// Core sent none.
pub(super) fn compile_anti_ddos(
    raw: Option<&Item<wire::AntiDdos>>,
    path: &str,
    issues: &mut Vec<Issue>,
) -> Option<Arc<AntiDdos>> {
    let raw = match raw? {
        Item::Valid(raw) => raw,
        Item::Invalid { error } => {
            issues.push(Issue::new(
                path,
                format!("not an object ({error}); Anti-DDoS off for this domain"),
            ));
            return None;
        }
    };
    let wire::AntiDdos {
        enabled,
        rate_limit,
        block_duration_seconds,
        slowloris,
        js_challenge,
        logging,
        ip_whitelist,
        proxy_ip_headers,
    } = raw;
    let mut fields = Fields { path, issues };
    let defaults = AntiDdos::default();

    let rate_limit = match fields.object(rate_limit.as_ref(), "rateLimit") {
        Some(wire::AntiDdosRateLimit {
            window_seconds,
            max_requests,
        }) => RateLimit {
            window: fields.seconds(
                window_seconds.as_ref(),
                "rateLimit.windowSeconds",
                defaults.rate_limit.window,
                MAX_WINDOW_SECONDS,
            ),
            max_requests: fields.count(
                max_requests.as_ref(),
                "rateLimit.maxRequests",
                defaults.rate_limit.max_requests.into(),
                MAX_REQUESTS,
            ) as u32,
        },
        None => defaults.rate_limit,
    };
    let slowloris = match fields.object(slowloris.as_ref(), "slowloris") {
        Some(wire::AntiDdosSlowloris {
            min_content_length,
            max_header_timeout_seconds,
            max_connections,
        }) => Slowloris {
            min_content_length: fields.count(
                min_content_length.as_ref(),
                "slowloris.minContentLength",
                defaults.slowloris.min_content_length,
                MAX_MIN_CONTENT_LENGTH,
            ),
            max_header_timeout: fields.seconds(
                max_header_timeout_seconds.as_ref(),
                "slowloris.maxHeaderTimeoutSeconds",
                defaults.slowloris.max_header_timeout,
                MAX_HEADER_TIMEOUT_SECONDS,
            ),
            max_connections: fields.count(
                max_connections.as_ref(),
                "slowloris.maxConnections",
                defaults.slowloris.max_connections.into(),
                MAX_CONNECTIONS,
            ) as u32,
        },
        None => defaults.slowloris,
    };
    let js_challenge = match fields.object(js_challenge.as_ref(), "jsChallenge") {
        Some(wire::AntiDdosJsChallenge {
            enabled,
            cookie_name,
            ttl_seconds,
        }) => JsChallenge {
            enabled: fields.flag(enabled.as_ref(), "jsChallenge.enabled", false),
            cookie_name: fields.cookie_name(
                cookie_name.as_ref(),
                "jsChallenge.cookieName",
                &defaults.js_challenge.cookie_name,
            ),
            ttl: fields.seconds(
                ttl_seconds.as_ref(),
                "jsChallenge.ttlSeconds",
                defaults.js_challenge.ttl,
                MAX_TTL_SECONDS,
            ),
        },
        None => defaults.js_challenge.clone(),
    };
    let logging = match fields.object(logging.as_ref(), "logging") {
        Some(wire::AntiDdosLogging { enabled }) => {
            fields.flag(enabled.as_ref(), "logging.enabled", defaults.logging)
        }
        None => defaults.logging,
    };

    Some(Arc::new(AntiDdos {
        enabled: fields.flag(enabled.as_ref(), "enabled", false),
        rate_limit,
        block_duration: fields.seconds(
            block_duration_seconds.as_ref(),
            "blockDurationSeconds",
            defaults.block_duration,
            MAX_BLOCK_SECONDS,
        ),
        slowloris,
        js_challenge,
        logging,
        ip_whitelist: fields.whitelist(ip_whitelist.as_ref()),
        proxy_ip_headers: fields.header_names(proxy_ip_headers.as_ref()),
    }))
}

/// The object's path and the issue list, so each field is one call.
struct Fields<'a> {
    path: &'a str,
    issues: &'a mut Vec<Issue>,
}

impl Fields<'_> {
    fn issue(&mut self, field: &str, message: String) {
        self.issues
            .push(Issue::new(format!("{}.{field}", self.path), message));
    }

    /// A nested object; a malformed one is reported and its defaults used.
    fn object<'v, T>(&mut self, raw: Option<&'v Item<T>>, field: &str) -> Option<&'v T> {
        match raw? {
            Item::Valid(value) => Some(value),
            Item::Invalid { error } => {
                self.issue(field, format!("not an object ({error}); using defaults"));
                None
            }
        }
    }

    fn flag(&mut self, raw: Option<&Item<bool>>, field: &str, default: bool) -> bool {
        match raw {
            None => default,
            Some(Item::Valid(value)) => *value,
            Some(Item::Invalid { .. }) => {
                self.issue(field, format!("not true or false; using {default}"));
                default
            }
        }
    }

    /// A positive number no larger than `max`, or the default (with an issue).
    fn number(
        &mut self,
        raw: Option<&Item<f64>>,
        field: &str,
        default: String,
        max: f64,
    ) -> Option<f64> {
        let value = match raw? {
            Item::Valid(value) => *value,
            Item::Invalid { .. } => {
                self.issue(field, format!("not a number; using the default {default}"));
                return None;
            }
        };
        if !value.is_finite() || value <= 0.0 {
            // Core's form stores an emptied field as 0.
            self.issue(
                field,
                format!("{value} is not a positive number; using the default {default}"),
            );
            return None;
        }
        if value > max {
            self.issue(field, format!("{value} is more than {max}; using {max}"));
            return Some(max);
        }
        Some(value)
    }

    fn seconds(
        &mut self,
        raw: Option<&Item<f64>>,
        field: &str,
        default: Duration,
        max: f64,
    ) -> Duration {
        self.number(raw, field, format!("{}", default.as_secs_f64()), max)
            // Below a millisecond a window or timeout is meaningless; round up to it.
            .map(|seconds| Duration::from_secs_f64(seconds.max(0.001)))
            .unwrap_or(default)
    }

    /// A whole count; a fraction is rounded down (an issue), but never to 0.
    fn count(&mut self, raw: Option<&Item<f64>>, field: &str, default: u64, max: f64) -> u64 {
        let Some(value) = self.number(raw, field, default.to_string(), max) else {
            return default;
        };
        if value.fract() != 0.0 {
            let rounded = value.floor().max(1.0);
            self.issue(
                field,
                format!("{value} is not a whole number; using {rounded}"),
            );
            return rounded as u64;
        }
        value as u64
    }

    fn cookie_name(&mut self, raw: Option<&Item<String>>, field: &str, default: &str) -> String {
        let name = match raw {
            None => return default.to_owned(),
            Some(Item::Valid(name)) => name.trim(),
            Some(Item::Invalid { .. }) => {
                self.issue(field, format!("not a string; using {default:?}"));
                return default.to_owned();
            }
        };
        if name.is_empty() {
            return default.to_owned();
        }
        if name.len() <= 64 && name.bytes().all(is_token_byte) {
            return name.to_owned();
        }
        self.issue(
            field,
            format!("{name:?} is not a valid cookie name; using {default:?}"),
        );
        default.to_owned()
    }

    fn whitelist(&mut self, raw: Option<&Item<StringList>>) -> Vec<Cidr> {
        let mut whitelist = Vec::new();
        self.for_each_string(raw, "ipWhitelist", |fields, entry_path, text| {
            let (good, bad) = parse_cidr_list(text);
            for error in bad {
                fields.issue(entry_path, format!("{error}; entry skipped"));
            }
            for cidr in good {
                if whitelist.len() < MAX_WHITELIST {
                    whitelist.push(cidr);
                } else {
                    fields.issue(
                        entry_path,
                        format!("more than {MAX_WHITELIST} entries; {cidr} skipped"),
                    );
                }
            }
        });
        whitelist.sort_unstable();
        whitelist.dedup();
        whitelist
    }

    fn header_names(&mut self, raw: Option<&Item<StringList>>) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        self.for_each_string(raw, "proxyIpHeaders", |fields, entry_path, text| {
            for name in text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|name| !name.is_empty())
            {
                let lower = name.to_ascii_lowercase();
                if !lower.bytes().all(is_token_byte) {
                    fields.issue(
                        entry_path,
                        format!("{name:?} is not a header name; skipped"),
                    );
                } else if names.len() >= MAX_PROXY_IP_HEADERS {
                    fields.issue(
                        entry_path,
                        format!("more than {MAX_PROXY_IP_HEADERS} headers; {name:?} skipped"),
                    );
                } else if !names.contains(&lower) {
                    names.push(lower);
                }
            }
        });
        names
    }

    /// Calls `each` with every string of a list field and its path; a one-string list
    /// counts as one element. Elements that are not strings are reported.
    fn for_each_string(
        &mut self,
        raw: Option<&Item<StringList>>,
        field: &str,
        mut each: impl FnMut(&mut Self, &str, &str),
    ) {
        match raw {
            None => {}
            Some(Item::Invalid { .. }) => {
                self.issue(field, "not a list of strings; ignored".to_owned());
            }
            Some(Item::Valid(StringList::One(text))) => each(self, field, text),
            Some(Item::Valid(StringList::Many(items))) => {
                for (index, item) in items.iter().enumerate() {
                    let entry_path = format!("{field}[{index}]");
                    match item {
                        Item::Valid(text) => each(self, &entry_path, text),
                        Item::Invalid { .. } => {
                            self.issue(&entry_path, "not a string; skipped".to_owned());
                        }
                    }
                }
            }
        }
    }
}

/// RFC 7230 §3.2.6 `tchar`, which is also what RFC 6265 allows in a cookie name.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile;

    /// Compiles one domain with `anti_ddos` as its `httpProxy.antiDDoS` and returns the
    /// compiled settings and the issues as text.
    fn check(anti_ddos: &str) -> (Option<Arc<AntiDdos>>, Vec<String>) {
        let doc = format!(
            r#"{{"domains":[{{"domain":"example.com","httpProxy":{{"type":"both","antiDDoS":{anti_ddos}}}}}]}}"#
        );
        let compiled = compile(doc.as_bytes()).expect("document accepted");
        let domain = compiled
            .snapshot
            .domain("example.com")
            .expect("domain kept")
            .clone();
        let issues = compiled.issues.iter().map(ToString::to_string).collect();
        (domain.anti_ddos.clone(), issues)
    }

    #[test]
    fn core_shaped_settings_compile_without_issues() {
        let (settings, issues) = check(
            r#"{"enabled": true, "rateLimit": {"windowSeconds": 10, "maxRequests": 50},
                "blockDurationSeconds": 60,
                "slowloris": {"minContentLength": 256, "maxHeaderTimeoutSeconds": 5, "maxConnections": 20},
                "jsChallenge": {"enabled": true, "cookieName": "pass", "ttlSeconds": 600},
                "logging": {"enabled": false},
                "ipWhitelist": ["203.0.113.7", "198.51.100.0/24", "2001:db8::/32"],
                "proxyIpHeaders": ["CF-Connecting-IP", "X-Forwarded-For"]}"#,
        );
        assert_eq!(issues, Vec::<String>::new());
        let settings = settings.expect("settings present");
        assert!(settings.enabled);
        assert_eq!(settings.rate_limit.window, Duration::from_secs(10));
        assert_eq!(settings.rate_limit.max_requests, 50);
        assert_eq!(settings.block_duration, Duration::from_secs(60));
        assert_eq!(settings.slowloris.min_content_length, 256);
        assert_eq!(
            settings.slowloris.max_header_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(settings.slowloris.max_connections, 20);
        assert!(settings.js_challenge.enabled);
        assert_eq!(settings.js_challenge.cookie_name, "pass");
        assert_eq!(settings.js_challenge.ttl, Duration::from_secs(600));
        assert!(!settings.logging);
        let whitelist: Vec<String> = settings
            .ip_whitelist
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            whitelist,
            ["198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"]
        );
        assert_eq!(
            settings.proxy_ip_headers,
            ["cf-connecting-ip", "x-forwarded-for"]
        );
    }

    #[test]
    fn null_or_missing_settings_are_none_and_empty_object_is_all_defaults() {
        assert_eq!(check("null"), (None, vec![]));
        let (settings, issues) = check("{}");
        assert_eq!(issues, Vec::<String>::new());
        assert_eq!(*settings.expect("present"), AntiDdos::default());
    }

    #[test]
    fn zero_negative_and_wrong_typed_numbers_fall_back_to_defaults_with_paths() {
        let (settings, issues) = check(
            r#"{"enabled": true, "rateLimit": {"windowSeconds": 0, "maxRequests": -5},
                "blockDurationSeconds": "soon", "slowloris": {"maxConnections": 2.5,
                "maxHeaderTimeoutSeconds": 1e9}, "jsChallenge": {"cookieName": "bad name;"}}"#,
        );
        let settings = settings.expect("present");
        assert_eq!(settings.rate_limit, RateLimit::default());
        assert_eq!(settings.block_duration, Duration::from_secs(300));
        assert_eq!(settings.slowloris.max_connections, 2);
        assert_eq!(
            settings.slowloris.max_header_timeout,
            Duration::from_secs(3600)
        );
        assert_eq!(settings.js_challenge.cookie_name, "defenra_js_challenge");
        let prefix = "domains[0].httpProxy.antiDDoS.";
        for field in [
            "rateLimit.windowSeconds",
            "rateLimit.maxRequests",
            "blockDurationSeconds",
            "slowloris.maxConnections",
            "slowloris.maxHeaderTimeoutSeconds",
            "jsChallenge.cookieName",
        ] {
            assert!(
                issues
                    .iter()
                    .any(|issue| issue.starts_with(&format!("{prefix}{field}:"))),
                "no issue for {field}: {issues:?}"
            );
        }
        assert_eq!(issues.len(), 6, "{issues:?}");
    }

    #[test]
    fn whitelist_accepts_one_string_with_several_entries_and_skips_bad_ones() {
        let (settings, issues) =
            check(r#"{"ipWhitelist": "203.0.113.7, 198.51.100.0/24\n2001:db8::1\nnot-an-ip"}"#);
        assert_eq!(settings.expect("present").ip_whitelist.len(), 3);
        assert_eq!(
            issues,
            [
                "domains[0].httpProxy.antiDDoS.ipWhitelist: \"not-an-ip\" is not an IP address \
                 or CIDR prefix; entry skipped"
            ]
        );
        let (settings, issues) = check(r#"{"ipWhitelist": ["10.0.0.0/33", 7, "10.1.0.0/16"]}"#);
        assert_eq!(settings.expect("present").ip_whitelist.len(), 1);
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues[0].contains("ipWhitelist[0]"), "{issues:?}");
        assert!(issues[1].contains("ipWhitelist[1]"), "{issues:?}");
    }

    #[test]
    fn a_malformed_object_keeps_the_domain() {
        let (settings, issues) = check(r#""yes please""#);
        assert_eq!(settings, None);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].starts_with("domains[0].httpProxy.antiDDoS:"));
        let (settings, issues) = check(r#"{"enabled": true, "rateLimit": "fast"}"#);
        assert_eq!(settings.expect("present").rate_limit, RateLimit::default());
        assert!(issues[0].starts_with("domains[0].httpProxy.antiDDoS.rateLimit:"));
    }
}
