//! EDNS, truncation and TCP fallback, TCP pipelining, malformed packets (TCP limits are in
//! `tcp.rs`).

use std::time::Duration;

use defenra_config::stats::StatsSource;
use defenra_dns::{DnsOptions, Transport};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{
    TestServer, echoed_subnet, query, read_tcp_message, render, udp_exchange, udp_raw, with_edns,
};

/// A zone whose TXT answer (about 3 KB) cannot fit in 512 or 1232 bytes.
fn big_zone() -> String {
    let records: Vec<String> = (0..12)
        .map(|n| {
            format!(
                r#"{{"name":"big","type":"TXT","value":"{n:02}{}"}}"#,
                "y".repeat(250)
            )
        })
        .collect();
    format!(
        r#"{{"domains":[{{"domain":"example.com","dnsRecords":[
          {{"name":"@","type":"A","value":"192.0.2.1"}},
          {{"name":"medium","type":"TXT","value":"{}"}},
          {}]}}]}}"#,
        "m".repeat(700),
        records.join(",")
    )
}

#[tokio::test]
async fn edns_queries_get_an_opt_record_and_do_is_echoed() {
    let server = TestServer::start(crate::support::ZONE).await;
    let mut message = with_edns(query("example.com.", RecordType::A), 4096, None);
    message.edns.as_mut().unwrap().set_dnssec_ok(true);
    let response = server.udp(&message).await;
    let edns = response.edns.as_ref().expect("an OPT record");
    assert_eq!(edns.max_payload(), 1232);
    assert_eq!(edns.version(), 0);
    assert!(edns.flags().dnssec_ok);
    // Without EDNS, no OPT.
    let plain = server.udp(&query("example.com.", RecordType::A)).await;
    assert!(plain.edns.is_none());
}

#[tokio::test]
async fn edns_version_above_zero_is_badvers() {
    let server = TestServer::start(crate::support::ZONE).await;
    let mut message = with_edns(query("example.com.", RecordType::A), 1232, None);
    message.edns.as_mut().unwrap().set_version(1);
    let response = server.udp(&message).await;
    // 16 is BADVERS with an OPT record (hickory names the shared value BADSIG).
    assert_eq!(u16::from(response.metadata.response_code), 16);
    assert!(response.answers.is_empty());
    assert_eq!(response.edns.as_ref().unwrap().version(), 0);
}

#[tokio::test]
async fn oversized_udp_answers_are_truncated_and_tcp_gets_them_whole() {
    let server = TestServer::start(&big_zone()).await;
    // 700 bytes: too big for plain 512-byte UDP, fits an EDNS 1232 buffer.
    let plain = server
        .udp(&query("medium.example.com.", RecordType::TXT))
        .await;
    assert_eq!(render(&plain), "NOERROR aa tc");
    assert_eq!(plain.queries.len(), 1, "the question stays");
    let edns = server
        .udp(&with_edns(
            query("medium.example.com.", RecordType::TXT),
            1232,
            None,
        ))
        .await;
    assert_eq!(edns.answers.len(), 1);
    assert!(!edns.metadata.truncation);
    // A client offering 65535 is clamped to 1232: 3 KB truncates.
    let big = server
        .udp(&with_edns(
            query("big.example.com.", RecordType::TXT),
            65_535,
            None,
        ))
        .await;
    assert!(big.metadata.truncation);
    assert!(big.answers.is_empty());
    assert!(big.edns.is_some(), "OPT is kept in a truncated answer");
    let tcp = server
        .tcp(&query("big.example.com.", RecordType::TXT))
        .await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 12);
    assert!(server.service.stats().truncated() >= 2);
}

