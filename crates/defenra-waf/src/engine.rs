//! `WafEngine`: the compiled view of every domain's script, the per-thread Lua states, and
//! how a run's outcome becomes a [`Verdict`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use defenra_config::{Issue, Reload, Snapshot};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, StatusCode};
use mlua::{Lua, LuaOptions, StdLib};

use crate::api::Abort;
use crate::dict::{DictValue, FleetDictChanges, SharedDicts};
use crate::geo::{Locator, LocatorCell};
use crate::limit::LogLimiter;
use crate::sandbox::{self, Chunk, Limits, Outcome, Sandbox};
use crate::stats::{DomainCounters, WafStats};
use crate::watchdog::Watchdog;
use crate::{ClientLocator, RequestInfo, Verdict, WafError, WafOptions};

/// Error log lines per second for failing scripts, over all domains (each at most a few
/// hundred bytes: the error's first line, cut at 300).
const ERROR_LOGS_PER_SECOND: u64 = 10;
/// `ngx.log` lines per second, over all domains.
const SCRIPT_LOGS_PER_SECOND: u64 = 100;
/// `ngx.log` message bytes per second, over all domains: 32 lines of the longest message
/// (`api::MAX_LOG_LINE`), or all 100 lines at 640 bytes each.
const SCRIPT_LOG_BYTES_PER_SECOND: u64 = 64 << 10;

/// The Lua WAF. One per agent; `reload` compiles every domain's script.
pub struct WafEngine {
    shared: Arc<Shared>,
}

/// What worker threads need from the engine. Workers hold a `Weak` to it, which also
/// identifies the engine their Lua state belongs to.
struct Shared {
    options: WafOptions,
    limits: Limits,
    view: ArcSwap<View>,
    generation: AtomicU64,
    dicts: Arc<SharedDicts>,
    stats: Arc<WafStats>,
    error_logs: LogLimiter,
    script_logs: Arc<LogLimiter>,
    watchdog: Watchdog,
    /// The source of `ngx.var.geoip_*`, if the host set one.
    locator: Arc<LocatorCell>,
}

/// The scripts of one snapshot, keyed by domain name.
#[derive(Default)]
struct View {
    generation: u64,
    scripts: DomainMap<Arc<Script>>,
}

/// Maps keyed by domain name, hashed with FNV-1a: the names come from the config, never
/// from clients, so a keyed hash (SipHash) buys nothing and cost a visible share of a short
/// script's run (two or three lookups per request).
type DomainMap<V> = HashMap<String, V, BuildHasherDefault<Fnv>>;

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Script {
    source: Arc<str>,
    /// The syntax error, when the script does not compile; every request then counts as a
    /// script error and gets the fail-open/fail-closed answer.
    compile_error: Option<String>,
    counters: Arc<DomainCounters>,
}

thread_local! {
    /// The Lua states of this thread, one per live engine (normally exactly one).
    ///
    /// A Lua state is single-threaded: sharing one between tokio workers would need the
    /// `send` feature and a lock around every call, which doubled the cost of a trivial
    /// call in measurements and would serialise all requests. Instead each worker thread
    /// builds its own state on its first WAF call and keeps it. Chunks are loaded into a
    /// state lazily, the first time the thread runs that domain's script after a reload
    /// (the generation check in `Worker::sync`), so a reload does no Lua work on request
    /// threads beyond that one load.
    static WORKERS: RefCell<Vec<Worker>> = const { RefCell::new(Vec::new()) };
}

struct Worker {
    engine: Weak<Shared>,
    sandbox: Sandbox,
    generation: u64,
    /// `SharedDicts::epoch` when this state last let go of freed dictionaries.
    dict_epoch: u64,
    chunks: DomainMap<LoadedChunk>,
}

struct LoadedChunk {
    /// The source it was loaded from, compared by pointer to spot a changed script.
    source: Arc<str>,
    chunk: Result<Chunk, String>,
}

impl WafEngine {
    /// An engine with no scripts; `reload` installs them.
    pub fn new(options: WafOptions) -> Self {
        let dicts = Arc::new(SharedDicts::new(
            options.max_dicts,
            options.dict_capacity,
            options.clock.clone(),
        ));
        let limits = Limits {
            instructions: options.instruction_budget,
            time: options.time_budget,
            memory: options.memory_limit,
        };
        WafEngine {
            shared: Arc::new(Shared {
                limits,
                view: ArcSwap::from_pointee(View::default()),
                generation: AtomicU64::new(0),
                stats: Arc::new(WafStats::new(Arc::clone(&dicts))),
                dicts,
                error_logs: LogLimiter::new(ERROR_LOGS_PER_SECOND, u64::MAX),
                script_logs: Arc::new(LogLimiter::new(
                    SCRIPT_LOGS_PER_SECOND,
                    SCRIPT_LOG_BYTES_PER_SECOND,
                )),
                watchdog: Watchdog::new(),
                locator: Arc::new(LocatorCell::empty()),
                options,
            }),
        }
    }

