//! Command-line flags; every flag also reads the environment variable the original Go agent used.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Defenra edge agent: GeoDNS, HTTP/HTTPS reverse proxy with a Lua WAF, and TCP/UDP
/// forwarding, configured live from Defenra Core or a file.
#[derive(Debug, Parser)]
#[command(name = "defenra-agent", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Check a config file like `nginx -t`: print every problem with its JSON path; exit 1
    /// if there is any.
    CheckConfig {
        /// A Core-format JSON document.
        file: PathBuf,
    },
    /// Enrol this host with Core's one-time connect URL (from Core's "add agent" dialog) and
    /// write CORE_URL, AGENT_ID, AGENT_KEY and POLLING_INTERVAL into the env file. Run it on
    /// the edge host itself: Core records the caller's address and location as the agent's.
    /// A connect URL works once.
    Connect {
        /// https://CORE/api/agent/connect/TOKEN
        url: String,
        /// The env file to update (atomically, mode 0600, other lines kept).
        #[arg(long, value_name = "PATH", default_value = "/etc/defenra-agent/env")]
        env_file: PathBuf,
    },
    /// Print the version and exit.
    Version,
    /// Ban an address or prefix agent-wide on the running agent (its HTTP, HTTPS and L4
    /// listeners close the address's connections at accept).
    Ban {
        /// `203.0.113.7`, `198.51.100.0/24` or `2001:db8::/48`.
        address: defenra_config::Cidr,
        /// How long (`10m`, `2h`, `7d`); without it the ban lasts until `unban`.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Why, shown by `bans` and `/banned-ips`.
        #[arg(long, default_value = "operator ban")]
        reason: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Lift a ban made by `ban` (or by escalation) on the running agent.
    Unban {
        /// Exactly as banned: `203.0.113.7` or `198.51.100.0/24`.
        address: defenra_config::Cidr,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// List the bans in force on the running agent.
    Bans {
        /// Print JSON (as `GET /banned-ips`) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// Where the ban commands find the running agent.
#[derive(Debug, Clone, Args)]
pub(crate) struct ControlArgs {
    /// The running agent's state directory; its control socket is `control.sock` there.
    #[arg(
        long = "state-dir",
        env = "STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/defenra-agent"
    )]
    pub(crate) state_dir: PathBuf,
}

/// Flags of the agent itself (the default command).
#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// Serve the config in this JSON file (Core's format) instead of polling Core.
    /// Re-read when it changes and on SIGHUP.
    #[arg(long, env = "DEFENRA_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Base URL of Defenra Core, e.g. https://core.example.net.
    #[arg(long, env = "CORE_URL", value_name = "URL")]
    pub(crate) core_url: Option<String>,

    /// This agent's id at Core.
    #[arg(long, env = "AGENT_ID")]
    pub(crate) agent_id: Option<String>,

    /// This agent's key at Core (sent only to CORE_URL, as a Bearer token).
    #[arg(long, env = "AGENT_KEY", hide_env_values = true)]
    pub(crate) agent_key: Option<String>,

    /// One-time connect URL from Core's "add agent" dialog. When no AGENT_KEY is set, the
    /// agent enrols with it at start (run it on the edge host: Core records the caller's
    /// address as the agent's), keeps the credentials in --state-dir, then runs.
    #[arg(long, env = "CONNECT_URL", value_name = "URL", hide_env_values = true)]
    pub(crate) connect_url: Option<String>,

    /// Send no traffic or client reports to Core (they go to /api/statistics and
    /// /api/clients after each successful poll; never with --config).
    #[arg(long, env = "NO_REPORT")]
    pub(crate) no_report: bool,

    /// Seconds between polls of Core. When not set, Core's `nextPollInterval` decides
    /// (default 60).
    #[arg(long, env = "POLLING_INTERVAL", value_name = "SECONDS", value_parser = parse_poll_interval)]
    pub(crate) poll_interval: Option<u64>,

    /// DNS listener (UDP and TCP), or `off`.
    #[arg(long, env = "DNS_LISTEN", default_value = "0.0.0.0:53")]
    pub(crate) dns_listen: Listen,

    #[command(flatten)]
    pub(crate) dns: DnsArgs,

    #[command(flatten)]
    pub(crate) shield: ShieldArgs,

    #[command(flatten)]
    pub(crate) fleet: crate::fleet::FleetArgs,

    /// Plain HTTP listener, or `off`.
    #[arg(long, env = "HTTP_LISTEN", default_value = "0.0.0.0:80")]
    pub(crate) http_listen: Listen,

    /// HTTPS listener, or `off`.
    #[arg(long, env = "HTTPS_LISTEN", default_value = "0.0.0.0:443")]
    pub(crate) https_listen: Listen,

    /// Threads serving HTTP and HTTPS, each with its own `SO_REUSEPORT` socket per listener
    /// (nginx's worker model); 0 means one per CPU core.
    #[arg(long, env = "HTTP_WORKERS", default_value_t = 0)]
    pub(crate) http_workers: usize,

    /// Health, stats and metrics endpoint (/health, /stats, /metrics), or `off`. Loopback
    /// by default: /stats reveals the configuration (domains, rejected items, counters),
    /// so bind it elsewhere only on a management network.
    #[arg(long, env = "HEALTH_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) health_listen: Listen,

    /// Threads serving the TCP forwards, sharing each listening socket (a connection stays
    /// on the thread that accepted it); 0 means one per CPU core.
    #[arg(long, env = "L4_WORKERS", default_value_t = 0)]
    pub(crate) l4_workers: usize,

    /// Address the TCP/UDP forwards listen on.
    #[arg(long, env = "L4_BIND", default_value = "0.0.0.0")]
    pub(crate) l4_bind: IpAddr,

    /// MaxMind-format GeoIP database (GeoLite2/GeoIP2 City or Country, DB-IP lite).
    /// Watched and re-read on SIGHUP; while it is missing or unusable, GeoDNS answers with
    /// each domain's `default` location and /health says "degraded".
    #[arg(long, env = "GEOIP_DB", value_name = "FILE")]
    pub(crate) geoip_db: Option<PathBuf>,

    /// Directory for the last good config, served at startup when Core is unreachable.
    #[arg(long, env = "STATE_DIR", value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,

    /// This agent's public IP: the GeoDNS answer of last resort.
    #[arg(long, env = "AGENT_IP")]
    pub(crate) agent_ip: Option<IpAddr>,

    /// Origin port for plain HTTP (encryption mode off/flexible).
    #[arg(long, env = "ORIGIN_HTTP_PORT", default_value_t = 80)]
    pub(crate) origin_http_port: u16,

    /// Origin port for HTTPS (encryption mode full/full_strict).
    #[arg(long, env = "ORIGIN_HTTPS_PORT", default_value_t = 443)]
    pub(crate) origin_https_port: u16,

    /// How long to wait for an origin's response headers before answering 504, counted
    /// again from each move of the request body (`60`, `60s`, `500ms`, `2m`).
    #[arg(long, env = "ORIGIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub(crate) origin_timeout: Duration,

    /// An upgraded connection (WebSocket) in which no byte moves either way for this long is
    /// closed, like nginx's `proxy_read_timeout`; raise it for applications that keep quiet
    /// connections open without pings.
    #[arg(long, env = "TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub(crate) tunnel_idle_timeout: Duration,

    /// Answer 503 when a WAF script fails, instead of letting the request through.
    #[arg(long, env = "WAF_FAIL_CLOSED")]
    pub(crate) waf_fail_closed: bool,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub(crate) log_level: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    /// Log one line per HTTP request (target `defenra_http::access`).
    #[arg(long, env = "ACCESS_LOG")]
    pub(crate) access_log: bool,

    /// With --access-log: at most this many request lines per second; the rest are
    /// counted in `defenra_http_access_log_suppressed_total`.
    #[arg(long, env = "ACCESS_LOG_MAX_PER_SECOND", default_value_t = 1000)]
    pub(crate) access_log_max_per_second: u32,

    /// How long in-flight work may run after SIGTERM/SIGINT before the agent exits.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// A listen address, or `off` to disable the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listen {
    Off,
    On(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") || text.is_empty() {
            return Ok(Listen::Off);
        }
        // The Go agent accepted ":53" for all interfaces.
        let full = if text.starts_with(':') {
            format!("0.0.0.0{text}")
        } else {
            text.to_owned()
        };
        full.parse().map(Listen::On).map_err(|_| {
            format!("{text:?} is not an address like 0.0.0.0:53, [::]:53, :53 or `off`")
        })
    }
}

