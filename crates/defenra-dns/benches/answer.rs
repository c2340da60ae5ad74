//! Time of the query handler alone (no sockets): `cargo bench -p defenra-dns`.
//!
//! Plain `std::time::Instant` over a million queries per case; the socket-level comparison
//! with knot is `cargo xtask bench dns` (and `dns-rrl` under a spoofed-prefix flood). The
//! RRL cases read the clock once per query here; the UDP loops read it once per batch.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use defenra_config::Reload;
use defenra_dns::{DnsOptions, DnsService, RrlOptions, Transport};
use defenra_geo::mmdb_writer::MmdbWriter;
use defenra_geo::{GeoLookup, MaxMindGeo};

const CONFIG: &str = r#"{"domains":[{"domain":"example.com","dnsRecords":[
  {"name":"@","type":"A","value":"192.0.2.1"},
  {"name":"www","type":"A","value":"192.0.2.10"},
  {"name":"www","type":"AAAA","value":"2001:db8::10"},
  {"name":"@","type":"MX","value":"mail.example.com","priority":10},
  {"name":"@","type":"TXT","value":"v=spf1 include:_spf.example.com -all"},
  {"name":"geo","type":"A","value":"203.0.113.5","httpProxyEnabled":true}],
  "geoDnsMap":{"de":"10.0.0.2","us":"10.0.0.3","europe":"10.0.0.4","default":"10.0.0.9"}}]}"#;

/// A query message for `name` and `qtype`, with EDNS and optionally a client subnet.
fn query(name: &str, qtype: u16, ecs: Option<[u8; 3]>) -> Vec<u8> {
    let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
    match ecs {
        None => out.extend_from_slice(&[0, 0]),
        Some(prefix) => {
            out.extend_from_slice(&[0, 11, 0, 8, 0, 7, 0, 1, 24, 0]);
            out.extend_from_slice(&prefix);
        }
    }
    out
}

fn main() {
    let mut writer = MmdbWriter::new();
    writer.insert("81.0.0.0".parse().unwrap(), 8, Some("DE"), Some("EU"));
    writer.insert("87.0.0.0".parse().unwrap(), 8, Some("US"), Some("NA"));
    let geo: Arc<dyn GeoLookup> = Arc::new(MaxMindGeo::from_bytes(writer.to_bytes()).unwrap());
    let service = DnsService::new(Some(geo), DnsOptions::default());
    let compiled = defenra_config::compile(CONFIG.as_bytes()).unwrap();
    service.reload(&Arc::new(compiled.snapshot.clone()), &mut Vec::new());

    let cases = [
        ("A", query("www.example.com", 1, None)),
        ("AAAA", query("www.example.com", 28, None)),
        ("MX", query("example.com", 15, None)),
        ("TXT", query("example.com", 16, None)),
        ("NXDOMAIN", query("nope.example.com", 1, None)),
        ("geo A + ECS", query("geo.example.com", 1, Some([81, 2, 3]))),
    ];
    // Response rate limiting: a rate no query reaches (every response charged and sent),
    // and a rate of 1 (every response after the first dropped).
    let limited = |rate: u32, window: u64| {
        let service = DnsService::new(
            None,
            DnsOptions {
                rrl: RrlOptions {
                    rate,
                    window: Duration::from_secs(window),
                    ..RrlOptions::default()
                },
                ..DnsOptions::default()
            },
        );
        service.reload(&Arc::new(compiled.snapshot.clone()), &mut Vec::new());
        service
    };
    let rrl_sent = limited(1_000_000, 60);
    let rrl_dropped = limited(1, 1);
    let www = query("www.example.com", 1, None);
    let mut runs: Vec<(&str, &DnsService, &[u8])> = cases
        .iter()
        .map(|(label, packet)| (*label, &service, packet.as_slice()))
        .collect();
    runs.push(("A, RRL sent", &rrl_sent, &www));
    runs.push(("A, RRL drop", &rrl_dropped, &www));

    let source = "127.0.0.1".parse().unwrap();
    let mut out = Vec::with_capacity(65_535);
    const N: u32 = 1_000_000;
    for (label, service, packet) in runs {
        let start = Instant::now();
        for _ in 0..N {
            black_box(service.answer(black_box(packet), source, Transport::Udp, &mut out));
        }
        let elapsed = start.elapsed();
        println!(
            "{label:<12} {:>7.1} ns/query  ({} bytes out)",
            elapsed.as_nanos() as f64 / f64::from(N),
            out.len()
        );
    }
}
