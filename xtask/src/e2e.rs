//! `cargo xtask e2e`: the end-to-end scenario and the binary's black-box tests against the
//! release build of `defenra-agent`.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    crate::run_against_release_agent(&["test", "--package", "defenra-agent", "--test", "it"])
}
