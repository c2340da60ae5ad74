//! Request ids: 16 hex digits, unique within a process, unpredictable from outside.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ring::rand::SecureRandom;

/// Hands out request ids: an atomic counter from a random start, sent through a keyed
/// 64-bit permutation (a bijection, so ids repeat only after 2^64 requests) so that two
/// ids a visitor sees say nothing about how many requests came between them. One
/// `fetch_add` and a few multiplications per id; no lock, no system call.
pub struct RequestIds {
    counter: AtomicU64,
    keys: [u64; 2],
}

/// One request id: 16 lower-case hex digits, for `X-Request-Id`, the access log and the
/// edge's pages.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId([u8; 16]);

impl RequestIds {
    /// A generator keyed from the system's random source (or, should that fail, the
    /// clock and the process id: ids stay unique, only less unpredictable).
    pub fn new() -> RequestIds {
        let mut random = [0u8; 24];
        if ring::rand::SystemRandom::new().fill(&mut random).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos() as u64);
            random[..8].copy_from_slice(&nanos.to_le_bytes());
            random[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        }
        let word = |at: usize| u64::from_le_bytes(random[at..at + 8].try_into().expect("8 bytes"));
        RequestIds::with_seed(word(0), [word(8), word(16)])
    }

    /// A generator with a fixed start and keys (tests).
    pub fn with_seed(start: u64, keys: [u64; 2]) -> RequestIds {
        RequestIds {
            counter: AtomicU64::new(start),
            keys,
        }
    }

    /// The next id.
    pub fn next(&self) -> RequestId {
        let value = permute(self.counter.fetch_add(1, Relaxed), self.keys);
        let mut out = [0u8; 16];
        for (at, digit) in out.iter_mut().enumerate() {
            *digit = b"0123456789abcdef"[(value >> (60 - 4 * at)) as usize & 15];
        }
        RequestId(out)
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

impl fmt::Debug for RequestIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestIds").finish_non_exhaustive()
    }
}

impl RequestId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

/// A keyed bijection of 64-bit words: key additions around the splitmix64 finalizer, whose
/// xor-shifts and odd multiplications are each invertible. Not a cipher; enough that ids
/// do not count up visibly.
fn permute(mut x: u64, keys: [u64; 2]) -> u64 {
    x = x.wrapping_add(keys[0]);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x.wrapping_add(keys[1])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_sixteen_hex_digits_and_never_repeat() {
        let ids = RequestIds::new();
        let mut seen = HashSet::new();
        for _ in 0..100_000 {
            let id = ids.next();
            assert_eq!(id.as_str().len(), 16);
            assert!(
                id.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(seen.insert(id), "{id} repeated");
        }
    }

    #[test]
    fn ids_do_not_count_up_and_differ_between_generators() {
        let ids = RequestIds::with_seed(41, [7, 9]);
        let first = u64::from_str_radix(ids.next().as_str(), 16).expect("hex");
        let second = u64::from_str_radix(ids.next().as_str(), 16).expect("hex");
        // Consecutive ids differ in about half their bits, not in the last one or two.
        assert!((first ^ second).count_ones() > 8, "{first:x} {second:x}");
        let other = RequestIds::with_seed(41, [8, 9]);
        assert_ne!(other.next().as_str(), format!("{first:016x}"));
        assert_ne!(RequestIds::new().next(), RequestIds::new().next());
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let ids = RequestIds::new();
        let all: Vec<RequestId> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..10_000).map(|_| ids.next()).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().expect("worker"))
                .collect()
        });
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 40_000);
    }
}
