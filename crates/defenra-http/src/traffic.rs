//! Per-domain traffic counters (for Core's Statistics page) and the bounded log of client
//! addresses (for its Clients page). The request path only bumps atomics and, for a client
//! not seen within the hour, takes one short lock to queue it.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Counters of one domain. Every route of the domain carries an `Arc` of them, and they
/// outlive reloads: the registry hands the same counters to the next route table.
#[derive(Debug, Default)]
pub struct DomainTraffic {
    requests: AtomicU64,
    /// Responses with a 5xx status (the agent's 502/504 and the origin's own).
    errors: AtomicU64,
    /// Bytes read from clients (TLS records included), attributed per connection.
    received_bytes: AtomicU64,
    /// Bytes written to clients (TLS records included).
    sent_bytes: AtomicU64,
    /// Origin exchanges timed, and their total time from the start of the exchange to the
    /// origin's response head.
    timed: AtomicU64,
    response_micros: AtomicU64,
}

/// A copy of one domain's counters; every field only grows while the domain is configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrafficTotals {
    pub requests: u64,
    pub errors: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    /// Responses whose time was measured (those that came from an origin).
    pub timed_responses: u64,
    pub response_micros: u64,
}

impl DomainTraffic {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.received_bytes.fetch_add(received, Relaxed);
        }
        if sent > 0 {
            self.sent_bytes.fetch_add(sent, Relaxed);
        }
    }

    /// An origin answered `elapsed` after the exchange started.
    pub(crate) fn responded_after(&self, elapsed: Duration) {
        self.timed.fetch_add(1, Relaxed);
        self.response_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    pub fn totals(&self) -> TrafficTotals {
        TrafficTotals {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            received_bytes: self.received_bytes.load(Relaxed),
            sent_bytes: self.sent_bytes.load(Relaxed),
            timed_responses: self.timed.load(Relaxed),
            response_micros: self.response_micros.load(Relaxed),
        }
    }
}

/// The counters of every configured domain, by name. Only reloads insert and remove (on
/// the config task); readers copy the `Arc`s out. Never locked on a request path.
#[derive(Debug, Default)]
pub(crate) struct TrafficRegistry {
    domains: Mutex<HashMap<String, Arc<DomainTraffic>>>,
}

impl TrafficRegistry {
    /// Hands out the counters of each of `names` (the same ones as last time for a domain
    /// that stays) and forgets the domains that are gone.
    pub(crate) fn reconcile<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, Arc<DomainTraffic>> {
        let mut domains = self.domains.lock();
        let mut kept = HashMap::new();
        for name in names {
            let traffic = domains.remove(name).unwrap_or_default();
            kept.insert(name.to_owned(), traffic);
        }
        *domains = kept.clone();
        kept
    }

    pub(crate) fn totals(&self) -> Vec<(String, TrafficTotals)> {
        let domains: Vec<(String, Arc<DomainTraffic>)> = self
            .domains
            .lock()
            .iter()
            .map(|(name, traffic)| (name.clone(), Arc::clone(traffic)))
            .collect();
        domains
            .into_iter()
            .map(|(name, traffic)| (name, traffic.totals()))
            .collect()
    }
}

/// A client address the proxy served, with the `User-Agent` of the request that queued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenClient {
    pub ip: IpAddr,
    pub user_agent: Option<Box<str>>,
}

/// Slots of the "seen within the hour" filter; a power of two.
const FILTER_SLOTS: usize = 16 * 1024;
/// A client is queued again at most this often (the filter is lossy, so sometimes sooner).
const REQUEUE_AFTER_MINUTES: u64 = 60;
/// Longest `User-Agent` kept.
const MAX_USER_AGENT: usize = 512;

/// Client addresses for Core's Clients page: a lossy, lock-free filter of addresses seen in
/// the last hour in front of a bounded queue (the oldest entry is dropped when it is full).
/// The reporter drains the queue off the request path.
#[derive(Debug)]
pub struct ClientLog {
    enabled: bool,
    capacity: usize,
    /// Per slot: the address's hash (high 40 bits) and the minute it was queued (low 24).
    recent: Box<[AtomicU64]>,
    hasher: RandomState,
    epoch: Instant,
    queue: Mutex<VecDeque<SeenClient>>,
    dropped: AtomicU64,
}

