//! The legitimate clients that run beside every attack: DNS over UDP and TCP, HTTP, HTTPS
//! and the TCP forward's echo, each about 20 operations a second from 127.0.0.1, every
//! result recorded with its phase and latency.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::harness::LEGIT_HOST;
use super::net;

/// When a result was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Baseline = 0,
    During = 1,
    /// Between the attack's end and the after phase: not counted.
    Settling = 2,
    After = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    DnsUdp,
    DnsTcp,
    Http,
    Https,
    TcpForward,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::DnsUdp,
        Kind::DnsTcp,
        Kind::Http,
        Kind::Https,
        Kind::TcpForward,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::DnsUdp => "dns/udp",
            Kind::DnsTcp => "dns/tcp",
            Kind::Http => "http",
            Kind::Https => "https",
            Kind::TcpForward => "tcp-forward",
        }
    }
}

#[derive(Debug, Clone)]
struct Sample {
    kind: Kind,
    phase: Phase,
    ok: bool,
    ms: f64,
    error: Option<String>,
}

/// Where the clients send their requests.
#[derive(Clone)]
pub(crate) struct Targets {
    pub(crate) dns: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) https: SocketAddr,
    pub(crate) tcp_forward: SocketAddr,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// The running clients.
pub(crate) struct Legit {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Success and latency of one phase.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhaseResult {
    /// Operations of every kind, and how many succeeded.
    pub(crate) total: usize,
    pub(crate) ok: usize,
    /// The success rate of the client kind that fared worst.
    pub(crate) worst_percent: Option<f64>,
    /// The highest p99 of any client kind.
    pub(crate) p99_ms: f64,
    /// `kind: failures (first error)` for each client kind that failed.
    pub(crate) failures: Vec<String>,
}

impl PhaseResult {
    /// The worst client kind's success rate (100 with no samples).
    pub(crate) fn success_percent(&self) -> f64 {
        self.worst_percent.unwrap_or(100.0)
    }
}

/// Pause between two operations of one client.
const PACE: Duration = Duration::from_millis(50);

impl Legit {
    pub(crate) fn start(targets: Targets) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(Phase::Baseline as u8));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = Kind::ALL
            .into_iter()
            .map(|kind| {
                let (stop, phase, samples, targets) = (
                    Arc::clone(&stop),
                    Arc::clone(&phase),
                    Arc::clone(&samples),
                    targets.clone(),
                );
                thread::spawn(move || {
                    let mut id: u16 = kind as u16 * 10_000;
                    while !stop.load(Relaxed) {
                        id = id.wrapping_add(1);
                        let phase_now = phase_of(phase.load(Relaxed));
                        let started = Instant::now();
                        let result = one(kind, &targets, id);
                        let sample = Sample {
                            kind,
                            phase: phase_now,
                            ok: result.is_ok(),
                            ms: started.elapsed().as_secs_f64() * 1000.0,
                            error: result.err(),
                        };
                        samples.lock().expect("samples lock").push(sample);
                        thread::sleep(PACE);
                    }
                })
            })
            .collect();
        Legit {
            stop,
            phase,
            samples,
            threads,
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Relaxed);
    }

    /// Waits until every client finished at least `n` operations in `phase`, within `limit`.
    pub(crate) fn wait_for(&self, phase: Phase, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let samples = self.samples.lock().expect("samples lock");
            let done = Kind::ALL.iter().all(|kind| {
                samples
                    .iter()
                    .filter(|sample| sample.kind == *kind && sample.phase == phase)
                    .count()
                    >= n
            });
            drop(samples);
            if done {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The phase's results. Success and p99 are those of the worst client kind: a client
    /// that hangs until its timeout takes few samples, and pooling would hide it behind
    /// the others.
    pub(crate) fn result(&self, phase: Phase) -> PhaseResult {
        let samples = self.samples.lock().expect("samples lock");
        let mut result = PhaseResult::default();
        for kind in Kind::ALL {
            let of_kind: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.phase == phase && s.kind == kind)
                .collect();
            if of_kind.is_empty() {
                continue;
            }
            let ok = of_kind.iter().filter(|s| s.ok).count();
            let percent = ok as f64 * 100.0 / of_kind.len() as f64;
            let mut latencies: Vec<f64> = of_kind.iter().map(|s| s.ms).collect();
            latencies.sort_by(f64::total_cmp);
            let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
            result.total += of_kind.len();
            result.ok += ok;
            result.p99_ms = result.p99_ms.max(p99);
            if result.worst_percent.is_none_or(|worst| percent < worst) {
                result.worst_percent = Some(percent);
            }
            if let Some(first) = of_kind.iter().find(|s| !s.ok) {
                result.failures.push(format!(
                    "{} {} of {} failed ({})",
                    kind.name(),
                    of_kind.len() - ok,
                    of_kind.len(),
                    first.error.as_deref().unwrap_or("?")
                ));
            }
        }
        result
    }

    pub(crate) fn stop(mut self) {
        self.stop.store(true, Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn phase_of(value: u8) -> Phase {
    match value {
        0 => Phase::Baseline,
        1 => Phase::During,
        2 => Phase::Settling,
        _ => Phase::After,
    }
}

/// Waits up to `limit` until one operation of every kind succeeds (the L4 listeners bind
/// a moment after the config is published); returns the last error otherwise.
pub(crate) fn wait_ready(targets: &Targets, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut pending: Vec<Kind> = Kind::ALL.to_vec();
    let mut last_error = String::new();
    while !pending.is_empty() {
        pending.retain(|kind| match one(*kind, targets, 1) {
            Ok(()) => false,
            Err(error) => {
                last_error = format!("{}: {error}", kind.name());
                true
            }
        });
        if Instant::now() > deadline {
            return Err(last_error);
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One operation of `kind`; `Err` says what went wrong.
fn one(kind: Kind, targets: &Targets, id: u16) -> Result<(), String> {
    let timeout = Duration::from_secs(5);
    match kind {
        Kind::DnsUdp => {
            let socket =
                net::udp_from(Ipv4Addr::LOCALHOST, targets.dns).map_err(|e| e.to_string())?;
            let query = net::dns_query(id, LEGIT_HOST, 1, true);
            let answer = net::dns_udp_exchange(&socket, &query, Duration::from_secs(2))
                .map_err(|e| e.to_string())?;
            check_dns(&answer)
        }
        Kind::DnsTcp => {
            let query = net::dns_query(id, LEGIT_HOST, 1, true);
            let answer = net::dns_tcp_exchange(Ipv4Addr::LOCALHOST, targets.dns, &query, timeout)
                .map_err(|e| e.to_string())?;
            check_dns(&answer)
        }
        Kind::Http => {
            let request =
                format!("GET /legit HTTP/1.1\r\nHost: {LEGIT_HOST}\r\nConnection: close\r\n\r\n");
            let response = net::http_once(
                Ipv4Addr::LOCALHOST,
                targets.http,
                request.as_bytes(),
                timeout,
            )
            .map_err(|e| e.to_string())?;
            check_http(&response)
        }
        Kind::Https => {
            let stream = net::connect_from(Ipv4Addr::LOCALHOST, targets.https, timeout)
                .map_err(|e| e.to_string())?;
            let mut tls = net::tls_connect(&targets.tls, LEGIT_HOST, stream)
                .map_err(|e| format!("handshake: {e}"))?;
            let request =
                format!("GET /legit HTTP/1.1\r\nHost: {LEGIT_HOST}\r\nConnection: close\r\n\r\n");
            tls.write_all(request.as_bytes())
                .map_err(|e| e.to_string())?;
            let response =
                net::read_response(&mut tls, &mut Vec::new(), false).map_err(|e| e.to_string())?;
            check_http(&response)
        }
        Kind::TcpForward => {
            let mut stream = net::connect_from(Ipv4Addr::LOCALHOST, targets.tcp_forward, timeout)
                .map_err(|e| e.to_string())?;
            let payload = format!("legit echo {id}\n");
            stream
                .write_all(payload.as_bytes())
                .map_err(|e| e.to_string())?;
            let mut echoed = vec![0u8; payload.len()];
            stream.read_exact(&mut echoed).map_err(|e| e.to_string())?;
            if echoed == payload.as_bytes() {
                Ok(())
            } else {
                Err("echo differs".into())
            }
        }
    }
}

fn check_dns(answer: &[u8]) -> Result<(), String> {
    match net::dns_header(answer) {
        Some(header) if header.rcode == 0 && header.answers > 0 => Ok(()),
        Some(header) => Err(format!(
            "rcode {} with {} answers",
            net::rcode_name(u16::from(header.rcode)),
            header.answers
        )),
        None => Err("short DNS answer".into()),
    }
}

fn check_http(response: &net::Response) -> Result<(), String> {
    if response.status == 200 && response.body == b"origin ok /legit" {
        Ok(())
    } else {
        Err(format!(
            "status {} body {:?}",
            response.status,
            String::from_utf8_lossy(&response.body[..response.body.len().min(80)])
        ))
    }
}
