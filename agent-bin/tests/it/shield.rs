//! Protection through the binary: the ban commands against a running agent, bans kept
//! across a restart, `/banned-ips`, and kernel bans through nftables in a network
//! namespace.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{Agent, binary, eventually, get, get_json, write};

/// A protected domain served by the agent (no origin: requests get 502, which is enough
/// to tell a served connection from a refused one).
const CONFIG: &str = r#"{"domains":[{"domain":"shop.test","httpProxy":{"type":"both",
  "antiDDoS":{"enabled":true,"rateLimit":{"windowSeconds":10,"maxRequests":100}}},
  "dnsRecords":[{"name":"@","type":"A","value":"127.0.0.1","httpProxyEnabled":true}]}]}"#;

fn command(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("STATE_DIR")
        .output()
        .expect("the agent binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether a connection from `source` to `addr` gets an HTTP answer.
fn served_from(source: &str, addr: SocketAddr) -> bool {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: IpAddr = source.parse().unwrap();
    socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(2))
        .is_ok()
        && served_from_stream(socket.into())
}

#[test]
fn ban_commands_act_on_the_running_agent_and_bans_outlive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let state = dir.path().join("state");
    write(&config, CONFIG);
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("config loaded", || get_json(health, "/health").0 == 200);
    let http = agent.addr("http");
    assert!(served_from("127.0.0.2", http));

    // The socket is the operator's only.
    let socket = state.join("control.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let banned = command(
        &state,
        &[
            "ban",
            "127.0.0.2",
            "--for",
            "10m",
            "--reason",
            "abuse report 17",
        ],
    );
    assert!(banned.status.success(), "{banned:?}");
    assert_eq!(stdout(&banned).trim(), "127.0.0.2/32 banned");
    let banned = command(&state, &["ban", "127.0.5.0/24"]);
    assert!(banned.status.success(), "{banned:?}");
    assert!(!served_from("127.0.0.2", http), "banned address served");
    assert!(!served_from("127.0.5.77", http), "banned prefix served");
    assert!(served_from("127.0.0.3", http));

    let listing = command(&state, &["bans"]);
    assert!(listing.status.success());
    let text = stdout(&listing);
    assert!(
        text.contains("127.0.0.2/32") && text.contains("abuse report 17"),
        "{text}"
    );
    assert!(
        text.contains("127.0.5.0/24") && text.contains("forever"),
        "{text}"
    );

    let (status, body) = get_json(health, "/banned-ips");
    assert_eq!(status, 200);
    let bans = body["bans"].as_array().unwrap();
    assert_eq!(bans.len(), 2, "{body}");
    let single = bans
        .iter()
        .find(|ban| ban["address"] == "127.0.0.2")
        .unwrap();
    assert_eq!(single["prefix"], 32);
    assert_eq!(single["source"], "operator");
    assert_eq!(single["reason"], "abuse report 17");
    let left = single["remainingSeconds"].as_u64().unwrap();
    assert!((590..=600).contains(&left), "{left}");
    assert!(single["expiresAt"].as_str().unwrap().ends_with('Z'));
    let (_, stats) = get_json(health, "/stats");
    assert_eq!(stats["shield"]["bans_active"], 2, "{stats}");
    let (_, metrics) = get(health, "/metrics");
    assert!(
        metrics.contains(
            "defenra_shield_connections_refused_total{listener=\"http\",reason=\"banned\"} 2"
        ),
        "{metrics}"
    );

    // A restart keeps both, with their remaining time, listed as restored from state.
    agent.signal("TERM");
    assert!(agent.child.wait().unwrap().success());
    let agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("config loaded", || get_json(health, "/health").0 == 200);
    let (_, body) = get_json(health, "/banned-ips");
    let bans = body["bans"].as_array().unwrap();
    assert_eq!(bans.len(), 2, "{body}");
    assert!(bans.iter().all(|ban| ban["source"] == "state"), "{body}");
    assert!(!served_from("127.0.0.2", agent.addr("http")));

    let lifted = command(&state, &["unban", "127.0.0.2"]);
    assert!(lifted.status.success(), "{lifted:?}");
    assert!(served_from("127.0.0.2", agent.addr("http")));
    let missing = command(&state, &["unban", "127.0.0.2"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not banned"));
    let listing = command(&state, &["bans", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(json["bans"].as_array().unwrap().len(), 1);
}

#[test]
fn ban_commands_fail_clearly_without_an_agent_or_with_a_bad_address() {
    let dir = tempfile::tempdir().unwrap();
    let output = command(dir.path(), &["bans"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot reach the agent"),
        "{output:?}"
    );
    let output = command(dir.path(), &["ban", "not-an-address"]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
}

/// Runs `f` on a thread inside the network namespace of process `pid`.
fn in_namespace_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns (the test runs as root)");
        f()
    })
    .join()
    .unwrap()
}

fn nft_set(pid: u32) -> String {
    let output = Command::new("nsenter")
        .args([
            &format!("--net=/proc/{pid}/ns/net"),
            "nft",
            "list",
            "set",
            "inet",
            "defenra",
            "banned4",
        ])
        .output()
        .expect("nsenter runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A connection attempt from `source` inside the namespace: `Some(true)` answered,
/// `Some(false)` closed or reset by the agent, `None` no answer at all (dropped in the
/// kernel).
fn attempt(pid: u32, source: &'static str, addr: SocketAddr) -> Option<bool> {
    in_namespace_of(pid, move || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new(source.parse().unwrap(), 0).into())
            .unwrap();
        match socket.connect_timeout(&addr.into(), Duration::from_millis(1500)) {
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => None,
            Err(_) => Some(false),
            Ok(()) => {
                let stream: TcpStream = socket.into();
                Some(served_from_stream(stream))
            }
        }
    })
}

fn served_from_stream(mut stream: TcpStream) -> bool {
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.starts_with(b"HTTP/1.1 ")
}

#[test]
fn nftables_drops_banned_sources_before_accept_in_a_network_namespace() {
    for (tool, package) in [
        ("nft", "nftables"),
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
    ] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|output| output.status.success()),
            "{tool} is missing: apt-get install {package} (cargo xtask ci installs it)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let state = dir.path().join("state");
    write(&config, CONFIG);
    // A fresh network namespace with only loopback: the test's nftables table is the
    // namespace's, never the host's.
    let agent = Agent::start_wrapped(
        &[
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ],
        &[
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--ban-backend",
            "nftables",
        ],
    );
    let pid = agent.pid();
    let http = agent.addr("http");
    let health = agent.addr("health");
    let ready = |pid| {
        in_namespace_of(pid, move || {
            std::net::TcpStream::connect_timeout(&health, Duration::from_secs(1)).is_ok()
        })
    };
    eventually("agent up in its namespace", || ready(pid));
    eventually("nftables table made", || nft_set(pid).contains("banned4"));
    assert_eq!(attempt(pid, "127.0.0.2", http), Some(true));

    let banned = command(&state, &["ban", "127.0.0.2", "--for", "10m"]);
    assert!(banned.status.success(), "{banned:?}");
    eventually("the ban reaches the kernel set", || {
        nft_set(pid).contains("127.0.0.2")
    });
    let set = nft_set(pid);
    assert!(set.contains("timeout") || set.contains("expires"), "{set}");
    // Dropped in the kernel: no SYN-ACK, so the connect times out (the agent's own check
    // would accept and reset instead).
    assert_eq!(
        attempt(pid, "127.0.0.2", http),
        None,
        "not dropped in the kernel"
    );
    assert_eq!(attempt(pid, "127.0.0.3", http), Some(true));

    let lifted = command(&state, &["unban", "127.0.0.2"]);
    assert!(lifted.status.success());
    eventually("the ban leaves the kernel set", || {
        !nft_set(pid).contains("127.0.0.2")
    });
    assert_eq!(attempt(pid, "127.0.0.2", http), Some(true));
}
