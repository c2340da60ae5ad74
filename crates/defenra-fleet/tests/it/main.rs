//! In-process agents (a `Shield`, a `WafEngine` and a `Fleet` task each) against a real
//! `redis-server` on a loopback port: bans both ways and their latency, the challenge key,
//! `ngx.shared.fleet` across agents, a Redis Cluster, Redis going away and coming back, and
//! credentials Redis refuses. The agent binary's own tests (agent-bin/tests/it/fleet.rs)
//! run floods and bans through the real proxy.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use defenra_config::{Cidr, Reload};
use defenra_fleet::testing::{RedisCluster, RedisServer};
use defenra_fleet::{Fleet, FleetOptions, LinkState, RedisTarget};
use defenra_shield::{BanSource, Check, Shield, ShieldKey, ShieldOptions};
use defenra_waf::{RequestHeaders, RequestInfo, Verdict, WafEngine, WafOptions};
use tokio_util::sync::CancellationToken;

const DOC: &str = r#"{"domains": [{"domain": "shop.test",
    "httpProxy": {"antiDDoS": {"enabled": true,
        "rateLimit": {"windowSeconds": 60, "maxRequests": 30}, "blockDurationSeconds": 120}},
    "luaCode": "local n = ngx.shared.fleet:incr('hits', 1, 0, 60) ngx.say(n)"}]}"#;

/// One in-process agent.
struct Agent {
    shield: Arc<Shield>,
    waf: Arc<WafEngine>,
    fleet: Arc<Fleet>,
    policy: Arc<defenra_shield::DomainPolicy>,
    stop: CancellationToken,
}

