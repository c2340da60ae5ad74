//! Config target (`config_compile`): a Core document through `defenra_config::compile`, and
//! every snapshot it accepts through the reloads that follow in the agent (the DNS zone
//! index, the HTTP route table, the shield's policies, the WAF's syntax check), then a few
//! DNS queries for the names it defines.
//!
//! Checks: no reload panics on a snapshot the compiler accepted, and the answers for the
//! document's own names parse.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use defenra_config::Reload;
use defenra_dns::{DnsOptions, DnsService, Transport};
use defenra_http::{HttpOptions, RouteTable};
use defenra_shield::{Shield, ShieldOptions};

struct Services {
    dns: DnsService,
    shield: Shield,
    http_options: HttpOptions,
}

fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| Services {
        dns: DnsService::new(
            None,
            DnsOptions {
                agent_ip: Some("192.0.2.254".parse().expect("an address")),
                ..DnsOptions::default()
            },
        ),
        shield: Shield::new(ShieldOptions {
            table_size: 1024,
            ..ShieldOptions::default()
        }),
        http_options: HttpOptions::default(),
    })
}

/// Target `config_compile`: `data` is a document as Core (or `--config`) would send it.
pub fn compile(data: &[u8]) {
    let Ok(compiled) = defenra_config::compile(data) else {
        return;
    };

    let services = services();
    let snapshot = Arc::new(compiled.snapshot);
    let mut issues = Vec::new();
    services.dns.reload(&snapshot, &mut issues);
    services.shield.reload(&snapshot, &mut issues);
    let routes = RouteTable::build(&snapshot, &services.http_options, &mut issues);
    let _ = routes.len();
    if snapshot
        .domains
        .iter()
        .any(|domain| domain.lua_code.is_some())
    {
        let _ = defenra_waf::check_scripts(&snapshot);
    }

    let source: IpAddr = "192.0.2.1".parse().expect("an address");
    let mut out = Vec::new();
    for domain in snapshot.domains.iter().take(4) {
        for (prefix, qtype) in [("", 1u16), ("www.", 28), ("", 255)] {
            let Some(query) = query(&format!("{prefix}{}", domain.name), qtype) else {
                continue;
            };
            if services
                .dns
                .answer(&query, source, Transport::Udp, &mut out)
            {
                if let Err(error) = hickory_proto::op::Message::from_vec(&out) {
                    panic!("unparseable answer for {}: {error}", domain.name);
                }
            } else {
                panic!("no answer for {}", domain.name);
            }
        }
    }
}

/// A query for `name` (dotted, without the final dot) of type `qtype`, or `None` when the
/// name cannot be written as labels.
fn query(name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut packet = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let mut wire_len = 1;
    for label in name.split('.').filter(|label| !label.is_empty()) {
        if label.len() > 63 {
            return None;
        }
        wire_len += 1 + label.len();
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    if wire_len > 255 {
        return None;
    }
    packet.push(0);
    packet.extend_from_slice(&qtype.to_be_bytes());
    packet.extend_from_slice(&1u16.to_be_bytes());
    Some(packet)
}
