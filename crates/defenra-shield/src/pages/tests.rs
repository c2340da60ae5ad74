//! The pages as a visitor gets them: status, reason, address and request id in both
//! formats, escaping of everything inserted, the challenge form, headers and sizes.

use std::net::IpAddr;

use super::*;
use crate::challenge::{KeyRing, ShieldKey};

const CLIENT: &str = "192.0.2.7";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn request_id() -> RequestId {
    RequestIds::with_seed(1, [2, 3]).next()
}

fn render(page: &Page<'_>, format: Format) -> String {
    let body = Pages::new().render(page, format, ip(CLIENT), &request_id());
    String::from_utf8(body).expect("UTF-8")
}

fn challenge() -> ChallengeString {
    KeyRing::new(&ShieldKey::from_bytes([1; 32])).issue_challenge(
        ip(CLIENT),
        "example.com",
        Difficulty::DEFAULT,
        1_800_000_000,
    )
}

fn error_pages() -> Vec<(Page<'static>, u16, &'static str)> {
    vec![
        (Page::Forbidden, 403, "security rules"),
        (Page::NotFound, 404, "No site of this name"),
        (
            Page::TooManyRequests { retry_after: 37 },
            429,
            "Try again in 37 seconds.",
        ),
        (
            Page::TooManyRequests { retry_after: 1 },
            429,
            "Try again in 1 second.",
        ),
        (Page::BadGateway, 502, "could not be reached"),
        (Page::ServiceUnavailable, 503, "cannot answer right now"),
        (Page::GatewayTimeout, 504, "did not answer in time"),
    ]
}

#[test]
fn every_error_page_shows_status_reason_address_and_request_id() {
    let id = request_id();
    for (page, status, reason) in error_pages() {
        assert_eq!(page.status(), status);
        let html = render(&page, Format::Html);
        assert!(html.starts_with("<!doctype html>"), "{html}");
        assert!(html.contains(&format!("<dd>{status} ")), "{status}: {html}");
        assert!(html.contains(reason), "{status}: {html}");
        assert!(html.contains(&format!("<dd>{CLIENT}</dd>")), "{html}");
        assert!(html.contains(&format!("<code>{id}</code>")), "{html}");
        assert!(!html.contains("{{"), "unfilled slot: {html}");
        assert!(!html.contains("<script"), "only the challenge has a script");
        assert!(!html.contains("<form"), "only the challenge has a form");
        assert!(html.len() < 2048, "{status}: {} bytes", html.len());

        let text = render(&page, Format::Text);
        assert!(text.starts_with(&format!("{status} ")), "{text}");
        assert!(text.contains(reason), "{text}");
        assert!(
            text.contains(&format!("Client {CLIENT}, request ID {id}.")),
            "{text}"
        );
        assert!(
            text.ends_with(".\n") && text.lines().count() == 1,
            "{text:?}"
        );
        assert!(!text.contains('<') && !text.contains("{{"), "{text}");
    }
}

