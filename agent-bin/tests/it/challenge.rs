//! The browser challenge end to end through the agent binary: headless Chromium (Debian's
//! `chromium`) loads a challenged page, solves it and lands on the origin's page while a
//! plain HTTP client gets the challenge at the same URL; agents sharing a key file accept
//! each other's cookies, and SIGHUP rotates a replaced key without refusing old cookies.
//!
//! The Chromium test fails when the browser is missing (`cargo xtask ci` and `cargo xtask
//! e2e` install it): a browser test that passes without a browser proves nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use defenra_shield::challenge::{ChallengeString, Difficulty, SUBMIT_PATH};
use serde_json::json;

use crate::e2e_support::start_origin;
use crate::support::{Agent, eventually, get_json};

const CHROMIUM: &str = "/usr/bin/chromium";
/// Real time Chromium may take before the test gives up on it.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);
const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

/// A config file with `shop.test` proxied to the origin, Anti-DDoS and the challenge on.
pub(crate) fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = json!({"domains": [{
        "domain": "shop.test",
        "httpProxy": {"enabled": true, "antiDDoS": {
            "enabled": true,
            "rateLimit": {"windowSeconds": 10, "maxRequests": 1000},
            "jsChallenge": {"enabled": true, "cookieName": "defenra_js_challenge", "ttlSeconds": 900}
        }},
        "dnsRecords": [{"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}]
    }]});
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

pub(crate) fn start_agent(config: &Path, origin: SocketAddr, extra: &[&str]) -> Agent {
    let port = origin.port().to_string();
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--origin-http-port",
        &port,
    ];
    args.extend(extra);
    let agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("a config is served", || {
        get_json(health, "/health").0 == 200
    });
    agent
}

/// A response read from a raw HTTP/1.1 exchange.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }
}

/// One request on its own connection (`Connection: close`), read to the end.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The value of a challenge page's hidden input `name`.
fn form_field(page: &str, name: &str) -> String {
    let marker = format!(r#"name="{name}" value=""#);
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in {page}"))
        + marker.len();
    let end = page[start..].find('"').unwrap() + start;
    page[start..end].to_owned()
}

/// Does what the page's script does: GET the page, solve, post; returns the cookie pair.
pub(crate) fn pass_challenge(agent: SocketAddr) -> String {
    let page = exchange(agent, "GET", "/account", &[("Accept", HTML)], "");
    assert_eq!(page.status, 403, "{page:?}");
    let challenge: ChallengeString = form_field(&page.body, "challenge").parse().unwrap();
    let bits: u32 = form_field(&page.body, "difficulty").parse().unwrap();
    let nonce = challenge.solve(Difficulty::new(bits).unwrap());
    let form = format!("challenge={challenge}&url=%2Faccount&nonce={nonce}");
    let cleared = exchange(agent, "POST", SUBMIT_PATH, &[("Accept", HTML)], &form);
    assert_eq!(cleared.status, 303, "{cleared:?}");
    assert_eq!(cleared.header("location"), Some("/account"));
    let set_cookie = cleared.header("set-cookie").expect("a cookie");
    set_cookie.split(';').next().unwrap().to_owned()
}

pub(crate) fn status_with_cookie(agent: SocketAddr, cookie: &str) -> u16 {
    exchange(agent, "GET", "/account", &[("Cookie", cookie)], "").status
}

/// A counter of the agent's `/stats` shield object.
fn shield_stat(agent: &Agent, name: &str) -> u64 {
    let (_, stats) = get_json(agent.addr("health"), "/stats");
    stats["shield"][name].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_passes_the_challenge_through_the_agent_and_a_plain_client_does_not() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let state = dir.path().join("state");
    let agent = start_agent(
        &config,
        origin,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--challenge-difficulty",
            "14",
        ],
    );
    let http = agent.addr("http");

    // The key was created in the state directory, private to its owner.
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(state.join("shield.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);

    let url = format!("http://shop.test:{}/hello?from=chromium", http.port());
    let dom = tokio::task::spawn_blocking(move || {
        dump_dom(
            &url,
            &["--host-resolver-rules=MAP shop.test 127.0.0.1".to_owned()],
        )
    })
    .await
    .unwrap();
    assert!(
        dom.contains(&format!(
            "origin saw GET /hello host=shop.test:{}",
            http.port()
        )),
        "Chromium did not end on the origin's page:\n{dom}"
    );
    assert_eq!(shield_stat(&agent, "challenges_solved_total"), 1);
    assert!(shield_stat(&agent, "clearances_accepted_total") >= 1);

    // The same URL without the browser's cookie: the challenge, never the origin.
    let curl = exchange(
        http,
        "GET",
        "/hello?from=chromium",
        &[("Accept", "*/*")],
        "",
    );
    assert_eq!(curl.status, 403, "{curl:?}");
    assert!(curl.body.contains("JavaScript check"), "{}", curl.body);
    assert!(!curl.body.contains("origin saw"));
    assert_eq!(curl.header("x-request-id").map(str::len), Some(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_a_key_file_accept_each_others_cookies_and_sighup_rotates_it() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let key = dir.path().join("fleet.key");
    write_key(&key, 0xab);
    let flags = [
        "--shield-key-file",
        key.to_str().unwrap(),
        "--challenge-difficulty",
        "8",
    ];
    let first = start_agent(&config, origin, &flags);
    let second = start_agent(&config, origin, &flags);
    let (first_http, second_http) = (first.addr("http"), second.addr("http"));

    let cookie = pass_challenge(first_http);
    assert_eq!(status_with_cookie(first_http, &cookie), 200);
    assert_eq!(
        status_with_cookie(second_http, &cookie),
        200,
        "the fleet shares the key"
    );

    // The file is replaced and the first agent told: it signs with the new key and still
    // accepts cookies of the old one.
    write_key(&key, 0xcd);
    first.signal("HUP");
    wait_for_log(&first, "shield key rotated");
    assert_eq!(
        status_with_cookie(first_http, &cookie),
        200,
        "old cookies live on"
    );
    let new_cookie = pass_challenge(first_http);
    assert_eq!(status_with_cookie(first_http, &new_cookie), 200);
    assert_eq!(
        status_with_cookie(second_http, &new_cookie),
        403,
        "the second agent does not know the new key yet"
    );
    second.signal("HUP");
    wait_for_log(&second, "shield key rotated");
    assert_eq!(status_with_cookie(second_http, &new_cookie), 200);
    assert_eq!(status_with_cookie(second_http, &cookie), 200);

    // A broken key file is not taken: the current key stays.
    std::fs::write(&key, "not a key").unwrap();
    first.signal("HUP");
    wait_for_log(&first, "shield key not re-read; the current key stays");
    assert_eq!(status_with_cookie(first_http, &new_cookie), 200);
}

/// Writes a key file of 32 bytes `byte` in hex, mode 0600, replacing any.
fn write_key(path: &Path, byte: u8) {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .unwrap();
    writeln!(file, "{}", format!("{byte:02x}").repeat(32)).unwrap();
    drop(file);
    std::fs::rename(&temporary, path).unwrap();
}

/// Waits up to 10 s for a log line with `message`.
fn wait_for_log(agent: &Agent, message: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = agent
            .logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no {message:?} log line within 10 s"));
        if line["message"] == message {
            return;
        }
    }
}

/// Runs headless Chromium on `url` and returns the DOM it ends with (the command line of
/// `cargo xtask chromium dump`).
fn dump_dom(url: &str, extra: &[String]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: this test needs Debian's chromium package; install it with \
         `cargo xtask chromium install` (as root) or `sudo apt-get install -y chromium`"
    );
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
