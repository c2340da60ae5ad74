//! `cargo xtask bench dns`: the agent's DNS server beside knot, driven by dnsperf on loopback.
//!
//! Both servers get the same zone. dnsperf first finds each server's peak QPS for a static
//! query mix (A, AAAA, MX, TXT, NXDOMAIN) and for a GeoDNS A query carrying an ECS option
//! (knot answers it from a plain A record), then replays both mixes at a fixed rate (0.8× and
//! 0.7× knot's peak) while a probe thread times single queries for the latency percentiles at
//! that load (dnsperf's mean is a mean over its own queue). Last, the agent is started
//! on a 10,000-domain config with every service on (DNS, HTTP, HTTPS, health) to check its
//! resident memory, split into anonymous memory (the config snapshot and the services'
//! indexes) and file-backed pages (mostly the binary's code).
//!
//! Options: `--duration SECONDS` per run (default 10), `--domains N` for the memory check
//! (default 10000), `--rounds N` peak runs per server, best kept (default 2), `--no-build`
//! to use the release binary already in `target/release`, `--dist` to repeat the memory
//! check with the `dist` profile (thin LTO, stripped: the binary the .deb ships), built
//! unless `--no-build`.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// The zone both servers serve, in knot's zone-file syntax; the agent gets the same records
/// as JSON from [`agent_config`].
const ZONE_NAME: &str = "bench.example";

/// The static query mix, one query per line in dnsperf's format.
const STATIC_QUERIES: &str = "www.bench.example A\n\
                              www.bench.example AAAA\n\
                              bench.example MX\n\
                              bench.example TXT\n\
                              nope.bench.example A\n";

/// GeoDNS queries: a proxied name, answered per client location by the agent.
const GEO_QUERIES: &str = "geo.bench.example A\n";

