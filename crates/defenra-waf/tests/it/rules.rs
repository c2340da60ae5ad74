//! Block IP, rate limit, bad bots, SQLi, custom bodies and security headers, end to end:
//! a client talks HTTP/1.1 to `defenra-http`'s listener, which asks the WAF and proxies to
//! a counting origin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use defenra_config::{Reload, SnapshotCell};
use defenra_http::{HttpOptions, HttpService};
use defenra_waf::{WafEngine, WafOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "shop.test";

/// An origin that answers every request with `200 origin` and counts them.
struct Origin {
    port: u16,
    hits: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (counter, stop) = (Arc::clone(&hits), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        // One response per complete request head (no bodies in these tests).
                        while let Some(end) = find(&buffer, b"\r\n\r\n") {
                            buffer.drain(..end + 4);
                            counter.fetch_add(1, Ordering::SeqCst);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\norigin";
                            if stream.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Origin {
            port,
            hits,
            shutdown,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The proxy with one domain whose script is `script`.
struct Proxy {
    addr: SocketAddr,
    shutdown: CancellationToken,
    origin: Origin,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn proxy(script: &str, origin: Origin) -> Proxy {
    let waf = Arc::new(WafEngine::new(WafOptions::default()));
    let options = HttpOptions {
        origin_http_port: origin.port,
        ..HttpOptions::default()
    };
    let service = Arc::new(HttpService::new(Arc::clone(&waf), options));
    let config = json!({ "success": true, "domains": [{
        "domain": DOMAIN,
        "httpProxy": { "enabled": true, "type": "both" },
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true },
        ],
        "luaCode": script,
    }]});
    let compiled = defenra_config::compile(config.to_string().as_bytes()).unwrap();
    assert!(compiled.issues.is_empty(), "{:?}", compiled.issues);
    let snapshot = SnapshotCell::new().publish(compiled.snapshot);
    let mut issues = Vec::new();
    waf.reload(&snapshot, &mut issues);
    service.reload(&snapshot, &mut issues);
    assert!(issues.is_empty(), "{issues:?}");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(Arc::clone(&service).serve_http(listener, shutdown.clone()));
    Proxy {
        addr,
        shutdown,
        origin,
    }
}

/// A response as `status`, lower-cased header lines and body.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

async fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn blocked_ip_never_reaches_the_origin() {
    let origin = Origin::start().await;
    let hits = Arc::clone(&origin.hits);
    let proxy = proxy(
        r#"
        local blocked = { ["127.0.0.1"] = true, ["203.0.113.9"] = true }
        if blocked[ngx.var.remote_addr] then return ngx.exit(ngx.HTTP_FORBIDDEN) end
        "#,
        origin,
    )
    .await;
    let reply = get(&proxy, "/", &[]).await;
    assert_eq!(reply.status, 403);
    assert!(reply.body.contains("403 Forbidden"), "{}", reply.body);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rate_limit_answers_429_after_the_limit() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        local key = "rate:" .. ngx.var.remote_addr
        local count = ngx.shared.cache:incr(key, 1, 0, 60)
        if count > 3 then return ngx.exit(ngx.HTTP_TOO_MANY_REQUESTS) end
        "#,
        origin,
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get(&proxy, "/", &[]).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(proxy.origin.hits(), 3);
}

#[tokio::test]
async fn bad_user_agents_are_blocked() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        local ua = (ngx.var.http_user_agent or ""):lower()
        for _, bad in ipairs({ "sqlmap", "nikto" }) do
          if ua:find(bad, 1, true) then return ngx.exit(403) end
        end
        if request.headers["User-Agent"] == nil then return ngx.exit(400) end
        "#,
        origin,
    )
    .await;
    assert_eq!(
        get(&proxy, "/", &[("User-Agent", "sqlmap/1.7")])
            .await
            .status,
        403
    );
    assert_eq!(
        get(&proxy, "/", &[("User-Agent", "Nikto")]).await.status,
        403
    );
    assert_eq!(get(&proxy, "/", &[]).await.status, 400);
    let allowed = get(&proxy, "/", &[("User-Agent", "Mozilla/5.0")]).await;
    assert_eq!((allowed.status, allowed.body.as_str()), (200, "origin"));
}

#[tokio::test]
async fn sqli_patterns_are_blocked() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        local target = ngx.unescape_uri(ngx.var.request_uri)
        if ngx.re.find(target, [[union\s+select|<script]], "ijo") then
          return ngx.exit(ngx.HTTP_FORBIDDEN)
        end
        "#,
        origin,
    )
    .await;
    assert_eq!(
        get(&proxy, "/item?id=1%20UNION%20SELECT%20pw", &[])
            .await
            .status,
        403
    );
    assert_eq!(get(&proxy, "/q?x=%3CScript%3E", &[]).await.status, 403);
    assert_eq!(get(&proxy, "/item?id=1", &[]).await.status, 200);
}

