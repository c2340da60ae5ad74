//! Response rate limiting (RRL) for UDP answers, in the family of knot's `mod-rrl` and
//! BIND's and NSD's RRL: a token bucket per (client prefix, response class), kept in a
//! fixed-size table of 8-byte entries updated with atomics (no lock, no allocation).
//!
//! A class is what the answer path already knows: the closest existing name and the query
//! type for a positive answer, the zone for NXDOMAIN and NODATA (so a random-subdomain
//! flood of one zone is one class), and one class per prefix for every error. Over the
//! rate a response is dropped, except every `slip`-th, which is sent truncated (TC=1,
//! no records) so that a real resolver inside a spoofed victim's prefix retries over TCP.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use defenra_config::Cidr;

use crate::stats::DnsStats;

/// Settings of response rate limiting; `RrlOptions::default()` is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrlOptions {
    /// Responses per second allowed per (prefix, class); 0 turns RRL off. Clamped to
    /// 1,000,000 (the table keeps time in microseconds).
    pub rate: u32,
    /// The bucket holds `rate × window` responses (at least one), so a class that was
    /// quiet may burst that many at once. Clamped to 1 ms - 60 s.
    pub window: Duration,
    /// Every `slip`-th limited response is sent truncated instead of dropped: 0 never,
    /// 1 always. Clamped to 100.
    pub slip: u32,
    /// Clients are grouped by this IPv4 prefix length (clamped to 32).
    pub ipv4_prefix: u8,
    /// Clients are grouped by this IPv6 prefix length (clamped to 128).
    pub ipv6_prefix: u8,
    /// Clients inside these networks are never limited.
    pub whitelist: Vec<Cidr>,
    /// Classes tracked at once; when full, the least recently active class of a table
    /// row gives way. Rounded up to a power of two times 8, at most 2^26 (8 bytes each:
    /// 8 MiB for the default, 512 MiB at most).
    pub table_size: usize,
}

impl Default for RrlOptions {
    fn default() -> Self {
        RrlOptions {
            rate: 0,
            window: Duration::from_secs(1),
            slip: 2,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            whitelist: Vec::new(),
            table_size: 1_000_000,
        }
    }
}

/// Monotonic time for the rate limiter. The agent uses [`MonotonicClock`]; tests move a
/// clock of their own by hand so that bucket refills are exact.
pub trait Clock: Send + Sync {
    /// Time since a fixed starting point; never goes backwards.
    fn now(&self) -> Duration;
}

/// [`Clock`] over [`Instant`], starting when created.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// What a response is charged to, from what the answer path already knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An answer with records: the closest existing name (a node id of the index, the
    /// wildcard for synthesised answers) and the query type.
    Positive { node: u32, qtype: u16 },
    /// NXDOMAIN or NODATA: the zone (an index zone id).
    Negative { zone: u32 },
    /// REFUSED, FORMERR, NOTIMP, BADVERS: one class per prefix.
    Error,
}

impl Class {
    /// The class as one word: kind in the top bits, then type and id.
    fn word(self) -> u64 {
        match self {
            Class::Positive { node, qtype } => {
                (1 << 62) | (u64::from(qtype) << 32) | u64::from(node)
            }
            Class::Negative { zone } => (2 << 62) | u64::from(zone),
            Class::Error => 3 << 62,
        }
    }
}

/// What to do with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Send,
    Drop,
    /// Send it truncated: TC=1, the question, no records.
    Slip,
}

/// A decision, and whether it is the first limited response of its class since the class
/// was last under the rate (the moment worth a log line).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision {
    pub(crate) limit: Limit,
    pub(crate) started: bool,
}

const SEND: Decision = Decision {
    limit: Limit::Send,
    started: false,
};

/// Ways per table row: 8 entries of 8 bytes, one cache line.
const WAYS: usize = 8;
/// Entry layout: tag (24 bits) | slip counter (7) | occupied (1) | TAT in µs (32).
const TAG_SHIFT: u32 = 40;
const COUNTER_SHIFT: u32 = 33;
const COUNTER_MASK: u64 = 0x7f;
const OCCUPIED: u64 = 1 << 32;
/// Attempts at a contended row before the response is let through.
const ATTEMPTS: usize = 4;
/// The largest table: 2^26 classes, 512 MiB.
const MAX_CLASSES: usize = 1 << 26;
/// Log lines about limiting per second, whatever the flood.
const LOG_LINES_PER_SECOND: u64 = 10;

