//! The HTTP/1.x engine: client connections on both listeners (plain, and TLS without `h2`)
//! and every exchange with origins.
//!
//! One task per client connection reads a head into its buffer, parses it with
//! `httparse` into spans of that buffer, routes it ([`Conn::decide`]), writes the origin
//! request head straight from those spans (hop-by-hop fields dropped, forwarding fields
//! added) and passes bodies through as they arrive, in both directions, with their
//! framing checked but never rebuilt: no header map, no per-request body channel, no
//! task per origin connection. This is how nginx and HAProxy proxy, and what let the
//! agent reach nginx's rate (docs/http.md, *HTTP/1 engine*); hyper still serves HTTP/2.

pub(crate) mod buffer;
mod chunked;
mod date;
mod form;
pub(crate) mod fuzzing;
mod head;
mod timer;

pub(crate) use head::encoded_nul_in_path;

use std::borrow::Cow;
use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::access::AccessEntry;
use crate::edge::Visitor;
use crate::origin::{PoolKey, RawConn};
use crate::proxy::{
    Asked, Conn, Decision, ErrorSource, Fields, Local, ProxyError, note_local, pool_key,
};
use crate::route::{Route, strip_port};
use crate::server::Meter;
use crate::slow::BodyRate;
use crate::stats::{Event, ListenerStats};
use buffer::Buffer;
use chunked::ChunkedScanner;
use head::{ClientFraming, Forwarding, Framing, HeadError, RequestHead, ResponseHead};
use timer::Timer;

/// First size of a client connection's read buffer; it grows up to the head limit.
const CLIENT_BUFFER: usize = 8 * 1024;
/// Lingering close (nginx's `lingering_time` and `lingering_timeout`, shorter, and a cap
/// nginx does not have): how long, at most, a connection the proxy closes while the client
/// may still be sending keeps reading and dropping what comes, the longest pause it waits
/// through, and the most it reads (a client still sending then is not listening).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_GAP: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;
/// Body bytes appended to a head so both go out in one write, at most.
const COALESCE: usize = 32 * 1024;
/// Bytes of the proxy's own responses to pipelined requests held back to go out in one
/// write, at most (see `Session::held`).
const HOLD: usize = 16 * 1024;

/// Serves HTTP/1.x requests on `io` until the client closes, a limit is hit, or the
/// listener shuts down (an exchange in flight finishes first).
pub(crate) async fn serve<S>(conn: &Conn, io: S, meter: &Meter)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let options = &conn.service.options;
    let mut session = Session {
        conn,
        stats: conn.service.stats.listener(conn.listener),
        meter,
        io,
        inbuf: Buffer::new(CLIENT_BUFFER.min(options.max_header_bytes.max(1024))),
        out: Vec::with_capacity(1024),
        held: Vec::new(),
        head: RequestHead::default(),
        response: ResponseHead::default(),
        max_head: options.max_header_bytes.max(1024),
    };
    session.run().await;
}

struct Session<'c, S> {
    conn: &'c Conn,
    stats: &'c ListenerStats,
    meter: &'c Meter,
    io: S,
    /// What the client sent and the engine has not used yet.
    inbuf: Buffer,
    /// The next bytes for a peer: a head, perhaps with the start of a body.
    out: Vec<u8>,
    /// The proxy's own responses (a 429, a challenge, an error page) to requests the client
    /// pipelined, not written yet: answered together in one write, where one write each
    /// would wake the client once per response. Written before the engine waits for the
    /// client (`read_head`), before anything else goes to the client or the origin, when
    /// it reaches [`HOLD`] bytes, and at the end of the connection, so responses keep their
    /// order and none waits for more input.
    held: Vec<u8>,
    head: RequestHead,
    response: ResponseHead,
    max_head: usize,
}

/// How reading a request head ended without a head.
enum NoHead {
    /// Closed, idle too long, or the listener is shutting down: nothing to answer.
    Quiet,
    /// A head that cannot be served: answered with its status.
    Bad(HeadError),
}

/// What the client's side of an exchange did while the origin was working.
#[derive(Debug)]
enum ExchangeError {
    /// The client went away or failed: nothing more can be sent to it.
    ClientGone,
    /// The request failed with this error (answered with its page, if nothing was sent).
    Proxy(ProxyError),
    /// A pooled connection the origin had closed before answering: try a new one.
    Stale,
    /// Nothing moved for the origin timeout before the response head was complete.
    OriginTimeout,
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(&mut self) {
        // A child token of its own: waiting on it takes only this connection's lock.
        let shutdown = self.conn.shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // Every wait's deadline: next head, origin answer, an exchange's idle limit.
        let mut timer = Timer::new(Instant::now() + self.conn.header_timeout);
        let mut first = true;
        // Whether the client may still be sending when the proxy closes.
        let mut linger = false;
        loop {
            match self.read_head(first, cancelled.as_mut(), &mut timer).await {
                Ok(()) => {}
                Err(NoHead::Quiet) => break,
                Err(NoHead::Bad(error)) => {
                    tracing::debug!(peer = %self.conn.peer, %error, "bad request head");
                    let visitor = Visitor::new([], self.conn.peer.ip().to_canonical());
                    let local = self.conn.service.edge.for_status(error.status(), visitor);
                    linger = self.respond_local(&local, true, false, false).await;
                    break;
                }
            }
            first = false;
            let keep = self.exchange(&mut timer).await;
            self.meter.flush_into(self.stats);
            if !keep || shutdown.is_cancelled() {
                linger = !shutdown.is_cancelled();
                break;
            }
        }
        if !self.flush_held().await {
            linger = false;
        }
        // FIN (and TLS close_notify) after the last response; a peer that stopped reading
        // cannot hold the task.
        let shut = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        if linger && matches!(shut, Ok(Ok(()))) {
            self.linger().await;
        }
        self.meter.flush_into(self.stats);
    }

