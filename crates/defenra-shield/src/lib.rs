//! Per-client protection state of the edge agent: rate limits, blocks, escalation to
//! bans, connection caps, and the agent-wide ban list.
//!
//! The [`Shield`] owns the state (a bounded, sharded table of per-(domain, address)
//! entries, the ban list, connection counts); the config only brings policies, compiled
//! per snapshot into [`DomainPolicy`]s. A reload never resets a counter, a block or a ban.
//! The protocol crates ask two questions and act on the answer:
//! - at accept, before TLS and before any read: [`Shield::admit`] → [`Admission`];
//! - per request, after routing and before the WAF: [`Shield::check`] → [`Check`]; for a
//!   domain with the browser challenge on, also [`Shield::clearance`] (the request's
//!   cookies), [`Shield::issue_challenge`] and, for the challenge's own submit path,
//!   [`Shield::verify_solution`] (`gate.rs`).
//!
//! It never talks to another machine on a request path: the ban mirrors (state file,
//! nftables) run on [`Shield::run_background`], and a fleet of agents sharing state reads
//! and writes it through the hooks of `fleet.rs` from a task of its own. It reads no flags
//! and no files of its own except the ban file it is pointed at. Start reading at [`Shield`].

mod bans;
pub mod challenge;
mod cidrset;
mod client;
mod clock;
mod conns;
mod fleet;
mod gate;
pub mod nft;
pub mod pages;
mod persist;
mod policy;
mod stats;
mod table;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use defenra_config::{Cidr, Domain, Issue, Reload, Snapshot};
use parking_lot::Mutex;

pub use bans::{BanEntry, BanError, BanSource};
pub use challenge::{KeyRing, ShieldKey};
pub use cidrset::{CidrMap, CidrSet};
pub use clock::{Clock, ManualClock};
pub use conns::ConnTicket;
pub use fleet::{
    FleetBanChange, FleetBanChanges, FleetBlock, FleetCount, FleetDeltas, FleetMerge, FleetOptions,
};
pub use gate::Solution;
pub use pages::{Pages, RequestIds};
pub use persist::BanFileError;
pub use policy::{DomainCounters, DomainCountersSnapshot, DomainPolicy};
pub use stats::{ShieldStats, ShieldStatsSnapshot};

use crate::bans::{Ban, BanList};
use crate::challenge::Difficulty;
use crate::conns::ConnCounts;
use crate::policy::AgentPolicy;
use crate::table::Table;

/// Scope of the agent-wide escalation entries in the state table.
const SCOPE_AGENT: u32 = 1;
/// Scope of the L4 new-connection rate entries.
const SCOPE_L4_RATE: u32 = 2;
/// First domain scope; domains count up from here.
const FIRST_DOMAIN_SCOPE: u32 = 16;

/// An address blocked again within this time after its previous block ended is banned.
pub const ESCALATION_WINDOW: Duration = Duration::from_secs(3600);
/// The first escalation's ban.
pub const FIRST_BAN: Duration = Duration::from_secs(600);
/// Every later escalation's ban (within the window of the previous block).
pub const REPEAT_BAN: Duration = Duration::from_secs(1800);

/// Settings that are not per domain. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct ShieldOptions {
    /// Slots of the per-(domain, address) state table: the most addresses tracked at once
    /// (32 bytes each).
    pub table_size: usize,
    /// Most bans held at once; escalations beyond it are refused and counted (operator
    /// bans always get in).
    pub max_bans: usize,
    /// Peers whose `proxyIpHeaders` are believed; empty means every peer's.
    pub trusted_proxies: Vec<Cidr>,
    /// Concurrent L4 TCP connections per address (0: no cap).
    pub l4_max_conns_per_ip: u32,
    /// New L4 TCP connections per address per minute (0: no limit).
    pub l4_new_conns_per_minute: u32,
    /// Time source; tests use [`Clock::manual`].
    pub clock: Clock,
    /// Leading zero bits a browser challenge's proof of work needs.
    pub challenge_difficulty: Difficulty,
    /// The key challenges and clearances are signed with; `None`: a random key of this
    /// process (cookies then die with it). Rotate with [`Shield::rotate_key`].
    pub shield_key: Option<ShieldKey>,
}

impl Default for ShieldOptions {
    fn default() -> Self {
        ShieldOptions {
            table_size: 1 << 20,
            max_bans: 100_000,
            trusted_proxies: Vec::new(),
            l4_max_conns_per_ip: 0,
            l4_new_conns_per_minute: 0,
            clock: Clock::system(),
            challenge_difficulty: Difficulty::DEFAULT,
            shield_key: None,
        }
    }
}

