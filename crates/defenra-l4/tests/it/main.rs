//! Integration tests: a real `L4Service` on loopback, real clients and destination servers.

mod reconcile;
mod shield;
mod tcp;
mod udp;
mod workers;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use defenra_config::{L4Protocol, L4Proxy, Reload, Snapshot};
use defenra_l4::{L4Options, L4Service, ListenerState, ProxyCounters};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Options with the timeouts shortened for tests, bound on loopback.
fn options() -> L4Options {
    L4Options {
        bind_ip: LOCALHOST,
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        udp_session_idle: Duration::from_secs(30),
        drain_grace: Duration::from_secs(10),
        bind_retry_initial: Duration::from_millis(50),
        bind_retry_max: Duration::from_millis(200),
        ..L4Options::default()
    }
}

/// A port that was free a moment ago: bind port 0, note the port, release it.
fn free_port(protocol: L4Protocol) -> u16 {
    let address = SocketAddr::new(LOCALHOST, 0);
    match protocol {
        L4Protocol::Tcp => std::net::TcpListener::bind(address)
            .and_then(|listener| listener.local_addr())
            .map(|a| a.port()),
        L4Protocol::Udp => std::net::UdpSocket::bind(address)
            .and_then(|socket| socket.local_addr())
            .map(|a| a.port()),
    }
    .expect("loopback has free ports")
}

fn proxy(protocol: L4Protocol, listen_port: u16, destination: SocketAddr) -> L4Proxy {
    L4Proxy {
        id: Some(format!("{protocol}-{listen_port}")),
        name: None,
        protocol,
        listen_port,
        destination_host: destination.ip().to_string(),
        destination_port: destination.port(),
        proxy_protocol: false,
    }
}

fn snapshot(proxies: &[L4Proxy]) -> Arc<Snapshot> {
    let mut snapshot = Snapshot::empty();
    snapshot.proxies = proxies.to_vec();
    Arc::new(snapshot)
}

/// Threads each running a current-thread runtime until dropped, as agent-bin's L4
/// workers do.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(count: usize) -> Workers {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("worker runtime");
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                runtime.block_on(stop.cancelled());
            }));
        }
        Workers {
            handles,
            stop,
            threads,
        }
    }

    /// Tasks alive on each worker: its accept loops plus the connections it serves.
    fn alive_tasks(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|handle| handle.metrics().num_alive_tasks())
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A running service; shuts down when dropped.
struct Agent {
    service: Arc<L4Service>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// Dropped after the service is told to stop (fields drop after `Drop::drop`).
    workers: Option<Workers>,
}

impl Agent {
    /// Reloads `proxies` before `serve` starts (as agent-bin may), then waits until every
    /// proxy is listening.
    async fn start(proxies: &[L4Proxy], options: L4Options) -> Agent {
        Agent::start_with(L4Service::new(options), None, proxies).await
    }

    /// As [`Agent::start`], with TCP accepted on `count` worker runtimes.
    async fn start_on_workers(proxies: &[L4Proxy], options: L4Options, count: usize) -> Agent {
        let workers = Workers::start(count);
        let service = L4Service::new(options).with_workers(workers.handles.clone());
        Agent::start_with(service, Some(workers), proxies).await
    }

    async fn start_with(
        service: L4Service,
        workers: Option<Workers>,
        proxies: &[L4Proxy],
    ) -> Agent {
        let service = Arc::new(service);
        service.reload(&snapshot(proxies), &mut Vec::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let service = Arc::clone(&service);
            let shutdown = shutdown.clone();
            async move {
                service.serve(shutdown).await.expect("first serve call");
            }
        });
        let agent = Agent {
            service,
            shutdown,
            task: Some(task),
            workers,
        };
        for proxy in proxies {
            agent.wait_listening(proxy).await;
        }
        agent
    }

    fn reload(&self, proxies: &[L4Proxy]) {
        self.service.reload(&snapshot(proxies), &mut Vec::new());
    }

    fn state(&self, protocol: L4Protocol, port: u16) -> Option<ListenerState> {
        self.service.stats().state(protocol, port)
    }

    fn counters(&self, proxy: &L4Proxy) -> ProxyCounters {
        self.service
            .stats()
            .counters(proxy.protocol, proxy.listen_port)
            .unwrap_or_default()
    }

    async fn wait_listening(&self, proxy: &L4Proxy) {
        eventually("proxy listening", || {
            matches!(
                self.state(proxy.protocol, proxy.listen_port),
                Some(ListenerState::Listening { .. })
            )
        })
        .await;
    }

    fn address(&self, proxy: &L4Proxy) -> SocketAddr {
        SocketAddr::new(LOCALHOST, proxy.listen_port)
    }

    fn workers(&self) -> &Workers {
        self.workers.as_ref().expect("started on workers")
    }

    /// Cancels the shutdown token and waits for `serve` to return.
    async fn stop(mut self) -> Duration {
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("serve returns within the drain grace")
                .expect("serve task did not panic");
        }
        started.elapsed()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `condition` every 10 ms for up to 10 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fails the test if `future` takes longer than 10 s.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A TCP echo server. With a tag, it first writes `tag\n` on each connection, so a test can
/// tell which destination it reached. Echoes until EOF, then closes its write side.
struct EchoServer {
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    async fn start(tag: Option<&'static str>) -> EchoServer {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind echo");
        let address = listener.local_addr().expect("echo address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Some(tag) = tag {
                        let _ = stream.write_all(format!("{tag}\n").as_bytes()).await;
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        EchoServer { address, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Connects through the proxy and reads the destination's tag line.
async fn connect_tagged(address: SocketAddr) -> (TcpStream, String) {
    let mut stream = within("connect", TcpStream::connect(address))
        .await
        .expect("proxy accepts");
    let mut tag = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let n = within("tag line", stream.read(&mut byte))
            .await
            .expect("read tag");
        assert_eq!(n, 1, "connection closed before the tag line");
        if byte[0] == b'\n' {
            break;
        }
        tag.push(byte[0]);
    }
    (stream, String::from_utf8(tag).expect("ascii tag"))
}

/// Writes `message` and expects it echoed back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    within("write", stream.write_all(message))
        .await
        .expect("write through proxy");
    let mut echoed = vec![0u8; message.len()];
    within("echo", stream.read_exact(&mut echoed))
        .await
        .expect("echo through proxy");
    assert_eq!(echoed, message);
}

/// True when the peer closed the connection (EOF or reset) within 10 s.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 64];
    matches!(
        within("close", stream.read(&mut buffer)).await,
        Ok(0) | Err(_)
    )
}

/// A UDP server that answers every datagram with `replies` datagrams:
/// `{payload}|{n}|{source port}`.
async fn udp_multi_echo(replies: usize) -> SocketAddr {
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.expect("bind udp");
    let address = socket.local_addr().expect("udp address");
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        while let Ok((n, peer)) = socket.recv_from(&mut buffer).await {
            let payload = String::from_utf8_lossy(&buffer[..n]).into_owned();
            for reply in 1..=replies {
                let answer = format!("{payload}|{reply}|{}", peer.port());
                let _ = socket.send_to(answer.as_bytes(), peer).await;
            }
        }
    });
    address
}

async fn udp_receive(socket: &UdpSocket) -> String {
    let mut buffer = vec![0u8; 65_536];
    let n = within("udp reply", socket.recv(&mut buffer))
        .await
        .expect("udp receive");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}
