//! One request's life: route, ACME answer, redirect, WAF, then the streamed exchange with
//! the origin; every failure becomes a [`ProxyError`] and its status.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::HttpService;
use crate::access::{AccessEntry, ServedBody, WafOutcome};
use crate::body::{BodyError, Lease, OriginBody, RequestBody, ResponseBody, full};
use crate::headers;
use crate::origin::{ExchangeError, PoolKey};
use crate::route::{Origin, OriginKind, Route, strip_port, with_lower_host};
use crate::server::Listener;
use crate::stats::Event;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// Why a request was not proxied, recorded where it happened. [`ProxyError::status`] is the
/// only place that turns a failure into a status code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("request names no host")]
    MissingHost,
    #[error("method CONNECT is not served: this is a reverse proxy")]
    Connect,
    #[error("unknown host {0}")]
    UnknownHost(String),
    #[error("host {0} is not proxied")]
    NotProxied(String),
    #[error("host {host} is not served on the {listener} listener")]
    WrongListener {
        host: String,
        listener: &'static str,
    },
    #[error("host {0} has no usable origin")]
    NoOrigin(String),
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("client request failed: {0}")]
    Client(String),
    #[error("cannot connect to origin {origin}: {reason}")]
    OriginConnect { origin: String, reason: String },
    #[error("origin {origin} sent no response within {timeout:?}")]
    OriginTimeout { origin: String, timeout: Duration },
    #[error("origin {origin} failed: {reason}")]
    Origin { origin: String, reason: String },
    #[error("cannot build the origin request: {0}")]
    Agent(String),
}

/// Which side a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something unusable or went away.
    Client,
    /// The origin was unreachable, slow or broke the exchange.
    Origin,
    /// The agent's configuration or the agent itself.
    Agent,
}