/// Which kind of listener asks [`Shield::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// HTTP or HTTPS: bans and the per-address cap of the enabled domains.
    Http,
    /// An L4 TCP forward: bans and the `--l4-*` caps.
    L4,
}

/// The shield's answer at accept.
#[derive(Debug)]
pub enum Admission {
    /// Serve the connection; keep the ticket until it closes.
    Proceed(ConnTicket),
    /// Close the connection at once, before TLS or any read.
    Refuse(Refusal),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is banned.
    Banned,
    /// The peer already has as many connections as the cap allows.
    TooManyConnections,
    /// The peer opened connections faster than the per-minute limit.
    TooFast,
}

/// The shield's answer for a request of a protected domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Within the limits.
    Proceed,
    /// On the domain's whitelist: skips limits, challenges and blocks.
    Whitelisted,
    /// Over the limit, or blocked: refuse with 429 and `Retry-After: retry_after`
    /// seconds. `new_block` is true for the request that started the block.
    Limited { retry_after: u32, new_block: bool },
    /// The (proxy-reported) address is banned: refuse without a page of the origin's.
    Banned,
}

/// A domain's state scope in the table, its counters, and its policy as last compiled
/// (for merging the fleet's requests and blocks).
struct DomainSlot {
    scope: u32,
    counters: Arc<DomainCounters>,
    latest: Option<Arc<DomainPolicy>>,
}

/// The per-client protection state of one agent. Share it (`Arc`) between the listeners;
/// every method takes `&self` and none blocks for longer than a shard's short lock.
pub struct Shield {
    options: ShieldOptions,
    clock: Clock,
    table: Table,
    bans: BanList,
    http_conns: Arc<ConnCounts>,
    l4_conns: Arc<ConnCounts>,
    trusted: CidrSet,
    agent: ArcSwap<AgentPolicy>,
    /// Stable scope and counters per domain name, kept while the domain is configured.
    domains: Mutex<HashMap<Arc<str>, DomainSlot>>,
    next_scope: AtomicU32,
    stats: ShieldStats,
    decisions_log: persist::LogBudget,
    /// The keys of the browser challenge; swapped whole by a rotation.
    keys: ArcSwap<KeyRing>,
    /// What a fleet must learn, once [`Shield::enable_fleet`] was called (`fleet.rs`).
    fleet: std::sync::OnceLock<fleet::Journal>,
}

impl Shield {
    pub fn new(options: ShieldOptions) -> Shield {
        Shield {
            clock: options.clock.clone(),
            table: Table::new(options.table_size),
            bans: BanList::new(options.max_bans),
            http_conns: Arc::default(),
            l4_conns: Arc::default(),
            trusted: options.trusted_proxies.iter().copied().collect(),
            agent: ArcSwap::from_pointee(AgentPolicy::default()),
            domains: Mutex::new(HashMap::new()),
            next_scope: AtomicU32::new(FIRST_DOMAIN_SCOPE),
            stats: ShieldStats::default(),
            decisions_log: persist::LogBudget::new(20),
            keys: ArcSwap::from_pointee(KeyRing::new(
                &options.shield_key.clone().unwrap_or_else(gate::process_key),
            )),
            fleet: std::sync::OnceLock::new(),
            options,
        }
    }

    /// The policy of `domain`, when it has Anti-DDoS enabled; `None` otherwise. Call it
    /// when building a per-snapshot view (a route table), not per request: the result
    /// keeps the domain's state scope and counters across reloads.
    pub fn policy(&self, domain: &Domain) -> Option<Arc<DomainPolicy>> {
        let settings = domain
            .anti_ddos
            .as_ref()
            .filter(|settings| settings.enabled)?;
        let mut domains = self.domains.lock();
        let slot = match domains.get_mut(domain.name.as_str()) {
            Some(slot) => slot,
            None => domains
                .entry(Arc::from(domain.name.as_str()))
                .or_insert_with(|| DomainSlot {
                    scope: self.next_scope.fetch_add(1, Relaxed),
                    counters: Arc::new(DomainCounters::default()),
                    latest: None,
                }),
        };
        let name = match &slot.latest {
            Some(latest) => Arc::clone(&latest.domain),
            None => Arc::from(domain.name.as_str()),
        };
        let policy = Arc::new(DomainPolicy::new(
            name,
            slot.scope,
            Arc::clone(settings),
            Arc::clone(&slot.counters),
        ));
        slot.latest = Some(Arc::clone(&policy));
        Some(policy)
    }