impl ClientLog {
    /// `capacity` entries at most; when `enabled` is false, [`ClientLog::note`] does nothing.
    pub fn new(enabled: bool, capacity: usize) -> Self {
        let slots = if enabled { FILTER_SLOTS } else { 0 };
        ClientLog {
            enabled,
            capacity: capacity.max(1),
            recent: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            queue: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Notes a request from `ip`. Only an address not queued within the hour costs more than
    /// a hash and an atomic load: then `user_agent` is called and the client queued.
    pub fn note<'a>(&self, ip: IpAddr, user_agent: impl FnOnce() -> Option<&'a [u8]>) {
        if !self.enabled {
            return;
        }
        let hash = self.hasher.hash_one(ip);
        let minute = (self.epoch.elapsed().as_secs() / 60) & 0xff_ffff;
        let tag = hash & !0xff_ffff;
        let slot = &self.recent[(hash as usize) & (FILTER_SLOTS - 1)];
        let current = slot.load(Relaxed);
        // The 24-bit minute wraps after 31 years; `wrapping_sub` keeps the age right anyway.
        if current != 0
            && current & !0xff_ffff == tag
            && minute.wrapping_sub(current & 0xff_ffff) & 0xff_ffff < REQUEUE_AFTER_MINUTES
        {
            return;
        }
        slot.store(tag | minute, Relaxed);
        let user_agent = user_agent().map(|bytes| {
            let bytes = &bytes[..bytes.len().min(MAX_USER_AGENT)];
            String::from_utf8_lossy(bytes).into_owned().into_boxed_str()
        });
        self.push(SeenClient { ip, user_agent });
    }

    fn push(&self, client: SeenClient) {
        let mut queue = self.queue.lock();
        if queue.len() >= self.capacity {
            queue.pop_front();
            self.dropped.fetch_add(1, Relaxed);
        }
        queue.push_back(client);
    }

    /// Takes up to `max` clients, oldest first.
    pub fn drain(&self, max: usize) -> Vec<SeenClient> {
        let mut queue = self.queue.lock();
        let n = max.min(queue.len());
        queue.drain(..n).collect()
    }

    /// Puts clients that could not be reported back at the front, as the oldest; when the
    /// queue is full they are the ones dropped.
    pub fn requeue(&self, clients: Vec<SeenClient>) {
        let mut queue = self.queue.lock();
        for client in clients.into_iter().rev() {
            if queue.len() >= self.capacity {
                self.dropped.fetch_add(1, Relaxed);
                continue;
            }
            queue.push_front(client);
        }
    }

    /// Clients dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Clients waiting to be reported.
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_a_reload_and_go_with_their_domain() {
        let registry = TrafficRegistry::default();
        let first = registry.reconcile(["a.test", "b.test"]);
        first["a.test"].request();
        first["a.test"].bytes(10, 20);
        let second = registry.reconcile(["a.test", "c.test"]);
        assert!(Arc::ptr_eq(&first["a.test"], &second["a.test"]));
        let mut totals = registry.totals();
        totals.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(totals.len(), 2, "b.test is gone");
        assert_eq!(totals[0].1.requests, 1);
        assert_eq!(totals[0].1.received_bytes, 10);
        assert_eq!(totals[1].1, TrafficTotals::default());
    }

    #[test]
    fn a_client_is_queued_once_within_the_hour_and_the_queue_drops_its_oldest() {
        let log = ClientLog::new(true, 3);
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        let mut asked = 0;
        for _ in 0..5 {
            log.note(ip(1), || {
                asked += 1;
                Some(b"curl/8".as_slice())
            });
        }
        assert_eq!(asked, 1, "the User-Agent is read for a new client only");
        for n in 2..=4 {
            log.note(ip(n), || None);
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.dropped(), 1);
        let drained = log.drain(2);
        assert_eq!(
            drained.iter().map(|c| c.ip).collect::<Vec<_>>(),
            vec![ip(2), ip(3)]
        );
        log.requeue(drained);
        assert_eq!(log.drain(10).len(), 3);
        assert!(log.is_empty());

        let off = ClientLog::new(false, 3);
        off.note(ip(1), || panic!("not asked when off"));
        assert!(off.is_empty());
    }

    #[test]
    fn user_agents_are_cut_and_made_text() {
        let log = ClientLog::new(true, 10);
        let long = vec![b'a'; 2000];
        log.note(IpAddr::from([10, 0, 0, 1]), || Some(long.as_slice()));
        log.note(IpAddr::from([10, 0, 0, 2]), || {
            Some(b"bad \xff byte".as_slice())
        });
        let clients = log.drain(10);
        assert_eq!(clients[0].user_agent.as_deref().map(str::len), Some(512));
        assert_eq!(clients[1].user_agent.as_deref(), Some("bad \u{fffd} byte"));
    }
}
