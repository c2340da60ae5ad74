//! `ngx.shared.<name>`: size-capped LRU dictionaries with TTLs, shared by every worker thread,
//! one namespace and one byte quota per domain.
//!
//! The dictionaries live in Rust, not in any Lua state, so all threads see the same counters
//! and they survive config reloads. Each dictionary is one `parking_lot::Mutex` around an LRU
//! list; every operation is a hash lookup plus a few index updates, so the lock is held for
//! well under a microsecond and never across Lua code.
//!
//! Domains are tenants that must not reach each other: a script sees only its own domain's
//! dictionaries (`ngx.shared.limits` of two domains are two dictionaries), one domain's
//! dictionaries together hold at most its quota of bytes and at most `max_dicts` of them
//! exist per domain, and [`SharedDicts::retain`] frees the dictionaries of domains whose
//! script went away or no longer names them.
//!
//! `ngx.shared.fleet` is reserved: once the host enables the fleet, that dictionary of each
//! domain also notes its changes for the fleet's store and takes the store's values back
//! (`dict/fleet.rs`).

mod fleet;

pub use fleet::{FLEET_DICT, FleetDictChange, FleetDictChanges, FleetDictOp};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use mlua::{UserData, UserDataMethods, Value};
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;

/// Bytes charged per entry on top of its key and value: the slot (72 bytes, in a vector
/// that may be twice as large as needed), the hash map's entry, and the allocator's
/// headers and rounding of the three allocations (the key twice, the value).
const ENTRY_OVERHEAD: usize = 224;
/// Longest key accepted, as in OpenResty.
const MAX_KEY_LEN: usize = 65_535;

/// Every dictionary of one engine, by domain, created on first use.
pub(crate) struct SharedDicts {
    domains: RwLock<HashMap<Box<str>, DomainDicts>>,
    /// Most dictionaries per domain.
    max_dicts: usize,
    /// Byte quota of one domain's dictionaries together.
    quota_bytes: usize,
    clock: Clock,
    /// Bumped whenever dictionaries are freed, so Lua states drop their handles to them.
    epoch: AtomicU64,
    /// With a fleet: how many changed keys each `ngx.shared.fleet` holds for it at most.
    fleet_pending: std::sync::OnceLock<usize>,
}

/// One domain's dictionaries and the quota they share.
struct DomainDicts {
    quota: Arc<Quota>,
    dicts: HashMap<Box<str>, Arc<Dict>>,
}

impl SharedDicts {
    pub(crate) fn new(max_dicts: usize, quota_bytes: usize, clock: Clock) -> Self {
        SharedDicts {
            domains: RwLock::new(HashMap::new()),
            max_dicts,
            quota_bytes,
            clock,
            epoch: AtomicU64::new(0),
            fleet_pending: std::sync::OnceLock::new(),
        }
    }

    /// From now on each domain's `ngx.shared.fleet` notes its changes for the fleet, at most
    /// `max_pending` keys between two drains. False when it was enabled already.
    pub(crate) fn enable_fleet(&self, max_pending: usize) -> bool {
        self.fleet_pending.set(max_pending).is_ok()
    }

    /// Hands over (and forgets) the changes of every domain's `ngx.shared.fleet`.
    pub(crate) fn take_fleet(&self) -> FleetDictChanges {
        let mut taken = FleetDictChanges::default();
        if self.fleet_pending.get().is_none() {
            return taken;
        }
        let fleet: Vec<(String, Arc<Dict>)> = self
            .domains
            .read()
            .iter()
            .filter_map(|(domain, entry)| {
                Some((domain.to_string(), Arc::clone(entry.dicts.get(FLEET_DICT)?)))
            })
            .collect();
        for (domain, dict) in fleet {
            if let Some((ops, dropped)) = dict.take_fleet() {
                taken.dropped += dropped;
                taken
                    .changes
                    .extend(ops.into_iter().map(|(key, op)| FleetDictChange {
                        domain: domain.clone(),
                        key,
                        op,
                    }));
            }
        }
        taken
    }

    /// Stores the fleet's value of `key` in `domain`'s `ngx.shared.fleet`, if a script of
    /// the domain has used it here (see `Dict::apply_fleet`).
    pub(crate) fn apply_fleet(
        &self,
        domain: &str,
        key: &[u8],
        value: Option<DictValue>,
        ttl_ms: u64,
    ) -> bool {
        let dict = self
            .domains
            .read()
            .get(domain)
            .and_then(|entry| entry.dicts.get(FLEET_DICT).cloned());
        dict.is_some_and(|dict| dict.apply_fleet(key, value, ttl_ms))
    }

    /// `domain`'s dictionary called `name`, created empty on first use. `None` once the
    /// domain has `max_dicts` dictionaries, so a script cannot grow memory by inventing
    /// names (and other domains are not affected).
    pub(crate) fn get_or_create(&self, domain: &str, name: &str) -> Option<Arc<Dict>> {
        if let Some(dict) = self
            .domains
            .read()
            .get(domain)
            .and_then(|domain| domain.dicts.get(name))
        {
            return Some(Arc::clone(dict));
        }
        let mut domains = self.domains.write();
        let entry = domains.entry(domain.into()).or_insert_with(|| DomainDicts {
            quota: Arc::new(Quota::new(self.quota_bytes)),
            dicts: HashMap::new(),
        });
        if let Some(dict) = entry.dicts.get(name) {
            return Some(Arc::clone(dict));
        }
        if entry.dicts.len() >= self.max_dicts {
            return None;
        }
        let dict = Dict::new(Arc::clone(&entry.quota), self.clock.clone());
        if name == FLEET_DICT
            && let Some(&max_pending) = self.fleet_pending.get()
        {
            dict.lru.lock().pending = Some(fleet::Pending::new(max_pending));
        }
        entry.dicts.insert(name.into(), Arc::clone(&dict));
        Some(dict)
    }

