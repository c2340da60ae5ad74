//! The origin side: a pool of HTTP/1.1 connections per origin, driven by the request that
//! uses them (no task per connection), and a connector that dials IPs or resolves CNAME
//! targets with a small TTL cache.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::HttpOptions;
use crate::body::RequestBody;
use crate::h1::buffer::Buffer;
use crate::route::{OriginKind, RouteTable};

/// Cache time for a CNAME target that is no longer in the route table.
const DEFAULT_DNS_TTL: Duration = Duration::from_secs(30);

/// Cached CNAME targets; past this the cache is cleared rather than grown.
const MAX_DNS_ENTRIES: usize = 10_000;

/// Which pooled connections a request may use: the origin kind and the authority dialled.
/// The authority of an HTTPS origin carries the server name (`host@address:port`), so a
/// pooled TLS connection is only reused for the name it was opened (and verified) for.
#[derive(Debug, Clone)]
pub(crate) struct PoolKey {
    pub(crate) kind: OriginKind,
    pub(crate) authority: Authority,
}

// By the authority's bytes: `Authority`'s own `Hash` feeds the hasher one lower-cased byte
// at a time, which showed in profiles. The authorities here are built lower-case, so
// comparing bytes loses nothing.
impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.authority.as_str().hash(state);
    }
}

/// The connectors that open origin connections, and the idle connections of hyper's
/// client (the HTTP/2 path). The HTTP/1 engine's idle connections are pooled per listener
/// loop instead ([`RawPool`]).
pub(crate) struct OriginPool {
    http: ConnectorInner,
    https_unverified: ConnectorInner,
    https_verified: ConnectorInner,
    idle: IdleMap<OriginConn>,
}

/// Idle connections of the HTTP/1 engine, one pool per listener loop. A socket belongs to
/// the reactor of the runtime that opened it; with one runtime per core, a connection used
/// from another core would have every readiness event cross threads (an eventfd wake-up
/// per request, measured). nginx keeps its upstream keep-alive cache per worker the same
/// way.
pub(crate) struct RawPool {
    idle: IdleMap<RawConn>,
}

impl RawPool {
    pub(crate) fn new(options: &HttpOptions) -> Self {
        RawPool {
            idle: IdleMap::new(options.pool_idle_timeout, options.pool_max_idle_per_origin),
        }
    }

    /// An idle connection for `key` that the origin has not closed.
    pub(crate) fn checkout(&self, key: &PoolKey) -> Option<RawConn> {
        self.idle.checkout(key, RawConn::is_open)
    }

    /// Takes back a connection after a complete exchange.
    pub(crate) fn release(&self, key: PoolKey, conn: RawConn) {
        if conn.buf.is_empty() {
            self.idle.release(key, conn);
        }
    }

    /// Closes every idle connection older than the idle timeout.
    pub(crate) fn sweep(&self) {
        self.idle.sweep();
    }
}

/// Idle connections by key. The lock is held only to push or pop a connection, never
/// across an await.
struct IdleMap<C> {
    lists: parking_lot::Mutex<HashMap<PoolKey, Vec<Idle<C>>>>,
    idle_timeout: Duration,
    max_per_key: usize,
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C> IdleMap<C> {
    fn new(idle_timeout: Duration, max_per_key: usize) -> Self {
        IdleMap {
            lists: parking_lot::Mutex::new(HashMap::new()),
            idle_timeout,
            max_per_key,
        }
    }

    /// The most recently used idle connection of `key` that has not expired and that
    /// `usable` accepts; the others met on the way are dropped (closed).
    fn checkout(&self, key: &PoolKey, mut usable: impl FnMut(&mut C) -> bool) -> Option<C> {
        loop {
            let idle = {
                let mut lists = self.lists.lock();
                let list = lists.get_mut(key)?;
                let idle = list.pop();
                if list.is_empty() {
                    lists.remove(key);
                }
                idle?
            };
            if idle.since.elapsed() < self.idle_timeout {
                let mut conn = idle.conn;
                if usable(&mut conn) {
                    return Some(conn);
                }
            }
        }
    }

    /// Takes back a connection, unless the list of its key is full.
    fn release(&self, key: PoolKey, conn: C) {
        if self.max_per_key == 0 {
            return;
        }
        let now = Instant::now();
        let mut lists = self.lists.lock();
        let list = lists.entry(key).or_default();
        if list.len() < self.max_per_key {
            list.push(Idle { conn, since: now });
        }
    }

    /// Closes every idle connection older than the idle timeout.
    fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<Idle<C>> = {
            let mut lists = self.lists.lock();
            let mut expired = Vec::new();
            lists.retain(|_, list| {
                // Oldest first: they were pushed in release order.
                let keep_from = list
                    .iter()
                    .position(|idle| now.saturating_duration_since(idle.since) < self.idle_timeout)
                    .unwrap_or(list.len());
                expired.extend(list.drain(..keep_from));
                !list.is_empty()
            });
            expired
        };
        drop(expired); // closes the sockets outside the lock
    }
}

