//! `cargo xtask demo`: the agent on `examples/demo.json`, on unprivileged loopback ports,
//! in front of a tiny built-in origin. `--smoke` checks it answers and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{cargo, project_root, run_command};

const DNS: &str = "127.0.0.1:15353";
const HTTP: &str = "127.0.0.1:18080";
const HTTPS: &str = "127.0.0.1:18443";
const HEALTH: &str = "127.0.0.1:18090";
const ORIGIN: &str = "127.0.0.1:18081";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let smoke = args.iter().any(|arg| arg == "--smoke");
    run_command(&cargo(), &["build", "--package", "defenra-agent"])?;
    let root = project_root();
    let binary = crate::target_dir().join("debug/defenra-agent");

    let origin = TcpListener::bind(ORIGIN)
        .with_context(|| format!("the demo origin needs {ORIGIN} free"))?;
    std::thread::spawn(move || serve_origin(origin));

    let state_dir = crate::target_dir().join("demo-state");
    let mut agent = Command::new(&binary)
        .args(["--config", "examples/demo.json"])
        .args([
            "--dns-listen",
            DNS,
            "--http-listen",
            HTTP,
            "--https-listen",
            HTTPS,
            "--health-listen",
            HEALTH,
        ])
        .args([
            "--l4-bind",
            "127.0.0.1",
            "--origin-http-port",
            "18081",
            "--agent-ip",
            "127.0.0.1",
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .current_dir(&root)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;

    let ready = wait_for_health(Duration::from_secs(20));
    if !ready {
        let _ = agent.kill();
        anyhow::bail!("the agent did not report healthy on http://{HEALTH}/health within 20 s");
    }
    if smoke {
        let result = smoke_check();
        let _ = agent.kill();
        let _ = agent.wait();
        return result;
    }
    println!(
        "\nThe agent is running on examples/demo.json. Try:\n\n  \
         dig @127.0.0.1 -p 15353 example.test A          # proxied apex: answered with an edge agent\n  \
         dig @127.0.0.1 -p 15353 example.test MX\n  \
         dig @127.0.0.1 -p 15353 anything.dns-only.test A  # wildcard\n  \
         dig @127.0.0.1 -p 15353 +tcp dns-only.test AAAA\n  \
         curl -i -H 'Host: example.test' http://{HTTP}/hello       # proxied to the demo origin\n  \
         curl -i -H 'Host: example.test' http://{HTTP}/admin       # blocked by the Lua WAF\n  \
         curl -i -H 'Host: unknown.test' http://{HTTP}/            # 404\n  \
         curl -i -H 'Host: shop.localhost' http://{HTTP}/          # Anti-DDoS: the browser challenge, as text\n  \
         open http://shop.localhost:18080/ in a browser           # the challenge page solves itself, then the origin\n  \
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 19000     # TCP forward to the origin\n  \
         curl http://{HEALTH}/health  /stats  /metrics\n\n\
         Edit examples/demo.json and save (or `kill -HUP {}`): the agent reloads it live.\n\
         Press Ctrl-C to stop.\n",
        agent.id()
    );
    let status = agent.wait().context("waiting for the agent")?;
    anyhow::ensure!(
        status.success() || status.code().is_none(),
        "the agent exited with {status}"
    );
    Ok(())
}

fn wait_for_health(limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(response) = http_get(HEALTH, "localhost", "/health")
            && response.starts_with("HTTP/1.1 200")
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Checks one answer of each service through the running demo.
fn smoke_check() -> anyhow::Result<()> {
    let proxied = http_get(HTTP, "example.test", "/hello")?;
    anyhow::ensure!(
        proxied.contains("hello from the demo origin"),
        "proxying failed:\n{proxied}"
    );
    let unknown = http_get(HTTP, "unknown.test", "/")?;
    anyhow::ensure!(
        unknown.starts_with("HTTP/1.1 404"),
        "unknown host should be 404:\n{unknown}"
    );
    let challenged = http_get(HTTP, "shop.localhost", "/")?;
    anyhow::ensure!(
        challenged.starts_with("HTTP/1.1 403") && challenged.contains("JavaScript check"),
        "the Anti-DDoS domain should answer the browser challenge:\n{challenged}"
    );
    let stats = http_get(HEALTH, "localhost", "/stats")?;
    anyhow::ensure!(
        stats.contains("\"config\""),
        "stats without config:\n{stats}"
    );
    println!(
        "demo smoke check passed: health, proxying, routing, the browser challenge and stats answer"
    );
    Ok(())
}

/// A minimal HTTP/1.0-style GET over a std socket.
fn http_get(addr: &str, host: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The demo origin: answers every request with its request line.
fn serve_origin(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                return;
            }
            // Drain the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = format!("hello from the demo origin: {}\n", request_line.trim());
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}
