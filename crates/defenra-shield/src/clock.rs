//! The shield's clock: monotonic time since the shield started, or a manual clock for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Monotonic time as the shield counts it. Second 0 never occurs (the clock starts at 1 s),
/// so a stored 0 can mean "never".
#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System(Instant),
    Manual(Arc<AtomicU64>),
}

/// Moves a manual [`Clock`] forward.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

/// Where both clocks start, in microseconds.
const START_US: u64 = 1_000_000;

impl Clock {
    /// Real monotonic time.
    pub fn system() -> Clock {
        Clock(Source::System(Instant::now()))
    }

    /// A clock that moves only when the returned handle says so.
    pub fn manual() -> (Clock, ManualClock) {
        let now = Arc::new(AtomicU64::new(START_US));
        (Clock(Source::Manual(Arc::clone(&now))), ManualClock(now))
    }

    /// Microseconds since the clock started (from 1,000,000).
    pub fn now_us(&self) -> u64 {
        match &self.0 {
            Source::System(start) => START_US + start.elapsed().as_micros() as u64,
            Source::Manual(now) => now.load(Relaxed),
        }
    }

    /// Whole seconds since the clock started (from 1).
    pub fn now_s(&self) -> u32 {
        (self.now_us() / 1_000_000).min(u64::from(u32::MAX)) as u32
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as u64, Relaxed);
    }
}

/// Whole seconds of `duration`, rounded up, as the tables store them.
pub(crate) fn ceil_secs(duration: Duration) -> u32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    secs.min(u64::from(u32::MAX)) as u32
}
