//! CPU cost of the challenge's building blocks, per operation, on one core.
//!
//! ```text
//! cargo run --release -p defenra-shield --example challenge_cost [ITERATIONS]
//! ```
//! Run it in release on a quiet machine; a debug build measures the debug build. The issue's
//! targets: verifying a valid clearance well under 1 µs (a request with a valid cookie may
//! cost at most 2 µs more), and issuing a challenge (sign + render) no dearer than nginx
//! serving a static 1 KiB page. Not a test: it asserts only that what it times is correct.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use defenra_shield::challenge::{
    Difficulty, KeyRing, Scheme, ShieldKey, parse_submission, set_cookie,
};
use defenra_shield::pages::{ChallengeForm, Format, Page, Pages, RequestIds};

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(200_000);
    let keys = KeyRing::new(&ShieldKey::from_bytes([7; 32]));
    let pages = Pages::new();
    let ids = RequestIds::new();
    let client: IpAddr = "203.0.113.45".parse().expect("address");
    let host = "www.example.com";
    let now = 1_800_000_000;
    let ttl = Duration::from_secs(900);
    let difficulty = Difficulty::DEFAULT;

    let token = keys.issue_clearance(client, host, ttl, now);
    assert_eq!(
        keys.verify_clearance(token.as_str().as_bytes(), client, host, now),
        Ok(())
    );
    let cookie_header = format!(
        "_ga=GA1.2.1234567890.1700000000; session=abcdef0123456789abcdef; theme=dark; \
         defenra_js_challenge={token}; consent=yes"
    );
    let challenge = keys.issue_challenge(client, host, difficulty, now);
    let nonce = challenge.solve(difficulty).to_string();
    let body = format!(
        "challenge={challenge}&difficulty=16&url=%2Fshop%3Fid%3D7&nonce={nonce}&engine=js+80ms"
    );
    assert!(parse_submission(body.as_bytes()).is_ok());
    assert_eq!(
        keys.verify_solution(
            challenge.as_str().as_bytes(),
            nonce.as_bytes(),
            client,
            host,
            difficulty,
            now
        ),
        Ok(())
    );

    println!("{iterations} iterations each, ns per operation:");
    time("verify a valid clearance token", iterations, || {
        keys.verify_clearance(black_box(token.as_str().as_bytes()), client, host, now)
            .is_ok()
    });
    time(
        "find + verify the cookie in a 5-cookie header",
        iterations,
        || {
            keys.check_cookies(
                [black_box(cookie_header.as_bytes())],
                "defenra_js_challenge",
                client,
                host,
                now,
            )
        },
    );
    time("request id", iterations, || ids.next());
    time("issue a challenge string", iterations, || {
        keys.issue_challenge(black_box(client), host, difficulty, now)
    });
    let request_id = ids.next();
    time("render the challenge page (html)", iterations, || {
        let page = Page::Challenge(ChallengeForm {
            challenge: &challenge,
            difficulty,
            url: black_box("/shop/item?id=7&ref=home"),
            method: "GET",
        });
        pages.render(&page, Format::Html, client, &request_id)
    });
    time(
        "issue + render a challenge (html), with its id",
        iterations,
        || {
            let challenge = keys.issue_challenge(black_box(client), host, difficulty, now);
            let page = Page::Challenge(ChallengeForm {
                challenge: &challenge,
                difficulty,
                url: "/shop/item?id=7&ref=home",
                method: "GET",
            });
            pages.render(&page, Format::Html, client, &ids.next())
        },
    );
    time("render a 429 page (text)", iterations, || {
        pages.render(
            &Page::TooManyRequests { retry_after: 120 },
            Format::Text,
            black_box(client),
            &request_id,
        )
    });
    time("parse a submitted form", iterations, || {
        parse_submission(black_box(body.as_bytes())).is_ok()
    });
    time("verify a solution (HMAC + SHA-256)", iterations, || {
        keys.verify_solution(
            black_box(challenge.as_str().as_bytes()),
            nonce.as_bytes(),
            client,
            host,
            difficulty,
            now,
        )
        .is_ok()
    });
    time("issue a clearance + Set-Cookie value", iterations, || {
        let token = keys.issue_clearance(black_box(client), host, ttl, now);
        set_cookie("defenra_js_challenge", &token, ttl, Scheme::Https)
    });
}

fn time<T>(name: &str, iterations: u32, mut operation: impl FnMut() -> T) {
    // Warm caches and branch predictors first.
    for _ in 0..iterations / 10 {
        black_box(operation());
    }
    let started = Instant::now();
    for _ in 0..iterations {
        black_box(operation());
    }
    let per_op = started.elapsed().as_nanos() as f64 / f64::from(iterations.max(1));
    println!("{per_op:>10.0}  {name}");
}
