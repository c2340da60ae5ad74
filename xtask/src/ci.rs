//! `cargo xtask ci`: the same checks locally and in CI.

use std::process::Command;

use crate::{cargo, run_command};

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    let cargo = cargo();
    run_command(&cargo, &["fmt", "--all", "--", "--check"])?;
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
    Ok(())
}
