//! The answers the proxy makes itself: the edge's pages (HTML or one line of text by
//! `Accept`, each with a request id), the browser challenge, and the answers to a challenge
//! solution posted to the submit path.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use defenra_shield::DomainPolicy;
use defenra_shield::Solution;
use defenra_shield::challenge::{FormError, MAX_SUBMISSION_BYTES, Scheme};
use defenra_shield::pages::{ChallengeForm, Format, Page, Pages, RequestId, RequestIds};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::proxy::{Conn, Local};
use crate::route::with_lower_host;
use crate::server::Listener;

/// `X-Request-Id`: the id a page shows, also written in the access log.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Who a page is for: the body format its `Accept` asks for, and the client address the
/// page shows (the one the shield resolved, `proxyIpHeaders` included).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Visitor {
    pub(crate) format: Format,
    pub(crate) client: IpAddr,
}

impl Visitor {
    /// The visitor of a request whose `Accept` fields are `accept`, from `client`.
    pub(crate) fn new<'a>(accept: impl IntoIterator<Item = &'a [u8]>, client: IpAddr) -> Self {
        Visitor {
            format: Format::from_accept(accept),
            client,
        }
    }
}

/// The edge's pages, prepared once per service, and the request ids they carry.
pub(crate) struct EdgePages {
    pages: Pages,
    ids: RequestIds,
    /// The fixed headers of a page in each [`Format`] (indexed by it), built once.
    headers: [HeaderMap; 2],
}

impl EdgePages {
    pub(crate) fn new() -> Self {
        let pages = Pages::new();
        let headers = [Format::Html, Format::Text].map(|format| {
            let mut map = HeaderMap::new();
            for (name, value) in pages.headers(format) {
                if let Ok(value) = HeaderValue::from_str(value) {
                    map.insert(HeaderName::from_static(name), value);
                }
            }
            map
        });
        EdgePages {
            pages,
            ids: RequestIds::new(),
            headers,
        }
    }

    /// `page` for `visitor`, with a new request id in the page and in `X-Request-Id`
    /// (and the remaining block time in `Retry-After` on a 429, RFC 6585 §4).
    pub(crate) fn page(&self, page: &Page<'_>, visitor: Visitor) -> Local {
        let request_id = self.ids.next();
        let body = self
            .pages
            .render(page, visitor.format, visitor.client, &request_id);
        let mut headers = self.headers[visitor.format as usize].clone();
        insert_request_id(&mut headers, &request_id);
        if let Page::TooManyRequests { retry_after } = page {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        Local {
            status: StatusCode::from_u16(page.status()).unwrap_or(StatusCode::FORBIDDEN),
            headers,
            body: Bytes::from(body),
            request_id: Some(request_id),
        }
    }

    /// The answer for `status` when the edge refuses or fails a request itself: its page
    /// (403, 404, 502, 503, 504), else one line of text with the status. Both carry a
    /// request id and nothing about the cause.
    pub(crate) fn for_status(&self, status: StatusCode, visitor: Visitor) -> Local {
        let page = match status {
            StatusCode::FORBIDDEN => Page::Forbidden,
            StatusCode::NOT_FOUND => Page::NotFound,
            StatusCode::BAD_GATEWAY => Page::BadGateway,
            StatusCode::SERVICE_UNAVAILABLE => Page::ServiceUnavailable,
            StatusCode::GATEWAY_TIMEOUT => Page::GatewayTimeout,
            _ => {
                let request_id = self.ids.next();
                let text = format!(
                    "{} {}\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("Error")
                );
                let mut local = Local::plain(status, text);
                insert_request_id(&mut local.headers, &request_id);
                local.request_id = Some(request_id);
                return local;
            }
        };
        self.page(&page, visitor)
    }

    /// A WAF block: the script's own answer when it wrote a body; for an error status
    /// without one, the edge's answer for that status with the headers the script set
    /// (the page's own `Content-Type` and caching headers win).
    pub(crate) fn waf_block(
        &self,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        visitor: Visitor,
    ) -> Local {
        if !body.is_empty() || status.as_u16() < 400 {
            return Local {
                status,
                headers,
                body,
                request_id: None,
            };
        }
        let mut local = self.for_status(status, visitor);
        headers.remove(header::CONTENT_TYPE);
        headers.remove(header::CONTENT_LENGTH);
        let mut last_name = None;
        for (name, value) in std::mem::take(&mut local.headers) {
            if let Some(name) = name {
                last_name = Some(name);
            }
            if let Some(name) = &last_name {
                headers.insert(name.clone(), value);
            }
        }
        local.headers = headers;
        local
    }
}

fn insert_request_id(headers: &mut HeaderMap, request_id: &RequestId) {
    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        headers.insert(X_REQUEST_ID, value);
    }
}

