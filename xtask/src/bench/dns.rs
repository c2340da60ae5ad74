//! `cargo xtask bench dns`: placeholder until the dns benchmark is written.

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the dns benchmark is not built yet")
}
