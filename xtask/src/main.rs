//! `cargo xtask`: the project's own automation, plain Rust over `std::process::Command`.
//!
//! - `chromium <install | dump URL>`: Debian's headless Chromium for the browser tests;
//! - `ci`: the checks CI runs (fmt, clippy, tests, tidy, and cargo-deny when installed);
//! - `demo`: runs the agent on `examples/demo.json` on unprivileged loopback ports;
//! - `e2e`: the binary's black-box tests against its release build;
//! - `fuzz [TARGET] (--minutes N | --replay)`: the fuzz targets in `fuzz/` (cargo-fuzz);
//! - `soak --minutes N`: long mixed load with config swaps (not in CI);
//! - `bench <dns|dns-rrl|http|waf|l4|challenge>`: the agent beside its peer (knot, nginx,
//!   nginx+lua, HAProxy; for the challenge, nginx's static page);
//! - `hostile [--fast] [--only NAME,...] [--agent-bin PATH]`: the attack suite against the
//!   agent binary, beside legitimate clients (docs/reliability.md, "Attack suite");
//! - `tidy`: checks that every crate root and module opens with a `//!` doc comment.

mod bench;
mod chromium;
mod ci;
mod demo;
mod e2e;
mod fuzz;
mod hostile;
mod packages;
mod soak;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        print_usage();
        return Ok(());
    };
    match command.as_str() {
        "ci" => ci::run(rest),
        "chromium" => chromium::run(rest),
        "demo" => demo::run(rest),
        "e2e" => e2e::run(rest),
        "fuzz" => fuzz::run(rest),
        "soak" => soak::run(rest),
        "bench" => bench::run(rest),
        "hostile" => hostile::run(rest),
        "tidy" => tidy::run(),
        "help" | "--help" | "-h" => {
            print_usage();
            Ok(())
        }
        other => {
            print_usage();
            anyhow::bail!("unknown xtask command {other:?}")
        }
    }
}

fn print_usage() {
    println!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         chromium install   install Debian's chromium for the browser tests (as root)\n  \
         chromium dump URL  print the DOM headless Chromium ends with on URL [--budget MS]\n  \
         ci                 fmt check, clippy -D warnings, tests, tidy (+ cargo-deny when installed)\n  \
         demo               run the agent on examples/demo.json on loopback ports\n  \
         e2e                black-box tests of the release binary (fake Core, all services)\n  \
         fuzz [TARGET] --minutes N   fuzz each target (all in turn) for N minutes (--seconds, --runs too)\n  \
         fuzz [TARGET] --replay      run the committed seed corpora once\n  \
         soak [--minutes N] mixed load while the config changes; checks RSS and descriptors\n  \
         bench <area>       benchmark against the peer: dns and dns-rrl (knot), http (nginx), waf (nginx+lua), l4 (haproxy), challenge (nginx static)\n  \
         hostile [--fast]   attacks on the release agent beside legitimate clients [--only NAME,...] [--agent-bin PATH] [--list]\n  \
         tidy               check doc comments on crate roots and modules"
    );
}

/// The workspace root (the parent of `xtask/`).
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the root), else
/// `target/` in the root.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => project_root().join(dir),
        None => project_root().join("target"),
    }
}

/// Runs `program args...` in the project root, failing if it exits non-zero.
pub(crate) fn run_command(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(project_root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    anyhow::ensure!(
        status.success(),
        "`{program} {}` failed with {status}",
        args.join(" ")
    );
    Ok(())
}

/// The cargo that runs this xtask (respects rustup's toolchain choice).
pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Builds the release agent, then runs `cargo <args>` with `DEFENRA_AGENT_BIN` pointing at
/// it, so black-box tests and the soak drive the optimised binary.
pub(crate) fn run_against_release_agent(args: &[&str]) -> anyhow::Result<()> {
    let cargo = cargo();
    run_command(
        &cargo,
        &["build", "--release", "--package", "defenra-agent"],
    )?;
    let binary = target_dir().join("release/defenra-agent");
    eprintln!(
        "$ DEFENRA_AGENT_BIN={} cargo {}",
        binary.display(),
        args.join(" ")
    );
    let status = Command::new(&cargo)
        .args(args)
        .env("DEFENRA_AGENT_BIN", &binary)
        .current_dir(project_root())
        .status()
        .context("cannot start cargo")?;
    anyhow::ensure!(
        status.success(),
        "`cargo {}` failed with {status}",
        args.join(" ")
    );
    Ok(())
}
