//! The HTTP/HTTPS reverse proxy of the edge agent: host routing, TLS termination with SNI,
//! ACME HTTP-01 answers, redirects to HTTPS, the WAF hook and streaming proxying to origins.
//!
//! This crate owns the listeners' connection handling (its own HTTP/1.x engine in `h1/`,
//! hyper 1 for HTTP/2), the per-snapshot [`RouteTable`] and certificate table, and the
//! pools of origin connections (driven by the requests that use them, `origin.rs`).
//! It never reads files, flags or env vars, never binds sockets itself (the caller hands it
//! bound listeners) and never buffers a whole body.
//!
//! Start reading at [`HttpService`]; a request's life is in `h1/mod.rs` (HTTP/1.x) or
//! `proxy.rs` (`Conn::handle`, HTTP/2), both routed by `Conn::decide`, and every failure
//! becomes a status in one place, [`ProxyError::status`].

mod access;
mod body;
mod edge;
mod h1;
mod headers;
mod origin;
mod proxy;
mod route;
mod server;
mod slots;
mod slow;
mod stats;
mod tls;
mod traffic;

/// Entry points for the fuzz targets in `fuzz/`: the HTTP/1 engine's head parsers and
/// writers and its chunked scanner. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::h1::fuzzing::*;
}

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use defenra_config::{Issue, Reload, Snapshot};
use defenra_shield::Shield;
use defenra_waf::WafEngine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::ACCESS_TARGET;
pub use proxy::{ErrorSource, ProxyError};
pub use route::RouteTable;
pub use stats::HttpStats;
pub use traffic::{ClientLog, DomainTraffic, SeenClient, TrafficTotals};

/// Limits and origin settings of the proxy. `Default` gives the production values.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Origin port for `off` and `flexible` domains (plain HTTP to the origin).
    pub origin_http_port: u16,
    /// Origin port for `full` and `full_strict` domains (HTTPS to the origin).
    pub origin_https_port: u16,
    /// How long the origin may take to send its response headers, connect included,
    /// before the client gets 504.
    pub origin_timeout: Duration,
    /// How long a TCP (and TLS) connect to an origin may take before the client gets 502.
    pub origin_connect_timeout: Duration,
    /// Largest request body passed to an origin; larger ones get 413.
    pub max_request_body: u64,
    /// Time a client has to send a complete request head (and to finish the TLS
    /// handshake) before the connection is closed: the slowloris guard. When domains with
    /// Anti-DDoS are configured, the smallest of their `maxHeaderTimeoutSeconds` applies
    /// instead.
    pub header_read_timeout: Duration,
    /// An idle connection (no byte either way for this long) is closed gracefully.
    pub keepalive_timeout: Duration,
    /// Largest request head (request line plus headers); larger ones get 431 (as do heads
    /// of more than 100 fields). Values below 1 KiB are raised to 1 KiB.
    pub max_header_bytes: usize,
    /// Concurrent client connections per listener; further clients wait in the accept
    /// backlog until one closes.
    pub max_connections: usize,
    /// An idle pooled origin connection is closed after this long (nginx's upstream
    /// `keepalive_timeout` default). A request that meets a connection the origin closed
    /// meanwhile is retried on a new one when it had not been sent yet.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per origin (address and, for HTTPS, server name).
    pub pool_max_idle_per_origin: usize,
    /// Requests in flight to one origin address (each holds one origin connection); more
    /// wait for a free one, within `origin_timeout`. Bounds origin connections and memory.
    /// A request takes its slot only once it can progress: after the start of its body
    /// (`request_buffer_bytes`) has arrived.
    pub origin_max_connections: usize,
    /// Origin exchanges one client address (after `proxyIpHeaders`) may have in flight at
    /// once, over all origins; also the most one HTTP/2 connection may have. More wait for
    /// one of their own within `origin_timeout` (then 429), so a client that holds its
    /// exchanges without progressing costs itself, not the origin's other clients. Keep it
    /// below `origin_max_connections`. 0: no cap.
    pub origin_max_connections_per_client: usize,
    /// Request body bytes read from the client before the request takes an origin slot
    /// (the whole body when it is smaller): a body that trickles or never comes holds no
    /// origin connection. nginx reads whole bodies first (`proxy_request_buffering`,
    /// spilling to disk); this proxy never buffers more than this. At most
    /// `max_header_bytes` for HTTP/1.
    pub request_buffer_bytes: usize,
    /// Streams one HTTP/2 connection may have open at once (nginx's
    /// `http2_max_concurrent_streams`).
    pub http2_max_concurrent_streams: u32,
    /// An upgraded connection (WebSocket) in which no byte moved either way for this long
    /// is closed (nginx's `proxy_read_timeout`, 60 s, applies to WebSocket proxying alike).
    pub tunnel_idle_timeout: Duration,
    /// Longest time a CNAME origin's addresses are cached. The system resolver exposes no
    /// TTL, so the cache time is the CNAME record's TTL capped by this value.
    pub origin_dns_max_ttl: Duration,
    /// Write one `info` line per finished request with target [`ACCESS_TARGET`]: client
    /// IP, listener, host, method, path, status, body bytes sent, duration, origin and WAF
    /// verdict. Off costs one branch per request.
    pub access_log: bool,
    /// Most access lines written per second; the others are counted in
    /// `access_log_suppressed_total`.
    pub access_log_max_per_second: u32,
    /// Queue each client address (with its `User-Agent`) once an hour for
    /// [`HttpService::clients`], for reports to Core. Off costs one branch per request.
    pub record_clients: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            origin_http_port: 80,
            origin_https_port: 443,
            origin_timeout: Duration::from_secs(60),
            origin_connect_timeout: Duration::from_secs(10),
            max_request_body: 100 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            max_header_bytes: 32 * 1024,
            max_connections: 16 * 1024,
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_origin: 256,
            origin_max_connections: 256,
            origin_max_connections_per_client: 128,
            request_buffer_bytes: 16 * 1024,
            http2_max_concurrent_streams: 128,
            tunnel_idle_timeout: Duration::from_secs(60),
            origin_dns_max_ttl: Duration::from_secs(300),
            access_log: false,
            access_log_max_per_second: 1000,
            record_clients: false,
        }
    }
}

