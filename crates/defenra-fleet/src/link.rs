//! The fleet's one background task: connect, resynchronise, then exchange state until the
//! link breaks; serve on local state and reconnect with backoff while it is down.
//!
//! While connected it waits on five things: a message of another agent (applied at once),
//! a ban made or lifted here (published at once), a key rotated here (published at once),
//! the sync tick (request counts, blocks and `ngx.shared.fleet` changes, every
//! `sync_interval`), and the reconcile tick (whole ban list and key, every
//! `reconcile_every`). A PING every second finds a Redis that stopped answering.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use defenra_config::Cidr;
use defenra_shield::{BanSource, DomainPolicy, FleetBanChange, FleetMerge, ShieldKey};
use defenra_waf::FleetDictOp;
use futures_util::StreamExt as _;
use redis::{RedisError, RedisResult, Script};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::message::{BanRecord, Event};
use crate::stats::{LinkState, unix_now, unix_now_ms};
use crate::store::{self, Conn, Keys};
use crate::{Fleet, target};

/// First wait before reconnecting; doubled after each failure up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A command every this often finds a Redis that stopped answering.
const PING_EVERY: Duration = Duration::from_secs(1);
/// `ngx.shared.fleet` commands in flight at once.
const DICT_CONCURRENCY: usize = 32;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

impl Fleet {
    /// Runs the link until `shutdown`: never returns early, whatever Redis does.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let keys = Keys::new(&self.options.prefix);
        let mut backoff = BACKOFF_MIN;
        let mut ever_up = false;
        loop {
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                connected = store::connect(&self.options.target, self.options.timeout, &keys.channel) => connected,
            };
            match connected {
                Ok((conn, stream)) => {
                    if ever_up {
                        self.stats.reconnects.fetch_add(1, Relaxed);
                        info!(redis = %self.options.target.display(), "redis reachable again: resynchronising bans and the shield key");
                    } else {
                        info!(redis = %self.options.target.display(), agent = %self.id, "fleet link up");
                    }
                    ever_up = true;
                    backoff = BACKOFF_MIN;
                    self.stats.set_state(LinkState::Up, None);
                    let mut session = Session {
                        fleet: &self,
                        keys: &keys,
                        conn,
                        scripts: Scripts::new(),
                    };
                    match session.serve(stream, &shutdown).await {
                        Ok(()) => return,
                        Err(error) => self.went_down(&error),
                    }
                }
                Err(error) => self.went_down(&error),
            }
            // Down: counts and blocks that are due stay local (stale ones would wrongly
            // block later); bans and dictionary changes wait for the reconnection.
            let waited = tokio::time::sleep(backoff);
            tokio::pin!(waited);
            let mut discard = tokio::time::interval(self.options.sync_interval);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = &mut waited => break,
                    _ = discard.tick() => {
                        let deltas = self.shield.take_fleet_deltas();
                        let n = deltas.counts.len() + deltas.blocks.len();
                        self.stats.dropped.fetch_add(n as u64 + deltas.dropped, Relaxed);
                    }
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Notes that the link broke (or never came up), logging only when the state changes.
    fn went_down(&self, failure: &RedisError) {
        self.stats.errors.fetch_add(1, Relaxed);
        let redis = self.options.target.display();
        let message = target_free(failure);
        if is_auth_failure(failure) {
            if self
                .stats
                .set_state(LinkState::Unauthorised, Some(message.clone()))
            {
                error!(%redis, error = %message, "redis refused the credentials of --redis-url: check the user and password; serving with this agent's own state, retrying in the background");
            }
        } else if self.stats.set_state(LinkState::Down, Some(message.clone())) {
            warn!(%redis, error = %message, "redis unreachable: serving with this agent's own state, reconnecting in the background");
        } else {
            debug!(%redis, error = %message, "redis still unreachable");
        }
    }
}

/// The scripts, hashed once.
struct Scripts {
    ban: Script,
    unban: Script,
    incr: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            ban: Script::new(store::BAN_SCRIPT),
            unban: Script::new(store::UNBAN_SCRIPT),
            incr: Script::new(store::INCR_SCRIPT),
        }
    }
}

