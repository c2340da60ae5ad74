//! The shield's counters: atomics bumped where decisions are made, read by `/stats` and
//! `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use defenra_config::stats::{Metric, StatsSource};

use crate::challenge::Rejection;

/// Agent-wide counters. Per-domain ones are in [`crate::DomainCounters`].
#[derive(Debug, Default)]
pub struct ShieldStats {
    /// Requests refused because their address was over a domain's rate limit or blocked.
    pub requests_limited: AtomicU64,
    /// Blocks started (an address went over a domain's limit).
    pub blocks: AtomicU64,
    /// Bans made by escalation (repeated blocks).
    pub bans_escalated: AtomicU64,
    /// Requests refused because the address a trusted proxy reported is banned.
    pub requests_banned: AtomicU64,
    /// HTTP/HTTPS connections closed at accept because the peer is banned.
    pub connections_refused_banned: AtomicU64,
    /// HTTP/HTTPS connections closed at accept: the peer was at its connection cap.
    pub connections_refused_cap: AtomicU64,
    /// L4 TCP connections closed at accept because the peer is banned.
    pub l4_connections_refused_banned: AtomicU64,
    /// L4 TCP connections closed at accept: the peer was at `--l4-max-conns-per-ip`.
    pub l4_connections_refused_cap: AtomicU64,
    /// L4 TCP connections closed at accept: over `--l4-new-conns-per-ip-per-minute`.
    pub l4_connections_refused_rate: AtomicU64,
    /// L4 UDP datagrams dropped because the sender is banned.
    pub datagrams_dropped_banned: AtomicU64,
    /// Requests and connections of whitelisted addresses.
    pub whitelisted: AtomicU64,
    /// Request bodies ended because they came slower than `slowloris.minContentLength`
    /// per header timeout.
    pub slow_bodies: AtomicU64,
    /// Block and ban log lines left out by the log rate limit.
    pub log_lines_suppressed: AtomicU64,
    /// Challenge pages answered (a request without a valid clearance, or blocked).
    pub challenges_issued: AtomicU64,
    /// Posted solutions accepted: a clearance cookie was handed out.
    pub challenges_solved: AtomicU64,
    /// Posted solutions refused, by [`Rejection`] (`bad`, `expired`, `foreign`).
    pub challenges_failed: [AtomicU64; 3],
    /// Requests let through by a valid clearance cookie.
    pub clearances_accepted: AtomicU64,
    /// Clearance cookies refused (the request got the challenge), by [`Rejection`].
    pub clearances_rejected: [AtomicU64; 3],
}

/// Index of `rejection` in the per-reason counter arrays.
pub(crate) fn reason_index(rejection: Rejection) -> usize {
    match rejection {
        Rejection::Bad => 0,
        Rejection::Expired => 1,
        Rejection::Foreign => 2,
    }
}

/// The reasons in the order of the per-reason counter arrays.
const REASONS: [Rejection; 3] = [Rejection::Bad, Rejection::Expired, Rejection::Foreign];

/// A plain copy of every counter and gauge, for rendering.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShieldStatsSnapshot {
    pub requests_limited: u64,
    pub blocks: u64,
    pub bans_escalated: u64,
    pub requests_banned: u64,
    pub connections_refused_banned: u64,
    pub connections_refused_cap: u64,
    pub l4_connections_refused_banned: u64,
    pub l4_connections_refused_cap: u64,
    pub l4_connections_refused_rate: u64,
    pub datagrams_dropped_banned: u64,
    pub whitelisted: u64,
    pub slow_bodies: u64,
    pub log_lines_suppressed: u64,
    pub challenges_issued: u64,
    pub challenges_solved: u64,
    pub challenges_failed_bad: u64,
    pub challenges_failed_expired: u64,
    pub challenges_failed_foreign: u64,
    pub clearances_accepted: u64,
    pub clearances_rejected_bad: u64,
    pub clearances_rejected_expired: u64,
    pub clearances_rejected_foreign: u64,
    /// Bans in force (gauge).
    pub bans_active: u64,
    /// Automatic bans not made because the ban list was full.
    pub bans_refused_full: u64,
    /// Occupied slots of the state table (gauge).
    pub table_entries: u64,
    /// Slots of the state table.
    pub table_capacity: u64,
    /// Idle entries replaced by new addresses.
    pub table_evictions: u64,
    /// Addresses not tracked because their bucket held only blocked entries.
    pub table_untracked: u64,
    /// Addresses with HTTP/HTTPS connections open (gauge).
    pub connected_addresses: u64,
    /// Enabled domains in the current config (gauge).
    pub protected_domains: u64,
}