/// DNS abuse resistance: response rate limiting of UDP answers and TCP limits
/// (docs/dns.md, "Abuse resistance").
#[derive(Debug, Clone, Args)]
pub(crate) struct DnsArgs {
    /// UDP responses per second allowed per client prefix and response class (response
    /// rate limiting); 0 turns it off. 20 suits most authoritative servers.
    #[arg(
        long = "dns-rrl-rate",
        env = "DNS_RRL_RATE",
        value_name = "PER_SECOND",
        default_value_t = 0,
        value_parser = clap::value_parser!(u32).range(0..=1_000_000)
    )]
    pub(crate) rrl_rate: u32,

    /// Rate limiting: a class may burst rate × window responses (1ms-60s).
    #[arg(
        long = "dns-rrl-window",
        env = "DNS_RRL_WINDOW",
        value_name = "DURATION",
        default_value = "1s",
        value_parser = parse_rrl_window
    )]
    pub(crate) rrl_window: Duration,

    /// Rate limiting: every Nth limited response is sent truncated (TC=1) instead of
    /// dropped, so a real resolver retries over TCP; 0 drops all, 1 truncates all.
    #[arg(
        long = "dns-rrl-slip",
        env = "DNS_RRL_SLIP",
        value_name = "N",
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(0..=100)
    )]
    pub(crate) rrl_slip: u32,

    /// Rate limiting: IPv4 clients are grouped by this prefix length.
    #[arg(
        long = "dns-rrl-ipv4-prefix",
        env = "DNS_RRL_IPV4_PREFIX",
        value_name = "BITS",
        default_value_t = 24,
        value_parser = clap::value_parser!(u8).range(0..=32)
    )]
    pub(crate) rrl_ipv4_prefix: u8,

    /// Rate limiting: IPv6 clients are grouped by this prefix length.
    #[arg(
        long = "dns-rrl-ipv6-prefix",
        env = "DNS_RRL_IPV6_PREFIX",
        value_name = "BITS",
        default_value_t = 56,
        value_parser = clap::value_parser!(u8).range(0..=128)
    )]
    pub(crate) rrl_ipv6_prefix: u8,

    /// Rate limiting never applies to clients in these networks (comma-separated).
    #[arg(
        long = "dns-rrl-whitelist",
        env = "DNS_RRL_WHITELIST",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub(crate) rrl_whitelist: Vec<defenra_dns::Cidr>,

    /// Rate limiting: classes tracked at once, 8 bytes each (8 MiB for the default);
    /// when full, the least recently active class of a table row gives way.
    #[arg(
        long = "dns-rrl-table-size",
        env = "DNS_RRL_TABLE_SIZE",
        value_name = "CLASSES",
        default_value_t = 1_000_000,
        value_parser = clap::value_parser!(u64).range(64..=(1 << 26))
    )]
    pub(crate) rrl_table_size: u64,

    /// DNS over TCP: connections at once from one address; more are closed when accepted.
    #[arg(
        long = "dns-tcp-max-conns-per-ip",
        env = "DNS_TCP_MAX_CONNS_PER_IP",
        value_name = "N",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) tcp_max_conns_per_ip: u32,

    /// DNS over TCP: connections at once. When full, the one idle the longest is closed
    /// to make room; when none is idle, the new one is closed.
    #[arg(
        long = "dns-tcp-max-conns",
        env = "DNS_TCP_MAX_CONNS",
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) tcp_max_conns: u32,

    /// DNS over TCP: each message must arrive whole within this time of the previous
    /// answer (or the accept), or the connection is closed.
    #[arg(
        long = "dns-tcp-idle-timeout",
        env = "DNS_TCP_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_tcp_timeout
    )]
    pub(crate) tcp_idle_timeout: Duration,

    /// DNS over TCP: a connection is closed after this many queries.
    #[arg(
        long = "dns-tcp-max-queries",
        env = "DNS_TCP_MAX_QUERIES",
        value_name = "N",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) tcp_max_queries: u32,
}

