//! The fleet link's counters and state: atomics bumped by the link task, read by `/stats`,
//! `/metrics` and `/health`.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

use defenra_config::stats::{Metric, StatsSource};
use parking_lot::Mutex;
use serde_json::json;

/// How the link to Redis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected yet since the start.
    Connecting,
    /// Connected and subscribed.
    Up,
    /// Unreachable, slow or refused: the agent serves with its local state.
    Down,
    /// Redis refused the credentials of the URL.
    Unauthorised,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Unauthorised => "unauthorised",
        }
    }

    fn from_u8(value: u8) -> LinkState {
        match value {
            1 => LinkState::Up,
            2 => LinkState::Down,
            3 => LinkState::Unauthorised,
            _ => LinkState::Connecting,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            LinkState::Connecting => 0,
            LinkState::Up => 1,
            LinkState::Down => 2,
            LinkState::Unauthorised => 3,
        }
    }
}

/// Counters of the fleet link.
#[derive(Debug, Default)]
pub struct FleetStats {
    state: AtomicU8,
    /// Unix second of the last change of `state`.
    since_unix: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Messages published on the channel.
    pub publishes: AtomicU64,
    /// Messages of other agents received.
    pub received: AtomicU64,
    /// Other agents' (domain, address) request counts consumed here.
    pub requests_merged: AtomicU64,
    /// Other agents' blocks applied here.
    pub blocks_applied: AtomicU64,
    /// Blocks started here because a merge showed the fleet over the limit.
    pub blocks_by_merge: AtomicU64,
    /// Bans and unbans of this agent sent to the fleet.
    pub bans_published: AtomicU64,
    /// Bans and unbans of other agents applied here.
    pub bans_applied: AtomicU64,
    /// `ngx.shared.fleet` operations sent to Redis.
    pub dict_operations: AtomicU64,
    /// Whole-list comparisons of the bans (and the key) with Redis.
    pub reconciles: AtomicU64,
    /// Connections made again after the link was lost.
    pub reconnects: AtomicU64,
    /// Redis commands that failed (the link may still be up).
    pub errors: AtomicU64,
    /// Counts, blocks and dictionary changes that stayed local: a journal was full, or the
    /// link was down when they were due.
    pub dropped: AtomicU64,
    /// Shield key changes adopted from the fleet.
    pub key_rotations: AtomicU64,
    /// Milliseconds between an other agent publishing a message and this one applying it,
    /// for the last message (clocks of the agents included).
    pub lag_ms: AtomicU64,
    /// The largest such lag since the start.
    pub lag_max_ms: AtomicU64,
}

impl FleetStats {
    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.state.load(Relaxed))
    }

    /// Moves to `state`; true when that is a change.
    pub(crate) fn set_state(&self, state: LinkState, error: Option<String>) -> bool {
        let previous = self.state.swap(state.to_u8(), Relaxed);
        if error.is_some() || state == LinkState::Up {
            *self.last_error.lock() = error;
        }
        let changed = previous != state.to_u8();
        if changed {
            self.since_unix.store(unix_now(), Relaxed);
        }
        changed
    }

    pub(crate) fn lag(&self, lag_ms: u64) {
        self.lag_ms.store(lag_ms, Relaxed);
        self.lag_max_ms.fetch_max(lag_ms, Relaxed);
    }

    pub(crate) fn health(&self, redis: &str) -> serde_json::Value {
        let since = self.since_unix.load(Relaxed);
        json!({
            "state": self.state().as_str(),
            "redis": redis,
            "since": (since > 0).then_some(since),
            "error": self.last_error.lock().clone(),
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl StatsSource for crate::Fleet {
    fn service(&self) -> &'static str {
        "fleet"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let s = &self.stats;
        let load = |counter: &AtomicU64| counter.load(Relaxed);
        out.push(Metric::gauge(
            "link_up",
            "1 while the link to Redis is up, 0 while the agent serves on its local state alone.",
            f64::from(u8::from(s.state() == LinkState::Up)),
        ));
        for (name, help, value) in [
            (
                "publishes_total",
                "Messages published to the fleet's channel.",
                load(&s.publishes),
            ),
            (
                "messages_received_total",
                "Messages of other agents received.",
                load(&s.received),
            ),
            (
                "requests_merged_total",
                "Other agents' (domain, address) request counts consumed from the local rate limits.",
                load(&s.requests_merged),
            ),
            (
                "blocks_applied_total",
                "Blocks decided by other agents applied here.",
                load(&s.blocks_applied),
            ),
            (
                "blocks_by_merge_total",
                "Blocks started here because merged counts showed the fleet over a limit.",
                load(&s.blocks_by_merge),
            ),
            (
                "bans_published_total",
                "Bans and unbans of this agent sent to the fleet.",
                load(&s.bans_published),
            ),
            (
                "bans_applied_total",
                "Bans and unbans of other agents applied here.",
                load(&s.bans_applied),
            ),
            (
                "dict_operations_total",
                "ngx.shared.fleet operations sent to Redis.",
                load(&s.dict_operations),
            ),
            (
                "reconciles_total",
                "Whole ban lists and keys compared with Redis.",
                load(&s.reconciles),
            ),
            (
                "reconnects_total",
                "Connections to Redis made again after the link was lost.",
                load(&s.reconnects),
            ),
            (
                "errors_total",
                "Redis commands that failed.",
                load(&s.errors),
            ),
            (
                "dropped_total",
                "Counts, blocks and dictionary changes kept local: a journal was full or Redis unreachable.",
                load(&s.dropped),
            ),
            (
                "key_rotations_total",
                "Shield keys adopted from the fleet.",
                load(&s.key_rotations),
            ),
        ] {
            out.push(Metric::counter(name, help, value));
        }
        out.push(Metric::gauge(
            "lag_ms",
            "Milliseconds from another agent's publish to applying it here, last message.",
            load(&s.lag_ms) as f64,
        ));
        out.push(Metric::gauge(
            "lag_max_ms",
            "The largest publish-to-apply lag of another agent's message since the start, in milliseconds.",
            load(&s.lag_max_ms) as f64,
        ));
    }

    fn details(&self) -> serde_json::Value {
        json!({ "state": self.stats.state().as_str(), "redis": self.options.target.display() })
    }
}
