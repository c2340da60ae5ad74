//! Three agent binaries sharing protection state through a real `redis-server` (Debian's
//! package; `cargo xtask ci` installs it) started by each test on a free loopback port with
//! its own directory: a ban made on one reaches the others (latency measured), a flood
//! spread over the three is limited to about the fleet limit (and to three times it without
//! `--fleet-limits`), a clearance cookie of one is accepted by another, `ngx.shared.fleet`
//! counts across agents, Redis killed mid-flood and restarted, a Redis Cluster, and a
//! wrong password.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use defenra_fleet::testing::{RedisCluster, RedisServer};
use serde_json::json;

use crate::e2e_support::start_origin;
use crate::support::{Agent, eventually, get_json};

/// `shop.test` proxied to the origin with Anti-DDoS: `limit` requests per minute, blocks of
/// two minutes; its script counts requests in `ngx.shared.fleet` and adds the count as a
/// response header.
fn write_config(dir: &Path, limit: u32) -> std::path::PathBuf {
    let config = json!({"domains": [{
        "domain": "shop.test",
        "httpProxy": {"enabled": true, "antiDDoS": {
            "enabled": true,
            "rateLimit": {"windowSeconds": 60, "maxRequests": limit},
            "blockDurationSeconds": 120,
            "slowloris": {"maxConnections": 10000}
        }},
        "luaCode": "local n = ngx.shared.fleet:incr('hits', 1, 0, 300) ngx.header['X-Fleet-Hits'] = n",
        "dnsRecords": [{"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}]
    }]});
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// An agent of the fleet: its own state directory, the shared config and Redis flags.
fn start_member(
    dir: &Path,
    name: &str,
    config: &Path,
    origin: SocketAddr,
    redis: &[&str],
) -> Agent {
    let state = dir.join(name);
    let port = origin.port().to_string();
    let mut args = vec![
        "--config",
        config.to_str().unwrap(),
        "--origin-http-port",
        &port,
        "--state-dir",
        state.to_str().unwrap(),
        "--fleet-sync-interval",
        "100ms",
    ];
    args.extend(redis);
    let agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("a config is served and the fleet link is up", || {
        let (status, body) = get_json(health, "/health");
        status == 200 && body["fleet"]["state"] == "up"
    });
    agent
}

fn command(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(crate::support::binary())
        .args(args)
        .args(["--state-dir", state_dir.to_str().unwrap()])
        .output()
        .unwrap()
}

/// The bans `/banned-ips` lists: (prefix, source).
fn bans(agent: &Agent) -> Vec<(String, String)> {
    let (_, body) = get_json(agent.addr("health"), "/banned-ips");
    body["bans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ban| {
            (
                format!("{}/{}", ban["address"].as_str().unwrap(), ban["prefix"]),
                ban["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A keep-alive HTTP/1.1 client from one source address.
struct Client {
    source: IpAddr,
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(source: &str, addr: SocketAddr) -> Client {
        Client {
            source: source.parse().unwrap(),
            addr,
            stream: None,
        }
    }

    /// One `GET /` of `shop.test`: the status, 0 when the connection failed, and the
    /// `X-Fleet-Hits` header.
    fn get(&mut self) -> (u16, Option<String>) {
        for _ in 0..2 {
            if self.stream.is_none() {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket
                    .bind(&SocketAddr::new(self.source, 0).into())
                    .unwrap();
                if socket
                    .connect_timeout(&self.addr.into(), Duration::from_secs(2))
                    .is_err()
                {
                    return (0, None);
                }
                let stream: TcpStream = socket.into();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                self.stream = Some(BufReader::new(stream));
            }
            match self.exchange() {
                Some(answer) => return answer,
                None => self.stream = None,
            }
        }
        (0, None)
    }

    fn exchange(&mut self) -> Option<(u16, Option<String>)> {
        let reader = self.stream.as_mut()?;
        reader
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            .ok()?;
        let mut status_line = String::new();
        if reader.read_line(&mut status_line).ok()? == 0 {
            return None;
        }
        let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
        let (mut length, mut hits, mut close) = (0usize, None, false);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().ok()?,
                "x-fleet-hits" => hits = Some(value.to_owned()),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        if close {
            self.stream = None;
        }
        Some((status, hits))
    }
}

/// Sends `total` requests from `source`, spread over `agents` by `weights`, at `per_second`;
/// returns how many the origin answered (200) and how many got no HTTP answer at all.
fn flood(
    agents: &[&Agent],
    weights: &[u32],
    source: &str,
    total: u32,
    per_second: u32,
    mut during: impl FnMut(u32),
) -> (u32, u32) {
    let mut clients: Vec<Client> = agents
        .iter()
        .map(|agent| Client::new(source, agent.addr("http")))
        .collect();
    let schedule: Vec<usize> = weights
        .iter()
        .enumerate()
        .flat_map(|(index, weight)| std::iter::repeat_n(index, *weight as usize))
        .collect();
    let started = Instant::now();
    let (mut allowed, mut failed) = (0, 0);
    for n in 0..total {
        let due = started + Duration::from_secs_f64(f64::from(n) / f64::from(per_second));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        during(n);
        match clients[schedule[n as usize % schedule.len()]].get() {
            (200, _) => allowed += 1,
            (0, _) => failed += 1,
            _ => {}
        }
    }
    (allowed, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_made_on_one_agent_reaches_the_others_within_a_second() {
    let redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1000);
    let url = redis.url();
    let flags = ["--redis-url", url.as_str()];
    let agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|name| start_member(dir.path(), name, &config, origin, &flags))
        .collect();
    let mut latencies = Vec::new();
    for n in 1..=5 {
        let address = format!("127.0.0.{}", 50 + n);
        let started = Instant::now();
        let banned = command(
            &dir.path().join("a"),
            &["ban", &address, "--for", "10m", "--reason", "fleet test"],
        );
        assert!(banned.status.success(), "{banned:?}");
        let cidr = format!("{address}/32");
        let mut seen = [false, false];
        while seen != [true, true] {
            for (index, agent) in agents[1..].iter().enumerate() {
                seen[index] |= bans(agent).contains(&(cidr.clone(), "fleet".to_owned()));
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{address} never arrived"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    eprintln!("ban propagation (command to both other agents' /banned-ips): {latencies:?}");
    assert!(
        latencies[latencies.len() - 1] < Duration::from_secs(1),
        "{latencies:?}"
    );
    // The banned address is closed at accept on the others, and others are served.
    let mut banned_client = Client::new("127.0.0.51", agents[2].addr("http"));
    assert_eq!(banned_client.get().0, 0);
    assert_eq!(
        Client::new("127.0.0.60", agents[2].addr("http")).get().0,
        200
    );
    // The remaining time travels with it.
    let (_, listed) = get_json(agents[1].addr("health"), "/banned-ips");
    let remaining = listed["bans"][0]["remainingSeconds"].as_u64().unwrap();
    assert!((590..=600).contains(&remaining), "{listed}");
    // An unban on any agent is an unban everywhere.
    let unbanned = command(&dir.path().join("c"), &["unban", "127.0.0.51"]);
    assert!(unbanned.status.success(), "{unbanned:?}");
    eventually("every agent lifts the ban", || {
        agents
            .iter()
            .all(|agent| !bans(agent).iter().any(|(cidr, _)| cidr == "127.0.0.51/32"))
    });
    // A new agent loads the bans in force at start.
    let d = start_member(dir.path(), "d", &config, origin, &flags);
    eventually("the new agent has the fleet's bans", || bans(&d).len() == 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_spread_over_three_agents_is_limited_to_about_the_fleet_limit() {
    let redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 60;
    let config = write_config(dir.path(), limit);
    let url = redis.url();
    let with_limits = ["--redis-url", url.as_str(), "--fleet-limits"];
    let fleet: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|name| start_member(dir.path(), name, &config, origin, &with_limits))
        .collect();
    let members: Vec<&Agent> = fleet.iter().collect();
    // 300 requests at 150 a second, round robin: each agent alone would allow 60.
    let (allowed, failed) = flood(&members, &[1, 1, 1], "127.0.0.21", 300, 150, |_| {});
    eprintln!("fleet limit {limit}: {allowed} allowed over three agents");
    assert_eq!(failed, 0);
    // The bound: the limit plus what each agent allows in one sync interval (100 ms at 50
    // requests a second each) before it hears of the others.
    assert!(allowed >= limit - 5, "{allowed}");
    assert!(
        allowed <= limit + limit / 2,
        "{allowed} of a fleet limit of {limit}"
    );
    // Unevenly (4:1:1) from another address: the same bound.
    let (allowed, _) = flood(&members, &[4, 1, 1], "127.0.0.22", 300, 150, |_| {});
    eprintln!("uneven split: {allowed} allowed");
    assert!(allowed <= limit + limit / 2, "{allowed}");
    // The block decided somewhere applies everywhere.
    for agent in &fleet {
        assert_eq!(Client::new("127.0.0.21", agent.addr("http")).get().0, 429);
    }
    drop(fleet);

    // The same flood without --fleet-limits: each agent counts alone.
    let alone = ["--redis-url", url.as_str()];
    let agents: Vec<Agent> = ["d", "e", "f"]
        .iter()
        .map(|name| start_member(dir.path(), name, &config, origin, &alone))
        .collect();
    let members: Vec<&Agent> = agents.iter().collect();
    let (allowed, _) = flood(&members, &[1, 1, 1], "127.0.0.23", 300, 150, |_| {});
    eprintln!("per-agent limits: {allowed} allowed over three agents");
    assert!(allowed >= 3 * limit - 5, "{allowed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_serving_and_limiting_while_redis_is_gone_and_resynchronise_after() {
    let mut redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let limit = 40;
    let config = write_config(dir.path(), limit);
    let url = redis.url();
    let flags = ["--redis-url", url.as_str(), "--fleet-limits"];
    let agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|name| start_member(dir.path(), name, &config, origin, &flags))
        .collect();
    let members: Vec<&Agent> = agents.iter().collect();
    let mut killed = false;
    let (allowed, failed) = flood(&members, &[1, 1, 1], "127.0.0.31", 300, 150, |n| {
        if n == 30 && !killed {
            redis.kill();
            killed = true;
        }
    });
    eprintln!("redis killed after 30 of 300 requests: {allowed} allowed, {failed} unanswered");
    assert_eq!(failed, 0, "every request got an answer");
    // Each agent went on limiting on its own: at most its own limit each.
    assert!(allowed <= 3 * limit, "{allowed}");
    for agent in &agents {
        let (status, health) = get_json(agent.addr("health"), "/health");
        assert_eq!(status, 200);
        assert_eq!(health["status"], "degraded", "{health}");
        assert_eq!(health["fleet"]["state"], "down", "{health}");
    }
    // A ban made while Redis is away is local, then shared once it returns.
    let banned = command(&dir.path().join("a"), &["ban", "198.51.100.77"]);
    assert!(banned.status.success());
    redis.restart();
    eventually("every link is back up and healthy", || {
        agents.iter().all(|agent| {
            let (_, health) = get_json(agent.addr("health"), "/health");
            health["status"] == "ok" && health["fleet"]["state"] == "up"
        })
    });
    eventually("the ban made while down reached the others", || {
        agents[1..]
            .iter()
            .all(|agent| bans(agent).contains(&("198.51.100.77/32".to_owned(), "fleet".to_owned())))
    });
    let (_, stats) = get_json(agents[0].addr("health"), "/stats");
    assert!(
        stats["fleet"]["reconnects_total"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(redis.cli(&["HLEN", "defenra:{bans}"]).trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearance_cookie_of_one_agent_is_accepted_by_another_without_copying_key_files() {
    let redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::challenge::write_config(dir.path());
    let url = redis.url();
    let member = |name: &str| {
        let state = dir.path().join(name);
        crate::challenge::start_agent(
            &config,
            origin,
            &["--state-dir", state.to_str().unwrap(), "--redis-url", &url],
        )
    };
    let a = member("a");
    eventually("a's key is the fleet's", || {
        !redis.cli(&["GET", "defenra:shield-key"]).trim().is_empty()
    });
    let b = member("b");
    let fleet_key = redis.cli(&["GET", "defenra:shield-key"]).trim().to_owned();
    eventually("b's state directory holds the fleet's key", || {
        std::fs::read_to_string(dir.path().join("b/shield.key"))
            .is_ok_and(|text| text.trim() == fleet_key)
    });
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a/shield.key"))
            .unwrap()
            .trim(),
        fleet_key
    );
    let cookie = crate::challenge::pass_challenge(a.addr("http"));
    assert_eq!(
        crate::challenge::status_with_cookie(b.addr("http"), &cookie),
        200
    );
    let cookie = crate::challenge::pass_challenge(b.addr("http"));
    assert_eq!(
        crate::challenge::status_with_cookie(a.addr("http"), &cookie),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngx_shared_fleet_counts_across_agents() {
    let redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1000);
    let url = redis.url();
    let flags = ["--redis-url", url.as_str()];
    let a = start_member(dir.path(), "a", &config, origin, &flags);
    let b = start_member(dir.path(), "b", &config, origin, &flags);
    let mut on_a = Client::new("127.0.0.41", a.addr("http"));
    let mut on_b = Client::new("127.0.0.42", b.addr("http"));
    for _ in 0..5 {
        assert_eq!(on_a.get().0, 200);
    }
    for _ in 0..3 {
        assert_eq!(on_b.get().0, 200);
    }
    eventually("redis holds the fleet's count", || {
        redis.cli(&["GET", "defenra:dict:shop.test:hits"]).trim() == "8"
    });
    // Each agent's next request sees the fleet's 8 and counts the 9th (or later).
    eventually("a sees b's requests", || {
        on_a.get().1.and_then(|hits| hits.parse::<u32>().ok()) >= Some(9)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_a_redis_cluster_share_bans() {
    let cluster = RedisCluster::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1000);
    let nodes = cluster.urls().join(",");
    let flags = ["--redis-cluster", nodes.as_str()];
    let a = start_member(dir.path(), "a", &config, origin, &flags);
    let b = start_member(dir.path(), "b", &config, origin, &flags);
    let banned = command(
        &dir.path().join("a"),
        &["ban", "192.0.2.0/24", "--for", "1h"],
    );
    assert!(banned.status.success(), "{banned:?}");
    eventually("b bans the prefix", || {
        bans(&b).contains(&("192.0.2.0/24".to_owned(), "fleet".to_owned()))
    });
    drop(a);
}

#[test]
fn a_wrong_password_is_a_clear_error_at_start_and_the_agent_still_serves() {
    let redis = RedisServer::with_password("right-password");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, crate::support::doc("192.0.2.1")).unwrap();
    let url = format!("redis://:wrong-password@127.0.0.1:{}", redis.port());
    let agent = Agent::start(&["--config", config.to_str().unwrap(), "--redis-url", &url]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = agent
            .logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the agent says why the fleet is off");
        if line["level"] == "ERROR" {
            break line;
        }
    };
    let text = line.to_string();
    assert!(text.contains("refused the credentials"), "{text}");
    assert!(
        !text.contains("wrong-password"),
        "the password is not logged: {text}"
    );
    let health = agent.addr("health");
    eventually("the agent serves", || get_json(health, "/health").0 == 200);
    let (_, body) = get_json(health, "/health");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["fleet"]["state"], "unauthorised", "{body}");
    // DNS answers from the config: the agent serves without its fleet.
    let (_, stats) = get_json(health, "/stats");
    assert_eq!(stats["fleet"]["link_up"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_never_slows_a_request() {
    let redis = RedisServer::start();
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1000);
    let url = redis.url();
    let agent = start_member(
        dir.path(),
        "a",
        &config,
        origin,
        &["--redis-url", url.as_str(), "--fleet-limits"],
    );
    let pid = redis.pid().unwrap().to_string();
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    // Requests (each noted for the fleet, and the fleet dictionary written) go on as fast
    // as before while every Redis command of the fleet task hangs until its timeout.
    let mut client = Client::new("127.0.0.51", agent.addr("http"));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        let sent = Instant::now();
        assert_eq!(client.get().0, 200);
        slowest = slowest.max(sent.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    signal("-CONT");
    eprintln!("slowest request while Redis was stopped: {slowest:?}");
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    let (_, stats) = get_json(agent.addr("health"), "/stats");
    assert!(
        stats["fleet"]["errors_total"].as_u64().unwrap() >= 1,
        "the timeout was seen: {stats}"
    );
    eventually("the link is up again", || {
        get_json(agent.addr("health"), "/health").1["fleet"]["state"] == "up"
    });
}
