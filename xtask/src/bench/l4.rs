//! `cargo xtask bench l4`: HAProxy (tcp mode) and the agent forwarding to the same iperf3
//! server and the same short-connection echo server on loopback.
//!
//! Options: `--seconds N` per run (default 10), `--rounds N` (default 3; the table shows
//! medians), `--clients N` for the connection-rate test
//! (default 32), `--only throughput|rate` to run one of the two, `--haproxy-splice` to let
//! HAProxy splice too (`option splice-auto`), `--skip-build` to reuse
//! `target/release/defenra-agent`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::common::free_port;

/// Bytes each short connection sends and gets back.
const MESSAGE: &[u8; 32] = b"defenra-l4-connection-rate-test!";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    ensure_tools()?;
    let root = crate::project_root();
    let agent_binary = crate::target_dir().join("release/defenra-agent");
    if !settings.skip_build {
        // The default target dir, so the lead's release builds reuse this one.
        eprintln!("$ cargo build --release -p defenra-agent");
        let status = Command::new(crate::cargo())
            .args(["build", "--release", "-p", "defenra-agent"])
            .env_remove("CARGO_TARGET_DIR")
            .current_dir(&root)
            .status()
            .context("cannot start cargo")?;
        anyhow::ensure!(status.success(), "release build failed with {status}");
    }
    anyhow::ensure!(
        agent_binary.exists(),
        "{} is missing (drop --skip-build)",
        agent_binary.display()
    );

    let work = std::env::temp_dir().join(format!("defenra-bench-l4-{}", std::process::id()));
    std::fs::create_dir_all(work.join("state"))
        .with_context(|| format!("cannot create {}", work.display()))?;

    // The two destinations every proxy forwards to.
    let iperf_port = free_port()?;
    let _iperf = Guard(
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start iperf3 -s")?,
    );
    let echo = EchoServer::start()?;
    wait_listening(iperf_port)?;

    let mut running = Vec::new();
    for peer in [Peer::Haproxy, Peer::Agent] {
        let ports = (free_port()?, free_port()?);
        let mut command = match peer {
            Peer::Haproxy => {
                let config = work.join("haproxy.cfg");
                let config_text =
                    haproxy_config(ports, iperf_port, echo.port, settings.haproxy_splice);
                std::fs::write(&config, config_text)?;
                let mut command = Command::new("haproxy");
                command.arg("-f").arg(&config).arg("-db");
                command
            }
            Peer::Agent => {
                let config = work.join("agent.json");
                std::fs::write(&config, agent_config(ports, iperf_port, echo.port))?;
                let mut command = Command::new(&agent_binary);
                command
                    .arg("--config")
                    .arg(&config)
                    .args(["--dns-listen", "off", "--http-listen", "off"])
                    .args(["--https-listen", "off", "--health-listen", "off"])
                    .args(["--l4-bind", "127.0.0.1", "--log-level", "warn"])
                    .arg("--state-dir")
                    .arg(work.join("state"));
                command
            }
        };
        let child = Guard(
            command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", peer.name()))?,
        );
        wait_listening(ports.0)?;
        wait_listening(ports.1)?;
        running.push((peer, child, ports));
    }
    // Both run side by side; rounds alternate which goes first (ABBA), so load from
    // elsewhere on the machine does not always fall on the same one. The idle one uses no
    // CPU while the other is measured.
    let mut rounds: [Vec<Measurement>; 2] = [Vec::new(), Vec::new()];
    for round in 0..settings.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for index in order {
            let (peer, child, ports) = &running[index];
            eprintln!(
                "== round {} of {}: {}",
                round + 1,
                settings.rounds,
                peer.name()
            );
            rounds[index].push(measure(child.0.id(), *ports, &settings)?);
        }
    }
    let mut results = Vec::new();
    for (index, (_, child, _)) in running.iter().enumerate() {
        let mut summary = Measurement::median(&rounds[index]);
        let (rss_kib, peak_kib) = memory_kib(child.0.id())?;
        summary.rss_mib = rss_kib as f64 / 1024.0;
        summary.peak_rss_mib = peak_kib as f64 / 1024.0;
        results.push(summary);
    }
    drop(running);
    let _ = std::fs::remove_dir_all(&work);
    print_table(&results, &settings);
    Ok(())
}

