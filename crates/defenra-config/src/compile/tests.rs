use super::*;
use crate::Rejected;

/// A real-Core-shaped response, including fields the agent does not use.
const CORE_RESPONSE: &str = r#"{
  "success": true, "message": "ok", "timestamp": "2026-11-25T01:00:00Z",
  "agent": {"id": "a1", "name": "edge-1"}, "stats": {"domains": 1}, "nextPollInterval": 30,
  "domains": [ { "id": "d1", "domain": "Example.COM.", "description": "",
      "dnsRecords": [
        {"id":"r1", "name":"@", "type":"A", "value":"203.0.113.10", "ttl":300, "priority":null, "httpProxyEnabled":true},
        {"name":"www", "type":"CNAME", "value":"example.com.", "ttl":120},
        {"name":"mail.example.com", "type":"MX", "value":"mx.example.net", "priority": 5},
        {"name":"", "type":"TXT", "value":"v=spf1 -all"},
        {"name":"_sip._tcp", "type":"SRV", "value":"5 5060 sip.example.com", "priority": 10},
        {"name":"@", "type":"CAA", "value":"0 issue \"letsencrypt.org\""},
        {"name":"*", "type":"AAAA", "value":"2001:db8::1"},
        {"name":"europe", "type":"A", "value":"198.51.100.7", "ttl":60, "locationCode":"europe",
         "isFallback":false, "distanceKm":null, "isLastResort":false, "description":"EU edge"}
      ],
      "geoDnsLocations": [ {"code":"europe","name":"Europe","type":"continent","subdomain":"europe"} ],
      "geoDnsMap": {"us":"192.0.2.1","europe":"198.51.100.7","default":"192.0.2.9"},
      "geoDnsFallbackMap": {"cz":"198.51.100.7"},
      "geoDnsAgentPools": {"us":[{"ip":"192.0.2.1","weight":10,"loadScore":20.5,"agentId":"x","agentName":"y"}]},
      "httpProxy": {"type":"https", "enabled":true, "antiDDoS":null},
      "ssl": {"enabled":false, "certificate":"", "privateKey":"", "autoRenew":false,
              "encryptionMode":"full_strict", "httpRedirectToHttps":true,
              "acmeHttpChallenge": {"token":"tok-EN_1","keyAuthorization":"tok-EN_1.thumb"}},
      "luaCode": "if ngx.var.remote_addr == '1.2.3.4' then ngx.exit(403) end",
      "someFutureField": {"nested": true} } ],
  "proxies": [ {"id":"p1","name":"game","type":"tcp","sourcePort":9000,"destinationHost":"10.0.0.5","destinationPort":9001,"enabled":true,"proxyProtocol":true},
               {"id":"p2","name":"off","type":"udp","sourcePort":9001,"destinationHost":"10.0.0.5","destinationPort":9001,"enabled":false} ],
  "agents": [ {"agentId":"a1","agentName":"edge-1","agentIp":"192.0.2.1","countryCode":"US","city":"NYC","loadScore":10.0} ]
}"#;

/// Compiles a document that must not be rejected.
fn check(doc: &str) -> Compiled {
    compile(doc.as_bytes()).unwrap_or_else(|rejected| panic!("rejected: {rejected}"))
}

