//! The browser challenge through the real proxy: clients from several 127.x addresses
//! against a domain with `antiDDoS.jsChallenge` on, the shield on a manual clock. A
//! "browser" here is a client that reads the page's form, computes the proof of work with
//! `ChallengeString::solve` and posts it, as the page's script does.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use defenra_shield::challenge::{ChallengeString, Difficulty, SUBMIT_PATH};
use defenra_shield::{Clock, ManualClock, Shield, ShieldKey, ShieldOptions};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::support::{
    Origin, Proxy, Reply, TLS_ALL, TestCert, collect, config, connect_from, http1_over, http2_over,
    options, send_from, tls_connect,
};

const HOST: &str = "shop.test";
const COOKIE: &str = "pass";
/// What a browser sends for a page.
const HTML: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

/// `shop.test` (and `www.shop.test`) proxied to the origin with Anti-DDoS and the
/// challenge on; `extra` is merged into the `antiDDoS` object.
fn challenged(extra: Value) -> Value {
    let cert = TestCert::new(&[HOST, "www.shop.test"]);
    let mut anti_ddos = json!({
        "enabled": true,
        "rateLimit": { "windowSeconds": 10, "maxRequests": 100 },
        "blockDurationSeconds": 60,
        "jsChallenge": { "enabled": true, "cookieName": COOKIE, "ttlSeconds": 900 },
    });
    if let (Some(settings), Some(extra)) = (anti_ddos.as_object_mut(), extra.as_object()) {
        for (name, value) in extra {
            settings.insert(name.clone(), value.clone());
        }
    }
    let mut ssl = cert.ssl();
    ssl["acmeHttpChallenge"] = json!({ "token": "tok-1", "keyAuthorization": "tok-1.thumb" });
    config(vec![json!({
        "domain": HOST,
        "httpProxy": { "enabled": true, "type": "both", "antiDDoS": anti_ddos },
        "ssl": ssl,
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
            { "name": "www", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true },
        ],
    })])
}

struct Site {
    proxy: Proxy,
    origin: Origin,
    clock: ManualClock,
}

impl Site {
    async fn start(extra: Value) -> Site {
        let origin = Origin::start().await;
        let (clock, manual) = Clock::manual();
        let shield = Arc::new(Shield::new(ShieldOptions {
            clock,
            challenge_difficulty: Difficulty::new(8).expect("difficulty"),
            shield_key: Some(ShieldKey::from_bytes([42; 32])),
            ..ShieldOptions::default()
        }));
        let proxy =
            Proxy::start_shielded(&challenged(extra), options(origin.addr.port()), shield).await;
        Site {
            proxy,
            origin,
            clock: manual,
        }
    }

    /// One request from `source` on a new HTTP/1.1 connection.
    async fn send(&self, source: &str, request: Request<Full<Bytes>>) -> Reply {
        send_from(source, self.proxy.http, request)
            .await
            .expect("answered")
    }

    fn origin_connections(&self) -> usize {
        self.origin.accepted_connections.load(Ordering::SeqCst)
    }

    fn shield(&self) -> &Shield {
        self.proxy.service.shield()
    }
}

