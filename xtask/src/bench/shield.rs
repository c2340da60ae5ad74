//! `cargo xtask bench shield`: a flood of a rate-limited domain from many loopback source
//! addresses, against the agent (Anti-DDoS on), nginx (`limit_req` + `limit_conn`,
//! `limit_req_status 429`) and HAProxy (stick table `http_req_rate` + `http-request deny
//! deny_status 429`), all with the same limits in front of the same nginx origin.
//!
//! The flood tool is our own: each source address of 127.1.0.0/16 gets its own keep-alive
//! connection (the socket bound to that source) and sends pipelined requests at full speed,
//! while a legitimate client on 127.0.0.2 sends 20 requests a second. Printed for each
//! server: refused requests per server CPU-second, the legitimate client's success rate and
//! p99 while idle and during the flood, and the memory each server keeps per tracked address
//! after `--million` distinct sources sent one request each (proportional set size of the
//! whole process tree, so shared memory is not counted twice).
//!
//! The servers take turns for `--rounds` rounds, each on a fresh process; counters and CPU
//! seconds add up over the rounds and the legitimate client's latencies pool (20 a second
//! gives 200 samples per 10 s round: one round's p99 is its second-worst sample, which
//! moves by milliseconds with what else the two cores ran at that moment).
//!
//! Options: `--seconds N` flood length (10), `--rounds N` (3), `--sources N` flood sources (100),
//! `--threads N` flood threads (4), `--million N` distinct sources of the memory phase
//! (1,000,000; 0 skips it), `--only agent|nginx|haproxy`, `--skip-build`, `--agent-bin PATH`
//! (another build of the agent, e.g. a debug one for a smoke run).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::common::{
    Server, agent_on, children, common_conf, free_port, http_common, process_tree_cpu_ticks,
    wait_for_port,
};
use crate::{cargo, run_command};

