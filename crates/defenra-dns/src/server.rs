//! Sockets and loops: one blocking recv/answer/send thread per UDP socket (SO_REUSEPORT,
//! one per core) and the TCP accept loop (connections themselves are in `tcp.rs`).

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::answer::Transport;
use crate::tcp::{Admission, ConnTable};
use crate::{DnsError, DnsService};

/// How often a UDP thread wakes up to look at the shutdown token.
const UDP_POLL: Duration = Duration::from_millis(200);
/// How many times `bind` on port 0 tries to find a port free for both UDP and TCP.
const PORT_ZERO_ATTEMPTS: usize = 16;
/// Upper bound on UDP sockets, whatever the core count.
const MAX_UDP_SOCKETS: usize = 16;

/// Bound DNS sockets: several UDP sockets sharing one port (SO_REUSEPORT spreads queries
/// over them) and one TCP listener on the same port.
#[derive(Debug)]
pub struct DnsSockets {
    udp: Vec<UdpSocket>,
    tcp: StdTcpListener,
    local_addr: SocketAddr,
}

impl DnsSockets {
    /// Binds one UDP socket per core and a TCP listener on `addr`. Port 0 picks a port that
    /// is free for both protocols; all sockets then share it.
    ///
    /// # Errors
    ///
    /// [`DnsError::Bind`] naming the protocol and address that failed.
    pub async fn bind(addr: SocketAddr) -> Result<Self, DnsError> {
        let n_udp = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_UDP_SOCKETS);
        Self::bind_with(addr, n_udp)
    }

    /// [`DnsSockets::bind`] with an explicit number of UDP sockets (at least one).
    ///
    /// # Errors
    ///
    /// [`DnsError::Bind`] naming the protocol and address that failed.
    pub fn bind_with(addr: SocketAddr, n_udp: usize) -> Result<Self, DnsError> {
        let n_udp = n_udp.clamp(1, MAX_UDP_SOCKETS);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let first = udp_socket(addr)?;
            let local_addr = first.local_addr().map_err(|source| DnsError::Bind {
                protocol: "udp",
                addr,
                source,
            })?;
            let tcp = match tcp_listener(local_addr) {
                Ok(tcp) => tcp,
                Err(DnsError::Bind { source, .. })
                    if addr.port() == 0
                        && source.kind() == ErrorKind::AddrInUse
                        && attempt < PORT_ZERO_ATTEMPTS =>
                {
                    continue;
                }
                Err(error) => return Err(error),
            };
            let mut udp = vec![first];
            for _ in 1..n_udp {
                udp.push(udp_socket(local_addr)?);
            }
            return Ok(DnsSockets {
                udp,
                tcp,
                local_addr,
            });
        }
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of UDP sockets.
    pub fn n_udp(&self) -> usize {
        self.udp.len()
    }
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    let bind_error = |source| DnsError::Bind {
        protocol: "udp",
        addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_error)?;
    socket.set_reuse_port(true).map_err(bind_error)?;
    // A bigger receive buffer absorbs bursts while a worker is busy.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into()).map_err(bind_error)?;
    let socket: UdpSocket = socket.into();
    socket
        .set_read_timeout(Some(UDP_POLL))
        .map_err(bind_error)?;
    Ok(socket)
}

fn tcp_listener(addr: SocketAddr) -> Result<StdTcpListener, DnsError> {
    let bind_error = |source| DnsError::Bind {
        protocol: "tcp",
        addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket.listen(1024).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    Ok(socket.into())
}

impl DnsService {
    /// Serves queries on `sockets` until `shutdown` is cancelled, then stops every loop and
    /// returns. A failing client or packet never ends the service.
    ///
    /// # Errors
    ///
    /// [`DnsError::Io`] when the sockets cannot be handed to the runtime or a UDP thread
    /// cannot be started.
    pub async fn serve(
        self: Arc<Self>,
        sockets: DnsSockets,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let DnsSockets {
            udp,
            tcp,
            local_addr,
        } = sockets;
        let io_error = |source| DnsError::Io {
            addr: local_addr,
            source,
        };
        let listener = TcpListener::from_std(tcp).map_err(io_error)?;
        let n_udp = udp.len();
        let mut threads = Vec::with_capacity(n_udp);
        for (number, socket) in udp.into_iter().enumerate() {
            let service = Arc::clone(&self);
            let token = shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dns-udp-{number}"))
                .spawn(move || service.run_udp(&socket, &token))
                .map_err(io_error);
            match thread {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    shutdown.cancel();
                    return Err(error);
                }
            }
        }
        info!(addr = %local_addr, udp_sockets = n_udp, "dns listening");

        let table = Arc::new(ConnTable::new(
            self.options.tcp_max_connections,
            self.options.tcp_max_connections_per_ip,
        ));
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over a cap the new connection is closed at once (dropped here).
                        let guard = match table.admit(canonical(peer.ip()), &self.stats) {
                            Admission::Admitted { guard, evicted } => {
                                if evicted {
                                    self.stats.count_tcp_evicted();
                                }
                                guard
                            }
                            Admission::RefusedPerAddress => {
                                self.stats.count_tcp_rejected_per_ip();
                                continue;
                            }
                            Admission::RefusedFull => {
                                self.stats.tcp_rejected_one();
                                continue;
                            }
                        };
                        let service = Arc::clone(&self);
                        let token = shutdown.clone();
                        tokio::spawn(async move {
                            service.tcp_connection(stream, peer, token, guard).await;
                        });
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        warn!(%error, "dns tcp accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        if joined.is_err() {
            warn!("dns udp threads did not stop cleanly");
        }
        Ok(())
    }

    /// One UDP socket's loop: batched system calls on Linux, one datagram at a time elsewhere.
    fn run_udp(&self, socket: &UdpSocket, shutdown: &CancellationToken) {
        #[cfg(target_os = "linux")]
        if self.options.udp_batch > 1 {
            self.udp_loop_batched(socket, shutdown);
            return;
        }
        self.udp_loop(socket, shutdown);
    }

    /// One datagram at a time: receive into a reused buffer, answer into another, send.
    fn udp_loop(&self, socket: &UdpSocket, shutdown: &CancellationToken) {
        let mut packet = vec![0u8; 65_535];
        let mut response = Vec::with_capacity(65_535);
        while !shutdown.is_cancelled() {
            let (len, peer) = match socket.recv_from(&mut packet) {
                Ok(received) => received,
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::WouldBlock
                            | ErrorKind::TimedOut
                            | ErrorKind::Interrupted
                            | ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue;
                }
                Err(error) => {
                    warn!(%error, "dns udp receive failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let source = canonical(peer.ip());
            if self.answer_with(
                &packet[..len],
                source,
                Transport::Udp,
                self.rrl_now(),
                &mut response,
            ) && let Err(error) = socket.send_to(&response, peer)
            {
                self.stats.count_send_error();
                debug!(%peer, %error, "dns udp send failed");
            }
        }
    }
}

/// IPv4-mapped IPv6 peers (from a dual-stack socket) as plain IPv4.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