#[repr(align(64))]
#[derive(Default)]
struct Row([AtomicU64; WAYS]);

/// The limiter: built once from [`RrlOptions`] with `rate > 0`.
///
/// Each class's bucket is a GCRA cell (the "virtual scheduling" form of a token bucket):
/// one theoretical arrival time (TAT). A response at `now` is sent when
/// `TAT - now <= tolerance`, and then TAT becomes `max(TAT, now) + interval`, where
/// `interval = 1 s / rate` and `tolerance = (bucket - 1) × interval`. TAT is stored as
/// the low 32 bits of microseconds (a 71-minute lap); a TAT further ahead than a bucket
/// can ever reach is a stale entry from an earlier lap and counts as a full bucket. A
/// class quiet for exactly a multiple of the lap (within one window) may find part of its
/// bucket missing once, which is the price of 8-byte entries.
pub(crate) struct Rrl {
    rows: Box<[Row]>,
    row_mask: usize,
    /// Per-process secret so that nobody can aim classes at one table row.
    seeds: [u64; 3],
    interval_us: u32,
    tolerance_us: u32,
    slip: u64,
    ipv4_mask: u32,
    ipv6_mask: u128,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    whitelist: Box<[Cidr]>,
    log_second: AtomicU64,
    log_lines: AtomicU64,
    log_suppressed: AtomicU64,
}

impl Rrl {
    /// `None` when `options.rate` is 0.
    pub(crate) fn new(options: &RrlOptions) -> Option<Rrl> {
        if options.rate == 0 {
            return None;
        }
        let rate = options.rate.min(1_000_000);
        let window = options
            .window
            .clamp(Duration::from_millis(1), Duration::from_secs(60));
        let interval_us = (1_000_000 / rate).max(1);
        let bucket = ((f64::from(rate) * window.as_secs_f64()).round() as u64).max(1);
        // At most 60 s: well inside the 2^31 µs half-lap of the stored TAT.
        let tolerance_us = ((bucket - 1) * u64::from(interval_us)).min(60_000_000) as u32;
        let n_rows = options
            .table_size
            .min(MAX_CLASSES)
            .div_ceil(WAYS)
            .max(1)
            .next_power_of_two();
        let rows: Box<[Row]> = (0..n_rows).map(|_| Row::default()).collect();
        let ipv4_prefix = options.ipv4_prefix.min(32);
        let ipv6_prefix = options.ipv6_prefix.min(128);
        Some(Rrl {
            rows,
            row_mask: n_rows - 1,
            seeds: random_seeds(),
            interval_us,
            tolerance_us,
            slip: u64::from(options.slip.min(100)),
            ipv4_mask: mask32(ipv4_prefix),
            ipv6_mask: mask128(ipv6_prefix),
            ipv4_prefix,
            ipv6_prefix,
            whitelist: options.whitelist.clone().into_boxed_slice(),
            log_second: AtomicU64::new(u64::MAX),
            log_lines: AtomicU64::new(0),
            log_suppressed: AtomicU64::new(0),
        })
    }

    /// Classes the table holds at most.
    pub(crate) fn capacity(&self) -> usize {
        self.rows.len() * WAYS
    }

