//! The health, stats and metrics endpoint: `GET /health`, `/stats` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use defenra_config::stats::{Metric, MetricKind, StatsSource};
use defenra_config::{ConfigStats, SnapshotCell};
use defenra_shield::Shield;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::geoip::{GeoIp, GeoState};

/// Everything the endpoint reports on. Reads atomics and the snapshot pointer only.
pub(crate) struct Observability {
    started: Instant,
    cell: Arc<SnapshotCell>,
    config: Arc<ConfigStats>,
    /// Per-service counters, in `/stats` order.
    services: Vec<Arc<dyn StatsSource>>,
    /// For `/banned-ips`.
    shield: Option<Arc<Shield>>,
    /// The GeoIP database's state, which `/health` reports.
    geoip: Option<Arc<GeoIp>>,
    /// The fleet link, which `/health` reports (and "degraded" while it is not up).
    fleet: Option<Arc<defenra_fleet::Fleet>>,
}

impl Observability {
    pub(crate) fn new(
        cell: Arc<SnapshotCell>,
        config: Arc<ConfigStats>,
        services: Vec<Arc<dyn StatsSource>>,
    ) -> Self {
        Observability {
            started: Instant::now(),
            cell,
            config,
            services,
            shield: None,
            geoip: None,
            fleet: None,
        }
    }

    /// Reports the fleet link in `/health` (a `fleet` object; "degraded" while Redis is
    /// unreachable: the agent serves on its own state).
    pub(crate) fn with_fleet(mut self, fleet: Option<Arc<defenra_fleet::Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Reports the GeoIP database's state in `/health` (and "degraded" while it is not right).
    pub(crate) fn with_geoip(mut self, geoip: Arc<GeoIp>) -> Self {
        self.geoip = Some(geoip);
        self
    }

    /// Serves `GET /banned-ips` from `shield`.
    pub(crate) fn with_shield(mut self, shield: Arc<Shield>) -> Self {
        self.shield = Some(shield);
        self
    }

    /// `GET /health`: 200 once a config is loaded (`ok`, or `degraded` while the GeoIP
    /// database is missing, unusable or stale, or the fleet's Redis is unreachable), 503
    /// `starting` before.
    pub(crate) fn health(&self) -> (StatusCode, Value) {
        let snapshot = self.cell.load();
        let last_poll = self.config.last_success_unix.load(Relaxed);
        let geoip = self
            .geoip
            .as_ref()
            .map_or(GeoState::Off, |geoip| geoip.state());
        let fleet_down = self.fleet.as_ref().is_some_and(|fleet| !fleet.is_up());
        let status = match (snapshot.is_some(), geoip.is_degraded() || fleet_down) {
            (false, _) => "starting",
            (true, false) => "ok",
            (true, true) => "degraded",
        };
        let mut body = json!({
            "status": status,
            "geoip": geoip.as_str(),
            "uptime_s": self.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
            "config_version": snapshot.as_ref().map(|snapshot| snapshot.version),
            "config_source": self.config.origin(),
            "last_poll": (last_poll > 0).then_some(last_poll),
            "last_error": self.config.last_error(),
            "domains": snapshot.as_ref().map_or(0, |snapshot| snapshot.domains.len()),
        });
        if let Some(fleet) = &self.fleet {
            body["fleet"] = fleet.health();
        }
        let status = if snapshot.is_some() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body)
    }

    /// `GET /stats`: `config` plus one object per service.
    pub(crate) fn stats(&self) -> Value {
        let mut root = Map::new();
        root.insert("uptime_s".into(), json!(self.started.elapsed().as_secs()));
        for source in self.sources() {
            let mut metrics = Vec::new();
            source.collect(&mut metrics);
            let mut object = match source.details() {
                Value::Object(details) => details,
                Value::Null => Map::new(),
                other => Map::from_iter([("details".to_owned(), other)]),
            };
            for metric in metrics {
                let value = json_number(metric.value);
                if metric.labels.is_empty() {
                    object.entry(metric.name).or_insert(value);
                } else {
                    let mut sample: Map<String, Value> = metric
                        .labels
                        .into_iter()
                        .map(|(key, label)| (key.to_owned(), Value::String(label)))
                        .collect();
                    sample.insert("value".into(), value);
                    let entry = object
                        .entry(metric.name)
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(samples) = entry {
                        samples.push(Value::Object(sample));
                    }
                }
            }
            root.insert(source.service().to_owned(), Value::Object(object));
        }
        Value::Object(root)
    }

