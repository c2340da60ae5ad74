//! Tests for the GeoDNS selection chain, one per rule and per interaction between rules.

use std::collections::BTreeMap;
use std::net::IpAddr;

use defenra_config::{Agent, GeoSettings, PoolAgent};

use super::*;

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpAddr>> {
    entries
        .iter()
        .map(|(key, list)| ((*key).to_owned(), ips(list)))
        .collect()
}

fn member(ip: &str, weight: f64, load_score: Option<f64>) -> PoolAgent {
    PoolAgent {
        ip: ip.parse().unwrap(),
        weight,
        load_score,
        agent_id: None,
    }
}

fn agent(ip: &str, country: &str, load_score: Option<f64>) -> Agent {
    Agent {
        id: None,
        name: None,
        ip: ip.parse().unwrap(),
        country: Some(country.to_owned()),
        load_score,
    }
}

fn place(country: Option<&str>, continent: Option<Continent>) -> Option<Place> {
    Some(Place {
        country: country.and_then(CountryCode::parse),
        continent,
    })
}

/// Chooses an IPv4 answer and renders it as `rule: ip,ip`.
fn check(plan: &GeoPlan, at: Option<Place>, expected: &str) {
    check_family(plan, true, at, expected);
}

fn check_family(plan: &GeoPlan, want_v4: bool, at: Option<Place>, expected: &str) {
    let client: IpAddr = if want_v4 { "192.0.2.1" } else { "2001:db8::1" }
        .parse()
        .unwrap();
    let actual = match plan.choose(want_v4, at, client) {
        None => "none".to_owned(),
        Some(selection) => format!(
            "{}: {}",
            selection.rule.as_str(),
            selection
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    assert_eq!(actual, expected, "at {at:?}");
}

fn full_settings() -> GeoSettings {
    GeoSettings {
        pools: [("de".to_owned(), vec![member("10.0.0.1", 1.0, None)])]
            .into_iter()
            .collect(),
        map: map(&[
            ("de", &["10.0.0.2"]),
            ("fr", &["10.0.0.3", "2001:db8::3"]),
            ("europe", &["10.0.0.5"]),
            ("default", &["10.0.0.9"]),
        ]),
        fallback: map(&[("fr", &["10.0.0.4"]), ("it", &["10.0.0.6"])]),
        locations: Vec::new(),
    }
}

#[test]
fn pool_wins_over_map_for_its_country() {
    let plan = GeoPlan::compile(&full_settings(), &[], None);
    check(&plan, place(Some("de"), None), "pool: 10.0.0.1");
}

#[test]
fn map_wins_over_fallback() {
    let plan = GeoPlan::compile(&full_settings(), &[], None);
    check(&plan, place(Some("fr"), None), "map: 10.0.0.3");
}

#[test]
fn fallback_map_is_used_when_the_map_has_no_entry() {
    let plan = GeoPlan::compile(&full_settings(), &[], None);
    check(&plan, place(Some("it"), None), "fallback: 10.0.0.6");
}

#[test]
fn continent_key_comes_after_country_keys() {
    let plan = GeoPlan::compile(&full_settings(), &[], None);
    check(
        &plan,
        place(Some("es"), Some(Continent::Europe)),
        "continent: 10.0.0.5",
    );
    check(
        &plan,
        place(None, Some(Continent::Europe)),
        "continent: 10.0.0.5",
    );
}

#[test]
fn continent_aliases_eu_and_oc_work_but_af_stays_afghanistan() {
    let settings = GeoSettings {
        map: map(&[
            ("eu", &["10.1.0.1"]),
            ("oc", &["10.1.0.2"]),
            ("af", &["10.1.0.3"]),
            ("north-america", &["10.1.0.4"]),
        ]),
        ..GeoSettings::default()
    };
    let plan = GeoPlan::compile(&settings, &[], None);
    check(
        &plan,
        place(None, Some(Continent::Europe)),
        "continent: 10.1.0.1",
    );
    check(
        &plan,
        place(None, Some(Continent::Oceania)),
        "continent: 10.1.0.2",
    );
    check(
        &plan,
        place(Some("af"), Some(Continent::Asia)),
        "map: 10.1.0.3",
    );
    check(
        &plan,
        place(None, Some(Continent::NorthAmerica)),
        "continent: 10.1.0.4",
    );
    // Africa has no key: a client with only a continent falls to nothing.
    check(&plan, place(None, Some(Continent::Africa)), "none");
}

#[test]
fn nearest_country_key_by_centroid_distance() {
    let settings = GeoSettings {
        map: map(&[
            ("us", &["10.2.0.1"]),
            ("de", &["10.2.0.2"]),
            ("jp", &["10.2.0.3"]),
        ]),
        ..GeoSettings::default()
    };
    let plan = GeoPlan::compile(&settings, &[], None);
    check(
        &plan,
        place(Some("pl"), Some(Continent::Europe)),
        "nearest: 10.2.0.2",
    );
    check(&plan, place(Some("mx"), None), "nearest: 10.2.0.1");
    check(&plan, place(Some("kr"), None), "nearest: 10.2.0.3");
}

#[test]
fn agents_list_is_a_nearest_candidate_and_overloaded_agents_are_skipped() {
    let agents = [
        agent("10.3.0.1", "us", None),
        agent("10.3.0.2", "sg", Some(95.0)),
        agent("10.3.0.3", "au", Some(10.0)),
        agent("2001:db8::33", "de", None),
    ];
    let plan = GeoPlan::compile(&GeoSettings::default(), &agents, None);
    // Singapore's agent is overloaded, so a Malaysian client goes to Australia.
    check(&plan, place(Some("my"), None), "nearest: 10.3.0.3");
    check(&plan, place(Some("ca"), None), "nearest: 10.3.0.1");
    check_family(
        &plan,
        false,
        place(Some("ca"), None),
        "nearest: 2001:db8::33",
    );
}

#[test]
fn default_key_then_agent_ip_are_the_last_resorts() {
    let plan = GeoPlan::compile(&full_settings(), &[], Some("192.0.2.7".parse().unwrap()));
    // No location at all (no GeoIP database): straight to `default`.
    check(&plan, None, "default: 10.0.0.9");
    let settings = GeoSettings {
        map: map(&[("de", &["10.0.0.2"])]),
        ..GeoSettings::default()
    };
    let plan = GeoPlan::compile(&settings, &[], Some("192.0.2.7".parse().unwrap()));
    check(&plan, None, "agent_ip: 192.0.2.7");
    // An unknown country with no centroid and no continent key also ends at the agent IP.
    check(&plan, place(Some("zz"), None), "agent_ip: 192.0.2.7");
    let plan = GeoPlan::compile(&settings, &[], None);
    check(&plan, None, "none");
}

#[test]
fn each_family_has_its_own_chain() {
    let plan = GeoPlan::compile(&full_settings(), &[], Some("2001:db8::99".parse().unwrap()));
    check_family(&plan, false, place(Some("fr"), None), "map: 2001:db8::3");
    // Germany's pool and map are IPv4 only; the nearest IPv6 location is France.
    check_family(
        &plan,
        false,
        place(Some("de"), None),
        "nearest: 2001:db8::3",
    );
    check_family(&plan, false, None, "agent_ip: 2001:db8::99");
    assert!(plan.has_family(false));
    let v4_only = GeoPlan::compile(&full_settings(), &[], None);
    check_family(&v4_only, false, None, "none");
}

fn pool_plan(members: Vec<PoolAgent>) -> GeoPlan {
    let settings = GeoSettings {
        pools: [("us".to_owned(), members)].into_iter().collect(),
        ..GeoSettings::default()
    };
    GeoPlan::compile(&settings, &[], None)
}

/// The member chosen for the client at `ip` in the US.
fn chosen(plan: &GeoPlan, ip: IpAddr) -> String {
    let selection = plan
        .choose(ip.is_ipv4(), place(Some("us"), None), ip)
        .unwrap();
    assert_eq!(selection.rule, Rule::Pool);
    selection.addresses[0].to_string()
}

/// One address in each of `n` different /24s.
fn subnets(n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|index| IpAddr::from((0x0b00_0000 + (index << 8) + 7).to_be_bytes()))
        .collect()
}

#[test]
fn pool_choice_follows_weights_and_skips_overloaded_members() {
    let plan = pool_plan(vec![
        member("10.4.0.1", 3.0, Some(10.0)),
        member("10.4.0.2", 1.0, None),
        member("10.4.0.3", 100.0, Some(99.0)),
    ]);
    let mut counts = BTreeMap::new();
    for client in subnets(4000) {
        *counts.entry(chosen(&plan, client)).or_insert(0) += 1;
    }
    assert_eq!(counts.get("10.4.0.3"), None, "overloaded member chosen");
    let first = counts["10.4.0.1"];
    let second = counts["10.4.0.2"];
    assert!((2800..3200).contains(&first), "{counts:?}");
    assert_eq!(first + second, 4000);
}

#[test]
fn extreme_weights_still_split_clients_by_weight() {
    // Issue 17 finding 12: two weights of 1.7e308 scored infinity for most clients, and
    // the first such member took them all.
    let plan = pool_plan(vec![
        member("10.4.0.1", 5e-324, None),
        member("10.4.0.2", 1.7e308, None),
        member("10.4.0.3", 1.7e308, None),
    ]);
    let mut counts = BTreeMap::new();
    for client in subnets(4000) {
        *counts.entry(chosen(&plan, client)).or_insert(0) += 1;
    }
    assert_eq!(counts.get("10.4.0.1"), None, "{counts:?}");
    assert!((1800..2200).contains(&counts["10.4.0.2"]), "{counts:?}");
    assert!((1800..2200).contains(&counts["10.4.0.3"]), "{counts:?}");
}

#[test]
fn a_client_subnet_keeps_its_agent() {
    let members = || {
        vec![
            member("10.4.0.1", 1.0, None),
            member("10.4.0.2", 1.0, None),
            member("10.4.0.3", 1.0, None),
            member("2001:db8:4::1", 1.0, None),
            member("2001:db8:4::2", 1.0, None),
        ]
    };
    let plan = pool_plan(members());
    let again = pool_plan(members());
    let mut seen = std::collections::BTreeSet::new();
    for base in subnets(300) {
        let IpAddr::V4(v4) = base else { unreachable!() };
        let octets = v4.octets();
        let first = chosen(&plan, base);
        for last in [0u8, 1, 99, 255] {
            let neighbour = IpAddr::from([octets[0], octets[1], octets[2], last]);
            assert_eq!(chosen(&plan, neighbour), first, "{neighbour} in {base}/24");
            // An A query from the IPv4-mapped form of the address is the same client.
            let mapped =
                IpAddr::V6(std::net::Ipv4Addr::from(neighbour_bits(neighbour)).to_ipv6_mapped());
            let selection = plan.choose(true, place(Some("us"), None), mapped).unwrap();
            assert_eq!(
                selection.addresses[0].to_string(),
                first,
                "IPv4-mapped {mapped}"
            );
        }
        assert_eq!(chosen(&again, base), first, "the same after a recompile");
        seen.insert(first);
    }
    assert_eq!(
        seen.len(),
        3,
        "different subnets spread over the members: {seen:?}"
    );
    // IPv6: one /56 is one client.
    for network in 0..50u16 {
        let base = format!("2001:db8:{network:x}:ab00::1");
        let first = chosen(&plan, base.parse().unwrap());
        for other in ["2001:db8:{n}:abff:ffff::9", "2001:db8:{n}:ab12::1"] {
            let other = other.replace("{n}", &format!("{network:x}"));
            assert_eq!(chosen(&plan, other.parse().unwrap()), first, "{other}");
        }
    }
}

fn neighbour_bits(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(_) => unreachable!(),
    }
}

