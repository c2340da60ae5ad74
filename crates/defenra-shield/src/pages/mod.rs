//! The pages the edge answers itself: the browser challenge and its errors (403, 404, 429,
//! 502, 503, 504), from one HTML template and a one-line plain-text variant, plus the
//! request ids they show.
//!
//! [`Pages::new`] fills everything static into each page once and keeps the page as a list
//! of text pieces and holes; [`Pages::render`] copies the pieces and writes the few
//! per-request values (client address, request id, challenge fields) into the holes,
//! HTML-escaped, into one buffer of the right size. No template is parsed per request.

mod request_id;

use std::io::Write as _;
use std::net::IpAddr;

use crate::challenge::base64;
use crate::challenge::{ChallengeString, Difficulty, SUBMIT_PATH};

pub use request_id::{RequestId, RequestIds};

const TEMPLATE: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const CHALLENGE_CONTENT: &str = include_str!("challenge.html");
const SCRIPT_SOURCE: &str = include_str!("challenge.js");
const TEXT_TEMPLATE: &str =
    "{{status}}: {{reason}} Client {{client}}, request ID {{request_id}}.\n";

/// A page the edge answers with.
#[derive(Debug, Clone, Copy)]
pub enum Page<'a> {
    /// The browser challenge: solve it to get the clearance cookie.
    Challenge(ChallengeForm<'a>),
    /// A WAF block without a body of its own, or a domain with the proxy off.
    Forbidden,
    /// No domain of this name is served here.
    NotFound,
    /// Rate-limited: the address may retry after `retry_after` seconds.
    TooManyRequests { retry_after: u32 },
    /// The origin could not be reached, or there is none.
    BadGateway,
    /// The agent cannot serve the request now.
    ServiceUnavailable,
    /// The origin did not answer in time.
    GatewayTimeout,
}

/// What a challenge page carries in its form.
#[derive(Debug, Clone, Copy)]
pub struct ChallengeForm<'a> {
    pub challenge: &'a ChallengeString,
    pub difficulty: Difficulty,
    /// The path and query the visitor asked for (the request target in origin form); it
    /// comes back with the solution and the visitor is sent there. Anything that is not a
    /// path on this site is replaced by `/`.
    pub url: &'a str,
    /// The request's method: for anything but GET and HEAD the page explains that the
    /// page is loaded again with GET after the check.
    pub method: &'a str,
}

/// The body format, from the request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Html,
    /// One line of text, for clients that do not name `text/html` (API clients, curl).
    Text,
}

impl Page<'_> {
    /// The response status: 403 for the challenge (see docs/shield.md on why), else the
    /// error's own.
    pub fn status(&self) -> u16 {
        KINDS[self.kind() as usize].status
    }

    fn kind(&self) -> Kind {
        match self {
            Page::Challenge(_) => Kind::Challenge,
            Page::Forbidden => Kind::Forbidden,
            Page::NotFound => Kind::NotFound,
            Page::TooManyRequests { .. } => Kind::TooManyRequests,
            Page::BadGateway => Kind::BadGateway,
            Page::ServiceUnavailable => Kind::ServiceUnavailable,
            Page::GatewayTimeout => Kind::GatewayTimeout,
        }
    }
}

impl Format {
    /// HTML when one of the `Accept` fields names `text/html` or `application/xhtml+xml`
    /// with a non-zero weight (RFC 9110 §12.5.1); text otherwise, `*/*` and no `Accept`
    /// included, so API clients and curl get one line instead of markup.
    pub fn from_accept<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Format {
        for field in fields {
            for range in field.split(|&byte| byte == b',') {
                let mut parts = range.split(|&byte| byte == b';');
                let media = parts.next().unwrap_or_default().trim_ascii();
                if !media.eq_ignore_ascii_case(b"text/html")
                    && !media.eq_ignore_ascii_case(b"application/xhtml+xml")
                {
                    continue;
                }
                let refused = parts.any(|parameter| {
                    let parameter = parameter.trim_ascii();
                    parameter.len() >= 2
                        && parameter[..2].eq_ignore_ascii_case(b"q=")
                        && parameter[2..]
                            .iter()
                            .all(|&byte| byte == b'0' || byte == b'.')
                });
                if !refused {
                    return Format::Html;
                }
            }
        }
        Format::Text
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Html => "text/html; charset=utf-8",
            Format::Text => "text/plain; charset=utf-8",
        }
    }
}

