//! `cargo xtask bench fleet`: three agents sharing state through one `redis-server` on
//! loopback, in front of the same nginx origin.
//!
//! Printed:
//! - ban propagation: from sending `ban` to agent A's control socket until agents B and C
//!   both list the ban on `/banned-ips` (polled every millisecond), p50 and p99 over
//!   `--bans` bans;
//! - fleet-limit accuracy: one source address floods `bench.test` (`--limit` requests per
//!   10 s, blocks of 60 s) through the three agents at `--rate` requests a second, split
//!   evenly and 4:1:1, with `--fleet-limits`; accuracy = requests the origin answered / the
//!   limit (1.0 is exact; per-agent limits would let through 3.0);
//! - HTTP requests per second of one agent (wrk, keep-alive, Anti-DDoS on with a limit no
//!   client reaches, so every request is counted and noted for the fleet) with Redis on
//!   (`--redis-url`, `--fleet-limits`) and off, alternating in the same run, best of
//!   `--rounds`; the reach is on/off ≥ 0.97.
//!
//! Options: `--bans N` (200), `--limit N` (100), `--rate N` (1000), `--duration S` wrk
//! seconds (10), `--connections N` (100), `--threads N` (2), `--rounds N` (3),
//! `--skip-build`, `--agent-bin PATH` (another build, e.g. the debug one for a smoke run).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::common::{Server, agent_command, free_port, wait_for_port, write_agent_config};
use super::shield::origin_conf;
use super::wrk::{WrkResult, wrk};
use crate::{cargo, run_command};

/// The unlimited domain of the HTTP measurement (wrk resolves it).
const HOST: &str = "localhost";
/// The limited domain's window.
const WINDOW_SECONDS: u32 = 10;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    super::http::ensure_tools()?;
    crate::packages::ensure(&[("/usr/bin/redis-server", "redis-server")])?;
    if !settings.skip_build && settings.agent_bin.is_none() {
        run_command(&cargo(), &["build", "--release", "-p", "defenra-agent"])?;
    }
    let binary = settings
        .agent_bin
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("release/defenra-agent"));
    anyhow::ensure!(binary.exists(), "{} is missing", binary.display());

    let dir = std::env::temp_dir().join(format!("defenra-bench-fleet-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let origin_port = free_port()?;
    let origin = Server::nginx(&dir, "origin", &origin_conf(&dir, origin_port), None)?;
    wait_for_port(origin_port)?;
    let (redis, redis_port) = redis(&dir)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let config = write_config(&dir, settings.limit)?;

    // Three agents of one fleet.
    let fleet_flags = ["--redis-url", redis_url.as_str(), "--fleet-limits"];
    let agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|name| Agent::start(&dir, name, &binary, &config, origin_port, &fleet_flags))
        .collect::<anyhow::Result<_>>()?;
    for agent in &agents {
        agent.wait_up()?;
    }

    eprintln!("ban propagation: {} bans", settings.bans);
    let propagation = ban_propagation(&agents, settings.bans)?;
    eprintln!("fleet-limit accuracy at {} requests/s", settings.rate);
    let even = accuracy(&agents, &[1, 1, 1], Ipv4Addr::new(127, 0, 1, 1), &settings)?;
    let uneven = accuracy(&agents, &[4, 1, 1], Ipv4Addr::new(127, 0, 1, 2), &settings)?;
    drop(agents);

    // One agent with Redis and one without, measured alternately.
    let on = Agent::start(&dir, "on", &binary, &config, origin_port, &fleet_flags)?;
    on.wait_up()?;
    let off = Agent::start(&dir, "off", &binary, &config, origin_port, &[])?;
    let mut best: [Option<WrkResult>; 2] = [None, None];
    for round in 0..settings.rounds {
        eprintln!("http round {}/{}", round + 1, settings.rounds);
        for (index, agent) in [&on, &off].into_iter().enumerate() {
            let url = format!("http://{HOST}:{}/", agent.http);
            wrk(
                &url,
                settings.threads,
                settings.connections,
                Duration::from_secs(1),
            )?;
            let result = wrk(
                &url,
                settings.threads,
                settings.connections,
                settings.duration,
            )?;
            anyhow::ensure!(result.errors == 0, "errors from {url}: {}", result.raw);
            if best[index]
                .as_ref()
                .is_none_or(|best| best.requests_per_second < result.requests_per_second)
            {
                best[index] = Some(result);
            }
        }
    }
    let (Some(redis_on), Some(redis_off)) = (best[0].take(), best[1].take()) else {
        anyhow::bail!("no HTTP measurement");
    };
    drop(on);
    drop(off);
    drop(redis);
    drop(origin);
    println!(
        "{}",
        render(&settings, &propagation, even, uneven, &redis_on, &redis_off)
    );
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    bans: u32,
    limit: u32,
    rate: u32,
    duration: Duration,
    connections: u32,
    threads: u32,
    rounds: u32,
    skip_build: bool,
    agent_bin: Option<PathBuf>,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Settings> {
        let mut settings = Settings {
            bans: 200,
            limit: 100,
            rate: 1000,
            duration: Duration::from_secs(10),
            connections: 100,
            threads: 2,
            rounds: 3,
            skip_build: false,
            agent_bin: None,
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
            if flag == "--agent-bin" {
                settings.agent_bin = Some(PathBuf::from(value));
                continue;
            }
            let number: u32 = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a number"))?;
            anyhow::ensure!(number > 0, "{flag} must be positive");
            match flag.as_str() {
                "--bans" => settings.bans = number,
                "--limit" => settings.limit = number,
                "--rate" => settings.rate = number,
                "--duration" => settings.duration = Duration::from_secs(u64::from(number.min(60))),
                "--connections" => settings.connections = number,
                "--threads" => settings.threads = number,
                "--rounds" => settings.rounds = number.min(5),
                other => anyhow::bail!("unknown option {other:?}"),
            }
        }
        Ok(settings)
    }
}