/// The issues of a document with one domain `example.com` holding `records`.
fn record_issues(records: &str) -> Vec<String> {
    let doc = format!(r#"{{"domains":[{{"domain":"example.com","dnsRecords":[{records}]}}]}}"#);
    check(&doc).issues.iter().map(ToString::to_string).collect()
}

#[test]
fn real_core_response_compiles_completely() {
    let compiled = check(CORE_RESPONSE);
    assert_eq!(compiled.issues, vec![], "no issues expected");
    assert_eq!(compiled.next_poll_interval, Some(Duration::from_secs(30)));
    let snapshot = &compiled.snapshot;
    let domain = snapshot
        .domain("example.com")
        .expect("domain normalised to example.com");
    let names: Vec<_> = domain
        .records
        .iter()
        .map(|record| (&*record.name, record.record_type()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("example.com", RecordType::A),
            ("www.example.com", RecordType::Cname),
            ("mail.example.com", RecordType::Mx),
            ("example.com", RecordType::Txt),
            ("_sip._tcp.example.com", RecordType::Srv),
            ("example.com", RecordType::Caa),
            ("*.example.com", RecordType::Aaaa),
        ]
    );
    assert!(domain.records[0].http_proxy);
    assert_eq!(
        domain.records[1].data,
        RecordData::Cname("example.com".into())
    );
    assert_eq!(
        domain.records[2].data,
        RecordData::Mx {
            preference: 5,
            exchange: "mx.example.net".into()
        }
    );
    assert_eq!(
        domain.records[4].data,
        RecordData::Srv {
            priority: 10,
            weight: 5,
            port: 5060,
            target: "sip.example.com".into()
        }
    );
    assert_eq!(
        domain.records[5].data,
        RecordData::Caa(Box::new(Caa {
            flags: 0,
            tag: "issue".into(),
            value: "letsencrypt.org".into()
        }))
    );
    assert_eq!(domain.records[2].ttl, DEFAULT_TTL);
    // The location record became a GeoDNS entry next to the map's own.
    let europe: Vec<IpAddr> = vec![
        "198.51.100.7".parse().unwrap(),
        "198.51.100.7".parse().unwrap(),
    ];
    let geo = domain.geo.as_deref().expect("the domain has GeoDNS data");
    assert_eq!(geo.map["europe"], europe);
    assert_eq!(
        geo.map["default"],
        vec!["192.0.2.9".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        geo.fallback["cz"],
        vec!["198.51.100.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(geo.pools["us"][0].weight, 10.0);
    assert_eq!(geo.locations[0].code, "europe");
    assert!(domain.has_geo());
    assert_eq!(
        domain.http_proxy,
        HttpProxy {
            enabled: true,
            listeners: ProxyListeners::Https
        }
    );
    assert_eq!(domain.encryption_mode, EncryptionMode::FullStrict);
    assert!(domain.redirect_to_https);
    assert!(domain.tls.is_none());
    assert_eq!(
        domain.acme_challenge.as_ref().unwrap().key_authorization,
        "tok-EN_1.thumb"
    );
    assert!(
        domain
            .lua_code
            .as_deref()
            .unwrap()
            .contains("ngx.exit(403)")
    );
    // The disabled proxy is left out without complaint.
    assert_eq!(snapshot.proxies.len(), 1);
    assert_eq!(snapshot.proxies[0].protocol, L4Protocol::Tcp);
    assert!(snapshot.proxies[0].proxy_protocol);
    assert_eq!(snapshot.agents[0].country.as_deref(), Some("us"));
}

#[test]
fn wire_types_round_trip_through_json() {
    let response: wire::PollResponse = serde_json::from_str(CORE_RESPONSE).unwrap();
    let again: wire::PollResponse =
        serde_json::from_str(&serde_json::to_string(&response).unwrap()).unwrap();
    let first = compile_response(&response);
    let second = compile_response(&again);
    assert_eq!(first.fingerprint, second.fingerprint);
    assert_eq!(
        first.snapshot.domains[0].records,
        second.snapshot.domains[0].records
    );
}

#[test]
fn a_new_timestamp_keeps_the_fingerprint_but_new_content_changes_it() {
    let first = check(CORE_RESPONSE).fingerprint;
    let later =
        check(&CORE_RESPONSE.replace("2026-11-25T01:00:00Z", "2026-11-25T01:01:00Z")).fingerprint;
    let changed = check(&CORE_RESPONSE.replace("203.0.113.10", "203.0.113.11")).fingerprint;
    assert_eq!(first, later);
    assert_ne!(first, changed);
}

#[test]
fn whole_documents_are_rejected_only_when_unusable() {
    assert!(matches!(compile(b"not json"), Err(Rejected::NotJson(_))));
    assert!(matches!(compile(b"[1,2]"), Err(Rejected::NotObject)));
    assert!(
        matches!(compile(br#"{"success":false,"message":"bad key"}"#), Err(Rejected::Refused(m)) if m == "bad key")
    );
    assert!(matches!(
        compile(br#"{"domains":"nope"}"#),
        Err(Rejected::Schema(_))
    ));
    let empty = check(r#"{"domains":null,"proxies":null}"#);
    assert!(empty.snapshot.domains.is_empty() && empty.issues.is_empty());
}

#[test]
fn bad_records_are_skipped_with_their_json_path() {
    let issues = record_issues(
        r#"{"name":"a","type":"A","value":"1.2.3"},
           {"name":"b","type":"AAAA","value":"1.2.3.4"},
           {"name":"c","type":"PTR","value":"x"},
           {"name":"d","type":"A","value":"1.2.3.4","ttl":-5},
           {"name":"e","type":"A","value":"1.2.3.4","ttl":"soon"},
           {"name":"f g","type":"A","value":"1.2.3.4"},
           {"name":"other.org.","type":"A","value":"1.2.3.4"},
           {"name":"h","type":"MX","value":"mx.example.com","priority":70000},
           {"name":"i","type":"SRV","value":"5060 sip"},
           {"name":"j","type":"CAA","value":"0 issue"},
           {"name":"k","type":"A","value":"9.9.9.9"}"#,
    );
    let expected_prefixes = [
        "domains[0].dnsRecords[0].value: \"1.2.3\" is not an IPv4 address",
        "domains[0].dnsRecords[1].value: \"1.2.3.4\" is not an IPv6 address",
        "domains[0].dnsRecords[2].type: \"PTR\" is not a supported record type",
        "domains[0].dnsRecords[3].ttl: -5 is not a TTL",
        "domains[0].dnsRecords[4]: record skipped: invalid type: string \"soon\"",
        "domains[0].dnsRecords[5].name: \"f g\" is not a valid name",
        "domains[0].dnsRecords[6].name: \"other.org.\" is outside the zone",
        "domains[0].dnsRecords[7].priority: 70000 is not between 0 and 65535",
        "domains[0].dnsRecords[8].value:",
        "domains[0].dnsRecords[9].value: \"0 issue\" is not `flags tag",
    ];
    assert_eq!(issues.len(), expected_prefixes.len(), "{issues:#?}");
    for (issue, prefix) in issues.iter().zip(expected_prefixes) {
        assert!(
            issue.starts_with(prefix),
            "{issue:?} should start with {prefix:?}"
        );
    }
    // The good record beside them still loads.
    let doc = r#"{"domains":[{"domain":"example.com","dnsRecords":[{"name":"a","type":"A","value":"1.2.3"},{"name":"k","type":"A","value":"9.9.9.9"}]}]}"#;
    assert_eq!(check(doc).snapshot.domains[0].records.len(), 1);
}

#[test]
fn record_names_and_targets_are_normalised() {
    let doc = r#"{"domains":[{"domain":"example.com","dnsRecords":[
        {"name":"WWW","type":"CNAME","value":"Target.Example.NET."},
        {"name":"deep.sub","type":"NS","value":"ns1.example.net"},
        {"name":"Api.Example.com.","type":"TXT","value":"\"quoted\""},
        {"name":"@","type":"SRV","value":"1 2 3 target.example.com."},
        {"name":"_dmarc","type":"TXT","value":"v=DMARC1"}]}]}"#;
    let compiled = check(doc);
    assert_eq!(compiled.issues, vec![]);
    let records = &compiled.snapshot.domains[0].records;
    assert_eq!(&*records[0].name, "www.example.com");
    assert_eq!(
        records[0].data,
        RecordData::Cname("target.example.net".into())
    );
    assert_eq!(&*records[1].name, "deep.sub.example.com");
    assert_eq!(&*records[2].name, "api.example.com");
    assert_eq!(records[2].data, RecordData::Txt("quoted".into()));
    assert_eq!(
        records[3].data,
        RecordData::Srv {
            priority: 1,
            weight: 2,
            port: 3,
            target: "target.example.com".into()
        }
    );
    assert_eq!(&*records[4].name, "_dmarc.example.com");
}

#[test]
fn bad_domains_and_duplicates_are_skipped() {
    let doc = r#"{"domains":[
        {"domain":"good.com"}, {"domain":""}, {"domain":"bad domain.com"}, {"domain":"GOOD.com"},
        {"domain":"x.com","dnsRecords":"oops"}]}"#;
    let compiled = check(doc);
    let names: Vec<_> = compiled
        .snapshot
        .domains
        .iter()
        .map(|domain| domain.name.as_str())
        .collect();
    assert_eq!(names, vec!["good.com"]);
    let paths: Vec<_> = compiled
        .issues
        .iter()
        .map(|issue| issue.path.as_str())
        .collect();
    assert_eq!(
        paths,
        vec![
            "domains[1].domain",
            "domains[2].domain",
            "domains[3].domain",
            "domains[4]"
        ]
    );
}

#[test]
fn bad_proxies_are_skipped_with_their_json_path() {
    let doc = r#"{"proxies":[
        {"type":"tcp","sourcePort":9000,"destinationHost":"10.0.0.5","destinationPort":22},
        {"type":"sctp","sourcePort":9001,"destinationHost":"10.0.0.5","destinationPort":22},
        {"type":"tcp","sourcePort":0,"destinationHost":"10.0.0.5","destinationPort":22},
        {"type":"tcp","sourcePort":9000,"destinationHost":"10.0.0.6","destinationPort":22},
        {"type":"udp","sourcePort":9000,"destinationHost":"backend.internal","destinationPort":53},
        {"type":"tcp","sourcePort":9002,"destinationHost":"","destinationPort":22},
        {"type":"tcp","sourcePort":9003,"destinationHost":"[2001:db8::5]","destinationPort":70000}]}"#;
    let compiled = check(doc);
    let kept: Vec<_> = compiled
        .snapshot
        .proxies
        .iter()
        .map(|proxy| {
            (
                proxy.protocol,
                proxy.listen_port,
                proxy.destination_host.as_str(),
            )
        })
        .collect();
    assert_eq!(
        kept,
        vec![
            (L4Protocol::Tcp, 9000, "10.0.0.5"),
            (L4Protocol::Udp, 9000, "backend.internal")
        ]
    );
    let issues: Vec<_> = compiled.issues.iter().map(ToString::to_string).collect();
    assert!(
        issues[0].starts_with("proxies[1].type: \"sctp\" is not tcp or udp"),
        "{issues:?}"
    );
    assert!(
        issues[1].starts_with("proxies[2].sourcePort: 0 is not a port"),
        "{issues:?}"
    );
    assert!(
        issues[2].starts_with("proxies[3].sourcePort: tcp port 9000 is already used by proxies[0]"),
        "{issues:?}"
    );
    assert!(
        issues[3].starts_with("proxies[5].destinationHost"),
        "{issues:?}"
    );
    assert!(
        issues[4].starts_with("proxies[6].destinationPort: 70000"),
        "{issues:?}"
    );
    assert_eq!(issues.len(), 5);
}

