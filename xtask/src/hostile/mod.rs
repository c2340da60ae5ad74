//! `cargo xtask hostile [--only NAME,...] [--fast] [--agent-bin PATH] [--repeat N] [--list]`: the attack
//! suite. Black-box: every attack runs against the agent binary on loopback, bounded in time
//! and count, beside legitimate clients (DNS over UDP and TCP, HTTP, HTTPS, a TCP forward)
//! whose success and p99 are measured before, during and after it, while the agent's RSS and
//! open descriptors are sampled. An attack passes when the legitimate clients kept ≥ 99 %
//! success during it and 100 % after, RSS and descriptors came back near where they started,
//! the agent is still alive, and the attack's own expected outcome held (the right protocol
//! error, the attack connection closed, a bounded resource).
//!
//! The binary is `target/release/defenra-agent` unless `--agent-bin` names another (a debug
//! build for development). `--fast` runs the subset CI runs (under about two minutes).
//! `--only` takes attack names or area prefixes (`dns`, `h1`, `h2`, `tls`, `waf`, `config`,
//! `l4`). `--repeat N` runs the selection N times on the same agent. The table is printed
//! and written to `target/hostile-report.md`.
//!
//! Layout: `harness` (the lab: origin, echoes, certificate, the agent process and its
//! config), `core` (the fake Core), `legit` (the legitimate clients), `net` (client
//! helpers), and one module of attacks per area.

mod config;
mod core;
mod dns;
mod h2;
mod harness;
mod http1;
mod l4;
mod legit;
mod net;
mod tls;
mod waf;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use harness::{Lab, Sampler, Setup, Usage};
use legit::{Legit, Phase, PhaseResult, Targets};

/// One attack of the suite.
pub(crate) struct Attack {
    /// `area-what`, e.g. `h2-rapid-reset`.
    pub(crate) name: &'static str,
    /// In the `--fast` subset.
    pub(crate) fast: bool,
    pub(crate) setup: Setup,
    /// What the agent should do.
    pub(crate) expected: &'static str,
    /// What nginx, knot or HAProxy do for the same attack, with the directive.
    pub(crate) peers: &'static str,
    pub(crate) limits: Limits,
    /// Runs the attack (bounded) and checks its protocol-level outcome.
    pub(crate) run: fn(&mut Ctx<'_>) -> anyhow::Result<Check>,
}

/// How far the agent's usage may stay above where it started, once the attack is over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) rss_growth_mib: u64,
    pub(crate) fd_growth: u64,
    /// How long to wait, after the attack, for descriptors to come back.
    pub(crate) settle: Duration,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        rss_growth_mib: 32,
        fd_growth: 16,
        settle: Duration::from_secs(5),
    };
}

/// The attack's own verdict: whether the expected outcome held, and what was seen.
pub(crate) struct Check {
    pub(crate) ok: bool,
    pub(crate) observed: String,
}

impl Check {
    pub(crate) fn new(ok: bool, observed: impl Into<String>) -> Check {
        Check {
            ok,
            observed: observed.into(),
        }
    }
}

/// What an attack gets to work with.
pub(crate) struct Ctx<'a> {
    pub(crate) lab: &'a mut Lab,
    pub(crate) fast: bool,
}

impl Ctx<'_> {
    /// `fast` in the fast subset, else `full`.
    pub(crate) fn scale(&self, fast: usize, full: usize) -> usize {
        if self.fast { fast } else { full }
    }

    pub(crate) fn agent(&self) -> &harness::Agent {
        self.lab.agent()
    }
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let options = Options::parse(args)?;
    let attacks = all_attacks();
    if options.list {
        for attack in &attacks {
            println!(
                "{:<32} {}{}",
                attack.name,
                if attack.fast { "[fast] " } else { "" },
                attack.expected
            );
        }
        return Ok(());
    }
    let selected: Vec<&Attack> = attacks
        .iter()
        .filter(|attack| !options.fast || attack.fast)
        .filter(|attack| {
            options.only.is_empty()
                || options
                    .only
                    .iter()
                    .any(|only| attack.name == only || attack.name.starts_with(&format!("{only}-")))
        })
        .collect();
    anyhow::ensure!(
        !selected.is_empty(),
        "no attack matches {:?} (see --list)",
        options.only
    );
    let binary = options
        .agent_bin
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("release/defenra-agent"));
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it (`cargo build --release -p defenra-agent`) or pass --agent-bin",
        binary.display()
    );
    check_descriptor_limit(if options.fast { 8192 } else { 16_384 })?;
    eprintln!(
        "hostile: {} attack(s) against {}{}",
        selected.len(),
        binary.display(),
        if options.fast { " (fast subset)" } else { "" }
    );
    let started = Instant::now();
    let mut lab = Lab::new(binary.clone())?;
    let mut rows = Vec::new();
    for _ in 0..options.repeat {
        for attack in &selected {
            eprintln!("hostile: {} ...", attack.name);
            let row = run_one(&mut lab, attack, options.fast);
            eprintln!("hostile: {} {}", attack.name, row.summary());
            rows.push(row);
        }
    }
    drop(lab);
    let report = render(&rows, &binary, options.fast, started.elapsed());
    println!("{report}");
    let path = crate::target_dir().join("hostile-report.md");
    if let Err(error) = std::fs::write(&path, &report) {
        eprintln!("hostile: cannot write {}: {error}", path.display());
    } else {
        eprintln!("hostile: table written to {}", path.display());
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| !row.passed())
        .map(|row| row.name)
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} attack(s) failed: {}",
        failed.len(),
        rows.len(),
        failed.join(", ")
    );
    Ok(())
}