impl DnsArgs {
    /// The DNS service's options from these flags and `--agent-ip`.
    pub(crate) fn options(&self, agent_ip: Option<IpAddr>) -> defenra_dns::DnsOptions {
        defenra_dns::DnsOptions {
            agent_ip,
            tcp_idle_timeout: self.tcp_idle_timeout,
            tcp_max_connections: self.tcp_max_conns as usize,
            tcp_max_connections_per_ip: self.tcp_max_conns_per_ip as usize,
            tcp_max_queries: self.tcp_max_queries as usize,
            rrl: defenra_dns::RrlOptions {
                rate: self.rrl_rate,
                window: self.rrl_window,
                slip: self.rrl_slip,
                ipv4_prefix: self.rrl_ipv4_prefix,
                ipv6_prefix: self.rrl_ipv6_prefix,
                whitelist: self.rrl_whitelist.clone(),
                table_size: self.rrl_table_size as usize,
            },
            ..defenra_dns::DnsOptions::default()
        }
    }
}

fn parse_rrl_window(text: &str) -> Result<Duration, String> {
    let window = parse_duration(text)?;
    if (Duration::from_millis(1)..=Duration::from_secs(60)).contains(&window) {
        Ok(window)
    } else {
        Err(format!("{text:?} must be between 1ms and 60s"))
    }
}

