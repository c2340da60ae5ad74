//! A small, dependency-free shape for service counters, read by `agent-bin` to render
//! `/stats` (JSON) and `/metrics` (Prometheus text).
//!
//! Services keep their counters as `AtomicU64` fields and describe them on demand through
//! [`StatsSource::collect`]; nothing is registered globally and nothing is locked on a
//! request path.

/// Whether a value only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// One sample of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Name without the `defenra_<service>_` prefix, lower_snake, counters ending in
    /// `_total` (e.g. `queries_total`).
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    /// Label pairs, e.g. `[("rcode", "nxdomain")]`; empty for a plain value.
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Metric {
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Metric {
            name,
            help,
            kind: MetricKind::Counter,
            labels: Vec::new(),
            value: value as f64,
        }
    }

    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            kind: MetricKind::Gauge,
            labels: Vec::new(),
            value,
        }
    }

    /// Adds one label pair.
    pub fn label(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.labels.push((key, value.into()));
        self
    }
}

/// Implemented by every service's stats struct.
pub trait StatsSource: Send + Sync {
    /// The service name, used as the `/stats` key and the metric prefix (`dns`, `http`).
    fn service(&self) -> &'static str;

    /// Appends the current value of every metric. Called on each scrape; must be cheap
    /// and must not block.
    fn collect(&self, out: &mut Vec<Metric>);

    /// Extra, non-numeric detail for `/stats` (e.g. per-listener bind errors). `Null`
    /// by default.
    fn details(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