/// The protected domain (the agent routes by it; the peers answer any host).
const HOST: &str = "bench.test";
/// Requests per second allowed per address, and the burst: the same for all three.
const RATE: u32 = 100;
/// Concurrent connections allowed per address.
const MAX_CONNECTIONS: u32 = 1000;
/// The legitimate client's address and rate.
const LEGIT_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const LEGIT_RATE: u32 = 20;
/// Pipelined requests per flood write.
const DEPTH: usize = 16;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    crate::packages::ensure(&[
        ("/usr/sbin/nginx", "nginx"),
        ("/usr/sbin/haproxy", "haproxy"),
    ])?;
    if !settings.skip_build && settings.agent_bin.is_none() {
        run_command(&cargo(), &["build", "--release", "-p", "defenra-agent"])?;
    }
    let agent_binary = settings
        .agent_bin
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("release/defenra-agent"));
    anyhow::ensure!(
        agent_binary.exists(),
        "{} is missing",
        agent_binary.display()
    );

    let dir = std::env::temp_dir().join(format!("defenra-bench-shield-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let origin_port = free_port()?;
    let origin = Server::nginx(&dir, "origin", &origin_conf(&dir, origin_port), None)?;
    wait_for_port(origin_port)?;

    let kinds: Vec<Kind> = [Kind::Nginx, Kind::Haproxy, Kind::Agent]
        .into_iter()
        .filter(|kind| settings.only.is_none_or(|only| only == *kind))
        .collect();
    let mut results: Vec<Row> = kinds.iter().map(|&kind| Row::new(kind)).collect();
    // The servers take turns, round after round, each round on a fresh process (no block
    // or ban carried over): what the machine does besides moves every server alike, and
    // the legitimate client's p99 comes from all rounds' samples together.
    for round in 1..=settings.rounds {
        for row in &mut results {
            let kind = row.kind;
            let name = format!("{} (round {round}/{})", kind.name(), settings.rounds);
            let port = free_port()?;
            let server = match kind {
                Kind::Nginx => {
                    Server::nginx(&dir, "limited", &nginx_conf(&dir, origin_port, port), None)?
                }
                Kind::Haproxy => haproxy(&dir, origin_port, port)?,
                Kind::Agent => agent(&dir, &agent_binary, origin_port, port)?,
            };
            wait_for_port(port)?;
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let probe = one_request(Ipv4Addr::new(127, 0, 0, 3), address, false)
                .with_context(|| format!("{name} does not answer"))?;
            anyhow::ensure!(probe == 200, "{name} answered {probe} to a first request");
            eprintln!("{name}: idle legitimate client");
            let idle = legit_client(
                address,
                Duration::from_secs(settings.seconds),
                &AtomicBool::new(false),
            );
            eprintln!(
                "{name}: flood from {} sources for {} s",
                settings.sources, settings.seconds
            );
            let flood = flood(address, server.pid(), &settings, None);
            let equal = (settings.equal_rate > 0).then(|| {
                eprintln!(
                    "{name}: flood paced to {} requests/s for {} s",
                    settings.equal_rate, settings.seconds
                );
                self::flood(address, server.pid(), &settings, Some(settings.equal_rate))
            });
            row.add_round(idle, flood, equal);
            if round == settings.rounds && settings.million > 0 {
                eprintln!("{name}: {} distinct sources", settings.million);
                row.memory = Some(memory_per_address(address, server.pid(), settings.million));
            }
            drop(server);
        }
    }
    drop(origin);
    println!("{}", render(&results, &settings));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    seconds: u64,
    rounds: u32,
    /// Requests a second of the paced flood (0: no paced flood).
    equal_rate: u32,
    sources: u32,
    threads: usize,
    million: u32,
    only: Option<Kind>,
    skip_build: bool,
    /// Another agent binary (a debug build for a smoke run); implies no build.
    agent_bin: Option<PathBuf>,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Settings> {
        let mut settings = Settings {
            seconds: 10,
            rounds: 3,
            equal_rate: 75_000,
            sources: 100,
            threads: 4,
            million: 1_000_000,
            only: None,
            skip_build: false,
            agent_bin: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{arg} needs a value"))
                    .map(String::as_str)
            };
            match arg.as_str() {
                "--seconds" => settings.seconds = value()?.parse()?,
                "--rounds" => settings.rounds = value()?.parse::<u32>()?.clamp(1, 9),
                "--equal-rate" => settings.equal_rate = value()?.parse()?,
                "--sources" => settings.sources = value()?.parse()?,
                "--threads" => settings.threads = value()?.parse()?,
                "--million" => settings.million = value()?.parse()?,
                "--only" => {
                    settings.only = Some(match value()? {
                        "agent" => Kind::Agent,
                        "nginx" => Kind::Nginx,
                        "haproxy" => Kind::Haproxy,
                        other => anyhow::bail!("--only {other:?}: agent, nginx or haproxy"),
                    })
                }
                "--skip-build" => settings.skip_build = true,
                "--agent-bin" => settings.agent_bin = Some(PathBuf::from(value()?)),
                other => anyhow::bail!(
                    "unknown option {other:?} (expected --seconds, --rounds, --equal-rate, --sources, --threads, --million, --only, --skip-build, --agent-bin)"
                ),
            }
        }
        anyhow::ensure!(
            (1..=60_000).contains(&settings.sources),
            "--sources must be 1..=60000"
        );
        anyhow::ensure!(
            settings.million <= 3_000_000,
            "--million must be at most 3000000"
        );
        settings.threads = settings.threads.clamp(1, 64);
        Ok(settings)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nginx,
    Haproxy,
    Agent,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Agent => "agent",
        }
    }
}

/// HAProxy with the same limits ([`haproxy_conf`]); stopped with SIGUSR1 (soft stop).
fn haproxy(dir: &Path, origin: u16, port: u16) -> anyhow::Result<Server> {
    let path = dir.join("haproxy.cfg");
    fs::write(&path, haproxy_conf(origin, port))?;
    Server::spawn(Command::new("haproxy").arg("-f").arg(&path), "-USR1")
}

/// The agent with Anti-DDoS on `HOST` at the same limits.
fn agent(dir: &Path, binary: &Path, origin: u16, port: u16) -> anyhow::Result<Server> {
    let config = format!(
        r#"{{"success": true, "domains": [{{
                "domain": "{HOST}",
                "httpProxy": {{ "type": "both", "enabled": true, "antiDDoS": {{
                    "enabled": true,
                    "rateLimit": {{ "windowSeconds": 1, "maxRequests": {RATE} }},
                    "blockDurationSeconds": 60,
                    "slowloris": {{ "maxConnections": {MAX_CONNECTIONS} }},
                    "logging": {{ "enabled": false }} }} }},
                "dnsRecords": [{{ "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true }}]
            }}]}}"#
    );
    let mut command = agent_on(binary, dir, &config, origin, &[("http", port)])?;
    Server::spawn(&mut command, "-TERM")
}

