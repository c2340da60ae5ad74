//! End to end: the agent binary configured from a fake Core, serving one realistic customer
//! setup on every service at once, then config changes, Core outages, a restart during an
//! outage, and SIGTERM during a streaming download.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use defenra_config::testing::{Answer, FakeCore};
use http_body_util::BodyExt;
use rustls::pki_types::CertificateDer;
use serde_json::json;

use crate::e2e_support::*;
use crate::support::Agent;

const WAF: &str =
    "if ngx.var.uri == '/admin' then return ngx.exit(403) end\nngx.header['X-WAF'] = 'checked'";

/// The servers behind the agent.
struct Backends {
    origin: SocketAddr,
    tcp_echo: SocketAddr,
    udp_echo: SocketAddr,
}

/// The customer setup: a proxied domain with GeoDNS, a certificate and a WAF script; a
/// DNS-only domain; a TCP and a UDP forward.
fn customer_config(
    backends: &Backends,
    cert: &(String, String, CertificateDer<'static>),
    tcp_port: u16,
    udp_port: u16,
) -> serde_json::Value {
    json!({
        "success": true,
        "domains": [
            {
                "domain": "shop.test",
                "dnsRecords": [
                    {"name": "@", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true},
                    {"name": "www", "type": "A", "value": "127.0.0.1", "ttl": 300, "httpProxyEnabled": true}
                ],
                "geoDnsMap": {"de": "198.51.100.7", "us": "192.0.2.1", "default": "192.0.2.9"},
                "httpProxy": {"type": "both"},
                "ssl": {"enabled": true, "certificate": cert.0, "privateKey": cert.1, "encryptionMode": "off"},
                "luaCode": WAF
            },
            {
                "domain": "dns-only.test",
                "dnsRecords": [{"name": "@", "type": "A", "value": "192.0.2.80"}]
            }
        ],
        "proxies": [
            {"type": "tcp", "sourcePort": tcp_port, "destinationHost": "127.0.0.1", "destinationPort": backends.tcp_echo.port(), "enabled": true},
            {"type": "udp", "sourcePort": udp_port, "destinationHost": "127.0.0.1", "destinationPort": backends.udp_echo.port(), "enabled": true}
        ]
    })
}

async fn eventually<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> F,
) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {limit:?}: {what}");
}

