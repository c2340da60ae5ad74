//! Traffic and client reports to Core after each successful poll: per-domain and per-proxy
//! deltas to `/api/statistics`, client addresses to `/api/clients`.
//!
//! The services only count, on atomics (and queue new client addresses in a bounded log).
//! This task reads those counters, keeps what it has not reported yet, and sends on the
//! blocking pool, never on a service thread and never holding anything a request needs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use defenra_config::stats::{Metric, StatsSource};
use defenra_config::wire::{ClientReport, TrafficReport};
use defenra_config::{CoreReporter, L4Protocol, ReportError, SnapshotCell};
use defenra_geo::GeoDatabase;
use defenra_http::{ClientLog, HttpService, SeenClient};
use defenra_l4::L4Stats;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Client addresses reported per cycle at most; the rest wait in the queue.
pub(crate) const MAX_CLIENTS_PER_CYCLE: usize = 500;
/// A client address is reported again after this long.
const CLIENT_PERIOD: Duration = Duration::from_secs(3600);

/// A resource's counters at one moment, or the difference between two moments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) inbound: u64,
    pub(crate) outbound: u64,
    /// Responses (or destination connects) timed, and their total time.
    pub(crate) timed: u64,
    pub(crate) micros: u64,
}

impl Counts {
    fn fields(&self) -> [u64; 6] {
        [
            self.requests,
            self.errors,
            self.inbound,
            self.outbound,
            self.timed,
            self.micros,
        ]
    }

    /// `self - earlier`, or all of `self` when a counter went down (the resource's counters
    /// were replaced, so they started again from zero).
    fn since(&self, earlier: &Counts) -> Counts {
        let went_down = self
            .fields()
            .iter()
            .zip(earlier.fields())
            .any(|(now, before)| *now < before);
        if went_down {
            return *self;
        }
        Counts {
            requests: self.requests - earlier.requests,
            errors: self.errors - earlier.errors,
            inbound: self.inbound - earlier.inbound,
            outbound: self.outbound - earlier.outbound,
            timed: self.timed - earlier.timed,
            micros: self.micros - earlier.micros,
        }
    }

    fn add(&mut self, other: &Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.inbound = self.inbound.saturating_add(other.inbound);
        self.outbound = self.outbound.saturating_add(other.outbound);
        self.timed = self.timed.saturating_add(other.timed);
        self.micros = self.micros.saturating_add(other.micros);
    }

    /// Nothing happened: no request and no byte either way.
    fn is_idle(&self) -> bool {
        self.requests == 0 && self.inbound == 0 && self.outbound == 0
    }

    /// Mean time per timed response, in whole milliseconds.
    fn mean_ms(&self) -> u64 {
        if self.timed == 0 {
            return 0;
        }
        (self.micros as f64 / self.timed as f64 / 1000.0).round() as u64
    }
}

/// Where a set of counters lives: a domain's (by name) or a proxy's (by listener).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Domain(String),
    Proxy(L4Protocol, u16),
}

/// A resource as Core knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Resource {
    /// `"domain"` or `"proxy"`.
    pub(crate) kind: &'static str,
    /// Core's id.
    pub(crate) id: String,
}

/// One resource's counters read now; `resource` is `None` when Core gave it no id.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    pub(crate) source: Source,
    pub(crate) resource: Option<Resource>,
    pub(crate) totals: Counts,
}

/// Traffic not reported yet. Deltas of each observation are added to the resource's
/// pending counts; a report Core took (or refused for good) clears them, a failed one
/// keeps them for the next cycle, where the new deltas are added.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Totals at the last observation, per set of counters.
    seen: HashMap<Source, Counts>,
    pending: BTreeMap<Resource, Counts>,
}

/// What became of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Sent,
    /// Core refused the content (4xx); sending it again cannot help.
    Refused,
    /// Not sent, or failed in a way worth another try.
    Kept,
}

impl Ledger {
    /// Takes in the counters read now. Counters not seen before start from zero (they are
    /// created with their resource); counters no longer present are forgotten.
    pub(crate) fn observe(&mut self, observations: Vec<Observation>) {
        let mut seen = HashMap::with_capacity(observations.len());
        for observation in observations {
            let previous = self
                .seen
                .get(&observation.source)
                .copied()
                .unwrap_or_default();
            let delta = observation.totals.since(&previous);
            if let Some(resource) = observation.resource
                && !delta.is_idle()
            {
                self.pending.entry(resource).or_default().add(&delta);
            }
            seen.insert(observation.source, observation.totals);
        }
        self.seen = seen;
    }

