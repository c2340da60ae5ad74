//! `cargo xtask bench dns-rrl`: response rate limiting under a reflection flood, the agent
//! beside knot (its `mod-rrl` at the same rate and slip), one after the other.
//!
//! The flood is what an amplification attack looks like to the name server: queries for
//! one name with a large answer (a TXT RRset of about 1.1 KB, EDNS 4096) "from" many
//! addresses of a few victim prefixes (sockets bound to 127.10.P.H; on loopback nothing
//! needs spoofing), at a fixed total rate. Beside it a legitimate resolver in another
//! prefix (127.20.0.1) asks a mix of names at 100 queries per second and behaves like a
//! real one: a truncated answer is asked again over TCP, a lost one is asked again over
//! UDP after 500 ms (three tries).
//!
//! Printed for each server: the amplification factor (bytes the victims received / bytes
//! the attacker sent), queries handled per CPU-second of the server (queries sent minus
//! the kernel's drops on the server's sockets, over the server's user+system time), the
//! legitimate resolver's answer rate (TCP retries after TC count as answered) and its
//! median and p99 latency, and the agent/knot ratios.
//!
//! knot 3.2 (Debian's) limits per /24 and /56 with a bucket of 4 seconds' worth of
//! responses and slips at random one in `slip`; so the agent runs with the same prefixes
//! and `--dns-rrl-window 4s` unless told otherwise.
//!
//! Options: `--duration SECONDS` per server (default 10), `--flood-rate QPS` (default
//! 20000), `--prefixes N` victim /24s (default 16) × `--hosts N` addresses each (default
//! 4), `--rrl-rate N` (default 20), `--slip N` (default 2), `--window DURATION` for the
//! agent (default 4s), `--no-build` to use the release binary already built, or
//! `--agent-bin PATH` to run another build (a smoke run with the debug binary).

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::dns::{
    Server, cargo_release, free_port, install_tools, knot_version, path_str, percentile,
    query_packet,
};

const ZONE: &str = "rrl.example";
/// The flood's name: eight 120-byte TXT strings, about 1.1 KB of answer.
const BIG: &str = "big.rrl.example";
const TXT_RECORDS: usize = 8;
const TXT_LEN: usize = 120;

/// What the legitimate resolver asks, in turn: seven classes, each well under the rate.
const LEGIT_QUERIES: [(&str, &str); 7] = [
    ("www.rrl.example", "A"),
    ("www.rrl.example", "AAAA"),
    ("rrl.example", "MX"),
    ("mail.rrl.example", "A"),
    ("rrl.example", "TXT"),
    (BIG, "TXT"),
    // Replaced by a fresh random name per query: NXDOMAIN.
    ("nx", "A"),
];
/// The legitimate resolver's pace.
const LEGIT_QPS: u64 = 100;
/// UDP tries per legitimate query, and the wait for each.
const LEGIT_TRIES: u32 = 3;
const LEGIT_WAIT: Duration = Duration::from_millis(500);
/// The latency recorded for a query never answered.
const UNANSWERED_MS: f64 = 3000.0;