/// An nginx origin answering `ok` to everything.
pub(super) fn origin_conf(dir: &Path, port: u16) -> String {
    format!(
        "{}http {{\n{}\
         server {{ listen 127.0.0.1:{port} reuseport backlog=4096; \
         location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
        common_conf(dir, "origin", "1"),
        http_common(dir, "origin")
    )
}

/// nginx with the same limits: `RATE` per second with a burst of `RATE` (GCRA, as the
/// agent), `MAX_CONNECTIONS` per address, 429 for both. The zones hold a million addresses.
fn nginx_conf(dir: &Path, origin: u16, port: u16) -> String {
    format!(
        "{}http {{\n{}\
         limit_req_zone $binary_remote_addr zone=rate:160m rate={RATE}r/s;\n\
         limit_conn_zone $binary_remote_addr zone=conns:96m;\n\
         upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{port} reuseport backlog=4096;\n\
           limit_req zone=rate burst={RATE} nodelay; limit_req_status 429; limit_req_log_level info;\n\
           limit_conn conns {MAX_CONNECTIONS}; limit_conn_status 429; limit_conn_log_level info;\n\
           location / {{ proxy_pass http://origin; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }} }}\n}}\n",
        common_conf(dir, "limited", "auto"),
        http_common(dir, "limited")
    )
}

/// HAProxy with the same limits: a stick table of a million addresses with the request
/// rate over one second and the connections open, 429 above them.
fn haproxy_conf(origin: u16, port: u16) -> String {
    format!(
        "global\n  maxconn 8000\n  nbthread 2\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 75s\n  timeout server 60s\n  \
         timeout http-keep-alive 75s\n  option http-keep-alive\n\
         frontend limited\n  bind 127.0.0.1:{port}\n  \
         stick-table type ip size 1100k expire 60s store http_req_rate(1s),conn_cur\n  \
         tcp-request connection track-sc0 src\n  \
         tcp-request connection reject if {{ sc_conn_cur(0) gt {MAX_CONNECTIONS} }}\n  \
         http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {RATE} }}\n  \
         default_backend origin\n\
         backend origin\n  http-reuse always\n  server origin 127.0.0.1:{origin}\n"
    )
}

/// A TCP connection from `source` (any 127.x address).
fn connect_from(source: Ipv4Addr, address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&address.into(), Duration::from_secs(2))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

fn request() -> String {
    request_for("/")
}

/// A request for `path` (the legitimate client asks for `/legit`, so that a packet capture
/// tells its requests from the flood's).
fn request_for(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: defenra-bench\r\n\r\n")
}

/// Reads complete responses from `stream` into `buffer` until `count` have come; returns
/// their statuses and whether the server asked to close.
fn read_responses(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    count: usize,
    statuses: &mut Vec<u16>,
) -> std::io::Result<bool> {
    let mut close = false;
    let mut chunk = [0u8; 16 * 1024];
    while statuses.len() < count && !close {
        match parse_response(buffer) {
            Some((status, length, wants_close)) => {
                buffer.drain(..length);
                statuses.push(status);
                close = wants_close;
                continue;
            }
            None => {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
        }
    }
    Ok(close)
}

/// `(status, bytes of the whole response, Connection: close)` of the first complete
/// response in `buffer`; bodies are framed by Content-Length (all three servers send one).
fn parse_response(buffer: &[u8]) -> Option<(u16, usize, bool)> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buffer[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0;
    let mut close = false;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    (buffer.len() >= end + length).then_some((status, end + length, close))
}

/// One request on a new connection from `source`; `reset` closes it with RST (no
/// TIME_WAIT on either side). Returns the status.
fn one_request(source: Ipv4Addr, address: SocketAddr, reset: bool) -> anyhow::Result<u16> {
    let mut stream = connect_from(source, address)?;
    stream.write_all(request().as_bytes())?;
    let mut buffer = Vec::new();
    let mut statuses = Vec::new();
    read_responses(&mut stream, &mut buffer, 1, &mut statuses)?;
    if reset {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    statuses.first().copied().context("no response")
}

/// What the legitimate client saw.
#[derive(Debug, Clone, Default)]
struct Legit {
    sent: u64,
    ok: u64,
    latencies_us: Vec<u64>,
}

impl Legit {
    fn absorb(&mut self, other: Legit) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.latencies_us.extend(other.latencies_us);
    }

    fn success(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.ok as f64 / self.sent as f64
        }
    }

    fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }

    fn quantile_ms(&self, quantile: f64) -> f64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return f64::NAN;
        }
        let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index] as f64 / 1000.0
    }
}