    /// Charges one response of `class` to `source`'s prefix at `now_us` (the limiter's
    /// clock). `generation` tells zone indexes apart, so node and zone ids of an older
    /// index never share a bucket with the current one's.
    pub(crate) fn check(
        &self,
        source: IpAddr,
        class: Class,
        generation: u64,
        now_us: u64,
        stats: &DnsStats,
    ) -> Decision {
        if !self.whitelist.is_empty() && self.whitelist.iter().any(|cidr| cidr.contains(source)) {
            return SEND;
        }
        let (high, low) = self.prefix_key(source);
        let hash = mix(
            mix(high ^ self.seeds[0], low ^ self.seeds[1]) ^ class.word(),
            self.seeds[2] ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let row = &self.rows[hash as usize & self.row_mask];
        let tag = (hash >> TAG_SHIFT) << TAG_SHIFT;
        let now = now_us as u32;
        'attempt: for _ in 0..ATTEMPTS {
            // The way to replace if the class is absent: an empty one, else the one whose
            // TAT is furthest behind (least recently active, and its bucket the fullest).
            let mut victim = 0;
            let mut victim_word = 0;
            let mut victim_age = i64::MIN;
            for (way, cell) in row.0.iter().enumerate() {
                let word = cell.load(Relaxed);
                if word & OCCUPIED != 0 && word & !((1 << TAG_SHIFT) - 1) == tag {
                    match self.update(cell, word, tag, now) {
                        Some(decision) => {
                            match decision.limit {
                                Limit::Send => {}
                                Limit::Drop => stats.count_rrl_dropped(),
                                Limit::Slip => stats.count_rrl_slipped(),
                            }
                            return decision;
                        }
                        // Replaced under us by another class: look again.
                        None => continue 'attempt,
                    }
                }
                let age = if word == 0 {
                    i64::MAX
                } else {
                    i64::from(now.wrapping_sub(word as u32) as i32)
                };
                if age > victim_age {
                    (victim, victim_word, victim_age) = (way, word, age);
                }
            }
            // A new class: its first response takes one token.
            let fresh = tag | OCCUPIED | u64::from(now.wrapping_add(self.interval_us));
            if row.0[victim]
                .compare_exchange(victim_word, fresh, Relaxed, Relaxed)
                .is_ok()
            {
                if victim_word == 0 {
                    stats.rrl_class_added();
                } else {
                    stats.count_rrl_eviction();
                }
                return SEND;
            }
        }
        // The row changed under us every time: let the response through.
        SEND
    }

    /// Updates an entry of this class; `None` when another class took the entry first.
    fn update(&self, cell: &AtomicU64, mut word: u64, tag: u64, now: u32) -> Option<Decision> {
        loop {
            let ahead = (word as u32).wrapping_sub(now);
            let ahead = if ahead as i32 <= 0 || ahead > self.tolerance_us + self.interval_us {
                // Behind now (a full bucket), or a stale entry from an earlier lap.
                0
            } else {
                ahead
            };
            let counter = (word >> COUNTER_SHIFT) & COUNTER_MASK;
            let (next, decision) = if ahead <= self.tolerance_us {
                let tat = now.wrapping_add(ahead).wrapping_add(self.interval_us);
                (tag | OCCUPIED | u64::from(tat), SEND)
            } else {
                // Over the rate. The counter runs 1..=slip through consecutive limited
                // responses; 0 means the class was last under the rate.
                let cycle = self.slip.max(1);
                let counter_next = if counter >= cycle { 1 } else { counter + 1 };
                let limit = if self.slip > 0 && counter_next == self.slip {
                    Limit::Slip
                } else {
                    Limit::Drop
                };
                (
                    (word & !(COUNTER_MASK << COUNTER_SHIFT)) | (counter_next << COUNTER_SHIFT),
                    Decision {
                        limit,
                        started: counter == 0,
                    },
                )
            };
            match cell.compare_exchange_weak(word, next, Relaxed, Relaxed) {
                Ok(_) => return Some(decision),
                Err(actual) => {
                    if actual & OCCUPIED == 0 || actual & !((1 << TAG_SHIFT) - 1) != tag {
                        return None;
                    }
                    word = actual;
                }
            }
        }
    }

    /// The client's prefix as two words (family-tagged).
    fn prefix_key(&self, source: IpAddr) -> (u64, u64) {
        match source {
            IpAddr::V4(v4) => (u64::MAX, u64::from(u32::from(v4) & self.ipv4_mask)),
            IpAddr::V6(v6) => {
                let masked = u128::from(v6) & self.ipv6_mask;
                ((masked >> 64) as u64, masked as u64)
            }
        }
    }

    /// `source`'s prefix, for log lines.
    pub(crate) fn prefix_of(&self, source: IpAddr) -> Cidr {
        match source {
            IpAddr::V4(_) => Cidr::new(source, self.ipv4_prefix),
            IpAddr::V6(_) => Cidr::new(source, self.ipv6_prefix),
        }
    }