struct Settings {
    duration: Duration,
    flood_rate: u64,
    prefixes: u8,
    hosts: u8,
    rrl_rate: u32,
    slip: u32,
    window: String,
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut settings = Settings {
        duration: Duration::from_secs(10),
        flood_rate: 20_000,
        prefixes: 16,
        hosts: 4,
        rrl_rate: 20,
        slip: 2,
        window: "4s".to_owned(),
    };
    let mut build = true;
    let mut agent_bin: Option<PathBuf> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = |what: &str| {
            rest.next()
                .with_context(|| format!("{arg} needs {what}"))
                .cloned()
        };
        match arg.as_str() {
            "--duration" => {
                settings.duration = Duration::from_secs(
                    value("seconds")?
                        .parse()
                        .context("--duration needs whole seconds")?,
                );
            }
            "--flood-rate" => settings.flood_rate = value("a rate")?.parse()?,
            "--prefixes" => settings.prefixes = value("a count")?.parse()?,
            "--hosts" => settings.hosts = value("a count")?.parse()?,
            "--rrl-rate" => settings.rrl_rate = value("a rate")?.parse()?,
            "--slip" => settings.slip = value("a number")?.parse()?,
            "--window" => settings.window = value("a duration")?,
            "--no-build" => build = false,
            "--agent-bin" => agent_bin = Some(PathBuf::from(value("a path")?)),
            other => bail!(
                "unknown option {other:?}; expected --duration, --flood-rate, --prefixes, \
                 --hosts, --rrl-rate, --slip, --window, --no-build or --agent-bin"
            ),
        }
    }
    ensure!(
        (1..=120).contains(&settings.duration.as_secs()),
        "--duration must be 1-120 seconds"
    );
    ensure!(
        (1..=250).contains(&settings.prefixes) && (1..=250).contains(&settings.hosts),
        "--prefixes and --hosts must be 1-250"
    );
    ensure!(settings.flood_rate > 0, "--flood-rate must be positive");
    ensure!(settings.rrl_rate > 0, "--rrl-rate must be positive");

    install_tools()?;
    let agent_bin = match agent_bin {
        Some(path) => path,
        None => {
            if build {
                cargo_release(
                    &crate::project_root(),
                    &["build", "--release", "-p", "defenra-agent"],
                )?;
            }
            crate::target_dir().join("release/defenra-agent")
        }
    };
    ensure!(
        agent_bin.exists(),
        "{} is missing; build it or pass --agent-bin",
        agent_bin.display()
    );
    let work = std::env::temp_dir().join(format!("defenra-bench-dns-rrl-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!("work directory: {}", work.display());

    let zone_file = work.join("rrl.example.zone");
    std::fs::write(&zone_file, knot_zone())?;
    let agent_config = work.join("agent.json");
    std::fs::write(&agent_config, agent_config_json())?;

    let knot_port = free_port()?;
    let knot_conf = work.join("knot.conf");
    std::fs::write(
        &knot_conf,
        knot_config(&work, knot_port, &zone_file, &settings)?,
    )?;
    let knot = {
        let server = Server::start_waiting_for(
            "knot",
            Command::new("knotd").args(["-c", path_str(&knot_conf)?]),
            &work,
            knot_port,
            &format!("www.{ZONE}"),
        )?;
        let measured = measure(knot_port, server.pid(), &settings)?;
        drop(server);
        measured
    };
    let agent_port = free_port()?;
    let agent = {
        let state = work.join("state");
        std::fs::create_dir_all(&state)?;
        let mut command = Command::new(&agent_bin);
        command.args([
            "--config",
            path_str(&agent_config)?,
            "--dns-listen",
            &format!("127.0.0.1:{agent_port}"),
            "--http-listen",
            "off",
            "--https-listen",
            "off",
            "--health-listen",
            "off",
            "--state-dir",
            path_str(&state)?,
            "--log-level",
            "warn",
            "--dns-rrl-rate",
            &settings.rrl_rate.to_string(),
            "--dns-rrl-slip",
            &settings.slip.to_string(),
            "--dns-rrl-window",
            &settings.window,
            "--dns-rrl-ipv4-prefix",
            "24",
            "--dns-rrl-ipv6-prefix",
            "56",
        ]);
        let server = Server::start_waiting_for(
            "agent",
            &mut command,
            &work,
            agent_port,
            &format!("www.{ZONE}"),
        )?;
        let measured = measure(agent_port, server.pid(), &settings)?;
        drop(server);
        measured
    };

    println!("{}", render_report(&settings, &knot, &agent));
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// What one run against one server measured.
#[derive(Debug, Default)]
struct Measurement {
    flood_sent: u64,
    flood_bytes_out: u64,
    flood_bytes_in: u64,
    flood_responses: u64,
    /// Queries that reached the server: everything sent minus the kernel's drops on the
    /// server's sockets.
    handled: u64,
    cpu_seconds: f64,
    legit_asked: usize,
    legit_answered: usize,
    legit_via_tcp: usize,
    legit_p50_ms: f64,
    legit_p99_ms: f64,
}

impl Measurement {
    fn amplification(&self) -> f64 {
        self.flood_bytes_in as f64 / (self.flood_bytes_out.max(1)) as f64
    }

    fn per_cpu_second(&self) -> f64 {
        self.handled as f64 / self.cpu_seconds.max(0.001)
    }

    fn answer_rate(&self) -> f64 {
        100.0 * self.legit_answered as f64 / (self.legit_asked.max(1)) as f64
    }
}

/// One legitimate query's fate.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    latency_ms: f64,
    answered: bool,
    via_tcp: bool,
    /// UDP and TCP queries it took.
    queries: u64,
}

fn measure(port: u16, pid: u32, settings: &Settings) -> anyhow::Result<Measurement> {
    let server: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let drops_before = udp_drops(port)?;
    let cpu_before = cpu_seconds(pid)?;
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let bytes_in = Arc::new(AtomicU64::new(0));
    let responses = Arc::new(AtomicU64::new(0));

    // The victims: one socket per address, each with a thread counting what arrives.
    let mut victims = Vec::new();
    let mut receivers = Vec::new();
    for prefix in 0..settings.prefixes {
        for host in 1..=settings.hosts {
            let socket = UdpSocket::bind((Ipv4Addr::new(127, 10, prefix, host), 0))
                .context("cannot bind a victim address in 127.10.0.0/16")?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let receiving = socket.try_clone()?;
            let (stop, bytes_in, responses) = (
                Arc::clone(&stop_receiving),
                Arc::clone(&bytes_in),
                Arc::clone(&responses),
            );
            receivers.push(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Relaxed) {
                    if let Ok(len) = receiving.recv(&mut buf) {
                        bytes_in.fetch_add(len as u64, Relaxed);
                        responses.fetch_add(1, Relaxed);
                    }
                }
            }));
            victims.push(socket);
        }
    }

    // The legitimate resolver: four workers sharing one schedule at LEGIT_QPS.
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + settings.duration;
    let next = Arc::new(AtomicU64::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut resolvers = Vec::new();
    for worker in 0..4u16 {
        let (next, outcomes) = (Arc::clone(&next), Arc::clone(&outcomes));
        let socket = UdpSocket::bind((Ipv4Addr::new(127, 20, 0, 1), 0))
            .context("cannot bind the resolver address 127.20.0.1")?;
        socket.set_read_timeout(Some(LEGIT_WAIT))?;
        resolvers.push(thread::spawn(move || {
            let mut id = worker.wrapping_mul(16_384);
            loop {
                let n = next.fetch_add(1, Relaxed);
                let at = start + Duration::from_micros(n * 1_000_000 / LEGIT_QPS);
                if at >= end {
                    return;
                }
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                id = id.wrapping_add(1);
                let outcome = resolve(&socket, server, n as usize, id);
                if let Ok(mut outcomes) = outcomes.lock() {
                    outcomes.push(outcome);
                }
            }
        }));
    }

    // The attacker: bursts every millisecond, round robin over the victims.
    let packet = query_packet(BIG, "TXT", false);
    let mut flood_sent = 0u64;
    let mut flood_bytes_out = 0u64;
    if let Some(wait) = start.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
    let mut victim = 0usize;
    let mut id: u16 = 0;
    let mut packet = packet;
    while Instant::now() < end {
        let due = (start.elapsed().as_micros() as u64 * settings.flood_rate) / 1_000_000;
        while flood_sent < due {
            id = id.wrapping_add(1);
            packet[..2].copy_from_slice(&id.to_be_bytes());
            if victims[victim].send_to(&packet, server).is_ok() {
                flood_bytes_out += packet.len() as u64;
            }
            flood_sent += 1;
            victim = (victim + 1) % victims.len();
        }
        thread::sleep(Duration::from_micros(500));
    }
    for resolver in resolvers {
        let _ = resolver.join();
    }
    // Answers still on their way.
    thread::sleep(Duration::from_millis(300));
    let cpu_after = cpu_seconds(pid)?;
    let drops_after = udp_drops(port)?;
    stop_receiving.store(true, Relaxed);
    for receiver in receivers {
        let _ = receiver.join();
    }

    let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    let mut latencies: Vec<f64> = outcomes.iter().map(|o| o.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let legit_queries: u64 = outcomes.iter().map(|o| o.queries).sum();
    let drops = drops_after.saturating_sub(drops_before);
    Ok(Measurement {
        flood_sent,
        flood_bytes_out,
        flood_bytes_in: bytes_in.load(Relaxed),
        flood_responses: responses.load(Relaxed),
        handled: (flood_sent + legit_queries).saturating_sub(drops),
        cpu_seconds: cpu_after - cpu_before,
        legit_asked: outcomes.len(),
        legit_answered: outcomes.iter().filter(|o| o.answered).count(),
        legit_via_tcp: outcomes.iter().filter(|o| o.via_tcp).count(),
        legit_p50_ms: percentile(&latencies, 50).unwrap_or(0.0),
        legit_p99_ms: percentile(&latencies, 99).unwrap_or(0.0),
    })
}

/// One query as a resolver asks it: UDP (up to [`LEGIT_TRIES`] times), then TCP when the
/// answer comes back truncated.
fn resolve(socket: &UdpSocket, server: SocketAddr, n: usize, id: u16) -> Outcome {
    let (name, kind) = LEGIT_QUERIES[n % LEGIT_QUERIES.len()];
    let random_name;
    let name = if name == "nx" {
        random_name = format!("nx{n}x{id}.{ZONE}");
        random_name.as_str()
    } else {
        name
    };
    let mut packet = query_packet(name, kind, false);
    // A resolver's EDNS buffer: 1232.
    let size_at = packet.len() - 8;
    if let Some(size) = packet.get_mut(size_at..size_at + 2) {
        size.copy_from_slice(&1232u16.to_be_bytes());
    }
    packet[..2].copy_from_slice(&id.to_be_bytes());
    let started = Instant::now();
    let mut outcome = Outcome {
        latency_ms: UNANSWERED_MS,
        answered: false,
        via_tcp: false,
        queries: 0,
    };
    let mut buf = [0u8; 4096];
    for _ in 0..LEGIT_TRIES {
        if socket.send_to(&packet, server).is_err() {
            continue;
        }
        outcome.queries += 1;
        let deadline = Instant::now() + LEGIT_WAIT;
        let truncated = loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break None;
            };
            let _ = socket.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match socket.recv(&mut buf) {
                // Another worker's late answer, or an older try's: keep waiting.
                Ok(len) if len >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 => {
                    break Some(buf[2] & 0x02 != 0);
                }
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        match truncated {
            Some(false) => {
                outcome.answered = true;
                outcome.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                return outcome;
            }
            Some(true) => {
                outcome.queries += 1;
                outcome.via_tcp = true;
                if tcp_query(server, &packet).is_ok() {
                    outcome.answered = true;
                    outcome.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
                }
                return outcome;
            }
            None => {}
        }
    }
    outcome
}

/// One query over a new TCP connection.
fn tcp_query(server: SocketAddr, packet: &[u8]) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer)?;
    ensure!(
        answer.len() >= 12 && answer[..2] == packet[..2],
        "a TCP answer to another query"
    );
    Ok(())
}