    /// Resources with traffic to report, and how much.
    pub(crate) fn due(&self) -> Vec<(Resource, Counts)> {
        self.pending
            .iter()
            .filter(|(_, counts)| !counts.is_idle())
            .map(|(resource, counts)| (resource.clone(), *counts))
            .collect()
    }

    /// Applies the outcome of reporting `sent` (the counts `due` returned for `resource`).
    pub(crate) fn settle(&mut self, resource: &Resource, sent: &Counts, outcome: Outcome) {
        if outcome == Outcome::Kept {
            return;
        }
        if let Some(pending) = self.pending.get_mut(resource) {
            // Only what was sent: counts observed meanwhile stay (there are none while one
            // task both observes and settles, but the arithmetic should not rely on it).
            *pending = pending.since(sent);
            if pending.is_idle() {
                self.pending.remove(resource);
            }
        }
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

/// Client addresses reported within the last hour, each with when it was.
#[derive(Debug, Default)]
pub(crate) struct ClientBook {
    reported: HashMap<IpAddr, Instant>,
    /// The same, in the order reported, to forget them when their hour is over.
    order: VecDeque<(IpAddr, Instant)>,
}

impl ClientBook {
    pub(crate) fn is_recent(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.expire(now);
        self.reported.contains_key(&ip)
    }

    pub(crate) fn mark(&mut self, ip: IpAddr, now: Instant) {
        self.reported.insert(ip, now);
        self.order.push_back((ip, now));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((ip, at)) = self.order.front().copied() {
            if now.saturating_duration_since(at) < CLIENT_PERIOD {
                break;
            }
            self.order.pop_front();
            if self.reported.get(&ip) == Some(&at) {
                self.reported.remove(&ip);
            }
        }
    }
}

/// Counters of the reports, for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ReportStats {
    traffic_sent: AtomicU64,
    traffic_failed: AtomicU64,
    traffic_refused: AtomicU64,
    clients_sent: AtomicU64,
    clients_failed: AtomicU64,
    clients_refused: AtomicU64,
    pending: AtomicU64,
    clients_dropped: AtomicU64,
    clients_queued: AtomicU64,
}

impl StatsSource for ReportStats {
    fn service(&self) -> &'static str {
        "report"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        for (kind, sent, failed, refused) in [
            (
                "traffic",
                &self.traffic_sent,
                &self.traffic_failed,
                &self.traffic_refused,
            ),
            (
                "clients",
                &self.clients_sent,
                &self.clients_failed,
                &self.clients_refused,
            ),
        ] {
            for (result, counter) in [("sent", sent), ("failed", failed), ("refused", refused)] {
                out.push(
                    Metric::counter(
                        "reports_total",
                        "Reports to Core by kind (traffic, clients) and result (sent; failed, \
                         kept for the next poll; refused by Core, dropped).",
                        counter.load(Relaxed),
                    )
                    .label("kind", kind)
                    .label("result", result),
                );
            }
        }
        out.extend([
            Metric::gauge(
                "pending_resources",
                "Domains and proxies with traffic not reported yet.",
                self.pending.load(Relaxed) as f64,
            ),
            Metric::gauge(
                "clients_queued",
                "Client addresses waiting to be reported.",
                self.clients_queued.load(Relaxed) as f64,
            ),
            Metric::counter(
                "clients_dropped_total",
                "Client addresses dropped unreported because the queue was full.",
                self.clients_dropped.load(Relaxed),
            ),
        ]);
    }
}

/// The report task's inputs: what it reads and where it sends.
pub(crate) struct Reporter {
    pub(crate) sender: Arc<CoreReporter>,
    pub(crate) agent_id: String,
    pub(crate) cell: Arc<SnapshotCell>,
    pub(crate) http: Arc<HttpService>,
    pub(crate) l4: Arc<L4Stats>,
    /// Locates client addresses (never an outside service); `None` without `--geoip-db`.
    pub(crate) geo: Option<Arc<GeoDatabase>>,
    pub(crate) stats: Arc<ReportStats>,
    pub(crate) ledger: Ledger,
    pub(crate) clients: ClientBook,
}

