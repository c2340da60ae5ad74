//! Hooks for a fleet of agents that share their protection state (the `defenra-fleet` crate
//! carries it over Redis; this crate knows nothing of how it travels): local deltas out,
//! merged state in.
//!
//! Out: once [`Shield::enable_fleet`] has been called, the request path notes what the
//! other agents must learn, in bounded structures a background task drains:
//! - with `limits` on, the requests each (domain, address) was allowed since the last
//!   drain ([`Shield::take_fleet_deltas`]), and every block this agent decided;
//! - every ban this agent made or lifted ([`Shield::take_fleet_ban_changes`]).
//!
//! A flood of random addresses cannot grow them: each holds at most its configured number
//! of entries; what does not fit is counted (`dropped`, `overflowed`) and stays local.
//!
//! In: the other agents' requests are consumed from the local rate limit
//! ([`Shield::merge_fleet_requests`]), their blocks and bans applied
//! ([`Shield::apply_fleet_block`], [`Shield::apply_fleet_ban`]); none of those is noted
//! for publishing again, so nothing echoes between agents.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use defenra_config::Cidr;
use parking_lot::Mutex;

use crate::bans::{self, Ban};
use crate::{BanError, BanSource, DomainPolicy, Shield};

/// Shards of the request-count journal: requests of different addresses rarely meet on
/// one lock.
const COUNT_SHARDS: usize = 64;

/// What the shield notes for a fleet, and how much of it at most between two drains.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Note allowed requests and blocks (fleet-wide rate limits). Bans are noted always.
    pub limits: bool,
    /// Distinct (domain, address) request counts kept between two drains.
    pub max_counts: usize,
    /// Blocks kept between two drains.
    pub max_blocks: usize,
    /// Ban changes kept between two drains; past it the drain says `overflowed` and the
    /// fleet compares whole lists instead.
    pub max_ban_changes: usize,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            limits: false,
            max_counts: 16_384,
            max_blocks: 4_096,
            max_ban_changes: 10_000,
        }
    }
}

/// Requests of one (domain, address) this agent allowed since the last drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCount {
    pub domain: Arc<str>,
    pub client: IpAddr,
    pub requests: u32,
}

/// A block this agent decided: `client` is refused on `domain` until `until_unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetBlock {
    pub domain: Arc<str>,
    pub client: IpAddr,
    /// Unix second at which the block ends.
    pub until_unix: u64,
}

/// What [`Shield::take_fleet_deltas`] hands over.
#[derive(Debug, Default)]
pub struct FleetDeltas {
    pub counts: Vec<FleetCount>,
    pub blocks: Vec<FleetBlock>,
    /// Counts and blocks left out since the last drain because the journal was full.
    pub dropped: u64,
}

/// A ban this agent made or lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetBanChange {
    Banned {
        cidr: Cidr,
        reason: Arc<str>,
        source: BanSource,
        /// Unix second at which it ends; `None` lasts until unbanned.
        expires_unix: Option<u64>,
    },
    Lifted {
        cidr: Cidr,
    },
}

/// What [`Shield::take_fleet_ban_changes`] hands over.
#[derive(Debug, Default)]
pub struct FleetBanChanges {
    pub changes: Vec<FleetBanChange>,
    /// Changes were left out: compare the whole list ([`Shield::bans`]) with the fleet's.
    pub overflowed: bool,
}

/// The outcome of [`Shield::merge_fleet_requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetMerge {
    /// Consumed from the address's allowance.
    Counted,
    /// Consumed, and the fleet as a whole went over the limit: the address is blocked here
    /// from now (a block of this agent's, which [`Shield::take_fleet_deltas`] hands over).
    Blocked,
    /// The address is blocked here already; nothing changes.
    AlreadyBlocked,
    /// Whitelisted on that domain: never limited.
    Whitelisted,
    /// Not tracked (its table bucket holds only blocked entries).
    Untracked,
}

/// The shield's notes for the fleet.
pub(crate) struct Journal {
    pub(crate) limits: bool,
    counts: Box<[Mutex<CountShard>]>,
    per_shard: usize,
    blocks: Mutex<Vec<FleetBlock>>,
    max_blocks: usize,
    dropped: AtomicU64,
}

/// Request counts by table key (already a keyed hash of scope and address).
type CountShard = HashMap<u64, FleetCount, BuildHasherDefault<KeyHasher>>;

/// The table's keys are hashes already: use them as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// Ban changes in order, bounded; kept by the ban list once a fleet is enabled.
pub(crate) struct BanLog {
    changes: VecDeque<(Cidr, Option<Ban>)>,
    capacity: usize,
    overflowed: bool,
}