/// The attacks hold thousands of sockets (and the agent, which inherits the limit, as many):
/// refuse to start under a limit that would make them fail for the wrong reason.
fn check_descriptor_limit(needed: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok());
    match soft {
        Some(soft) if soft < needed => anyhow::bail!(
            "the open-file limit is {soft}; the attacks need {needed} (run `ulimit -n 65536` first)"
        ),
        _ => Ok(()),
    }
}

struct Options {
    only: Vec<String>,
    /// Runs the selection this many times on the same agent (a leak shows as growth).
    repeat: usize,
    fast: bool,
    list: bool,
    agent_bin: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut options = Options {
            only: Vec::new(),
            repeat: 1,
            fast: false,
            list: false,
            agent_bin: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--fast" => options.fast = true,
                "--list" => options.list = true,
                "--only" => options.only.extend(
                    args.next()
                        .context("--only needs attack names")?
                        .split(',')
                        .map(str::to_owned),
                ),
                "--repeat" => {
                    options.repeat = args
                        .next()
                        .context("--repeat needs a count")?
                        .parse()
                        .context("--repeat needs a count")?;
                }
                "--agent-bin" => {
                    options.agent_bin = Some(PathBuf::from(
                        args.next().context("--agent-bin needs a path")?,
                    ));
                }
                other => anyhow::bail!(
                    "unknown option {other:?} (expected --only NAME,..., --fast, --agent-bin PATH, --repeat N, --list)"
                ),
            }
        }
        Ok(options)
    }
}

fn all_attacks() -> Vec<Attack> {
    let mut attacks = Vec::new();
    attacks.extend(dns::attacks());
    attacks.extend(http1::attacks());
    attacks.extend(h2::attacks());
    attacks.extend(tls::attacks());
    attacks.extend(waf::attacks());
    attacks.extend(config::attacks());
    attacks.extend(l4::attacks());
    attacks
}

/// The measurements of one attack.
struct Row {
    name: &'static str,
    expected: &'static str,
    peers: &'static str,
    check: Result<Check, String>,
    baseline: PhaseResult,
    during: PhaseResult,
    after: PhaseResult,
    before: Usage,
    peak: Usage,
    settled: Usage,
    /// RSS after a config reload, whose `malloc_trim` hands freed memory back; taken only
    /// when `settled` is above the limit, to tell memory kept by the allocator from memory
    /// still in use.
    trimmed_rss_kib: Option<u64>,
    log_bytes: u64,
    seconds: f64,
    /// Pass criteria that failed.
    problems: Vec<String>,
}

impl Row {
    fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    fn summary(&self) -> String {
        let verdict = if self.passed() {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", self.problems.join("; "))
        };
        format!("{verdict} in {:.1} s: {}", self.seconds, self.measured())
    }

    fn measured(&self) -> String {
        let observed = match &self.check {
            Ok(check) => check.observed.clone(),
            Err(error) => format!("attack error: {error}"),
        };
        let mut text = format!(
            "{observed}. Legit {:.1} % during, {:.1} % after (p99 {:.0} / {:.0} ms); \
             RSS {} → {} → {} MiB{}; fds {} → {} → {}",
            self.during.success_percent(),
            self.after.success_percent(),
            self.during.p99_ms,
            self.after.p99_ms,
            self.before.rss_kib / 1024,
            self.peak.rss_kib / 1024,
            self.settled.rss_kib / 1024,
            self.trimmed_rss_kib.map_or(String::new(), |rss| format!(
                " ({} after a reload's malloc_trim)",
                rss / 1024
            )),
            self.before.fds,
            self.peak.fds,
            self.settled.fds,
        );
        if !self.during.failures.is_empty() {
            let _ = write!(
                text,
                " (failed during: {})",
                self.during.failures.join("; ")
            );
        }
        if self.log_bytes > 1024 * 1024 {
            let _ = write!(text, "; {} MiB of log", self.log_bytes / (1024 * 1024));
        }
        if self.baseline.success_percent() < 100.0 {
            let _ = write!(
                text,
                "; baseline only {:.1} % ({})",
                self.baseline.success_percent(),
                self.baseline.failures.join("; ")
            );
        }
        text
    }
}

