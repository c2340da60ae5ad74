//! `cargo xtask e2e`: the end-to-end scenario and the binary's black-box tests against the
//! release build of `defenra-agent`.

use crate::{cargo, project_root, run_command};

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    let cargo = cargo();
    run_command(
        &cargo,
        &["build", "--release", "--package", "defenra-agent"],
    )?;
    let binary = project_root().join("target/release/defenra-agent");
    eprintln!(
        "$ DEFENRA_AGENT_BIN={} cargo test -p defenra-agent --test it",
        binary.display()
    );
    let status = std::process::Command::new(&cargo)
        .args(["test", "--package", "defenra-agent", "--test", "it"])
        .env("DEFENRA_AGENT_BIN", &binary)
        .current_dir(project_root())
        .status()?;
    anyhow::ensure!(status.success(), "end-to-end tests failed");
    Ok(())
}
