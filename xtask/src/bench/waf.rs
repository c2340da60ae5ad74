//! `cargo xtask bench waf`: the cost of a representative WAF script in the agent against the
//! same script in nginx with Debian's Lua module (`access_by_lua_block`).
//!
//! Both proxies serve two hosts from the same nginx origin (a 1 KiB file): `plain.test`
//! without a script and `waf.test` with the rule script below. In every round each proxy
//! serves both hosts, first with one connection (wrk's median latency) and then with many
//! (throughput); the proxy's CPU time per request is counted during both runs from `/proc`.
//! What the script adds is the `waf.test` figure minus the `plain.test` one of the same
//! round. Rounds are short and many, in ABBA order (the proxy order flips every round, the
//! host order every other round), so that the two hosts of a proxy are measured seconds
//! apart and drift on a shared machine hits both sides alike. The report gives, over
//! rounds, the median and a 95 % confidence interval of the median of what the script adds,
//! of the agent's difference from nginx + lua round by round, and the ratio. Finally the
//! `check_cost` example of `defenra-waf` prints the median cost of one `WafEngine::check`
//! call in-process.
//!
//! Where there are two or more CPUs, processes are pinned (see [`Pin`]): the proxies, one
//! worker each, and the origin share the last CPU; wrk runs there too for the
//! one-connection runs and on the other CPUs for the loaded runs.
//!
//! Options: `--duration SECS` (1) per run, `--connections N` (50) for the throughput run,
//! `--threads N` (2), `--rounds N` (24), `--baseline PATH` (a second agent binary measured
//! in the same rounds, to compare builds), `--pin off`, `--skip-build`. The defaults take
//! about 5 minutes (8 with `--baseline`).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use anyhow::Context;

use super::common::{
    Server, agent_command, common_conf, free_port, http_common, json_string, on_path, pinned,
    wait_for_port, write_agent_config,
};
use super::wrk::{WrkResult, wrk_with};
use crate::{cargo, run_command};

/// The rule script both proxies run: an IP list, a shared-dict rate limit (high enough
/// never to trigger under the benchmark), a user-agent check and a few URI patterns. It
/// marks the responses it lets through, so the bench can check that it really ran.
const SCRIPT: &str = include_str!("../../../crates/defenra-waf/examples/bench_rules.lua");

