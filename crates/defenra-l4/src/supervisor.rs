//! The supervisor task: diffs each desired proxy set against the running listeners.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use defenra_config::{L4Protocol, L4Proxy};
use defenra_shield::Shield;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::L4Options;
use crate::resolve::Target;
use crate::stats::{L4Stats, ListenerState, ProxyMeta, ProxyStats};
use crate::{tcp, udp};

/// Listeners are identified by what they bind: two entries with the same protocol and
/// port are the same listener, whatever their id or name.
type ListenKey = (L4Protocol, u16);

pub(crate) struct Supervisor {
    options: Arc<L4Options>,
    stats: Arc<L4Stats>,
    desired: watch::Receiver<Arc<Vec<L4Proxy>>>,
    /// Running listeners keyed by `(protocol, port)`. Only the supervisor task touches
    /// this map, so it needs no lock; `reload` sends the desired set over a channel.
    listeners: HashMap<ListenKey, RunningListener>,
    /// Connections of stopped listeners and of replaced targets, finishing within the
    /// drain grace. Shutdown waits for them.
    drains: TaskTracker,
    /// Runtimes TCP listeners accept on; empty for the supervisor's own.
    workers: Arc<[Handle]>,
    shield: Option<Arc<Shield>>,
}

struct RunningListener {
    proxy: L4Proxy,
    /// A target change is sent here; the listener keeps its socket and starts a new
    /// generation of connections.
    target: watch::Sender<Arc<Target>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<ProxyStats>,
}

/// What a listener task needs besides its target. Cloned into each worker's accept loop.
#[derive(Clone)]
pub(crate) struct ListenerContext {
    pub(crate) options: Arc<L4Options>,
    pub(crate) stats: Arc<ProxyStats>,
    pub(crate) drains: TaskTracker,
    /// Runtimes a TCP listener accepts on, one socket each; empty for the current one.
    pub(crate) workers: Arc<[Handle]>,
    /// Asked at each TCP accept and for each UDP datagram (bans, per-address caps).
    pub(crate) shield: Option<Arc<Shield>>,
}

impl Supervisor {
    pub(crate) fn new(
        options: Arc<L4Options>,
        stats: Arc<L4Stats>,
        desired: watch::Receiver<Arc<Vec<L4Proxy>>>,
        workers: Arc<[Handle]>,
        shield: Option<Arc<Shield>>,
    ) -> Self {
        Supervisor {
            options,
            stats,
            desired,
            listeners: HashMap::new(),
            drains: TaskTracker::new(),
            workers,
            shield,
        }
    }

    /// Applies the latest desired set, then every later one, until `shutdown`. Then stops
    /// every listener and waits (at most `drain_grace`) for their connections.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let desired = Arc::clone(&self.desired.borrow_and_update());
            self.reconcile(&desired).await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        // The service was dropped; nothing can change any more.
                        shutdown.cancelled().await;
                        break;
                    }
                }
            }
        }
        let keys: Vec<ListenKey> = self.listeners.keys().copied().collect();
        for key in keys {
            self.stop(key).await;
        }
        self.drains.close();
        self.drains.wait().await;
        tracing::info!("l4 service stopped");
    }

    async fn reconcile(&mut self, desired: &[L4Proxy]) {
        let wanted: HashMap<ListenKey, &L4Proxy> = desired
            .iter()
            .map(|proxy| ((proxy.protocol, proxy.listen_port), proxy))
            .collect();
        let removed: Vec<ListenKey> = self
            .listeners
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in removed {
            self.stop(key).await;
        }
        for proxy in desired {
            let key = (proxy.protocol, proxy.listen_port);
            match self.listeners.get_mut(&key) {
                None => self.start(proxy),
                Some(running) if running.proxy == *proxy => {}
                Some(running) => {
                    if !same_target(&running.proxy, proxy) {
                        tracing::info!(
                            protocol = %key.0, port = key.1,
                            from = %ProxyMeta::from_proxy(&running.proxy).destination,
                            to = %ProxyMeta::from_proxy(proxy).destination,
                            "l4 proxy target changed"
                        );
                        running
                            .target
                            .send_replace(Arc::new(Target::new(proxy, self.options.dns_cache_ttl)));
                    }
                    *running.stats.meta.lock() = ProxyMeta::from_proxy(proxy);
                    running.proxy = proxy.clone();
                }
            }
        }
    }

    fn start(&mut self, proxy: &L4Proxy) {
        let stats = Arc::new(ProxyStats::new(proxy));
        self.stats.insert(Arc::clone(&stats));
        let (target, targets) =
            watch::channel(Arc::new(Target::new(proxy, self.options.dns_cache_ttl)));
        let stop = CancellationToken::new();
        let context = ListenerContext {
            options: Arc::clone(&self.options),
            stats: Arc::clone(&stats),
            drains: self.drains.clone(),
            workers: Arc::clone(&self.workers),
            shield: self.shield.clone(),
        };
        let task = match proxy.protocol {
            L4Protocol::Tcp => tokio::spawn(tcp::run(context, targets, stop.clone())),
            L4Protocol::Udp => tokio::spawn(udp::run(context, targets, stop.clone())),
        };
        tracing::info!(
            protocol = %proxy.protocol, port = proxy.listen_port,
            destination = %stats.meta.lock().destination,
            "l4 proxy started"
        );
        self.listeners.insert(
            (proxy.protocol, proxy.listen_port),
            RunningListener {
                proxy: proxy.clone(),
                target,
                stop,
                task,
                stats,
            },
        );
    }

    /// Closes the listener's socket (waiting for its task, so the port is free when this
    /// returns) and leaves its connections to drain.
    async fn stop(&mut self, key: ListenKey) {
        let Some(running) = self.listeners.remove(&key) else {
            return;
        };
        running.stop.cancel();
        if let Err(error) = running.task.await {
            tracing::error!(protocol = %key.0, port = key.1, %error, "l4 listener task failed");
        }
        self.stats.remove(key.0, key.1);
        tracing::info!(protocol = %key.0, port = key.1, "l4 proxy stopped");
    }
}

/// Whether two entries forward to the same place the same way (only then may the running
/// listener's connections stay as they are).
fn same_target(a: &L4Proxy, b: &L4Proxy) -> bool {
    a.destination_host == b.destination_host
        && a.destination_port == b.destination_port
        && a.proxy_protocol == b.proxy_protocol
}

/// Binds the proxy's port, retrying with doubling waits until it works or `stop` fires.
/// Every failure is recorded in the proxy's state for `/stats`; the other proxies run on.
pub(crate) async fn bind_with_retry<T>(
    context: &ListenerContext,
    stop: &CancellationToken,
    bind: impl Fn(SocketAddr) -> io::Result<(T, SocketAddr)>,
) -> Option<T> {
    let stats = &context.stats;
    let address = SocketAddr::new(context.options.bind_ip, stats.port);
    let mut wait = context.options.bind_retry_initial;
    let mut attempts = 0;
    loop {
        match bind(address) {
            Ok((socket, local_addr)) => {
                stats.set_state(ListenerState::Listening { local_addr });
                tracing::info!(protocol = %stats.protocol, %local_addr, "l4 listening");
                return Some(socket);
            }
            Err(error) => {
                attempts += 1;
                stats.bind_errors_total.fetch_add(1, Relaxed);
                tracing::warn!(
                    protocol = %stats.protocol, %address, %error, attempts,
                    retry_in = ?wait, "l4 bind failed"
                );
                stats.set_state(ListenerState::BindFailed {
                    error: format!("{address}: {error}"),
                    attempts,
                });
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(context.options.bind_retry_max);
    }
}