/// EDNS Client Subnet 81.2.3.0/24 (family 1, source 24, scope 0), as dnsperf's `-E`
/// code:hex-value. The test GeoIP database puts 81.0.0.0/8 in Germany.
const ECS_OPTION: &str = "8:00011800510203";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut duration = 10u64;
    let mut n_domains = 10_000usize;
    let mut build = true;
    let mut rounds = 2usize;
    let mut dist = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--duration" => {
                duration = rest
                    .next()
                    .context("--duration needs seconds")?
                    .parse()
                    .context("--duration needs a whole number of seconds")?;
            }
            "--domains" => {
                n_domains = rest
                    .next()
                    .context("--domains needs a count")?
                    .parse()
                    .context("--domains needs a whole number")?;
            }
            "--no-build" => build = false,
            "--dist" => dist = true,
            "--rounds" => {
                rounds = rest
                    .next()
                    .context("--rounds needs a count")?
                    .parse()
                    .context("--rounds needs a whole number")?;
            }
            other => {
                bail!(
                    "unknown option {other:?}; expected --duration N, --rounds N, --domains N, --dist or --no-build"
                )
            }
        }
    }
    ensure!(
        (1..=60).contains(&duration),
        "--duration must be 1-60 seconds"
    );
    ensure!((1..=5).contains(&rounds), "--rounds must be 1-5");

    install_tools()?;
    let root = crate::project_root();
    let work = std::env::temp_dir().join(format!("defenra-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!("work directory: {}", work.display());

    // The release agent goes to the default target dir, shared with the lead's builds.
    if build {
        cargo_release(&root, &["build", "--release", "-p", "defenra-agent"])?;
        if dist {
            cargo_release(
                &root,
                &["build", "--profile", "dist", "-p", "defenra-agent"],
            )?;
        }
    }
    let agent_bin = crate::target_dir().join("release/defenra-agent");
    let dist_bin = crate::target_dir().join("dist/defenra-agent");
    for binary in std::iter::once(&agent_bin).chain(dist.then_some(&dist_bin)) {
        ensure!(
            binary.exists(),
            "{} is missing; run without --no-build",
            binary.display()
        );
    }
    // A small GeoIP database; a debug build of the writer is plenty.
    let geoip = work.join("bench.mmdb");
    crate::run_command(
        &crate::cargo(),
        &[
            "run",
            "--quiet",
            "-p",
            "defenra-geo",
            "--example",
            "write-test-mmdb",
            "--",
            path_str(&geoip)?,
            "81.0.0.0/8=DE:EU",
            "87.0.0.0/8=US:NA",
            "2a00::/12=FR:EU",
        ],
    )?;

    let zone_file = work.join("bench.example.zone");
    std::fs::write(&zone_file, knot_zone())?;
    let static_queries = work.join("static.txt");
    std::fs::write(&static_queries, STATIC_QUERIES)?;
    let geo_queries = work.join("geo.txt");
    std::fs::write(&geo_queries, GEO_QUERIES)?;
    let config = work.join("agent.json");
    std::fs::write(&config, agent_config(1))?;

    // knot
    let knot_port = free_port()?;
    let knot_conf = work.join("knot.conf");
    std::fs::write(&knot_conf, knot_config(&work, knot_port, &zone_file)?)?;
    let knot = Server::start(
        "knot",
        Command::new("knotd").args(["-c", path_str(&knot_conf)?]),
        &work,
        knot_port,
    )?;
    // agent
    let agent_port = free_port()?;
    let agent = Server::start(
        "agent",
        &mut agent_command(
            &agent_bin,
            &config,
            &geoip,
            &work.join("state"),
            agent_port,
            false,
        )?,
        &work,
        agent_port,
    )?;

    let mut rows = Vec::new();
    // Peaks: `rounds` alternating runs each, keeping each server's best, so a burst of
    // other work on the shared machine during one run does not decide the ratio.
    let mut peaks: [Option<Run>; 4] = [None; 4];
    for _ in 0..rounds {
        for (slot, (port, queries, ecs)) in [
            (knot_port, &static_queries, None),
            (agent_port, &static_queries, None),
            (knot_port, &geo_queries, Some(ECS_OPTION)),
            (agent_port, &geo_queries, Some(ECS_OPTION)),
        ]
        .into_iter()
        .enumerate()
        {
            let run = dnsperf(port, queries, duration, ecs, None)?;
            if peaks[slot].is_none_or(|best| run.qps > best.qps) {
                peaks[slot] = Some(run);
            }
        }
    }
    let [
        Some(knot_static),
        Some(agent_static),
        Some(knot_geo),
        Some(agent_geo),
    ] = peaks
    else {
        bail!("--rounds must be at least 1");
    };

    // Latency at a fixed load: 0.8× knot's static peak, 0.7× its GeoDNS peak.
    let static_rate = (knot_static.qps * 0.8) as u64;
    let geo_rate = (knot_geo.qps * 0.7) as u64;
    let knot_static_at = dnsperf(
        knot_port,
        &static_queries,
        duration,
        None,
        Some(static_rate),
    )?;
    let agent_static_at = dnsperf(
        agent_port,
        &static_queries,
        duration,
        None,
        Some(static_rate),
    )?;
    let knot_geo_at = dnsperf(
        knot_port,
        &geo_queries,
        duration,
        Some(ECS_OPTION),
        Some(geo_rate),
    )?;
    let agent_geo_at = dnsperf(
        agent_port,
        &geo_queries,
        duration,
        Some(ECS_OPTION),
        Some(geo_rate),
    )?;
    let knot_rss = knot.rss_kib()?;
    let agent_rss = agent.rss_kib()?;
    drop(agent);
    drop(knot);

    rows.push(("static, peak", knot_static, agent_static));
    rows.push(("geo+ECS, peak", knot_geo, agent_geo));
    rows.push(("static @0.8x knot", knot_static_at, agent_static_at));
    rows.push(("geo+ECS @0.7x knot", knot_geo_at, agent_geo_at));

    // Memory with many domains, every service on.
    let big_config = work.join("agent-big.json");
    std::fs::write(&big_config, agent_config(n_domains))?;
    let mut big_rss = Vec::new();
    for (profile, binary) in
        std::iter::once(("release", &agent_bin)).chain(dist.then_some(("dist", &dist_bin)))
    {
        let big_port = free_port()?;
        let big = Server::start_waiting_for(
            "agent (big)",
            &mut agent_command(
                binary,
                &big_config,
                &geoip,
                &work.join(format!("state-big-{profile}")),
                big_port,
                true,
            )?,
            &work,
            big_port,
            &format!("www.d{}.{ZONE_NAME}", n_domains - 1),
        )?;
        // The config loop hands freed memory back right after the last reload; give it
        // a moment past the first answer.
        std::thread::sleep(Duration::from_secs(1));
        big_rss.push((profile, big.memory()?));
    }

    let report = render_report(
        duration,
        rounds,
        &rows,
        knot_rss,
        agent_rss,
        n_domains,
        &big_rss,
        static_rate,
        geo_rate,
    );
    println!("{report}");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

/// One dnsperf run.
#[derive(Debug, Clone, Copy)]
struct Run {
    qps: f64,
    mean_ms: f64,
    /// From the probe, only in fixed-rate runs.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    lost: u64,
}

#[allow(clippy::too_many_arguments)]
fn render_report(
    duration: u64,
    rounds: usize,
    rows: &[(&str, Run, Run)],
    knot_rss: u64,
    agent_rss: u64,
    n_domains: usize,
    big_rss: &[(&str, Memory)],
    static_rate: u64,
    geo_rate: u64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nDNS: agent vs knot {}, dnsperf on loopback, {duration} s per run, peaks best of \
         {rounds} (fixed rates: static {static_rate} qps, geo {geo_rate} qps)\n",
        knot_version()
    );
    let _ = writeln!(
        out,
        "| run | knot QPS | agent QPS | ratio | knot mean / p50 / p99 ms | agent mean / p50 / p99 ms | lost (knot/agent) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for (label, knot, agent) in rows {
        let latency = |run: &Run| match (run.p50_ms, run.p99_ms) {
            (Some(p50), Some(p99)) => format!("{:.3} / {p50:.3} / {p99:.3}", run.mean_ms),
            _ => format!("{:.3} / - / -", run.mean_ms),
        };
        let _ = writeln!(
            out,
            "| {label} | {:.0} | {:.0} | {:.2} | {} | {} | {}/{} |",
            knot.qps,
            agent.qps,
            agent.qps / knot.qps.max(1.0),
            latency(knot),
            latency(agent),
            knot.lost,
            agent.lost
        );
    }
    let _ = writeln!(
        out,
        "\nRSS after the runs: knot {:.1} MiB, agent {:.1} MiB (ratio {:.2})",
        knot_rss as f64 / 1024.0,
        agent_rss as f64 / 1024.0,
        agent_rss as f64 / (knot_rss.max(1)) as f64
    );
    let _ = writeln!(
        out,
        "\nagent with {n_domains} domains, every service on (DNS, HTTP, HTTPS, health); \
         target RSS < 30 MiB\n"
    );
    let _ = writeln!(
        out,
        "| binary | RSS MiB | anonymous MiB | file-backed MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (profile, memory) in big_rss {
        let label = match *profile {
            "dist" => "dist (thin LTO, stripped; what the .deb ships)",
            _ => "release (line tables)",
        };
        let _ = writeln!(
            out,
            "| {label} | **{:.1}** | {:.1} | {:.1} |",
            memory.rss_kib as f64 / 1024.0,
            memory.anon_kib as f64 / 1024.0,
            memory.file_kib as f64 / 1024.0
        );
    }
    out
}

/// Installs knot and dnsperf from Debian when missing.
pub(crate) fn install_tools() -> anyhow::Result<()> {
    let present = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if present("knotd") && present("dnsperf") {
        return Ok(());
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "knot", "dnsperf"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install().is_ok_and(|status| status.success()) {
        crate::run_command("apt-get", &["update"])?;
        let status = install().context("cannot run apt-get")?;
        ensure!(status.success(), "apt-get install knot dnsperf failed");
    }
    Ok(())
}

/// Runs cargo in the project root with the default target dir (the release binary is
/// shared with the lead's builds, whatever CARGO_TARGET_DIR this shell has).
pub(crate) fn cargo_release(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(crate::cargo())
        .args(args)
        .current_dir(root)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "cargo {} failed", args.join(" "));
    Ok(())
}

pub(crate) fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A port free for both UDP and TCP on 127.0.0.1 right now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    for _ in 0..32 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

fn agent_command(
    binary: &Path,
    config: &Path,
    geoip: &Path,
    state: &Path,
    port: u16,
    every_service: bool,
) -> anyhow::Result<Command> {
    std::fs::create_dir_all(state)?;
    // Every service on loopback with a port the kernel picks, or DNS alone.
    let other = if every_service { "127.0.0.1:0" } else { "off" };
    let mut command = Command::new(binary);
    command.args([
        "--config",
        path_str(config)?,
        "--dns-listen",
        &format!("127.0.0.1:{port}"),
        "--http-listen",
        other,
        "--https-listen",
        other,
        "--health-listen",
        other,
        "--state-dir",
        path_str(state)?,
        "--geoip-db",
        path_str(geoip)?,
        "--agent-ip",
        "127.0.0.1",
        "--log-level",
        "warn",
    ]);
    Ok(command)
}

fn knot_zone() -> String {
    format!(
        "$ORIGIN {ZONE_NAME}.\n$TTL 300\n\
         @ SOA ns1.{ZONE_NAME}. hostmaster.{ZONE_NAME}. 1 3600 600 604800 60\n\
         @ NS ns1.{ZONE_NAME}.\n\
         ns1 A 127.0.0.1\n\
         @ A 192.0.2.1\n\
         @ AAAA 2001:db8::1\n\
         @ MX 10 mail.{ZONE_NAME}.\n\
         @ TXT \"v=spf1 include:_spf.{ZONE_NAME} -all\"\n\
         www A 192.0.2.10\n\
         www AAAA 2001:db8::10\n\
         mail A 192.0.2.20\n\
         geo 60 A 10.0.0.2\n"
    )
}

fn knot_config(work: &Path, port: u16, zone_file: &Path) -> anyhow::Result<String> {
    let run_dir = work.join("knot-run");
    let storage = work.join("knot-db");
    std::fs::create_dir_all(&run_dir)?;
    std::fs::create_dir_all(&storage)?;
    Ok(format!(
        "server:\n    rundir: \"{}\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 2\n    \
         tcp-workers: 1\n    background-workers: 1\n\
         database:\n    storage: \"{}\"\n\
         log:\n  - target: stderr\n    any: warning\n\
         template:\n  - id: default\n    zonefile-sync: -1\n    journal-content: none\n\
         zone:\n  - domain: {ZONE_NAME}\n    file: \"{}\"\n",
        path_str(&run_dir)?,
        path_str(&storage)?,
        path_str(zone_file)?
    ))
}

/// The agent's config: the benchmark zone, plus `extra - 1` small domains
/// (`dN.bench.example` with A, AAAA, MX and TXT) for the memory check.
fn agent_config(domains: usize) -> String {
    let mut out = String::from(r#"{"domains":["#);
    let _ = write!(
        out,
        r#"{{"domain":"{ZONE_NAME}","dnsRecords":[
          {{"name":"@","type":"SOA","value":"ns1.{ZONE_NAME}. hostmaster.{ZONE_NAME}. 1 3600 600 604800 60","ttl":300}},
          {{"name":"@","type":"NS","value":"ns1.{ZONE_NAME}.","ttl":300}},
          {{"name":"ns1","type":"A","value":"127.0.0.1","ttl":300}},
          {{"name":"@","type":"A","value":"192.0.2.1","ttl":300}},
          {{"name":"@","type":"AAAA","value":"2001:db8::1","ttl":300}},
          {{"name":"@","type":"MX","value":"mail.{ZONE_NAME}.","priority":10,"ttl":300}},
          {{"name":"@","type":"TXT","value":"v=spf1 include:_spf.{ZONE_NAME} -all","ttl":300}},
          {{"name":"www","type":"A","value":"192.0.2.10","ttl":300}},
          {{"name":"www","type":"AAAA","value":"2001:db8::10","ttl":300}},
          {{"name":"mail","type":"A","value":"192.0.2.20","ttl":300}},
          {{"name":"geo","type":"A","value":"203.0.113.30","httpProxyEnabled":true}}],
         "geoDnsMap":{{"de":"10.0.0.2","us":"10.0.0.3","europe":"10.0.0.4","default":"10.0.0.9"}}}}"#
    );
    for n in 1..domains {
        let _ = write!(
            out,
            r#",{{"domain":"d{n}.{ZONE_NAME}","dnsRecords":[
              {{"name":"@","type":"A","value":"192.0.2.{}"}},
              {{"name":"www","type":"A","value":"192.0.2.{}"}},
              {{"name":"@","type":"AAAA","value":"2001:db8::{:x}"}},
              {{"name":"@","type":"MX","value":"mail.d{n}.{ZONE_NAME}","priority":10}},
              {{"name":"@","type":"TXT","value":"site {n} verification token"}}]}}"#,
            n % 250 + 1,
            n % 250 + 1,
            n
        );
    }
    out.push_str("]}");
    out
}

