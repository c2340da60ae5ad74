//! UDP forwarding: one session per client address, each with its own connected upstream
//! socket, so replies (any number of them) find their way back to the right client.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::resolve::Target;
use crate::stats::{GaugeGuard, ProxyStats};
use crate::supervisor::{ListenerContext, bind_with_retry};

/// Largest UDP payload (65535 minus the IPv4 and UDP headers), the size of receive buffers.
const MAX_DATAGRAM: usize = 65_507;
/// Datagrams waiting for a session's upstream socket (it may still be resolving). When
/// full, further datagrams from that client are dropped, never waited for.
const SESSION_QUEUE: usize = 256;
/// How many sessions a full table looks at to find the idlest one to end (Redis's sampled
/// LRU idea): an exact search over thousands of sessions for every datagram of a new
/// client would let a flood of new source addresses cost O(table) each.
const EVICTION_CANDIDATES: usize = 16;

/// Receives on the proxy's port until `stop`, routing each datagram to its client's
/// session. A target change ends every session; the next datagram opens a new one.
pub(crate) async fn run(
    context: ListenerContext,
    mut targets: watch::Receiver<Arc<Target>>,
    stop: CancellationToken,
) {
    let Some(socket) = bind_with_retry(&context, &stop, bind).await else {
        return;
    };
    let mut table = SessionTable {
        socket: Arc::new(socket),
        target: Arc::clone(&targets.borrow_and_update()),
        generation: stop.child_token(),
        sessions: HashMap::new(),
        rotation: VecDeque::new(),
        epoch: Instant::now(),
        next_id: 0,
        closed: mpsc::unbounded_channel(),
        stats: Arc::clone(&context.stats),
        max_sessions: context.options.max_udp_sessions_per_proxy,
        idle: context.options.udp_session_idle,
        evictable_after: context.options.udp_evictable_after,
    };
    let socket = Arc::clone(&table.socket);
    // One receive buffer for the whole listener; each datagram is copied once into the
    // session's queue.
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = targets.changed() => {
                if changed.is_err() {
                    break;
                }
                table.replace_target(Arc::clone(&targets.borrow_and_update()), &stop);
            }
            Some((client, id)) = table.closed.1.recv() => table.forget(client, id),
            received = socket.recv_from(&mut buffer) => match received {
                Ok((n, client)) => {
                    // A banned sender's datagrams are dropped (and counted by the shield).
                    let admitted = context
                        .shield
                        .as_ref()
                        .is_none_or(|shield| shield.admit_datagram(client.ip()));
                    if admitted {
                        table.route(client, &buffer[..n]);
                    }
                }
                Err(error) => {
                    tracing::debug!(port = context.stats.port, %error, "udp receive failed");
                }
            },
        }
    }
    table.generation.cancel();
}

struct SessionTable {
    socket: Arc<UdpSocket>,
    target: Arc<Target>,
    /// Parent of every current session's token; cancelled when the target changes or the
    /// listener stops.
    generation: CancellationToken,
    sessions: HashMap<SocketAddr, SessionHandle>,
    /// Every session once, oldest first, rotated as a full table looks for the idlest one.
    /// Entries of ended sessions are dropped when they come round (a few per new session).
    rotation: VecDeque<(SocketAddr, u64)>,
    /// Sessions record their last activity as milliseconds since this instant.
    epoch: Instant,
    next_id: u64,
    /// Sessions report here when they end, so the table forgets them. The id tells an
    /// ended session from a newer one of the same client.
    closed: (mpsc::UnboundedSender<Ended>, mpsc::UnboundedReceiver<Ended>),
    stats: Arc<ProxyStats>,
    max_sessions: usize,
    idle: Duration,
    /// A full table ends the idlest session it finds if it has been idle this long.
    evictable_after: Duration,
}

/// A client whose session (with this id) ended.
type Ended = (SocketAddr, u64);

struct SessionHandle {
    id: u64,
    queue: mpsc::Sender<Vec<u8>>,
    /// When a datagram last moved either way, in ms since the table's epoch; written by the
    /// session's task.
    last_active_ms: Arc<AtomicU64>,
}

