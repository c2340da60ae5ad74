//! Host routing, ACME answers, redirects and the error statuses.

use std::time::{Duration, Instant};

use defenra_config::stats::StatsSource;
use serde_json::json;

use crate::support::{Origin, Proxy, config, get, options, proxied_domain};

#[tokio::test]
async fn known_host_is_proxied_with_method_path_and_query() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;

    let reply = get(proxy.http, "www.example.com", "/a/b?c=1&d=2").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-echo-method"), "GET");
    assert_eq!(reply.header("x-echo-path"), "/a/b?c=1&d=2");
    assert_eq!(reply.echoed("host"), ["www.example.com"]);

    // Port stripped, case ignored, trailing dot accepted.
    let reply = get(proxy.http, "WWW.Example.COM.:8080", "/").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echoed("host"), ["WWW.Example.COM.:8080"]);

    let mut metrics = Vec::new();
    proxy.service.stats().collect(&mut metrics);
    let ok = metrics
        .iter()
        .find(|m| {
            m.name == "requests_total"
                && m.labels.contains(&("listener", "http".to_owned()))
                && m.labels.contains(&("status", "2xx".to_owned()))
        })
        .unwrap();
    assert_eq!(ok.value, 2.0);
}

#[tokio::test]
async fn unknown_host_is_404_with_the_edge_page() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let reply = get(proxy.http, "other.org", "/").await;
    assert_eq!(reply.status, 404);
    // No `Accept`: the page's one line of text, naming the client and the request id.
    let request_id = reply.header("x-request-id");
    assert_eq!(
        reply.body,
        format!(
            "404 Not Found: No site of this name is served here. Client 127.0.0.1, \
             request ID {request_id}.\n"
        )
    );
    // A name below the zone without a record (and no wildcard) is unknown too.
    assert_eq!(get(proxy.http, "nope.example.com", "/").await.status, 404);
}

