//! HTTP/1 targets: the request head parser with the origin head it leads to
//! (`h1_request`), the origin response head parser with the client head it leads to
//! (`h1_response`), and the chunked body scanner (`h1_chunked`).
//!
//! Checks, beyond not panicking:
//! - a refused head maps to 400, 431 or 501; a complete head is the same when the bytes
//!   after it are cut off;
//! - the head the proxy writes for the next hop parses again with the same method, host,
//!   upgrade and body framing, and as a complete head of exactly its own length: whatever
//!   the client sent (duplicate or conflicting lengths, `Transfer-Encoding` variants, bare
//!   LF, fields named in `Connection`), the origin and the client never read a different
//!   message boundary than the proxy did (request smuggling, response splitting);
//! - the chunked scanner gives the same result (body length, data bytes, error, end)
//!   whether the body arrives whole, a byte at a time, or in pieces of random sizes.

use defenra_http::fuzzing::{self, BodyFraming, ChunkedScanner, Parsed};

use crate::{Input, Rng};

/// Heads past this many fields may legitimately grow over the 100-field limit when the
/// proxy adds its own (at most eight).
const FIELDS_WITH_ROOM: usize = 92;

/// Target `h1_request`: `data` is what a client sent on a connection.
pub fn request(data: &[u8]) {
    let request = match fuzzing::parse_request(data) {
        Parsed::Partial => return,
        Parsed::Refused { status, reason } => {
            assert!(
                matches!(status, 400 | 431 | 501),
                "refused with {status} ({reason})"
            );
            return;
        }
        Parsed::Complete(request) => request,
    };
    assert!(request.len <= data.len());
    assert_eq!(
        fuzzing::parse_request(&data[..request.len]),
        Parsed::Complete(request.clone()),
        "the head depends on bytes after it"
    );
    assert!(
        matches!(request.minor, 0 | 1),
        "HTTP/1.{} accepted",
        request.minor
    );

    let origin = match fuzzing::parse_request(&request.origin_head) {
        Parsed::Complete(origin) => origin,
        Parsed::Refused { status: 431, .. } if request.fields.len() > FIELDS_WITH_ROOM => return,
        other => panic!(
            "the origin head does not parse: {other:?}\n{}",
            String::from_utf8_lossy(&request.origin_head)
        ),
    };
    let shown = String::from_utf8_lossy(&request.origin_head);
    assert_eq!(
        origin.len,
        request.origin_head.len(),
        "origin head length: {shown}"
    );
    assert_eq!(origin.method, request.method, "origin method: {shown}");
    assert_eq!(origin.minor, 1, "origin version: {shown}");
    assert_eq!(origin.framing, request.framing, "origin framing: {shown}");
    assert_eq!(
        origin.host.as_deref(),
        Some(request.host.as_deref().unwrap_or(b"fuzz.example")),
        "origin host: {shown}"
    );
    assert_eq!(origin.upgrade, request.upgrade, "origin upgrade: {shown}");
    assert!(origin.keep_alive, "origin connection not reusable: {shown}");
}

/// Target `h1_response`: `data` is what an origin sent back. Each head is checked for a
/// GET and a HEAD request, from an HTTP/1.1 client keeping the connection and from an
/// HTTP/1.0 client that asked for keep-alive.
pub fn response(data: &[u8]) {
    for head_request in [false, true] {
        for client_minor in [1, 0] {
            response_for(data, head_request, client_minor);
        }
    }
}

fn response_for(data: &[u8], head_request: bool, client_minor: u8) {
    let response = match fuzzing::parse_response(data, head_request, client_minor, true) {
        Parsed::Partial => return,
        Parsed::Refused { status, reason } => {
            assert!(
                matches!(status, 400 | 431 | 501),
                "refused with {status} ({reason})"
            );
            return;
        }
        Parsed::Complete(response) => response,
    };
    assert!(response.len <= data.len());
    assert!((100..=999).contains(&response.status));
    match fuzzing::parse_response(&data[..response.len], head_request, client_minor, true) {
        // The proxy's `Date` may have ticked between the two parses.
        Parsed::Complete(mut again) => {
            again.client_head = without_date(&again.client_head);
            let mut first = response.clone();
            first.client_head = without_date(&first.client_head);
            assert_eq!(again, first, "the head depends on bytes after it");
        }
        other => panic!("the head alone parses differently: {other:?}"),
    }

    let shown = String::from_utf8_lossy(&response.client_head);
    let client = match fuzzing::parse_response(&response.client_head, head_request, 1, true) {
        Parsed::Complete(client) => client,
        Parsed::Refused { status: 431, .. } => return,
        other => panic!("the client head does not parse: {other:?}\n{shown}"),
    };
    assert_eq!(
        client.len,
        response.client_head.len(),
        "client head: {shown}"
    );
    assert_eq!(client.status, response.status, "client status: {shown}");
    // An HTTP/1.0 client gets a chunked body decoded, delimited by the close.
    let expected = match (response.framing, client_minor) {
        (BodyFraming::Chunked, 0) => BodyFraming::UntilClose,
        (framing, _) => framing,
    };
    assert_eq!(client.framing, expected, "client framing: {shown}");
}

/// `head` without its `Date` lines.
fn without_date(head: &[u8]) -> Vec<u8> {
    head.split_inclusive(|&byte| byte == b'\n')
        .filter(|line| !line.starts_with(b"Date: "))
        .flatten()
        .copied()
        .collect()
}

/// Target `h1_chunked`: `data` is a chunked body (and maybe what follows it) after one
/// byte that chooses the piece sizes of the third pass.
pub fn chunked(data: &[u8]) {
    let mut input = Input::new(data);
    let seed = input.u8();
    let body = input.rest();
    let whole = scan(body, &mut std::iter::once(body.len()));
    let bytewise = scan(body, &mut std::iter::repeat(1));
    assert_eq!(whole, bytewise, "whole and byte-by-byte scans differ");
    let mut rng = Rng::new(u64::from(seed) << 32 | body.len() as u64);
    let pieces = scan(body, &mut std::iter::from_fn(|| Some(rng.size(64))));
    assert_eq!(whole, pieces, "whole and piecewise scans differ");
    if let Ok((consumed, data, done)) = &whole {
        assert!(*consumed <= body.len());
        assert!(data.len() <= *consumed);
        assert!(*done || *consumed == body.len());
    }
}

/// Scans `body` in pieces of the sizes `sizes` gives, as the engine does across reads:
/// (bytes of the body, its data, whether it ended) or the error.
fn scan(
    body: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
) -> Result<(usize, Vec<u8>, bool), String> {
    let mut scanner = ChunkedScanner::default();
    let mut at = 0;
    let mut data = Vec::new();
    while at < body.len() && !scanner.is_done() {
        let size = sizes.next().unwrap_or(1).max(1);
        let piece = &body[at..(at + size).min(body.len())];
        let consumed = scanner.scan(piece, |range| {
            assert!(range.end <= piece.len(), "data range out of the piece");
            data.extend_from_slice(&piece[range]);
        })?;
        assert!(consumed <= piece.len());
        at += consumed;
        if consumed < piece.len() {
            assert!(scanner.is_done(), "stopped early without ending the body");
        }
    }
    Ok((at, data, scanner.is_done()))
}
