//! `cargo xtask e2e`: the end-to-end scenario and the binary's black-box tests (the browser
//! challenge in headless Chromium included) against the release build of `defenra-agent`.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    // The browser challenge test fails without Chromium rather than pass; install it first.
    crate::chromium::ensure_installed()?;
    crate::run_against_release_agent(&["test", "--package", "defenra-agent", "--test", "it"])
}
