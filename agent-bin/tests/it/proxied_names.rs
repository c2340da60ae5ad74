//! The proxied-name invariant over Core-shaped documents: every name that DNS answers with
//! an edge agent's address is served by HTTP (never 403 "not proxied" or 404 "unknown host").

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::json;

use crate::e2e_support::{dns_a, http_get, start_origin};
use crate::support::{Agent, eventually, get_json};

/// This agent's own address, the GeoDNS answer of last resort.
const AGENT_IP: &str = "192.0.2.200";

/// Two domains as the real Core's poll route builds them: every domain carries
/// `httpProxy: {type, antiDDoS}` (never `enabled`), its regular records with
/// `httpProxyEnabled`, and the anycast records (`locationCode`, value = an agent's address).
fn core_document() -> serde_json::Value {
    let anycast = |name: &str, ip: &str| {
        json!({"name": name, "type": "A", "value": ip, "ttl": 60, "locationCode": name,
               "isFallback": false, "distance": 0, "distanceKm": null, "isLastResort": false,
               "description": "nearest agent"})
    };
    let ssl = json!({"enabled": false, "certificate": null, "privateKey": null, "autoRenew": false,
                     "acmeHttpChallenge": {"token": "", "keyAuthorization": ""}});
    json!({
        "success": true,
        "message": "Configuration retrieved successfully",
        "agent": {"id": "agent-1", "name": "edge", "pollingInterval": 60},
        "domains": [
            {
                "id": "65f1c0ffee0000000000000a",
                "domain": "geo.test",
                "description": "",
                "dnsRecords": [
                    {"id": "r1", "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": false},
                    {"id": "r2", "name": "www", "type": "A", "value": "127.0.0.1", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": true},
                    {"id": "r3", "name": "mail", "type": "A", "value": "192.0.2.25", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": false},
                    {"id": "r4", "name": "*", "type": "A", "value": "127.0.0.1", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": true},
                    {"id": "r5", "name": "@", "type": "MX", "value": "mail.geo.test", "ttl": 3600,
                     "priority": 10, "httpProxyEnabled": false},
                    anycast("europe", "198.51.100.7"),
                    anycast("us", "192.0.2.1")
                ],
                "geoDnsLocations": [
                    {"code": "europe", "name": "Europe", "type": "continent", "subdomain": "europe"},
                    {"code": "us", "name": "USA", "type": "country", "subdomain": "us"}
                ],
                "httpProxy": {"type": "both", "antiDDoS": null},
                "ssl": ssl,
                "luaCode": null
            },
            {
                "id": "65f1c0ffee0000000000000b",
                "domain": "plain.test",
                "description": "",
                "dnsRecords": [
                    {"id": "r6", "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": false},
                    {"id": "r7", "name": "app", "type": "A", "value": "127.0.0.1", "ttl": 3600,
                     "priority": null, "httpProxyEnabled": true},
                    {"id": "r8", "name": "static", "type": "CNAME", "value": "app.plain.test",
                     "ttl": 3600, "priority": null, "httpProxyEnabled": true}
                ],
                "geoDnsLocations": [],
                "httpProxy": {"type": "both", "antiDDoS": null},
                "ssl": ssl,
                "luaCode": null
            }
        ],
        "proxies": [],
        "nextPollInterval": 60
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_name_dns_sends_to_an_agent_is_refused_by_http() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("core.json");
    std::fs::write(&config, core_document().to_string()).unwrap();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--agent-ip",
        AGENT_IP,
        "--origin-http-port",
        &origin.port().to_string(),
    ]);
    let health = agent.addr("health");
    eventually("the document loads", || {
        get_json(health, "/health").0 == 200
    });
    let (dns, http) = (agent.addr("dns"), agent.addr("http"));

    let agents: BTreeSet<IpAddr> = ["198.51.100.7", "192.0.2.1", AGENT_IP]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    let names = [
        "geo.test",
        "www.geo.test",
        "mail.geo.test",
        "europe.geo.test",
        "us.geo.test",
        "anything.geo.test",
        "plain.test",
        "app.plain.test",
        "static.plain.test",
    ];
    let mut served_by_agents = Vec::new();
    for name in names {
        // From the source address (127.0.0.1) and from a German and a US client subnet.
        for subnet in [None, Some("81.2.3.0"), Some("8.8.8.0")] {
            let (_, answers) = dns_a(dns, &format!("{name}."), subnet).await;
            if !answers.iter().any(|ip| agents.contains(ip)) {
                continue;
            }
            let (status, _, body) = http_get(http, name, "/").await.unwrap();
            assert!(
                status != 403 && status != 404,
                "DNS sends {name} to an agent ({answers:?}) but HTTP answers {status}: {body}"
            );
            served_by_agents.push(name);
            break;
        }
    }
    // The GeoDNS apex without `httpProxyEnabled` is the case the Go agent proxies and the
    // old rule refused; the records with their own value stay out of the set.
    for name in [
        "geo.test",
        "www.geo.test",
        "anything.geo.test",
        "app.plain.test",
    ] {
        assert!(
            served_by_agents.contains(&name),
            "{name} should be answered with an agent: {served_by_agents:?}"
        );
    }
    for name in ["mail.geo.test", "plain.test"] {
        assert!(
            !served_by_agents.contains(&name),
            "{name} keeps its own value"
        );
    }
    // And the apex really reaches the origin.
    let (status, _, body) = http_get(http, "geo.test", "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "origin saw GET / host=geo.test")
    );
}
