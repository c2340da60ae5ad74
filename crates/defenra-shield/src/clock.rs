//! The shield's clock: monotonic time since the shield started, or a manual clock for tests;
//! and the Unix time the browser challenge's tokens carry, which follows the manual clock too.

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
    /// Microseconds since the start, and the Unix second the start stands for.
    Manual(Arc<AtomicU64>, u64),
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
        let unix_start = crate::challenge::unix_now().saturating_sub(START_US / 1_000_000);
        (
            Clock(Source::Manual(Arc::clone(&now), unix_start)),
            ManualClock(now),
        )
    }

    /// Microseconds since the clock started (from 1,000,000).
    pub fn now_us(&self) -> u64 {
        match &self.0 {
            Source::System(start) => START_US + start.elapsed().as_micros() as u64,
            Source::Manual(now, _) => now.load(Relaxed),
        }
    }

    /// Seconds since the Unix epoch: the system clock (so a fleet agrees on the expiries
    /// of challenges and clearances), or, on a manual clock, the real time it was made plus
    /// how far it was moved.
    pub fn unix_s(&self) -> u64 {
        match &self.0 {
            Source::System(_) => crate::challenge::unix_now(),
            Source::Manual(now, unix_start) => unix_start + now.load(Relaxed) / 1_000_000,
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
