//! `cargo xtask soak --minutes N`: the soak test (agent-bin/examples/soak.rs) against the
//! release build of the agent. Not part of CI.

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let minutes = args
        .iter()
        .skip_while(|arg| *arg != "--minutes")
        .nth(1)
        .map_or("10", String::as_str);
    crate::run_against_release_agent(&[
        "run",
        "--release",
        "--package",
        "defenra-agent",
        "--example",
        "soak",
        "--",
        "--minutes",
        minutes,
    ])
}