/// `LEGIT_RATE` requests a second from `LEGIT_SOURCE` on one keep-alive connection (a
/// new one when the server closes it) for `duration` or until `stop`.
fn legit_client(address: SocketAddr, duration: Duration, stop: &AtomicBool) -> Legit {
    let mut legit = Legit::default();
    let gap = Duration::from_secs(1) / LEGIT_RATE;
    let started = Instant::now();
    let mut stream: Option<TcpStream> = None;
    let mut buffer = Vec::new();
    let mut next = Instant::now();
    while started.elapsed() < duration && !stop.load(Relaxed) {
        thread::sleep(next.saturating_duration_since(Instant::now()));
        next += gap;
        legit.sent += 1;
        let begun = Instant::now();
        let outcome = (|| -> std::io::Result<(u16, bool)> {
            if stream.is_none() {
                buffer.clear();
                stream = Some(connect_from(LEGIT_SOURCE, address)?);
            }
            let connection = stream.as_mut().expect("connected above");
            connection.write_all(request_for("/legit").as_bytes())?;
            let mut statuses = Vec::new();
            let close = read_responses(connection, &mut buffer, 1, &mut statuses)?;
            Ok((statuses[0], close))
        })();
        match outcome {
            Ok((status, close)) => {
                legit.latencies_us.push(begun.elapsed().as_micros() as u64);
                if status == 200 {
                    legit.ok += 1;
                }
                if close {
                    stream = None;
                }
            }
            Err(_) => stream = None,
        }
    }
    legit
}

/// The flood phase's figures.
#[derive(Debug, Clone, Default)]
struct Flood {
    responses: u64,
    refused: u64,
    passed: u64,
    reconnects: u64,
    /// Responses neither 429 nor 2xx (errors of the server or the origin).
    other: u64,
    seconds: f64,
    cpu_seconds: f64,
    legit: Legit,
}

/// Floods `address` for `settings.seconds`: at full speed (each thread sends its next batch
/// as soon as the last one is answered) when `rate` is `None`, else paced to `rate`
/// requests a second in all (each thread sends a batch on a schedule, never catching up
/// more than a few batches it fell behind).
fn flood(address: SocketAddr, pid: u32, settings: &Settings, rate: Option<u32>) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new([
        AtomicU64::new(0), // responses
        AtomicU64::new(0), // 429
        AtomicU64::new(0), // 2xx
        AtomicU64::new(0), // reconnects
        AtomicU64::new(0), // other statuses
    ]);
    let sources: Vec<Ipv4Addr> = (0..settings.sources)
        .map(|n| Ipv4Addr::new(127, 1, (n / 250) as u8, (n % 250 + 1) as u8))
        .collect();
    let sources = Arc::new(sources);
    let (cpu_user, cpu_system) = process_tree_cpu_ticks(pid);
    let started = Instant::now();
    let workers: Vec<_> = (0..settings.threads)
        .map(|worker| {
            let (stop, counters, sources) = (
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&sources),
            );
            let threads = settings.threads;
            // Time between two batches of this thread.
            let gap = rate.map(|rate| {
                Duration::from_secs_f64((DEPTH * threads) as f64 / f64::from(rate.max(1)))
            });
            thread::spawn(move || {
                let mut next = Instant::now();
                let mine: Vec<Ipv4Addr> = sources
                    .iter()
                    .copied()
                    .skip(worker)
                    .step_by(threads)
                    .collect();
                let mut connections: Vec<Option<TcpStream>> = mine.iter().map(|_| None).collect();
                let batch = request().repeat(DEPTH).into_bytes();
                let mut buffer = Vec::new();
                let mut statuses = Vec::with_capacity(DEPTH);
                while !stop.load(Relaxed) {
                    for (source, slot) in mine.iter().zip(connections.iter_mut()) {
                        if stop.load(Relaxed) {
                            break;
                        }
                        if slot.is_none() {
                            counters[3].fetch_add(1, Relaxed);
                            *slot = connect_from(*source, address).ok();
                        }
                        let Some(stream) = slot.as_mut() else {
                            continue;
                        };
                        if let Some(gap) = gap {
                            let now = Instant::now();
                            if next > now {
                                thread::sleep(next - now);
                            } else if now - next > gap * 4 {
                                next = now;
                            }
                            next += gap;
                        }
                        buffer.clear();
                        statuses.clear();
                        let outcome = stream.write_all(&batch).and_then(|()| {
                            read_responses(stream, &mut buffer, DEPTH, &mut statuses)
                        });
                        for status in &statuses {
                            counters[0].fetch_add(1, Relaxed);
                            match status {
                                429 => counters[1].fetch_add(1, Relaxed),
                                200..=299 => counters[2].fetch_add(1, Relaxed),
                                _ => counters[4].fetch_add(1, Relaxed),
                            };
                        }
                        // Closed by the server, or responses still owed: start afresh.
                        if (!matches!(outcome, Ok(false)) || statuses.len() < DEPTH)
                            && let Some(stream) = slot.take()
                        {
                            let _ =
                                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        }
                    }
                }
            })
        })
        .collect();
    let legit = legit_client(address, Duration::from_secs(settings.seconds), &stop);
    stop.store(true, Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    let (user, system) = process_tree_cpu_ticks(pid);
    let ticks = user.saturating_sub(cpu_user) + system.saturating_sub(cpu_system);
    Flood {
        responses: counters[0].load(Relaxed),
        refused: counters[1].load(Relaxed),
        passed: counters[2].load(Relaxed),
        reconnects: counters[3].load(Relaxed),
        other: counters[4].load(Relaxed),
        seconds,
        // USER_HZ is 100: a tick is 10 ms.
        cpu_seconds: ticks as f64 / 100.0,
        legit,
    }
}

