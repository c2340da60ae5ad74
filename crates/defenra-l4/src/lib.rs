//! TCP and UDP port forwarding: one listener per enabled entry of the snapshot's `proxies`,
//! reconciled against every new snapshot.
//!
//! This crate owns the L4 listeners, the forwarding of bytes and datagrams, and their
//! counters. It must never read files, flags or env vars, never print, and never block the
//! config task: [`L4Service`]'s [`Reload`] only hands the desired set to the supervisor task.
//!
//! Start reading at [`L4Service`], then `supervisor.rs` (the reconcile loop), `tcp.rs`
//! (accept, connect), `relay.rs` and `splice.rs` (moving bytes) and `udp.rs` (sessions).

mod proxy_protocol;
mod relay;
mod resolve;
#[cfg(target_os = "linux")]
mod splice;
mod stats;
mod supervisor;
mod tcp;
mod udp;

/// Entry points for the fuzz targets in `fuzz/`. Not a stable API. The forwarders parse
/// no bytes of their own (payloads pass through untouched); the one byte format they make
/// is the PROXY protocol v2 header sent to destinations.
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddr;

    /// The PROXY protocol v2 header a destination gets for a connection from `source` to
    /// `destination` (HAProxy's proxy-protocol.txt, section 2.2).
    pub fn proxy_header_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        crate::proxy_protocol::header_v2(source, destination)
    }
}

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use defenra_config::{Issue, L4Proxy, Reload, Snapshot};
use defenra_shield::Shield;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use stats::{L4Stats, ListenerState, ProxyCounters, ProxyTraffic};

/// Tunables of the forwarders. `agent-bin` fills them from flags; tests shorten the timeouts.
#[derive(Clone, Debug)]
pub struct L4Options {
    /// Address every listener binds (`--l4-bind`).
    pub bind_ip: IpAddr,
    /// How long a TCP connection to the destination may take, name resolution included.
    pub connect_timeout: Duration,
    /// A TCP connection with no bytes moving in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// A UDP session with no datagram in either direction for this long is removed.
    pub udp_session_idle: Duration,
    /// Open TCP connections per proxy; further clients are accepted and closed at once.
    pub max_connections_per_proxy: usize,
    /// UDP sessions per proxy. A full table makes room for a new client by ending the
    /// session idle the longest (of a sample), if idle for `udp_evictable_after`; otherwise
    /// the new client's datagram is dropped.
    pub max_udp_sessions_per_proxy: usize,
    /// How long a UDP session must have been idle before a full table may end it for a new
    /// client. Sessions active more recently are never pushed out by a flood of new sources.
    pub udp_evictable_after: Duration,
    /// How long connections of a stopped or changed proxy may keep running.
    pub drain_grace: Duration,
    /// Size of each of the two userspace copy buffers of a TCP connection, allocated when
    /// bytes arrive and released when a read drains the socket. 48 KiB measured best on
    /// loopback (docs/l4.md): a buffer as large as a 64 KiB segment makes every read look
    /// short, so each one waits for the next readiness event.
    pub tcp_buffer_size: usize,
    /// Forward bulk TCP data with `splice(2)` (Linux; ignored elsewhere). A direction
    /// switches once one read fills its userspace buffer. Off by default: it costs the proxy
    /// less CPU per byte, but on loopback the endpoints pay more than it saves (docs/l4.md).
    pub splice: bool,
    /// First wait before retrying a port that could not be bound; doubles up to
    /// `bind_retry_max`.
    pub bind_retry_initial: Duration,
    pub bind_retry_max: Duration,
    /// How long a resolved destination host name is reused. A stale entry is still used
    /// while a fresh lookup runs in the background.
    pub dns_cache_ttl: Duration,
}

impl Default for L4Options {
    fn default() -> Self {
        L4Options {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            udp_session_idle: Duration::from_secs(60),
            max_connections_per_proxy: 10_000,
            max_udp_sessions_per_proxy: 4_096,
            udp_evictable_after: Duration::from_secs(1),
            drain_grace: Duration::from_secs(30),
            tcp_buffer_size: 48 * 1024,
            splice: false,
            bind_retry_initial: Duration::from_secs(1),
            bind_retry_max: Duration::from_secs(30),
            dns_cache_ttl: Duration::from_secs(30),
        }
    }
}

