//! `cargo xtask bench challenge`: what the browser challenge costs the agent, beside what
//! it costs nginx to serve a static 1 KiB page and the agent to proxy one, on the same
//! machine, driven by wrk over plain HTTP on loopback.
//!
//! One agent serves three names in front of the same nginx origin (`www/index.html`, 1 KiB):
//! `plain.test` (no protection), `shield.test` (Anti-DDoS, rate limit only) and
//! `challenge.test` (Anti-DDoS and the challenge). The runs, each measured by the CPU time
//! of the serving processes:
//! - nginx serving the 1 KiB file itself;
//! - the agent proxying `plain.test` and `shield.test`;
//! - challenges issued: browser requests to `challenge.test` without a cookie (every answer
//!   is the 403 challenge page, one HMAC and the page rendered);
//! - clearances verified: the same requests with a valid cookie, proxied to the origin (one
//!   HMAC more than `shield.test`; the proxied runs all carry the same Cookie header, so
//!   the request bytes are the same and only the check differs).
//!
//! Reach (issue 13): a challenge costs no more CPU than nginx's static page; a request with
//! a valid cookie at most 2 µs more than the same request without the challenge.
//!
//! Options: `--duration SECS` (10) per run, `--rounds N` (5; the runs take turns and each
//! shows its median round by CPU per request), `--connections N` (50), `--threads N` (2),
//! `--skip-build`, `--agent PATH` (a built agent binary instead of the release build).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::common::{Server, agent_on, free_port, process_tree_cpu_ticks, wait_for_port};
use super::http::{ensure_tools, origin_conf};
use super::wrk::{WrkResult, wrk_with};
use crate::{cargo, run_command};

