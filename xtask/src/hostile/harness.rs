//! The lab the attacks run in: the servers behind the agent (an HTTP origin that logs every
//! request line, TCP and UDP echoes, a dead port), the test certificate, the agent process
//! (on a config file or behind the suite's fake Core), its config, and its resource usage.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

use super::core::{CoreAnswer, FakeCore};
use super::net;
use crate::bench::common::{free_port, open_fds, rss_kib, stop, threads};

/// The host the legitimate clients use; it has no WAF script.
pub(crate) const LEGIT_HOST: &str = "legit.test";
/// The host the WAF attacks give scripts to.
pub(crate) const VICTIM_HOST: &str = "victim.test";
/// A second scripted host, to check that one domain's script cannot reach another's state.
pub(crate) const TENANT_HOST: &str = "tenant.test";
/// A zone that is DNS only.
pub(crate) const DNS_ONLY: &str = "dns-only.test";

/// How the agent gets its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setup {
    /// `--config FILE`, reloaded on SIGHUP.
    File,
    /// `--core-url` pointing at the suite's fake Core, polled every second.
    Core,
}

/// The running test environment; one per suite run.
pub(crate) struct Lab {
    pub(crate) dir: PathBuf,
    binary: PathBuf,
    pub(crate) origin: Origin,
    /// The L4 listeners the config declares (all on 127.0.0.1).
    pub(crate) tcp_forward: SocketAddr,
    pub(crate) udp_forward: SocketAddr,
    /// A TCP forward to a port where nothing listens.
    pub(crate) dead_forward: SocketAddr,
    tcp_echo: u16,
    udp_echo: u16,
    dead_port: u16,
    pub(crate) cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    /// A TLS client offering `http/1.1`.
    pub(crate) tls_h1: Arc<rustls::ClientConfig>,
    agent: Option<Agent>,
    core: Option<FakeCore>,
    /// The WAF scripts of [`VICTIM_HOST`] and [`TENANT_HOST`], if any.
    victim_script: Option<String>,
    tenant_script: Option<String>,
    /// Proxies an attack adds to the config for its duration.
    pub(crate) extra_proxies: Vec<Value>,
    /// Bumped for every config written, so each document differs (a TXT record carries it).
    generation: u64,
}

