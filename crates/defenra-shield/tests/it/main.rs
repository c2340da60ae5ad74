//! The shield through its public API, on a manual clock: limits, blocks, escalation,
//! whitelists, caps, bans and their file, reloads and a flood of new addresses.

mod browser;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use defenra_config::{Reload, Snapshot};
use defenra_shield::{
    Admission, BanSource, Check, Clock, ConnKind, ManualClock, Refusal, Shield, ShieldOptions,
};

/// A snapshot of one domain, `example.com`, with `anti_ddos` as its settings.
fn snapshot(anti_ddos: &str) -> Arc<Snapshot> {
    let doc = format!(
        r#"{{"domains":[{{"domain":"example.com","httpProxy":{{"type":"both","antiDDoS":{anti_ddos}}}}},
                         {{"domain":"other.example","httpProxy":{{"antiDDoS":{{"enabled":true,
                           "rateLimit":{{"windowSeconds":60,"maxRequests":1000}}}}}}}}]}}"#
    );
    let compiled = defenra_config::compile(doc.as_bytes()).expect("document accepted");
    assert_eq!(compiled.issues, vec![]);
    Arc::new(compiled.snapshot)
}

fn shield_with(options: ShieldOptions) -> (Shield, ManualClock) {
    let (clock, manual) = Clock::manual();
    (Shield::new(ShieldOptions { clock, ..options }), manual)
}

fn new_shield() -> (Shield, ManualClock) {
    shield_with(ShieldOptions::default())
}

fn load(shield: &Shield, snapshot: &Arc<Snapshot>) -> Arc<defenra_shield::DomainPolicy> {
    shield.reload(snapshot, &mut Vec::new());
    shield
        .policy(snapshot.domain("example.com").expect("domain"))
        .expect("enabled")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

const LIMIT_3_PER_10S: &str = r#"{"enabled":true,"rateLimit":{"windowSeconds":10,"maxRequests":3},
                                  "blockDurationSeconds":60}"#;

#[test]
fn request_over_the_limit_blocks_for_the_block_duration_from_that_moment() {
    let (shield, clock) = new_shield();
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    let client = ip("127.0.0.2");
    for n in 0..3 {
        assert_eq!(shield.check(&policy, client), Check::Proceed, "request {n}");
    }
    assert_eq!(
        shield.check(&policy, client),
        Check::Limited {
            retry_after: 60,
            new_block: true
        }
    );
    // Refused requests during the block do not restart it.
    clock.advance(Duration::from_secs(30));
    assert_eq!(
        shield.check(&policy, client),
        Check::Limited {
            retry_after: 30,
            new_block: false
        }
    );
    clock.advance(Duration::from_secs(30));
    assert_eq!(shield.check(&policy, client), Check::Proceed, "block over");
    let stats = shield.stats();
    assert_eq!(stats.blocks, 1);
    assert_eq!(stats.requests_limited, 2);
    assert_eq!(
        shield.domain_stats(),
        vec![(
            Arc::from("example.com"),
            defenra_shield::DomainCountersSnapshot {
                requests_limited: 2,
                blocks: 1,
                whitelisted: 0
            }
        )]
    );
}

#[test]
fn the_sustained_rate_passes_and_addresses_are_counted_apart() {
    let (shield, clock) = new_shield();
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    // One request every 10 s / 3 for a long time never blocks.
    for _ in 0..100 {
        assert_eq!(shield.check(&policy, ip("127.0.0.2")), Check::Proceed);
        clock.advance(Duration::from_millis(3_334));
    }
    for _ in 0..3 {
        assert_eq!(shield.check(&policy, ip("127.0.0.3")), Check::Proceed);
    }
    assert!(matches!(
        shield.check(&policy, ip("127.0.0.3")),
        Check::Limited { .. }
    ));
    assert_eq!(shield.check(&policy, ip("127.0.0.4")), Check::Proceed);
}

#[test]
fn a_second_block_within_an_hour_bans_for_ten_then_thirty_minutes() {
    let (shield, clock) = new_shield();
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    let client = ip("127.0.0.9");
    let flood = |shield: &Shield| {
        for _ in 0..4 {
            shield.check(&policy, client);
        }
    };
    flood(&shield);
    assert!(!shield.is_banned(client), "one block is not a ban");
    clock.advance(Duration::from_secs(61));
    flood(&shield);
    assert!(shield.is_banned(client));
    let bans = shield.bans();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source, BanSource::Escalation);
    assert_eq!(bans[0].remaining, Some(Duration::from_secs(600)));
    assert!(matches!(
        shield.admit(client, ConnKind::Http),
        Admission::Refuse(Refusal::Banned)
    ));
    // After the ban the next block within the hour bans for 30 minutes.
    clock.advance(Duration::from_secs(601));
    assert!(!shield.is_banned(client));
    flood(&shield);
    assert_eq!(shield.bans()[0].remaining, Some(Duration::from_secs(1800)));
    // More than an hour after the last block ended, it starts over.
    clock.advance(Duration::from_secs(1801 + 3601));
    flood(&shield);
    assert!(!shield.is_banned(client));
    assert_eq!(shield.stats().bans_escalated, 2);
}

