//! Message heads of the HTTP/1 engine: parsing (with `httparse`) into byte spans of the
//! read buffer, the framing and connection rules of RFC 9112, and writing the heads the
//! proxy sends on, header by header, without building a header map.

use std::ops::Range;

use http::{HeaderMap, StatusCode};

use super::chunked::ChunkError;

/// Most header fields in one head; more is answered like a head that is too large.
pub(crate) const MAX_HEADERS: usize = 100;

/// Byte range in the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub(crate) fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    pub(crate) fn get(self, buf: &[u8]) -> &[u8] {
        &buf[self.range()]
    }
}

/// What the proxy does with a header field, decided from its name once at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Passed on as it is (unless `Connection` names it).
    Plain,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    /// `Keep-Alive`, `TE`, `Trailer`, `Proxy-*`: hop-by-hop, never passed on.
    HopByHop,
    XForwardedFor,
    /// `Expect`: the proxy answers `100-continue` itself (it reads the start of a body
    /// before the origin sees the request), so the origin never gets it.
    Expect,
    /// `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host`: set by the proxy on requests.
    Forwarding,
    Date,
}

fn kind_of(name: &[u8]) -> Kind {
    let is = |other: &str| name.eq_ignore_ascii_case(other.as_bytes());
    match name.len() {
        2 if is("te") => Kind::HopByHop,
        4 if is("host") => Kind::Host,
        4 if is("date") => Kind::Date,
        6 if is("expect") => Kind::Expect,
        7 if is("upgrade") => Kind::Upgrade,
        7 if is("trailer") => Kind::HopByHop,
        9 if is("x-real-ip") => Kind::Forwarding,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::HopByHop,
        14 if is("content-length") => Kind::ContentLength,
        // RFC 9113 §3.1 / RFC 7540 §3.2.1: connection-specific, for an h2c upgrade.
        14 if is("http2-settings") => Kind::HopByHop,
        15 if is("x-forwarded-for") => Kind::XForwardedFor,
        16 if is("x-forwarded-host") => Kind::Forwarding,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        17 if is("x-forwarded-proto") => Kind::Forwarding,
        len if len >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-") => Kind::HopByHop,
        _ => Kind::Plain,
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub(crate) name: Span,
    pub(crate) value: Span,
    pub(crate) kind: Kind,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Framing {
    /// No body (a request without length; HEAD, 1xx, 204 and 304 responses).
    #[default]
    None,
    /// `Content-Length` (possibly 0).
    Length(u64),
    Chunked,
    /// A response that ends when the origin closes the connection.
    UntilClose,
}

/// Why a head cannot be used. Each maps to the status the peer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("head too large")]
    TooLarge,
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("transfer coding not supported")]
    Coding,
    #[error("malformed chunked body: {0}")]
    Chunked(#[from] ChunkError),
}

impl HeadError {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Coding => StatusCode::NOT_IMPLEMENTED,
            HeadError::Malformed(_) | HeadError::Chunked(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The fields and `Connection` facts shared by request and response heads.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    pub(crate) list: Vec<Field>,
    /// Names listed in `Connection` other than close/keep-alive/upgrade: hop-by-hop too.
    listed: Vec<Span>,
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) connection_upgrade: bool,
    pub(crate) upgrade: Option<Span>,
    pub(crate) has_date: bool,
    /// `Expect: 100-continue` (RFC 9110 §10.1.1).
    pub(crate) expect_continue: bool,
    content_length: Option<Result<u64, ()>>,
    transfer_encoding: Option<Result<(), ()>>,
    transfer_encoding_count: u8,
}

impl Fields {
    fn fill(&mut self, base: &[u8], headers: &[httparse::Header<'_>]) {
        self.list.clear();
        self.listed.clear();
        self.close = false;
        self.keep_alive = false;
        self.connection_upgrade = false;
        self.upgrade = None;
        self.has_date = false;
        self.expect_continue = false;
        self.content_length = None;
        self.transfer_encoding = None;
        self.transfer_encoding_count = 0;
        for header in headers {
            let name = Span::of(base, header.name.as_bytes());
            let value = Span::of(base, header.value);
            let kind = kind_of(header.name.as_bytes());
            match kind {
                Kind::Connection => self.connection_tokens(base, header.value),
                Kind::Upgrade => self.upgrade = Some(value),
                Kind::ContentLength => self.content_length(header.value),
                Kind::TransferEncoding => self.transfer_encoding(header.value),
                Kind::Date => self.has_date = true,
                Kind::Expect => {
                    self.expect_continue = header.value.eq_ignore_ascii_case(b"100-continue");
                }
                _ => {}
            }
            self.list.push(Field { name, value, kind });
        }
    }

    fn connection_tokens(&mut self, base: &[u8], value: &[u8]) {
        for token in value.split(|&byte| byte == b',') {
            let token = token.trim_ascii();
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.connection_upgrade = true;
            } else if self.listed.len() < 16 {
                self.listed.push(Span::of(base, token));
            }
        }
    }

    /// Every `Content-Length` value (and every element of a list) must be the same number.
    fn content_length(&mut self, value: &[u8]) {
        let mut parsed = self.content_length.unwrap_or(Ok(u64::MAX));
        for part in value.split(|&byte| byte == b',') {
            let part = part.trim_ascii();
            let number = parse_length(part).ok_or(());
            parsed = match (parsed, number) {
                (Ok(u64::MAX), Ok(number)) => Ok(number),
                (Ok(seen), Ok(number)) if seen == number => Ok(seen),
                _ => Err(()),
            };
        }
        self.content_length = Some(parsed);
    }

    /// Only `chunked`, once, is understood.
    fn transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encoding_count = self.transfer_encoding_count.saturating_add(1);
        let only_chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        self.transfer_encoding = Some(if only_chunked && self.transfer_encoding_count == 1 {
            Ok(())
        } else {
            Err(())
        });
    }

    /// Whether `Connection` lists this field's name (then it is hop-by-hop).
    fn is_listed(&self, base: &[u8], name: Span) -> bool {
        !self.listed.is_empty()
            && self
                .listed
                .iter()
                .any(|listed| listed.get(base).eq_ignore_ascii_case(name.get(base)))
    }

    /// The first field of `kind`.
    fn first(&self, kind: Kind) -> Option<&Field> {
        self.list.iter().find(|field| field.kind == kind)
    }
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, digit| {
        n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

fn map_parse_error(error: httparse::Error) -> HeadError {
    match error {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        httparse::Error::Version => HeadError::Malformed("unsupported HTTP version"),
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::Token => HeadError::Malformed("invalid method"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
    }
}

/// A parsed request head; spans point into the buffer it was parsed from.
#[derive(Debug, Default)]
pub(crate) struct RequestHead {
    /// Bytes of the head, final CRLF included.
    pub(crate) len: usize,
    pub(crate) method: Span,
    pub(crate) target: Span,
    /// The authority of an absolute-form target (`http://host/path`), which routes the
    /// request instead of `Host` (RFC 9112 §3.2.2).
    pub(crate) authority: Option<Span>,
    /// The target in origin-form (`/path?query`, or `*`): what the origin and the WAF get.
    /// Empty for an absolute-form target without a path (sent as `/`).
    pub(crate) path: Span,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) minor: u8,
    pub(crate) fields: Fields,
    pub(crate) framing: Framing,
}

impl RequestHead {
    /// Parses a request head at the start of `buf`: `Ok(false)` when it is not complete.
    pub(crate) fn parse(&mut self, buf: &[u8]) -> Result<bool, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(error) => return Err(map_parse_error(error)),
        };
        let (Some(method), Some(target), Some(minor)) =
            (request.method, request.path, request.version)
        else {
            return Err(HeadError::Malformed("incomplete request line"));
        };
        self.len = len;
        self.method = Span::of(buf, method.as_bytes());
        self.target = Span::of(buf, target.as_bytes());
        let (authority, path) = request_target(method.as_bytes(), target.as_bytes())?;
        self.authority = authority.map(|authority| Span::of(buf, authority));
        self.path = Span::of(buf, path);
        self.minor = minor;
        self.fields.fill(buf, request.headers);
        self.framing = self.request_framing()?;
        if self
            .fields
            .list
            .iter()
            .filter(|field| field.kind == Kind::Host)
            .nth(1)
            .is_some()
        {
            return Err(HeadError::Malformed("more than one Host"));
        }
        Ok(true)
    }

    /// RFC 9112 §6.3 for requests: chunked, a length, or no body. Both at once, or a
    /// transfer coding on HTTP/1.0, is refused (request smuggling).
    fn request_framing(&self) -> Result<Framing, HeadError> {
        let fields = &self.fields;
        match (fields.transfer_encoding, fields.content_length) {
            (Some(_), Some(_)) => Err(HeadError::Malformed(
                "both Transfer-Encoding and Content-Length",
            )),
            (Some(_), None) if self.minor == 0 => {
                Err(HeadError::Malformed("Transfer-Encoding in HTTP/1.0"))
            }
            (Some(Ok(())), None) => Ok(Framing::Chunked),
            (Some(Err(())), None) => Err(HeadError::Coding),
            (None, Some(Ok(length))) => Ok(Framing::Length(length)),
            (None, Some(Err(()))) => Err(HeadError::Malformed("invalid Content-Length")),
            (None, None) => Ok(Framing::None),
        }
    }

    /// Whether the client wants the connection kept after this exchange.
    pub(crate) fn keep_alive(&self) -> bool {
        !self.fields.close && (self.minor == 1 || self.fields.keep_alive)
    }

    /// The `Host` field's value.
    pub(crate) fn host<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        self.fields
            .first(Kind::Host)
            .map(|field| field.value.get(buf))
    }

    /// Whether this is an HTTP/1.1 upgrade request (`Connection: upgrade` and `Upgrade`).
    /// An upgrade to `h2c` is not one: the proxy never speaks HTTP/2 to origins, and an
    /// origin that switched would get this hop's connection (RFC 9113 §3.1 removed the
    /// upgrade); the request goes on as plain HTTP/1.1, its `Upgrade` dropped like every
    /// hop-by-hop field (nginx never passes `Upgrade` on unless told to).
    pub(crate) fn upgrade<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        if self.minor == 1 && self.fields.connection_upgrade {
            self.fields
                .upgrade
                .map(|span| span.get(buf))
                .filter(|protocols| {
                    !protocols
                        .split(|&byte| byte == b',')
                        .any(|protocol| protocol.trim_ascii().eq_ignore_ascii_case(b"h2c"))
                })
        } else {
            None
        }
    }

    /// The fields as [`crate::proxy::Fields`] for routing, over `buf`.
    pub(crate) fn fields<'a>(&'a self, buf: &'a [u8]) -> HeadFields<'a> {
        HeadFields { head: self, buf }
    }

    /// The fields as `(name, value)` pairs in arrival order, for the WAF. Names are
    /// tokens (`httparse` checked), so ASCII.
    pub(crate) fn pairs<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        self.fields.list.iter().map(move |field| {
            (
                std::str::from_utf8(field.name.get(buf)).unwrap_or(""),
                field.value.get(buf),
            )
        })
    }
}

