//! Listener loops: accept under a connection limit, TLS handshake, hyper connection with
//! slow-client timeouts, idle close and graceful shutdown.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::rt::{Read, Write};
use hyper::server::conn::http2;
use hyper::service::{HttpService as HyperService, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use defenra_shield::{Admission, ConnKind, ConnTicket};

use crate::proxy::Conn;
use crate::stats::{Event, ListenerStats};
use crate::traffic::DomainTraffic;
use crate::{HttpError, HttpOptions, HttpService};

/// Pause after an accept error (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    Http,
    Https,
}

impl Listener {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Listener::Http => "http",
            Listener::Https => "https",
        }
    }

    /// The scheme clients used, for `X-Forwarded-Proto` and the WAF.
    pub(crate) fn scheme(self) -> &'static str {
        self.name()
    }
}

/// Accepts connections until `shutdown`, then waits for every connection and tunnel.
pub(crate) async fn serve(
    service: Arc<HttpService>,
    listener: TcpListener,
    kind: Listener,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::LocalAddr {
            listener: kind.name(),
            source,
        })?;
    let builders = Arc::new(Builders::new(&service.options));
    let raw_pool = Arc::new(crate::origin::RawPool::new(&service.options));
    let limit = Arc::new(Semaphore::new(service.options.max_connections.max(1)));
    // Origin exchanges one HTTP/2 connection may start at once (0: no cap).
    let stream_slots = match service.options.origin_max_connections_per_client {
        0 => Semaphore::MAX_PERMITS,
        cap => cap.min(Semaphore::MAX_PERMITS),
    };
    let tracker = TaskTracker::new();
    tracing::info!(listener = kind.name(), address = %local, "listening");
    // Closes idle origin connections past the pool's idle timeout.
    let sweep_period = (service.options.pool_idle_timeout / 2).max(Duration::from_secs(1));
    let mut sweep = tokio::time::interval(sweep_period);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel's
        // backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                service.origins.sweep();
                raw_pool.sweep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    service.stats.count(Event::AcceptError);
                    tracing::warn!(listener = kind.name(), %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Banned peers and peers at their connection cap are closed before TLS or any
        // read, with a reset: no TIME_WAIT is kept for them.
        let ticket = match service.shield.admit(peer.ip(), ConnKind::Http) {
            Admission::Proceed(ticket) => ticket,
            Admission::Refuse(_) => {
                // SO_LINGER 0: close() sends RST at once and never blocks.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            header_timeout: service.header_timeout(),
            service: Arc::clone(&service),
            peer,
            peer_ip: crate::headers::ip_value(peer.ip().to_canonical()),
            listener: kind,
            local_port: local.port(),
            shutdown: shutdown.clone(),
            raw_pool: Arc::clone(&raw_pool),
            meter: Arc::new(Meter::default()),
            client_slots: parking_lot::Mutex::new(None),
            stream_slots: Semaphore::new(stream_slots),
        });
        tracker.spawn(serve_connection(
            conn,
            stream,
            Arc::clone(&builders),
            (permit, ticket),
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    tracing::info!(listener = kind.name(), address = %local, "stopped");
    Ok(())
}

/// hyper's HTTP/2 server. Which protocol serves a connection is decided before anything
/// reads from it: by ALPN on TLS, by peeking for the HTTP/2 preface on plain TCP. HTTP/1.x
/// goes to the engine in `h1`.
struct Builders {
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(options: &HttpOptions) -> Self {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(options.http2_max_concurrent_streams);
        Builders { http2 }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4). A plain-text client that opens with it
/// speaks h2c with prior knowledge; no HTTP/1 request line can start like it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn serve_connection(
    conn: Arc<Conn>,
    stream: TcpStream,
    builders: Arc<Builders>,
    // Held until the connection ends: the listener's slot and the shield's count.
    _admitted: (OwnedSemaphorePermit, ConnTicket),
) {
    let listener_stats = conn.service.stats.listener(conn.listener);
    listener_stats.connection_opened();
    let meter = Arc::clone(&conn.meter);
    match conn.listener {
        Listener::Http => serve_plain(&conn, stream, &builders, &meter).await,
        // Boxed, so that plain connections' tasks do not carry room for a TLS session.
        Listener::Https => Box::pin(serve_tls(&conn, stream, &builders, &meter)).await,
    }
    meter.flush_into(listener_stats);
    listener_stats.connection_closed();
}

async fn serve_plain(conn: &Arc<Conn>, stream: TcpStream, builders: &Builders, meter: &Arc<Meter>) {
    let timeout = conn.header_timeout;
    let Ok(Some(h2)) = tokio::time::timeout(timeout, opens_with_h2_preface(&stream)).await else {
        // Closed, broken or silent before the first bytes: nothing to answer.
        return;
    };
    let io = Metered {
        inner: stream,
        meter: Arc::clone(meter),
    };
    if h2 {
        run_http2(conn, TokioIo::new(io), builders, meter).await;
    } else {
        crate::h1::serve(conn, io, meter).await;
    }
}

/// Peeks at the first bytes without consuming them: `Some(true)` for the HTTP/2 preface,
/// `Some(false)` for anything else, `None` when the client closes first.
async fn opens_with_h2_preface(stream: &TcpStream) -> Option<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far. Peeking leaves the socket readable, so wait a
        // little instead of spinning; only h2c clients (or a stalled attacker, bounded by
        // the caller's timeout) ever get here.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn serve_tls(conn: &Arc<Conn>, stream: TcpStream, builders: &Builders, meter: &Arc<Meter>) {
    let stats = &conn.service.stats;
    let io = Metered {
        inner: stream,
        meter: Arc::clone(meter),
    };
    let timeout = conn.header_timeout;
    let handshake = conn.service.tls_acceptor.accept(io);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(tls)) => {
            if tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()) {
                run_http2(conn, TokioIo::new(tls), builders, meter).await;
            } else {
                crate::h1::serve(conn, tls, meter).await;
            }
        }
        Ok(Err(error)) => {
            stats.count(Event::TlsHandshakeFailure);
            tracing::debug!(peer = %conn.peer, %error, "TLS handshake failed");
        }
        Err(_) => {
            stats.count(Event::TlsHandshakeFailure);
            tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
        }
    }
}