impl Reporter {
    /// Reports after every change of `successes` (each successful poll) until `shutdown`.
    pub(crate) async fn run(
        mut self,
        mut successes: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = successes.changed() => if changed.is_err() { return },
            }
            self.cycle().await;
        }
    }

    /// One round: read the counters, send what is due, keep what failed.
    pub(crate) async fn cycle(&mut self) {
        self.ledger.observe(self.observe());
        let due = self.ledger.due();
        let clients = pick_clients(self.http.clients(), &mut self.clients, Instant::now());
        if due.is_empty() && clients.is_empty() {
            self.publish_gauges();
            return;
        }
        let reports: Vec<TrafficReport> = due
            .iter()
            .map(|(resource, counts)| TrafficReport {
                agent_id: self.agent_id.clone(),
                resource_type: resource.kind.to_owned(),
                resource_id: resource.id.clone(),
                inbound_bytes: counts.inbound,
                outbound_bytes: counts.outbound,
                requests: counts.requests,
                response_time_ms: counts.mean_ms(),
                errors: counts.errors,
            })
            .collect();
        let sender = Arc::clone(&self.sender);
        let geo = self.geo.clone();
        let agent_id = self.agent_id.clone();
        let sent = tokio::task::spawn_blocking(move || {
            send_all(&sender, &reports, clients, geo.as_deref(), &agent_id)
        })
        .await;
        let Ok((traffic_outcomes, client_outcomes, clients, first_error)) = sent else {
            warn!("the report task failed; the counts are kept for the next poll");
            return;
        };
        for ((resource, counts), outcome) in due.iter().zip(&traffic_outcomes) {
            self.ledger.settle(resource, counts, *outcome);
        }
        let now = Instant::now();
        let mut unsent = Vec::new();
        for (client, outcome) in clients.into_iter().zip(&client_outcomes) {
            match outcome {
                Outcome::Sent => self.clients.mark(client.ip, now),
                Outcome::Refused => {}
                Outcome::Kept => unsent.push(client),
            }
        }
        self.http.clients().requeue(unsent);
        let count = |outcomes: &[Outcome], wanted: Outcome| {
            outcomes
                .iter()
                .filter(|outcome| **outcome == wanted)
                .count() as u64
        };
        let stats = &self.stats;
        stats
            .traffic_sent
            .fetch_add(count(&traffic_outcomes, Outcome::Sent), Relaxed);
        stats
            .traffic_failed
            .fetch_add(count(&traffic_outcomes, Outcome::Kept), Relaxed);
        stats
            .traffic_refused
            .fetch_add(count(&traffic_outcomes, Outcome::Refused), Relaxed);
        stats
            .clients_sent
            .fetch_add(count(&client_outcomes, Outcome::Sent), Relaxed);
        stats
            .clients_failed
            .fetch_add(count(&client_outcomes, Outcome::Kept), Relaxed);
        stats
            .clients_refused
            .fetch_add(count(&client_outcomes, Outcome::Refused), Relaxed);
        self.publish_gauges();
        match first_error {
            Some(error) => warn!(
                %error,
                pending = self.ledger.pending_len(),
                "reports to Core failed; the counts are kept for the next poll"
            ),
            None => debug!(
                traffic = traffic_outcomes.len(),
                clients = client_outcomes.len(),
                "reported to Core"
            ),
        }
    }

    fn publish_gauges(&self) {
        self.stats
            .pending
            .store(self.ledger.pending_len() as u64, Relaxed);
        let log = self.http.clients();
        self.stats.clients_queued.store(log.len() as u64, Relaxed);
        self.stats.clients_dropped.store(log.dropped(), Relaxed);
    }

    /// Every domain's and proxy's counters now, with Core's id from the current snapshot.
    fn observe(&self) -> Vec<Observation> {
        let snapshot = self.cell.load();
        let domain_ids: HashMap<&str, &str> = snapshot
            .as_ref()
            .map(|snapshot| {
                snapshot
                    .domains
                    .iter()
                    .rev()
                    .filter_map(|domain| Some((domain.name.as_str(), domain.id.as_deref()?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut observations = Vec::new();
        for (name, totals) in self.http.traffic() {
            let resource = domain_ids.get(name.as_str()).map(|id| Resource {
                kind: "domain",
                id: (*id).to_owned(),
            });
            observations.push(Observation {
                source: Source::Domain(name),
                resource,
                totals: Counts {
                    requests: totals.requests,
                    errors: totals.errors,
                    inbound: totals.received_bytes,
                    outbound: totals.sent_bytes,
                    timed: totals.timed_responses,
                    micros: totals.response_micros,
                },
            });
        }
        for proxy in self.l4.by_proxy() {
            let counters = &proxy.counters;
            // For proxies a request is a connection (TCP) or a session (UDP).
            let (requests, errors) = match proxy.protocol {
                L4Protocol::Tcp => (
                    counters.connections_total,
                    counters.connect_errors_total + counters.connections_rejected_total,
                ),
                L4Protocol::Udp => (
                    counters.udp_sessions_total,
                    counters.connect_errors_total + counters.udp_sessions_rejected_total,
                ),
            };
            observations.push(Observation {
                source: Source::Proxy(proxy.protocol, proxy.port),
                resource: proxy
                    .id
                    .filter(|id| !id.is_empty())
                    .map(|id| Resource { kind: "proxy", id }),
                totals: Counts {
                    requests,
                    errors,
                    inbound: counters.bytes_from_client_total,
                    outbound: counters.bytes_to_client_total,
                    timed: counters.destination_connects_total,
                    micros: counters.destination_connect_micros_total,
                },
            });
        }
        observations
    }
}

/// Up to [`MAX_CLIENTS_PER_CYCLE`] queued clients not reported within the hour, oldest first.
fn pick_clients(log: &ClientLog, book: &mut ClientBook, now: Instant) -> Vec<SeenClient> {
    let mut picked: Vec<SeenClient> = Vec::new();
    while picked.len() < MAX_CLIENTS_PER_CYCLE {
        let drained = log.drain(MAX_CLIENTS_PER_CYCLE - picked.len());
        if drained.is_empty() {
            break;
        }
        for client in drained {
            if !book.is_recent(client.ip, now) && !picked.iter().any(|other| other.ip == client.ip)
            {
                picked.push(client);
            }
        }
    }
    picked
}

/// Sends the traffic reports, then the client reports, stopping at the first sign that
/// Core cannot be reached (the rest are kept). Runs on the blocking pool.
fn send_all(
    sender: &CoreReporter,
    reports: &[TrafficReport],
    clients: Vec<SeenClient>,
    geo: Option<&GeoDatabase>,
    agent_id: &str,
) -> (
    Vec<Outcome>,
    Vec<Outcome>,
    Vec<SeenClient>,
    Option<ReportError>,
) {
    let mut attempts = Attempts::default();
    let traffic = reports
        .iter()
        .map(|report| attempts.send(|| sender.send_traffic(report)))
        .collect();
    let client_outcomes = clients
        .iter()
        .map(|client| {
            attempts.send(|| {
                let details = geo.and_then(|geo| geo.details(client.ip));
                let report = ClientReport {
                    ip: client.ip.to_string(),
                    agent_id: agent_id.to_owned(),
                    user_agent: client.user_agent.as_deref().map(str::to_owned),
                    country: details.as_ref().and_then(|d| d.country_name.clone()),
                    city: details.as_ref().and_then(|d| d.city.clone()),
                    country_code: details.as_ref().and_then(|d| d.country_code.clone()),
                };
                sender.send_client(&report)
            })
        })
        .collect();
    (traffic, client_outcomes, clients, attempts.first_error)
}

/// The reports of one cycle so far: the first error, and whether Core was unreachable.
#[derive(Default)]
struct Attempts {
    first_error: Option<ReportError>,
    unreachable: bool,
}

impl Attempts {
    /// Sends one report, unless Core was already found unreachable this cycle.
    fn send(&mut self, send: impl FnOnce() -> Result<(), ReportError>) -> Outcome {
        if self.unreachable {
            return Outcome::Kept;
        }
        match send() {
            Ok(()) => Outcome::Sent,
            Err(error) => {
                let outcome = if error.is_permanent() {
                    Outcome::Refused
                } else {
                    Outcome::Kept
                };
                self.unreachable |= error.is_unreachable();
                self.first_error.get_or_insert(error);
                outcome
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, id: &str, requests: u64, inbound: u64) -> Observation {
        Observation {
            source: Source::Domain(name.to_owned()),
            resource: Some(Resource {
                kind: "domain",
                id: id.to_owned(),
            }),
            totals: Counts {
                requests,
                inbound,
                outbound: inbound * 2,
                timed: requests,
                micros: requests * 1500,
                ..Counts::default()
            },
        }
    }

    fn pending(ledger: &Ledger) -> Vec<(String, u64, u64)> {
        ledger
            .due()
            .into_iter()
            .map(|(resource, counts)| (resource.id, counts.requests, counts.inbound))
            .collect()
    }

    #[test]
    fn deltas_are_reported_once_and_idle_resources_not_at_all() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![domain("a", "A", 3, 100), domain("b", "B", 0, 0)]);
        let due = ledger.due();
        assert_eq!(pending(&ledger), vec![("A".into(), 3, 100)]);
        assert_eq!(due[0].1.mean_ms(), 2, "1.5 ms rounds to 2");
        ledger.settle(&due[0].0, &due[0].1, Outcome::Sent);
        assert!(ledger.due().is_empty());

        ledger.observe(vec![domain("a", "A", 3, 100), domain("b", "B", 0, 0)]);
        assert!(ledger.due().is_empty(), "nothing happened since");
        ledger.observe(vec![domain("a", "A", 5, 150), domain("b", "B", 1, 10)]);
        assert_eq!(
            pending(&ledger),
            vec![("A".into(), 2, 50), ("B".into(), 1, 10)]
        );
    }

    #[test]
    fn a_failed_send_keeps_the_counts_and_adds_the_next_ones() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![domain("a", "A", 3, 100)]);
        let due = ledger.due();
        ledger.settle(&due[0].0, &due[0].1, Outcome::Kept);
        ledger.observe(vec![domain("a", "A", 7, 300)]);
        assert_eq!(pending(&ledger), vec![("A".into(), 7, 300)]);
        let due = ledger.due();
        ledger.settle(&due[0].0, &due[0].1, Outcome::Refused);
        assert!(ledger.due().is_empty(), "refused reports are dropped");
    }

    #[test]
    fn counters_that_start_again_and_resources_without_id_are_handled() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![domain("a", "A", 10, 1000)]);
        let due = ledger.due();
        ledger.settle(&due[0].0, &due[0].1, Outcome::Sent);
        // The domain was removed and added again: its counters started from zero.
        ledger.observe(vec![domain("a", "A", 2, 20)]);
        assert_eq!(pending(&ledger), vec![("A".into(), 2, 20)]);
        let mut no_id = domain("file", "x", 5, 5);
        no_id.resource = None;
        let mut ledger = Ledger::default();
        ledger.observe(vec![no_id]);
        assert!(ledger.due().is_empty());
    }

    #[test]
    fn at_most_500_clients_per_cycle_and_none_reported_within_the_hour() {
        let log = ClientLog::new(true, 10_000);
        for n in 0..1200u32 {
            log.note(IpAddr::from((0x0a00_0000 + n).to_be_bytes()), || None);
        }
        let mut book = ClientBook::default();
        let now = Instant::now();
        let first = pick_clients(&log, &mut book, now);
        assert_eq!(first.len(), MAX_CLIENTS_PER_CYCLE);
        assert_eq!(first[0].ip, IpAddr::from([10, 0, 0, 0]), "oldest first");
        assert_eq!(log.len(), 700);
        book.mark(IpAddr::from([10, 0, 2, 0x58]), now); // the 601st client
        let second = pick_clients(&log, &mut book, now);
        assert_eq!(second.len(), 500);
        assert!(
            !second
                .iter()
                .any(|client| client.ip == IpAddr::from([10, 0, 2, 0x58]))
        );
        assert_eq!(pick_clients(&log, &mut book, now).len(), 199);
    }

    #[test]
    fn a_client_is_recent_for_one_hour() {
        let mut book = ClientBook::default();
        let start = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!book.is_recent(ip, start));
        book.mark(ip, start);
        assert!(book.is_recent(ip, start + Duration::from_secs(3599)));
        assert!(!book.is_recent(ip, start + Duration::from_secs(3600)));
        assert!(
            book.reported.is_empty() && book.order.is_empty(),
            "forgotten"
        );
    }
}
