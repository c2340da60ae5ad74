//! Authoritative semantics: REFUSED, NXDOMAIN and NODATA with SOA, zone cuts between served
//! zones, CNAME chasing, wildcards, empty non-terminals, case, ANY.

use hickory_proto::rr::RecordType;

use crate::support::{TestServer, ZONE, query};

const SOA: &str = "example.com. 60 SOA ns1.example.com. hostmaster.example.com.";

async fn check_prefix(server: &TestServer, question: &str, expected_prefix: &str) {
    let response = server.udp(&crate::support::query_text(question)).await;
    let rendered = crate::support::render(&response);
    assert!(
        rendered.starts_with(expected_prefix),
        "question {question}\n  got: {rendered}\n want: {expected_prefix}..."
    );
}

#[tokio::test]
async fn names_outside_served_zones_are_refused_without_aa() {
    let server = TestServer::start(ZONE).await;
    server.check("example.org. A", "REFUSED").await;
    server.check("com. NS", "REFUSED").await;
    server.check(". NS", "REFUSED").await;
    server.check("badexample.com. A", "REFUSED").await;
}

#[tokio::test]
async fn missing_names_are_nxdomain_and_missing_types_nodata_with_soa() {
    let server = TestServer::start(ZONE).await;
    check_prefix(
        &server,
        "nope.example.com. A",
        &format!("NXDOMAIN aa | authority: {SOA}"),
    )
    .await;
    check_prefix(
        &server,
        "www.example.com. MX",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
    // An empty non-terminal exists (RFC 8020): NODATA, not NXDOMAIN.
    check_prefix(
        &server,
        "b.deep.example.com. A",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
    check_prefix(
        &server,
        "deep.example.com. A",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
    // Unknown types are NODATA too.
    check_prefix(
        &server,
        "www.example.com. HINFO",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
}

#[tokio::test]
async fn the_longest_served_zone_wins() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "shop.example.com. A",
            "NOERROR aa | answer: shop.example.com. 300 A 198.51.100.1",
        )
        .await;
    // `in.shop` configured in example.com lies inside shop.example.com: shop's record wins.
    server
        .check(
            "in.shop.example.com. A",
            "NOERROR aa | answer: in.shop.example.com. 300 A 198.51.100.2",
        )
        .await;
    check_prefix(
        &server,
        "nope.shop.example.com. A",
        "NXDOMAIN aa | authority: shop.example.com. 60 SOA ns1.shop.example.com.",
    )
    .await;
}

#[tokio::test]
async fn a_record_inside_another_served_zone_is_reported() {
    let server = TestServer::start(ZONE).await;
    let issues = server.load(ZONE);
    assert!(
        issues
            .iter()
            .any(|issue| issue.message.contains("in.shop.example.com")),
        "{issues:?}"
    );
}

#[tokio::test]
async fn cname_answers_any_type_and_is_chased_inside_served_zones() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "alias.example.com. A",
            "NOERROR aa | answer: alias.example.com. 300 CNAME www.example.com.; \
             www.example.com. 120 A 192.0.2.10; www.example.com. 120 A 192.0.2.11",
        )
        .await;
    server
        .check(
            "alias2.example.com. A",
            "NOERROR aa | answer: alias2.example.com. 300 CNAME alias.example.com.; \
             alias.example.com. 300 CNAME www.example.com.; \
             www.example.com. 120 A 192.0.2.10; www.example.com. 120 A 192.0.2.11",
        )
        .await;
    // The CNAME itself when asked for.
    server
        .check(
            "alias.example.com. CNAME",
            "NOERROR aa | answer: alias.example.com. 300 CNAME www.example.com.",
        )
        .await;
    // Chased target without the type: NODATA with the target zone's SOA.
    check_prefix(
        &server,
        "alias.example.com. MX",
        &format!(
            "NOERROR aa | answer: alias.example.com. 300 CNAME www.example.com. | authority: {SOA}"
        ),
    )
    .await;
    // A target outside every served zone is left to the resolver.
    server
        .check(
            "outside.example.com. A",
            "NOERROR aa | answer: outside.example.com. 300 CNAME target.example.net.",
        )
        .await;
    // A missing in-zone target: NXDOMAIN for the last name (RFC 6604).
    check_prefix(
        &server,
        "dangling.example.com. A",
        &format!(
            "NXDOMAIN aa | answer: dangling.example.com. 300 CNAME missing.example.com. | authority: {SOA}"
        ),
    )
    .await;
}

#[tokio::test]
async fn cname_loops_stop() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "loop1.example.com. A",
            "NOERROR aa | answer: loop1.example.com. 300 CNAME loop2.example.com.; \
             loop2.example.com. 300 CNAME loop1.example.com.",
        )
        .await;
}

#[tokio::test]
async fn wildcards_synthesise_only_where_no_name_exists() {
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "anything.wild.example.com. A",
            "NOERROR aa | answer: anything.wild.example.com. 300 A 192.0.2.30",
        )
        .await;
    // RFC 4592 §2.2.1: the wildcard covers one level below its closest encloser only
    // when nothing closer exists; x.anything.wild has closest encloser wild too.
    server
        .check(
            "x.anything.wild.example.com. A",
            "NOERROR aa | answer: x.anything.wild.example.com. 300 A 192.0.2.30",
        )
        .await;
    // An existing name is not covered by the wildcard, even for a type it lacks.
    check_prefix(
        &server,
        "host.wild.example.com. A",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
    // Below an existing name with no wildcard of its own: NXDOMAIN.
    check_prefix(
        &server,
        "a.host.wild.example.com. A",
        &format!("NXDOMAIN aa | authority: {SOA}"),
    )
    .await;
    // The wildcard type check: NODATA for a type the wildcard lacks.
    check_prefix(
        &server,
        "other.wild.example.com. MX",
        &format!("NOERROR aa | authority: {SOA}"),
    )
    .await;
}

