//! `cargo xtask fuzz`: builds and runs the fuzz targets in `fuzz/` with `cargo fuzz` on the
//! stable toolchain (`-s none`: coverage guidance without a sanitizer, which would need
//! nightly).
//!
//! - `cargo xtask fuzz [TARGET] --minutes N` (or `--seconds N`, or `--runs N`): fuzzes each
//!   target (all in turn without TARGET) for that long, growing the corpus in `fuzz/work/`
//!   (not committed) from the seeds in `fuzz/corpus/TARGET`, and prints a table of
//!   executions, coverage, peak RSS and findings. A crash, hang (over 10 s on one input) or
//!   memory blow-up (over 2 GiB) fails the run, with the input in `fuzz/artifacts/TARGET/`.
//! - `cargo xtask fuzz [TARGET] --replay`: runs every committed seed once (seconds).
//!
//! `cargo install cargo-fuzz --locked` runs first when `cargo fuzz` is missing; if it
//! fails, so does the command. Run long campaigns under `nice -n 19` on a shared machine.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

use crate::{cargo, project_root, run_command};

/// Seconds each target runs in `cargo xtask ci`.
pub(crate) const CI_SECONDS: u64 = 10;

/// A single input running longer than this is a hang.
const TIMEOUT_SECONDS: u32 = 10;
/// More resident memory than this is a leak (or a memory bomb).
const RSS_LIMIT_MB: u32 = 2048;

/// How long each target runs.
#[derive(Debug, Clone, Copy)]
enum Budget {
    Seconds(u64),
    Runs(u64),
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut target = None;
    let mut budget = None;
    let mut replay = false;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = |what: &str| -> anyhow::Result<f64> {
            let text = rest
                .next()
                .with_context(|| format!("{arg} needs a number of {what}"))?;
            let number: f64 = text
                .parse()
                .with_context(|| format!("{arg} wants a number of {what}, not {text:?}"))?;
            anyhow::ensure!(number > 0.0, "{arg} must be positive");
            Ok(number)
        };
        match arg.as_str() {
            "--minutes" => budget = Some(Budget::Seconds((value("minutes")? * 60.0) as u64)),
            "--seconds" => budget = Some(Budget::Seconds(value("seconds")? as u64)),
            "--runs" => budget = Some(Budget::Runs(value("executions")? as u64)),
            "--replay" => replay = true,
            flag if flag.starts_with('-') => anyhow::bail!("unknown flag {flag:?}\n{USAGE}"),
            name if target.is_none() => target = Some(name.to_owned()),
            other => anyhow::bail!("one target at most (got {other:?} too)\n{USAGE}"),
        }
    }
    let targets = match target {
        Some(name) => {
            let all = targets()?;
            anyhow::ensure!(
                all.contains(&name),
                "no fuzz target {name:?}; the targets are: {}",
                all.join(", ")
            );
            vec![name]
        }
        None => targets()?,
    };
    ensure_cargo_fuzz()?;
    build()?;
    if replay {
        replay_corpora(&targets)?;
    }
    match budget {
        Some(budget) => fuzz(&targets, budget),
        None if replay => Ok(()),
        None => anyhow::bail!("say how long: --minutes N, --seconds N or --runs N\n{USAGE}"),
    }
}

const USAGE: &str =
    "usage: cargo xtask fuzz [TARGET] (--minutes N | --seconds N | --runs N | --replay)";

/// What `cargo xtask ci` runs: every seed once, then each target for [`CI_SECONDS`].
pub(crate) fn ci() -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_cargo_fuzz()?;
    build()?;
    let targets = targets()?;
    replay_corpora(&targets)?;
    fuzz(&targets, Budget::Seconds(CI_SECONDS))?;
    eprintln!("fuzz: ci steps took {} s", started.elapsed().as_secs());
    Ok(())
}

/// The targets: one file each in `fuzz/fuzz_targets/`, sorted.
fn targets() -> anyhow::Result<Vec<String>> {
    let dir = project_root().join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "rs")
            && let Some(stem) = path.file_stem().and_then(|stem| stem.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    anyhow::ensure!(!names.is_empty(), "no fuzz targets in {}", dir.display());
    Ok(names)
}