fn parse_tcp_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if (Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&timeout) {
        Ok(timeout)
    } else {
        Err(format!("{text:?} must be between 1ms and 1h"))
    }
}

/// Protection state (docs/shield.md): the per-address table, bans, trusted proxies, L4 caps.
#[derive(Debug, Clone, Args)]
pub(crate) struct ShieldArgs {
    /// Peers whose `proxyIpHeaders` (antiDDoS setting) are believed, as CIDRs
    /// (`173.245.48.0/20,2400:cb00::/32`); unset, every peer's are.
    #[arg(
        long = "trusted-proxies",
        env = "TRUSTED_PROXIES",
        value_name = "CIDR,...",
        value_delimiter = ',',
        value_parser = parse_cidr
    )]
    pub(crate) trusted_proxies: Vec<defenra_config::Cidr>,

    /// Addresses tracked at once per (domain, address) for rate limits and blocks
    /// (32 bytes each); when full, the idlest unblocked entries make room.
    #[arg(
        long = "shield-table-size",
        env = "SHIELD_TABLE_SIZE",
        value_name = "N",
        default_value_t = 1 << 20,
        value_parser = clap::value_parser!(u64).range(64..=(1 << 30))
    )]
    pub(crate) table_size: u64,

    /// Most bans held at once; escalations beyond it are refused and counted (an
    /// operator's `ban` always gets in).
    #[arg(
        long = "max-bans",
        env = "MAX_BANS",
        value_name = "N",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u64).range(1..=10_000_000)
    )]
    pub(crate) max_bans: u64,

    /// TCP forwards: concurrent connections per client address (0: no cap).
    #[arg(
        long = "l4-max-conns-per-ip",
        env = "L4_MAX_CONNS_PER_IP",
        default_value_t = 0
    )]
    pub(crate) l4_max_conns_per_ip: u32,

    /// TCP forwards: new connections per client address per minute (0: no limit).
    #[arg(
        long = "l4-new-conns-per-ip-per-minute",
        env = "L4_NEW_CONNS_PER_IP_PER_MINUTE",
        default_value_t = 0
    )]
    pub(crate) l4_new_conns_per_minute: u32,

    /// Also enforce bans in the kernel: `nftables` mirrors them into the sets of table
    /// `inet defenra` (needs CAP_NET_ADMIN and the `nft` command).
    #[arg(long = "ban-backend", env = "BAN_BACKEND", value_enum, default_value_t = BanBackend::None)]
    pub(crate) ban_backend: BanBackend,

    /// Key the browser challenge and its clearance cookies are signed with: 64 hex digits
    /// (`openssl rand -hex 32`), mode 0600; the same file on every agent of a fleet makes
    /// each accept the others' cookies. Re-read on SIGHUP. Unset: `shield.key` in
    /// --state-dir, created on first start (without a state dir, a random key per process).
    #[arg(long = "shield-key-file", env = "SHIELD_KEY_FILE", value_name = "FILE")]
    pub(crate) shield_key_file: Option<PathBuf>,

    /// Leading zero bits the browser challenge's proof of work needs (0-32); each bit
    /// doubles a browser's work (16: a fraction of a second).
    #[arg(
        long = "challenge-difficulty",
        env = "CHALLENGE_DIFFICULTY",
        value_name = "BITS",
        default_value_t = defenra_shield::challenge::Difficulty::DEFAULT.bits(),
        value_parser = clap::value_parser!(u8).range(0..=32)
    )]
    pub(crate) challenge_difficulty: u8,
}

/// Where bans are enforced besides the agent's own accept check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BanBackend {
    None,
    Nftables,
}