#[test]
fn forwards_to_the_agents_own_forwards_are_loops_and_skipped() {
    let doc = r#"{"agents":[{"agentId":"a1","agentIp":"198.51.100.9"}],
      "proxies":[
        {"type":"tcp","sourcePort":9000,"destinationHost":"127.0.0.1","destinationPort":9000},
        {"type":"tcp","sourcePort":9001,"destinationHost":"localhost","destinationPort":9000},
        {"type":"tcp","sourcePort":9002,"destinationHost":"198.51.100.9","destinationPort":9001},
        {"type":"udp","sourcePort":9003,"destinationHost":"0.0.0.0","destinationPort":9003},
        {"type":"tcp","sourcePort":9004,"destinationHost":"127.0.0.1","destinationPort":9003},
        {"type":"tcp","sourcePort":9005,"destinationHost":"10.0.0.5","destinationPort":9000}]}"#;
    let compiled = check(doc);
    let kept: Vec<u16> = compiled
        .snapshot
        .proxies
        .iter()
        .map(|proxy| proxy.listen_port)
        .collect();
    // 9004 reaches UDP 9003 over TCP (nothing listens there: not a loop); 9005 leaves.
    assert_eq!(kept, vec![9004, 9005]);
    let issues: Vec<_> = compiled.issues.iter().map(ToString::to_string).collect();
    for (index, issue) in issues.iter().enumerate() {
        assert!(
            issue.starts_with(&format!("proxies[{index}].destinationHost"))
                && issue.contains("connect to itself"),
            "{issues:?}"
        );
    }
    assert_eq!(issues.len(), 4);
}