/// Why a listener stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("cannot read the local address of the {listener} listener: {source}")]
    LocalAddr {
        listener: &'static str,
        source: std::io::Error,
    },
    #[error("cannot build the TLS server configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The reverse proxy. One per agent, shared by the HTTP and HTTPS listeners; `reload`
/// swaps in the routes and certificates of each new snapshot.
pub struct HttpService {
    waf: Arc<WafEngine>,
    /// Per-client protection: asked at accept and for every request of a protected domain.
    shield: Arc<Shield>,
    options: HttpOptions,
    /// The routes (and through them the certificates) of the current snapshot. Requests
    /// and TLS handshakes load it once; `reload` replaces it whole.
    routes: Arc<ArcSwap<RouteTable>>,
    /// One semaphore per origin address, kept across reloads so that a config change does
    /// not reset the count. Locked only by `reload`.
    origin_limits: parking_lot::Mutex<route::OriginLimits>,
    origins: Arc<origin::OriginPool>,
    tls_acceptor: tls::Acceptor,
    stats: Arc<HttpStats>,
    access_log: access::AccessLog,
    /// Per-domain counters, kept across reloads; routes carry their domain's.
    traffic: traffic::TrafficRegistry,
    clients: traffic::ClientLog,
    /// The edge's own pages (errors, 429, the browser challenge) and their request ids.
    edge: edge::EdgePages,
    /// Origin exchanges in flight per client address.
    client_slots: Arc<slots::ClientSlots>,
}

/// Clients queued for reports at most; the oldest is dropped first.
const CLIENT_QUEUE: usize = 10_000;

impl HttpService {
    /// A proxy with no routes: every host answers 404 and every TLS handshake is refused
    /// until the first `reload`. It gets a shield of its own with the default options;
    /// use [`HttpService::with_shield`] to share one with other listeners (L4) and the
    /// operator's ban commands.
    pub fn new(waf: Arc<WafEngine>, options: HttpOptions) -> Self {
        let shield = Arc::new(Shield::new(defenra_shield::ShieldOptions::default()));
        HttpService::with_shield(waf, shield, options)
    }

    /// As [`HttpService::new`], asking `shield` at accept and for every request of a
    /// domain with Anti-DDoS enabled.
    pub fn with_shield(waf: Arc<WafEngine>, shield: Arc<Shield>, options: HttpOptions) -> Self {
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        let origins = Arc::new(origin::OriginPool::new(&options, Arc::clone(&routes)));
        let tls_acceptor = tls::acceptor(Arc::clone(&routes));
        let access_log =
            access::AccessLog::new(options.access_log, options.access_log_max_per_second);
        let clients = traffic::ClientLog::new(options.record_clients, CLIENT_QUEUE);
        let client_slots = Arc::new(slots::ClientSlots::new(
            options.origin_max_connections_per_client,
        ));
        HttpService {
            waf,
            shield,
            options,
            routes,
            origin_limits: parking_lot::Mutex::default(),
            origins,
            tls_acceptor,
            stats: Arc::new(HttpStats::default()),
            access_log,
            traffic: traffic::TrafficRegistry::default(),
            clients,
            edge: edge::EdgePages::new(),
            client_slots,
        }
    }

    /// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on `listener` until
    /// `shutdown` is cancelled, then waits for in-flight connections to finish their
    /// current exchange. The caller bounds that wait with a timeout.
    ///
    /// # Errors
    /// Only when the listener's local address cannot be read; accept errors are logged and
    /// retried.
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), HttpError> {
        server::serve(self, listener, server::Listener::Http, shutdown).await
    }

    /// Serves HTTPS on `listener`: TLS 1.2/1.3 with the certificate picked by SNI from the
    /// current snapshot, ALPN `h2` and `http/1.1`. Shuts down like [`Self::serve_http`].
    ///
    /// # Errors
    /// As [`Self::serve_http`].
    pub async fn serve_https(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), HttpError> {
        server::serve(self, listener, server::Listener::Https, shutdown).await
    }

    /// The proxy's counters, for `/stats` and `/metrics`.
    pub fn stats(&self) -> Arc<HttpStats> {
        Arc::clone(&self.stats)
    }

    /// The current route table.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.load_full()
    }

    /// The shield this proxy asks.
    pub fn shield(&self) -> &Arc<Shield> {
        &self.shield
    }

    /// Time a client has for a complete request head: the protected domains' smallest
    /// `slowloris.maxHeaderTimeoutSeconds` when there are any, else the listener default.
    pub(crate) fn header_timeout(&self) -> Duration {
        self.shield
            .header_timeout()
            .unwrap_or(self.options.header_read_timeout)
    }

    /// Every configured domain's traffic counters since it was configured, by domain name.
    pub fn traffic(&self) -> Vec<(String, TrafficTotals)> {
        self.traffic.totals()
    }

    /// The client addresses queued for reports (empty unless `record_clients`).
    pub fn clients(&self) -> &ClientLog {
        &self.clients
    }
}

impl Reload for HttpService {
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>) {
        let mut limits = self.origin_limits.lock();
        let table = RouteTable::build_with_limits(
            snapshot,
            &self.options,
            issues,
            &mut limits,
            &mut |domain| self.shield.policy(domain),
            &self.traffic,
        );
        self.routes.store(Arc::new(table));
    }
}