impl ShieldStats {
    pub(crate) fn fill(&self, snapshot: &mut ShieldStatsSnapshot) {
        snapshot.requests_limited = self.requests_limited.load(Relaxed);
        snapshot.blocks = self.blocks.load(Relaxed);
        snapshot.bans_escalated = self.bans_escalated.load(Relaxed);
        snapshot.requests_banned = self.requests_banned.load(Relaxed);
        snapshot.connections_refused_banned = self.connections_refused_banned.load(Relaxed);
        snapshot.connections_refused_cap = self.connections_refused_cap.load(Relaxed);
        snapshot.l4_connections_refused_banned = self.l4_connections_refused_banned.load(Relaxed);
        snapshot.l4_connections_refused_cap = self.l4_connections_refused_cap.load(Relaxed);
        snapshot.l4_connections_refused_rate = self.l4_connections_refused_rate.load(Relaxed);
        snapshot.datagrams_dropped_banned = self.datagrams_dropped_banned.load(Relaxed);
        snapshot.whitelisted = self.whitelisted.load(Relaxed);
        snapshot.slow_bodies = self.slow_bodies.load(Relaxed);
        snapshot.log_lines_suppressed = self.log_lines_suppressed.load(Relaxed);
        snapshot.challenges_issued = self.challenges_issued.load(Relaxed);
        snapshot.challenges_solved = self.challenges_solved.load(Relaxed);
        [
            snapshot.challenges_failed_bad,
            snapshot.challenges_failed_expired,
            snapshot.challenges_failed_foreign,
        ] = self
            .challenges_failed
            .each_ref()
            .map(|counter| counter.load(Relaxed));
        snapshot.clearances_accepted = self.clearances_accepted.load(Relaxed);
        [
            snapshot.clearances_rejected_bad,
            snapshot.clearances_rejected_expired,
            snapshot.clearances_rejected_foreign,
        ] = self
            .clearances_rejected
            .each_ref()
            .map(|counter| counter.load(Relaxed));
    }
}