#[test]
fn the_challenge_page_carries_the_machine_readable_form() {
    let challenge = challenge();
    let page = Page::Challenge(ChallengeForm {
        challenge: &challenge,
        difficulty: Difficulty::DEFAULT,
        url: "/shop?item=1&lang=en",
        method: "GET",
    });
    assert_eq!(page.status(), 403);
    let html = render(&page, Format::Html);
    for expected in [
        format!(r#"<form id="defenra-challenge" method="post" action="{SUBMIT_PATH}">"#),
        format!(r#"<input type="hidden" name="challenge" value="{challenge}">"#),
        r#"<input type="hidden" name="difficulty" value="16">"#.to_owned(),
        r#"<input type="hidden" name="url" value="/shop?item=1&amp;lang=en">"#.to_owned(),
        r#"<input type="hidden" name="nonce" value="">"#.to_owned(),
        "<noscript>".to_owned(),
        format!("<dd>{CLIENT}</dd>"),
        "<dd>403 Forbidden</dd>".to_owned(),
    ] {
        assert!(html.contains(&expected), "missing {expected}: {html}");
    }
    assert!(
        !html.contains("loaded again with GET"),
        "a GET needs no note"
    );
    assert!(!html.contains("{{"), "{html}");
    // Self-contained and small: no external resource, a few KiB.
    assert!(!html.contains("src=") && !html.contains("href="), "{html}");
    assert!(html.len() < 7 * 1024, "{} bytes", html.len());

    let text = render(&page, Format::Text);
    assert!(text.starts_with("403 Forbidden: "), "{text}");
    assert!(
        text.contains("JavaScript") && text.lines().count() == 1,
        "{text}"
    );
}

#[test]
fn a_challenged_post_is_told_it_comes_back_as_a_get() {
    let challenge = challenge();
    let page = Page::Challenge(ChallengeForm {
        challenge: &challenge,
        difficulty: Difficulty::DEFAULT,
        url: "/login",
        method: "POST",
    });
    let html = render(&page, Format::Html);
    assert!(html.contains("Your browser sent a POST request"), "{html}");
    assert!(html.contains("loaded again with GET"), "{html}");
    let head = Page::Challenge(ChallengeForm {
        method: "head",
        ..match page {
            Page::Challenge(form) => form,
            _ => unreachable!("built above"),
        }
    });
    assert!(!render(&head, Format::Html).contains("loaded again"));
}

#[test]
fn everything_inserted_is_escaped_and_foreign_urls_become_the_root() {
    let challenge = challenge();
    let hostile = Page::Challenge(ChallengeForm {
        challenge: &challenge,
        difficulty: Difficulty::DEFAULT,
        url: r#"/a"><script>alert('x')</script>&b"#,
        method: "<b>X</b>",
    });
    let html = render(&hostile, Format::Html);
    assert!(
        html.contains(
            r#"value="/a&quot;&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;b""#
        ),
        "{html}"
    );
    assert!(
        html.contains("sent a &lt;b&gt;X&lt;/b&gt; request"),
        "{html}"
    );
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );

    for foreign in [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "",
    ] {
        let page = Page::Challenge(ChallengeForm {
            challenge: &challenge,
            difficulty: Difficulty::DEFAULT,
            url: foreign,
            method: "GET",
        });
        assert!(
            render(&page, Format::Html).contains(r#"name="url" value="/">"#),
            "{foreign}"
        );
    }

    let mut escaped = Vec::new();
    escape_html(&mut escaped, "plain & <tag> \"q\" 'a' é".as_bytes());
    assert_eq!(
        String::from_utf8(escaped).expect("utf-8"),
        "plain &amp; &lt;tag&gt; &quot;q&quot; &#39;a&#39; é"
    );
}

#[test]
fn ipv6_and_mapped_clients_are_shown_canonically() {
    let pages = Pages::new();
    for (client, shown) in [
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:192.0.2.9", "192.0.2.9"),
    ] {
        let html = pages.render(&Page::NotFound, Format::Html, ip(client), &request_id());
        let html = String::from_utf8(html).expect("utf-8");
        assert!(html.contains(&format!("<dd>{shown}</dd>")), "{html}");
    }
}

#[test]
fn the_policy_allows_exactly_the_pages_own_script_and_style() {
    let pages = Pages::new();
    let headers: Vec<(&str, &str)> = pages.headers(Format::Html).collect();
    let csp = headers
        .iter()
        .find(|(name, _)| *name == "content-security-policy")
        .expect("html pages have a CSP")
        .1;
    assert!(headers.contains(&("cache-control", "no-store")));
    assert!(headers.contains(&("content-type", "text/html; charset=utf-8")));
    let challenge = challenge();
    let html = render(
        &Page::Challenge(ChallengeForm {
            challenge: &challenge,
            difficulty: Difficulty::DEFAULT,
            url: "/",
            method: "GET",
        }),
        Format::Html,
    );
    let between = |open: &str, close: &str| {
        let start = html.find(open).expect("open") + open.len();
        let end = html[start..].find(close).expect("close") + start;
        html[start..end].to_owned()
    };
    let script = between("<script>", "</script>");
    let style = between("<style>", "</style>");
    assert!(
        csp.contains(&format!("script-src 'sha256-{}'", csp_hash(&script))),
        "{csp}"
    );
    assert!(
        csp.contains(&format!("style-src 'sha256-{}'", csp_hash(&style))),
        "{csp}"
    );
    assert!(csp.starts_with("default-src 'none';") && csp.contains("form-action 'self'"));

    let text: Vec<(&str, &str)> = pages.headers(Format::Text).collect();
    assert!(text.contains(&("content-type", "text/plain; charset=utf-8")));
    assert!(text.contains(&("cache-control", "no-store")));
    assert!(
        text.iter()
            .all(|(name, _)| *name != "content-security-policy")
    );
}

#[test]
fn the_sent_script_has_no_comments_or_indentation() {
    let script = minify(SCRIPT_SOURCE);
    assert!(!script.contains("//"), "{script}");
    assert!(
        script
            .lines()
            .all(|line| line == line.trim() && !line.is_empty())
    );
    assert!(
        script.len() < SCRIPT_SOURCE.len() * 3 / 4,
        "{} bytes",
        script.len()
    );
}

#[test]
fn html_goes_to_browsers_and_one_line_to_everyone_else() {
    let format = |fields: &[&str]| Format::from_accept(fields.iter().map(|f| f.as_bytes()));
    let firefox = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    assert_eq!(format(&[firefox]), Format::Html);
    assert_eq!(format(&["application/xhtml+xml"]), Format::Html);
    assert_eq!(
        format(&["application/json", "TEXT/HTML; q=0.5"]),
        Format::Html
    );
    assert_eq!(format(&["*/*"]), Format::Text, "curl");
    assert_eq!(format(&[]), Format::Text, "no Accept");
    assert_eq!(format(&["application/json"]), Format::Text);
    assert_eq!(format(&["text/html;q=0"]), Format::Text, "refused");
    assert_eq!(format(&["text/html; q=0.000, text/plain"]), Format::Text);
    assert_eq!(format(&["text/htmlx"]), Format::Text);
}

#[test]
fn the_page_table_is_in_the_order_of_its_kinds() {
    for (index, text) in KINDS.iter().enumerate() {
        assert_eq!(text.kind as usize, index, "{}", text.heading);
    }
}