impl BanLog {
    pub(crate) fn new(capacity: usize) -> BanLog {
        BanLog {
            changes: VecDeque::new(),
            capacity: capacity.max(1),
            overflowed: false,
        }
    }

    /// Notes a change made on this agent; past the capacity only that something was lost.
    pub(crate) fn push(&mut self, cidr: Cidr, ban: Option<Ban>) {
        if self.changes.len() >= self.capacity {
            self.overflowed = true;
            return;
        }
        self.changes.push_back((cidr, ban));
    }
}

impl Journal {
    pub(crate) fn new(options: &FleetOptions) -> Journal {
        Journal {
            limits: options.limits,
            counts: (0..COUNT_SHARDS)
                .map(|_| Mutex::new(CountShard::default()))
                .collect(),
            per_shard: options.max_counts.div_ceil(COUNT_SHARDS).max(1),
            blocks: Mutex::new(Vec::new()),
            max_blocks: options.max_blocks.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// One allowed request of `client` on `policy`'s domain (`key`: its table key).
    pub(crate) fn count(&self, key: u64, policy: &DomainPolicy, client: IpAddr) {
        let mut shard = self.counts[(key >> 58) as usize % COUNT_SHARDS].lock();
        if let Some(count) = shard.get_mut(&key) {
            count.requests = count.requests.saturating_add(1);
            return;
        }
        if shard.len() >= self.per_shard {
            drop(shard);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        shard.insert(
            key,
            FleetCount {
                domain: Arc::clone(&policy.domain),
                client,
                requests: 1,
            },
        );
    }

    pub(crate) fn block(&self, block: FleetBlock) {
        let mut blocks = self.blocks.lock();
        if blocks.len() >= self.max_blocks {
            drop(blocks);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        blocks.push(block);
    }
}

impl Shield {
    /// Starts noting what a fleet must learn (see the module docs). Call it once, before
    /// serving; false (and nothing changes) when the fleet was enabled already.
    pub fn enable_fleet(&self, options: FleetOptions) -> bool {
        let enabled = self.fleet.set(Journal::new(&options)).is_ok();
        if enabled {
            // The ban list notes its changes from now on.
            let _ = self
                .bans
                .fleet_log
                .set(Mutex::new(BanLog::new(options.max_ban_changes)));
        }
        enabled
    }

    /// Whether [`Shield::enable_fleet`] was called with `limits` on.
    pub fn fleet_limits(&self) -> bool {
        self.fleet.get().is_some_and(|journal| journal.limits)
    }

    /// Hands over (and forgets) the request counts and blocks noted since the last call.
    pub fn take_fleet_deltas(&self) -> FleetDeltas {
        let Some(journal) = self.fleet.get() else {
            return FleetDeltas::default();
        };
        let mut deltas = FleetDeltas::default();
        for shard in journal.counts.iter() {
            let taken = std::mem::take(&mut *shard.lock());
            deltas.counts.extend(taken.into_values());
        }
        deltas.blocks = std::mem::take(&mut *journal.blocks.lock());
        deltas.dropped = journal.dropped.swap(0, Relaxed);
        deltas
    }

    /// Hands over (and forgets) the bans made and lifted on this agent since the last call:
    /// by escalation, the operator or [`Shield::ban`] and [`Shield::unban`]; not those
    /// restored from the state file, nor those applied from the fleet.
    pub fn take_fleet_ban_changes(&self) -> FleetBanChanges {
        let Some(log) = self.bans.fleet_log.get() else {
            return FleetBanChanges::default();
        };
        let (changes, overflowed) = {
            let mut log = log.lock();
            (
                std::mem::take(&mut log.changes),
                std::mem::take(&mut log.overflowed),
            )
        };
        let now_s = self.clock.now_s();
        let unix = self.clock.unix_s();
        let changes = changes
            .into_iter()
            .map(|(cidr, ban)| match ban {
                Some(ban) => FleetBanChange::Banned {
                    cidr,
                    reason: ban.reason,
                    source: ban.source,
                    expires_unix: ban
                        .expires_s
                        .map(|expires| unix + u64::from(expires.saturating_sub(now_s))),
                },
                None => FleetBanChange::Lifted { cidr },
            })
            .collect();
        FleetBanChanges {
            changes,
            overflowed,
        }
    }

    /// The current policy of the protected domain `name`, to merge the fleet's requests
    /// and blocks with; `None` when the domain is not configured with Anti-DDoS on.
    pub fn fleet_policy(&self, name: &str) -> Option<Arc<DomainPolicy>> {
        self.domains
            .lock()
            .get(name)
            .and_then(|slot| slot.latest.clone())
    }

    /// Consumes `requests` that other agents allowed `client` on `policy`'s domain from
    /// its allowance here: GCRA's theoretical arrival time moves `requests` emission
    /// intervals ahead, as if they had come here. When that shows the fleet allowed more
    /// than the limit (the time runs past the burst tolerance by more than one interval),
    /// the address is blocked here at once, as a block of this agent's (counted, logged,
    /// escalated and handed to the fleet).
    pub fn merge_fleet_requests(
        &self,
        policy: &DomainPolicy,
        client: IpAddr,
        requests: u32,
    ) -> FleetMerge {
        let client = client.to_canonical();
        if policy.whitelist.contains(client) {
            return FleetMerge::Whitelisted;
        }
        let now_us = self.clock.now_us();
        let now_s = (now_us / 1_000_000) as u32;
        let key = self.table.key(policy.id, client);
        let merged = self.table.update(key, now_s, |entry| {
            if entry.blocked_until > now_s {
                return FleetMerge::AlreadyBlocked;
            }
            if entry.blocked_until != 0 {
                entry.blocked_until = 0;
                entry.tat = 0;
            }
            let tat = entry
                .tat
                .max(now_us)
                .saturating_add(u64::from(requests).saturating_mul(policy.emission_us));
            entry.tat = tat;
            if tat - now_us > policy.tolerance_us + policy.emission_us {
                entry.blocked_until = now_s.saturating_add(policy.block_s);
                return FleetMerge::Blocked;
            }
            FleetMerge::Counted
        });
        let merged = merged.unwrap_or(FleetMerge::Untracked);
        if merged == FleetMerge::Blocked {
            self.on_block(policy, client, now_s);
        }
        merged
    }

    /// Applies a block another agent decided: `client` is refused on `policy`'s domain until
    /// `until_unix` (a block here never gets shorter). It enters the address's escalation
    /// history, so the next block, wherever it is decided, counts as a repeat; it is not
    /// escalated here (the deciding agent did that). True when the address was not blocked
    /// here before.
    pub fn apply_fleet_block(
        &self,
        policy: &DomainPolicy,
        client: IpAddr,
        until_unix: u64,
    ) -> bool {
        let client = client.to_canonical();
        if policy.whitelist.contains(client) {
            return false;
        }
        let remaining = until_unix.saturating_sub(self.clock.unix_s());
        if remaining == 0 {
            return false;
        }
        let now_s = self.clock.now_s();
        let until = now_s.saturating_add(remaining.min(u64::from(u32::MAX)) as u32);
        let key = self.table.key(policy.id, client);
        let newly = self.table.update(key, now_s, |entry| {
            let newly = entry.blocked_until <= now_s;
            if entry.blocked_until < until {
                entry.blocked_until = until;
            }
            newly
        }) == Some(true);
        if newly {
            let history = self.table.key(crate::SCOPE_AGENT, client);
            self.table.update(history, now_s, |entry| {
                let previous_end = entry.aux as u32;
                entry.aux = (entry.aux & !u64::from(u32::MAX)) | u64::from(previous_end.max(until));
            });
        }
        newly
    }

    /// Applies a ban another agent made (listed with source `fleet`); it never shortens a
    /// longer ban in place. `expires_unix` is the Unix second it ends (`None`: until
    /// unbanned); one already past changes nothing. Returns whether anything changed.
    ///
    /// # Errors
    ///
    /// [`BanError::Full`] when the ban list is full.
    pub fn apply_fleet_ban(
        &self,
        cidr: Cidr,
        expires_unix: Option<u64>,
        reason: &str,
    ) -> Result<bool, BanError> {
        let duration = match expires_unix {
            Some(expires) => {
                let remaining = expires.saturating_sub(self.clock.unix_s());
                if remaining == 0 {
                    return Ok(false);
                }
                Some(Duration::from_secs(remaining))
            }
            None => None,
        };
        let now_s = self.clock.now_s();
        self.bans.insert(
            cidr,
            Ban {
                expires_s: bans::expiry(now_s, duration),
                reason: Arc::from(reason),
                source: BanSource::Fleet,
            },
            now_s,
        )
    }

    /// Lifts a ban because another agent lifted it; false when there was none.
    pub fn apply_fleet_unban(&self, cidr: &Cidr) -> bool {
        self.bans.remove_quietly(cidr)
    }
}

#[cfg(test)]
mod tests;
