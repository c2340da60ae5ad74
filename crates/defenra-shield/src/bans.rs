//! The agent-wide ban list: addresses and prefixes with an expiry, a reason and a source.
//!
//! Single addresses (almost every ban) live in a sharded concurrent map, so escalations
//! under a flood never queue behind one lock; prefixes (operator bans, rare) live in an
//! immutable [`CidrMap`] swapped whole on change. A lookup with no bans at all is one
//! atomic load. Expired bans stop counting at once and are swept by the background task.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use defenra_config::Cidr;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::cidrset::CidrMap;
use crate::clock::ceil_secs;

/// Where a ban came from, as `/banned-ips` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanSource {
    /// Rate-limit blocks repeated within the escalation window.
    Escalation,
    /// `defenra-agent ban`, or an embedding program.
    Operator,
    /// Loaded from the state directory at start (made before a restart).
    State,
    /// Made by another agent of the fleet.
    Fleet,
}

impl BanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BanSource::Escalation => "escalation",
            BanSource::Operator => "operator",
            BanSource::State => "state",
            BanSource::Fleet => "fleet",
        }
    }
}

/// One ban as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ban {
    /// Clock second at which it ends; `None` lasts until unbanned.
    pub(crate) expires_s: Option<u32>,
    pub(crate) reason: Arc<str>,
    pub(crate) source: BanSource,
}

impl Ban {
    fn active(&self, now_s: u32) -> bool {
        self.expires_s.is_none_or(|expires| expires > now_s)
    }
}

/// One active ban as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanEntry {
    pub cidr: Cidr,
    pub reason: Arc<str>,
    pub source: BanSource,
    /// Time left; `None` for a ban without expiry.
    pub remaining: Option<Duration>,
}

/// Why a ban was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BanError {
    #[error("the ban list is full ({0} entries)")]
    Full(usize),
    #[error("{0} is whitelisted by a domain and cannot be banned automatically")]
    Whitelisted(Cidr),
}

pub(crate) struct BanList {
    hosts: DashMap<IpAddr, Ban>,
    prefixes: ArcSwap<CidrMap<Ban>>,
    /// Serialises changes of `prefixes` (clone, change, swap).
    prefix_writer: Mutex<()>,
    /// Entries in both maps, expired ones included until swept.
    len: AtomicUsize,
    capacity: usize,
    /// Bumped on every change a mirror (state file, nftables, fleet) must see.
    generation: tokio::sync::watch::Sender<u64>,
    pub(crate) refused_full: AtomicU64,
    /// With a fleet: the changes made on this agent, for it to publish (`fleet.rs`).
    pub(crate) fleet_log: std::sync::OnceLock<Mutex<crate::fleet::BanLog>>,
}

impl BanList {
    pub(crate) fn new(capacity: usize) -> BanList {
        BanList {
            hosts: DashMap::new(),
            prefixes: ArcSwap::from_pointee(CidrMap::new()),
            prefix_writer: Mutex::new(()),
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            generation: tokio::sync::watch::channel(0).0,
            refused_full: AtomicU64::new(0),
            fleet_log: std::sync::OnceLock::new(),
        }
    }

    /// Whether `ip` is banned at `now_s`. One atomic load when there are no bans.
    pub(crate) fn is_banned(&self, ip: IpAddr, now_s: u32) -> bool {
        if self.len.load(Relaxed) == 0 {
            return false;
        }
        let ip = ip.to_canonical();
        if let Some(ban) = self.hosts.get(&ip)
            && ban.active(now_s)
        {
            return true;
        }
        let prefixes = self.prefixes.load();
        !prefixes.is_empty()
            && prefixes
                .lookup(ip)
                .is_some_and(|(_, ban)| ban.active(now_s))
    }