    /// `GET /metrics`: Prometheus text exposition of the same counters.
    pub(crate) fn metrics(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("defenra");
        registry.register_collector(Box::new(MetricsCollector(Arc::clone(self))));
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &registry) {
            Ok(()) => text,
            Err(error) => format!("# encoding failed: {error}\n"),
        }
    }

    /// Every counter source, in `/stats` order: config, this process, then the services.
    fn sources(&self) -> impl Iterator<Item = &dyn StatsSource> {
        let config: &dyn StatsSource = self.config.as_ref();
        [config, &ProcessStats]
            .into_iter()
            .chain(self.services.iter().map(|source| source.as_ref()))
    }

    fn all_metrics(&self) -> Vec<(&'static str, Metric)> {
        let mut all = Vec::new();
        for source in self.sources() {
            let mut metrics = Vec::new();
            source.collect(&mut metrics);
            all.extend(metrics.into_iter().map(|metric| (source.service(), metric)));
        }
        all
    }
}

fn json_number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        json!(value as i64)
    } else {
        json!(value)
    }
}

/// Renders the services' metrics on each scrape; nothing is registered per request.
#[derive(Debug)]
struct MetricsCollector(Arc<Observability>);

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability").finish_non_exhaustive()
    }
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = self.0.all_metrics();
        // One descriptor per family; samples of a family may be spread over the list.
        let mut families: Vec<(String, &Metric, Vec<&Metric>)> = Vec::new();
        for (service, metric) in &metrics {
            // prometheus-client appends `_total` to counters itself.
            let base = metric.name.strip_suffix("_total").unwrap_or(metric.name);
            let name = format!("{service}_{base}");
            match families.iter_mut().find(|(family, ..)| *family == name) {
                Some((_, _, samples)) => samples.push(metric),
                None => families.push((name, metric, vec![metric])),
            }
        }
        for (name, first, samples) in families {
            let metric_type = match first.kind {
                MetricKind::Counter => ConstCounter::new(0u64).metric_type(),
                MetricKind::Gauge => ConstGauge::new(0i64).metric_type(),
            };
            let mut family = encoder.encode_descriptor(&name, first.help, None, metric_type)?;
            for sample in samples {
                let labels: Vec<(&str, &str)> = sample
                    .labels
                    .iter()
                    .map(|(key, value)| (*key, value.as_str()))
                    .collect();
                let sample_encoder = family.encode_family(&labels)?;
                match first.kind {
                    MetricKind::Counter => {
                        ConstCounter::new(sample.value).encode(sample_encoder)?
                    }
                    MetricKind::Gauge => ConstGauge::new(sample.value).encode(sample_encoder)?,
                }
            }
        }
        Ok(())
    }
}

/// Resident memory and open descriptors of this process, read from /proc on each scrape.
struct ProcessStats;

impl StatsSource for ProcessStats {
    fn service(&self) -> &'static str {
        "process"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        if let Some(rss) = resident_bytes() {
            out.push(Metric::gauge(
                "resident_memory_bytes",
                "Resident set size.",
                rss as f64,
            ));
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            out.push(Metric::gauge(
                "open_fds",
                "Open file descriptors.",
                entries.count() as f64,
            ));
        }
    }
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Limits of the endpoint's listener. Monitoring needs few connections and small
/// requests; without limits, 20,000 idle connections once used up the process's
/// descriptors and took every other listener down (issue 17).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthLimits {
    /// Connections served at once; further clients wait in the kernel's accept backlog
    /// (as on the HTTP listeners), holding no descriptor of the agent.
    pub(crate) max_connections: usize,
    /// Time a client has to send a complete request head, from the connection's start and
    /// again while a kept-alive connection waits for its next request (nginx's
    /// `client_header_timeout` and `keepalive_timeout` in one).
    pub(crate) header_timeout: Duration,
    /// Longest life of one connection, whatever it does (a scraper that stops reading a
    /// large `/metrics` answer).
    pub(crate) max_connection_age: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        HealthLimits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(60),
        }
    }
}