const PLAIN: &str = "plain.test";
const SHIELD: &str = "shield.test";
const CHALLENGE: &str = "challenge.test";
const COOKIE: &str = "defenra_js_challenge";
/// What a browser sends for a page: the challenge is answered as HTML.
const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    ensure_tools()?;
    let agent_binary = match &settings.agent {
        Some(path) => path.clone(),
        None => {
            if !settings.skip_build {
                run_command(&cargo(), &["build", "--release", "-p", "defenra-agent"])?;
            }
            crate::target_dir().join("release/defenra-agent")
        }
    };
    anyhow::ensure!(
        agent_binary.exists(),
        "{} is missing",
        agent_binary.display()
    );

    let dir = std::env::temp_dir().join(format!("defenra-bench-challenge-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), vec![b'x'; 1024])?;

    let origin_port = free_port()?;
    let agent_port = free_port()?;
    let origin = Server::nginx(&dir, "origin", &origin_conf(&dir, origin_port), None)?;
    let agent = start_agent(&dir, &agent_binary, origin_port, agent_port)?;
    wait_for_port(origin_port)?;
    wait_for_port(agent_port)?;

    // Every run must get the answer it claims to measure before anything is measured.
    let cookie = obtain_cookie(agent_port)?;
    let probes = [
        (origin_port, PLAIN, vec![], 200, "x".repeat(1024)),
        (agent_port, PLAIN, vec![], 200, "x".repeat(1024)),
        (agent_port, SHIELD, vec![], 200, "x".repeat(1024)),
        (
            agent_port,
            CHALLENGE,
            vec![format!("Accept: {HTML}")],
            403,
            "defenra-challenge".to_owned(),
        ),
        (
            agent_port,
            CHALLENGE,
            vec![format!("Cookie: {cookie}")],
            200,
            "x".repeat(1024),
        ),
    ];
    for (port, host, headers, status, body) in &probes {
        let (got, text) = get(*port, host, headers)?;
        anyhow::ensure!(
            got == *status && text.contains(body.as_str()),
            "{host} on port {port} answered {got} instead of {status}:\n{text}"
        );
    }

    let url = |port: u16| format!("http://127.0.0.1:{port}/index.html");
    let runs: [(&str, u16, u32, Vec<String>); 5] = [
        (
            "nginx: static 1 KiB page",
            origin_port,
            origin.pid(),
            vec![],
        ),
        (
            "agent: proxy, no protection",
            agent_port,
            agent.pid(),
            // The same request bytes as the cookie run: only the check differs.
            vec![format!("Host: {PLAIN}"), format!("Cookie: {cookie}")],
        ),
        (
            "agent: proxy, rate limit only",
            agent_port,
            agent.pid(),
            vec![format!("Host: {SHIELD}"), format!("Cookie: {cookie}")],
        ),
        (
            "agent: challenges issued",
            agent_port,
            agent.pid(),
            vec![format!("Host: {CHALLENGE}"), format!("Accept: {HTML}")],
        ),
        (
            "agent: clearance cookies verified (proxied)",
            agent_port,
            agent.pid(),
            vec![format!("Host: {CHALLENGE}"), format!("Cookie: {cookie}")],
        ),
    ];
    // The runs take turns, round after round, and each keeps its median round: the CPU a
    // proxied request costs moves by a microsecond or two with what else the two cores do
    // (wrk, the origin), as much as the difference measured here.
    let mut rounds: Vec<Vec<Row<'_>>> = runs.iter().map(|_| Vec::new()).collect();
    for round in 1..=settings.rounds {
        for ((name, port, pid, headers), measured) in runs.iter().zip(&mut rounds) {
            eprintln!("round {round}/{}: {name}", settings.rounds);
            // Warm pools and caches, then measure.
            wrk(
                &url(*port),
                &settings,
                settings.duration.min(Duration::from_secs(2)),
                headers,
            )?;
            let (user_before, system_before) = process_tree_cpu_ticks(*pid);
            let result = wrk(&url(*port), &settings, settings.duration, headers)?;
            let (user_after, system_after) = process_tree_cpu_ticks(*pid);
            let ticks =
                user_after.saturating_sub(user_before) + system_after.saturating_sub(system_before);
            measured.push(Row {
                name,
                result,
                // Linux reports CPU time in clock ticks of 10 ms (USER_HZ = 100).
                cpu_seconds: ticks as f64 / 100.0,
            });
        }
    }
    // The cookie run against the rate-limit-only run of the same round, which ran just
    // before it: the median of those differences.
    let mut paired: Vec<f64> = rounds[4]
        .iter()
        .zip(&rounds[2])
        .map(|(verified, shield)| verified.cpu_us_per_request() - shield.cpu_us_per_request())
        .collect();
    paired.sort_by(f64::total_cmp);
    let paired_median = paired[paired.len() / 2];
    let rows: Vec<Row<'_>> = rounds
        .into_iter()
        .map(|mut measured| {
            measured.sort_by(|a, b| a.cpu_us_per_request().total_cmp(&b.cpu_us_per_request()));
            let median = measured.len() / 2;
            measured.swap_remove(median)
        })
        .collect();
    println!("{}", render(&rows, &settings));
    println!(
        "the same, paired by round (median of {} rounds: {}): {paired_median:+.2} µs",
        paired.len(),
        paired
            .iter()
            .map(|delta| format!("{delta:+.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    drop(agent);
    drop(origin);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    duration: Duration,
    connections: u32,
    threads: u32,
    rounds: u32,
    skip_build: bool,
    agent: Option<PathBuf>,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut settings = Settings {
            duration: Duration::from_secs(10),
            connections: 50,
            threads: 2,
            rounds: 5,
            skip_build: false,
            agent: None,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            if flag == "--skip-build" {
                settings.skip_build = true;
                continue;
            }
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            if flag == "--agent" {
                settings.agent = Some(PathBuf::from(value));
                continue;
            }
            let number: u32 = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a number"))?;
            anyhow::ensure!(number > 0, "{flag} must be positive");
            match flag.as_str() {
                "--duration" => settings.duration = Duration::from_secs(u64::from(number.min(60))),
                "--connections" => settings.connections = number,
                "--threads" => settings.threads = number,
                "--rounds" => settings.rounds = number.min(9),
                other => anyhow::bail!("unknown option {other:?}"),
            }
        }
        Ok(settings)
    }
}

/// The agent on a config with the three names.
fn start_agent(dir: &Path, binary: &Path, origin_port: u16, port: u16) -> anyhow::Result<Server> {
    let domain = |name: &str, anti_ddos: &str| {
        format!(
            r#"{{"domain": "{name}", "httpProxy": {{"enabled": true, "antiDDoS": {anti_ddos}}},
                    "dnsRecords": [{{"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}}]}}"#
        )
    };
    // A rate limit nothing here reaches, so every request is measured, not refused.
    let unlimited = r#""rateLimit": {"windowSeconds": 1, "maxRequests": 1000000000}"#;
    let config = format!(
        r#"{{"success": true, "domains": [{}, {}, {}]}}"#,
        domain(PLAIN, "null"),
        domain(SHIELD, &format!(r#"{{"enabled": true, {unlimited}}}"#)),
        domain(
            CHALLENGE,
            &format!(
                r#"{{"enabled": true, {unlimited}, "jsChallenge": {{"enabled": true, "cookieName": "{COOKIE}", "ttlSeconds": 3600}}}}"#
            )
        ),
    );
    let mut command = agent_on(binary, dir, &config, origin_port, &[("http", port)])?;
    // Verification costs one HMAC and one SHA-256 whatever the difficulty; 0 lets
    // this bench pass the challenge without doing the browser's work.
    command.args(["--challenge-difficulty", "0"]);
    Server::spawn(&mut command, "-TERM")
}

/// Passes the challenge as a browser would (at difficulty 0 every nonce solves it) and
/// returns the cookie pair.
fn obtain_cookie(port: u16) -> anyhow::Result<String> {
    let (status, page) = get(port, CHALLENGE, &[format!("Accept: {HTML}")])?;
    anyhow::ensure!(status == 403, "no challenge page ({status}):\n{page}");
    let marker = r#"name="challenge" value=""#;
    let start = page
        .find(marker)
        .context("the challenge page has no challenge field")?
        + marker.len();
    let challenge = page[start..]
        .split('"')
        .next()
        .context("unterminated challenge field")?;
    let form = format!("challenge={challenge}&nonce=0&url=%2Findex.html");
    let response = exchange(
        port,
        &format!(
            "POST /.well-known/defenra/challenge HTTP/1.1\r\nHost: {CHALLENGE}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        ),
    )?;
    anyhow::ensure!(
        response.starts_with("HTTP/1.1 303"),
        "the solution was refused:\n{response}"
    );
    response
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim().split(';').next().unwrap_or("").to_owned())
        })
        .context("no Set-Cookie in the answer to the solution")
}

/// One GET of `/index.html` on `host`; (status, whole response).
fn get(port: u16, host: &str, headers: &[String]) -> anyhow::Result<(u16, String)> {
    let mut request = format!("GET /index.html HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let response = exchange(port, &request)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, response))
}

fn exchange(port: u16, request: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn wrk(
    url: &str,
    settings: &Settings,
    duration: Duration,
    headers: &[String],
) -> anyhow::Result<WrkResult> {
    wrk_with(
        url,
        settings.threads,
        settings.connections,
        duration,
        headers,
        None,
    )
}

struct Row<'a> {
    name: &'a str,
    result: WrkResult,
    cpu_seconds: f64,
}

impl Row<'_> {
    /// Requests answered per CPU-second of the serving processes.
    fn per_cpu_second(&self) -> f64 {
        self.result.requests as f64 / self.cpu_seconds.max(0.01)
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / (self.result.requests.max(1) as f64)
    }
}

fn render(rows: &[Row<'_>], settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nwrk -t{} -c{} -d{}s over HTTP on loopback, median of {} rounds; CPU is user + system \
         time of the serving processes (nginx: master + worker; agent: all its threads)\n",
        settings.threads,
        settings.connections,
        settings.duration.as_secs(),
        settings.rounds
    );
    let _ = writeln!(
        out,
        "| run | requests/s | p99 ms | CPU µs/request | requests per CPU-second |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.1} | {:.0} |",
            row.name,
            row.result.requests_per_second,
            row.result.p99_ms,
            row.cpu_us_per_request(),
            row.per_cpu_second()
        );
    }
    let [nginx, plain, shield, issued, verified] = rows else {
        return out;
    };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "challenges issued per CPU-second / nginx static pages per CPU-second: {:.2} \
         (reach: >= 1.00)",
        issued.per_cpu_second() / nginx.per_cpu_second().max(1.0)
    );
    let _ = writeln!(
        out,
        "challenges issued per CPU-second / agent proxied requests per CPU-second: {:.2}",
        issued.per_cpu_second() / plain.per_cpu_second().max(1.0)
    );
    let _ = writeln!(
        out,
        "CPU per request with a valid cookie - without the challenge (rate limit only): \
         {:+.2} µs (reach: <= 2 µs)",
        verified.cpu_us_per_request() - shield.cpu_us_per_request()
    );
    let _ = writeln!(
        out,
        "CPU per request with a valid cookie - no protection at all: {:+.2} µs",
        verified.cpu_us_per_request() - plain.cpu_us_per_request()
    );
    out
}
