//! The time source behind shared-dict TTLs and `ngx.time`/`ngx.now`, injectable for tests.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the WAF reads the time. [`Clock::system`] (the default) follows the real clocks;
/// [`Clock::manual`] stands still until [`Clock::advance`] moves it, so tests can check TTLs
/// without sleeping.
#[derive(Clone)]
pub struct Clock {
    /// Monotonic origin; TTLs are measured from here so a wall-clock jump cannot expire or
    /// revive entries.
    origin: Instant,
    /// Unix time in milliseconds at `origin`, for the manual clock's wall time.
    origin_unix_ms: u64,
    /// `Some` for a manual clock: milliseconds elapsed since `origin`, moved by `advance`.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The real clocks.
    pub fn system() -> Self {
        Clock {
            origin: Instant::now(),
            origin_unix_ms: system_unix_ms(),
            manual: None,
        }
    }

    /// A clock that starts at `unix_ms` (milliseconds since the Unix epoch) and only moves
    /// when [`Clock::advance`] is called. Clones share the same time.
    pub fn manual(unix_ms: u64) -> Self {
        Clock {
            origin: Instant::now(),
            origin_unix_ms: unix_ms,
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves a manual clock forward. Does nothing on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(elapsed) = &self.manual {
            let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            elapsed.fetch_add(millis, Ordering::Relaxed);
        }
    }

    /// Milliseconds on a monotonic scale (only differences mean anything).
    pub(crate) fn monotonic_ms(&self) -> u64 {
        match &self.manual {
            Some(elapsed) => elapsed.load(Ordering::Relaxed),
            None => u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Wall time in milliseconds since the Unix epoch.
    pub(crate) fn unix_ms(&self) -> u64 {
        match &self.manual {
            Some(elapsed) => self.origin_unix_ms + elapsed.load(Ordering::Relaxed),
            None => system_unix_ms(),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.manual.is_some() {
            "Clock::manual"
        } else {
            "Clock::system"
        })
    }
}

fn system_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Splits Unix seconds into UTC `(year, month, day, hour, minute, second, weekday)` with
/// weekday 0 = Sunday. Howard Hinnant's `civil_from_days` algorithm.
pub(crate) fn utc_parts(unix_secs: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 4).rem_euclid(7) as u32;
    (
        year,
        month,
        day,
        (secs_of_day / 3600) as u32,
        (secs_of_day % 3600 / 60) as u32,
        (secs_of_day % 60) as u32,
        weekday,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual(1_000_000);
        let shared = clock.clone();
        assert_eq!(clock.monotonic_ms(), 0);
        shared.advance(Duration::from_millis(1500));
        assert_eq!(clock.monotonic_ms(), 1500);
        assert_eq!(clock.unix_ms(), 1_001_500);
    }

    #[test]
    fn utc_parts_match_known_dates() {
        assert_eq!(utc_parts(0), (1970, 1, 1, 0, 0, 0, 4));
        // 2010-11-18 11:27:35 UTC was a Thursday.
        assert_eq!(utc_parts(1_290_079_655), (2010, 11, 18, 11, 27, 35, 4));
        assert_eq!(utc_parts(951_782_400), (2000, 2, 29, 0, 0, 0, 2));
    }
}