    /// Frees every dictionary for which `keep(domain, name)` is false; true when any was.
    /// Their memory goes once no Lua state holds them either: states drop their handles
    /// when they see the new [`SharedDicts::epoch`].
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) -> bool {
        let mut domains = self.domains.write();
        let mut freed = false;
        domains.retain(|domain, entry| {
            entry.dicts.retain(|name, _| {
                let kept = keep(domain, name);
                freed |= !kept;
                kept
            });
            !entry.dicts.is_empty()
        });
        if freed {
            self.epoch.fetch_add(1, Ordering::Release);
        }
        freed
    }

    /// Changes whenever [`SharedDicts::retain`] frees dictionaries.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// `(domain, name, entries, bytes, evictions)` of every dictionary, for /stats.
    pub(crate) fn summary(&self) -> Vec<(String, String, usize, usize, u64)> {
        let domains = self.domains.read();
        let mut out: Vec<_> = domains
            .iter()
            .flat_map(|(domain, entry)| {
                entry.dicts.iter().map(move |(name, dict)| {
                    let (entries, bytes) = dict.usage();
                    (
                        domain.to_string(),
                        name.to_string(),
                        entries,
                        bytes,
                        dict.evictions(),
                    )
                })
            })
            .collect();
        out.sort();
        out
    }
}

/// The byte account one domain's dictionaries share, and the list of those dictionaries
/// (for evicting from the largest when the quota is full).
pub(crate) struct Quota {
    limit: usize,
    used: AtomicUsize,
    members: RwLock<Vec<Weak<Dict>>>,
}

impl Quota {
    pub(crate) fn new(limit: usize) -> Self {
        Quota {
            limit,
            used: AtomicUsize::new(0),
            members: RwLock::new(Vec::new()),
        }
    }

    /// Records a new dictionary of the domain (and forgets those that are gone).
    fn join(&self, dict: &Arc<Dict>) {
        let mut members = self.members.write();
        members.retain(|member| member.strong_count() > 0);
        members.push(Arc::downgrade(dict));
    }

    /// The domain's dictionary holding the most bytes, if any holds some.
    fn largest(&self) -> Option<Arc<Dict>> {
        self.members
            .read()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|dict| dict.bytes.load(Ordering::Relaxed) > 0)
            .max_by_key(|dict| dict.bytes.load(Ordering::Relaxed))
    }

    /// Takes `bytes` from the quota if they fit.
    fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes not yet taken.
    fn free(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Acquire))
    }
}

/// A value stored in a dictionary.
#[derive(Debug, Clone, PartialEq)]
pub enum DictValue {
    Number(f64),
    Bool(bool),
    Str(Box<[u8]>),
}

/// Why a dictionary operation did nothing. The messages are OpenResty's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DictError {
    NotFound,
    Exists,
    NotANumber,
    NoMemory,
    EmptyKey,
    KeyTooLong,
}

impl DictError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            DictError::NotFound => "not found",
            DictError::Exists => "exists",
            DictError::NotANumber => "not a number",
            DictError::NoMemory => "no memory",
            DictError::EmptyKey => "empty key",
            DictError::KeyTooLong => "key too long",
        }
    }
}

/// How `set`-like operations behave when the key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// `set`: always write.
    Always,
    /// `add`: only when absent (or expired).
    IfAbsent,
    /// `replace`: only when present.
    IfPresent,
}

/// One dictionary: an LRU list whose bytes count against its domain's [`Quota`].
pub(crate) struct Dict {
    lru: Mutex<Lru>,
    quota: Arc<Quota>,
    /// The LRU's bytes, readable without its lock, to find the domain's largest dictionary.
    bytes: Arc<AtomicUsize>,
    clock: Clock,
    evictions: AtomicU64,
}

impl Dict {
    /// A new, empty dictionary of the domain whose quota is `quota`.
    pub(crate) fn new(quota: Arc<Quota>, clock: Clock) -> Arc<Self> {
        let bytes = Arc::new(AtomicUsize::new(0));
        let dict = Arc::new(Dict {
            lru: Mutex::new(Lru::new(Arc::clone(&quota), Arc::clone(&bytes))),
            quota: Arc::clone(&quota),
            bytes,
            clock,
            evictions: AtomicU64::new(0),
        });
        quota.join(&dict);
        dict
    }

    /// The domain's quota: what all its dictionaries may hold together.
    pub(crate) fn capacity(&self) -> usize {
        self.quota.limit
    }

    /// What is left of the domain's quota.
    pub(crate) fn free_space(&self) -> usize {
        self.quota.free()
    }

    /// The live value of `key`; marks it most recently used.
    pub(crate) fn get(&self, key: &[u8]) -> Option<DictValue> {
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let Some(slot) = lru.live_slot(key, now) else {
            if lru.pending.is_some() && check_key(key).is_ok() {
                self.note_fleet(&mut lru, key, FleetDictOp::Fetch, now);
            }
            return None;
        };
        lru.touch(slot);
        Some(lru.slots[slot].value.clone())
    }

    /// `set`: stores `value` (or deletes on `None`) with `ttl_ms` (0 = never expires).
    /// Returns whether live entries were evicted to make room ("forcible").
    pub(crate) fn set(
        &self,
        key: &[u8],
        value: Option<DictValue>,
        ttl_ms: u64,
    ) -> Result<bool, DictError> {
        match value {
            Some(value) => self.write(key, value, ttl_ms, Write::Always),
            None => {
                check_key(key)?;
                self.delete(key);
                Ok(false)
            }
        }
    }

    /// `add`: like `set` but fails with `Exists` when the key is live.
    pub(crate) fn add(&self, key: &[u8], value: DictValue, ttl_ms: u64) -> Result<bool, DictError> {
        self.write(key, value, ttl_ms, Write::IfAbsent)
    }

    /// `replace`: like `set` but fails with `NotFound` when the key is absent.
    pub(crate) fn replace(
        &self,
        key: &[u8],
        value: DictValue,
        ttl_ms: u64,
    ) -> Result<bool, DictError> {
        self.write(key, value, ttl_ms, Write::IfPresent)
    }

