//! The per-client state table: fixed capacity, set-associative, sharded.
//!
//! A key (a scope such as a domain, and an address) hashes with a per-process random key to
//! one bucket of [`WAYS`] slots. A new key takes an empty slot of its bucket, else the
//! slot seen longest ago that is not blocked; when every slot of the bucket is blocked the
//! key is not tracked (counted, and the request proceeds), so a flood of new addresses can
//! neither grow memory nor push out an active block. Memory is `capacity × 32` bytes, and a
//! shard's slots are allocated the first time a key lands in it.
//!
//! Buckets are grouped into shards, each behind its own short `parking_lot` mutex that is
//! never held across an await: workers contend only when two requests hit one shard at the
//! same instant.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

/// Slots per bucket: the eviction choice is among these.
pub(crate) const WAYS: usize = 8;
/// `u64` words per bucket (32 bytes per slot: key, GCRA time, times word, aux word), stored
/// field by field so the eight keys share one cache line.
const BUCKET_WORDS: usize = 4 * WAYS;
const KEYS: usize = 0;
const TATS: usize = WAYS;
const TIMES: usize = 2 * WAYS;
const AUX: usize = 3 * WAYS;

/// What the table keeps per key. `last_seen` is maintained by the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    /// GCRA's theoretical arrival time, in clock microseconds (0: none yet).
    pub(crate) tat: u64,
    /// Clock second until which the key is blocked (0: not blocked).
    pub(crate) blocked_until: u32,
    /// Clock second of the last access.
    pub(crate) last_seen: u32,
    /// Meaning depends on the scope (escalation history for agent-wide entries).
    pub(crate) aux: u64,
}

/// Counters the table keeps itself.
#[derive(Debug, Default)]
pub(crate) struct TableStats {
    /// Occupied slots.
    pub(crate) entries: AtomicU64,
    /// Idle entries replaced by new keys.
    pub(crate) evictions: AtomicU64,
    /// Keys not tracked because every slot of their bucket was blocked.
    pub(crate) untracked: AtomicU64,
}

/// A shard's buckets, allocated on first use.
type Shard = Mutex<Option<Box<[u64]>>>;

pub(crate) struct Table {
    shards: Box<[Shard]>,
    shard_bits: u32,
    buckets_per_shard: usize,
    hasher: std::hash::RandomState,
    pub(crate) stats: TableStats,
}

impl Table {
    /// A table for at least `capacity` keys (rounded up to a power of two, at least 64).
    pub(crate) fn new(capacity: usize) -> Table {
        let slots = capacity.clamp(64, 1 << 30).next_power_of_two();
        let buckets = slots / WAYS;
        // About 1,024 buckets (32 KiB) per shard, and at most 4,096 shards.
        let shards = (buckets / 1024).clamp(1, 4096).next_power_of_two();
        Table {
            shards: (0..shards).map(|_| Mutex::new(None)).collect(),
            shard_bits: shards.trailing_zeros(),
            buckets_per_shard: buckets / shards,
            hasher: std::hash::RandomState::new(),
            stats: TableStats::default(),
        }
    }

    /// Slots in the table.
    pub(crate) fn capacity(&self) -> usize {
        self.shards.len() * self.buckets_per_shard * WAYS
    }