/// One connection's life.
struct Session<'f> {
    fleet: &'f Fleet,
    keys: &'f Keys,
    conn: Conn,
    scripts: Scripts,
}

impl Session<'_> {
    /// Until `shutdown` (`Ok`) or until the link breaks (the error).
    async fn serve(
        &mut self,
        mut stream: redis::aio::PubSubStream,
        shutdown: &CancellationToken,
    ) -> RedisResult<()> {
        let fleet = self.fleet;
        let mut bans = fleet.shield.ban_changes();
        bans.borrow_and_update();
        self.reconcile().await?;
        let mut sync = tokio::time::interval(fleet.options.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconcile = tokio::time::interval_at(
            tokio::time::Instant::now() + fleet.options.reconcile_every,
            fleet.options.reconcile_every,
        );
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                message = stream.next() => match message {
                    Some(message) => self.receive(message.get_payload_bytes()).await?,
                    None => return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the subscription connection closed",
                    ))),
                },
                changed = bans.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.flush_bans().await?;
                }
                () = fleet.wake.notified() => self.flush_key().await?,
                _ = sync.tick() => self.sync().await?,
                _ = reconcile.tick() => self.reconcile().await?,
                _ = ping.tick() => {
                    let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut self.conn).await;
                    self.soft(pong)?;
                }
            }
        }
    }

    /// A failed command that leaves the link usable (a server error) is counted and
    /// logged; one that shows the link broken is returned.
    fn soft<T>(&self, result: RedisResult<T>) -> RedisResult<Option<T>> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(error) if breaks_link(&error) => Err(error),
            Err(error) => {
                self.fleet.stats.errors.fetch_add(1, Relaxed);
                debug!(error = %target_free(&error), "redis command failed");
                Ok(None)
            }
        }
    }

    async fn publish(&mut self, mut event: Event) -> RedisResult<()> {
        if event.is_empty() {
            return Ok(());
        }
        event.from = self.fleet.id.clone();
        event.at = unix_now_ms();
        let Ok(payload) = serde_json::to_vec(&event) else {
            return Ok(());
        };
        let published: RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&self.keys.channel)
            .arg(payload)
            .query_async(&mut self.conn)
            .await;
        if self.soft(published)?.is_some() {
            self.fleet.stats.publishes.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Another agent's message: applied here, none of it noted for publishing again.
    async fn receive(&mut self, payload: &[u8]) -> RedisResult<()> {
        let fleet = self.fleet;
        let event: Event = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(error) => {
                fleet.stats.errors.fetch_add(1, Relaxed);
                debug!(%error, "a fleet message that is not one was ignored");
                return Ok(());
            }
        };
        if event.from == fleet.id {
            return Ok(());
        }
        fleet.stats.received.fetch_add(1, Relaxed);
        let shield = &fleet.shield;
        for record in &event.bans {
            let Ok(cidr) = record.cidr.parse::<Cidr>() else {
                continue;
            };
            if let Ok(true) = shield.apply_fleet_ban(cidr, record.expires_at, &record.reason) {
                fleet.stats.bans_applied.fetch_add(1, Relaxed);
            }
        }
        for text in &event.unbans {
            if let Ok(cidr) = text.parse::<Cidr>()
                && shield.apply_fleet_unban(&cidr)
            {
                fleet.stats.bans_applied.fetch_add(1, Relaxed);
            }
        }
        let mut policies: HashMap<String, Option<Arc<DomainPolicy>>> = HashMap::new();
        let mut policy_of = |domain: &String| {
            policies
                .entry(domain.clone())
                .or_insert_with(|| shield.fleet_policy(domain))
                .clone()
        };
        for (domain, client, requests) in &event.counts {
            let (Some(policy), Ok(client)) = (policy_of(domain), client.parse::<IpAddr>()) else {
                continue;
            };
            fleet.stats.requests_merged.fetch_add(1, Relaxed);
            if shield.merge_fleet_requests(&policy, client, *requests) == FleetMerge::Blocked {
                fleet.stats.blocks_by_merge.fetch_add(1, Relaxed);
            }
        }
        for (domain, client, until) in &event.blocks {
            let (Some(policy), Ok(client)) = (policy_of(domain), client.parse::<IpAddr>()) else {
                continue;
            };
            if shield.apply_fleet_block(&policy, client, *until) {
                fleet.stats.blocks_applied.fetch_add(1, Relaxed);
            }
        }
        if let Some(waf) = &fleet.waf {
            for (domain, key, value, ttl_ms) in &event.dict {
                let Ok(key) = BASE64.decode(key) else {
                    continue;
                };
                let value = match value {
                    Some(value) => match BASE64.decode(value) {
                        Ok(bytes) => Some(store::decode_value(&bytes)),
                        Err(_) => continue,
                    },
                    None => None,
                };
                waf.apply_fleet_dict_value(domain, &key, value, *ttl_ms);
            }
        }
        fleet.stats.lag(unix_now_ms().saturating_sub(event.at));
        if event.key.is_some() {
            self.adopt_key().await?;
        }
        Ok(())
    }

    /// Publishes the bans made and lifted here since the last call; compares whole lists
    /// when some were left out.
    async fn flush_bans(&mut self) -> RedisResult<()> {
        if self.publish_ban_changes().await? {
            self.reconcile().await?;
        }
        Ok(())
    }

    /// Stores `records` in Redis, [`store::BANS_PER_SCRIPT`] per script run.
    async fn store_bans(&mut self, records: &[BanRecord]) -> RedisResult<()> {
        for batch in records.chunks(store::BANS_PER_SCRIPT) {
            let mut invocation = self.scripts.ban.prepare_invoke();
            invocation
                .key(&self.keys.bans)
                .key(&self.keys.ban_expiry)
                .key(&self.keys.lifted)
                .arg(unix_now());
            for record in batch {
                let Ok(json) = serde_json::to_string(record) else {
                    continue;
                };
                let end = record
                    .expires_at
                    .map_or_else(|| "+inf".to_owned(), |at| at.to_string());
                invocation.arg(&record.cidr).arg(json).arg(end);
            }
            let stored: RedisResult<i64> = invocation.invoke_async(&mut self.conn).await;
            self.soft(stored)?;
        }
        Ok(())
    }

    /// Both ways: the fleet's bans are applied here; this agent's own bans that Redis lacks
    /// (made while it was unreachable, or lost by a Redis restart) are published; fleet
    /// bans held here that Redis remembers as lifted are lifted. Then the key.
    async fn reconcile(&mut self) -> RedisResult<()> {
        let fleet = self.fleet;
        fleet.stats.reconciles.fetch_add(1, Relaxed);
        self.flush_key().await?;
        self.publish_ban_changes().await?;
        let read: RedisResult<(HashMap<String, String>, Vec<String>)> = redis::pipe()
            .hgetall(&self.keys.bans)
            .zrange(&self.keys.lifted, 0, -1)
            .query_async(&mut self.conn)
            .await;
        let Some((records, lifted)) = self.soft(read)? else {
            return Ok(());
        };
        let now = unix_now();
        let mut in_fleet = HashSet::new();
        for (text, json) in records {
            let (Ok(cidr), Ok(record)) = (
                text.parse::<Cidr>(),
                serde_json::from_str::<BanRecord>(&json),
            ) else {
                continue;
            };
            if record.expires_at.is_some_and(|at| at <= now) {
                continue;
            }
            in_fleet.insert(cidr);
            if let Ok(true) = fleet
                .shield
                .apply_fleet_ban(cidr, record.expires_at, &record.reason)
            {
                fleet.stats.bans_applied.fetch_add(1, Relaxed);
            }
        }
        let lifted: HashSet<Cidr> = lifted.iter().filter_map(|text| text.parse().ok()).collect();
        let mut event = Event::default();
        for ban in fleet.shield.bans() {
            if in_fleet.contains(&ban.cidr) {
                continue;
            }
            let own = matches!(ban.source, BanSource::Escalation | BanSource::Operator);
            if !own && lifted.contains(&ban.cidr) {
                if fleet.shield.apply_fleet_unban(&ban.cidr) {
                    fleet.stats.bans_applied.fetch_add(1, Relaxed);
                }
                continue;
            }
            event.bans.push(BanRecord {
                cidr: ban.cidr.to_string(),
                reason: ban.reason.to_string(),
                source: ban.source.as_str().to_owned(),
                expires_at: ban.remaining.map(|left| now + left.as_secs().max(1)),
            });
        }
        self.store_bans(&event.bans).await?;
        let n = event.bans.len();
        self.publish(event).await?;
        fleet.stats.bans_published.fetch_add(n as u64, Relaxed);
        self.adopt_key().await
    }

    /// Stores and publishes the bans made and lifted here since the last call; true when
    /// some were left out (the journal overflowed).
    async fn publish_ban_changes(&mut self) -> RedisResult<bool> {
        let changes = self.fleet.shield.take_fleet_ban_changes();
        // Changes go out in order: a batch ends before a second change of one prefix (a ban
        // lifted right after it was made must stay lifted everywhere).
        let mut batch = Event::default();
        let mut in_batch = HashSet::new();
        for change in changes.changes {
            let cidr = match &change {
                FleetBanChange::Banned { cidr, .. } | FleetBanChange::Lifted { cidr } => *cidr,
            };
            if !in_batch.insert(cidr) {
                self.send_ban_batch(std::mem::take(&mut batch)).await?;
                in_batch.clear();
                in_batch.insert(cidr);
            }
            match change {
                FleetBanChange::Banned {
                    cidr,
                    reason,
                    source,
                    expires_unix,
                } => batch.bans.push(BanRecord {
                    cidr: cidr.to_string(),
                    reason: reason.to_string(),
                    source: source.as_str().to_owned(),
                    expires_at: expires_unix,
                }),
                FleetBanChange::Lifted { cidr } => batch.unbans.push(cidr.to_string()),
            }
        }
        self.send_ban_batch(batch).await?;
        Ok(changes.overflowed)
    }

    /// Stores a batch of bans and lifts (no prefix twice) in Redis and publishes it.
    async fn send_ban_batch(&mut self, batch: Event) -> RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.store_bans(&batch.bans).await?;
        for cidr in &batch.unbans {
            let lifted: RedisResult<i64> = self
                .scripts
                .unban
                .key(&self.keys.bans)
                .key(&self.keys.ban_expiry)
                .key(&self.keys.lifted)
                .arg(cidr)
                .arg(unix_now())
                .arg(store::LIFTED_KEPT.as_secs())
                .invoke_async(&mut self.conn)
                .await;
            self.soft(lifted)?;
        }
        let n = batch.bans.len() + batch.unbans.len();
        self.publish(batch).await?;
        self.fleet.stats.bans_published.fetch_add(n as u64, Relaxed);
        Ok(())
    }

    /// The fleet's key: this agent's current key if Redis has none yet (`SET NX`: the first
    /// agent decides), else Redis's, which this agent rotates to when it differs.
    async fn adopt_key(&mut self) -> RedisResult<()> {
        let fleet = self.fleet;
        let seed = fleet.local_key.lock().clone();
        if let Some(seed) = &seed {
            let set: RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&self.keys.shield_key)
                .arg(seed.to_hex())
                .arg("NX")
                .query_async(&mut self.conn)
                .await;
            if let Some(Some(_)) = self.soft(set)? {
                info!(key = %seed.fingerprint(), "this agent's shield key is now the fleet's");
                // Agents that looked before it was there learn of it now.
                return self
                    .publish(Event {
                        key: Some(seed.fingerprint().to_string()),
                        ..Event::default()
                    })
                    .await;
            }
        }
        let stored: RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
            .arg(&self.keys.shield_key)
            .query_async(&mut self.conn)
            .await;
        let Some(Some(stored)) = self.soft(stored)? else {
            return Ok(());
        };
        let Some(key) = ShieldKey::from_text(&stored) else {
            fleet.stats.errors.fetch_add(1, Relaxed);
            warn!(key = %self.keys.shield_key, "the fleet's shield key in Redis is not a key; keeping this agent's");
            return Ok(());
        };
        let previous = fleet.shield.keys().current();
        if key.fingerprint() == previous {
            return Ok(());
        }
        fleet.shield.rotate_key(&key);
        fleet.stats.key_rotations.fetch_add(1, Relaxed);
        info!(key = %key.fingerprint(), %previous, "shield key taken from the fleet (the previous one stays accepted for the grace time)");
        *fleet.local_key.lock() = Some(key.clone());
        if let Some(path) = fleet.options.owned_key_file.clone() {
            let saved =
                tokio::task::spawn_blocking(move || key.replace_file(&path).map(|()| path)).await;
            match saved {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    warn!(%error, "cannot save the fleet's shield key in the state directory")
                }
                Err(error) => {
                    warn!(%error, "cannot save the fleet's shield key in the state directory")
                }
            }
        }
        Ok(())
    }

    /// A key rotated here (SIGHUP): it becomes the fleet's, and the others are told.
    async fn flush_key(&mut self) -> RedisResult<()> {
        let Some(key) = self.fleet.key_to_publish.lock().clone() else {
            return Ok(());
        };
        let set: RedisResult<String> = redis::cmd("SET")
            .arg(&self.keys.shield_key)
            .arg(key.to_hex())
            .query_async(&mut self.conn)
            .await;
        if self.soft(set)?.is_none() {
            return Ok(());
        }
        {
            let mut waiting = self.fleet.key_to_publish.lock();
            if waiting
                .as_ref()
                .is_some_and(|waiting| waiting.fingerprint() == key.fingerprint())
            {
                *waiting = None;
            }
        }
        *self.fleet.local_key.lock() = Some(key.clone());
        info!(key = %key.fingerprint(), "shield key published to the fleet");
        self.publish(Event {
            key: Some(key.fingerprint().to_string()),
            ..Event::default()
        })
        .await
    }

    /// Every `sync_interval`: request counts, blocks and `ngx.shared.fleet` changes.
    async fn sync(&mut self) -> RedisResult<()> {
        let fleet = self.fleet;
        let deltas = fleet.shield.take_fleet_deltas();
        fleet.stats.dropped.fetch_add(deltas.dropped, Relaxed);
        let mut event = Event {
            counts: deltas
                .counts
                .into_iter()
                .map(|count| {
                    (
                        count.domain.to_string(),
                        count.client.to_string(),
                        count.requests,
                    )
                })
                .collect(),
            blocks: deltas
                .blocks
                .into_iter()
                .map(|block| {
                    (
                        block.domain.to_string(),
                        block.client.to_string(),
                        block.until_unix,
                    )
                })
                .collect(),
            ..Event::default()
        };
        if let Some(waf) = &fleet.waf {
            let changes = waf.take_fleet_dict_changes();
            fleet.stats.dropped.fetch_add(changes.dropped, Relaxed);
            fleet
                .stats
                .dict_operations
                .fetch_add(changes.changes.len() as u64, Relaxed);
            let incr = &self.scripts.incr;
            let results: Vec<RedisResult<Option<DictResult>>> =
                futures_util::stream::iter(changes.changes)
                    .map(|change| {
                        let conn = self.conn.clone();
                        dict_operation(conn, self.keys, incr, change)
                    })
                    .buffer_unordered(DICT_CONCURRENCY)
                    .collect()
                    .await;
            for result in results {
                let Some(Some(result)) = self.soft(result)? else {
                    continue;
                };
                let value = result.stored.as_deref().map(store::decode_value);
                if result.apply_here {
                    waf.apply_fleet_dict_value(&result.domain, &result.key, value, result.ttl_ms);
                }
                if result.tell_others {
                    event.dict.push((
                        result.domain,
                        BASE64.encode(&result.key),
                        result.stored.map(|stored| BASE64.encode(stored)),
                        result.ttl_ms,
                    ));
                }
            }
        }
        self.publish(event).await
    }
}