    /// `incr`: adds `delta` to a number and keeps its TTL. An absent key fails with
    /// `NotFound` unless `init` is given; then it is created as `init + delta` with
    /// `init_ttl_ms`. Returns the new value and "forcible".
    pub(crate) fn incr(
        &self,
        key: &[u8],
        delta: f64,
        init: Option<f64>,
        init_ttl_ms: u64,
    ) -> Result<(f64, bool), DictError> {
        check_key(key)?;
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        if let Some(slot) = lru.live_slot(key, now) {
            let DictValue::Number(current) = lru.slots[slot].value else {
                return Err(DictError::NotANumber);
            };
            let next = current + delta;
            lru.slots[slot].value = DictValue::Number(next);
            lru.touch(slot);
            self.note_incr(&mut lru, key, delta, init, init_ttl_ms, now);
            return Ok((next, false));
        }
        let Some(init) = init else {
            return Err(DictError::NotFound);
        };
        let next = init + delta;
        let forcible = self.insert_locked(
            &mut lru,
            key,
            DictValue::Number(next),
            expiry(now, init_ttl_ms),
            now,
        )?;
        self.note_incr(&mut lru, key, delta, Some(init), init_ttl_ms, now);
        Ok((next, forcible))
    }

    pub(crate) fn delete(&self, key: &[u8]) {
        let mut lru = self.lru.lock();
        if let Some(&slot) = lru.map.get(key) {
            lru.remove(slot);
        }
        if lru.pending.is_some() && check_key(key).is_ok() {
            let now = self.clock.monotonic_ms();
            let op = FleetDictOp::Set {
                value: None,
                ttl_ms: 0,
            };
            self.note_fleet(&mut lru, key, op, now);
        }
    }

    /// `flush_all`: every entry is dropped.
    pub(crate) fn flush_all(&self) {
        self.lru.lock().clear();
    }

    /// `flush_expired`: drops up to `max` expired entries (0 = all), returns how many.
    pub(crate) fn flush_expired(&self, max: usize) -> usize {
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let expired: Vec<usize> = lru
            .map
            .values()
            .copied()
            .filter(|&slot| lru.slots[slot].is_expired(now))
            .take(if max == 0 { usize::MAX } else { max })
            .collect();
        for &slot in &expired {
            lru.remove(slot);
        }
        expired.len()
    }

    /// `ttl`: remaining lifetime in milliseconds, `Some(0)` for no expiry.
    pub(crate) fn ttl_ms(&self, key: &[u8]) -> Result<u64, DictError> {
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let slot = lru.live_slot(key, now).ok_or(DictError::NotFound)?;
        Ok(match lru.slots[slot].expires_ms {
            0 => 0,
            at => at.saturating_sub(now).max(1),
        })
    }

    /// `expire`: sets a new TTL on a live key (0 = never expires).
    pub(crate) fn expire(&self, key: &[u8], ttl_ms: u64) -> Result<(), DictError> {
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let slot = lru.live_slot(key, now).ok_or(DictError::NotFound)?;
        lru.slots[slot].expires_ms = expiry(now, ttl_ms);
        if lru.pending.is_some() {
            let value = Some(lru.slots[slot].value.clone());
            self.note_fleet(&mut lru, key, FleetDictOp::Set { value, ttl_ms }, now);
        }
        Ok(())
    }

    /// `get_keys`: up to `max` live keys (0 = all), most recently used first.
    pub(crate) fn keys(&self, max: usize) -> Vec<Box<[u8]>> {
        let now = self.clock.monotonic_ms();
        let lru = self.lru.lock();
        let mut out = Vec::new();
        let mut slot = lru.head;
        while slot != NIL && (max == 0 || out.len() < max) {
            let entry = &lru.slots[slot];
            if !entry.is_expired(now) {
                out.push(entry.key.clone());
            }
            slot = entry.next;
        }
        out
    }

    /// `(entries, bytes)` currently held, expired ones included until they are dropped.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let lru = self.lru.lock();
        (lru.map.len(), lru.bytes)
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn write(
        &self,
        key: &[u8],
        value: DictValue,
        ttl_ms: u64,
        mode: Write,
    ) -> Result<bool, DictError> {
        check_key(key)?;
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let live = lru.live_slot(key, now);
        match (mode, live) {
            (Write::IfAbsent, Some(_)) => return Err(DictError::Exists),
            (Write::IfPresent, None) => return Err(DictError::NotFound),
            _ => {}
        }
        if let Some(slot) = live {
            lru.remove(slot);
        }
        let noted = lru.pending.is_some().then(|| match mode {
            Write::IfAbsent => FleetDictOp::Add {
                value: value.clone(),
                ttl_ms,
            },
            Write::Always | Write::IfPresent => FleetDictOp::Set {
                value: Some(value.clone()),
                ttl_ms,
            },
        });
        let forcible = self.insert_locked(&mut lru, key, value, expiry(now, ttl_ms), now)?;
        if let Some(op) = noted {
            self.note_fleet(&mut lru, key, op, now);
        }
        Ok(forcible)
    }

    fn note_incr(
        &self,
        lru: &mut Lru,
        key: &[u8],
        delta: f64,
        init: Option<f64>,
        init_ttl_ms: u64,
        now: u64,
    ) {
        if lru.pending.is_some() {
            let op = FleetDictOp::Incr {
                delta,
                init,
                init_ttl_ms,
            };
            self.note_fleet(lru, key, op, now);
        }
    }