    /// Reads and drops what the client still sends, until it closes, pauses for
    /// [`LINGER_GAP`], [`LINGER_TIME`] is over or [`LINGER_BYTES`] have come. Closing a socket with unread input makes
    /// the kernel send a reset, which can destroy responses the client has not read yet
    /// (pipelined requests answered before a bad head, a refused upload): nginx's lingering
    /// close, for the same reason.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER_TIME;
        let mut scratch = [0u8; 4096];
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            let gap = LINGER_GAP.min(deadline.saturating_duration_since(Instant::now()));
            if gap.is_zero() {
                break;
            }
            match tokio::time::timeout(gap, self.io.read(&mut scratch)).await {
                Ok(Ok(read)) if read > 0 => dropped += read,
                _ => break,
            }
        }
    }

    /// Reads until `self.head` holds a complete request head. The first head of a
    /// connection must arrive within the header timeout; later ones may wait for the
    /// keep-alive timeout, then must be complete within the header timeout.
    async fn read_head(
        &mut self,
        first: bool,
        mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
        timer: &mut Timer,
    ) -> Result<(), NoHead> {
        let options = &self.conn.service.options;
        let mut started = !self.inbuf.is_empty();
        timer.set(
            Instant::now()
                + if first || started {
                    self.conn.header_timeout
                } else {
                    options.keepalive_timeout
                },
        );
        loop {
            if !self.inbuf.is_empty() {
                match self.head.parse(self.inbuf.filled()) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    Err(error) => return Err(NoHead::Bad(error)),
                }
                if !started {
                    started = true;
                    if !first {
                        timer.set(Instant::now() + self.conn.header_timeout);
                    }
                }
                if !self.inbuf.has_room() && !self.inbuf.grow(self.max_head) {
                    return Err(NoHead::Bad(HeadError::TooLarge));
                }
            }
            // Nothing more to answer without reading: what is held goes out first.
            if !self.flush_held().await {
                return Err(NoHead::Quiet);
            }
            let idle = self.inbuf.is_empty();
            let read = tokio::select! {
                biased;
                read = self.inbuf.read_from(&mut self.io) => read,
                () = cancelled.as_mut(), if idle => return Err(NoHead::Quiet),
                () = timer.expired() => return Err(NoHead::Quiet),
            };
            match read {
                Ok(0) | Err(_) => return Err(NoHead::Quiet),
                Ok(_) => {}
            }
        }
    }

    /// One request: route it, answer it or proxy it. Returns whether the connection may
    /// carry another request.
    async fn exchange(&mut self, timer: &mut Timer) -> bool {
        let conn = self.conn;
        let buf = self.inbuf.filled();
        let head = &self.head;
        let head_len = head.len;
        let keep_alive = head.keep_alive();
        let keep_alive_10 = keep_alive && head.minor == 0;
        let has_body = !matches!(head.framing, Framing::None | Framing::Length(0));
        let method_bytes = head.method.get(buf);
        let is_head = method_bytes == b"HEAD";
        let method = Method::from_bytes(method_bytes).unwrap_or(Method::GET);
        // Origin-form, or absolute-form whose authority wins over Host (RFC 9112 §3.2.3);
        // the parser refused every other form.
        let authority = head.authority.map(|span| span.get(buf));
        let path = head.path.get(buf);
        let mut entry = conn.service.access_log.start(
            &conn.service.stats,
            conn.peer.ip().to_canonical(),
            conn.listener,
            &method,
            std::str::from_utf8(path).map_or("/", |path| {
                path.split_once('?').map_or(path, |(path, _)| path)
            }),
        );
        let fields = head.fields(buf);
        // Known before the head is gone, for a page this request may still get (a 502).
        let mut visitor = Visitor::new(fields.all("accept"), conn.peer.ip().to_canonical());
        let routed = authority
            .or_else(|| head.host(buf))
            .and_then(|host| std::str::from_utf8(host).ok())
            .filter(|host| !host.is_empty())
            .ok_or(ProxyError::MissingHost)
            .and_then(|host_value| {
                let host = strip_port(host_value);
                let target = std::str::from_utf8(path).map_err(|_| ProxyError::MissingHost)?;
                // `http://host?q` goes to the origin as `/?q`: the WAF sees the same.
                let target = if path
                    .first()
                    .is_some_and(|&byte| byte == b'/' || byte == b'*')
                {
                    Cow::Borrowed(target)
                } else {
                    Cow::Owned(format!("/{target}"))
                };
                let target = &*target;
                let asked = Asked {
                    method: &method,
                    host,
                    target,
                    fields,
                    format: visitor.format,
                };
                let decision = conn.decide(&asked, &mut entry, |waf, domain, lower, client| {
                    let pairs: Vec<(&str, &[u8])> = head.pairs(buf).collect();
                    waf.check(&defenra_waf::RequestInfo {
                        domain,
                        host: lower,
                        method: &method,
                        target,
                        headers: defenra_waf::RequestHeaders::Pairs(&pairs),
                        remote_addr: client,
                        scheme: conn.listener.scheme(),
                        server_port: conn.local_port,
                    })
                })?;
                if let Decision::Proxy { client, .. } = &decision {
                    conn.service.clients.note(*client, || {
                        head.pairs(buf)
                            .find(|(name, _)| name.eq_ignore_ascii_case("user-agent"))
                            .map(|(_, value)| value)
                    });
                }
                Ok((decision, host_value, host))
            });
        let (route, extra, key) = match routed {
            Ok((Decision::Respond(local), _, _)) => {
                self.inbuf.consume(head_len);
                note_local(&mut entry, &local);
                // A body the client is sending would be read as the next request.
                let close = !keep_alive || has_body;
                return self
                    .respond_local(&local, close, keep_alive_10 && !close, is_head)
                    .await
                    && !close;
            }
            Ok((Decision::Submit(submit), _, _)) => {
                let framing = head.framing;
                let minor = head.minor;
                let expects_continue = fields
                    .last("expect")
                    .is_some_and(|value| value.eq_ignore_ascii_case(b"100-continue"));
                self.inbuf.consume(head_len);
                return self
                    .submit(
                        &submit,
                        form::Framed {
                            framing,
                            minor,
                            keep_alive,
                            is_head,
                            expects_continue,
                        },
                        &mut entry,
                        timer,
                    )
                    .await;
            }
            Ok((
                Decision::Proxy {
                    route,
                    extra_headers,
                    client,
                },
                host_value,
                host,
            )) => {
                visitor.client = client;
                match prepare(
                    conn,
                    &route,
                    head,
                    buf,
                    (host_value, host),
                    path,
                    client,
                    &mut self.out,
                ) {
                    Ok(key) => (route, extra_headers, key),
                    Err(error) => {
                        self.inbuf.consume(head_len);
                        return self
                            .fail(error, &mut entry, visitor, keep_alive, has_body, is_head)
                            .await;
                    }
                }
            }
            Err(error) => {
                self.inbuf.consume(head_len);
                return self
                    .fail(error, &mut entry, visitor, keep_alive, has_body, is_head)
                    .await;
            }
        };
        let Some(origin) = route.origin.as_ref() else {
            self.inbuf.consume(head_len);
            return false;
        };
        if let Some(entry) = &mut entry {
            entry.origin = Some(origin.address.clone());
        }
        let upgrade = head.upgrade(buf).map(Bytes::copy_from_slice);
        let framing = head.framing;
        let minor = head.minor;
        let expects_continue = head.fields.expect_continue;
        let idempotent = !matches!(method_bytes, b"POST" | b"PATCH" | b"LOCK" | b"CONNECT");
        self.inbuf.consume(head_len);

        let request = Request {
            framing,
            is_head,
            keep_alive,
            minor,
            expects_continue,
            retryable: idempotent && !has_body,
            upgrade: upgrade.is_some(),
            visitor,
        };
        let outcome = self
            .proxy(&route, &key, &request, extra.as_ref(), &mut entry, timer)
            .await;
        match outcome {
            Ok(keep) => keep,
            Err(ExchangeError::ClientGone) => false,
            Err(ExchangeError::Proxy(error)) => {
                self.fail(error, &mut entry, visitor, keep_alive, true, is_head)
                    .await
            }
            Err(ExchangeError::Stale | ExchangeError::OriginTimeout) => false,
        }
    }

    /// Answers with the page of `error` (after logging and counting it).
    async fn fail(
        &mut self,
        error: ProxyError,
        entry: &mut Option<Box<AccessEntry>>,
        visitor: Visitor,
        keep_alive: bool,
        has_body: bool,
        is_head: bool,
    ) -> bool {
        self.conn.note(&error);
        let local = self.conn.service.edge.for_status(error.status(), visitor);
        note_local(entry, &local);
        // A client that sent something unusable gets no second chance, as with nginx.
        let close = !keep_alive || has_body || error.blame() == ErrorSource::Client;
        self.respond_local(
            &local,
            close,
            keep_alive && !close && self.head.minor == 0,
            is_head,
        )
        .await
            && !close
    }

    /// Writes a response the proxy made itself. False when the client is gone.
    async fn respond_local(
        &mut self,
        local: &Local,
        close: bool,
        keep_alive_10: bool,
        is_head: bool,
    ) -> bool {
        self.stats.response(local.status);
        self.conn.meter.responded(local.status);
        head::write_local_response(
            &mut self.held,
            local.status,
            &local.headers,
            local.body.len(),
            close,
            keep_alive_10,
        );
        if !is_head {
            self.held.extend_from_slice(&local.body);
        }
        // More pipelined bytes: their answers may join this one (see `held`).
        if !close && !self.inbuf.is_empty() && self.held.len() < HOLD {
            return true;
        }
        self.flush_held().await
    }

    /// Writes the held responses. False when the client is gone.
    async fn flush_held(&mut self) -> bool {
        if self.held.is_empty() {
            return true;
        }
        let limit = self.conn.service.options.keepalive_timeout;
        let written = write_all_within(&mut self.io, &self.held, limit).await;
        self.held.clear();
        if self.held.capacity() > 4 * HOLD {
            // One large page (a challenge with a big template) does not stay allocated.
            self.held = Vec::new();
        }
        written.is_ok()
    }

    /// Sends the request (head in `self.out`, body from the client) to the origin, passes
    /// the response back, and returns whether the client connection may go on.
    async fn proxy(
        &mut self,
        route: &Route,
        key: &PoolKey,
        request: &Request,
        extra: Option<&HeaderMap>,
        entry: &mut Option<Box<AccessEntry>>,
        timer: &mut Timer,
    ) -> Result<bool, ExchangeError> {
        // Answers to earlier pipelined requests go out before this one's exchange starts.
        if !self.flush_held().await {
            return Err(ExchangeError::ClientGone);
        }
        let Some(origin) = route.origin.as_ref() else {
            return Err(ExchangeError::Proxy(ProxyError::NoOrigin(
                route.domain.name.to_string(),
            )));
        };
        let service = &self.conn.service;
        let options = &service.options;
        let pool = &service.origins;
        let limit = options.max_request_body;
        let mut upload = Upload::new(request.framing, limit);
        upload.head_request = request.is_head;
        let mut rate = if upload.done {
            None
        } else {
            BodyRate::for_route(route)
        };
        let origin_label = || origin.address.to_string();

        // No slot before the request can progress: the start of its body (all of a small
        // one) is read first, so a body that trickles or never comes holds nothing of the
        // origin's. A client that stops sending gets 408 after the origin timeout.
        timer.set(Instant::now() + options.origin_timeout);
        if !upload.done {
            self.read_body_start(request, timer, &mut rate).await?;
        }
        let started = Instant::now();

        // Then one of the client's own slots, then one of the origin's. Waiting for them,
        // connecting and each stretch of the upload and of the wait for the response head
        // count against the origin timeout: it starts over whenever body bytes move, so a
        // slow but steady upload (nginx's `proxy_send_timeout` between two writes) is not
        // cut off.
        timer.set(Instant::now() + options.origin_timeout);
        let client_slot = match self.conn.client_ref(request.visitor.client) {
            None => None,
            Some(client) => Some(match client.try_acquire() {
                Some(slot) => slot,
                None => tokio::select! {
                    biased;
                    slot = client.acquire() => slot,
                    () = timer.expired() => {
                        return Err(ExchangeError::Proxy(ProxyError::ClientBusy {
                            limit: service.client_slots.cap(),
                        }));
                    }
                },
            }),
        };
        let timed_out = || {
            ExchangeError::Proxy(ProxyError::OriginTimeout {
                origin: origin_label(),
                timeout: options.origin_timeout,
            })
        };
        let origin_slot = tokio::select! {
            biased;
            permit = Arc::clone(&origin.limit).acquire_owned() => permit.map_err(|_| {
                ExchangeError::Proxy(ProxyError::Agent("origin limit closed".to_owned()))
            })?,
            () = timer.expired() => return Err(timed_out()),
        };
        let mut reuse = true;
        let mut origin_conn = loop {
            let pooled = if reuse {
                self.conn.raw_pool.checkout(key)
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut origin_conn = match pooled {
                Some(conn) => conn,
                None => tokio::select! {
                    biased;
                    connected = pool.connect_raw(key) => connected.map_err(|error| {
                        ExchangeError::Proxy(ProxyError::OriginConnect {
                            origin: origin_label(),
                            reason: error.to_string(),
                        })
                    })?,
                    () = timer.expired() => return Err(timed_out()),
                },
            };
            match self
                .send_and_wait(
                    &mut origin_conn,
                    &mut upload,
                    request,
                    reused,
                    timer,
                    &mut rate,
                )
                .await
            {
                Ok(()) => break origin_conn,
                Err(ExchangeError::Stale) if reused && request.retryable => reuse = false,
                Err(ExchangeError::Stale) => {
                    return Err(ExchangeError::Proxy(ProxyError::Origin {
                        origin: origin_label(),
                        reason: "connection closed before the response".to_owned(),
                    }));
                }
                Err(ExchangeError::OriginTimeout) => return Err(timed_out()),
                Err(error) => return Err(error),
            }
        };

        let response = &self.response;
        let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
        set_status(entry, status);
        self.stats.response(status);
        self.conn.meter.responded(status);
        route.traffic.responded_after(started.elapsed());
        if response.status == 101 {
            // A tunnel lives as long as its two peers want: it holds no origin slot (the
            // origin cap is for exchanges) and none of its client's; it is bounded by the
            // connection caps and its idle timeout.
            drop((origin_slot, client_slot));
            return Ok(self.tunnel(origin_conn, request).await);
        }
        // An origin that answered before the whole body was sent: this exchange is the
        // connection's last (the rest of the body cannot be told from a next request).
        let upload_done = upload.done;
        let shutting_down = self.conn.shutdown.is_cancelled();
        let (chunked, decode, mut close) = match response.framing {
            Framing::None | Framing::Length(_) => (false, false, !request.keep_alive),
            Framing::Chunked if request.minor == 1 => (true, false, !request.keep_alive),
            // HTTP/1.0 has no chunked coding: decode, and end the body by closing.
            Framing::Chunked => (false, true, true),
            Framing::UntilClose => (false, false, true),
        };
        close |= !upload_done || shutting_down;
        let reusable = response.reusable() && upload_done;
        self.out.clear();
        head::write_client_response(
            &mut self.out,
            origin_conn.buf.filled(),
            response,
            extra,
            ClientFraming {
                chunked,
                close,
                keep_alive_10: request.keep_alive && request.minor == 0 && !close,
                upgrade: None,
            },
        );
        let mut download = Download::new(response.framing, decode);
        origin_conn.buf.consume(response.len);
        download.coalesce(&mut self.out, &mut origin_conn.buf);
        let relayed = self
            .relay(&mut origin_conn, &mut upload, &mut download, timer)
            .await;
        let bytes = match relayed {
            Ok(bytes) => bytes,
            Err(_) => return Err(ExchangeError::ClientGone),
        };
        if let Some(entry) = entry {
            entry.bytes_sent = bytes;
        }
        if reusable {
            self.conn.raw_pool.release(key.clone(), origin_conn);
        }
        Ok(!close)
    }

    /// Reads the start of the request body into the client buffer: all of it when it is
    /// at most `request_buffer_bytes` (capped by the head limit), else that much. Only then
    /// does the request take slots, so a body that trickles or never comes holds nothing
    /// of the origin's (nginx reads whole bodies first: `proxy_request_buffering`). The
    /// origin will not see the request before this, so `Expect: 100-continue` is answered
    /// here, as nginx does (RFC 9110 §10.1.1), and not passed on.
    async fn read_body_start(
        &mut self,
        request: &Request,
        timer: &mut Timer,
        rate: &mut Option<BodyRate>,
    ) -> Result<(), ExchangeError> {
        let options = &self.conn.service.options;
        let most = options.request_buffer_bytes.min(self.max_head).max(1);
        let wanted = match request.framing {
            Framing::Length(length) => usize::try_from(length).map_or(most, |n| n.min(most)),
            Framing::Chunked => most,
            Framing::None | Framing::UntilClose => return Ok(()),
        };
        // For a chunked body: where its end is, if it is in the buffer already.
        let mut probe = ChunkedScanner::default();
        let mut scanned = 0;
        let mut continued = false;
        loop {
            let buffered = self.inbuf.filled();
            let enough = match request.framing {
                Framing::Chunked => match probe.scan(&buffered[scanned..], |_| {}) {
                    Ok(used) => {
                        scanned += used;
                        probe.is_done() || buffered.len() >= wanted
                    }
                    // A malformed body: the upload finds it again and answers 400.
                    Err(_) => true,
                },
                _ => buffered.len() >= wanted,
            };
            if enough {
                return Ok(());
            }
            if request.expects_continue && request.minor == 1 && !continued {
                continued = true;
                write_all_within(
                    &mut self.io,
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    options.keepalive_timeout,
                )
                .await
                .map_err(|_| ExchangeError::ClientGone)?;
            }
            if !self.inbuf.has_room() && !self.inbuf.grow(self.max_head) {
                return Ok(());
            }
            let received = self.inbuf.len() as u64;
            let read = tokio::select! {
                biased;
                read = self.inbuf.read_from(&mut self.io) => read,
                slow = poll_fn(|cx| match rate.as_mut() {
                    Some(rate) => rate.poll_slow(cx, received),
                    None => Poll::Pending,
                }) => {
                    self.conn
                        .service
                        .shield
                        .counters()
                        .slow_bodies
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(ExchangeError::Proxy(ProxyError::SlowBody {
                        min_bytes: slow.min_bytes,
                        period: slow.period,
                    }));
                }
                () = timer.expired() => {
                    return Err(ExchangeError::Proxy(ProxyError::ClientTimeout {
                        timeout: options.origin_timeout,
                    }));
                }
            };
            match read {
                Ok(0) | Err(_) => return Err(ExchangeError::ClientGone),
                Ok(_) => timer.set(Instant::now() + options.origin_timeout),
            }
        }
    }

    /// Writes the request head (and what the client sent of the body) to the origin, then
    /// streams the rest of the body while waiting for the final response head, passing
    /// interim (1xx) responses on. `self.response` holds the head on success.
    async fn send_and_wait(
        &mut self,
        origin: &mut RawConn,
        upload: &mut Upload,
        request: &Request,
        reused: bool,
        timer: &mut Timer,
        rate: &mut Option<BodyRate>,
    ) -> Result<(), ExchangeError> {
        // A small body that is already here goes out with the head.
        if let Framing::Length(length) = request.framing
            && length > 0
            && length as usize <= self.inbuf.len()
            && length as usize <= COALESCE
        {
            self.out
                .extend_from_slice(&self.inbuf.filled()[..length as usize]);
            self.inbuf.consume(length as usize);
            upload.done = true;
        }
        let written = tokio::select! {
            biased;
            written = write_all_flush(&mut origin.stream, &self.out) => written,
            () = timer.expired() => return Err(ExchangeError::OriginTimeout),
        };
        if let Err(error) = written {
            return Err(if reused {
                ExchangeError::Stale
            } else {
                origin_failed(format!("sending the request failed: {error}"))
            });
        }
        let mut received_any = false;
        loop {
            let waited = poll_fn(|cx| {
                let no_body = request.framing == Framing::None;
                self.poll_exchange(cx, origin, upload, no_body, timer, rate)
            })
            .await;
            match waited {
                Ok(()) => received_any = true,
                Err(ExchangeError::Stale) if received_any || !reused => {
                    return Err(origin_failed(
                        "connection closed before the response".to_owned(),
                    ));
                }
                Err(error) => return Err(error),
            }
            if !self.response.is_informational() {
                return Ok(());
            }
            // 100 Continue and the like: on to HTTP/1.1 clients, then the real answer.
            if request.minor == 1 {
                self.out.clear();
                head::write_informational(&mut self.out, origin.buf.filled(), &self.response);
                let limit = self.conn.service.options.keepalive_timeout;
                write_all_within(&mut self.io, &self.out, limit)
                    .await
                    .map_err(|_| ExchangeError::ClientGone)?;
            }
            origin.buf.consume(self.response.len);
        }
    }

    /// One step of the exchange: body bytes from the client to the origin, the response
    /// head from the origin, and (once the body is sent) a look at whether the client is
    /// still there. Ready when the response head is complete. The timer starts over when
    /// body bytes move; a protected domain's `rate` ends a body that comes too slowly.
    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        origin: &mut RawConn,
        upload: &mut Upload,
        no_body: bool,
        timer: &mut Timer,
        rate: &mut Option<BodyRate>,
    ) -> Poll<Result<(), ExchangeError>> {
        if !upload.done {
            let moved = upload.moved;
            match upload.poll(cx, &mut self.io, &mut self.inbuf, &mut origin.stream) {
                Poll::Ready(Ok(())) => upload.done = true,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
            if upload.moved != moved {
                timer.set(Instant::now() + self.conn.service.options.origin_timeout);
            }
        }
        if upload.done || no_body {
            // A client that closes while the origin works cancels the request. Bytes it
            // sends meanwhile (a pipelined request) wait in the buffer.
            if self.inbuf.has_room() {
                match self.inbuf.poll_read_from(cx, &mut self.io) {
                    Poll::Ready(Ok(0) | Err(_)) => {
                        return Poll::Ready(Err(ExchangeError::ClientGone));
                    }
                    Poll::Ready(Ok(_)) => cx.waker().wake_by_ref(),
                    Poll::Pending => {}
                }
            }
        }
        loop {
            if !origin.buf.is_empty() {
                match self
                    .response
                    .parse(origin.buf.filled(), upload.head_request)
                {
                    Ok(true) => return Poll::Ready(Ok(())),
                    Ok(false) => {}
                    Err(error) => return Poll::Ready(Err(origin_failed(error.to_string()))),
                }
                if !origin.buf.has_room() {
                    return Poll::Ready(Err(origin_failed("response head too large".to_owned())));
                }
            }
            match origin.buf.poll_read_from(cx, &mut origin.stream) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ExchangeError::Stale)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) if origin.buf.is_empty() => {
                    tracing::debug!(%error, "origin connection failed before the response");
                    return Poll::Ready(Err(ExchangeError::Stale));
                }
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Err(origin_failed(error.to_string())));
                }
                Poll::Pending => {
                    // Bytes received from the client (written or waiting in the buffer):
                    // an origin that reads slowly is not the client's fault.
                    let received = upload.moved + upload.pending as u64;
                    if !upload.done
                        && let Some(rate) = rate.as_mut()
                        && let Poll::Ready(slow) = rate.poll_slow(cx, received)
                    {
                        self.conn
                            .service
                            .shield
                            .counters()
                            .slow_bodies
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Poll::Ready(Err(ExchangeError::Proxy(ProxyError::SlowBody {
                            min_bytes: slow.min_bytes,
                            period: slow.period,
                        })));
                    }
                    if timer.poll_expired(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // A body that stopped coming is the client's doing (nginx's
                    // `client_body_timeout`, 408); one the origin stopped taking, or
                    // no answer, the origin's.
                    if !upload.done && upload.pending == 0 {
                        return Poll::Ready(Err(ExchangeError::Proxy(ProxyError::ClientTimeout {
                            timeout: self.conn.service.options.origin_timeout,
                        })));
                    }
                    return Poll::Ready(Err(ExchangeError::OriginTimeout));
                }
            }
        }
    }

    /// Passes the response body on, while the rest of the request body (if the origin
    /// answered before it had all of it) keeps going the other way. Nothing moving either
    /// way for the origin timeout ends it. Returns the body bytes sent to the client.
    async fn relay(
        &mut self,
        origin: &mut RawConn,
        upload: &mut Upload,
        download: &mut Download,
        timer: &mut Timer,
    ) -> io::Result<u64> {
        let limit = self.conn.service.options.origin_timeout;
        let mut seen = u64::MAX;
        poll_fn(|cx| {
            if !upload.done {
                match upload.poll(cx, &mut self.io, &mut self.inbuf, &mut origin.stream) {
                    Poll::Ready(Ok(())) => upload.done = true,
                    // The response can still complete; the connection closes after it.
                    Poll::Ready(Err(_)) => upload.done = true,
                    Poll::Pending => {}
                }
            }
            match download.poll(cx, &mut self.out, origin, &mut self.io) {
                Poll::Ready(result) => return Poll::Ready(result),
                Poll::Pending => {}
            }
            let moved = upload.moved + download.sent;
            if moved != seen {
                seen = moved;
                timer.set(Instant::now() + limit);
            }
            if timer.poll_expired(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing moved for the origin timeout",
                )));
            }
            Poll::Pending
        })
        .await?;
        Ok(download.sent)
    }

    /// After a 101 to an upgrade request: passes the 101 on, then copies bytes both ways
    /// until either side closes or the listener shuts down. The connection ends with it.
    async fn tunnel(&mut self, mut origin: RawConn, request: &Request) -> bool {
        if !request.upgrade {
            // A 101 nobody asked for cannot be passed on.
            self.conn.note(&ProxyError::Origin {
                origin: "origin".to_owned(),
                reason: "unrequested 101".to_owned(),
            });
            let edge = &self.conn.service.edge;
            let local = edge.for_status(StatusCode::BAD_GATEWAY, request.visitor);
            let _ = self.respond_local(&local, true, false, false).await;
            return false;
        }
        self.conn.service.stats.count(Event::Upgrade);
        let response = &self.response;
        self.out.clear();
        head::write_client_response(
            &mut self.out,
            origin.buf.filled(),
            response,
            None,
            ClientFraming {
                chunked: false,
                close: false,
                keep_alive_10: false,
                upgrade: response.fields.upgrade,
            },
        );
        origin.buf.consume(response.len);
        // Whatever either side sent past the heads goes first.
        let early_from_origin = origin.buf.filled().to_vec();
        let early_from_client = self.inbuf.filled().to_vec();
        self.out.extend_from_slice(&early_from_origin);
        let limit = self.conn.service.options.keepalive_timeout;
        if write_all_within(&mut self.io, &self.out, limit)
            .await
            .is_err()
            || write_all_flush(&mut origin.stream, &early_from_client)
                .await
                .is_err()
        {
            return false;
        }
        let peer = self.conn.peer;
        let shutdown = self.conn.shutdown.clone();
        // Bytes read on either side; a tunnel in which none move for the idle timeout is
        // closed (nginx's `proxy_read_timeout`), checked every quarter of it.
        let moved = AtomicU64::new(0);
        let idle_timeout = self.conn.service.options.tunnel_idle_timeout;
        let idle = async {
            let step = (idle_timeout / 4).max(Duration::from_millis(1));
            let mut seen = 0;
            let mut last_move = Instant::now();
            loop {
                tokio::time::sleep(step).await;
                let now = moved.load(Relaxed);
                if now != seen {
                    seen = now;
                    last_move = Instant::now();
                } else if last_move.elapsed() >= idle_timeout {
                    return;
                }
            }
        };
        let mut client = Counting {
            inner: &mut self.io,
            moved: &moved,
        };
        let mut origin_side = Counting {
            inner: &mut origin.stream,
            moved: &moved,
        };
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut origin_side) => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "tunnel ended with an error");
                }
            }
            () = idle => tracing::debug!(%peer, timeout = ?idle_timeout, "idle tunnel closed"),
            () = shutdown.cancelled() => {}
        }
        false
    }
}