/// A challenge solution posted to the submit path, waiting for its form body.
pub(crate) struct Submit {
    pub(crate) policy: Arc<DomainPolicy>,
    pub(crate) client: IpAddr,
    /// The host as routed: lower case, no port, no final dot.
    pub(crate) host: String,
    /// The submit itself was over the rate limit: the address is blocked, and solving lifts
    /// the block.
    pub(crate) blocked: bool,
    pub(crate) visitor: Visitor,
}

/// The form body of a submit as the listener read it.
pub(crate) enum FormBody<'a> {
    Read(&'a [u8]),
    /// Over [`MAX_SUBMISSION_BYTES`]: not read.
    TooLarge,
    /// Malformed framing, or the client stopped sending it within the header timeout.
    Broken,
}

impl Conn {
    /// The challenge page for a request of `method` to `target` on `host` from the
    /// visitor's address: a new challenge (counted), back to `target` once solved.
    pub(crate) fn challenge(
        &self,
        host: &str,
        target: &str,
        method: &Method,
        visitor: Visitor,
    ) -> Local {
        let shield = &self.service.shield;
        let edge = &self.service.edge;
        with_lower_host(host, |host| {
            let challenge = shield.issue_challenge(visitor.client, host);
            let form = ChallengeForm {
                challenge: &challenge,
                difficulty: shield.difficulty(),
                url: target,
                method: method.as_str(),
            };
            edge.page(&Page::Challenge(form), visitor)
        })
        .unwrap_or_else(|| edge.for_status(StatusCode::FORBIDDEN, visitor))
    }

    /// What a POST to the submit path gets: 303 back to the page it came from with the
    /// clearance cookie, or a new challenge for a wrong, stale or foreign solution, or 400
    /// (413) for a body that is no challenge form.
    pub(crate) fn answer_submit(&self, submit: &Submit, body: FormBody<'_>) -> Local {
        let edge = &self.service.edge;
        let body = match body {
            FormBody::Read(body) => body,
            FormBody::TooLarge => {
                return edge.for_status(StatusCode::PAYLOAD_TOO_LARGE, submit.visitor);
            }
            FormBody::Broken => return edge.for_status(StatusCode::BAD_REQUEST, submit.visitor),
        };
        let scheme = match self.listener {
            Listener::Http => Scheme::Http,
            Listener::Https => Scheme::Https,
        };
        let solution = self.service.shield.verify_solution(
            &submit.policy,
            submit.client,
            &submit.host,
            body,
            scheme,
            submit.blocked,
        );
        match solution {
            Solution::Cleared {
                location,
                set_cookie,
            } => {
                // RFC 9110 §15.4.4: 303 makes the browser GET `location`, whatever it posted.
                let mut local = Local::plain(StatusCode::SEE_OTHER, Bytes::new());
                let headers = &mut local.headers;
                headers.remove(header::CONTENT_TYPE);
                let location =
                    HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/"));
                headers.insert(header::LOCATION, location);
                if let Ok(cookie) = HeaderValue::from_str(&set_cookie) {
                    headers.insert(header::SET_COOKIE, cookie);
                }
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                local
            }
            Solution::Refused { url, .. } => {
                self.challenge(&submit.host, &url, &Method::GET, submit.visitor)
            }
            Solution::Malformed(FormError::TooLarge) => {
                edge.for_status(StatusCode::PAYLOAD_TOO_LARGE, submit.visitor)
            }
            Solution::Malformed(_) => edge.for_status(StatusCode::BAD_REQUEST, submit.visitor),
        }
    }
}

/// Reads an HTTP/2 submit's form body, at most [`MAX_SUBMISSION_BYTES`], within `timeout`.
///
/// # Errors
///
/// [`FormBody::TooLarge`] or [`FormBody::Broken`].
pub(crate) async fn read_form_h2(
    body: hyper::body::Incoming,
    timeout: std::time::Duration,
) -> Result<Bytes, FormBody<'static>> {
    let limited = http_body_util::Limited::new(body, MAX_SUBMISSION_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(FormBody::TooLarge),
        Ok(Err(_)) | Err(_) => Err(FormBody::Broken),
    }
}
