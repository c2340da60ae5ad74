//! Per-proxy counters and listener state, read by `agent-bin` for `/stats` and `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use defenra_config::stats::{Metric, StatsSource};
use defenra_config::{L4Protocol, L4Proxy};
use parking_lot::Mutex;
use serde_json::json;

/// Where a listener is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerState {
    /// Not bound yet (the first attempt has not finished).
    Starting,
    Listening {
        local_addr: SocketAddr,
    },
    /// The last bind attempt failed; it is retried with backoff.
    BindFailed {
        error: String,
        attempts: u64,
    },
}

/// A copy of one proxy's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyCounters {
    pub connections_total: u64,
    pub connections_active: u64,
    pub connections_rejected_total: u64,
    pub connect_errors_total: u64,
    pub idle_timeouts_total: u64,
    pub bytes_from_client_total: u64,
    pub bytes_to_client_total: u64,
    pub udp_sessions_total: u64,
    pub udp_sessions_active: u64,
    pub udp_sessions_rejected_total: u64,
    pub udp_sessions_expired_total: u64,
    pub udp_sessions_evicted_total: u64,
    pub datagrams_from_client_total: u64,
    pub datagrams_to_client_total: u64,
    pub datagrams_dropped_total: u64,
    pub bind_errors_total: u64,
    /// TCP connections to the destination that succeeded, and the time they took in total.
    pub destination_connects_total: u64,
    pub destination_connect_micros_total: u64,
}

/// One configured proxy's identity and counters, for reports to Core.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyTraffic {
    /// Core's id of the proxy.
    pub id: Option<String>,
    pub protocol: L4Protocol,
    pub port: u16,
    pub counters: ProxyCounters,
}

/// Counters of every running proxy, keyed by `(protocol, port)`. A proxy's entry exists
/// from the moment the supervisor starts it until it is removed from the config.
#[derive(Default)]
pub struct L4Stats {
    /// Only the supervisor inserts and removes (on reconcile); scrapes copy the `Arc`s
    /// out. Never locked on a connection's path.
    entries: Mutex<BTreeMap<(L4Protocol, u16), Arc<ProxyStats>>>,
}

impl L4Stats {
    /// The listener state of the proxy on `(protocol, port)`, if it is configured.
    pub fn state(&self, protocol: L4Protocol, port: u16) -> Option<ListenerState> {
        let entry = self.entries.lock().get(&(protocol, port)).cloned()?;
        let state = entry.state.lock().clone();
        Some(state)
    }

    /// The counters of the proxy on `(protocol, port)`, if it is configured.
    pub fn counters(&self, protocol: L4Protocol, port: u16) -> Option<ProxyCounters> {
        let entry = self.entries.lock().get(&(protocol, port)).cloned()?;
        Some(entry.counters())
    }

    /// Every configured proxy's counters, with its Core id.
    pub fn by_proxy(&self) -> Vec<ProxyTraffic> {
        self.snapshot()
            .iter()
            .map(|entry| ProxyTraffic {
                id: entry.meta.lock().id.clone(),
                protocol: entry.protocol,
                port: entry.port,
                counters: entry.counters(),
            })
            .collect()
    }

    /// Sum of all proxies' counters.
    pub fn totals(&self) -> ProxyCounters {
        let mut total = ProxyCounters::default();
        for entry in self.snapshot() {
            let c = entry.counters();
            total.connections_total += c.connections_total;
            total.connections_active += c.connections_active;
            total.connections_rejected_total += c.connections_rejected_total;
            total.connect_errors_total += c.connect_errors_total;
            total.idle_timeouts_total += c.idle_timeouts_total;
            total.bytes_from_client_total += c.bytes_from_client_total;
            total.bytes_to_client_total += c.bytes_to_client_total;
            total.udp_sessions_total += c.udp_sessions_total;
            total.udp_sessions_active += c.udp_sessions_active;
            total.udp_sessions_rejected_total += c.udp_sessions_rejected_total;
            total.udp_sessions_expired_total += c.udp_sessions_expired_total;
            total.udp_sessions_evicted_total += c.udp_sessions_evicted_total;
            total.datagrams_from_client_total += c.datagrams_from_client_total;
            total.datagrams_to_client_total += c.datagrams_to_client_total;
            total.datagrams_dropped_total += c.datagrams_dropped_total;
            total.bind_errors_total += c.bind_errors_total;
            total.destination_connects_total += c.destination_connects_total;
            total.destination_connect_micros_total += c.destination_connect_micros_total;
        }
        total
    }