    /// Sets (or, with `None`, removes) the source of `ngx.var.geoip_*`; requests that start
    /// after the call use it. Call it again when the GeoIP database is replaced. Without a
    /// locator the variables read as `nil`.
    pub fn set_locator(&self, locator: Option<Arc<dyn ClientLocator>>) {
        self.shared
            .locator
            .store(locator.map(|locator| Arc::new(Locator(locator))));
    }

    /// Whether `domain` has a script; requests of other domains need no WAF call.
    pub fn has_script(&self, domain: &str) -> bool {
        self.shared.view.load().scripts.contains_key(domain)
    }

    /// Runs `request.domain`'s script and says what to do with the request. Synchronous and
    /// bounded by the per-request budget; a domain without a script is allowed at once.
    ///
    /// A script error or an abort never reaches the caller: it is counted and logged
    /// (rate-limited), and the answer is `Allow` (fail open) or a 503 `Block` (fail closed).
    pub fn check(&self, request: &RequestInfo<'_>) -> Verdict {
        let view = self.shared.view.load();
        let Some(script) = view.scripts.get(request.domain) else {
            return allow();
        };
        script.counters.checks.fetch_add(1, Ordering::Relaxed);
        if let Some(error) = &script.compile_error {
            return self.failed(request.domain, script, WafError::Script(error.clone()));
        }
        let result = WORKERS.try_with(|workers| {
            let Ok(mut workers) = workers.try_borrow_mut() else {
                return Err(WafError::Script(
                    "waf re-entered on the same thread".to_owned(),
                ));
            };
            let worker = self.worker(&mut workers)?;
            worker.sync(&view, &self.shared.dicts);
            let chunk = load_chunk(&worker.sandbox, &mut worker.chunks, request.domain, script)?;
            match worker.sandbox.run(chunk, request) {
                Outcome::Finished { exit } => Ok(finish(exit, &mut worker.sandbox.response())),
                Outcome::Error(message) => Err(WafError::Script(message)),
                Outcome::Aborted(Abort::Instructions) => {
                    Err(WafError::InstructionBudget(self.shared.limits.instructions))
                }
                Outcome::Aborted(Abort::Time) => Err(WafError::TimeBudget(self.shared.limits.time)),
                Outcome::OutOfMemory => Err(WafError::Memory(self.shared.limits.memory)),
            }
        });
        match result {
            Ok(Ok(verdict)) => {
                if matches!(verdict, Verdict::Block { .. }) {
                    script.counters.blocks.fetch_add(1, Ordering::Relaxed);
                }
                verdict
            }
            Ok(Err(failure)) => self.failed(request.domain, script, failure),
            Err(_) => self.failed(
                request.domain,
                script,
                WafError::Script("thread is shutting down".to_owned()),
            ),
        }
    }

    /// Makes each domain's `ngx.shared.fleet` a fleet dictionary: from now on its changes
    /// are noted (at most `max_pending` keys per domain between two drains) for the host's
    /// fleet task, which drains them with [`WafEngine::take_fleet_dict_changes`] and brings
    /// the fleet's values back with [`WafEngine::apply_fleet_dict_value`]. Call it before
    /// serving. Without it, `ngx.shared.fleet` is a dictionary of this agent like any other.
    /// False when it was enabled already.
    pub fn enable_fleet_dict(&self, max_pending: usize) -> bool {
        self.shared.dicts.enable_fleet(max_pending)
    }

    /// Hands over (and forgets) the changes of every domain's `ngx.shared.fleet` since the
    /// last call, coalesced per key. Never blocks longer than one dictionary's short lock.
    pub fn take_fleet_dict_changes(&self) -> FleetDictChanges {
        self.shared.dicts.take_fleet()
    }