/// Failures of the service as a whole. A single connection's failure is logged and counted,
/// never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum L4Error {
    #[error("l4 service is already serving")]
    AlreadyServing,
}

/// The TCP/UDP forwarding service. Cheap to construct; nothing is bound until [`serve`]
/// runs and a snapshot names a proxy.
///
/// [`serve`]: L4Service::serve
pub struct L4Service {
    options: Arc<L4Options>,
    /// The latest desired proxy set. A watch channel keeps only the newest value, so a
    /// reload never waits and a reload sent before `serve` starts is applied when it does.
    desired: watch::Sender<Arc<Vec<L4Proxy>>>,
    stats: Arc<L4Stats>,
    serving: AtomicBool,
    /// Runtimes the TCP listeners accept on, each with an accept loop on the proxy's socket (see
    /// [`with_workers`]). Empty: one socket per proxy, accepting on the runtime `serve`
    /// runs on.
    ///
    /// [`with_workers`]: L4Service::with_workers
    workers: Arc<[Handle]>,
    /// Bans and per-address caps; none when the embedding program gives no shield.
    shield: Option<Arc<Shield>>,
}

impl L4Service {
    pub fn new(options: L4Options) -> Self {
        let (desired, _) = watch::channel(Arc::new(Vec::new()));
        L4Service {
            options: Arc::new(options),
            desired,
            stats: Arc::new(L4Stats::default()),
            serving: AtomicBool::new(false),
            workers: Arc::from([]),
            shield: None,
        }
    }

    /// Asks `shield` at every TCP accept (banned peers, `--l4-max-conns-per-ip`,
    /// `--l4-new-conns-per-ip-per-minute`: closed at once with a reset) and for every UDP
    /// datagram (a banned sender's are dropped).
    #[must_use]
    pub fn with_shield(mut self, shield: Arc<Shield>) -> Self {
        self.shield = Some(shield);
        self
    }

    /// Accepts TCP connections on each of `workers` instead of on the runtime `serve` runs
    /// on: every TCP proxy runs an accept loop on each worker over its one socket, so the
    /// first free worker takes a new connection and the connection lives on that thread
    /// from accept to close (with one current-thread
    /// runtime per core, no work stealing and no cross-thread wake-ups; docs/l4.md).
    ///
    /// The runtimes must keep running until `serve` has returned: the connections and
    /// their drain timers live on them. The connection cap counts across workers. UDP
    /// listeners and the supervisor stay on `serve`'s runtime.
    #[must_use]
    pub fn with_workers(mut self, workers: Vec<Handle>) -> Self {
        self.workers = Arc::from(workers);
        self
    }

    /// Runs the supervisor until `shutdown` is cancelled. On shutdown it stops every
    /// listener, then lets established connections drain for up to `drain_grace`.
    ///
    /// # Errors
    ///
    /// [`L4Error::AlreadyServing`] when called a second time.
    pub async fn serve(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), L4Error> {
        if self.serving.swap(true, Ordering::SeqCst) {
            return Err(L4Error::AlreadyServing);
        }
        let supervisor = supervisor::Supervisor::new(
            Arc::clone(&self.options),
            Arc::clone(&self.stats),
            self.desired.subscribe(),
            Arc::clone(&self.workers),
            self.shield.clone(),
        );
        supervisor.run(shutdown).await;
        Ok(())
    }

    /// Counters and per-proxy listener state, for `/stats` and `/metrics`.
    pub fn stats(&self) -> Arc<L4Stats> {
        Arc::clone(&self.stats)
    }

    /// The options the service was built with.
    pub fn options(&self) -> &L4Options {
        &self.options
    }
}

impl Reload for L4Service {
    /// Hands the snapshot's proxies to the supervisor and returns. Bind failures show up
    /// later in [`L4Stats`] details, per entry, because binding happens on the supervisor's
    /// listeners, not here.
    fn reload(&self, snapshot: &Arc<Snapshot>, _issues: &mut Vec<Issue>) {
        let proxies = &snapshot.proxies;
        self.desired.send_if_modified(|current| {
            if current.as_slice() == proxies.as_slice() {
                return false;
            }
            *current = Arc::new(proxies.clone());
            true
        });
    }
}