/// Datagrams the kernel dropped on the UDP sockets bound to `port` (/proc/net/udp's
/// last column), summed over the server's sockets.
fn udp_drops(port: u16) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").context("cannot read /proc/net/udp")?;
    let suffix = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            local
                .ends_with(&suffix)
                .then(|| fields.last()?.parse::<u64>().ok())?
        })
        .sum())
}

/// User plus system CPU time of a process so far, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: field 3 (state) onwards.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .context("unexpected /proc/PID/stat format")
    };
    // utime and stime are fields 14 and 15.
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

fn render_report(settings: &Settings, knot: &Measurement, agent: &Measurement) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nDNS RRL: agent vs knot {} (mod-rrl), one after the other on loopback, {} s each.\n\
         Flood: {} queries/s for {BIG} TXT (EDNS 4096) from {} addresses in {} /24s; \
         legitimate resolver at {LEGIT_QPS}/s from 127.20.0.1 (TC → TCP, 3 UDP tries of \
         {} ms). RRL rate {} /s, slip {}, /24 and /56; agent window {} (knot 3.2: 4 s).\n",
        knot_version(),
        settings.duration.as_secs(),
        settings.flood_rate,
        usize::from(settings.prefixes) * usize::from(settings.hosts),
        settings.prefixes,
        LEGIT_WAIT.as_millis(),
        settings.rrl_rate,
        settings.slip,
        settings.window,
    );
    let _ = writeln!(
        out,
        "| server | flood sent | responses to victims | amplification | handled | CPU s | \
         queries / CPU-s | legit answered | via TCP | legit p50 / p99 ms |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, run) in [("knot", knot), ("agent", agent)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.3} | {} | {:.2} | {:.0} | {:.2} % ({}/{}) | {} | {:.2} / {:.2} |",
            run.flood_sent,
            run.flood_responses,
            run.amplification(),
            run.handled,
            run.cpu_seconds,
            run.per_cpu_second(),
            run.answer_rate(),
            run.legit_answered,
            run.legit_asked,
            run.legit_via_tcp,
            run.legit_p50_ms,
            run.legit_p99_ms,
        );
    }
    let ratio = |agent: f64, knot: f64| agent / knot.max(f64::MIN_POSITIVE);
    let _ = writeln!(
        out,
        "\nagent / knot: amplification {:.2} (lower is better, target ≤ 1), queries per \
         CPU-second {:.2} (target ≥ 1), legit answer rate {:.3}, legit p99 {:.2}",
        ratio(agent.amplification(), knot.amplification()),
        ratio(agent.per_cpu_second(), knot.per_cpu_second()),
        ratio(agent.answer_rate(), knot.answer_rate()),
        ratio(agent.legit_p99_ms, knot.legit_p99_ms),
    );
    out
}

