//! Traffic and client reports to the fake Core: deltas that sum to the traffic generated,
//! retries after a failed send, silence when idle, clients once an hour with their location.

use std::net::SocketAddr;
use std::time::Duration;

use defenra_config::testing::{Answer, FakeCore, TrafficRow};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::e2e_support::{free_port, start_origin, start_tcp_echo, start_udp_echo};
use crate::support::{Agent, eventually, get_json};

pub(crate) const SHOP_ID: &str = "65f1c0ffee000000000000a1";
const IDLE_ID: &str = "65f1c0ffee000000000000a2";
pub(crate) const TCP_ID: &str = "65f1c0ffee000000000000b1";
const UDP_ID: &str = "65f1c0ffee000000000000c1";

/// A Core-shaped document: a proxied domain, an idle one, a TCP and a UDP forward.
pub(crate) fn document(tcp: (u16, SocketAddr), udp: (u16, SocketAddr)) -> String {
    json!({
        "success": true,
        "domains": [
            {"id": SHOP_ID, "domain": "shop.test", "httpProxy": {"type": "both", "antiDDoS": null},
             "dnsRecords": [{"id": "r1", "name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true}]},
            {"id": IDLE_ID, "domain": "idle.test", "httpProxy": {"type": "both", "antiDDoS": null},
             "dnsRecords": [{"id": "r2", "name": "@", "type": "A", "value": "127.0.0.1"}]}
        ],
        "proxies": [
            {"id": TCP_ID, "name": "tcp", "type": "tcp", "sourcePort": tcp.0,
             "destinationHost": "127.0.0.1", "destinationPort": tcp.1.port(), "enabled": true},
            {"id": UDP_ID, "name": "udp", "type": "udp", "sourcePort": udp.0,
             "destinationHost": "127.0.0.1", "destinationPort": udp.1.port(), "enabled": true}
        ]
    })
    .to_string()
}

/// Sums of the rows Core stored for one resource.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    pub(crate) rows: usize,
    pub(crate) requests: u64,
    pub(crate) inbound: u64,
    pub(crate) outbound: u64,
    pub(crate) errors: u64,
}

pub(crate) fn sums(rows: &[TrafficRow], id: &str) -> Sums {
    rows.iter()
        .filter(|row| row.resource_id == id)
        .fold(Sums::default(), |mut sums, row| {
            sums.rows += 1;
            sums.requests += row.requests;
            sums.inbound += row.inbound_bytes;
            sums.outbound += row.outbound_bytes;
            sums.errors += row.errors;
            sums
        })
}

/// `n` GET requests for `host`, one connection each from `source`: the bytes the client
/// wrote and read.
pub(crate) async fn http_requests(
    proxy: SocketAddr,
    source: &str,
    host: &str,
    user_agent: &str,
    n: usize,
) -> (u64, u64) {
    let (mut written, mut read) = (0, 0);
    for index in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut stream: TcpStream = socket.connect(proxy).await.unwrap();
        let request = format!(
            "GET /item/{index} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&response)
        );
        written += request.len() as u64;
        read += response.len() as u64;
    }
    (written, read)
}

/// One TCP connection through the forward, echoing `payload`.
pub(crate) async fn tcp_round_trip(forward: u16, payload: &[u8]) {
    let mut stream = TcpStream::connect(("127.0.0.1", forward)).await.unwrap();
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, payload);
}

/// One UDP session through the forward: `n` datagrams, each answered once.
async fn udp_session(forward: u16, payload: &[u8], n: usize) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", forward)).await.unwrap();
    let mut buffer = vec![0u8; 2048];
    let mut received = 0;
    for _ in 0..n {
        socket.send(payload).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        received += got as u64;
    }
    received
}

fn statistics_posts(core: &FakeCore) -> usize {
    core.received()
        .iter()
        .filter(|request| request.path == "/api/statistics")
        .count()
}

fn polls(core: &FakeCore) -> usize {
    core.received()
        .iter()
        .filter(|request| request.path == "/api/agent/poll")
        .count()
}

