//! Policies compiled from a snapshot: one [`DomainPolicy`] per protected domain and the
//! agent-wide values derived from all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use defenra_config::{AntiDdos, Snapshot};

use crate::cidrset::CidrSet;
use crate::clock::ceil_secs;

/// What a domain with Anti-DDoS on asks of the shield, precomputed for the request path.
/// Built once per config change; the state it refers to (counters, blocks) is keyed by
/// [`DomainPolicy::id`], which stays the same across reloads.
#[derive(Debug)]
pub struct DomainPolicy {
    pub(crate) domain: Arc<str>,
    /// Stable while the domain stays in the config: the state table's scope.
    pub(crate) id: u32,
    pub(crate) settings: Arc<AntiDdos>,
    /// GCRA: microseconds between two requests at the sustained rate.
    pub(crate) emission_us: u64,
    /// GCRA: how far ahead of now the theoretical arrival time may run (the burst).
    pub(crate) tolerance_us: u64,
    pub(crate) block_s: u32,
    pub(crate) whitelist: CidrSet,
    pub(crate) counters: Arc<DomainCounters>,
}

impl DomainPolicy {
    pub(crate) fn new(
        domain: Arc<str>,
        id: u32,
        settings: Arc<AntiDdos>,
        counters: Arc<DomainCounters>,
    ) -> DomainPolicy {
        let window_us = settings.rate_limit.window.as_micros().max(1) as u64;
        let max_requests = u64::from(settings.rate_limit.max_requests.max(1));
        let emission_us = (window_us / max_requests).max(1);
        DomainPolicy {
            domain,
            id,
            emission_us,
            // A fresh address may send `max_requests` at once: the first is free, the
            // other `max_requests - 1` run the arrival time ahead by one emission each.
            tolerance_us: emission_us * (max_requests - 1),
            block_s: ceil_secs(settings.block_duration).max(1),
            whitelist: settings.ip_whitelist.iter().copied().collect(),
            settings,
            counters,
        }
    }

    /// The domain's name.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The settings this policy was compiled from.
    pub fn settings(&self) -> &AntiDdos {
        &self.settings
    }

    /// Request headers that carry the client address (lower case), in order of preference.
    pub fn proxy_ip_headers(&self) -> &[String] {
        &self.settings.proxy_ip_headers
    }

    /// Whether the browser challenge is on for this domain.
    pub fn challenge_enabled(&self) -> bool {
        self.settings.js_challenge.enabled
    }

    /// The slow-body rule: a request body must bring at least `bytes` per `period`.
    pub fn min_body_rate(&self) -> (u64, Duration) {
        (
            self.settings.slowloris.min_content_length,
            self.settings.slowloris.max_header_timeout,
        )
    }

    /// Whether `ip` is on this domain's whitelist.
    pub fn whitelists(&self, ip: std::net::IpAddr) -> bool {
        self.whitelist.contains(ip)
    }

    /// This domain's counters.
    pub fn counters(&self) -> &DomainCounters {
        &self.counters
    }
}

/// Per-domain counters; they outlive reloads (the policy is rebuilt, these are kept).
#[derive(Debug, Default)]
pub struct DomainCounters {
    /// Requests refused with 429 (or a challenge) because the address was over the limit.
    pub requests_limited: AtomicU64,
    /// Addresses blocked for this domain.
    pub blocks: AtomicU64,
    /// Requests of whitelisted addresses.
    pub whitelisted: AtomicU64,
}

impl DomainCounters {
    pub fn snapshot(&self) -> DomainCountersSnapshot {
        DomainCountersSnapshot {
            requests_limited: self.requests_limited.load(Relaxed),
            blocks: self.blocks.load(Relaxed),
            whitelisted: self.whitelisted.load(Relaxed),
        }
    }
}

/// Plain copy of [`DomainCounters`] for rendering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainCountersSnapshot {
    pub requests_limited: u64,
    pub blocks: u64,
    pub whitelisted: u64,
}

/// Agent-wide values derived from every enabled domain of a snapshot.
#[derive(Debug, Default)]
pub(crate) struct AgentPolicy {
    /// Smallest `slowloris.maxConnections` over enabled domains.
    pub(crate) max_conns_per_ip: Option<u32>,
    /// Smallest `slowloris.maxHeaderTimeoutSeconds` over enabled domains.
    pub(crate) header_timeout: Option<Duration>,
    /// Every address any domain whitelists (enabled or not): never escalated to a ban,
    /// never counted against the connection cap.
    pub(crate) whitelist: CidrSet,
    /// Enabled domains in the snapshot.
    pub(crate) n_enabled: usize,
    /// The longest clearance `ttlSeconds` of the enabled domains with the challenge on: how
    /// long a key rotation keeps accepting the previous key.
    pub(crate) longest_clearance: Duration,
}

impl AgentPolicy {
    pub(crate) fn from_snapshot(snapshot: &Snapshot) -> AgentPolicy {
        let mut policy = AgentPolicy::default();
        for domain in &snapshot.domains {
            let Some(settings) = domain.anti_ddos.as_deref() else {
                continue;
            };
            for cidr in &settings.ip_whitelist {
                policy.whitelist.insert(*cidr);
            }
            if !settings.enabled {
                continue;
            }
            policy.n_enabled += 1;
            let cap = settings.slowloris.max_connections;
            policy.max_conns_per_ip = Some(policy.max_conns_per_ip.map_or(cap, |c| c.min(cap)));
            let timeout = settings.slowloris.max_header_timeout;
            policy.header_timeout = Some(policy.header_timeout.map_or(timeout, |t| t.min(timeout)));
            if settings.js_challenge.enabled {
                policy.longest_clearance = policy.longest_clearance.max(settings.js_challenge.ttl);
            }
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use defenra_config::RateLimit;

    fn policy(window: Duration, max_requests: u32) -> DomainPolicy {
        let settings = AntiDdos {
            enabled: true,
            rate_limit: RateLimit {
                window,
                max_requests,
            },
            ..AntiDdos::default()
        };
        DomainPolicy::new(
            Arc::from("example.com"),
            16,
            Arc::new(settings),
            Arc::default(),
        )
    }

    #[test]
    fn gcra_parameters_follow_the_rate_and_burst() {
        let p = policy(Duration::from_secs(5), 100);
        assert_eq!(p.emission_us, 50_000);
        assert_eq!(p.tolerance_us, 99 * 50_000);
        let one = policy(Duration::from_secs(1), 1);
        assert_eq!(one.tolerance_us, 0);
    }
}