/// Serves the endpoint until `shutdown`: HTTP/1.1 only (no monitoring tool needs more),
/// within `limits`.
pub(crate) async fn serve(
    listener: TcpListener,
    observability: Arc<Observability>,
    limits: HealthLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    loop {
        // A slot before accepting: excess clients stay in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "health accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let observability = Arc::clone(&observability);
        let shutdown = shutdown.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let observability = Arc::clone(&observability);
                async move { Ok::<_, Infallible>(route(&observability, &request)) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = tokio::time::timeout(limits.max_connection_age, connection) => {
                    match result {
                        Ok(Err(error)) => {
                            debug!(%peer, %error, "health connection ended with an error");
                        }
                        Err(_) => debug!(%peer, "health connection closed at its age limit"),
                        Ok(Ok(())) => {}
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
}

fn route(observability: &Arc<Observability>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        "/health" | "/healthz" => {
            let (status, body) = observability.health();
            json_response(status, &body)
        }
        "/stats" => json_response(StatusCode::OK, &observability.stats()),
        "/banned-ips" => match &observability.shield {
            Some(shield) => json_response(StatusCode::OK, &crate::control::bans_json(shield)),
            None => json_response(StatusCode::OK, &json!({ "bans": [] })),
        },
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(observability.metrics())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every metric the agent exports, as a Markdown table, from services loaded with the
    /// demo config (so per-domain and per-proxy series exist).
    fn metrics_markdown() -> String {
        let doc = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/demo.json"
        ))
        .unwrap();
        let compiled = defenra_config::compile(&doc).unwrap();
        let cell = Arc::new(SnapshotCell::new());
        let snapshot = cell.publish(compiled.snapshot);
        let dns = Arc::new(defenra_dns::DnsService::new(
            None,
            defenra_dns::DnsOptions::default(),
        ));
        let waf = Arc::new(defenra_waf::WafEngine::new(
            defenra_waf::WafOptions::default(),
        ));
        let http = Arc::new(defenra_http::HttpService::new(
            Arc::clone(&waf),
            defenra_http::HttpOptions::default(),
        ));
        let shield = Arc::clone(http.shield());
        let l4 = Arc::new(defenra_l4::L4Service::new(defenra_l4::L4Options::default()));
        let mut issues = Vec::new();
        use defenra_config::Reload;
        for service in [&*dns as &dyn Reload, &*waf, &*shield, &*http, &*l4] {
            service.reload(&snapshot, &mut issues);
        }
        let observability = Observability::new(
            cell,
            Arc::new(ConfigStats::default()),
            vec![
                dns.stats(),
                http.stats(),
                waf.stats(),
                l4.stats(),
                Arc::new(crate::geoip::GeoIp::new(None)),
                Arc::new(crate::report::ReportStats::default()),
                Arc::clone(&shield) as Arc<dyn StatsSource>,
                defenra_fleet::Fleet::new(
                    defenra_fleet::FleetOptions::new(
                        defenra_fleet::RedisTarget::single("redis://127.0.0.1").unwrap(),
                    ),
                    shield,
                    None,
                )
                .unwrap() as Arc<dyn StatsSource>,
            ],
        );
        let mut rows: BTreeMap<String, (String, BTreeMap<&str, ()>, &str)> = BTreeMap::new();
        for (service, metric) in observability.all_metrics() {
            let kind = match metric.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
            };
            let row = rows
                .entry(format!("defenra_{service}_{}", metric.name))
                .or_insert_with(|| (kind.to_owned(), BTreeMap::new(), metric.help));
            for (label, _) in &metric.labels {
                row.1.insert(label, ());
            }
        }
        let mut table = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for (name, (kind, labels, help)) in rows {
            let labels: Vec<&str> = labels.keys().copied().collect();
            table.push_str(&format!(
                "| `{name}` | {kind} | {} | {help} |\n",
                labels.join(", ")
            ));
        }
        table
    }

    /// Sends `GET /health` with keep-alive and reads the response head.
    async fn ask_health(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let mut buffer = [0u8; 4096];
        while !response.windows(4).any(|window| window == b"\r\n\r\n") {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed before answering");
            response.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Whether the server closes `stream` within `limit`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn idle_clients_are_cut_after_the_header_timeout_and_held_to_the_cap() {
        // Issue 17 finding 4: idle connections were never closed nor counted.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let observability = Arc::new(Observability::new(
            Arc::new(SnapshotCell::new()),
            Arc::new(ConfigStats::default()),
            Vec::new(),
        ));
        let limits = HealthLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            max_connection_age: Duration::from_secs(30),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, observability, limits, shutdown.clone()));

        // Eight silent clients: four are served (and cut after 300 ms), four wait in the
        // backlog for their turn; a ninth that asks waits behind both rounds.
        let mut silent = Vec::new();
        for _ in 0..8 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let started = Instant::now();
        let mut asking = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), ask_health(&mut asking))
            .await
            .expect("answered once the silent clients are cut");
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "answered after {:?}: the cap did not hold",
            started.elapsed()
        );
        for stream in &mut silent {
            assert!(closed_within(stream, Duration::from_secs(2)).await);
        }
        // A kept-alive connection idling after its answer is cut the same way.
        assert!(closed_within(&mut asking, Duration::from_secs(2)).await);

        shutdown.cancel();
        server.await.unwrap();
    }

    /// docs/operations.md lists every metric; regenerate with
    /// `DEFENRA_UPDATE_DOCS=1 cargo test -p defenra-agent`.
    #[test]
    fn operations_doc_lists_every_metric() {
        crate::docsync::check_operations_section("metrics", &metrics_markdown());
    }
}
