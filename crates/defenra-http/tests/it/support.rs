//! Test harness: an echoing origin, a proxy on loopback listeners, clients and certificates.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use defenra_config::{Reload, SnapshotCell};
use defenra_http::{HttpOptions, HttpService};
use defenra_shield::{Shield, ShieldOptions};
use defenra_waf::{WafEngine, WafOptions};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub(crate) type TestBody = Either<Incoming, Either<Full<Bytes>, PatternBody>>;

/// Waits until `check` returns true, for at most five seconds.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Origin

/// A test origin on 127.0.0.1. Every path echoes method, path and headers, except:
/// `/slow` answers after 10 s, `/body` streams the request body back, `/chunked` sends
/// 100,000 pattern bytes chunked, `/big` 64 MiB, `/drain` reads the whole body and answers its length, `/ws` switches protocols and echoes bytes, `/hop`
/// answers with hop-by-hop and repeated headers.
pub(crate) struct Origin {
    pub(crate) addr: SocketAddr,
    /// Connections open right now.
    pub(crate) open_connections: Arc<AtomicUsize>,
    /// Connections accepted since the start.
    pub(crate) accepted_connections: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Origin {
    pub(crate) async fn start() -> Origin {
        Origin::start_with(None).await
    }

    /// An HTTPS origin with a self-signed certificate for `origin.test`.
    pub(crate) async fn start_tls() -> Origin {
        let cert = TestCert::new(&["origin.test"]);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], cert.key_der())
        .unwrap();
        Origin::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open_connections = Arc::new(AtomicUsize::new(0));
        let accepted_connections = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let open = Arc::clone(&open_connections);
        let accepted_count = Arc::clone(&accepted_connections);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let open = Arc::clone(&open);
                let tls = tls.clone();
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    let builder = hyper::server::conn::http1::Builder::new();
                    let service = service_fn(origin_handler);
                    match tls {
                        None => {
                            let connection = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades();
                            let _ = connection.await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let connection = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .with_upgrades();
                                let _ = connection.await;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Origin {
            addr,
            open_connections,
            accepted_connections,
            shutdown,
        }
    }
}

async fn origin_handler(mut request: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let response = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            text(StatusCode::OK, "slow")
        }
        "/body" => Response::new(Either::Left(request.into_body())),
        // A body of unknown length: hyper sends it chunked.
        "/chunked" => Response::new(Either::Right(Either::Right(PatternBody::new(100_000)))),
        // More than the socket buffers hold: a client that does not read stalls it.
        "/big" => Response::new(Either::Right(Either::Right(PatternBody::new(64 << 20)))),
        "/drain" => {
            let length = request
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len();
            text(StatusCode::OK, format!("{length}"))
        }
        "/ws" => {
            if request.headers().get("upgrade").map(|v| v.as_bytes()) != Some(b"websocket") {
                return Ok(text(StatusCode::BAD_REQUEST, "not an upgrade"));
            }
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buffer = [0u8; 4096];
                loop {
                    match io.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(Either::Right(Either::Left(Full::new(Bytes::new()))))
                .unwrap()
        }
        "/hop" => Response::builder()
            .header("connection", "x-custom")
            .header("x-custom", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(Either::Right(Either::Left(Full::new(Bytes::from_static(
                b"hop",
            )))))
            .unwrap(),
        _ => {
            let mut listing = String::new();
            for (name, value) in request.headers() {
                listing.push_str(&format!(
                    "{}: {}\n",
                    name,
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            let path_and_query = request
                .uri()
                .path_and_query()
                .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
            Response::builder()
                .header("x-echo-method", request.method().as_str())
                .header("x-echo-path", path_and_query)
                .header("x-echo-version", format!("{:?}", request.version()))
                .body(Either::Right(Either::Left(Full::new(Bytes::from(listing)))))
                .unwrap()
        }
    };
    Ok(response)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut response = Response::new(Either::Right(Either::Left(Full::new(body.into()))));
    *response.status_mut() = status;
    response
}

// ---------------------------------------------------------------------------------------
// Proxy

/// An `HttpService` serving a JSON config on loopback HTTP and HTTPS listeners.
pub(crate) struct Proxy {
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    pub(crate) service: Arc<HttpService>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<Result<(), defenra_http::HttpError>>>,
    waf: Arc<WafEngine>,
    cell: SnapshotCell,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Proxy {
    /// Origins are reached on `origin`'s port (for both plain and TLS modes).
    pub(crate) async fn start(config: &Value, origin_port: u16) -> Proxy {
        Proxy::start_with(config, options(origin_port)).await
    }

    pub(crate) async fn start_with(config: &Value, options: HttpOptions) -> Proxy {
        let shield = Arc::new(Shield::new(ShieldOptions::default()));
        Proxy::start_shielded(config, options, shield).await
    }

    /// A proxy asking `shield` (built by the test, on a manual clock say).
    pub(crate) async fn start_shielded(
        config: &Value,
        options: HttpOptions,
        shield: Arc<Shield>,
    ) -> Proxy {
        let waf = Arc::new(WafEngine::new(WafOptions::default()));
        let service = Arc::new(HttpService::with_shield(Arc::clone(&waf), shield, options));
        let proxy_http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_https = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = proxy_http.local_addr().unwrap();
        let https = proxy_https.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let proxy = Proxy {
            http,
            https,
            service: Arc::clone(&service),
            shutdown: shutdown.clone(),
            tasks: vec![
                tokio::spawn(Arc::clone(&service).serve_http(proxy_http, shutdown.clone())),
                tokio::spawn(Arc::clone(&service).serve_https(proxy_https, shutdown.clone())),
            ],
            waf,
            cell: SnapshotCell::new(),
        };
        proxy.reload(config);
        proxy
    }

    /// Compiles `config` and hands it to the service, as the config loop does.
    pub(crate) fn reload(&self, config: &Value) {
        let compiled = defenra_config::compile(config.to_string().as_bytes()).unwrap();
        assert!(compiled.issues.is_empty(), "{:?}", compiled.issues);
        let snapshot = self.cell.publish(compiled.snapshot);
        let mut issues = Vec::new();
        self.waf.reload(&snapshot, &mut issues);
        self.service.shield().reload(&snapshot, &mut issues);
        self.service.reload(&snapshot, &mut issues);
        assert!(issues.is_empty(), "{issues:?}");
    }
}

/// Options for tests: origins on `origin_port`, short timeouts.
pub(crate) fn options(origin_port: u16) -> HttpOptions {
    HttpOptions {
        origin_http_port: origin_port,
        origin_https_port: origin_port,
        origin_timeout: Duration::from_secs(5),
        origin_connect_timeout: Duration::from_secs(2),
        ..HttpOptions::default()
    }
}

/// A config document with one domain.
pub(crate) fn config(domains: Vec<Value>) -> Value {
    json!({ "success": true, "domains": domains })
}

/// A domain proxied as a whole whose apex and `www` point at 127.0.0.1.
pub(crate) fn proxied_domain(name: &str) -> Value {
    json!({
        "domain": name,
        "httpProxy": { "enabled": true, "type": "both" },
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true },
            { "name": "www", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true },
        ],
    })
}

// ---------------------------------------------------------------------------------------
// Clients

/// A collected response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |value| value.to_str().unwrap())
    }

    /// Lines of the origin's header listing for `name`, in order.
    pub(crate) fn echoed(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{name}: ");
        self.body
            .lines()
            .filter_map(|line| line.strip_prefix(prefix.as_str()))
            .collect()
    }
}

pub(crate) async fn collect(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends one HTTP/1.1 request on a new connection to `addr`.
pub(crate) async fn send<B>(addr: SocketAddr, request: Request<B>) -> Reply
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    collect(sender.send_request(request).await.unwrap()).await
}

pub(crate) async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    send(addr, request(host, path)).await
}

