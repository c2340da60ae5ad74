//! WAF counters: per-domain checks, blocks, script errors and aborts, plus dict usage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use defenra_config::stats::{Metric, StatsSource};
use parking_lot::RwLock;

use crate::dict::SharedDicts;

/// WAF counters, rendered by `agent-bin` under the service name `waf`.
pub struct WafStats {
    /// Per-domain counters. Only `reload` (the config task) writes the map; the request path
    /// reaches its domain's counters through the compiled view and never takes this lock.
    domains: RwLock<BTreeMap<String, Arc<DomainCounters>>>,
    dicts: Arc<SharedDicts>,
}

impl std::fmt::Debug for WafStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WafStats")
            .field("domains", &self.domains.read().len())
            .finish()
    }
}

/// Counters of one domain's script.
#[derive(Debug, Default)]
pub struct DomainCounters {
    /// Requests the script ran for.
    pub checks: AtomicU64,
    /// Requests the script answered itself (`ngx.exit(403)`, a custom body, ...).
    pub blocks: AtomicU64,
    /// Runs that ended in a Lua error (or a script that does not compile).
    pub errors: AtomicU64,
    /// Runs stopped for exceeding the instruction or time budget.
    pub aborts_budget: AtomicU64,
    /// Runs stopped for exceeding the memory cap.
    pub aborts_memory: AtomicU64,
}

impl WafStats {
    pub(crate) fn new(dicts: Arc<SharedDicts>) -> Self {
        WafStats {
            domains: RwLock::new(BTreeMap::new()),
            dicts,
        }
    }

    /// The counters of `domain`, created on first use. Control path only.
    pub(crate) fn domain(&self, domain: &str) -> Arc<DomainCounters> {
        if let Some(counters) = self.domains.read().get(domain) {
            return Arc::clone(counters);
        }
        Arc::clone(self.domains.write().entry(domain.to_owned()).or_default())
    }

    /// Drops the counters of domains that no longer have a script.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.domains.write().retain(|domain, _| keep(domain));
    }

    /// A copy of one domain's counters `(checks, blocks, errors, aborts)`, for tests and
    /// diagnostics; `None` when the domain has no script.
    pub fn domain_totals(&self, domain: &str) -> Option<(u64, u64, u64, u64)> {
        let domains = self.domains.read();
        let counters = domains.get(domain)?;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Some((
            read(&counters.checks),
            read(&counters.blocks),
            read(&counters.errors),
            read(&counters.aborts_budget) + read(&counters.aborts_memory),
        ))
    }
}

impl StatsSource for WafStats {
    fn service(&self) -> &'static str {
        "waf"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let domains = self.domains.read();
        out.push(Metric::gauge(
            "scripts",
            "Domains with a WAF script",
            domains.len() as f64,
        ));
        for (domain, counters) in domains.iter() {
            let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
            out.push(
                Metric::counter(
                    "checks_total",
                    "Requests a WAF script ran for",
                    read(&counters.checks),
                )
                .label("domain", domain),
            );
            out.push(
                Metric::counter(
                    "blocks_total",
                    "Requests a WAF script answered itself",
                    read(&counters.blocks),
                )
                .label("domain", domain),
            );
            out.push(
                Metric::counter(
                    "errors_total",
                    "WAF script runs that failed with a Lua error",
                    read(&counters.errors),
                )
                .label("domain", domain),
            );
            for (reason, counter) in [
                ("budget", &counters.aborts_budget),
                ("memory", &counters.aborts_memory),
            ] {
                out.push(
                    Metric::counter(
                        "aborts_total",
                        "WAF script runs stopped by a limit",
                        read(counter),
                    )
                    .label("domain", domain)
                    .label("reason", reason),
                );
            }
        }
        for (domain, name, entries, bytes, evictions) in self.dicts.summary() {
            out.push(
                Metric::gauge("dict_entries", "Entries in a shared dict", entries as f64)
                    .label("domain", domain.clone())
                    .label("dict", name.clone()),
            );
            out.push(
                Metric::gauge("dict_bytes", "Bytes charged to a shared dict", bytes as f64)
                    .label("domain", domain.clone())
                    .label("dict", name.clone()),
            );
            out.push(
                Metric::counter(
                    "dict_evictions_total",
                    "Live shared-dict entries evicted to make room",
                    evictions,
                )
                .label("domain", domain)
                .label("dict", name),
            );
        }
    }
}
