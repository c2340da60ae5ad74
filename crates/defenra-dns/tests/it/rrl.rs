//! Response rate limiting, seen by UDP clients bound to several 127.x source addresses,
//! with the limiter's clock moved by hand so that every count is exact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use defenra_config::stats::StatsSource;
use defenra_dns::{Clock, DnsOptions, DnsStats, RrlOptions};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

use crate::support::{TestServer, ZONE, eventually, query, read_tcp_message, with_edns};
use crate::tcp::connect_from;

/// A clock that moves only when told to.
#[derive(Default)]
struct HandClock {
    micros: AtomicU64,
}

impl HandClock {
    fn advance(&self, by: Duration) {
        self.micros.fetch_add(by.as_micros() as u64, Relaxed);
    }
}

impl Clock for HandClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.micros.load(Relaxed))
    }
}

/// A server limiting to `rrl` (rate 5 and slip 2 unless said otherwise), and its clock.
async fn start(rrl: RrlOptions) -> (TestServer, Arc<HandClock>) {
    let clock = Arc::new(HandClock::default());
    // Far from zero, like a real monotonic clock.
    clock.advance(Duration::from_secs(1000));
    let options = DnsOptions {
        rrl,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with_clock(ZONE, None, options, clock.clone()).await;
    (server, clock)
}

fn rate(rate: u32) -> RrlOptions {
    RrlOptions {
        rate,
        ..RrlOptions::default()
    }
}

/// Responses the server has decided on: sent (counted by rcode) or dropped.
fn decided(stats: &DnsStats) -> u64 {
    let mut metrics = Vec::new();
    stats.collect(&mut metrics);
    let sent: f64 = metrics
        .iter()
        .filter(|metric| metric.name == "responses_total")
        .map(|metric| metric.value)
        .sum();
    sent as u64 + stats.rrl_dropped()
}

/// A UDP client with its own source address.
struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    next_id: u16,
}

impl Client {
    async fn bind(source: &str, server: &TestServer) -> Client {
        let socket = UdpSocket::bind((source, 0)).await.unwrap();
        Client {
            socket,
            server: server.addr,
            next_id: 1,
        }
    }

    /// Sends `messages` (numbered with fresh IDs), waits until the server has decided on
    /// each, and returns every response it sent, in order.
    async fn send_all(&mut self, server: &TestServer, messages: Vec<Message>) -> Vec<Message> {
        let stats = server.service.stats();
        let (decided_before, dropped_before) = (decided(&stats), stats.rrl_dropped());
        let n = messages.len() as u64;
        for mut message in messages {
            message.metadata.id = self.next_id;
            self.next_id += 1;
            self.socket
                .send_to(&message.to_vec().unwrap(), self.server)
                .await
                .unwrap();
        }
        assert!(
            eventually(|| decided(&stats) == decided_before + n).await,
            "the server decided on every query"
        );
        let expected = n - (stats.rrl_dropped() - dropped_before);
        let mut responses = Vec::new();
        let mut buf = vec![0u8; 65_535];
        for _ in 0..expected {
            let (len, _) =
                tokio::time::timeout(Duration::from_secs(2), self.socket.recv_from(&mut buf))
                    .await
                    .expect("every response not dropped arrives")
                    .unwrap();
            responses.push(Message::from_vec(&buf[..len]).unwrap());
        }
        responses
    }

    async fn repeat(&mut self, server: &TestServer, message: &Message, n: usize) -> Vec<Message> {
        self.send_all(server, vec![message.clone(); n]).await
    }
}

/// (full answers, truncated answers).
fn tally(responses: &[Message]) -> (usize, usize) {
    let truncated = responses
        .iter()
        .filter(|response| response.metadata.truncation)
        .count();
    (responses.len() - truncated, truncated)
}

/// A slipped response: the question echoed, TC set, no records, EDNS kept (checked with
/// hickory-proto's parser).
fn assert_slipped(response: &Message, name: &str, kind: RecordType) {
    assert!(response.metadata.truncation, "TC set");
    assert_eq!(response.queries.len(), 1);
    assert_eq!(response.queries[0].name().to_ascii(), name);
    assert_eq!(response.queries[0].query_type(), kind);
    assert!(response.answers.is_empty(), "{:?}", response.answers);
    assert!(
        response.authorities.is_empty(),
        "{:?}",
        response.authorities
    );
    assert!(response.edns.is_some(), "the OPT record is kept");
}

#[tokio::test]
async fn a_prefix_over_the_rate_gets_drops_and_every_second_response_truncated() {
    let (server, clock) = start(rate(5)).await;
    let www = with_edns(query("www.example.com.", RecordType::A), 1232, None);
    let mut flooder = Client::bind("127.0.0.2", &server).await;
    let responses = flooder.repeat(&server, &www, 20).await;
    // A bucket of 5 (rate 5 × window 1 s), then of the 15 over the rate every second one
    // is slipped and the rest dropped.
    assert_eq!(tally(&responses), (5, 7));
    for response in &responses[..5] {
        assert_eq!(response.answers.len(), 2);
        assert!(!response.metadata.truncation);
    }
    for response in &responses[5..] {
        assert_slipped(response, "www.example.com.", RecordType::A);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    }
    let stats = server.service.stats();
    assert_eq!((stats.rrl_dropped(), stats.rrl_slipped()), (8, 7));

    // Another /24 is not affected.
    let mut other = Client::bind("127.0.1.2", &server).await;
    assert_eq!(tally(&other.repeat(&server, &www, 5).await), (5, 0));
    // Another address of the flooder's /24 shares its bucket.
    let mut neighbour = Client::bind("127.0.0.9", &server).await;
    assert_eq!(tally(&neighbour.repeat(&server, &www, 2).await), (0, 1));

    // A second later the bucket is full again.
    clock.advance(Duration::from_secs(1));
    assert_eq!(tally(&flooder.repeat(&server, &www, 5).await), (5, 0));
}

