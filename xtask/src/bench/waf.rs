//! `cargo xtask bench waf`: the cost of a representative WAF script in the agent against the
//! same script in nginx with Debian's Lua module (`access_by_lua_block`).
//!
//! Both proxies serve two hosts from the same nginx origin (a 1 KiB file): `plain.test`
//! without a script and `waf.test` with the rule script below. wrk measures each host; a
//! proxy's added latency is its `waf.test` median latency minus its `plain.test` one,
//! measured with one connection so queueing does not hide it. A second run with many
//! connections gives the throughput and the CPU time the proxy spent per request (from
//! `/proc`), which is steadier than latency on a shared machine; the difference between
//! the hosts is the script's CPU cost per request. Finally the `check_cost` example of
//! `defenra-waf` prints the median cost of one `WafEngine::check` call in-process.
//!
//! Options: `--duration SECS` (8) per run, `--connections N` (50) for the throughput run,
//! `--threads N` (2), `--rounds N` (3, the best round of each is kept), `--skip-build`.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use anyhow::Context;

use super::common::{
    common_conf, free_port, http_common, json_string, nginx_binary, on_path, stop, wait_for_port,
};
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
    let origin = Nginx::start(&dir, "origin", &origin_conf(&dir, origin_port))?;
    let nginx = Nginx::start(&dir, "proxy", &proxy_conf(&dir, origin_port, nginx_port))?;
    let agent = start_agent(&dir, &agent_binary, origin_port, agent_port)?;
    for port in [origin_port, nginx_port, agent_port] {
        wait_for_port(port)?;
    }
    // The script must run in both proxies and block the same way before anything is measured.
    for (name, port) in [("nginx", nginx_port), ("agent", agent_port)] {
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

    let ticks_per_second = clock_ticks_per_second();
    let mut rows = Vec::new();
    for (name, port, pid) in [
        ("nginx + lua", nginx_port, nginx.child.id()),
        ("agent", agent_port, agent.child.id()),
    ] {
        let mut row = Row::default();
        for round in 0..settings.rounds {
            eprintln!("{name}: round {}/{}", round + 1, settings.rounds);
            let mut round_results = Vec::new();
            for host in [PLAIN_HOST, WAF_HOST] {
                let url = format!("http://127.0.0.1:{port}/index.html");
                wrk(&url, host, 1, 1, Duration::from_secs(1))?;
                let single = wrk(&url, host, 1, 1, settings.duration)?;
                anyhow::ensure!(single.errors == 0, "{name} {host}: {}", single.raw);
                let cpu_before = process_tree_cpu_ticks(pid);
                let loaded = wrk(
                    &url,
                    host,
                    settings.threads,
                    settings.connections,
                    settings.duration,
                )?;
                let cpu_ticks = process_tree_cpu_ticks(pid).saturating_sub(cpu_before);
                anyhow::ensure!(loaded.errors == 0, "{name} {host}: {}", loaded.raw);
                let cpu_us =
                    cpu_ticks as f64 * 1e6 / ticks_per_second / loaded.requests.max(1) as f64;
                round_results.push((single.p50_ms * 1000.0, loaded.requests_per_second, cpu_us));
            }
            let (plain, waf) = (round_results[0], round_results[1]);
            row.plain_p50_us.push(plain.0);
            row.waf_p50_us.push(waf.0);
            row.plain_rps.push(plain.1);
            row.waf_rps.push(waf.1);
            row.plain_cpu_us.push(plain.2);
            row.waf_cpu_us.push(waf.2);
        }
        rows.push((name, row));
    }
    drop(agent);
    drop(nginx);
    drop(origin);

    eprintln!("measuring WafEngine::check in-process");
    let output = Command::new(&check_cost)
        .arg(dir.join("rules.lua"))
        .output()
        .context("cannot run check_cost")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(output.status.success(), "check_cost failed: {text}");
    let metric = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<f64>().ok())
    };
    let check_median = metric("waf_check_median_ns").context("check_cost printed no median")?;
    let check_p90 = metric("waf_check_p90_ns").unwrap_or(f64::NAN);

    println!("{}", render(&rows, check_median, check_p90, &settings));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    duration: Duration,
    connections: u32,
    threads: u32,
    rounds: u32,
    skip_build: bool,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut settings = Settings {
            duration: Duration::from_secs(8),
            connections: 50,
            threads: 2,
            rounds: 3,
            skip_build: false,
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
            let number: u32 = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a number"))?;
            anyhow::ensure!(number > 0, "{flag} must be positive");
            match flag.as_str() {
                "--duration" => settings.duration = Duration::from_secs(u64::from(number.min(30))),
                "--connections" => settings.connections = number,
                "--threads" => settings.threads = number,
                "--rounds" => settings.rounds = number.min(5),
                other => anyhow::bail!("unknown option {other:?}"),
            }
        }
        Ok(settings)
    }
}

/// One proxy's measurements, one entry per round, for the host without and with the script.
#[derive(Default)]
struct Row {
    /// wrk's median latency with one connection, in microseconds.
    plain_p50_us: Vec<f64>,
    waf_p50_us: Vec<f64>,
    plain_rps: Vec<f64>,
    waf_rps: Vec<f64>,
    /// CPU time the proxy's processes used per request during the throughput run.
    plain_cpu_us: Vec<f64>,
    waf_cpu_us: Vec<f64>,
}

