//! DNS targets: one packet through the answer path over UDP and TCP (`dns_answer`), and a
//! byte stream through the DNS-over-TCP connection loop (`dns_tcp`).
//!
//! Both serve a GeoDNS snapshot with every record type the agent serves, CNAME chains and
//! loops, wildcards, proxied names, weighted pools, and a real MaxMind-format GeoIP
//! database, so that ECS addresses in the fuzzed packets select different answers.
//!
//! Checks: a packet gets no response only when it is shorter than a header or is itself a
//! response; every response parses (hickory-proto), carries the query's ID with QR set,
//! and over UDP fits 512 bytes without EDNS and the advertised (clamped) size with it. The
//! TCP loop answers the complete messages of the stream, in order, one response each (the
//! IDs match), stops at a zero length or after the query budget, and frames every
//! response with its length.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use defenra_config::Reload;
use defenra_dns::{DnsOptions, DnsService, Transport};
use defenra_geo::mmdb_writer::MmdbWriter;
use defenra_geo::{GeoLookup, MaxMindGeo};
use hickory_proto::op::{Message, MessageType};

use crate::{Input, Rng};

/// The zone the DNS targets serve (Core's JSON, compiled by the real compiler).
pub const ZONE: &str = r#"{"success":true,"domains":[
 {"domain":"example.com","dnsRecords":[
  {"name":"@","type":"A","value":"192.0.2.1","ttl":300},
  {"name":"@","type":"AAAA","value":"2001:db8::1","ttl":300},
  {"name":"@","type":"MX","value":"mail.example.com","priority":10,"ttl":300},
  {"name":"@","type":"TXT","value":"v=spf1 -all","ttl":300},
  {"name":"@","type":"CAA","value":"0 issue \"letsencrypt.org\"","ttl":300},
  {"name":"@","type":"NS","value":"ns1.example.com","ttl":86400},
  {"name":"ns1","type":"A","value":"192.0.2.53","ttl":86400},
  {"name":"www","type":"A","value":"192.0.2.10","ttl":120},
  {"name":"www","type":"A","value":"192.0.2.11","ttl":120},
  {"name":"many","type":"TXT","value":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","ttl":60},
  {"name":"many","type":"TXT","value":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","ttl":60},
  {"name":"many","type":"TXT","value":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","ttl":60},
  {"name":"_sip._tcp","type":"SRV","value":"5 5060 sip.example.com.","priority":10,"ttl":300},
  {"name":"alias","type":"CNAME","value":"www.example.com","ttl":300},
  {"name":"alias2","type":"CNAME","value":"alias.example.com.","ttl":300},
  {"name":"outside","type":"CNAME","value":"target.example.net","ttl":300},
  {"name":"loop1","type":"CNAME","value":"loop2.example.com","ttl":300},
  {"name":"loop2","type":"CNAME","value":"loop1.example.com","ttl":300},
  {"name":"*.wild","type":"A","value":"192.0.2.30","ttl":300},
  {"name":"host.wild","type":"TXT","value":"real","ttl":300},
  {"name":"a.b.deep","type":"A","value":"192.0.2.40","ttl":300}
 ]},
 {"domain":"geo.example","dnsRecords":[
  {"name":"www","type":"A","value":"203.0.113.50","httpProxyEnabled":true},
  {"name":"cdn","type":"CNAME","value":"origin.example.net","httpProxyEnabled":true},
  {"name":"plain","type":"A","value":"203.0.113.60","ttl":300},
  {"name":"us-edge","type":"A","value":"10.0.0.4","locationCode":"us"}
 ],
 "geoDnsAgentPools":{"jp":[{"ip":"10.0.0.1","weight":1},{"ip":"10.0.0.11","weight":3},{"ip":"2001:db8::11","weight":2}]},
 "geoDnsMap":{"de":"10.0.0.2","fr":"10.0.0.3, 2001:db8::3","europe":"10.0.0.5","default":"10.0.0.9"},
 "geoDnsFallbackMap":{"it":"10.0.0.6"}},
 {"domain":"shop.example.com","dnsRecords":[
  {"name":"@","type":"A","value":"198.51.100.1","ttl":300}]}
],
"agents":[{"agentIp":"10.0.0.7","countryCode":"AU"},{"agentIp":"2001:db8::7","countryCode":"US"}]}"#;

/// The service both targets query, built once per process.
pub fn service() -> &'static DnsService {
    static SERVICE: OnceLock<DnsService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let options = DnsOptions {
            agent_ip: Some("192.0.2.254".parse().expect("an address")),
            ..DnsOptions::default()
        };
        let service = DnsService::new(Some(geoip()), options);
        let compiled = defenra_config::compile(ZONE.as_bytes()).expect("the fuzz zone compiles");
        assert!(compiled.issues.is_empty(), "{:?}", compiled.issues);
        service.reload(&Arc::new(compiled.snapshot), &mut Vec::new());
        service
    })
}

