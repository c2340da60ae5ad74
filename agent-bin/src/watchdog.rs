//! systemd's watchdog (sd_watchdog_enabled(3), `WatchdogSec=`): with `WATCHDOG_USEC` set,
//! `WATCHDOG=1` goes to the service manager every half interval, but only while every
//! runtime that serves listeners beats and the config loop is not stuck. A stuck runtime
//! stops the pings, and systemd restarts the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The longest a heartbeat period gets, however long the watchdog interval.
const MAX_BEAT: Duration = Duration::from_secs(1);

/// `WATCHDOG_USEC` as a duration, when the watchdog is on and meant for this process
/// (`WATCHDOG_PID`, when set, is our pid).
pub(crate) fn interval_from_env() -> Option<Duration> {
    let micros: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (micros > 0).then(|| Duration::from_micros(micros))
}

/// How often hearts beat for a watchdog `interval`: often enough that one missed beat is
/// far from the limit of half an interval.
pub(crate) fn beat_period(interval: Duration) -> Duration {
    (interval / 8).clamp(Duration::from_millis(10), MAX_BEAT)
}

/// The time of one runtime's latest beat.
#[derive(Debug)]
pub(crate) struct Heart {
    /// Milliseconds since the owning [`Liveness`]'s epoch.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Heart {
    pub(crate) fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }
}

type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// Everything whose life the watchdog vouches for: hearts beaten by tasks on each runtime,
/// and checks (the config loop).
pub(crate) struct Liveness {
    epoch: Instant,
    hearts: Mutex<Vec<(String, Arc<Heart>)>>,
    checks: Mutex<Vec<(String, Check)>>,
}

impl Liveness {
    pub(crate) fn new() -> Self {
        Liveness {
            epoch: Instant::now(),
            hearts: Mutex::new(Vec::new()),
            checks: Mutex::new(Vec::new()),
        }
    }

    /// A new heart named `name`, beaten once already.
    pub(crate) fn heart(&self, name: impl Into<String>) -> Arc<Heart> {
        let heart = Arc::new(Heart {
            last_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        heart.beat();
        self.hearts.lock().push((name.into(), Arc::clone(&heart)));
        heart
    }

    /// Adds a condition that must hold for the pings to go on.
    pub(crate) fn check(
        &self,
        name: impl Into<String>,
        alive: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        self.checks.lock().push((name.into(), Box::new(alive)));
    }

    /// The first heart that has not beaten for `limit`, or check that fails.
    pub(crate) fn failing(&self, limit: Duration) -> Option<String> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let limit = limit.as_millis() as u64;
        if let Some((name, _)) = self
            .hearts
            .lock()
            .iter()
            .find(|(_, heart)| now.saturating_sub(heart.last_ms.load(Relaxed)) > limit)
        {
            return Some(format!("{name} (runtime not beating)"));
        }
        self.checks
            .lock()
            .iter()
            .find(|(_, alive)| !alive())
            .map(|(name, _)| name.clone())
    }
}

/// Beats `heart` every `period` until `shutdown`; spawned on the runtime it vouches for.
pub(crate) async fn beat(heart: Arc<Heart>, period: Duration, shutdown: CancellationToken) {
    loop {
        heart.beat();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Sends `WATCHDOG=1` every half `interval` while everything in `liveness` is alive, until
/// `shutdown`. Runs on a thread of its own, so it keeps judging when a runtime is stuck.
pub(crate) fn run(liveness: Arc<Liveness>, interval: Duration, shutdown: CancellationToken) {
    run_with(liveness, interval, shutdown, |state| {
        crate::notify::notify(state)
    });
}

/// [`run`] with the notification sent through `notify`.
pub(crate) fn run_with(
    liveness: Arc<Liveness>,
    interval: Duration,
    shutdown: CancellationToken,
    notify: impl Fn(&str),
) {
    let half = interval / 2;
    let mut failing: Option<String> = None;
    while !shutdown.is_cancelled() {
        match liveness.failing(half) {
            None => {
                if let Some(name) = failing.take() {
                    info!(component = %name, "alive again; systemd watchdog pings resume");
                }
                notify("WATCHDOG=1");
            }
            Some(name) => {
                if failing.as_deref() != Some(name.as_str()) {
                    warn!(component = %name, "not alive; systemd watchdog pings stop");
                }
                failing = Some(name);
            }
        }
        // A short sleep in steps, so that shutdown is noticed soon.
        let deadline = Instant::now() + half;
        while !shutdown.is_cancelled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn hearts_beat_well_within_half_an_interval() {
        assert_eq!(beat_period(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(
            beat_period(Duration::from_millis(400)),
            Duration::from_millis(50)
        );
    }

    /// A runtime on its own thread, like an HTTP worker, with its heart beating.
    fn worker(liveness: &Liveness, shutdown: &CancellationToken) -> tokio::runtime::Handle {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let heart = liveness.heart("http-0");
        let token = shutdown.clone();
        std::thread::spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(beat(heart, Duration::from_millis(20), token.clone()));
                token.cancelled().await;
            });
        });
        handle
    }

    #[test]
    fn pings_go_while_alive_and_stop_when_a_runtime_is_stuck_or_a_check_fails() {
        let liveness = Arc::new(Liveness::new());
        let shutdown = CancellationToken::new();
        let handle = worker(&liveness, &shutdown);
        let config_ok = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&config_ok);
        liveness.check("config loop", move || flag.load(Relaxed));
        let pings = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let sent = Arc::clone(&pings);
        let pinger = {
            let (liveness, shutdown) = (Arc::clone(&liveness), shutdown.clone());
            std::thread::spawn(move || {
                run_with(liveness, Duration::from_millis(400), shutdown, |state| {
                    assert_eq!(state, "WATCHDOG=1");
                    sent.lock().push(Instant::now());
                })
            })
        };
        let count = || pings.lock().len();
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while count() < n {
                assert!(Instant::now() < deadline, "only {} pings", count());
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for(3);
        {
            let gaps: Vec<Duration> = pings.lock().windows(2).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps.iter().all(|gap| *gap >= Duration::from_millis(150)),
                "every half interval: {gaps:?}"
            );
        }

        // The worker's runtime gets stuck in a blocking call: its heart stops, so do pings.
        handle.spawn(async { std::thread::sleep(Duration::from_millis(1500)) });
        std::thread::sleep(Duration::from_millis(450));
        let before = count();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(count(), before, "no ping while the runtime is stuck");
        // It recovers: pings resume.
        wait_for(before + 2);

        // The config loop is stuck: no pings either.
        config_ok.store(false, Relaxed);
        std::thread::sleep(Duration::from_millis(250));
        let before = count();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(count(), before, "no ping while the config loop is stuck");
        config_ok.store(true, Relaxed);
        wait_for(before + 1);

        shutdown.cancel();
        pinger.join().unwrap();
    }
}