/// `bench.test` with Anti-DDoS: `limit` requests per 10 s and blocks of 60 s, and a second
/// name, `localhost`, whose limit no client reaches (the HTTP measurement).
fn write_config(dir: &Path, limit: u32) -> anyhow::Result<PathBuf> {
    let domain = |name: &str, max: u32| {
        format!(
            r#"{{"domain": "{name}",
                "httpProxy": {{"type": "both", "enabled": true, "antiDDoS": {{
                    "enabled": true,
                    "rateLimit": {{"windowSeconds": {WINDOW_SECONDS}, "maxRequests": {max}}},
                    "blockDurationSeconds": 60,
                    "slowloris": {{"maxConnections": 100000}},
                    "logging": {{"enabled": false}}}}}},
                "dnsRecords": [{{"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}}]}}"#
        )
    };
    let config = format!(
        r#"{{"success": true, "domains": [{}, {}]}}"#,
        domain("limited.bench.test", limit),
        domain(HOST, 1_000_000_000)
    );
    write_agent_config(dir, &config)
}

/// redis-server on a free port, without persistence; stopped with SIGTERM on drop.
fn redis(dir: &Path) -> anyhow::Result<(Server, u16)> {
    let port = free_port()?;
    let redis_dir = dir.join("redis");
    fs::create_dir_all(&redis_dir)?;
    let server = Server::spawn(
        Command::new("/usr/bin/redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&redis_dir)
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"]),
        "-TERM",
    )?;
    wait_for_port(port)?;
    Ok((server, port))
}

/// An agent with its own state directory (for the control socket) and health port.
struct Agent {
    _server: Server,
    http: u16,
    health: u16,
    state: PathBuf,
}

impl Agent {
    fn start(
        dir: &Path,
        name: &str,
        binary: &Path,
        config: &Path,
        origin: u16,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let (http, health) = (free_port()?, free_port()?);
        let state_name = format!("state-{name}");
        let mut command = agent_command(
            Command::new(binary),
            dir,
            config,
            &state_name,
            origin,
            &[("http", http), ("health", health)],
        )?;
        command.args(["--fleet-sync-interval", "100ms"]).args(extra);
        let server = Server::spawn(&mut command, "-TERM")?;
        wait_for_port(http)?;
        wait_for_port(health)?;
        Ok(Agent {
            _server: server,
            http,
            health,
            state: dir.join(state_name),
        })
    }

    /// Waits until `/health` says the fleet link is up.
    fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if get(self.health, "/health")?.contains(r#""state": "up""#) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("the agent on {} never joined the fleet", self.http)
    }

    /// `ban ADDRESS` through the control socket (the `defenra-agent ban` protocol).
    fn ban(&self, address: &str) -> anyhow::Result<()> {
        let mut stream = UnixStream::connect(self.state.join("control.sock"))
            .context("the agent's control socket")?;
        writeln!(
            stream,
            r#"{{"command":"ban","address":"{address}","seconds":600,"reason":"bench"}}"#
        )?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        anyhow::ensure!(answer.contains(r#""ok":true"#), "ban refused: {answer}");
        Ok(())
    }
}

/// A GET on the health port; the body.
fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Milliseconds from each `ban` on the first agent to both others listing it.
fn ban_propagation(agents: &[Agent], bans: u32) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for n in 0..bans {
        let address = format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255);
        let needle = format!(r#""address": "{address}""#);
        let started = Instant::now();
        agents[0].ban(&address)?;
        let mut seen = [false, false];
        while seen != [true, true] {
            for (index, agent) in agents[1..].iter().enumerate() {
                if !seen[index] {
                    seen[index] = get(agent.health, "/banned-ips")?.contains(&needle);
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(5),
                "{address} did not reach the other agents"
            );
            if seen != [true, true] {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// Floods `limited.bench.test` from `source` through the agents by `weights` at the
/// configured rate for 3 × the limit requests; the origin's answers / the limit.
fn accuracy(
    agents: &[Agent],
    weights: &[u32],
    source: Ipv4Addr,
    settings: &Settings,
) -> anyhow::Result<f64> {
    let mut connections: Vec<Option<BufReader<TcpStream>>> = agents.iter().map(|_| None).collect();
    let schedule: Vec<usize> = weights
        .iter()
        .enumerate()
        .flat_map(|(index, weight)| std::iter::repeat_n(index, *weight as usize))
        .collect();
    let total = 3 * settings.limit;
    let started = Instant::now();
    let mut allowed = 0u32;
    for n in 0..total {
        let due = started + Duration::from_secs_f64(f64::from(n) / f64::from(settings.rate));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let index = schedule[n as usize % schedule.len()];
        let status = match request(&mut connections[index], source, agents[index].http) {
            Ok(status) => status,
            Err(_) => {
                connections[index] = None;
                0
            }
        };
        if status == 200 {
            allowed += 1;
        }
    }
    Ok(f64::from(allowed) / f64::from(settings.limit))
}

/// One keep-alive request on `connection` (opened from `source` when needed); the status.
fn request(
    connection: &mut Option<BufReader<TcpStream>>,
    source: Ipv4Addr,
    port: u16,
) -> anyhow::Result<u16> {
    if connection.is_none() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((source, 0)).into())?;
        socket.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection.as_mut().context("connected")?;
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: limited.bench.test\r\n\r\n")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status")?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn render(
    settings: &Settings,
    propagation: &[f64],
    even: f64,
    uneven: f64,
    redis_on: &WrkResult,
    redis_off: &WrkResult,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Fleet (three agents, one redis-server, loopback)\n");
    let _ = writeln!(
        out,
        "Ban propagation, `ban` on agent A until B and C list it ({} bans): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target: p99 ≤ 100 ms).\n",
        propagation.len(),
        percentile(propagation, 0.5),
        percentile(propagation, 0.99),
        propagation.last().copied().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Fleet-limit accuracy (allowed / limit of {} per {WINDOW_SECONDS} s, flood of {} requests at {}/s, sync 100 ms): even split {even:.2}, 4:1:1 split {uneven:.2} (1.00 is exact; per-agent limits would give 3.00).\n",
        settings.limit,
        3 * settings.limit,
        settings.rate
    );
    let ratio = redis_on.requests_per_second / redis_off.requests_per_second.max(1.0);
    let _ = writeln!(out, "| one agent | requests/s | p99 |\n|---|---|---|");
    let _ = writeln!(
        out,
        "| Redis off | {:.0} | {:.2} ms |",
        redis_off.requests_per_second, redis_off.p99_ms
    );
    let _ = writeln!(
        out,
        "| Redis on, --fleet-limits | {:.0} | {:.2} ms |",
        redis_on.requests_per_second, redis_on.p99_ms
    );
    let _ = writeln!(out, "\nRedis on / off: {ratio:.3} (reach: at least 0.97).");
    out
}
