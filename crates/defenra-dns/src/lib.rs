//! The Defenra agent's authoritative DNS server with GeoDNS answers.
//!
//! This crate owns the UDP and TCP listeners on `--dns-listen`, the [`ZoneIndex`] (every
//! served name with its answers precompiled to wire bytes, rebuilt on each config
//! snapshot) and the query handler. It must never recurse or forward, never read config
//! files or flags, and never allocate or do I/O beyond the client socket while answering a
//! query (the one exception is a GeoIP cache miss, which inserts into the bounded cache).
//!
//! Start reading at [`DnsService`]: [`Reload`](defenra_config::Reload) builds the index,
//! [`DnsService::serve`] runs the socket loops, and `answer.rs` turns one packet into one
//! response.

mod answer;
#[cfg(target_os = "linux")]
mod batch;
#[doc(hidden)]
pub mod fuzzing;
mod rrl;
mod server;
mod stats;
mod tcp;
mod wire;
mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use defenra_config::{Issue, Reload, Snapshot};
use defenra_geo::GeoLookup;

pub use answer::Transport;
pub use defenra_config::Cidr;
pub use rrl::{Clock, MonotonicClock, RrlOptions};
pub use server::DnsSockets;
pub use stats::DnsStats;
pub use zone::{GEO_TTL, ZoneIndex};

/// Tunables of the DNS service. `DnsOptions::default()` is what the agent runs with.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// This agent's public address: the last resort of GeoDNS answers, and the address of
    /// the synthesised `ns1.<zone>` when a zone has no NS records.
    pub agent_ip: Option<IpAddr>,
    /// The largest UDP response we send, whatever the client's EDNS buffer says. 1232
    /// avoids IP fragmentation (DNS Flag Day 2020).
    pub udp_payload_limit: u16,
    /// Each TCP message must arrive whole within this time of the moment the connection
    /// began waiting for it (after the previous answer, or the accept), however its bytes
    /// are spread; otherwise the connection is closed (RFC 7766 §6.2.3). Writing the
    /// answers has the same bound.
    pub tcp_idle_timeout: Duration,
    /// At most this many TCP connections at once. When full, the connection idle the
    /// longest is closed to make room; when none is idle, the new one is closed.
    pub tcp_max_connections: usize,
    /// At most this many TCP connections at once from one address; more are closed when
    /// accepted.
    pub tcp_max_connections_per_ip: usize,
    /// A TCP connection is closed after this many messages.
    pub tcp_max_queries: usize,
    /// UDP datagrams taken per `recvmmsg(2)` on Linux (at most 64); 1 receives and sends
    /// one datagram per system call.
    pub udp_batch: usize,
    /// Response rate limiting of UDP answers (off by default).
    pub rrl: RrlOptions,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            agent_ip: None,
            udp_payload_limit: 1232,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1000,
            tcp_max_connections_per_ip: 10,
            tcp_max_queries: 1000,
            udp_batch: 32,
            rrl: RrlOptions::default(),
        }
    }
}

/// The authoritative DNS service. Construct it, hand it snapshots through
/// [`Reload::reload`], and run [`DnsService::serve`] on sockets from [`DnsSockets::bind`].
/// Before the first reload every query is REFUSED (no zone is served).
pub struct DnsService {
    /// The current index; each query does one load.
    zones: ArcSwap<ZoneIndex>,
    geo: Option<Arc<dyn GeoLookup>>,
    options: DnsOptions,
    stats: Arc<DnsStats>,
    /// Response rate limiting; `None` when off.
    rrl: Option<rrl::Rrl>,
    /// The rate limiter's time.
    clock: Arc<dyn Clock>,
    /// Numbers zone indexes, so rate-limit classes of an older index stay apart.
    generation: AtomicU64,
}

impl DnsService {
    /// `geo` locates clients for GeoDNS; without it every GeoDNS answer comes from the
    /// `default` key or `agent_ip`.
    pub fn new(geo: Option<Arc<dyn GeoLookup>>, options: DnsOptions) -> Self {
        let stats = Arc::new(DnsStats::default());
        let rrl = rrl::Rrl::new(&options.rrl);
        if let Some(rrl) = &rrl {
            stats.rrl_enabled(rrl.capacity());
        }
        DnsService {
            zones: ArcSwap::from_pointee(ZoneIndex::default()),
            geo,
            options,
            stats,
            rrl,
            clock: Arc::new(MonotonicClock::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Replaces the rate limiter's clock (tests move one by hand).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The service's counters; `DnsStats` implements
    /// [`StatsSource`](defenra_config::stats::StatsSource) as service `dns`.
    pub fn stats(&self) -> Arc<DnsStats> {
        Arc::clone(&self.stats)
    }

    /// The options the service was built with.
    pub fn options(&self) -> &DnsOptions {
        &self.options
    }

    /// The current zone index.
    pub fn zones(&self) -> Arc<ZoneIndex> {
        self.zones.load_full()
    }

    /// Answers one query message as the socket loops do, writing the response into `out`
    /// (cleared first). Returns false when the packet gets no response (too short to be a
    /// query, a response itself, or a UDP response dropped by rate limiting). Never
    /// panics, whatever `packet` holds.
    pub fn answer(
        &self,
        packet: &[u8],
        source: IpAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> bool {
        self.answer_with(packet, source, transport, self.rrl_now(), out)
    }

    /// The rate limiter's time in microseconds (0 when it is off: no clock is read).
    pub(crate) fn rrl_now(&self) -> u64 {
        match self.rrl {
            Some(_) => self.clock.now().as_micros() as u64,
            None => 0,
        }
    }

    /// [`DnsService::answer`] with the rate limiter's time (from [`DnsService::rrl_now`],
    /// read once per batch by the UDP loops).
    pub(crate) fn answer_with(
        &self,
        packet: &[u8],
        source: IpAddr,
        transport: Transport,
        now_us: u64,
        out: &mut Vec<u8>,
    ) -> bool {
        let index = self.zones.load();
        let context = answer::Context {
            index: &index,
            geo: self.geo.as_deref(),
            stats: &self.stats,
            udp_payload_limit: self.options.udp_payload_limit,
            rrl: self.rrl.as_ref(),
            now_us,
        };
        answer::handle(&context, packet, source, transport, out)
    }
}

impl Reload for DnsService {
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>) {
        let mut index = ZoneIndex::build(snapshot, self.options.agent_ip, issues);
        index.generation = self.generation.fetch_add(1, Relaxed) + 1;
        self.stats.reloaded(index.n_zones(), index.n_records());
        self.zones.store(Arc::new(index));
    }
}

/// Why the DNS service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    #[error("cannot bind dns {protocol} socket on {addr}: {source}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dns socket on {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
