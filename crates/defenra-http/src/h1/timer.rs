//! One timer per connection for all its waits (next head, origin answer, idle exchange).
//! Its wheel entry moves only when it fires or a wait needs an earlier deadline, so a
//! keep-alive exchange that only pushes deadlines later costs a clock read, not a timer
//! registration per wait (the L4 relay's idle timer works the same way).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub(crate) struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// Where the sleep is set to fire.
    armed: Instant,
    /// The deadline of the current wait.
    wanted: Instant,
}

impl Timer {
    pub(crate) fn new(deadline: Instant) -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
            wanted: deadline,
        }
    }

    /// The current wait ends at `deadline`.
    pub(crate) fn set(&mut self, deadline: Instant) {
        self.wanted = deadline;
        if deadline < self.armed {
            self.sleep.as_mut().reset(deadline);
            self.armed = deadline;
        }
    }

    /// Ready once the current wait's deadline has passed. An earlier firing (set for a
    /// wait that has since moved on) re-arms the sleep for the current deadline.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.wanted <= self.armed {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(self.wanted);
            self.armed = self.wanted;
        }
    }

    /// Resolves when the current wait's deadline has passed.
    pub(crate) async fn expired(&mut self) {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn later_deadlines_wait_for_the_latest_and_earlier_ones_take_over() {
        let start = Instant::now();
        let mut timer = Timer::new(start + Duration::from_secs(10));
        // Pushed later twice without touching the wheel: fires at the latest.
        timer.set(start + Duration::from_secs(20));
        timer.set(start + Duration::from_secs(30));
        timer.expired().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(30));
        // An earlier deadline than the armed one is honoured.
        let now = Instant::now();
        timer.set(now + Duration::from_secs(60));
        timer.set(now + Duration::from_secs(5));
        timer.expired().await;
        assert_eq!(Instant::now() - now, Duration::from_secs(5));
    }
}
