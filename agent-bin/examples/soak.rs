//! Soak test of the agent binary (`cargo xtask soak --minutes N`): mixed, bounded load on
//! loopback while Core swaps the config every few seconds. Prints what was served, errors
//! by kind, and the agent's RSS and open descriptors after warm-up and at the end; exits
//! non-zero when RSS grew more than 10 %, descriptors leaked, or a well-formed request
//! failed.

#[allow(dead_code)]
#[path = "../tests/it/support.rs"]
mod support;

#[allow(dead_code)]
#[path = "../tests/it/e2e_support.rs"]
mod e2e_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defenra_config::testing::{Answer, FakeCore};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use e2e_support::*;
use support::Agent;

/// Counters shared by the load tasks.
#[derive(Default)]
struct Tally {
    served: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Failures of well-formed requests, which fail the soak.
    hard_failures: AtomicU64,
}

impl Tally {
    fn ok(&self, kind: &'static str) {
        *self.served.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn fail(&self, kind: &str, detail: impl std::fmt::Display) {
        self.hard_failures.fetch_add(1, Relaxed);
        let mut errors = self.errors.lock().unwrap();
        let entry = errors.entry(format!("{kind}: {detail}")).or_default();
        *entry += 1;
        if *entry == 1 {
            eprintln!("soak: {kind} failed: {detail}");
        }
    }
}

fn config(
    version: u32,
    cert: &(String, String, CertificateDer<'static>),
    tcp: (u16, SocketAddr),
    udp: (u16, SocketAddr),
) -> String {
    json!({
        "success": true,
        "domains": [
            {
                "domain": "shop.test",
                "dnsRecords": [
                    {"name": "@", "type": "A", "value": "127.0.0.1", "httpProxyEnabled": true},
                    {"name": format!("v{version}"), "type": "TXT", "value": format!("version {version}")},
                    {"name": "mail", "type": "MX", "value": "mx.shop.test", "priority": 10}
                ],
                "geoDnsMap": {"us": "192.0.2.1", "default": "192.0.2.9"},
                "ssl": {"enabled": true, "certificate": cert.0, "privateKey": cert.1},
                "luaCode": format!(
                    "if ngx.var.uri == '/admin' then return ngx.exit(403) end\n\
                     local n = ngx.shared.cache:incr('hits', 1, 0)\n\
                     ngx.header['X-Config'] = '{version}'"
                )
            },
            {"domain": "dns-only.test", "dnsRecords": [{"name": "*", "type": "A", "value": "192.0.2.80"}]}
        ],
        "proxies": [
            {"type": "tcp", "sourcePort": tcp.0, "destinationHost": "127.0.0.1", "destinationPort": tcp.1.port(), "enabled": true},
            {"type": "udp", "sourcePort": udp.0, "destinationHost": "127.0.0.1", "destinationPort": udp.1.port(), "enabled": true}
        ]
    })
    .to_string()
}

/// RSS in KiB and open descriptors of `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count());
    (rss, fds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let minutes: f64 = std::env::args()
        .skip_while(|arg| arg != "--minutes")
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or(1.0);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let warm_up = (duration / 10).min(Duration::from_secs(60));

    let origin = start_origin().await;
    let tcp_echo = start_tcp_echo().await;
    let udp_echo = start_udp_echo().await;
    let (tcp_port, udp_port) = (free_port(), free_port());
    let certs = [certificate(&["shop.test"]), certificate(&["shop.test"])];
    let roots: Vec<_> = certs.iter().map(|cert| cert.2.clone()).collect();
    let docs: Vec<String> = (0..2)
        .map(|version| {
            config(
                version,
                &certs[version as usize],
                (tcp_port, tcp_echo),
                (udp_port, udp_echo),
            )
        })
        .collect();
    let core = FakeCore::start(Answer::Json(docs[0].clone())).await;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(&[
        "--core-url",
        &core.url(),
        "--agent-id",
        "soak",
        "--agent-key",
        "soak-key",
        "--poll-interval",
        "1",
        "--origin-http-port",
        &origin.port().to_string(),
        "--state-dir",
        dir.path().to_str().unwrap_or("/tmp"),
    ]);
    let pid = agent.child.id();
    let (dns, http, https) = (agent.addr("dns"), agent.addr("http"), agent.addr("https"));
    let tcp_forward: SocketAddr = format!("127.0.0.1:{tcp_port}").parse()?;
    let udp_forward: SocketAddr = format!("127.0.0.1:{udp_port}").parse()?;
    support::eventually("config served", || {
        support::get_json(agent.addr("health"), "/health").0 == 200
    });

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();

    // Config swaps every 3 s.
    {
        let core_docs = docs.clone();
        let core = Arc::new(core);
        let swapper = Arc::clone(&core);
        tasks.push(tokio::spawn(async move {
            let mut version = 0;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(3)).await;
                version = 1 - version;
                swapper.set(Answer::Json(core_docs[version].clone()));
            }
        }));
    }