fn run_one(lab: &mut Lab, attack: &Attack, fast: bool) -> Row {
    let started = Instant::now();
    let mut row = Row {
        name: attack.name,
        expected: attack.expected,
        peers: attack.peers,
        check: Err("not run".into()),
        baseline: PhaseResult::default(),
        during: PhaseResult::default(),
        after: PhaseResult::default(),
        before: Usage::default(),
        peak: Usage::default(),
        settled: Usage::default(),
        trimmed_rss_kib: None,
        log_bytes: 0,
        seconds: 0.0,
        problems: Vec::new(),
    };
    if let Err(error) = lab.ensure_agent(attack.setup) {
        row.problems.push(format!("agent did not start: {error:#}"));
        row.check = Err(format!("{error:#}"));
        return row;
    }
    let agent = lab.agent();
    let pid = agent.pid();
    let targets = Targets {
        dns: agent.dns,
        http: agent.http,
        https: agent.https,
        tcp_forward: lab.tcp_forward,
        tls: lab.tls_h1.clone(),
    };
    let log = agent.log.clone();
    if let Err(error) = legit::wait_ready(&targets, Duration::from_secs(15)) {
        row.problems.push(format!(
            "the agent did not serve every legitimate client at the start: {error}"
        ));
    }
    let clients = Legit::start(targets);
    clients.wait_for(Phase::Baseline, 3, Duration::from_secs(10));
    row.baseline = clients.result(Phase::Baseline);
    row.before = Usage::of(pid);
    let log_before = log.bytes.load(Relaxed);
    let sampler = Sampler::start(pid);
    clients.set_phase(Phase::During);
    let mut ctx = Ctx { lab, fast };
    row.check = (attack.run)(&mut ctx).map_err(|error| format!("{error:#}"));
    let lab = ctx.lab;
    clients.set_phase(Phase::Settling);
    row.log_bytes = log.bytes.load(Relaxed).saturating_sub(log_before);
    let died = lab
        .agent_mut()
        .and_then(harness::Agent::exit_status)
        .map(|status| status.to_string());
    if died.is_none() {
        // Let connections the attack left behind close, then measure the after phase.
        let deadline = Instant::now() + attack.limits.settle;
        while Instant::now() < deadline
            && Usage::of(pid).fds > row.before.fds + attack.limits.fd_growth
        {
            thread::sleep(Duration::from_millis(100));
        }
        thread::sleep(Duration::from_millis(300));
        clients.set_phase(Phase::After);
        clients.wait_for(
            Phase::After,
            if fast { 10 } else { 30 },
            Duration::from_secs(20),
        );
    }
    clients.set_phase(Phase::Settling);
    row.peak = sampler.peak();
    row.settled = Usage::of(pid);
    row.during = clients.result(Phase::During);
    row.after = clients.result(Phase::After);
    clients.stop();
    row.seconds = started.elapsed().as_secs_f64();

    // The verdict.
    if let Some(status) = &died {
        row.problems.push(format!(
            "the agent died ({status}); last log: {}",
            log.tail(3)
        ));
        lab.stop_agent();
    }
    match &row.check {
        Ok(check) if !check.ok => row.problems.push("expected outcome not met".into()),
        Ok(_) => {}
        Err(error) => row.problems.push(format!("attack failed to run: {error}")),
    }
    if row.during.success_percent() < 99.0 {
        row.problems.push(format!(
            "legit success during {:.1} % < 99 % ({})",
            row.during.success_percent(),
            row.during.failures.join("; ")
        ));
    }
    if row.after.total == 0 || row.after.ok < row.after.total {
        row.problems.push(format!(
            "legit success after {:.1} % < 100 % ({})",
            row.after.success_percent(),
            row.after.failures.join("; ")
        ));
    }
    let rss_limit = row.before.rss_kib + attack.limits.rss_growth_mib * 1024;
    if row.settled.rss_kib > rss_limit && died.is_none() && lab.apply_config().is_ok() {
        thread::sleep(Duration::from_millis(500));
        row.trimmed_rss_kib = Some(Usage::of(pid).rss_kib);
    }
    let rss_after = row.trimmed_rss_kib.unwrap_or(row.settled.rss_kib);
    if rss_after > rss_limit {
        row.problems.push(format!(
            "RSS stayed {} MiB above the start",
            rss_after.saturating_sub(row.before.rss_kib) / 1024
        ));
    }
    if row.settled.fds > row.before.fds + attack.limits.fd_growth {
        row.problems.push(format!(
            "{} descriptors more than at the start",
            row.settled.fds - row.before.fds
        ));
    }
    row
}

fn render(rows: &[Row], binary: &std::path::Path, fast: bool, elapsed: Duration) -> String {
    let mut out = String::new();
    let passed = rows.iter().filter(|row| row.passed()).count();
    let _ = writeln!(
        out,
        "\n`cargo xtask hostile{}` against `{}`: {passed} of {} passed in {:.0} s.\n",
        if fast { " --fast" } else { "" },
        binary.display(),
        rows.len(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| attack | expected | nginx / knot / HAProxy | measured | result |\n| --- | --- | --- | --- | --- |"
    );
    for row in rows {
        let result = if row.passed() {
            "pass".to_owned()
        } else {
            format!("**FAIL**: {}", row.problems.join("; "))
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            row.name,
            cell(row.expected),
            cell(row.peers),
            cell(&row.measured()),
            cell(&result)
        );
    }
    out
}

/// Text fit for one Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}