    /// Inserts a key known to be absent. While it does not fit in the domain's quota, the
    /// least recently used entry of the domain's largest dictionary goes (this one's when
    /// it is the largest, or when the largest is busy: other dictionaries are only ever
    /// `try_lock`ed, so two writers cannot deadlock). A dictionary that filled the quota
    /// therefore gives way to the domain's others instead of starving them.
    fn insert_locked(
        &self,
        lru: &mut Lru,
        key: &[u8],
        value: DictValue,
        expires_ms: u64,
        now: u64,
    ) -> Result<bool, DictError> {
        let weight = entry_weight(key, &value);
        if weight > self.quota.limit {
            return Err(DictError::NoMemory);
        }
        let mut forcible = false;
        while !self.quota.try_reserve(weight) {
            let largest = self.quota.largest();
            let other = largest
                .as_ref()
                .filter(|largest| !std::ptr::eq(Arc::as_ptr(largest), self));
            let evicted = match other.and_then(|other| Some((other, other.lru.try_lock()?))) {
                Some((other, mut other_lru)) => other_lru.evict_oldest(now, &other.evictions),
                None => lru.evict_oldest(now, &self.evictions),
            };
            match evicted {
                Some(live) => forcible |= live,
                // This one is empty and the others are busy or empty too.
                None => return Err(DictError::NoMemory),
            }
        }
        lru.insert(key.into(), value, expires_ms, weight);
        Ok(forcible)
    }
}

fn check_key(key: &[u8]) -> Result<(), DictError> {
    if key.is_empty() {
        Err(DictError::EmptyKey)
    } else if key.len() > MAX_KEY_LEN {
        Err(DictError::KeyTooLong)
    } else {
        Ok(())
    }
}

fn expiry(now: u64, ttl_ms: u64) -> u64 {
    if ttl_ms == 0 {
        0
    } else {
        now.saturating_add(ttl_ms)
    }
}

fn entry_weight(key: &[u8], value: &DictValue) -> usize {
    // The key is stored twice: as the map key and in the slot, for eviction.
    let string = match value {
        DictValue::Str(bytes) => allocation(bytes.len()),
        DictValue::Number(_) | DictValue::Bool(_) => 0,
    };
    2 * allocation(key.len()) + string + ENTRY_OVERHEAD
}

/// What glibc's malloc takes for `len` bytes: an 8-byte header, rounded up to 16, at least
/// 32 (nothing for an empty slice, which does not allocate).
fn allocation(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len + 8).next_multiple_of(16).max(32)
    }
}

const NIL: usize = usize::MAX;

/// A doubly linked list over a slab, most recently used at `head`. Its entries' bytes are
/// taken from the quota before [`Lru::insert`] and given back by every removal, and by
/// dropping it (a freed dictionary).
struct Lru {
    map: HashMap<Box<[u8]>, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    bytes: usize,
    quota: Arc<Quota>,
    /// `bytes`, mirrored for [`Quota::largest`].
    shown: Arc<AtomicUsize>,
    /// For `ngx.shared.fleet` with a fleet: the changes waiting to reach it.
    pending: Option<fleet::Pending>,
}

impl Drop for Lru {
    fn drop(&mut self) {
        self.quota.release(self.bytes);
    }
}

struct Slot {
    key: Box<[u8]>,
    value: DictValue,
    /// Monotonic milliseconds after which the entry is dead; 0 = never.
    expires_ms: u64,
    weight: usize,
    prev: usize,
    next: usize,
}

impl Slot {
    fn is_expired(&self, now: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now
    }
}

impl Lru {
    fn new(quota: Arc<Quota>, shown: Arc<AtomicUsize>) -> Self {
        shown.store(0, Ordering::Relaxed);
        Lru {
            map: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            bytes: 0,
            quota,
            shown,
            pending: None,
        }
    }

    /// Drops every entry and gives their bytes back (the memory too). Changes waiting for
    /// the fleet stay: `flush_all` empties the local cache only.
    fn clear(&mut self) {
        let (quota, shown) = (Arc::clone(&self.quota), Arc::clone(&self.shown));
        let pending = self.pending.take();
        *self = Lru::new(quota, shown);
        self.pending = pending;
    }

    /// Removes the least recently used entry; `Some(true)` when it was still live (an
    /// eviction, counted in `evictions`), `None` when empty.
    fn evict_oldest(&mut self, now: u64, evictions: &AtomicU64) -> Option<bool> {
        let victim = self.tail;
        if victim == NIL {
            return None;
        }
        let live = !self.slots[victim].is_expired(now);
        if live {
            evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.remove(victim);
        Some(live)
    }

    /// The slot of `key` if present and not expired; an expired entry is dropped.
    fn live_slot(&mut self, key: &[u8], now: u64) -> Option<usize> {
        let slot = *self.map.get(key)?;
        if self.slots[slot].is_expired(now) {
            self.remove(slot);
            return None;
        }
        Some(slot)
    }

    fn insert(&mut self, key: Box<[u8]>, value: DictValue, expires_ms: u64, weight: usize) {
        let entry = Slot {
            key: key.clone(),
            value,
            expires_ms,
            weight,
            prev: NIL,
            next: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = entry;
                slot
            }
            None => {
                self.slots.push(entry);
                self.slots.len() - 1
            }
        };
        self.map.insert(key, slot);
        self.bytes += weight;
        self.shown.store(self.bytes, Ordering::Relaxed);
        self.push_front(slot);
    }

    fn remove(&mut self, slot: usize) {
        self.unlink(slot);
        let entry = &mut self.slots[slot];
        let key = std::mem::take(&mut entry.key);
        entry.value = DictValue::Bool(false);
        self.bytes -= entry.weight;
        self.shown.store(self.bytes, Ordering::Relaxed);
        self.quota.release(entry.weight);
        self.map.remove(&key);
        self.free.push(slot);
    }

    fn touch(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    fn push_front(&mut self, slot: usize) {
        self.slots[slot].prev = NIL;
        self.slots[slot].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next].prev = prev;
        }
        self.slots[slot].prev = NIL;
        self.slots[slot].next = NIL;
    }
}

/// The Lua face of a dictionary: `ngx.shared.cache:get(key)` and friends, with OpenResty's
/// return conventions (`nil, "not found"`, `ok, err, forcible`).
pub(crate) struct DictHandle(pub(crate) Arc<Dict>);