    /// At accept, before TLS and before reading anything: is `peer` banned, or over its
    /// connection cap? Keep the ticket of an admitted connection until it closes.
    pub fn admit(&self, peer: IpAddr, kind: ConnKind) -> Admission {
        let peer = peer.to_canonical();
        let now_s = self.clock.now_s();
        if self.bans.is_banned(peer, now_s) {
            let counter = match kind {
                ConnKind::Http => &self.stats.connections_refused_banned,
                ConnKind::L4 => &self.stats.l4_connections_refused_banned,
            };
            counter.fetch_add(1, Relaxed);
            return Admission::Refuse(Refusal::Banned);
        }
        match kind {
            ConnKind::Http => {
                let agent = self.agent.load();
                let Some(cap) = agent.max_conns_per_ip else {
                    return Admission::Proceed(ConnTicket::default());
                };
                if agent.whitelist.contains(peer) {
                    return Admission::Proceed(ConnTicket::default());
                }
                match self.http_conns.acquire(peer, cap) {
                    Some(counted) => Admission::Proceed(ConnTicket {
                        _slot: Some(counted),
                    }),
                    None => {
                        self.stats.connections_refused_cap.fetch_add(1, Relaxed);
                        Admission::Refuse(Refusal::TooManyConnections)
                    }
                }
            }
            ConnKind::L4 => self.admit_l4(peer, now_s),
        }
    }

    /// For each L4 UDP datagram: false when the sender is banned (drop it).
    pub fn admit_datagram(&self, peer: IpAddr) -> bool {
        if self.bans.is_banned(peer, self.clock.now_s()) {
            self.stats.datagrams_dropped_banned.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    /// How long a client may take to send a complete request head: the smallest
    /// `slowloris.maxHeaderTimeoutSeconds` over enabled domains, or `None` when no domain
    /// is protected (the listener's own default applies).
    pub fn header_timeout(&self) -> Option<Duration> {
        self.agent.load().header_timeout
    }

    /// The client address of a request to a domain with `policy`: see the crate docs of
    /// `proxyIpHeaders` in docs/shield.md. `header(name)` returns the last field of that
    /// lower-case name. Without a policy it is the peer.
    pub fn client_addr<'h>(
        &self,
        policy: Option<&DomainPolicy>,
        peer: IpAddr,
        header: impl FnMut(&str) -> Option<&'h [u8]>,
    ) -> IpAddr {
        match policy {
            Some(policy) => client::resolve(policy, &self.trusted, peer, header),
            None => peer.to_canonical(),
        }
    }

    /// Counts a request of `client` to the domain of `policy` and says whether it may
    /// proceed. Bans of `client` (a proxy-reported address the accept check never saw)
    /// are checked here too.
    pub fn check(&self, policy: &DomainPolicy, client: IpAddr) -> Check {
        let client = client.to_canonical();
        if policy.whitelist.contains(client) {
            policy.counters.whitelisted.fetch_add(1, Relaxed);
            self.stats.whitelisted.fetch_add(1, Relaxed);
            return Check::Whitelisted;
        }
        let now_us = self.clock.now_us();
        let now_s = (now_us / 1_000_000) as u32;
        if self.bans.is_banned(client, now_s) {
            self.stats.requests_banned.fetch_add(1, Relaxed);
            return Check::Banned;
        }
        let key = self.table.key(policy.id, client);
        let outcome = self.table.update(key, now_s, |entry| {
            if entry.blocked_until > now_s {
                return Check::Limited {
                    retry_after: entry.blocked_until - now_s,
                    new_block: false,
                };
            }
            if entry.blocked_until != 0 {
                // The block is over: the address starts with a clean slate.
                entry.blocked_until = 0;
                entry.tat = 0;
            }
            // GCRA (the leaky bucket as a virtual schedule): the request conforms while the
            // theoretical arrival time is at most `tolerance` ahead of now.
            let tat = entry.tat.max(now_us);
            if tat - now_us > policy.tolerance_us {
                entry.blocked_until = now_s.saturating_add(policy.block_s);
                return Check::Limited {
                    retry_after: policy.block_s,
                    new_block: true,
                };
            }
            entry.tat = tat + policy.emission_us;
            Check::Proceed
        });
        let check = outcome.unwrap_or(Check::Proceed);
        if outcome == Some(Check::Proceed)
            && let Some(journal) = self.fleet.get()
            && journal.limits
        {
            journal.count(key, policy, client);
        }
        if let Check::Limited { new_block, .. } = check {
            policy.counters.requests_limited.fetch_add(1, Relaxed);
            self.stats.requests_limited.fetch_add(1, Relaxed);
            if new_block {
                self.on_block(policy, client, now_s);
            }
        }
        check
    }

    /// Lifts the block of `client` on the domain of `policy` and forgets its count (a
    /// solved challenge). Its escalation history stays.
    pub fn clear_block(&self, policy: &DomainPolicy, client: IpAddr) {
        let key = self.table.key(policy.id, client.to_canonical());
        if self.table.get(key).is_some() {
            self.table.update(key, self.clock.now_s(), |entry| {
                entry.blocked_until = 0;
                entry.tat = 0;
            });
        }
    }

    /// Bans `cidr` agent-wide for `duration` (`None`: until unbanned).
    ///
    /// # Errors
    ///
    /// [`BanError::Full`] for an automatic ban when the list is full.
    pub fn ban(
        &self,
        cidr: Cidr,
        duration: Option<Duration>,
        reason: &str,
        source: BanSource,
    ) -> Result<bool, BanError> {
        let now_s = self.clock.now_s();
        self.bans.insert(
            cidr,
            Ban {
                expires_s: bans::expiry(now_s, duration),
                reason: Arc::from(reason),
                source,
            },
            now_s,
        )
    }

    /// Lifts the ban of exactly `cidr`; false when there was none.
    pub fn unban(&self, cidr: &Cidr) -> bool {
        self.bans.remove(cidr)
    }

    /// Whether `ip` is banned now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        self.bans.is_banned(ip, self.clock.now_s())
    }

