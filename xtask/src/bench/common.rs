//! Helpers the benchmarks (and `xtask hostile`) share: tool lookup, ports, nginx
//! configuration fragments, stopping processes, a process's CPU, memory and descriptors.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

pub(crate) fn on_path(binary: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(binary).exists())
}

pub(crate) fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

pub(crate) fn common_conf(dir: &Path, name: &str, workers: &str) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n\
         worker_rlimit_nofile 65535;\npid {dir}/{name}.pid;\n\
         error_log {dir}/{name}-error.log warn;\n\
         events {{ worker_connections 16384; multi_accept on; }}\n"
    )
}

pub(crate) fn http_common(dir: &Path, name: &str) -> String {
    let dir = dir.display();
    format!(
        "access_log off;\nkeepalive_requests 1000000;\nkeepalive_timeout 75s;\n\
         client_body_temp_path {dir}/{name}-body;\nproxy_temp_path {dir}/{name}-proxy;\n\
         fastcgi_temp_path {dir}/{name}-fastcgi;\nuwsgi_temp_path {dir}/{name}-uwsgi;\n\
         scgi_temp_path {dir}/{name}-scgi;\n"
    )
}

pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

/// `program`, run on `cpus` (taskset's list syntax) when given. taskset execs the program,
/// so the child's pid is the program's.
pub(crate) fn pinned(program: impl AsRef<std::ffi::OsStr>, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.args(["-c", cpus]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A server a bench started (the agent, a peer, an origin); stopped with its signal on drop.
pub(crate) struct Server {
    child: Child,
    signal: &'static str,
}

impl Server {
    /// Starts `command` with its output to /dev/null and its errors to the bench's; `signal`
    /// (`-TERM`, `-QUIT`, ...) stops it gracefully.
    pub(crate) fn spawn(command: &mut Command, signal: &'static str) -> anyhow::Result<Server> {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(Server { child, signal })
    }

    /// An nginx master on `conf`, written to `DIR/NAME.conf`, under `taskset` when `cpus` is
    /// given; stopped with SIGQUIT.
    pub(crate) fn nginx(
        dir: &Path,
        name: &str,
        conf: &str,
        cpus: Option<&str>,
    ) -> anyhow::Result<Server> {
        let path = dir.join(format!("{name}.conf"));
        fs::write(&path, conf)?;
        let mut command = pinned(nginx_binary(), cpus);
        command.arg("-p").arg(dir).arg("-c").arg(&path);
        Server::spawn(&mut command, "-QUIT")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child, self.signal);
    }
}

/// Writes the Core answer `config` to `DIR/agent.json` for [`agent_command`].
pub(crate) fn write_agent_config(dir: &Path, config: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("agent.json");
    fs::write(&path, config)?;
    Ok(path)
}

/// The agent as the benches run it: on the config file `config`, with a fresh state directory
/// `DIR/STATE`, origins on `origin`, warnings only, and each listener in `listen` (`"http"`,
/// `"https"`, `"health"`, `"dns"`) on 127.0.0.1 at its port, the others off. `command` is the
/// agent binary's command (see [`pinned`]); add options to the result, then
/// [`Server::spawn`] it with `-TERM`.
pub(crate) fn agent_command(
    mut command: Command,
    dir: &Path,
    config: &Path,
    state: &str,
    origin: u16,
    listen: &[(&str, u16)],
) -> anyhow::Result<Command> {
    let state: PathBuf = dir.join(state);
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state)?;
    command.arg("--config").arg(config);
    for name in ["dns", "health", "https", "http"] {
        let value = listen
            .iter()
            .find(|(listener, _)| *listener == name)
            .map_or_else(|| "off".to_owned(), |(_, port)| format!("127.0.0.1:{port}"));
        command.arg(format!("--{name}-listen")).arg(value);
    }
    command
        .args(["--origin-http-port", &origin.to_string()])
        .args(["--log-level", "warn"])
        .arg("--state-dir")
        .arg(&state);
    Ok(command)
}

/// [`agent_command`] for the usual case: `binary` on the Core answer `config`, written to
/// `DIR/agent.json`, with its state in `DIR/agent-state`.
pub(crate) fn agent_on(
    binary: &Path,
    dir: &Path,
    config: &str,
    origin: u16,
    listen: &[(&str, u16)],
) -> anyhow::Result<Command> {
    let config = write_agent_config(dir, config)?;
    agent_command(
        Command::new(binary),
        dir,
        &config,
        "agent-state",
        origin,
        listen,
    )
}

pub(crate) fn stop(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// User and system CPU ticks of `pid` and its direct children.
pub(crate) fn process_tree_cpu_ticks(pid: u32) -> (u64, u64) {
    let ticks = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                let fields: Vec<&str> = rest.split_whitespace().collect();
                // After the command come state (3), ..., utime (14) and stime (15).
                let utime: u64 = fields.get(11)?.parse().ok()?;
                let stime: u64 = fields.get(12)?.parse().ok()?;
                Some((utime, stime))
            })
            .unwrap_or((0, 0))
    };
    std::iter::once(pid)
        .chain(children(pid))
        .map(ticks)
        .fold((0, 0), |(user, system), (u, s)| (user + u, system + s))
}

/// Direct children of `pid`.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent pid.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// Sum of `VmRSS` of `pid` and its direct children, in KiB.
pub(crate) fn process_tree_rss_kib(pid: u32) -> u64 {
    rss_kib(pid) + children(pid).into_iter().map(rss_kib).sum::<u64>()
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Number of open file descriptors of `pid` (entries of `/proc/PID/fd`), 0 when unreadable.
pub(crate) fn open_fds(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count() as u64)
}

/// Number of threads of `pid` (`Threads:` of `/proc/PID/status`), 0 when unreadable.
pub(crate) fn threads(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0)
}
