//! One request's life: route, ACME answer, shield (limits, browser challenge), redirect,
//! WAF, then the streamed exchange with the origin; every failure becomes a [`ProxyError`]
//! and its status.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use defenra_shield::Check;
use defenra_shield::challenge::{Clearance, SUBMIT_PATH};
use defenra_shield::pages::{Format, Page, RequestId};
use defenra_waf::WafEngine;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::HttpService;
use crate::access::{AccessEntry, ServedBody, WafOutcome};
use crate::body::{BODY_DONE, BodyError, Lease, OriginBody, RequestBody, ResponseBody, full};
use crate::edge::{FormBody, Submit, Visitor};
use crate::headers;
use crate::origin::{ExchangeError, PoolKey};
use crate::route::{Origin, OriginKind, Route, strip_port, with_lower_host};
use crate::server::Listener;
use crate::slots::{ClientRef, ClientSlot};
use crate::slow::BodyRate;
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
    #[error("client sent no body bytes within {timeout:?}")]
    ClientTimeout { timeout: Duration },
    #[error("client sent fewer than {min_bytes} body bytes in {period:?}")]
    SlowBody { min_bytes: u64, period: Duration },
    #[error("client has {limit} origin exchanges in flight already")]
    ClientBusy { limit: usize },
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
    /// listener), 502 no or unreachable origin, 504 origin timeout, 413 body too large, 408
    /// a request body that stopped coming or came too slowly, 429 a client whose origin
    /// exchanges in flight stayed at its cap for the origin timeout.
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
            ProxyError::ClientTimeout { .. } | ProxyError::SlowBody { .. } => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::ClientBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Agent(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Where the failure came from.
    pub fn blame(&self) -> ErrorSource {
        match self {
            ProxyError::MissingHost
            | ProxyError::Connect
            | ProxyError::Client(_)
            | ProxyError::ClientTimeout { .. }
            | ProxyError::SlowBody { .. }
            | ProxyError::ClientBusy { .. }
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
}

/// A response the proxy makes itself: an edge page, a redirect, an ACME answer, a WAF
/// block or an answer to a challenge solution.
pub(crate) struct Local {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The id of an edge page (also in `X-Request-Id`), for the access log.
    pub(crate) request_id: Option<RequestId>,
}

impl Local {
    /// `text/plain` with `body`.
    pub(crate) fn plain(status: StatusCode, body: impl Into<Bytes>) -> Local {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Local {
            status,
            headers,
            body: body.into(),
            request_id: None,
        }
    }

    /// As a hyper response; the request id rides in its extensions to the access log.
    fn into_response(self) -> Response<ResponseBody> {
        let mut response = Response::new(full(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        if let Some(request_id) = self.request_id {
            response.extensions_mut().insert(request_id);
        }
        response
    }
}

/// Records an answer the proxy made itself in the request's access line.
pub(crate) fn note_local(entry: &mut Option<Box<AccessEntry>>, local: &Local) {
    if let Some(entry) = entry {
        entry.status = local.status.as_u16();
        entry.request_id = local.request_id;
    }
}

/// A protocol's view of a request's header fields for [`Conn::decide`]: spans of the
/// HTTP/1 read buffer, or hyper's map for HTTP/2. Neither copies nor allocates.
pub(crate) trait Fields<'r>: Copy {
    /// Every field named `name` (lower case), in arrival order: a split `Cookie` (RFC 9113
    /// §8.2.3), several `Accept` fields.
    fn all(self, name: &'static str) -> impl Iterator<Item = &'r [u8]> + 'r;

    /// The last field named `name` (lower case).
    fn last(self, name: &str) -> Option<&'r [u8]>;
}

impl<'r> Fields<'r> for &'r HeaderMap {
    fn all(self, name: &'static str) -> impl Iterator<Item = &'r [u8]> + 'r {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }

    fn last(self, name: &str) -> Option<&'r [u8]> {
        self.get_all(name)
            .iter()
            .next_back()
            .map(HeaderValue::as_bytes)
    }
}

/// What [`Conn::decide`] reads of a request.
#[derive(Clone, Copy)]
pub(crate) struct Asked<'r, F> {
    pub(crate) method: &'r Method,
    /// The host without its port.
    pub(crate) host: &'r str,
    /// The path and query.
    pub(crate) target: &'r str,
    pub(crate) fields: F,
    /// The body format of the edge's pages for this request, from its `Accept`.
    pub(crate) format: Format,
}

/// What routing decided for a request.
pub(crate) enum Decision {
    /// Answer without contacting the origin.
    Respond(Local),
    /// Proxy to the route's origin, adding the WAF's `extra_headers` to the response.
    /// `client` is the request's client address (the peer, or the address a trusted proxy
    /// reported in one of the domain's `proxyIpHeaders`).
    Proxy {
        route: Arc<Route>,
        extra_headers: Option<HeaderMap>,
        client: IpAddr,
    },
    /// A challenge solution posted to the submit path of a domain with the challenge on:
    /// read its form body (at most `MAX_SUBMISSION_BYTES`), then answer
    /// [`Conn::answer_submit`]. Never forwarded to the origin.
    Submit(Box<Submit>),
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
    /// Time this connection's clients have for each request head (and the TLS handshake),
    /// fixed at accept from the shield's policies.
    pub(crate) header_timeout: Duration,
    pub(crate) shutdown: CancellationToken,
    /// Idle origin connections of this listener loop's HTTP/1 exchanges.
    pub(crate) raw_pool: Arc<crate::origin::RawPool>,
    /// Bytes moved on this connection, and the domain they are counted for.
    pub(crate) meter: Arc<crate::server::Meter>,
    /// The origin slots of the client address of this connection's latest request, kept
    /// so that a keep-alive client looks its address up once. Locked briefly per request.
    pub(crate) client_slots: parking_lot::Mutex<Option<ClientRef>>,
    /// HTTP/2: origin exchanges this connection may still start (at most
    /// `origin_max_connections_per_client` at once, like one client address).
    pub(crate) stream_slots: tokio::sync::Semaphore,
}

impl Conn {
    /// The origin slots of `client` (the connection's cached ones when it is the same
    /// address), or `None` without a cap per client.
    pub(crate) fn client_ref(&self, client: IpAddr) -> Option<ClientRef> {
        let slots = &self.service.client_slots;
        if slots.cap() == 0 {
            return None;
        }
        let mut cached = self.client_slots.lock();
        if let Some(known) = cached.as_ref().filter(|known| known.client() == client) {
            return Some(known.clone());
        }
        let found = slots.of(client)?;
        *cached = Some(found.clone());
        Some(found)
    }

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
        let mut visitor = Visitor::new(
            request.headers().all("accept"),
            self.peer.ip().to_canonical(),
        );
        let response = match self
            .route_and_proxy(request, &mut entry, &mut visitor)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                self.note(&error);
                self.service
                    .edge
                    .for_status(error.status(), visitor)
                    .into_response()
            }
        };
        self.service
            .stats
            .listener(self.listener)
            .response(response.status());
        self.meter.responded(response.status());
        if let Some(entry) = &mut entry {
            entry.status = response.status().as_u16();
            entry.request_id = response.extensions().get::<RequestId>().copied();
        }
        Ok(response.map(|body| ServedBody::new(body, entry)))
    }

    /// Routing, in this order: host → ACME answer → shield (client address, rate limit,
    /// the challenge's submit path) → proxied? → redirect to HTTPS → listener type →
    /// clearance cookie (domains with the browser challenge on) → WAF. `waf_check` runs the
    /// domain's script when it has one (it gets the engine, the domain, the lower-cased host
    /// and the client address), so each protocol hands over its own view of the request.
    ///
    /// With the challenge on, an address over the rate limit gets the challenge instead of
    /// 429, and a request within it without a valid clearance gets the challenge; posts to
    /// the submit path are counted like any request, accepted while blocked, and answered
    /// here ([`Decision::Submit`]). Whitelisted addresses and ACME answers are never
    /// challenged.
    pub(crate) fn decide<'r, F: Fields<'r>>(
        &self,
        request: &Asked<'r, F>,
        entry: &mut Option<Box<AccessEntry>>,
        waf_check: impl FnOnce(&WafEngine, &str, &str, IpAddr) -> defenra_waf::Verdict,
    ) -> Result<Decision, ProxyError> {
        let Asked {
            method,
            host,
            target,
            fields,
            format,
        } = *request;
        // A reverse proxy is no tunnel: CONNECT would reach the origin in authority form.
        if method == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        if let Some(entry) = entry {
            entry.host = Some(host.to_ascii_lowercase());
        }
        // The one load of the route table for this request; the guard is gone before any
        // await, the route itself is shared by `Arc`.
        let route = self.service.routes.load().lookup(host).cloned();
        // Traffic counting: this request (and the connection's bytes from now on) belong to
        // the host's domain; a host without a route belongs to none.
        self.meter
            .attribute(route.as_ref().map(|route| &route.traffic));
        let route: Arc<Route> = route.ok_or_else(|| ProxyError::UnknownHost(host.to_owned()))?;
        route.traffic.request();
        let domain = &route.domain;

        if let Some(local) = acme_answer(&route, method, target) {
            return Ok(Decision::Respond(local));
        }
        let peer = self.peer.ip().to_canonical();
        let mut client = peer;
        let shield = &self.service.shield;
        let edge = &self.service.edge;
        // Set when the domain asks for a clearance and the limits let the request through.
        let mut needs_clearance = None;
        if let Some(policy) = route.shield.as_ref() {
            client = shield.client_addr(Some(policy), peer, |name| fields.last(name));
            if let Some(entry) = entry {
                entry.client = client;
            }
            let visitor = Visitor { format, client };
            let challenged = policy.challenge_enabled();
            let check = shield.check(policy, client);
            if challenged && path_of(target) == SUBMIT_PATH {
                return Ok(self.submit(policy, check, method, host, visitor));
            }
            match check {
                Check::Proceed if challenged => needs_clearance = Some(visitor),
                Check::Proceed | Check::Whitelisted => {}
                // A browser can earn its way out of a block; the challenge says how.
                Check::Limited { .. } if challenged => {
                    return Ok(Decision::Respond(
                        self.challenge(host, target, method, visitor),
                    ));
                }
                Check::Limited { retry_after, .. } => {
                    let page = Page::TooManyRequests { retry_after };
                    return Ok(Decision::Respond(edge.page(&page, visitor)));
                }
                Check::Banned => {
                    return Ok(Decision::Respond(edge.page(&Page::Forbidden, visitor)));
                }
            }
        }
        if !route.proxied {
            return Err(ProxyError::NotProxied(host.to_owned()));
        }
        if self.listener == Listener::Http && domain.redirect_to_https {
            return Ok(Decision::Respond(redirect(host, target)));
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
        if let (Some(visitor), Some(policy)) = (needs_clearance, route.shield.as_deref()) {
            let cleared = with_lower_host(host, |lower_host| {
                shield.clearance(policy, client, lower_host, fields.all("cookie"))
            });
            if cleared != Some(Clearance::Valid) {
                return Ok(Decision::Respond(
                    self.challenge(host, target, method, visitor),
                ));
            }
        }

        let mut extra_headers = None;
        let waf = &self.service.waf;
        if waf.has_script(&domain.name) {
            let verdict = with_lower_host(host, |lower_host| {
                waf_check(waf, &domain.name, lower_host, client)
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
                    let visitor = Visitor { format, client };
                    return Ok(Decision::Respond(
                        edge.waf_block(status, headers, body, visitor),
                    ));
                }
            }
        }
        if route.origin.is_none() {
            return Err(ProxyError::NoOrigin(host.to_owned()));
        }
        Ok(Decision::Proxy {
            route,
            extra_headers,
            client,
        })
    }

    /// A request to the challenge's submit path, already counted by the rate limit: a
    /// banned address gets 403, a method other than POST 405, a POST [`Decision::Submit`]
    /// (also when the address is blocked: solving is its way out).
    fn submit(
        &self,
        policy: &Arc<defenra_shield::DomainPolicy>,
        check: Check,
        method: &Method,
        host: &str,
        visitor: Visitor,
    ) -> Decision {
        let edge = &self.service.edge;
        if check == Check::Banned {
            return Decision::Respond(edge.page(&Page::Forbidden, visitor));
        }
        if method != Method::POST {
            let mut local = edge.for_status(StatusCode::METHOD_NOT_ALLOWED, visitor);
            local
                .headers
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Decision::Respond(local);
        }
        let Some(host) = with_lower_host(host, str::to_owned) else {
            return Decision::Respond(edge.for_status(StatusCode::BAD_REQUEST, visitor));
        };
        Decision::Submit(Box::new(Submit {
            policy: Arc::clone(policy),
            client: visitor.client,
            host,
            blocked: matches!(check, Check::Limited { .. }),
            visitor,
        }))
    }

    /// The HTTP/2 path (hyper's server and client): decide, then proxy with the request's
    /// `HeaderMap` as hyper parsed it.
    async fn route_and_proxy(
        self: &Arc<Self>,
        request: Request<Incoming>,
        entry: &mut Option<Box<AccessEntry>>,
        visitor: &mut Visitor,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // RFC 9113 §8.3.1: :authority (the URI's authority here) wins over Host. Without
        // it, several Host fields are as ambiguous as over HTTP/1.1 (RFC 9112 §3.2): 400.
        let host_value = match request.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => {
                let mut hosts = request.headers().get_all(header::HOST).iter();
                let first = hosts.next().cloned();
                if hosts.next().is_some() {
                    return Err(ProxyError::Client("more than one Host".to_owned()));
                }
                first
            }
        }
        .ok_or(ProxyError::MissingHost)?;
        let host_text = host_value.to_str().map_err(|_| ProxyError::MissingHost)?;
        let host = strip_port(host_text);
        // The origin and the WAF get this same origin-form target (a fragment never gets
        // here: the URI parser drops it). An encoded NUL in the path is refused as over
        // HTTP/1.
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", PathAndQuery::as_str);
        if crate::h1::encoded_nul_in_path(target.as_bytes()) {
            return Err(ProxyError::Client(
                "encoded NUL in the request path".to_owned(),
            ));
        }
        let asked = Asked {
            method: request.method(),
            host,
            target,
            fields: request.headers(),
            format: visitor.format,
        };
        let decision = self.decide(&asked, entry, |waf, domain, lower_host, client| {
            waf.check(&defenra_waf::RequestInfo {
                domain,
                host: lower_host,
                method: request.method(),
                target,
                headers: defenra_waf::RequestHeaders::Map(request.headers()),
                remote_addr: client,
                scheme: self.listener.scheme(),
                server_port: self.local_port,
            })
        })?;
        let (route, extra_headers, client) = match decision {
            Decision::Respond(local) => return Ok(local.into_response()),
            Decision::Submit(submit) => {
                let timeout = self.header_timeout;
                let local = match crate::edge::read_form_h2(request.into_body(), timeout).await {
                    Ok(body) => self.answer_submit(&submit, FormBody::Read(&body)),
                    Err(failed) => self.answer_submit(&submit, failed),
                };
                return Ok(local.into_response());
            }
            Decision::Proxy {
                route,
                extra_headers,
                client,
            } => (route, extra_headers, client),
        };
        visitor.client = client;
        self.service.clients.note(client, || {
            request
                .headers()
                .get(header::USER_AGENT)
                .map(HeaderValue::as_bytes)
        });
        let Some(origin) = route.origin.as_ref() else {
            return Err(ProxyError::NoOrigin(host.to_owned()));
        };
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

        let (mut parts, body) = request.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::join_cookies(&mut parts.headers);
        parts.headers.insert(header::HOST, host_value.clone());
        let client_ip = if client == self.peer.ip().to_canonical() {
            self.peer_ip.clone()
        } else {
            headers::ip_value(client)
        };
        headers::add_forwarding(
            &mut parts.headers,
            &client_ip,
            self.listener.scheme(),
            Some(&host_value),
        );
        let key = pool_key(origin, host)?;
        parts.uri = origin_form(parts.uri);
        // Origins speak HTTP/1.1 (docs/http.md).
        parts.version = Version::HTTP_11;
        // The proxy has the start of the body before the origin sees the request (below),
        // so the origin gets no `Expect` (as over HTTP/1).
        parts.headers.remove(header::EXPECT);
        let mut body = RequestBody::new(body, limit);
        let uploaded = body.progress();
        let timeout = self.service.options.origin_timeout;
        // A protected domain's slow-body rule is checked at the end of each of its windows.
        let mut rate = BodyRate::for_route(&route);
        // No slot before the request can progress: the start of its body (all of a small
        // one) is read first, so a stream whose body trickles or never comes holds nothing
        // of the origin's.
        if !hyper::body::Body::is_end_stream(&body) {
            self.read_body_start(&mut body, &uploaded, &mut rate)
                .await?;
        }
        // Then one of the connection's slots and one of the client's: waiting for those
        // is the client's own doing (429 when it lasts the origin timeout).
        let busy = || ProxyError::ClientBusy {
            limit: self.service.client_slots.cap(),
        };
        let stream_slot = StreamSlot::acquire(self, timeout).await.ok_or_else(busy)?;
        let client_slot = match self.client_ref(client) {
            None => None,
            Some(client) => Some(
                tokio::time::timeout(timeout, client.acquire())
                    .await
                    .map_err(|_| busy())?,
            ),
        };
        let origin_request = Request::from_parts(parts, body);

        let pool = &self.service.origins;
        let started = Instant::now();
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
        // The timeout starts over while body bytes move (checked each time it runs out, so
        // a stalled upload ends between one and two timeouts after its last byte).
        let exchanged = {
            tokio::pin!(exchange);
            let mut seen = 0;
            let mut last_move = tokio::time::Instant::now();
            loop {
                let progress = uploaded.load(Ordering::Relaxed);
                let body_done = progress & BODY_DONE != 0;
                let wake = match rate.as_mut().filter(|_| !body_done) {
                    Some(rate) => {
                        match rate.check(progress & !BODY_DONE, tokio::time::Instant::now()) {
                            Ok(window_end) => window_end.min(last_move + timeout),
                            Err(slow) => {
                                self.service
                                    .shield
                                    .counters()
                                    .slow_bodies
                                    .fetch_add(1, Ordering::Relaxed);
                                return Err(ProxyError::SlowBody {
                                    min_bytes: slow.min_bytes,
                                    period: slow.period,
                                });
                            }
                        }
                    }
                    None => last_move + timeout,
                };
                match tokio::time::timeout_at(wake, &mut exchange).await {
                    Ok(exchanged) => break Some(exchanged),
                    Err(_) => {
                        let now = uploaded.load(Ordering::Relaxed);
                        if now != seen {
                            seen = now;
                            last_move = tokio::time::Instant::now();
                        } else if last_move.elapsed() >= timeout {
                            break None;
                        }
                    }
                }
            }
        };
        let (permit, mut response, conn) = match exchanged {
            Some(Ok(exchanged)) => {
                route.traffic.responded_after(started.elapsed());
                exchanged
            }
            Some(Err(error)) => return Err(error),
            None => {
                return Err(ProxyError::OriginTimeout {
                    origin: origin.address.to_string(),
                    timeout,
                });
            }
        };

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
        let slots = ExchangeSlots {
            _origin: permit,
            _client: client_slot,
            _stream: stream_slot,
        };
        Ok(response.map(|body| http_body_util::Either::Left(OriginBody::new(body, lease, slots))))
    }

    /// HTTP/2's half of h1's `read_body_start`: reads the start of the request body (all of
    /// it when it is at most `request_buffer_bytes`) into `body` before the request takes
    /// any slot. A body that stops coming for the origin timeout gets 408, as does one too
    /// slow for a protected domain's rule.
    async fn read_body_start(
        &self,
        body: &mut RequestBody,
        uploaded: &std::sync::atomic::AtomicU64,
        rate: &mut Option<BodyRate>,
    ) -> Result<(), ProxyError> {
        let options = &self.service.options;
        let timeout = options.origin_timeout;
        let fill = body.fill(options.request_buffer_bytes);
        tokio::pin!(fill);
        let mut seen = 0;
        let mut last_move = tokio::time::Instant::now();
        loop {
            let progress = uploaded.load(Ordering::Relaxed) & !BODY_DONE;
            let now = tokio::time::Instant::now();
            if progress != seen {
                seen = progress;
                last_move = now;
            }
            let wake = match rate.as_mut() {
                Some(rate) => match rate.check(progress, now) {
                    Ok(window_end) => window_end.min(last_move + timeout),
                    Err(slow) => {
                        self.service
                            .shield
                            .counters()
                            .slow_bodies
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(ProxyError::SlowBody {
                            min_bytes: slow.min_bytes,
                            period: slow.period,
                        });
                    }
                },
                None => last_move + timeout,
            };
            match tokio::time::timeout_at(wake, &mut fill).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(BodyError::TooLarge)) => {
                    return Err(ProxyError::BodyTooLarge {
                        limit: options.max_request_body,
                    });
                }
                Ok(Err(BodyError::Client(error))) => {
                    return Err(ProxyError::Client(error.to_string()));
                }
                Err(_) => {
                    let now = uploaded.load(Ordering::Relaxed) & !BODY_DONE;
                    if now == seen && last_move.elapsed() >= timeout {
                        return Err(ProxyError::ClientTimeout { timeout });
                    }
                }
            }
        }
    }

    /// Logs a failure once and counts it.
    pub(crate) fn note(&self, error: &ProxyError) {
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

/// One of an HTTP/2 connection's origin slots (`Conn::stream_slots`), given back when
/// dropped.
pub(crate) struct StreamSlot(Arc<Conn>);

impl StreamSlot {
    /// Waits up to `timeout` for one of `conn`'s slots; `None` when none came free.
    async fn acquire(conn: &Arc<Conn>, timeout: Duration) -> Option<StreamSlot> {
        let permit = tokio::time::timeout(timeout, conn.stream_slots.acquire())
            .await
            .ok()?
            .ok()?;
        // Given back by `Drop`, which owns the connection (the permit borrows it).
        permit.forget();
        Some(StreamSlot(Arc::clone(conn)))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.stream_slots.add_permits(1);
    }
}

/// The slots an origin exchange holds until its response body is done: the origin's, its
/// client's and (HTTP/2) its connection's. Held for their `Drop`, which gives them back.
pub(crate) struct ExchangeSlots {
    pub(crate) _origin: tokio::sync::OwnedSemaphorePermit,
    pub(crate) _client: Option<ClientSlot>,
    pub(crate) _stream: StreamSlot,
}

/// The path of a request target, without its query.
fn path_of(target: &str) -> &str {
    target.split_once('?').map_or(target, |(path, _)| path)
}

/// `GET /.well-known/acme-challenge/{token}` for the domain's pending challenge.
fn acme_answer(route: &Route, method: &Method, target: &str) -> Option<Local> {
    let challenge = route.domain.acme_challenge.as_ref()?;
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let token = path.strip_prefix(ACME_PREFIX)?;
    (token == challenge.token)
        .then(|| Local::plain(StatusCode::OK, challenge.key_authorization.clone()))
}

/// 301 to the same host (without port: HTTPS on 443) and path on https.
fn redirect(host: &str, target: &str) -> Local {
    let path = if target.starts_with('/') { target } else { "/" };
    let location = format!("https://{host}{path}");
    let mut local = Local::plain(StatusCode::MOVED_PERMANENTLY, "301 Moved Permanently\n");
    if let Ok(value) = HeaderValue::from_str(&location) {
        local.headers.insert(header::LOCATION, value);
    }
    local
}

/// The pool key of a request: plain origins by address, HTTPS origins by
/// `host@address:port` (the user-info carries the TLS server name).
pub(crate) fn pool_key(origin: &Origin, host: &str) -> Result<PoolKey, ProxyError> {
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
