//! [`DnsStats`]: the DNS service's counters, rendered by agent-bin in /stats and /metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use defenra_config::stats::{Metric, StatsSource};

use crate::answer::Transport;
use crate::wire::Rcode;

/// Counters of the DNS service. Every field only grows, except the gauges noted.
#[derive(Debug, Default)]
pub struct DnsStats {
    queries_udp: AtomicU64,
    queries_tcp: AtomicU64,
    noerror: AtomicU64,
    nxdomain: AtomicU64,
    refused: AtomicU64,
    formerr: AtomicU64,
    notimp: AtomicU64,
    badvers: AtomicU64,
    nodata: AtomicU64,
    /// Packets ignored: shorter than a header, or responses.
    dropped: AtomicU64,
    /// Packets answered with FORMERR.
    malformed: AtomicU64,
    truncated: AtomicU64,
    geo_answers: AtomicU64,
    ecs_queries: AtomicU64,
    tcp_connections: AtomicU64,
    /// New connections closed at once: the table was full and none was idle.
    tcp_rejected: AtomicU64,
    /// New connections closed at once: their address held its share already.
    tcp_rejected_per_ip: AtomicU64,
    /// Idle connections closed to make room for a new one.
    tcp_evicted: AtomicU64,
    /// Connections closed because a message (or the writing of answers) missed its deadline.
    tcp_timeouts: AtomicU64,
    /// Connections closed after answering their query budget.
    tcp_query_budget: AtomicU64,
    send_errors: AtomicU64,
    /// Gauge: open TCP connections.
    tcp_active: AtomicU64,
    /// Gauge: open TCP connections waiting for a new message with nothing buffered.
    tcp_idle: AtomicU64,
    /// UDP responses dropped by response rate limiting.
    rrl_dropped: AtomicU64,
    /// UDP responses sent truncated by response rate limiting.
    rrl_slipped: AtomicU64,
    /// Classes replaced in the rate limiter's table by newer ones.
    rrl_evictions: AtomicU64,
    /// Gauges: classes in the rate limiter's table, and its capacity.
    rrl_classes: AtomicU64,
    rrl_capacity: AtomicU64,
    /// Gauges: what the current index serves.
    zones: AtomicU64,
    records: AtomicU64,
    reloads: AtomicU64,
}

impl DnsStats {
    /// Queries received over `transport`, including malformed ones.
    pub fn queries(&self, transport: Transport) -> u64 {
        match transport {
            Transport::Udp => self.queries_udp.load(Relaxed),
            Transport::Tcp => self.queries_tcp.load(Relaxed),
        }
    }