impl StatsSource for crate::Shield {
    fn service(&self) -> &'static str {
        "shield"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let s = self.stats();
        out.push(Metric::counter(
            "requests_limited_total",
            "Requests refused (429) because the address was over a domain's rate limit or blocked.",
            s.requests_limited,
        ));
        out.push(Metric::counter(
            "blocks_total",
            "Blocks started: an address went over a domain's rate limit.",
            s.blocks,
        ));
        out.push(Metric::counter(
            "bans_escalated_total",
            "Agent-wide bans made because an address was blocked again within an hour.",
            s.bans_escalated,
        ));
        out.push(Metric::counter(
            "requests_banned_total",
            "Requests refused because the address a trusted proxy reported is banned.",
            s.requests_banned,
        ));
        for (listener, reason, value) in [
            ("http", "banned", s.connections_refused_banned),
            ("http", "cap", s.connections_refused_cap),
            ("l4", "banned", s.l4_connections_refused_banned),
            ("l4", "cap", s.l4_connections_refused_cap),
            ("l4", "rate", s.l4_connections_refused_rate),
        ] {
            out.push(
                Metric::counter(
                    "connections_refused_total",
                    "Connections closed at accept, by listener kind and reason.",
                    value,
                )
                .label("listener", listener)
                .label("reason", reason),
            );
        }
        out.push(Metric::counter(
            "datagrams_dropped_total",
            "L4 UDP datagrams dropped because the sender is banned.",
            s.datagrams_dropped_banned,
        ));
        out.push(Metric::counter(
            "whitelisted_total",
            "Requests of whitelisted addresses (limits skipped).",
            s.whitelisted,
        ));
        out.push(Metric::counter(
            "slow_bodies_total",
            "Request bodies ended for coming slower than slowloris.minContentLength per header timeout.",
            s.slow_bodies,
        ));
        out.push(Metric::counter(
            "log_lines_suppressed_total",
            "Block and ban log lines left out by the log rate limit.",
            s.log_lines_suppressed,
        ));
        out.push(Metric::counter(
            "challenges_issued_total",
            "Browser challenge pages answered (no valid clearance cookie, or a blocked address).",
            s.challenges_issued,
        ));
        out.push(Metric::counter(
            "challenges_solved_total",
            "Challenge solutions accepted: a clearance cookie was handed out.",
            s.challenges_solved,
        ));
        let failed = [
            s.challenges_failed_bad,
            s.challenges_failed_expired,
            s.challenges_failed_foreign,
        ];
        for (reason, value) in REASONS.into_iter().zip(failed) {
            out.push(
                Metric::counter(
                    "challenges_failed_total",
                    "Challenge solutions refused, by reason (bad, expired, foreign).",
                    value,
                )
                .label("reason", reason.as_str()),
            );
        }
        out.push(Metric::counter(
            "clearances_accepted_total",
            "Requests let through by a valid clearance cookie.",
            s.clearances_accepted,
        ));
        let rejected = [
            s.clearances_rejected_bad,
            s.clearances_rejected_expired,
            s.clearances_rejected_foreign,
        ];
        for (reason, value) in REASONS.into_iter().zip(rejected) {
            out.push(
                Metric::counter(
                    "clearances_rejected_total",
                    "Clearance cookies refused (the request got the challenge), by reason.",
                    value,
                )
                .label("reason", reason.as_str()),
            );
        }
        out.push(Metric::gauge(
            "bans_active",
            "Bans in force (addresses and prefixes).",
            s.bans_active as f64,
        ));
        out.push(Metric::counter(
            "bans_refused_total",
            "Automatic bans not made because the ban list was full.",
            s.bans_refused_full,
        ));
        out.push(Metric::gauge(
            "table_entries",
            "Occupied slots of the per-address state table.",
            s.table_entries as f64,
        ));
        out.push(Metric::gauge(
            "table_capacity",
            "Slots of the per-address state table.",
            s.table_capacity as f64,
        ));
        out.push(Metric::counter(
            "table_evictions_total",
            "Idle table entries replaced by new addresses.",
            s.table_evictions,
        ));
        out.push(Metric::counter(
            "table_untracked_total",
            "Addresses not tracked because their table bucket held only blocked entries.",
            s.table_untracked,
        ));
        out.push(Metric::gauge(
            "connected_addresses",
            "Addresses with HTTP/HTTPS connections open, as counted for the cap.",
            s.connected_addresses as f64,
        ));
        out.push(Metric::gauge(
            "protected_domains",
            "Domains with Anti-DDoS enabled in the current config.",
            s.protected_domains as f64,
        ));
        for (domain, counters) in self.domain_stats() {
            out.push(
                Metric::counter(
                    "domain_requests_limited_total",
                    "Requests refused by a domain's rate limit, by domain.",
                    counters.requests_limited,
                )
                .label("domain", domain.to_string()),
            );
            out.push(
                Metric::counter(
                    "domain_blocks_total",
                    "Blocks started, by domain.",
                    counters.blocks,
                )
                .label("domain", domain.to_string()),
            );
        }
    }
}
