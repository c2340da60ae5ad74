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
    let actual = match plan.choose(want_v4, at, 0) {
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

#[test]
fn pool_choice_follows_weights_and_skips_overloaded_members() {
    let settings = GeoSettings {
        pools: [(
            "us".to_owned(),
            vec![
                member("10.4.0.1", 3.0, Some(10.0)),
                member("10.4.0.2", 1.0, None),
                member("10.4.0.3", 100.0, Some(99.0)),
            ],
        )]
        .into_iter()
        .collect(),
        ..GeoSettings::default()
    };
    let plan = GeoPlan::compile(&settings, &[], None);
    let mut counts = BTreeMap::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..4000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let selection = plan.choose(true, place(Some("us"), None), state).unwrap();
        assert_eq!(selection.rule, Rule::Pool);
        *counts
            .entry(selection.addresses[0].to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("10.4.0.3"), None, "overloaded member chosen");
    let first = counts["10.4.0.1"];
    let second = counts["10.4.0.2"];
    assert!((2700..3300).contains(&first), "{counts:?}");
    assert_eq!(first + second, 4000);
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