    /// Adds or replaces the ban of `cidr`. An automatic ban (escalation, fleet) never
    /// shortens a longer one already in place. Returns whether anything changed. A change
    /// made here (escalation, operator) is noted for the fleet; one restored from the
    /// state file or applied from the fleet is not.
    pub(crate) fn insert(&self, cidr: Cidr, ban: Ban, now_s: u32) -> Result<bool, BanError> {
        let noted =
            matches!(ban.source, BanSource::Escalation | BanSource::Operator).then(|| ban.clone());
        let automatic = matches!(ban.source, BanSource::Escalation | BanSource::Fleet);
        let keep_existing = |existing: &Ban| {
            automatic
                && existing.active(now_s)
                && match (existing.expires_s, ban.expires_s) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(old), Some(new)) => old >= new,
                }
        };
        let changed = if cidr.is_host() {
            let ip = cidr.addr();
            match self.hosts.entry(ip) {
                dashmap::Entry::Occupied(mut occupied) => {
                    if keep_existing(occupied.get()) {
                        false
                    } else {
                        occupied.insert(ban);
                        true
                    }
                }
                dashmap::Entry::Vacant(vacant) => {
                    self.reserve(automatic)?;
                    vacant.insert(ban);
                    true
                }
            }
        } else {
            let _writer = self.prefix_writer.lock();
            let current = self.prefixes.load_full();
            let existing = current.lookup(cidr.addr()).filter(|(at, _)| *at == cidr);
            if existing.is_some_and(|(_, existing)| keep_existing(existing)) {
                false
            } else {
                if existing.is_none() {
                    self.reserve(automatic)?;
                }
                let mut next = (*current).clone();
                next.insert(cidr, ban);
                self.prefixes.store(Arc::new(next));
                true
            }
        };
        if changed {
            if let (Some(log), Some(ban)) = (self.fleet_log.get(), noted) {
                log.lock().push(cidr, Some(ban));
            }
            self.bump();
        }
        Ok(changed)
    }

    /// Lifts the ban of exactly `cidr` (noted for the fleet); false when there was none.
    pub(crate) fn remove(&self, cidr: &Cidr) -> bool {
        self.remove_noting(cidr, true)
    }

    /// Lifts the ban of exactly `cidr` without noting it for the fleet (the fleet lifted it).
    pub(crate) fn remove_quietly(&self, cidr: &Cidr) -> bool {
        self.remove_noting(cidr, false)
    }

    fn remove_noting(&self, cidr: &Cidr, noted: bool) -> bool {
        let removed = if cidr.is_host() {
            self.hosts.remove(&cidr.addr()).is_some()
        } else {
            let _writer = self.prefix_writer.lock();
            let current = self.prefixes.load_full();
            let mut next = (*current).clone();
            let removed = next.remove(cidr).is_some();
            if removed {
                self.prefixes.store(Arc::new(next));
            }
            removed
        };
        if removed {
            self.len.fetch_sub(1, Relaxed);
            // Noted before the bump: a mirror woken by it finds the change.
            if noted && let Some(log) = self.fleet_log.get() {
                log.lock().push(*cidr, None);
            }
            self.bump();
        }
        removed
    }

    /// Active bans, most specific first within each family.
    pub(crate) fn entries(&self, now_s: u32) -> Vec<BanEntry> {
        let remaining = |ban: &Ban| {
            ban.expires_s
                .map(|expires| Duration::from_secs(u64::from(expires.saturating_sub(now_s))))
        };
        let mut entries: Vec<BanEntry> = self
            .hosts
            .iter()
            .filter(|item| item.value().active(now_s))
            .map(|item| BanEntry {
                cidr: Cidr::host(*item.key()),
                reason: Arc::clone(&item.value().reason),
                source: item.value().source,
                remaining: remaining(item.value()),
            })
            .collect();
        let prefixes = self.prefixes.load();
        entries.extend(
            prefixes
                .iter()
                .filter(|(_, ban)| ban.active(now_s))
                .map(|(cidr, ban)| BanEntry {
                    cidr,
                    reason: Arc::clone(&ban.reason),
                    source: ban.source,
                    remaining: remaining(ban),
                }),
        );
        entries.sort_by_key(|entry| entry.cidr);
        entries
    }

    /// Drops expired bans; returns how many.
    pub(crate) fn sweep(&self, now_s: u32) -> usize {
        let before = self.hosts.len();
        self.hosts.retain(|_, ban| ban.active(now_s));
        let mut removed = before.saturating_sub(self.hosts.len());
        let _writer = self.prefix_writer.lock();
        let current = self.prefixes.load_full();
        if current.iter().any(|(_, ban)| !ban.active(now_s)) {
            let mut next = (*current).clone();
            let before = next.len();
            next.retain(|ban| ban.active(now_s));
            removed += before - next.len();
            self.prefixes.store(Arc::new(next));
        }
        if removed > 0 {
            self.len.fetch_sub(removed, Relaxed);
        }
        removed
    }

    /// Active entries (expired ones not yet swept are counted until the sweep).
    pub(crate) fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Takes room for one more entry. Operator bans are always taken; automatic ones are
    /// refused when the list is full, so a flood of escalations cannot grow it.
    fn reserve(&self, automatic: bool) -> Result<(), BanError> {
        let len = self.len.fetch_add(1, Relaxed);
        if automatic && len >= self.capacity {
            self.len.fetch_sub(1, Relaxed);
            self.refused_full.fetch_add(1, Relaxed);
            return Err(BanError::Full(self.capacity));
        }
        Ok(())
    }

    fn bump(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// A ban's expiry for storage: `duration` from `now_s`, `None` without one.
pub(crate) fn expiry(now_s: u32, duration: Option<Duration>) -> Option<u32> {
    duration.map(|duration| now_s.saturating_add(ceil_secs(duration).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(expires_s: Option<u32>, source: BanSource) -> Ban {
        Ban {
            expires_s,
            reason: Arc::from("test"),
            source,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("prefix")
    }

    #[test]
    fn host_and_prefix_bans_expire_and_lift() {
        let list = BanList::new(100);
        assert!(!list.is_banned(ip("203.0.113.7"), 1));
        list.insert(cidr("203.0.113.7"), ban(Some(10), BanSource::Operator), 1)
            .expect("room");
        list.insert(cidr("198.51.100.0/24"), ban(None, BanSource::Operator), 1)
            .expect("room");
        assert!(list.is_banned(ip("203.0.113.7"), 9));
        assert!(!list.is_banned(ip("203.0.113.7"), 10), "expired at 10");
        assert!(list.is_banned(ip("198.51.100.200"), 1_000_000));
        assert!(list.is_banned(ip("::ffff:198.51.100.1"), 5));
        assert_eq!(list.entries(5).len(), 2);
        assert_eq!(list.entries(11).len(), 1);
        assert_eq!(list.sweep(11), 1);
        assert_eq!(list.len(), 1);
        assert!(list.remove(&cidr("198.51.100.0/24")));
        assert!(!list.is_banned(ip("198.51.100.200"), 12));
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn automatic_bans_never_shorten_and_respect_capacity() {
        let list = BanList::new(2);
        let a = cidr("10.0.0.1");
        list.insert(a, ban(Some(100), BanSource::Escalation), 1)
            .expect("room");
        assert_eq!(
            list.insert(a, ban(Some(50), BanSource::Escalation), 1),
            Ok(false)
        );
        assert_eq!(list.entries(1)[0].remaining, Some(Duration::from_secs(99)));
        list.insert(cidr("10.0.0.2"), ban(Some(100), BanSource::Escalation), 1)
            .expect("room");
        assert_eq!(
            list.insert(cidr("10.0.0.3"), ban(Some(100), BanSource::Escalation), 1),
            Err(BanError::Full(2))
        );
        // An operator's ban always gets in.
        assert_eq!(
            list.insert(cidr("10.0.0.4"), ban(None, BanSource::Operator), 1),
            Ok(true)
        );
        assert!(list.is_banned(ip("10.0.0.4"), 1));
    }

    #[test]
    fn every_change_bumps_the_generation() {
        let list = BanList::new(10);
        let receiver = list.subscribe();
        let start = *receiver.borrow();
        list.insert(cidr("10.0.0.1"), ban(None, BanSource::Operator), 1)
            .expect("room");
        list.remove(&cidr("10.0.0.1"));
        assert_eq!(*receiver.borrow(), start + 2);
    }
}