impl UserData for DictHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get", |lua, this, key: Value| {
            let key = match key_bytes(&key) {
                Ok(key) => key,
                Err(message) => return (Value::Nil, message).into_lua_multi_ok(lua),
            };
            match this.0.get(&key) {
                Some(value) => (to_lua(lua, &value)?,).into_lua_multi_ok(lua),
                None => (Value::Nil,).into_lua_multi_ok(lua),
            }
        });
        // Stale values are not kept, so `get_stale` is `get`.
        methods.add_method("get_stale", |lua, this, key: Value| {
            let key = match key_bytes(&key) {
                Ok(key) => key,
                Err(message) => return (Value::Nil, message).into_lua_multi_ok(lua),
            };
            match this.0.get(&key) {
                Some(value) => (to_lua(lua, &value)?, Value::Nil, false).into_lua_multi_ok(lua),
                None => (Value::Nil,).into_lua_multi_ok(lua),
            }
        });
        for (name, mode) in [
            ("set", Write::Always),
            ("safe_set", Write::Always),
            ("add", Write::IfAbsent),
            ("safe_add", Write::IfAbsent),
            ("replace", Write::IfPresent),
        ] {
            methods.add_method(
                name,
                move |lua, this, (key, value, exptime): (Value, Value, Option<f64>)| {
                    let key = match key_bytes(&key) {
                        Ok(key) => key,
                        Err(message) => return (false, message, false).into_lua_multi_ok(lua),
                    };
                    let value = match from_lua(&value) {
                        Ok(value) => value,
                        Err(message) => return (false, message, false).into_lua_multi_ok(lua),
                    };
                    let ttl_ms = seconds_to_ms(exptime).map_err(|bad| bad.error("exptime"))?;
                    let result = match (mode, value) {
                        (Write::Always, value) => this.0.set(&key, value, ttl_ms),
                        (_, None) => {
                            // `add`/`replace` with nil: OpenResty treats it as a delete.
                            this.0.delete(&key);
                            Ok(false)
                        }
                        (Write::IfAbsent, Some(value)) => this.0.add(&key, value, ttl_ms),
                        (Write::IfPresent, Some(value)) => this.0.replace(&key, value, ttl_ms),
                    };
                    match result {
                        Ok(forcible) => (true, Value::Nil, forcible).into_lua_multi_ok(lua),
                        Err(error) => (false, error.message(), false).into_lua_multi_ok(lua),
                    }
                },
            );
        }
        methods.add_method(
            "incr",
            |lua, this, (key, delta, init, init_ttl): (Value, f64, Option<f64>, Option<f64>)| {
                let key = match key_bytes(&key) {
                    Ok(key) => key,
                    Err(message) => return (Value::Nil, message).into_lua_multi_ok(lua),
                };
                let init_ttl = seconds_to_ms(init_ttl).map_err(|bad| bad.error("init_ttl"))?;
                match this.0.incr(&key, delta, init, init_ttl) {
                    Ok((value, forcible)) => (value, Value::Nil, forcible).into_lua_multi_ok(lua),
                    Err(error) => (Value::Nil, error.message()).into_lua_multi_ok(lua),
                }
            },
        );
        methods.add_method("delete", |_, this, key: Value| {
            if let Ok(key) = key_bytes(&key) {
                this.0.delete(&key);
            }
            Ok(())
        });
        methods.add_method("flush_all", |_, this, ()| {
            this.0.flush_all();
            Ok(())
        });
        methods.add_method("flush_expired", |_, this, max: Option<usize>| {
            Ok(this.0.flush_expired(max.unwrap_or(0)))
        });
        methods.add_method("ttl", |lua, this, key: Value| {
            let key = match key_bytes(&key) {
                Ok(key) => key,
                Err(message) => return (Value::Nil, message).into_lua_multi_ok(lua),
            };
            match this.0.ttl_ms(&key) {
                Ok(ms) => (ms as f64 / 1000.0,).into_lua_multi_ok(lua),
                Err(error) => (Value::Nil, error.message()).into_lua_multi_ok(lua),
            }
        });
        methods.add_method("expire", |lua, this, (key, exptime): (Value, f64)| {
            let key = match key_bytes(&key) {
                Ok(key) => key,
                Err(message) => return (Value::Nil, message).into_lua_multi_ok(lua),
            };
            let ttl_ms = seconds_to_ms(Some(exptime)).map_err(|bad| bad.error("exptime"))?;
            match this.0.expire(&key, ttl_ms) {
                Ok(()) => (true,).into_lua_multi_ok(lua),
                Err(error) => (Value::Nil, error.message()).into_lua_multi_ok(lua),
            }
        });
        methods.add_method("get_keys", |lua, this, max: Option<usize>| {
            let keys = this.0.keys(max.unwrap_or(1024));
            let table = lua.create_table_with_capacity(keys.len(), 0)?;
            for (index, key) in keys.iter().enumerate() {
                table.raw_set(index + 1, lua.create_string(key)?)?;
            }
            Ok(table)
        });
        methods.add_method("capacity", |_, this, ()| Ok(this.0.capacity()));
        methods.add_method("free_space", |_, this, ()| Ok(this.0.free_space()));
    }
}

