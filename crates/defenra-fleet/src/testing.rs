//! Real `redis-server` processes for tests (Debian's `redis-server` package; `cargo xtask
//! ci` installs it): one server on a free loopback port with its own directory, or a Redis
//! Cluster of three. Each is killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server program.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// The client program (cluster creation).
pub const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// One `redis-server` on 127.0.0.1. Killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// Started once already: a restart keeps the port (agents hold the URL).
    started: bool,
}

impl RedisServer {
    /// A server without a password.
    ///
    /// # Panics
    ///
    /// When `redis-server` is missing or does not answer within 10 s (a test that needs
    /// Redis cannot pass without it).
    pub fn start() -> RedisServer {
        RedisServer::start_with(None, &[])
    }

    /// A server that requires `password` (`requirepass`).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn with_password(password: &str) -> RedisServer {
        RedisServer::start_with(Some(password), &[])
    }

    /// A server with extra `redis-server` arguments (`--cluster-enabled yes`, ...).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn start_with(password: Option<&str>, extra: &[&str]) -> RedisServer {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: `apt-get install redis-server` (cargo xtask ci does it)"
        );
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            password: password.map(str::to_owned),
            dir: tempfile::tempdir().expect("a temporary directory"),
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            started: false,
        };
        server.spawn();
        server
    }

    /// `redis://[:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its working directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Kills the server (SIGKILL): its state is gone, as after a crash without persistence.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against this server with `args`; its standard output.
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new(REDIS_CLI);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the server on `port`; on a first start, another free port when that one was
    /// taken meanwhile (a test binding port 0 may get it between our look and the bind).
    fn spawn(&mut self) {
        let first_start = !self.started;
        for _ in 0..5 {
            if self.spawn_once() {
                self.started = true;
                return;
            }
            assert!(
                first_start,
                "redis-server could not start again on {}",
                self.port
            );
            self.port = free_port();
        }
        panic!("redis-server did not start on five free ports");
    }

    /// True when it answers; false when it exited (its port was taken).
    fn spawn_once(&mut self) -> bool {
        let mut command = Command::new(REDIS_SERVER);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--loglevel", "warning", "--logfile", ""]);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cli(&["PING"]).trim() == "PONG" {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters on loopback ports. Killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three `redis-server --cluster-enabled yes` joined by `redis-cli --cluster create`.
    ///
    /// # Panics
    ///
    /// When the servers do not start or the cluster does not form within 20 s.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    None,
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let mut command = Command::new(REDIS_CLI);
        command.args(["--cluster", "create"]);
        command.args(&addrs);
        command.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = command
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// Every node's URL, for `--redis-cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A port nothing listens on now (the kernel's choice for a bound-then-closed socket).
/// Cluster nodes also use PORT + 10000, which is checked too.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("bound").port();
        drop(listener);
        let bus = u32::from(port) + 10_000;
        if bus < 65_536 && TcpStream::connect(("127.0.0.1", bus as u16)).is_err() {
            return port;
        }
    }
}