/// Why an exchange with the origin failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// No connection could be opened.
    Connect(io::Error),
    /// The connection broke, or the request body failed, during the exchange.
    Exchange(hyper::Error),
}

impl OriginPool {
    pub(crate) fn new(options: &HttpOptions, routes: Arc<ArcSwap<RouteTable>>) -> Self {
        let dns = Arc::new(DnsCache {
            routes,
            entries: parking_lot::Mutex::new(HashMap::new()),
        });
        let connector = |tls: Option<Arc<rustls::ClientConfig>>| ConnectorInner {
            tls: tls.map(TlsConnector::from),
            connect_timeout: options.origin_connect_timeout,
            dns: Arc::clone(&dns),
        };
        OriginPool {
            http: connector(None),
            https_unverified: connector(Some(crate::tls::unverified_client())),
            https_verified: connector(Some(crate::tls::verified_client())),
            idle: IdleMap::new(options.pool_idle_timeout, options.pool_max_idle_per_origin),
        }
    }

    fn connector(&self, kind: OriginKind) -> &ConnectorInner {
        match kind {
            OriginKind::Http => &self.http,
            OriginKind::HttpsUnverified => &self.https_unverified,
            OriginKind::HttpsVerified => &self.https_verified,
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) over an idle connection of `key`, or a
    /// new one, and waits for the response head while driving the connection. A request
    /// that a pooled connection could not even start sending (the origin had closed it) is
    /// sent again on a new connection. The returned connection must go along with the
    /// response body; [`OriginPool::release`] takes it back once the body is done.
    pub(crate) async fn send(
        &self,
        key: &PoolKey,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, OriginConn), ExchangeError> {
        if let Some(mut conn) = self.checkout(key) {
            match conn.send(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(ExchangeError::Exchange(error.into_error())),
                },
            }
        }
        // Boxed: connecting (TCP, TLS) is the rare path, and its state would otherwise make
        // every in-flight request's future, pooled or not, over a kilobyte larger.
        let mut conn = Box::pin(self.connector(key.kind).connect(&key.authority))
            .await
            .map_err(ExchangeError::Connect)?;
        match conn.send(request).await {
            Ok(response) => Ok((response, conn)),
            Err(error) => Err(ExchangeError::Exchange(error.into_error())),
        }
    }

    /// The most recently used idle connection of `key` that is still open and ready.
    fn checkout(&self, key: &PoolKey) -> Option<OriginConn> {
        self.idle.checkout(key, OriginConn::poll_idle_ready)
    }

    /// Takes back a connection whose response is complete, unless the pool of its key is
    /// full or the connection is closing.
    pub(crate) fn release(&self, key: PoolKey, conn: OriginConn) {
        if !conn.is_closed() {
            self.idle.release(key, conn);
        }
    }

    /// Opens a new connection for the HTTP/1 engine.
    pub(crate) async fn connect_raw(&self, key: &PoolKey) -> io::Result<RawConn> {
        let stream = Box::pin(self.connector(key.kind).connect_stream(&key.authority)).await?;
        Ok(RawConn::new(stream))
    }

    /// Closes every idle connection older than the idle timeout. Called periodically by
    /// the listeners, so an unused origin's connections do not stay open.
    pub(crate) fn sweep(&self) {
        self.idle.sweep();
    }
}

type Dispatch = http1::SendRequest<RequestBody>;

/// hyper's connection future, boxed once per connection.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One HTTP/1.1 connection to an origin. There is no task per connection: whoever uses it
/// (the request waiting for its head, then the response body) polls it.
pub(crate) struct OriginConn(Box<ConnInner>);

struct ConnInner {
    sender: Dispatch,
    /// `None` once the connection has finished; dropping it fails a request in flight.
    driver: Option<Driver>,
}

