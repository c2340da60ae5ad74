//! `cargo xtask bench http`: the agent's reverse proxy against nginx (`proxy_pass` with
//! upstream keep-alive), both in front of the same nginx origin serving a 1 KiB file, driven
//! by wrk over HTTP and HTTPS on loopback.
//!
//! Options: `--duration SECS` (15) per run, `--connections N` (100), `--threads N` (2),
//! `--rounds N` (1, the best round is kept), `--rss-connections N` (1000), `--skip-build`.

use std::fmt::Write as _;
use std::fs;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::common::{
    Server, agent_on, common_conf, free_port, http_common, json_string, on_path,
    process_tree_cpu_ticks, process_tree_rss_kib, wait_for_port,
};
use super::wrk::{WrkResult, wrk};
use crate::{cargo, run_command};

/// The name both proxies serve. It is in `/etc/hosts` everywhere, so wrk's URL resolves to
/// 127.0.0.1 and wrk sends it as SNI.
const HOST: &str = "localhost";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let settings = Settings::parse(args)?;
    ensure_tools()?;
    if !settings.skip_build {
        run_command(&cargo(), &["build", "--release", "-p", "defenra-agent"])?;
    }
    let agent_binary = crate::target_dir().join("release/defenra-agent");
    anyhow::ensure!(
        agent_binary.exists(),
        "{} is missing",
        agent_binary.display()
    );

    let dir = std::env::temp_dir().join(format!("defenra-bench-http-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("www"))?;
    fs::write(dir.join("www/index.html"), vec![b'x'; 1024])?;
    make_certificate(&dir)?;

    let origin_port = free_port()?;
    let nginx_http = free_port()?;
    let nginx_https = free_port()?;
    let agent_http = free_port()?;
    let agent_https = free_port()?;

    let origin = Server::nginx(&dir, "origin", &origin_conf(&dir, origin_port), None)?;
    let nginx = Server::nginx(
        &dir,
        "proxy",
        &proxy_conf(&dir, origin_port, nginx_http, nginx_https),
        None,
    )?;
    let agent = start_agent(&dir, &agent_binary, origin_port, agent_http, agent_https)?;
    for port in [
        origin_port,
        nginx_http,
        nginx_https,
        agent_http,
        agent_https,
    ] {
        wait_for_port(port)?;
    }
    // Both proxies must answer the same body before anything is measured.
    for (name, url) in [
        ("nginx", format!("http://{HOST}:{nginx_http}/index.html")),
        ("agent", format!("http://{HOST}:{agent_http}/index.html")),
        ("nginx", format!("https://{HOST}:{nginx_https}/index.html")),
        ("agent", format!("https://{HOST}:{agent_https}/index.html")),
    ] {
        let probe = wrk(&url, 1, 1, Duration::from_secs(1))?;
        anyhow::ensure!(
            probe.requests_per_second > 0.0 && probe.errors == 0,
            "{name} does not serve {url}: {}",
            probe.raw
        );
    }

    let mut rows = Vec::new();
    for (scheme, nginx_port, agent_port) in [
        ("http", nginx_http, agent_http),
        ("https", nginx_https, agent_https),
    ] {
        let nginx_url = format!("{scheme}://{HOST}:{nginx_port}/index.html");
        let agent_url = format!("{scheme}://{HOST}:{agent_port}/index.html");
        let mut best_nginx: Option<WrkResult> = None;
        let mut best_agent: Option<WrkResult> = None;
        for round in 0..settings.rounds {
            eprintln!("{scheme} round {}/{}", round + 1, settings.rounds);
            // Warm both pools and caches, then measure, alternating the two.
            wrk(
                &nginx_url,
                settings.threads,
                settings.connections,
                Duration::from_secs(2),
            )?;
            let result = measured(&nginx_url, &settings, nginx.pid())?;
            best_nginx = Some(better(best_nginx, result));
            wrk(
                &agent_url,
                settings.threads,
                settings.connections,
                Duration::from_secs(2),
            )?;
            let result = measured(&agent_url, &settings, agent.pid())?;
            best_agent = Some(better(best_agent, result));
        }
        if let (Some(nginx_result), Some(agent_result)) = (best_nginx, best_agent) {
            rows.push((scheme, nginx_result, agent_result));
        }
    }

    // Memory with many keep-alive clients: sample RSS while wrk holds the connections open.
    let rss_duration = Duration::from_secs(8);
    let nginx_rss = rss_under_load(
        &format!("http://{HOST}:{nginx_http}/index.html"),
        &settings,
        rss_duration,
        || process_tree_rss_kib(nginx.pid()),
    )?;
    let agent_rss = rss_under_load(
        &format!("http://{HOST}:{agent_http}/index.html"),
        &settings,
        rss_duration,
        || process_tree_rss_kib(agent.pid()),
    )?;

    let report = render(&rows, nginx_rss, agent_rss, &settings);
    println!("{report}");
    drop(agent);
    drop(nginx);
    drop(origin);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

struct Settings {
    duration: Duration,
    connections: u32,
    threads: u32,
    rounds: u32,
    rss_connections: u32,
    skip_build: bool,
}

impl Settings {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut settings = Settings {
            duration: Duration::from_secs(15),
            connections: 100,
            threads: 2,
            rounds: 1,
            rss_connections: 1000,
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
                "--duration" => settings.duration = Duration::from_secs(u64::from(number.min(60))),
                "--connections" => settings.connections = number,
                "--threads" => settings.threads = number,
                "--rounds" => settings.rounds = number.min(5),
                "--rss-connections" => settings.rss_connections = number,
                other => anyhow::bail!("unknown option {other:?}"),
            }
        }
        Ok(settings)
    }
}

