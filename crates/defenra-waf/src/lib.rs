//! Per-domain Lua firewall rules with an OpenResty-compatible `ngx` API.
//!
//! This crate owns the WAF: it compiles each domain's `luaCode` when a snapshot arrives,
//! runs it for every request of that domain in a sandboxed LuaJIT state, and answers with a
//! [`Verdict`] the HTTP proxy acts on without knowing Lua. It also owns the `ngx.shared`
//! dictionaries, which outlive reloads.
//!
//! It must never let a script hurt the agent: no file, process, network or environment
//! access, no `load`, no `debug`, no JIT (so the instruction budget always applies), a
//! memory cap per state, and no state shared between requests except the dictionaries.
//! It never does I/O on the request path and never prints.
//!
//! Process-wide effects a host should know of: once an engine has a Lua state, it runs one
//! `waf-watchdog` thread (woken every 5 ms) and installs a handler for the real-time signal
//! `SIGRTMIN+7`, which the watchdog sends to a worker thread whose script runs long, to
//! turn the instruction hook on (`watchdog.rs`). If that signal already has a handler, the
//! engine leaves it alone and keeps the hook on for every run instead.
//!
//! The host may install a [`ClientLocator`] (`WafEngine::set_locator`): the source of the
//! `ngx.var.geoip_*` variables, so this crate needs no GeoIP dependency. A host with a
//! fleet of agents makes `ngx.shared.fleet` shared (`WafEngine::enable_fleet_dict`): this
//! crate notes that dictionary's changes and takes the fleet's values back, and the host
//! carries them (no network code here).
//!
//! Start reading at [`WafEngine::check`] (engine.rs), then `sandbox.rs` and `sandbox.lua`
//! for the sandbox, and `api.rs` for the `ngx` functions. `docs/waf.md` lists the API.

mod api;
mod clock;
mod dict;
mod engine;
mod geo;
mod headers;
mod limit;
mod pattern;
mod re;
mod sandbox;
mod stats;
mod strlib;
mod watchdog;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

pub use clock::Clock;
pub use dict::{DictValue, FLEET_DICT, FleetDictChange, FleetDictChanges, FleetDictOp};
pub use engine::{WafEngine, check_scripts};
pub use geo::{ClientLocation, ClientLocator};
pub use stats::{DomainCounters, WafStats};

/// Engine settings. `Default` gives the production values.
#[derive(Debug, Clone)]
pub struct WafOptions {
    /// Answer 503 instead of letting the request through when a script fails.
    pub fail_closed: bool,
    /// VM instructions one run may execute before it is aborted (checked every 1000, once
    /// the budget watchdog has armed the run: runs shorter than 5-10 ms are not counted).
    pub instruction_budget: u64,
    /// Wall time one run may take before it is aborted (checked every 1000 instructions
    /// once the run is armed, counted from one watchdog tick before the first check).
    /// It counts time the thread was preempted, so on a badly overloaded machine a normal
    /// script can, rarely, be aborted (and fail open).
    pub time_budget: Duration,
    /// Memory cap of each Lua state (one per worker thread), in bytes.
    pub memory_limit: usize,
    /// Byte quota of one domain's `ngx.shared` dictionaries together (each domain has its
    /// own dictionaries); least recently used entries of the dictionary being written go
    /// first.
    pub dict_capacity: usize,
    /// Most dictionaries one domain's script may create (a dict exists once the script
    /// names it).
    pub max_dicts: usize,
    /// Time source for dictionary TTLs and `ngx.time`/`ngx.now`.
    pub clock: Clock,
}

impl Default for WafOptions {
    fn default() -> Self {
        WafOptions {
            fail_closed: false,
            instruction_budget: 10_000_000,
            time_budget: Duration::from_millis(50),
            memory_limit: 64 << 20,
            dict_capacity: 16 << 20,
            max_dicts: 16,
            clock: Clock::system(),
        }
    }
}

/// What the HTTP proxy knows about a request when it asks the WAF.
///
/// Everything is borrowed, and nothing needs building for the WAF: an HTTP/1 parser's raw
/// slices fit as they are (see [`RequestHeaders::Pairs`]). The engine copies what the script
/// may read into buffers its Lua state reuses.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The matched domain (zone apex, normalised), which selects the script.
    pub domain: &'a str,
    /// The requested host, lower case, without port.
    pub host: &'a str,
    /// `Method::from_bytes` makes one without allocating for the standard methods.
    pub method: &'a Method,
    /// The request target as received, in origin form: path and query (`/a/b?x=1`). An
    /// empty target reads as `/`.
    pub target: &'a str,
    pub headers: RequestHeaders<'a>,
    pub remote_addr: IpAddr,
    /// `"http"` or `"https"`.
    pub scheme: &'static str,
    /// The port the client connected to.
    pub server_port: u16,
}

/// The request headers, in whichever form the caller already has them. Scripts see the
/// same thing either way: names match case-insensitively, and repeated headers keep their
/// order.
#[derive(Debug, Clone, Copy)]
pub enum RequestHeaders<'a> {
    /// hyper's map (the HTTP/2 path).
    Map(&'a HeaderMap),
    /// Name/value pairs in arrival order: names as received (any case), values raw bytes
    /// (an HTTP/1 parser's output, such as `httparse::Header`'s fields).
    Pairs(&'a [(&'a str, &'a [u8])]),
}

/// The WAF's answer, which the HTTP proxy acts on without knowing Lua.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Proxy the request; add `extra_headers` to the response sent to the client.
    Allow { extra_headers: HeaderMap },
    /// Answer the client directly with this response; the origin is not contacted. An
    /// empty `body` with a status of 400 or more means the script wrote none: the proxy
    /// answers with its own page for that status.
    Block {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

/// Why a script run produced no verdict of its own. [`WafEngine::check`] never returns it:
/// it counts it, logs it (rate-limited) and answers fail-open or fail-closed instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WafError {
    /// A Lua error, or a script that does not compile.
    #[error("lua error: {0}")]
    Script(String),
    #[error("instruction budget of {0} exceeded")]
    InstructionBudget(u64),
    #[error("time budget of {0:?} exceeded")]
    TimeBudget(Duration),
    #[error("memory limit of {0} bytes exceeded")]
    Memory(usize),
    #[error("cannot create a lua state: {0}")]
    State(String),
}

#[cfg(test)]
mod tests;

/// At most `most` bytes of `text`, cut at a character boundary.
pub(crate) fn prefix(text: &str, most: usize) -> &str {
    let mut end = most.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