/// A GET of `path` on `host` with these `Accept` and `Cookie` fields.
fn get(host: &str, path: &str, accept: Option<&str>, cookie: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().uri(path).header("host", host);
    if let Some(accept) = accept {
        builder = builder.header("accept", accept);
    }
    if let Some(cookie) = cookie {
        builder = builder.header("cookie", cookie);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// A POST of the form `body` to the submit path, as the challenge page's form sends it.
fn post_form(host: &str, body: String) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(SUBMIT_PATH)
        .header("host", host)
        .header("accept", HTML)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The value of the hidden input `name` of a challenge page.
fn form_field(page: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {page}"))
        + marker.len();
    let end = page[start..].find('"').expect("closing quote") + start;
    page[start..end].replace("&amp;", "&")
}

/// What the page's script posts: the challenge, its difficulty, the return address and the
/// lowest nonce that solves it.
fn solution(page: &Reply) -> String {
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{page:?}");
    let challenge: ChallengeString = form_field(&page.body, "challenge")
        .parse()
        .expect("a challenge string");
    let bits: u32 = form_field(&page.body, "difficulty").parse().expect("bits");
    let difficulty = Difficulty::new(bits).expect("difficulty");
    let nonce = challenge.solve(difficulty);
    let url = form_field(&page.body, "url");
    format!(
        "challenge={challenge}&difficulty={bits}&url={}&nonce={nonce}&engine=test",
        percent_encode(&url)
    )
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The `name=value` of a `Set-Cookie` answer.
fn cookie_of(reply: &Reply) -> String {
    let set_cookie = reply.header("set-cookie");
    assert!(set_cookie.starts_with(&format!("{COOKIE}=")), "{reply:?}");
    set_cookie.split(';').next().expect("a pair").to_owned()
}

/// Fetches the challenge for `path` from `source`, solves it and returns the cookie.
async fn pass(site: &Site, source: &str, path: &str) -> String {
    let page = site.send(source, get(HOST, path, Some(HTML), None)).await;
    let cleared = site.send(source, post_form(HOST, solution(&page))).await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER, "{cleared:?}");
    assert_eq!(cleared.header("location"), path);
    cookie_of(&cleared)
}

#[tokio::test]
async fn curl_style_clients_get_one_line_of_text_and_never_reach_the_origin() {
    let site = Site::start(json!({})).await;
    for accept in [Some("*/*"), None, Some("application/json")] {
        let reply = site.send("127.0.0.2", get(HOST, "/", accept, None)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{accept:?}");
        assert_eq!(reply.header("content-type"), "text/plain; charset=utf-8");
        assert_eq!(reply.header("cache-control"), "no-store");
        let request_id = reply.header("x-request-id");
        assert_eq!(request_id.len(), 16, "{reply:?}");
        assert_eq!(
            reply.body,
            format!(
                "403 Forbidden: This site lets only web browsers through, after a short \
                 JavaScript check; open it in a browser with JavaScript turned on. Client \
                 127.0.0.2, request ID {request_id}.\n"
            )
        );
    }
    // A form posted somewhere on the site is not forwarded either.
    let post = Request::builder()
        .method("POST")
        .uri("/login")
        .header("host", HOST)
        .body(Full::new(Bytes::from_static(b"user=a&password=b")))
        .unwrap();
    assert_eq!(
        site.send("127.0.0.2", post).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(site.origin_connections(), 0, "the origin saw a request");
    assert_eq!(site.shield().stats().challenges_issued, 4);
}

#[tokio::test]
async fn a_solved_challenge_reaches_the_origin_and_the_cookie_keeps_working() {
    let site = Site::start(json!({})).await;
    let page = site
        .send("127.0.0.2", get(HOST, "/shop?id=7&q=a+b", Some(HTML), None))
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("cache-control"), "no-store");
    assert!(
        page.header("content-security-policy")
            .contains("script-src 'sha256-")
    );
    assert!(
        page.body.contains(&format!(
            r#"<form id="defenra-challenge" method="post" action="{SUBMIT_PATH}">"#
        )),
        "{}",
        page.body
    );
    assert!(page.body.contains("<dd>127.0.0.2</dd>"));
    assert_eq!(form_field(&page.body, "url"), "/shop?id=7&q=a+b");
    assert_eq!(form_field(&page.body, "difficulty"), "8");

    let cleared = site
        .send("127.0.0.2", post_form(HOST, solution(&page)))
        .await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER, "{cleared:?}");
    assert_eq!(cleared.header("location"), "/shop?id=7&q=a+b");
    assert_eq!(cleared.header("cache-control"), "no-store");
    let set_cookie = cleared.header("set-cookie");
    assert!(
        set_cookie.ends_with("; Path=/; Max-Age=900; HttpOnly; SameSite=Lax"),
        "no Secure over plain HTTP: {set_cookie}"
    );
    assert_eq!(site.origin_connections(), 0, "the submit is the proxy's");
    let cookie = cookie_of(&cleared);

    // The redirected request, and later ones, go through with the cookie (other cookies of
    // the site beside it), and the origin gets the cookie like any other.
    for path in ["/shop?id=7&q=a+b", "/cart", "/checkout"] {
        let with_others = format!("theme=dark; {cookie}; lang=en");
        let reply = site
            .send("127.0.0.2", get(HOST, path, Some(HTML), Some(&with_others)))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {reply:?}");
        assert_eq!(reply.header("x-echo-path"), path);
        assert_eq!(reply.echoed("cookie"), [with_others.as_str()]);
    }
    let stats = site.shield().stats();
    assert_eq!(
        (
            stats.challenges_issued,
            stats.challenges_solved,
            stats.clearances_accepted
        ),
        (1, 1, 3)
    );
}

#[tokio::test]
async fn an_expired_cookie_is_challenged_again() {
    let site = Site::start(json!({})).await;
    let cookie = pass(&site, "127.0.0.2", "/").await;
    site.clock.advance(Duration::from_secs(899));
    let reply = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "still valid");
    site.clock.advance(Duration::from_secs(2));
    let reply = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("defenra-challenge"), "{reply:?}");
    assert_eq!(site.shield().stats().clearances_rejected_expired, 1);
    // A challenge solved too late is refused, and the visitor gets a fresh one.
    let page = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), None))
        .await;
    site.clock.advance(Duration::from_secs(301));
    let late = site
        .send("127.0.0.2", post_form(HOST, solution(&page)))
        .await;
    assert_eq!(late.status, StatusCode::FORBIDDEN);
    assert!(late.header("set-cookie").is_empty());
    assert!(late.body.contains("defenra-challenge"));
    assert_eq!(site.shield().stats().challenges_failed_expired, 1);
    // The fresh challenge on that answer can be solved.
    let cleared = site
        .send("127.0.0.2", post_form(HOST, solution(&late)))
        .await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_cookie_from_another_network_or_host_is_refused() {
    let site = Site::start(json!({})).await;
    let cookie = pass(&site, "127.0.0.2", "/").await;
    // The cookie is for the /24: another address of it keeps the pass.
    let same_network = site
        .send("127.0.0.77", get(HOST, "/", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(same_network.status, StatusCode::OK);
    let other_network = site
        .send("127.0.1.2", get(HOST, "/", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(other_network.status, StatusCode::FORBIDDEN);
    let other_host = site
        .send(
            "127.0.0.2",
            get("www.shop.test", "/", Some(HTML), Some(&cookie)),
        )
        .await;
    assert_eq!(other_host.status, StatusCode::FORBIDDEN);
    let forged = format!("{cookie}x");
    let tampered = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), Some(&forged)))
        .await;
    assert_eq!(tampered.status, StatusCode::FORBIDDEN);
    let stats = site.shield().stats();
    assert_eq!(stats.clearances_rejected_foreign, 2);
    assert_eq!(stats.clearances_rejected_bad, 1);

    // A solution is bound to the exact address it was issued to.
    let page = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), None))
        .await;
    let elsewhere = site
        .send("127.0.0.3", post_form(HOST, solution(&page)))
        .await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);
    assert!(elsewhere.header("set-cookie").is_empty());
    assert_eq!(site.shield().stats().challenges_failed_foreign, 1);
}