    /// Packets answered with FORMERR plus packets dropped unanswered.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Relaxed) + self.dropped.load(Relaxed)
    }

    /// Answers chosen by the GeoDNS plan.
    pub fn geo_answers(&self) -> u64 {
        self.geo_answers.load(Relaxed)
    }

    /// Responses sent with TC=1.
    pub fn truncated(&self) -> u64 {
        self.truncated.load(Relaxed)
    }

    /// TCP connections closed at once because the table was full of busy connections.
    pub fn tcp_rejected(&self) -> u64 {
        self.tcp_rejected.load(Relaxed)
    }

    /// TCP connections closed at once because their address held its share.
    pub fn tcp_rejected_per_ip(&self) -> u64 {
        self.tcp_rejected_per_ip.load(Relaxed)
    }

    /// Idle TCP connections closed to make room for new ones.
    pub fn tcp_evicted(&self) -> u64 {
        self.tcp_evicted.load(Relaxed)
    }

    /// TCP connections closed because a message missed its deadline.
    pub fn tcp_timeouts(&self) -> u64 {
        self.tcp_timeouts.load(Relaxed)
    }

    /// Open TCP connections.
    pub fn tcp_active(&self) -> u64 {
        self.tcp_active.load(Relaxed)
    }

    /// Open TCP connections waiting, with nothing buffered, for their next message.
    pub fn tcp_idle(&self) -> u64 {
        self.tcp_idle.load(Relaxed)
    }

    /// UDP responses dropped by response rate limiting.
    pub fn rrl_dropped(&self) -> u64 {
        self.rrl_dropped.load(Relaxed)
    }

    /// UDP responses sent truncated (TC=1) by response rate limiting.
    pub fn rrl_slipped(&self) -> u64 {
        self.rrl_slipped.load(Relaxed)
    }

    /// Classes in the rate limiter's table.
    pub fn rrl_classes(&self) -> u64 {
        self.rrl_classes.load(Relaxed)
    }

    /// Classes replaced in the rate limiter's table by newer ones.
    pub fn rrl_evictions(&self) -> u64 {
        self.rrl_evictions.load(Relaxed)
    }

    pub(crate) fn count_query(&self, transport: Transport) {
        match transport {
            Transport::Udp => &self.queries_udp,
            Transport::Tcp => &self.queries_tcp,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn count_rcode(&self, rcode: Rcode) {
        match rcode {
            Rcode::NoError => &self.noerror,
            Rcode::NxDomain => &self.nxdomain,
            Rcode::Refused => &self.refused,
            Rcode::FormErr => &self.formerr,
            Rcode::NotImp => &self.notimp,
            Rcode::BadVers => &self.badvers,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_truncated(&self) {
        self.truncated.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_geo(&self) {
        self.geo_answers.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_ecs(&self) {
        self.ecs_queries.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_nodata(&self) {
        self.nodata.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_send_error(&self) {
        self.send_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_tcp_timeout(&self) {
        self.tcp_timeouts.fetch_add(1, Relaxed);
    }
    pub(crate) fn tcp_opened(&self) {
        self.tcp_connections.fetch_add(1, Relaxed);
        self.tcp_active.fetch_add(1, Relaxed);
    }
    pub(crate) fn tcp_closed(&self) {
        self.tcp_active.fetch_sub(1, Relaxed);
    }
    pub(crate) fn tcp_rejected_one(&self) {
        self.tcp_rejected.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_tcp_rejected_per_ip(&self) {
        self.tcp_rejected_per_ip.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_tcp_evicted(&self) {
        self.tcp_evicted.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_tcp_query_budget(&self) {
        self.tcp_query_budget.fetch_add(1, Relaxed);
    }
    pub(crate) fn tcp_idle_changed(&self, idle: bool) {
        if idle {
            self.tcp_idle.fetch_add(1, Relaxed);
        } else {
            self.tcp_idle.fetch_sub(1, Relaxed);
        }
    }
    pub(crate) fn count_rrl_dropped(&self) {
        self.rrl_dropped.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_rrl_slipped(&self) {
        self.rrl_slipped.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_rrl_eviction(&self) {
        self.rrl_evictions.fetch_add(1, Relaxed);
    }
    pub(crate) fn rrl_class_added(&self) {
        self.rrl_classes.fetch_add(1, Relaxed);
    }
    pub(crate) fn rrl_enabled(&self, capacity: usize) {
        self.rrl_capacity.store(capacity as u64, Relaxed);
    }
    pub(crate) fn reloaded(&self, n_zones: usize, n_records: usize) {
        self.zones.store(n_zones as u64, Relaxed);
        self.records.store(n_records as u64, Relaxed);
        self.reloads.fetch_add(1, Relaxed);
    }
}

impl StatsSource for DnsStats {
    fn service(&self) -> &'static str {
        "dns"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let load = |counter: &AtomicU64| counter.load(Relaxed);
        out.push(
            Metric::counter(
                "queries_total",
                "DNS queries received",
                load(&self.queries_udp),
            )
            .label("transport", "udp"),
        );
        out.push(
            Metric::counter(
                "queries_total",
                "DNS queries received",
                load(&self.queries_tcp),
            )
            .label("transport", "tcp"),
        );
        for (rcode, counter) in [
            ("noerror", &self.noerror),
            ("nxdomain", &self.nxdomain),
            ("refused", &self.refused),
            ("formerr", &self.formerr),
            ("notimp", &self.notimp),
            ("badvers", &self.badvers),
        ] {
            out.push(
                Metric::counter("responses_total", "DNS responses by rcode", load(counter))
                    .label("rcode", rcode),
            );
        }
        for (name, help, counter) in [
            (
                "nodata_total",
                "NOERROR responses without answers",
                &self.nodata,
            ),
            (
                "dropped_total",
                "Packets ignored (too short, or responses)",
                &self.dropped,
            ),
            (
                "malformed_total",
                "Packets answered with FORMERR",
                &self.malformed,
            ),
            (
                "truncated_total",
                "UDP responses sent with TC=1",
                &self.truncated,
            ),
            (
                "geo_answers_total",
                "Answers chosen by GeoDNS",
                &self.geo_answers,
            ),
            (
                "ecs_queries_total",
                "Queries carrying EDNS Client Subnet",
                &self.ecs_queries,
            ),
            (
                "tcp_connections_total",
                "TCP connections accepted",
                &self.tcp_connections,
            ),
            (
                "tcp_rejected_total",
                "TCP connections closed at once (table full, none idle)",
                &self.tcp_rejected,
            ),
            (
                "tcp_rejected_per_ip_total",
                "TCP connections closed at once (per-address cap)",
                &self.tcp_rejected_per_ip,
            ),
            (
                "tcp_evicted_total",
                "Idle TCP connections closed to make room for new ones",
                &self.tcp_evicted,
            ),
            (
                "tcp_timeouts_total",
                "TCP connections closed when a message missed its deadline",
                &self.tcp_timeouts,
            ),
            (
                "tcp_query_budget_total",
                "TCP connections closed after their query budget",
                &self.tcp_query_budget,
            ),
            (
                "rrl_dropped_total",
                "UDP responses dropped by rate limiting",
                &self.rrl_dropped,
            ),
            (
                "rrl_slipped_total",
                "UDP responses sent truncated by rate limiting",
                &self.rrl_slipped,
            ),
            (
                "rrl_evictions_total",
                "Rate-limit classes replaced by newer ones",
                &self.rrl_evictions,
            ),
            (
                "send_errors_total",
                "Responses that could not be sent",
                &self.send_errors,
            ),
            ("reloads_total", "Zone index rebuilds", &self.reloads),
        ] {
            out.push(Metric::counter(name, help, load(counter)));
        }
        out.push(Metric::gauge(
            "tcp_active",
            "Open TCP connections",
            load(&self.tcp_active) as f64,
        ));
        out.push(Metric::gauge(
            "tcp_idle",
            "Open TCP connections waiting for a message",
            load(&self.tcp_idle) as f64,
        ));
        out.push(Metric::gauge(
            "rrl_classes",
            "Rate-limit classes tracked",
            load(&self.rrl_classes) as f64,
        ));
        out.push(Metric::gauge(
            "rrl_table_size",
            "Rate-limit classes the table holds at most (0: off)",
            load(&self.rrl_capacity) as f64,
        ));
        out.push(Metric::gauge(
            "zones",
            "Served zones",
            load(&self.zones) as f64,
        ));
        out.push(Metric::gauge(
            "records",
            "Served records",
            load(&self.records) as f64,
        ));
    }
}