/// Bytes of proportional set size the server process tree gained per distinct source
/// after `count` sources each sent one request.
fn memory_per_address(address: SocketAddr, pid: u32, count: u32) -> Memory {
    let before = tree_pss_kib(pid);
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (next, failures) = (Arc::clone(&next), Arc::clone(&failures));
            thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Relaxed);
                    if n >= u64::from(count) {
                        return;
                    }
                    // 127.16.0.1 upwards, 254 hosts per /24 (no .0, no .255).
                    let (block, host) = (n / 254, (n % 254 + 1) as u8);
                    let source =
                        Ipv4Addr::new(127, 16 + (block / 256) as u8, (block % 256) as u8, host);
                    if one_request(source, address, true).is_err() {
                        failures.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(1));
    let after = tree_pss_kib(pid);
    Memory {
        count,
        failures: failures.load(Relaxed),
        seconds,
        before_kib: before,
        after_kib: after,
    }
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    count: u32,
    failures: u64,
    seconds: f64,
    before_kib: u64,
    after_kib: u64,
}

impl Memory {
    fn bytes_per_address(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 * 1024.0 / f64::from(self.count)
    }
}

/// Proportional set size of `pid` and its children (shared pages split between them).
fn tree_pss_kib(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(children(pid))
        .map(|pid| {
            fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|line| line.strip_prefix("Pss:"))
                        .and_then(|value| value.split_whitespace().next())
                        .and_then(|kib| kib.parse::<u64>().ok())
                })
                .unwrap_or(0)
        })
        .sum()
}

/// One server's figures over all rounds.
struct Row {
    kind: Kind,
    idle: Legit,
    flood: Flood,
    /// The legitimate client's p99 during each round's flood (ms).
    round_p99s: Vec<f64>,
    /// The paced flood's figures and p99s, when there is one.
    equal: Flood,
    equal_p99s: Vec<f64>,
    memory: Option<Memory>,
}

impl Row {
    fn new(kind: Kind) -> Row {
        Row {
            kind,
            idle: Legit::default(),
            flood: Flood::default(),
            round_p99s: Vec::new(),
            equal: Flood::default(),
            equal_p99s: Vec::new(),
            memory: None,
        }
    }

    /// Adds one round: counters and CPU seconds add up, latency samples pool.
    fn add_round(&mut self, idle: Legit, flood: Flood, equal: Option<Flood>) {
        self.round_p99s.push(flood.legit.p99_ms());
        self.idle.absorb(idle);
        self.flood.absorb(flood);
        if let Some(equal) = equal {
            self.equal_p99s.push(equal.legit.p99_ms());
            self.equal.absorb(equal);
        }
    }
}

impl Flood {
    fn absorb(&mut self, other: Flood) {
        self.responses += other.responses;
        self.refused += other.refused;
        self.passed += other.passed;
        self.reconnects += other.reconnects;
        self.other += other.other;
        self.seconds += other.seconds;
        self.cpu_seconds += other.cpu_seconds;
        self.legit.absorb(other.legit);
    }
}

