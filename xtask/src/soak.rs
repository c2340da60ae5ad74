//! `cargo xtask soak --minutes N`: the soak test (agent-bin/examples/soak.rs) against the
//! release build of the agent. Not part of CI.

use crate::{cargo, project_root, run_command};

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let minutes = args
        .iter()
        .skip_while(|arg| *arg != "--minutes")
        .nth(1)
        .cloned()
        .unwrap_or_else(|| "10".to_owned());
    let cargo = cargo();
    run_command(
        &cargo,
        &["build", "--release", "--package", "defenra-agent"],
    )?;
    let binary = project_root().join("target/release/defenra-agent");
    let status = std::process::Command::new(&cargo)
        .args([
            "run",
            "--release",
            "--package",
            "defenra-agent",
            "--example",
            "soak",
            "--",
        ])
        .args(["--minutes", &minutes])
        .env("DEFENRA_AGENT_BIN", &binary)
        .current_dir(project_root())
        .status()?;
    anyhow::ensure!(status.success(), "the soak test failed");
    Ok(())
}
