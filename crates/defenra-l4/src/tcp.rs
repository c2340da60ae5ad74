//! TCP forwarding: the accept loop of one proxy and the life of one connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use defenra_shield::{Admission, ConnKind, ConnTicket};

use crate::proxy_protocol;
use crate::relay::{CopyMode, RelayEnd, relay};
use crate::resolve::Target;
use crate::stats::GaugeGuard;
use crate::supervisor::{ListenerContext, bind_with_retry};

/// Binds the proxy's port (one socket, shared by every worker runtime's accept loop) and
/// accepts on it until `stop`. Returns once every accept loop has
/// closed its socket, so the port is free when the supervisor moves on.
pub(crate) async fn run(
    context: ListenerContext,
    targets: watch::Receiver<Arc<Target>>,
    stop: CancellationToken,
) {
    let sharing = if context.workers.is_empty() {
        PortSharing::Exclusive
    } else {
        PortSharing::Shared(context.workers.len())
    };
    let Some(listeners) = bind_with_retry(&context, &stop, |address| bind(address, sharing)).await
    else {
        return;
    };
    if context.workers.is_empty() {
        for listener in listeners {
            accept_loop(context.clone(), listener, targets.clone(), stop.clone()).await;
        }
        return;
    }
    let loops: Vec<_> = context
        .workers
        .iter()
        .zip(listeners)
        .map(|(worker, listener)| {
            worker.spawn(accept_loop(
                context.clone(),
                listener,
                targets.clone(),
                stop.clone(),
            ))
        })
        .collect();
    for accept in loops {
        // A worker runtime that shut down drops its loop, and with it the socket, so no
        // connection waits in the queue of a socket nobody accepts on.
        if let Err(error) = accept.await {
            tracing::error!(port = context.stats.port, %error, "tcp accept loop ended abnormally");
        }
    }
}

/// Accepts on one socket until `stop`, forwarding each connection to the current target on
/// the runtime this loop runs on. A target change starts a new generation: new connections
/// go to the new target while the old generation's connections drain for `drain_grace`.
async fn accept_loop(
    context: ListenerContext,
    listener: std::net::TcpListener,
    mut targets: watch::Receiver<Arc<Target>>,
    stop: CancellationToken,
) {
    // Registered with the reactor of the runtime that runs this loop.
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(port = context.stats.port, %error, "tcp listener cannot be registered");
            return;
        }
    };
    let mut generation = Generation::new(Arc::clone(&targets.borrow_and_update()));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = targets.changed() => {
                if changed.is_err() {
                    break;
                }
                let next = Generation::new(Arc::clone(&targets.borrow_and_update()));
                std::mem::replace(&mut generation, next).retire(&context);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => accept_one(&context, &generation, stream, peer),
                Err(error) => {
                    tracing::warn!(port = context.stats.port, %error, "tcp accept failed");
                    // Out of file descriptors or similar: back off instead of spinning.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            },
        }
    }
    // Close the port before draining, so a replacement listener can bind it at once.
    drop(listener);
    generation.retire(&context);
}

/// Connections that share one target. Retiring a generation lets its connections finish
/// on their own for `drain_grace`, then cancels the rest.
struct Generation {
    target: Arc<Target>,
    connections: TaskTracker,
    cancel: CancellationToken,
}