impl ShieldArgs {
    pub(crate) fn options(&self) -> defenra_shield::ShieldOptions {
        defenra_shield::ShieldOptions {
            table_size: self.table_size as usize,
            max_bans: self.max_bans as usize,
            trusted_proxies: self.trusted_proxies.clone(),
            l4_max_conns_per_ip: self.l4_max_conns_per_ip,
            l4_new_conns_per_minute: self.l4_new_conns_per_minute,
            challenge_difficulty: defenra_shield::challenge::Difficulty::new(u32::from(
                self.challenge_difficulty,
            ))
            .unwrap_or_default(),
            ..defenra_shield::ShieldOptions::default()
        }
    }
}

fn parse_cidr(text: &str) -> Result<defenra_config::Cidr, String> {
    text.parse()
        .map_err(|error: defenra_config::CidrError| error.to_string())
}

/// Which config source the flags select.
pub(crate) enum SourceChoice {
    File(PathBuf),
    Core {
        url: String,
        agent_id: String,
        agent_key: String,
    },
    /// No key yet, but a connect URL: enrol (or reuse an earlier enrolment), then poll Core.
    Enrol {
        connect_url: String,
    },
}

impl RunArgs {
    /// `--config`, or all three Core settings, or a connect URL to get them with.
    ///
    /// # Errors
    ///
    /// A usage message when none is complete.
    pub(crate) fn source(&self) -> Result<SourceChoice, String> {
        if let Some(path) = &self.config {
            return Ok(SourceChoice::File(path.clone()));
        }
        let non_empty = |value: &Option<String>| {
            value
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        match (
            non_empty(&self.core_url),
            non_empty(&self.agent_id),
            non_empty(&self.agent_key),
        ) {
            (Some(url), Some(agent_id), Some(agent_key)) => Ok(SourceChoice::Core {
                url,
                agent_id,
                agent_key,
            }),
            (url, id, key) => {
                if let Some(connect_url) = non_empty(&self.connect_url) {
                    return Ok(SourceChoice::Enrol { connect_url });
                }
                let missing: Vec<&str> = [
                    (url.is_none(), "--core-url/CORE_URL"),
                    (id.is_none(), "--agent-id/AGENT_ID"),
                    (key.is_none(), "--agent-key/AGENT_KEY"),
                ]
                .into_iter()
                .filter_map(|(is_missing, name)| is_missing.then_some(name))
                .collect();
                Err(format!(
                    "no configuration source: pass --config FILE (DEFENRA_CONFIG), or all of \
                     --core-url, --agent-id and --agent-key (missing: {}), or --connect-url \
                     (CONNECT_URL) to enrol",
                    missing.join(", ")
                ))
            }
        }
    }
}

fn parse_poll_interval(text: &str) -> Result<u64, String> {
    let seconds = parse_duration(text)?.as_secs();
    if (1..=86_400).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{text:?} must be between 1 and 86400 seconds"))
    }
}

/// `60`, `60s`, `500ms`, `2m`, `1h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 60s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a valid duration"))
}