#[test]
fn pool_weights_out_of_range_are_clamped_with_an_issue() {
    // Issue 17 finding 12: weights of 1.7e308 and 5e-324 were taken as they came.
    let doc = r#"{"domains":[{"domain":"example.com","dnsRecords":[],
        "geoDnsAgentPools":{"fr":[{"ip":"192.0.2.5","weight":5e-324},
            {"ip":"192.0.2.6","weight":1.7e308},{"ip":"192.0.2.7","weight":25}]}}]}"#;
    let compiled = check(doc);
    let issues: Vec<_> = compiled
        .issues
        .iter()
        .map(|issue| (issue.path.as_str(), issue.message.as_str()))
        .collect();
    assert_eq!(
        issues,
        vec![
            (
                "domains[0].geoDnsAgentPools.fr[0].weight",
                "5e-324 is outside 0.001-1000000; 0.001 used"
            ),
            (
                "domains[0].geoDnsAgentPools.fr[1].weight",
                "1.7e308 is outside 0.001-1000000; 1000000 used"
            ),
        ]
    );
    let geo = compiled.snapshot.domains[0].geo.as_deref().unwrap();
    let weights: Vec<f64> = geo.pools["fr"].iter().map(|member| member.weight).collect();
    assert_eq!(weights, [0.001, 1_000_000.0, 25.0]);
}