#[test]
fn whitelisted_addresses_bypass_limits_and_are_never_banned_or_capped() {
    let (shield, clock) = new_shield();
    let settings = r#"{"enabled":true,"rateLimit":{"windowSeconds":10,"maxRequests":1},
                       "slowloris":{"maxConnections":1},
                       "ipWhitelist":["127.0.0.7","127.0.1.0/24"]}"#;
    let policy = load(&shield, &snapshot(settings));
    for client in ["127.0.0.7", "127.0.1.200"] {
        for _ in 0..10 {
            assert_eq!(shield.check(&policy, ip(client)), Check::Whitelisted);
        }
        let first = shield.admit(ip(client), ConnKind::Http);
        let second = shield.admit(ip(client), ConnKind::Http);
        assert!(matches!(second, Admission::Proceed(_)), "{client} capped");
        drop(first);
    }
    // The other domain does not whitelist 127.0.0.7, but a block there never escalates.
    let snapshot = snapshot(settings);
    let other = shield
        .policy(snapshot.domain("other.example").unwrap())
        .unwrap();
    let client = ip("127.0.0.7");
    for _ in 0..2 {
        for _ in 0..1001 {
            shield.check(&other, client);
        }
        clock.advance(Duration::from_secs(301));
    }
    assert!(shield.stats().blocks >= 2);
    assert!(!shield.is_banned(client));
}