/// Waits until Core got `more` further polls (so as many report cycles passed).
async fn wait_polls(core: &FakeCore, more: usize) {
    let target = polls(core) + more;
    for _ in 0..200 {
        if polls(core) >= target {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Core did not get {more} more polls");
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..300 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn start(core: &FakeCore, origin: SocketAddr, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--core-url".to_owned(),
        core.url(),
        "--agent-id".to_owned(),
        "edge-r".to_owned(),
        "--agent-key".to_owned(),
        "key-r".to_owned(),
        "--poll-interval".to_owned(),
        "1".to_owned(),
        "--origin-http-port".to_owned(),
        origin.port().to_string(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("a config is served", || {
        get_json(health, "/health").0 == 200
    });
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_are_deltas_that_sum_to_the_traffic_and_survive_a_failed_send() {
    let origin = start_origin().await;
    let (tcp_echo, udp_echo) = (start_tcp_echo().await, start_udp_echo().await);
    let (tcp_port, udp_port) = (free_port(), free_port());
    let core = FakeCore::start(Answer::Json(document(
        (tcp_port, tcp_echo),
        (udp_port, udp_echo),
    )))
    .await;
    core.add_agent("edge-r", "key-r", "spent");
    let agent = start(&core, origin, &[]);
    let http = agent.addr("http");

    let (written, read) = http_requests(http, "127.0.0.1", "shop.test", "test/1", 5).await;
    tcp_round_trip(tcp_port, b"twelve bytes").await;
    tcp_round_trip(tcp_port, b"four").await;
    let udp_received = udp_session(udp_port, b"ping!", 3).await;

    wait_until("every byte and request is reported", || {
        let rows = core.traffic();
        sums(&rows, SHOP_ID).requests == 5
            && sums(&rows, SHOP_ID).outbound == read
            && sums(&rows, TCP_ID).requests == 2
            && sums(&rows, UDP_ID).inbound == 15
    })
    .await;
    let rows = core.traffic();
    let shop = sums(&rows, SHOP_ID);
    assert_eq!(
        (shop.requests, shop.inbound, shop.outbound),
        (5, written, read)
    );
    let tcp = sums(&rows, TCP_ID);
    assert_eq!((tcp.requests, tcp.inbound, tcp.outbound), (2, 16, 16));
    let udp = sums(&rows, UDP_ID);
    assert_eq!(
        (udp.requests, udp.inbound, udp.outbound),
        (1, 15, udp_received)
    );
    assert_eq!(sums(&rows, IDLE_ID).rows, 0, "nothing for an idle domain");
    let row = rows.iter().find(|row| row.resource_id == SHOP_ID).unwrap();
    assert_eq!(
        (row.agent_id.as_str(), row.resource_type.as_str()),
        ("edge-r", "domain")
    );
    assert!(row.response_time_ms >= 0.0);
    let post = core
        .received()
        .into_iter()
        .find(|request| request.path == "/api/statistics")
        .unwrap();
    assert_eq!(post.authorization.as_deref(), Some("Bearer key-r"));
    assert_eq!(post.content_type.as_deref(), Some("application/json"));

    // Idle: polls go on, nothing is reported.
    let stored = core.traffic().len();
    wait_polls(&core, 3).await;
    assert_eq!(core.traffic().len(), stored, "no report without traffic");

    // Core fails the reports: the counts are kept and go with the next successful one.
    core.fail("/api/statistics", Some(Answer::Status(503)));
    let posts = statistics_posts(&core);
    let (more_written, more_read) =
        http_requests(http, "127.0.0.1", "shop.test", "test/1", 3).await;
    wait_until("two failed attempts", || {
        statistics_posts(&core) >= posts + 2
    })
    .await;
    core.fail("/api/statistics", None);
    wait_until("the kept counts arrive", || {
        sums(&core.traffic(), SHOP_ID).requests == 8
    })
    .await;
    let shop = sums(&core.traffic(), SHOP_ID);
    assert_eq!(
        (shop.inbound, shop.outbound),
        (written + more_written, read + more_read),
        "each byte reported exactly once"
    );
    let (_, stats) = get_json(agent.addr("health"), "/stats");
    assert_eq!(stats["report"]["pending_resources"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_reported_once_an_hour_with_the_local_geoip_location() {
    let origin = start_origin().await;
    let (tcp_echo, udp_echo) = (start_tcp_echo().await, start_udp_echo().await);
    let core = FakeCore::start(Answer::Json(document(
        (free_port(), tcp_echo),
        (free_port(), udp_echo),
    )))
    .await;
    core.add_agent("edge-r", "key-r", "spent");
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("city.mmdb");
    let mut writer = defenra_geo::mmdb_writer::MmdbWriter::new();
    writer.insert_city(
        "127.0.0.0".parse().unwrap(),
        8,
        &defenra_geo::mmdb_writer::CityRecord {
            country: Some("US"),
            country_name: Some("United States"),
            continent: Some("NA"),
            city: Some("Ashburn"),
            ..Default::default()
        },
    );
    std::fs::write(&database, writer.to_bytes()).unwrap();
    let agent = start(&core, origin, &["--geoip-db", database.to_str().unwrap()]);
    let http = agent.addr("http");

    http_requests(http, "127.0.0.2", "shop.test", "alpha/1", 2).await;
    http_requests(http, "127.0.0.3", "shop.test", "beta/2", 1).await;
    wait_until("both clients reported", || core.clients().len() == 2).await;
    let mut clients = core.clients();
    clients.sort_by(|a, b| a.ip.cmp(&b.ip));
    let client = &clients[0];
    assert_eq!(client.ip, "127.0.0.2");
    assert_eq!(client.agent_id, "edge-r");
    assert_eq!(client.user_agent.as_deref(), Some("alpha/1"));
    assert_eq!(client.country.as_deref(), Some("United States"));
    assert_eq!(client.city.as_deref(), Some("Ashburn"));
    assert_eq!(client.country_code.as_deref(), Some("US"));
    assert_eq!(clients[1].user_agent.as_deref(), Some("beta/2"));

    // Within the hour, more requests from the same address are not reported again.
    http_requests(http, "127.0.0.2", "shop.test", "alpha/1", 2).await;
    wait_polls(&core, 3).await;
    assert!(core.clients().iter().all(|client| client.connections == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_report_sends_nothing() {
    let origin = start_origin().await;
    let (tcp_echo, udp_echo) = (start_tcp_echo().await, start_udp_echo().await);
    let core = FakeCore::start(Answer::Json(document(
        (free_port(), tcp_echo),
        (free_port(), udp_echo),
    )))
    .await;
    let agent = start(&core, origin, &["--no-report"]);
    http_requests(agent.addr("http"), "127.0.0.1", "shop.test", "test/1", 2).await;
    wait_polls(&core, 3).await;
    assert!(
        core.received()
            .iter()
            .all(|request| request.path == "/api/agent/poll"),
        "only polls"
    );
}
