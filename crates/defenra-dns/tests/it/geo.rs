//! GeoDNS over the wire: each rule of the selection chain, chosen by a generated MaxMind
//! database and the client subnet (or the packet's source), and origin addresses never
//! leaking for proxied names.

use std::net::IpAddr;
use std::sync::Arc;

use defenra_dns::DnsOptions;
use defenra_geo::{GeoLookup, MaxMindGeo, mmdb_writer::MmdbWriter};
use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};

use crate::support::{TestServer, echoed_subnet, query, render, with_edns};

const GEO_ZONE: &str = r#"{
 "domains":[{"domain":"geo.example","dnsRecords":[
   {"name":"www","type":"A","value":"203.0.113.50","httpProxyEnabled":true},
   {"name":"cdn","type":"CNAME","value":"origin.example.net","httpProxyEnabled":true},
   {"name":"plain","type":"A","value":"203.0.113.60","ttl":300},
   {"name":"@","type":"MX","value":"mail.geo.example","priority":10},
   {"name":"us-edge","type":"A","value":"10.0.0.4","locationCode":"us"}
  ],
  "geoDnsAgentPools":{"jp":[{"ip":"10.0.0.1","weight":1}]},
  "geoDnsMap":{"de":"10.0.0.2","fr":"10.0.0.3, 2001:db8::3","europe":"10.0.0.5","default":"10.0.0.9"},
  "geoDnsFallbackMap":{"it":"10.0.0.6"}
 },
 {"domain":"nodefault.example","dnsRecords":[
   {"name":"www","type":"A","value":"203.0.113.70","httpProxyEnabled":true,"ttl":30}],
  "geoDnsMap":{"de":"10.1.0.2"}}],
 "agents":[{"agentIp":"10.0.0.7","countryCode":"AU"}]
}"#;

