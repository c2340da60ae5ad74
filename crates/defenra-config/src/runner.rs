//! The config task: fetch on a timer, compile, publish, reload every service, persist.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::stats::{Metric, StatsSource};
use crate::{Compiled, ConfigSource, Issue, Reload, SnapshotCell, StateDir, compile};

/// How long to wait between fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalPolicy {
    /// Set explicitly (`--poll-interval`, or a file source's check period): always wins.
    Fixed(Duration),
    /// Core's `nextPollInterval` (clamped to 1-3600 s) when it sends one, else `default`.
    CoreDecides { default: Duration },
}

/// The first delay after a failure; it doubles on each further failure, capped at the
/// poll interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Counters and the latest problems of the config pipeline, for `/health` and `/stats`.
#[derive(Default)]
pub struct ConfigStats {
    pub polls_total: AtomicU64,
    pub polls_failed_total: AtomicU64,
    pub documents_rejected_total: AtomicU64,
    pub snapshots_published_total: AtomicU64,
    /// Unix seconds of the last fetch that succeeded (0 = never).
    pub last_success_unix: AtomicU64,
    /// Unix seconds of the last fetch attempt (0 = never).
    pub last_poll_unix: AtomicU64,
    /// Unix seconds the fetch (and reload) in progress started; 0 between fetches. A
    /// watchdog reads it to tell a stuck config loop from one waiting for its next poll.
    pub busy_since_unix: AtomicU64,
    /// Current poll interval in milliseconds.
    pub interval_ms: AtomicU64,
    /// Version of the published snapshot (0 = none yet).
    pub version: AtomicU64,
    /// What went wrong with the latest fetch, cleared by the next success.
    last_error: Mutex<Option<String>>,
    /// Items left out of the current snapshot, with their JSON paths.
    issues: Mutex<Vec<Issue>>,
    /// Where the current snapshot came from: `"file"`, `"core"` or `"state"`.
    origin: Mutex<&'static str>,
    counts: Mutex<(usize, usize, usize)>,
}

impl ConfigStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub fn issues(&self) -> Vec<Issue> {
        self.issues.lock().clone()
    }

    /// `"file"`, `"core"`, `"state"`, or `"none"` before the first snapshot.
    pub fn origin(&self) -> &'static str {
        *self.origin.lock()
    }
}

impl StatsSource for ConfigStats {
    fn service(&self) -> &'static str {
        "config"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let (n_domains, n_records, n_proxies) = *self.counts.lock();
        out.extend([
            Metric::counter(
                "polls_total",
                "Config fetches attempted.",
                self.polls_total.load(Relaxed),
            ),
            Metric::counter(
                "polls_failed_total",
                "Config fetches that failed or returned a rejected document.",
                self.polls_failed_total.load(Relaxed),
            ),
            Metric::counter(
                "documents_rejected_total",
                "Documents refused whole (not JSON, success:false).",
                self.documents_rejected_total.load(Relaxed),
            ),
            Metric::counter(
                "snapshots_published_total",
                "Snapshots made current.",
                self.snapshots_published_total.load(Relaxed),
            ),
            Metric::gauge(
                "version",
                "Version of the current snapshot.",
                self.version.load(Relaxed) as f64,
            ),
            Metric::gauge(
                "last_success_timestamp_seconds",
                "Unix time of the last successful fetch.",
                self.last_success_unix.load(Relaxed) as f64,
            ),
            Metric::gauge(
                "domains",
                "Domains in the current snapshot.",
                n_domains as f64,
            ),
            Metric::gauge(
                "records",
                "DNS records in the current snapshot.",
                n_records as f64,
            ),
            Metric::gauge(
                "proxies",
                "L4 proxies in the current snapshot.",
                n_proxies as f64,
            ),
            Metric::gauge(
                "issues",
                "Items left out of the current snapshot.",
                self.issues.lock().len() as f64,
            ),
        ]);
    }

    fn details(&self) -> serde_json::Value {
        let (n_domains, n_records, n_proxies) = *self.counts.lock();
        let last_success = self.last_success_unix.load(Relaxed);
        serde_json::json!({
            "source": self.origin(),
            "version": self.version.load(Relaxed),
            "domains": n_domains,
            "records": n_records,
            "proxies": n_proxies,
            "last_successful_poll": (last_success > 0).then_some(last_success),
            "poll_interval_s": self.interval_ms.load(Relaxed) as f64 / 1000.0,
            "last_error": self.last_error(),
            "rejected_items": self.issues(),
        })
    }
}