    /// The key of `(scope, ip)`: a keyed 64-bit hash, never 0.
    pub(crate) fn key(&self, scope: u32, ip: IpAddr) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        scope.hash(&mut hasher);
        ip.to_canonical().hash(&mut hasher);
        hasher.finish() | 1
    }

    /// Runs `update` on the entry of `key`, inserting an empty one if needed, and stores
    /// the result with `last_seen = now_s`. `None` when the key could not be tracked.
    pub(crate) fn update<R>(
        &self,
        key: u64,
        now_s: u32,
        update: impl FnOnce(&mut Entry) -> R,
    ) -> Option<R> {
        let (shard, bucket) = self.locate(key);
        let mut guard = self.shards[shard].lock();
        let words = guard.get_or_insert_with(|| {
            vec![0u64; self.buckets_per_shard * BUCKET_WORDS].into_boxed_slice()
        });
        let bucket = &mut words[bucket * BUCKET_WORDS..(bucket + 1) * BUCKET_WORDS];
        let way = match find(bucket, key) {
            Some(way) => way,
            None => {
                let way = self.choose_victim(bucket, now_s)?;
                bucket[KEYS + way] = key;
                bucket[TATS + way] = 0;
                bucket[TIMES + way] = 0;
                bucket[AUX + way] = 0;
                way
            }
        };
        let mut entry = read(bucket, way);
        let result = update(&mut entry);
        entry.last_seen = now_s;
        write(bucket, way, &entry);
        Some(result)
    }

    /// The entry of `key`, if tracked; does not touch `last_seen`.
    pub(crate) fn get(&self, key: u64) -> Option<Entry> {
        let (shard, bucket) = self.locate(key);
        let guard = self.shards[shard].lock();
        let words = guard.as_ref()?;
        let bucket = &words[bucket * BUCKET_WORDS..(bucket + 1) * BUCKET_WORDS];
        find(bucket, key).map(|way| read(bucket, way))
    }

    fn locate(&self, key: u64) -> (usize, usize) {
        // The top bits pick the shard, the next ones the bucket; the whole key is compared.
        let shard = if self.shard_bits == 0 {
            0
        } else {
            (key >> (64 - self.shard_bits)) as usize
        };
        let bucket = (key >> 8) as usize & (self.buckets_per_shard - 1);
        (shard, bucket)
    }

    /// An empty way, else the unblocked way seen longest ago (an eviction), else `None`.
    fn choose_victim(&self, bucket: &[u64], now_s: u32) -> Option<usize> {
        if let Some(way) = (0..WAYS).find(|way| bucket[KEYS + way] == 0) {
            self.stats.entries.fetch_add(1, Relaxed);
            return Some(way);
        }
        let victim = (0..WAYS)
            .filter(|way| {
                let (blocked_until, _) = split_times(bucket[TIMES + way]);
                blocked_until <= now_s
            })
            .min_by_key(|way| split_times(bucket[TIMES + way]).1);
        match victim {
            Some(way) => {
                self.stats.evictions.fetch_add(1, Relaxed);
                Some(way)
            }
            None => {
                self.stats.untracked.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

fn find(bucket: &[u64], key: u64) -> Option<usize> {
    bucket[KEYS..KEYS + WAYS].iter().position(|&k| k == key)
}

fn read(bucket: &[u64], way: usize) -> Entry {
    let (blocked_until, last_seen) = split_times(bucket[TIMES + way]);
    Entry {
        tat: bucket[TATS + way],
        blocked_until,
        last_seen,
        aux: bucket[AUX + way],
    }
}

fn write(bucket: &mut [u64], way: usize, entry: &Entry) {
    bucket[TATS + way] = entry.tat;
    bucket[TIMES + way] = (u64::from(entry.blocked_until) << 32) | u64::from(entry.last_seen);
    bucket[AUX + way] = entry.aux;
}

fn split_times(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(n.into())
    }

    #[test]
    fn entries_persist_and_scopes_are_apart() {
        let table = Table::new(1024);
        let a = table.key(1, ip(7));
        let b = table.key(2, ip(7));
        assert_ne!(a, b);
        table.update(a, 10, |entry| entry.tat = 42);
        assert_eq!(table.get(a).map(|e| (e.tat, e.last_seen)), Some((42, 10)));
        assert_eq!(table.get(b), None);
        assert_eq!(table.stats.entries.load(Relaxed), 1);
    }

    #[test]
    fn a_flood_of_new_keys_is_bounded_and_keeps_blocked_entries() {
        let table = Table::new(4096);
        let capacity = table.capacity();
        // 500 blocked keys first, then a flood of a hundred times the capacity.
        let blocked: Vec<u64> = (0..500).map(|n| table.key(1, ip(n))).collect();
        for &key in &blocked {
            table.update(key, 1, |entry| entry.blocked_until = 1_000);
        }
        for n in 0..(capacity as u32 * 100) {
            table.update(table.key(1, ip(1_000_000 + n)), 2 + n / 1000, |entry| {
                entry.tat = 1;
            });
        }
        assert_eq!(table.stats.entries.load(Relaxed) as usize, capacity);
        assert!(table.stats.evictions.load(Relaxed) > 0);
        for key in blocked {
            assert_eq!(
                table.get(key).map(|entry| entry.blocked_until),
                Some(1_000),
                "a blocked entry was evicted"
            );
        }
    }

    #[test]
    fn the_idlest_unblocked_entry_is_evicted_and_full_blocked_buckets_refuse() {
        let table = Table::new(64);
        // Find WAYS + 1 keys of one bucket.
        let target = table.locate(table.key(1, ip(0)));
        let same: Vec<u64> = (0..100_000)
            .map(|n| table.key(1, ip(n)))
            .filter(|&key| table.locate(key) == target)
            .take(WAYS + 2)
            .collect();
        for (age, &key) in same[..WAYS].iter().enumerate() {
            table.update(key, 10 + age as u32, |_| ());
        }
        // The oldest (first) goes for the ninth key.
        assert!(table.update(same[WAYS], 100, |_| ()).is_some());
        assert_eq!(table.get(same[0]), None);
        assert!(table.get(same[1]).is_some());
        // Block them all: the next key is not tracked.
        for &key in &same[1..=WAYS] {
            table.update(key, 100, |entry| entry.blocked_until = 500);
        }
        assert!(table.update(same[WAYS + 1], 101, |_| ()).is_none());
        assert_eq!(table.stats.untracked.load(Relaxed), 1);
        // Once the blocks expire the key gets a slot.
        assert!(table.update(same[WAYS + 1], 501, |_| ()).is_some());
    }
}