#[tokio::test]
async fn slip_zero_drops_everything_over_the_rate_and_one_truncates_everything() {
    for (slip, expected) in [(0, (2, 0)), (1, (2, 6))] {
        let (server, _clock) = start(RrlOptions {
            rate: 2,
            slip,
            ..RrlOptions::default()
        })
        .await;
        let mut flooder = Client::bind("127.0.0.2", &server).await;
        let responses = flooder
            .repeat(&server, &query("www.example.com.", RecordType::A), 8)
            .await;
        assert_eq!(tally(&responses), expected, "slip {slip}");
    }
}

#[tokio::test]
async fn a_random_subdomain_flood_of_one_zone_is_limited_as_one_class() {
    let (server, _clock) = start(rate(5)).await;
    let mut flooder = Client::bind("127.0.0.2", &server).await;
    let random_names: Vec<Message> = (0..20)
        .map(|n| query(&format!("x{n}q7.example.com."), RecordType::A))
        .collect();
    let responses = flooder.send_all(&server, random_names).await;
    assert_eq!(tally(&responses), (5, 7));
    for response in responses.iter().filter(|r| !r.metadata.truncation) {
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    }
    // NODATA of the same zone is the same class; a positive answer is another.
    let nodata = flooder
        .repeat(&server, &query("www.example.com.", RecordType::MX), 2)
        .await;
    assert_eq!(tally(&nodata), (0, 1));
    let positive = flooder
        .repeat(&server, &query("www.example.com.", RecordType::A), 2)
        .await;
    assert_eq!(tally(&positive), (2, 0));
    // Another zone is another class.
    let shop = flooder
        .repeat(&server, &query("nope.shop.example.com.", RecordType::A), 2)
        .await;
    assert_eq!(tally(&shop), (2, 0));
}

#[tokio::test]
async fn errors_of_a_prefix_are_one_class() {
    let (server, _clock) = start(rate(3)).await;
    let mut flooder = Client::bind("127.0.0.2", &server).await;
    // REFUSED for names of no served zone, whatever the name.
    let refused: Vec<Message> = (0..9)
        .map(|n| query(&format!("victim{n}.example.org."), RecordType::A))
        .collect();
    let responses = flooder.send_all(&server, refused).await;
    assert_eq!(tally(&responses), (3, 3));
    assert!(
        responses
            .iter()
            .all(|response| response.metadata.response_code == ResponseCode::Refused)
    );
    // FORMERR shares the class: a question cut short.
    let good = query("example.com.", RecordType::A).to_vec().unwrap();
    flooder
        .socket
        .send_to(&good[..good.len() - 3], server.addr)
        .await
        .unwrap();
    let stats = server.service.stats();
    assert!(eventually(|| stats.rrl_dropped() == 4).await);
}

#[tokio::test]
async fn tcp_still_answers_a_limited_prefix() {
    let (server, _clock) = start(rate(2)).await;
    let www = query("www.example.com.", RecordType::A);
    let mut flooder = Client::bind("127.0.0.2", &server).await;
    let responses = flooder.repeat(&server, &www, 6).await;
    assert_eq!(tally(&responses), (2, 2));
    // What a resolver does with a slipped answer: ask again over TCP, and get it.
    let mut stream = connect_from(server.addr, "127.0.0.2").await;
    for _ in 0..5 {
        let bytes = www.to_vec().unwrap();
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&bytes).await.unwrap();
        let response = read_tcp_message(&mut stream).await;
        assert_eq!(response.answers.len(), 2);
        assert!(!response.metadata.truncation);
    }
}

#[tokio::test]
async fn whitelisted_prefixes_are_never_limited() {
    let (server, _clock) = start(RrlOptions {
        rate: 2,
        whitelist: vec!["127.0.0.0/24".parse().unwrap()],
        ..RrlOptions::default()
    })
    .await;
    let www = query("www.example.com.", RecordType::A);
    let mut monitor = Client::bind("127.0.0.2", &server).await;
    assert_eq!(tally(&monitor.repeat(&server, &www, 10).await), (10, 0));
    let mut other = Client::bind("127.0.1.2", &server).await;
    assert_eq!(tally(&other.repeat(&server, &www, 4).await), (2, 1));
}

#[tokio::test]
async fn random_prefixes_cannot_grow_the_table() {
    let (server, _clock) = start(RrlOptions {
        rate: 1,
        ipv4_prefix: 32,
        table_size: 64,
        ..RrlOptions::default()
    })
    .await;
    let stats = server.service.stats();
    let www = query("www.example.com.", RecordType::A);
    // 200 addresses, one class each with a prefix length of 32.
    for n in 1..=200u32 {
        let source = format!("127.0.{}.{}", 2 + n / 250, n % 250 + 1);
        let mut client = Client::bind(&source, &server).await;
        assert_eq!(tally(&client.repeat(&server, &www, 1).await), (1, 0));
    }
    assert_eq!(stats.rrl_classes(), 64);
    assert_eq!(stats.rrl_evictions(), 200 - 64);
    let mut metrics = Vec::new();
    stats.collect(&mut metrics);
    let size = metrics
        .iter()
        .find(|metric| metric.name == "rrl_table_size")
        .unwrap();
    assert_eq!(size.value, 64.0);
}

#[tokio::test]
async fn rate_zero_is_off() {
    let (server, _clock) = start(rate(0)).await;
    let mut client = Client::bind("127.0.0.2", &server).await;
    let responses = client
        .repeat(&server, &query("www.example.com.", RecordType::A), 50)
        .await;
    assert_eq!(tally(&responses), (50, 0));
}