/// Fetches, compiles, publishes and persists configuration, and reloads every service.
///
/// Fetching is async; compiling, saving, publishing and the services' reloads are
/// synchronous and can take seconds for a large document, so they run on the blocking
/// pool (`Publisher`): a slow reload never holds a runtime worker, so the health
/// endpoint keeps answering, and shutdown never waits for it (the binary bounds the
/// runtime's shutdown).
pub struct ConfigLoop {
    source: Box<dyn ConfigSource>,
    /// The synchronous half, locked by the one blocking task working for this loop.
    publisher: Arc<Mutex<Publisher>>,
    policy: IntervalPolicy,
    stats: Arc<ConfigStats>,
    reload_now: Arc<Notify>,
    /// Core's latest `nextPollInterval`.
    core_interval: Option<Duration>,
    /// Failures in a row, for the backoff.
    failures: u32,
    /// The source's current document was rejected: a fetch that finds it unchanged keeps
    /// that error reported (a file that stays broken must not look fixed a poll later).
    rejected: bool,
    /// Successful fetches so far; the reports to Core follow each one.
    successes: watch::Sender<u64>,
}

/// Compiles documents, saves the last good one, publishes snapshots and reloads the
/// services: everything the loop does that blocks. Called on the blocking pool only.
struct Publisher {
    cell: Arc<SnapshotCell>,
    services: Vec<Arc<dyn Reload>>,
    state: Option<StateDir>,
    stats: Arc<ConfigStats>,
    /// Fingerprint of the published content, to skip republishing identical polls.
    fingerprint: Option<u64>,
    /// Issues already logged, so a problem that persists is logged once, not every poll.
    logged: HashSet<Issue>,
}

/// What compiling (and perhaps publishing) one fetched document did.
enum Applied {
    Rejected(crate::Rejected),
    Unchanged {
        next_poll_interval: Option<Duration>,
    },
    Published {
        next_poll_interval: Option<Duration>,
    },
}

/// What one fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    Published,
    Unchanged,
    Failed,
}

impl ConfigLoop {
    pub fn new(
        source: Box<dyn ConfigSource>,
        cell: Arc<SnapshotCell>,
        policy: IntervalPolicy,
    ) -> Self {
        let stats = Arc::new(ConfigStats::default());
        ConfigLoop {
            source,
            publisher: Arc::new(Mutex::new(Publisher {
                cell,
                services: Vec::new(),
                state: None,
                stats: Arc::clone(&stats),
                fingerprint: None,
                logged: HashSet::new(),
            })),
            policy,
            stats,
            reload_now: Arc::new(Notify::new()),
            core_interval: None,
            failures: 0,
            rejected: false,
            successes: watch::Sender::new(0),
        }
    }

    /// Persist the last good document here, and fall back to it at startup.
    pub fn with_state_dir(self, state: StateDir) -> Self {
        self.publisher.lock().state = Some(state);
        self
    }

    /// Reload `service` after every publish, in the order added.
    pub fn with_service(self, service: Arc<dyn Reload>) -> Self {
        self.publisher.lock().services.push(service);
        self
    }

    pub fn stats(&self) -> Arc<ConfigStats> {
        Arc::clone(&self.stats)
    }

    /// Changes after every successful fetch (document loaded or unchanged); the value is the
    /// number of successful fetches so far.
    pub fn successes(&self) -> watch::Receiver<u64> {
        self.successes.subscribe()
    }