fn geoip() -> Arc<dyn GeoLookup> {
    let mut writer = MmdbWriter::new();
    for (network, country, continent) in [
        ("81.0.0.0", "DE", "EU"),
        ("82.0.0.0", "FR", "EU"),
        ("83.0.0.0", "IT", "EU"),
        ("86.0.0.0", "JP", "AS"),
        ("87.0.0.0", "US", "NA"),
        ("192.0.0.0", "AU", "OC"),
    ] {
        writer.insert(
            network.parse().expect("an address"),
            8,
            Some(country),
            Some(continent),
        );
    }
    writer.insert(
        "2a00::".parse().expect("an address"),
        12,
        Some("FR"),
        Some("EU"),
    );
    Arc::new(MaxMindGeo::from_bytes(writer.to_bytes()).expect("the fuzz database opens"))
}

/// Client addresses the packets come from (picked by the query ID): with and without a
/// GeoIP entry, IPv4 and IPv6.
const SOURCES: [&str; 4] = ["81.2.3.4", "198.51.100.9", "2a00::5", "127.0.0.1"];

fn source_of(packet: &[u8]) -> IpAddr {
    let id = packet.get(1).copied().unwrap_or(0);
    SOURCES[usize::from(id) % SOURCES.len()]
        .parse()
        .expect("an address")
}

/// Target `dns_answer`: `data` is one DNS message, answered as arriving over UDP and over TCP.
pub fn answer(data: &[u8]) {
    let service = service();
    let source = source_of(data);
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        let sent = service.answer(data, source, transport, &mut out);
        check_answer(data, sent.then_some(out.as_slice()), transport);
    }
}

/// The checks on the response (`None`: nothing sent) to one query message.
fn check_answer(query: &[u8], response: Option<&[u8]>, transport: Transport) {
    let Some(response) = response else {
        assert!(
            query.len() < 12 || query[2] & 0x80 != 0,
            "a query got no response"
        );
        return;
    };
    assert!(
        query.len() >= 12 && query[2] & 0x80 == 0,
        "a non-query got a response"
    );
    assert!(response.len() >= 12, "response shorter than a header");
    assert_eq!(
        response[..2],
        query[..2],
        "response ID differs from the query's"
    );
    let message = match Message::from_vec(response) {
        Ok(message) => message,
        Err(error) => panic!("unparseable response ({error}): {response:02x?}"),
    };
    assert_eq!(message.metadata.message_type, MessageType::Response);
    if transport == Transport::Udp {
        // RFC 1035 §4.2.1 and RFC 6891 §6.2.5: 512 without EDNS; never more than we allow
        // (1232) with it.
        let limit = if message.edns.is_some() { 1232 } else { 512 };
        assert!(
            response.len() <= limit,
            "udp response of {} bytes over {limit}",
            response.len()
        );
    }
}

/// Target `dns_tcp`: `data` is a DNS-over-TCP byte stream after one byte that chooses how
/// the stream is cut into reads.
pub fn tcp(data: &[u8]) {
    let mut input = Input::new(data);
    let mut rng = Rng::new(u64::from(input.u8()) << 32 | data.len() as u64);
    let stream = input.rest();
    let max_read = match rng.next_u64() % 4 {
        // A byte per read costs a loop turn per byte: only for short streams.
        0 if stream.len() <= 512 => 1,
        0 => 16,
        1 => 3,
        2 => 64,
        _ => 4096,
    };
    let mut reads = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let len = rng.size(max_read).min(stream.len() - at);
        reads.push(stream[at..at + len].to_vec());
        at += len;
    }
    let peer: SocketAddr = "81.2.3.4:5353".parse().expect("an address");
    let runtime = runtime();
    let written = runtime.block_on(defenra_dns::fuzzing::answer_tcp_stream(
        service(),
        peer,
        reads,
    ));

    // The messages the stream holds, as the loop must see them.
    let budget = service().options().tcp_max_queries.max(1);
    let mut expected = Vec::new();
    let mut rest = stream;
    let mut n_messages = 0;
    while let [hi, lo, body @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if len == 0 || body.len() < len || n_messages == budget {
            break;
        }
        let message = &body[..len];
        n_messages += 1;
        if message.len() >= 12 && message[2] & 0x80 == 0 {
            expected.push(message);
        }
        rest = &body[len..];
    }

    let mut frames = &written[..];
    for query in expected {
        let [hi, lo, body @ ..] = frames else {
            panic!("a complete query got no response over tcp");
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        assert!(body.len() >= len, "a response frame is cut short");
        check_answer(query, Some(&body[..len]), Transport::Tcp);
        frames = &body[len..];
    }
    assert!(
        frames.is_empty(),
        "bytes written beyond the expected responses"
    );
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}