/// Installs cargo-fuzz when `cargo fuzz` is missing. Fails loudly: CI must not skip fuzzing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("cargo-fuzz is missing; installing it (about a minute)");
    run_command(&cargo(), &["install", "cargo-fuzz", "--locked"])
        .context("cannot install cargo-fuzz, which the fuzz targets need")
}

fn build() -> anyhow::Result<()> {
    run_cargo_fuzz(&["build", "--fuzz-dir", "fuzz", "-s", "none"])
}

/// `cargo fuzz ARGS` in the project root, failing if it fails.
fn run_cargo_fuzz(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo fuzz {}", args.join(" "));
    let status = cargo_fuzz(args)
        .status()
        .context("cannot start cargo fuzz")?;
    anyhow::ensure!(
        status.success(),
        "`cargo fuzz {}` failed with {status}",
        args.join(" ")
    );
    Ok(())
}

/// A `cargo fuzz ARGS` command without the variables `cargo run` set for xtask itself:
/// `CARGO_MANIFEST_DIR` pointing at xtask/ makes ring's build script, and everything
/// above it, rebuild whenever the fuzz targets are built once from xtask and once by hand.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut command = Command::new(cargo());
    command.arg("fuzz").args(args).current_dir(project_root());
    for (name, _) in std::env::vars_os() {
        let inherited = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || matches!(
                    name,
                    "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if inherited {
            command.env_remove(name);
        }
    }
    command
}

/// Runs every committed seed of each target once.
fn replay_corpora(targets: &[String]) -> anyhow::Result<()> {
    for target in targets {
        let corpus = format!("fuzz/corpus/{target}");
        anyhow::ensure!(
            project_root().join(&corpus).is_dir(),
            "fuzz target {target} has no seed corpus in {corpus}"
        );
        run_cargo_fuzz(&[
            "run",
            "--fuzz-dir",
            "fuzz",
            "-s",
            "none",
            target,
            &corpus,
            "--",
            "-runs=0",
        ])
        .with_context(|| format!("replaying the seeds of {target}"))?;
    }
    Ok(())
}

/// The numbers of one fuzzing run, from libFuzzer's output.
#[derive(Debug, Default)]
struct Report {
    executions: u64,
    coverage: u64,
    features: u64,
    corpus: String,
    /// RSS once the seeds have run, and the highest: a leak shows as a growing gap.
    start_rss_mb: u64,
    peak_rss_mb: u64,
    seconds: u64,
    outcome: String,
}

/// Fuzzes each target in turn; fails at the end if any found something.
fn fuzz(targets: &[String], budget: Budget) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for target in targets {
        reports.push((target.clone(), fuzz_one(target, budget)?));
    }
    let mut table = String::from(
        "| target | executions | cov | ft | corpus | RSS after seeds, peak | seconds | result |\n\
         |---|---:|---:|---:|---|---:|---:|---|\n",
    );
    for (target, report) in &reports {
        let _ = writeln!(
            table,
            "| {target} | {} | {} | {} | {} | {} MB, {} MB | {} | {} |",
            report.executions,
            report.coverage,
            report.features,
            report.corpus,
            report.start_rss_mb,
            report.peak_rss_mb,
            report.seconds,
            report.outcome
        );
    }
    println!("{table}");
    let failed: Vec<&str> = reports
        .iter()
        .filter(|(_, report)| report.outcome != "ok")
        .map(|(target, _)| target.as_str())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "fuzzing found problems in: {} (inputs in fuzz/artifacts/; reproduce with \
         `cargo fuzz run --fuzz-dir fuzz -s none TARGET fuzz/artifacts/TARGET/FILE`)",
        failed.join(", ")
    );
    Ok(())
}