#[tokio::test]
async fn names_are_case_insensitive_and_the_question_is_echoed_as_sent() {
    let server = TestServer::start(ZONE).await;
    let response = server.udp(&query("WwW.ExAmPlE.cOm.", RecordType::A)).await;
    assert_eq!(response.queries[0].name().to_string(), "WwW.ExAmPlE.cOm.");
    assert_eq!(response.answers.len(), 2);
    assert!(response.metadata.authoritative);
    assert_eq!(response.metadata.id, 0x5eed);
    assert!(response.metadata.recursion_desired);
    assert!(!response.metadata.recursion_available);
}

/// The record types of an answer section, sorted.
fn answer_types(response: &hickory_proto::op::Message) -> Vec<RecordType> {
    let mut types: Vec<RecordType> = response
        .answers
        .iter()
        .map(|record| record.record_type())
        .collect();
    types.sort_unstable_by_key(|kind| u16::from(*kind));
    types
}

#[tokio::test]
async fn any_over_udp_gets_one_rrset_and_over_tcp_every_rrset() {
    let server = TestServer::start(ZONE).await;
    // RFC 8482 §4.1 over UDP: one RRset, the smallest (the apex's A).
    let udp = server.udp(&query("example.com.", RecordType::ANY)).await;
    assert_eq!(answer_types(&udp), [RecordType::A]);
    assert!(!udp.metadata.truncation);
    // Over TCP the client is who it says it is: the full set.
    let tcp = server.tcp(&query("example.com.", RecordType::ANY)).await;
    assert_eq!(
        answer_types(&tcp),
        [
            RecordType::A,
            RecordType::NS,
            RecordType::SOA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::AAAA,
            RecordType::CAA
        ]
    );
    // Two A records at www: one RRset is both records.
    let www = server
        .tcp(&query("www.example.com.", RecordType::ANY))
        .await;
    assert_eq!(answer_types(&www), [RecordType::A, RecordType::A]);
    // An empty non-terminal has no RRset: NODATA either way.
    for response in [
        server
            .udp(&query("b.deep.example.com.", RecordType::ANY))
            .await,
        server
            .tcp(&query("b.deep.example.com.", RecordType::ANY))
            .await,
    ] {
        assert!(response.answers.is_empty());
        assert_eq!(response.authorities.len(), 1);
    }
}

#[tokio::test]
async fn any_at_a_cname_is_the_cname_itself() {
    // RFC 1034 §4.3.2 step 3a: ANY matches the CNAME, so it is not chased.
    let server = TestServer::start(ZONE).await;
    server
        .check(
            "alias.example.com. ANY",
            "NOERROR aa | answer: alias.example.com. 300 CNAME www.example.com.",
        )
        .await;
    let tcp = server
        .tcp(&query("alias.example.com.", RecordType::ANY))
        .await;
    assert_eq!(answer_types(&tcp), [RecordType::CNAME]);
}

#[tokio::test]
async fn before_the_first_config_everything_is_refused() {
    let server = TestServer::start(r#"{"domains":[]}"#).await;
    server.check("example.com. A", "REFUSED").await;
}

#[tokio::test]
async fn the_soa_keeps_its_ttl_in_answers_and_the_negative_ttl_in_authority() {
    // The index writes each zone's SOA once; the authority copy gets the negative TTL.
    let server = TestServer::start(
        r#"{"domains":[{"domain":"soa.example","dnsRecords":[
          {"name":"@","type":"SOA","value":"ns1.soa.example. admin.soa.example. 7 3600 600 604800 120","ttl":900},
          {"name":"www","type":"A","value":"192.0.2.1"}]}]}"#,
    )
    .await;
    for _ in 0..2 {
        check_prefix(
            &server,
            "soa.example. SOA",
            "NOERROR aa | answer: soa.example. 900 SOA ns1.soa.example. admin.soa.example. 7",
        )
        .await;
        check_prefix(
            &server,
            "nope.soa.example. A",
            "NXDOMAIN aa | authority: soa.example. 120 SOA ns1.soa.example. admin.soa.example. 7",
        )
        .await;
    }
}

#[tokio::test]
async fn any_over_tcp_sends_the_rrsets_that_fit_in_one_message() {
    // 4,000 A records (56 KB) and 2,000 AAAA records (52 KB) at one name: both cannot go in
    // one 65,535-byte TCP message, so the answer holds the RRsets that fit.
    let mut records = Vec::new();
    for n in 0..4000u32 {
        records.push(format!(
            r#"{{"name":"many","type":"A","value":"10.0.{}.{}"}}"#,
            n / 250,
            n % 250 + 1
        ));
    }
    for n in 0..2000u32 {
        records.push(format!(
            r#"{{"name":"many","type":"AAAA","value":"2001:db8::{:x}"}}"#,
            n + 1
        ));
    }
    let config = format!(
        r#"{{"domains":[{{"domain":"example.com","dnsRecords":[{}]}}]}}"#,
        records.join(",")
    );
    let server = TestServer::start(&config).await;
    let response = server
        .tcp(&query("many.example.com.", RecordType::ANY))
        .await;
    assert!(!response.metadata.truncation);
    assert_eq!(response.answers.len(), 4000);
    assert!(
        response
            .answers
            .iter()
            .all(|record| record.record_type() == RecordType::A)
    );
}
