//! Every record type, over UDP and TCP.

use hickory_proto::rr::RecordType;

use crate::support::{TestServer, ZONE, query, render};

#[tokio::test]
async fn address_records() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "example.com. A",
            "NOERROR aa | answer: example.com. 300 A 192.0.2.1",
        )
        .await;
    server
        .check(
            "example.com. AAAA",
            "NOERROR aa | answer: example.com. 300 AAAA 2001:db8::1",
        )
        .await;
    server
        .check(
            "www.example.com. A",
            "NOERROR aa | answer: www.example.com. 120 A 192.0.2.10; \
             www.example.com. 120 A 192.0.2.11",
        )
        .await;
}

#[tokio::test]
async fn mx_txt_caa_srv_records() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "example.com. MX",
            "NOERROR aa | answer: example.com. 300 MX 10 mail.example.com.",
        )
        .await;
    server
        .check(
            "example.com. TXT",
            "NOERROR aa | answer: example.com. 300 TXT v=spf1 -all",
        )
        .await;
    server
        .check(
            "example.com. CAA",
            "NOERROR aa | answer: example.com. 300 CAA 0 issue \"letsencrypt.org\"",
        )
        .await;
    // The record's priority field plus "weight port target".
    server
        .check(
            "_sip._tcp.example.com. SRV",
            "NOERROR aa | answer: _sip._tcp.example.com. 300 SRV 10 5 5060 sip.example.com.",
        )
        .await;
    // Four fields: "priority weight port target".
    server
        .check(
            "_xmpp._tcp.example.com. SRV",
            "NOERROR aa | answer: _xmpp._tcp.example.com. 300 SRV 20 0 5222 xmpp.example.net.",
        )
        .await;
}

#[tokio::test]
async fn long_txt_values_are_split_into_255_byte_strings() {
    let long = "x".repeat(600);
    let config = format!(
        r#"{{"domains":[{{"domain":"example.org","dnsRecords":[
          {{"name":"@","type":"TXT","value":"{long}"}}]}}]}}"#
    );
    let server = TestServer::start(&config).await;
    let response = server.tcp(&query("example.org.", RecordType::TXT)).await;
    let record = &response.answers[0];
    let hickory_proto::rr::RData::TXT(txt) = &record.data else {
        panic!("not a TXT record: {record}");
    };
    let lengths: Vec<usize> = txt.txt_data.iter().map(|part| part.len()).collect();
    assert_eq!(lengths, vec![255, 255, 90]);
}

#[tokio::test]
async fn soa_and_ns_are_synthesised_at_the_apex() {
    let server = TestServer::start(ZONE).await;
    let serial = server.cell.load().unwrap().version as u32;
    server
        .check(
            "example.com. SOA",
            &format!(
                "NOERROR aa | answer: example.com. 3600 SOA ns1.example.com. \
                 hostmaster.example.com. {serial} 3600 600 604800 60"
            ),
        )
        .await;
    server
        .check(
            "example.com. NS",
            "NOERROR aa | answer: example.com. 3600 NS ns1.example.com.",
        )
        .await;
}

#[tokio::test]
async fn soa_serial_increases_with_each_snapshot() {
    let server = TestServer::start(ZONE).await;
    let serial = |response: &hickory_proto::op::Message| match &response.answers[0].data {
        hickory_proto::rr::RData::SOA(soa) => soa.serial,
        other => panic!("not an SOA: {other:?}"),
    };
    let first = serial(&server.udp(&query("example.com.", RecordType::SOA)).await);
    server.load(ZONE);
    let second = serial(&server.udp(&query("example.com.", RecordType::SOA)).await);
    assert!(second > first, "{first} then {second}");
}

#[tokio::test]
async fn configured_soa_and_ns_are_served_as_configured() {
    let config = r#"{"domains":[{"domain":"example.net","dnsRecords":[
      {"name":"@","type":"SOA","value":"dns.example.net. admin.example.net. 7 100 50 1000 30","ttl":900},
      {"name":"@","type":"NS","value":"a.ns.example.org","ttl":900},
      {"name":"@","type":"NS","value":"b.ns.example.org","ttl":900}]}]}"#;
    let server = TestServer::start(config).await;
    server
        .check(
            "example.net. SOA",
            "NOERROR aa | answer: example.net. 900 SOA dns.example.net. admin.example.net. \
             7 100 50 1000 30",
        )
        .await;
    server
        .check(
            "example.net. NS",
            "NOERROR aa | answer: example.net. 900 NS a.ns.example.org.; \
             example.net. 900 NS b.ns.example.org.",
        )
        .await;
    // Negative answers carry the SOA with the lower of its TTL and minimum (RFC 2308).
    server
        .check(
            "nope.example.net. A",
            "NXDOMAIN aa | authority: example.net. 30 SOA dns.example.net. admin.example.net. \
             7 100 50 1000 30",
        )
        .await;
}

#[tokio::test]
async fn every_type_answers_the_same_over_tcp() {
    let server = TestServer::start(ZONE).await;
    for (name, kind) in [
        ("example.com.", RecordType::A),
        ("example.com.", RecordType::AAAA),
        ("example.com.", RecordType::MX),
        ("example.com.", RecordType::TXT),
        ("example.com.", RecordType::CAA),
        ("example.com.", RecordType::SOA),
        ("example.com.", RecordType::NS),
        ("_sip._tcp.example.com.", RecordType::SRV),
        ("alias.example.com.", RecordType::A),
        ("nope.example.com.", RecordType::A),
    ] {
        let message = query(name, kind);
        assert_eq!(
            render(&server.tcp(&message).await),
            render(&server.udp(&message).await),
            "{name} {kind}"
        );
    }
}