/// Checks a request target and splits it into the authority of an absolute-form target
/// (if any) and the origin-form path and query. Accepted (RFC 9112 §3.2): origin-form,
/// `http`/`https` absolute-form, `*` for OPTIONS; CONNECT's authority-form passes here and
/// is refused with 405 by routing. Anything else (another scheme, a bare authority) is
/// malformed, as is a fragment (`#`, never sent by clients, RFC 9112 §3.2) or an encoded
/// NUL in the path (nginx answers both with 400): either would show the WAF a path other
/// than the one the origin acts on. Raw control bytes never get here (`httparse`).
fn request_target<'a>(
    method: &[u8],
    target: &'a [u8],
) -> Result<(Option<&'a [u8]>, &'a [u8]), HeadError> {
    let (authority, path) = if target.first() == Some(&b'/') {
        (None, target)
    } else if (target == b"*" && method == b"OPTIONS") || method == b"CONNECT" {
        return Ok((None, target));
    } else {
        let rest = if target.len() >= 7 && target[..7].eq_ignore_ascii_case(b"http://") {
            &target[7..]
        } else if target.len() >= 8 && target[..8].eq_ignore_ascii_case(b"https://") {
            &target[8..]
        } else {
            return Err(HeadError::Malformed(
                "request target is not origin or http(s) form",
            ));
        };
        let end = rest
            .iter()
            .position(|&byte| matches!(byte, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        // User-info is no part of the host (RFC 9110 §4.2.4 deprecates it).
        let authority = match authority.iter().rposition(|&byte| byte == b'@') {
            Some(at) => &authority[at + 1..],
            None => authority,
        };
        (Some(authority), path)
    };
    if target.contains(&b'#') {
        return Err(HeadError::Malformed("fragment in the request target"));
    }
    if encoded_nul_in_path(path) {
        return Err(HeadError::Malformed("encoded NUL in the request path"));
    }
    Ok((authority, path))
}

/// Whether the path of `target` (the part before `?`) holds `%00`, which nginx refuses
/// with 400 (a NUL in a decoded path cuts it short for some origins). The query is the
/// application's business and passes.
pub(crate) fn encoded_nul_in_path(target: &[u8]) -> bool {
    let mut rest = target;
    while let Some(at) = rest.iter().position(|&byte| byte == b'%' || byte == b'?') {
        if rest[at] == b'?' {
            return false;
        }
        rest = &rest[at + 1..];
        if rest.starts_with(b"00") {
            return true;
        }
    }
    false
}

/// A request head's fields over the buffer it was parsed from.
#[derive(Clone, Copy)]
pub(crate) struct HeadFields<'a> {
    head: &'a RequestHead,
    buf: &'a [u8],
}

impl<'a> crate::proxy::Fields<'a> for HeadFields<'a> {
    fn all(self, name: &'static str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let buf = self.buf;
        self.head
            .fields
            .list
            .iter()
            .filter(move |field| field.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(move |field| field.value.get(buf))
    }

    fn last(self, name: &str) -> Option<&'a [u8]> {
        let buf = self.buf;
        self.head
            .fields
            .list
            .iter()
            .rev()
            .find(|field| field.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|field| field.value.get(buf))
    }
}