struct Settings {
    seconds: u64,
    /// Rounds per proxy; the table shows the median.
    rounds: usize,
    clients: usize,
    skip_build: bool,
    /// Run only the throughput or only the connection-rate test.
    only: Option<String>,
    /// Give HAProxy `option splice-auto` too (off by default, as in HAProxy's defaults).
    haproxy_splice: bool,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Settings> {
        let mut settings = Settings {
            seconds: 10,
            rounds: 3,
            clients: 32,
            skip_build: false,
            only: None,
            haproxy_splice: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    settings.seconds = args
                        .next()
                        .context("--seconds needs a value")?
                        .parse()
                        .context("--seconds")?;
                }
                "--rounds" => {
                    settings.rounds = args
                        .next()
                        .context("--rounds needs a value")?
                        .parse()
                        .context("--rounds")?;
                }
                "--clients" => {
                    settings.clients = args
                        .next()
                        .context("--clients needs a value")?
                        .parse()
                        .context("--clients")?;
                }
                "--skip-build" => settings.skip_build = true,
                "--haproxy-splice" => settings.haproxy_splice = true,
                "--only" => {
                    let test = args.next().context("--only needs throughput or rate")?;
                    anyhow::ensure!(
                        matches!(test.as_str(), "throughput" | "rate"),
                        "--only takes throughput or rate, not {test:?}"
                    );
                    settings.only = Some(test.clone());
                }
                other => anyhow::bail!(
                    "unknown option {other:?} (expected --seconds N, --rounds N, --clients N, --only throughput|rate, --haproxy-splice, --skip-build)"
                ),
            }
        }
        anyhow::ensure!(
            (1..=60).contains(&settings.seconds),
            "--seconds must be 1-60"
        );
        anyhow::ensure!((1..=9).contains(&settings.rounds), "--rounds must be 1-9");
        anyhow::ensure!(
            (1..=512).contains(&settings.clients),
            "--clients must be 1-512"
        );
        Ok(settings)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Haproxy,
    Agent,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Haproxy => "haproxy",
            Peer::Agent => "agent",
        }
    }
}

