//! `ngx.var.geoip_*` in a WAF script, end to end: the agent binary with a City-shaped GeoIP
//! database, and clients on different loopback addresses.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use defenra_geo::mmdb_writer::{CityRecord, MmdbWriter};

use crate::support::{Agent, eventually, get_json, write};

/// GET / for `host` from the local address `from`; `(status, body)`.
fn get_from(from: &str, to: SocketAddr, host: &str) -> (u16, String) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn scripts_block_by_the_clients_country_from_the_geoip_database() {
    let dir = tempfile::tempdir().unwrap();
    let geoip = dir.path().join("city.mmdb");
    let mut writer = MmdbWriter::new();
    writer.insert_city(
        "127.0.0.0".parse().unwrap(),
        16,
        &CityRecord {
            country: Some("RU"),
            continent: Some("EU"),
            ..CityRecord::default()
        },
    );
    writer.insert_city(
        "127.1.0.0".parse().unwrap(),
        16,
        &CityRecord {
            country: Some("DE"),
            country_name: Some("Germany"),
            continent: Some("EU"),
            city: Some("Berlin"),
            region_code: Some("BE"),
            region_name: Some("Land Berlin"),
            postal_code: Some("10115"),
            latitude: Some(52.5244),
            longitude: Some(13.4105),
        },
    );
    std::fs::write(&geoip, writer.to_bytes()).unwrap();
    let script = r#"
        local blocked = { CN = true, RU = true, KP = true }
        local country = ngx.var.geoip_country_code
        if country and blocked[country] then
          return ngx.exit(ngx.HTTP_FORBIDDEN)
        end
        local v = ngx.var
        ngx.say(tostring(country), "|", tostring(v.geoip_country_name), "|",
                tostring(v.geoip_city), "|", tostring(v.geoip_region), "|",
                tostring(v.geoip_latitude), "|", tostring(v.geoip_longitude), "|",
                tostring(v.geoip_city_continent_code), "|", v.method)
    "#;
    let config = serde_json::json!({ "domains": [{
        "domain": "geo.test",
        "httpProxy": { "enabled": true, "type": "both" },
        "dnsRecords": [
            { "name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true },
        ],
        "luaCode": script,
    }]});
    let path = dir.path().join("config.json");
    write(&path, &config.to_string());
    let agent = Agent::start(&[
        "--config",
        path.to_str().unwrap(),
        "--geoip-db",
        geoip.to_str().unwrap(),
    ]);
    eventually("config loads", || {
        get_json(agent.addr("health"), "/health").0 == 200
    });
    let http = agent.addr("http");
    assert_eq!(get_from("127.0.0.1", http, "geo.test").0, 403);
    assert_eq!(
        get_from("127.1.0.9", http, "geo.test"),
        (
            200,
            "DE|Germany|Berlin|BE|52.5244|13.4105|EU|GET\n".to_owned()
        )
    );
    // Not in the database: no country, let through.
    assert_eq!(
        get_from("127.2.0.1", http, "geo.test"),
        (200, "nil|nil|nil|nil|nil|nil|nil|GET\n".to_owned())
    );
}
