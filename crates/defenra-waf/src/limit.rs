//! A lock-free per-second log budget, so a failing script cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets at most `per_second` lines through each second; counts the rest.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    per_second: u64,
    /// The Unix second the current window belongs to.
    window: AtomicU64,
    /// Lines allowed in the current window.
    used: AtomicU64,
    /// Lines dropped since the last line that got through.
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub(crate) fn new(per_second: u64) -> Self {
        LogLimiter {
            per_second,
            window: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this line may be logged, with `n` lines dropped before it; `None`
    /// when it must be dropped. Races at a window boundary may let a line or two extra
    /// through, which is fine for a log budget.
    pub(crate) fn allow(&self, now_secs: u64) -> Option<u64> {
        if self.window.swap(now_secs, Ordering::Relaxed) != now_secs {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
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
        let limiter = LogLimiter::new(2);
        assert_eq!(limiter.allow(10), Some(0));
        assert_eq!(limiter.allow(10), Some(0));
        assert_eq!(limiter.allow(10), None);
        assert_eq!(limiter.allow(10), None);
        assert_eq!(limiter.allow(11), Some(2));
    }
}