    // DNS: well-formed queries must be answered; malformed packets are thrown in between.
    for worker in 0..2 {
        let tally = Arc::clone(&tally);
        tasks.push(tokio::spawn(async move {
            let socket = match tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                Ok(socket) => socket,
                Err(error) => return tally.fail("dns socket", error),
            };
            let mut counter: u64 = worker;
            while Instant::now() < deadline {
                counter += 1;
                if counter.is_multiple_of(10) {
                    let garbage: Vec<u8> = (0..(counter % 64))
                        .map(|i| (i * 31 + counter) as u8)
                        .collect();
                    let _ = socket.send_to(&garbage, dns).await;
                    tally.ok("dns malformed sent");
                    continue;
                }
                let name = match counter % 3 {
                    0 => "shop.test",
                    1 => "anything.dns-only.test",
                    _ => "mail.shop.test",
                };
                let (rcode, _) = dns_a(dns, name, None).await;
                if rcode == "NOERROR" {
                    tally.ok("dns query");
                } else {
                    tally.fail("dns query", rcode);
                }
            }
        }));
    }

    // HTTP: proxied requests and WAF blocks on keep-alive-free connections.
    for _ in 0..4 {
        let tally = Arc::clone(&tally);
        tasks.push(tokio::spawn(async move {
            let mut counter = 0u64;
            while Instant::now() < deadline {
                counter += 1;
                let (path, expected) = if counter.is_multiple_of(5) {
                    ("/admin", 403)
                } else {
                    ("/item", 200)
                };
                match http_get(http, "shop.test", path).await {
                    Ok((status, _, _)) if status == expected => tally.ok(if expected == 200 {
                        "http 200"
                    } else {
                        "http waf 403"
                    }),
                    other => tally.fail("http", format!("{path}: {other:?}")),
                }
            }
        }));
    }

    // HTTPS, new handshake each time.
    {
        let tally = Arc::clone(&tally);
        let roots = roots.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match https_get(https, "shop.test", "/tls", &roots).await {
                    Ok((200, _, _)) => tally.ok("https 200"),
                    other => tally.fail(
                        "https",
                        format!("{:?}", other.map(|(status, body, _)| (status, body))),
                    ),
                }
            }
        }));
    }

    // Slow and aborted clients: not counted as failures, only as load.
    {
        let tally = Arc::clone(&tally);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(http).await {
                    let _ = stream
                        .write_all(b"GET /slow HTTP/1.1\r\nHost: shop.test\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    drop(stream);
                    tally.ok("slow client");
                }
                if let Ok(mut stream) = tokio::net::TcpStream::connect(http).await {
                    let _ = stream
                        .write_all(b"GET /stream HTTP/1.1\r\nHost: shop.test\r\n\r\n")
                        .await;
                    let mut buffer = [0u8; 512];
                    let _ =
                        tokio::time::timeout(Duration::from_millis(400), stream.read(&mut buffer))
                            .await;
                    drop(stream);
                    tally.ok("aborted download");
                }
            }
        }));
    }

    // L4: TCP echo on a new connection each time; UDP echo from a pool of 16 client
    // sockets, so the agent keeps 16 sessions (a new source port per datagram would only
    // measure the session table filling up to its cap).
    {
        let tally = Arc::clone(&tally);
        tasks.push(tokio::spawn(async move {
            let mut clients = Vec::new();
            for _ in 0..16 {
                match tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                    Ok(socket) if socket.connect(udp_forward).await.is_ok() => clients.push(socket),
                    _ => return tally.fail("udp socket", "cannot bind"),
                }
            }
            let mut round = 0usize;
            let mut buffer = [0u8; 256];
            while Instant::now() < deadline {
                match tcp_echo_through(tcp_forward, b"soak tcp").await {
                    Ok(reply) if reply == b"soak tcp" => tally.ok("l4 tcp"),
                    other => tally.fail("l4 tcp", format!("{other:?}")),
                }
                round += 1;
                let client = &clients[round % clients.len()];
                let mut answered = false;
                for _ in 0..3 {
                    let _ = client.send(b"soak udp").await;
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(700), client.recv(&mut buffer))
                            .await
                    {
                        answered = &buffer[..n] == b"echo:soak udp";
                        break;
                    }
                }
                if answered {
                    tally.ok("l4 udp");
                } else {
                    tally.fail("l4 udp", "no echo");
                }
            }
        }));
    }

    tokio::time::sleep(warm_up).await;
    let (rss_start, fds_start) = usage(pid);
    eprintln!("soak: after {warm_up:?} warm-up: RSS {rss_start} KiB, {fds_start} fds");
    for task in tasks {
        task.await?;
    }
    // Let closed connections and idle sessions go before counting descriptors.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_end, fds_end) = usage(pid);
    let health = support::get_json(agent.addr("health"), "/health");

    println!(
        "soak: {:.1} minutes, config swapped every 3 s",
        start.elapsed().as_secs_f64() / 60.0
    );
    for (kind, count) in tally.served.lock().unwrap().iter() {
        println!("  served {kind:<22} {count}");
    }
    let errors = tally.errors.lock().unwrap();
    if errors.is_empty() {
        println!("  errors: none");
    }
    for (kind, count) in errors.iter() {
        println!("  error  {kind}: {count}");
    }
    let growth = if rss_start > 0 {
        (rss_end as f64 / rss_start as f64 - 1.0) * 100.0
    } else {
        0.0
    };
    println!("  RSS after warm-up {rss_start} KiB, at end {rss_end} KiB ({growth:+.1} %)");
    println!("  fds after warm-up {fds_start}, at end {fds_end}");
    println!("  health at end: {}", health.0);

    let mut failed = Vec::new();
    if tally.hard_failures.load(Relaxed) > 0 {
        failed.push(format!(
            "{} well-formed requests failed",
            tally.hard_failures.load(Relaxed)
        ));
    }
    if growth > 10.0 {
        failed.push(format!("RSS grew {growth:.1} % after warm-up"));
    }
    if fds_end > fds_start + 8 {
        failed.push(format!("descriptors grew from {fds_start} to {fds_end}"));
    }
    if health.0 != 200 {
        failed.push("the agent is not healthy at the end".to_owned());
    }
    if failed.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        println!("soak: FAIL: {}", failed.join("; "));
        std::process::exit(1);
    }
}