    /// Notify this to fetch right away, even if the source looks unchanged (SIGHUP).
    pub fn reload_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.reload_now)
    }

    /// The first fetch. When it fails and a state dir holds a last good document, that
    /// document is published instead, so the agent serves the last known config.
    /// Returns whether a snapshot is now published.
    pub async fn start(&mut self) -> bool {
        let outcome = self.poll_once().await;
        let publisher = Arc::clone(&self.publisher);
        if outcome != PollOutcome::Failed {
            return publisher.lock().cell.load().is_some();
        }
        tokio::task::spawn_blocking(move || publisher.lock().publish_saved())
            .await
            .unwrap_or_else(|join_error| {
                warn!(%join_error, "loading the saved config failed");
                false
            })
    }

    /// Polls until `shutdown`, waiting the poll interval between fetches, a backoff after
    /// failures, and no time at all when the reload handle is notified.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let delay = self.next_delay();
            self.stats
                .interval_ms
                .store(self.interval().as_millis() as u64, Relaxed);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                () = self.reload_now.notified() => {
                    info!(source = self.source.kind(), "reload requested");
                    self.source.invalidate();
                }
            }
            // A fetch (or a reload on the blocking pool) in progress does not hold
            // shutdown up.
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = self.poll_once() => {}
            }
        }
    }

    /// One fetch, compile and (when the content changed) publish. A success is announced
    /// to [`ConfigLoop::successes`] once the services have the new snapshot.
    pub async fn poll_once(&mut self) -> PollOutcome {
        self.stats.busy_since_unix.store(unix_now(), Relaxed);
        let outcome = self.fetch_and_apply().await;
        self.stats.busy_since_unix.store(0, Relaxed);
        if outcome != PollOutcome::Failed {
            self.successes.send_modify(|count| *count += 1);
        }
        outcome
    }

    async fn fetch_and_apply(&mut self) -> PollOutcome {
        self.stats.polls_total.fetch_add(1, Relaxed);
        self.stats.last_poll_unix.store(unix_now(), Relaxed);
        let kind = self.source.kind();
        let doc = match self.source.fetch().await {
            Ok(Some(doc)) => doc,
            Ok(None) if self.rejected => {
                // The same rejected document: no new failure (no backoff), same error.
                self.failures = 0;
                return PollOutcome::Unchanged;
            }
            Ok(None) => {
                self.succeeded();
                return PollOutcome::Unchanged;
            }
            Err(error) => {
                warn!(source = kind, %error, "config fetch failed; keeping the current config");
                return self.failed(error.to_string());
            }
        };
        let publisher = Arc::clone(&self.publisher);
        let applied =
            tokio::task::spawn_blocking(move || publisher.lock().compile_and_apply(doc, kind))
                .await;
        match applied {
            Ok(Applied::Rejected(rejected)) => {
                warn!(source = kind, error = %rejected, "config document rejected; keeping the current config");
                self.stats.documents_rejected_total.fetch_add(1, Relaxed);
                self.rejected = true;
                self.failed(rejected.to_string())
            }
            Ok(Applied::Unchanged { next_poll_interval }) => {
                self.succeeded();
                self.core_interval = next_poll_interval;
                PollOutcome::Unchanged
            }
            Ok(Applied::Published { next_poll_interval }) => {
                self.succeeded();
                self.core_interval = next_poll_interval;
                PollOutcome::Published
            }
            Err(join_error) => {
                warn!(source = kind, %join_error, "config reload failed");
                self.failed(format!("config reload failed: {join_error}"))
            }
        }
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.rejected = false;
        self.stats.last_success_unix.store(unix_now(), Relaxed);
        *self.stats.last_error.lock() = None;
    }

    fn failed(&mut self, error: String) -> PollOutcome {
        self.failures = self.failures.saturating_add(1);
        self.stats.polls_failed_total.fetch_add(1, Relaxed);
        *self.stats.last_error.lock() = Some(error);
        PollOutcome::Failed
    }

    /// The poll interval in force.
    pub fn interval(&self) -> Duration {
        match self.policy {
            IntervalPolicy::Fixed(interval) => interval,
            IntervalPolicy::CoreDecides { default } => self.core_interval.unwrap_or(default),
        }
    }

    fn next_delay(&self) -> Duration {
        let interval = self.interval();
        if self.failures == 0 {
            return interval;
        }
        // Exponential backoff with ±25 % jitter, capped at the interval.
        let exponent = (self.failures - 1).min(16);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << exponent).min(interval);
        let jitter = 0.75 + 0.5 * pseudo_random_unit();
        backoff
            .mul_f64(jitter)
            .min(interval)
            .max(Duration::from_millis(100))
    }
}

impl Publisher {
    /// Compiles `doc` and, when its content changed, saves, publishes and reloads.
    fn compile_and_apply(&mut self, doc: Bytes, kind: &'static str) -> Applied {
        let compiled = match compile(&doc) {
            Ok(compiled) => compiled,
            Err(rejected) => return Applied::Rejected(rejected),
        };
        let next_poll_interval = compiled.next_poll_interval;
        if self.fingerprint == Some(compiled.fingerprint) {
            debug!(source = kind, "config unchanged");
            return Applied::Unchanged { next_poll_interval };
        }
        self.apply(compiled, Some(doc), kind);
        Applied::Published { next_poll_interval }
    }