#[tokio::test]
async fn custom_200_body_is_served_without_the_origin() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        if ngx.var.uri == "/.well-known/security.txt" then
          ngx.header["Content-Type"] = "text/plain"
          ngx.say("Contact: mailto:security@shop.test")
          return ngx.exit(ngx.HTTP_OK)
        end
        "#,
        origin,
    )
    .await;
    let reply = get(&proxy, "/.well-known/security.txt", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.body, "Contact: mailto:security@shop.test\n");
    assert_eq!(proxy.origin.hits(), 0);
    assert_eq!(get(&proxy, "/", &[]).await.body, "origin");
}

#[tokio::test]
async fn security_headers_are_added_to_proxied_responses() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        ngx.header["X-Frame-Options"] = "DENY"
        ngx.header["X-Content-Type-Options"] = "nosniff"
        "#,
        origin,
    )
    .await;
    let reply = get(&proxy, "/", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "origin"));
    assert_eq!(reply.header("x-frame-options"), Some("DENY"));
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn a_runaway_script_fails_open_within_the_budget() {
    let origin = Origin::start().await;
    let proxy = proxy("while true do end", origin).await;
    let started = std::time::Instant::now();
    let reply = get(&proxy, "/", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "origin"));
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
}

#[tokio::test]
async fn framing_headers_from_scripts_never_reach_the_client() {
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        ngx.header["Content-Length"] = "0"
        ngx.header["Transfer-Encoding"] = "chunked"
        ngx.header["Connection"] = "keep-alive"
        ngx.header["X-Waf"] = "seen"
        if ngx.var.arg_block then
            ngx.header["Content-Length"] = "100"
            ngx.say("no")
            return ngx.exit(403)
        end
        "#,
        origin,
    )
    .await;
    let count = |reply: &Reply, name: &str| {
        reply
            .head
            .lines()
            .filter(|line| {
                line.split_once(':')
                    .is_some_and(|(key, _)| key.eq_ignore_ascii_case(name))
            })
            .count()
    };
    for (path, status, body) in [("/", 200, "origin"), ("/?block=1", 403, "no\n")] {
        let reply = get(&proxy, path, &[]).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (status, body),
            "{path}"
        );
        assert_eq!(reply.header("x-waf"), Some("seen"), "{path}");
        let length = body.len().to_string();
        assert_eq!(
            reply.header("content-length"),
            Some(length.as_str()),
            "{path}"
        );
        assert_eq!(count(&reply, "content-length"), 1, "{path}: {}", reply.head);
        assert_eq!(
            count(&reply, "transfer-encoding"),
            0,
            "{path}: {}",
            reply.head
        );
        assert_eq!(
            reply.header("connection"),
            Some("close"),
            "{path}: {}",
            reply.head
        );
    }
}

#[tokio::test]
async fn recursion_through_gsub_fails_the_script_not_the_proxy() {
    // Issue 17: 600 nested groups in the query overflowed the worker's stack through
    // string.gsub's C frames, and the process died.
    let origin = Origin::start().await;
    let proxy = proxy(
        r#"
        local function unwrap(s)
            return (s:gsub("%b()", function(i) return unwrap(i:sub(2, -2)) end))
        end
        if unwrap(ngx.var.arg_q or "") == "evil" then return ngx.exit(403) end
        "#,
        origin,
    )
    .await;
    let nested = format!("/?q={}evil{}", "(".repeat(600), ")".repeat(600));
    let reply = get(&proxy, &nested, &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "origin"),
        "fails open"
    );
    let shallow = format!("/?q={}evil{}", "(".repeat(5), ")".repeat(5));
    assert_eq!(get(&proxy, &shallow, &[]).await.status, 403);
}
