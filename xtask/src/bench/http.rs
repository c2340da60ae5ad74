//! `cargo xtask bench http`: placeholder until the http benchmark is written.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the http benchmark is not built yet")
}