impl Agent {
    fn start(target: RedisTarget, key: Option<ShieldKey>, limits: bool) -> Agent {
        let snapshot = Arc::new(
            defenra_config::compile(DOC.as_bytes())
                .expect("compiles")
                .snapshot,
        );
        let shield = Arc::new(Shield::new(ShieldOptions {
            shield_key: key.clone(),
            ..ShieldOptions::default()
        }));
        let waf = Arc::new(WafEngine::new(WafOptions::default()));
        shield.reload(&snapshot, &mut Vec::new());
        waf.reload(&snapshot, &mut Vec::new());
        let policy = shield.policy(&snapshot.domains[0]).expect("protected");
        let mut options = FleetOptions::new(target);
        options.limits = limits;
        options.sync_interval = Duration::from_millis(50);
        options.seed_key = key;
        let fleet =
            Fleet::new(options, Arc::clone(&shield), Some(Arc::clone(&waf))).expect("fleet");
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&fleet).run(stop.clone()));
        Agent {
            shield,
            waf,
            fleet,
            policy,
            stop,
        }
    }

    fn script(&self) -> String {
        let headers: [(&str, &[u8]); 0] = [];
        let request = RequestInfo {
            domain: "shop.test",
            host: "shop.test",
            method: &http::Method::GET,
            target: "/",
            headers: RequestHeaders::Pairs(&headers),
            remote_addr: "192.0.2.1".parse().expect("address"),
            scheme: "http",
            server_port: 80,
        };
        match self.waf.check(&request) {
            Verdict::Block { body, .. } => String::from_utf8_lossy(&body).trim().to_owned(),
            Verdict::Allow { .. } => "allow".to_owned(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("prefix")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

async fn all_up(agents: &[&Agent]) {
    eventually("every fleet link is up", || {
        agents.iter().all(|agent| agent.fleet.is_up())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_reaches_the_other_agents_at_once_and_a_new_agent_loads_it() {
    let redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let a = Agent::start(target.clone(), None, false);
    let b = Agent::start(target.clone(), None, false);
    all_up(&[&a, &b]).await;
    let started = Instant::now();
    a.shield
        .ban(
            cidr("203.0.113.7"),
            Some(Duration::from_secs(600)),
            "abuse",
            BanSource::Operator,
        )
        .expect("room");
    eventually("b bans it", || b.shield.is_banned(ip("203.0.113.7"))).await;
    let latency = started.elapsed();
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    let listed = b.shield.bans();
    assert_eq!(listed[0].source, BanSource::Fleet);
    assert_eq!(&*listed[0].reason, "abuse");
    let left = listed[0].remaining.expect("expires").as_secs();
    assert!((598..=600).contains(&left), "{left}");
    // Redis holds it with an expiry; a new agent loads it at start.
    let ttl: i64 = redis
        .cli(&["TTL", "defenra:{bans}"])
        .trim()
        .parse()
        .expect("ttl");
    assert!((590..=600).contains(&ttl), "{ttl}");
    let c = Agent::start(target, None, false);
    eventually("c loads it at start", || {
        c.shield.is_banned(ip("203.0.113.7"))
    })
    .await;
    // An unban anywhere is an unban everywhere.
    assert!(b.shield.unban(&cidr("203.0.113.7")));
    eventually("a and c lift it", || {
        !a.shield.is_banned(ip("203.0.113.7")) && !c.shield.is_banned(ip("203.0.113.7"))
    })
    .await;
    assert_eq!(redis.cli(&["HLEN", "defenra:{bans}"]).trim(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_agents_key_becomes_the_fleets_and_a_rotation_reaches_every_agent() {
    let redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let first = ShieldKey::from_bytes([1; 32]);
    let a = Agent::start(target.clone(), Some(first.clone()), false);
    all_up(&[&a]).await;
    let b = Agent::start(target.clone(), Some(ShieldKey::from_bytes([2; 32])), false);
    eventually("b takes a's key", || {
        b.shield.keys().current() == first.fingerprint()
    })
    .await;
    assert_eq!(
        redis.cli(&["GET", "defenra:shield-key"]).trim(),
        first.to_hex()
    );
    // A cookie of a's is valid on b.
    let client = ip("198.51.100.20");
    let token =
        a.shield
            .keys()
            .issue_clearance(client, "shop.test", Duration::from_secs(900), now());
    let cookie = format!("defenra_js_challenge={}", token.as_str());
    assert_eq!(
        b.shield
            .clearance(&b.policy, client, "shop.test", [cookie.as_bytes()]),
        defenra_shield::challenge::Clearance::Valid
    );
    // An operator rotates on a (SIGHUP): b follows and still accepts the old key's cookies.
    let rotated = ShieldKey::from_bytes([3; 32]);
    assert!(a.shield.rotate_key(&rotated));
    a.fleet.publish_key(&rotated);
    eventually("b rotates", || {
        b.shield.keys().current() == rotated.fingerprint()
    })
    .await;
    assert_eq!(
        b.shield
            .clearance(&b.policy, client, "shop.test", [cookie.as_bytes()]),
        defenra_shield::challenge::Clearance::Valid
    );
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngx_shared_fleet_counts_across_agents() {
    let redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let a = Agent::start(target.clone(), None, false);
    let b = Agent::start(target, None, false);
    all_up(&[&a, &b]).await;
    for _ in 0..5 {
        a.script();
    }
    for _ in 0..3 {
        b.script();
    }
    eventually("redis has the fleet total", || {
        redis.cli(&["GET", "defenra:dict:shop.test:hits"]).trim() == "8"
    })
    .await;
    // Each agent's cache catches up: the next run sees the fleet's 8 plus its own one.
    eventually("a sees b's counts", || {
        a.script() == "9" || a.script().parse::<u32>().is_ok_and(|n| n >= 9)
    })
    .await;
    let ttl: i64 = redis
        .cli(&["PTTL", "defenra:dict:shop.test:hits"])
        .trim()
        .parse()
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_blocks_are_shared_with_fleet_limits() {
    let redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let a = Agent::start(target.clone(), None, true);
    let b = Agent::start(target, None, true);
    all_up(&[&a, &b]).await;
    let client = ip("198.51.100.9");
    for _ in 0..20 {
        assert_eq!(a.shield.check(&a.policy, client), Check::Proceed);
    }
    eventually("b has merged a's 20", || {
        b.fleet
            .stats()
            .requests_merged
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    let allowed_on_b = (0..20)
        .filter(|_| b.shield.check(&b.policy, client) == Check::Proceed)
        .count();
    assert_eq!(allowed_on_b, 10, "30 in all");
    eventually("a applies b's block", || {
        matches!(a.shield.check(&a.policy, client), Check::Limited { .. })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_nodes_carries_bans_keys_and_the_dictionary() {
    let cluster = RedisCluster::start();
    let target = RedisTarget::cluster(cluster.urls().iter().map(String::as_str)).expect("urls");
    let a = Agent::start(target.clone(), Some(ShieldKey::from_bytes([5; 32])), false);
    let b = Agent::start(target, None, false);
    all_up(&[&a, &b]).await;
    a.shield
        .ban(cidr("203.0.113.0/24"), None, "cluster", BanSource::Operator)
        .expect("room");
    eventually("b bans the prefix", || {
        b.shield.is_banned(ip("203.0.113.99"))
    })
    .await;
    eventually("b takes a's key", || {
        b.shield.keys().current() == ShieldKey::from_bytes([5; 32]).fingerprint()
    })
    .await;
    for _ in 0..4 {
        b.script();
    }
    eventually("a sees b's counts", || {
        a.script().parse::<u32>().is_ok_and(|n| n >= 5)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_serve_alone_while_redis_is_gone_and_resynchronise_when_it_returns() {
    let mut redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let a = Agent::start(target.clone(), Some(ShieldKey::from_bytes([7; 32])), false);
    let b = Agent::start(target, None, false);
    all_up(&[&a, &b]).await;
    a.shield
        .ban(cidr("203.0.113.1"), None, "before", BanSource::Operator)
        .expect("room");
    eventually("b has it", || b.shield.is_banned(ip("203.0.113.1"))).await;
    redis.kill();
    eventually("both links are down", || {
        a.fleet.stats().state() == LinkState::Down && b.fleet.stats().state() == LinkState::Down
    })
    .await;
    // Local decisions go on.
    a.shield
        .ban(cidr("203.0.113.2"), None, "while down", BanSource::Operator)
        .expect("room");
    assert!(a.shield.is_banned(ip("203.0.113.2")));
    // Redis comes back empty: everything is put back from the agents.
    redis.restart();
    all_up(&[&a, &b]).await;
    eventually("b learns of the ban made while down", || {
        b.shield.is_banned(ip("203.0.113.2"))
    })
    .await;
    eventually("redis has both bans and the key again", || {
        redis.cli(&["HLEN", "defenra:{bans}"]).trim() == "2"
            && redis.cli(&["GET", "defenra:shield-key"]).trim()
                == ShieldKey::from_bytes([7; 32]).to_hex()
    })
    .await;
    assert!(
        a.fleet
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_as_such_and_the_shield_works_alone() {
    let redis = RedisServer::with_password("right");
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port());
    let a = Agent::start(RedisTarget::single(&url).expect("url"), None, false);
    eventually("the link is unauthorised", || {
        a.fleet.stats().state() == LinkState::Unauthorised
    })
    .await;
    let health = a.fleet.health();
    assert_eq!(health["state"], "unauthorised");
    assert!(
        !health.to_string().contains("wrong"),
        "no password in {health}"
    );
    assert!(
        health["error"]
            .as_str()
            .is_some_and(|error| error.contains("WRONGPASS") || error.contains("uthentication")),
        "{health}"
    );
    assert_eq!(
        a.shield.check(&a.policy, ip("198.51.100.1")),
        Check::Proceed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_lifted_at_once_stays_lifted_and_a_long_list_goes_back_in_batches() {
    let mut redis = RedisServer::start();
    let target = RedisTarget::single(&redis.url()).expect("url");
    let a = Agent::start(target.clone(), None, false);
    let b = Agent::start(target, None, false);
    all_up(&[&a, &b]).await;
    // Made and lifted before the link task looks: one drain holds both, in order.
    a.shield
        .ban(cidr("203.0.113.5"), None, "mistake", BanSource::Operator)
        .expect("room");
    assert!(a.shield.unban(&cidr("203.0.113.5")));
    a.shield
        .ban(cidr("203.0.113.6"), None, "meant", BanSource::Operator)
        .expect("room");
    eventually("b has the second ban", || {
        b.shield.is_banned(ip("203.0.113.6"))
    })
    .await;
    assert!(!b.shield.is_banned(ip("203.0.113.5")));
    assert_eq!(
        redis
            .cli(&["HEXISTS", "defenra:{bans}", "203.0.113.5/32"])
            .trim(),
        "0"
    );
    // 1,200 bans made while Redis is away go back in batches when it returns empty.
    redis.kill();
    eventually("a's link is down", || {
        a.fleet.stats().state() == LinkState::Down
    })
    .await;
    for n in 0..1200u32 {
        let address = format!("10.9.{}.{}", n / 256, n % 256);
        a.shield
            .ban(
                cidr(&address),
                Some(Duration::from_secs(3600)),
                "flood",
                BanSource::Escalation,
            )
            .expect("room");
    }
    redis.restart();
    eventually("redis has every ban again", || {
        redis.cli(&["HLEN", "defenra:{bans}"]).trim() == "1201"
    })
    .await;
    eventually("b has them too", || b.shield.bans().len() == 1201).await;
    let ttl: i64 = redis
        .cli(&["TTL", "defenra:{bans}"])
        .trim()
        .parse()
        .expect("ttl");
    assert_eq!(ttl, -1, "a ban without expiry keeps the keys");
}