/// One side of a tunnel, counting the bytes read from it into `moved`.
struct Counting<'a, T> {
    inner: &'a mut T,
    moved: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.moved.fetch_add(read as u64, Relaxed);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the engine keeps of a request once its head is gone from the buffer.
struct Request {
    framing: Framing,
    is_head: bool,
    keep_alive: bool,
    minor: u8,
    /// `Expect: 100-continue`: answered by the proxy before it reads the body.
    expects_continue: bool,
    /// A request that may go again on a new connection when a pooled one turns out closed.
    retryable: bool,
    upgrade: bool,
    /// Who an edge page for this request is for (a 502 after the exchange began).
    visitor: Visitor,
}

/// The request body on its way to the origin: what of it is still to come from the
/// client, and the bytes read but not yet written.
struct Upload {
    framing: Framing,
    /// `Length`: bytes still to read from the client.
    left: u64,
    scanner: ChunkedScanner,
    /// Data bytes seen (chunked), against `limit`.
    data: u64,
    limit: u64,
    /// Bytes at the start of the client buffer that belong to the body and are not
    /// written yet.
    pending: usize,
    /// Body bytes written to the origin.
    moved: u64,
    done: bool,
    /// The request is HEAD: the response has no body whatever its fields say.
    head_request: bool,
}

