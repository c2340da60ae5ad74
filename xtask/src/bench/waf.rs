//! `cargo xtask bench waf`: placeholder until the waf benchmark is written.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the waf benchmark is not built yet")
}