/// Plain host functions for the most used methods (`get`, `set`, `add`, `incr`), called
/// with the dictionary's index in `handles` by the Lua wrappers `sandbox.lua` builds.
///
/// They do what the [`DictHandle`] methods of the same names do, without mlua's userdata
/// dispatch (type check and borrow of the handle) and with a fixed number of results (no
/// `MultiValue` allocation): together about half the cost of a `:incr` call. The wrappers
/// trim the results to OpenResty's.
pub(crate) fn install_fast(
    lua: &mlua::Lua,
    host: &mlua::Table,
    handles: &std::rc::Rc<std::cell::RefCell<Vec<Arc<Dict>>>>,
) -> mlua::Result<()> {
    let dict = |handles: &std::cell::RefCell<Vec<Arc<Dict>>>, index: usize| {
        handles
            .borrow()
            .get(index)
            .cloned()
            .ok_or_else(|| mlua::Error::runtime("bad dictionary"))
    };

    let list = std::rc::Rc::clone(handles);
    host.raw_set(
        "dict_get",
        lua.create_function(move |lua, (index, key): (usize, Value)| {
            let dict = dict(&list, index)?;
            let key = match key_bytes(&key) {
                Ok(key) => key,
                Err(message) => return Ok((Value::Nil, Some(message))),
            };
            match dict.get(&key) {
                Some(value) => Ok((to_lua(lua, &value)?, None)),
                None => Ok((Value::Nil, None)),
            }
        })?,
    )?;

    for (name, mode) in [("dict_set", Write::Always), ("dict_add", Write::IfAbsent)] {
        let list = std::rc::Rc::clone(handles);
        host.raw_set(
            name,
            lua.create_function(
                move |_, (index, key, value, exptime): (usize, Value, Value, Option<f64>)| {
                    let dict = dict(&list, index)?;
                    let key = match key_bytes(&key) {
                        Ok(key) => key,
                        Err(message) => return Ok((false, Some(message), false)),
                    };
                    let value = match from_lua(&value) {
                        Ok(value) => value,
                        Err(message) => return Ok((false, Some(message), false)),
                    };
                    let ttl_ms = seconds_to_ms(exptime).map_err(|bad| bad.error("exptime"))?;
                    let result = match (mode, value) {
                        (Write::Always, value) => dict.set(&key, value, ttl_ms),
                        (_, None) => {
                            dict.delete(&key);
                            Ok(false)
                        }
                        (_, Some(value)) => dict.add(&key, value, ttl_ms),
                    };
                    match result {
                        Ok(forcible) => Ok((true, None, forcible)),
                        Err(error) => Ok((false, Some(error.message()), false)),
                    }
                },
            )?,
        )?;
    }

    // `incr` is the call rate limits make on every request: a raw C function, without
    // mlua's callback machinery (about half of the call's 2,900 instructions).
    let list: *const std::cell::RefCell<Vec<Arc<Dict>>> = std::rc::Rc::as_ptr(handles);
    // SAFETY: the closure gets a light userdata pointing into `handles`, whose other
    // clones are owned by the state's own callbacks (`dict`, `dict_get`, ...), so it lives
    // as long as the state and therefore as long as anything can call `raw_incr`.
    #[allow(unsafe_code)]
    let incr: mlua::Function = unsafe {
        lua.exec_raw((), |state| {
            mlua::ffi::lua_pushlightuserdata(state, list as *mut std::ffi::c_void);
            mlua::ffi::lua_pushcclosure(state, raw_incr, 1);
        })?
    };
    host.raw_set("dict_incr", incr)?;
    Ok(())
}

/// `dict_incr(index, key, delta, init, init_ttl)` → `value, err, forcible` (as the other
/// fast functions: `nil, message, false` on failure).
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_incr(state: *mut mlua::ffi::lua_State) -> std::ffi::c_int {
    use mlua::ffi;
    // Everything with a destructor lives inside this block: a Lua error raised after it
    // (bad argument, or out of memory pushing a result) unwinds through this frame.
    let outcome = {
        // SAFETY: the upvalue is the pointer `install_fast` stored, valid while the state
        // lives (see there); arguments are read with the plain stack API.
        let list = unsafe {
            &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(1))
                as *const std::cell::RefCell<Vec<Arc<Dict>>>)
        };
        // Numbers, and strings that read as numbers (Lua's and OpenResty's coercion).
        let number = |index| unsafe {
            (ffi::lua_isnumber(state, index) != 0).then(|| ffi::lua_tonumber(state, index))
        };
        let index = number(1).map(|index| index as usize);
        let delta = number(3);
        let init = number(4);
        let init_ttl = number(5);
        let formatted;
        let key: Result<&[u8], &'static str> = match unsafe { ffi::lua_type(state, 2) } {
            ffi::LUA_TSTRING => {
                let mut len = 0;
                // SAFETY: a string argument stays on the stack, so its bytes stay valid
                // for the rest of this block.
                let bytes = unsafe { ffi::lua_tolstring(state, 2, &mut len) };
                Ok(unsafe { std::slice::from_raw_parts(bytes.cast::<u8>(), len) })
            }
            ffi::LUA_TNUMBER => {
                formatted = crate::api::number_to_string(number(2).unwrap_or_default());
                Ok(formatted.as_bytes())
            }
            ffi::LUA_TNIL | ffi::LUA_TNONE => Err("nil key"),
            _ => Err("bad key type"),
        };
        // An empty key is `incr`'s own error ("empty key").
        let dict = index.and_then(|index| list.try_borrow().ok()?.get(index).cloned());
        match (dict, delta, key, seconds_to_ms(init_ttl)) {
            (None, ..) => Err(c"bad dictionary"),
            (_, None, ..) => Err(c"bad argument #2 to 'incr' (number expected)"),
            (.., Err(BadTtl)) => Err(c"bad \"init_ttl\" argument"),
            (Some(_), Some(_), Err(message), _) => Ok(Err(message)),
            (Some(dict), Some(delta), Ok(key), Ok(init_ttl)) => {
                let incremented = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    dict.incr(key, delta, init, init_ttl)
                }));
                match incremented {
                    Ok(Ok(result)) => Ok(Ok(result)),
                    Ok(Err(error)) => Ok(Err(error.message())),
                    Err(_) => Err(c"dictionary failure"),
                }
            }
        }
    };
    // SAFETY: plain stack API on the calling state; nothing above is still alive.
    unsafe {
        match outcome {
            Ok(Ok((value, forcible))) => {
                ffi::lua_pushnumber(state, value);
                ffi::lua_pushnil(state);
                ffi::lua_pushboolean(state, std::ffi::c_int::from(forcible));
            }
            Ok(Err(message)) => {
                ffi::lua_pushnil(state);
                ffi::lua_pushlstring(state, message.as_ptr().cast(), message.len());
                ffi::lua_pushboolean(state, 0);
            }
            Err(message) => {
                ffi::lua_pushstring(state, message.as_ptr());
                ffi::lua_error(state);
            }
        }
    }
    3
}

/// Shorthand for building a callback's multiple return values.
trait IntoLuaMultiOk {
    fn into_lua_multi_ok(self, lua: &mlua::Lua) -> mlua::Result<mlua::MultiValue>;
}