#[test]
fn adding_or_removing_one_agent_moves_only_that_agents_share() {
    let a = || member("10.4.0.1", 1.0, None);
    let b = || member("10.4.0.2", 2.0, None);
    let c = || member("10.4.0.3", 1.0, None);
    let clients = subnets(5000);
    let before = pool_plan(vec![a(), b(), c()]);
    let choices: Vec<String> = clients.iter().map(|ip| chosen(&before, *ip)).collect();

    // Adding D (weight 1 of 5): every client that moves, moves to D, and D gets about 1/5.
    let added = pool_plan(vec![a(), b(), c(), member("10.4.0.4", 1.0, None)]);
    let mut moved = 0;
    for (ip, old) in clients.iter().zip(&choices) {
        let new = chosen(&added, *ip);
        if &new != old {
            assert_eq!(new, "10.4.0.4", "{ip} moved from {old} to {new}");
            moved += 1;
        }
    }
    assert!((800..1200).contains(&moved), "D took {moved} of 5000");

    // Removing B (or B going over the load threshold): only B's clients move.
    for without_b in [
        pool_plan(vec![a(), c()]),
        pool_plan(vec![a(), member("10.4.0.2", 2.0, Some(95.0)), c()]),
    ] {
        for (ip, old) in clients.iter().zip(&choices) {
            let new = chosen(&without_b, *ip);
            if old != "10.4.0.2" {
                assert_eq!(&new, old, "{ip} moved although its agent stayed");
            } else {
                assert_ne!(new, "10.4.0.2");
            }
        }
    }
}

#[test]
fn a_pool_whose_members_are_all_overloaded_falls_through_to_the_map() {
    let settings = GeoSettings {
        pools: [("us".to_owned(), vec![member("10.5.0.1", 1.0, Some(90.0))])]
            .into_iter()
            .collect(),
        map: map(&[("us", &["10.5.0.2"])]),
        ..GeoSettings::default()
    };
    let plan = GeoPlan::compile(&settings, &[], None);
    check(&plan, place(Some("us"), None), "map: 10.5.0.2");
}

#[test]
fn unknown_keys_are_reported() {
    let settings = GeoSettings {
        map: map(&[("us-east-1", &["10.6.0.1"]), ("us", &["10.6.0.2"])]),
        ..GeoSettings::default()
    };
    assert_eq!(
        GeoPlan::ignored_keys(&settings),
        vec!["us-east-1".to_owned()]
    );
}
