//! Entry points for the fuzz targets in `fuzz/`, re-exported as `defenra_http::fuzzing`.
//! Not a stable API: hidden from the docs, and free to change with the code they wrap.
//! Each function runs the engine's real parser or writer on bytes a fuzzer chose and
//! returns what the engine would act on, copied out of the buffer.

use std::ops::Range;

use super::chunked;
use super::head::{self, ClientFraming, Forwarding, Framing, RequestHead, ResponseHead};

/// How a message body is delimited (the engine's framing decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The outcome of parsing a head at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// More bytes are needed.
    Partial,
    /// The head is refused; the peer would get this status (or, for an origin's response,
    /// the client a 502).
    Refused {
        status: u16,
        reason: String,
    },
    Complete(T),
}

/// A request head as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub host: Option<Vec<u8>>,
    pub upgrade: Option<Vec<u8>>,
    /// Header fields, as the WAF gets them.
    pub fields: Vec<(String, Vec<u8>)>,
    /// The head the engine would send to an origin for this request, with the target as
    /// the path, the `Host` value (or `fuzz.example`) as the host, client `192.0.2.1`.
    pub origin_head: Vec<u8>,
}

/// Parses a request head at the start of `buf` with the engine's parser and, when it is
/// complete and accepted, writes the origin request head for it.
pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let mut head = RequestHead::default();
    match head.parse(buf) {
        Ok(false) => Parsed::Partial,
        Err(error) => Parsed::Refused {
            status: error.status().as_u16(),
            reason: error.to_string(),
        },
        Ok(true) => {
            let host = head.host(buf);
            let upgrade = head.upgrade(buf);
            let target = head.target.get(buf);
            let mut origin_head = Vec::new();
            head::write_origin_request(
                &mut origin_head,
                buf,
                &head,
                &Forwarding {
                    host: host.unwrap_or(b"fuzz.example"),
                    path: if target.is_empty() { b"/" } else { target },
                    client_ip: b"192.0.2.1",
                    scheme: "http",
                    upgrade,
                },
            );
            Parsed::Complete(Request {
                len: head.len,
                method: head.method.get(buf).to_vec(),
                target: target.to_vec(),
                minor: head.minor,
                framing: framing(head.framing),
                keep_alive: head.keep_alive(),
                host: host.map(<[u8]>::to_vec),
                upgrade: upgrade.map(<[u8]>::to_vec),
                fields: head
                    .pairs(buf)
                    .map(|(name, value)| (name.to_owned(), value.to_vec()))
                    .collect(),
                origin_head,
            })
        }
    }
}

/// A response head from an origin as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub len: usize,
    pub status: u16,
    pub minor: u8,
    pub framing: BodyFraming,
    /// Whether the origin connection could carry another request.
    pub reusable: bool,
    /// The head the engine would send to the client, for a client request of HTTP/1.`minor`
    /// that asked to keep the connection when `keep_alive` (as the engine frames it: chunked
    /// passed through to HTTP/1.1, closed after the body otherwise).
    pub client_head: Vec<u8>,
}

/// Parses an origin's response head at the start of `buf` (`head_request`: the request
/// was HEAD) and, when it is complete and accepted, writes the head the client would get,
/// for a client speaking HTTP/1.`client_minor`.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    client_minor: u8,
    keep_alive: bool,
) -> Parsed<Response> {
    let mut head = ResponseHead::default();
    match head.parse(buf, head_request) {
        Ok(false) => Parsed::Partial,
        Err(error) => Parsed::Refused {
            status: error.status().as_u16(),
            reason: error.to_string(),
        },
        Ok(true) => {
            let mut client_head = Vec::new();
            if head.is_informational() {
                head::write_informational(&mut client_head, buf, &head);
            } else {
                // The same choice as `Session::exchange` (h1/mod.rs) makes.
                let (chunked, close) = match head.framing {
                    Framing::None | Framing::Length(_) => (false, !keep_alive),
                    Framing::Chunked if client_minor == 1 => (true, !keep_alive),
                    Framing::Chunked | Framing::UntilClose => (false, true),
                };
                let upgrade = (head.status == 101)
                    .then_some(head.fields.upgrade)
                    .flatten();
                head::write_client_response(
                    &mut client_head,
                    buf,
                    &head,
                    None,
                    ClientFraming {
                        chunked,
                        close,
                        keep_alive_10: keep_alive && client_minor == 0 && !close,
                        upgrade,
                    },
                );
            }
            Parsed::Complete(Response {
                len: head.len,
                status: head.status,
                minor: head.minor,
                framing: framing(head.framing),
                reusable: head.reusable(),
                client_head,
            })
        }
    }
}

/// The engine's chunked-body scanner (RFC 9112 §7.1).
#[derive(Debug, Clone, Default)]
pub struct ChunkedScanner(chunked::ChunkedScanner);

impl ChunkedScanner {
    /// Scans the next bytes of a body; see the engine's `ChunkedScanner::scan`. Returns how
    /// many bytes of `input` belong to the body; `on_data` gets the ranges of data bytes.
    ///
    /// # Errors
    ///
    /// Why the body is malformed (the client would get 400).
    pub fn scan(
        &mut self,
        input: &[u8],
        on_data: impl FnMut(Range<usize>),
    ) -> Result<usize, String> {
        self.0
            .scan(input, on_data)
            .map_err(|error| error.to_string())
    }

    /// Whether the body's final CRLF has been scanned.
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }
}

fn framing(framing: Framing) -> BodyFraming {
    match framing {
        Framing::None => BodyFraming::None,
        Framing::Length(length) => BodyFraming::Length(length),
        Framing::Chunked => BodyFraming::Chunked,
        Framing::UntilClose => BodyFraming::UntilClose,
    }
}
