//! Starts the agent binary and reads the addresses it logs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test: `DEFENRA_AGENT_BIN` (set by `cargo xtask e2e` to the release
/// build), else the one cargo built for this test run.
pub(crate) fn binary() -> std::path::PathBuf {
    std::env::var_os("DEFENRA_AGENT_BIN")
        .map(Into::into)
        .or_else(|| option_env!("CARGO_BIN_EXE_defenra-agent").map(Into::into))
        .expect("DEFENRA_AGENT_BIN names the agent binary")
}

/// A running agent; killed on drop.
pub(crate) struct Agent {
    pub(crate) child: Child,
    /// Listener name (`health`, `dns`, `http`, `https`) → bound address.
    pub(crate) addrs: HashMap<String, SocketAddr>,
    /// Every log line after startup, as JSON.
    pub(crate) logs: mpsc::Receiver<serde_json::Value>,
}

impl Agent {
    /// Starts the agent with every listener on an ephemeral loopback port, plus `extra`.
    pub(crate) fn start(extra: &[&str]) -> Agent {
        Agent::start_wrapped(&[], extra)
    }

    /// As [`Agent::start`], run through `wrapper` (a command and its arguments that
    /// `exec`s the rest of its command line, such as `unshare --net ...`).
    pub(crate) fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Agent {
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .args([
                "--dns-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--https-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--health-listen",
                "127.0.0.1:0",
                "--l4-bind",
                "127.0.0.1",
                "--log-format",
                "json",
            ])
            .args(["--log-level", "info"])
            .args(extra)
            .env_remove("CORE_URL")
            .env_remove("DEFENRA_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the agent binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        let mut agent = Agent {
            child,
            addrs: HashMap::new(),
            logs,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.addrs.contains_key("health") || !agent.addrs.contains_key("dns") {
            let line = agent
                .logs
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the agent logs its listening addresses");
            if line["message"] == "listening"
                && let Some(service) = line["service"].as_str()
            {
                let service = service.to_owned();
                agent
                    .addrs
                    .insert(service, line["addr"].as_str().unwrap().parse().unwrap());
            }
        }
        agent
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub(crate) fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub(crate) fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = get(addr, path);
    (
        status,
        serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("{path} is not JSON ({error}): {body}")),
    )
}

/// Polls `condition` every 50 ms for up to 10 s.
pub(crate) fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// A config document with one domain whose apex A record is `ip`.
pub(crate) fn doc(ip: &str) -> String {
    format!(
        r#"{{"domains":[{{"domain":"example.com","dnsRecords":[{{"name":"@","type":"A","value":"{ip}"}},{{"name":"bad","type":"A","value":"1.2.3"}}]}}]}}"#
    )
}

pub(crate) fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}