    /// Stores the fleet's value of `key` in `domain`'s `ngx.shared.fleet` cache (`value:
    /// None`: the fleet has none; `ttl_ms` 0: no expiry). An `incr` still waiting here is
    /// added on top, and a write still waiting wins. Does nothing (false) for a domain whose
    /// script has not used the dictionary on this agent.
    pub fn apply_fleet_dict_value(
        &self,
        domain: &str,
        key: &[u8],
        value: Option<DictValue>,
        ttl_ms: u64,
    ) -> bool {
        self.shared.dicts.apply_fleet(domain, key, value, ttl_ms)
    }

    /// The dictionaries, for tests.
    #[cfg(test)]
    pub(crate) fn shared_dicts(&self) -> &SharedDicts {
        &self.shared.dicts
    }

    /// The engine's counters, for /stats and /metrics.
    pub fn stats(&self) -> Arc<WafStats> {
        Arc::clone(&self.shared.stats)
    }

    /// This thread's worker for this engine, built on first use.
    fn worker<'w>(&self, workers: &'w mut Vec<Worker>) -> Result<&'w mut Worker, WafError> {
        // Compared by address: `Arc::downgrade` on every request would bounce the weak count
        // between threads.
        let me = Arc::as_ptr(&self.shared);
        if let Some(index) = workers
            .iter()
            .position(|worker| std::ptr::eq(worker.engine.as_ptr(), me))
        {
            return Ok(&mut workers[index]);
        }
        // States of dropped engines (tests, mostly) are freed here.
        workers.retain(|worker| worker.engine.strong_count() > 0);
        let sandbox = Sandbox::new(
            self.shared.limits,
            &self.shared.dicts,
            self.shared.options.clock.clone(),
            Arc::clone(&self.shared.script_logs),
            &self.shared.watchdog,
            Arc::clone(&self.shared.locator),
        )
        .map_err(|error| WafError::State(error.to_string()))?;
        workers.push(Worker {
            engine: Arc::downgrade(&self.shared),
            sandbox,
            generation: u64::MAX,
            dict_epoch: self.shared.dicts.epoch(),
            chunks: DomainMap::default(),
        });
        let last = workers.len() - 1;
        Ok(&mut workers[last])
    }

    fn failed(&self, domain: &str, script: &Script, failure: WafError) -> Verdict {
        let counters = &script.counters;
        let counter = match &failure {
            WafError::InstructionBudget(_) | WafError::TimeBudget(_) => &counters.aborts_budget,
            WafError::Memory(_) => &counters.aborts_memory,
            _ => &counters.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let fail_closed = self.shared.options.fail_closed;
        let now = self.shared.options.clock.unix_ms() / 1000;
        if let Some(suppressed) = self.shared.error_logs.allow(now, 0) {
            tracing::warn!(
                domain,
                error = %failure,
                suppressed,
                action = if fail_closed { "503" } else { "allow" },
                "waf script failed"
            );
        }
        if fail_closed {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                HeaderMap::new(),
                Vec::new(),
            )
        } else {
            allow()
        }
    }
}

impl Default for WafEngine {
    fn default() -> Self {
        WafEngine::new(WafOptions::default())
    }
}

impl Reload for WafEngine {
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>) {
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let stats = &self.shared.stats;
        let mut scripts = DomainMap::default();
        for (domain, source, compile_error) in compile_all(snapshot, issues) {
            let counters = stats.domain(&domain);
            scripts.insert(
                domain,
                Arc::new(Script {
                    source,
                    compile_error,
                    counters,
                }),
            );
        }
        stats.retain(|domain| scripts.contains_key(domain));
        // Dictionaries no live script names are freed: those of domains without a script,
        // and, for a script that changed, those whose name its new source does not contain
        // (a dictionary named at run time, `ngx.shared["rl_" .. zone]`, starts empty again
        // after its script changes). Unchanged scripts keep all theirs.
        let previous = self.shared.view.load();
        self.shared
            .dicts
            .retain(|domain, name| match scripts.get(domain) {
                None => false,
                Some(script) => {
                    previous
                        .scripts
                        .get(domain)
                        .is_some_and(|old| *old.source == *script.source)
                        || script.source.contains(name)
                }
            });
        self.shared.view.store(Arc::new(View {
            generation,
            scripts,
        }));
    }
}

/// Compiles every script in `snapshot` without installing anything, for
/// `defenra-agent check-config`: syntax errors come back with the domain's JSON path.
pub fn check_scripts(snapshot: &Snapshot) -> Vec<Issue> {
    let mut issues = Vec::new();
    compile_all(snapshot, &mut issues);
    issues
}