    /// Whether a log line may be written now: at most [`LOG_LINES_PER_SECOND`], whatever
    /// the flood. `Some(n)`: yes, and `n` lines were suppressed since the last one.
    pub(crate) fn log_allowed(&self, now_us: u64) -> Option<u64> {
        let second = now_us / 1_000_000;
        let current = self.log_second.load(Relaxed);
        if current != second
            && self
                .log_second
                .compare_exchange(current, second, Relaxed, Relaxed)
                .is_ok()
        {
            self.log_lines.store(0, Relaxed);
        }
        if self.log_lines.fetch_add(1, Relaxed) < LOG_LINES_PER_SECOND {
            Some(self.log_suppressed.swap(0, Relaxed))
        } else {
            self.log_suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Folded multiply: the 128-bit product's halves xored (as in foldhash and wyhash).
fn mix(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

fn random_seeds() -> [u64; 3] {
    let state = std::collections::hash_map::RandomState::new();
    let mut seeds = [0u64; 3];
    for (index, seed) in seeds.iter_mut().enumerate() {
        let mut hasher = state.build_hasher();
        hasher.write_usize(index);
        // Odd, so that a multiplication by it never loses bits.
        *seed = hasher.finish() | 1;
    }
    seeds
}

fn mask32(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        prefix => u32::MAX << (32 - u32::from(prefix.min(32))),
    }
}

fn mask128(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        prefix => u128::MAX << (128 - u32::from(prefix.min(128))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, slip: u32, table_size: usize) -> Rrl {
        Rrl::new(&RrlOptions {
            rate,
            slip,
            table_size,
            ..RrlOptions::default()
        })
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const CLASS: Class = Class::Positive { node: 3, qtype: 16 };

    /// The limits of `n` responses at `now_us`.
    fn run(rrl: &Rrl, stats: &DnsStats, source: &str, n: usize, now_us: u64) -> Vec<Limit> {
        (0..n)
            .map(|_| rrl.check(ip(source), CLASS, 0, now_us, stats).limit)
            .collect()
    }

    #[test]
    fn off_means_no_limiter() {
        assert!(Rrl::new(&RrlOptions::default()).is_none());
    }

    #[test]
    fn a_bucket_holds_rate_times_window_and_refills_at_the_rate() {
        let stats = DnsStats::default();
        let rrl = limiter(10, 0, 1000);
        let limits = run(&rrl, &stats, "192.0.2.1", 12, 5_000_000);
        assert_eq!(limits.iter().filter(|l| **l == Limit::Send).count(), 10);
        assert_eq!(limits[10..], [Limit::Drop, Limit::Drop]);
        // 100 ms later one token is back, and only one.
        let later = run(&rrl, &stats, "192.0.2.1", 2, 5_100_000);
        assert_eq!(later, [Limit::Send, Limit::Drop]);
        // A whole second refills the bucket.
        let refilled = run(&rrl, &stats, "192.0.2.1", 11, 6_200_000);
        assert_eq!(refilled.iter().filter(|l| **l == Limit::Send).count(), 10);
    }

    #[test]
    fn slip_sends_every_nth_limited_response() {
        let stats = DnsStats::default();
        for (slip, expected) in [
            (0, [Limit::Drop; 4]),
            (1, [Limit::Slip; 4]),
            (2, [Limit::Drop, Limit::Slip, Limit::Drop, Limit::Slip]),
            (3, [Limit::Drop, Limit::Drop, Limit::Slip, Limit::Drop]),
        ] {
            let rrl = limiter(1, slip, 1000);
            assert_eq!(run(&rrl, &stats, "192.0.2.1", 1, 0), [Limit::Send]);
            assert_eq!(
                run(&rrl, &stats, "192.0.2.1", 4, 0),
                expected,
                "slip {slip}"
            );
        }
    }

    #[test]
    fn only_the_first_limited_response_of_a_spell_starts_it() {
        let stats = DnsStats::default();
        let rrl = limiter(1, 2, 1000);
        rrl.check(ip("192.0.2.1"), CLASS, 0, 0, &stats);
        let started: Vec<bool> = (0..3)
            .map(|_| rrl.check(ip("192.0.2.1"), CLASS, 0, 0, &stats).started)
            .collect();
        assert_eq!(started, [true, false, false]);
        // Under the rate again, then over: a new spell.
        rrl.check(ip("192.0.2.1"), CLASS, 0, 2_000_000, &stats);
        assert!(
            rrl.check(ip("192.0.2.1"), CLASS, 0, 2_000_000, &stats)
                .started
        );
    }

    #[test]
    fn prefixes_share_a_bucket_and_classes_do_not() {
        let stats = DnsStats::default();
        let rrl = limiter(2, 0, 1000);
        assert_eq!(run(&rrl, &stats, "192.0.2.1", 2, 0), [Limit::Send; 2]);
        // Same /24: the same bucket.
        assert_eq!(run(&rrl, &stats, "192.0.2.200", 1, 0), [Limit::Drop]);
        // Another /24, another class of the same prefix, another index generation.
        assert_eq!(run(&rrl, &stats, "192.0.3.1", 1, 0), [Limit::Send]);
        let other = Class::Positive { node: 3, qtype: 1 };
        assert_eq!(
            rrl.check(ip("192.0.2.1"), other, 0, 0, &stats).limit,
            Limit::Send
        );
        assert_eq!(
            rrl.check(ip("192.0.2.1"), CLASS, 1, 0, &stats).limit,
            Limit::Send
        );
        // IPv6: /56.
        assert_eq!(run(&rrl, &stats, "2001:db8:0:1::1", 2, 0), [Limit::Send; 2]);
        assert_eq!(run(&rrl, &stats, "2001:db8:0:ff::9", 1, 0), [Limit::Drop]);
        assert_eq!(run(&rrl, &stats, "2001:db8:0:100::1", 1, 0), [Limit::Send]);
    }

    #[test]
    fn whitelisted_networks_are_never_limited() {
        let stats = DnsStats::default();
        let rrl = Rrl::new(&RrlOptions {
            rate: 1,
            whitelist: vec![
                "192.0.2.0/25".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            ..RrlOptions::default()
        })
        .unwrap();
        assert_eq!(run(&rrl, &stats, "192.0.2.5", 5, 0), [Limit::Send; 5]);
        assert_eq!(run(&rrl, &stats, "2001:db8::1", 5, 0), [Limit::Send; 5]);
        assert_eq!(
            run(&rrl, &stats, "192.0.2.200", 3, 0),
            [Limit::Send, Limit::Drop, Limit::Slip]
        );
    }

    #[test]
    fn the_table_never_grows_and_evicts_the_least_recently_active() {
        let stats = DnsStats::default();
        let rrl = limiter(1, 0, 64);
        assert_eq!(rrl.capacity(), 64);
        // A limited class, then a flood of random prefixes that overflows every row.
        assert_eq!(
            run(&rrl, &stats, "198.51.100.1", 2, 0),
            [Limit::Send, Limit::Drop]
        );
        for n in 0..10_000u32 {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | (n << 8)));
            rrl.check(source, CLASS, 0, 1 + u64::from(n), &stats);
        }
        assert_eq!(stats.rrl_classes(), 64);
        assert!(
            stats.rrl_evictions() >= 10_000 - 64,
            "{}",
            stats.rrl_evictions()
        );
    }

    #[test]
    fn the_timestamp_lap_does_not_limit_a_quiet_class() {
        let stats = DnsStats::default();
        let rrl = limiter(1, 0, 64);
        assert_eq!(
            run(&rrl, &stats, "192.0.2.1", 2, 0),
            [Limit::Send, Limit::Drop]
        );
        // The stored TAT keeps 32 bits of microseconds (a 71-minute lap). Half a lap and
        // a lap and a bit later, the quiet class has a full bucket again.
        let lap = 1u64 << 32;
        assert_eq!(
            run(&rrl, &stats, "192.0.2.1", 1, lap / 2 + 7),
            [Limit::Send]
        );
        assert_eq!(
            run(&rrl, &stats, "192.0.2.1", 1, 3 * lap / 2 + 5_000_000),
            [Limit::Send]
        );
        assert_eq!(
            run(&rrl, &stats, "192.0.2.1", 1, 2 * lap + 3_000_000),
            [Limit::Send]
        );
    }

    #[test]
    fn log_lines_are_capped_per_second_and_the_suppressed_ones_reported() {
        let rrl = limiter(1, 2, 64);
        let allowed: Vec<Option<u64>> = (0..12).map(|_| rrl.log_allowed(5_000_000)).collect();
        assert_eq!(allowed[..10], [Some(0); 10]);
        assert_eq!(allowed[10..], [None, None]);
        // The next second's first line says how many were left out.
        assert_eq!(rrl.log_allowed(6_000_001), Some(2));
        assert_eq!(rrl.log_allowed(6_000_002), Some(0));
    }
}