#[tokio::test]
async fn the_udp_clamp_is_configurable() {
    let options = DnsOptions {
        udp_payload_limit: 4096,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(&big_zone(), None, options).await;
    let big = server
        .udp(&with_edns(
            query("big.example.com.", RecordType::TXT),
            4096,
            None,
        ))
        .await;
    assert!(!big.metadata.truncation);
    assert_eq!(big.answers.len(), 12);
}

#[tokio::test]
async fn pipelined_tcp_queries_are_all_answered_on_one_connection() {
    let server = TestServer::start(crate::support::ZONE).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let names = [
        "example.com.",
        "www.example.com.",
        "mail.example.com.",
        "nope.example.com.",
    ];
    let mut batch = Vec::new();
    for (id, name) in names.iter().enumerate() {
        let mut message = query(name, RecordType::A);
        message.metadata.id = id as u16 + 1;
        let bytes = message.to_vec().unwrap();
        batch.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        batch.extend_from_slice(&bytes);
    }
    // All four in one write, before reading anything.
    stream.write_all(&batch).await.unwrap();
    let mut ids = Vec::new();
    for _ in &names {
        let response = read_tcp_message(&mut stream).await;
        ids.push(response.metadata.id);
        let expected = if response.queries[0].name().to_string() == "nope.example.com." {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        };
        assert_eq!(response.metadata.response_code, expected);
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert_eq!(server.service.stats().queries(Transport::Tcp), 4);
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    let options = DnsOptions {
        tcp_idle_timeout: Duration::from_millis(200),
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(crate::support::ZONE, None, options).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        use tokio::io::AsyncReadExt;
        stream.read(&mut buf).await
    })
    .await
    .expect("the server closes the connection");
    assert_eq!(read.unwrap(), 0, "closed without data");
}

#[tokio::test]
async fn malformed_packets_never_stop_the_service() {
    let server = TestServer::start(crate::support::ZONE).await;
    let good = query("example.com.", RecordType::A).to_vec().unwrap();

    // Too short for a header, and a response (QR=1): dropped silently.
    assert!(
        udp_raw(server.addr, &[1, 2, 3], Duration::from_millis(200))
            .await
            .is_none()
    );
    let mut response_bit = good.clone();
    response_bit[2] |= 0x80;
    assert!(
        udp_raw(server.addr, &response_bit, Duration::from_millis(200))
            .await
            .is_none()
    );

    // A question cut short: FORMERR with the ID echoed.
    let formerr = udp_exchange(server.addr, &good[..good.len() - 3])
        .await
        .unwrap();
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(formerr.metadata.id, 0x5eed);
    // Trailing garbage, a compression pointer in the question, two questions.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0xde, 0xad]);
    let mut pointer = good[..12].to_vec();
    pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let mut two_questions = good.clone();
    two_questions[5] = 2;
    for packet in [&trailing, &pointer, &two_questions] {
        let response = udp_exchange(server.addr, packet).await.unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    }
    // An unknown opcode: NOTIMP.
    let mut notify = Message::new(7, MessageType::Query, OpCode::Notify);
    notify.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("example.com.").unwrap(),
        RecordType::SOA,
    ));
    let response = server.udp(&notify).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NotImp);

    // Over TCP: a garbage frame gets FORMERR and the connection keeps working.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let garbage = [0x12u8, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f];
    stream
        .write_all(&(garbage.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&garbage).await.unwrap();
    assert_eq!(
        read_tcp_message(&mut stream).await.metadata.response_code,
        ResponseCode::FormErr
    );
    stream
        .write_all(&(good.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&good).await.unwrap();
    assert_eq!(read_tcp_message(&mut stream).await.answers.len(), 1);

    // And a normal query is still answered over UDP.
    assert_eq!(
        server
            .udp(&query("example.com.", RecordType::A))
            .await
            .answers
            .len(),
        1
    );
    let stats = server.service.stats();
    assert!(stats.malformed() >= 6, "{}", stats.malformed());
    let mut metrics = Vec::new();
    stats.collect(&mut metrics);
    let formerr_total = metrics
        .iter()
        .find(|metric| {
            metric.name == "responses_total" && metric.labels == [("rcode", "formerr".to_owned())]
        })
        .unwrap()
        .value;
    assert!(formerr_total >= 5.0, "{formerr_total}");
}

#[tokio::test]
async fn other_classes_and_zone_transfers_are_refused() {
    let server = TestServer::start(crate::support::ZONE).await;
    let mut chaos = query("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(hickory_proto::rr::DNSClass::CH);
    assert_eq!(
        server.udp(&chaos).await.metadata.response_code,
        ResponseCode::Refused
    );
    let axfr = server.tcp(&query("example.com.", RecordType::AXFR)).await;
    assert_eq!(axfr.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn ecs_on_a_static_answer_is_echoed_with_scope_zero() {
    let server = TestServer::start(crate::support::ZONE).await;
    let response = server
        .udp(&with_edns(
            query("www.example.com.", RecordType::A),
            1232,
            Some(("198.51.100.0", 24)),
        ))
        .await;
    assert_eq!(
        echoed_subnet(&response),
        Some(("198.51.100.0".parse().unwrap(), 24, 0))
    );
}

#[tokio::test]
async fn shutdown_stops_the_listeners() {
    let server = TestServer::start(crate::support::ZONE).await;
    let addr = server.addr;
    drop(server);
    let good = query("example.com.", RecordType::A).to_vec().unwrap();
    let stopped = eventually_async(|| async {
        udp_raw(addr, &good, Duration::from_millis(100))
            .await
            .is_none()
    })
    .await;
    assert!(stopped, "the server still answers after shutdown");
}

async fn eventually_async<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..30 {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn the_unbatched_udp_loop_answers_too() {
    let options = DnsOptions {
        udp_batch: 1,
        ..DnsOptions::default()
    };
    let server = TestServer::start_with(crate::support::ZONE, None, options).await;
    for _ in 0..3 {
        let response = server.udp(&query("www.example.com.", RecordType::A)).await;
        assert_eq!(response.answers.len(), 2);
    }
    // A malformed packet between good ones changes nothing.
    assert!(
        udp_raw(server.addr, &[0; 5], Duration::from_millis(100))
            .await
            .is_none()
    );
    assert_eq!(
        server
            .udp(&query("example.com.", RecordType::A))
            .await
            .answers
            .len(),
        1
    );
}