fn start_agent(
    core: &FakeCore,
    state: &std::path::Path,
    geoip: &std::path::Path,
    origin: SocketAddr,
) -> Agent {
    let agent = Agent::start(&[
        "--core-url",
        &core.url(),
        "--agent-id",
        "edge-e2e",
        "--agent-key",
        "e2e-key",
        "--poll-interval",
        "1",
        "--state-dir",
        state.to_str().unwrap(),
        "--geoip-db",
        geoip.to_str().unwrap(),
        "--origin-http-port",
        &origin.port().to_string(),
        "--agent-ip",
        "192.0.2.200",
    ]);
    let health = agent.addr("health");
    crate::support::eventually("a config is served", || {
        crate::support::get_json(health, "/health").0 == 200
    });
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_setup_across_every_service_survives_changes_and_outages() {
    let backends = Backends {
        origin: start_origin().await,
        tcp_echo: start_tcp_echo().await,
        udp_echo: start_udp_echo().await,
    };
    let dir = tempfile::tempdir().unwrap();
    let (state, geoip) = (dir.path().join("state"), dir.path().join("geo.mmdb"));
    geoip_db(&geoip);
    let first_cert = certificate(&["shop.test", "www.shop.test"]);
    let (tcp_port, udp_port) = (free_port(), free_port());
    let config = customer_config(&backends, &first_cert, tcp_port, udp_port);
    let core = FakeCore::start(Answer::Json(config.to_string())).await;
    let agent = start_agent(&core, &state, &geoip, backends.origin);
    let (dns, http, https) = (agent.addr("dns"), agent.addr("http"), agent.addr("https"));
    let tcp_forward: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().unwrap();
    let udp_forward: SocketAddr = format!("127.0.0.1:{udp_port}").parse().unwrap();

    // Core saw the key and the agent's identity.
    let polls = core.received();
    assert_eq!(polls[0].authorization.as_deref(), Some("Bearer e2e-key"));
    assert_eq!(polls[0].body["agentId"], "edge-e2e");

    // DNS: GeoDNS by ECS (Germany) and by source address (127.0.0.1 is the US here); the
    // origin address never leaks for the proxied name; the DNS-only zone answers as is.
    assert_eq!(
        dns_a(dns, "shop.test", Some("10.1.2.0")).await,
        ("NOERROR".into(), vec!["198.51.100.7".parse().unwrap()])
    );
    assert_eq!(
        dns_a(dns, "shop.test", None).await,
        ("NOERROR".into(), vec!["192.0.2.1".parse().unwrap()])
    );
    let (_, www) = dns_a(dns, "www.shop.test", None).await;
    assert!(
        !www.contains(&"127.0.0.1".parse().unwrap()),
        "origin leaked: {www:?}"
    );
    assert_eq!(
        dns_a(dns, "dns-only.test", None).await.1,
        vec!["192.0.2.80".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(dns_a(dns, "elsewhere.test", None).await.0, "REFUSED");

    // HTTP and HTTPS through to the origin, with the WAF's header; a WAF block.
    let (status, waf, body) = http_get(http, "shop.test", "/hello").await.unwrap();
    assert_eq!((status, waf.as_deref()), (200, Some("checked")), "{body}");
    assert_eq!(body, "origin saw GET /hello host=shop.test");
    assert_eq!(http_get(http, "shop.test", "/admin").await.unwrap().0, 403);
    let (status, body, presented) = https_get(
        https,
        "www.shop.test",
        "/secure",
        std::slice::from_ref(&first_cert.2),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "origin saw GET /secure host=www.shop.test")
    );
    assert_eq!(presented, first_cert.2);

    // L4: TCP and UDP echo through the forwards.
    assert_eq!(
        tcp_echo_through(tcp_forward, b"ping over tcp")
            .await
            .unwrap(),
        b"ping over tcp"
    );
    assert_eq!(
        udp_echo_through(udp_forward, b"ping over udp")
            .await
            .unwrap(),
        b"echo:ping over udp"
    );

    // A client loop runs through the whole change; not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                match http_get(http, "shop.test", "/loop").await {
                    Ok((200, _, _)) => served.fetch_add(1, Relaxed),
                    other => {
                        eprintln!("client loop failure: {other:?}");
                        failed.fetch_add(1, Relaxed)
                    }
                };
            }
        })
    };

    // Change through Core: a new record, a new certificate, the TCP forward removed.
    let second_cert = certificate(&["shop.test", "www.shop.test"]);
    let mut changed = customer_config(&backends, &second_cert, tcp_port, udp_port);
    changed["domains"][1]["dnsRecords"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "new", "type": "A", "value": "192.0.2.55"}));
    changed["proxies"].as_array_mut().unwrap().remove(0);
    core.set(Answer::Json(changed.to_string()));
    let changed_at = Instant::now();
    let two_polls = Duration::from_millis(2500);
    eventually("the new record is served", two_polls, || async {
        dns_a(dns, "new.dns-only.test", None).await.1
            == vec!["192.0.2.55".parse::<std::net::IpAddr>().unwrap()]
    })
    .await;
    let roots = [first_cert.2.clone(), second_cert.2.clone()];
    eventually(
        "the new certificate is presented",
        two_polls.saturating_sub(changed_at.elapsed()) + Duration::from_millis(200),
        || async {
            https_get(https, "shop.test", "/", &roots)
                .await
                .is_ok_and(|(_, _, presented)| presented == second_cert.2)
        },
    )
    .await;
    eventually(
        "the removed TCP forward stops listening",
        Duration::from_secs(3),
        || async { tcp_echo_through(tcp_forward, b"x").await.is_err() },
    )
    .await;
    assert_eq!(
        udp_echo_through(udp_forward, b"still here").await.unwrap(),
        b"echo:still here",
        "the UDP forward is untouched"
    );

    // Core outages change nothing.
    for outage in [
        Answer::Status(500),
        Answer::Garbage,
        Answer::Json(r#"{"success":false}"#.into()),
        Answer::Hang,
    ] {
        core.set(outage);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(dns_a(dns, "new.dns-only.test", None).await.1.len(), 1);
        assert_eq!(http_get(http, "shop.test", "/admin").await.unwrap().0, 403);
    }
    stop.store(true, Relaxed);
    client.await.unwrap();
    assert_eq!(
        failed.load(Relaxed),
        0,
        "requests failed during the change and outages"
    );
    assert!(
        served.load(Relaxed) > 20,
        "the client loop ran: {}",
        served.load(Relaxed)
    );

    // Restart during the outage: the saved config is served.
    drop(agent);
    core.set(Answer::Status(503));
    let restarted = start_agent(&core, &state, &geoip, backends.origin);
    assert_eq!(
        dns_a(restarted.addr("dns"), "new.dns-only.test", None)
            .await
            .1,
        vec!["192.0.2.55".parse::<std::net::IpAddr>().unwrap()]
    );
    let (status, waf, _) = http_get(restarted.addr("http"), "shop.test", "/")
        .await
        .unwrap();
    assert_eq!((status, waf.as_deref()), (200, Some("checked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_streaming_download_finish() {
    let origin = start_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let config = json!({"domains": [{"domain": "shop.test", "httpProxy": {"enabled": true},
        "dnsRecords": [{"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}]}]});
    std::fs::write(&path, config.to_string()).unwrap();
    let mut agent = Agent::start(&[
        "--config",
        path.to_str().unwrap(),
        "--origin-http-port",
        &origin.port().to_string(),
    ]);
    let http = agent.addr("http");

    let stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("/stream")
        .header("host", "shop.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0;
    // The first chunk arrives, then the agent is told to stop.
    while received == 0 {
        let frame = body.frame().await.unwrap().unwrap();
        received += frame.data_ref().map_or(0, |data| data.len());
    }
    agent.signal("TERM");
    while let Some(frame) = body.frame().await {
        received += frame
            .expect("the download is not cut")
            .data_ref()
            .map_or(0, |data| data.len());
    }
    assert_eq!(received, 10 * 1024, "the whole body arrives after SIGTERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(12));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    // New connections are refused once the agent is draining or gone.
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
}

/// The operator's first day: `defenra-agent connect` on the edge host, the agent polls Core
/// with the key it got, serves traffic, and Core's Statistics and Clients pages fill up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_then_poll_then_traffic_then_reports() {
    use crate::reports::{SHOP_ID, TCP_ID, document, http_requests, sums, tcp_round_trip};

    let backends = Backends {
        origin: start_origin().await,
        tcp_echo: start_tcp_echo().await,
        udp_echo: start_udp_echo().await,
    };
    let (tcp_port, udp_port) = (free_port(), free_port());
    let core = FakeCore::start(Answer::Json(document(
        (tcp_port, backends.tcp_echo),
        (udp_port, backends.udp_echo),
    )))
    .await;
    core.add_agent("edge-first-day", "key-first-day", "token-first-day");
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    std::fs::write(&env_file, "# defenra-agent\nAGENT_KEY=\n").unwrap();
    let geoip = dir.path().join("geo.mmdb");
    geoip_db(&geoip);

    // 1. connect: credentials into the env file.
    let connect_url = core.connect_url("token-first-day");
    let env_path = env_file.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::support::binary())
            .args(["connect", &connect_url, "--env-file"])
            .arg(&env_path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let env: std::collections::HashMap<String, String> = std::fs::read_to_string(&env_file)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    assert_eq!(env["AGENT_KEY"], "key-first-day");

    // 2. poll: the agent runs with what `connect` wrote.
    let agent = Agent::start(&[
        "--core-url",
        &env["CORE_URL"],
        "--agent-id",
        &env["AGENT_ID"],
        "--agent-key",
        &env["AGENT_KEY"],
        "--poll-interval",
        "1",
        "--geoip-db",
        geoip.to_str().unwrap(),
        "--origin-http-port",
        &backends.origin.port().to_string(),
    ]);
    let health = agent.addr("health");
    crate::support::eventually("the enrolled agent polls Core", || {
        crate::support::get_json(health, "/health").0 == 200
    });
    let poll = core
        .received()
        .into_iter()
        .find(|request| request.path == "/api/agent/poll")
        .unwrap();
    assert_eq!(poll.authorization.as_deref(), Some("Bearer key-first-day"));

    // 3. traffic: HTTP from a client address, and a TCP forward.
    let (written, read) =
        http_requests(agent.addr("http"), "127.0.0.2", "shop.test", "browser/1", 3).await;
    tcp_round_trip(tcp_port, b"first day").await;

    // 4. reports: Statistics and Clients.
    eventually(
        "Core's Statistics and Clients pages show the traffic",
        Duration::from_secs(15),
        || async {
            let rows = core.traffic();
            sums(&rows, SHOP_ID).requests == 3
                && sums(&rows, TCP_ID).requests == 1
                && !core.clients().is_empty()
        },
    )
    .await;
    let rows = core.traffic();
    let shop = sums(&rows, SHOP_ID);
    assert_eq!((shop.inbound, shop.outbound), (written, read));
    assert!(rows.iter().all(|row| row.agent_id == "edge-first-day"));
    let clients = core.clients();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].ip, "127.0.0.2");
    assert_eq!(
        clients[0].country_code.as_deref(),
        Some("US"),
        "127/8 is the US here"
    );
    assert_eq!(clients[0].user_agent.as_deref(), Some("browser/1"));
}
