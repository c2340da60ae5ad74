//! A lock-free per-second log budget, in lines and bytes, so a failing or chatty script
//! cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets at most `lines_per_second` lines and `bytes_per_second` bytes through each second;
/// counts the lines it drops.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    lines_per_second: u64,
    bytes_per_second: u64,
    /// The Unix second the current window belongs to.
    window: AtomicU64,
    /// Lines allowed in the current window.
    used: AtomicU64,
    /// Bytes allowed in the current window.
    used_bytes: AtomicU64,
    /// Lines dropped since the last line that got through.
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub(crate) fn new(lines_per_second: u64, bytes_per_second: u64) -> Self {
        LogLimiter {
            lines_per_second,
            bytes_per_second,
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            used_bytes: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line of `bytes` bytes may be logged, with `n` lines dropped before
    /// it; `None` when it must be dropped (no lines, or not enough bytes, left this second).
    /// A dropped line still uses up its share of the line budget, so a flood of long lines
    /// cannot starve the check of the byte budget. Races at a window boundary may let a
    /// line or two extra through, which is fine for a log budget.
    pub(crate) fn allow(&self, now_secs: u64, bytes: u64) -> Option<u64> {
        if self.window.swap(now_secs, Ordering::Relaxed) != now_secs {
            self.used.store(0, Ordering::Relaxed);
            self.used_bytes.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.lines_per_second
            && self
                .used_bytes
                .fetch_add(bytes, Ordering::Relaxed)
                .saturating_add(bytes)
                <= self.bytes_per_second
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_budget_are_counted_and_reported() {
        let limiter = LogLimiter::new(2, 1000);
        assert_eq!(limiter.allow(10, 1), Some(0));
        assert_eq!(limiter.allow(10, 1), Some(0));
        assert_eq!(limiter.allow(10, 1), None);
        assert_eq!(limiter.allow(10, 1), None);
        assert_eq!(limiter.allow(11, 1), Some(2));
    }

    #[test]
    fn bytes_beyond_the_budget_are_dropped_too() {
        let limiter = LogLimiter::new(100, 1000);
        assert_eq!(limiter.allow(10, 600), Some(0));
        assert_eq!(limiter.allow(10, 600), None, "1200 bytes in one second");
        assert_eq!(
            limiter.allow(10, 400),
            None,
            "the dropped line's bytes count"
        );
        assert_eq!(limiter.allow(11, 1000), Some(2));
        assert_eq!(limiter.allow(11, 1), None);
    }
}