impl Generation {
    fn new(target: Arc<Target>) -> Self {
        Generation {
            target,
            connections: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn retire(self, context: &ListenerContext) {
        let Generation {
            connections,
            cancel,
            ..
        } = self;
        connections.close();
        let grace = context.options.drain_grace;
        context.drains.spawn(async move {
            tokio::select! {
                () = connections.wait() => {}
                () = tokio::time::sleep(grace) => {
                    cancel.cancel();
                    connections.wait().await;
                }
            }
        });
    }
}

fn accept_one(
    context: &ListenerContext,
    generation: &Generation,
    client: TcpStream,
    peer: SocketAddr,
) {
    // Banned peers and peers over their caps are reset before anything else happens.
    let ticket = match &context.shield {
        None => ConnTicket::default(),
        Some(shield) => match shield.admit(peer.ip(), ConnKind::L4) {
            Admission::Proceed(ticket) => ticket,
            // Counted by the shield.
            Admission::Refuse(_) => {
                // SO_LINGER 0: close() sends RST at once and never blocks.
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
        },
    };
    let stats = Arc::clone(&context.stats);
    stats.connections_total.fetch_add(1, Relaxed);
    let active = stats.connections_active.fetch_add(1, Relaxed) + 1;
    if active > context.options.max_connections_per_proxy as u64 {
        stats.connections_active.fetch_sub(1, Relaxed);
        stats.connections_rejected_total.fetch_add(1, Relaxed);
        tracing::debug!(%peer, port = stats.port, "tcp connection over the proxy's cap; closed");
        return;
    }
    let target = Arc::clone(&generation.target);
    let cancel = generation.cancel.clone();
    let options = Arc::clone(&context.options);
    generation.connections.spawn(async move {
        let _active = GaugeGuard(&stats.connections_active);
        let _ticket = ticket;
        let connection = Connection {
            peer,
            target: &target,
            options: &options,
            stats: &stats,
        };
        tokio::select! {
            () = cancel.cancelled() => {
                tracing::debug!(%peer, port = stats.port, "tcp connection closed after the drain grace");
            }
            result = connection.forward(client) => match result {
                Ok(RelayEnd::Closed) => {}
                Ok(RelayEnd::Idle) => {
                    stats.idle_timeouts_total.fetch_add(1, Relaxed);
                    tracing::debug!(%peer, port = stats.port, "tcp connection idle; closed");
                }
                Err(ForwardError::Connect(error)) => {
                    stats.connect_errors_total.fetch_add(1, Relaxed);
                    // One line a second per forward: a destination that is down must not
                    // write a line for every client that tries.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |since| since.as_secs());
                    let suppressed = {
                        let mut log = stats.connect_error_log.lock();
                        if log.0 == now {
                            log.1 += 1;
                            None
                        } else {
                            log.0 = now;
                            Some(std::mem::take(&mut log.1))
                        }
                    };
                    if let Some(suppressed) = suppressed {
                        tracing::warn!(%peer, port = stats.port, %error, suppressed, "tcp destination unreachable");
                    }
                }
                Err(ForwardError::Relay(error)) => {
                    tracing::debug!(%peer, port = stats.port, %error, "tcp connection ended with an error");
                }
            },
        }
    });
}

enum ForwardError {
    /// Resolving or connecting to the destination failed or timed out.
    Connect(io::Error),
    /// Reading or writing either side failed after the connection was set up.
    Relay(io::Error),
}

struct Connection<'a> {
    peer: SocketAddr,
    target: &'a Target,
    options: &'a crate::L4Options,
    stats: &'a crate::stats::ProxyStats,
}

impl Connection<'_> {
    async fn forward(&self, mut client: TcpStream) -> Result<RelayEnd, ForwardError> {
        // Small writes (interactive protocols, TLS handshakes) must not wait for Nagle.
        // On Linux accepted sockets inherit TCP_NODELAY from the listener (`bind`).
        #[cfg(not(target_os = "linux"))]
        let _ = client.set_nodelay(true);
        let started = Instant::now();
        let deadline = started + self.options.connect_timeout;
        let own = SocketAddr::new(self.options.bind_ip, self.stats.port);
        let mut upstream = connect(self.target, deadline, own)
            .await
            .map_err(ForwardError::Connect)?;
        // The proxy's response time in reports to Core: how long the destination took.
        self.stats.destination_connects_total.fetch_add(1, Relaxed);
        self.stats.destination_connect_micros_total.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
        let _ = upstream.set_nodelay(true);
        if self.target.proxy_protocol {
            let local = client.local_addr().map_err(ForwardError::Relay)?;
            let header = proxy_protocol::header_v2(self.peer, local);
            upstream
                .write_all(&header)
                .await
                .map_err(ForwardError::Relay)?;
        }
        let mode = CopyMode {
            buffer_size: self.options.tcp_buffer_size,
            splice: self.options.splice,
        };
        relay(
            &mut client,
            &mut upstream,
            mode,
            self.options.idle_timeout,
            &self.stats.bytes_from_client_total,
            &self.stats.bytes_to_client_total,
        )
        .await
        .map_err(ForwardError::Relay)
    }
}

/// Tries each of the destination's addresses in turn until one accepts or `deadline`
/// passes (resolution included). An address that is the forward's own listener (`own`, or
/// its port on loopback or any address) is refused: connecting to it would open one more
/// connection of this forward for every connection, without end.
async fn connect(target: &Target, deadline: Instant, own: SocketAddr) -> io::Result<TcpStream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    let addresses = tokio::time::timeout_at(deadline, target.addresses())
        .await
        .map_err(|_| timed_out())??;
    let mut last_error = None;
    for address in addresses.iter() {
        let ip = address.ip().to_canonical();
        if address.port() == own.port()
            && (ip == own.ip().to_canonical() || ip.is_loopback() || ip.is_unspecified())
        {
            last_error = Some(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{address} is this forward's own listener"),
            ));
            continue;
        }
        match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(error)) => {
                last_error = Some(io::Error::new(error.kind(), format!("{address}: {error}")));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{address}: connect timed out"),
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("destination has no addresses")))
}