async fn run_http2<I>(conn: &Arc<Conn>, io: I, builders: &Builders, meter: &Meter)
where
    I: Read + Write + Unpin + Send + 'static,
{
    let service = {
        let conn = Arc::clone(conn);
        service_fn(move |request| Arc::clone(&conn).handle(request))
    };
    // Boxed: an HTTP/2 connection's state is large, and most clients speak HTTP/1.1.
    Box::pin(drive(
        conn,
        builders.http2.serve_connection(io, service),
        meter,
    ))
    .await;
}

/// A hyper server connection that can be asked to finish gracefully.
trait Served: Future<Output = hyper::Result<()>> {
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B, E> Served for http2::Connection<I, S, E>
where
    S: HyperService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs hyper on one connection. Closes it gracefully when the listener shuts down or when
/// no byte moved for a whole keep-alive period (an in-flight exchange finishes first).
async fn drive<C: Served>(conn: &Arc<Conn>, connection: C, meter: &Meter) {
    tokio::pin!(connection);
    let listener_stats = conn.service.stats.listener(conn.listener);
    let period = conn.service.options.keepalive_timeout;
    let mut idle_check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut closing = false;
    // A child token of its own: polling it takes only this connection's lock, where the
    // listener's token would be locked by every connection on every wake-up. Created once,
    // so its waiter is registered once.
    let shutdown = conn.shutdown.child_token();
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            // The connection first: it is what woke the task almost every time.
            biased;
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(peer = %conn.peer, %error, "connection ended with an error");
                }
                break;
            }
            () = cancelled.as_mut(), if !closing => {
                connection.as_mut().close_gracefully();
                closing = true;
            }
            _ = idle_check.tick(), if !closing => {
                if !meter.flush_into(listener_stats) {
                    connection.as_mut().close_gracefully();
                    closing = true;
                }
            }
        }
    }
}

/// Bytes moved on one connection since the last flush into the listener's counters, and
/// the domain of the connection's latest routed request, which those bytes are counted for.
/// Only this connection's task touches it, so the atomics are never contended.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    received: AtomicU64,
    sent: AtomicU64,
    /// Set by `Conn::decide` for each request (cleared for a host without a route). An
    /// HTTP/2 connection carrying several domains at once counts its bytes for the latest.
    domain: ArcSwapOption<DomainTraffic>,
}

impl Meter {
    /// Adds the bytes moved since the last call to `stats` (and to the current domain's
    /// counters); false when none moved.
    pub(crate) fn flush_into(&self, stats: &ListenerStats) -> bool {
        let received = self.received.swap(0, Relaxed);
        let sent = self.sent.swap(0, Relaxed);
        stats.add_bytes(received, sent);
        if (received > 0 || sent > 0)
            && let Some(domain) = &*self.domain.load()
        {
            domain.bytes(received, sent);
        }
        received > 0 || sent > 0
    }

    /// Counts the connection's bytes, and its 5xx responses, for `domain` from now on.
    pub(crate) fn attribute(&self, domain: Option<&Arc<DomainTraffic>>) {
        let current = self.domain.load();
        let same = match (&*current, domain) {
            (Some(current), Some(domain)) => Arc::ptr_eq(current, domain),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.domain.store(domain.cloned());
        }
    }

    /// A response with `status` went to the client of the current domain.
    pub(crate) fn responded(&self, status: http::StatusCode) {
        if status.is_server_error()
            && let Some(domain) = &*self.domain.load()
        {
            domain.error();
        }
    }
}

/// A client socket that counts the bytes it moves.
pub(crate) struct Metered {
    inner: TcpStream,
    meter: Arc<Meter>,
}

impl AsyncRead for Metered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.meter.received.fetch_add(read as u64, Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &poll {
            this.meter.sent.fetch_add(*written as u64, Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = &poll {
            this.meter.sent.fetch_add(*written as u64, Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