impl Lab {
    pub(crate) fn new(binary: PathBuf) -> anyhow::Result<Lab> {
        let dir = std::env::temp_dir().join(format!("defenra-hostile-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let origin = Origin::start()?;
        let tcp_echo = start_tcp_echo()?;
        let udp_echo = start_udp_echo()?;
        let dead_port = free_port()?;
        let certified = rcgen::generate_simple_self_signed(vec![
            LEGIT_HOST.to_owned(),
            format!("*.{LEGIT_HOST}"),
            VICTIM_HOST.to_owned(),
        ])
        .context("generating the test certificate")?;
        let cert_der = certified.cert.der().clone();
        let tls_h1 = net::tls_client(&cert_der, &[b"http/1.1"])?;
        let port = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Ok(Lab {
            dir,
            binary,
            origin,
            tcp_forward: port(free_port()?),
            udp_forward: port(free_udp_port()?),
            dead_forward: port(free_port()?),
            tcp_echo,
            udp_echo,
            dead_port,
            cert_der,
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
            tls_h1,
            agent: None,
            core: None,
            victim_script: None,
            tenant_script: None,
            extra_proxies: Vec::new(),
            generation: 0,
        })
    }

    /// The running agent. Panics when none runs: call [`Lab::ensure_agent`] first.
    pub(crate) fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .expect("ensure_agent starts the agent before an attack")
    }

    pub(crate) fn agent_mut(&mut self) -> Option<&mut Agent> {
        self.agent.as_mut()
    }

    /// The fake Core, when the agent runs behind it.
    pub(crate) fn core(&self) -> Option<&FakeCore> {
        self.core.as_ref()
    }

    /// Makes sure an agent with `setup` runs on the base config (no WAF script, no extra
    /// proxies), restarting it when it died or runs with another setup.
    pub(crate) fn ensure_agent(&mut self, setup: Setup) -> anyhow::Result<()> {
        let healthy = self
            .agent
            .as_mut()
            .is_some_and(|agent| agent.setup == setup && agent.exit_status().is_none());
        if healthy {
            if self.victim_script.is_some()
                || self.tenant_script.is_some()
                || !self.extra_proxies.is_empty()
            {
                self.victim_script = None;
                self.tenant_script = None;
                self.extra_proxies.clear();
                self.apply_config()?;
            }
            return Ok(());
        }
        self.stop_agent();
        self.victim_script = None;
        self.tenant_script = None;
        self.extra_proxies.clear();
        let document = self.document();
        let mut args: Vec<String> = Vec::new();
        match setup {
            Setup::File => {
                let path = self.dir.join("agent.json");
                write_atomically(&path, document.to_string().as_bytes())?;
                args.extend(["--config".into(), path.display().to_string()]);
                args.extend([
                    "--state-dir".into(),
                    self.dir.join("state").display().to_string(),
                ]);
            }
            Setup::Core => {
                let core = FakeCore::start(CoreAnswer::document(document.to_string()))?;
                args.extend([
                    "--core-url".into(),
                    core.url(),
                    "--agent-id".into(),
                    "hostile".into(),
                    "--agent-key".into(),
                    "hostile-key".into(),
                    "--poll-interval".into(),
                    "1".into(),
                    "--no-report".into(),
                ]);
                let state = self.core_state_dir();
                let _ = fs::remove_dir_all(&state);
                args.extend(["--state-dir".into(), state.display().to_string()]);
                self.core = Some(core);
            }
        }
        args.extend([
            "--origin-http-port".into(),
            self.origin.port.to_string(),
            "--agent-ip".into(),
            "127.0.0.1".into(),
        ]);
        let log_path = self.dir.join(format!("agent-{}.log", self.generation));
        self.agent = Some(Agent::start(&self.binary, setup, &args, &log_path)?);
        Ok(())
    }

    /// The state directory of an agent behind the fake Core.
    pub(crate) fn core_state_dir(&self) -> PathBuf {
        self.dir.join("core-state")
    }

    /// The agent binary under test.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and the fake Core.
    pub(crate) fn stop_agent(&mut self) {
        self.agent = None;
        self.core = None;
    }

    /// Gives [`VICTIM_HOST`] and [`TENANT_HOST`] these scripts (or none) and waits until
    /// the agent serves them.
    pub(crate) fn set_scripts(
        &mut self,
        victim: Option<&str>,
        tenant: Option<&str>,
    ) -> anyhow::Result<()> {
        self.victim_script = victim.map(str::to_owned);
        self.tenant_script = tenant.map(str::to_owned);
        self.apply_config()
    }

    /// Sends the current config (base + victim script + extra proxies) to the agent, by
    /// file and SIGHUP or through the fake Core, and waits until it is published.
    pub(crate) fn apply_config(&mut self) -> anyhow::Result<()> {
        let document = self.document().to_string();
        self.apply_document(document.into_bytes(), Duration::from_secs(30))
            .map(|_| ())
    }

    /// Sends `document` as the agent's config and waits up to `limit` until the agent
    /// publishes a new version; returns how long that took.
    pub(crate) fn apply_document(
        &mut self,
        document: Vec<u8>,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let agent = self.agent.as_ref().context("no agent runs")?;
        let before = agent.config_version();
        let started = Instant::now();
        match agent.setup {
            Setup::File => {
                write_atomically(&self.dir.join("agent.json"), &document)?;
                agent.signal("-HUP");
            }
            Setup::Core => {
                self.core
                    .as_ref()
                    .context("no fake Core runs")?
                    .set(CoreAnswer::Document(Arc::new(document)));
            }
        }
        while started.elapsed() < limit {
            let version = agent.config_version();
            if version.is_some() && version != before {
                return Ok(started.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!(
            "the agent did not publish the new config within {limit:?} (still version {before:?})"
        )
    }

    /// The config document: the legitimate domain, the victim domain (with its script),
    /// a DNS-only zone, a TCP and a UDP forward to the echoes and a TCP forward to a dead
    /// port.
    pub(crate) fn document(&mut self) -> Value {
        self.generation += 1;
        let ssl = json!({
            "enabled": true,
            "certificate": self.cert_pem,
            "privateKey": self.key_pem,
            "encryptionMode": "off"
        });
        let proxied = |name: &str| json!({"name": name, "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true});
        let mut victim = json!({
            "domain": VICTIM_HOST,
            "dnsRecords": [proxied("@"), proxied("www")],
            "httpProxy": {"type": "both"},
            "ssl": ssl,
        });
        if let Some(script) = &self.victim_script {
            victim["luaCode"] = json!(script);
        }
        let mut tenant = json!({
            "domain": TENANT_HOST,
            "dnsRecords": [proxied("@")],
            "httpProxy": {"type": "both"},
        });
        if let Some(script) = &self.tenant_script {
            tenant["luaCode"] = json!(script);
        }
        let mut proxies = vec![
            json!({"id": "tcp-echo", "type": "tcp", "sourcePort": self.tcp_forward.port(), "destinationHost": "127.0.0.1", "destinationPort": self.tcp_echo, "enabled": true}),
            json!({"id": "udp-echo", "type": "udp", "sourcePort": self.udp_forward.port(), "destinationHost": "127.0.0.1", "destinationPort": self.udp_echo, "enabled": true}),
            json!({"id": "tcp-dead", "type": "tcp", "sourcePort": self.dead_forward.port(), "destinationHost": "127.0.0.1", "destinationPort": self.dead_port, "enabled": true}),
        ];
        proxies.extend(self.extra_proxies.iter().cloned());
        json!({
            "success": true,
            "domains": [
                {
                    "domain": LEGIT_HOST,
                    "dnsRecords": [proxied("@"), proxied("www"),
                        {"name": "mail", "type": "MX", "value": "mx.legit.test", "priority": 10, "ttl": 300}],
                    "httpProxy": {"type": "both"},
                    "ssl": ssl,
                },
                victim,
                tenant,
                {
                    "domain": DNS_ONLY,
                    "dnsRecords": [
                        {"name": "@", "type": "A", "value": "192.0.2.80", "ttl": 300},
                        {"name": "@", "type": "TXT", "value": format!("generation={}", self.generation), "ttl": 300},
                        {"name": "*", "type": "A", "value": "192.0.2.81", "ttl": 300},
                    ]
                }
            ],
            "proxies": proxies,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The agent process, its bound addresses and its log.
pub(crate) struct Agent {
    child: Child,
    pub(crate) setup: Setup,
    pub(crate) dns: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    pub(crate) health: SocketAddr,
    pub(crate) log: Arc<LogTap>,
}

impl Agent {
    fn start(
        binary: &Path,
        setup: Setup,
        args: &[String],
        log_path: &Path,
    ) -> anyhow::Result<Agent> {
        let mut child = Command::new(binary)
            .args([
                "--dns-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--https-listen",
                "127.0.0.1:0",
                "--health-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--l4-bind",
                "127.0.0.1",
                "--log-format",
                "json",
                "--log-level",
                "info",
            ])
            .args(args)
            .env_remove("CORE_URL")
            .env_remove("DEFENRA_CONFIG")
            .env_remove("HEALTH_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().context("the agent's stderr is piped")?;
        let log = Arc::new(LogTap::default());
        let file = fs::File::create(log_path)?;
        {
            let log = Arc::clone(&log);
            thread::spawn(move || log.follow(stderr, file));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let addresses = loop {
            let listening = log.listening.lock().expect("log tap lock").clone();
            if ["dns", "http", "https", "health"]
                .iter()
                .all(|service| listening.contains_key(*service))
            {
                break listening;
            }
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!(
                    "the agent exited at start with {status}; its log:\n{}",
                    log.tail(20)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!(
                    "the agent logged no listening addresses within 30 s; its log:\n{}",
                    log.tail(20)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let agent = Agent {
            child,
            setup,
            dns: addresses["dns"],
            http: addresses["http"],
            https: addresses["https"],
            health: addresses["health"],
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.config_version().is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent loaded no config within 60 s; its log:\n{}",
                agent.log.tail(20)
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the agent has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status();
    }

    /// `GET /health` as JSON, when the endpoint answers.
    pub(crate) fn health(&self) -> Option<Value> {
        self.endpoint("/health")
    }

    /// `GET /stats` as JSON, when the endpoint answers.
    pub(crate) fn stats(&self) -> Option<Value> {
        self.endpoint("/stats")
    }

    fn endpoint(&self, path: &str) -> Option<Value> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let response = net::http_once(
            Ipv4Addr::LOCALHOST,
            self.health,
            request.as_bytes(),
            Duration::from_secs(2),
        )
        .ok()?;
        serde_json::from_slice(&response.body).ok()
    }

    /// A number from `/stats`: `service.name`, summed over label sets when it has several.
    pub(crate) fn stat(&self, service: &str, name: &str) -> f64 {
        self.stats()
            .map_or(0.0, |stats| sum_stat(&stats[service][name]))
    }

    /// The published config version, `None` before the first.
    pub(crate) fn config_version(&self) -> Option<u64> {
        self.health()?.get("config_version")?.as_u64()
    }

    pub(crate) fn usage(&self) -> Usage {
        Usage::of(self.pid())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop(&mut self.child, "-TERM");
    }
}

fn sum_stat(value: &Value) -> f64 {
    match value {
        Value::Number(number) => number.as_f64().unwrap_or(0.0),
        Value::Array(samples) => samples
            .iter()
            .map(|sample| sample["value"].as_f64().unwrap_or(0.0))
            .sum(),
        _ => 0.0,
    }
}

/// The agent's stderr: copied to a file, counted, the last lines kept, and the
/// `listening` lines read for the bound addresses.
#[derive(Default)]
pub(crate) struct LogTap {
    pub(crate) bytes: AtomicU64,
    pub(crate) lines: AtomicU64,
    recent: Mutex<VecDeque<String>>,
    listening: Mutex<HashMap<String, SocketAddr>>,
}

impl LogTap {
    fn follow(&self, stderr: impl Read, mut file: fs::File) {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.bytes.fetch_add(n as u64, Relaxed);
                    self.lines.fetch_add(1, Relaxed);
                }
            }
            // The file keeps the first 64 KiB of each line: enough to read, bounded under a
            // log flood.
            let _ = file.write_all(&line[..line.len().min(64 * 1024)]);
            let text = String::from_utf8_lossy(&line[..line.len().min(2048)]).into_owned();
            if let Ok(value) = serde_json::from_str::<Value>(text.trim())
                && value["message"] == "listening"
                && let (Some(service), Some(addr)) = (
                    value["service"].as_str(),
                    value["addr"].as_str().and_then(|addr| addr.parse().ok()),
                )
            {
                self.listening
                    .lock()
                    .expect("log tap lock")
                    .insert(service.to_owned(), addr);
            }
            let mut recent = self.recent.lock().expect("log tap lock");
            if recent.len() == 200 {
                recent.pop_front();
            }
            recent.push_back(text);
        }
    }

    /// The last `n` lines (each cut to 2 KiB).
    pub(crate) fn tail(&self, n: usize) -> String {
        let recent = self.recent.lock().expect("log tap lock");
        let skip = recent.len().saturating_sub(n);
        recent
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("")
    }

    /// Whether one of the last lines contains `needle`.
    pub(crate) fn recent_contains(&self, needle: &str) -> bool {
        self.recent
            .lock()
            .expect("log tap lock")
            .iter()
            .any(|line| line.contains(needle))
    }
}

/// Memory, descriptors and threads of the agent at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) rss_kib: u64,
    pub(crate) fds: u64,
    pub(crate) threads: u64,
}

impl Usage {
    pub(crate) fn of(pid: u32) -> Usage {
        Usage {
            rss_kib: rss_kib(pid),
            fds: open_fds(pid),
            threads: threads(pid),
        }
    }

    pub(crate) fn max(self, other: Usage) -> Usage {
        Usage {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
            threads: self.threads.max(other.threads),
        }
    }
}

/// Samples the agent's usage every 100 ms and keeps the peak.
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Usage>,
}

impl Sampler {
    pub(crate) fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut peak = Usage::of(pid);
                while !stop.load(Relaxed) {
                    peak = peak.max(Usage::of(pid));
                    thread::sleep(Duration::from_millis(100));
                }
                peak
            })
        };
        Sampler { stop, handle }
    }

    pub(crate) fn peak(self) -> Usage {
        self.stop.store(true, Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The origin behind every proxied host. Answers `origin ok PATH` (or 1 MiB for `/big`),
/// keeps connections alive, reads request bodies by length or chunked framing, and logs
/// every request line it receives, so a smuggled request shows up.
pub(crate) struct Origin {
    pub(crate) port: u16,
    pub(crate) log: Arc<OriginLog>,
}

#[derive(Default)]
pub(crate) struct OriginLog {
    pub(crate) requests: AtomicU64,
    lines: Mutex<VecDeque<String>>,
}

impl OriginLog {
    fn record(&self, line: &str) {
        self.requests.fetch_add(1, Relaxed);
        let mut lines = self.lines.lock().expect("origin log lock");
        if lines.len() == 20_000 {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    /// Whether any request line received contains `needle`.
    pub(crate) fn saw(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("origin log lock")
            .iter()
            .any(|line| line.contains(needle))
    }
}

impl Origin {
    fn start() -> anyhow::Result<Origin> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(OriginLog::default());
        let accept_log = Arc::clone(&log);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = Arc::clone(&accept_log);
                thread::spawn(move || serve_origin_connection(stream, &log));
            }
        });
        Ok(Origin { port, log })
    }
}

fn serve_origin_connection(mut stream: TcpStream, log: &OriginLog) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = stream.set_nodelay(true);
    let mut buffered = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = net::find(&buffered, b"\r\n\r\n") {
                break end + 4;
            }
            if buffered.len() > 1024 * 1024 || !read_more(&mut stream, &mut buffered) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buffered[..head_end]).into_owned();
        buffered.drain(..head_end);
        let request_line = head.lines().next().unwrap_or("").to_owned();
        log.record(&request_line);
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (field, value) = line.split_once(':')?;
                field
                    .trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        if header("transfer-encoding").is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"))
        {
            if !skip_chunked(&mut stream, &mut buffered) {
                return;
            }
        } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok())
        {
            while buffered.len() < length {
                if !read_more(&mut stream, &mut buffered) {
                    return;
                }
            }
            buffered.drain(..length);
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let body = if path.starts_with("/big") {
            vec![b'x'; 1024 * 1024]
        } else {
            format!("origin ok {path}").into_bytes()
        };
        let close = header("connection").is_some_and(|value| value.eq_ignore_ascii_case("close"));
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        response.extend_from_slice(&body);
        if stream.write_all(&response).is_err() || close {
            return;
        }
    }
}

fn read_more(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffered.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Consumes a chunked body (RFC 9112 §7.1) from `buffered` and the stream.
fn skip_chunked(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> bool {
    loop {
        let line_end = loop {
            if let Some(end) = net::find(buffered, b"\r\n") {
                break end;
            }
            if buffered.len() > 64 * 1024 || !read_more(stream, buffered) {
                return false;
            }
        };
        let line = String::from_utf8_lossy(&buffered[..line_end]).into_owned();
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return false;
        };
        buffered.drain(..line_end + 2);
        if size == 0 {
            // Trailer fields, then the blank line.
            loop {
                let end = loop {
                    if let Some(end) = net::find(buffered, b"\r\n") {
                        break end;
                    }
                    if !read_more(stream, buffered) {
                        return false;
                    }
                };
                buffered.drain(..end + 2);
                if end == 0 {
                    return true;
                }
            }
        }
        while buffered.len() < size + 2 {
            if !read_more(stream, buffered) {
                return false;
            }
        }
        buffered.drain(..size + 2);
    }
}

fn start_tcp_echo() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
                let Ok(mut writer) = stream.try_clone() else {
                    return;
                };
                let mut reader = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    Ok(port)
}

fn start_udp_echo() -> anyhow::Result<u16> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = socket.local_addr()?.port();
    thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..n], peer);
        }
    });
    Ok(port)
}

fn free_udp_port() -> anyhow::Result<u16> {
    // A port free for both TCP and UDP would be nicer; UDP alone is what the forward binds.
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(socket.local_addr()?.port())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, bytes).with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