/// Whether a proxy's socket is used by one accept loop or by one per worker.
#[derive(Clone, Copy)]
enum PortSharing {
    Exclusive,
    /// One socket, duplicated for this many accept loops, each registered with its own
    /// worker's reactor: a new connection wakes them all and the first worker to run takes
    /// it. Side by side with HAProxy this made 1.05-1.14 of its connection rate, against
    /// 0.87-0.96 with one `SO_REUSEPORT` socket per worker, where the kernel hashes each
    /// connection to a socket whether its worker is busy or not (docs/l4.md).
    Shared(usize),
}

/// The proxy's listening socket, and a duplicate of it per further accept loop:
/// `SO_REUSEADDR` (so a restarted proxy rebinds while old connections sit in TIME_WAIT),
/// `TCP_NODELAY` for the accepted sockets to inherit, and a deep accept backlog for
/// connection bursts. No `SO_REUSEPORT`: a port someone else holds is always a bind failure.
fn bind(
    address: SocketAddr,
    sharing: PortSharing,
) -> io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    let count = match sharing {
        PortSharing::Exclusive => 1,
        PortSharing::Shared(count) => count.max(1),
    };
    let first = bind_one(address)?;
    let local_addr = first.local_addr()?;
    let mut listeners = Vec::with_capacity(count);
    for _ in 1..count {
        listeners.push(first.try_clone()?);
    }
    listeners.insert(0, first);
    Ok((listeners, local_addr))
}

fn bind_one(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        // `::` accepts IPv4 clients too.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    // Inherited by every accepted socket on Linux: one system call per connection less.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let (mut listeners, address) =
            bind("127.0.0.1:0".parse().unwrap(), PortSharing::Exclusive).unwrap();
        let listener = TcpListener::from_std(listeners.remove(0)).unwrap();
        let _client = TcpStream::connect(address).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn shared_loops_use_one_socket_on_one_port() {
        let (listeners, address) =
            bind("127.0.0.1:0".parse().unwrap(), PortSharing::Shared(3)).unwrap();
        assert_eq!(listeners.len(), 3);
        for listener in &listeners {
            assert_eq!(listener.local_addr().unwrap(), address);
        }
        // One socket: a second bind of the port fails while it is held.
        assert_eq!(
            bind(address, PortSharing::Shared(2)).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
    }

    #[test]
    fn a_port_held_elsewhere_cannot_be_bound() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = holder.local_addr().unwrap();
        let error = bind(address, PortSharing::Shared(2)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(holder);
        assert!(bind(address, PortSharing::Shared(2)).is_ok());
    }
}
