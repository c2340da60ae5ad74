//! The agent's life: bind, load config, serve, reload on change and SIGHUP, drain on SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use defenra_config::stats::StatsSource;
use defenra_config::{
    ConfigLoop, ConfigSource, CoreReporter, CoreSource, CoreSourceOptions, FileSource,
    IntervalPolicy, ReporterOptions, SnapshotCell, StateDir,
};

use defenra_dns::{DnsService, DnsSockets};
use defenra_geo::GeoLookup;
use defenra_http::{HttpOptions, HttpService};
use defenra_l4::{L4Options, L4Service};
use defenra_shield::Shield;
use defenra_waf::{WafEngine, WafOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::cli::{BanBackend, Listen, LogFormat, RunArgs, SourceChoice};
use crate::geoip::GeoIp;
use crate::health::{self, Observability};
use crate::l4_workers::L4Workers;
use crate::report::{ClientBook, Ledger, ReportStats, Reporter};
use crate::watchdog::Liveness;

/// How often a file source is checked for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// The ban list's file in the state directory.
const BAN_FILE: &str = "bans.json";
/// A config fetch and reload running longer than this means the config loop is stuck
/// (a fetch is bounded by 30 s), and the systemd watchdog stops its pings.
const CONFIG_STUCK_AFTER: Duration = Duration::from_secs(300);
/// Bounds each report request to Core.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval when neither the flag nor Core sets one.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// Stack of each HTTP worker thread, which runs the Lua WAF. The WAF stops a script that
/// uses more than 1 MiB of C stack through callbacks from C into Lua (docs/waf.md, "C stack"),
/// which fits in the usual 2 MiB; 16 MiB is the margin for anything that check misses (a
/// crash here takes every domain down). Only the pages a thread touches are ever
/// committed, so the rest costs address space, not memory.
const WORKER_STACK: usize = 16 << 20;

/// Sets up the global tracing subscriber (text or JSON lines on stderr).
///
/// # Errors
///
/// When `--log-level` is not a valid filter.
pub(crate) fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?} is not a valid filter", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

type ServiceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Runs the agent until SIGTERM or SIGINT.
///
/// # Errors
///
/// A listener that cannot be bound.
pub(crate) async fn run(args: RunArgs, source_choice: SourceChoice) -> anyhow::Result<()> {
    // First, so that a signal during a slow start (a huge first config) is handled too.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let shutdown = CancellationToken::new();
    let cell = Arc::new(SnapshotCell::new());
    // systemd's watchdog: every runtime that serves listeners gets a heart (below).
    let watchdog = crate::watchdog::interval_from_env().map(|interval| {
        let beat = crate::watchdog::beat_period(interval);
        info!(interval = ?interval, "systemd watchdog on");
        (interval, beat, Arc::new(Liveness::new()))
    });
    let hearts = watchdog
        .as_ref()
        .map(|(_, beat, liveness)| (*beat, Arc::clone(liveness)));

    // Services first, so the config loop can reload them from the first snapshot on.
    // A missing or unusable database is a warning: GeoDNS answers without it, /health says
    // "degraded", and the file is watched, so a database that appears later is used.
    let geoip = Arc::new(GeoIp::new(args.geoip_db.clone()));
    let geo: Option<Arc<dyn GeoLookup>> = if geoip.is_configured() {
        geoip.check(false).await;
        Some(geoip.database())
    } else {
        info!("no --geoip-db: GeoDNS answers with each domain's default location");
        None
    };

    let dns = Arc::new(DnsService::new(geo, args.dns.options(args.agent_ip)));
    // Reports to Core exist only with the Core source; the proxy queues client addresses
    // only when they will be reported.
    let reporting = matches!(source_choice, SourceChoice::Core { .. }) && !args.no_report;
    let waf = Arc::new(WafEngine::new(WafOptions {
        fail_closed: args.waf_fail_closed,
        ..WafOptions::default()
    }));
    // `ngx.var.geoip_*` from the same database; it follows replacements of the file.
    if geoip.is_configured() {
        waf.set_locator(Some(Arc::new(crate::waf_geo::GeoLocator(geoip.database()))));
    }
    // Protection state outlives every snapshot; bans saved before a restart come back
    // with their remaining time.
    let (shield_key, shield_key_file) = crate::shield_key::load(
        args.shield.shield_key_file.as_deref(),
        args.state_dir.as_deref(),
    )?;
    let shield = Arc::new(Shield::new(defenra_shield::ShieldOptions {
        shield_key: Some(shield_key.clone()),
        ..args.shield.options()
    }));
    // With Redis, the fleet's bans, key, counts and `ngx.shared.fleet` (docs/shield.md,
    // "Fleet"); the state directory's key file follows the fleet's key, an operator's does not.
    let mut file_key = shield_key.fingerprint();
    let owned_key_file = shield_key_file
        .clone()
        .filter(|_| args.shield.shield_key_file.is_none());
    let fleet = crate::fleet::build(&args.fleet, &shield, &waf, shield_key, owned_key_file)?;
    let ban_file = args.state_dir.as_ref().map(|dir| dir.join(BAN_FILE));
    if let Some(path) = &ban_file {
        match shield.load_bans(path) {
            Ok(0) => {}
            Ok(loaded) => info!(loaded, path = %path.display(), "bans restored"),
            Err(error) => warn!(%error, "saved bans not restored"),
        }
    }
    let http = Arc::new(HttpService::with_shield(
        Arc::clone(&waf),
        Arc::clone(&shield),
        HttpOptions {
            origin_http_port: args.origin_http_port,
            origin_https_port: args.origin_https_port,
            origin_timeout: args.origin_timeout,
            tunnel_idle_timeout: args.tunnel_idle_timeout,
            access_log: args.access_log,
            access_log_max_per_second: args.access_log_max_per_second,
            record_clients: reporting,
            ..HttpOptions::default()
        },
    ));
    // TCP forwards accept on one current-thread runtime per core, like HTTP: a connection
    // stays on one thread from accept to close (docs/l4.md, "Workers").
    let l4_workers = L4Workers::start(workers_or_cores(args.l4_workers))?;
    if let Some((beat, liveness)) = &hearts {
        for (index, handle) in l4_workers.handles().iter().enumerate() {
            let heart = liveness.heart(format!("l4-{index}"));
            handle.spawn(crate::watchdog::beat(heart, *beat, shutdown.clone()));
        }
    }
    let l4 = Arc::new(
        L4Service::new(L4Options {
            bind_ip: args.l4_bind,
            ..L4Options::default()
        })
        .with_workers(l4_workers.handles())
        .with_shield(Arc::clone(&shield)),
    );

    // Bind every listener before loading config: a port we cannot have is fatal at once.
    let dns_sockets = match args.dns_listen {
        Listen::On(addr) => {
            let sockets = DnsSockets::bind(addr)
                .await
                .with_context(|| bind_hint("dns", addr))?;
            info!(service = "dns", addr = %sockets.local_addr(), "listening");
            Some(sockets)
        }
        Listen::Off => None,
    };
    let http_workers = workers_or_cores(args.http_workers);
    let http_listener = bind_workers("http", args.http_listen, http_workers)?;
    let https_listener = bind_workers("https", args.https_listen, http_workers)?;
    let health_listener = bind_tcp("health", args.health_listen).await?;

    let source: Box<dyn ConfigSource> = match &source_choice {
        SourceChoice::File(path) => Box::new(FileSource::new(path.clone())),
        SourceChoice::Core {
            url,
            agent_id,
            agent_key,
        } => Box::new(CoreSource::new(CoreSourceOptions::new(
            url.clone(),
            agent_id.clone(),
            agent_key.clone(),
        ))),
        SourceChoice::Enrol { .. } => {
            anyhow::bail!("enrolment must be done before the agent runs (main does it)")
        }
    };
    let policy = match (&source_choice, args.poll_interval) {
        (SourceChoice::File(_), _) => IntervalPolicy::Fixed(FILE_CHECK_INTERVAL),
        (_, Some(seconds)) => IntervalPolicy::Fixed(Duration::from_secs(seconds)),
        (_, None) => IntervalPolicy::CoreDecides {
            default: DEFAULT_POLL_INTERVAL,
        },
    };
    let mut config = ConfigLoop::new(source, Arc::clone(&cell), policy)
        .with_service(dns.clone())
        .with_service(waf.clone())
        .with_service(shield.clone())
        .with_service(http.clone())
        .with_service(l4.clone())
        .with_service(Arc::new(crate::alloc::ReturnFreedMemory));
    if let Some(dir) = &args.state_dir {
        config = config.with_state_dir(StateDir::new(dir.clone()));
    }
    let reload = config.reload_handle();
    let config_stats = config.stats();
    let poll_successes = config.successes();
    let report_stats = Arc::new(ReportStats::default());

    let observability = Arc::new(
        Observability::new(
            Arc::clone(&cell),
            Arc::clone(&config_stats),
            vec![
                dns.stats() as Arc<dyn StatsSource>,
                http.stats() as Arc<dyn StatsSource>,
                waf.stats() as Arc<dyn StatsSource>,
                l4.stats() as Arc<dyn StatsSource>,
                shield.clone() as Arc<dyn StatsSource>,
                Arc::clone(&geoip) as Arc<dyn StatsSource>,
                Arc::clone(&report_stats) as Arc<dyn StatsSource>,
            ]
            .into_iter()
            .chain(fleet.clone().map(|fleet| fleet as Arc<dyn StatsSource>))
            .collect(),
        )
        .with_shield(Arc::clone(&shield))
        .with_geoip(Arc::clone(&geoip))
        .with_fleet(fleet.clone()),
    );

    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let mut spawn = |name: &'static str, future: ServiceFuture| {
        tasks.spawn(async move { (name, future.await) });
    };
    if let Some(listener) = health_listener {
        let (observability, token) = (Arc::clone(&observability), shutdown.clone());
        spawn(
            "health",
            Box::pin(async move {
                health::serve(
                    listener,
                    observability,
                    health::HealthLimits::default(),
                    token,
                )
                .await;
                Ok(())
            }),
        );
    }

    {
        let (shield, token) = (Arc::clone(&shield), shutdown.clone());
        spawn(
            "shield",
            Box::pin(async move {
                shield.run_background(ban_file, token).await;
                Ok(())
            }),
        );
    }
    if let Some(fleet) = &fleet {
        let (fleet, token) = (Arc::clone(fleet), shutdown.clone());
        spawn(
            "fleet",
            Box::pin(async move {
                fleet.run(token).await;
                Ok(())
            }),
        );
    }
    if let Some(dir) = &args.state_dir {
        match crate::control::bind(dir) {
            Ok((listener, path)) => {
                let (shield, token) = (Arc::clone(&shield), shutdown.clone());
                spawn(
                    "control",
                    Box::pin(async move {
                        crate::control::serve(listener, path, shield, token).await;
                        Ok(())
                    }),
                );
            }
            Err(error) => warn!("{error:#}; the ban commands cannot reach this agent"),
        }
    }
    if args.shield.ban_backend == BanBackend::Nftables {
        let (shield, token) = (Arc::clone(&shield), shutdown.clone());
        spawn(
            "nftables",
            Box::pin(async move {
                defenra_shield::nft::mirror(
                    shield,
                    defenra_shield::nft::NftOptions::default(),
                    token,
                )
                .await
                .context("nftables ban mirror failed")
            }),
        );
    }

    // The first config before the data plane starts answering, so the first queries see it.
    // Compiling and reloading run on the blocking pool; a signal meanwhile ends the agent.
    let loaded = tokio::select! {
        loaded = config.start() => loaded,
        _ = terminate.recv() => return stop_early(shutdown, tasks, args.shutdown_grace).await,
        _ = interrupt.recv() => return stop_early(shutdown, tasks, args.shutdown_grace).await,
    };
    if loaded {
        info!(
            version = cell.load().map_or(0, |snapshot| snapshot.version),
            "config loaded"
        );
    } else {
        warn!("no config yet: serving nothing until the first successful fetch");
    }

    if let Some(sockets) = dns_sockets {
        let (dns, token) = (Arc::clone(&dns), shutdown.clone());
        spawn(
            "dns",
            Box::pin(async move {
                dns.serve(sockets, token)
                    .await
                    .context("DNS service failed")
            }),
        );
    }
    if let Some(listeners) = http_listener {
        let http = Arc::clone(&http);
        let serve = move |listener, token| {
            let http = Arc::clone(&http);
            async move { http.serve_http(listener, token).await }
        };
        spawn(
            "http",
            per_core(
                "http",
                listeners,
                shutdown.clone(),
                hearts.clone(),
                serve,
                "HTTP service failed",
            ),
        );
    }
    if let Some(listeners) = https_listener {
        let http = Arc::clone(&http);
        let serve = move |listener, token| {
            let http = Arc::clone(&http);
            async move { http.serve_https(listener, token).await }
        };
        spawn(
            "https",
            per_core(
                "https",
                listeners,
                shutdown.clone(),
                hearts.clone(),
                serve,
                "HTTPS service failed",
            ),
        );
    }
    {
        let (l4, token) = (Arc::clone(&l4), shutdown.clone());
        spawn(
            "l4",
            Box::pin(async move {
                let served = l4.serve(token).await;
                // Only now: the drained connections lived on the workers.
                l4_workers.stop();
                served.context("L4 service failed")
            }),
        );
    }
    // Dropped when the config task ends, even by a panic: the watchdog sees it.
    let config_running = Arc::new(());
    let config_alive = Arc::downgrade(&config_running);
    let config_task = tokio::spawn({
        let token = shutdown.clone();
        async move {
            let _running = config_running;
            config.run(token).await;
        }
    });
    if let Some((interval, beat, liveness)) = watchdog {
        let heart = liveness.heart("main");
        tokio::spawn(crate::watchdog::beat(heart, beat, shutdown.clone()));
        let stats = Arc::clone(&config_stats);
        liveness.check("config loop", move || {
            let busy_since = stats
                .busy_since_unix
                .load(std::sync::atomic::Ordering::Relaxed);
            let stuck = busy_since > 0
                && unix_now().saturating_sub(busy_since) > CONFIG_STUCK_AFTER.as_secs();
            config_alive.strong_count() > 0 && !stuck
        });
        let token = shutdown.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || crate::watchdog::run(liveness, interval, token))
            .context("cannot start the watchdog thread")?;
    }
    let report_task = match &source_choice {
        SourceChoice::Core {
            url,
            agent_id,
            agent_key,
        } if reporting => {
            let reporter = Reporter {
                sender: Arc::new(CoreReporter::new(ReporterOptions {
                    url: url.clone(),
                    agent_key: agent_key.clone(),
                    timeout: REPORT_TIMEOUT,
                })),
                agent_id: agent_id.clone(),
                cell: Arc::clone(&cell),
                http: Arc::clone(&http),
                l4: l4.stats(),
                geo: geoip.is_configured().then(|| geoip.database()),
                stats: Arc::clone(&report_stats),
                ledger: Ledger::default(),
                clients: ClientBook::default(),
            };
            Some(tokio::spawn(reporter.run(poll_successes, shutdown.clone())))
        }
        _ => None,
    };
    // The GeoIP file is watched like the config file and re-read on SIGHUP.
    let geoip_reload = Arc::new(tokio::sync::Notify::new());
    let geoip_task = tokio::spawn(Arc::clone(&geoip).watch(
        FILE_CHECK_INTERVAL,
        Arc::clone(&geoip_reload),
        shutdown.clone(),
    ));
    // systemd readiness: listeners are bound; ready once a config is loaded too.
    if loaded {
        crate::notify::notify("READY=1\nSTATUS=serving");
    } else {
        let cell = Arc::clone(&cell);
        tokio::spawn(async move {
            while cell.load().is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            crate::notify::notify("READY=1\nSTATUS=serving");
        });
    }

    info!("agent running");
    let failure = loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: shutting down"); break None; }
            _ = interrupt.recv() => { info!("SIGINT: shutting down"); break None; }
            _ = hangup.recv() => {
                info!("SIGHUP: reloading config and the GeoIP database");
                if let Some(path) = &shield_key_file
                    && let Some(key) = crate::shield_key::reread(path, &shield, &mut file_key)
                    && let Some(fleet) = &fleet
                {
                    // A changed key file is a fleet-wide rotation.
                    fleet.publish_key(&key);
                }
                reload.notify_one();
                geoip_reload.notify_one();
            }
            Some(joined) = tasks.join_next() => match joined {
                Ok((name, Ok(()))) => info!(service = name, "service stopped"),
                Ok((name, Err(error))) => break Some(error.context(format!("{name} stopped"))),
                Err(error) => break Some(anyhow::anyhow!("a service task panicked: {error}")),
            },
        }
    };

    // Stop accepting; in-flight work gets the grace period.
    crate::notify::notify("STOPPING=1");
    shutdown.cancel();
    let drained = tokio::time::timeout(args.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(grace = ?args.shutdown_grace, "grace period over; exiting with work still in flight");
    }
    config_task.abort();
    geoip_task.abort();
    if let Some(task) = report_task {
        task.abort();
    }
    match failure {
        Some(error) => Err(error),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}