    /// The bans in force.
    pub fn bans(&self) -> Vec<BanEntry> {
        self.bans.entries(self.clock.now_s())
    }

    /// A receiver that changes whenever a ban is made or lifted (for mirrors).
    pub fn ban_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bans.subscribe()
    }

    /// Every counter and gauge.
    pub fn stats(&self) -> ShieldStatsSnapshot {
        let mut snapshot = ShieldStatsSnapshot::default();
        self.stats.fill(&mut snapshot);
        snapshot.bans_active = self.bans.len() as u64;
        snapshot.bans_refused_full = self.bans.refused_full.load(Relaxed);
        snapshot.table_entries = self.table.stats.entries.load(Relaxed);
        snapshot.table_capacity = self.table.capacity() as u64;
        snapshot.table_evictions = self.table.stats.evictions.load(Relaxed);
        snapshot.table_untracked = self.table.stats.untracked.load(Relaxed);
        snapshot.connected_addresses = self.http_conns.addresses() as u64;
        snapshot.protected_domains = self.agent.load().n_enabled as u64;
        snapshot
    }

    /// The counters themselves, for code that bumps them (the HTTP crate's slow-body rule).
    pub fn counters(&self) -> &ShieldStats {
        &self.stats
    }

    /// Per-domain counters of the configured protected domains, by name.
    pub fn domain_stats(&self) -> Vec<(Arc<str>, DomainCountersSnapshot)> {
        let mut domains: Vec<_> = self
            .domains
            .lock()
            .iter()
            .map(|(name, slot)| (Arc::clone(name), slot.counters.snapshot()))
            .collect();
        domains.sort_by(|a, b| a.0.cmp(&b.0));
        domains
    }

    /// Open HTTP/HTTPS connections of `ip` as counted for the cap.
    pub fn connections_of(&self, ip: IpAddr) -> u32 {
        self.http_conns.count(ip.to_canonical())
    }

    /// The clock the shield runs on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn admit_l4(&self, peer: IpAddr, now_s: u32) -> Admission {
        let per_minute = self.options.l4_new_conns_per_minute;
        if per_minute > 0 {
            let now_us = self.clock.now_us();
            let emission_us = (60_000_000 / u64::from(per_minute)).max(1);
            let tolerance_us = emission_us * u64::from(per_minute - 1);
            let key = self.table.key(SCOPE_L4_RATE, peer);
            let conforming = self.table.update(key, now_s, |entry| {
                let tat = entry.tat.max(now_us);
                if tat - now_us > tolerance_us {
                    return false;
                }
                entry.tat = tat + emission_us;
                true
            });
            if conforming == Some(false) {
                self.stats.l4_connections_refused_rate.fetch_add(1, Relaxed);
                return Admission::Refuse(Refusal::TooFast);
            }
        }
        let cap = self.options.l4_max_conns_per_ip;
        if cap == 0 {
            return Admission::Proceed(ConnTicket::default());
        }
        match self.l4_conns.acquire(peer, cap) {
            Some(counted) => Admission::Proceed(ConnTicket {
                _slot: Some(counted),
            }),
            None => {
                self.stats.l4_connections_refused_cap.fetch_add(1, Relaxed);
                Admission::Refuse(Refusal::TooManyConnections)
            }
        }
    }

    /// A new block of `client` on `policy`'s domain: log it, and escalate to a ban when
    /// the address's previous block (on any domain) ended less than an hour ago.
    fn on_block(&self, policy: &DomainPolicy, client: IpAddr, now_s: u32) {
        policy.counters.blocks.fetch_add(1, Relaxed);
        self.stats.blocks.fetch_add(1, Relaxed);
        if let Some(journal) = self.fleet.get()
            && journal.limits
        {
            journal.block(FleetBlock {
                domain: Arc::clone(&policy.domain),
                client,
                until_unix: self.clock.unix_s() + u64::from(policy.block_s),
            });
        }
        if policy.settings.logging {
            self.log_decision(|| {
                tracing::warn!(
                    domain = %policy.domain,
                    client = %client,
                    seconds = policy.block_s,
                    "rate limit exceeded: address blocked"
                );
            });
        }
        if self.agent.load().whitelist.contains(client) {
            return;
        }
        let block_end = now_s.saturating_add(policy.block_s);
        let window_s = ESCALATION_WINDOW.as_secs() as u32;
        let key = self.table.key(SCOPE_AGENT, client);
        // `aux`: end of the previous block (low 32 bits) and bans so far (high bits).
        let ban = self.table.update(key, now_s, |entry| {
            let previous_end = entry.aux as u32;
            let bans_so_far = (entry.aux >> 32) as u32;
            let repeat = previous_end != 0 && now_s <= previous_end.saturating_add(window_s);
            let (ban, bans_now) = if repeat {
                let duration = if bans_so_far == 0 {
                    FIRST_BAN
                } else {
                    REPEAT_BAN
                };
                (Some(duration), bans_so_far.saturating_add(1))
            } else {
                (None, 0)
            };
            entry.aux = (u64::from(bans_now) << 32) | u64::from(block_end.max(previous_end));
            ban
        });
        let Some(Some(duration)) = ban else {
            return;
        };
        let reason = format!(
            "rate limit of {} exceeded again within {} minutes of the previous block",
            policy.domain,
            window_s / 60
        );
        match self.ban(
            Cidr::host(client),
            Some(duration),
            &reason,
            BanSource::Escalation,
        ) {
            Ok(_) => {
                self.stats.bans_escalated.fetch_add(1, Relaxed);
                if policy.settings.logging {
                    self.log_decision(|| {
                        tracing::warn!(
                            client = %client,
                            domain = %policy.domain,
                            seconds = duration.as_secs(),
                            "repeated blocks: address banned agent-wide"
                        );
                    });
                }
            }
            Err(error) => {
                self.log_decision(|| tracing::warn!(client = %client, %error, "ban not made"));
            }
        }
    }

    /// Writes a decision's log line if the per-second budget allows, else counts it.
    fn log_decision(&self, write: impl FnOnce()) {
        match self.decisions_log.take(self.clock.now_s()) {
            persist::LogTake::Write { suppressed } => {
                if suppressed > 0 {
                    tracing::warn!(
                        suppressed,
                        "block and ban log lines suppressed in the last second"
                    );
                }
                write();
            }
            persist::LogTake::Skip => {
                self.stats.log_lines_suppressed.fetch_add(1, Relaxed);
            }
        }
    }
}

impl Reload for Shield {
    /// Recomputes the agent-wide values (connection cap, header timeout, whitelist union)
    /// and forgets the scopes of domains no longer configured. Blocks, counts and bans stay.
    fn reload(&self, snapshot: &Arc<Snapshot>, _issues: &mut Vec<Issue>) {
        let agent = AgentPolicy::from_snapshot(snapshot);
        self.agent.store(Arc::new(agent));
        let configured: HashMap<&str, bool> = snapshot
            .domains
            .iter()
            .map(|domain| {
                let enabled = domain
                    .anti_ddos
                    .as_ref()
                    .is_some_and(|settings| settings.enabled);
                (domain.name.as_str(), enabled)
            })
            .collect();
        self.domains
            .lock()
            .retain(|name, slot| match configured.get(&**name) {
                Some(enabled) => {
                    if !enabled {
                        // Switched off: the fleet's requests and blocks no longer apply.
                        slot.latest = None;
                    }
                    true
                }
                None => false,
            });
    }
}