struct Measurement {
    single_stream_gbps: f64,
    parallel_gbps: f64,
    cpu_seconds_per_gb: f64,
    connections_per_second: f64,
    connection_errors: u64,
    cpu_ms_per_1k_connections: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// One round against one proxy: iperf3 (one stream, then four) and the connection-rate
/// test, with the proxy's CPU time from /proc.
fn measure(
    pid: u32,
    (throughput_port, rate_port): (u16, u16),
    settings: &Settings,
) -> anyhow::Result<Measurement> {
    let run_throughput = settings.only.as_deref() != Some("rate");
    let run_rate = settings.only.as_deref() != Some("throughput");
    let cpu_before = cpu_seconds(pid)?;
    let (single, parallel) = if run_throughput {
        (
            iperf(throughput_port, settings.seconds, 1)?,
            iperf(throughput_port, settings.seconds, 4)?,
        )
    } else {
        (Throughput::default(), Throughput::default())
    };
    let cpu_throughput = cpu_seconds(pid)? - cpu_before;
    let gigabytes = (single.bytes + parallel.bytes) as f64 / 1e9;

    let cpu_before = cpu_seconds(pid)?;
    let rate = if run_rate {
        connection_rate(rate_port, settings.clients, settings.seconds)
    } else {
        Rate::default()
    };
    let cpu_rate = cpu_seconds(pid)? - cpu_before;
    eprintln!(
        "   {:.2} Gbit/s (1 stream), {:.2} Gbit/s (4 streams), {:.0} connections/s, {} errors",
        single.gbps, parallel.gbps, rate.per_second, rate.errors
    );
    Ok(Measurement {
        single_stream_gbps: single.gbps,
        parallel_gbps: parallel.gbps,
        cpu_seconds_per_gb: cpu_throughput / gigabytes.max(f64::EPSILON),
        connections_per_second: rate.per_second,
        connection_errors: rate.errors,
        cpu_ms_per_1k_connections: cpu_rate * 1000.0 / (rate.completed.max(1) as f64 / 1000.0),
        rss_mib: 0.0,
        peak_rss_mib: 0.0,
    })
}

impl Measurement {
    /// The median of each figure over the rounds (errors are summed).
    fn median(rounds: &[Measurement]) -> Measurement {
        let median = |value: fn(&Measurement) -> f64| -> f64 {
            let mut values: Vec<f64> = rounds.iter().map(value).collect();
            values.sort_by(f64::total_cmp);
            match values.len() {
                0 => 0.0,
                n if n % 2 == 1 => values[n / 2],
                n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
            }
        };
        Measurement {
            single_stream_gbps: median(|m| m.single_stream_gbps),
            parallel_gbps: median(|m| m.parallel_gbps),
            cpu_seconds_per_gb: median(|m| m.cpu_seconds_per_gb),
            connections_per_second: median(|m| m.connections_per_second),
            connection_errors: rounds.iter().map(|m| m.connection_errors).sum(),
            cpu_ms_per_1k_connections: median(|m| m.cpu_ms_per_1k_connections),
            rss_mib: 0.0,
            peak_rss_mib: 0.0,
        }
    }
}

/// A table row: its name, how to read it from a measurement, whether higher is better.
type Row = (&'static str, fn(&Measurement) -> f64, bool);

fn print_table(results: &[Measurement], settings: &Settings) {
    let [haproxy, agent] = results else {
        return;
    };
    let rows: [Row; 8] = [
        (
            "throughput, 1 stream (Gbit/s)",
            |m| m.single_stream_gbps,
            true,
        ),
        ("throughput, 4 streams (Gbit/s)", |m| m.parallel_gbps, true),
        ("CPU per GB forwarded (s)", |m| m.cpu_seconds_per_gb, false),
        ("connections/s", |m| m.connections_per_second, true),
        ("connection errors", |m| m.connection_errors as f64, false),
        (
            "CPU per 1000 connections (ms)",
            |m| m.cpu_ms_per_1k_connections,
            false,
        ),
        ("RSS after the runs (MiB)", |m| m.rss_mib, false),
        ("peak RSS (MiB)", |m| m.peak_rss_mib, false),
    ];
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nl4: medians of {} rounds, {} s per run, {} clients for the connection rate, loopback, HAProxy {}\n",
        settings.rounds,
        settings.seconds,
        settings.clients,
        if settings.haproxy_splice {
            "with option splice-auto"
        } else {
            "without splice"
        }
    );
    let _ = writeln!(
        table,
        "| {:<32} | {:>10} | {:>10} | {:>13} |",
        "metric", "haproxy", "agent", "agent/haproxy"
    );
    let _ = writeln!(table, "|{:-<34}|{:->12}|{:->12}|{:->15}|", "", "", "", "");
    for (name, value, higher_is_better) in rows {
        let (ours, theirs) = (value(agent), value(haproxy));
        let ratio = if theirs > 0.0 {
            format!("{:.2}", ours / theirs)
        } else {
            "-".to_owned()
        };
        let better = if higher_is_better { "higher" } else { "lower" };
        let _ = writeln!(
            table,
            "| {:<32} | {:>10.2} | {:>10.2} | {:>6} {:>6} |",
            name, theirs, ours, ratio, better
        );
    }
    print!("{table}");
}

fn haproxy_config(
    (throughput_port, rate_port): (u16, u16),
    iperf: u16,
    echo: u16,
    splice: bool,
) -> String {
    // Two threads for two cores, as the agent's runtime; HAProxy's defaults otherwise (no
    // splice unless asked). maxconn keeps HAProxy's computed file-descriptor need (which
    // counts pipes when splicing) under the container's limit.
    let (maxconn, splice) = if splice {
        (4000, "    option splice-auto\n")
    } else {
        (8000, "")
    };
    format!(
        "global\n    maxconn {maxconn}\n    nbthread 2\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n{splice}\
         listen throughput\n    bind 127.0.0.1:{throughput_port}\n    server iperf 127.0.0.1:{iperf}\n\
         listen rate\n    bind 127.0.0.1:{rate_port}\n    server echo 127.0.0.1:{echo}\n"
    )
}

fn agent_config((throughput_port, rate_port): (u16, u16), iperf: u16, echo: u16) -> String {
    format!(
        r#"{{"success": true, "domains": [], "agents": [], "proxies": [
  {{"id": "bench-throughput", "name": "throughput", "type": "tcp", "sourcePort": {throughput_port},
    "destinationHost": "127.0.0.1", "destinationPort": {iperf}, "enabled": true}},
  {{"id": "bench-rate", "name": "rate", "type": "tcp", "sourcePort": {rate_port},
    "destinationHost": "127.0.0.1", "destinationPort": {echo}, "enabled": true}}
]}}
"#
    )
}

fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = ["iperf3", "haproxy"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    crate::run_command("apt-get", &["update"])?;
    let mut install = vec!["install", "-y"];
    install.extend(&missing);
    crate::run_command("apt-get", &install)
}

#[derive(Default)]
struct Throughput {
    gbps: f64,
    bytes: u64,
}

fn iperf(port: u16, seconds: u64, streams: u32) -> anyhow::Result<Throughput> {
    let output = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"])
        .output()
        .context("cannot run iperf3 -c")?;
    let json = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "iperf3 through port {port} failed: {json}"
    );
    let received = json
        .find("\"sum_received\"")
        .map(|at| &json[at..])
        .context("iperf3 output has no sum_received")?;
    let bits_per_second =
        json_number(received, "\"bits_per_second\"").context("no bits_per_second")?;
    let bytes = json_number(received, "\"bytes\"").context("no bytes")?;
    Ok(Throughput {
        gbps: bits_per_second / 1e9,
        bytes: bytes as u64,
    })
}

/// The number after the first `key:` in `text` (enough for iperf3's flat JSON fields).
fn json_number(text: &str, key: &str) -> Option<f64> {
    let after = &text[text.find(key)? + key.len()..];
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

#[derive(Default)]
struct Rate {
    per_second: f64,
    completed: u64,
    errors: u64,
}

/// `clients` threads, each opening a connection, sending 32 bytes, reading them back and
/// the server's close, over and over for `seconds`.
fn connection_rate(port: u16, clients: usize, seconds: u64) -> Rate {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (completed, errors) = (Arc::clone(&completed), Arc::clone(&errors));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match one_connection(address) {
                        Ok(()) => completed.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let completed = completed.load(Ordering::Relaxed);
    Rate {
        per_second: completed as f64 / elapsed,
        completed,
        errors: errors.load(Ordering::Relaxed),
    }
}

fn one_connection(address: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(MESSAGE)?;
    let mut echoed = [0u8; MESSAGE.len()];
    stream.read_exact(&mut echoed)?;
    if &echoed != MESSAGE {
        return Err(std::io::Error::other("wrong echo"));
    }
    // The server closes first, so TIME_WAIT stays on the server side of each hop.
    let mut rest = [0u8; 1];
    match stream.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("extra bytes")),
    }
}

/// The destination of the connection-rate test: answers 32 bytes with the same 32 and
/// closes. A few blocking threads, one connection at a time each.
struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    fn start() -> anyhow::Result<EchoServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind echo server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..4 {
            let listener = listener.try_clone()?;
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, _)) = listener.accept() else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut message = [0u8; MESSAGE.len()];
                    if stream.read_exact(&mut message).is_ok() {
                        let _ = stream.write_all(&message);
                    }
                }
            });
        }
        Ok(EchoServer { port, stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // The threads notice on their next accept; the process is about to exit anyway.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Kills the child process when dropped, so an early `?` leaves nothing running.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 10 s for a socket in LISTEN state on `port` (read from /proc, so nothing
/// connects to the port and disturbs the server behind it).
fn wait_listening(port: u16) -> anyhow::Result<()> {
    let wanted = format!(":{port:04X} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let table = ["/proc/net/tcp", "/proc/net/tcp6"]
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .concat();
        let listening = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && format!("{} ", fields[1]).ends_with(&wanted) && fields[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

/// User plus system CPU time of `pid`, from /proc/PID/stat (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = read_proc(pid, "stat")?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .context("odd /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; field 3 is the first after the name.
    let ticks = |index: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(index)
            .context("short /proc stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Current and peak resident memory of `pid` in KiB.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = read_proc(pid, "status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn read_proc(pid: u32, file: &str) -> anyhow::Result<String> {
    let path: PathBuf = Path::new("/proc").join(pid.to_string()).join(file);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}
