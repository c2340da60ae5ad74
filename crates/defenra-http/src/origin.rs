//! Pooled clients to origins: one per origin kind (plain, HTTPS unverified, HTTPS verified),
//! sharing a connector that dials IPs or resolves CNAME targets with a small TTL cache.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::HttpOptions;
use crate::body::RequestBody;
use crate::route::{OriginKind, RouteTable};

/// Cache time for a CNAME target that is no longer in the route table.
const DEFAULT_DNS_TTL: Duration = Duration::from_secs(30);

/// Cached CNAME targets; past this the cache is cleared rather than grown.
const MAX_DNS_ENTRIES: usize = 10_000;

pub(crate) type OriginClient = Client<OriginConnector, RequestBody>;

/// The three pooled clients. Pools are keyed by `scheme://authority`, and the authority of
/// an HTTPS origin carries the server name (`host@address:port`), so a pooled TLS
/// connection is only reused for the name it was opened (and verified) for.
pub(crate) struct OriginClients {
    http: OriginClient,
    https_unverified: OriginClient,
    https_verified: OriginClient,
}

impl OriginClients {
    pub(crate) fn new(options: &HttpOptions, routes: Arc<ArcSwap<RouteTable>>) -> Self {
        let dns = Arc::new(DnsCache {
            routes,
            entries: parking_lot::Mutex::new(HashMap::new()),
        });
        let client = |tls: Option<Arc<rustls::ClientConfig>>| {
            let connector = OriginConnector {
                inner: Arc::new(ConnectorInner {
                    tls: tls.map(TlsConnector::from),
                    connect_timeout: options.origin_connect_timeout,
                    dns: Arc::clone(&dns),
                }),
            };
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(options.pool_idle_timeout)
                .pool_max_idle_per_host(options.pool_max_idle_per_origin)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                // The proxy always sets Host itself: the client's original one.
                .set_host(false)
                .build(connector)
        };
        OriginClients {
            http: client(None),
            https_unverified: client(Some(crate::tls::unverified_client())),
            https_verified: client(Some(crate::tls::verified_client())),
        }
    }

    pub(crate) fn client(&self, kind: OriginKind) -> &OriginClient {
        match kind {
            OriginKind::Http => &self.http,
            OriginKind::HttpsUnverified => &self.https_unverified,
            OriginKind::HttpsVerified => &self.https_verified,
        }
    }
}

/// Dials `address:port` from the request URI's authority; for TLS the user-info part
/// (`host@`) is the server name to send and verify.
#[derive(Clone)]
pub(crate) struct OriginConnector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    dns: Arc<DnsCache>,
}

impl tower_service::Service<Uri> for OriginConnector {
    type Response = OriginStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<OriginStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.connect(uri).await })
    }
}

impl ConnectorInner {
    async fn connect(&self, uri: Uri) -> io::Result<OriginStream> {
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("origin uri {uri} has no authority")))?;
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
            return Ok(OriginStream::Plain(TokioIo::new(stream)));
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
        Ok(OriginStream::Tls(Box::new(TokioIo::new(stream))))
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
pub(crate) enum OriginStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for OriginStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            OriginStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            OriginStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            OriginStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            OriginStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            OriginStream::Plain(stream) => stream.is_write_vectored(),
            OriginStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            OriginStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}
