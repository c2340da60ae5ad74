//! `cargo xtask ci`: the same checks locally and in CI.
//!
//! The fuzz package (`fuzz/`) is a workspace of its own: it gets its own fmt and clippy
//! runs here (clippy shares the main target directory, so only the fuzz crate and the few
//! dependencies whose features differ are checked again), then its seeds are replayed and
//! each target fuzzed briefly (`fuzz::ci`).

use std::process::Command;

use anyhow::Context;

use crate::{cargo, run_command};

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    let cargo = cargo();
    run_command(&cargo, &["fmt", "--all", "--", "--check"])?;
    run_command(
        &cargo,
        &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
    )?;
    run_command(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    let target_dir = crate::target_dir();
    let target_dir = target_dir
        .to_str()
        .context("target directory path is not UTF-8")?;
    run_command(
        &cargo,
        &[
            "clippy",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--target-dir",
            target_dir,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The browser tests fail without Chromium rather than pass; install it first.
    crate::chromium::ensure_installed()?;
    crate::packages::ensure(crate::packages::TEST_PACKAGES)?;
    run_command(&cargo, &["test", "--workspace"])?;
    crate::tidy::run()?;
    let has_deny = Command::new(&cargo)
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if has_deny {
        // `advisories` needs the internet, which CI does not have; see deny.toml.
        run_command(&cargo, &["deny", "check", "licenses", "bans", "sources"])?;
    } else {
        eprintln!(
            "cargo-deny is not installed; skipping `cargo deny check` (cargo install --locked cargo-deny)"
        );
    }
    // Last: it needs the fuzz build (a few minutes), and fails loudly if cargo-fuzz cannot
    // be installed.
    crate::fuzz::ci()?;
    Ok(())
}