#[test]
fn geo_entries_with_bad_addresses_are_reported() {
    let doc = r#"{"domains":[{"domain":"example.com",
        "dnsRecords":[{"name":"asia","type":"A","value":"nope","locationCode":"asia"},
                      {"name":"asia","type":"MX","value":"mx","locationCode":"asia"}],
        "geoDnsMap":{"us":"1.2.3.999","de":"192.0.2.1, 2001:db8::1"},
        "geoDnsAgentPools":{"fr":[{"ip":"192.0.2.5","weight":0},{"ip":"192.0.2.6","weight":-1},{"ip":"x"}]}}]}"#;
    let compiled = check(doc);
    let paths: Vec<_> = compiled
        .issues
        .iter()
        .map(|issue| issue.path.as_str())
        .collect();
    assert_eq!(
        paths,
        vec![
            "domains[0].dnsRecords[0].value",
            "domains[0].dnsRecords[1].type",
            "domains[0].geoDnsMap.us",
            "domains[0].geoDnsAgentPools.fr[1].weight",
            "domains[0].geoDnsAgentPools.fr[2].ip",
        ]
    );
    let geo = compiled.snapshot.domains[0]
        .geo
        .as_deref()
        .expect("the domain has GeoDNS data");
    assert_eq!(geo.map["de"].len(), 2);
    assert!(
        !geo.pools.contains_key("fr"),
        "drained and invalid agents leave no pool"
    );
}

fn self_signed(name: &str) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

fn ssl_doc(certificate: &str, key: &str) -> String {
    serde_json::json!({"domains":[{"domain":"example.com","ssl":{"enabled":true,"certificate":certificate,"privateKey":key}}]})
        .to_string()
}