/// The fleet's value of one `ngx.shared.fleet` key after an operation.
struct DictResult {
    domain: String,
    key: Box<[u8]>,
    /// As stored in Redis; `None`: Redis has no such key.
    stored: Option<Vec<u8>>,
    ttl_ms: u64,
    /// Store it in this agent's cache (it may differ from what the script wrote here).
    apply_here: bool,
    /// The fleet's value changed: tell the other agents.
    tell_others: bool,
}

async fn dict_operation(
    mut conn: Conn,
    keys: &Keys,
    incr: &Script,
    change: defenra_waf::FleetDictChange,
) -> RedisResult<Option<DictResult>> {
    let name = keys.dict(&change.domain, &change.key);
    let result = |stored, ttl_ms, apply_here, tell_others| {
        Some(DictResult {
            domain: change.domain.clone(),
            key: change.key.clone(),
            stored,
            ttl_ms,
            apply_here,
            tell_others,
        })
    };
    match &change.op {
        FleetDictOp::Set { value: None, .. } => {
            let _: i64 = redis::cmd("DEL").arg(&name).query_async(&mut conn).await?;
            Ok(result(None, 0, false, true))
        }
        FleetDictOp::Set {
            value: Some(value),
            ttl_ms,
        } => {
            let stored = store::encode_value(value);
            let mut set = redis::cmd("SET");
            set.arg(&name).arg(&stored);
            if *ttl_ms > 0 {
                set.arg("PX").arg(*ttl_ms);
            }
            let _: String = set.query_async(&mut conn).await?;
            Ok(result(Some(stored), *ttl_ms, false, true))
        }
        FleetDictOp::Add { value, ttl_ms } => {
            let stored = store::encode_value(value);
            let mut pipe = redis::pipe();
            let set = pipe.cmd("SET").arg(&name).arg(&stored).arg("NX");
            if *ttl_ms > 0 {
                set.arg("PX").arg(*ttl_ms);
            }
            pipe.cmd("GET").arg(&name).cmd("PTTL").arg(&name);
            let (added, now, pttl): (Option<String>, Option<Vec<u8>>, i64) =
                pipe.query_async(&mut conn).await?;
            let added = added.is_some();
            Ok(result(now, store::ttl_from_pttl(pttl), !added, added))
        }
        FleetDictOp::Incr {
            delta,
            init,
            init_ttl_ms,
        } => {
            let answer: Option<(Vec<u8>, i64)> = incr
                .key(&name)
                .arg(format!("{delta}"))
                .arg(init.map_or_else(String::new, |init| format!("{init}")))
                .arg(*init_ttl_ms)
                .invoke_async(&mut conn)
                .await?;
            Ok(answer.and_then(|(stored, pttl)| {
                result(Some(stored), store::ttl_from_pttl(pttl), true, true)
            }))
        }
        FleetDictOp::Fetch => {
            let (stored, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
                .cmd("GET")
                .arg(&name)
                .cmd("PTTL")
                .arg(&name)
                .query_async(&mut conn)
                .await?;
            Ok(result(stored, store::ttl_from_pttl(pttl), true, false))
        }
    }
}

/// Errors that mean the connection is gone or Redis does not answer.
fn breaks_link(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || is_auth_failure(error)
}

fn is_auth_failure(error: &RedisError) -> bool {
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
    let text = error.to_string();
    text.contains("WRONGPASS") || text.contains("NOAUTH") || text.contains("NOPERM")
}

/// The error's text with any URL credentials in it hidden.
fn target_free(error: &RedisError) -> String {
    let text = error.to_string();
    text.split(' ')
        .map(|word| {
            if word.contains("://") {
                target::redact(word)
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