    /// Publishes the state dir's saved document; whether there was a usable one.
    fn publish_saved(&mut self) -> bool {
        let Some(state) = &self.state else {
            return false;
        };
        let path = state.last_good_path();
        // The document is dropped before the services build their views from it.
        match state.load().map(|doc| doc.map(|doc| compile(&doc))) {
            Ok(Some(compiled)) => match compiled {
                Ok(compiled) => {
                    warn!(path = %path.display(), "serving the last good config from the state dir");
                    self.apply(compiled, None, "state");
                    true
                }
                Err(error) => {
                    warn!(path = %path.display(), %error, "saved config is corrupt; ignored");
                    false
                }
            },
            Ok(None) => false,
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot read the saved config; ignored");
                false
            }
        }
    }

    fn apply(&mut self, compiled: Compiled, doc: Option<Bytes>, origin: &'static str) {
        // Save first and let the document go, so the services' reloads (and the memory
        // hand-back registered after them) do not run beside a dead copy of it.
        if let (Some(state), Some(doc)) = (&self.state, doc)
            && let Err(error) = state.save(&doc)
        {
            warn!(path = %state.last_good_path().display(), %error, "cannot save the last good config");
        }
        let Compiled {
            snapshot,
            mut issues,
            fingerprint,
            ..
        } = compiled;
        let counts = (
            snapshot.domains.len(),
            snapshot.n_records(),
            snapshot.proxies.len(),
        );
        let snapshot = self.cell.publish(snapshot);
        for service in &self.services {
            service.reload(&snapshot, &mut issues);
        }
        self.fingerprint = Some(fingerprint);
        for issue in &issues {
            if !self.logged.contains(issue) {
                warn!(path = %issue.path, problem = %issue.message, "config item skipped");
            }
        }
        self.logged = issues.iter().cloned().collect();
        info!(
            source = origin,
            version = snapshot.version,
            domains = counts.0,
            records = counts.1,
            proxies = counts.2,
            issues = issues.len(),
            "config published"
        );
        *self.stats.issues.lock() = issues;
        *self.stats.counts.lock() = counts;
        *self.stats.origin.lock() = origin;
        self.stats.version.store(snapshot.version, Relaxed);
        self.stats.snapshots_published_total.fetch_add(1, Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A number in [0, 1) that differs between calls and between agents; enough for jitter.
fn pseudo_random_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_the_interval() {
        let cell = Arc::new(SnapshotCell::new());
        let source = Box::new(crate::FileSource::new("/nonexistent"));
        let mut config =
            ConfigLoop::new(source, cell, IntervalPolicy::Fixed(Duration::from_secs(10)));
        assert_eq!(config.next_delay(), Duration::from_secs(10));
        let mut previous_max = Duration::ZERO;
        for failures in 1..10 {
            config.failures = failures;
            let delay = config.next_delay();
            assert!(
                delay <= Duration::from_secs(10),
                "{delay:?} after {failures} failures"
            );
            assert!(delay >= Duration::from_millis(100));
            let nominal = FIRST_BACKOFF
                .saturating_mul(1 << (failures - 1))
                .min(Duration::from_secs(10));
            assert!(
                delay >= nominal.mul_f64(0.74).min(Duration::from_secs(10)),
                "{delay:?} < {nominal:?}"
            );
            previous_max = previous_max.max(delay);
        }
        assert!(previous_max > Duration::from_secs(5));
    }

    #[test]
    fn core_interval_applies_only_when_not_set_explicitly() {
        let cell = Arc::new(SnapshotCell::new());
        let mut config = ConfigLoop::new(
            Box::new(crate::FileSource::new("/nonexistent")),
            Arc::clone(&cell),
            IntervalPolicy::CoreDecides {
                default: Duration::from_secs(60),
            },
        );
        assert_eq!(config.interval(), Duration::from_secs(60));
        config.core_interval = Some(Duration::from_secs(5));
        assert_eq!(config.interval(), Duration::from_secs(5));
        let mut fixed = ConfigLoop::new(
            Box::new(crate::FileSource::new("/x")),
            cell,
            IntervalPolicy::Fixed(Duration::from_secs(30)),
        );
        fixed.core_interval = Some(Duration::from_secs(5));
        assert_eq!(fixed.interval(), Duration::from_secs(30));
    }
}