/// A server process, killed when dropped.
pub(crate) struct Server {
    name: &'static str,
    child: Child,
}

impl Server {
    fn start(
        name: &'static str,
        command: &mut Command,
        work: &Path,
        port: u16,
    ) -> anyhow::Result<Server> {
        Self::start_waiting_for(name, command, work, port, &format!("www.{ZONE_NAME}"))
    }

    /// Starts the server and waits (at most 60 s) until `probe` answers with an address.
    pub(crate) fn start_waiting_for(
        name: &'static str,
        command: &mut Command,
        work: &Path,
        port: u16,
        probe: &str,
    ) -> anyhow::Result<Server> {
        let log = std::fs::File::create(work.join(format!("{}.log", name.replace(' ', "-"))))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut server = Server { name, child };
        let started = Instant::now();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{name} exited at start with {status}; see its log in {}",
                    work.display()
                );
            }
            if answers(addr, probe) {
                eprintln!("{name} ready on {addr} after {:?}", started.elapsed());
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = server.child.kill();
        bail!("{name} did not answer {probe} within 60 s")
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory (VmRSS) in KiB.
    fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS")
    }

    /// Resident memory, with its anonymous and file-backed parts.
    fn memory(&self) -> anyhow::Result<Memory> {
        Ok(Memory {
            rss_kib: self.status_kib("VmRSS")?,
            anon_kib: self.status_kib("RssAnon")?,
            file_kib: self.status_kib("RssFile")?,
        })
    }

    /// A KiB figure from `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .with_context(|| format!("cannot read {}'s /proc status", self.name))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .with_context(|| format!("no {field} for {}", self.name))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `name A` gets a NOERROR answer with at least one record.