    pub(crate) fn insert(&self, entry: Arc<ProxyStats>) {
        self.entries
            .lock()
            .insert((entry.protocol, entry.port), entry);
    }

    pub(crate) fn remove(&self, protocol: L4Protocol, port: u16) {
        self.entries.lock().remove(&(protocol, port));
    }

    fn snapshot(&self) -> Vec<Arc<ProxyStats>> {
        self.entries.lock().values().cloned().collect()
    }
}

impl StatsSource for L4Stats {
    fn service(&self) -> &'static str {
        "l4"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        for entry in self.snapshot() {
            let label = entry.label();
            let port = entry.port.to_string();
            let protocol = entry.protocol.as_str();
            let c = entry.counters();
            let listening = matches!(*entry.state.lock(), ListenerState::Listening { .. });
            let mut push = |metric: Metric| {
                out.push(
                    metric
                        .label("proxy", label.clone())
                        .label("protocol", protocol)
                        .label("port", port.clone()),
                );
            };
            push(Metric::gauge(
                "listener_up",
                "1 when the proxy's port is bound, 0 while binding fails",
                if listening { 1.0 } else { 0.0 },
            ));
            push(Metric::counter(
                "bind_errors_total",
                "failed attempts to bind the proxy's port",
                c.bind_errors_total,
            ));
            push(Metric::counter(
                "bytes_from_client_total",
                "bytes received from clients and forwarded to the destination",
                c.bytes_from_client_total,
            ));
            push(Metric::counter(
                "bytes_to_client_total",
                "bytes received from the destination and forwarded to clients",
                c.bytes_to_client_total,
            ));
            match entry.protocol {
                L4Protocol::Tcp => {
                    push(Metric::counter(
                        "connections_total",
                        "accepted TCP connections",
                        c.connections_total,
                    ));
                    push(Metric::gauge(
                        "connections_active",
                        "open TCP connections",
                        c.connections_active as f64,
                    ));
                    push(Metric::counter(
                        "connections_rejected_total",
                        "TCP connections closed at once because the proxy was at its cap",
                        c.connections_rejected_total,
                    ));
                    push(Metric::counter(
                        "connect_errors_total",
                        "TCP connections whose destination could not be resolved or reached",
                        c.connect_errors_total,
                    ));
                    push(Metric::counter(
                        "idle_timeouts_total",
                        "TCP connections closed because no bytes moved",
                        c.idle_timeouts_total,
                    ));
                }
                L4Protocol::Udp => {
                    push(Metric::counter(
                        "udp_sessions_total",
                        "UDP sessions created",
                        c.udp_sessions_total,
                    ));
                    push(Metric::gauge(
                        "udp_sessions_active",
                        "open UDP sessions",
                        c.udp_sessions_active as f64,
                    ));
                    push(Metric::counter(
                        "udp_sessions_rejected_total",
                        "datagrams from new UDP clients dropped because the session table was full",
                        c.udp_sessions_rejected_total,
                    ));
                    push(Metric::counter(
                        "udp_sessions_expired_total",
                        "UDP sessions removed after being idle",
                        c.udp_sessions_expired_total,
                    ));
                    push(Metric::counter(
                        "udp_sessions_evicted_total",
                        "idle UDP sessions ended early to make room for a new client in a full table",
                        c.udp_sessions_evicted_total,
                    ));
                    push(Metric::counter(
                        "datagrams_from_client_total",
                        "datagrams received from clients",
                        c.datagrams_from_client_total,
                    ));
                    push(Metric::counter(
                        "datagrams_to_client_total",
                        "datagrams relayed back to clients",
                        c.datagrams_to_client_total,
                    ));
                    push(Metric::counter(
                        "datagrams_dropped_total",
                        "datagrams dropped (table full, queue full, or send error)",
                        c.datagrams_dropped_total,
                    ));
                    push(Metric::counter(
                        "connect_errors_total",
                        "UDP sessions whose destination could not be resolved or reached",
                        c.connect_errors_total,
                    ));
                }
            }
        }
    }

    fn details(&self) -> serde_json::Value {
        let entries: Vec<serde_json::Value> = self
            .snapshot()
            .iter()
            .map(|entry| {
                let meta = entry.meta.lock().clone();
                let (state, local_addr, error, attempts) = match &*entry.state.lock() {
                    ListenerState::Starting => ("starting", None, None, None),
                    ListenerState::Listening { local_addr } => {
                        ("listening", Some(local_addr.to_string()), None, None)
                    }
                    ListenerState::BindFailed { error, attempts } => {
                        ("bind_failed", None, Some(error.clone()), Some(*attempts))
                    }
                };
                let c = entry.counters();
                json!({
                    "id": meta.id,
                    "name": meta.name,
                    "protocol": entry.protocol.as_str(),
                    "listen_port": entry.port,
                    "destination": meta.destination,
                    "proxy_protocol": meta.proxy_protocol,
                    "state": state,
                    "local_addr": local_addr,
                    "bind_error": error,
                    "bind_attempts": attempts,
                    "connections_active": c.connections_active,
                    "udp_sessions_active": c.udp_sessions_active,
                })
            })
            .collect();
        json!({ "proxies": entries })
    }
}