#[tokio::test]
async fn the_rate_limited_address_gets_the_challenge_and_solving_lifts_the_block() {
    let site = Site::start(json!({ "rateLimit": { "windowSeconds": 10, "maxRequests": 3 } })).await;
    // The challenge page and the submit count like any request: this is the third.
    let cookie = pass(&site, "127.0.0.2", "/").await;
    let reply = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Over the limit: the challenge instead of 429, even with a valid cookie.
    let blocked = site
        .send("127.0.0.2", get(HOST, "/deep", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(blocked.status, StatusCode::FORBIDDEN);
    assert!(blocked.header("retry-after").is_empty());
    assert_eq!(form_field(&blocked.body, "url"), "/deep");
    let stats = site.shield().stats();
    assert_eq!((stats.blocks, stats.requests_limited), (1, 1));
    let again = site
        .send("127.0.0.2", get(HOST, "/deep", Some(HTML), Some(&cookie)))
        .await;
    assert_eq!(again.status, StatusCode::FORBIDDEN, "still blocked");
    // Its submit is accepted while blocked, and solving lifts the block.
    let cleared = site
        .send("127.0.0.2", post_form(HOST, solution(&again)))
        .await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER, "{cleared:?}");
    assert_eq!(cleared.header("location"), "/deep");
    let cookie = cookie_of(&cleared);
    // A clean slate: the whole burst again.
    for _ in 0..3 {
        let reply = site
            .send("127.0.0.2", get(HOST, "/deep", Some(HTML), Some(&cookie)))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-echo-path"), "/deep", "the origin answered");
    }
    // Another address was never affected.
    let other = site
        .send("127.0.0.3", get(HOST, "/", Some(HTML), None))
        .await;
    assert!(other.body.contains("defenra-challenge"));
}

#[tokio::test]
async fn whitelisted_addresses_and_acme_answers_are_never_challenged() {
    let site = Site::start(json!({ "ipWhitelist": ["127.0.0.4", "127.0.5.0/24"] })).await;
    for source in ["127.0.0.4", "127.0.5.9"] {
        let reply = site.send(source, get(HOST, "/", Some(HTML), None)).await;
        assert_eq!(reply.status, StatusCode::OK, "{source}");
    }
    let acme = site
        .send(
            "127.0.0.2",
            get(HOST, "/.well-known/acme-challenge/tok-1", None, None),
        )
        .await;
    assert_eq!(
        (acme.status, acme.body.as_str()),
        (StatusCode::OK, "tok-1.thumb")
    );
    let stats = site.shield().stats();
    assert_eq!(stats.challenges_issued, 0);
    assert_eq!(stats.whitelisted, 2);
}

#[tokio::test]
async fn the_submit_path_is_the_proxys_own_and_only_takes_a_posted_form() {
    let site = Site::start(json!({})).await;
    let get_submit = site
        .send("127.0.0.2", get(HOST, SUBMIT_PATH, Some(HTML), None))
        .await;
    assert_eq!(get_submit.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get_submit.header("allow"), "POST");
    let junk = site
        .send("127.0.0.2", post_form(HOST, "hello".to_owned()))
        .await;
    assert_eq!(junk.status, StatusCode::BAD_REQUEST);
    let bad_escape = site
        .send(
            "127.0.0.2",
            post_form(HOST, "challenge=%zz&nonce=1".to_owned()),
        )
        .await;
    assert_eq!(bad_escape.status, StatusCode::BAD_REQUEST);
    let huge = site
        .send("127.0.0.2", post_form(HOST, "x".repeat(20_000)))
        .await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    // A wrong nonce gets the challenge again, for the same return address.
    let page = site
        .send("127.0.0.2", get(HOST, "/a", Some(HTML), None))
        .await;
    let challenge = form_field(&page.body, "challenge");
    let wrong = site
        .send(
            "127.0.0.2",
            post_form(HOST, format!("challenge={challenge}&nonce=x1&url=%2Fa")),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(form_field(&wrong.body, "url"), "/a");
    // An off-site return address becomes the root.
    let mut offsite = solution(&page);
    offsite = offsite.replace("url=%2Fa", "url=%2F%2Fevil.test%2F");
    let cleared = site.send("127.0.0.2", post_form(HOST, offsite)).await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER);
    assert_eq!(cleared.header("location"), "/");
    assert_eq!(site.origin_connections(), 0);

    // With the challenge off, the path is the origin's like any other.
    site.proxy
        .reload(&challenged(json!({ "jsChallenge": { "enabled": false } })));
    let proxied = site
        .send("127.0.0.2", get(HOST, SUBMIT_PATH, Some(HTML), None))
        .await;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_eq!(proxied.header("x-echo-path"), SUBMIT_PATH);
}

#[tokio::test]
async fn a_chunked_submit_and_one_that_waits_for_100_continue_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let site = Site::start(json!({})).await;
    let page = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), None))
        .await;
    let form = solution(&page);
    let mut stream = connect_from("127.0.0.2", site.proxy.http).await.unwrap();
    let (first, second) = form.split_at(form.len() / 2);
    let request = format!(
        "POST {SUBMIT_PATH} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 303 "), "{response}");

    let page = site
        .send("127.0.0.2", get(HOST, "/", Some(HTML), None))
        .await;
    let form = solution(&page);
    let mut stream = connect_from("127.0.0.2", site.proxy.http).await.unwrap();
    let head = format!(
        "POST {SUBMIT_PATH} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        form.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = crate::support::read_head(&mut stream).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(form.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 303 "), "{response}");
}