/// The flags as a Markdown table, for docs/operations.md (kept in sync by a test).
#[cfg(test)]
fn flags_markdown() -> String {
    use clap::CommandFactory;
    let command = Cli::command();
    let mut table = String::from("| flag | env | default | meaning |\n|---|---|---|---|\n");
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let value = if arg.get_action().takes_values() {
            format!(
                " {}",
                arg.get_value_names()
                    .and_then(|names| names.first())
                    .map_or("VALUE".to_owned(), |name| name.to_string())
            )
        } else {
            String::new()
        };
        let env = arg
            .get_env()
            .map(|env| format!("`{}`", env.to_string_lossy()))
            .unwrap_or_default();
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        let default = if default.is_empty() {
            String::new()
        } else {
            format!("`{}`", default.join(","))
        };
        let help = arg
            .get_help()
            .map(|help| help.to_string().replace('|', "\\|"))
            .unwrap_or_default();
        table.push_str(&format!(
            "| `--{long}{value}` | {env} | {default} | {help} |\n"
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// docs/operations.md lists every flag; regenerate with
    /// `DEFENRA_UPDATE_DOCS=1 cargo test -p defenra-agent`.
    #[test]
    fn operations_doc_lists_every_flag() {
        crate::docsync::check_operations_section("flags", &flags_markdown());
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn listen_accepts_off_and_go_style_ports() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!(
            ":53".parse::<Listen>(),
            Ok(Listen::On("0.0.0.0:53".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:8080".parse::<Listen>(),
            Ok(Listen::On("[::1]:8080".parse().unwrap()))
        );
        assert!("53".parse::<Listen>().is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_poll_interval("0").is_err());
    }

    #[test]
    fn dns_abuse_flags_reach_the_dns_options() {
        let defaults = Cli::try_parse_from(["defenra-agent"])
            .unwrap()
            .run
            .dns
            .options(None);
        let library = defenra_dns::DnsOptions::default();
        assert_eq!(
            defaults.rrl, library.rrl,
            "flag defaults match the library's"
        );
        assert_eq!(defaults.tcp_idle_timeout, library.tcp_idle_timeout);
        assert_eq!(defaults.tcp_max_connections, library.tcp_max_connections);
        assert_eq!(
            defaults.tcp_max_connections_per_ip,
            library.tcp_max_connections_per_ip
        );
        assert_eq!(defaults.tcp_max_queries, library.tcp_max_queries);

        let args = Cli::try_parse_from([
            "defenra-agent",
            "--dns-rrl-rate",
            "20",
            "--dns-rrl-window",
            "2s",
            "--dns-rrl-slip",
            "3",
            "--dns-rrl-ipv4-prefix",
            "32",
            "--dns-rrl-whitelist",
            "192.0.2.0/24,2001:db8::/32",
            "--dns-tcp-max-conns-per-ip",
            "4",
            "--dns-tcp-idle-timeout",
            "500ms",
        ])
        .unwrap();
        let options = args.run.dns.options(None);
        assert_eq!(options.rrl.rate, 20);
        assert_eq!(options.rrl.window, Duration::from_secs(2));
        assert_eq!(options.rrl.slip, 3);
        assert_eq!(options.rrl.ipv4_prefix, 32);
        assert_eq!(options.rrl.whitelist.len(), 2);
        assert_eq!(options.tcp_max_connections_per_ip, 4);
        assert_eq!(options.tcp_idle_timeout, Duration::from_millis(500));
        for bad in [
            ["--dns-rrl-whitelist", "192.0.2.0/33"],
            ["--dns-rrl-ipv4-prefix", "33"],
            ["--dns-rrl-window", "0s"],
            ["--dns-tcp-max-conns", "0"],
        ] {
            let mut argv = vec!["defenra-agent"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn challenge_flags_reach_the_shield_options() {
        let defaults = Cli::try_parse_from(["defenra-agent"]).unwrap().run.shield;
        assert_eq!(
            defaults.options().challenge_difficulty,
            defenra_shield::ShieldOptions::default().challenge_difficulty
        );
        assert_eq!(defaults.shield_key_file, None);
        let args = Cli::try_parse_from([
            "defenra-agent",
            "--challenge-difficulty",
            "20",
            "--shield-key-file",
            "/etc/defenra/shield.key",
        ])
        .unwrap()
        .run
        .shield;
        assert_eq!(args.options().challenge_difficulty.bits(), 20);
        assert_eq!(
            args.shield_key_file.as_deref(),
            Some(std::path::Path::new("/etc/defenra/shield.key"))
        );
        assert!(Cli::try_parse_from(["defenra-agent", "--challenge-difficulty", "33"]).is_err());
    }

    #[test]
    fn a_source_is_required() {
        let args = Cli::try_parse_from(["defenra-agent", "--core-url", "https://core"]).unwrap();
        let error = args.run.source().err().unwrap();
        assert!(
            error.contains("--agent-id/AGENT_ID") && error.contains("--agent-key/AGENT_KEY"),
            "{error}"
        );
        let args = Cli::try_parse_from(["defenra-agent", "--config", "x.json"]).unwrap();
        assert!(matches!(args.run.source(), Ok(SourceChoice::File(_))));
        let args = Cli::try_parse_from([
            "defenra-agent",
            "--connect-url",
            "https://core/api/agent/connect/t",
        ])
        .unwrap();
        assert!(matches!(args.run.source(), Ok(SourceChoice::Enrol { .. })));
        let args = Cli::try_parse_from([
            "defenra-agent",
            "--connect-url",
            "https://core/api/agent/connect/t",
            "--core-url",
            "https://core",
            "--agent-id",
            "a",
            "--agent-key",
            "k",
        ])
        .unwrap();
        assert!(
            matches!(args.run.source(), Ok(SourceChoice::Core { .. })),
            "a key wins over the connect URL"
        );
    }
}
