//! `ngx.shared.fleet`: the dictionary a fleet of agents shares. Here it is an ordinary
//! dictionary (the local cache every script call reads and writes) that, once the host
//! enabled the fleet, also notes each change for the host's background task to carry to
//! the fleet's store, and takes the values the fleet sends back.
//!
//! What is noted is coalesced per key (a burst of `incr` on one counter is one summed
//! delta), under the dictionary's own lock, and bounded: past `max_pending` keys a change
//! applies here only and is counted as dropped; fetches of missed keys stop at a tenth of it.

use std::collections::HashMap;

use super::{Dict, DictValue, Lru, expiry};

/// The reserved dictionary name.
pub const FLEET_DICT: &str = "fleet";

/// A change of `ngx.shared.fleet` to carry to the fleet, coalesced since the last drain.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetDictOp {
    /// `set` (`value: None`: `delete`) with a TTL in milliseconds (0: none).
    Set {
        value: Option<DictValue>,
        ttl_ms: u64,
    },
    /// `add`: the value, unless the fleet has the key already.
    Add { value: DictValue, ttl_ms: u64 },
    /// `incr`: add `delta`; a key the fleet lacks starts from `init` (none: nothing is
    /// created) with `init_ttl_ms`.
    Incr {
        delta: f64,
        init: Option<f64>,
        init_ttl_ms: u64,
    },
    /// A `get` found nothing here: fetch the fleet's value.
    Fetch,
}

/// One key's change, with the domain whose dictionary it is.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetDictChange {
    pub domain: String,
    pub key: Box<[u8]>,
    pub op: FleetDictOp,
}

/// The changes of every domain's `ngx.shared.fleet` since the last drain.
#[derive(Debug, Default)]
pub struct FleetDictChanges {
    pub changes: Vec<FleetDictChange>,
    /// Changes that applied here only because a dictionary had `max_pending` keys waiting.
    pub dropped: u64,
}

/// A key and the change waiting for it.
pub(crate) type KeyOp = (Box<[u8]>, FleetDictOp);

/// The changes waiting in one dictionary; lives inside its LRU's lock.
pub(super) struct Pending {
    ops: HashMap<Box<[u8]>, FleetDictOp>,
    max_keys: usize,
    dropped: u64,
}

impl Pending {
    pub(super) fn new(max_keys: usize) -> Pending {
        Pending {
            ops: HashMap::new(),
            max_keys: max_keys.max(1),
            dropped: 0,
        }
    }

    /// Notes `op` on `key`, merged with what waits for it; `current` is the key's value
    /// here after the operation (and `ttl_ms` its remaining lifetime), which a write still
    /// waiting absorbs an `incr` into.
    pub(super) fn note(&mut self, key: &[u8], op: FleetDictOp, current: Option<(&DictValue, u64)>) {
        if let Some(waiting) = self.ops.get_mut(key) {
            let merged = match (std::mem::replace(waiting, FleetDictOp::Fetch), op) {
                // A fetch never replaces a change, and a change replaces a fetch.
                (previous, FleetDictOp::Fetch) => previous,
                (FleetDictOp::Fetch, op) => op,
                (_, set @ FleetDictOp::Set { .. }) => set,
                // Deleted, then added: a write of the value.
                (FleetDictOp::Set { .. }, FleetDictOp::Add { value, ttl_ms }) => FleetDictOp::Set {
                    value: Some(value),
                    ttl_ms,
                },
                (_, add @ FleetDictOp::Add { .. }) => add,
                (
                    FleetDictOp::Incr {
                        delta: before,
                        init,
                        init_ttl_ms,
                    },
                    FleetDictOp::Incr { delta, .. },
                ) => FleetDictOp::Incr {
                    delta: before + delta,
                    init,
                    init_ttl_ms,
                },
                // A write still waiting takes the counter's value here.
                (FleetDictOp::Set { ttl_ms, .. }, FleetDictOp::Incr { .. }) => FleetDictOp::Set {
                    value: current.map(|(value, _)| value.clone()),
                    ttl_ms: current.map_or(ttl_ms, |(_, ttl)| ttl),
                },
                (FleetDictOp::Add { ttl_ms, value }, FleetDictOp::Incr { .. }) => {
                    FleetDictOp::Add {
                        value: current.map_or(value, |(value, _)| value.clone()),
                        ttl_ms: current.map_or(ttl_ms, |(_, ttl)| ttl),
                    }
                }
            };
            *waiting = merged;
            return;
        }
        // Fetches (a `get` that missed) get a tenth of the room: a script looking up every
        // client address in a flood must not turn each miss into Redis traffic.
        let room = match op {
            FleetDictOp::Fetch => (self.max_keys / 10).max(1),
            _ => self.max_keys,
        };
        if self.ops.len() >= room {
            self.dropped += 1;
            return;
        }
        self.ops.insert(key.into(), op);
    }
}

