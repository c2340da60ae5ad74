//! Counters of the HTTP proxy, exposed through `StatsSource` as service `http`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use defenra_config::stats::{Metric, StatsSource};
use http::StatusCode;

use crate::server::Listener;

/// Counters of one listener (`http` or `https`).
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    /// Responses by status class, 1xx to 5xx.
    responses: [AtomicU64; 5],
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
}

/// Counters of the proxy: `AtomicU64` fields bumped with `Relaxed`, read on each scrape.
#[derive(Debug, Default)]
pub struct HttpStats {
    http: ListenerStats,
    https: ListenerStats,
    origin_connect_errors: AtomicU64,
    origin_timeouts: AtomicU64,
    origin_other_errors: AtomicU64,
    tls_handshake_failures: AtomicU64,
    waf_blocks: AtomicU64,
    upgrades: AtomicU64,
    accept_errors: AtomicU64,
    access_log_suppressed: AtomicU64,
}

/// A failure counted by kind.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    OriginConnectError,
    OriginTimeout,
    OriginOtherError,
    TlsHandshakeFailure,
    WafBlock,
    Upgrade,
    AcceptError,
}

impl HttpStats {
    pub(crate) fn listener(&self, listener: Listener) -> &ListenerStats {
        match listener {
            Listener::Http => &self.http,
            Listener::Https => &self.https,
        }
    }

    pub(crate) fn count(&self, event: Event) {
        let counter = match event {
            Event::OriginConnectError => &self.origin_connect_errors,
            Event::OriginTimeout => &self.origin_timeouts,
            Event::OriginOtherError => &self.origin_other_errors,
            Event::TlsHandshakeFailure => &self.tls_handshake_failures,
            Event::WafBlock => &self.waf_blocks,
            Event::Upgrade => &self.upgrades,
            Event::AcceptError => &self.accept_errors,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Responses with a status of class `class` (1 to 5) sent on `listener`.
    pub fn responses(&self, listener: &str, class: u8) -> u64 {
        let stats = match listener {
            "http" => &self.http,
            "https" => &self.https,
            _ => return 0,
        };
        match class {
            1..=5 => stats.responses[usize::from(class - 1)].load(Relaxed),
            _ => 0,
        }
    }

    /// TLS handshakes that failed or were refused (unknown SNI, old protocol, timeout).
    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.load(Relaxed)
    }

    /// Access lines skipped because the per-second budget was spent.
    pub fn access_log_suppressed_total(&self) -> u64 {
        self.access_log_suppressed.load(Relaxed)
    }

    pub(crate) fn access_log_suppressed(&self) {
        self.access_log_suppressed.fetch_add(1, Relaxed);
    }

    /// Client connections open right now on both listeners.
    pub fn connections_active(&self) -> u64 {
        self.http.connections_active.load(Relaxed) + self.https.connections_active.load(Relaxed)
    }
}

impl ListenerStats {
    pub(crate) fn response(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize;
        self.responses[class - 1].fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub(crate) fn add_bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.bytes_received.fetch_add(received, Relaxed);
        }
        if sent > 0 {
            self.bytes_sent.fetch_add(sent, Relaxed);
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl StatsSource for HttpStats {
    fn service(&self) -> &'static str {
        "http"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        for (name, stats) in [("http", &self.http), ("https", &self.https)] {
            for (class, counter) in CLASSES.iter().zip(&stats.responses) {
                out.push(
                    Metric::counter(
                        "requests_total",
                        "Responses sent to clients, by listener and status class.",
                        counter.load(Relaxed),
                    )
                    .label("listener", name)
                    .label("status", *class),
                );
            }
            out.push(
                Metric::counter(
                    "connections_total",
                    "Client connections accepted.",
                    stats.connections_total.load(Relaxed),
                )
                .label("listener", name),
            );
            out.push(
                Metric::gauge(
                    "connections_active",
                    "Client connections open now.",
                    stats.connections_active.load(Relaxed) as f64,
                )
                .label("listener", name),
            );
            out.push(
                Metric::counter(
                    "received_bytes_total",
                    "Bytes read from clients (TLS records included).",
                    stats.bytes_received.load(Relaxed),
                )
                .label("listener", name),
            );
            out.push(
                Metric::counter(
                    "sent_bytes_total",
                    "Bytes written to clients (TLS records included).",
                    stats.bytes_sent.load(Relaxed),
                )
                .label("listener", name),
            );
        }
        for (kind, counter) in [
            ("connect", &self.origin_connect_errors),
            ("timeout", &self.origin_timeouts),
            ("other", &self.origin_other_errors),
        ] {
            out.push(
                Metric::counter(
                    "origin_errors_total",
                    "Origin requests that failed, by kind (timeout answers 504, others 502).",
                    counter.load(Relaxed),
                )
                .label("kind", kind),
            );
        }
        out.push(Metric::counter(
            "tls_handshake_failures_total",
            "TLS handshakes refused or failed (unknown SNI, old protocol, timeout).",
            self.tls_handshake_failures.load(Relaxed),
        ));
        out.push(Metric::counter(
            "waf_blocks_total",
            "Requests answered by a WAF block.",
            self.waf_blocks.load(Relaxed),
        ));
        out.push(Metric::counter(
            "upgrades_total",
            "Upgraded connections (WebSocket) tunneled to origins.",
            self.upgrades.load(Relaxed),
        ));
        out.push(Metric::counter(
            "accept_errors_total",
            "Errors accepting client connections.",
            self.accept_errors.load(Relaxed),
        ));
        out.push(Metric::counter(
            "access_log_suppressed_total",
            "Access log lines skipped because the per-second budget was spent.",
            self.access_log_suppressed.load(Relaxed),
        ));
    }
}