/// What goes into the request head sent to the origin besides the client's fields.
pub(crate) struct Forwarding<'a> {
    /// `Host` (and `X-Forwarded-Host`).
    pub(crate) host: &'a [u8],
    /// Origin-form target.
    pub(crate) path: &'a [u8],
    pub(crate) client_ip: &'a [u8],
    pub(crate) scheme: &'static str,
    /// The `Upgrade` protocol of an upgrade request.
    pub(crate) upgrade: Option<&'a [u8]>,
}

/// Writes the origin request: the client's method and fields (hop-by-hop ones and the
/// forwarding ones the proxy sets removed, repeated ones kept in order), `Host`, the
/// forwarding headers and the body's framing.
pub(crate) fn write_origin_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    forwarding: &Forwarding<'_>,
) {
    let fields = &head.fields;
    out.extend_from_slice(head.method.get(buf));
    out.push(b' ');
    if forwarding.path.first() == Some(&b'?') {
        out.push(b'/');
    }
    out.extend_from_slice(forwarding.path);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(forwarding.host);
    out.extend_from_slice(b"\r\n");
    let mut forwarded_for = false;
    for field in &fields.list {
        match field.kind {
            Kind::Plain | Kind::Date if !fields.is_listed(buf, field.name) => {
                push_field(out, field.name.get(buf), field.value.get(buf));
            }
            Kind::XForwardedFor => forwarded_for = true,
            _ => {}
        }
    }
    // The client's chain, every value in order, then the client.
    let mut chain = false;
    if forwarded_for {
        for field in &fields.list {
            let value = field.value.get(buf).trim_ascii();
            if field.kind == Kind::XForwardedFor && !value.is_empty() {
                out.extend_from_slice(if chain {
                    b", ".as_slice()
                } else {
                    b"X-Forwarded-For: ".as_slice()
                });
                out.extend_from_slice(value);
                chain = true;
            }
        }
    }
    out.extend_from_slice(if chain {
        b", ".as_slice()
    } else {
        b"X-Forwarded-For: ".as_slice()
    });
    out.extend_from_slice(forwarding.client_ip);
    out.extend_from_slice(b"\r\nX-Real-IP: ");
    out.extend_from_slice(forwarding.client_ip);
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(forwarding.scheme.as_bytes());
    out.extend_from_slice(b"\r\nX-Forwarded-Host: ");
    out.extend_from_slice(forwarding.host);
    out.extend_from_slice(b"\r\n");
    match head.framing {
        Framing::Length(length) => push_length(out, length),
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None | Framing::UntilClose => {}
    }
    if let Some(protocol) = forwarding.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        out.extend_from_slice(protocol);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head from an origin.
#[derive(Debug, Default)]
pub(crate) struct ResponseHead {
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) reason: Span,
    pub(crate) minor: u8,
    pub(crate) fields: Fields,
    pub(crate) framing: Framing,
}

