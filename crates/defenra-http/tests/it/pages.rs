//! The edge's own pages through the real proxy: HTML or one line of text by `Accept`, each
//! with the request id it also sends as `X-Request-Id`, and nothing internal.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::support::{
    Origin, Proxy, Reply, collect, config, connect_from, http2_over, options, proxied_domain, send,
};

const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

fn get(host: &str, path: &str, accept: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().uri(path).header("host", host);
    if let Some(accept) = accept {
        builder = builder.header("accept", accept);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// Checks the parts every page has: status, format, request id in the page and the header.
fn assert_page(reply: &Reply, status: u16, reason: &str, html: bool) {
    assert_eq!(reply.status.as_u16(), status, "{reply:?}");
    let request_id = reply.header("x-request-id");
    assert_eq!(request_id.len(), 16, "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    assert!(reply.body.contains(reason), "{}", reply.body);
    if html {
        assert_eq!(reply.header("content-type"), "text/html; charset=utf-8");
        assert!(reply.body.starts_with("<!doctype html>"), "{}", reply.body);
        assert!(reply.body.contains(&format!("<code>{request_id}</code>")));
        assert!(reply.body.contains("<dd>127.0.0.1</dd>"));
        assert!(!reply.header("content-security-policy").is_empty());
    } else {
        assert_eq!(reply.header("content-type"), "text/plain; charset=utf-8");
        assert!(
            reply
                .body
                .ends_with(&format!("Client 127.0.0.1, request ID {request_id}.\n")),
            "{}",
            reply.body
        );
    }
}

#[tokio::test]
async fn browsers_get_html_and_other_clients_one_line_with_the_same_request_id_header() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let html = send(proxy.http, get("unknown.test", "/", Some(HTML))).await;
    assert_page(&html, 404, "No site of this name is served here.", true);
    let text = send(proxy.http, get("unknown.test", "/", Some("*/*"))).await;
    assert_page(&text, 404, "No site of this name is served here.", false);
    assert_ne!(html.header("x-request-id"), text.header("x-request-id"));

    // HTTP/2 gets the same pages.
    let stream = connect_from("127.0.0.1", proxy.http).await.unwrap();
    let mut h2 = http2_over::<_, Full<Bytes>>(stream).await;
    let request = Request::builder()
        .uri("http://unknown.test/")
        .header("accept", HTML)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = collect(h2.send_request(request).await.unwrap()).await;
    assert_page(&reply, 404, "No site of this name", true);
}

#[tokio::test]
async fn waf_blocks_without_a_body_get_the_forbidden_page_and_keep_their_headers() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["luaCode"] = json!(
        "if ngx.var.uri == '/admin' then ngx.header['X-Rule'] = 'admin' return ngx.exit(403) end\n\
         if ngx.var.uri == '/down' then return ngx.exit(503) end\n\
         if ngx.var.uri == '/own' then ngx.status = 403 ngx.say('no entry') return ngx.exit(403) end"
    );
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let blocked = send(proxy.http, get("example.com", "/admin", Some(HTML))).await;
    assert_page(
        &blocked,
        403,
        "The site's security rules do not allow this request.",
        true,
    );
    assert_eq!(blocked.header("x-rule"), "admin");
    let down = send(proxy.http, get("example.com", "/down", None)).await;
    assert_page(&down, 503, "The site cannot answer right now.", false);
    // A script's own body is its answer, untouched.
    let own = send(proxy.http, get("example.com", "/own", Some(HTML))).await;
    assert_eq!(
        (own.status.as_u16(), own.body.as_str()),
        (403, "no entry\n")
    );
    assert!(own.header("x-request-id").is_empty());
}

#[tokio::test]
async fn a_rate_limited_address_gets_the_429_page_with_the_time_left() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["httpProxy"]["antiDDoS"] = json!({
        "enabled": true,
        "rateLimit": { "windowSeconds": 10, "maxRequests": 1 },
        "blockDurationSeconds": 60,
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    assert_eq!(
        send(proxy.http, get("example.com", "/", None)).await.status,
        200
    );
    let limited = send(proxy.http, get("example.com", "/", None)).await;
    assert_page(&limited, 429, "Try again in 60 seconds.", false);
    assert_eq!(limited.header("retry-after"), "60");
}

#[tokio::test]
async fn a_slow_origin_gets_the_504_page_without_its_address() {
    let origin = Origin::start().await;
    let proxy = Proxy::start_with(
        &config(vec![proxied_domain("example.com")]),
        defenra_http::HttpOptions {
            origin_timeout: Duration::from_millis(300),
            ..options(origin.addr.port())
        },
    )
    .await;
    let reply = send(proxy.http, get("example.com", "/slow", Some(HTML))).await;
    assert_page(&reply, 504, "did not answer in time", true);
    assert!(!reply.body.contains(&origin.addr.port().to_string()));
    assert!(!reply.body.contains("timeout"));
    // Statuses without a page of their own stay one line of text, with an id too.
    let reply = send(
        proxy.http,
        Request::builder()
            .method("CONNECT")
            .uri("example.com:443")
            .header("host", "example.com")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.body, "405 Method Not Allowed\n");
    assert_eq!(reply.header("x-request-id").len(), 16);
}
