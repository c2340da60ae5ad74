//! Two shields on manual clocks stand for two agents; what one hands over, the test hands
//! to the other, as the fleet task would.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use defenra_config::{Cidr, Reload};

use super::*;
use crate::{Check, Clock, ManualClock, ShieldOptions};

/// 10 requests per 10 s (one a second, a burst of 10), blocks of 60 s.
const DOC: &str = r#"{"domains": [
    {"domain": "shop.test", "httpProxy": {"antiDDoS": {"enabled": true,
        "rateLimit": {"windowSeconds": 10, "maxRequests": 10}, "blockDurationSeconds": 60,
        "ipWhitelist": ["192.0.2.99"]}}},
    {"domain": "plain.test"}]}"#;

struct Agent {
    shield: Shield,
    clock: ManualClock,
    policy: Arc<DomainPolicy>,
}

fn agent(limits: bool) -> Agent {
    agent_with(FleetOptions {
        limits,
        ..FleetOptions::default()
    })
}

fn agent_with(options: FleetOptions) -> Agent {
    let (clock, manual) = Clock::manual();
    let shield = Shield::new(ShieldOptions {
        clock,
        ..ShieldOptions::default()
    });
    let snapshot = Arc::new(
        defenra_config::compile(DOC.as_bytes())
            .expect("compiles")
            .snapshot,
    );
    shield.reload(&snapshot, &mut Vec::new());
    let policy = shield.policy(&snapshot.domains[0]).expect("protected");
    assert!(shield.enable_fleet(options));
    Agent {
        shield,
        clock: manual,
        policy,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("prefix")
}

impl Agent {
    fn requests(&self, client: &str, n: usize) -> Vec<Check> {
        (0..n)
            .map(|_| self.shield.check(&self.policy, ip(client)))
            .collect()
    }

    fn allowed(&self, client: &str, n: usize) -> usize {
        self.requests(client, n)
            .into_iter()
            .filter(|check| *check == Check::Proceed)
            .count()
    }

    /// Hands this agent's deltas to `other`, as the fleet task does.
    fn send_to(&self, other: &Agent) -> Vec<FleetMerge> {
        let deltas = self.shield.take_fleet_deltas();
        let mut outcomes = Vec::new();
        for count in deltas.counts {
            let policy = other
                .shield
                .fleet_policy(&count.domain)
                .expect("same config");
            outcomes.push(
                other
                    .shield
                    .merge_fleet_requests(&policy, count.client, count.requests),
            );
        }
        for block in deltas.blocks {
            let policy = other
                .shield
                .fleet_policy(&block.domain)
                .expect("same config");
            other
                .shield
                .apply_fleet_block(&policy, block.client, block.until_unix);
        }
        outcomes
    }
}

#[test]
fn allowed_requests_are_noted_per_domain_and_address_and_refused_ones_are_not() {
    let a = agent(true);
    assert_eq!(a.allowed("198.51.100.1", 14), 10);
    assert_eq!(a.allowed("198.51.100.2", 3), 3);
    a.shield.check(&a.policy, ip("192.0.2.99")); // whitelisted: not counted
    let mut deltas = a.shield.take_fleet_deltas();
    deltas.counts.sort_by_key(|count| count.client);
    let counts: Vec<(&str, IpAddr, u32)> = deltas
        .counts
        .iter()
        .map(|count| (&*count.domain, count.client, count.requests))
        .collect();
    assert_eq!(
        counts,
        [
            ("shop.test", ip("198.51.100.1"), 10),
            ("shop.test", ip("198.51.100.2"), 3)
        ]
    );
    assert_eq!(deltas.blocks.len(), 1, "the 11th request started a block");
    assert_eq!(deltas.blocks[0].client, ip("198.51.100.1"));
    assert_eq!(deltas.blocks[0].until_unix, a.shield.clock().unix_s() + 60);
    let again = a.shield.take_fleet_deltas();
    assert!(
        again.counts.is_empty() && again.blocks.is_empty(),
        "drained"
    );
}

#[test]
fn without_fleet_limits_only_bans_are_noted() {
    let a = agent(false);
    assert!(!a.shield.fleet_limits());
    a.requests("198.51.100.1", 20);
    let deltas = a.shield.take_fleet_deltas();
    assert!(deltas.counts.is_empty() && deltas.blocks.is_empty());
}

#[test]
fn a_flood_of_random_addresses_cannot_grow_the_journal() {
    let a = agent_with(FleetOptions {
        limits: true,
        max_counts: 640,
        ..FleetOptions::default()
    });
    for n in 0..50_000u32 {
        a.shield
            .check(&a.policy, IpAddr::V4((0x0a00_0000 + n).into()));
    }
    let deltas = a.shield.take_fleet_deltas();
    assert!(deltas.counts.len() <= 640, "{}", deltas.counts.len());
    assert!(deltas.counts.len() > 300, "{}", deltas.counts.len());
    assert_eq!(deltas.counts.len() as u64 + deltas.dropped, 50_000);
    assert_eq!(
        a.shield.take_fleet_deltas().dropped,
        0,
        "reset by the drain"
    );
}

#[test]
fn requests_merged_from_another_agent_count_against_the_fleet_limit() {
    let (a, b) = (agent(true), agent(true));
    let client = "198.51.100.7";
    // Three here and three there, then each learns of the other's.
    assert_eq!(a.allowed(client, 3), 3);
    assert_eq!(b.allowed(client, 3), 3);
    assert_eq!(a.send_to(&b), [FleetMerge::Counted]);
    assert_eq!(b.send_to(&a), [FleetMerge::Counted]);
    // Of the limit of 10, four are left for the fleet: on either agent.
    assert_eq!(a.allowed(client, 6), 4);
    a.send_to(&b);
    assert!(
        matches!(
            b.requests(client, 1)[0],
            Check::Limited {
                retry_after: 60,
                ..
            }
        ),
        "a's block applies on b"
    );
    // Another address is untouched.
    assert_eq!(b.allowed("198.51.100.8", 10), 10);
}

#[test]
fn a_merge_showing_the_fleet_over_the_limit_blocks_at_once() {
    let (a, b) = (agent(true), agent(true));
    let client = "198.51.100.7";
    // Both allowed 7 before either heard of the other: 14 of 10.
    assert_eq!(a.allowed(client, 7), 7);
    assert_eq!(b.allowed(client, 7), 7);
    assert_eq!(b.send_to(&a), [FleetMerge::Blocked]);
    assert!(matches!(a.requests(client, 1)[0], Check::Limited { .. }));
    assert_eq!(a.shield.stats().blocks, 1);
    // The block a decided goes to b with the next deltas.
    let deltas = a.shield.take_fleet_deltas();
    assert_eq!(deltas.blocks.len(), 1);
    // Merging into a blocked address changes nothing.
    let policy = a.shield.fleet_policy("shop.test").expect("protected");
    assert_eq!(
        a.shield.merge_fleet_requests(&policy, ip(client), 5),
        FleetMerge::AlreadyBlocked
    );
    // Whitelisted addresses are never limited by the fleet either.
    assert_eq!(
        a.shield
            .merge_fleet_requests(&policy, ip("192.0.2.99"), 500),
        FleetMerge::Whitelisted
    );
}

#[test]
fn the_allowance_comes_back_at_the_sustained_rate_after_a_merge() {
    let (a, b) = (agent(true), agent(true));
    let client = "198.51.100.7";
    // b allowed the whole burst; a has seen none of it.
    assert_eq!(b.allowed(client, 10), 10);
    assert_eq!(b.send_to(&a), [FleetMerge::Counted], "exactly the limit");
    assert_eq!(
        a.shield.check(&a.policy, ip("198.51.100.8")),
        Check::Proceed
    );
    // Three seconds later three requests' worth has drained (one a second).
    a.clock.advance(Duration::from_secs(3));
    assert_eq!(a.allowed(client, 10), 3);
}

#[test]
fn a_block_from_the_fleet_is_refused_here_until_its_end_and_counts_for_escalation() {
    let a = agent(true);
    let client = ip("198.51.100.9");
    let until = a.shield.clock().unix_s() + 30;
    assert!(a.shield.apply_fleet_block(&a.policy, client, until));
    assert!(
        !a.shield.apply_fleet_block(&a.policy, client, until - 10),
        "never shorter"
    );
    assert_eq!(
        a.shield.check(&a.policy, client),
        Check::Limited {
            retry_after: 30,
            new_block: false
        }
    );
    assert!(
        a.shield.take_fleet_deltas().blocks.is_empty(),
        "not sent back"
    );
    assert_eq!(a.shield.stats().bans_escalated, 0);
    // After it ends, the address's next block here is a repeat: banned agent-wide.
    a.clock.advance(Duration::from_secs(31));
    assert_eq!(a.allowed("198.51.100.9", 11), 10);
    assert!(a.shield.is_banned(client));
    assert_eq!(a.shield.stats().bans_escalated, 1);
    // Past ends and whitelisted addresses change nothing.
    let now = a.shield.clock().unix_s();
    assert!(
        !a.shield
            .apply_fleet_block(&a.policy, ip("198.51.100.10"), now)
    );
    assert!(
        !a.shield
            .apply_fleet_block(&a.policy, ip("192.0.2.99"), now + 60)
    );
}

#[test]
fn bans_made_or_lifted_here_are_noted_and_those_from_the_fleet_or_the_state_file_are_not() {
    let a = agent(false);
    a.shield
        .ban(
            cidr("203.0.113.7"),
            Some(Duration::from_secs(120)),
            "abuse",
            BanSource::Operator,
        )
        .expect("room");
    a.shield
        .ban(cidr("203.0.113.8"), None, "restored", BanSource::State)
        .expect("room");
    let expires = a.shield.clock().unix_s() + 300;
    assert_eq!(
        a.shield
            .apply_fleet_ban(cidr("198.51.100.0/24"), Some(expires), "elsewhere"),
        Ok(true)
    );
    assert!(a.shield.unban(&cidr("203.0.113.7")));
    assert!(a.shield.apply_fleet_unban(&cidr("198.51.100.0/24")));
    let changes = a.shield.take_fleet_ban_changes();
    assert!(!changes.overflowed);
    assert_eq!(
        changes.changes,
        [
            FleetBanChange::Banned {
                cidr: cidr("203.0.113.7"),
                reason: Arc::from("abuse"),
                source: BanSource::Operator,
                expires_unix: Some(a.shield.clock().unix_s() + 120),
            },
            FleetBanChange::Lifted {
                cidr: cidr("203.0.113.7")
            },
        ]
    );
    assert!(a.shield.take_fleet_ban_changes().changes.is_empty());
}

#[test]
fn the_ban_log_is_bounded_and_says_when_it_overflowed() {
    let a = agent_with(FleetOptions {
        max_ban_changes: 3,
        ..FleetOptions::default()
    });
    for n in 1..=5u8 {
        a.shield
            .ban(
                cidr(&format!("203.0.113.{n}")),
                None,
                "x",
                BanSource::Operator,
            )
            .expect("room");
    }
    let changes = a.shield.take_fleet_ban_changes();
    assert_eq!(changes.changes.len(), 3);
    assert!(changes.overflowed);
    assert!(!a.shield.take_fleet_ban_changes().overflowed);
}

#[test]
fn fleet_bans_are_listed_as_fleet_with_their_remaining_time_and_never_shorten() {
    let a = agent(false);
    let now = a.shield.clock().unix_s();
    assert_eq!(
        a.shield
            .apply_fleet_ban(cidr("203.0.113.7"), Some(now + 600), "escalated elsewhere"),
        Ok(true)
    );
    assert_eq!(
        a.shield
            .apply_fleet_ban(cidr("203.0.113.7"), Some(now + 60), "shorter"),
        Ok(false)
    );
    assert_eq!(
        a.shield
            .apply_fleet_ban(cidr("203.0.113.8"), Some(now), "over"),
        Ok(false)
    );
    let bans = a.shield.bans();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source, BanSource::Fleet);
    assert_eq!(&*bans[0].reason, "escalated elsewhere");
    assert_eq!(bans[0].remaining, Some(Duration::from_secs(600)));
    assert!(a.shield.is_banned(ip("203.0.113.7")));
    a.clock.advance(Duration::from_secs(601));
    assert!(!a.shield.is_banned(ip("203.0.113.7")));
}

#[test]
fn only_protected_domains_of_the_current_config_take_fleet_state() {
    let a = agent(true);
    assert!(a.shield.fleet_policy("shop.test").is_some());
    assert!(a.shield.fleet_policy("plain.test").is_none());
    assert!(a.shield.fleet_policy("elsewhere.test").is_none());
    let off =
        r#"{"domains": [{"domain": "shop.test", "httpProxy": {"antiDDoS": {"enabled": false}}}]}"#;
    let snapshot = Arc::new(
        defenra_config::compile(off.as_bytes())
            .expect("compiles")
            .snapshot,
    );
    a.shield.reload(&snapshot, &mut Vec::new());
    assert!(a.shield.fleet_policy("shop.test").is_none(), "switched off");
}