impl ProxyError {
    /// The status the client gets: 404 unknown host, 403 not proxied (or not on this
    /// listener), 502 no or unreachable origin, 504 origin timeout, 413 body too large.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost | ProxyError::Client(_) => StatusCode::BAD_REQUEST,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownHost(_) => StatusCode::NOT_FOUND,
            ProxyError::NotProxied(_) | ProxyError::WrongListener { .. } => StatusCode::FORBIDDEN,
            ProxyError::NoOrigin(_)
            | ProxyError::OriginConnect { .. }
            | ProxyError::Origin { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::OriginTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Agent(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Where the failure came from.
    pub fn blame(&self) -> ErrorSource {
        match self {
            ProxyError::MissingHost
            | ProxyError::Connect
            | ProxyError::Client(_)
            | ProxyError::BodyTooLarge { .. } => ErrorSource::Client,
            ProxyError::OriginConnect { .. }
            | ProxyError::OriginTimeout { .. }
            | ProxyError::Origin { .. } => ErrorSource::Origin,
            ProxyError::UnknownHost(_)
            | ProxyError::NotProxied(_)
            | ProxyError::WrongListener { .. }
            | ProxyError::NoOrigin(_)
            | ProxyError::Agent(_) => ErrorSource::Agent,
        }
    }

    /// A short plain-text page with the status and nothing about the cause.
    fn to_response(&self) -> Response<ResponseBody> {
        let status = self.status();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        plain(status, text)
    }
}

/// One client connection, shared by the requests it carries.
pub(crate) struct Conn {
    pub(crate) service: Arc<HttpService>,
    pub(crate) peer: SocketAddr,
    /// The peer's IP as a header value, for `X-Forwarded-For` and `X-Real-IP`.
    pub(crate) peer_ip: HeaderValue,
    pub(crate) listener: Listener,
    /// The port the client connected to, for the WAF's `ngx.var.server_port`.
    pub(crate) local_port: u16,
    /// Tunnels of upgraded requests outlive the hyper connection; the listener waits for
    /// them on shutdown.
    pub(crate) tunnels: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

impl Conn {
    /// Answers one request. Never fails: errors become short pages.
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ServedBody>, Infallible> {
        let mut entry = self.service.access_log.start(
            &self.service.stats,
            self.peer.ip().to_canonical(),
            self.listener,
            request.method(),
            request.uri().path(),
        );
        let response = match self.route_and_proxy(request, &mut entry).await {
            Ok(response) => response,
            Err(error) => {
                self.note(&error);
                error.to_response()
            }
        };
        self.service
            .stats
            .listener(self.listener)
            .response(response.status());
        if let Some(entry) = &mut entry {
            entry.status = response.status().as_u16();
        }
        Ok(response.map(|body| ServedBody::new(body, entry)))
    }

    /// Routing, in this order: host → ACME answer → proxied? → redirect to HTTPS →
    /// listener type → WAF → origin.
    async fn route_and_proxy(
        &self,
        mut request: Request<Incoming>,
        entry: &mut Option<Box<AccessEntry>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // A reverse proxy is no tunnel: CONNECT would reach the origin in authority form.
        if request.method() == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        // RFC 9112 §3.2.3: an absolute-form target (and HTTP/2's :authority) wins over Host.
        let host_value = match request.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => request.headers().get(header::HOST).cloned(),
        }
        .ok_or(ProxyError::MissingHost)?;
        let host_text = host_value.to_str().map_err(|_| ProxyError::MissingHost)?;
        let host = strip_port(host_text);
        if let Some(entry) = entry {
            entry.host = Some(host.to_ascii_lowercase());
        }
        // The one load of the route table for this request; the guard is gone before any
        // await, the route itself is shared by `Arc`.
        let route: Arc<Route> = self
            .service
            .routes
            .load()
            .lookup(host)
            .cloned()
            .ok_or_else(|| ProxyError::UnknownHost(host.to_owned()))?;
        let domain = &route.domain;

        if let Some(response) = acme_answer(&route, &request) {
            return Ok(response);
        }
        if !route.proxied {
            return Err(ProxyError::NotProxied(host.to_owned()));
        }
        if self.listener == Listener::Http && domain.redirect_to_https {
            return Ok(redirect(host, request.uri()));
        }
        let listeners = domain.http_proxy.listeners;
        let served = match self.listener {
            Listener::Http => listeners.serves_http(),
            Listener::Https => listeners.serves_https(),
        };
        if !served {
            return Err(ProxyError::WrongListener {
                host: host.to_owned(),
                listener: self.listener.name(),
            });
        }

        let mut extra_headers = None;
        let waf = &self.service.waf;
        if waf.has_script(&domain.name) {
            let verdict = with_lower_host(host, |lower_host| {
                waf.check(&defenra_waf::RequestInfo {
                    domain: &domain.name,
                    host: lower_host,
                    method: request.method(),
                    uri: request.uri(),
                    headers: request.headers(),
                    remote_addr: self.peer.ip().to_canonical(),
                    scheme: self.listener.scheme(),
                    server_port: self.local_port,
                })
            })
            .ok_or_else(|| ProxyError::UnknownHost(host.to_owned()))?;
            match verdict {
                defenra_waf::Verdict::Allow {
                    extra_headers: extra,
                } => {
                    if let Some(entry) = entry {
                        entry.waf = WafOutcome::Allow;
                    }
                    if !extra.is_empty() {
                        extra_headers = Some(extra);
                    }
                }
                defenra_waf::Verdict::Block {
                    status,
                    headers,
                    body,
                } => {
                    self.service.stats.count(Event::WafBlock);
                    if let Some(entry) = entry {
                        entry.waf = WafOutcome::Block;
                    }
                    let mut response = Response::new(full(body));
                    *response.status_mut() = status;
                    *response.headers_mut() = headers;
                    return Ok(response);
                }
            }
        }

        let origin = route
            .origin
            .as_ref()
            .ok_or_else(|| ProxyError::NoOrigin(host.to_owned()))?;
        if let Some(entry) = entry {
            entry.origin = Some(origin.address.clone());
        }
        let limit = self.service.options.max_request_body;
        let declared_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }

        // Upgrades (WebSocket) exist only in HTTP/1.1; take the client's half now, it
        // resolves once the 101 below has been written.
        let client_upgrade = (request.version() == Version::HTTP_11
            && headers::wants_upgrade(request.headers()))
        .then(|| {
            let protocol = request.headers().get(header::UPGRADE).cloned();
            (hyper::upgrade::on(&mut request), protocol)
        });

        let (mut parts, body) = request.into_parts();
        let is_http2 = parts.version == Version::HTTP_2;
        headers::strip_hop_by_hop(&mut parts.headers);
        if is_http2 {
            headers::join_cookies(&mut parts.headers);
        }
        parts.headers.insert(header::HOST, host_value.clone());
        headers::add_forwarding(
            &mut parts.headers,
            &self.peer_ip,
            self.listener.scheme(),
            Some(&host_value),
        );
        if let Some((_, Some(protocol))) = &client_upgrade {
            parts.headers.insert(header::UPGRADE, protocol.clone());
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let key = pool_key(origin, host)?;
        parts.uri = origin_form(parts.uri);
        // Origins speak HTTP/1.1 (docs/http.md).
        parts.version = Version::HTTP_11;
        let origin_request = Request::from_parts(parts, RequestBody::new(body, limit));

        let pool = &self.service.origins;
        let timeout = self.service.options.origin_timeout;
        let exchange = async {
            // Waiting for a free origin connection counts against the origin timeout.
            let permit = Arc::clone(&origin.limit)
                .acquire_owned()
                .await
                .map_err(|_| ProxyError::Agent("origin limit closed".to_owned()))?;
            let (response, conn) = pool
                .send(&key, origin_request)
                .await
                .map_err(|error| classify(error, origin, limit))?;
            Ok((permit, response, conn))
        };
        let (permit, mut response, conn) = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(exchanged)) => exchanged,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(ProxyError::OriginTimeout {
                    origin: origin.address.to_string(),
                    timeout,
                });
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some((client_upgrade, _)) = client_upgrade
        {
            let origin_upgrade = hyper::upgrade::on(&mut response);
            let protocol = response.headers().get(header::UPGRADE).cloned();
            headers::strip_hop_by_hop(response.headers_mut());
            if let Some(protocol) = protocol {
                response.headers_mut().insert(header::UPGRADE, protocol);
            }
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            // The origin connection hands its socket over once driven past the 101.
            self.tunnels.spawn(conn.into_upgrade());
            self.spawn_tunnel(client_upgrade, origin_upgrade);
            let (parts, _) = response.into_parts();
            return Ok(Response::from_parts(parts, full(bytes::Bytes::new())));
        }

        headers::strip_hop_by_hop(response.headers_mut());
        if let Some(extra) = extra_headers {
            let response_headers = response.headers_mut();
            let mut last_name = None;
            for (name, value) in extra {
                // `HeaderMap::into_iter` yields the name only for a name's first value.
                if let Some(name) = name {
                    last_name = Some(name);
                }
                if let Some(name) = &last_name {
                    response_headers.append(name, value);
                }
            }
        }
        let lease = Lease {
            conn,
            key,
            pool: Arc::clone(pool),
        };
        Ok(response.map(|body| http_body_util::Either::Left(OriginBody::new(body, lease, permit))))
    }

    /// Copies bytes both ways between the upgraded client and origin connections until
    /// either side closes or the listener shuts down.
    fn spawn_tunnel(&self, client: hyper::upgrade::OnUpgrade, origin: hyper::upgrade::OnUpgrade) {
        self.service.stats.count(Event::Upgrade);
        let peer = self.peer;
        let shutdown = self.shutdown.clone();
        self.tunnels.spawn(async move {
            let (client, origin) = match tokio::try_join!(client, origin) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%peer, %error, "upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut origin = TokioIo::new(origin);
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client, &mut origin) => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "tunnel ended with an error");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Logs a failure once and counts it.
    fn note(&self, error: &ProxyError) {
        let stats = &self.service.stats;
        match error {
            ProxyError::OriginConnect { .. } => stats.count(Event::OriginConnectError),
            ProxyError::OriginTimeout { .. } => stats.count(Event::OriginTimeout),
            ProxyError::Origin { .. } => stats.count(Event::OriginOtherError),
            _ => {}
        }
        match error.blame() {
            ErrorSource::Origin => tracing::warn!(peer = %self.peer, %error, "origin failed"),
            ErrorSource::Client | ErrorSource::Agent => {
                tracing::debug!(peer = %self.peer, %error, "request refused");
            }
        }
    }
}

/// `GET /.well-known/acme-challenge/{token}` for the domain's pending challenge.
fn acme_answer(route: &Route, request: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    let challenge = route.domain.acme_challenge.as_ref()?;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return None;
    }
    let token = request.uri().path().strip_prefix(ACME_PREFIX)?;
    (token == challenge.token).then(|| plain(StatusCode::OK, challenge.key_authorization.clone()))
}

/// 301 to the same host (without port: HTTPS on 443) and path on https.
fn redirect(host: &str, uri: &Uri) -> Response<ResponseBody> {
    let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let location = format!("https://{host}{path}");
    let mut response = plain(StatusCode::MOVED_PERMANENTLY, "301 Moved Permanently\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn plain(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The pool key of a request: plain origins by address, HTTPS origins by
/// `host@address:port` (the user-info carries the TLS server name).
fn pool_key(origin: &Origin, host: &str) -> Result<PoolKey, ProxyError> {
    let authority = match (origin.kind, &origin.tls_authority) {
        (OriginKind::Http, _) => origin.address.clone(),
        (_, Some(authority)) => authority.clone(),
        (_, None) => with_lower_host(host, |host| {
            Authority::try_from(format!("{host}@{}", origin.address))
        })
        .and_then(Result::ok)
        .ok_or_else(|| ProxyError::Agent(format!("bad origin authority for {host}")))?,
    };
    Ok(PoolKey {
        kind: origin.kind,
        authority,
    })
}

/// The request target as sent to the origin: origin-form, `/path?query`.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some() {
        return uri;
    }
    let path = uri
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

/// Sorts a client error by where it came from: our request body (too large, or the
/// client went away), the connect step, or the exchange with the origin.
fn classify(error: ExchangeError, origin: &Origin, limit: u64) -> ProxyError {
    let origin = origin.address.to_string();
    let error = match error {
        ExchangeError::Connect(error) => {
            return ProxyError::OriginConnect {
                origin,
                reason: error.to_string(),
            };
        }
        ExchangeError::Exchange(error) => error,
    };
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(body_error) = cause.downcast_ref::<BodyError>() {
            return match body_error {
                BodyError::TooLarge => ProxyError::BodyTooLarge { limit },
                BodyError::Client(error) => ProxyError::Client(error.to_string()),
            };
        }
        source = cause.source();
    }
    ProxyError::Origin {
        origin,
        reason: error.to_string(),
    }
}