/// A TCP connection to `addr` from the loopback address `source` (any 127.x works).
pub(crate) async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().expect("source address"), 0))?;
    socket.connect(addr).await
}

/// Sends one HTTP/1.1 request from `source` on a new connection; `None` when the proxy
/// closed the connection without an answer.
pub(crate) async fn send_from(
    source: &str,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Option<Reply> {
    let stream = connect_from(source, addr).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.ok()?;
    Some(collect(response).await)
}

pub(crate) fn request(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A TLS connection to the proxy; the test verifier accepts any certificate so the test
/// can look at which one was served.
pub(crate) async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), stream)
        .await
}

pub(crate) const TLS_ALL: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The certificate the server presented.
pub(crate) fn served_cert(
    stream: &tokio_rustls::client::TlsStream<TcpStream>,
) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// An HTTP/1.1 sender over an established TLS connection.
pub(crate) async fn http1_over(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 sender over any established stream.
pub(crate) async fn http2_over<S, B>(stream: S) -> hyper::client::conn::http2::SendRequest<B>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Certificates and bodies

/// A self-signed certificate generated for the test.
pub(crate) struct TestCert {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) der: CertificateDer<'static>,
}

impl TestCert {
    pub(crate) fn new(names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names).unwrap();
        TestCert {
            cert_pem: cert.pem(),
            key_pem: signing_key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn key_der(&self) -> rustls::pki_types::PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// The `ssl` object of a domain using this certificate.
    pub(crate) fn ssl(&self) -> Value {
        json!({ "enabled": true, "certificate": self.cert_pem, "privateKey": self.key_pem })
    }
}

/// `pieces` frames of `size` bytes, one every `gap`: a slow but steady upload.
pub(crate) struct TrickleBody {
    pieces: usize,
    size: usize,
    gap: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl TrickleBody {
    pub(crate) fn new(pieces: usize, size: usize, gap: Duration) -> Self {
        TrickleBody {
            pieces,
            size,
            gap,
            sleep: Box::pin(tokio::time::sleep(gap)),
        }
    }
}

impl Body for TrickleBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pieces == 0 {
            return Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.pieces -= 1;
        let next = tokio::time::Instant::now() + self.gap;
        self.sleep.as_mut().reset(next);
        let size = self.size;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; size])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.pieces * self.size) as u64)
    }
}