fn render(rows: &[Row], settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nshield bench: {} sources flooding for {} s ({} threads, {DEPTH} pipelined), limit {RATE}/s \
         burst {RATE} per address, {MAX_CONNECTIONS} connections per address; legitimate client {LEGIT_RATE}/s; \
         {} rounds (counters summed, latencies pooled)",
        settings.sources, settings.seconds, settings.threads, settings.rounds
    );
    let _ = write!(out, "\n{:<44}", "metric");
    for row in rows {
        let _ = write!(out, "{:>14}", row.kind.name());
    }
    out.push('\n');
    type Metric = (&'static str, fn(&Row) -> f64);
    let metrics: [Metric; 17] = [
        ("refused requests per server CPU-second", |r| {
            r.flood.refused as f64 / r.flood.cpu_seconds.max(0.01)
        }),
        ("flood responses per second", |r| {
            r.flood.responses as f64 / r.flood.seconds
        }),
        ("flood requests passed to origin (%)", |r| {
            100.0 * r.flood.passed as f64 / r.flood.responses.max(1) as f64
        }),
        ("flood reconnects", |r| r.flood.reconnects as f64),
        ("flood responses neither 429 nor 2xx", |r| {
            r.flood.other as f64
        }),
        ("server CPU seconds during flood", |r| r.flood.cpu_seconds),
        ("legit success idle (%)", |r| 100.0 * r.idle.success()),
        ("legit p50 idle (ms)", |r| r.idle.quantile_ms(0.5)),
        ("legit p99 idle (ms)", |r| r.idle.p99_ms()),
        ("legit success during flood (%)", |r| {
            100.0 * r.flood.legit.success()
        }),
        ("legit p50 during flood (ms)", |r| {
            r.flood.legit.quantile_ms(0.5)
        }),
        ("legit p99 during flood (ms)", |r| r.flood.legit.p99_ms()),
        ("paced flood: responses per second", |r| {
            r.equal.responses as f64 / r.equal.seconds
        }),
        ("paced flood: server CPU seconds", |r| r.equal.cpu_seconds),
        ("paced flood: legit p50 (ms)", |r| {
            r.equal.legit.quantile_ms(0.5)
        }),
        ("paced flood: legit p99 (ms)", |r| r.equal.legit.p99_ms()),
        ("bytes per tracked address (PSS)", |r| {
            r.memory.map_or(f64::NAN, |m| m.bytes_per_address())
        }),
    ];
    for (name, value) in metrics {
        let _ = write!(out, "{name:<44}");
        for row in rows {
            let _ = write!(out, "{:>14.2}", value(row));
        }
        out.push('\n');
    }
    let list = |p99s: &[f64]| {
        p99s.iter()
            .map(|p99| format!("{p99:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for row in rows {
        let _ = writeln!(
            out,
            "{}: legit p99 by round (ms): full-speed flood {}; paced flood {}",
            row.kind.name(),
            list(&row.round_p99s),
            list(&row.equal_p99s)
        );
    }
    if let Some(agent) = rows.iter().find(|row| row.kind == Kind::Agent) {
        out.push('\n');
        let refused = |row: &Row| row.flood.refused as f64 / row.flood.cpu_seconds.max(0.01);
        for peer in rows.iter().filter(|row| row.kind != Kind::Agent) {
            let _ = writeln!(
                out,
                "agent/{}: refused per CPU-second {:.2}x (target >= 1.2 vs nginx), legit p99 during flood {:.2}x, \
                 during the paced flood {:.2}x (target <= 1), legit refused {}",
                peer.kind.name(),
                refused(agent) / refused(peer).max(0.01),
                agent.flood.legit.p99_ms() / peer.flood.legit.p99_ms(),
                agent.equal.legit.p99_ms() / peer.equal.legit.p99_ms(),
                (agent.flood.legit.sent - agent.flood.legit.ok)
                    + (agent.equal.legit.sent - agent.equal.legit.ok),
            );
        }
        if let Some(memory) = agent.memory {
            let _ = writeln!(
                out,
                "agent memory: {:.1} bytes per address after {} sources in {:.0} s ({} failed), PSS {} -> {} KiB (target <= 64)",
                memory.bytes_per_address(),
                memory.count,
                memory.seconds,
                memory.failures,
                memory.before_kib,
                memory.after_kib
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_framed_by_content_length() {
        let two = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\ncontent-length: 0\r\nConnection: close\r\n\r\n";
        let (status, length, close) = parse_response(two).unwrap();
        assert_eq!((status, length, close), (429, 56, false));
        let (status, _, close) = parse_response(&two[length..]).unwrap();
        assert_eq!((status, close), (200, true));
        assert_eq!(parse_response(&two[..50]), None, "body incomplete");
    }
}
