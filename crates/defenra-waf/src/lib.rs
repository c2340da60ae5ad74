//! Per-domain Lua firewall rules with an OpenResty-compatible `ngx` API.
//!
//! SKELETON: the public API below is the contract `defenra-http` calls; the engine itself
//! (mlua sandbox, ngx API, shared dicts, budgets) is being built under issue 5. Until then
//! every request is allowed.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use defenra_config::stats::{Metric, StatsSource};
use defenra_config::{Issue, Reload, Snapshot};
use http::{HeaderMap, Method, StatusCode, Uri};

/// Engine settings.
#[derive(Debug, Clone, Default)]
pub struct WafOptions {
    /// Answer 503 instead of letting the request through when a script fails.
    pub fail_closed: bool,
}

/// What the HTTP proxy knows about a request when it asks the WAF.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// The matched domain (zone apex, normalised), which selects the script.
    pub domain: &'a str,
    /// The requested host, lower case, without port.
    pub host: &'a str,
    pub method: &'a Method,
    /// Path and query as received.
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub remote_addr: IpAddr,
    /// `"http"` or `"https"`.
    pub scheme: &'static str,
    /// The port the client connected to.
    pub server_port: u16,
}

/// The WAF's answer, which the HTTP proxy acts on without knowing Lua.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Proxy the request; add `extra_headers` to the response sent to the client.
    Allow { extra_headers: HeaderMap },
    /// Answer the client directly with this response; the origin is not contacted.
    Block {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

/// The Lua WAF. One per agent; `reload` compiles every domain's script.
#[derive(Default)]
pub struct WafEngine {
    options: WafOptions,
    stats: Arc<WafStats>,
}

impl WafEngine {
    pub fn new(options: WafOptions) -> Self {
        WafEngine {
            options,
            stats: Arc::default(),
        }
    }

    /// Whether `domain` has a script; requests of other domains need no WAF call.
    pub fn has_script(&self, _domain: &str) -> bool {
        let _ = &self.options;
        false
    }

    /// Runs `request.domain`'s script. Synchronous and bounded by the per-request budget.
    pub fn check(&self, _request: &RequestInfo<'_>) -> Verdict {
        Verdict::Allow {
            extra_headers: HeaderMap::new(),
        }
    }

    pub fn stats(&self) -> Arc<WafStats> {
        Arc::clone(&self.stats)
    }
}

/// Compiles every script in `snapshot` without installing anything, for
/// `defenra-agent check-config`: syntax errors come back with the domain's JSON path.
pub fn check_scripts(_snapshot: &Snapshot) -> Vec<Issue> {
    Vec::new()
}

impl Reload for WafEngine {
    fn reload(&self, _snapshot: &Arc<Snapshot>, _issues: &mut Vec<Issue>) {}
}

/// WAF counters.
#[derive(Debug, Default)]
pub struct WafStats {}

impl StatsSource for WafStats {
    fn service(&self) -> &'static str {
        "waf"
    }

    fn collect(&self, _out: &mut Vec<Metric>) {}
}