impl OriginConn {
    /// Moves the connection's I/O forward. Returns false once the connection has closed.
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> bool {
        let inner = &mut *self.0;
        let Some(driver) = &mut inner.driver else {
            return false;
        };
        match driver.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "origin connection ended with an error");
                }
                inner.driver = None;
                false
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.0.driver.is_none() || self.0.sender.is_closed()
    }

    /// For a pooled connection: one look, without waiting, at whether it can take a new
    /// request (the origin may have closed it meanwhile).
    fn poll_idle_ready(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if !self.poll_drive(&mut cx) {
            return false;
        }
        matches!(self.0.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    async fn send(&mut self, request: Request<RequestBody>) -> Result<Response<Incoming>, TrySend> {
        let mut response = std::pin::pin!(self.0.sender.try_send_request(request));
        poll_fn(|cx| {
            self.poll_drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// A request the connection failed to send or answer; holds the request when it had not
/// been sent at all.
type TrySend = hyper::client::conn::TrySendError<Request<RequestBody>>;

/// Dials `address:port` of an authority; for TLS the user-info part (`host@`) is the
/// server name to send and verify.
struct ConnectorInner {
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    dns: Arc<DnsCache>,
}

impl ConnectorInner {
    async fn connect(&self, authority: &Authority) -> io::Result<OriginConn> {
        let stream = self.connect_stream(authority).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        Ok(OriginConn(Box::new(ConnInner {
            sender,
            driver: Some(Box::pin(connection)),
        })))
    }

    async fn connect_stream(&self, authority: &Authority) -> io::Result<RawStream> {
        let server_name = authority.as_str().split_once('@').map(|(name, _)| name);
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            .unwrap_or(host);
        let port = authority
            .port_u16()
            .ok_or_else(|| invalid(format!("origin {authority} has no port")))?;
        let addresses = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.dns.resolve(host, port).await?,
        };
        let stream = tokio::time::timeout(self.connect_timeout, dial(&addresses, port))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {host}:{port} timed out"),
                )
            })??;
        let Some(tls) = &self.tls else {
            return Ok(RawStream::Plain(stream));
        };
        let name = server_name.unwrap_or(host);
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| invalid(format!("{name:?} is not a valid TLS server name")))?;
        let stream = tokio::time::timeout(self.connect_timeout, tls.connect(name, stream))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with {host}:{port} timed out"),
                )
            })??;
        Ok(RawStream::Tls(Box::new(stream)))
    }
}

/// Tries each address in turn; the first that accepts wins.
async fn dial(addresses: &[IpAddr], port: u16) -> io::Result<TcpStream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "origin has no address");
    for ip in addresses {
        match TcpStream::connect(SocketAddr::new(*ip, port)).await {
            Ok(stream) => {
                // Small request and response heads should not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Addresses of CNAME origins from the system resolver. `getaddrinfo` gives no TTL, so
/// entries live for the CNAME record's TTL (capped), as precomputed in the route table.
/// The lock is taken only when a new origin connection is opened, never per request.
struct DnsCache {
    routes: Arc<ArcSwap<RouteTable>>,
    entries: parking_lot::Mutex<HashMap<String, CachedAddresses>>,
}

/// Resolved addresses and when they expire.
type CachedAddresses = (Arc<[IpAddr]>, Instant);

impl DnsCache {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        let now = Instant::now();
        if let Some((addresses, expires)) = self.entries.lock().get(host)
            && *expires > now
        {
            return Ok(addresses.to_vec());
        }
        let addresses: Vec<IpAddr> = tokio::net::lookup_host((host, port))
            .await?
            .map(|address| address.ip())
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ));
        }
        let ttl = self
            .routes
            .load()
            .cname_ttl(host)
            .unwrap_or(DEFAULT_DNS_TTL);
        if !ttl.is_zero() {
            let mut entries = self.entries.lock();
            if entries.len() >= MAX_DNS_ENTRIES {
                entries.clear();
            }
            entries.insert(host.to_owned(), (addresses.as_slice().into(), now + ttl));
        }
        Ok(addresses)
    }
}

/// A connection to an origin, plain or TLS.
pub(crate) enum RawStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for RawStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            RawStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RawStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RawStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            RawStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            RawStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            RawStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            RawStream::Plain(stream) => stream.is_write_vectored(),
            RawStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RawStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            RawStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// An origin connection of the HTTP/1 engine: the stream and its read buffer, which holds
/// what the origin sent beyond the part of a response already passed on.
pub(crate) struct RawConn {
    pub(crate) stream: RawStream,
    pub(crate) buf: Buffer,
}

/// Read buffer of an origin connection: a response head must fit, bodies stream through.
const ORIGIN_BUFFER: usize = 16 * 1024;

impl RawConn {
    fn new(stream: RawStream) -> Self {
        RawConn {
            stream,
            buf: Buffer::new(ORIGIN_BUFFER),
        }
    }

    /// For a pooled connection: one look, without waiting, at whether the origin closed
    /// it (or sent something unasked, which makes it unusable too).
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }
}