/// A deterministic pseudo-random body of `length` bytes, sent in 64 KiB frames.
pub(crate) struct PatternBody {
    remaining: usize,
    state: u64,
}

impl PatternBody {
    pub(crate) fn new(length: usize) -> Self {
        PatternBody {
            remaining: length,
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Checksum and length of the body this would produce.
    pub(crate) fn expected(length: usize) -> (u64, usize) {
        let mut body = PatternBody::new(length);
        let mut sum = Fnv::default();
        while body.remaining > 0 {
            sum.update(&body.next_chunk());
        }
        (sum.0, length)
    }

    fn next_chunk(&mut self) -> Bytes {
        let size = self.remaining.min(64 * 1024);
        let mut chunk = Vec::with_capacity(size);
        for _ in 0..size {
            // xorshift64
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.push(self.state as u8);
        }
        self.remaining -= size;
        Bytes::from(chunk)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(self.next_chunk()))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// FNV-1a, enough to compare two streams.
#[derive(Debug)]
pub(crate) struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Reads a response body frame by frame, returning its checksum and length.
pub(crate) async fn checksum(body: Incoming) -> (u64, usize) {
    let mut body = body;
    let mut sum = Fnv::default();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            sum.update(&data);
            length += data.len();
        }
    }
    (sum.0, length)
}

/// Reads from a raw stream until the end of an HTTP head.
pub(crate) async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert!(n > 0, "connection closed inside the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}