impl SessionTable {
    fn route(&mut self, client: SocketAddr, payload: &[u8]) {
        let stats = &self.stats;
        stats.datagrams_from_client_total.fetch_add(1, Relaxed);
        stats
            .bytes_from_client_total
            .fetch_add(payload.len() as u64, Relaxed);
        let mut datagram = payload.to_vec();
        if let Some(session) = self.sessions.get(&client) {
            match session.queue.try_send(datagram) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats.datagrams_dropped_total.fetch_add(1, Relaxed);
                    return;
                }
                // The session just ended (idle); start a new one with this datagram.
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    self.sessions.remove(&client);
                    datagram = returned;
                }
            }
        }
        if self.sessions.len() >= self.max_sessions && !self.evict_idlest() {
            let stats = &self.stats;
            stats.udp_sessions_rejected_total.fetch_add(1, Relaxed);
            stats.datagrams_dropped_total.fetch_add(1, Relaxed);
            tracing::debug!(%client, port = stats.port, "udp session table full; datagram dropped");
            return;
        }
        let stats = &self.stats;
        self.next_id += 1;
        let id = self.next_id;
        let (queue, receiver) = mpsc::channel(SESSION_QUEUE);
        // A fresh channel has room; if it somehow had not, the datagram is just dropped.
        let _ = queue.try_send(datagram);
        stats.udp_sessions_total.fetch_add(1, Relaxed);
        stats.udp_sessions_active.fetch_add(1, Relaxed);
        let last_active_ms = Arc::new(AtomicU64::new(self.now_ms()));
        let session = Session {
            client,
            listen_socket: Arc::clone(&self.socket),
            target: Arc::clone(&self.target),
            stats: Arc::clone(&self.stats),
            idle: self.idle,
            epoch: self.epoch,
            last_active_ms: Arc::clone(&last_active_ms),
        };
        let cancel = self.generation.child_token();
        let closed = self.closed.0.clone();
        tokio::spawn(async move {
            session.run(receiver, cancel).await;
            let _ = closed.send((client, id));
        });
        self.sessions.insert(
            client,
            SessionHandle {
                id,
                queue,
                last_active_ms,
            },
        );
        self.rotation.push_back((client, id));
        // Two looked at per one added keeps the rotation near the live sessions' count.
        for _ in 0..2 {
            if let Some(entry) = self.rotation.pop_front()
                && self.is_live(entry)
            {
                self.rotation.push_back(entry);
            }
        }
    }

    /// Ends the idlest of the next [`EVICTION_CANDIDATES`] sessions in the rotation if it has
    /// been idle for `evictable_after`, so a full table makes room for a new client instead
    /// of refusing it until a session expires. Sessions active more recently are kept.
    fn evict_idlest(&mut self) -> bool {
        let now_ms = self.now_ms();
        let mut idlest: Option<(SocketAddr, u64)> = None;
        for _ in 0..EVICTION_CANDIDATES.min(self.rotation.len()) {
            let Some((client, id)) = self.rotation.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get(&client).filter(|s| s.id == id) else {
                continue;
            };
            let idle_ms = now_ms.saturating_sub(session.last_active_ms.load(Relaxed));
            if idlest.is_none_or(|(_, most)| idle_ms > most) {
                idlest = Some((client, idle_ms));
            }
            self.rotation.push_back((client, id));
        }
        let Some((client, idle_ms)) = idlest else {
            return false;
        };
        if Duration::from_millis(idle_ms) < self.evictable_after {
            return false;
        }
        // Dropping the queue ends the session's task (`SessionEnd::Forgotten`).
        self.sessions.remove(&client);
        self.stats.udp_sessions_evicted_total.fetch_add(1, Relaxed);
        tracing::debug!(%client, idle_ms, port = self.stats.port, "udp session table full; idlest session ended");
        true
    }

    fn is_live(&self, (client, id): (SocketAddr, u64)) -> bool {
        self.sessions
            .get(&client)
            .is_some_and(|session| session.id == id)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn forget(&mut self, client: SocketAddr, id: u64) {
        if self.is_live((client, id)) {
            self.sessions.remove(&client);
        }
    }

    fn replace_target(&mut self, target: Arc<Target>, stop: &CancellationToken) {
        self.generation.cancel();
        self.generation = stop.child_token();
        self.sessions.clear();
        self.rotation.clear();
        self.target = target;
    }
}