/// The test GeoIP database: one /8 per country.
fn geoip() -> Arc<dyn GeoLookup> {
    let mut writer = MmdbWriter::new();
    for (network, country, continent) in [
        ("81.0.0.0", "DE", "EU"),
        ("82.0.0.0", "FR", "EU"),
        ("83.0.0.0", "IT", "EU"),
        ("84.0.0.0", "ES", "EU"),
        ("85.0.0.0", "NZ", "OC"),
        ("86.0.0.0", "JP", "AS"),
        ("87.0.0.0", "US", "NA"),
    ] {
        writer.insert(network.parse().unwrap(), 8, Some(country), Some(continent));
    }
    writer.insert("2a00::".parse().unwrap(), 12, Some("FR"), Some("EU"));
    let dir = std::env::temp_dir().join(format!("defenra-dns-geo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("test.mmdb");
    std::fs::write(&path, writer.to_bytes()).unwrap();
    Arc::new(MaxMindGeo::open(&path).unwrap())
}

async fn geo_server() -> TestServer {
    let options = DnsOptions {
        agent_ip: Some("192.0.2.254".parse().unwrap()),
        ..DnsOptions::default()
    };
    TestServer::start_with(GEO_ZONE, Some(geoip()), options).await
}

fn ecs_query(name: &str, kind: RecordType, client: &str) -> Message {
    let prefix = if client.contains(':') { 56 } else { 24 };
    with_edns(query(name, kind), 1232, Some((client, prefix)))
}

fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .map(|record| match &record.data {
            RData::A(a) => a.to_string(),
            RData::AAAA(aaaa) => aaaa.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

async fn answer_for(server: &TestServer, name: &str, client: &str) -> Vec<String> {
    addresses(&server.udp(&ecs_query(name, RecordType::A, client)).await)
}

#[tokio::test]
async fn each_rule_of_the_chain_answers_in_turn() {
    let server = geo_server().await;
    let name = "www.geo.example.";
    assert_eq!(
        answer_for(&server, name, "86.1.2.0").await,
        ["10.0.0.1"],
        "pool (jp)"
    );
    assert_eq!(
        answer_for(&server, name, "81.1.2.0").await,
        ["10.0.0.2"],
        "map (de)"
    );
    assert_eq!(
        answer_for(&server, name, "87.1.2.0").await,
        ["10.0.0.4"],
        "locationCode (us)"
    );
    assert_eq!(
        answer_for(&server, name, "83.1.2.0").await,
        ["10.0.0.6"],
        "fallback (it)"
    );
    assert_eq!(
        answer_for(&server, name, "84.1.2.0").await,
        ["10.0.0.5"],
        "continent (es)"
    );
    assert_eq!(
        answer_for(&server, name, "85.1.2.0").await,
        ["10.0.0.7"],
        "nearest agent (nz)"
    );
    assert_eq!(
        answer_for(&server, name, "192.0.2.0").await,
        ["10.0.0.9"],
        "default"
    );
    // No default key: the agent's own address.
    assert_eq!(
        answer_for(&server, "www.nodefault.example.", "192.0.2.0").await,
        ["192.0.2.254"]
    );
    assert_eq!(
        answer_for(&server, "www.nodefault.example.", "81.1.2.0").await,
        ["10.1.0.2"]
    );
}

#[tokio::test]
async fn the_packet_source_is_used_without_ecs_and_a_slash_zero_ecs() {
    let server = geo_server().await;
    // 127.0.0.1 is in no database network: `default`.
    let plain = server.udp(&query("www.geo.example.", RecordType::A)).await;
    assert_eq!(addresses(&plain), ["10.0.0.9"]);
    let zero = server
        .udp(&with_edns(
            query("www.geo.example.", RecordType::A),
            1232,
            Some(("0.0.0.0", 0)),
        ))
        .await;
    assert_eq!(addresses(&zero), ["10.0.0.9"]);
}

#[tokio::test]
async fn geo_answers_echo_ecs_with_a_scope_and_use_ttl_60() {
    let server = geo_server().await;
    let response = server
        .udp(&ecs_query("www.geo.example.", RecordType::A, "81.1.2.0"))
        .await;
    assert_eq!(
        echoed_subnet(&response),
        Some(("81.1.2.0".parse::<IpAddr>().unwrap(), 24, 24))
    );
    assert_eq!(
        render(&response),
        "NOERROR aa | answer: www.geo.example. 60 A 10.0.0.2"
    );
    // A record that sets its own TTL keeps it.
    let own_ttl = server
        .udp(&ecs_query(
            "www.nodefault.example.",
            RecordType::A,
            "81.1.2.0",
        ))
        .await;
    assert_eq!(own_ttl.answers[0].ttl, 30);
    assert!(server.service.stats().geo_answers() >= 2);
}

#[tokio::test]
async fn aaaa_uses_the_ipv6_chain_and_v6_clients_are_located() {
    let server = geo_server().await;
    let french = server
        .udp(&ecs_query("www.geo.example.", RecordType::AAAA, "2a00:1::"))
        .await;
    assert_eq!(addresses(&french), ["2001:db8::3"]);
    // A German client: Germany has no IPv6 entry, the nearest one is France's.
    let german = server
        .udp(&ecs_query("www.geo.example.", RecordType::AAAA, "81.1.2.0"))
        .await;
    assert_eq!(addresses(&german), ["2001:db8::3"]);
    // An IPv6 client asking for A gets France's IPv4 address.
    assert_eq!(
        answer_for(&server, "www.geo.example.", "2a00:1::").await,
        ["10.0.0.3"]
    );
}

#[tokio::test]
async fn proxied_names_never_reveal_the_origin() {
    let server = geo_server().await;
    for kind in [
        RecordType::A,
        RecordType::AAAA,
        RecordType::CNAME,
        RecordType::ANY,
    ] {
        for name in ["www.geo.example.", "cdn.geo.example."] {
            let rendered = render(&server.udp(&ecs_query(name, kind, "81.1.2.0")).await);
            assert!(
                !rendered.contains("203.0.113.50") && !rendered.contains("origin.example.net"),
                "{name} {kind}: {rendered}"
            );
        }
    }
    // The proxied CNAME is flattened into agent addresses.
    assert_eq!(
        answer_for(&server, "cdn.geo.example.", "82.1.2.0").await,
        ["10.0.0.3"]
    );
    // Not proxied: the record itself.
    assert_eq!(
        answer_for(&server, "plain.geo.example.", "81.1.2.0").await,
        ["203.0.113.60"]
    );
}

#[tokio::test]
async fn the_apex_of_a_geo_domain_answers_with_agents_and_keeps_other_types() {
    let server = geo_server().await;
    assert_eq!(
        answer_for(&server, "geo.example.", "81.1.2.0").await,
        ["10.0.0.2"]
    );
    let mx = server.udp(&query("geo.example.", RecordType::MX)).await;
    assert_eq!(mx.answers.len(), 1);
}

#[tokio::test]
async fn any_at_a_proxied_name_is_one_family_over_udp_and_both_over_tcp() {
    let server = geo_server().await;
    // A French client: the map holds both an IPv4 and an IPv6 address for France.
    let udp = server
        .udp(&ecs_query("www.geo.example.", RecordType::ANY, "82.1.2.0"))
        .await;
    assert_eq!(addresses(&udp), ["10.0.0.3"]);
    let tcp = server
        .tcp(&ecs_query("www.geo.example.", RecordType::ANY, "82.1.2.0"))
        .await;
    assert_eq!(addresses(&tcp), ["10.0.0.3", "2001:db8::3"]);
    assert!(!render(&tcp).contains("203.0.113.50"), "no origin");
    // The apex also has its MX.
    let apex = server
        .tcp(&ecs_query("geo.example.", RecordType::ANY, "82.1.2.0"))
        .await;
    let kinds: Vec<RecordType> = apex.answers.iter().map(|r| r.record_type()).collect();
    assert!(kinds.contains(&RecordType::MX), "{kinds:?}");
    assert!(kinds.contains(&RecordType::A), "{kinds:?}");
}

#[tokio::test]
async fn without_a_geoip_database_answers_come_from_default() {
    let options = DnsOptions {
        agent_ip: Some("192.0.2.254".parse().unwrap()),
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(GEO_ZONE, None, options).await;
    assert_eq!(
        answer_for(&server, "www.geo.example.", "81.1.2.0").await,
        ["10.0.0.9"]
    );
    assert_eq!(
        answer_for(&server, "www.nodefault.example.", "81.1.2.0").await,
        ["192.0.2.254"]
    );
}

#[tokio::test]
async fn a_weighted_pool_answers_each_client_subnet_with_one_agent() {
    let zone = r#"{"domains":[{"domain":"pool.example","dnsRecords":[
        {"name":"www","type":"A","value":"203.0.113.80","httpProxyEnabled":true}],
        "geoDnsAgentPools":{"jp":[{"ip":"10.2.0.1","weight":1},{"ip":"10.2.0.2","weight":1},
                                  {"ip":"10.2.0.3","weight":5,"loadScore":97}]}}]}"#;
    let server = TestServer::start_with(zone, Some(geoip()), DnsOptions::default()).await;
    let mut seen = std::collections::BTreeSet::new();
    for subnet in 0..40 {
        let client = format!("86.{subnet}.7.0");
        let first = answer_for(&server, "www.pool.example.", &client).await;
        assert_eq!(first.len(), 1, "{first:?}");
        for _ in 0..5 {
            assert_eq!(
                answer_for(&server, "www.pool.example.", &client).await,
                first,
                "{client}/24 keeps its agent"
            );
        }
        seen.insert(first[0].clone());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["10.2.0.1", "10.2.0.2"],
        "both members serve some subnets; the overloaded one none"
    );
}
