//! The challenge page in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `cargo xtask chromium install`) loads a challenged URL from a small HTTP server in this
//! test, solves the proof of work, posts it, gets the clearance cookie and ends on the
//! origin's page; and the page's pure-JavaScript SHA-256 and both searches are checked
//! against known vectors and this crate's own solver.
//!
//! These tests fail when Chromium is missing: a browser test that passes without a browser
//! would prove nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defenra_shield::challenge::{
    Clearance, Difficulty, KeyRing, SUBMIT_PATH, Scheme, ShieldKey, parse_submission, set_cookie,
    unix_now,
};
use defenra_shield::pages::{ChallengeForm, Format, Page, Pages, RequestIds};

const CHROMIUM: &str = "/usr/bin/chromium";
const COOKIE: &str = "defenra_js_challenge";
/// Real time Chromium may take before the test gives up on it.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);
/// One browser at a time: three at once on a two-core machine only make each one slower.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

#[test]
fn chromium_solves_the_challenge_and_lands_on_the_origin_page() {
    let site = Site::start(Difficulty::new(14).expect("difficulty"));
    let url = format!("http://127.0.0.1:{}/shop/item?id=7&q=%22x%22", site.port());
    let dom = dump_dom(&url, &[]);
    assert!(
        dom.contains(r#"<p id="origin">ORIGIN OK /shop/item?id=7&amp;q=%22x%22</p>"#),
        "{dom}"
    );
    // 127.0.0.1 is a secure context: WebCrypto was on offer (the page races it).
    assert!(dom.contains(r#"<p id="secure">true</p>"#), "{dom}");
    let log = site.log();
    assert_eq!(log.challenges, 1, "{log:?}");
    assert_eq!(log.solutions.len(), 1, "{log:?}");
    assert_eq!(log.rejected, Vec::<String>::new());
    assert_eq!(log.cleared, 1, "the redirected request carried the cookie");
}

#[test]
fn chromium_solves_it_with_pure_javascript_on_a_plain_http_host() {
    let site = Site::start(Difficulty::new(14).expect("difficulty"));
    // A name that is not localhost, over plain HTTP: not a secure context, so no WebCrypto.
    let url = format!("http://challenge.test:{}/plain", site.port());
    let dom = dump_dom(
        &url,
        &["--host-resolver-rules=MAP challenge.test 127.0.0.1".to_owned()],
    );
    assert!(
        dom.contains(r#"<p id="origin">ORIGIN OK /plain</p>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<p id="secure">false</p>"#), "{dom}");
    let log = site.log();
    assert_eq!(log.solutions.len(), 1, "{log:?}");
    assert!(
        log.solutions[0].starts_with("js "),
        "solved by {:?}",
        log.solutions[0]
    );
    assert_eq!(log.cleared, 1);
}

#[test]
fn the_page_script_hashes_known_vectors_and_finds_the_lowest_nonce() {
    let keys = KeyRing::new(&ShieldKey::from_bytes([9; 32]));
    let client: IpAddr = "127.0.0.1".parse().expect("ip");
    let difficulty = Difficulty::new(12).expect("difficulty");
    let challenge = keys.issue_challenge(client, "vectors.test", difficulty, unix_now());
    let lowest = challenge.solve(difficulty);

    // Known answers (FIPS 180-4 examples, NIST's long message) and lengths around the block
    // and padding boundaries, computed here with ring.
    let mut vectors: Vec<(String, String)> = vec![
        (
            "''".to_owned(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned(),
        ),
        (
            "'abc'".to_owned(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_owned(),
        ),
        (
            "'abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq'".to_owned(),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1".to_owned(),
        ),
        (
            "'a'.repeat(1000000)".to_owned(),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0".to_owned(),
        ),
    ];
    for length in [1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000] {
        let text = "x".repeat(length);
        vectors.push((format!("'x'.repeat({length})"), sha256_hex(text.as_bytes())));
    }
    vectors.push((
        "'\\u00e9\\u6f22\\u5b57'".to_owned(),
        sha256_hex("é漢字".as_bytes()),
    ));
    let checks: Vec<String> = vectors
        .iter()
        .map(|(expression, hex)| format!("[{expression}, '{hex}']"))
        .collect();

    let script = page_script();
    let vectors_page = format!(
        r#"<!doctype html><html><body><pre id="out">running</pre>
<script>{script}</script>
<script>
var out = [], api = window.defenraChallenge;
[{checks}].forEach(function (check, i) {{
  var got = api.sha256(check[0]);
  out.push((got === check[1] ? "PASS" : "FAIL") + " vector " + i + " " + got);
}});
var js = api.searchJs("{challenge}", {bits}, 0, 100000000);
out.push((js === {lowest} ? "PASS" : "FAIL") + " searchJs " + js);
var generic = api.searchJs("{challenge}!", 8, 0, 100000);
out.push((generic === {generic} ? "PASS" : "FAIL") + " searchJs (not one block) " + generic);
api.searchWebCrypto("{challenge}", {bits}, 0, {lowest} + 1).then(function (n) {{
  out.push((n === {lowest} ? "PASS" : "FAIL") + " searchWebCrypto " + n);
}}, function (e) {{
  out.push("FAIL searchWebCrypto threw " + e);
}}).then(function () {{
  document.getElementById("out").textContent = out.join("\n") + "\nDONE";
}});
</script></body></html>"#,
        checks = checks.join(",\n"),
        bits = difficulty.bits(),
        generic = solve_generic(&format!("{challenge}!"), 8),
    );
    let server = Server::start(Arc::new(move |request: &Request| {
        if request.path == "/vectors" {
            Response::html(200, vectors_page.clone())
        } else {
            Response::text(404, "not found\n")
        }
    }));
    let dom = dump_dom(&format!("http://127.0.0.1:{}/vectors", server.port()), &[]);
    let out = dom
        .split(r#"<pre id="out">"#)
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or_else(|| panic!("no output in {dom}"));
    assert!(out.ends_with("DONE"), "{out}");
    let lines: Vec<&str> = out.lines().filter(|line| *line != "DONE").collect();
    assert_eq!(lines.len(), vectors.len() + 3, "{out}");
    assert!(lines.iter().all(|line| line.starts_with("PASS")), "{out}");
}

/// The script exactly as the challenge page sends it.
fn page_script() -> String {
    let keys = KeyRing::new(&ShieldKey::from_bytes([9; 32]));
    let client: IpAddr = "127.0.0.1".parse().expect("ip");
    let challenge = keys.issue_challenge(client, "x", Difficulty::DEFAULT, 0);
    let page = Page::Challenge(ChallengeForm {
        challenge: &challenge,
        difficulty: Difficulty::DEFAULT,
        url: "/",
        method: "GET",
    });
    let html = Pages::new().render(&page, Format::Html, client, &RequestIds::new().next());
    let html = String::from_utf8(html).expect("UTF-8");
    let start = html.find("<script>").expect("a script") + "<script>".len();
    let end = html[start..].find("</script>").expect("its end") + start;
    html[start..end].to_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn solve_generic(challenge: &str, bits: u32) -> u64 {
    (0..)
        .find(|nonce| {
            let digest = ring::digest::digest(
                &ring::digest::SHA256,
                format!("{challenge}{nonce}").as_bytes(),
            );
            defenra_shield::challenge::leading_zero_bits(digest.as_ref()) >= bits
        })
        .expect("a nonce")
}

/// A site behind the challenge, as the proxy will run it: no clearance, the challenge page;
/// a valid submission, the cookie and a redirect; a valid cookie, the origin's page.
struct Site {
    server: Server,
    log: Arc<Mutex<SiteLog>>,
}

#[derive(Debug, Default)]
struct SiteLog {
    challenges: usize,
    /// The `engine` field of each accepted solution ("js 12ms", "webcrypto 80ms").
    solutions: Vec<String>,
    rejected: Vec<String>,
    cleared: usize,
}

impl Site {
    fn start(difficulty: Difficulty) -> Site {
        let keys = KeyRing::new(&ShieldKey::generate().expect("random key"));
        let pages = Pages::new();
        let ids = RequestIds::new();
        let log = Arc::new(Mutex::new(SiteLog::default()));
        let site_log = Arc::clone(&log);
        let handler = move |request: &Request| -> Response {
            let host = request.host();
            let now = unix_now();
            let ttl = Duration::from_secs(900);
            let mut log = site_log.lock().expect("log");
            if request.path == "/favicon.ico" {
                return Response::text(404, "not found\n");
            }
            if request.method == "POST" && request.path == SUBMIT_PATH {
                let submission = match parse_submission(&request.body) {
                    Ok(submission) => submission,
                    Err(error) => {
                        log.rejected.push(error.to_string());
                        return Response::text(400, "bad form\n");
                    }
                };
                let verified = keys.verify_solution(
                    submission.challenge.as_bytes(),
                    submission.nonce.as_bytes(),
                    request.peer.ip(),
                    host,
                    difficulty,
                    now,
                );
                if let Err(rejection) = verified {
                    log.rejected.push(rejection.as_str().to_owned());
                    return Response::text(403, "rejected\n");
                }
                let engine = form_field(&request.body, "engine");
                log.solutions.push(engine.replace('+', " "));
                let token = keys.issue_clearance(request.peer.ip(), host, ttl, now);
                return Response {
                    status: 303,
                    headers: vec![
                        ("location".to_owned(), submission.url.into_owned()),
                        (
                            "set-cookie".to_owned(),
                            set_cookie(COOKIE, &token, ttl, Scheme::Http),
                        ),
                    ],
                    body: Vec::new(),
                };
            }
            let cookies = request.headers.get("cookie").map(String::as_bytes);
            let clearance = keys.check_cookies(cookies, COOKIE, request.peer.ip(), host, now);
            if clearance == Clearance::Valid {
                log.cleared += 1;
                let path = request.target.replace('&', "&amp;");
                return Response::html(
                    200,
                    format!(
                        "<!doctype html><html><body><p id=\"origin\">ORIGIN OK {path}</p>\
                         <script>document.body.insertAdjacentHTML('beforeend', \
                         '<p id=\"secure\">' + window.isSecureContext + '</p>')</script>\
                         </body></html>"
                    ),
                );
            }
            log.challenges += 1;
            let challenge = keys.issue_challenge(request.peer.ip(), host, difficulty, now);
            let page = Page::Challenge(ChallengeForm {
                challenge: &challenge,
                difficulty,
                url: &request.target,
                method: &request.method,
            });
            let accept = request.headers.get("accept").map(String::as_bytes);
            let format = Format::from_accept(accept);
            let request_id = ids.next();
            let mut headers: Vec<(String, String)> = pages
                .headers(format)
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            headers.push(("x-request-id".to_owned(), request_id.to_string()));
            Response {
                status: page.status(),
                headers,
                body: pages.render(&page, format, request.peer.ip(), &request_id),
            }
        };
        Site {
            server: Server::start(Arc::new(handler)),
            log,
        }
    }

    fn port(&self) -> u16 {
        self.server.port()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, SiteLog> {
        self.log.lock().expect("log")
    }
}

fn form_field(body: &[u8], name: &str) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_owned))
        .unwrap_or_default()
}

/// Runs Chromium on `url` the way `cargo xtask chromium dump` does and returns the final
/// DOM.
fn dump_dom(url: &str, extra: &[String]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser tests need Debian's chromium package; install it \
         with `cargo xtask chromium install` (as root) or `sudo apt-get install -y chromium`"
    );
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=30000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > CHROMIUM_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish {url} within {CHROMIUM_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = out.join().expect("stdout reader");
    let errors = err.join().expect("stderr reader");
    assert!(status.success(), "chromium failed ({status}): {errors}");
    dom
}

/// A request as the test server read it.
struct Request {
    method: String,
    /// The request target as sent (`/path?query`).
    target: String,
    /// The path part of the target.
    path: String,
    /// Lower-case names; the last field of a name wins (enough for this browser).
    headers: HashMap<String, String>,
    body: Vec<u8>,
    peer: SocketAddr,
}

impl Request {
    /// The Host header without its port.
    fn host(&self) -> &str {
        let host = self.headers.get("host").map_or("", String::as_str);
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn html(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![(
                "content-type".to_owned(),
                "text/html; charset=utf-8".to_owned(),
            )],
            body: body.into_bytes(),
        }
    }

    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![("content-type".to_owned(), "text/plain".to_owned())],
            body: body.as_bytes().to_vec(),
        }
    }
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// HTTP/1.1 on 127.0.0.1:0, one thread per connection, one request per connection.
struct Server {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    accepter: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(handler: Handler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let accepter = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let handler = Arc::clone(&handler);
                std::thread::spawn(move || {
                    let _ = serve(stream, &*handler);
                });
            }
        });
        Server {
            address,
            stop,
            accepter: Some(accepter),
        }
    }

    fn port(&self) -> u16 {
        self.address.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.address);
        if let Some(accepter) = self.accepter.take() {
            let _ = accepter.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    handler: &(dyn Fn(&Request) -> Response + Send + Sync),
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut field = String::new();
        reader.read_line(&mut field)?;
        let field = field.trim_end();
        if field.is_empty() {
            break;
        }
        if let Some((name, value)) = field.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let request = Request {
        method,
        target,
        path,
        headers,
        body,
        peer,
    };
    let response = handler(&request);
    let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        response.body.len()
    ));
    let mut stream = stream;
    stream.write_all(head.as_bytes())?;
    stream.write_all(&response.body)?;
    stream.flush()
}