/// Every page, prepared. Build one at start and share it; rendering takes `&self`.
pub struct Pages {
    /// By [`Kind`], then `[html, text]`.
    prepared: Vec<[Prepared; 2]>,
    html_headers: [(&'static str, Box<str>); 4],
    text_headers: [(&'static str, Box<str>); 3],
}

impl Pages {
    pub fn new() -> Pages {
        let script = minify(SCRIPT_SOURCE);
        let csp = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
            csp_hash(&script),
            csp_hash(STYLE),
        );
        let script_element = format!("<script>{script}</script>");
        let challenge_content = CHALLENGE_CONTENT.replace("{{submit_path}}", SUBMIT_PATH);
        let prepared = KINDS
            .iter()
            .map(|kind| {
                let is_challenge = kind.kind == Kind::Challenge;
                let status = format!("{} {}", kind.status, kind.status_text);
                let html = Prepared::new(TEMPLATE, |slot| match slot {
                    "heading" => Some(kind.heading),
                    "reason" => Some(kind.html_reason),
                    "status" => Some(&status),
                    "style" => Some(STYLE),
                    "content" => Some(if is_challenge { &challenge_content } else { "" }),
                    "script" => Some(if is_challenge { &script_element } else { "" }),
                    _ => None,
                });
                let text = Prepared::new(TEXT_TEMPLATE, |slot| match slot {
                    "status" => Some(&status),
                    "reason" => Some(kind.text_reason),
                    _ => None,
                });
                [html, text]
            })
            .collect();
        Pages {
            prepared,
            html_headers: [
                ("content-type", Format::Html.content_type().into()),
                ("cache-control", "no-store".into()),
                ("x-content-type-options", "nosniff".into()),
                ("content-security-policy", csp.into()),
            ],
            text_headers: [
                ("content-type", Format::Text.content_type().into()),
                ("cache-control", "no-store".into()),
                ("x-content-type-options", "nosniff".into()),
            ],
        }
    }

    /// The body of `page` in `format` for `client`, showing `request_id`. One allocation of
    /// about the page's size; every inserted value is HTML-escaped.
    pub fn render(
        &self,
        page: &Page<'_>,
        format: Format,
        client: IpAddr,
        request_id: &RequestId,
    ) -> Vec<u8> {
        let prepared = &self.prepared[page.kind() as usize][format as usize];
        let dynamic = match page {
            Page::Challenge(form) => form.url.len() + form.method.len() + 64,
            _ => 0,
        };
        let mut out = Vec::with_capacity(prepared.static_len + dynamic + 96);
        for piece in &prepared.pieces {
            match piece {
                Piece::Text(text) => out.extend_from_slice(text.as_bytes()),
                Piece::Hole(hole) => fill(&mut out, *hole, page, client, request_id),
            }
        }
        out
    }

    /// The headers every page in `format` is sent with, besides `X-Request-Id` (and
    /// `Retry-After` on 429), which the caller adds: `Content-Type`, `Cache-Control:
    /// no-store`, `X-Content-Type-Options: nosniff` and, for HTML, a
    /// `Content-Security-Policy` that allows exactly the page's own script and style.
    pub fn headers(&self, format: Format) -> impl Iterator<Item = (&'static str, &str)> {
        let headers: &[(&'static str, Box<str>)] = match format {
            Format::Html => &self.html_headers,
            Format::Text => &self.text_headers,
        };
        headers.iter().map(|(name, value)| (*name, &**value))
    }
}

impl Default for Pages {
    fn default() -> Self {
        Pages::new()
    }
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages").finish_non_exhaustive()
    }
}

/// The script as sent: indentation, blank lines and whole-line `//` comments removed (the
/// source has no other comments and no line that depends on its indentation).
fn minify(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A CSP source hash (CSP Level 3 §2.3.1): SHA-256 of the element's text in base64.
fn csp_hash(text: &str) -> String {
    base64::encode_standard(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Challenge,
    Forbidden,
    NotFound,
    TooManyRequests,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

struct KindText {
    kind: Kind,
    status: u16,
    status_text: &'static str,
    heading: &'static str,
    html_reason: &'static str,
    text_reason: &'static str,
}

/// In the order of [`Kind`]. The reasons say what happened in words a visitor can act on
/// and never anything internal (no origin address, no error text).
const KINDS: [KindText; 7] = [
    KindText {
        kind: Kind::Challenge,
        status: 403,
        status_text: "Forbidden",
        heading: "Checking your browser",
        html_reason: "This site lets visitors through after a short check that their browser \
                      runs JavaScript. It takes a moment and continues to the page by itself.",
        text_reason: "This site lets only web browsers through, after a short JavaScript \
                      check; open it in a browser with JavaScript turned on.",
    },
    KindText {
        kind: Kind::Forbidden,
        status: 403,
        status_text: "Forbidden",
        heading: "Access denied",
        html_reason: "The site's security rules do not allow this request.",
        text_reason: "The site's security rules do not allow this request.",
    },
    KindText {
        kind: Kind::NotFound,
        status: 404,
        status_text: "Not Found",
        heading: "Site not found",
        html_reason: "No site of this name is served here.",
        text_reason: "No site of this name is served here.",
    },
    KindText {
        kind: Kind::TooManyRequests,
        status: 429,
        status_text: "Too Many Requests",
        heading: "Too many requests",
        html_reason: "Too many requests came from your address. \
                      Try again in {{retry_after}}.",
        text_reason: "Too many requests came from your address. \
                      Try again in {{retry_after}}.",
    },
    KindText {
        kind: Kind::BadGateway,
        status: 502,
        status_text: "Bad Gateway",
        heading: "Site unreachable",
        html_reason: "The site's server could not be reached. Try again later.",
        text_reason: "The site's server could not be reached. Try again later.",
    },
    KindText {
        kind: Kind::ServiceUnavailable,
        status: 503,
        status_text: "Service Unavailable",
        heading: "Service unavailable",
        html_reason: "The site cannot answer right now. Try again in a moment.",
        text_reason: "The site cannot answer right now. Try again in a moment.",
    },
    KindText {
        kind: Kind::GatewayTimeout,
        status: 504,
        status_text: "Gateway Timeout",
        heading: "Site too slow",
        html_reason: "The site's server did not answer in time. Try again later.",
        text_reason: "The site's server did not answer in time. Try again later.",
    },
];

/// A per-request value of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    Client,
    RequestId,
    /// The seconds left, with their unit: "1 second", "37 seconds".
    RetryAfter,
    Challenge,
    Difficulty,
    Url,
    MethodNote,
}

impl Hole {
    fn from_name(name: &str) -> Option<Hole> {
        Some(match name {
            "client" => Hole::Client,
            "request_id" => Hole::RequestId,
            "retry_after" => Hole::RetryAfter,
            "challenge" => Hole::Challenge,
            "difficulty" => Hole::Difficulty,
            "url" => Hole::Url,
            "method_note" => Hole::MethodNote,
            _ => return None,
        })
    }
}

enum Piece {
    Text(Box<str>),
    Hole(Hole),
}

struct Prepared {
    pieces: Vec<Piece>,
    static_len: usize,
}

impl Prepared {
    /// Replaces every `{{slot}}` of `template` that `fill` knows with its text (which may
    /// hold holes of its own), then splits the result at the remaining `{{hole}}`s.
    fn new<'t>(template: &str, fill: impl Fn(&str) -> Option<&'t str>) -> Prepared {
        let mut expanded = String::with_capacity(template.len() * 2);
        let mut rest = template;
        while let Some((before, name, after)) = next_marker(rest) {
            expanded.push_str(before);
            match fill(name) {
                Some(text) => expanded.push_str(text),
                None => {
                    expanded.push_str("{{");
                    expanded.push_str(name);
                    expanded.push_str("}}");
                }
            }
            rest = after;
        }
        expanded.push_str(rest);

        let mut pieces = Vec::new();
        let mut rest = expanded.as_str();
        while let Some((before, name, after)) = next_marker(rest) {
            if !before.is_empty() {
                pieces.push(Piece::Text(before.into()));
            }
            let hole = Hole::from_name(name)
                .unwrap_or_else(|| panic!("page template names unknown slot {{{{{name}}}}}"));
            pieces.push(Piece::Hole(hole));
            rest = after;
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.into()));
        }
        let static_len = pieces
            .iter()
            .map(|piece| match piece {
                Piece::Text(text) => text.len(),
                Piece::Hole(_) => 0,
            })
            .sum();
        Prepared { pieces, static_len }
    }
}

/// `(text before, slot name, text after)` of the first `{{name}}` in `text`.
fn next_marker(text: &str) -> Option<(&str, &str, &str)> {
    let start = text.find("{{")?;
    let length = text[start + 2..].find("}}")?;
    Some((
        &text[..start],
        &text[start + 2..start + 2 + length],
        &text[start + 2 + length + 2..],
    ))
}

fn fill(out: &mut Vec<u8>, hole: Hole, page: &Page<'_>, client: IpAddr, request_id: &RequestId) {
    match (hole, page) {
        (Hole::Client, _) => {
            // An address's text is digits, dots, colons and hex letters: nothing to escape.
            let _ = write!(out, "{}", client.to_canonical());
        }
        (Hole::RequestId, _) => out.extend_from_slice(request_id.as_str().as_bytes()),
        (Hole::RetryAfter, Page::TooManyRequests { retry_after }) => {
            let mut digits = [0; 20];
            out.extend_from_slice(crate::challenge::decimal(
                u64::from(*retry_after),
                &mut digits,
            ));
            out.extend_from_slice(if *retry_after == 1 {
                b" second"
            } else {
                b" seconds"
            });
        }
        (Hole::Challenge, Page::Challenge(form)) => {
            escape_html(out, form.challenge.as_str().as_bytes());
        }
        (Hole::Difficulty, Page::Challenge(form)) => {
            let mut digits = [0; 20];
            out.extend_from_slice(crate::challenge::decimal(
                u64::from(form.difficulty.bits()),
                &mut digits,
            ));
        }
        (Hole::Url, Page::Challenge(form)) => {
            let url = if crate::challenge::is_safe_redirect(form.url) {
                form.url
            } else {
                "/"
            };
            escape_html(out, url.as_bytes());
        }
        (Hole::MethodNote, Page::Challenge(form))
            if !form.method.eq_ignore_ascii_case("GET")
                && !form.method.eq_ignore_ascii_case("HEAD") =>
        {
            out.extend_from_slice(b"<p>Your browser sent a ");
            escape_html(out, form.method.as_bytes());
            out.extend_from_slice(
                b" request (a form, say). After the check the page is loaded again \
                  with GET, so you may have to send the form again.</p>",
            );
        }
        // A GET needs no method note, and a hole of another page's kind never occurs:
        // each kind's text names only its own.
        _ => {}
    }
}

/// Appends `text` with `&`, `<`, `>`, `"` and `'` as character references, so it is safe in
/// element content and in quoted attribute values.
fn escape_html(out: &mut Vec<u8>, text: &[u8]) {
    let mut start = 0;
    for (at, &byte) in text.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            b'\'' => b"&#39;",
            _ => continue,
        };
        out.extend_from_slice(&text[start..at]);
        out.extend_from_slice(escaped);
        start = at + 1;
    }
    out.extend_from_slice(&text[start..]);
}

#[cfg(test)]
mod tests;
