//! The slow-body rule of domains with Anti-DDoS on: a request body must bring at least
//! `slowloris.minContentLength` bytes in every `slowloris.maxHeaderTimeoutSeconds`, or the
//! request ends with 408 and the connection closes (a client trickling a body holds an
//! origin connection for nothing). It applies while the body is on its way to the origin,
//! until the origin's response head arrives.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::route::Route;

/// One request's body-rate window.
pub(crate) struct BodyRate {
    min_bytes: u64,
    pub(crate) period: Duration,
    /// Body bytes moved when the current window started.
    start_bytes: u64,
    window_end: Instant,
    /// For the HTTP/1 engine's poll loop; created on first poll.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl BodyRate {
    /// The rule for a request to `route`, if its domain is protected.
    pub(crate) fn for_route(route: &Route) -> Option<BodyRate> {
        let policy = route.shield.as_deref()?;
        let (min_bytes, period) = policy.min_body_rate();
        (min_bytes > 0 && !period.is_zero()).then(|| BodyRate {
            min_bytes,
            period,
            start_bytes: 0,
            window_end: Instant::now() + period,
            sleep: None,
        })
    }

    /// Checks the windows that ended by `now` with `moved` body bytes so far: `Err` when one
    /// of them brought too few, else the end of the current window.
    pub(crate) fn check(&mut self, moved: u64, now: Instant) -> Result<Instant, SlowBody> {
        while now >= self.window_end {
            if moved.saturating_sub(self.start_bytes) < self.min_bytes {
                return Err(SlowBody {
                    min_bytes: self.min_bytes,
                    period: self.period,
                });
            }
            self.start_bytes = moved;
            self.window_end = now + self.period;
        }
        Ok(self.window_end)
    }

    /// As [`BodyRate::check`] for a poll loop: `Ready` with the failure once a window ends
    /// short, `Pending` (with a wake-up at the window's end) otherwise.
    pub(crate) fn poll_slow(&mut self, cx: &mut Context<'_>, moved: u64) -> Poll<SlowBody> {
        loop {
            let window_end = match self.check(moved, Instant::now()) {
                Ok(end) => end,
                Err(slow) => return Poll::Ready(slow),
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(window_end)));
            if sleep.deadline() != window_end {
                sleep.as_mut().reset(window_end);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// A window ended with fewer body bytes than the rule asks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlowBody {
    pub(crate) min_bytes: u64,
    pub(crate) period: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(min_bytes: u64, period: Duration) -> BodyRate {
        BodyRate {
            min_bytes,
            period,
            start_bytes: 0,
            window_end: Instant::now() + period,
            sleep: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_window_must_bring_the_minimum() {
        let second = Duration::from_secs(1);
        let mut body = rate(100, second);
        let start = Instant::now();
        assert!(
            body.check(0, start).is_ok(),
            "the first window is still open"
        );
        assert!(body.check(150, start + second).is_ok());
        assert!(
            body.check(249, start + 2 * second).is_err(),
            "99 bytes in the second"
        );
        let mut body = rate(100, second);
        assert!(body.check(50, start + 3 * second).is_err());
    }
}