fn answers(addr: SocketAddr, name: &str) -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut query = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&query, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((len, _)) if len >= 12 => {
            buf[0..2] == [0xbe, 0xef]
                && buf[3] & 0x0f == 0
                && u16::from_be_bytes([buf[6], buf[7]]) > 0
        }
        _ => false,
    }
}

/// Runs dnsperf against `port`. With `rate`, dnsperf paces its queries and a probe thread
/// sends the same queries one at a time (about 1000 a second) alongside, timing each
/// round trip for the percentiles: dnsperf 2.10 prints only the mean, and its verbose
/// per-query output would itself load the 2-core machine.
fn dnsperf(
    port: u16,
    queries: &Path,
    duration: u64,
    ecs: Option<&str>,
    rate: Option<u64>,
) -> anyhow::Result<Run> {
    let mut command = Command::new("dnsperf");
    command.args([
        "-s",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-d",
        path_str(queries)?,
        "-l",
        &duration.to_string(),
        "-c",
        "8",
        "-q",
        "256",
        "-e",
    ]);
    if let Some(option) = ecs {
        command.args(["-E", option]);
    }
    if let Some(rate) = rate {
        command.args(["-Q", &rate.max(1).to_string()]);
    }
    eprintln!(
        "$ dnsperf -p {port} -d {} -l {duration}{}{}",
        queries.display(),
        ecs.map_or(String::new(), |option| format!(" -E {option}")),
        rate.map_or(String::new(), |rate| format!(
            " -Q {rate} (+ latency probe)"
        ))
    );
    let probe = rate.map(|_| {
        let packets: Vec<Vec<u8>> = std::fs::read_to_string(queries)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(name, kind)| query_packet(name, kind, ecs.is_some()))
            .collect();
        let until = Instant::now() + Duration::from_secs(duration);
        std::thread::spawn(move || probe_latencies(port, &packets, until))
    });
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("cannot start dnsperf")?;
    ensure!(
        output.status.success(),
        "dnsperf failed with {}",
        output.status
    );
    let mut run = parse_dnsperf(&String::from_utf8_lossy(&output.stdout))?;
    if let Some(probe) = probe {
        let mut latencies = probe.join().unwrap_or_default();
        latencies.sort_by(f64::total_cmp);
        run.p99_ms = percentile(&latencies, 99);
        run.p50_ms = percentile(&latencies, 50);
    }
    Ok(run)
}