impl Upload {
    fn new(framing: Framing, limit: u64) -> Self {
        Upload {
            framing,
            left: match framing {
                Framing::Length(length) => length,
                _ => 0,
            },
            scanner: ChunkedScanner::default(),
            data: 0,
            limit,
            pending: 0,
            moved: 0,
            done: matches!(framing, Framing::None | Framing::Length(0)),
            head_request: false,
        }
    }

    fn finished(&self) -> bool {
        match self.framing {
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.scanner.is_done(),
            Framing::None | Framing::UntilClose => true,
        }
    }

    /// Moves body bytes from the client to the origin until the body is complete or one
    /// side has to wait.
    fn poll<C, O>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        inbuf: &mut Buffer,
        origin: &mut O,
    ) -> Poll<Result<(), ExchangeError>>
    where
        C: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
    {
        loop {
            if self.pending > 0 {
                let chunk = &inbuf.filled()[..self.pending];
                match Pin::new(&mut *origin).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(origin_failed("origin stopped reading".into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        inbuf.consume(n);
                        self.pending -= n;
                        self.moved += n as u64;
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Err(origin_failed(format!(
                            "sending the body failed: {error}"
                        ))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.finished() {
                return match Pin::new(&mut *origin).poll_flush(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                    Poll::Ready(Err(error)) => Poll::Ready(Err(origin_failed(error.to_string()))),
                    Poll::Pending => Poll::Pending,
                };
            }
            let available = inbuf.filled();
            if !available.is_empty() {
                self.pending = match self.framing {
                    Framing::Length(_) => {
                        let take = available
                            .len()
                            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                        self.left -= take as u64;
                        take
                    }
                    _ => {
                        let mut data = 0u64;
                        let used = self
                            .scanner
                            .scan(available, |range| data += range.len() as u64)
                            .map_err(|error| {
                                ExchangeError::Proxy(ProxyError::Client(error.to_string()))
                            });
                        let used = match used {
                            Ok(used) => used,
                            Err(error) => return Poll::Ready(Err(error)),
                        };
                        self.data += data;
                        if self.data > self.limit {
                            return Poll::Ready(Err(ExchangeError::Proxy(
                                ProxyError::BodyTooLarge { limit: self.limit },
                            )));
                        }
                        used
                    }
                };
                continue;
            }
            // Everything received is written: push it out, then wait for more.
            if let Poll::Ready(Err(error)) = Pin::new(&mut *origin).poll_flush(cx) {
                return Poll::Ready(Err(origin_failed(error.to_string())));
            }
            match inbuf.poll_read_from(cx, client) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err(ExchangeError::ClientGone));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The response body on its way to the client: the framing as the origin sent it, and
/// what of the origin buffer is checked and waiting to be written.
struct Download {
    framing: Framing,
    /// `Length`: bytes still to come from the origin.
    left: u64,
    scanner: ChunkedScanner,
    /// Chunked body for an HTTP/1.0 client: only the data goes out (through `out`).
    decode: bool,
    /// Bytes at the start of the origin buffer that belong to the body and are not
    /// written yet.
    pending: usize,
    /// How much of `out` (the head, decoded data) is written.
    out_written: usize,
    /// Body bytes written to the client.
    sent: u64,
    /// The origin's part is complete (what is pending still goes out).
    complete: bool,
}

impl Download {
    fn new(framing: Framing, decode: bool) -> Self {
        Download {
            framing,
            left: match framing {
                Framing::Length(length) => length,
                _ => 0,
            },
            scanner: ChunkedScanner::default(),
            decode,
            pending: 0,
            out_written: 0,
            sent: 0,
            complete: matches!(framing, Framing::None | Framing::Length(0)),
        }
    }

    /// Sorts out what of `origin` belongs to the body: marks it pending (or, decoding,
    /// copies its data to `out`). Sets `complete` at the body's end.
    fn classify(&mut self, out: &mut Vec<u8>, origin: &mut Buffer) -> io::Result<()> {
        let available = &origin.filled()[self.pending..];
        if available.is_empty() || self.complete {
            return Ok(());
        }
        match self.framing {
            Framing::Length(_) => {
                let take = available
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= take as u64;
                self.pending += take;
                self.complete = self.left == 0;
            }
            Framing::UntilClose => self.pending += available.len(),
            Framing::Chunked if self.decode => {
                let used = self
                    .scanner
                    .scan(available, |range| out.extend_from_slice(&available[range]))
                    .map_err(io::Error::other)?;
                origin.consume(used);
                self.complete = self.scanner.is_done();
            }
            Framing::Chunked => {
                let used = self
                    .scanner
                    .scan(available, |_| {})
                    .map_err(io::Error::other)?;
                self.pending += used;
                self.complete = self.scanner.is_done();
            }
            Framing::None => self.complete = true,
        }
        Ok(())
    }

    /// Moves the body bytes that came with the head into `out`, so head and body go out
    /// in one write.
    fn coalesce(&mut self, out: &mut Vec<u8>, origin: &mut Buffer) {
        if self.classify(out, origin).is_err() {
            return; // found again, and reported, by `poll`
        }
        if self.pending > 0 && out.len() + self.pending <= COALESCE {
            out.extend_from_slice(&origin.filled()[..self.pending]);
            origin.consume(self.pending);
            self.sent += self.pending as u64;
            self.pending = 0;
        }
    }

    /// Writes `out`, then the pending body bytes, reading from the origin as needed, until
    /// the body is complete and flushed.
    fn poll<C: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        origin: &mut RawConn,
        client: &mut C,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.out_written < out.len() {
                match Pin::new(&mut *client).poll_write(cx, &out[self.out_written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => self.out_written += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                }
                if self.out_written == out.len() {
                    if self.decode {
                        self.sent += out.len() as u64;
                    }
                    out.clear();
                    self.out_written = 0;
                }
                continue;
            }
            if self.pending > 0 {
                let chunk = &origin.buf.filled()[..self.pending];
                match Pin::new(&mut *client).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        origin.buf.consume(n);
                        self.pending -= n;
                        self.sent += n as u64;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if self.complete {
                return Pin::new(&mut *client).poll_flush(cx);
            }
            if !origin.buf.is_empty() {
                self.classify(out, &mut origin.buf)?;
                if self.pending > 0 || !out.is_empty() || self.complete {
                    continue;
                }
            }
            // Everything received is written: push it out, then wait for the origin.
            if let Poll::Ready(Err(error)) = Pin::new(&mut *client).poll_flush(cx) {
                return Poll::Ready(Err(error));
            }
            match origin.buf.poll_read_from(cx, &mut origin.stream) {
                Poll::Ready(Ok(0)) if self.framing == Framing::UntilClose => {
                    self.complete = true;
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "origin closed in the middle of the body",
                    )));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn origin_failed(reason: String) -> ExchangeError {
    ExchangeError::Proxy(ProxyError::Origin {
        origin: "origin".to_owned(),
        reason,
    })
}

fn set_status(entry: &mut Option<Box<AccessEntry>>, status: StatusCode) {
    if let Some(entry) = entry {
        entry.status = status.as_u16();
    }
}

/// Checks what the origin request needs and writes its head into `out`. `host` is the
/// Host value as sent and without its port. Returns the pool key.
#[allow(clippy::too_many_arguments)]
fn prepare(
    conn: &Conn,
    route: &Route,
    head: &RequestHead,
    buf: &[u8],
    (host_value, host): (&str, &str),
    path: &[u8],
    client: IpAddr,
    out: &mut Vec<u8>,
) -> Result<PoolKey, ProxyError> {
    let origin = route
        .origin
        .as_ref()
        .ok_or_else(|| ProxyError::NoOrigin(host.to_owned()))?;
    let limit = conn.service.options.max_request_body;
    if let Framing::Length(length) = head.framing
        && length > limit
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let key = pool_key(origin, host)?;
    out.clear();
    // The connection's own text unless a trusted proxy named another client.
    let client_text;
    let client_ip = if client == conn.peer.ip().to_canonical() {
        conn.peer_ip.as_bytes()
    } else {
        client_text = client.to_string();
        client_text.as_bytes()
    };
    head::write_origin_request(
        out,
        buf,
        head,
        &Forwarding {
            host: host_value.as_bytes(),
            path: if path.is_empty() { b"/" } else { path },
            client_ip,
            scheme: conn.listener.scheme(),
            upgrade: head.upgrade(buf),
        },
    );
    Ok(key)
}

/// Writes `bytes` and flushes (TLS records go out on flush).
async fn write_all_flush<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Writes and flushes `bytes` to a peer that must take them within `limit` (a client
/// that stopped reading). The timer is armed only when the socket does not take them at
/// once.
async fn write_all_within<W: AsyncWrite + Unpin>(
    io: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> io::Result<()> {
    let mut rest = bytes;
    let done = poll_fn(|cx| {
        while !rest.is_empty() {
            match Pin::new(&mut *io).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => rest = &rest[n..],
                Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(error))),
                Poll::Pending => return Poll::Ready(None),
            }
        }
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await;
    match done {
        Some(result) => result,
        None => tokio::time::timeout(limit, write_all_flush(io, rest))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading"))?,
    }
}