/// What a proxy is called and where it points, for labels and details.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProxyMeta {
    pub(crate) id: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) destination: String,
    pub(crate) proxy_protocol: bool,
}

impl ProxyMeta {
    pub(crate) fn from_proxy(proxy: &L4Proxy) -> Self {
        ProxyMeta {
            id: proxy.id.clone(),
            name: proxy.name.clone(),
            destination: destination_string(&proxy.destination_host, proxy.destination_port),
            proxy_protocol: proxy.proxy_protocol,
        }
    }
}

/// `host:port`, bracketing IPv6 literals.
pub(crate) fn destination_string(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Counters of one proxy. Connection tasks hold an `Arc` and bump the atomics (Relaxed);
/// the state and meta mutexes are touched only by the listener task and by scrapes.
pub(crate) struct ProxyStats {
    pub(crate) protocol: L4Protocol,
    pub(crate) port: u16,
    pub(crate) meta: Mutex<ProxyMeta>,
    pub(crate) state: Mutex<ListenerState>,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_rejected_total: AtomicU64,
    pub(crate) connect_errors_total: AtomicU64,
    pub(crate) idle_timeouts_total: AtomicU64,
    pub(crate) bytes_from_client_total: AtomicU64,
    pub(crate) bytes_to_client_total: AtomicU64,
    pub(crate) udp_sessions_total: AtomicU64,
    pub(crate) udp_sessions_active: AtomicU64,
    pub(crate) udp_sessions_rejected_total: AtomicU64,
    pub(crate) udp_sessions_expired_total: AtomicU64,
    pub(crate) udp_sessions_evicted_total: AtomicU64,
    pub(crate) datagrams_from_client_total: AtomicU64,
    pub(crate) datagrams_to_client_total: AtomicU64,
    pub(crate) datagrams_dropped_total: AtomicU64,
    pub(crate) bind_errors_total: AtomicU64,
    /// Throttles the per-connection "destination unreachable" warning: (second of the last
    /// line written, lines left out since).
    pub(crate) connect_error_log: Mutex<(u64, u64)>,
    pub(crate) destination_connects_total: AtomicU64,
    pub(crate) destination_connect_micros_total: AtomicU64,
}

impl ProxyStats {
    pub(crate) fn new(proxy: &L4Proxy) -> Self {
        ProxyStats {
            protocol: proxy.protocol,
            port: proxy.listen_port,
            meta: Mutex::new(ProxyMeta::from_proxy(proxy)),
            state: Mutex::new(ListenerState::Starting),
            connections_total: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            connections_rejected_total: AtomicU64::new(0),
            connect_errors_total: AtomicU64::new(0),
            idle_timeouts_total: AtomicU64::new(0),
            bytes_from_client_total: AtomicU64::new(0),
            bytes_to_client_total: AtomicU64::new(0),
            udp_sessions_total: AtomicU64::new(0),
            udp_sessions_active: AtomicU64::new(0),
            udp_sessions_rejected_total: AtomicU64::new(0),
            udp_sessions_expired_total: AtomicU64::new(0),
            udp_sessions_evicted_total: AtomicU64::new(0),
            datagrams_from_client_total: AtomicU64::new(0),
            datagrams_to_client_total: AtomicU64::new(0),
            datagrams_dropped_total: AtomicU64::new(0),
            bind_errors_total: AtomicU64::new(0),
            connect_error_log: Mutex::new((0, 0)),
            destination_connects_total: AtomicU64::new(0),
            destination_connect_micros_total: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_state(&self, state: ListenerState) {
        *self.state.lock() = state;
    }

    /// The `proxy` label: the configured name, else the id, else `tcp_8080`.
    fn label(&self) -> String {
        let meta = self.meta.lock();
        meta.name
            .as_deref()
            .filter(|name| !name.is_empty())
            .or(meta.id.as_deref().filter(|id| !id.is_empty()))
            .map_or_else(|| format!("{}_{}", self.protocol, self.port), str::to_owned)
    }

    fn counters(&self) -> ProxyCounters {
        ProxyCounters {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_rejected_total: self.connections_rejected_total.load(Relaxed),
            connect_errors_total: self.connect_errors_total.load(Relaxed),
            idle_timeouts_total: self.idle_timeouts_total.load(Relaxed),
            bytes_from_client_total: self.bytes_from_client_total.load(Relaxed),
            bytes_to_client_total: self.bytes_to_client_total.load(Relaxed),
            udp_sessions_total: self.udp_sessions_total.load(Relaxed),
            udp_sessions_active: self.udp_sessions_active.load(Relaxed),
            udp_sessions_rejected_total: self.udp_sessions_rejected_total.load(Relaxed),
            udp_sessions_expired_total: self.udp_sessions_expired_total.load(Relaxed),
            udp_sessions_evicted_total: self.udp_sessions_evicted_total.load(Relaxed),
            datagrams_from_client_total: self.datagrams_from_client_total.load(Relaxed),
            datagrams_to_client_total: self.datagrams_to_client_total.load(Relaxed),
            datagrams_dropped_total: self.datagrams_dropped_total.load(Relaxed),
            bind_errors_total: self.bind_errors_total.load(Relaxed),
            destination_connects_total: self.destination_connects_total.load(Relaxed),
            destination_connect_micros_total: self.destination_connect_micros_total.load(Relaxed),
        }
    }
}

/// Decrements a gauge when dropped, so every exit path of a task counts down once.
pub(crate) struct GaugeGuard<'a>(pub(crate) &'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(name: Option<&str>) -> L4Proxy {
        L4Proxy {
            id: Some("p1".into()),
            name: name.map(str::to_owned),
            protocol: L4Protocol::Tcp,
            listen_port: 8080,
            destination_host: "::1".into(),
            destination_port: 80,
            proxy_protocol: false,
        }
    }

    #[test]
    fn label_prefers_name_then_id_then_protocol_and_port() {
        assert_eq!(ProxyStats::new(&proxy(Some("web"))).label(), "web");
        assert_eq!(ProxyStats::new(&proxy(Some(""))).label(), "p1");
        let mut anonymous = proxy(None);
        anonymous.id = None;
        assert_eq!(ProxyStats::new(&anonymous).label(), "tcp_8080");
    }

    #[test]
    fn metrics_carry_proxy_labels_and_details_show_bind_errors() {
        let stats = L4Stats::default();
        let entry = Arc::new(ProxyStats::new(&proxy(Some("web"))));
        entry.connections_total.fetch_add(3, Relaxed);
        entry.set_state(ListenerState::BindFailed {
            error: "address in use".into(),
            attempts: 2,
        });
        stats.insert(entry);
        let mut metrics = Vec::new();
        stats.collect(&mut metrics);
        let total = metrics
            .iter()
            .find(|m| m.name == "connections_total")
            .expect("tcp proxies report connections_total");
        assert_eq!(total.value, 3.0);
        assert!(total.labels.contains(&("proxy", "web".to_owned())));
        assert!(total.labels.contains(&("port", "8080".to_owned())));
        let details = stats.details();
        assert_eq!(details["proxies"][0]["state"], "bind_failed");
        assert_eq!(details["proxies"][0]["bind_error"], "address in use");
        assert_eq!(details["proxies"][0]["destination"], "[::1]:80");
    }
}