#[tokio::test]
async fn host_without_proxy_flag_is_403_and_flagged_record_is_proxied() {
    let origin = Origin::start().await;
    let domain = json!({
        "domain": "example.com",
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1" },
            { "name": "api", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
        ],
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 403);
    assert_eq!(get(proxy.http, "api.example.com", "/").await.status, 200);
}

#[tokio::test]
async fn wildcard_record_routes_any_name_below_it() {
    let origin = Origin::start().await;
    let domain = json!({
        "domain": "example.com",
        "dnsRecords": [
            { "name": "*", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
        ],
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let reply = get(proxy.http, "shop.example.com", "/x").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echoed("host"), ["shop.example.com"]);
    assert_eq!(get(proxy.http, "a.b.example.com", "/").await.status, 200);
}

#[tokio::test]
async fn listener_type_limits_where_a_domain_is_served() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["httpProxy"]["type"] = json!("https");
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    assert_eq!(get(proxy.http, "www.example.com", "/").await.status, 403);
}

#[tokio::test]
async fn host_without_usable_origin_is_502() {
    let origin = Origin::start().await;
    let domain = json!({
        "domain": "example.com",
        "httpProxy": { "enabled": true },
        "dnsRecords": [ { "name": "@", "type": "TXT", "value": "hello" } ],
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let reply = get(proxy.http, "example.com", "/").await;
    assert_eq!(reply.status, 502);
    assert!(
        reply
            .body
            .starts_with("502 Bad Gateway: The site's server could not be reached."),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn host_without_own_record_uses_the_apex_origin_and_cnames_in_zone_are_followed() {
    let origin = Origin::start().await;
    let domain = json!({
        "domain": "example.com",
        "httpProxy": { "enabled": true },
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
            { "name": "mail", "type": "MX", "value": "mx.example.com", "priority": 10, "httpProxyEnabled": false },
            { "name": "blog", "type": "CNAME", "value": "example.com", "httpProxyEnabled": true },
        ],
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    // `mail` has only an MX record: its domain is proxied as a whole, so the apex's origin.
    assert_eq!(get(proxy.http, "mail.example.com", "/").await.status, 200);
    // `blog` is a CNAME to the proxied apex: followed inside the snapshot, not resolved.
    assert_eq!(get(proxy.http, "blog.example.com", "/").await.status, 200);
}

#[tokio::test]
async fn cname_origin_outside_the_zones_uses_the_system_resolver() {
    let origin = Origin::start().await;
    let domain = json!({
        "domain": "example.com",
        "dnsRecords": [
            { "name": "@", "type": "CNAME", "value": "localhost", "ttl": 60, "httpProxyEnabled": true },
        ],
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let reply = get(proxy.http, "example.com", "/").await;
    // localhost may resolve to ::1 first; the connector tries each address in turn.
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test]
async fn closed_origin_port_is_502() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy = Proxy::start(&config(vec![proxied_domain("example.com")]), port).await;
    let reply = get(proxy.http, "example.com", "/").await;
    assert_eq!(reply.status, 502);
    assert!(
        reply.body.starts_with("502 Bad Gateway: "),
        "{}",
        reply.body
    );
    // No internal detail: neither the origin's address nor the connect error.
    for internal in [port.to_string(), "refused".to_owned(), "connect".to_owned()] {
        assert!(!reply.body.contains(&internal), "{}", reply.body);
    }
}

#[tokio::test]
async fn slow_origin_is_504_after_the_origin_timeout() {
    let origin = Origin::start().await;
    let mut options = options(origin.addr.port());
    options.origin_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(&config(vec![proxied_domain("example.com")]), options).await;
    let started = Instant::now();
    let reply = get(proxy.http, "example.com", "/slow").await;
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn redirect_to_https_keeps_host_and_path() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["ssl"] = json!({ "httpRedirectToHttps": true });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let reply = get(proxy.http, "www.example.com:80", "/a/b?c=1").await;
    assert_eq!(reply.status, 301);
    assert_eq!(reply.header("location"), "https://www.example.com/a/b?c=1");
}

#[tokio::test]
async fn acme_token_is_answered_before_redirects_and_other_paths_are_proxied() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["ssl"] = json!({
        "httpRedirectToHttps": true,
        "acmeHttpChallenge": { "token": "tok-123_x", "keyAuthorization": "tok-123_x.thumbprint" },
    });
    let proxy = Proxy::start(&config(vec![domain]), origin.addr.port()).await;
    let reply = get(
        proxy.http,
        "example.com",
        "/.well-known/acme-challenge/tok-123_x",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "tok-123_x.thumbprint");
    let reply = get(
        proxy.http,
        "example.com",
        "/.well-known/acme-challenge/other",
    )
    .await;
    assert_eq!(reply.status, 301, "a wrong token is an ordinary request");
}

#[tokio::test]
async fn acme_token_is_answered_for_a_host_that_is_not_proxied() {
    let domain = json!({
        "domain": "example.com",
        "dnsRecords": [ { "name": "@", "type": "A", "value": "192.0.2.1" } ],
        "ssl": { "acmeHttpChallenge": { "token": "abc", "keyAuthorization": "abc.key" } },
    });
    let proxy = Proxy::start(&config(vec![domain]), 9).await;
    let reply = get(proxy.http, "example.com", "/.well-known/acme-challenge/abc").await;
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (200, "abc.key")
    );
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 403);
}

#[tokio::test]
async fn reload_changes_routes_without_restart() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(&config(vec![]), origin.addr.port()).await;
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 404);
    proxy.reload(&config(vec![proxied_domain("example.com")]));
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
}

#[tokio::test]
async fn shutdown_returns_after_connections_finish() {
    let origin = Origin::start().await;
    let mut proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
    proxy.shutdown.cancel();
    for task in proxy.tasks.drain(..) {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("listener stops")
            .unwrap()
            .unwrap();
    }
    assert!(tokio::net::TcpStream::connect(proxy.http).await.is_err());
}

#[tokio::test]
async fn waf_blocks_before_the_origin_and_adds_allowed_headers() {
    let origin = Origin::start().await;
    let mut domain = proxied_domain("example.com");
    domain["luaCode"] = json!(
        r#"
        if ngx.var.uri == "/admin" then
            return ngx.exit(403)
        end
        ngx.header["X-Waf"] = "passed"
        "#
    );
    let mut redirected = proxied_domain("example.org");
    redirected["luaCode"] = json!("return ngx.exit(403)");
    redirected["ssl"] = json!({
        "httpRedirectToHttps": true,
        "acmeHttpChallenge": { "token": "t0k", "keyAuthorization": "t0k.key" },
    });
    let proxy = Proxy::start(&config(vec![domain, redirected]), origin.addr.port()).await;

    let reply = get(proxy.http, "www.example.com", "/admin").await;
    assert_eq!(reply.status, 403);
    assert!(
        reply.header("x-echo-method").is_empty(),
        "origin was contacted"
    );
    let reply = get(proxy.http, "www.example.com", "/page").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-waf"), "passed");
    assert_eq!(reply.header("x-echo-path"), "/page");

    // ACME and the redirect come before the WAF.
    let reply = get(proxy.http, "example.org", "/.well-known/acme-challenge/t0k").await;
    assert_eq!(reply.status, 200);
    assert_eq!(get(proxy.http, "example.org", "/x").await.status, 301);
}

#[tokio::test]
async fn connect_is_refused() {
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    let request = http::Request::builder()
        .method("CONNECT")
        .uri("example.com:443")
        .header("host", "example.com:443")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = crate::support::send(proxy.http, request).await;
    assert_eq!(reply.status, 405);
}