impl ResponseHead {
    /// Parses a response head at the start of `buf`; `head_request` says the request was
    /// HEAD (no body follows whatever the fields say). `Ok(false)`: not complete yet.
    pub(crate) fn parse(&mut self, buf: &[u8], head_request: bool) -> Result<bool, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(error) => return Err(map_parse_error(error)),
        };
        let (Some(status), Some(minor)) = (response.code, response.version) else {
            return Err(HeadError::Malformed("incomplete status line"));
        };
        // httparse takes any three digits; RFC 9110 §15 codes start at 100 (a `099` would
        // be framed like a 1xx and written back as a two-digit status).
        if status < 100 {
            return Err(HeadError::Malformed("status code below 100"));
        }
        self.len = len;
        self.status = status;
        // httparse hands back a static "" (not a slice of `buf`) for a status line without
        // a reason and for a reason with obs-text: either way there is none to pass on.
        self.reason = match response.reason {
            Some(reason) if !reason.is_empty() => Span::of(buf, reason.as_bytes()),
            _ => Span::default(),
        };
        self.minor = minor;
        self.fields.fill(buf, response.headers);
        self.framing = self.response_framing(head_request)?;
        Ok(true)
    }

    /// RFC 9112 §6.3 for responses.
    fn response_framing(&self, head_request: bool) -> Result<Framing, HeadError> {
        if head_request || self.status < 200 || self.status == 204 || self.status == 304 {
            return Ok(Framing::None);
        }
        let fields = &self.fields;
        match (fields.transfer_encoding, fields.content_length) {
            (Some(Ok(())), _) if self.minor == 1 => Ok(Framing::Chunked),
            (Some(_), _) => Ok(Framing::UntilClose),
            (None, Some(Ok(length))) => Ok(Framing::Length(length)),
            (None, Some(Err(()))) => Err(HeadError::Malformed("invalid Content-Length")),
            (None, None) => Ok(Framing::UntilClose),
        }
    }

    /// Whether the origin connection can carry another request after this response.
    pub(crate) fn reusable(&self) -> bool {
        let fields = &self.fields;
        !fields.close
            && (self.minor == 1 || fields.keep_alive)
            && self.framing != Framing::UntilClose
            // Both framings at once: the length is ignored, but trust ends here.
            && !(fields.transfer_encoding.is_some() && fields.content_length.is_some())
    }

    pub(crate) fn is_informational(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// How the response to the client is framed and whether the connection stays open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientFraming {
    /// Pass the origin's chunked body through as it is (HTTP/1.1 clients).
    pub(crate) chunked: bool,
    /// `Connection: close` and close after the body.
    pub(crate) close: bool,
    /// An HTTP/1.0 client asked for keep-alive: say so.
    pub(crate) keep_alive_10: bool,
    /// `Connection: upgrade` plus this `Upgrade` protocol (a 101).
    pub(crate) upgrade: Option<Span>,
}