impl Row {
    /// Median over rounds of the per-round difference, so slow drift on a shared machine
    /// cancels out within each pair of runs.
    fn added(with: &[f64], without: &[f64]) -> f64 {
        median(with.iter().zip(without).map(|(a, b)| a - b).collect())
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn render(
    rows: &[(&str, Row)],
    check_median_ns: f64,
    check_p90_ns: f64,
    settings: &Settings,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nSame rule script in both proxies, 1 KiB body from an nginx origin, {} round(s), \
         medians over rounds.\n\
         Latency: wrk -t1 -c1 -d{}s (median latency). Throughput and CPU: wrk -t{} -c{} -d{}s, \
         CPU = user + system time of the proxy's processes / requests.\n",
        settings.rounds,
        settings.duration.as_secs(),
        settings.threads,
        settings.connections,
        settings.duration.as_secs()
    );
    let _ = writeln!(
        out,
        "| proxy | p50 µs, no script | p50 µs, script | added latency µs | \
         CPU µs/req, no script | CPU µs/req, script | added CPU µs/req | RPS, no script | RPS, script |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (name, row) in rows {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            median(row.plain_p50_us.clone()),
            median(row.waf_p50_us.clone()),
            Row::added(&row.waf_p50_us, &row.plain_p50_us),
            median(row.plain_cpu_us.clone()),
            median(row.waf_cpu_us.clone()),
            Row::added(&row.waf_cpu_us, &row.plain_cpu_us),
            median(row.plain_rps.clone()),
            median(row.waf_rps.clone()),
        );
    }
    let _ = writeln!(
        out,
        "\nWafEngine::check in-process, same script: median {:.2} µs, p90 {:.2} µs per call.",
        check_median_ns / 1000.0,
        check_p90_ns / 1000.0
    );
    out
}

/// `getconf CLK_TCK`, the unit of `/proc/<pid>/stat`'s CPU times (100 nearly everywhere).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU ticks of `pid` and its direct children (nginx's workers).
fn process_tree_cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
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
        // Fields after the parenthesised command: state(3) ppid(4) ... utime(14) stime(15).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let parent = fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok());
        if candidate == pid || parent == Some(pid) {
            let ticks = |index: usize| {
                fields
                    .get(index)
                    .and_then(|value| value.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            total += ticks(11) + ticks(12);
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
fn proxy_conf(dir: &Path, origin: u16, port: u16) -> String {
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
        common = common_conf(dir, "proxy", "auto"),
        http_common = http_common(dir, "proxy"),
        plain = location(""),
        waf = location(&format!("access_by_lua_block {{\n{SCRIPT}\n}}\n")),
    )
}

/// An nginx master started with `daemon off`; stopped with SIGQUIT on drop.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, name: &str, conf: &str) -> anyhow::Result<Self> {
        let conf_path = dir.join(format!("{name}.conf"));
        fs::write(&conf_path, conf)?;
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start nginx")?;
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child, "-QUIT");
    }
}

/// The agent on the generated config; stopped with SIGTERM on drop.
struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop(&mut self.child, "-TERM");
    }
}

fn start_agent(dir: &Path, binary: &Path, origin_port: u16, port: u16) -> anyhow::Result<Agent> {
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
    let config_path = dir.join("agent.json");
    fs::write(&config_path, config)?;
    let state_dir: PathBuf = dir.join("agent-state");
    fs::create_dir_all(&state_dir)?;
    let child = Command::new(binary)
        .arg("--config")
        .arg(&config_path)
        .args([
            "--dns-listen",
            "off",
            "--health-listen",
            "off",
            "--https-listen",
            "off",
        ])
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .args(["--origin-http-port", &origin_port.to_string()])
        .args(["--log-level", "warn"])
        .arg("--state-dir")
        .arg(&state_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    Ok(Agent { child })
}

#[derive(Debug, Clone)]
struct WrkResult {
    /// Requests completed in the run.
    requests: u64,
    requests_per_second: f64,
    p50_ms: f64,
    errors: u64,
    raw: String,
}

fn wrk(
    url: &str,
    host: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let output = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s"])
        .args(["-H", &format!("Host: {host}")])
        .args(["-H", "User-Agent: wrk-bench"])
        .arg(url)
        .output()
        .context("cannot run wrk")?;
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "wrk {url} failed: {raw}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&raw).with_context(|| format!("cannot read wrk's output:\n{raw}"))
}

fn parse_wrk(raw: &str) -> Option<WrkResult> {
    let mut requests = None;
    let mut requests_per_second = None;
    let mut p50_ms = None;
    let mut errors = 0;
    for line in raw.lines() {
        let line = line.trim();
        if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(value) = line.strip_prefix("Requests/sec:") {
            requests_per_second = value.trim().parse::<f64>().ok();
        } else if let Some(value) = line.strip_prefix("50%") {
            p50_ms = duration_ms(value.trim());
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(WrkResult {
        requests: requests?,
        requests_per_second: requests_per_second?,
        p50_ms: p50_ms?,
        errors,
        raw: raw.to_owned(),
    })
}

/// `812.00us`, `1.23ms`, `2.00s` → milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let raw = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 1 connections\n\
                   \x20 Latency Distribution\n     50%   81.00us\n     99%    2.50ms\n\
                   \x20 98765 requests in 8.00s, 1.00MB read\n\
                   \x20 Non-2xx or 3xx responses: 2\nRequests/sec:  12345.67\n";
        let result = parse_wrk(raw).unwrap();
        assert_eq!(result.requests_per_second, 12345.67);
        assert_eq!(result.requests, 98765);
        assert!((result.p50_ms - 0.081).abs() < 1e-9);
        assert_eq!(result.errors, 2);
    }

    #[test]
    fn nginx_config_runs_the_script_only_for_the_waf_host() {
        let conf = proxy_conf(Path::new("/tmp/x"), 1, 2);
        assert_eq!(conf.matches("access_by_lua_block").count(), 1);
        assert!(conf.contains("lua_shared_dict cache"));
        let waf_server = conf.split("server_name waf.test").nth(1).unwrap();
        assert!(waf_server.contains("ngx.shared.cache:incr"));
    }
}