impl Dict {
    /// Notes a change for the fleet, when this is a fleet dictionary.
    pub(super) fn note_fleet(&self, lru: &mut Lru, key: &[u8], op: FleetDictOp, now: u64) {
        let Some(mut pending) = lru.pending.take() else {
            return;
        };
        let current = lru.map.get(key).map(|&slot| {
            let entry = &lru.slots[slot];
            let ttl = match entry.expires_ms {
                0 => 0,
                at => at.saturating_sub(now).max(1),
            };
            (entry.value.clone(), ttl)
        });
        pending.note(key, op, current.as_ref().map(|(value, ttl)| (value, *ttl)));
        lru.pending = Some(pending);
    }

    /// Hands over (and forgets) the changes waiting; `None` for a dictionary that is not a
    /// fleet dictionary.
    pub(crate) fn take_fleet(&self) -> Option<(Vec<KeyOp>, u64)> {
        let mut lru = self.lru.lock();
        let pending = lru.pending.as_mut()?;
        let ops = std::mem::take(&mut pending.ops).into_iter().collect();
        Some((ops, std::mem::take(&mut pending.dropped)))
    }

    /// Stores the fleet's `value` of `key` (`None`: the fleet has none) with `ttl_ms` (0:
    /// none) in this cache. An `incr` still waiting here is added on top; a write still
    /// waiting wins (it reaches the fleet next). False when nothing was stored.
    pub(crate) fn apply_fleet(&self, key: &[u8], value: Option<DictValue>, ttl_ms: u64) -> bool {
        if super::check_key(key).is_err() {
            return false;
        }
        let now = self.clock.monotonic_ms();
        let mut lru = self.lru.lock();
        let waiting = lru
            .pending
            .as_ref()
            .and_then(|pending| pending.ops.get(key))
            .cloned();
        let value = match (waiting, value) {
            (Some(FleetDictOp::Set { .. } | FleetDictOp::Add { .. }), _) => return false,
            (Some(FleetDictOp::Incr { delta, .. }), Some(DictValue::Number(number))) => {
                Some(DictValue::Number(number + delta))
            }
            (Some(FleetDictOp::Fetch), value) => {
                if let Some(pending) = lru.pending.as_mut() {
                    pending.ops.remove(key);
                }
                value
            }
            (_, value) => value,
        };
        if let Some(&slot) = lru.map.get(key) {
            lru.remove(slot);
        }
        match value {
            Some(value) => self
                .insert_locked(&mut lru, key, value, expiry(now, ttl_ms), now)
                .is_ok(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;
    use crate::dict::SharedDicts;

    fn dicts() -> (SharedDicts, Clock) {
        let clock = Clock::manual(1_000_000);
        let dicts = SharedDicts::new(16, 1 << 20, clock.clone());
        dicts.enable_fleet(100);
        (dicts, clock)
    }

    fn number(value: f64) -> DictValue {
        DictValue::Number(value)
    }

    fn drained(dicts: &SharedDicts) -> Vec<(String, String, FleetDictOp)> {
        let mut changes: Vec<_> = dicts
            .take_fleet()
            .changes
            .into_iter()
            .map(|change| {
                (
                    change.domain,
                    String::from_utf8(change.key.into()).expect("utf-8"),
                    change.op,
                )
            })
            .collect();
        changes.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        changes
    }

    #[test]
    fn changes_are_noted_per_key_and_coalesced() {
        let (dicts, _clock) = dicts();
        let fleet = dicts.get_or_create("a.test", FLEET_DICT).expect("dict");
        for _ in 0..5 {
            fleet.incr(b"hits", 1.0, Some(0.0), 60_000).expect("incr");
        }
        fleet
            .set(b"mode", Some(DictValue::Str(Box::from(&b"strict"[..]))), 0)
            .expect("set");
        fleet
            .add(b"once", DictValue::Bool(true), 10_000)
            .expect("add");
        fleet.delete(b"gone");
        assert_eq!(fleet.get(b"unknown"), None);
        // Another domain's fleet dictionary is apart; other names are not shared at all.
        let other = dicts.get_or_create("b.test", FLEET_DICT).expect("dict");
        other.incr(b"hits", 2.0, Some(0.0), 0).expect("incr");
        let local = dicts.get_or_create("a.test", "cache").expect("dict");
        local.set(b"x", Some(number(1.0)), 0).expect("set");
        assert_eq!(
            drained(&dicts),
            [
                (
                    "a.test".into(),
                    "gone".into(),
                    FleetDictOp::Set {
                        value: None,
                        ttl_ms: 0
                    }
                ),
                (
                    "a.test".into(),
                    "hits".into(),
                    FleetDictOp::Incr {
                        delta: 5.0,
                        init: Some(0.0),
                        init_ttl_ms: 60_000
                    }
                ),
                (
                    "a.test".into(),
                    "mode".into(),
                    FleetDictOp::Set {
                        value: Some(DictValue::Str(Box::from(&b"strict"[..]))),
                        ttl_ms: 0
                    }
                ),
                (
                    "a.test".into(),
                    "once".into(),
                    FleetDictOp::Add {
                        value: DictValue::Bool(true),
                        ttl_ms: 10_000
                    }
                ),
                ("a.test".into(), "unknown".into(), FleetDictOp::Fetch),
                (
                    "b.test".into(),
                    "hits".into(),
                    FleetDictOp::Incr {
                        delta: 2.0,
                        init: Some(0.0),
                        init_ttl_ms: 0
                    }
                ),
            ]
        );
        assert!(drained(&dicts).is_empty(), "drained");
    }

    #[test]
    fn an_incr_after_a_waiting_write_becomes_a_write_of_the_value() {
        let (dicts, _clock) = dicts();
        let fleet = dicts.get_or_create("a.test", FLEET_DICT).expect("dict");
        fleet.set(b"n", Some(number(10.0)), 30_000).expect("set");
        fleet.incr(b"n", 3.0, None, 0).expect("incr");
        assert_eq!(
            drained(&dicts),
            [(
                "a.test".into(),
                "n".into(),
                FleetDictOp::Set {
                    value: Some(number(13.0)),
                    ttl_ms: 30_000
                }
            )]
        );
    }

    #[test]
    fn the_fleets_values_land_in_the_cache_with_waiting_deltas_on_top() {
        let (dicts, clock) = dicts();
        let fleet = dicts.get_or_create("a.test", FLEET_DICT).expect("dict");
        fleet.incr(b"hits", 1.0, Some(0.0), 0).expect("incr");
        dicts.take_fleet();
        // Two more here while the fleet answers 10 for the one sent.
        fleet.incr(b"hits", 2.0, None, 0).expect("incr");
        assert!(dicts.apply_fleet("a.test", b"hits", Some(number(10.0)), 5_000));
        assert_eq!(fleet.get(b"hits"), Some(number(12.0)));
        assert_eq!(fleet.ttl_ms(b"hits"), Ok(5_000));
        // A write waiting here is not overwritten by an older fleet value.
        fleet.set(b"mode", Some(number(1.0)), 0).expect("set");
        assert!(!dicts.apply_fleet("a.test", b"mode", Some(number(2.0)), 0));
        assert_eq!(fleet.get(b"mode"), Some(number(1.0)));
        // A missed get is answered; a key the fleet lacks is removed here.
        dicts.take_fleet();
        assert_eq!(fleet.get(b"seen-elsewhere"), None);
        assert!(dicts.apply_fleet("a.test", b"seen-elsewhere", Some(number(4.0)), 0));
        assert_eq!(fleet.get(b"seen-elsewhere"), Some(number(4.0)));
        assert!(dicts.apply_fleet("a.test", b"seen-elsewhere", None, 0));
        assert_eq!(fleet.get(b"seen-elsewhere"), None);
        // TTLs run on the local clock from the fleet's remaining time.
        assert!(dicts.apply_fleet("a.test", b"short", Some(number(1.0)), 1_000));
        clock.advance(Duration::from_millis(1_001));
        assert_eq!(fleet.get(b"short"), None);
        // Values for a domain without a fleet dictionary here are not kept.
        assert!(!dicts.apply_fleet("b.test", b"hits", Some(number(1.0)), 0));
    }

    #[test]
    fn waiting_changes_are_bounded() {
        let clock = Clock::manual(0);
        let dicts = SharedDicts::new(16, 16 << 20, clock);
        dicts.enable_fleet(10);
        let fleet: Arc<Dict> = dicts.get_or_create("a.test", FLEET_DICT).expect("dict");
        for n in 0..1000 {
            fleet
                .incr(format!("k{n}").as_bytes(), 1.0, Some(0.0), 0)
                .expect("incr");
        }
        let taken = dicts.take_fleet();
        assert_eq!(taken.changes.len(), 10);
        assert_eq!(taken.dropped, 990);
        assert_eq!(
            fleet.get(b"k999"),
            Some(number(1.0)),
            "applied here all the same"
        );
    }

    #[test]
    fn without_a_fleet_nothing_is_noted() {
        let dicts = SharedDicts::new(16, 1 << 20, Clock::manual(0));
        let fleet = dicts.get_or_create("a.test", FLEET_DICT).expect("dict");
        fleet.incr(b"hits", 1.0, Some(0.0), 0).expect("incr");
        assert!(dicts.take_fleet().changes.is_empty());
    }
}