/// Installs nginx, wrk and openssl from Debian packages when missing.
pub(super) fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("nginx", "nginx-light"),
        ("wrk", "wrk"),
        ("openssl", "openssl"),
    ]
    .into_iter()
    .filter(|(binary, _)| !on_path(binary))
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run_command("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(missing);
    run_command("apt-get", &args)
}

/// A P-256 certificate for `localhost`, used by both proxies.
fn make_certificate(dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={HOST}")])
        .args(["-addext", &format!("subjectAltName=DNS:{HOST}")])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run openssl")?;
    anyhow::ensure!(status.success(), "openssl req failed with {status}");
    Ok(())
}

/// The origin: one worker serving `www/index.html` (1 KiB).
pub(super) fn origin_conf(dir: &Path, port: u16) -> String {
    format!(
        "{}http {{\n{}server {{ listen 127.0.0.1:{port} reuseport; root {}/www; }}\n}}\n",
        common_conf(dir, "origin", "1"),
        http_common(dir, "origin"),
        dir.display()
    )
}

/// nginx as the reverse proxy, configured like the agent: HTTP/1.1 upstream keep-alive,
/// the same forwarding headers, TLS 1.2/1.3 with session tickets.
fn proxy_conf(dir: &Path, origin: u16, http: u16, https: u16) -> String {
    let path = dir.display();
    format!(
        "{common}http {{\n{http_common}\
         upstream origin {{ server 127.0.0.1:{origin}; keepalive 256; }}\n\
         server {{\n\
           listen 127.0.0.1:{http};\n\
           listen 127.0.0.1:{https} ssl http2;\n\
           server_name {HOST};\n\
           ssl_certificate {path}/cert.pem;\n\
           ssl_certificate_key {path}/key.pem;\n\
           ssl_protocols TLSv1.2 TLSv1.3;\n\
           ssl_session_tickets on;\n\
           location / {{\n\
             proxy_pass http://origin;\n\
             proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n\
             proxy_set_header Host $http_host;\n\
             proxy_set_header X-Real-IP $remote_addr;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             proxy_set_header X-Forwarded-Proto $scheme;\n\
             proxy_set_header X-Forwarded-Host $http_host;\n\
           }}\n\
         }}\n}}\n",
        common = common_conf(dir, "proxy", "auto"),
        http_common = http_common(dir, "proxy"),
    )
}

fn start_agent(
    dir: &Path,
    binary: &Path,
    origin_port: u16,
    http: u16,
    https: u16,
) -> anyhow::Result<Server> {
    let certificate = fs::read_to_string(dir.join("cert.pem"))?;
    let key = fs::read_to_string(dir.join("key.pem"))?;
    let config = format!(
        r#"{{"success": true, "domains": [{{
            "domain": "{HOST}",
            "httpProxy": {{ "enabled": true, "type": "both" }},
            "dnsRecords": [{{ "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true }}],
            "ssl": {{ "enabled": true, "certificate": {}, "privateKey": {}, "encryptionMode": "off" }}
        }}]}}"#,
        json_string(&certificate),
        json_string(&key)
    );
    let mut command = agent_on(
        binary,
        dir,
        &config,
        origin_port,
        &[("http", http), ("https", https)],
    )?;
    Server::spawn(&mut command, "-TERM")
}