/// `(domain, source, syntax error)` for every domain with a script; syntax errors are also
/// pushed to `issues` as `domains[i].luaCode`, where `i` is the domain's position in
/// `snapshot.domains` (document order minus domains the compiler skipped).
fn compile_all(
    snapshot: &Snapshot,
    issues: &mut Vec<Issue>,
) -> Vec<(String, Arc<str>, Option<String>)> {
    let scratch = Lua::new_with(StdLib::NONE, LuaOptions::new());
    let mut out = Vec::new();
    for (index, domain) in snapshot.domains.iter().enumerate() {
        let Some(source) = &domain.lua_code else {
            continue;
        };
        let result = match &scratch {
            Ok(lua) => sandbox::syntax_check(lua, &domain.name, source),
            Err(error) => Err(format!("cannot create a Lua state: {error}")),
        };
        let compile_error = result.err();
        if let Some(message) = &compile_error {
            issues.push(Issue::new(
                format!("domains[{index}].luaCode"),
                format!("lua script does not compile: {message}"),
            ));
        }
        out.push((domain.name.clone(), Arc::clone(source), compile_error));
    }
    out
}

impl Worker {
    /// Drops chunks whose script changed or went away since the last snapshot this thread
    /// saw; after a reload that freed dictionaries, drops every chunk and the state's
    /// handles to dictionaries, so the freed ones' memory goes.
    fn sync(&mut self, view: &View, dicts: &SharedDicts) {
        if self.generation == view.generation {
            return;
        }
        let epoch = dicts.epoch();
        if epoch != self.dict_epoch {
            self.chunks.clear();
            self.sandbox.forget_dicts();
            self.dict_epoch = epoch;
        }
        self.chunks
            .retain(|domain, loaded| match view.scripts.get(domain) {
                Some(script) if *script.source == *loaded.source => {
                    loaded.source = Arc::clone(&script.source);
                    true
                }
                _ => false,
            });
        self.generation = view.generation;
    }
}

/// `domain`'s chunk in this thread's state, loaded on first use after a change.
fn load_chunk<'c>(
    sandbox: &Sandbox,
    chunks: &'c mut DomainMap<LoadedChunk>,
    domain: &str,
    script: &Script,
) -> Result<&'c Chunk, WafError> {
    let stale = chunks
        .get(domain)
        .is_none_or(|loaded| !Arc::ptr_eq(&loaded.source, &script.source));
    if stale {
        let chunk = sandbox.load(domain, &script.source);
        chunks.insert(
            domain.to_owned(),
            LoadedChunk {
                source: Arc::clone(&script.source),
                chunk,
            },
        );
    }
    match chunks.get(domain).map(|loaded| &loaded.chunk) {
        Some(Ok(chunk)) => Ok(chunk),
        Some(Err(message)) => Err(WafError::Script(message.clone())),
        None => Err(WafError::Script("chunk vanished".to_owned())),
    }
}

fn allow() -> Verdict {
    Verdict::Allow {
        extra_headers: HeaderMap::new(),
    }
}

/// Turns a finished run into a verdict.
///
/// - `ngx.exit(status)` with a status of 200 or more answers with that status, the headers
///   the script set and its `ngx.say` output (none when it printed nothing: for an error
///   status the proxy then answers with the edge's page).
/// - `ngx.exit(ngx.ERROR)` answers 500.
/// - Otherwise (no exit, `ngx.OK`, `ngx.DONE`, `ngx.DECLINED`), a script that printed a
///   body answers with it and `ngx.status` (200 when unset or a 1xx); one that did not lets
///   the request through, adding `ngx.header` values to the proxied response.
fn finish(exit: Option<i64>, response: &mut crate::api::ResponseData) -> Verdict {
    let headers = std::mem::take(&mut response.headers);
    let body = std::mem::take(&mut response.body);
    let status = match exit {
        Some(code) if code >= 200 => code as u16,
        Some(-1) => 500,
        // A 1xx is interim (RFC 9110 §15.2): it cannot carry the script's page.
        _ if !body.is_empty() => response
            .status
            .filter(|status| *status >= 200)
            .unwrap_or(200),
        _ => {
            return Verdict::Allow {
                extra_headers: headers,
            };
        }
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    respond(status, headers, body)
}

fn respond(status: StatusCode, mut headers: HeaderMap, body: Vec<u8>) -> Verdict {
    // An error status without a body of the script's own stays empty: the proxy answers it
    // with the edge's page for that status (HTML or text by the client's `Accept`, with a
    // request id), as nginx would with its error page.
    if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    Verdict::Block {
        status,
        headers,
        body: Bytes::from(body),
    }
}