#[test]
fn the_connection_cap_is_the_smallest_of_enabled_domains_and_counts_http_and_https() {
    let (shield, _clock) = new_shield();
    load(
        &shield,
        &snapshot(r#"{"enabled":true,"slowloris":{"maxConnections":2}}"#),
    );
    let peer = ip("127.0.0.5");
    let a = shield.admit(peer, ConnKind::Http);
    let b = shield.admit(peer, ConnKind::Http);
    assert!(matches!(a, Admission::Proceed(_)) && matches!(b, Admission::Proceed(_)));
    assert!(matches!(
        shield.admit(peer, ConnKind::Http),
        Admission::Refuse(Refusal::TooManyConnections)
    ));
    assert!(matches!(
        shield.admit(ip("127.0.0.6"), ConnKind::Http),
        Admission::Proceed(_)
    ));
    drop(a);
    assert!(matches!(
        shield.admit(peer, ConnKind::Http),
        Admission::Proceed(_)
    ));
    assert_eq!(shield.stats().connections_refused_cap, 1);
}

#[test]
fn l4_caps_limit_concurrent_and_new_connections() {
    let (shield, clock) = shield_with(ShieldOptions {
        l4_max_conns_per_ip: 2,
        l4_new_conns_per_minute: 3,
        ..ShieldOptions::default()
    });
    let peer = ip("127.0.0.8");
    let first = shield.admit(peer, ConnKind::L4);
    let second = shield.admit(peer, ConnKind::L4);
    assert!(matches!(
        shield.admit(peer, ConnKind::L4),
        Admission::Refuse(Refusal::TooManyConnections)
    ));
    drop((first, second));
    // Three new connections a minute: the fourth within the minute is refused.
    assert!(matches!(
        shield.admit(peer, ConnKind::L4),
        Admission::Refuse(Refusal::TooFast)
    ));
    clock.advance(Duration::from_secs(20));
    assert!(matches!(
        shield.admit(peer, ConnKind::L4),
        Admission::Proceed(_)
    ));
    let stats = shield.stats();
    assert_eq!(stats.l4_connections_refused_cap, 1);
    assert_eq!(stats.l4_connections_refused_rate, 1);
}

#[test]
fn a_reload_keeps_counts_and_blocks_and_a_new_policy_applies_to_the_next_request() {
    let (shield, _clock) = new_shield();
    let client = ip("127.0.0.2");
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    for _ in 0..2 {
        assert_eq!(shield.check(&policy, client), Check::Proceed);
    }
    // Same limits again: the count goes on (third passes, fourth blocks).
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    assert_eq!(shield.check(&policy, client), Check::Proceed);
    assert!(matches!(
        shield.check(&policy, client),
        Check::Limited {
            new_block: true,
            ..
        }
    ));
    // A longer block duration in the next config: the block in force stays.
    let policy = load(
        &shield,
        &snapshot(
            r#"{"enabled":true,"rateLimit":{"windowSeconds":10,"maxRequests":3},"blockDurationSeconds":900}"#,
        ),
    );
    assert!(matches!(
        shield.check(&policy, client),
        Check::Limited {
            retry_after: 60,
            ..
        }
    ));
    // Disabled: no policy at all for the domain.
    let snapshot = snapshot(r#"{"enabled":false}"#);
    shield.reload(&snapshot, &mut Vec::new());
    assert!(
        shield
            .policy(snapshot.domain("example.com").unwrap())
            .is_none()
    );
}

#[test]
fn a_flood_of_random_addresses_stays_bounded_and_keeps_an_active_block() {
    let (shield, clock) = shield_with(ShieldOptions {
        table_size: 4096,
        ..ShieldOptions::default()
    });
    let policy = load(&shield, &snapshot(LIMIT_3_PER_10S));
    let blocked = ip("127.0.0.2");
    for _ in 0..4 {
        shield.check(&policy, blocked);
    }
    for n in 0u32..200_000 {
        let source = IpAddr::V4((0x0a00_0000 + n).into());
        shield.check(&policy, source);
        if n % 10_000 == 0 {
            clock.advance(Duration::from_secs(1));
        }
    }
    let stats = shield.stats();
    assert_eq!(stats.table_entries, stats.table_capacity);
    assert!(stats.table_evictions > 190_000, "{stats:?}");
    assert!(matches!(
        shield.check(&policy, blocked),
        Check::Limited {
            new_block: false,
            ..
        }
    ));
}

#[test]
fn proxy_ip_headers_are_honoured_only_when_listed_and_from_trusted_peers() {
    let settings = r#"{"enabled":true,"proxyIpHeaders":["CF-Connecting-IP","X-Forwarded-For"]}"#;
    let snapshot = snapshot(settings);
    let (open, _) = new_shield();
    let policy = load(&open, &snapshot);
    let headers = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
    };
    let peer = ip("127.0.0.1");
    assert_eq!(
        open.client_addr(
            Some(&policy),
            peer,
            headers(&[("cf-connecting-ip", "203.0.113.7")])
        ),
        ip("203.0.113.7")
    );
    assert_eq!(
        open.client_addr(
            Some(&policy),
            peer,
            headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.9")])
        ),
        ip("203.0.113.9"),
        "last entry of the list"
    );
    assert_eq!(
        open.client_addr(
            Some(&policy),
            peer,
            headers(&[("x-real-ip", "203.0.113.7")])
        ),
        peer,
        "unlisted header ignored"
    );
    assert_eq!(
        open.client_addr(None, peer, headers(&[("cf-connecting-ip", "203.0.113.7")])),
        peer,
        "no policy, no header trust"
    );
    let (strict, _) = shield_with(ShieldOptions {
        trusted_proxies: vec!["127.0.0.10/32".parse().unwrap()],
        ..ShieldOptions::default()
    });
    let policy = load(&strict, &snapshot);
    let forged = headers(&[("cf-connecting-ip", "203.0.113.7")]);
    assert_eq!(strict.client_addr(Some(&policy), peer, forged), peer);
    assert_eq!(
        strict.client_addr(Some(&policy), ip("127.0.0.10"), forged),
        ip("203.0.113.7")
    );
}

#[test]
fn bans_survive_a_restart_with_their_remaining_time() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("bans.json");
    let (shield, clock) = new_shield();
    shield
        .ban(
            "203.0.113.7".parse().unwrap(),
            Some(Duration::from_secs(600)),
            "abuse report",
            BanSource::Operator,
        )
        .unwrap();
    shield
        .ban(
            "198.51.100.0/24".parse().unwrap(),
            None,
            "bad network",
            BanSource::Operator,
        )
        .unwrap();
    shield
        .ban(
            "192.0.2.1".parse().unwrap(),
            Some(Duration::from_secs(5)),
            "short",
            BanSource::Operator,
        )
        .unwrap();
    clock.advance(Duration::from_secs(100));
    shield.save_bans(&path).expect("saved");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (restarted, _) = new_shield();
    assert_eq!(restarted.load_bans(&path).expect("loaded"), 2);
    let bans = restarted.bans();
    assert_eq!(bans.len(), 2);
    assert!(bans.iter().all(|ban| ban.source == BanSource::State));
    let single = bans
        .iter()
        .find(|ban| ban.cidr.to_string() == "203.0.113.7/32")
        .unwrap();
    let left = single.remaining.unwrap().as_secs();
    assert!((498..=501).contains(&left), "{left} s left");
    assert_eq!(&*single.reason, "abuse report");
    assert!(restarted.is_banned(ip("198.51.100.42")));
    // A file that is not a ban file is an error and loads nothing.
    std::fs::write(&path, b"{not json").unwrap();
    let (third, _) = new_shield();
    assert!(third.load_bans(&path).is_err());
    assert!(third.bans().is_empty());
    assert_eq!(
        third
            .load_bans(&directory.path().join("missing.json"))
            .unwrap(),
        0
    );
    assert!(third.load_bans(directory.path()).is_err(), "a directory");
}

#[test]
fn datagrams_and_connections_of_banned_prefixes_are_refused() {
    let (shield, _clock) = new_shield();
    shield
        .ban(
            "127.0.3.0/24".parse().unwrap(),
            None,
            "test",
            BanSource::Operator,
        )
        .unwrap();
    assert!(!shield.admit_datagram(ip("127.0.3.9")));
    assert!(shield.admit_datagram(ip("127.0.4.9")));
    assert!(matches!(
        shield.admit(ip("127.0.3.1"), ConnKind::L4),
        Admission::Refuse(Refusal::Banned)
    ));
    assert!(shield.unban(&"127.0.3.0/24".parse().unwrap()));
    assert!(shield.admit_datagram(ip("127.0.3.9")));
    assert_eq!(shield.stats().datagrams_dropped_banned, 1);
}