const PLAIN_HOST: &str = "plain.test";
const WAF_HOST: &str = "waf.test";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    ensure_tools()?;
    if !settings.skip_build {
        run_command(&cargo(), &["build", "--release", "-p", "defenra-agent"])?;
        run_command(
            &cargo(),
            &[
                "build",
                "--release",
                "-p",
                "defenra-waf",
                "--example",
                "check_cost",
            ],
        )?;
    }
    let agent_binary = crate::target_dir().join("release/defenra-agent");
    let check_cost = crate::target_dir().join("release/examples/check_cost");
    for binary in [&agent_binary, &check_cost] {
        anyhow::ensure!(binary.exists(), "{} is missing", binary.display());
    }

    let dir = std::env::temp_dir().join(format!("defenra-bench-waf-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), vec![b'x'; 1024])?;
    fs::write(dir.join("rules.lua"), SCRIPT)?;

    let origin_port = free_port()?;
    let nginx_port = free_port()?;
    let agent_port = free_port()?;
    let pin = settings.pin.as_ref();
    let server_cpus = pin.map(|pin| pin.server.as_str());
    let proxy_workers = if pin.is_some() { "1" } else { "auto" };
    let origin = Server::nginx(&dir, "origin", &origin_conf(&dir, origin_port), server_cpus)?;
    let nginx = Server::nginx(
        &dir,
        "proxy",
        &proxy_conf(&dir, origin_port, nginx_port, proxy_workers),
        server_cpus,
    )?;
    let agent = start_agent(&dir, &agent_binary, origin_port, agent_port, server_cpus)?;
    // A second agent build measured in the same rounds, to compare builds under the same
    // conditions (`--baseline PATH`).
    let baseline_port = free_port()?;
    let baseline = match &settings.baseline {
        Some(binary) => {
            let baseline_dir = dir.join("baseline");
            fs::create_dir_all(&baseline_dir)?;
            Some(start_agent(
                &baseline_dir,
                binary,
                origin_port,
                baseline_port,
                server_cpus,
            )?)
        }
        None => None,
    };
    let mut ports = vec![("nginx", nginx_port), ("agent", agent_port)];
    if baseline.is_some() {
        ports.push(("baseline agent", baseline_port));
    }
    wait_for_port(origin_port)?;
    for &(_, port) in &ports {
        wait_for_port(port)?;
    }
    // The script must run in every proxy and block the same way before anything is measured.
    for &(name, port) in &ports {
        let plain = get(port, PLAIN_HOST, "/index.html", "bench")?;
        let checked = get(port, WAF_HOST, "/index.html", "bench")?;
        let blocked = get(port, WAF_HOST, "/index.html", "sqlmap/1.7")?;
        anyhow::ensure!(
            plain.starts_with("HTTP/1.1 200") && !plain.to_ascii_lowercase().contains("x-waf"),
            "{name} plain host: {plain}"
        );
        anyhow::ensure!(
            checked.starts_with("HTTP/1.1 200")
                && checked.to_ascii_lowercase().contains("x-waf: checked"),
            "{name} does not run the script: {checked}"
        );
        anyhow::ensure!(
            blocked.starts_with("HTTP/1.1 403"),
            "{name} does not block a bad user agent: {blocked}"
        );
    }

    let mut proxies = vec![
        Proxy {
            name: "nginx + lua".to_owned(),
            port: nginx_port,
            pid: nginx.pid(),
        },
        Proxy {
            name: "agent".to_owned(),
            port: agent_port,
            pid: agent.pid(),
        },
    ];
    if let Some(baseline) = &baseline {
        proxies.push(Proxy {
            name: "agent (baseline)".to_owned(),
            port: baseline_port,
            pid: baseline.pid(),
        });
    }
    // Warm-up: connection pools, the agent's Lua state and LuaJIT's string table, nginx's
    // JIT traces.
    for proxy in &proxies {
        for host in [PLAIN_HOST, WAF_HOST] {
            measure(proxy, host, &settings)?;
        }
    }
    let mut series: Vec<Series> = proxies.iter().map(|_| Series::default()).collect();
    for round in 0..settings.rounds {
        // ABBA: the proxy order flips every round and the host order every other round, so
        // drift on a shared machine hits both sides of each comparison alike.
        let mut order: Vec<usize> = (0..proxies.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let hosts = if (round / 2) % 2 == 0 {
            [PLAIN_HOST, WAF_HOST]
        } else {
            [WAF_HOST, PLAIN_HOST]
        };
        for index in order {
            let proxy = &proxies[index];
            let mut plain = None;
            let mut waf = None;
            for host in hosts {
                let run = measure(proxy, host, &settings)?;
                if host == PLAIN_HOST {
                    plain = Some(run);
                } else {
                    waf = Some(run);
                }
            }
            let (plain, waf) = (plain.expect("plain measured"), waf.expect("waf measured"));
            eprintln!(
                "round {}/{} {}: added p50 {:.1} µs, added CPU {:.2} µs/req loaded, {:.2} one connection",
                round + 1,
                settings.rounds,
                proxy.name,
                waf.p50_us - plain.p50_us,
                waf.cpu_loaded_us - plain.cpu_loaded_us,
                waf.cpu_single_us - plain.cpu_single_us,
            );
            series[index].plain.push(plain);
            series[index].waf.push(waf);
        }
    }
    drop(baseline);
    drop(agent);
    drop(nginx);
    drop(origin);

    eprintln!("measuring WafEngine::check in-process");
    let rules = dir.join("rules.lua");
    let hot = check_cost_ns(&check_cost, &rules, None, server_cpus)?;
    // As in a proxy, where a request's socket and HTTP work evicts the Lua state from the
    // CPU caches before the next check.
    let cold = check_cost_ns(&check_cost, &rules, Some(4096), server_cpus)?;

    let rows: Vec<(&str, &Series)> = proxies
        .iter()
        .map(|proxy| proxy.name.as_str())
        .zip(&series)
        .collect();
    println!("{}", render(&rows, hot, cold, &settings));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    duration: Duration,
    connections: u32,
    threads: u32,
    rounds: u32,
    skip_build: bool,
    baseline: Option<PathBuf>,
    /// CPU pinning, on by default where there are at least two CPUs (`--pin off`).
    pin: Option<Pin>,
}

/// Where each process runs. Unpinned, the scheduler places wrk, the proxy and the origin
/// differently from one run to the next, and on a small VM a wake-up on another (idle) CPU
/// costs tens of microseconds: one-connection latencies then swing by more than a script
/// costs.
struct Pin {
    /// The proxies (one worker each) and the origin.
    server: String,
    /// wrk's throughput runs. Its one-connection runs share the server CPU, so a request
    /// goes wrk → proxy → origin and back without waking another CPU, and the latency is
    /// the work done.
    load: String,
}

impl Pin {
    fn for_cpus(n_cpus: usize) -> Option<Pin> {
        if n_cpus < 2 {
            return None;
        }
        let last = n_cpus - 1;
        let load = if last == 1 {
            "0".to_owned()
        } else {
            format!("0-{}", last - 1)
        };
        Some(Pin {
            server: last.to_string(),
            load,
        })
    }
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut settings = Settings {
            duration: Duration::from_secs(1),
            connections: 50,
            threads: 2,
            rounds: 24,
            skip_build: false,
            baseline: None,
            pin: Pin::for_cpus(std::thread::available_parallelism().map_or(1, usize::from)),
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
            if flag == "--pin" {
                anyhow::ensure!(value == "off", "--pin takes only \"off\"");
                settings.pin = None;
                continue;
            }
            if flag == "--baseline" {
                let path = PathBuf::from(value);
                anyhow::ensure!(path.exists(), "{} is missing", path.display());
                settings.baseline = Some(path);
                continue;
            }
            let number: u32 = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a number"))?;
            anyhow::ensure!(number > 0, "{flag} must be positive");
            match flag.as_str() {
                "--duration" => settings.duration = Duration::from_secs(u64::from(number.min(30))),
                "--connections" => settings.connections = number,
                "--threads" => settings.threads = number,
                "--rounds" => settings.rounds = number.min(100),
                other => anyhow::bail!("unknown option {other:?}"),
            }
        }
        Ok(settings)
    }
}

/// A proxy under test: where it listens and whose CPU time to count.
struct Proxy {
    name: String,
    port: u16,
    pid: u32,
}

/// One host of one proxy in one round.
#[derive(Debug, Clone, Copy)]
struct HostRun {
    /// wrk's median latency with one connection.
    p50_us: f64,
    /// CPU time of the proxy's processes per request during that one-connection run.
    cpu_single_us: f64,
    /// CPU time per request during the many-connection run: when pinned, everything the
    /// server CPU did (proxy, origin, kernel), otherwise the proxy's processes.
    cpu_loaded_us: f64,
    /// Requests per second of the many-connection run.
    rps: f64,
}

/// One proxy's runs, one entry per round, without and with the script.
#[derive(Default)]
struct Series {
    plain: Vec<HostRun>,
    waf: Vec<HostRun>,
}

impl Series {
    /// Per round, what the script added to `field`.
    fn added(&self, field: fn(&HostRun) -> f64) -> Vec<f64> {
        self.waf
            .iter()
            .zip(&self.plain)
            .map(|(waf, plain)| field(waf) - field(plain))
            .collect()
    }
}

/// The one-connection latency run, then the many-connection run, each with the proxy's CPU
/// time counted.
fn measure(proxy: &Proxy, host: &str, settings: &Settings) -> anyhow::Result<HostRun> {
    let url = format!("http://127.0.0.1:{}/index.html", proxy.port);
    let pin = settings.pin.as_ref();
    let (single_cpus, load_cpus) = (
        pin.map(|pin| pin.server.as_str()),
        pin.map(|pin| pin.load.as_str()),
    );
    let cpu_before = process_tree_cpu_ns(proxy.pid);
    let single = wrk(&url, host, 1, 1, settings.duration, single_cpus)?;
    let cpu_single = process_tree_cpu_ns(proxy.pid).saturating_sub(cpu_before);
    anyhow::ensure!(single.errors == 0, "{} {host}: {}", proxy.name, single.raw);
    // Loaded, the server CPU's busy time counts: per-process accounting under load moves the
    // kernel's network work between processes and ksoftirqd from one run to the next.
    let loaded_cpu_ns = || match pin {
        Some(pin) => cpu_busy_ns(&pin.server),
        None => process_tree_cpu_ns(proxy.pid),
    };
    let cpu_before = loaded_cpu_ns();
    let loaded = wrk(
        &url,
        host,
        settings.threads,
        settings.connections,
        settings.duration,
        load_cpus,
    )?;
    let cpu_loaded = loaded_cpu_ns().saturating_sub(cpu_before);
    anyhow::ensure!(loaded.errors == 0, "{} {host}: {}", proxy.name, loaded.raw);
    let per_request = |ns: u64, requests: u64| ns as f64 / 1000.0 / requests.max(1) as f64;
    Ok(HostRun {
        p50_us: single.p50_ms * 1000.0,
        cpu_single_us: per_request(cpu_single, single.requests),
        cpu_loaded_us: per_request(cpu_loaded, loaded.requests),
        rps: loaded.requests_per_second,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// `median [low, high]`, the bounds being a 95 % confidence interval of the median.
fn spread(values: &[f64], decimals: usize) -> String {
    let (low, high) = median_interval(values);
    format!(
        "{:.decimals$} [{low:.decimals$}, {high:.decimals$}]",
        median(values)
    )
}

/// A distribution-free 95 % (or wider) confidence interval of the median: the `k`-th
/// smallest and `k`-th largest values, with `k` the largest count for which fewer than `k`
/// of `n` fair coin flips come up heads with probability at most 2.5 % (the sign test).
/// Below 9 values it is the whole range.
fn median_interval(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    // P(B <= i) for B ~ Binomial(n, 1/2), accumulated term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut below = 0.0;
    let mut k = 0;
    for i in 0..n / 2 {
        below += term;
        if below > 0.025 {
            break;
        }
        k = i + 1;
        term *= (n - i) as f64 / (i + 1) as f64;
    }
    let k = k.saturating_sub(1);
    (sorted[k], sorted[n - 1 - k])
}

type Field = fn(&HostRun) -> f64;

const METRICS: [(&str, Field, usize); 3] = [
    ("added latency µs (p50, 1 conn)", |run| run.p50_us, 1),
    (
        "added CPU µs/req (loaded, server CPU)",
        |run| run.cpu_loaded_us,
        2,
    ),
    (
        "added CPU µs/req (1 conn, proxy)",
        |run| run.cpu_single_us,
        2,
    ),
];

fn render(
    rows: &[(&str, &Series)],
    check_hot_ns: (f64, f64),
    check_cold_ns: (f64, f64),
    settings: &Settings,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nSame rule script in both proxies, 1 KiB body from an nginx origin, {} rounds in \
         ABBA order; \"added\" is script minus no script within a round, shown as the median \
         over rounds [95 % confidence interval of the median].\n\
         Latency and \"1 conn\" CPU: wrk -t1 -c1 -d{}s; CPU = time on CPU (user + system, \
         /proc/<pid>/task/*/schedstat) of the proxy's processes and threads / requests. \
         \"Loaded\" CPU and RPS: wrk -t{} -c{} -d{}s; CPU = busy time of the server CPU \
         (/proc/stat: proxy, origin and kernel) / requests when pinned, else the proxy's.\n",
        settings.rounds,
        settings.duration.as_secs(),
        settings.threads,
        settings.connections,
        settings.duration.as_secs()
    );
    match &settings.pin {
        Some(pin) => {
            let _ = writeln!(
                out,
                "Pinned: each proxy (one worker) and the origin on CPU {}; wrk on CPU {} for the \
                 one-connection runs and on CPU {} for the loaded runs.\n",
                pin.server, pin.server, pin.load
            );
        }
        None => {
            let _ = writeln!(out, "Not pinned: the scheduler places every process.\n");
        }
    }
    let _ = writeln!(
        out,
        "| proxy | p50 µs, no script → script | {} | {} | {} | RPS, no script → script |",
        METRICS[0].0, METRICS[1].0, METRICS[2].0
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, series) in rows {
        let column =
            |(_, field, decimals): (&str, Field, usize)| spread(&series.added(field), decimals);
        let p50 = |runs: &[HostRun]| median(&runs.iter().map(|run| run.p50_us).collect::<Vec<_>>());
        let rps = |runs: &[HostRun]| median(&runs.iter().map(|run| run.rps).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {name} | {:.1} → {:.1} | {} | {} | {} | {:.0} → {:.0} |",
            p50(&series.plain),
            p50(&series.waf),
            column(METRICS[0]),
            column(METRICS[1]),
            column(METRICS[2]),
            rps(&series.plain),
            rps(&series.waf),
        );
    }
    // Every agent row against nginx + lua (the first row), round by round.
    if let Some(((reference_name, reference), others)) = rows.split_first() {
        for (name, series) in others {
            let _ = writeln!(
                out,
                "\n| {name} vs {reference_name} | {} | {} | {} |",
                METRICS[0].0, METRICS[1].0, METRICS[2].0
            );
            let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
            let mut difference = Vec::new();
            let mut ratio = Vec::new();
            let mut at_most = Vec::new();
            for (_, field, decimals) in METRICS {
                let ours = series.added(field);
                let theirs = reference.added(field);
                let per_round: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a - b).collect();
                difference.push(spread(&per_round, decimals));
                ratio.push(format!("{:.2}", median(&ours) / median(&theirs)));
                let n_at_most = per_round.iter().filter(|value| **value <= 0.0).count();
                at_most.push(format!("{n_at_most}/{}", per_round.len()));
            }
            for (label, cells) in [
                ("difference per round, median [95 % CI]", &difference),
                ("ratio of the medians", &ratio),
                (
                    "rounds where the agent added at most nginx + lua's",
                    &at_most,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} | {} |",
                    cells[0], cells[1], cells[2]
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nWafEngine::check in-process, same script: median {:.2} µs (p90 {:.2}) per call in a \
         loop; {:.2} µs (p90 {:.2}) with 4 MiB of other memory written before each call.",
        check_hot_ns.0 / 1000.0,
        check_hot_ns.1 / 1000.0,
        check_cold_ns.0 / 1000.0,
        check_cold_ns.1 / 1000.0
    );
    out
}

/// Busy time of CPU `cpu` (user, nice, system, irq and softirq; not steal) in nanoseconds,
/// from `/proc/stat`'s ticks.
fn cpu_busy_ns(cpu: &str) -> u64 {
    let label = format!("cpu{cpu}");
    let Ok(stat) = fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat
        .lines()
        .find(|line| line.split_whitespace().next() == Some(label.as_str()))
    else {
        return 0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&index| ticks.get(index).copied().unwrap_or(0))
        .sum();
    (busy as f64 * 1e9 / clock_ticks_per_second()) as u64
}

/// `check_cost`'s median and p90 in nanoseconds, on `cpus` when given, with
/// `CHECK_COST_EVICT_KIB` set to `evict_kib` when given.
fn check_cost_ns(
    binary: &Path,
    script: &Path,
    evict_kib: Option<u32>,
    cpus: Option<&str>,
) -> anyhow::Result<(f64, f64)> {
    let mut command = pinned(binary, cpus);
    command.arg(script);
    if let Some(kib) = evict_kib {
        command.env("CHECK_COST_EVICT_KIB", kib.to_string());
    }
    let output = command.output().context("cannot run check_cost")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(output.status.success(), "check_cost failed: {text}");
    let metric = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<f64>().ok())
    };
    let median = metric("waf_check_median_ns").context("check_cost printed no median")?;
    Ok((median, metric("waf_check_p90_ns").unwrap_or(f64::NAN)))
}

/// `getconf CLK_TCK`, the unit of `/proc/stat` (100 nearly everywhere).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Nanoseconds on CPU (user + system) of every thread of `pid` and of its direct children
/// (nginx's workers), from `/proc/<pid>/task/<tid>/schedstat`: exact, where `stat`'s
/// utime/stime come in 10 ms ticks.
fn process_tree_cpu_ns(pid: u32) -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Some(candidate) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{candidate}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state(3) ppid(4) ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let parent = rest
            .split_whitespace()
            .nth(1)
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if candidate != pid && parent != Some(pid) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(format!("/proc/{candidate}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(schedstat) = fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            total += schedstat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Installs nginx, its Lua module and wrk from Debian packages when missing.
fn ensure_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !on_path("nginx") {
        missing.push("nginx-light");
    }
    if !Path::new(LUA_MODULE).exists() {
        missing.push("libnginx-mod-http-lua");
    }
    if !on_path("wrk") {
        missing.push("wrk");
    }
    if missing.is_empty() {
        return Ok(());
    }
    run_command("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(missing);
    run_command("apt-get", &args)
}

const NDK_MODULE: &str = "/usr/lib/nginx/modules/ndk_http_module.so";
const LUA_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_lua_module.so";

/// One `GET` with `Connection: close`; returns the response head and body as text.
fn get(port: u16, host: &str, path: &str, user_agent: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The origin: one worker serving `www/index.html` (1 KiB) for any host.
fn origin_conf(dir: &Path, port: u16) -> String {
    format!(
        "{}http {{\n{}server {{ listen 127.0.0.1:{port} reuseport; root {}/www; }}\n}}\n",
        common_conf(dir, "origin", "1"),
        http_common(dir, "origin"),
        dir.display()
    )
}

/// nginx as the reverse proxy with upstream keep-alive, configured like the agent; the WAF
/// host runs the script in `access_by_lua_block`.
fn proxy_conf(dir: &Path, origin: u16, port: u16, workers: &str) -> String {
    let location = |lua: &str| {
        format!(
            "location / {{\n{lua}\
               proxy_pass http://origin;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
               proxy_set_header Host $http_host;\n\
               proxy_set_header X-Real-IP $remote_addr;\n\
               proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
               proxy_set_header X-Forwarded-Proto $scheme;\n\
             }}\n"
        )
    };
    format!(
        "load_module {NDK_MODULE};\nload_module {LUA_MODULE};\n{common}http {{\n{http_common}\
         lua_shared_dict cache 16m;\n\
         upstream origin {{ server 127.0.0.1:{origin}; keepalive 256; }}\n\
         server {{ listen 127.0.0.1:{port}; server_name {PLAIN_HOST};\n{plain}}}\n\
         server {{ listen 127.0.0.1:{port}; server_name {WAF_HOST};\n{waf}}}\n\
         }}\n",
        common = common_conf(dir, "proxy", workers),
        http_common = http_common(dir, "proxy"),
        plain = location(""),
        waf = location(&format!("access_by_lua_block {{\n{SCRIPT}\n}}\n")),
    )
}

/// The agent on the two-name config, one worker when pinned.
fn start_agent(
    dir: &Path,
    binary: &Path,
    origin_port: u16,
    port: u16,
    cpus: Option<&str>,
) -> anyhow::Result<Server> {
    let domain = |name: &str, script: Option<&str>| {
        let lua = script.map_or(String::new(), |code| {
            format!(r#", "luaCode": {}"#, json_string(code))
        });
        format!(
            r#"{{ "domain": "{name}",
                 "httpProxy": {{ "enabled": true, "type": "http" }},
                 "dnsRecords": [{{ "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true }}]{lua} }}"#
        )
    };
    let config = format!(
        r#"{{"success": true, "domains": [{}, {}]}}"#,
        domain(PLAIN_HOST, None),
        domain(WAF_HOST, Some(SCRIPT))
    );
    let mut command = agent_command(
        pinned(binary, cpus),
        dir,
        &write_agent_config(dir, &config)?,
        "agent-state",
        origin_port,
        &[("http", port)],
    )?;
    if cpus.is_some() {
        // One worker, as nginx gets when pinned.
        command.args(["--http-workers", "1"]);
    }
    Server::spawn(&mut command, "-TERM")
}

fn wrk(
    url: &str,
    host: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
    cpus: Option<&str>,
) -> anyhow::Result<WrkResult> {
    let headers = [format!("Host: {host}"), "User-Agent: wrk-bench".to_owned()];
    wrk_with(url, threads, connections, duration, &headers, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_compares_the_agent_with_nginx_round_by_round() {
        let run = |p50_us, cpu_us| HostRun {
            p50_us,
            cpu_single_us: cpu_us,
            cpu_loaded_us: cpu_us,
            rps: 1000.0,
        };
        // nginx adds 4, 6, 5 µs of CPU; the agent 3, 7, 4: at most nginx's in 2 of 3 rounds.
        let nginx = Series {
            plain: vec![run(50.0, 10.0); 3],
            waf: vec![run(54.0, 14.0), run(56.0, 16.0), run(55.0, 15.0)],
        };
        let agent = Series {
            plain: vec![run(40.0, 20.0); 3],
            waf: vec![run(43.0, 23.0), run(47.0, 27.0), run(44.0, 24.0)],
        };
        let settings = Settings::parse(&[]).unwrap();
        let report = render(
            &[("nginx + lua", &nginx), ("agent", &agent)],
            (2500.0, 3000.0),
            (7000.0, 8000.0),
            &settings,
        );
        assert!(
            report.contains("| nginx + lua | 50.0 → 55.0 | 5.0 [4.0, 6.0] |"),
            "{report}"
        );
        assert!(
            report.contains("| agent | 40.0 → 44.0 | 4.0 [3.0, 7.0] |"),
            "{report}"
        );
        assert!(
            report.contains("| difference per round, median [95 % CI] | -1.0 [-1.0, 1.0] |"),
            "{report}"
        );
        assert!(
            report.contains("| ratio of the medians | 0.80 |"),
            "{report}"
        );
        assert!(
            report.contains("nginx + lua's | 2/3 | 2/3 | 2/3 |"),
            "{report}"
        );
        assert!(report.contains("median 2.50 µs (p90 3.00)"), "{report}");
        assert!(report.contains("7.00 µs (p90 8.00) with 4 MiB"), "{report}");
    }

    #[test]
    fn medians_of_even_counts_average_the_middle_pair() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        assert_eq!(spread(&[2.0, -1.0, 5.0], 1), "2.0 [-1.0, 5.0]");
        // n = 24: P(B <= 6) = 1.1 %, P(B <= 7) = 3.2 %, so the 7th smallest and largest.
        let values: Vec<f64> = (1..=24).map(f64::from).collect();
        assert_eq!(median_interval(&values), (7.0, 18.0));
        // n = 8: P(B <= 1) = 3.5 %, so the whole range.
        let values: Vec<f64> = (1..=8).map(f64::from).collect();
        assert_eq!(median_interval(&values), (1.0, 8.0));
    }

    #[test]
    fn nginx_config_runs_the_script_only_for_the_waf_host() {
        let conf = proxy_conf(Path::new("/tmp/x"), 1, 2, "1");
        assert_eq!(conf.matches("access_by_lua_block").count(), 1);
        assert!(conf.contains("lua_shared_dict cache"));
        let waf_server = conf.split("server_name waf.test").nth(1).unwrap();
        assert!(waf_server.contains("ngx.shared.cache:incr"));
    }
}