impl<T: mlua::IntoLuaMulti> IntoLuaMultiOk for T {
    fn into_lua_multi_ok(self, lua: &mlua::Lua) -> mlua::Result<mlua::MultiValue> {
        self.into_lua_multi(lua)
    }
}

/// A key's bytes: borrowed from the Lua string (no copy on the hot path), or a number
/// formatted as Lua would.
enum Key {
    Lua(mlua::BorrowedBytes),
    Formatted(Vec<u8>),
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Key::Lua(bytes) => bytes,
            Key::Formatted(bytes) => bytes,
        }
    }
}

/// Keys are strings; numbers are converted as Lua would. Errors are OpenResty's messages.
fn key_bytes(key: &Value) -> Result<Key, &'static str> {
    let bytes = match key {
        Value::String(text) => Key::Lua(text.as_bytes()),
        Value::Integer(number) => Key::Formatted(number.to_string().into_bytes()),
        Value::Number(number) => Key::Formatted(crate::api::number_to_string(*number).into_bytes()),
        Value::Nil => return Err("nil key"),
        _ => return Err("bad key type"),
    };
    if bytes.is_empty() {
        return Err("empty key");
    }
    Ok(bytes)
}

fn from_lua(value: &Value) -> Result<Option<DictValue>, &'static str> {
    Ok(Some(match value {
        Value::Nil => return Ok(None),
        Value::Boolean(flag) => DictValue::Bool(*flag),
        Value::Integer(number) => DictValue::Number(*number as f64),
        Value::Number(number) => DictValue::Number(*number),
        Value::String(text) => DictValue::Str(text.as_bytes().to_vec().into_boxed_slice()),
        _ => return Err("bad value type"),
    }))
}

fn to_lua(lua: &mlua::Lua, value: &DictValue) -> mlua::Result<Value> {
    Ok(match value {
        DictValue::Number(number) => Value::Number(*number),
        DictValue::Bool(flag) => Value::Boolean(*flag),
        DictValue::Str(bytes) => Value::String(lua.create_string(bytes)?),
    })
}

/// OpenResty TTLs are seconds with millisecond resolution; none or 0 means no expiry.
/// A negative, NaN or infinite TTL is refused, as OpenResty's `bad "exptime" argument`
/// (the caller raises it); a huge finite one saturates and never runs out.
fn seconds_to_ms(seconds: Option<f64>) -> Result<u64, BadTtl> {
    match seconds {
        None => Ok(0),
        Some(seconds) if !seconds.is_finite() || seconds < 0.0 => Err(BadTtl),
        Some(0.0) => Ok(0),
        // `as` saturates at u64::MAX.
        Some(seconds) => Ok(((seconds * 1000.0).ceil() as u64).max(1)),
    }
}

/// A TTL argument OpenResty would refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadTtl;