#[tokio::test]
async fn https_cookies_are_secure() {
    let site = Site::start(json!({})).await;
    let tls = tls_connect(site.proxy.https, HOST, &[b"http/1.1"], TLS_ALL)
        .await
        .expect("handshake");
    let mut https = http1_over(tls).await;
    let page = collect(
        https
            .send_request(get(HOST, "/secure", Some(HTML), None))
            .await
            .unwrap(),
    )
    .await;
    let cleared = collect(
        https
            .send_request(post_form(HOST, solution(&page)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER);
    assert!(
        cleared.header("set-cookie").ends_with("; Secure"),
        "{cleared:?}"
    );
    let cookie = cookie_of(&cleared);
    let reply = collect(
        https
            .send_request(get(HOST, "/secure", Some(HTML), Some(&cookie)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn http2_clients_pass_with_the_cookie_split_over_several_fields() {
    let site = Site::start(json!({})).await;
    let stream = connect_from("127.0.0.2", site.proxy.http).await.unwrap();
    let mut h2 = http2_over::<_, Full<Bytes>>(stream).await;
    let h2_get = |cookies: &[&str]| {
        let mut builder = Request::builder()
            .uri(format!("http://{HOST}/h2"))
            .header("accept", HTML);
        for cookie in cookies {
            builder = builder.header("cookie", *cookie);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    };
    let page = collect(h2.send_request(h2_get(&[])).await.unwrap()).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    let submit = Request::builder()
        .method("POST")
        .uri(format!("http://{HOST}{SUBMIT_PATH}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(solution(&page))))
        .unwrap();
    let cleared = collect(h2.send_request(submit).await.unwrap()).await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER, "{cleared:?}");
    let cookie = cookie_of(&cleared);
    // RFC 9113 §8.2.3: a client may send each cookie as its own field.
    let reply = collect(
        h2.send_request(h2_get(&["theme=dark", &cookie, "lang=en"]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.echoed("cookie"),
        [format!("theme=dark; {cookie}; lang=en")]
    );
    // A stale copy first does not hide the valid one.
    let reply = collect(
        h2.send_request(h2_get(&["pass=stale", &cookie]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn clients_behind_a_proxy_header_are_challenged_on_their_own_address() {
    let site = Site::start(json!({ "proxyIpHeaders": ["CF-Connecting-IP"] })).await;
    let with_client = |client: &str, mut request: Request<Full<Bytes>>| {
        request
            .headers_mut()
            .insert("cf-connecting-ip", client.parse().unwrap());
        request
    };
    let page = site
        .send(
            "127.0.0.2",
            with_client("203.0.113.7", get(HOST, "/", None, None)),
        )
        .await;
    assert!(page.body.contains("Client 203.0.113.7,"), "{}", page.body);
    let page = site
        .send(
            "127.0.0.2",
            with_client("203.0.113.7", get(HOST, "/", Some(HTML), None)),
        )
        .await;
    assert!(page.body.contains("<dd>203.0.113.7</dd>"));
    // Posted through another address of the same proxy: the challenge is the client's.
    let cleared = site
        .send(
            "127.0.0.3",
            with_client("203.0.113.7", post_form(HOST, solution(&page))),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::SEE_OTHER, "{cleared:?}");
    let cookie = cookie_of(&cleared);
    let same_network = site
        .send(
            "127.0.0.9",
            with_client("203.0.113.99", get(HOST, "/", Some(HTML), Some(&cookie))),
        )
        .await;
    assert_eq!(same_network.status, StatusCode::OK);
    assert_eq!(same_network.echoed("x-real-ip"), ["203.0.113.99"]);
    let other_client = site
        .send(
            "127.0.0.2",
            with_client("198.51.100.7", get(HOST, "/", Some(HTML), Some(&cookie))),
        )
        .await;
    assert_eq!(other_client.status, StatusCode::FORBIDDEN);
}