#[test]
fn certificates_are_parsed_and_checked_against_their_key() {
    let (certificate, key) = self_signed("example.com");
    let compiled = check(&ssl_doc(&certificate, &key));
    assert_eq!(compiled.issues, vec![]);
    assert!(compiled.snapshot.domains[0].tls.is_some());

    let (_, other_key) = self_signed("other.com");
    let mismatch = check(&ssl_doc(&certificate, &other_key));
    assert_eq!(mismatch.issues[0].path, "domains[0].ssl.privateKey");
    assert!(
        mismatch.issues[0].message.contains("does not match"),
        "{:?}",
        mismatch.issues
    );
    assert!(
        mismatch.snapshot.domains[0].tls.is_none(),
        "the domain loads without TLS"
    );

    let garbage = check(&ssl_doc(
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        &key,
    ));
    assert_eq!(garbage.issues[0].path, "domains[0].ssl.certificate");
    let no_pem = check(&ssl_doc("hello", &key));
    assert_eq!(no_pem.issues[0].path, "domains[0].ssl.certificate");
    let bad_key = check(&ssl_doc(
        &certificate,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ));
    assert_eq!(
        bad_key.issues[0].path.as_str(),
        "domains[0].ssl.privateKey",
        "{:?}",
        bad_key.issues
    );
    let missing = check(r#"{"domains":[{"domain":"example.com","ssl":{"enabled":true}}]}"#);
    assert_eq!(missing.issues[0].path, "domains[0].ssl");
}

#[test]
fn unknown_enum_values_fall_back_with_an_issue() {
    let doc = r#"{"domains":[{"domain":"example.com","httpProxy":{"type":"gopher"},"ssl":{"encryptionMode":"paranoid"}}]}"#;
    let compiled = check(doc);
    let domain = &compiled.snapshot.domains[0];
    assert_eq!(domain.http_proxy.listeners, ProxyListeners::Both);
    assert_eq!(domain.encryption_mode, EncryptionMode::Off);
    let paths: Vec<_> = compiled
        .issues
        .iter()
        .map(|issue| issue.path.as_str())
        .collect();
    assert_eq!(
        paths,
        vec!["domains[0].httpProxy.type", "domains[0].ssl.encryptionMode"]
    );
}

#[test]
fn next_poll_interval_is_clamped() {
    let interval =
        |value: &str| check(&format!(r#"{{"nextPollInterval":{value}}}"#)).next_poll_interval;
    assert_eq!(interval("0.2"), Some(Duration::from_secs(1)));
    assert_eq!(interval("99999"), Some(Duration::from_secs(3600)));
    assert_eq!(interval("-3"), None);
    assert_eq!(interval("null"), None);
}

#[test]
fn records_of_one_owner_share_their_name_and_plain_domains_carry_no_geo_data() {
    let doc = r#"{"domains":[{"domain":"example.com","dnsRecords":[
        {"name":"@","type":"A","value":"192.0.2.1"},
        {"name":"www","type":"A","value":"192.0.2.2"},
        {"name":"@","type":"MX","value":"mail.example.com","priority":10},
        {"name":"WWW.example.com.","type":"AAAA","value":"2001:db8::2"}]}]}"#;
    let compiled = check(doc);
    assert_eq!(compiled.issues, vec![]);
    let domain = &compiled.snapshot.domains[0];
    let records = &domain.records;
    assert!(Arc::ptr_eq(&records[0].name, &records[2].name));
    assert!(Arc::ptr_eq(&records[1].name, &records[3].name));
    assert_eq!(&*records[3].name, "www.example.com");
    assert!(domain.geo.is_none());
    assert!(!domain.has_geo());
}

#[test]
fn an_http_proxy_object_proxies_the_domain_unless_it_says_enabled_false() {
    // What the real Core sends for every domain: `httpProxy: {type, antiDDoS}`, no `enabled`.
    let doc = r#"{"domains":[
        {"domain":"core.example","httpProxy":{"type":"both","antiDDoS":null}},
        {"domain":"off.example","httpProxy":{"type":"both","enabled":false}},
        {"domain":"on.example","httpProxy":{"enabled":true}},
        {"domain":"bare.example"}]}"#;
    let compiled = check(doc);
    let enabled: Vec<(&str, bool)> = compiled
        .snapshot
        .domains
        .iter()
        .map(|domain| (domain.name.as_str(), domain.http_proxy.enabled))
        .collect();
    assert_eq!(
        enabled,
        vec![
            ("core.example", true),
            ("off.example", false),
            ("on.example", true),
            ("bare.example", false)
        ]
    );
}
