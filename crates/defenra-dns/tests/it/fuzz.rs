//! Property tests: random and mutated packets never panic the handler, and every response
//! is a well-formed DNS message answering the packet's ID.

use std::sync::{Arc, OnceLock};

use defenra_config::Reload;
use defenra_dns::{DnsOptions, DnsService, Transport};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;

use crate::support::{ZONE, query, with_edns};

/// One service for all cases: compiling the zone per case would dominate the run time.
fn service() -> &'static DnsService {
    static SERVICE: OnceLock<DnsService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let service = DnsService::new(None, DnsOptions::default());
        let compiled = defenra_config::compile(ZONE.as_bytes()).unwrap();
        service.reload(&Arc::new(compiled.snapshot), &mut Vec::new());
        service
    })
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (name, kind) in [
        ("example.com.", RecordType::A),
        ("alias2.example.com.", RecordType::A),
        ("x.wild.example.com.", RecordType::TXT),
        ("nope.example.com.", RecordType::MX),
    ] {
        seeds.push(query(name, kind).to_vec().unwrap());
        seeds.push(
            with_edns(query(name, kind), 1232, Some(("192.0.2.0", 24)))
                .to_vec()
                .unwrap(),
        );
    }
    seeds
}

/// The response is a parseable message with QR=1 and the query's ID.
fn check_response(packet: &[u8], sent: bool, out: &[u8]) -> Result<(), TestCaseError> {
    if !sent {
        // Only packets shorter than a header, or responses, go unanswered.
        prop_assert!(packet.len() < 12 || packet[2] & 0x80 != 0);
        return Ok(());
    }
    prop_assert!(out.len() >= 12);
    prop_assert_eq!(&out[..2], &packet[..2]);
    prop_assert!(out[2] & 0x80 != 0);
    let parsed = Message::from_vec(out);
    prop_assert!(parsed.is_ok(), "unparseable response {:?}", parsed.err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
        let service = service();
        let mut out = Vec::new();
        for transport in [Transport::Udp, Transport::Tcp] {
            let sent = service.answer(&packet, "192.0.2.1".parse().unwrap(), transport, &mut out);
            check_response(&packet, sent, &out)?;
        }
    }

    #[test]
    fn mutated_queries_never_panic(
        seed in 0usize..8,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let service = service();
        let mut packet = seeds()[seed].clone();
        for (at, byte) in flips {
            let len = packet.len();
            packet[at % len] = byte;
        }
        if cut % 4 == 0 {
            packet.truncate(cut % (packet.len() + 1));
        }
        let mut out = Vec::new();
        let sent = service.answer(&packet, "192.0.2.1".parse().unwrap(), Transport::Udp, &mut out);
        check_response(&packet, sent, &out)?;
        if sent && out.len() > 512 {
            // Without EDNS the answer fits 512 bytes; with it, the 1232 clamp.
            prop_assert!(out.len() <= 1232);
        }
    }
}