fn txt_strings() -> Vec<String> {
    (0..TXT_RECORDS)
        .map(|n| format!("{n:02}{}", "t".repeat(TXT_LEN - 2)))
        .collect()
}

fn knot_zone() -> String {
    let mut zone = format!(
        "$ORIGIN {ZONE}.\n$TTL 300\n\
         @ SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 604800 60\n\
         @ NS ns1.{ZONE}.\n\
         ns1 A 127.0.0.1\n\
         @ MX 10 mail.{ZONE}.\n\
         @ TXT \"v=spf1 -all\"\n\
         www A 192.0.2.10\n\
         www AAAA 2001:db8::10\n\
         mail A 192.0.2.20\n"
    );
    for text in txt_strings() {
        let _ = writeln!(zone, "big TXT \"{text}\"");
    }
    zone
}

fn agent_config_json() -> String {
    let mut records: Vec<String> = [
        format!(
            r#"{{"name":"@","type":"SOA","value":"ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 604800 60","ttl":300}}"#
        ),
        format!(r#"{{"name":"@","type":"NS","value":"ns1.{ZONE}.","ttl":300}}"#),
        r#"{"name":"ns1","type":"A","value":"127.0.0.1","ttl":300}"#.to_owned(),
        format!(r#"{{"name":"@","type":"MX","value":"mail.{ZONE}.","priority":10,"ttl":300}}"#),
        r#"{"name":"@","type":"TXT","value":"v=spf1 -all","ttl":300}"#.to_owned(),
        r#"{"name":"www","type":"A","value":"192.0.2.10","ttl":300}"#.to_owned(),
        r#"{"name":"www","type":"AAAA","value":"2001:db8::10","ttl":300}"#.to_owned(),
        r#"{"name":"mail","type":"A","value":"192.0.2.20","ttl":300}"#.to_owned(),
    ]
    .to_vec();
    for text in txt_strings() {
        records.push(format!(
            r#"{{"name":"big","type":"TXT","value":"{text}","ttl":300}}"#
        ));
    }
    format!(
        r#"{{"domains":[{{"domain":"{ZONE}","dnsRecords":[{}]}}]}}"#,
        records.join(",")
    )
}

fn knot_config(
    work: &Path,
    port: u16,
    zone_file: &Path,
    settings: &Settings,
) -> anyhow::Result<String> {
    let run_dir = work.join("knot-run");
    let storage = work.join("knot-db");
    std::fs::create_dir_all(&run_dir)?;
    std::fs::create_dir_all(&storage)?;
    Ok(format!(
        "server:\n    rundir: \"{}\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 2\n    \
         tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: \"{}\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         mod-rrl:\n  - id: bench\n    rate-limit: {}\n    slip: {}\n    table-size: 1000000\n\
         template:\n  - id: default\n    global-module: mod-rrl/bench\n    zonefile-sync: -1\n    \
         journal-content: none\n\
         zone:\n  - domain: {ZONE}\n    file: \"{}\"\n",
        path_str(&run_dir)?,
        path_str(&storage)?,
        settings.rrl_rate,
        settings.slip,
        path_str(zone_file)?
    ))
}