fn fuzz_one(target: &str, budget: Budget) -> anyhow::Result<Report> {
    let root = project_root();
    let work = format!("fuzz/work/{target}");
    fs::create_dir_all(root.join(&work)).with_context(|| format!("creating {work}"))?;
    let corpus = format!("fuzz/corpus/{target}");
    let log_path = root.join(format!("fuzz/work/{target}.log"));
    let mut options = vec![
        format!("-timeout={TIMEOUT_SECONDS}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        "-print_final_stats=1".to_owned(),
        match budget {
            Budget::Seconds(seconds) => format!("-max_total_time={seconds}"),
            Budget::Runs(runs) => format!("-runs={runs}"),
        },
    ];
    if let Some(max_len) = max_len(target) {
        options.push(format!("-max_len={max_len}"));
    }
    let dict = format!("fuzz/dicts/{target}.dict");
    if root.join(&dict).is_file() {
        options.push(format!("-dict={dict}"));
    }
    let mut args = vec![
        "run",
        "--fuzz-dir",
        "fuzz",
        "-s",
        "none",
        target,
        &work,
        &corpus,
        "--",
    ];
    args.extend(options.iter().map(String::as_str));
    eprintln!("$ cargo fuzz {}", args.join(" "));
    let started = Instant::now();
    let mut child = cargo_fuzz(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start cargo fuzz")?;
    let stderr = child.stderr.take().context("cargo fuzz's stderr")?;
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut report = Report::default();
    // Lines as bytes: a crash report may quote an input that is not UTF-8.
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.context("reading cargo fuzz's output")?;
        let line = String::from_utf8_lossy(&line);
        let _ = writeln!(log, "{line}");
        read_line(&line, &mut report);
        // Progress lines for every new input would drown the rest.
        if !(line.contains("\tNEW ") || line.contains("\tREDUCE ")) {
            eprintln!("{line}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    report.seconds = started.elapsed().as_secs();
    if status.success() {
        report.outcome = "ok".to_owned();
    } else if report.outcome.is_empty() {
        report.outcome = format!("failed ({status})");
    }
    if report.outcome != "ok" {
        eprintln!(
            "fuzz target {target}: {}; the log is {}",
            report.outcome,
            log_path.display()
        );
    }
    Ok(report)
}

/// Longest input for targets whose cost grows with it faster than their coverage: a WAF
/// script is at most 16 calls, which fit in 1 KiB. Others take libFuzzer's default (4 KiB,
/// or the longest seed).
fn max_len(target: &str) -> Option<usize> {
    (target == "waf_ngx").then_some(1024)
}

/// Takes the numbers libFuzzer prints (status lines and `-print_final_stats`) and the kind
/// of failure, if any.
fn read_line(line: &str, report: &mut Report) {
    let field = |name: &str| -> Option<&str> {
        let at = line.find(name)? + name.len();
        line[at..].split_whitespace().next()
    };
    if line.starts_with('#') {
        if let Some(cov) = field("cov: ").and_then(|text| text.parse().ok()) {
            report.coverage = cov;
        }
        if let Some(ft) = field("ft: ").and_then(|text| text.parse().ok()) {
            report.features = ft;
        }
        if let Some(corp) = field("corp: ") {
            report.corpus = corp.to_owned();
        }
        if line.contains("INITED")
            && let Some(rss) =
                field("rss: ").and_then(|text| text.trim_end_matches("Mb").parse().ok())
        {
            report.start_rss_mb = rss;
        }
    }
    if let Some(runs) = field("stat::number_of_executed_units:") {
        report.executions = runs.parse().unwrap_or(0);
    }
    if let Some(rss) = field("stat::peak_rss_mb:") {
        report.peak_rss_mb = rss.parse().unwrap_or(0);
    }
    for (marker, outcome) in [
        ("ERROR: libFuzzer: deadly signal", "crash"),
        ("ERROR: libFuzzer: timeout", "hang"),
        ("ERROR: libFuzzer: out-of-memory", "out of memory"),
        ("ERROR: libFuzzer: fuzz target exited", "exited"),
        ("ERROR: libFuzzer: fuzz target overwrites", "crash"),
    ] {
        if line.contains(marker) && report.outcome.is_empty() {
            report.outcome = outcome.to_owned();
        }
    }
    if line.contains("Test unit written to") {
        report.outcome = format!(
            "{}: {}",
            if report.outcome.is_empty() {
                "failed"
            } else {
                &report.outcome
            },
            line.rsplit(' ').next().unwrap_or("")
        );
    }
}