/// A signal before the first config was loaded: the few tasks started so far get the
/// grace period.
async fn stop_early(
    shutdown: CancellationToken,
    mut tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    grace: Duration,
) -> anyhow::Result<()> {
    info!("signal while loading the first config: shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    Ok(())
}

async fn bind_tcp(name: &'static str, listen: Listen) -> anyhow::Result<Option<TcpListener>> {
    let Listen::On(addr) = listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| bind_hint(name, addr))?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(service = name, addr = %local, "listening");
    Ok(Some(listener))
}

/// A `--*-workers` flag's count: 0 means one per CPU core.
fn workers_or_cores(workers: usize) -> usize {
    match workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        workers => workers,
    }
}

/// `workers` listening sockets on one address, all with `SO_REUSEPORT`, so the kernel
/// spreads new connections over the worker threads. Port 0 picks one port for all.
fn bind_workers(
    name: &'static str,
    listen: Listen,
    workers: usize,
) -> anyhow::Result<Option<Vec<std::net::TcpListener>>> {
    let Listen::On(addr) = listen else {
        return Ok(None);
    };
    let first = reuseport_listener(addr).with_context(|| bind_hint(name, addr))?;
    let local = first.local_addr().unwrap_or(addr);
    let mut listeners = vec![first];
    for _ in 1..workers.max(1) {
        listeners.push(reuseport_listener(local).with_context(|| bind_hint(name, local))?);
    }
    info!(service = name, addr = %local, workers = listeners.len(), "listening");
    Ok(Some(listeners))
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Runs `serve` once per listener, each on its own thread with a current-thread runtime:
/// a connection lives on one thread from accept to close, with no work stealing or
/// cross-thread wake-ups (side by side on 2 cores: 17 % more requests per second and a
/// lower p99 than the same proxy on the multi-thread runtime; docs/performance.md).
/// Resolves when every worker has stopped, with the first error.
fn per_core<S, F>(
    name: &'static str,
    listeners: Vec<std::net::TcpListener>,
    shutdown: CancellationToken,
    hearts: Option<(Duration, Arc<Liveness>)>,
    serve: S,
    context: &'static str,
) -> ServiceFuture
where
    S: Fn(TcpListener, CancellationToken) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(), defenra_http::HttpError>> + 'static,
{
    let mut results = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (serve, token) = (serve.clone(), shutdown.clone());
        // The watchdog's heart for this worker's runtime: it stops beating when the
        // runtime is stuck, or when the worker has stopped.
        let heart = hearts
            .as_ref()
            .map(|(beat, liveness)| (*beat, liveness.heart(format!("{name}-{index}"))));
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .stack_size(WORKER_STACK)
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            let listener = TcpListener::from_std(listener)?;
                            let beating = CancellationToken::new();
                            let _stop_beating = beating.clone().drop_guard();
                            if let Some((beat, heart)) = heart {
                                tokio::spawn(crate::watchdog::beat(heart, beat, beating));
                            }
                            serve(listener, token).await.map_err(anyhow::Error::from)
                        })
                    });
                let _ = sender.send(result);
            });
        results.push((spawned, receiver));
    }
    Box::pin(async move {
        let mut first_error = None;
        for (spawned, receiver) in results {
            let result = match spawned {
                Err(error) => {
                    Err(anyhow::Error::from(error).context("cannot start a worker thread"))
                }
                Ok(_) => receiver
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked"))),
            };
            if let Err(error) = result {
                // One worker failing stops them all, like any other service failing.
                shutdown.cancel();
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), |error| Err(error.context(context)))
    })
}

fn bind_hint(name: &str, addr: SocketAddr) -> String {
    let hint = if addr.port() < 1024 {
        " (ports below 1024 need root or CAP_NET_BIND_SERVICE; another server may also hold the port)"
    } else {
        ""
    };
    format!("cannot listen for {name} on {addr}{hint}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
