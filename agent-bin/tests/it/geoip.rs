//! The GeoIP database's life in the running agent: missing at start, appearing, replaced
//! live, a corrupt replacement, and SIGHUP.

use std::net::IpAddr;
use std::path::Path;

use crate::e2e_support::dns_a;
use crate::support::{Agent, eventually, get, get_json};

/// A domain whose GeoDNS answer tells which country the database put 81.0.0.0/8 in.
const DOC: &str = r#"{"domains":[{"domain":"geo.test","dnsRecords":[],
    "geoDnsMap":{"de":"198.51.100.1","fr":"198.51.100.2","nl":"198.51.100.3","default":"192.0.2.9"}}]}"#;

/// Writes a database putting 81.0.0.0/8 in `country`: renamed into place as `geoipupdate`
/// does, or written over the file in place.
fn write_database(path: &Path, country: &str, in_place: bool) {
    let mut writer = defenra_geo::mmdb_writer::MmdbWriter::new();
    writer.insert("81.0.0.0".parse().unwrap(), 8, Some(country), Some("EU"));
    if in_place {
        std::fs::write(path, writer.to_bytes()).unwrap();
    } else {
        let temporary = path.with_extension("part");
        std::fs::write(&temporary, writer.to_bytes()).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }
}

async fn answer(agent: &Agent) -> IpAddr {
    let (_, ips) = dns_a(agent.addr("dns"), "geo.test.", Some("81.2.3.0")).await;
    ips[0]
}

async fn wait_for_answer(agent: &Agent, expected: &str) {
    let expected: IpAddr = expected.parse().unwrap();
    for _ in 0..200 {
        if answer(agent).await == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("GeoDNS never answered {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_degrades_then_appears_is_replaced_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, DOC).unwrap();
    let database = dir.path().join("GeoLite2-City.mmdb");
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--geoip-db",
        database.to_str().unwrap(),
    ]);
    let health = agent.addr("health");
    eventually("the config loads", || get_json(health, "/health").0 == 200);

    // Missing at start: a warning, GeoDNS falls back to `default`, health says degraded.
    let (status, body) = get_json(health, "/health");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["geoip"], "missing");
    let (_, stats) = get_json(health, "/stats");
    assert_eq!(stats["geoip"]["state"], "missing", "{stats}");
    assert!(
        get(health, "/metrics")
            .1
            .contains("defenra_geoip_degraded 1")
    );
    assert_eq!(answer(&agent).await, "192.0.2.9".parse::<IpAddr>().unwrap());

    // The file appears: picked up without a restart.
    write_database(&database, "DE", false);
    wait_for_answer(&agent, "198.51.100.1").await;
    let (_, body) = get_json(health, "/health");
    assert_eq!(
        (body["status"].as_str(), body["geoip"].as_str()),
        (Some("ok"), Some("loaded"))
    );

    // geoipupdate replaces it: the new database answers.
    write_database(&database, "FR", false);
    wait_for_answer(&agent, "198.51.100.2").await;

    // A corrupt replacement is reported; the previous database stays in use.
    std::fs::write(&database, b"half a download").unwrap();
    eventually("the corrupt file is reported", || {
        get_json(health, "/health").1["geoip"] == "stale"
    });
    let (status, body) = get_json(health, "/health");
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")));
    let (_, stats) = get_json(health, "/stats");
    assert!(
        stats["geoip"]["error"]
            .as_str()
            .unwrap()
            .contains("GeoLite2-City.mmdb"),
        "{stats}"
    );
    assert_eq!(
        answer(&agent).await,
        "198.51.100.2".parse::<IpAddr>().unwrap()
    );
    let metrics = get(health, "/metrics").1;
    assert!(
        metrics.contains("defenra_geoip_load_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("defenra_geoip_database_loaded 1"),
        "{metrics}"
    );

    // A good file again.
    write_database(&database, "NL", false);
    wait_for_answer(&agent, "198.51.100.3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_a_database_whose_file_looks_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, DOC).unwrap();
    let database = dir.path().join("geo.mmdb");
    write_database(&database, "DE", false);
    let modified = std::fs::metadata(&database).unwrap().modified().unwrap();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--geoip-db",
        database.to_str().unwrap(),
    ]);
    let health = agent.addr("health");
    eventually("the config loads", || get_json(health, "/health").0 == 200);
    assert_eq!(get_json(health, "/health").1["status"], "ok");
    assert_eq!(
        answer(&agent).await,
        "198.51.100.1".parse::<IpAddr>().unwrap()
    );

    // Same inode, length and modification time: only SIGHUP's forced read sees the change.
    write_database(&database, "FR", true);
    std::fs::File::options()
        .write(true)
        .open(&database)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    agent.signal("HUP");
    wait_for_answer(&agent, "198.51.100.2").await;
}