impl BadTtl {
    /// The Lua error for the argument `name` (`exptime`, `init_ttl`).
    fn error(self, name: &str) -> mlua::Error {
        mlua::Error::runtime(format!("bad \"{name}\" argument"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn dict(capacity_bytes: usize) -> (Arc<Dict>, Clock) {
        let clock = Clock::manual(0);
        let quota = Arc::new(Quota::new(capacity_bytes));
        (Dict::new(quota, clock.clone()), clock)
    }

    fn num(value: f64) -> DictValue {
        DictValue::Number(value)
    }

    #[test]
    fn set_get_delete_round_trip() {
        let (dict, _) = dict(1 << 20);
        assert_eq!(dict.set(b"a", Some(num(1.0)), 0), Ok(false));
        dict.set(b"s", Some(DictValue::Str(b"x".to_vec().into())), 0)
            .unwrap();
        dict.set(b"b", Some(DictValue::Bool(true)), 0).unwrap();
        assert_eq!(dict.get(b"a"), Some(num(1.0)));
        assert_eq!(dict.get(b"s"), Some(DictValue::Str(b"x".to_vec().into())));
        assert_eq!(dict.get(b"b"), Some(DictValue::Bool(true)));
        dict.delete(b"a");
        assert_eq!(dict.get(b"a"), None);
        dict.set(b"s", None, 0).unwrap();
        assert_eq!(dict.get(b"s"), None);
        assert_eq!(dict.set(b"", Some(num(1.0)), 0), Err(DictError::EmptyKey));
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let (dict, clock) = dict(1 << 20);
        dict.set(b"k", Some(num(1.0)), 2000).unwrap();
        dict.set(b"forever", Some(num(2.0)), 0).unwrap();
        clock.advance(Duration::from_millis(1500));
        assert_eq!(dict.get(b"k"), Some(num(1.0)));
        assert_eq!(dict.ttl_ms(b"k"), Ok(500));
        assert_eq!(dict.ttl_ms(b"forever"), Ok(0));
        clock.advance(Duration::from_millis(500));
        assert_eq!(dict.get(b"k"), None);
        assert_eq!(dict.ttl_ms(b"k"), Err(DictError::NotFound));
        assert_eq!(dict.get(b"forever"), Some(num(2.0)));
    }

    #[test]
    fn add_and_replace_respect_presence_and_expiry() {
        let (dict, clock) = dict(1 << 20);
        assert_eq!(dict.replace(b"k", num(1.0), 0), Err(DictError::NotFound));
        assert_eq!(dict.add(b"k", num(1.0), 1000), Ok(false));
        assert_eq!(dict.add(b"k", num(2.0), 0), Err(DictError::Exists));
        assert_eq!(dict.replace(b"k", num(3.0), 0), Ok(false));
        assert_eq!(dict.get(b"k"), Some(num(3.0)));
        dict.expire(b"k", 1000).unwrap();
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            dict.add(b"k", num(4.0), 0),
            Ok(false),
            "expired key counts as absent"
        );
    }

    #[test]
    fn incr_initialises_keeps_ttl_and_rejects_strings() {
        let (dict, clock) = dict(1 << 20);
        assert_eq!(dict.incr(b"n", 1.0, None, 0), Err(DictError::NotFound));
        assert_eq!(dict.incr(b"n", 1.0, Some(0.0), 10_000), Ok((1.0, false)));
        assert_eq!(dict.incr(b"n", 5.0, Some(100.0), 0), Ok((6.0, false)));
        clock.advance(Duration::from_secs(9));
        assert_eq!(dict.incr(b"n", 1.0, Some(0.0), 10_000), Ok((7.0, false)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            dict.incr(b"n", 1.0, Some(0.0), 0),
            Ok((1.0, false)),
            "the original TTL still applied, so the counter restarted"
        );
        dict.set(b"s", Some(DictValue::Str(b"x".to_vec().into())), 0)
            .unwrap();
        assert_eq!(dict.incr(b"s", 1.0, None, 0), Err(DictError::NotANumber));
    }

    #[test]
    fn least_recently_used_entries_are_evicted_at_the_cap() {
        let weight = entry_weight(b"k0", &num(0.0));
        let (dict, _) = dict(weight * 3);
        for key in [b"k0", b"k1", b"k2"] {
            assert_eq!(dict.set(key, Some(num(0.0)), 0), Ok(false));
        }
        // k0 is used again, so k1 is now the least recently used.
        assert!(dict.get(b"k0").is_some());
        assert_eq!(dict.set(b"k3", Some(num(0.0)), 0), Ok(true), "forcible");
        assert_eq!(dict.get(b"k1"), None);
        assert!(dict.get(b"k0").is_some());
        assert!(dict.get(b"k2").is_some());
        assert!(dict.get(b"k3").is_some());
        assert_eq!(dict.usage(), (3, weight * 3));
        assert_eq!(dict.evictions(), 1);
        let huge = DictValue::Str(vec![0; weight * 4].into());
        assert_eq!(dict.set(b"big", Some(huge), 0), Err(DictError::NoMemory));
    }

    #[test]
    fn flush_and_keys() {
        let (dict, clock) = dict(1 << 20);
        dict.set(b"a", Some(num(1.0)), 1000).unwrap();
        dict.set(b"b", Some(num(1.0)), 0).unwrap();
        assert_eq!(
            dict.keys(0),
            vec![Box::from(&b"b"[..]), Box::from(&b"a"[..])]
        );
        clock.advance(Duration::from_secs(2));
        assert_eq!(dict.keys(0), vec![Box::from(&b"b"[..])]);
        assert_eq!(dict.flush_expired(0), 1);
        assert_eq!(dict.usage().0, 1);
        dict.flush_all();
        assert_eq!(dict.usage(), (0, 0));
        assert_eq!(dict.get(b"b"), None);
    }

    #[test]
    fn dictionaries_are_per_domain_and_capped_in_number_per_domain() {
        let dicts = SharedDicts::new(2, 1 << 20, Clock::manual(0));
        let first = dicts.get_or_create("a.test", "cache").unwrap();
        first.set(b"k", Some(num(1.0)), 0).unwrap();
        let again = dicts.get_or_create("a.test", "cache").unwrap();
        assert_eq!(again.get(b"k"), Some(num(1.0)));
        let other_domain = dicts.get_or_create("b.test", "cache").unwrap();
        assert_eq!(other_domain.get(b"k"), None);
        assert!(dicts.get_or_create("a.test", "other").is_some());
        assert!(dicts.get_or_create("a.test", "third").is_none());
        assert!(dicts.get_or_create("b.test", "third").is_some());
    }

    #[test]
    fn a_domains_dictionaries_share_one_quota_and_give_it_back() {
        let weight = entry_weight(b"k0", &num(0.0));
        let dicts = SharedDicts::new(4, weight * 4, Clock::manual(0));
        let one = dicts.get_or_create("a.test", "one").unwrap();
        let two = dicts.get_or_create("a.test", "two").unwrap();
        for key in [b"k0", b"k1", b"k2"] {
            one.set(key, Some(num(0.0)), 0).unwrap();
        }
        assert_eq!(two.set(b"k0", Some(num(0.0)), 0), Ok(false));
        assert_eq!(two.free_space(), 0);
        // Full: the write evicts from the domain's largest dictionary, `one`.
        assert_eq!(two.set(b"k1", Some(num(0.0)), 0), Ok(true));
        assert_eq!((one.usage().0, two.usage().0), (2, 2));
        assert_eq!(one.get(b"k0"), None, "one's least recently used entry went");
        assert_eq!(one.evictions(), 1);
        // Now the writer is among the largest: its own oldest entry goes.
        assert_eq!(two.set(b"k2", Some(num(0.0)), 0), Ok(true));
        assert_eq!(two.get(b"k0"), None);
        let empty = dicts.get_or_create("a.test", "three").unwrap();
        assert_eq!(empty.set(b"k", Some(num(0.0)), 0), Ok(true));
        assert_eq!(
            one.usage().0 + two.usage().0 + empty.usage().0,
            4,
            "the quota holds"
        );
        // Deletes, flushes and freed dictionaries give the bytes back.
        empty.delete(b"k");
        assert_eq!(one.free_space(), weight);
        two.flush_all();
        assert_eq!(one.free_space(), weight * 2);
        drop(two);
        assert!(dicts.retain(|_, name| name != "one"));
        drop(one);
        assert_eq!(empty.free_space(), weight * 4);
        assert!(!dicts.retain(|_, _| true), "nothing more to free");
        // Another domain has a quota of its own.
        let other = dicts.get_or_create("b.test", "one").unwrap();
        assert_eq!(other.free_space(), weight * 4);
    }

    #[test]
    fn entry_weights_cover_what_the_allocator_takes() {
        // A small counter: two 32-byte key allocations plus the fixed part.
        assert_eq!(
            entry_weight(b"rl:192.0.2.1", &num(1.0)),
            2 * 32 + ENTRY_OVERHEAD
        );
        assert_eq!(
            entry_weight(b"k", &DictValue::Str(vec![0; 100].into())),
            2 * 32 + 112 + ENTRY_OVERHEAD
        );
    }
}