struct Session {
    client: SocketAddr,
    /// The proxy's listening socket: replies must come from the port the client sent to.
    listen_socket: Arc<UdpSocket>,
    target: Arc<Target>,
    stats: Arc<ProxyStats>,
    idle: Duration,
    /// The table's epoch and this session's entry for when a datagram last moved.
    epoch: Instant,
    last_active_ms: Arc<AtomicU64>,
}

enum SessionEnd {
    Expired,
    Cancelled,
    /// The table dropped this session's queue.
    Forgotten,
    Failed(io::Error),
}

impl Session {
    async fn run(self, queue: mpsc::Receiver<Vec<u8>>, cancel: CancellationToken) {
        let _active = GaugeGuard(&self.stats.udp_sessions_active);
        let end = tokio::select! {
            () = cancel.cancelled() => SessionEnd::Cancelled,
            end = self.relay(queue) => end,
        };
        match end {
            SessionEnd::Expired => {
                self.stats.udp_sessions_expired_total.fetch_add(1, Relaxed);
                tracing::debug!(client = %self.client, port = self.stats.port, "udp session expired");
            }
            SessionEnd::Cancelled | SessionEnd::Forgotten => {}
            SessionEnd::Failed(error) => {
                self.stats.connect_errors_total.fetch_add(1, Relaxed);
                tracing::warn!(client = %self.client, port = self.stats.port, %error, "udp destination unreachable");
            }
        }
    }

    async fn relay(&self, mut queue: mpsc::Receiver<Vec<u8>>) -> SessionEnd {
        let upstream = match self.connect().await {
            Ok(upstream) => upstream,
            Err(error) => return SessionEnd::Failed(error),
        };
        let stats = &self.stats;
        let mut buffer: Vec<u8> = Vec::with_capacity(MAX_DATAGRAM);
        let idle = tokio::time::sleep(self.idle);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                datagram = queue.recv() => {
                    let Some(datagram) = datagram else {
                        return SessionEnd::Forgotten;
                    };
                    self.touch();
                    if let Err(error) = upstream.send(&datagram).await {
                        stats.datagrams_dropped_total.fetch_add(1, Relaxed);
                        tracing::debug!(client = %self.client, %error, "udp send to destination failed");
                    }
                }
                received = upstream.recv_buf(&mut buffer) => {
                    match received {
                        Ok(n) => {
                            self.touch();
                            match self.listen_socket.send_to(&buffer[..n], self.client).await {
                                Ok(_) => {
                                    stats.datagrams_to_client_total.fetch_add(1, Relaxed);
                                    stats.bytes_to_client_total.fetch_add(n as u64, Relaxed);
                                }
                                Err(error) => {
                                    stats.datagrams_dropped_total.fetch_add(1, Relaxed);
                                    tracing::debug!(client = %self.client, %error, "udp send to client failed");
                                }
                            }
                        }
                        // A connected UDP socket reports an ICMP "port unreachable" from an
                        // earlier send as an error here; the session stays usable.
                        Err(error) => {
                            tracing::debug!(client = %self.client, %error, "udp receive from destination failed");
                        }
                    }
                    buffer.clear();
                }
                () = &mut idle => {
                    // Re-armed from the last datagram rather than reset on each one.
                    let last = self.epoch
                        + Duration::from_millis(self.last_active_ms.load(Relaxed));
                    let deadline = last + self.idle;
                    if deadline <= Instant::now() {
                        return SessionEnd::Expired;
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        }
    }

    fn touch(&self) {
        self.last_active_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// A socket on an ephemeral port of the destination's family, connected to it, so the
    /// kernel delivers only the destination's replies for this client.
    async fn connect(&self) -> io::Result<UdpSocket> {
        let addresses = self.target.addresses().await?;
        let address = *addresses
            .first()
            .ok_or_else(|| io::Error::other("destination has no addresses"))?;
        let local: SocketAddr = if address.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(address).await?;
        Ok(socket)
    }
}

fn bind(address: SocketAddr) -> io::Result<(UdpSocket, SocketAddr)> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Bursts from many clients queue in the kernel while the loop routes; best effort.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    let local_addr = socket.local_addr()?;
    Ok((socket, local_addr))
}