/// A measured wrk run that also reads the CPU time the proxy (`pid` and its children) used,
/// which stays comparable when other processes compete for the cores.
fn measured(url: &str, settings: &Settings, pid: u32) -> anyhow::Result<WrkResult> {
    let (user_before, system_before) = process_tree_cpu_ticks(pid);
    let mut result = wrk(
        url,
        settings.threads,
        settings.connections,
        settings.duration,
    )?;
    let (user_after, system_after) = process_tree_cpu_ticks(pid);
    let user = user_after.saturating_sub(user_before);
    let ticks = user + system_after.saturating_sub(system_before);
    // Linux reports CPU time in clock ticks of 10 ms (USER_HZ = 100).
    if result.requests > 0 {
        result.cpu_us_per_request = Some(ticks as f64 * 10_000.0 / result.requests as f64);
        result.user_us_per_request = Some(user as f64 * 10_000.0 / result.requests as f64);
    }
    Ok(result)
}

/// Runs wrk with `rss_connections` connections and returns the highest RSS seen.
fn rss_under_load(
    url: &str,
    settings: &Settings,
    duration: Duration,
    sample: impl Fn() -> u64,
) -> anyhow::Result<(u64, WrkResult)> {
    let url = url.to_owned();
    let (threads, connections) = (settings.threads, settings.rss_connections);
    let load = thread::spawn(move || wrk(&url, threads, connections, duration));
    let mut peak = 0;
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        peak = peak.max(sample());
    }
    let result = load
        .join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    Ok((peak, result))
}

fn better(best: Option<WrkResult>, candidate: WrkResult) -> WrkResult {
    match best {
        Some(best) if best.requests_per_second >= candidate.requests_per_second => best,
        _ => candidate,
    }
}

fn render(
    rows: &[(&str, WrkResult, WrkResult)],
    nginx_rss: (u64, WrkResult),
    agent_rss: (u64, WrkResult),
    settings: &Settings,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nwrk -t{} -c{} -d{}s, 1 KiB body from an nginx origin, best of {} round(s)\n",
        settings.threads,
        settings.connections,
        settings.duration.as_secs(),
        settings.rounds
    );
    let _ = writeln!(
        out,
        "| listener | proxy | RPS | p50 ms | p99 ms | errors | CPU µs/req (user) | RPS ratio | p99 ratio | CPU ratio |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let cpu = |result: &WrkResult| match (result.cpu_us_per_request, result.user_us_per_request) {
        (Some(total), Some(user)) => format!("{total:.1} ({user:.1})"),
        _ => "-".to_owned(),
    };
    for (scheme, nginx, agent) in rows {
        let _ = writeln!(
            out,
            "| {scheme} | nginx | {:.0} | {:.3} | {:.3} | {} | {} | | | |",
            nginx.requests_per_second,
            nginx.p50_ms,
            nginx.p99_ms,
            nginx.errors,
            cpu(nginx)
        );
        let cpu_ratio = match (agent.cpu_us_per_request, nginx.cpu_us_per_request) {
            (Some(agent), Some(nginx)) if nginx > 0.0 => format!("{:.2}", agent / nginx),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {scheme} | agent | {:.0} | {:.3} | {:.3} | {} | {} | {:.2} | {:.2} | {cpu_ratio} |",
            agent.requests_per_second,
            agent.p50_ms,
            agent.p99_ms,
            agent.errors,
            cpu(agent),
            agent.requests_per_second / nginx.requests_per_second.max(1.0),
            agent.p99_ms / nginx.p99_ms.max(0.001)
        );
    }
    let _ = writeln!(
        out,
        "\nRatios are agent/nginx: RPS ≥ 1 and p99, CPU ≤ 1 favour the agent. CPU is user + system\n\
         time of the proxy's processes per request (user-space part in brackets), which other load\n\
         on the machine disturbs less than RPS."
    );
    let _ = writeln!(
        out,
        "\nRSS with {} keep-alive connections over HTTP (peak while wrk runs):\n",
        settings.rss_connections
    );
    let _ = writeln!(out, "| proxy | RSS MiB | RPS at that load | errors |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
    for (name, (rss, result)) in [
        ("nginx (master + workers)", nginx_rss),
        ("agent", agent_rss),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.0} | {} |",
            rss as f64 / 1024.0,
            result.requests_per_second,
            result.errors
        );
    }
    out
}