/// Writes the head the client gets for an origin response: the origin's status line and
/// fields without the hop-by-hop ones, the WAF's extra fields, the framing and
/// `Connection` fields of this hop, and `Date` when the origin sent none.
pub(crate) fn write_client_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    extra: Option<&HeaderMap>,
    framing: ClientFraming,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, head.status);
    out.push(b' ');
    let reason = head.reason.get(buf);
    if reason.is_empty() {
        let reason = StatusCode::from_u16(head.status)
            .ok()
            .and_then(|status| status.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(reason.as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
    let fields = &head.fields;
    let drop_length = fields.transfer_encoding.is_some();
    for field in &fields.list {
        let keep = match field.kind {
            Kind::ContentLength => !drop_length,
            Kind::TransferEncoding | Kind::Connection | Kind::Upgrade | Kind::HopByHop => false,
            _ => true,
        };
        if keep && !fields.is_listed(buf, field.name) {
            push_field(out, field.name.get(buf), field.value.get(buf));
        }
    }
    if let Some(extra) = extra {
        push_map(out, extra);
    }
    finish_client_head(out, framing, buf, !fields.has_date);
}

fn finish_client_head(out: &mut Vec<u8>, framing: ClientFraming, buf: &[u8], date: bool) {
    if framing.chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if let Some(protocol) = framing.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
        out.extend_from_slice(protocol.get(buf));
        out.extend_from_slice(b"\r\n");
    } else if framing.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if framing.keep_alive_10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    if date {
        super::date::push(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head of a response the proxy makes itself (error pages, redirects, ACME
/// answers, WAF blocks): the fields of `headers`, `Content-Length`, `Date`, `Connection`.
pub(crate) fn write_local_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body_len: usize,
    close: bool,
    keep_alive_10: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status.as_u16());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    push_map(out, headers);
    if !headers.contains_key(http::header::CONTENT_LENGTH) {
        push_length(out, body_len as u64);
    }
    let framing = ClientFraming {
        chunked: false,
        close,
        keep_alive_10,
        upgrade: None,
    };
    finish_client_head(out, framing, &[], !headers.contains_key(http::header::DATE));
}

/// Writes an informational (1xx) response from the origin on to the client.
pub(crate) fn write_informational(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, head.status);
    out.push(b' ');
    out.extend_from_slice(head.reason.get(buf));
    out.extend_from_slice(b"\r\n");
    let fields = &head.fields;
    for field in &fields.list {
        let hop = matches!(
            field.kind,
            Kind::TransferEncoding | Kind::Connection | Kind::Upgrade | Kind::HopByHop
        );
        if !hop && !fields.is_listed(buf, field.name) {
            push_field(out, field.name.get(buf), field.value.get(buf));
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn push_map(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_length(out: &mut Vec<u8>, length: u64) {
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_status(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<RequestHead, HeadError> {
        let mut head = RequestHead::default();
        assert!(head.parse(text.as_bytes())?, "incomplete: {text:?}");
        Ok(head)
    }

    fn forwarded(text: &str, client_ip: &str) -> String {
        let head = request(text).unwrap();
        let buf = text.as_bytes();
        let mut out = Vec::new();
        let host = head.host(buf).unwrap();
        write_origin_request(
            &mut out,
            buf,
            &head,
            &Forwarding {
                host,
                path: head.target.get(buf),
                client_ip: client_ip.as_bytes(),
                scheme: "http",
                upgrade: head.upgrade(buf),
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn origin_request_keeps_fields_in_order_and_sets_the_forwarding_ones() {
        let text = "POST /a?b=1 HTTP/1.1\r\nhost: Example.com\r\nX-One: 1\r\nConnection: keep-alive, X-Secret\r\n\
                    X-Secret: s\r\nKeep-Alive: 5\r\nProxy-Authorization: x\r\nTE: trailers\r\n\
                    X-Forwarded-For: 1.1.1.1\r\nX-Real-IP: 9.9.9.9\r\nX-One: 2\r\nx-forwarded-for: 2.2.2.2\r\n\
                    Content-Length: 3\r\n\r\n";
        assert_eq!(
            forwarded(text, "10.0.0.1"),
            "POST /a?b=1 HTTP/1.1\r\nHost: Example.com\r\nX-One: 1\r\nX-One: 2\r\n\
             X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: Example.com\r\nContent-Length: 3\r\n\r\n"
        );
    }

    #[test]
    fn upgrade_requests_keep_their_protocol() {
        let text =
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let out = forwarded(text, "::1");
        assert!(
            out.ends_with(
                "X-Forwarded-Host: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn request_framing_follows_rfc_9112_and_refuses_smuggling() {
        let framing = |text: &str| request(text).map(|head| head.framing);
        assert_eq!(
            framing("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert_eq!(
                request(bad).map(|_| ()).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad:?}"
            );
        }
        for unsupported in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(request(unsupported).unwrap_err(), HeadError::Coding);
        }
    }

    #[test]
    fn targets_split_into_authority_and_path_and_odd_forms_are_refused() {
        let split = |method: &str, target: &str| {
            let text = format!("{method} {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            request(&text).map(|head| {
                let buf = text.as_bytes();
                let authority = head.authority.map(|span| span.get(buf).to_vec());
                (authority, head.path.get(buf).to_vec())
            })
        };
        let ok = |authority: Option<&str>, path: &str| {
            Ok((
                authority.map(|a| a.as_bytes().to_vec()),
                path.as_bytes().to_vec(),
            ))
        };
        assert_eq!(split("GET", "/a?b"), ok(None, "/a?b"));
        assert_eq!(
            split("GET", "http://Example.com:8080/x?y"),
            ok(Some("Example.com:8080"), "/x?y")
        );
        assert_eq!(
            split("GET", "https://user@example.com"),
            ok(Some("example.com"), "")
        );
        assert_eq!(
            split("GET", "http://example.com?q"),
            ok(Some("example.com"), "?q")
        );
        assert_eq!(split("OPTIONS", "*"), ok(None, "*"));
        assert_eq!(
            split("CONNECT", "example.com:443"),
            ok(None, "example.com:443")
        );
        assert_eq!(split("GET", "/a?b=%00"), ok(None, "/a?b=%00"));
        for bad in [
            "*",
            "example.com/admin",
            "ftp://example.com/admin",
            "/admin#x",
            "http://example.com/admin#x",
            "http://example.com#x",
            "/admin%00",
            "/a%00b?c",
        ] {
            assert!(
                matches!(split("GET", bad), Err(HeadError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn keep_alive_depends_on_version_and_connection() {
        assert!(request("GET / HTTP/1.1\r\n\r\n").unwrap().keep_alive());
        assert!(
            !request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive()
        );
        assert!(!request("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive());
        assert!(
            request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .keep_alive()
        );
    }

    #[test]
    fn too_many_fields_is_too_large_and_partial_heads_wait() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            text.push_str(&format!("X-{i}: v\r\n"));
        }
        text.push_str("\r\n");
        assert_eq!(request(&text).unwrap_err(), HeadError::TooLarge);
        let mut head = RequestHead::default();
        assert_eq!(head.parse(b"GET / HTTP/1.1\r\nHost: a"), Ok(false));
    }

    fn response(text: &str, head_request: bool) -> ResponseHead {
        let mut head = ResponseHead::default();
        assert!(head.parse(text.as_bytes(), head_request).unwrap());
        head
    }

    #[test]
    fn response_framing_and_reuse() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
                false,
                Framing::Length(4),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                Framing::None,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Framing::None,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                true,
                Framing::None,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
                false,
                Framing::Length(4),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n",
                false,
                Framing::Length(4),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\n",
                false,
                Framing::Length(4),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                false,
                Framing::Chunked,
                false,
            ),
        ];
        for (text, head_request, framing, reusable) in cases {
            let head = response(text, head_request);
            assert_eq!(head.framing, framing, "{text:?}");
            assert_eq!(head.reusable(), reusable, "{text:?}");
        }
    }

    #[test]
    fn client_response_strips_hop_by_hop_fields_and_adds_this_hops() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                    Transfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n";
        let head = response(text, false);
        let mut extra = HeaderMap::new();
        extra.insert("x-waf", http::HeaderValue::from_static("yes"));
        let mut out = Vec::new();
        write_client_response(
            &mut out,
            text.as_bytes(),
            &head,
            Some(&extra),
            ClientFraming {
                chunked: true,
                close: false,
                keep_alive_10: false,
                upgrade: None,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\
             x-waf: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn local_responses_carry_length_date_and_connection() {
        let mut out = Vec::new();
        write_local_response(
            &mut out,
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            14,
            true,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 404 Not Found\r\nContent-Length: 14\r\nConnection: close\r\nDate: "
            ),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    }

    proptest::proptest! {
        /// Random bytes, and random bytes after a valid request line, never panic the
        /// parsers, and every span of a parsed head lies inside the head.
        #[test]
        fn random_heads_never_panic(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            prefixed in proptest::bool::ANY,
        ) {
            let mut input = if prefixed { b"GET / HTTP/1.1\r\n".to_vec() } else { Vec::new() };
            input.extend_from_slice(&noise);
            let mut head = RequestHead::default();
            if let Ok(true) = head.parse(&input) {
                proptest::prop_assert!(head.len <= input.len());
                for field in &head.fields.list {
                    proptest::prop_assert!(field.value.range().end <= head.len);
                }
                let mut out = Vec::new();
                write_origin_request(&mut out, &input, &head, &Forwarding {
                    host: b"h", path: b"/", client_ip: b"1.2.3.4", scheme: "http", upgrade: head.upgrade(&input),
                });
            }
            let mut response = ResponseHead::default();
            let _ = response.parse(&input, false);
        }
    }
}
