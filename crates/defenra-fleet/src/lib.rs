//! Fleet-wide protection state over Redis (or Valkey): the agents of one network share
//! their bans, their rate-limit counts and blocks, the browser challenge's key and
//! `ngx.shared.fleet`.
//!
//! This crate owns every byte that goes to Redis; the shield and the WAF only expose hooks
//! (`Shield::take_fleet_deltas`, `Shield::merge_fleet_requests`, ...,
//! `WafEngine::take_fleet_dict_changes`, ...) and know nothing of Redis. All Redis traffic
//! runs on one background task ([`Fleet::run`]); the request path never waits for it: the
//! shield and the WAF decide on their local state, which this task keeps merged.
//!
//! When Redis is unreachable the agents go on alone with their local state; the task logs
//! that once, counts it, reconnects with backoff and resynchronises bans and the key when
//! Redis is back. [`Fleet::health`] says how the link is for `/health`.
//!
//! Start reading at [`Fleet`], then `link.rs` (the task), `store.rs` (keys and commands) and
//! `message.rs` (what travels on the pub/sub channel). docs/shield.md, "Fleet", describes
//! the behaviour and its bounds.

mod link;
mod message;
mod stats;
mod store;
mod target;
#[cfg(feature = "testing")]
pub mod testing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use defenra_shield::{Shield, ShieldKey};
use defenra_waf::WafEngine;
use parking_lot::Mutex;

pub use stats::{FleetStats, LinkState};
pub use target::{RedisTarget, TargetError};

/// How the agent joins its fleet. `FleetOptions::new` gives the defaults.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Where Redis is.
    pub target: RedisTarget,
    /// Prefix of every key and of the channel (`defenra:`); agents of one fleet use the same.
    pub prefix: String,
    /// How often request counts, blocks and `ngx.shared.fleet` changes are exchanged.
    /// Bans and key changes go out at once.
    pub sync_interval: Duration,
    /// Fleet-wide rate limits: exchange request counts and blocks.
    pub limits: bool,
    /// Time to connect and to answer one command before the link counts as down.
    pub timeout: Duration,
    /// How often the whole ban list and the key are compared with Redis (also at every
    /// (re)connection).
    pub reconcile_every: Duration,
    /// The state directory's key file, rewritten with the fleet's key when it differs, so a
    /// restart while Redis is unreachable keeps the fleet's key. `None` for an operator's
    /// `--shield-key-file`, which the agent never writes.
    pub owned_key_file: Option<PathBuf>,
    /// The key this agent started with: it becomes the fleet's when Redis has none yet.
    pub seed_key: Option<ShieldKey>,
}

impl FleetOptions {
    pub fn new(target: RedisTarget) -> FleetOptions {
        FleetOptions {
            target,
            prefix: "defenra:".to_owned(),
            sync_interval: Duration::from_millis(250),
            limits: false,
            timeout: Duration::from_secs(2),
            reconcile_every: Duration::from_secs(30),
            owned_key_file: None,
            seed_key: None,
        }
    }
}

/// Why the fleet could not be set up (the agent then serves alone).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("--redis-prefix {0:?} must not contain braces (they pick Redis Cluster hash slots)")]
    Prefix(String),
}

/// One agent's membership in its fleet. Build it with [`Fleet::new`] before serving (it
/// switches the shield's and the WAF's notes on), then spawn [`Fleet::run`].
pub struct Fleet {
    options: FleetOptions,
    shield: Arc<Shield>,
    waf: Option<Arc<WafEngine>>,
    /// This process among the fleet's agents: its own messages are skipped.
    id: String,
    stats: FleetStats,
    /// A key this agent rotated to (SIGHUP), waiting to be published.
    key_to_publish: Mutex<Option<ShieldKey>>,
    /// The key this agent signs with as far as the fleet is concerned: offered to Redis
    /// when it has none (after a Redis restart, say).
    local_key: Mutex<Option<ShieldKey>>,
    wake: tokio::sync::Notify,
}

/// Most changed keys of one domain's `ngx.shared.fleet` kept between two syncs.
const DICT_MAX_PENDING: usize = 10_000;

impl Fleet {
    /// Joins `shield` (and `waf`'s `ngx.shared.fleet`, if given) to the fleet described by
    /// `options`: from now on they note what the fleet must learn. Nothing connects before
    /// [`Fleet::run`].
    ///
    /// # Errors
    ///
    /// [`FleetError::Prefix`] for a prefix with braces.
    pub fn new(
        options: FleetOptions,
        shield: Arc<Shield>,
        waf: Option<Arc<WafEngine>>,
    ) -> Result<Arc<Fleet>, FleetError> {
        if options.prefix.contains(['{', '}']) {
            return Err(FleetError::Prefix(options.prefix));
        }
        shield.enable_fleet(defenra_shield::FleetOptions {
            limits: options.limits,
            ..defenra_shield::FleetOptions::default()
        });
        if let Some(waf) = &waf {
            waf.enable_fleet_dict(DICT_MAX_PENDING);
        }
        Ok(Arc::new(Fleet {
            id: agent_id(),
            local_key: Mutex::new(options.seed_key.clone()),
            options,
            shield,
            waf,
            stats: FleetStats::default(),
            key_to_publish: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// Publishes `key` as the fleet's key (an operator rotated it here: SIGHUP with a
    /// changed key file); every agent then rotates to it, keeping its previous key for the
    /// grace time. Returns at once; the link task sends it (when Redis is reachable again,
    /// if it is not now).
    pub fn publish_key(&self, key: &ShieldKey) {
        *self.key_to_publish.lock() = Some(key.clone());
        self.wake.notify_one();
    }

    /// The counters for `/stats` and `/metrics`.
    pub fn stats(&self) -> &FleetStats {
        &self.stats
    }

    /// Whether the link to Redis is up.
    pub fn is_up(&self) -> bool {
        self.stats.state() == LinkState::Up
    }

    /// The `fleet` object of `/health`: the link's state, since when, the last error, and
    /// where Redis is (without credentials).
    pub fn health(&self) -> serde_json::Value {
        self.stats.health(&self.options.target.display())
    }

    /// This agent's id among the fleet (random per process).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// 16 hex digits from the system's generator (or the clock and process id).
fn agent_id() -> String {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        bytes = (nanos ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