pub(crate) fn percentile(sorted: &[f64], percent: usize) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[(sorted.len() * percent / 100).min(sorted.len() - 1)])
}

/// Sends `packets` in turn, one outstanding at a time, about every millisecond until
/// `until`; returns each round trip in milliseconds (a lost query counts as 100 ms).
fn probe_latencies(port: u16, packets: &[Vec<u8>], until: Instant) -> Vec<f64> {
    let mut latencies = Vec::new();
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return latencies;
    };
    if socket.connect(("127.0.0.1", port)).is_err()
        || socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .is_err()
    {
        return latencies;
    }
    // Let dnsperf reach its rate first.
    std::thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 4096];
    let mut id: u16 = 0;
    while Instant::now() < until {
        for packet in packets {
            id = id.wrapping_add(1);
            let mut packet = packet.clone();
            packet[..2].copy_from_slice(&id.to_be_bytes());
            let sent = Instant::now();
            if socket.send(&packet).is_err() {
                continue;
            }
            loop {
                match socket.recv(&mut buf) {
                    Ok(len) if len >= 2 && buf[..2] == id.to_be_bytes() => {
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        latencies.push(100.0);
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(900));
        }
    }
    latencies
}

/// A query as dnsperf `-e` sends it (EDNS, 4096-byte buffer), with [`ECS_OPTION`] when
/// `ecs`.
pub(crate) fn query_packet(name: &str, kind: &str, ecs: bool) -> Vec<u8> {
    let qtype: u16 = match kind {
        "AAAA" => 28,
        "MX" => 15,
        "TXT" => 16,
        _ => 1,
    };
    let mut packet = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in name.split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0, 0, 41, 0x10, 0, 0, 0, 0, 0]);
    if ecs {
        // Option 8, length 7: family 1, source 24, scope 0, 81.2.3 (the same as ECS_OPTION).
        packet.extend_from_slice(&[0, 11, 0, 8, 0, 7, 0, 1, 24, 0, 81, 2, 3]);
    } else {
        packet.extend_from_slice(&[0, 0]);
    }
    packet
}

fn parse_dnsperf(output: &str) -> anyhow::Result<Run> {
    let field = |prefix: &str| {
        output
            .lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok())
    };
    let qps = field("Queries per second:").context("dnsperf printed no QPS")?;
    let mean_ms = field("Average Latency (s):").context("dnsperf printed no latency")? * 1000.0;
    let lost = field("Queries lost:").unwrap_or(0.0) as u64;
    Ok(Run {
        qps,
        mean_ms,
        p50_ms: None,
        p99_ms: None,
        lost,
    })
}

pub(crate) fn knot_version() -> String {
    Command::new("knotd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.split_whitespace().last().map(str::to_owned))
        .unwrap_or_default()
}
